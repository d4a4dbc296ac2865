"""Batch assembly for every training-side path, and the student/teacher vocabulary rule.

Shape notation::

    B  sequences in a batch      T  positions per sequence
    K  top-k entries per position  V  vocabulary size

One owner for what a cache batch is: :func:`kdlib.make_loader`, :class:`kdlib.CacheDataset` and
:class:`kdlib.integrations.hf_trainer.KDTrainer` all make their batches with :func:`read_batch` (and
:func:`padding_batch`), move them with :func:`move_batch`, and compare vocabularies with
:func:`check_student_vocab`. A batch is a ``dict`` of CPU tensors::

    input_ids           [B, T]     int32    the tokens the teacher saw (feed these to the student)
    labels              [B, T]     int64    input_ids shifted left; labels[:, T-1] = ignore_index
    topk_ids            [B, T, K]  int32
    topk_logprobs       [B, T, K]  float16 (as stored)
    lse                 [B, T]     float32  teacher full-vocab logsumexp
    lse_t{tau:g}        [B, T]     float32  one per build temperature
    sample_ids          [B, T, W]  int32    sample / hybrid caches: distinct drawn ids (padding: id 0)
    sample_counts       [B, T, W]  uint8 | int32  draws per slot (0: padding)
    sample_logprobs     [B, T, W]  float16 (as stored) exact teacher log-probs of the slots (when stored)
    sample_temperature  []         float32  sample / hybrid caches: the temperature the draws were taken at
                                            (stays on the CPU, like the two below)
    sample_indices      [B]        int64    the cache sequence of each row (-1 for a padding row)
    teacher_vocab_size  []         int64    the cache's vocabulary (stays on the CPU)

Labels follow ``cache_server.format.ALIGNMENT_CONVENTION``: position t of a cached sequence holds the
teacher's distribution over token t+1, so the label of position t is ``input_ids[:, t+1]`` and the last
position has no label inside the sequence (``ignore_index``). A padding row (a copy of a real sequence that
fills a rank's empty remainder) has every label ``ignore_index`` and ``sample_indices = -1``, so every loss
ignores it.

Dtypes: the cache's compact dtypes are kept until the batch is on the device (``input_ids`` int32, top-k ids
int32, log-probs float16); :func:`move_batch` widens ``input_ids`` to int64 there (what an embedding and
``cross_entropy`` take) and leaves the top-k arrays compact (the loss widens them). ``sample_indices`` and
``teacher_vocab_size`` stay on the CPU, so reading them never waits for the device.

Every cached top-k id, and every sample id of a slot with a count, is checked against the teacher's vocabulary
where a batch is made (on the CPU, one pass over [B, T, K] / [B, T, W] compact ids), so the alignment check
of a training step needs no device sync.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch

__all__ = [
    "AlignmentError",
    "DEFAULT_IGNORE_INDEX",
    "KEEP_ON_CPU",
    "shift_labels",
    "batch_labels",
    "check_topk_ids_in_vocab",
    "check_sample_ids_in_vocab",
    "check_student_vocab",
    "teacher_vocab_size_of",
    "read_batch",
    "padding_batch",
    "move_batch",
    "pin_batch",
    "student_input_ids",
]

DEFAULT_IGNORE_INDEX = -100
# Bookkeeping entries that stay on the CPU in move_batch: reading them (int(), .tolist()) then never waits for
# the device, and nothing on the device needs them.
KEEP_ON_CPU = ("sample_indices", "teacher_vocab_size", "sample_temperature")
_WIDEN_ON_DEVICE = ("input_ids",)


class AlignmentError(ValueError):
    """The student's tokens or vocabulary do not match the cache the teacher targets came from."""


# ----------------------------------------------------------------------------------------------- labels


