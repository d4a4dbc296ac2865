"""``kdcache serve [NAME=]DIR ...``: serve finished caches read-only over HTTP (uvicorn; uvloop/httptools when
installed).

The command binds its socket itself (``--port 0`` picks a free port) and prints the address it listens on,
``kdcache serve: listening on http://HOST:PORT/v1 (caches: a, b)``, before it serves: a script or test reads
the port from that line.
"""

from __future__ import annotations

import argparse
import errno
import importlib.util
import ipaddress
import socket
from pathlib import Path

from cache_server.cli import add_command
from cache_server.format import storage

__all__ = ["register", "run", "user_errors", "ServeOptionError", "is_loopback_host", "read_token_file",
           "bind_listening_socket", "DEFAULT_LIMIT_CONCURRENCY", "DEFAULT_TIMEOUT_KEEP_ALIVE_S"]

DEFAULT_LIMIT_CONCURRENCY = 512
DEFAULT_TIMEOUT_KEEP_ALIVE_S = 15
_LISTEN_BACKLOG = 2048  # uvicorn's default

DESCRIPTION = """\
Serve finished caches read-only over HTTP. Clients (kdlib.open_cache with an http URL) fetch the stored
shards and verify every byte against the manifest. Each cache is served at
http://HOST:PORT/v1/caches/NAME; the name defaults to the directory's basename.

Overload: once --limit-concurrency connections are open or requests are in flight, new requests get 503
(idle keep-alive connections count). kdlib retries 503 with backoff, so an overloaded server slows readers
down instead of failing them. Each kdlib reader process keeps up to 2 x prefetch_workers + 2 (at least 4)
connections: size the limit for readers x connections, and keep it under ulimit -n. The default
--timeout-keep-alive of 15 s is long enough to reuse a connection across a training step's shard fetches
and short enough that idle readers give their slots back.
"""

EPILOG = """\
examples:
  one cache on loopback, no token (allowed on loopback only):
    kdcache serve ./cache
  a free port, printed on the "listening on" line:
    kdcache serve ./cache --port 0
  a cache on S3 (credentials: AWS_* variables or ~/.aws profiles; shards are downloaded on first request):
    kdcache serve run1=s3://bucket/caches/run1
  two caches, one renamed, reachable from other hosts (a token is required):
    openssl rand -hex 32 > token.txt
    kdcache serve ./cache teacher-b=./other_cache --host 0.0.0.0 --port 8000 --token-file token.txt
  many training hosts: allow more open connections, drop idle ones sooner:
    kdcache serve ./cache --host 0.0.0.0 --token-file token.txt --limit-concurrency 2048 --timeout-keep-alive 5
  a client:
    export KDCACHE_TOKEN=$(cat token.txt)
    python -c "import kdlib; print(kdlib.open_cache('http://server:8000/v1/caches/cache').read(0, 4))"
"""


class ServeOptionError(ValueError):
    """A ``kdcache serve`` option that cannot work (unsafe bind, bad token file, port in use, bad limit)."""


