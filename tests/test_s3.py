"""Caches on object storage end to end, against a real moto S3 server on 127.0.0.1 (tests/moto_server.py).

Build to ``s3://`` (SIGKILL mid-build + resume: the same shard objects as a local build), verify, info, read
through ``open_cache`` (arrays identical to the local build), serve from S3 over HTTP, a corrupt object →
``CorruptShardError`` naming it, a lock object of another host → refused, and the endpoint stopped mid-read and
restarted on the same port → the read finishes with identical data.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("s3fs")
pytest.importorskip("moto")

from cache_server import format as fmt  # noqa: E402
from cache_server.cli import main  # noqa: E402
from cache_server.format import storage  # noqa: E402
from cache_server.format.build_lock import BUILD_STATE_DIR  # noqa: E402
from kdlib.data.cache import LocalCache  # noqa: E402
from kdlib.data.open import open_cache  # noqa: E402
from tests.cachefactory import make_synthetic_cache  # noqa: E402
from tests.moto_server import MotoServer  # noqa: E402
from tests.serverproc import ServerProcess  # noqa: E402
from tests.teachers import make_llama_teacher  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
T = 17
STATE = BUILD_STATE_DIR


@pytest.fixture(scope="module")
def moto(tmp_path_factory):
    saved = dict(os.environ)
    with MotoServer() as server:
        os.environ.update(server.env())
        os.environ.pop(storage.STORAGE_OPTIONS_ENV, None)
        try:
            yield server
        finally:
            os.environ.clear()
            os.environ.update(saved)


@pytest.fixture(scope="module")
def built(moto, tmp_path_factory):
    """A local reference build, and the same build to S3, SIGKILLed mid-run and resumed."""
    root = tmp_path_factory.mktemp("s3build")
    teacher = make_llama_teacher(root / "teacher", 300, hidden_size=32, seed=5, logit_scale=10.0)
    np.save(root / "tokens.npy", np.random.default_rng(5).integers(0, 300, size=24 * T + 3))

    def args(out: str) -> list[str]:
        return ["build", "--teacher", str(teacher), "--data", str(root / "tokens.npy"), "--topk", "5",
                "--seq-len", str(T), "--out", out, "--shard-seqs", "2", "--chunk-seqs", "1", "--batch-size", "1",
                "--temperatures", "2", "--no-progress"]

    reference = root / "reference"
    assert main(args(str(reference))) == 0
    url = f"s3://{moto.bucket}/caches/run1"
    store = storage.open_store(url)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "cache_server", *args(url)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not store.list(f"{STATE}/shards/"):
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "no journal object appeared"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    journaled = len(store.list(f"{STATE}/shards/"))
    return {"root": root, "reference": reference, "url": url, "args": args, "journaled": journaled}


def test_build_sigkill_resume_matches_local_build(built):
    url, reference, store = built["url"], built["reference"], storage.open_store(built["url"])
    num_shards = fmt.load_manifest(reference)["num_shards"]
    assert 1 <= built["journaled"] < num_shards, f"the kill landed after {built['journaled']}/{num_shards} shards"
    # Unfinished: journal objects, the killed build's lock object, no manifest; readers refuse it.
    assert not store.exists(fmt.MANIFEST_NAME)
    assert store.exists(f"{STATE}/lock.rank0")
    with pytest.raises(fmt.CacheError, match="unfinished build"):
        fmt.load_manifest(url)
    with pytest.raises(fmt.CacheError, match="unfinished build"):
        open_cache(url)

    assert main(built["args"](url)) == 0  # resume: the dead holder's lock (same host) is taken over
    manifest, ref_manifest = fmt.load_manifest(url), fmt.load_manifest(reference)
    assert manifest["shards"] == ref_manifest["shards"] and manifest["build_args"] == ref_manifest["build_args"]
    for array, index, path in fmt.iter_shard_files(reference, ref_manifest):
        rel = path.relative_to(reference).as_posix()
        assert store.read_bytes(rel) == path.read_bytes(), f"{rel} differs"
    for path in reference.rglob("zarr.json"):
        assert store.read_bytes(path.relative_to(reference).as_posix()) == path.read_bytes()
    assert not store.list(f"{STATE}/")  # journal, settings and lock objects are gone
    # A lost shard object: the rerun verifies every object, rebuilds just that shard, keeps the manifest.
    lost = fmt.shard_relpath("topk_ids", 3, 3)
    intact = store.read_bytes(lost)
    store.delete([lost])
    manifest_raw = store.read_bytes(fmt.MANIFEST_NAME)
    assert main(built["args"](url)) == 0
    assert store.read_bytes(lost) == intact and store.read_bytes(fmt.MANIFEST_NAME) == manifest_raw


def test_verify_info_and_open_cache_match_local(built, capsys, tmp_path):
    url, reference = built["url"], built["reference"]
    assert main(["verify", url, "--no-progress"]) == 0
    assert "OK" in capsys.readouterr().out
    assert main(["info", url]) == 0
    out = capsys.readouterr().out
    assert "cache            s3://" in out and f"--out {url}" in out
    local = LocalCache(reference, decode_dir=tmp_path / "local")
    cache = open_cache(url, decode_dir=tmp_path / "s3")
    assert type(cache).__name__ == "ObjectStoreCache" and cache.num_sequences == local.num_sequences
    a, b = local.read(0, local.num_sequences), cache.read(0, cache.num_sequences)
    assert set(a) == set(b)
    for name in a:
        assert a[name].dtype == b[name].dtype
        np.testing.assert_array_equal(a[name].numpy(), b[name].numpy())


def test_serve_from_s3_and_read_over_http(built, tmp_path):
    local = LocalCache(built["reference"], decode_dir=tmp_path / "local")
    with ServerProcess([f"run1={built['url']}"], token_dir=tmp_path) as server:
        remote = open_cache(server.cache_url("run1"), decode_dir=tmp_path / "http")
        a, b = local.read(0, local.num_sequences), remote.read(0, remote.num_sequences)
        for name in a:
            np.testing.assert_array_equal(a[name].numpy(), b[name].numpy())
        assert "from s3://" in server.log()


def test_corrupt_object_is_named(moto, tmp_path, capsys):
    url = f"s3://{moto.bucket}/caches/corrupt"
    make_synthetic_cache(url, num_sequences=12, seq_len=8, shard_seqs=4, chunk_seqs=2)
    store = storage.open_store(url)
    relpath = fmt.shard_relpath("topk_logprobs", 1, 3)
    raw = bytearray(store.read_bytes(relpath))
    raw[len(raw) // 3] ^= 0xFF
    store.write_bytes(relpath, bytes(raw))
    cache = open_cache(url, decode_dir=tmp_path / "dec", corrupt_retries=1, prefetch_workers=1, readahead=0)
    cache.read(0, 4)  # shard 0 is intact
    with pytest.raises(fmt.CorruptShardError) as info:
        cache.read(4, 8)
    assert info.value.array == "topk_logprobs" and info.value.shard_index == 1
    assert relpath in info.value.where and info.value.where.startswith("s3://")
    assert main(["verify", url, "--no-progress"]) == 1
    assert relpath in capsys.readouterr().err


def test_lock_object_of_another_host_is_refused(moto, built, capsys):
    url = f"s3://{moto.bucket}/caches/locked"
    store = storage.open_store(url)
    store.write_bytes(f"{STATE}/lock.rank0", b'{"host": "elsewhere", "pid": 1, "rank": 0, "world_size": 1, '
                                              b'"started_at": "2026-01-01T00:00:00+00:00"}')
    assert main(built["args"](url)) == 2
    err = capsys.readouterr().err
    assert "elsewhere" in err and "delete the lock object" in err
    assert store.list() == [f"{STATE}/lock.rank0"]  # nothing else was written


def test_endpoint_restart_mid_read(tmp_path):
    saved = dict(os.environ)
    server = MotoServer(bucket="kdcache-restart").start()
    try:
        os.environ.update(server.env())
        url = f"s3://{server.bucket}/c"
        _, arrays = make_synthetic_cache(url, num_sequences=24, seq_len=8, shard_seqs=4, chunk_seqs=2)
        snapshot = tmp_path / "objects"
        store = storage.open_store(url)
        for relpath in store.list():
            (snapshot / relpath).parent.mkdir(parents=True, exist_ok=True)
            (snapshot / relpath).write_bytes(store.read_bytes(relpath))
        cache = open_cache(url, decode_dir=tmp_path / "dec", max_retries=30, backoff_s=0.05, max_backoff_s=0.5,
                           prefetch_workers=1, readahead=0)
        first = cache.read(0, 4)
        server.stop()  # the endpoint is gone mid-read; it comes back on the same port 2 s later
        restarter = threading.Timer(2.0, lambda: server.start(seed_dir=snapshot, seed_prefix=f"{server.bucket}/c"))
        restarter.start()
        started = time.monotonic()
        rest = cache.read(4, 24)
        assert time.monotonic() - started > 1.5  # the read really waited for the endpoint
        restarter.join()
        for name in first:
            np.testing.assert_array_equal(np.concatenate([first[name].numpy(), rest[name].numpy()]), arrays[name])
    finally:
        server.stop()
        os.environ.clear()
        os.environ.update(saved)
