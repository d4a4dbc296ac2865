"""``kdcache build``: run a teacher over token data and write a crash-safe, resumable top-k logit cache."""

from __future__ import annotations

import argparse
import os

from cache_server.cli import add_command

__all__ = ["register", "run", "user_errors"]

DESCRIPTION = """\
Run a teacher over token data and write a crash-safe, resumable top-k logit cache.

Rerunning the same command continues an interrupted build (the result is bitwise identical to an
uninterrupted build with the same --batch-size); on a finished cache it re-verifies every shard against
the manifest (size and sha256) and rebuilds only the damaged or missing ones, or reports that there is
nothing to do. A rerun with other settings is refused unless --overwrite. Only one build may write a
directory (the ranks of one --world-size build share it): a second one stops at once with an error.
"""

EPILOG = """\
examples:
  # transformers teacher, 1-D token stream cut into sequences of 2048 (the remainder is dropped and reported)
  kdcache build --teacher ./llama-1b --data tokens.npy --topk 32 --seq-len 2048 --out ./cache

  # nanoGPT .bin stream (uint16), extra temperatures, bf16 teacher on GPU
  kdcache build --teacher ./teacher --data train.bin --data-dtype uint16 --topk 64 --seq-len 1024 \\
      --temperatures 2,4 --dtype bfloat16 --device cuda --batch-size 16 --out ./cache

  # text with the teacher's tokenizer, one document per paragraph; quick try on 100 sequences
  kdcache build --teacher ./teacher --data docs.txt --text-documents blank-line --topk 32 --seq-len 512 \\
      --max-sequences 100 --out ./cache-try

  # custom model: safetensors state dict + a factory that builds the nn.Module
  kdcache build --teacher model.safetensors --model-factory mypkg.models:build_teacher --data tokens.npy \\
      --topk 32 --seq-len 512 --out ./cache

  # the mixture 0.7 A + 0.3 B of two teachers that share a tokenizer (computed from their full logits)
  kdcache build --teacher ./teacher-a --teacher ./teacher-b --teacher-weights 0.7,0.3 --data tokens.npy \\
      --topk 32 --seq-len 1024 --out ./cache-mix

  # sampled targets (unbiased): 48 draws per position stored as distinct ids + counts; or an exact top-4
  # head plus 32 draws from the rest of the vocabulary
  kdcache build --teacher ./teacher --data tokens.npy --targets sample --samples 48 --seq-len 1024 --out ./cache-s
  kdcache build --teacher ./teacher --data tokens.npy --targets hybrid --topk 4 --samples 32 --seq-len 1024 \
      --out ./cache-h

  # 4 GPUs: one process per rank (or set RANK / WORLD_SIZE); the last rank to finish writes the manifest
  for r in 0 1 2 3; do CUDA_VISIBLE_DEVICES=$r kdcache build ... --rank $r --world-size 4 --device cuda & done

  # a Ray cluster ("ray start --head" on one node, "ray start --address HEAD:6379" on the others; --out and
  # --data on a shared filesystem): one actor per GPU, shards of dead actors redone, rerun to resume
  kdcache build ... --device cuda --dtype bfloat16 --engine ray --ray-address auto --out /shared/cache

  # straight to object storage (credentials from the environment or profile, never stored in the cache)
  kdcache build ... --out s3://bucket/caches/run1 --storage-options '{"client_kwargs": {"region_name": "eu-west-1"}}'

Data: .npy (1-D or 2-D), .bin (--data-dtype), .parquet, .arrow/.feather or a datasets.save_to_disk
directory (column input_ids, or a string column text tokenized one row per document), .txt (see
--text-documents) and .jsonl (the "text" field of each line is one document), tokenized with --tokenizer.
Each document is tokenized as one text; documents are joined with the tokenizer's EOS token, which
appears only between documents.

Before starting, the build checks that the output filesystem has room for the estimated cache size
(--no-space-check skips this); if the disk fills up anyway, it stops with an error that says how much
is needed, and rerunning the command after freeing space resumes it.
Exit status: 0 success, 2 bad input or a state of the output directory that needs you, 1 internal error.
"""


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    try:
        return int(value) if value not in (None, "") else default
    except ValueError:
        return default


