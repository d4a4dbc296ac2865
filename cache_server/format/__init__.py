"""kdcache on-disk format (versions 1 and 2): layout, manifest, shard encoding and decoding.

This is the ONE package that knows the format; the build job, the server and ``kdlib`` all go through it,
and it imports nothing else of ours (and never torch). The specification lives in ``docs/FORMAT.md``; keep
the two in step (tests pin exact manifest bytes).

Modules:
    errors      CacheError, CorruptShardError (with structured fields) and the repair hint.
    layout      the arrays of a cache, their dtypes and shapes, sharding and chunking (CacheLayout).
    manifest    canonical manifest bytes, parsing, validate_manifest, read_manifest_bytes, load_manifest.
    digests     the digests a manifest records per stored shard file (sha256, xxh3_128) and the one check rule.
    shards      shard file paths, Zarr v3 writing and metadata checks, the shard decoder.
    slots       format v2's per-position slot transform: canonical order, id-sorted storage, q8 log-probs.
    build_lock  one build per directory: the flock-based lock a running build holds, and how readers see it.
    decoded     decoded copies on local disk: their paths and their crc32c integrity record.
    wire        the HTTP paths, headers and media types of ``kdcache serve`` (server and client share them).
    storage     where a cache's bytes live when not in a directory: an object store behind an fsspec URL.

Everything in ``__all__`` (the names of errors, layout, manifest, digests and shards) is importable from here:
``from cache_server import format as fmt; fmt.CacheLayout``. ``build_lock``, ``decoded``, ``storage`` and ``wire`` are
imported as modules (``from cache_server.format import wire``).

Shape notation::

    N  number of sequences in the cache     K  top-k entries kept per position
    T  positions per sequence               V  teacher vocabulary size
    S  sequences per shard                  C  sequences per inner chunk
"""

from __future__ import annotations

from cache_server.format import digests as _digests
from cache_server.format import errors as _errors
from cache_server.format import layout as _layout
from cache_server.format import manifest as _manifest
from cache_server.format import shards as _shards
from cache_server.format.errors import REPAIR_HINT, CacheError, CorruptShardError
from cache_server.format.layout import (
    ALIGNMENT_CONVENTION,
    CODEC_PRESETS,
    DEFAULT_CODEC,
    FORMAT_VERSION,
    FORMAT_VERSIONS,
    LOGPROB_CODECS,
    MAX_SAMPLES,
    TARGET_KINDS,
    ArraySpec,
    CacheLayout,
    array_specs,
    ids_dtype_for_vocab,
    plan_chunking,
    temperature_key,
)
from cache_server.format.manifest import (
    FORMAT_NAME,
    MANIFEST_NAME,
    TEACHER_TAILS,
    format_fields,
    layout_from_manifest,
    load_manifest,
    manifest_bytes,
    parse_manifest,
    read_manifest_bytes,
    read_object_manifest,
    teacher_tail,
    validate_manifest,
)
from cache_server.format.shards import (
    GROUP_ATTRIBUTES,
    create_arrays,
    damaged_metadata,
    decode_inputs,
    decode_shard,
    decode_shard_group,
    decode_stored_shard,
    expected_metadata,
    group_attributes,
    iter_shard_files,
    shard_relpath,
    write_shard,
)
from cache_server.format.digests import (
    shard_bytes_problem,
    shard_checksums,
    shard_sha256,
    shard_xxh3_128,
    verify_shard_bytes,
)

# Everything each module exports, in one flat namespace; each module lists its own names once (this
# `__all__ +=` form is one static analysers read).
__all__: list[str] = []
__all__ += _errors.__all__
__all__ += _layout.__all__
__all__ += _manifest.__all__
__all__ += _digests.__all__
__all__ += _shards.__all__