def shift_labels(input_ids: torch.Tensor, ignore_index: int = DEFAULT_IGNORE_INDEX) -> torch.Tensor:
    """Next-token labels per the cache convention: ``labels[..., t] = input_ids[..., t+1]``, last = ignore_index.

    Args:
        input_ids: [..., T] integer tokens (any integer dtype, any device).
        ignore_index: label of the last position (it has no next token inside the sequence).

    Returns:
        [..., T] int64 labels on ``input_ids``' device (the dtype ``cross_entropy`` takes).
    """
    labels = torch.empty(input_ids.shape, dtype=torch.int64, device=input_ids.device)  # [..., T]
    labels[..., :-1] = input_ids[..., 1:]
    labels[..., -1] = ignore_index
    return labels


def batch_labels(batch: Mapping[str, Any], ignore_index: int = DEFAULT_IGNORE_INDEX) -> torch.Tensor:
    """The batch's own ``labels`` [B, T] (padding rows stay ignored), else :func:`shift_labels` of its tokens."""
    labels = batch.get("labels")
    if labels is not None:
        return torch.as_tensor(labels)
    if "input_ids" not in batch:
        raise ValueError(f"the batch has neither 'labels' nor 'input_ids' (keys: {sorted(batch)}); pass a batch "
                         "from kdlib.make_loader / CacheDataset / kdlib.batch.read_batch")
    return shift_labels(torch.as_tensor(batch["input_ids"]), ignore_index)


def student_input_ids(batch: Mapping[str, Any], device: torch.device | str | None = None) -> torch.Tensor:
    """``batch["input_ids"]`` [B, T] as the student takes them: int64, on ``device`` (default: where they are)."""
    if "input_ids" not in batch:
        raise ValueError(f"the batch has no 'input_ids' for the student (keys: {sorted(batch)})")
    ids = torch.as_tensor(batch["input_ids"])
    if ids.is_floating_point() or ids.dtype == torch.bool:
        raise ValueError(f"input_ids must be integer token ids, got {ids.dtype}")
    return ids.to(device=device if device is not None else ids.device, dtype=torch.int64, non_blocking=True)


# ----------------------------------------------------------------------------------------------- vocabulary


