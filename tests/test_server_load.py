"""Load: 16 concurrent remote readers (threads, each its own client and cold local cache) read everything."""

from __future__ import annotations

import threading

import httpx
import numpy as np

from kdlib.data.remote import RemoteCache
from tests.cachefactory import make_synthetic_cache
from tests.serverproc import ServerProcess

TOKEN = "load-token"
NUM_CLIENTS = 16


def test_sixteen_concurrent_clients_read_the_whole_cache(tmp_path):
    cache_dir, arrays = make_synthetic_cache(
        tmp_path / "teacher", num_sequences=64, seq_len=64, topk=8, vocab_size=300, temperatures=(2.0,),
        shard_seqs=8, chunk_seqs=4, seed=6,
    )
    names = [k for k in arrays if k not in ("seq_nll", "seq_entropy")]
    errors: list[BaseException] = []
    mismatches: list[tuple[int, int, str]] = []
    rows_read = [0] * NUM_CLIENTS

    with ServerProcess([str(cache_dir)], token=TOKEN, token_dir=tmp_path) as server:
        barrier = threading.Barrier(NUM_CLIENTS)

        def client(i: int) -> None:
            try:
                cache = RemoteCache(server.cache_url("teacher"), token=TOKEN, decode_dir=tmp_path / f"c{i}")
                barrier.wait(30)
                step = 3 + i % 5  # different batch sizes: requests interleave differently per client
                for start in range(0, cache.num_sequences, step):
                    stop = min(start + step, cache.num_sequences)
                    batch = cache.read(start, stop, arrays=names + ["seq_nll", "seq_entropy"])
                    for key, value in batch.items():
                        if not np.array_equal(value.numpy().astype(arrays[key].dtype), arrays[key][start:stop]):
                            mismatches.append((i, start, key))
                    rows_read[i] += stop - start
                cache.close()
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(NUM_CLIENTS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors, errors[:3]
        assert not mismatches, mismatches[:10]
        assert rows_read == [64] * NUM_CLIENTS
        headers = {"Authorization": f"Bearer {TOKEN}"}
        assert httpx.get(server.base_url + "/healthz").status_code == 200
        metrics = httpx.get(server.base_url + "/metrics", headers=headers).text
        assert 'status="5' not in metrics
