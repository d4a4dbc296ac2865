"""Several teachers as one: the weighted mixture of their probabilities, computed on the device.

``kdcache build --teacher A --teacher B [--teacher-weights 0.7,0.3]`` stores, per position, the targets of

    p_mix(i) = sum_m w_m softmax(z_m)(i)                       (w_m > 0, normalised to sum 1)

computed from every teacher's full logits. Its log-probabilities

    log p_mix = logsumexp_m (log w_m + log_softmax(z_m))       (fp32, one teacher after another)

are valid "logits" of the mixture (their logsumexp is 0), so :func:`compute_targets` takes them unchanged: the
top-k, the tail mass, the entropy and the NLL of the stored cache are those of the exact mixture. ``lse`` of a
mixture cache is therefore 0 up to fp32 rounding, and an extra temperature tau stores
``lse_t{tau} = logsumexp(log p_mix / tau)``: the loss's tempered teacher is the MIXTURE sharpened,
``p_mix^(1/tau) / sum p_mix^(1/tau)``, not the mixture of tempered teachers (docs/FORMAT.md, "Multi-teacher").

Teachers must share the vocabulary. Logit widths may differ only by padding (an embedding padded past the
tokenizer's tokens): the cache's vocabulary is then the widest, and a narrower teacher gives its padding ids
probability 0, which requires a known tokenizer that the narrowest teacher covers.

Shape notation::

    M  teachers            B  sequences per forward batch      T  sequence length
    V  the mixture's vocabulary (the widest teacher)           V_m  teacher m's logit width
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from cache_server.build.options import BuildInputError, check_seq_len
from cache_server.build.teacher import TeacherError, TeacherInfo, forward_logits, inspect_teacher, load_teacher

__all__ = [
    "MixtureInfo",
    "TeacherMixture",
    "normalize_weights",
    "shared_vocab_size",
    "inspect_teachers",
    "load_teachers",
    "check_positions",
    "teacher_paths",
]


def teacher_paths(teacher: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """``--teacher`` as a list of paths (one path, or the repeated option's values)."""
    if isinstance(teacher, (str, os.PathLike)):
        return [os.fspath(teacher)]
    return [os.fspath(t) for t in teacher]


def normalize_weights(weights: Sequence[float] | None, count: int, option: str = "--teacher-weights",
                      per: str = "--teacher") -> tuple[float, ...]:
    """One positive weight per teacher, normalised to sum 1 (``None``: equal weights).

    Args:
        weights: the weights as given, or None.
        count: the number of teachers (or caches).
        option / per: the option names the messages use (``--weights`` / ``CACHE`` for ``kdcache merge``).

    Raises:
        BuildInputError: a count that is not one per teacher, or a weight that is not positive and finite.
    """
    if weights is None or len(weights) == 0:
        return tuple(1.0 / count for _ in range(count))
    if count == 1:
        raise BuildInputError(f"{option} needs several {per} (one weight each); drop it for a single one")
    if len(weights) != count:
        raise BuildInputError(f"{option} has {len(weights)} weights for {count} {per}; give one weight per "
                              f"{per}, in the same order (e.g. {option} {','.join(['1'] * count)})")
    for w in weights:
        if not (isinstance(w, (int, float)) and math.isfinite(w) and w > 0):
            raise BuildInputError(f"{option} must be positive finite numbers, got {w!r}; one with weight 0 "
                                  "contributes nothing: leave it out instead")
    total = math.fsum(float(w) for w in weights)
    return tuple(float(w) / total for w in weights)


def shared_vocab_size(members: Sequence[TeacherInfo], tokenizer_vocab: int | None) -> int:
    """The vocabulary of a mixture: the teachers' common logit width, or the widest when the others are
    padded beyond ``tokenizer_vocab`` real tokens.

    Raises:
        TeacherError: widths that differ by more than padding, naming both teachers and sizes.
    """
    sizes = [int(m.vocab_size) for m in members]
    narrow = min(range(len(sizes)), key=sizes.__getitem__)
    wide = max(range(len(sizes)), key=sizes.__getitem__)
    if sizes[narrow] == sizes[wide]:
        return sizes[wide]
    if tokenizer_vocab is not None and sizes[narrow] >= tokenizer_vocab:
        return sizes[wide]  # padding only: the narrower teachers give ids >= their width probability 0
    known = (f"the tokenizer has {tokenizer_vocab} tokens, more than the narrower teacher's {sizes[narrow]}"
             if tokenizer_vocab is not None else "no tokenizer is known to show that the extra ids are padding "
             "(pass --tokenizer DIR)")
    raise TeacherError(
        f"the teachers of a mixture must share the vocabulary: {members[narrow].path} has {sizes[narrow]} logits "
        f"per position, {members[wide].path} has {sizes[wide]}; widths may differ only by embedding padding "
        f"past the tokenizer's tokens, but {known}. Mix teachers that use the same tokenizer"
    )


@dataclass
class MixtureInfo:
    """Several teachers and their normalised weights: what the build needs to know before loading them.

    Has the attributes of :class:`TeacherInfo` that a build reads (``path`` is the first teacher's, for its
    tokenizer; ``vocab_size`` is the shared vocabulary once every teacher's is known).
    """

    members: list[TeacherInfo]
    weights: tuple[float, ...]
    tokenizer_vocab: int | None = None  # the tokenizer's size, set by the build once it is known

    @property
    def path(self) -> str:
        return self.members[0].path

    @property
    def vocab_size(self) -> int | None:
        if any(m.vocab_size is None for m in self.members):
            return None
        return shared_vocab_size(self.members, self.tokenizer_vocab)

    @property
    def narrowest_vocab_size(self) -> int:
        """The smallest logit width of the teachers (every token id must be below it)."""
        return min(int(m.vocab_size) for m in self.members)

    def identity(self) -> dict[str, Any]:
        """What pins the mixture (a resume compares it): every teacher's identity and weight, in order."""
        members = [{**m.identity(), "weight": w} for m, w in zip(self.members, self.weights)]
        return {"kind": "mixture", "members": members}

    def manifest_entry(self, dtype: str) -> dict[str, Any]:
        """The manifest's ``teacher`` object of a mixture (each teacher is in ``teachers``)."""
        names = ", ".join(Path(m.path).name for m in self.members)
        return {"name": f"mixture of {len(self.members)} teachers ({names})", "kind": "mixture",
                "architecture": "mixture", "dtype": dtype, "vocab_size": self.vocab_size,
                "weights": list(self.weights)}

    def teachers_entry(self, dtype: str) -> list[dict[str, Any]]:
        """The manifest's ``teachers`` list: each teacher's own manifest entry plus its weight."""
        return [{**m.manifest_entry(dtype), "weight": w} for m, w in zip(self.members, self.weights)]


def inspect_teachers(teacher: str | Sequence[str], model_factory: str | None = None,
                     weights: Sequence[float] | None = None) -> TeacherInfo | MixtureInfo:
    """Cheap checks of one teacher (a :class:`TeacherInfo`) or several (a :class:`MixtureInfo`).

    ``--model-factory`` applies to every teacher given as a bare state dict.

    Raises:
        BuildInputError: bad weights.
        TeacherError: a teacher path that :func:`inspect_teacher` refuses.
    """
    paths = teacher_paths(teacher)
    if not paths:
        raise BuildInputError("pass at least one --teacher")
    normalized = normalize_weights(weights, len(paths))  # before the filesystem: the cheapest check first
    members = [inspect_teacher(p, model_factory) for p in paths]
    return members[0] if len(members) == 1 else MixtureInfo(members, normalized)


def check_positions(seq_len: int, teacher: TeacherInfo | MixtureInfo) -> None:
    """Refuse a ``seq_len`` longer than any of the teachers can see (:func:`check_seq_len` for each)."""
    for member in teacher.members if isinstance(teacher, MixtureInfo) else [teacher]:
        check_seq_len(seq_len, member.max_positions, f"the teacher {member.path}", member.max_positions_source)


class TeacherMixture(torch.nn.Module):
    """The teachers as one module: ``forward(input_ids [B, T])`` returns log p_mix [B, T, V] in fp32.

    The teachers run one after another and their log-probs are folded into one accumulator in place, so the
    peak is one teacher's logits plus two fp32 [B, T, V] buffers, whatever M is. The fold is a fixed sequence
    of fp32 ops, so the same inputs give bitwise the same output (resumed builds stay byte-identical).
    """

    def __init__(self, models: Sequence[torch.nn.Module], weights: Sequence[float], vocab_sizes: Sequence[int],
                 vocab_size: int) -> None:
        super().__init__()
        self.members = torch.nn.ModuleList(models)
        self.log_weights = [math.log(w) for w in weights]
        self.vocab_sizes = [int(v) for v in vocab_sizes]
        self.vocab_size = int(vocab_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor | None = None  # [B, T, V] fp32: logsumexp over the teachers folded so far
        for model, log_w, width in zip(self.members, self.log_weights, self.vocab_sizes):
            logits = forward_logits(model, input_ids)  # [B, T, V_m]
            if logits.shape[-1] != width:
                raise TeacherError(f"a teacher of the mixture returned {logits.shape[-1]} logits per position, "
                                   f"{width} when it was loaded; its output width must not change")
            term = torch.log_softmax(logits, dim=-1, dtype=torch.float32).add_(log_w)  # [B, T, V_m]: log(w_m p_m)
            del logits
            if out is None and width == self.vocab_size:
                out = term
                continue
            if out is None:  # a narrower first teacher: its padding ids have probability 0
                out = term.new_full((*term.shape[:-1], self.vocab_size), -math.inf)
            head = out[..., :width]
            if width == self.vocab_size:
                torch.logaddexp(out, term, out=out)
            else:
                head.copy_(torch.logaddexp(head, term))
        return out


def load_teachers(info: TeacherInfo | MixtureInfo, dtype: str = "float32", device: str = "cpu") -> torch.nn.Module:
    """:func:`load_teacher` for one teacher; for a mixture, every teacher (in order) as a :class:`TeacherMixture`.

    Raises:
        TeacherError: a teacher that does not load, or teachers whose vocabularies differ (see
            :func:`shared_vocab_size`).
    """
    if isinstance(info, TeacherInfo):
        return load_teacher(info, dtype, device)
    models = [load_teacher(member, dtype, device) for member in info.members]
    vocab = info.vocab_size  # every member's width is known now
    return TeacherMixture(models, info.weights, [m.vocab_size for m in info.members], vocab)
