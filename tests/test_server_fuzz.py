"""Bounded OpenAPI fuzz of a real server with schemathesis (CLI): no request may produce a 5xx."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.cachefactory import make_synthetic_cache
from tests.serverproc import ServerProcess

TOKEN = "fuzz-token"


def _schemathesis() -> str | None:
    exe = Path(sys.executable).with_name("schemathesis")
    return str(exe) if exe.exists() else shutil.which("schemathesis")


@pytest.mark.skipif(_schemathesis() is None, reason="schemathesis is not installed (pip install 'kdcache[dev]')")
def test_openapi_fuzz_finds_no_server_errors(tmp_path):
    cache_dir, _ = make_synthetic_cache(tmp_path / "teacher", num_sequences=12, seq_len=8, topk=3, vocab_size=50,
                                        temperatures=(2.0,), shard_seqs=4, chunk_seqs=2)
    with ServerProcess([str(cache_dir)], token=TOKEN, token_dir=tmp_path,
                       extra_args=["--max-rows", "8", "--max-response-bytes", "4096"]) as server:
        headers = {"Authorization": f"Bearer {TOKEN}"}
        schema = httpx.get(server.base_url + "/openapi.json", headers=headers).json()
        # Steer generated names at the real cache and arrays (plus unknown ones) so valid requests reach the
        # shard and row code paths instead of stopping at 404; negative mode still sends arbitrary strings.
        arrays = sorted(httpx.get(server.cache_url("teacher"), headers=headers).json()["arrays"])
        enums = {"name": ["teacher", "missing"], "array": arrays + ["missing"]}
        for operation in schema["paths"].values():
            for parameter in operation.get("get", {}).get("parameters", []):
                if parameter["in"] == "path" and parameter["name"] in enums:
                    parameter["schema"] = {"type": "string", "enum": enums[parameter["name"]]}
        schema_path = tmp_path / "openapi.json"
        schema_path.write_text(json.dumps(schema))
        cmd = [
            _schemathesis(), "run", str(schema_path), "--url", server.base_url,
            "--checks", "not_a_server_error", "--max-examples", "60", "--seed", "1",
            "--workers", "1", "--request-timeout", "10", "-H", f"Authorization: Bearer {TOKEN}",
            "--phases", "examples,coverage,fuzzing", "--no-shrink", "--suppress-health-check", "all",
        ]
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=90, cwd=tmp_path)
        output = run.stdout + run.stderr
        assert run.returncode == 0, output[-6000:]
        assert httpx.get(server.base_url + "/healthz").status_code == 200
        metrics = httpx.get(server.base_url + "/metrics", headers=headers).text
        assert 'status="5' not in metrics, [line for line in metrics.splitlines() if 'status="5' in line]
        # the fuzz reached the real cache's shard and row endpoints with valid requests
        assert 'cache="teacher",endpoint="/v1/caches/{name}/shards/{array}/{shard_index}",method="GET",status="200"' in metrics
        assert 'cache="teacher",endpoint="/v1/caches/{name}/rows",method="GET",status="200"' in metrics
        print(run.stdout[-1500:])
