"""`kdcache serve` endpoints, auth and path safety, against a real uvicorn subprocess on 127.0.0.1."""

from __future__ import annotations

import email.utils
import http.client
import io
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

import httpx
import numpy as np
import pyarrow as pa
import pytest

from pathlib import Path

from cache_server import cli
from cache_server import format as fmt
from cache_server.format import wire
from cache_server.serve.ranges import RangeNotSatisfiable, parse_single_range
from kdlib.data.remote import RemoteCache
from tests.cachefactory import make_synthetic_cache
from tests.serverproc import REPO_ROOT, ServerProcess

TOKEN = "test-token-4f1c2a9e"
SECRET = "SECRET-MARKER-do-not-serve"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("srv")
    small, small_arrays = make_synthetic_cache(
        root / "caches" / "small", num_sequences=20, seq_len=16, topk=4, vocab_size=300,
        temperatures=(2.0, 0.5), shard_seqs=8, chunk_seqs=4, seed=1,
    )
    wide, wide_arrays = make_synthetic_cache(  # vocab > 65536: uint32 ids
        root / "caches" / "wide_dir", num_sequences=6, seq_len=8, topk=3, vocab_size=66000,
        shard_seqs=4, chunk_seqs=2, seed=2,
    )
    # Files next to (not inside) the caches that must never be served.
    (root / "caches" / "secret.txt").write_text(SECRET)
    (root / "secret.txt").write_text(SECRET)
    # A cache whose shard is a symlink pointing outside it.
    linked = root / "caches" / "linked"
    shutil.copytree(small, linked)
    target = linked / fmt.shard_relpath("input_ids", 0, 2)
    target.unlink()
    target.symlink_to(root / "secret.txt")
    big, _ = make_synthetic_cache(  # uncompressed: its topk_ids shard (8 KiB) exceeds the 6000-byte limit
        root / "caches" / "big", num_sequences=8, seq_len=16, topk=32, vocab_size=300, shard_seqs=8,
        chunk_seqs=8, codec="none",
    )
    server = ServerProcess(
        [str(small), f"wide={wide}", str(linked), str(big)], token=TOKEN, token_dir=root,
        extra_args=["--max-rows", "16", "--max-response-bytes", "6000"],
    ).start()
    yield {"root": root, "small": small, "small_arrays": small_arrays, "wide": wide, "wide_arrays": wide_arrays,
           "server": server}
    server.stop()


def flat_values(column) -> np.ndarray:
    """All leaf values of a (nested FixedSizeList) column, row-major."""
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    while pa.types.is_fixed_size_list(column.type):
        column = column.flatten()
    return column.to_numpy()


def get(world, path, token=TOKEN, headers=None):
    hdrs = dict(headers or {})
    if token is not None:
        hdrs["Authorization"] = f"Bearer {token}".strip()
    return httpx.get(world["server"].base_url + path, headers=hdrs, timeout=10)


def raw_get(world, raw_path, token=TOKEN):
    """A request whose path bytes go out exactly as written (httpx would normalize '..')."""
    conn = http.client.HTTPConnection("127.0.0.1", world["server"].port, timeout=10)
    try:
        conn.putrequest("GET", raw_path, skip_accept_encoding=True)
        conn.putheader("Authorization", f"Bearer {token}")
        conn.endheaders()
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


# ---------------------------------------------------------------------------------------------- endpoints


def test_healthz_needs_no_token(world):
    response = get(world, "/healthz", token=None)
    assert response.status_code == 200
    assert response.json()["status"] == "ok"


def test_list_and_summary(world):
    caches = {c["name"]: c for c in get(world, "/v1/caches").json()["caches"]}
    assert set(caches) == {"small", "wide", "linked", "big"}
    assert caches["small"]["num_sequences"] == 20 and caches["small"]["temperatures"] == [2.0, 0.5]
    assert caches["wide"]["arrays"]["topk_ids"]["dtype"] == "uint32"
    assert get(world, "/v1/caches/small").json() == caches["small"]
    assert get(world, "/v1/caches/nope").status_code == 404


