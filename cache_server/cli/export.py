"""``kdcache export``: a top-k cache as an axolotl KD dataset or a plain top-k Parquet (streamed shard by shard)."""

from __future__ import annotations

import argparse

from cache_server.cli import add_command

__all__ = ["register", "run", "user_errors"]

DESCRIPTION = """\
Write a top-k cache for another trainer, one Parquet file (zstd, one row group per shard; the cache is
read shard by shard, never whole).

  --to axolotl   the columns axolotl's KD trainer reads: input_ids, attention_mask, labels,
                 target_token_ids, target_logprobs, target_mask. --alignment next (default): target row t
                 is the distribution over token t+1 (axolotl's trainer); current: over token t (its dataset
                 strategy; row 0 padding). --renormalize-topk renormalizes over the k ids like axolotl's
                 preprocessing (the cache's values are full-vocabulary log-probs at temperature 1).
  --to parquet   input_ids, topk_ids, topk_logprobs, teacher_lse (+ teacher_lse_t{tau}): lossless, and
                 kdcache import --from parquet reads it back exactly.
"""

EPILOG = """\
examples:
  kdcache export ./cache --to axolotl --out ./kd_dataset.parquet
  kdcache export ./cache --to parquet --out ./topk.parquet

Exit status: 0 success, 2 bad input, 1 internal error.
"""


def register(subparsers) -> argparse.ArgumentParser:
    from cache_server.interop import EXPORT_TARGETS

    p = add_command(subparsers, "export", help="write a cache as an axolotl KD dataset or a top-k Parquet",
                    description=DESCRIPTION, epilog=EPILOG, run=run, user_errors=user_errors)
    p.add_argument("cache", metavar="DIR", help="the cache directory")
    p.add_argument("--to", required=True, choices=EXPORT_TARGETS, help="the output layout")
    p.add_argument("--out", required=True, metavar="PATH", help="the .parquet file to write")
    p.add_argument("--alignment", choices=["next", "current"], default="next", help="axolotl only (see above)")
    p.add_argument("--renormalize-topk", action="store_true", help="axolotl only: renormalize over the k ids")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def user_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean bad input (CacheError, hence InteropError, is always one)."""
    return ()


def run(args: argparse.Namespace) -> int:
    from cache_server.interop import ExportOptions, export_cache

    export_cache(ExportOptions(cache=args.cache, to=args.to, out=args.out, alignment=args.alignment,
                               renormalize_topk=args.renormalize_topk, overwrite=args.overwrite,
                               progress=not args.no_progress))
    return 0
