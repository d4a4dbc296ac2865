"""``kdcache merge``: the weighted mixture of teachers whose top-k caches were built over the same tokens."""

from __future__ import annotations

import argparse

from cache_server.cli import add_command

__all__ = ["register", "run", "user_errors"]

DESCRIPTION = """\
Merge top-k caches that different teachers built over the same tokens into one cache of their weighted
mixture p_mix = sum_m w_m p_m: per position, the K ids with the largest known mixture probability.

A top-k cache knows its teacher only on its top-k, so the merged probabilities are lower bounds of the
exact mixture's (each missing entry of teacher m is at most its k-th probability), and the implied tail an
upper bound; with k = V the merge is exact. docs/MERGE.md has the bounds and the measured KL to an exact
multi-teacher build (kdcache build --teacher A --teacher B), which is the exact way when the teachers are
at hand. The caches must hold the same tokens (compared row by row), vocabulary, sequence length and
format version. The merge is crash-safe: rerunning the same command resumes it, and the result is
bitwise identical to an uninterrupted merge.
"""

EPILOG = """\
examples:
  # equal weights, merged top-k = the largest input top-k
  kdcache merge ./cache-a ./cache-b --out ./cache-ab

  # 0.7 A + 0.3 B, keep the 16 most probable ids of the mixture
  kdcache merge ./cache-a ./cache-b --weights 0.7,0.3 --topk 16 --out ./cache-ab

Exit status: 0 success, 2 bad input or a state of the output directory that needs you, 1 internal error.
"""


def _weights(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(w) for w in text.split(",") if w.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--weights takes comma-separated numbers like 0.7,0.3, got {text!r}")


def register(subparsers) -> argparse.ArgumentParser:
    from cache_server import format as fmt

    p = add_command(
        subparsers, "merge", help="merge top-k caches of several teachers into their mixture",
        description=DESCRIPTION, epilog=EPILOG, run=run, user_errors=user_errors,
    )
    p.add_argument("caches", nargs="+", metavar="CACHE", help="the caches to merge (at least two)")
    p.add_argument("--out", required=True, metavar="DIR", help="the merged cache directory (created; resumed)")
    p.add_argument("--weights", type=_weights, metavar="W1,W2", help="one weight per CACHE, normalised (default equal)")
    p.add_argument("--topk", type=int, metavar="K", help="ids kept per position (default: the largest input top-k)")
    p.add_argument("--logprob-dtype", choices=["float16", "float32"],
                   help="default: float32 if any input stores float32, else float16")
    p.add_argument("--codec", choices=sorted(fmt.CODEC_PRESETS), help="compression preset (default: the first input's)")
    p.add_argument("--shard-seqs", type=int, metavar="S", help="sequences per shard (default: planned as by build)")
    p.add_argument("--chunk-seqs", type=int, metavar="C", help="sequences per inner compression chunk")
    p.add_argument("--overwrite", action="store_true", help="replace an existing cache/merge with other settings")
    p.add_argument("--no-space-check", action="store_true", help="start even if the estimate exceeds the free space")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def user_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean bad input or an output directory that needs the user (CacheError is always one)."""
    from cache_server.build.options import BuildInputError
    from cache_server.format.build_lock import BuildLockedError

    return (BuildInputError, BuildLockedError)


def run(args: argparse.Namespace) -> int:
    from cache_server.build.merge_job import MergeOptions, run_merge

    run_merge(MergeOptions(caches=args.caches, out=args.out, weights=args.weights, topk=args.topk,
                           logprob_dtype=args.logprob_dtype, codec=args.codec, shard_seqs=args.shard_seqs,
                           chunk_seqs=args.chunk_seqs, overwrite=args.overwrite,
                           progress=not args.no_progress, space_check=not args.no_space_check))
    return 0
