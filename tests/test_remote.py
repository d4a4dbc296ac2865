"""kdlib.data.remote against a real `kdcache serve` subprocess: parity with the local reader, auth, LRU, workers."""

from __future__ import annotations

import json
import multiprocessing as mp
import pickle
import re

import numpy as np
import pytest
import torch

import kdlib
from kdlib.data.cache import LocalCache
from kdlib.data.remote import RemoteCache, RemoteError
from tests.cachefactory import make_synthetic_cache
from tests.serverproc import ServerProcess
from tests.test_reader import run_in_spawned_process

TOKEN = "remote-test-token"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("remote")
    cache_dir, arrays = make_synthetic_cache(
        root / "teacher", num_sequences=27, seq_len=12, topk=5, vocab_size=200, temperatures=(2.0, 0.5),
        shard_seqs=6, chunk_seqs=3, seed=3,
    )
    wide_dir, wide_arrays = make_synthetic_cache(
        root / "wide", num_sequences=5, seq_len=6, topk=3, vocab_size=66000, shard_seqs=2, chunk_seqs=1, seed=4,
    )
    large_dir, _ = make_synthetic_cache(  # uncompressed 1.2 MB shards: the server sends them in several pieces
        root / "large", num_sequences=3, seq_len=512, topk=600, vocab_size=1000, shard_seqs=2, chunk_seqs=2,
        seed=5, codec="none",
    )
    server = ServerProcess([str(cache_dir), str(wide_dir), str(large_dir)], token=TOKEN, token_dir=root).start()
    yield {"root": root, "dir": cache_dir, "arrays": arrays, "wide_dir": wide_dir, "large_dir": large_dir,
           "server": server}
    server.stop()


def remote(world, name="teacher", sub="dec", **kwargs):
    kwargs.setdefault("token", TOKEN)
    return RemoteCache(world["server"].cache_url(name), decode_dir=world["root"] / sub, **kwargs)


def assert_batches_equal(got, want):
    assert set(got) == set(want)
    for key in want:
        assert got[key].dtype == want[key].dtype, key
        assert torch.equal(got[key], want[key]), key


@pytest.mark.parametrize("name", ["teacher", "wide"])
def test_parity_every_row_every_array(world, name, tmp_path):
    local = LocalCache(world["dir"] if name == "teacher" else world["wide_dir"], decode_dir=tmp_path / "local")
    with remote(world, name, sub=f"parity-{name}") as cache:
        assert (cache.num_sequences, cache.seq_len, cache.topk, cache.temperatures) == (
            local.num_sequences, local.seq_len, local.topk, local.temperatures)
        everything = list(local.store.specs)
        assert cache.position_arrays() == local.position_arrays()
        for widen in (False, True):
            for start in range(0, local.num_sequences, 4):  # batches crossing shard boundaries
                stop = min(start + 4, local.num_sequences)
                assert_batches_equal(cache.read(start, stop, widen=widen), local.read(start, stop, widen=widen))
                assert_batches_equal(cache.read(start, stop, arrays=everything), local.read(start, stop, arrays=everything))
        order = np.random.default_rng(0).permutation(local.num_sequences)
        assert_batches_equal(cache.lookup(order, arrays=everything), local.lookup(order, arrays=everything))
        assert_batches_equal(cache.sequence_stats(), local.sequence_stats())
        assert cache.source.stats["corrupt_transfers"] == 0


def test_parity_with_written_arrays_including_temperatures(world):
    with remote(world, sub="written") as cache:
        batch = cache.read(0, cache.num_sequences, arrays=list(world["arrays"]))
    for key, expected in world["arrays"].items():
        np.testing.assert_array_equal(batch[key].numpy().astype(expected.dtype), expected, err_msg=key)
    assert {"lse_t2", "lse_t0.5"} <= set(batch)


def test_open_cache_dispatch_and_env_token(world, monkeypatch):
    monkeypatch.setenv("KDCACHE_TOKEN", TOKEN)
    cache = kdlib.open_cache(world["server"].cache_url("teacher"), decode_dir=world["root"] / "env")
    assert isinstance(cache, RemoteCache)
    assert cache.read(0, 2)["topk_ids"].shape == (2, 12, 5)


