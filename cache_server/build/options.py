"""The options of one ``kdcache build`` and their validation (cheap checks, nothing is created on failure).

Every check here runs before the output directory is touched: bad option values, a device that is not
there, a sequence longer than the teacher can see, and the cache layout the options imply.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from cache_server import format as fmt
from cache_server.build.teacher import COMPUTE_DTYPES

__all__ = [
    "BuildInputError",
    "NonFiniteLogitsError",
    "BuildOptions",
    "check_options",
    "check_device",
    "check_seq_len",
    "plan_layout",
]


class BuildInputError(ValueError):
    """Bad arguments for a build; the message says what is wrong and how to fix it."""


class NonFiniteLogitsError(BuildInputError):
    """The teacher produced NaN/inf logits; shards finished before it stay on disk and resumable."""


@dataclass
class BuildOptions:
    """Arguments of one build (see ``kdcache build --help``)."""

    teacher: str | tuple[str, ...]  # several: the build stores their mixture (build/mixture.py)
    data: str
    out: str
    topk: int
    seq_len: int
    model_factory: str | None = None
    teacher_weights: tuple[float, ...] | None = None  # one per teacher (normalised); None: equal weights
    tokenizer: str | None = None
    data_dtype: str | None = None
    text_documents: str = "file"
    record_offsets: bool = False  # store each token's document and byte span (format/offsets.py; text data)
    temperatures: tuple[float, ...] = ()
    targets: str = "topk"  # topk | sample | hybrid (fmt.TARGET_KINDS)
    samples: int = 0  # D draws per position (sample / hybrid)
    sample_slots: int | None = None  # W (default D: never truncates)
    sample_temperature: float = 1.0  # tau_s of the draws
    sample_logprobs: bool = True  # store sample_logprobs
    dtype: str = "float32"
    device: str = "cpu"
    logprob_dtype: str = "float16"
    codec: str = fmt.DEFAULT_CODEC
    logprob_codec: str = "exact"
    batch_size: int = 8
    shard_seqs: int | None = None
    chunk_seqs: int | None = None
    overwrite: bool = False
    rank: int = 0
    world_size: int = 1
    max_sequences: int | None = None
    progress: bool = True
    queue_batches: int = 4
    space_check: bool = True
    engine: str = "local"  # local | ray (build/engine_ray.py: a pool of Ray actors writes whole shards)
    ray_address: str | None = None  # None: a Ray session of this process; auto / HOST:PORT / ray://HOST:PORT
    workers: int | None = None  # Ray actors (default: one per GPU of the cluster, or 1 on CPU)
    gpus_per_worker: float | None = None  # default 1 with a cuda --device, else 0


def check_options(opts: BuildOptions) -> tuple[float, ...]:
    """Validate the option values and the device; return the extra temperatures, sorted, without 1.

    Raises:
        BuildInputError: the first bad value, naming the option and what it accepts.
    """
    _check_target_options(opts)
    if opts.seq_len < 2:
        raise BuildInputError(f"--seq-len must be at least 2 (position t predicts token t+1), got {opts.seq_len}")
    if opts.batch_size <= 0:
        raise BuildInputError(f"--batch-size must be positive, got {opts.batch_size}")
    if opts.dtype not in COMPUTE_DTYPES:
        raise BuildInputError(f"--dtype must be one of {sorted(COMPUTE_DTYPES)}, got {opts.dtype!r}")
    if opts.logprob_dtype not in ("float16", "float32"):
        raise BuildInputError(f"--logprob-dtype must be float16 or float32, got {opts.logprob_dtype!r}")
    if opts.codec not in fmt.CODEC_PRESETS:
        raise BuildInputError(f"unknown --codec {opts.codec!r}; choose one of {sorted(fmt.CODEC_PRESETS)}")
    if opts.logprob_codec not in fmt.LOGPROB_CODECS:
        raise BuildInputError(f"unknown --logprob-codec {opts.logprob_codec!r}; choose one of {fmt.LOGPROB_CODECS}")
    if opts.world_size < 1 or not 0 <= opts.rank < opts.world_size:
        raise BuildInputError(f"--rank {opts.rank} must be in [0, --world-size {opts.world_size})")
    for name in ("shard_seqs", "chunk_seqs"):
        value = getattr(opts, name)
        if value is not None and value <= 0:
            raise BuildInputError(f"--{name.replace('_', '-')} must be positive, got {value}")
    if opts.engine not in ("local", "ray"):
        raise BuildInputError(f"--engine must be local or ray, got {opts.engine!r}")
    if opts.engine == "ray" and opts.world_size > 1:
        raise BuildInputError("--engine ray schedules every shard itself: drop --rank/--world-size (or RANK/WORLD_SIZE)")
    if opts.engine == "local":  # Ray actors check the device where they run (the driver may have no GPU)
        check_device(opts.device)
    temps = set()
    for tau in opts.temperatures:
        if not (math.isfinite(tau) and tau > 0):
            raise BuildInputError(f"--temperatures must be positive finite numbers, got {tau!r}")
        if float(tau) != 1.0:  # temperature 1 is always stored, as `lse`
            temps.add(float(tau))
    if opts.targets != "topk" and float(opts.sample_temperature) != 1.0:
        temps.add(float(opts.sample_temperature))  # the estimator needs logsumexp(z / tau_s)
    return tuple(sorted(temps))


def _check_target_options(opts: BuildOptions) -> None:
    """--targets, --topk, --samples, --sample-slots, --sample-temperature agree with each other."""
    kind = opts.targets
    if kind not in fmt.TARGET_KINDS:
        raise BuildInputError(f"--targets must be one of {', '.join(fmt.TARGET_KINDS)}, got {kind!r}")
    if kind == "sample":
        if opts.topk:
            raise BuildInputError(f"--targets sample stores no top-k: drop --topk {opts.topk} (or use --targets "
                                  "hybrid --topk H for an exact head plus samples)")
    elif opts.topk is None or opts.topk <= 0:
        raise BuildInputError(f"--targets {kind} needs --topk K, a positive integer (got {opts.topk})")
    if kind == "topk":
        sample_flags = opts.samples or opts.sample_slots is not None or float(opts.sample_temperature) != 1.0
        if sample_flags or not opts.sample_logprobs:
            raise BuildInputError("--samples, --sample-slots, --sample-temperature and --no-sample-logprobs are for "
                                  "--targets sample or hybrid; add --targets sample (or hybrid)")
        return
    if not 1 <= opts.samples <= fmt.MAX_SAMPLES:
        raise BuildInputError(f"--targets {kind} needs --samples N, draws per position from 1 to {fmt.MAX_SAMPLES} "
                              f"(got {opts.samples})")
    slots = opts.sample_slots
    if slots is not None and not 1 <= slots <= opts.samples:
        raise BuildInputError(f"--sample-slots must be from 1 to --samples ({opts.samples}), got {slots}: "
                              f"{opts.samples} draws have at most {opts.samples} distinct ids")
    tau = opts.sample_temperature
    if not (math.isfinite(tau) and tau > 0):
        raise BuildInputError(f"--sample-temperature must be a positive finite number, got {tau!r}")


def check_device(device: str) -> None:
    """Raise BuildInputError unless ``device`` names a torch device that this machine has."""
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise BuildInputError(
            f"--device {device!r} is not a torch device; use cpu, cuda, cuda:N (N = GPU index) or mps"
        ) from None
    kind, index = parsed.type, parsed.index
    if kind == "cpu":
        return
    if kind == "cuda":
        if not torch.cuda.is_available():
            built = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "built without CUDA"
            raise BuildInputError(
                f"--device {device}: CUDA is not available (this torch {torch.__version__} is {built}, and no GPU "
                "is visible to it; check the driver and CUDA_VISIBLE_DEVICES); use --device cpu"
            )
        count = torch.cuda.device_count()
        if index is not None and index >= count:
            raise BuildInputError(
                f"--device {device}: only {count} CUDA device(s) are visible (cuda:0 to cuda:{count - 1}); "
                "pass one of those, or select GPUs with CUDA_VISIBLE_DEVICES"
            )
        return
    if kind == "mps":
        if not torch.backends.mps.is_available():
            raise BuildInputError(
                f"--device {device}: MPS is not available (it needs an Apple-silicon Mac and a torch build with "
                "MPS support); use --device cpu"
            )
        return
    backend = getattr(torch, kind, None)
    is_available = getattr(backend, "is_available", None)
    if callable(is_available) and not is_available():
        raise BuildInputError(f"--device {device}: torch reports no {kind} device on this machine; use --device cpu")


def check_seq_len(seq_len: int, max_positions: int | None, teacher: str, source: str) -> None:
    """Refuse sequences longer than the teacher's position limit (``source`` says where the limit is set)."""
    if max_positions is not None and seq_len > max_positions:
        raise BuildInputError(
            f"--seq-len {seq_len} is longer than the teacher can see: {teacher} takes at most {max_positions} "
            f"positions ({source}); use --seq-len {max_positions} or less"
        )


