"""Faults against a real server: SIGKILL mid-stream + restart, a corrupted or missing stored shard, client
disconnects."""

from __future__ import annotations

import shutil
import socket
import struct
import threading
import time

import httpx
import numpy as np
import pytest
import torch

from cache_server import format as fmt
from kdlib.data.cache import CorruptShardError, LocalCache
from kdlib.data.remote import RemoteCache
from tests.cachefactory import make_synthetic_cache
from tests.serverproc import ServerProcess

TOKEN = "fault-token"
CORRUPT_ARRAY, CORRUPT_SHARD = "topk_logprobs", 1
MISSING_ARRAY, MISSING_SHARD = "topk_ids", 2


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    cache_dir, arrays = make_synthetic_cache(
        root / "teacher", num_sequences=96, seq_len=128, topk=16, vocab_size=512, temperatures=(2.0,),
        shard_seqs=8, chunk_seqs=4, seed=5,
    )
    broken = root / "broken"
    shutil.copytree(cache_dir, broken)
    shard_file = broken / fmt.shard_relpath(CORRUPT_ARRAY, CORRUPT_SHARD, 3)
    data = bytearray(shard_file.read_bytes())
    data[len(data) // 3] ^= 0x40  # one flipped bit inside a compressed chunk
    shard_file.write_bytes(bytes(data))
    holey = root / "holey"  # a shard file deleted after the build (disk cleanup, partial copy)
    shutil.copytree(cache_dir, holey)
    (holey / fmt.shard_relpath(MISSING_ARRAY, MISSING_SHARD, 3)).unlink()
    server = ServerProcess([str(cache_dir), str(broken), str(holey)], token=TOKEN, token_dir=root).start()
    yield {"root": root, "dir": cache_dir, "broken": broken, "arrays": arrays, "server": server}
    server.stop()


def healthy(server) -> bool:
    return httpx.get(f"{server.base_url}/healthz", timeout=5).status_code == 200


def test_sigkill_mid_stream_then_restart(world, tmp_path):
    server = world["server"]
    local = LocalCache(world["dir"], decode_dir=tmp_path / "local")
    names = local.position_arrays()
    cache = RemoteCache(server.cache_url("teacher"), token=TOKEN, decode_dir=tmp_path / "remote",
                        backoff_s=0.05, max_retries=12, readahead=2, prefetch_workers=2)
    results: dict[int, dict[str, torch.Tensor]] = {}
    errors: list[BaseException] = []

    def reader() -> None:
        try:
            for start in range(0, cache.num_sequences, 4):
                results[start] = cache.read(start, min(start + 4, cache.num_sequences))
                time.sleep(0.02)  # a training step: keeps the reader busy across the kill
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=reader)
    thread.start()
    deadline = time.monotonic() + 30
    while not cache.store.is_decoded("topk_ids", 2) and time.monotonic() < deadline:
        time.sleep(0.005)
    assert thread.is_alive(), "the reader finished before the kill; make the cache larger"
    server.kill()  # SIGKILL: open connections drop mid-response
    time.sleep(0.4)
    server.start()  # same port
    thread.join(60)
    assert not thread.is_alive() and not errors, errors
    assert cache.source.stats["retries"] >= 1, cache.source.stats
    for start, batch in results.items():
        stop = min(start + 4, cache.num_sequences)
        want = local.read(start, stop)
        assert set(batch) == set(names)
        for key in names:
            assert torch.equal(batch[key], want[key]), (start, key)
    assert len(results) == -(-cache.num_sequences // 4)
    cache.close()


def test_corrupted_stored_shard_is_refused_by_the_client(world, tmp_path):
    cache = RemoteCache(world["server"].cache_url("broken"), token=TOKEN, decode_dir=tmp_path / "remote",
                        corrupt_retries=2, readahead=0)
    good = cache.read(0, 8)  # shard 0 is intact
    np.testing.assert_array_equal(good["topk_logprobs"].numpy(), world["arrays"]["topk_logprobs"][:8])
    with pytest.raises(CorruptShardError) as info:
        cache.read(8, 16, arrays=[CORRUPT_ARRAY])
    err = info.value
    assert (err.array, err.shard_index) == (CORRUPT_ARRAY, CORRUPT_SHARD)
    assert f"array {CORRUPT_ARRAY!r} shard {CORRUPT_SHARD}" in str(err) and "broken" in str(err)
    assert cache.source.stats["corrupt_transfers"] == 3  # fetched 1 + corrupt_retries times, never used
    assert not cache.store.is_decoded(CORRUPT_ARRAY, CORRUPT_SHARD)
    # the arrays of that shard outside its slot group are fine; topk_ids is stored in id order and decoded
    # by its log-probs (format v2), so it fails naming the damaged companion; a batch needing every array
    # fails naming the bad one
    assert cache.read(8, 16, arrays=["lse"])["lse"].shape == (8, 128)
    with pytest.raises(CorruptShardError, match=f"array {CORRUPT_ARRAY!r} shard {CORRUPT_SHARD}"):
        cache.read(8, 16, arrays=["topk_ids"])
    with pytest.raises(CorruptShardError, match=f"array {CORRUPT_ARRAY!r} shard {CORRUPT_SHARD}"):
        cache.read(4, 12)
    assert not cache.store.is_decoded(CORRUPT_ARRAY, CORRUPT_SHARD)
    cache.close()


def test_corrupted_stored_shard_rows_endpoint_names_it(world):
    url = world["server"].cache_url("broken")
    headers = {"Authorization": f"Bearer {TOKEN}"}
    response = httpx.get(f"{url}/rows", params={"start": 8, "stop": 10}, headers=headers)
    assert response.status_code == 500
    assert f"array {CORRUPT_ARRAY!r} shard {CORRUPT_SHARD}" in response.json()["detail"]
    assert httpx.get(f"{url}/rows", params={"start": 0, "stop": 8}, headers=headers).status_code == 200
    metrics = httpx.get(f"{world['server'].base_url}/metrics", headers=headers).text
    assert f'kdcache_corrupt_shards_total{{array="{CORRUPT_ARRAY}",cache="broken"}}' in metrics


def test_missing_stored_shard_is_final_and_named(world, tmp_path):
    url = world["server"].cache_url("holey")
    headers = {"Authorization": f"Bearer {TOKEN}"}
    first_row = 8 * MISSING_SHARD
    for path in (f"/shards/{MISSING_ARRAY}/{MISSING_SHARD}", f"/rows?start={first_row}&stop={first_row + 1}"):
        response = httpx.get(url + path, headers=headers)
        # not a 5xx: a missing file does not come back by retrying
        assert response.status_code == 404, (path, response.status_code)
        assert response.headers["x-kdcache-error"] == "shard-missing"
        body = response.json()
        assert (body["cache"], body["array"], body["shard_index"]) == ("holey", MISSING_ARRAY, MISSING_SHARD)
        assert "missing on the server" in body["detail"] and str(world["root"]) not in response.text
    # the client gives up at once (default max_retries=8 would mean ~15 s of backoff) and names the shard
    cache = RemoteCache(url, token=TOKEN, decode_dir=tmp_path / "remote", readahead=0)
    assert cache.read(0, 8)["topk_ids"].shape == (8, 128, 16)
    started = time.monotonic()
    with pytest.raises(CorruptShardError, match="missing on the server") as info:
        cache.read(8 * MISSING_SHARD, 8 * MISSING_SHARD + 4)
    assert time.monotonic() - started < 2.0
    assert (info.value.array, info.value.shard_index) == (MISSING_ARRAY, MISSING_SHARD)
    assert f"array {MISSING_ARRAY!r} shard {MISSING_SHARD}" in str(info.value)
    assert cache.source.stats["retries"] == 0 and cache.source.stats["corrupt_transfers"] == 0
    assert not cache.store.is_decoded(MISSING_ARRAY, MISSING_SHARD)
    cache.close()
    metrics = httpx.get(f"{world['server'].base_url}/metrics", headers=headers).text
    assert f'kdcache_corrupt_shards_total{{array="{MISSING_ARRAY}",cache="holey"}}' in metrics


def _abort_after_first_bytes(port: int, path: str) -> int:
    """Send a request, read a few body bytes, then reset the connection (RST, not FIN)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n\r\n"
    sock.sendall(request.encode())
    got = sock.recv(1024)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
    return len(got)


def test_client_disconnects_mid_stream_leave_server_healthy(world):
    server = world["server"]
    for _ in range(5):
        assert _abort_after_first_bytes(server.port, "/v1/caches/teacher/rows?start=0&stop=96") > 0
        assert _abort_after_first_bytes(server.port, "/v1/caches/teacher/shards/topk_ids/0") > 0
    time.sleep(0.2)
    assert healthy(server)
    response = httpx.get(server.cache_url("teacher") + "/rows", params={"start": 0, "stop": 96},
                         headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
    assert response.status_code == 200 and len(response.content) > 500_000
    assert server.proc.poll() is None