def _temperatures(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--temperatures takes comma-separated numbers like 1,2,4, got {text!r}")


def _weights(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(w) for w in text.split(",") if w.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--teacher-weights takes comma-separated numbers like 0.7,0.3, got {text!r}")


def _add_sample_flags(group) -> None:
    """--targets and the sampling flags (docs/FORMAT.md, "Target kinds")."""
    group.add_argument("--targets", default="topk", choices=["topk", "sample", "hybrid"],
                       help="what each position stores: topk, the exact top-K (default); sample, N draws from the "
                       "teacher as distinct ids with counts (unbiased; no --topk); hybrid, the exact top-H head "
                       "(--topk H) plus N draws from the rest of the vocabulary")
    group.add_argument("--samples", type=int, default=0, metavar="N",
                       help="draws per position with replacement, for --targets sample/hybrid (at most 65535)")
    group.add_argument("--sample-temperature", type=float, default=1.0, metavar="TAU",
                       help="temperature of the draws (default 1; another one is added to --temperatures)")
    group.add_argument("--sample-slots", type=int, metavar="W",
                       help="distinct ids stored per position (default N, which never drops a draw); with W < N a "
                       "position with more than W distinct ids keeps the W most frequent, and the dropped draws, "
                       "which bias that position, are counted in the manifest (stats.truncated_draws)")
    group.add_argument("--no-sample-logprobs", action="store_true",
                       help="do not store the exact teacher log-prob of each sampled id (smaller; the loss then "
                       "cannot report the KL value nor reweight to another temperature)")


def register(subparsers) -> argparse.ArgumentParser:
    from cache_server import format as fmt
    from cache_server.build.sources import TEXT_DOCUMENT_MODES

    p = add_command(
        subparsers, "build", help="run a teacher over token data and write a top-k logit cache",
        description=DESCRIPTION, epilog=EPILOG, run=run, user_errors=user_errors,
    )
    req = p.add_argument_group("required")
    req.add_argument("--teacher", required=True, metavar="CKPT", action="append",
                     help="transformers model directory (safetensors), or a .safetensors state dict with "
                     "--model-factory; repeat it for a mixture of teachers (see --teacher-weights)")
    req.add_argument("--data", required=True, metavar="PATH", help="token data or text (see the formats below)")
    req.add_argument("--topk", type=int, metavar="K",
                     help="top-k entries kept per position (the exact head H with --targets hybrid; not with "
                     "--targets sample)")
    req.add_argument("--seq-len", required=True, type=int, metavar="T",
                     help="positions per sequence (at most the teacher's maximum positions)")
    req.add_argument("--out", required=True, metavar="DIR", help="cache directory, or an fsspec URL such as "
                     "s3://bucket/prefix (created; resumed if unfinished)")

    t = p.add_argument_group("teacher")
    t.add_argument("--model-factory", metavar="MODULE:FUNCTION",
                   help="function returning the nn.Module for a bare safetensors state dict")
    t.add_argument("--teacher-weights", type=_weights, metavar="W1,W2",
                   help="mixture weights, one per --teacher in order, normalised to sum 1 (default: equal)")
    t.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="teacher compute dtype (top-k/logsumexp are always fp32); default float32")
    t.add_argument("--device", default="cpu",
                   help="torch device, e.g. cpu, cuda, cuda:1 or mps; checked before anything runs (default cpu)")

    d = p.add_argument_group("data")
    d.add_argument("--tokenizer", metavar="DIR",
                   help="directory with tokenizer.json for text data (default: the teacher directory's own)")
    d.add_argument("--text-documents", default="file", choices=TEXT_DOCUMENT_MODES,
                   help="what one document of a .txt file is: file, the whole file (default); blank-line, "
                   "each run of non-blank lines; line, each non-blank line")
    d.add_argument("--record-offsets", action="store_true", help="text data: also store each token's document "
                   "and byte span, for students with other tokenizers (kdlib.crosstok; docs/FORMAT.md)")
    d.add_argument("--data-dtype", choices=["uint16", "uint32"], help="dtype of a raw .bin token stream (default uint16)")
    d.add_argument("--max-sequences", type=int, metavar="N", help="use only the first N sequences (quick runs)")

    c = p.add_argument_group("cache contents")
    c.add_argument("--temperatures", type=_temperatures, default=(), metavar="T1,T2",
                   help="extra temperatures for logsumexp(logits/tau), e.g. 2,4 (1 is always stored as lse)")
    c.add_argument("--logprob-dtype", default="float16", choices=["float16", "float32"], help="default float16")
    _add_sample_flags(c)
    c.add_argument("--codec", default=fmt.DEFAULT_CODEC, choices=sorted(fmt.CODEC_PRESETS),
                   help=f"compression preset (default {fmt.DEFAULT_CODEC})")
    c.add_argument("--logprob-codec", default="exact", choices=list(fmt.LOGPROB_CODECS),
                   help="exact (default: every bit of --logprob-dtype) or q8 (lossy, opt-in: each position's top "
                        "log-prob exact, the rest as 8-bit steps below it; docs/FORMAT.md)")
    c.add_argument("--shard-seqs", type=int, metavar="S",
                   help="sequences per shard (default: shards of about 32 MiB of top-k ids, at most all sequences)")
    c.add_argument("--chunk-seqs", type=int, metavar="C",
                   help="sequences per inner compression chunk (default: about 1 MiB of top-k ids)")

    r = p.add_argument_group("run")
    r.add_argument("--batch-size", type=int, default=8, metavar="B", help="sequences per forward (default 8)")
    r.add_argument("--overwrite", action="store_true", help="replace an existing cache/build with other settings")
    r.add_argument("--rank", type=int, default=_env_int("RANK", 0), help="this process's rank (default $RANK or 0)")
    r.add_argument("--world-size", type=int, default=_env_int("WORLD_SIZE", 1),
                   help="number of build processes (default $WORLD_SIZE or 1)")
    r.add_argument("--no-space-check", action="store_true",
                   help="start even if the estimated cache size exceeds the free space of the output filesystem")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")

    _add_engine_flags(p)
    return p


def _add_engine_flags(p: argparse.ArgumentParser) -> None:
    """The engine that computes the shards (local or Ray) and the options of an object-store --out."""
    e = p.add_argument_group("engine (see README: which engine when)")
    e.add_argument("--engine", default="local", choices=["local", "ray"],
                   help="local: this process (with --rank/--world-size, one of several); ray: a pool of Ray actors "
                   "computes and writes whole shards, re-queueing those of actors that die (pip install "
                   "'kdcache[ray]')")
    e.add_argument("--ray-address", metavar="ADDR",
                   help="Ray cluster to use: auto, HOST:PORT or ray://HOST:10001 (default: a Ray session of this "
                   "process on this machine)")
    e.add_argument("--workers", type=int, metavar="N",
                   help="Ray actors, each loading the teacher once (default: one per GPU of the cluster with a "
                   "cuda --device, else 1)")
    e.add_argument("--gpus-per-worker", type=float, metavar="G",
                   help="GPUs per Ray actor (default 1 with a cuda --device, 0 on CPU)")
    e.add_argument("--storage-options", default=None, metavar="JSON",
                   help="fsspec options for an --out URL, as a JSON object (default $KDCACHE_STORAGE_OPTIONS)")


def user_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean bad input or an output directory that needs the user (CacheError is always one)."""
    from cache_server.build.options import BuildInputError
    from cache_server.build.sources import DataError
    from cache_server.build.teacher import TeacherError
    from cache_server.format.build_lock import BuildLockedError

    return (BuildInputError, DataError, TeacherError, BuildLockedError)


def run(args: argparse.Namespace) -> int:
    from cache_server.build.job import run_build
    from cache_server.build.options import BuildOptions
    from cache_server.format import storage

    storage.use_storage_options(args.storage_options)
    run_build(BuildOptions(
        teacher=args.teacher[0] if len(args.teacher) == 1 else tuple(args.teacher),
        teacher_weights=args.teacher_weights,
        data=args.data,
        out=args.out,
        topk=args.topk,
        seq_len=args.seq_len,
        model_factory=args.model_factory,
        tokenizer=args.tokenizer,
        data_dtype=args.data_dtype,
        text_documents=args.text_documents,
        record_offsets=args.record_offsets,
        temperatures=tuple(args.temperatures),
        targets=args.targets,
        samples=args.samples,
        sample_slots=args.sample_slots,
        sample_temperature=args.sample_temperature,
        sample_logprobs=not args.no_sample_logprobs,
        dtype=args.dtype,
        device=args.device,
        logprob_dtype=args.logprob_dtype,
        codec=args.codec,
        logprob_codec=args.logprob_codec,
        batch_size=args.batch_size,
        shard_seqs=args.shard_seqs,
        chunk_seqs=args.chunk_seqs,
        overwrite=args.overwrite,
        rank=args.rank,
        world_size=args.world_size,
        max_sequences=args.max_sequences,
        progress=not args.no_progress,
        space_check=not args.no_space_check,
        engine=args.engine,
        ray_address=args.ray_address,
        workers=args.workers,
        gpus_per_worker=args.gpus_per_worker,
    ))
    return 0
