"""kdlib: read teacher-logit caches and train students with sparse knowledge distillation.

Public entry points (imported lazily so `import kdlib` stays cheap and optional extras stay optional):

* ``open_cache(path_or_url)``: a local (memory-mapped) or remote (HTTP) cache with ``read(start, stop)``.
* ``kd_loss`` / ``KDLoss`` / ``kd_loss_from_batch`` / ``kd_loss_from_hidden``: sparse-KD losses fused with CE,
  for top-k, sampled and hybrid caches through the same call.
* ``make_loader`` / ``CacheDataset`` / ``check_alignment``: the training-side data path.
* ``score_sequences``: per-sequence student-vs-teacher KL; subsets from it in ``kdlib.selection``.
* ``kd_step_loss(model, batch, **loss_kwargs)``: run the student on the batch's own tokens, return (loss, logits).
* ``CrossTokLoader`` / ``crosstok_loss``: a student with another tokenizer learns from the cache (``kdlib.crosstok``).
* ``PackedEnsemble`` / ``packed_step`` / ``packed_kd_loss`` / ``evaluate_ensemble``: M students trained in one
  vmapped step, and ensemble evaluation (``kdlib.ensemble``).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "open_cache": "kdlib.data.open",
    "LocalCache": "kdlib.data.cache",
    "CacheError": "cache_server.format",
    "kd_loss": "kdlib.losses",
    "KDLoss": "kdlib.losses",
    "KDLossOptions": "kdlib.losses",
    "kd_loss_from_batch": "kdlib.losses",
    "kd_loss_from_hidden": "kdlib.losses",
    "make_loader": "kdlib.loader",
    "CacheLoader": "kdlib.loader",
    "CacheDataset": "kdlib.dataset",
    "check_alignment": "kdlib.alignment",
    "AlignmentError": "kdlib.alignment",
    "RemoteCache": "kdlib.data.remote",
    "kd_step_loss": "kdlib.integrations.step",
    "distill_loss": "kdlib.integrations.step",
    "score_sequences": "kdlib.selection",
    "PackedEnsemble": "kdlib.ensemble",
    "packed_step": "kdlib.ensemble",
    "packed_kd_loss": "kdlib.ensemble",
    "evaluate_ensemble": "kdlib.ensemble",
    "CrossTokLoader": "kdlib.crosstok",
    "crosstok_loss": "kdlib.crosstok",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    module_name = _EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module 'kdlib' has no attribute {name!r}")
    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