def test_manifest_is_exact_bytes(world):
    response = get(world, "/v1/caches/small/manifest")
    raw = (world["small"] / fmt.MANIFEST_NAME).read_bytes()
    assert response.status_code == 200 and response.content == raw
    digest = fmt.shard_sha256(raw)
    assert response.headers["x-checksum-sha256"] == digest
    assert response.headers["etag"] == f'"{digest}"'


def test_shard_bytes_etag_and_range(world):
    manifest = fmt.load_manifest(world["small"])
    path = world["small"] / fmt.shard_relpath("topk_ids", 1, 3)
    stored = path.read_bytes()
    sha = manifest["shards"]["topk_ids"][1]["sha256"]
    response = get(world, "/v1/caches/small/shards/topk_ids/1")
    assert response.status_code == 200 and response.content == stored
    assert response.headers["etag"] == f'"{sha}"' and response.headers["x-checksum-sha256"] == sha
    assert response.headers["accept-ranges"] == "bytes"

    part = get(world, "/v1/caches/small/shards/topk_ids/1", headers={"Range": "bytes=10-29"})
    assert part.status_code == 206 and part.content == stored[10:30]
    assert part.headers["content-range"] == f"bytes 10-29/{len(stored)}"
    tail = get(world, "/v1/caches/small/shards/topk_ids/1", headers={"Range": "bytes=-7"})
    assert tail.status_code == 206 and tail.content == stored[-7:]
    resume = get(world, "/v1/caches/small/shards/topk_ids/1", headers={"Range": "bytes=5-", "If-Range": f'"{sha}"'})
    assert resume.status_code == 206 and resume.content == stored[5:]
    stale = get(world, "/v1/caches/small/shards/topk_ids/1", headers={"Range": "bytes=5-", "If-Range": '"other"'})
    assert stale.status_code == 200 and stale.content == stored


@pytest.mark.parametrize(
    "range_header",
    [f"bytes={10**6}-", "bytes=-0", "bytes=20-10", "bytes=0-1,5-9", "items=0-5", "bytes=abc", "bytes=-", "garbage"],
)
def test_bad_range_is_416(world, range_header):
    response = get(world, "/v1/caches/small/shards/topk_ids/1", headers={"Range": range_header})
    assert response.status_code == 416, response.text
    assert response.headers["content-range"].startswith("bytes */")


def test_rows_arrow_stream_matches_written_arrays(world):
    arrays = world["small_arrays"]
    response = get(world, "/v1/caches/small/rows?start=5&stop=17")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/vnd.apache.arrow.stream"
    table = pa.ipc.open_stream(io.BytesIO(response.content)).read_all()
    n = 12
    assert table.column("sequence_index").to_pylist() == list(range(5, 17))
    assert table.schema.field("topk_ids").type == pa.list_(pa.list_(pa.uint16(), 4), 16)
    assert table.schema.field("lse_t0.5").type == pa.list_(pa.float32(), 16)
    for name, expected in arrays.items():
        values = flat_values(table.column(name))
        np.testing.assert_array_equal(values.reshape(n, *expected.shape[1:]), expected[5:17], err_msg=name)
    # a subset of arrays, uint32 ids
    response = get(world, "/v1/caches/wide/rows?start=1&stop=6&arrays=topk_ids,seq_nll")
    table = pa.ipc.open_stream(response.content).read_all()
    assert table.column_names == ["sequence_index", "topk_ids", "seq_nll"]
    ids = flat_values(table.column("topk_ids")).reshape(5, 8, 3)
    np.testing.assert_array_equal(ids, world["wide_arrays"]["topk_ids"][1:6])


@pytest.mark.parametrize(
    "query,status",
    [
        ("start=0&stop=17", 413),  # more rows than --max-rows 16
        ("start=0&stop=16", 413),  # 16 rows * 488 B (every array) > --max-response-bytes 6000
        ("start=0&stop=16&arrays=input_ids", 200),
        ("start=0&stop=21", 416),
        ("start=5&stop=4", 400),
        ("start=0&stop=2&arrays=../manifest.json", 400),
        ("start=0&stop=2&arrays=input_ids,input_ids", 400),
        ("start=-1&stop=2", 422),
        ("start=0", 422),
        ("start=20&stop=20", 200),
    ],
)
def test_rows_limits_and_validation(world, query, status):
    assert get(world, f"/v1/caches/small/rows?{query}").status_code == status