@pytest.mark.parametrize("token", [None, "wrong"])
def test_bad_token_is_a_clear_error(world, monkeypatch, token):
    monkeypatch.delenv("KDCACHE_TOKEN", raising=False)
    with pytest.raises(RemoteError, match="refused the token.*KDCACHE_TOKEN"):
        remote(world, token=token, max_retries=0) if token else RemoteCache(
            world["server"].cache_url("teacher"), decode_dir=world["root"] / "none")


def test_unknown_cache_and_bad_url(world):
    with pytest.raises(RemoteError, match="HTTP 404"):
        remote(world, name="nope")
    with pytest.raises(ValueError, match="not a cache URL"):
        RemoteCache(world["server"].base_url + "/v1/caches/../etc", token=TOKEN)


def test_unreachable_server_gives_up_with_context(world):
    from tests.serverproc import free_port

    with pytest.raises(RemoteError, match="after 3 attempts.*kdcache serve"):
        RemoteCache(f"http://127.0.0.1:{free_port()}/v1/caches/teacher", token=TOKEN, max_retries=2,
                    backoff_s=0.01, decode_dir=world["root"] / "unreach")


def test_lru_size_limit(world, tmp_path):
    local = LocalCache(world["dir"], decode_dir=tmp_path / "local")
    decoded_shard_bytes = 6 * 12 * 5 * 2 + 128 + 12  # topk_ids: S*T*K*2 bytes + .npy header + crc32c trailer
    limit = 3 * decoded_shard_bytes
    with remote(world, sub="lru", max_decoded_bytes=limit, readahead=0) as cache:
        for _ in range(2):
            for start in range(0, cache.num_sequences, 5):
                stop = min(start + 5, cache.num_sequences)
                assert_batches_equal(cache.read(start, stop, arrays=["topk_ids"]),
                                     local.read(start, stop, arrays=["topk_ids"]))
                assert cache.store.decoded_bytes() <= limit + decoded_shard_bytes
        assert cache.store.evicted > 0


def test_prefetch_runs_ahead(world):
    with remote(world, sub="prefetch", readahead=2) as cache:
        cache.read(0, 6)
        cache.read(6, 12)  # sequential: shards 2 and 3 are prefetched in the background
        cache.store.wait_prefetch()
        assert cache.store.is_decoded("topk_ids", 2) and cache.store.is_decoded("topk_ids", 3)


def test_pickle_roundtrip(world):
    with remote(world, sub="pickle") as cache:
        cache.read(0, 3)
        clone = pickle.loads(pickle.dumps(cache))
        assert_batches_equal(clone.read(20, 27), cache.read(20, 27))


def test_in_place_edits_of_remote_batches_never_reach_later_reads(world):
    everything = list(world["arrays"])
    with remote(world, sub="alias", readahead=0) as cache:
        reads = {"one shard": (lambda: cache.read(0, 6, arrays=everything), np.arange(0, 6)),
                 "three shards": (lambda: cache.read(4, 17, arrays=everything), np.arange(4, 17)),
                 "lookup": (lambda: cache.lookup([26, 0, 7, 7], arrays=everything), [26, 0, 7, 7])}
        for read, _ in reads.values():
            for tensor in read().values():
                tensor.mul_(3).add_(1)
        for what, (read, rows) in reads.items():
            for name, tensor in read().items():
                expected = world["arrays"][name][rows]
                np.testing.assert_array_equal(tensor.numpy().astype(expected.dtype), expected,
                                              err_msg=f"{name}, {what}")


def test_the_old_module_constant_name_still_imports_with_a_deprecation_warning():
    import kdlib.data.remote as remote_module

    with pytest.warns(DeprecationWarning, match="DEFAULT_SHARD_CACHE_BYTES is deprecated: it is now called "
                                                "DEFAULT_MAX_DECODED_BYTES"):
        from kdlib.data.remote import DEFAULT_SHARD_CACHE_BYTES
    assert DEFAULT_SHARD_CACHE_BYTES == remote_module.DEFAULT_MAX_DECODED_BYTES
    with pytest.raises(AttributeError, match="no attribute 'NOT_A_NAME'"):
        remote_module.NOT_A_NAME


