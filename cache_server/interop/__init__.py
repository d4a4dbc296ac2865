"""Peers' KD datasets in and out of kdcache: ``kdcache import`` and ``kdcache export``.

Readers (one module per source) turn a peer's rows into kdcache's convention (``positions.SourceRow``);
``importer.py`` writes them through the build's crash-safe writer (``cache_server.build.writer``), so an
import resumes and yields a normal cache; ``export.py`` streams a cache out shard by shard. This room imports
``cache_server.format`` and ``cache_server.build`` (the writer, ``CacheRows``), never ``serve`` or ``kdlib``.

    axolotl.py        axolotl's KD dataset (input_ids, target_token_ids, target_logprobs, target_mask)
    distillkit.py     DistillKit's compressed-logit Parquet (+ distillkit_codec.py, its codec in numpy)
    vllm.py           vLLM prompt_logprobs JSON lines
    topk_parquet.py   a plain top-k Parquet (also what ``--to parquet`` writes)
    alignment.py      off-by-one detection by content
    positions.py      the common row, filling positions without data, sequence statistics
    tables.py         Arrow sources read batch by batch
"""

from cache_server.interop.export import EXPORT_TARGETS, ExportOptions, export_cache
from cache_server.interop.importer import IMPORT_SOURCES, ImportOptions, ImportResult, run_import
from cache_server.interop.tables import InteropError

__all__ = ["EXPORT_TARGETS", "ExportOptions", "export_cache", "IMPORT_SOURCES", "ImportOptions", "ImportResult",
           "run_import", "InteropError"]
