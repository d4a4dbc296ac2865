"""Every setting of the sparse-KD losses in one frozen object: its defaults and all of its validation.

:func:`kdlib.kd_loss`, :func:`kdlib.kd_loss_from_batch`, :func:`kdlib.kd_loss_from_hidden`,
:func:`kdlib.losses.kd_loss_reference` and :class:`kdlib.KDLoss` take the settings either as keyword
arguments or as ``options=KDLossOptions(...)``; keyword arguments given together with ``options=`` replace
those fields of it. As keywords each entry point accepts only the settings it uses
(:data:`ENTRY_POINT_OPTIONS`: a misspelt or misplaced one is a TypeError, as for any function); an options
object may carry all of them, so one object can serve every entry point.

Example:
    >>> options = KDLossOptions(ce_weight=0.5, temperature=2.0, divergence="jsd", beta=0.3)
    >>> loss = kdlib.kd_loss(logits, topk_ids, topk_logprobs, labels=labels, teacher_lse=lse,
    ...                      teacher_lse_at_temperature=lse_t2, options=options)
    >>> loss = kdlib.kd_loss_from_batch(logits, batch, options=options, tail="renormalize")  # one field replaced
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

from .sparse_math import DIVERGENCES, TAILS, effective_divergence

__all__ = ["KDLossOptions", "resolve_options", "check_for_targets", "check_for_teacher_tail", "ENTRY_POINT_OPTIONS",
           "REDUCTIONS", "BACKENDS", "TARGET_KINDS", "SAMPLED_DIVERGENCES"]

REDUCTIONS = ("mean", "sum", "none")
BACKENDS = ("auto", "torch", "triton", "reference")
# What a cache holds per position (issue 10): the exact top-k, sampled ids with counts, or an exact head plus
# samples from the rest. The loss picks the kind from the tensors it is given (kdlib.losses.targets).
TARGET_KINDS = ("topk", "sample", "hybrid")
# Divergences with an unbiased estimator from teacher samples (the others raise for sample / hybrid targets).
SAMPLED_DIVERGENCES = ("forward_kl",)


@dataclasses.dataclass(frozen=True, kw_only=True)
class KDLossOptions:
    """The settings of a sparse-KD loss, validated on construction (ValueError saying what is wrong).

    The loss is ``ce_weight · CE(z, labels) + kd_weight · (τ² if tau_squared) · D`` over valid positions;
    docs/LOSSES.md defines D for every divergence × tail.

    Attributes:
        ce_weight: weight of cross-entropy at τ = 1 (needs labels); >= 0.
        kd_weight: weight of the distillation term; >= 0.
        temperature: τ applied to student and teacher in D (not in CE); finite, > 0.
        divergence: ``forward_kl`` | ``reverse_kl`` | ``jsd`` | ``tvd``.
        tail: ``bucket`` (exact, default) | ``renormalize`` | ``none``. Top-k targets only: sample and hybrid
            targets estimate the full-vocabulary teacher without bias, so the tail setting is ignored there.
        tau_squared: multiply D by τ² (Hinton); False matches Megatron/TRL.
        ignore_index: label value of positions that count in neither term.
        beta: JSD weight of the teacher in the mixture, in [0, 1] (0 = forward KL, 1 = reverse KL).
        reduction: ``mean`` over valid positions (0.0 when none) | ``sum`` | ``none`` (per position, 0 at
            ignored ones; not for :func:`kdlib.kd_loss_from_hidden`).
        backend: ``auto`` (Triton on CUDA, PyTorch otherwise) | ``torch`` | ``triton`` | ``reference``
            (the naive :func:`kdlib.losses.kd_loss_reference`; not for :func:`kdlib.kd_loss_from_hidden`).
        validate: range-check ``topk_ids`` and ``labels`` against [0, V) with a clear error. It reads the
            data, i.e. one host-device synchronization per call on CUDA; False skips it for a hot loop whose
            inputs are known good (shapes and dtypes are still checked). The reference always checks.
        chunk_rows: rows per chunk of the PyTorch pass; None: ``torch_pass.CHUNK_ELEMENTS`` (2^23) elements
            per chunk, 32 MB of fp32 temporaries (each op on a chunk is one OpenMP barrier, and thousands of
            small chunks made the loss several times slower than CE on a busy CPU).
        chunk_size: rows per chunk of :func:`kdlib.kd_loss_from_hidden` (its memory ∝ chunk_size × V).
        allow_padded_vocab: :func:`kdlib.kd_loss_from_batch` accepts a student vocabulary larger than the
            cache's teacher's (an embedding padded to a multiple of 64), or smaller than it when every id of
            the batch is below the student's vocabulary (a teacher embedding padded beyond the student's).
    """

    ce_weight: float = 0.0
    kd_weight: float = 1.0
    temperature: float = 1.0
    divergence: str = "forward_kl"
    tail: str = "bucket"
    tau_squared: bool = True
    ignore_index: int = -100
    beta: float = 0.5
    reduction: str = "mean"
    backend: str = "auto"
    validate: bool = True
    chunk_rows: int | None = None
    chunk_size: int = 1024
    allow_padded_vocab: bool = False

    def __post_init__(self) -> None:
        if self.divergence not in DIVERGENCES:
            raise ValueError(f"unknown divergence {self.divergence!r}; choose one of {DIVERGENCES}")
        if self.tail not in TAILS:
            raise ValueError(f"unknown tail {self.tail!r}; choose one of {TAILS}")
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"unknown reduction {self.reduction!r}; choose one of {REDUCTIONS}")
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
                and self.temperature > 0):
            raise ValueError(f"temperature must be a finite number > 0, got {self.temperature!r}")
        if not 0.0 <= float(self.beta) <= 1.0:
            raise ValueError(f"beta must be in [0, 1] (0 = forward KL, 1 = reverse KL), got {self.beta!r}")
        if self.ce_weight < 0 or self.kd_weight < 0:
            raise ValueError(f"ce_weight and kd_weight must be >= 0, got {self.ce_weight}, {self.kd_weight}")
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown backend {self.backend!r}; choose one of {BACKENDS}")
        if self.chunk_rows is not None and self.chunk_rows < 1:
            raise ValueError(f"chunk_rows must be >= 1 (or None for 2^23 elements per chunk), got {self.chunk_rows}")
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}")

    @property
    def effective_divergence(self) -> str:
        """The divergence actually computed: ``jsd`` at beta 0 / 1 is forward / reverse KL."""
        return effective_divergence(self.divergence, float(self.beta))

    @property
    def kd_scale(self) -> float:
        """kd_weight times tau^2 when ``tau_squared``."""
        return float(self.kd_weight) * (self.temperature**2 if self.tau_squared else 1.0)

    @property
    def needs_teacher_lse(self) -> bool:
        """Whether D needs the teacher's full-vocabulary logsumexp at τ (``bucket``/``none`` at τ ≠ 1)."""
        return self.temperature != 1.0 and self.tail in ("bucket", "none") and self.kd_weight > 0

    def non_defaults(self) -> dict[str, Any]:
        """The fields that differ from their defaults, in declaration order (for reprs and logs)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if getattr(self, f.name) != f.default}


_LOSS_MATH = frozenset({"ce_weight", "kd_weight", "temperature", "divergence", "tail", "tau_squared",
                        "ignore_index", "beta", "reduction"})
_FUSED_PASS = frozenset({"backend", "validate", "chunk_rows"})
# The options each entry point accepts as keyword arguments (what it uses).
ENTRY_POINT_OPTIONS: dict[str, frozenset[str]] = {
    "kd_loss_reference": _LOSS_MATH,
    "kd_loss": _LOSS_MATH | _FUSED_PASS,
    "kd_loss_from_batch": _LOSS_MATH | _FUSED_PASS | {"allow_padded_vocab"},
    "kd_loss_from_hidden": _LOSS_MATH | _FUSED_PASS | {"chunk_size"},
    "KDLoss": frozenset(f.name for f in dataclasses.fields(KDLossOptions)),
}


def _check_for_entry_point(options: KDLossOptions, entry_point: str) -> None:
    """The settings an entry point cannot honour, whichever way they were given."""
    if entry_point != "kd_loss_from_hidden":
        return
    if options.reduction == "none":
        raise ValueError("kd_loss_from_hidden supports reduction='mean' or 'sum' (gradients are computed in the "
                         "forward); use kd_loss on materialized logits for per-position losses")
    if options.backend == "reference":
        raise ValueError(f"backend must be 'auto', 'torch' or 'triton' for kd_loss_from_hidden, got "
                         f"{options.backend!r}")


def check_for_targets(options: KDLossOptions, kind: str) -> None:
    """The settings a target kind cannot honour (:data:`TARGET_KINDS`; called once per loss call).

    Sample and hybrid targets estimate soft-target CE / forward KL without bias; reverse KL, JSD and TVD need
    the teacher's density at points the student picks (or a non-linear function of it), which teacher samples
    cannot estimate without bias, so they raise. ``jsd`` with beta 0 is forward KL and passes.
    """
    if kind not in TARGET_KINDS:
        raise ValueError(f"unknown target kind {kind!r}; choose one of {TARGET_KINDS}")
    if kind == "topk" or options.effective_divergence in SAMPLED_DIVERGENCES:
        return
    raise ValueError(
        f"divergence {options.divergence!r} has no unbiased estimator from teacher samples ({kind} targets): it "
        f"needs the teacher's density at points the student picks, or a non-linear function of it; use "
        f"divergence='forward_kl' with sampled targets, or a top-k cache for {options.divergence!r}")


def check_for_teacher_tail(options: KDLossOptions, kind: str, tail_missing: bool) -> None:
    """Refuse ``tail="bucket"`` on a cache that knows no tail mass (``tail_missing``: the batch carries
    ``teacher_tail_missing``, set for a cache imported from a source renormalized over its k ids, e.g. axolotl).

    The bucket term needs the teacher's mass outside the stored ids; such a cache stores 0 there, which would
    silently drop the term. ``renormalize`` and ``none`` need no tail and pass; so do sample/hybrid targets.
    """
    if tail_missing and kind == "topk" and options.tail == "bucket" and options.kd_weight > 0:
        raise ValueError(
            "tail='bucket' needs the teacher's probability mass outside the cached top-k, but this cache was "
            "imported from a source that renormalized its log-probs over the k ids (its manifest's "
            "provenance.tail is 'none'), so that mass is unknown; use tail='renormalize' (or tail='none')")


def resolve_options(options: KDLossOptions | None, overrides: Mapping[str, Any], *,
                    entry_point: str) -> KDLossOptions:
    """``options`` (default: every default) with the keyword arguments ``overrides`` replacing its fields.

    Args:
        options: a :class:`KDLossOptions`, or None.
        overrides: option keyword arguments given to ``entry_point``.
        entry_point: the public function or class called (a key of :data:`ENTRY_POINT_OPTIONS`).

    Raises:
        TypeError: a keyword ``entry_point`` does not take, or ``options`` of another type.
        ValueError: an invalid value (see :class:`KDLossOptions`) or one ``entry_point`` cannot honour.
    """
    accepted = ENTRY_POINT_OPTIONS[entry_point]
    unknown = sorted(set(overrides) - accepted)
    if unknown:
        raise TypeError(f"{entry_point}() got unexpected keyword argument(s) {', '.join(map(repr, unknown))}; "
                        f"its options are {', '.join(sorted(accepted))}")
    if options is None:
        resolved = KDLossOptions(**overrides)
    elif not isinstance(options, KDLossOptions):
        raise TypeError(f"options must be a kdlib.losses.KDLossOptions, got {type(options).__name__}")
    else:
        resolved = dataclasses.replace(options, **overrides) if overrides else options
    _check_for_entry_point(resolved, entry_point)
    return resolved