def test_decoded_size_limit_default_and_old_option_names(world):
    from kdlib.data.remote import DEFAULT_MAX_DECODED_BYTES

    with remote(world, sub="names") as cache:
        assert cache.max_decoded_bytes == DEFAULT_MAX_DECODED_BYTES == 20 << 30
        assert cache.decode_root == world["root"] / "names"
    url = world["server"].cache_url("teacher")
    with pytest.warns(DeprecationWarning, match="shard_cache_dir"):
        old = RemoteCache(url, token=TOKEN, shard_cache_dir=world["root"] / "names")
    assert old.decode_dir == cache.decode_dir and old.max_decoded_bytes == DEFAULT_MAX_DECODED_BYTES
    with pytest.warns(DeprecationWarning, match="shard_cache_bytes"):
        unlimited = kdlib.open_cache(url, token=TOKEN, decode_dir=world["root"] / "names", shard_cache_bytes=None)
    assert unlimited.max_decoded_bytes is None


def _report_reopened_remote(cache, queue):
    try:
        source = cache.source
        queue.put({"url": cache.url, "token": source.token, "timeout_s": source.timeout.read,
                   "connect_timeout_s": source.timeout.connect, "max_retries": source.max_retries,
                   "piece_bytes": source.piece_bytes, "max_decoded_bytes": cache.max_decoded_bytes,
                   "decode_dir": str(cache.decode_dir), "prefetch_workers": cache.prefetch_workers,
                   "readahead": cache.readahead, "widen": cache.widen,
                   "batch": {k: v.numpy() for k, v in cache.read(5, 20).items()}})
    except BaseException as exc:  # report to the parent instead of dying silently
        queue.put(repr(exc))


def test_spawned_process_reopens_the_remote_cache_with_its_options(world, monkeypatch):
    monkeypatch.delenv("KDCACHE_TOKEN", raising=False)  # the child must get the token from the pickle
    with remote(world, sub="spawn", timeout_s=17.0, connect_timeout_s=3.0, max_retries=4, piece_bytes=4096,
                max_decoded_bytes=1 << 22, prefetch_workers=3, readahead=1, widen=True) as cache:
        cache.read(0, 6)  # a live client, maps and prefetch threads in this process: they must not travel
        result = run_in_spawned_process(cache, _report_reopened_remote)
        batch = result.pop("batch")
        assert result == {"url": cache.url, "token": TOKEN, "timeout_s": 17.0, "connect_timeout_s": 3.0,
                          "max_retries": 4, "piece_bytes": 4096, "max_decoded_bytes": 1 << 22,
                          "decode_dir": str(cache.decode_dir), "prefetch_workers": 3, "readahead": 1, "widen": True}
        expected = cache.read(5, 20)
        assert batch.keys() == expected.keys()
        for name, value in batch.items():
            np.testing.assert_array_equal(value, expected[name].numpy(), err_msg=name)


def _child_read(cache, queue):
    try:
        batch = cache.read(7, 19)
        queue.put({k: v.numpy() for k, v in batch.items()})
    except BaseException as exc:  # report to the parent instead of dying silently
        queue.put(repr(exc))


def test_forked_worker_uses_its_own_http_client(world):
    with remote(world, sub="fork") as cache:
        cache.read(0, 1)  # parent now has a live httpx client and pool
        parent_client = cache.source._client
        ctx = mp.get_context("fork")
        queue = ctx.Queue()
        procs = [ctx.Process(target=_child_read, args=(cache, queue)) for _ in range(2)]
        for p in procs:
            p.start()
        results = [queue.get(timeout=60) for _ in procs]
        for p in procs:
            p.join(30)
        expected = {k: v.numpy() for k, v in cache.read(7, 19).items()}
        assert cache.source._client is parent_client
    for result in results:
        assert isinstance(result, dict), result
        for key in expected:
            np.testing.assert_array_equal(result[key], expected[key])


