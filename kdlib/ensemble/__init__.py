"""Many students from one cache: packed ensembles trained in one step, and ensemble evaluation.

* :class:`PackedEnsemble`: M same-architecture members with stacked parameters, run under ``torch.func.vmap``;
  :func:`packed_step` / :func:`packed_kd_loss`: their fused KD step with per-member reduction, weights and
  gradient clipping.
* :func:`evaluate_ensemble`: probability-averaged loss, each member's loss and expected calibration error in
  one no-grad pass.
"""

from .evaluate import EnsembleEvaluation, CalibrationBins, evaluate_ensemble, expected_calibration_error
from .packed import (PER_MEMBER_OPTIMIZERS, PackedEnsemble, UnsupportedModuleError, check_per_member_optimizer,
                     clip_grad_norm_per_member, member_mean, packed_kd_loss, packed_step)

__all__ = ["PackedEnsemble", "UnsupportedModuleError", "packed_kd_loss", "packed_step", "member_mean",
           "clip_grad_norm_per_member", "check_per_member_optimizer", "PER_MEMBER_OPTIMIZERS",
           "evaluate_ensemble", "EnsembleEvaluation", "expected_calibration_error", "CalibrationBins"]
