"""One check that two finished caches hold the same data: shard files byte for byte and every array's values."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cache_server import format as fmt
from cache_server.build.writer import STATE_DIR


def assert_same_shards_and_arrays(reference: Path, out: Path) -> None:
    """Every shard file of ``reference`` equal in ``out``, every array equal, and no build state left in ``out``."""
    import zarr

    ref_manifest = fmt.load_manifest(reference)
    for _, _, path in fmt.iter_shard_files(reference, ref_manifest):
        rel = path.relative_to(reference)
        assert (out / rel).read_bytes() == path.read_bytes(), f"{rel} differs"
    a, b = zarr.open_group(str(reference), mode="r"), zarr.open_group(str(out), mode="r")
    for name in ref_manifest["arrays"]:
        np.testing.assert_array_equal(a[name][:], b[name][:])
    assert not (out / STATE_DIR).exists()
