"""The statistical unbiasedness check shared by the sampled and hybrid loss tests.

Shape notation: R independent trials (one estimate per row), V vocabulary.

Over R independent draws for the same teacher and student, the mean of the estimator's gradient and value
must match the exact full-distribution forward-KL gradient ``(softmax(s/τ) − softmax(t/τ)) / τ`` and value
``KL(p_T^τ ‖ q^τ)``: every coordinate's z-score ``(mean − exact) / (std / √R)`` below 4 (a false alarm rate of
about 6e-5 per coordinate for a normal mean).
"""

from __future__ import annotations

import math

import torch

__all__ = ["z_scores", "exact_forward_kl", "assert_unbiased"]


def z_scores(samples: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    """[R, ...] independent estimates vs their exact expectation [...] -> z-score per coordinate [...]."""
    mean = samples.mean(0)
    std = samples.std(0).clamp_min(1e-12)
    return (mean - exact) / (std / math.sqrt(samples.shape[0]))


def exact_forward_kl(teacher: torch.Tensor, student: torch.Tensor, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(d KL / d z [V], KL value) of KL(softmax(teacher/τ) ‖ softmax(student/τ)) for one row [1, V] each."""
    p_teacher = torch.softmax(teacher / tau, dim=-1)[0]
    q_student = torch.softmax(student / tau, dim=-1)[0]
    grad = (q_student - p_teacher) / tau  # d/dz of soft-target CE (and forward KL) at τ
    return grad, (p_teacher * (p_teacher.log() - q_student.log())).sum()


def assert_unbiased(z: torch.Tensor, rows: torch.Tensor, teacher: torch.Tensor, student: torch.Tensor,
                    tau: float) -> None:
    """``rows`` [R] (one estimate per trial, already backpropagated into ``z.grad`` [R, V]) are unbiased."""
    exact_grad, exact_kl = exact_forward_kl(teacher, student, tau)
    z_grad = z_scores(z.grad, exact_grad)
    assert z_grad.abs().max() < 4, z_grad
    z_value = z_scores(rows.detach().unsqueeze(1), exact_kl)
    assert z_value.abs().max() < 4, (z_value, rows.mean(), exact_kl)