class _Sequences(torch.utils.data.Dataset):
    def __init__(self, cache):
        self.cache = cache

    def __len__(self):
        return len(self.cache)

    def __getitem__(self, i):
        return self.cache.read(i, i + 1)["topk_logprobs"][0]


def test_dataloader_workers(world, tmp_path):
    local = LocalCache(world["dir"], decode_dir=tmp_path / "local")
    with remote(world, sub="loader") as cache:
        loader = torch.utils.data.DataLoader(_Sequences(cache), batch_size=4, num_workers=2)
        got = torch.cat(list(loader))
    assert torch.equal(got, local.read(0, local.num_sequences)["topk_logprobs"])


class CuttingProxy:
    """A real TCP relay to the server that drops the connection halfway through the first shard's body.

    With ``inflate_bytes`` it instead forwards the WHOLE body of the first shard response under a
    Content-Length that many bytes larger, then drops the connection: every byte arrived, yet the client sees
    a cut transfer (as when a connection dies between the last body byte and the end of the response).
    """

    def __init__(self, target_port: int, body_fraction: float = 0.5, inflate_bytes: int = 0) -> None:
        import socket
        import threading

        self.target_port = target_port
        self.body_fraction = body_fraction
        self.inflate_bytes = inflate_bytes
        self.cuts = 0
        self._armed = True
        self._lock = threading.Lock()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import threading

        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client) -> None:
        import socket
        import threading

        upstream = socket.create_connection(("127.0.0.1", self.target_port))
        state = {"shard_request": False}

        def client_to_upstream() -> None:
            try:
                while data := client.recv(65536):
                    if b"/shards/" in data:
                        with self._lock:
                            if self._armed:
                                self._armed = False
                                state["shard_request"] = True
                    upstream.sendall(data)
            except OSError:
                pass

        threading.Thread(target=client_to_upstream, daemon=True).start()
        pending = b""
        try:
            while data := upstream.recv(65536):
                if not state["shard_request"]:
                    client.sendall(data)
                    continue
                pending += data
                head_end = pending.find(b"\r\n\r\n")
                if head_end < 0:
                    continue
                head = pending[:head_end].decode("latin-1").lower()
                length = int(head.split("content-length:")[1].split("\r\n")[0])
                if self.inflate_bytes:
                    if len(pending) >= head_end + 4 + length:
                        lied = re.sub(rb"(?i)content-length:\s*\d+", f"content-length: {length + self.inflate_bytes}"
                                      .encode(), pending[:head_end])
                        client.sendall(lied + pending[head_end:head_end + 4 + length])
                        self.cuts += 1
                        break
                    continue
                cut_at = head_end + 4 + int(length * self.body_fraction)
                if len(pending) >= cut_at:
                    client.sendall(pending[:cut_at])
                    self.cuts += 1
                    break
        except OSError:
            pass
        for sock in (client, upstream):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()


def test_transfer_cut_mid_body_resumes_with_range(world, tmp_path):
    proxy = CuttingProxy(world["server"].port)
    local = LocalCache(world["dir"], decode_dir=tmp_path / "local")
    url = f"http://127.0.0.1:{proxy.port}/v1/caches/teacher"
    with RemoteCache(url, token=TOKEN, decode_dir=tmp_path / "remote", readahead=0, backoff_s=0.01) as cache:
        assert_batches_equal(cache.read(0, 6), local.read(0, 6))
        assert proxy.cuts == 1
        assert cache.source.stats["retries"] == 1 and cache.source.stats["resumed"] == 1
        assert cache.source.stats["corrupt_transfers"] == 0
    proxy.listener.close()