def test_range_is_never_left_to_starlette(world):
    # Starlette's FileResponse applies the request's Range itself: multi-part ranges, If-Range matched against
    # a Last-Modified date, and none at all before 0.39. The server validates one range and sends exactly that
    # window, so every body stays single-part and within --max-response-bytes (6000 here).
    path = world["small"] / fmt.shard_relpath("topk_ids", 1, 3)
    stored = path.read_bytes()
    assert 200 <= len(stored) <= 6000
    many = "bytes=" + ",".join(f"{2 * i}-{2 * i}" for i in range(100))  # 100 disjoint parts: > 6000 as multipart
    last_modified = email.utils.formatdate(path.stat().st_mtime, usegmt=True)
    for if_range in (last_modified, '"stale-etag"', "W/whatever"):
        response = get(world, "/v1/caches/small/shards/topk_ids/1", headers={"Range": many, "If-Range": if_range})
        # a validator that is not the shard's ETag means "send the whole file" (RFC 9110 If-Range)
        assert response.status_code == 200 and response.content == stored, (if_range, response.status_code)
        assert "multipart" not in response.headers["content-type"]
    big = world["root"] / "caches" / "big"
    big_mtime = email.utils.formatdate((big / fmt.shard_relpath("topk_ids", 0, 3)).stat().st_mtime, usegmt=True)
    refused = get(world, "/v1/caches/big/shards/topk_ids/0", headers={"Range": "bytes=0-99", "If-Range": big_mtime})
    assert refused.status_code == 413 and len(refused.content) < 1000
    # a Range that covers the whole file is still answered as a range (kdlib treats 200 to a Range as an error)
    everything = get(world, "/v1/caches/small/shards/topk_ids/1", headers={"Range": "bytes=0-"})
    assert everything.status_code == 206 and everything.content == stored
    assert everything.headers["content-range"] == f"bytes 0-{len(stored) - 1}/{len(stored)}"
    one = get(world, "/v1/caches/small/shards/topk_ids/1", headers={"Range": "Bytes = 3 - 9"})
    assert one.status_code == 206 and one.content == stored[3:10]
    assert one.headers["content-length"] == "7" and one.headers["content-range"] == f"bytes 3-9/{len(stored)}"


def test_shard_byte_limit(world):
    # --max-response-bytes 6000: a larger shard is refused whole and served in Range pieces.
    nbytes = fmt.load_manifest(world["root"] / "caches" / "big")["shards"]["topk_ids"][0]["nbytes"]
    assert nbytes > 6000
    response = get(world, "/v1/caches/big/shards/topk_ids/0")
    assert response.status_code == 413 and "Range" in response.json()["detail"]
    assert get(world, "/v1/caches/big/shards/topk_ids/0", headers={"Range": "bytes=0-6000"}).status_code == 413
    pieces = [get(world, "/v1/caches/big/shards/topk_ids/0", headers={"Range": f"bytes={a}-{a + 3999}"})
              for a in range(0, nbytes, 4000)]
    assert all(p.status_code == 206 for p in pieces)
    stored = (world["root"] / "caches" / "big" / fmt.shard_relpath("topk_ids", 0, 3)).read_bytes()
    assert b"".join(p.content for p in pieces) == stored


def test_read_only(world):
    url = world["server"].base_url + "/v1/caches/small/manifest"
    for method in ("POST", "PUT", "DELETE", "PATCH"):
        response = httpx.request(method, url, headers={"Authorization": f"Bearer {TOKEN}"})
        assert response.status_code == 405, method


def test_metrics(world):
    get(world, "/v1/caches/small/shards/input_ids/0")
    get(world, "/v1/caches/small/shards/input_ids/99")
    get(world, "/v1/caches/wide/manifest")
    get(world, "/v1/caches/no-such-cache-7/manifest")
    get(world, "/healthz")
    text = get(world, "/metrics").text
    assert 'kdcache_http_requests_total{cache="small",endpoint="/v1/caches/{name}/shards/{array}/{shard_index}"' in text
    assert "kdcache_http_response_bytes_total" in text
    assert 'kdcache_http_errors_total{cache="small"' in text
    # latency per cache; names that are not registered share one label (bounded cardinality)
    shard_route = "/v1/caches/{name}/shards/{array}/{shard_index}"
    assert f'kdcache_http_request_duration_seconds_count{{cache="small",endpoint="{shard_route}"}}' in text
    manifest_route = "/v1/caches/{name}/manifest"
    assert f'kdcache_http_request_duration_seconds_bucket{{cache="wide",endpoint="{manifest_route}",le="+Inf"}}' in text
    assert f'kdcache_http_request_duration_seconds_count{{cache="_unknown",endpoint="{manifest_route}"}}' in text
    assert 'kdcache_http_request_duration_seconds_count{cache="-",endpoint="/healthz"}' in text
    assert "no-such-cache-7" not in text