def _as_int(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        # 0-dim from the loader, [B] after a default collate. Kept on the CPU by the loaders, where reading it
        # does not wait for the device; a copy moved to an accelerator costs one sync here.
        return int(value.reshape(-1)[0])
    return int(value)


def teacher_vocab_size_of(batch: Mapping[str, Any], explicit: int | None = None) -> int | None:
    """The teacher's vocabulary size: ``explicit`` if given, else the batch's ``teacher_vocab_size``, else None."""
    if explicit is not None:
        return int(explicit)
    value = batch.get("teacher_vocab_size") if isinstance(batch, Mapping) else None
    return None if value is None else _as_int(value)


def check_student_vocab(student_vocab_size: int, teacher_vocab_size: int | None, *,
                        allow_padded_vocab: bool) -> None:
    """Raise :class:`AlignmentError` unless the student's vocabulary can take the teacher's targets.

    Equal sizes pass. With ``allow_padded_vocab=True`` a student vocabulary LARGER than the teacher's also
    passes: models often pad the embedding to a multiple of 64/128 (GPT-2: 50304 rows for 50257 tokens); the
    padded rows are never a label or a cached id, so they only take some of the student's probability mass.
    A smaller student vocabulary never passes. Python ints only: no device memory is read.

    Args:
        student_vocab_size: the student's output size (``logits.shape[-1]``).
        teacher_vocab_size: the cache's vocabulary (its manifest's ``vocab_size``, a batch's
            ``teacher_vocab_size``; a CPU tensor is read as its first element); None passes (nothing to compare).
        allow_padded_vocab: accept a student vocabulary larger than the teacher's.

    Raises:
        AlignmentError: the sizes differ in a way not allowed, with how to fix it.
    """
    if teacher_vocab_size is None:
        return
    student, teacher = int(student_vocab_size), _as_int(teacher_vocab_size)
    if student == teacher or (allow_padded_vocab and student > teacher):
        return
    hint = (" If the student's embedding is only padded beyond the teacher's tokens (e.g. 50304 rows for GPT-2's "
            "50257), pass allow_padded_vocab=True." if student > teacher else "")
    raise AlignmentError(
        f"the student's vocabulary has {student} entries but the cache's teacher has {teacher}: top-k ids "
        "index different tokens (or none), so the KD targets would be meaningless. Use a student with the teacher's tokenizer and "
        f"vocab_size, or rebuild the cache with a teacher that shares the student's tokenizer.{hint}")


def check_topk_ids_in_vocab(topk_ids: torch.Tensor | np.ndarray, vocab_size: int, *,
                            vocab_of: str = "teacher", what: str = "top-k") -> None:
    """Raise :class:`AlignmentError` if a cached top-k id is not below ``vocab_size``.

    Meant for CPU batches where they are made (one pass over [B, T, K] compact ids); on a device tensor it
    costs one host-device sync.

    Args:
        topk_ids: [B, T, K] (any leading shape) cached ids, uint16/int32/int64, numpy or torch.
        vocab_size: the vocabulary the ids must index.
        vocab_of: ``"teacher"`` (the cache's manifest ``vocab_size``: an id beyond it means an inconsistent
            cache) or ``"student"`` (the student's output size: the teacher's vocabulary is larger).
        what: the kind of id, named in the error (``"top-k"``, ``"sample"``).
    """
    if vocab_of not in ("teacher", "student"):
        raise ValueError(f"vocab_of must be 'teacher' or 'student', got {vocab_of!r}")
    if isinstance(topk_ids, torch.Tensor):
        if topk_ids.numel() == 0:
            return
        # uint16 has no max() on every backend: compare in int32, exact for ids < 2**31.
        ids = topk_ids.to(torch.int32) if topk_ids.dtype == torch.uint16 else topk_ids
        largest = int(ids.max())  # the one sync of a device tensor
    else:
        if topk_ids.size == 0:
            return
        largest = int(topk_ids.max())
    if largest < int(vocab_size):
        return
    if vocab_of == "teacher":
        raise AlignmentError(
            f"the cache holds teacher {what} id {largest}, outside the teacher's vocabulary of {int(vocab_size)} "
            "that its manifest states: the cache is inconsistent (built with another vocab_size than its "
            "teacher's output size); rebuild it with the teacher's real vocabulary size")
    raise AlignmentError(
        f"the cache holds teacher {what} id {largest}, outside the student's vocabulary of {int(vocab_size)}: the "
        "teacher's vocabulary is larger; use a student with the teacher's tokenizer and vocab_size")


# ----------------------------------------------------------------------------------------------- assembly


def _is_contiguous(indices: np.ndarray) -> bool:
    return indices.size > 0 and int(indices[-1] - indices[0]) == indices.size - 1 and bool(
        (np.diff(indices) == 1).all())


def read_batch(cache: Any, indices: Sequence[int] | np.ndarray, arrays: Sequence[str] | None = None,
               ignore_index: int = DEFAULT_IGNORE_INDEX) -> dict[str, torch.Tensor]:
    """The cache's sequences at ``indices`` [B] as one batch (module docstring), in the order given.

    A run of consecutive indices is one ``cache.read`` (memory-map slices); anything else one ``cache.lookup``.

    Args:
        cache: an open cache (``kdlib.open_cache``).
        indices: [B] sequence indices in [0, N).
        arrays: per-position arrays to read (default all); must include ``input_ids``.
        ignore_index: label of positions without a next token.

    Raises:
        ValueError: ``arrays`` lacks ``input_ids``.
        AlignmentError: a cached top-k id is outside the teacher's vocabulary (an inconsistent cache).
    """
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)  # [B]
    if arrays is not None and "input_ids" not in arrays:
        raise ValueError(f"a cache batch needs 'input_ids' among arrays= (labels and alignment checks use them), "
                         f"got {list(arrays)}")
    if _is_contiguous(idx):
        batch = cache.read(int(idx[0]), int(idx[-1]) + 1, arrays=arrays)
    else:
        batch = cache.lookup(idx, arrays=arrays)
    vocab_size = int(cache.vocab_size)
    if "topk_ids" in batch:
        check_topk_ids_in_vocab(batch["topk_ids"], vocab_size)  # [B, T, K], here on the CPU
    if "sample_ids" in batch:
        check_sample_ids_in_vocab(batch, vocab_size)
    layout = getattr(cache, "layout", None)
    if layout is not None and getattr(layout, "has_samples", False):
        batch["sample_temperature"] = torch.tensor(float(layout.sample_temperature), dtype=torch.float32)
    batch["labels"] = shift_labels(batch["input_ids"], ignore_index)  # [B, T]
    batch["sample_indices"] = torch.from_numpy(idx.copy())  # [B]
    batch["teacher_vocab_size"] = torch.tensor(vocab_size, dtype=torch.int64)
    return batch


