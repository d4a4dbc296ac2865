"""Cross-tokenizer distillation from one cache: a student with another tokenizer learns from the cached teacher.

Modules (docs/CROSSTOK.md is the guide):
    vocab_map   teacher id → student id by token string, cached on disk.
    spans       token streams with UTF-8 byte spans (``cache_server/format/offsets.py``), document checks,
                the teacher's spans of a cache built without ``--record-offsets``.
    align       a student row per cache sequence and its alignment (EXACT / ULD / NONE) by byte boundaries.
    loss        ``crosstok_loss``: exact-id KD + ULD + CE (settings, checks, teacher rows); ``fused.py`` its pass
                with closed-form gradients; ``reference.py`` its naive twin.
    loader      ``CrossTokLoader``: student batches over ``kdlib.CacheLoader`` (same order and resume).
"""

from __future__ import annotations

from .align import EXACT, NONE, ULD, align_sequence
from .loader import CrossTokLoader
from .loss import crosstok_loss, crosstok_loss_from_batch
from .reference import crosstok_loss_reference
from .spans import TokenStream, check_documents, encode_stream, teacher_offsets
from .vocab_map import build_vocab_map, vocab_map

__all__ = ["EXACT", "NONE", "ULD", "align_sequence", "CrossTokLoader", "crosstok_loss", "crosstok_loss_from_batch",
           "crosstok_loss_reference", "TokenStream", "check_documents", "encode_stream", "teacher_offsets",
           "build_vocab_map", "vocab_map"]
