"""The ``kdcache`` command line: one subcommand per module in ``cache_server/cli/``, errors handled here once.

Each subcommand module has ``register(subparsers)``, which adds its parser and sets the defaults
``func=run`` and ``user_errors=user_errors``; ``user_errors()`` returns the exception classes that mean bad
input (imported lazily). :func:`main` runs the subcommand and turns those, and every
:class:`cache_server.format.CacheError`, into ONE line ``kdcache <command>: error: <message>`` and exit
status 2. Any other exception is a bug: one line naming it and exit status 1 (``KDCACHE_DEBUG=1`` shows the
traceback). Ctrl-C exits with 130.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Callable, NoReturn

__all__ = [
    "main", "build_parser", "add_command", "kdcache_version", "SUBCOMMANDS", "EXIT_USER_ERROR", "EXIT_INTERNAL_ERROR",
]

EXIT_USER_ERROR = 2
EXIT_INTERNAL_ERROR = 1
EXIT_INTERRUPTED = 130

# Imported lazily so `kdcache info` does not pay for transformers or FastAPI.
SUBCOMMANDS = {
    "build": "cache_server.cli.build",
    "info": "cache_server.cli.info",
    "verify": "cache_server.cli.verify",
    "serve": "cache_server.cli.serve",
    "merge": "cache_server.cli.merge",
    "import": "cache_server.cli.import_cmd",
    "export": "cache_server.cli.export",
}

EPILOG = """\
examples:
  kdcache build --teacher ./teacher --data tokens.npy --topk 32 --seq-len 2048 --out ./cache
  kdcache info ./cache
  kdcache verify ./cache
  kdcache verify ./cache --decoded
  kdcache serve ./cache --port 8000
  kdcache merge ./cache-a ./cache-b --weights 0.7,0.3 --out ./cache-ab
  kdcache import ./kd_dataset.parquet --from axolotl --vocab-size 151936 --out ./cache
  kdcache export ./cache --to axolotl --out ./kd_dataset.parquet

Run "kdcache COMMAND --help" for the options of one command. Exit status: 0 success, 1 a damaged cache
(verify) or an internal error, 2 bad input, 130 interrupted. Set KDCACHE_DEBUG=1 to see the traceback of
an internal error.
"""


class _Parser(argparse.ArgumentParser):
    """An argparse parser whose usage errors are one line, like every other kdcache error."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def kdcache_version() -> str:
    """The installed distribution's version, or the package's own when running from a source tree."""
    try:
        from importlib.metadata import PackageNotFoundError, version

        return version("kdcache")
    except PackageNotFoundError:
        import cache_server

        return getattr(cache_server, "__version__", "unknown")


def add_command(subparsers: argparse._SubParsersAction, name: str, *, help: str, description: str, epilog: str,
                run: Callable[[argparse.Namespace], int], user_errors: Callable[[], tuple]) -> argparse.ArgumentParser:
    """Add subcommand ``name``: plain-text help, and the defaults :func:`main` relies on (func, user_errors)."""
    parser = subparsers.add_parser(name, help=help, description=description, epilog=epilog,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.set_defaults(func=run, user_errors=user_errors)
    return parser


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The ``kdcache`` parser; only the subcommand named in ``argv`` (if any) imports its module."""
    parser = _Parser(
        prog="kdcache",
        description="Build, inspect, verify and serve offline teacher-logit caches for knowledge distillation.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"kdcache {kdcache_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    wanted = next((a for a in argv or [] if not a.startswith("-")), None)
    for name, module_name in SUBCOMMANDS.items():
        if wanted in SUBCOMMANDS and name != wanted:
            # A light placeholder, so that `kdcache --help` still lists every command.
            sub.add_parser(name, help=f"see kdcache {name} --help")
            continue
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            stub = sub.add_parser(name, help=f"unavailable: {exc}")
            stub.set_defaults(func=_missing_dependency(name, exc), user_errors=tuple)
            continue
        module.register(sub)
    return parser


def _missing_dependency(name: str, exc: ImportError) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        print(f"kdcache {name}: error: a dependency is missing ({exc}); install the extras: "
              "pip install 'kdcache[build,server]'", file=sys.stderr)
        return EXIT_USER_ERROR

    return run


def _is_user_error(exc: BaseException, args: argparse.Namespace) -> bool:
    from cache_server.format import CacheError

    user_errors = getattr(args, "user_errors", None)
    try:
        classes = (CacheError, *(user_errors() if user_errors is not None else ()))
    except Exception:  # a subcommand whose own imports fail: report the original error, not this one
        classes = (CacheError,)
    return isinstance(exc, classes)


def _one_line(exc: BaseException) -> str:
    # Messages may quote multi-line input (a file's first bytes, a server's reply): keep the error one line.
    return " ".join(str(exc).split()) or type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    """Run ``kdcache`` with ``argv`` (default: the process's arguments); return the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
    prog = f"kdcache {args.command}"
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:
        if _is_user_error(exc, args):
            print(f"{prog}: error: {_one_line(exc)}", file=sys.stderr)
            return EXIT_USER_ERROR
        if os.environ.get("KDCACHE_DEBUG") == "1":
            raise
        print(f"{prog}: internal error: {type(exc).__name__}: {_one_line(exc)} (set KDCACHE_DEBUG=1 for the "
              "traceback, and please report it)", file=sys.stderr)
        return EXIT_INTERNAL_ERROR


if __name__ == "__main__":
    sys.exit(main())
