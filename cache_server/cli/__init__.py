"""`kdcache` command line: one subcommand per module in ``cache_server/cli/``.

Examples::

    kdcache build --teacher ./teacher --data tokens.npy --topk 32 --seq-len 2048 --out ./cache
    kdcache info ./cache
    kdcache verify ./cache
    kdcache serve ./cache --port 8000
"""

from __future__ import annotations

import argparse
import importlib
import sys

__all__ = ["main", "build_parser"]

# Imported lazily so `kdcache info` does not pay for transformers or FastAPI.
SUBCOMMANDS = {
    "build": "cache_server.cli.build",
    "info": "cache_server.cli.info",
    "verify": "cache_server.cli.verify",
    "serve": "cache_server.cli.serve",
}


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kdcache", description="Build, inspect, verify and serve offline teacher-logit caches."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    wanted = None
    if argv:
        wanted = next((a for a in argv if not a.startswith("-")), None)
    for name, module_name in SUBCOMMANDS.items():
        if wanted in SUBCOMMANDS and name != wanted:
            # Register a light placeholder so `kdcache --help` still lists every command.
            sub.add_parser(name, help=f"see `kdcache {name} --help`")
            continue
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            stub = sub.add_parser(name, help=f"unavailable: {exc}")
            stub.set_defaults(func=lambda args, exc=exc, name=name: _missing(name, exc))
            continue
        module.register(sub)
    return parser


def _missing(name: str, exc: ImportError) -> int:
    print(
        f"kdcache {name}: a dependency is missing ({exc}). Install the extras: pip install 'kdcache[build,server]'",
        file=sys.stderr,
    )
    return 2


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
