"""Memory of live version swaps: RSS of this process over repeated load/unload cycles of a version.

    python -m attnserve.bench.version_memory --model en-fr-transformer --cycles 20

Each cycle loads a second version of the model beside the first (warm-up included) through the
replica's own `ModelSet`, then retires it; RSS is read once the retired engine is freed. Writes
bench/results/version_memory.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import psutil

from attnserve.core.scheduler import EngineConfig
from attnserve.core.versions import VersionPolicy, scan, wanted
from attnserve.service.model_set import ModelSet

ONE, BOTH = VersionPolicy(versions=(1,)), VersionPolicy(all=True)


def copy_as_version(entry: Path, repository: Path, version: int) -> Path:
    """A copy of a repository entry as `version` of its model in `repository`; returns its folder."""
    manifest = json.loads((entry / "manifest.json").read_text())
    folder = repository / manifest["name"] / str(version)
    shutil.copytree(entry, folder)
    manifest["version"] = version
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def measure(entry: Path, cycles: int) -> dict:
    """RSS (MiB) after one settling cycle, after `cycles` more, and with both versions loaded."""
    repository = Path(tempfile.mkdtemp(prefix="attnserve-versions-"))
    try:
        copy_as_version(entry, repository, 1)
        copy_as_version(entry, repository, 2)
        models = ModelSet(drain_s=5)
        process = psutil.Process()

        def apply(policy: VersionPolicy) -> float:
            models.reconcile(wanted(scan(repository), policy), lambda name: EngineConfig(max_batch_size=8))
            while any(state == "UNLOADING" for _, state, _ in models.states()):
                time.sleep(0.01)
            return process.memory_info().rss / 2**20

        for _ in range(2):  # settle the allocators
            apply(BOTH)
            start = apply(ONE)
        both = 0.0
        for _ in range(cycles):
            both = max(both, apply(BOTH))
            apply(ONE)
        end = process.memory_info().rss / 2**20
        models.close()
    finally:
        shutil.rmtree(repository)
    return {"cycles": cycles, "start_mib": round(start, 1), "end_mib": round(end, 1),
            "growth_pct": round(100 * (end / start - 1), 1), "both_loaded_mib": round(both, 1)}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """Prints a row per model and writes the JSON."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repository", type=Path, default=Path("model_repository"))
    p.add_argument("--model", action="append", help="default: g2p-bahdanau and en-fr-transformer")
    p.add_argument("--cycles", type=int, default=20)
    p.add_argument("--out", type=Path, default=Path("bench/results/version_memory.json"))
    args = p.parse_args(argv)
    results = {}
    for name in args.model or ["g2p-bahdanau", "en-fr-transformer"]:
        entry = max((args.repository / name).iterdir(), key=lambda v: int(v.name) if v.name.isdigit() else -1)
        r = results[name] = measure(entry, args.cycles)
        print(
            f"{name}: RSS {r['start_mib']} MiB -> {r['end_mib']} MiB after {r['cycles']} load/unload "
            f"cycles ({r['growth_pct']:+.1f} %); both versions loaded {r['both_loaded_mib']} MiB",
            flush=True,
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
