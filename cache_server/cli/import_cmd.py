"""``kdcache import``: a peer's KD dataset (axolotl, DistillKit, vLLM prompt log-probs, top-k Parquet) as a cache."""

from __future__ import annotations

import argparse

from cache_server.cli import add_command

__all__ = ["register", "run", "user_errors"]

DESCRIPTION = """\
Build a kdcache cache from teacher outputs another tool already wrote, without the teacher. The result is
a normal cache: kdcache verify, info, serve, open_cache, the loaders and the losses take it.

Sources (--from):
  axolotl               axolotl KD dataset: Parquet or a datasets.save_to_disk directory with input_ids,
                        target_token_ids, target_logprobs (target_mask). --alignment next|current says
                        whether target row t is the distribution over token t+1 (axolotl's trainer, the
                        default) or over token t (axolotl's dataset strategy, row 0 padding).
  distillkit            DistillKit's compressed-logit Parquet directory (data_*.parquet with
                        compression_config.yaml, or --compression-config).
  vllm-prompt-logprobs  JSON lines of vLLM prompt_logprobs (prompt_token_ids + prompt_logprobs per line).
  parquet               plain top-k Parquet: input_ids, topk_ids, topk_logprobs [, teacher_lse].

What each lacks is recorded in the manifest's "provenance": no full-vocabulary logsumexp means the tail
mass is what the log-probs imply (tail "implied"); a source renormalized over its k ids (axolotl) has no
tail (tail "none": the losses then refuse tail='bucket'); DistillKit's codec is lossy past its exact_k
entries. Positions without teacher data (the last of a vLLM/DistillKit row, axolotl padding) are filled
one-hot on their next token. Rows are cut to --seq-len (default: the shortest row); shorter rows are
dropped and counted. The content is checked for off-by-one alignment (the teacher's top-k must hold the
NEXT token far more often than a neighbour). An import is crash-safe: rerun the same command to resume.
"""

EPILOG = """\
examples:
  kdcache import ./axolotl_kd.parquet --from axolotl --vocab-size 151936 --out ./cache
  kdcache import ./llama70b_logits/ --from distillkit --out ./cache --seq-len 1024
  kdcache import ./prompt_logprobs.jsonl --from vllm-prompt-logprobs --vocab-size 128256 --out ./cache
  kdcache import ./topk.parquet --from parquet --out ./cache

Exit status: 0 success, 2 bad input or a state of the output directory that needs you, 1 internal error.
"""


def register(subparsers) -> argparse.ArgumentParser:
    from cache_server import format as fmt
    from cache_server.interop import IMPORT_SOURCES

    p = add_command(subparsers, "import", help="build a cache from axolotl/DistillKit/vLLM/Parquet teacher outputs",
                    description=DESCRIPTION, epilog=EPILOG, run=run, user_errors=user_errors)
    p.add_argument("src", metavar="SRC", help="the source file or directory")
    p.add_argument("--from", dest="kind", required=True, choices=IMPORT_SOURCES, help="the source's layout")
    p.add_argument("--out", required=True, metavar="DIR", help="the cache directory (created; resumed)")
    p.add_argument("--vocab-size", type=int, metavar="V",
                   help="the teacher's vocabulary (default: DistillKit's d, the Parquet's metadata, else the largest "
                        "id + 1; pass it so that students with the teacher's vocabulary match)")
    p.add_argument("--seq-len", type=int, metavar="T", help="positions per sequence (default: the shortest row)")
    p.add_argument("--topk", type=int, metavar="K", help="entries kept per position (default: all the source has)")
    p.add_argument("--alignment", choices=["next", "current"], default="next", help="axolotl only (see above)")
    p.add_argument("--tail", choices=["implied", "none"], help="override the detected tail kind")
    p.add_argument("--compression-config", metavar="YAML", help="distillkit only: the codec settings file")
    p.add_argument("--logprob-dtype", choices=["float16", "float32"], default="float16")
    p.add_argument("--codec", choices=sorted(fmt.CODEC_PRESETS), default=fmt.DEFAULT_CODEC)
    p.add_argument("--shard-seqs", type=int, metavar="S", help="sequences per shard (default: planned as by build)")
    p.add_argument("--chunk-seqs", type=int, metavar="C", help="sequences per inner compression chunk")
    p.add_argument("--no-alignment-check", action="store_true", help="skip the off-by-one content check")
    p.add_argument("--overwrite", action="store_true", help="replace an existing cache with other settings")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def user_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean bad input (CacheError, hence InteropError, is always one)."""
    from cache_server.format.build_lock import BuildLockedError

    return (BuildLockedError,)


def run(args: argparse.Namespace) -> int:
    from cache_server.interop import ImportOptions, run_import

    run_import(ImportOptions(src=args.src, kind=args.kind, out=args.out, vocab_size=args.vocab_size,
                             seq_len=args.seq_len, topk=args.topk, logprob_dtype=args.logprob_dtype, codec=args.codec,
                             shard_seqs=args.shard_seqs, chunk_seqs=args.chunk_seqs, alignment=args.alignment,
                             tail=args.tail, compression_config=args.compression_config,
                             check_alignment=not args.no_alignment_check, overwrite=args.overwrite,
                             progress=not args.no_progress))
    return 0