def plan_layout(
    opts: BuildOptions, vocab_size: int, num_sequences: int, temperatures: tuple[float, ...]
) -> fmt.CacheLayout:
    """The cache layout of a build: the options' sizes, with shard/chunk sizes from the format's planner.

    An explicit ``--shard-seqs`` keeps the planned inner chunk if it divides the shard (else the largest
    divisor below it); an explicit ``--chunk-seqs`` rounds the planned shard down to a multiple of it.
    """
    if opts.targets == "hybrid" and opts.topk >= vocab_size:
        raise BuildInputError(f"--targets hybrid --topk {opts.topk} leaves nothing of the teacher vocabulary "
                              f"({vocab_size}) to sample; use --topk {vocab_size - 1} or less")
    if opts.topk and opts.topk > vocab_size:
        raise BuildInputError(
            f"--topk {opts.topk} is larger than the teacher vocabulary ({vocab_size}); use --topk {vocab_size} or less"
        )
    slots = (opts.sample_slots or opts.samples) if opts.targets != "topk" else 0
    width = max(opts.topk or 0, slots)  # entries per position of the widest array
    shard, chunk = fmt.plan_chunking(opts.seq_len, width, vocab_size, num_sequences=num_sequences)
    if opts.shard_seqs is not None and opts.chunk_seqs is not None:
        shard, chunk = opts.shard_seqs, opts.chunk_seqs
    elif opts.shard_seqs is not None:
        shard = opts.shard_seqs
        chunk = max(d for d in range(1, min(chunk, shard) + 1) if shard % d == 0)
    elif opts.chunk_seqs is not None:
        chunk = opts.chunk_seqs
        shard = max(chunk, shard // chunk * chunk)
    try:
        return fmt.CacheLayout(
            num_sequences=num_sequences,
            seq_len=opts.seq_len,
            topk=opts.topk or 0,
            vocab_size=vocab_size,
            temperatures=temperatures,
            logprob_dtype=opts.logprob_dtype,
            shard_seqs=shard,
            chunk_seqs=chunk,
            codec=opts.codec,
            logprob_codec=opts.logprob_codec,
            targets=opts.targets,
            samples=opts.samples if opts.targets != "topk" else 0,
            sample_slots=slots,
            sample_temperature=float(opts.sample_temperature),
            sample_logprobs=bool(opts.sample_logprobs),
            offsets=bool(opts.record_offsets),
        )
    except ValueError as exc:
        raise BuildInputError(str(exc)) from exc