def check_sample_ids_in_vocab(batch: Mapping[str, torch.Tensor], vocab_size: int, *, vocab_of: str = "teacher") -> None:
    """Sample ids of slots with a count must be < vocab (padding slots hold id 0 and are not looked at).

    Args:
        batch: a batch with ``sample_ids`` [B, T, W] (and ``sample_counts`` [B, T, W]).
        vocab_size: the vocabulary the ids must index.
        vocab_of: ``"teacher"`` or ``"student"``, as for :func:`check_topk_ids_in_vocab`.
    """
    ids = batch["sample_ids"]  # [B, T, W]
    counts = batch.get("sample_counts")
    if counts is not None:
        ids = torch.where(counts > 0, ids, torch.zeros((), dtype=ids.dtype))
    check_topk_ids_in_vocab(ids, vocab_size, vocab_of=vocab_of, what="sample")


def padding_batch(cache: Any, any_index: int, arrays: Sequence[str] | None = None,
                  ignore_index: int = DEFAULT_IGNORE_INDEX) -> dict[str, torch.Tensor]:
    """One padding row [1, ...]: sequence ``any_index``'s data, every label ignored, ``sample_indices = -1``."""
    batch = read_batch(cache, np.array([any_index], dtype=np.int64), arrays, ignore_index)
    batch["labels"].fill_(ignore_index)
    batch["sample_indices"].fill_(-1)
    return batch


# ----------------------------------------------------------------------------------------------- device


def move_batch(batch: Mapping[str, torch.Tensor], device: torch.device | str, *, non_blocking: bool = True,
               long_input_ids: bool = True, keep_on_cpu: Sequence[str] = KEEP_ON_CPU) -> dict[str, torch.Tensor]:
    """Copy a batch to ``device`` (asynchronously from pinned memory); widen ``input_ids`` there if asked.

    The top-k arrays stay compact (int32 ids, fp16 log-probs): the loss widens them on the device, where it is
    cheap. ``keep_on_cpu`` entries (bookkeeping: ``sample_indices``, ``teacher_vocab_size``) are not copied, so
    reading them (``int()``, ``.tolist()``) never waits for the device.
    """
    device = torch.device(device)
    out = {}
    for key, value in batch.items():
        if key in keep_on_cpu or not isinstance(value, torch.Tensor):
            out[key] = value
            continue
        value = value.to(device, non_blocking=non_blocking)
        if long_input_ids and key in _WIDEN_ON_DEVICE:
            value = value.to(torch.int64)
        out[key] = value
    return out


def pin_batch(batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The batch in page-locked memory (for asynchronous host-to-GPU copies); needs CUDA."""
    return {k: v.pin_memory() for k, v in batch.items()}
