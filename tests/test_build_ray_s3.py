"""`kdcache build --engine ray --out s3://bucket/prefix` on a real local Ray (2 actors) and a real moto S3 server:
the shard objects and every ``zarr.json`` are byte-identical to a local build's files, the manifest equal.

Ray starts first (tests/test_build_ray.py's fixture), before this process sets the moto credentials, so the
actors (processes of Ray's raylet, not of the ``kdcache build`` driver) get them, and the endpoint given only
as ``--storage-options``, through what the driver forwards to them (engine_ray.storage_env).
"""

from __future__ import annotations

import json
import os

import pytest

pytest.importorskip("ray")
pytest.importorskip("s3fs")
pytest.importorskip("moto")

from cache_server import format as fmt  # noqa: E402
from cache_server.build.engine_ray import storage_env  # noqa: E402
from cache_server.cli import main  # noqa: E402
from cache_server.format import storage  # noqa: E402
from cache_server.format.build_lock import BUILD_STATE_DIR  # noqa: E402
from tests.moto_server import CREDENTIALS, MotoServer  # noqa: E402
from tests.test_build_ray import NUM_SEQS, _args, _start_cli, ray_address, setup  # noqa: E402,F401 (fixtures)


@pytest.fixture(scope="module")
def moto(ray_address):
    """A moto server; this process (and its CLI subprocesses) get its credentials only after Ray started, and
    no ``AWS_ENDPOINT_URL``: the endpoint goes in ``--storage-options``."""
    saved = dict(os.environ)
    with MotoServer(bucket="kdcache-ray") as server:
        os.environ.update(CREDENTIALS)
        os.environ.pop("AWS_ENDPOINT_URL", None)
        os.environ.pop(storage.STORAGE_OPTIONS_ENV, None)
        try:
            yield server
        finally:
            os.environ.clear()
            os.environ.update(saved)


def test_ray_build_to_s3_matches_local_build(setup, ray_address, moto):
    root, teachers = setup
    reference, url = root / "reference-s3", f"s3://{moto.bucket}/caches/ray"
    assert main(_args(root, teachers[:1], reference)) == 0
    options = {"client_kwargs": {"endpoint_url": moto.endpoint}}
    proc = _start_cli(_args(root, teachers[:1], url, "--engine", "ray", "--workers", "2",
                            "--ray-address", ray_address, "--storage-options", json.dumps(options)))
    try:
        out, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, out
    assert "ray: 2 workers ready" in out, out

    store, ref_manifest = storage.open_store(url, options), fmt.load_manifest(reference)
    manifest = json.loads(store.read_bytes(fmt.MANIFEST_NAME))
    assert ref_manifest["num_shards"] == NUM_SEQS // 4
    manifest.pop("created_at"), ref_manifest.pop("created_at")
    assert manifest == ref_manifest
    for _, _, path in fmt.iter_shard_files(reference, fmt.load_manifest(reference)):
        rel = path.relative_to(reference).as_posix()
        assert store.read_bytes(rel) == path.read_bytes(), f"{rel} differs"
    for path in reference.rglob("zarr.json"):
        assert store.read_bytes(path.relative_to(reference).as_posix()) == path.read_bytes()
    assert not store.list(f"{BUILD_STATE_DIR}/")  # journal, settings and lock objects are gone


def test_storage_env_only_for_urls():
    environ = {"AWS_ENDPOINT_URL": "http://127.0.0.1:1", "AWS_PROFILE": "p", storage.STORAGE_OPTIONS_ENV: "{}",
               "HOME": "/root", "PATH": "/bin"}
    assert storage_env("s3://b/c", environ) == {"AWS_ENDPOINT_URL": "http://127.0.0.1:1", "AWS_PROFILE": "p",
                                                storage.STORAGE_OPTIONS_ENV: "{}"}
    assert storage_env("/data/cache", environ) == {}
    assert storage_env("relative/cache", environ) == {}
