"""Tool commands: certs (a private CA and TLS certificates) and render-k8s (the KubeRay manifests)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _certs(args: argparse.Namespace) -> int:
    from attnserve.cli.certs import DEFAULT_NAMES, make_all

    try:
        paths = make_all(args.out, tuple(args.name or DEFAULT_NAMES), args.days)
    except FileExistsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for path in paths:
        print(path)
    return 0


def _render_k8s(args: argparse.Namespace) -> int:
    from attnserve.cli.render_k8s import write_all

    for path in write_all(args.root):
        print(path)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Adds certs and render-k8s to the `attnserve` subparsers."""
    p = sub.add_parser("certs", help="write a private CA, a server and a client certificate (TLS, mTLS)")
    p.add_argument("--out", type=Path, default=Path("certs"), help="folder to write into (certs/)")
    p.add_argument("--name", action="append", help="a DNS name or IP the server certificate is valid "
                   "for (repeatable; default localhost, 127.0.0.1, attnserve)")  # fmt: skip
    p.add_argument("--days", type=int, default=365, help="validity (365)")
    p.set_defaults(handler=_certs)

    p = sub.add_parser("render-k8s", help="regenerate the KubeRay manifests from deploy/serve/*.yaml")
    p.add_argument("--root", type=Path, default=Path("."), help="repository root")
    p.set_defaults(handler=_render_k8s)