# ---------------------------------------------------------------------------------------------- auth


AUTH_PATHS = ["/v1/caches", "/v1/caches/small", "/v1/caches/small/manifest", "/v1/caches/small/shards/lse/0",
              "/v1/caches/small/rows?start=0&stop=1", "/metrics", "/openapi.json"]


@pytest.mark.parametrize("path", AUTH_PATHS)
@pytest.mark.parametrize("token", [None, "wrong", TOKEN + "x", "", TOKEN[:-1]])
def test_auth_required(world, path, token):
    response = get(world, path, token=token)
    assert response.status_code == 401
    assert response.headers.get("www-authenticate") == "Bearer"
    assert SECRET not in response.text


def test_auth_other_schemes_rejected(world):
    url = world["server"].base_url + "/v1/caches"
    assert httpx.get(url, auth=("user", TOKEN)).status_code == 401  # Basic
    assert httpx.get(url, headers={"Authorization": TOKEN}).status_code == 401
    assert httpx.get(url, headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200


def test_openapi_lists_versioned_endpoints(world):
    paths = get(world, "/openapi.json").json()["paths"]
    assert {"/v1/caches", "/v1/caches/{name}/manifest", "/v1/caches/{name}/shards/{array}/{shard_index}",
            "/v1/caches/{name}/rows", "/healthz", "/metrics"} <= set(paths)


# ---------------------------------------------------------------------------------------------- path safety


TRAVERSALS = [
    "/v1/caches/../secret.txt",
    "/v1/caches/../../secret.txt",
    "/v1/caches/%2e%2e/manifest",
    "/v1/caches/%2e%2e%2fsecret.txt/manifest",
    "/v1/caches/small/../secret.txt",
    "/v1/caches/small/shards/..%2f..%2fsecret.txt/0",
    "/v1/caches/small/shards/%2e%2e/0",
    "/v1/caches/small/shards/input_ids/..%2f..%2f..%2fsecret.txt",
    "/v1/caches/small/shards/input_ids/%2e%2e",
    "/v1/caches/small/shards/zarr.json/0",
    "/v1/caches/small/shards/input_ids/-1",
    "/v1/caches/small/shards/input_ids/1e2",
    "/v1/caches/small/shards/input_ids/0x1",
    "/v1/caches/small/shards/input_ids/99999999999999999999999999",
    "/v1/caches/small/shards/input_ids/3",
    "/v1/caches/small/shards/input_ids/0/0",
    "/v1/caches/small/shards/.kdcache-build/0",
    "/v1/caches/%2Fetc%2Fpasswd/manifest",
    "/v1/caches//etc/passwd/manifest",
    "/v1/caches/small/shards/%2Fetc%2Fpasswd/0",
    "/etc/passwd",
    "//etc/passwd",
    "/secret.txt",
    "/v1/caches/small%00/manifest",
    "/v1/caches/..%5c..%5csecret.txt/manifest",
    "http://127.0.0.1/../secret.txt",
    "/v1/caches/linked/shards/input_ids/0",  # a symlink inside the cache pointing outside it
]


# Anything path-like in an error body, e.g. /tmp/x or /etc/passwd (API paths like /v1/caches are fine).
_ABSOLUTE_PATH_RE = re.compile(rb"""(?:^|[\s'"(\[=,:])(/[^\s'"\\)\],]+)""")


def assert_no_filesystem_path(world, body: bytes) -> None:
    for root in {world["root"], world["root"].resolve(), REPO_ROOT, Path(tempfile.gettempdir()), Path.home()}:
        assert str(root).encode() not in body, body[:300]
    for match in _ABSOLUTE_PATH_RE.findall(body):
        assert match.startswith(b"/v1/"), (match, body[:300])


@pytest.mark.parametrize("raw_path", TRAVERSALS)
def test_paths_never_escape_the_caches(world, raw_path):
    status, body = raw_get(world, raw_path)
    assert 400 <= status < 500, (raw_path, status, body[:200])
    assert SECRET.encode() not in body
    assert b"root:" not in body
    assert_no_filesystem_path(world, body)


def test_symlinked_cache_serves_its_regular_shards(world):
    response = get(world, "/v1/caches/linked/shards/input_ids/1")
    assert response.status_code == 200


# ---------------------------------------------------------------------------------------------- overload


def test_limit_concurrency_503_and_keep_alive_timeout(world, tmp_path):
    with ServerProcess([str(world["small"])], token=TOKEN, token_dir=tmp_path,
                       extra_args=["--limit-concurrency", "3", "--timeout-keep-alive", "1"]) as server:
        headers = {"Authorization": f"Bearer {TOKEN}"}
        time.sleep(0.2)  # the start-up probe's connection is closed on the server side
        held = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(2)]
        try:
            time.sleep(0.2)
            # 2 open connections + this one reach the limit of 3: uvicorn answers 503 instead of queueing
            assert httpx.get(server.cache_url("small"), headers=headers).status_code == 503
            # kdlib retries 503 with backoff: a reader waits the overload out instead of failing
            threading.Timer(0.5, lambda: [sock.close() for sock in held]).start()
            with RemoteCache(server.cache_url("small"), token=TOKEN, decode_dir=tmp_path / "dec",
                             backoff_s=0.05, readahead=0) as cache:
                assert cache.read(0, 2)["topk_ids"].shape == (2, 16, 4)
                assert cache.source.stats["retries"] >= 1
        finally:
            for sock in held:
                sock.close()
        time.sleep(0.2)
        assert httpx.get(server.cache_url("small"), headers=headers).status_code == 200
        # an idle keep-alive connection is closed by the server after --timeout-keep-alive
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            response = b""
            while not response.endswith(b"}"):  # the whole (small JSON) response
                response += sock.recv(4096)
            assert response.startswith(b"HTTP/1.1 200 ")
            idle_from = time.monotonic()
            assert sock.recv(4096) == b""  # EOF: the server hung up
            assert 0.5 < time.monotonic() - idle_from < 5


