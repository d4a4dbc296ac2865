"""`kdcache serve`: serve finished caches read-only over HTTP (uvicorn; uvloop/httptools when installed).

Examples::

    # one cache on loopback, no token (loopback only)
    kdcache serve ./cache

    # two caches, one renamed, reachable from other hosts: a token is required
    echo "$(openssl rand -hex 32)" > token.txt
    kdcache serve ./cache teacher-b=./other_cache --host 0.0.0.0 --port 8000 --token-file token.txt

    # many training hosts: allow more open connections, drop idle ones sooner
    kdcache serve ./cache --host 0.0.0.0 --token-file token.txt --limit-concurrency 2048 --timeout-keep-alive 5

    # a client
    export KDCACHE_TOKEN=$(cat token.txt)
    python -c "import kdlib; print(kdlib.open_cache('http://server:8000/v1/caches/cache').read(0, 4))"

Overload: uvicorn answers 503 once --limit-concurrency connections are open or requests are in flight
(default 512; idle keep-alive connections count). kdlib retries 503 with backoff, so an overloaded server
slows readers down instead of failing them. Each kdlib reader process keeps up to 2 * prefetch_workers + 2
(at least 4) connections: size the limit for readers x connections, and keep it under `ulimit -n`.
--timeout-keep-alive (default 15 s) is long enough to reuse a connection across a training step's shard
fetches and short enough that idle readers give their slots back.
"""

from __future__ import annotations

import argparse
import importlib.util
import ipaddress
import sys
from pathlib import Path

__all__ = ["register", "run", "is_loopback_host", "read_token_file", "DEFAULT_LIMIT_CONCURRENCY",
           "DEFAULT_TIMEOUT_KEEP_ALIVE_S"]

DEFAULT_LIMIT_CONCURRENCY = 512
DEFAULT_TIMEOUT_KEEP_ALIVE_S = 15


def register(subparsers: argparse._SubParsersAction) -> None:
    from cache_server.serve.app import DEFAULT_MAX_RESPONSE_BYTES, DEFAULT_MAX_ROWS

    parser = subparsers.add_parser(
        "serve",
        help="serve caches read-only over HTTP",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("caches", nargs="+", metavar="[NAME=]DIR",
                        help="finished cache directories; the name defaults to the directory's basename")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default 127.0.0.1); a non-loopback address needs --token-file")
    parser.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    parser.add_argument("--token-file", type=Path, default=None,
                        help="file holding the bearer token clients must send (whitespace stripped)")
    parser.add_argument("--max-rows", type=int, default=DEFAULT_MAX_ROWS,
                        help=f"most sequences per /rows request (default {DEFAULT_MAX_ROWS})")
    parser.add_argument("--max-response-bytes", type=int, default=DEFAULT_MAX_RESPONSE_BYTES,
                        help=f"most body bytes per request (default {DEFAULT_MAX_RESPONSE_BYTES})")
    parser.add_argument("--decoded-cache-bytes", type=int, default=512 << 20,
                        help="memory for decoded shards behind /rows (default 512 MiB)")
    parser.add_argument("--limit-concurrency", type=int, default=DEFAULT_LIMIT_CONCURRENCY, metavar="N",
                        help="open connections / in-flight requests before new requests get 503 "
                        f"(default {DEFAULT_LIMIT_CONCURRENCY}; kdlib retries 503 with backoff)")
    parser.add_argument("--timeout-keep-alive", type=int, default=DEFAULT_TIMEOUT_KEEP_ALIVE_S, metavar="SECONDS",
                        help="close idle keep-alive connections after this long "
                        f"(default {DEFAULT_TIMEOUT_KEEP_ALIVE_S})")
    parser.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"])
    parser.add_argument("--access-log", action="store_true", help="log every request (off by default: hot path)")
    parser.set_defaults(func=run)


def is_loopback_host(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and ``localhost``; anything else (0.0.0.0, names, LAN IPs) is not."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def read_token_file(path: Path) -> str:
    try:
        token = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise SystemExit(f"kdcache serve: cannot read --token-file {str(path)!r}: {exc}") from None
    if not token:
        raise SystemExit(f"kdcache serve: --token-file {str(path)!r} is empty; put a long random token in it")
    if any(c.isspace() for c in token) or not token.isprintable():
        raise SystemExit(f"kdcache serve: the token in {str(path)!r} must be one line without spaces")
    return token


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from cache_server.format import CacheError
    from cache_server.serve.registry import parse_cache_args, register_caches
    from cache_server.serve.app import API_PREFIX, create_app

    token = read_token_file(args.token_file) if args.token_file is not None else None
    if token is None and not is_loopback_host(args.host):
        print(
            f"kdcache serve: refusing to bind {args.host!r} without a token: anyone who can reach it could read "
            "the caches. Pass --token-file FILE, or bind 127.0.0.1.",
            file=sys.stderr,
        )
        return 2
    if not 0 < args.port < 65536:
        print(f"kdcache serve: --port must be in 1..65535, got {args.port}", file=sys.stderr)
        return 2
    if args.limit_concurrency < 2:
        # uvicorn counts the connection carrying the request itself: 1 would refuse every request
        print(f"kdcache serve: --limit-concurrency must be at least 2, got {args.limit_concurrency}", file=sys.stderr)
        return 2
    if not args.timeout_keep_alive > 0:
        print(f"kdcache serve: --timeout-keep-alive must be positive, got {args.timeout_keep_alive}", file=sys.stderr)
        return 2
    try:
        caches = register_caches(parse_cache_args(args.caches))
        app = create_app(
            caches, token, max_rows=args.max_rows, max_response_bytes=args.max_response_bytes,
            decoded_cache_bytes=args.decoded_cache_bytes,
        )
    except (CacheError, ValueError) as exc:
        print(f"kdcache serve: {exc}", file=sys.stderr)
        return 2

    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    http = "httptools" if importlib.util.find_spec("httptools") else "h11"
    shown_host = f"[{args.host}]" if ":" in args.host else args.host
    for name, cache in caches.items():
        layout = cache.layout
        print(
            f"kdcache serve: {name}: {layout.num_sequences} sequences x {layout.seq_len} positions, k={layout.topk}, "
            f"{layout.num_shards} shards from {cache.root} -> http://{shown_host}:{args.port}{API_PREFIX}/caches/{name}",
            flush=True,
        )
    auth = f"bearer token from {args.token_file}" if token else "none (loopback only)"
    print(f"kdcache serve: auth: {auth}; event loop {loop}, http {http}; at most {args.limit_concurrency} "
          f"connections (then 503), idle ones closed after {args.timeout_keep_alive} s; Ctrl-C stops", flush=True)
    uvicorn.run(
        app, host=args.host, port=args.port, loop=loop, http=http, log_level=args.log_level,
        access_log=args.access_log, limit_concurrency=args.limit_concurrency,
        timeout_keep_alive=args.timeout_keep_alive,
    )
    return 0
