"""axolotl's KD datasets (``axolotl.integrations.kd``): read for ``kdcache import --from axolotl``.

Columns (axolotl-ai-cloud/axolotl ``src/axolotl/integrations/kd/chat_template.py``, ``collator.py``,
``trainer.py``): ``input_ids`` [L], ``target_token_ids`` [L, K], ``target_logprobs`` [L, K] (log-probs
RENORMALIZED over the K ids, re-tempered to ``kd_temperature``), ``target_mask`` [L, K] (0 where the label is
-100 or the row is padding; padding rows hold ids 0..K-1 with log-prob -inf), plus ``labels`` and
``attention_mask`` which the import does not need.

Alignment: axolotl has had two conventions, and this is the off-by-one its users report.

* ``next`` (default): target row t is the distribution over token t+1, kdcache's own convention. It is what
  the current KD trainer computes its loss with (hidden state t against target row t, labels shifted by one:
  ``kernels/liger.py``) and what the online-teacher collator writes (vLLM ``prompt_logprobs[t+1]`` at row t,
  ``collator_online_teacher.py``).
* ``current``: target row t is the distribution over token t itself; row 0 is padding. The dataset strategy
  left-pads the logprobs to the input length (``chat_template.py``: "we shift for causal models in the
  trainer"), and the trainer before #3661 paired ``logits[:, :-1]`` with ``targets[:, 1:]``.

The import checks by content which one the data follows (``alignment.py``) and refuses a mismatch. Rows with
no finite log-prob (axolotl's padding rows) have no teacher data and are filled (``positions.py``); masked
rows that do hold log-probs (prompt positions) are kept: a kdcache cache has no mask.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np

from cache_server.interop.positions import SourceRow
from cache_server.interop.source import Source
from cache_server.interop.tables import iter_batches, list_rows, nested_rows, source_files

__all__ = ["AXOLOTL_COLUMNS", "ALIGNMENTS", "AxolotlSource", "open_axolotl"]

AXOLOTL_COLUMNS = ("input_ids", "target_token_ids", "target_logprobs", "target_mask")
ALIGNMENTS = {"next": 0, "current": 1}  # --alignment -> source rows ahead of kdcache position t


class AxolotlSource(Source):
    """An axolotl KD dataset (Parquet file(s) or a ``datasets.save_to_disk`` directory)."""

    offset: int = 0

    def rows(self) -> Iterator[SourceRow]:
        columns = ["input_ids", "target_token_ids", "target_logprobs"]
        for batch in iter_batches(self.files, columns):
            tokens = list_rows(batch.column("input_ids"), "input_ids")
            ids = nested_rows(batch.column("target_token_ids"), "target_token_ids")
            logprobs = nested_rows(batch.column("target_logprobs"), "target_logprobs")
            for x, i, lp in zip(tokens, ids, logprobs):
                yield self._row(x, i, lp)

    def _row(self, x: np.ndarray, ids: np.ndarray, logprobs: np.ndarray) -> SourceRow:
        L = x.shape[0]
        if ids.shape != logprobs.shape or ids.shape[0] != L:
            raise ValueError(f"an axolotl row has {L} input_ids but target_token_ids {ids.shape} and "
                             f"target_logprobs {logprobs.shape}: each needs one row of K entries per token")
        o, K = self.offset, ids.shape[1]
        out_ids = np.zeros((L, K), dtype=np.int64)
        out_lp = np.full((L, K), -np.inf, dtype=np.float32)
        out_ids[: L - o] = ids[o:]
        out_lp[: L - o] = logprobs[o:]
        valid = np.isfinite(out_lp).any(axis=1)
        valid[L - o:] = False
        return SourceRow(x.astype(np.int64), out_ids, out_lp, valid)


def open_axolotl(src: str | Path, alignment: str = "next") -> AxolotlSource:
    """Open an axolotl KD dataset; ``alignment`` is ``next`` or ``current`` (module docstring)."""
    if alignment not in ALIGNMENTS:
        raise ValueError(f"--alignment must be one of {sorted(ALIGNMENTS)} for axolotl data, got {alignment!r}")
    files = source_files(src, (".parquet", ".arrow"))
    source = AxolotlSource(
        kind="axolotl", path=Path(src), files=files,
        provenance={"alignment": alignment,
                    "lacks": "no full-vocabulary logsumexp; axolotl renormalizes the top-k log-probs over the "
                             "k ids (no tail mass) and re-tempers them to kd_temperature at preprocessing"},
        shift_fix=({-1: "This is axolotl's dataset-strategy convention: pass --alignment current."}
                   if alignment == "next" else
                   {1: "The data follows axolotl's trainer convention: pass --alignment next (the default)."}))
    source.offset = ALIGNMENTS[alignment]
    return source