@pytest.mark.parametrize("piece_bytes", [None, 97])
def test_connection_dropped_after_the_last_byte_uses_what_arrived(world, tmp_path, piece_bytes):
    # The whole shard (or Range piece) arrived, then the connection dropped: resuming at offset == size would
    # be a 416; the client must use the bytes it has without another request.
    proxy = CuttingProxy(world["server"].port, inflate_bytes=10)
    local = LocalCache(world["dir"], decode_dir=tmp_path / "local")
    url = f"http://127.0.0.1:{proxy.port}/v1/caches/teacher"
    with RemoteCache(url, token=TOKEN, decode_dir=tmp_path / "remote", readahead=0, backoff_s=0.01,
                     piece_bytes=piece_bytes) as cache:
        manifest_shards = cache.manifest["shards"]
        assert_batches_equal(cache.read(0, 6, arrays=["topk_ids"]), local.read(0, 6, arrays=["topk_ids"]))
        assert proxy.cuts == 1
        stats = cache.source.stats
        assert stats["retries"] == 1 and stats["corrupt_transfers"] == 0 and stats["resumed"] == 0
        # Format v2: decoding topk_ids also fetches the topk_logprobs shard that orders its slots (decode_inputs).
        nbytes = [manifest_shards[name][0]["nbytes"] for name in ("topk_ids", "topk_logprobs")]
        requests = len(nbytes) if piece_bytes is None else sum(-(-n // piece_bytes) for n in nbytes)
        assert stats["requests"] == 1 + requests  # the manifest + the shards' requests; none after the cut
    proxy.listener.close()


def test_shards_larger_than_one_send_piece(world, tmp_path):
    import httpx

    from cache_server import format as fmt

    stored = (world["large_dir"] / fmt.shard_relpath("topk_ids", 0, 3)).read_bytes()
    assert len(stored) > (1 << 20) + 1000
    url = world["server"].cache_url("large") + "/shards/topk_ids/0"
    headers = {"Authorization": f"Bearer {TOKEN}"}
    whole = httpx.get(url, headers=headers)
    assert whole.status_code == 200 and whole.content == stored
    lo, hi = 1000, (1 << 20) + 500  # a range across the server's 1 MiB read boundary
    part = httpx.get(url, headers={**headers, "Range": f"bytes={lo}-{hi - 1}"})
    assert part.status_code == 206 and part.content == stored[lo:hi]
    local = LocalCache(world["large_dir"], decode_dir=tmp_path / "local")
    for piece_bytes in (None, 700_000):
        with remote(world, "large", sub=f"large-{piece_bytes}", piece_bytes=piece_bytes, readahead=0) as cache:
            assert_batches_equal(cache.read(0, 3), local.read(0, 3))


def test_large_shards_are_fetched_in_range_pieces(world, tmp_path):
    local = LocalCache(world["dir"], decode_dir=tmp_path / "local")
    with remote(world, sub="pieces", piece_bytes=97, readahead=0) as cache:
        everything = list(local.store.specs)
        assert_batches_equal(cache.read(0, cache.num_sequences, arrays=everything),
                             local.read(0, local.num_sequences, arrays=everything))
        stored = sum(e["nbytes"] for entries in cache.manifest["shards"].values() for e in entries)
        pieces = sum(-(-e["nbytes"] // 97) for entries in cache.manifest["shards"].values() for e in entries)
        assert cache.source.stats["requests"] == 1 + pieces  # the manifest + every piece, no retries
        assert cache.source.stats["bytes"] >= stored


def test_remote_shard_bytes_are_hashed_once(world, tmp_path):
    """The HTTP source checks every shard against the manifest (to fetch a damaged transfer again), so the store
    does not hash the same bytes a second time; a local source leaves the check to the store, and an entry that
    differs from the store's (a source holding another manifest) is checked by the store again."""
    local = LocalCache(world["dir"], decode_dir=tmp_path / "local")
    assert not local.store._checked_by_source("topk_ids", 0)
    with remote(world, sub="hashed-once") as cache:
        assert cache.source.checks_shards
        assert cache.store._checked_by_source("topk_ids", 0)
        np.testing.assert_array_equal(cache.read(0, 6)["topk_ids"].numpy(), local.read(0, 6)["topk_ids"].numpy())
        other = json.loads(json.dumps(cache.source.manifest))
        other["shards"]["topk_ids"][1]["sha256"] = "0" * 64
        cache.source.manifest = other
        assert cache.store._checked_by_source("topk_ids", 0)
        assert not cache.store._checked_by_source("topk_ids", 1)
