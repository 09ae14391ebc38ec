"""The plain grpc.aio server (no Ray) as a process of its own, for the bench's `plain` rows.

    python -m attnserve.bench.plain --repository model_repository --address 127.0.0.1:50099

It serves the models with the engine settings of the serve config file (per-model batching and
admission, ONNX Runtime settings), so it differs from the Ray path only in what carries the
calls. $ATTNSERVE_TLS_* and $ATTNSERVE_AUTH_TOKENS secure it as they secure `attnserve serve`.
SIGTERM or SIGINT stops it.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path

from attnserve.service.auth import token_store_from_env
from attnserve.service.config import DEFAULT_SERVE_CONFIG, AppArgs, LocalOptions, load_serve_config
from attnserve.service.core.engine import Engine, start_engines
from attnserve.service.core.manifest import discover
from attnserve.service.core.onnx_model import RuntimeConfig
from attnserve.service.plain_server import serve_plain
from attnserve.service.tls import ServerTls


def app_args(serve_config: Path, repository: Path) -> AppArgs:
    """The first application's arguments in the serve config, with `repository` as its models.

    Args:
        serve_config: a Ray Serve config file (deploy/serve/attnserve.yaml).
        repository: the model repository to serve instead of the file's.

    Returns:
        The validated AppArgs (runtime and per-model serving settings).
    """
    config = load_serve_config(LocalOptions(serve_config=serve_config, model_repository=repository))
    return AppArgs.model_validate(config.applications[0].args)


def engines_for(serve_config: Path, repository: Path, names: list[str] | None = None) -> dict[str, Engine]:
    """Engines for the models (all, or `names`) with the serve config's runtime and per-model settings.

    Args:
        serve_config: the Ray Serve config file whose engine settings to use.
        repository: the model repository.
        names: the models to load; None for every model.

    Returns:
        Engine per model name, each running on its own thread.
    """
    args = app_args(serve_config, repository)
    return start_engines(
        (m for m in discover(repository) if names is None or m.name in names),
        RuntimeConfig(**args.runtime.model_dump()),
        lambda name: args.serving.for_model(name).engine_config(),
    )


async def _serve(engines: dict[str, Engine], address: str) -> None:
    """Serves until SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    tls, tokens = ServerTls.from_env(), token_store_from_env()  # as `attnserve serve` takes them
    print(f"plain server on {address}{' (TLS)' if tls else ''}: {', '.join(sorted(engines))}", flush=True)
    await serve_plain(engines, address, stop, tls, tokens)


def main(argv: list[str] | None = None) -> int:
    """Entry point: parse arguments, load the engines, serve until signalled."""
    parser = argparse.ArgumentParser(prog="python -m attnserve.bench.plain", description=__doc__)
    parser.add_argument("--repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--address", default="127.0.0.1:50052")
    parser.add_argument("--serve-config", type=Path, default=DEFAULT_SERVE_CONFIG)
    parser.add_argument("--model", action="append", help="serve only these models (repeatable)")
    args = parser.parse_args(argv)
    engines = engines_for(args.serve_config, args.repository, args.model)
    try:
        asyncio.run(_serve(engines, args.address))
    finally:
        for engine in engines.values():
            engine.close(timeout_s=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