def test_serve_refuses_bad_overload_settings(world, capsys):
    assert cli.main(["serve", str(world["small"]), "--limit-concurrency", "1"]) == 2
    assert "at least 2" in capsys.readouterr().err
    assert cli.main(["serve", str(world["small"]), "--timeout-keep-alive", "0"]) == 2
    assert "must be positive" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- CLI checks


def test_serve_refuses_public_bind_without_token(tmp_path, capsys, world):
    assert cli.main(["serve", str(world["small"]), "--host", "0.0.0.0"]) == 2
    assert "without a token" in capsys.readouterr().err


def test_serve_refuses_duplicates_bad_names_and_unfinished(tmp_path, capsys, world):
    small = str(world["small"])
    assert cli.main(["serve", small, f"small={world['wide']}"]) == 2
    assert "two caches are named 'small'" in capsys.readouterr().err
    assert cli.main(["serve", f"..={small}"]) == 2
    assert "not allowed" in capsys.readouterr().err
    unfinished = tmp_path / "unfinished"
    shutil.copytree(world["small"], unfinished)
    os.remove(unfinished / fmt.MANIFEST_NAME)
    assert cli.main(["serve", str(unfinished)]) == 2
    assert "unfinished build: rerun the same kdcache build command" in capsys.readouterr().err
    empty_token = tmp_path / "t.txt"
    empty_token.write_text("\n")
    assert cli.main(["serve", small, "--token-file", str(empty_token)]) == 2
    assert "is empty" in capsys.readouterr().err


