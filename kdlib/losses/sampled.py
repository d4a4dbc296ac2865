"""Sampled knowledge distillation: an unbiased forward-KL / soft-target CE loss from teacher samples.

Shape notation:
    N: rows (flattened positions), V: vocabulary, S: stored sample slots per row, D: draws per row.

:func:`sampled_kd_loss` / :func:`sampled_kd_loss_reference` are :func:`kdlib.kd_loss` /
:func:`kdlib.losses.kd_loss_reference` called with sampled targets only (``sample_ids`` and ``sample_counts``
positional), kept as the names the first sampled-KD step exported. Inputs:

    student_logits   [..., V]  z, fp32/bf16/fp16/fp64 (math in fp32, fp64 for fp64)
    sample_ids       [..., S]  ids drawn from the teacher, any integer dtype; slots with count 0 are padding
                               (their id is ignored, it may even be out of range)
    sample_counts    [..., S]  c_j ≥ 0, integer: how often id_j came up in D = Σ_j c_j i.i.d. draws from
                               p_T^τs = softmax(teacher_logits / τs); D may differ per row
    sample_logprobs  [..., S]  optional ℓ_j = log p_T(id_j) at τ = 1, exact (fp16/bf16/fp32)
    teacher_lse      [...]     L = logsumexp(teacher_logits)             (cache key ``lse``)
    teacher_lse_sample_temperature [...]  L_τs = logsumexp(teacher_logits / τs)
    teacher_lse_at_temperature     [...]  L_τ  = logsumexp(teacher_logits / τ)
    labels           [...]     for CE and ignore_index

Estimator (per row; u = z/τ, log q^τ = log_softmax(u); :mod:`kdlib.losses.targets` derives it together with
the hybrid one). The soft-target cross-entropy at the loss temperature τ, C = E_{y~p_T^τ}[−log q^τ(y)], is
estimated by

    Ĉ = Σ_j a_j · (−log q^τ(id_j)),     a_j = (c_j / D) · w_j

    τs == τ:  w_j = 1 (no teacher values needed).  E[c_j/D] = p_T^τ(id_j): unbiased.
    τs != τ:  plain importance sampling, w_j = p_T^τ(id_j) / p_T^τs(id_j)
              = exp((ℓ_j + L)/τ − L_τ − (ℓ_j + L)/τs + L_τs)   (needs ℓ, L, L_τ, L_τs)
              E[Σ_j (c_j/D) w_j f(id_j)] = Σ_y p^τs(y) (p^τ(y)/p^τs(y)) f(y) = E_{p^τ}[f]: unbiased
              (Σ_j a_j is 1 only in expectation). Self-normalized IS (a_j / Σ a_j) would need no lse but is
              biased at finite D; it is not what this module implements.

Forward KL = C − H(p_T^τ). Without ``sample_logprobs`` D_r = Ĉ (the teacher entropy is a constant w.r.t. the
student: same gradient, value offset by H). With them D_r = Ĉ + Σ_j a_j log p_T^τ(id_j), whose second term
is an unbiased estimate of −H, so D_r is an unbiased estimate of KL(p_T^τ ‖ q^τ) (it can be < 0 for one
draw). reverse_kl, jsd and tvd need the student's value at the teacher's density at points the student
picks (or a non-linear function of p_T), which samples from the teacher cannot estimate without bias: they
raise ``ValueError``.

Loss (same conventions as :func:`kdlib.kd_loss`): L = ce_weight · mean_valid CE(z, labels) + kd_weight ·
(τ² if tau_squared) · mean_valid D_r; reduction ``mean`` (over valid rows, 0.0 when none), ``sum`` or ``none``
([...], 0 on ignored rows). A valid row whose counts sum to 0 raises.

Gradient (closed form, :mod:`kdlib.losses.weighted`), with A = Σ_j a_j: dD_r/dz = (A · softmax(z/τ) −
Σ_j a_j e_{id_j}) / τ. Since a_j does not depend on z, E[dD_r/dz] = (softmax(z/τ) − p_T^τ)/τ, the exact
full-distribution gradient of soft-target CE (and of forward KL): tests/test_losses_sampled.py checks it
statistically. Duplicate ids in a row are allowed: the estimator is a sum over slots.
"""

from __future__ import annotations

from .api import kd_loss
from .options import SAMPLED_DIVERGENCES
from .reference import kd_loss_reference

__all__ = ["sampled_kd_loss", "sampled_kd_loss_reference", "UNBIASED_DIVERGENCES"]

UNBIASED_DIVERGENCES = SAMPLED_DIVERGENCES
# the target tensors of the keyword arguments (the rest are loss options)
_TARGETS = ("labels", "sample_logprobs", "teacher_lse_sample_temperature", "sample_temperature", "teacher_lse",
            "teacher_lse_at_temperature")


def _call(entry_point, arguments: dict):
    """``entry_point(student_logits, sample_ids=, sample_counts=, <targets>, <options>)`` from ``locals()``."""
    arguments = dict(arguments)
    positional = {key: arguments.pop(key) for key in ("student_logits", "sample_ids", "sample_counts")}
    targets = {key: arguments.pop(key) for key in _TARGETS}
    return entry_point(positional["student_logits"], sample_ids=positional["sample_ids"],
                       sample_counts=positional["sample_counts"], **targets, **arguments)


def sampled_kd_loss_reference(student_logits, sample_ids, sample_counts, *, labels=None, sample_logprobs=None,
                              teacher_lse_sample_temperature=None, sample_temperature=1.0, temperature=1.0,
                              ce_weight=0.0, kd_weight=1.0, ignore_index=-100, tau_squared=True, reduction="mean",
                              teacher_lse=None, teacher_lse_at_temperature=None, divergence="forward_kl"):
    """Naive sampled-KD loss (full log_softmax, autograd); the definition :func:`sampled_kd_loss` is tested on.

    Args: see the module docstring (shapes, the estimator, which teacher tensors each temperature needs).

    Returns:
        Scalar loss (fp32, fp64 for fp64 logits), or [...] per position with ``reduction="none"``.
    """
    return _call(kd_loss_reference, locals())


def sampled_kd_loss(student_logits, sample_ids, sample_counts, *, labels=None, sample_logprobs=None,
                    teacher_lse_sample_temperature=None, sample_temperature=1.0, temperature=1.0, ce_weight=0.0,
                    kd_weight=1.0, ignore_index=-100, tau_squared=True, reduction="mean", teacher_lse=None,
                    teacher_lse_at_temperature=None, divergence="forward_kl"):
    """Fused sampled-KD loss: same arguments and value as :func:`sampled_kd_loss_reference`.

    Reads [N, V] once forward and writes the gradient (in the logits' dtype) once backward (the backend of
    :func:`kdlib.kd_loss`: PyTorch on CPU, Triton on CUDA); saves only [N] and [N, S] tensors besides the
    logits.
    """
    return _call(kd_loss, locals())