def user_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean bad input (besides CacheError, which covers unusable cache directories)."""
    return (ServeOptionError,)


def register(subparsers: argparse._SubParsersAction) -> None:
    from cache_server.serve.config import DEFAULT_DECODED_CACHE_BYTES, DEFAULT_MAX_RESPONSE_BYTES, DEFAULT_MAX_ROWS

    parser = add_command(
        subparsers, "serve", help="serve caches read-only over HTTP",
        description=DESCRIPTION, epilog=EPILOG, run=run, user_errors=user_errors,
    )
    parser.add_argument("caches", nargs="+", metavar="[NAME=]DIR",
                        help="finished cache directories or object-store URLs (s3://bucket/prefix); the name defaults "
                        "to the basename")
    parser.add_argument("--storage-options", default=None, metavar="JSON",
                        help="fsspec options for URL caches, as a JSON object (default $KDCACHE_STORAGE_OPTIONS)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default 127.0.0.1); a non-loopback address needs --token-file")
    parser.add_argument("--port", type=int, default=8000,
                        help="TCP port (default 8000); 0 picks a free port and prints it")
    parser.add_argument("--token-file", type=Path, default=None,
                        help="file holding the bearer token clients must send (whitespace stripped)")
    parser.add_argument("--max-rows", type=int, default=DEFAULT_MAX_ROWS,
                        help=f"most sequences per /rows request (default {DEFAULT_MAX_ROWS})")
    parser.add_argument("--max-response-bytes", type=int, default=DEFAULT_MAX_RESPONSE_BYTES,
                        help=f"most body bytes per request (default {DEFAULT_MAX_RESPONSE_BYTES})")
    parser.add_argument("--decoded-cache-bytes", type=int, default=DEFAULT_DECODED_CACHE_BYTES,
                        help="memory for decoded shards behind /rows "
                        f"(default {DEFAULT_DECODED_CACHE_BYTES >> 20} MiB)")
    parser.add_argument("--limit-concurrency", type=int, default=DEFAULT_LIMIT_CONCURRENCY, metavar="N",
                        help="open connections / in-flight requests before new requests get 503 "
                        f"(default {DEFAULT_LIMIT_CONCURRENCY}; kdlib retries 503 with backoff)")
    parser.add_argument("--timeout-keep-alive", type=int, default=DEFAULT_TIMEOUT_KEEP_ALIVE_S, metavar="SECONDS",
                        help="close idle keep-alive connections after this long "
                        f"(default {DEFAULT_TIMEOUT_KEEP_ALIVE_S})")
    parser.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"])
    parser.add_argument("--access-log", action="store_true", help="log every request (off by default: hot path)")


def is_loopback_host(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and ``localhost``; anything else (0.0.0.0, names, LAN IPs) is not."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def read_token_file(path: Path) -> str:
    """The bearer token in ``path`` (surrounding whitespace stripped).

    Raises:
        ServeOptionError: the file cannot be read, is empty, or holds more than one word.
    """
    try:
        token = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ServeOptionError(f"cannot read --token-file {str(path)!r}: {exc}") from None
    if not token:
        raise ServeOptionError(f"--token-file {str(path)!r} is empty; put a long random token in it")
    if any(c.isspace() for c in token) or not token.isprintable():
        raise ServeOptionError(f"the token in {str(path)!r} must be one line without spaces")
    return token


def _check_options(args: argparse.Namespace, token: str | None) -> None:
    """Refuse options that are unsafe or cannot work, naming the option and a value that does."""
    if token is None and not is_loopback_host(args.host):
        raise ServeOptionError(
            f"refusing to bind {args.host!r} without a token: anyone who can reach it could read the caches. "
            "Pass --token-file FILE, or bind 127.0.0.1."
        )
    if not 0 <= args.port < 65536:
        raise ServeOptionError(f"--port must be in 0..65535 (0 picks a free port), got {args.port}")
    if args.limit_concurrency < 2:
        # uvicorn counts the connection carrying the request itself: 1 would refuse every request
        raise ServeOptionError(f"--limit-concurrency must be at least 2, got {args.limit_concurrency}")
    if not args.timeout_keep_alive > 0:
        raise ServeOptionError(f"--timeout-keep-alive must be positive, got {args.timeout_keep_alive}")
    for option, value in (("--max-rows", args.max_rows), ("--max-response-bytes", args.max_response_bytes)):
        if value <= 0:
            raise ServeOptionError(f"{option} must be positive, got {value}")
    if args.decoded_cache_bytes < 0:
        raise ServeOptionError(f"--decoded-cache-bytes must be >= 0, got {args.decoded_cache_bytes}")


def bind_listening_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host``:``port`` (0: a free port) and listening, as uvicorn would bind it.

    Binding before uvicorn starts lets the command print the real port, and turns a port in use into one
    clear error instead of a traceback from inside the server.

    Raises:
        ServeOptionError: the address is in use, not this host's, or not allowed.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        # uvicorn sets it too: a restart may reuse the port while old connections sit in TIME_WAIT
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host.strip("[]"), port))
        sock.listen(_LISTEN_BACKLOG)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise ServeOptionError(
                f"port {port} on {host} is already in use (another kdcache serve?); pick another --port, "
                "or --port 0 for a free one"
            ) from None
        raise ServeOptionError(
            f"cannot listen on {host}:{port}: {exc.strerror or exc}; check --host and --port"
        ) from None
    return sock


def _print_start(args: argparse.Namespace, caches: dict, port: int, token: str | None, loop: str,
                 http: str) -> None:
    """What is served where, how it is protected, and the one ``listening on`` line scripts parse."""
    from cache_server.format import wire

    base_url = f"http://{f'[{args.host}]' if ':' in args.host else args.host}:{port}"
    for name, cache in caches.items():
        layout = cache.layout
        print(f"kdcache serve: {name}: {layout.num_sequences} sequences x {layout.seq_len} positions, "
              f"k={layout.topk}, {layout.num_shards} shards from {cache.location} -> {base_url}{wire.cache_path(name)}",
              flush=True)
    auth = f"bearer token from {args.token_file}" if token else "none (loopback only)"
    print(f"kdcache serve: auth: {auth}; event loop {loop}, http {http}; at most {args.limit_concurrency} "
          f"connections (then 503), idle ones closed after {args.timeout_keep_alive} s; Ctrl-C stops", flush=True)
    print(f"kdcache serve: listening on {base_url}{wire.API_PREFIX} (caches: {', '.join(caches)})", flush=True)


def _event_loop_and_http() -> tuple[str, str]:
    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    http = "httptools" if importlib.util.find_spec("httptools") else "h11"
    return loop, http


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from cache_server.serve.app import create_app
    from cache_server.serve.registry import parse_cache_args, register_caches

    token = read_token_file(args.token_file) if args.token_file is not None else None
    _check_options(args, token)
    storage.use_storage_options(args.storage_options)
    caches = register_caches(parse_cache_args(args.caches))
    app = create_app(caches, token, max_rows=args.max_rows, max_response_bytes=args.max_response_bytes,
                     decoded_cache_bytes=args.decoded_cache_bytes)
    sock = bind_listening_socket(args.host, args.port)
    port = sock.getsockname()[1]
    loop, http = _event_loop_and_http()
    config = uvicorn.Config(
        app, host=args.host, port=port, loop=loop, http=http, log_level=args.log_level,
        access_log=args.access_log, limit_concurrency=args.limit_concurrency,
        timeout_keep_alive=args.timeout_keep_alive,
    )
    _print_start(args, caches, port, token, loop, http)
    with sock:
        uvicorn.Server(config).run(sockets=[sock])
    return 0
