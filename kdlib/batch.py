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
    largest_id          []         int64    the largest token id in the batch: input_ids, top-k ids and sample ids
                                            with a count (computed on the CPU where the batch is made; stays there)

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
of a training step needs no device sync. The same pass records the batch's ``largest_id``, which settles a
student vocabulary SMALLER than the teacher's (a teacher embedding padded beyond the student's, Qwen2.5 style:
152,064 rows vs 151,936) without reading device memory either (:func:`check_batch_vocab`).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch

from cache_server.format.manifest import teacher_tail

__all__ = [
    "AlignmentError",
    "DEFAULT_IGNORE_INDEX",
    "KEEP_ON_CPU",
    "shift_labels",
    "batch_labels",
    "check_topk_ids_in_vocab",
    "check_sample_ids_in_vocab",
    "check_student_vocab",
    "check_batch_vocab",
    "first_id_outside",
    "largest_id_of",
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
KEEP_ON_CPU = ("sample_indices", "teacher_vocab_size", "sample_temperature", "largest_id", "teacher_tail_missing")
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
    if input_ids.device.type == "cpu":  # numpy's copies: a third of the cost of torch's for one batch
        source = input_ids.numpy()
        out = np.empty(source.shape, dtype=np.int64)  # [..., T]
        out[..., :-1] = source[..., 1:]
        out[..., -1] = ignore_index
        return torch.from_numpy(out)
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


def largest_id_of(batch: Mapping[str, Any]) -> int | None:
    """The batch's ``largest_id`` (the maximum over a collated [B] copy), or None when it has none."""
    value = batch.get("largest_id") if isinstance(batch, Mapping) else None
    if value is None:
        return None
    return int(value.max()) if isinstance(value, torch.Tensor) else int(value)


_PADDED_TEACHER_HINT = (
    " If only the teacher's embedding is padded beyond the student's tokens (Qwen2.5: 152064 rows for the "
    "151936 of its small models), pass allow_padded_vocab=True: the cache is then accepted when every id in it "
    "is below the student's vocabulary, and the teacher's mass on the ids the student lacks joins the tail.")


def check_student_vocab(student_vocab_size: int, teacher_vocab_size: int | None, *,
                        allow_padded_vocab: bool, largest_id: int | None = None) -> None:
    """Raise :class:`AlignmentError` unless the student's vocabulary can take the teacher's targets.

    Equal sizes pass. With ``allow_padded_vocab=True`` two padded cases pass too:

    * a student vocabulary LARGER than the teacher's: models often pad the embedding to a multiple of 64/128
      (GPT-2: 50304 rows for 50257 tokens); the padded rows are never a label or a cached id, so they only take
      some of the student's probability mass;
    * a student vocabulary SMALLER than the teacher's (a teacher embedding padded beyond the student's, Qwen2.5
      style), when ``largest_id`` (the largest id of the batch: tokens, top-k ids, drawn ids) is below the
      student's size. The losses then fold the teacher's mass on the ids the student lacks into the tail
      (docs/LOSSES.md, "Student vocabulary smaller than the teacher's"). Without ``largest_id`` it raises:
      :func:`check_batch_vocab` finds it in the batch.

    Python ints only: no device memory is read.

    Args:
        student_vocab_size: the student's output size (``logits.shape[-1]``).
        teacher_vocab_size: the cache's vocabulary (its manifest's ``vocab_size``, a batch's
            ``teacher_vocab_size``; a CPU tensor is read as its first element); None passes (nothing to compare).
        allow_padded_vocab: accept the padded cases above.
        largest_id: the largest id of the batch the targets come from (a batch's ``largest_id``), for a smaller
            student.

    Raises:
        AlignmentError: the sizes differ in a way not allowed, with how to fix it.
    """
    if teacher_vocab_size is None:
        return
    student, teacher = int(student_vocab_size), _as_int(teacher_vocab_size)
    if student == teacher or (allow_padded_vocab and student > teacher):
        return
    if allow_padded_vocab and largest_id is not None and int(largest_id) < student:
        return  # a smaller student whose vocabulary holds every id of the batch
    if student > teacher:
        hint = (" If the student's embedding is only padded beyond the teacher's tokens (e.g. 50304 rows for "
                "GPT-2's 50257), pass allow_padded_vocab=True.")
    elif not allow_padded_vocab:
        hint = _PADDED_TEACHER_HINT
    else:
        hint = (f" allow_padded_vocab=True accepts a smaller student only when every id of the batch is below "
                f"{student}: {'its largest id is ' + str(int(largest_id)) if largest_id is not None else 'this batch does not say (no largest_id: check it with kdlib.batch.check_batch_vocab)'}.")
    raise AlignmentError(
        f"the student's vocabulary has {student} entries but the cache's teacher has {teacher}: top-k ids "
        "index different tokens (or none), so the KD targets would be meaningless. Use a student with the "
        f"teacher's tokenizer and vocab_size, or rebuild the cache with a teacher that shares the student's "
        f"tokenizer.{hint}")


def _ids_max(ids: torch.Tensor | np.ndarray) -> int:
    """The largest id of [..] compact ids (-1 when empty); on a device tensor one host-device sync."""
    if isinstance(ids, torch.Tensor):
        if ids.numel() == 0:
            return -1
        if ids.device.type == "cpu":
            # numpy's reduction on the same memory: torch's CPU max() wakes its intra-op threads, which costs
            # ~10x the reduction itself for a batch (measured: half of a warm loader pass went there).
            return int(ids.numpy().max())
        # uint16 has no max() on every backend: compare in int32, exact for ids < 2**31.
        return int((ids.to(torch.int32) if ids.dtype == torch.uint16 else ids).max())
    return int(ids.max()) if ids.size else -1


def check_topk_ids_in_vocab(topk_ids: torch.Tensor | np.ndarray, vocab_size: int, *,
                            vocab_of: str = "teacher", what: str = "top-k") -> int:
    """Raise :class:`AlignmentError` if a cached top-k id is not below ``vocab_size``; return the largest id.

    Meant for CPU batches where they are made (one pass over [B, T, K] compact ids); on a device tensor it
    costs one host-device sync.

    Args:
        topk_ids: [B, T, K] (any leading shape) cached ids, uint16/int32/int64, numpy or torch.
        vocab_size: the vocabulary the ids must index.
        vocab_of: ``"teacher"`` (the cache's manifest ``vocab_size``: an id beyond it means an inconsistent
            cache) or ``"student"`` (the student's output size: the teacher's vocabulary is larger).
        what: the kind of id, named in the error (``"top-k"``, ``"sample"``).

    Returns:
        The largest id (-1 for no ids).
    """
    if vocab_of not in ("teacher", "student"):
        raise ValueError(f"vocab_of must be 'teacher' or 'student', got {vocab_of!r}")
    largest = _ids_max(topk_ids)  # the one sync of a device tensor
    if largest < int(vocab_size):
        return largest
    if vocab_of == "teacher":
        raise AlignmentError(
            f"the cache holds teacher {what} id {largest}, outside the teacher's vocabulary of {int(vocab_size)} "
            "that its manifest states: the cache is inconsistent (built with another vocab_size than its "
            "teacher's output size); rebuild it with the teacher's real vocabulary size")
    raise AlignmentError(
        f"the cache holds teacher {what} id {largest}, outside the student's vocabulary of {int(vocab_size)}: the "
        "teacher's vocabulary is larger; use a student with the teacher's tokenizer and vocab_size")


def _counted_sample_ids(batch: Mapping[str, Any]) -> torch.Tensor:
    """``sample_ids`` [B, T, W] with the padding slots (count 0) set to id 0."""
    ids = torch.as_tensor(batch["sample_ids"])
    counts = batch.get("sample_counts")
    if counts is not None:
        ids = torch.where(torch.as_tensor(counts).to(ids.device) > 0, ids, torch.zeros((), dtype=ids.dtype))
    return ids


def first_id_outside(batch: Mapping[str, Any], vocab_size: int) -> tuple[str, tuple[int, ...], int] | None:
    """The first id of the batch not below ``vocab_size``: (kind, index, value), or None if there is none.

    Looks at ``input_ids`` [B, T] (kind ``"input"``), ``topk_ids`` [B, T, K] (``"top-k"``) and the sample ids
    of slots with a count [B, T, W] (``"sample"``), in that order; the index is the id's position in that
    tensor (row, position[, slot]). Reads the ids (one host-device sync per tensor on a device): an error path.
    """
    for key, kind in (("input_ids", "input"), ("topk_ids", "top-k"), ("sample_ids", "sample")):
        if batch.get(key) is None:
            continue
        ids = _counted_sample_ids(batch) if key == "sample_ids" else torch.as_tensor(batch[key])
        if ids.dtype == torch.uint16:
            ids = ids.to(torch.int32)
        outside = (ids >= int(vocab_size)).nonzero()
        if outside.shape[0]:
            where = tuple(int(i) for i in outside[0])
            return kind, where, int(ids[where])
    return None


def check_batch_vocab(student_vocab_size: int, batch: Mapping[str, Any], *, teacher_vocab_size: int | None = None,
                      allow_padded_vocab: bool) -> None:
    """:func:`check_student_vocab` for a cache batch, naming the first id a smaller student cannot take.

    Equal sizes and a larger (padded) student are decided from the sizes alone. A student smaller than the
    teacher (``allow_padded_vocab=True``) passes when every id of the batch is below its vocabulary: the batch's
    ``largest_id`` (made on the CPU with the batch) settles it without reading device memory; a batch without
    one is scanned (one sync per id tensor on a device). No teacher vocabulary known: nothing is checked here
    (the loss range-checks its ids).

    Args:
        student_vocab_size: the student's output size (``logits.shape[-1]``).
        batch: a cache batch (``kdlib.make_loader`` / ``CacheDataset`` / ``read_batch``).
        teacher_vocab_size: the cache's vocabulary when the batch does not carry ``teacher_vocab_size``.
        allow_padded_vocab: accept a larger student, or a smaller one that holds every id of the batch.

    Raises:
        AlignmentError: the sizes differ in a way not allowed; for a smaller student, the first offending id
            (row, cache sequence, position, slot), its value and the student's size, and how to fix it.
    """
    teacher = teacher_vocab_size_of(batch, teacher_vocab_size)
    student = int(student_vocab_size)
    if teacher is None or student >= teacher or not allow_padded_vocab:
        check_student_vocab(student, teacher, allow_padded_vocab=allow_padded_vocab)
        return
    largest = largest_id_of(batch)
    if largest is not None and largest < student:
        return
    offending = first_id_outside(batch, student)  # error path (or a batch without largest_id): read the ids
    if offending is None:
        return  # a conservative largest_id (a collated copy of a batch-wide one): every id fits
    kind, where, value = offending
    sequences = batch.get("sample_indices")
    sequence = ""
    if sequences is not None and torch.as_tensor(sequences).dim() == 1:
        sequence = f" (cache sequence {int(torch.as_tensor(sequences)[where[0]])})"
    place = f"batch row {where[0]}{sequence}, position {where[1]}" + (f", slot {where[2]}" if len(where) > 2 else "")
    role = ("the student's embedding has no row for it" if kind == "input" else
            "the student cannot put probability on it, so that part of the teacher's target is lost")
    raise AlignmentError(
        f"the cache holds {kind} id {value} at {place}, not below the student's vocabulary of {student} (the "
        f"teacher's has {teacher}): {role}. allow_padded_vocab=True accepts a smaller student only when every "
        f"id of the cache is below its vocabulary. Fix: give the student the teacher's vocabulary "
        f"(model.resize_token_embeddings({teacher})), or use a student whose tokenizer has id {value}")


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
    largest = _ids_max(batch["input_ids"])  # [B, T]; with the id checks below, this batch's largest_id
    if "topk_ids" in batch:
        largest = max(largest, check_topk_ids_in_vocab(batch["topk_ids"], vocab_size))  # [B, T, K], on the CPU
    if "sample_ids" in batch:
        largest = max(largest, check_sample_ids_in_vocab(batch, vocab_size))
    layout = getattr(cache, "layout", None)
    if layout is not None and getattr(layout, "has_samples", False):
        batch["sample_temperature"] = torch.tensor(float(layout.sample_temperature), dtype=torch.float32)
    batch["labels"] = shift_labels(batch["input_ids"], ignore_index)  # [B, T]
    batch["sample_indices"] = torch.from_numpy(idx.copy())  # [B]
    batch["teacher_vocab_size"] = torch.tensor(vocab_size, dtype=torch.int64)
    batch["largest_id"] = torch.tensor(largest, dtype=torch.int64)
    manifest = getattr(cache, "manifest", None)
    if manifest and teacher_tail(manifest) == "none":  # imported, renormalized over k: tail="bucket" is refused
        batch["teacher_tail_missing"] = torch.tensor(True)
    return batch


def check_sample_ids_in_vocab(batch: Mapping[str, torch.Tensor], vocab_size: int, *, vocab_of: str = "teacher") -> int:
    """Sample ids of slots with a count must be < vocab (padding slots hold id 0 and are not looked at).

    Args:
        batch: a batch with ``sample_ids`` [B, T, W] (and ``sample_counts`` [B, T, W]).
        vocab_size: the vocabulary the ids must index.
        vocab_of: ``"teacher"`` or ``"student"``, as for :func:`check_topk_ids_in_vocab`.

    Returns:
        The largest sample id of a slot with a count (0 when every slot is padding, -1 for no slots).
    """
    return check_topk_ids_in_vocab(_counted_sample_ids(batch), vocab_size, vocab_of=vocab_of, what="sample")


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
