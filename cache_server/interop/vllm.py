"""vLLM ``prompt_logprobs`` dumps (JSON lines): read for ``kdcache import --from vllm-prompt-logprobs``.

One JSON object per line, either a ``RequestOutput`` written out (``{"prompt_token_ids": [...],
"prompt_logprobs": [...]}``) or an OpenAI-compatible completions response of ``vllm serve`` with
``"prompt_logprobs": k`` (the same two fields inside ``choices[0]``; ``prompt_token_ids`` there with
``"return_token_ids": true``). ``prompt_logprobs`` has one entry per prompt token: ``null`` for the first
(nothing precedes it), then a dict token id -> ``{"logprob", "rank", "decoded_token"}`` (vLLM's ``Logprob``;
a bare number is accepted too) holding the top-k AND the prompt token itself, whatever its rank (vllm
``RequestOutput.prompt_logprobs: list[dict[int, Logprob] | None]``; ids are JSON object keys, i.e. strings).

Entry i is the distribution over token i given tokens[0..i-1], so kdcache position t (token t+1) takes entry
t+1, and the last position has no data (filled, ``positions.py``). The K largest entries of a position are
kept (K: ``--topk``, default the smallest entry count of the first line); the prompt token when it is not
among them is dropped, as DistillKit does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from cache_server.interop.positions import SourceRow
from cache_server.interop.source import Source
from cache_server.interop.tables import InteropError, source_files

__all__ = ["VllmSource", "open_vllm", "parse_record"]


def _fields(record: Any, where: str) -> tuple[list[int], list]:
    if isinstance(record, dict) and "choices" in record and "prompt_logprobs" not in record:
        choices = record["choices"]
        if not isinstance(choices, list) or len(choices) != 1:
            raise InteropError(f"{where}: a completions response needs exactly one choice per line")
        record = {**{k: v for k, v in record.items() if k != "choices"}, **choices[0]}
    if not isinstance(record, dict) or "prompt_logprobs" not in record:
        raise InteropError(f"{where}: no 'prompt_logprobs' (request them with SamplingParams(prompt_logprobs=k) "
                           "or the server's \"prompt_logprobs\": k)")
    tokens, entries = record.get("prompt_token_ids"), record["prompt_logprobs"]
    if not isinstance(tokens, list) or not isinstance(entries, list) or len(tokens) != len(entries):
        raise InteropError(f"{where}: needs 'prompt_token_ids' (a list; the server returns it with "
                           "\"return_token_ids\": true) with one prompt_logprobs entry per token, got "
                           f"{type(tokens).__name__} and {len(entries) if isinstance(entries, list) else entries!r}")
    return tokens, entries


def _entry_logprob(value: Any, where: str) -> float:
    if isinstance(value, dict):
        value = value.get("logprob")
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise InteropError(f"{where}: a log-prob must be a number or {{\"logprob\": number, ...}}, got {value!r}")
    return float(value)


def parse_record(record: Any, K: int | None, where: str) -> SourceRow:
    """One dump line's object as a row in kdcache's convention (module docstring); K None: all entries kept
    (the smallest count then decides K for the import)."""
    tokens, entries = _fields(record, where)
    L = len(tokens)
    counts = [len(e) for e in entries[1:] if e]
    width = K if K is not None else (min(counts) if counts else 1)
    ids = np.zeros((L, width), dtype=np.int64)
    lp = np.full((L, width), -np.inf, dtype=np.float32)
    valid = np.zeros(L, dtype=bool)
    for i in range(1, L):
        entry = entries[i]
        if not entry:
            continue
        if not isinstance(entry, dict):
            raise InteropError(f"{where}: prompt_logprobs[{i}] must be an object token id -> log-prob")
        pairs = sorted(((_entry_logprob(v, where), int(k)) for k, v in entry.items()), key=lambda p: (-p[0], p[1]))
        top = pairs[:width]
        ids[i - 1, : len(top)] = [p[1] for p in top]
        lp[i - 1, : len(top)] = [p[0] for p in top]
        valid[i - 1] = True
    return SourceRow(np.asarray(tokens, dtype=np.int64), ids, lp, valid)


class VllmSource(Source):
    """A vLLM prompt-logprobs JSON-lines dump (one or more ``.jsonl`` files)."""

    topk: int | None = None

    def rows(self) -> Iterator[SourceRow]:
        for path in self.files:
            with open(path, encoding="utf-8") as fh:
                for number, line in enumerate(fh, start=1):
                    if not line.strip():
                        continue
                    where = f"{path}:{number}"
                    try:
                        record = json.loads(line)
                    except ValueError as exc:
                        raise InteropError(f"{where} is not JSON ({exc})") from exc
                    yield parse_record(record, self.topk, where)


def open_vllm(src: str | Path, topk: int | None = None) -> VllmSource:
    """Open a prompt-logprobs dump; K is ``topk`` or the smallest entry count of the first line."""
    files = source_files(src, (".jsonl", ".json"))
    source = VllmSource(
        kind="vllm-prompt-logprobs", path=Path(src), files=files,
        provenance={"lacks": "no full-vocabulary logsumexp: vLLM's prompt log-probs are normalized over the full "
                             "vocabulary (logprobs_mode raw_logprobs, its default), so the tail is what they imply; "
                             "no data for the last position of a prompt (filled); vLLM returns none for "
                             "prefix-cached blocks (capture with prefix caching off)"},
        shift_fix={-1: "The dump's prompt_token_ids do not match its prompt_logprobs (each entry i must hold "
                       "token i): was a BOS token added or dropped between the two?"})
    if topk is None:
        for row in source.rows():
            topk = row.ids.shape[1]
            break
    source.topk = topk
    return source