def _serve_subprocess(*args: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    return subprocess.Popen([sys.executable, "-m", "cache_server", "serve", *args], cwd=REPO_ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_serve_port_zero_prints_the_port_it_listens_on(world):
    proc = _serve_subprocess(str(world["small"]), f"w={world['wide']}", "--port", "0")
    try:
        lines = []
        for line in proc.stdout:  # the line is flushed before serving starts
            lines.append(line)
            if "listening on" in line:
                break
        match = re.fullmatch(r"kdcache serve: listening on http://127\.0\.0\.1:(\d+)/v1 \(caches: small, w\)\n",
                             lines[-1])
        assert match is not None, lines
        port = int(match[1])
        assert port != 0
        assert f"-> http://127.0.0.1:{port}/v1/caches/small" in "".join(lines)
        response = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10)
        assert response.status_code == 200 and response.json() == {"status": "ok", "caches": 2}
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_serve_port_in_use_is_a_one_line_error(world):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        proc = _serve_subprocess(str(world["small"]), "--port", str(port))
        stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 2, (stdout, stderr)
    assert stderr.splitlines() == [
        f"kdcache serve: error: port {port} on 127.0.0.1 is already in use (another kdcache serve?); pick another "
        "--port, or --port 0 for a free one"
    ]
    assert "listening on" not in stdout


def test_serve_refuses_bad_limits(world, capsys):
    for option in ("--max-rows", "--max-response-bytes"):
        assert cli.main(["serve", str(world["small"]), option, "0"]) == 2
        assert f"{option} must be positive" in capsys.readouterr().err
    assert cli.main(["serve", str(world["small"]), "--port", "70000"]) == 2
    assert "--port must be in 0..65535" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- wire contract


def test_wire_paths_reach_the_server_routes(world):
    # kdlib.data.remote builds its URLs from cache_server.format.wire; the server routes come from it too.
    assert get(world, wire.caches_path()).status_code == 200
    assert get(world, wire.cache_path("small")).json()["name"] == "small"
    manifest = get(world, wire.manifest_path("small"))
    assert manifest.headers[wire.CHECKSUM_HEADER] == fmt.shard_sha256(manifest.content)
    assert manifest.headers["etag"] == wire.quoted_etag(manifest.headers[wire.CHECKSUM_HEADER])
    assert wire.shard_path("small", "topk_ids", 1) == wire.cache_path("small") + wire.shard_suffix("topk_ids", 1)
    shard = get(world, wire.shard_path("small", "topk_ids", 1), headers={"Range": wire.range_header(2, 9)})
    assert shard.status_code == 206 and len(shard.content) == 7
    rows = get(world, wire.rows_path("small") + "?start=0&stop=2&arrays=lse")
    assert rows.status_code == 200 and rows.headers["content-type"] == wire.ARROW_STREAM_MEDIA_TYPE
    assert wire.CACHE_URL_RE.match(world["server"].cache_url("small"))
    assert not wire.CACHE_URL_RE.match(world["server"].base_url + "/v1/caches/../x")


def test_shard_missing_is_404_with_the_wire_error_code(world, tmp_path):
    holey = tmp_path / "holey"
    shutil.copytree(world["small"], holey)
    (holey / fmt.shard_relpath("lse", 1, 2)).unlink()
    with ServerProcess([str(holey)], token=TOKEN, token_dir=tmp_path) as server:
        headers = server.auth_headers
        response = httpx.get(server.base_url + wire.shard_path("holey", "lse", 1), headers=headers)
        assert response.status_code == 404 and response.headers[wire.ERROR_HEADER] == wire.SHARD_MISSING
        assert response.json()["array"] == "lse" and response.json()["shard_index"] == 1
        assert httpx.get(server.base_url + wire.shard_path("holey", "lse", 0), headers=headers).status_code == 200


@pytest.mark.parametrize(
    "header,size,window",
    [("bytes=0-9", 100, (0, 10)), ("bytes=90-", 100, (90, 100)), ("bytes=-5", 100, (95, 100)),
     ("bytes=-500", 100, (0, 100)), ("bytes=10-1000", 100, (10, 100)), ("BYTES = 1 - 1", 100, (1, 2))],
)
def test_parse_single_range(header, size, window):
    assert parse_single_range(header, size) == window


@pytest.mark.parametrize("header", ["bytes=100-", "bytes=-0", "bytes=5-4", "bytes=0-1,3-4", "bytes=", "lines=0-1"])
def test_parse_single_range_refuses(header):
    with pytest.raises(RangeNotSatisfiable):
        parse_single_range(header, 100)
