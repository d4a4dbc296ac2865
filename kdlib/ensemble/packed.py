"""Packed ensembles: M same-architecture students with stacked parameters, run and trained as one.

Shape notation::

    M  ensemble members   B  sequences per batch   T  positions per sequence
    V  student vocabulary K  teacher top-k          [M, ...] a member's parameter shape with M in front

Every parameter (and buffer) of the members is stacked into one ``[M, ...]`` tensor
(``torch.func.stack_module_state``) and one copy of the architecture is run under
``torch.func.vmap(functional_call)``, so a forward pass is one call per layer for all members (batched matmuls)
instead of a Python loop over M modules. The KD loss is one fused :func:`kdlib.kd_loss` over ``[M, B, T, V]``
logits with the teacher targets broadcast from ``[B, T, K]`` as expanded views: no [M, B, T, V] tensor besides the
logits and their gradient is made, while the loss's row flattening copies the K-wide targets (ids widened to
int64, log-probs) and the per-position lse/labels once per member, ≤ K/V of the logits' size. Each member's
loss is reduced on its own (:func:`member_mean`), so ``losses.sum().backward()`` gives member m exactly the
gradient of its own single-model step.

One optimizer over the stacked parameters keeps per-member state for ELEMENTWISE optimizers (SGD, Adam,
AdamW, ... in :data:`PER_MEMBER_OPTIMIZERS`): each entry of an ``[M, ...]`` state tensor belongs to one member,
and AdamW's decoupled weight decay is elementwise too. Gradient clipping is not: ``clip_grad_norm_`` over the
stacked tensors would take one norm over all members, so :func:`clip_grad_norm_per_member` clips each member
by its own norm. Optimizers that take norms or factor a whole tensor (LAMB, LARS, Adafactor, Muon, LBFGS)
would mix members and are refused by :func:`check_per_member_optimizer`.

Example::

    ensemble = PackedEnsemble(lambda: make_student(), num_members=8, seeds=range(8))
    optimizer = torch.optim.AdamW(ensemble.parameters(), lr=3e-3, weight_decay=0.01)
    for batch in kdlib.make_loader(cache, 8):
        losses = packed_step(ensemble, batch, optimizer, max_grad_norm=1.0, ce_weight=0.5)  # [M]
    students = ensemble.members()  # M ordinary modules
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from kdlib.batch import DEFAULT_IGNORE_INDEX, batch_labels, student_input_ids
from kdlib.integrations.step import logits_of

__all__ = ["PackedEnsemble", "UnsupportedModuleError", "packed_kd_loss", "member_mean", "packed_step",
           "clip_grad_norm_per_member", "check_per_member_optimizer", "PER_MEMBER_OPTIMIZERS"]

# Optimizers whose update of an entry reads only that entry's gradient and state: over stacked [M, ...]
# parameters one instance is M independent optimizers.
PER_MEMBER_OPTIMIZERS = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, torch.optim.Adamax,
                         torch.optim.NAdam, torch.optim.RAdam, torch.optim.RMSprop, torch.optim.Adagrad,
                         torch.optim.Adadelta, torch.optim.Rprop)

_HINTS = (
    (("inplace", "in-place", "match the broadcast shape"), "an in-place update of a tensor shared by all members with per-member values (a "
     "tensor attribute that is not a registered buffer, or the input itself): register it as a buffer "
     "(buffers are stacked per member, so e.g. BatchNorm statistics work) or make the update out-of-place"),
    ((".item()", "data-dependent", "tolist", "nonzero", "Data-dependent"), "data-dependent control flow (a "
     "Python `if` on a tensor's value, .item(), .tolist(), nonzero()): rewrite it with torch.where / masks"),
    (("random",), "a random operation: pass randomness='different' (each member its own draws) or 'same'"),
)


class UnsupportedModuleError(TypeError):
    """The members' module cannot run under ``torch.func.vmap``; the message names the submodule and the op."""


def _mangle(name: str) -> str:
    return name.replace(".", "-")  # register_parameter refuses dots; '-' cannot occur in attribute names


def _seeded_members(make_model: Callable[[], nn.Module], seeds: Sequence[int]) -> list[nn.Module]:
    """One ``make_model()`` per seed with torch's RNG seeded first; the caller's RNG state is kept."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    members = []
    for seed in seeds:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(int(seed))
            members.append(make_model())
    return members


def _check_same_architecture(members: Sequence[nn.Module]) -> None:
    first = {n: (tuple(p.shape), p.dtype) for n, p in members[0].named_parameters()}
    for index, member in enumerate(members[1:], start=1):
        other = {n: (tuple(p.shape), p.dtype) for n, p in member.named_parameters()}
        if other != first:
            diff = sorted(set(first.items()) ^ set(other.items()))[:4]
            raise ValueError(f"member {index} ({type(member).__name__}) has other parameters than member 0 "
                             f"(first differences: {diff}); a packed ensemble needs one architecture for all "
                             "members (same parameter names, shapes and dtypes)")


class PackedEnsemble(nn.Module):
    """M same-architecture modules with stacked ``[M, ...]`` parameters, run together under ``vmap``.

    Args:
        make_model: builds one member (called once per seed with torch's RNG seeded by that seed), e.g.
            ``lambda: GPT2LMHeadModel(config)``. A transformers model should use
            ``attn_implementation="eager"``: SDPA has no vmap batching rule on the CPU (a slow per-member
            fallback).
        num_members: M (default ``len(seeds)``).
        seeds: one init seed per member (default ``0 .. M-1``).
        randomness: vmap's randomness mode for random ops inside the model (dropout): ``"different"`` (each
            member its own draws, as separate models have), ``"same"``, or ``"error"``.

    Attributes:
        num_members: M.

    Raises:
        ValueError: no members, seeds and num_members disagree, or members of different architectures.
    """

    def __init__(self, make_model: Callable[[], nn.Module], num_members: int | None = None, *,
                 seeds: Iterable[int] | None = None, randomness: str = "different") -> None:
        seeds = list(range(num_members or 0)) if seeds is None else [int(s) for s in seeds]
        if num_members is not None and len(seeds) != num_members:
            raise ValueError(f"num_members={num_members} but {len(seeds)} seeds were given; give one seed per member")
        super().__init__()
        self._init_from(_seeded_members(make_model, seeds), randomness)

    @classmethod
    def from_members(cls, members: Sequence[nn.Module], *, randomness: str = "different") -> PackedEnsemble:
        """Pack modules built (or trained, or loaded) elsewhere; their parameters are copied into the stack."""
        ensemble = cls.__new__(cls)
        nn.Module.__init__(ensemble)
        ensemble._init_from(list(members), randomness)
        return ensemble

    def _init_from(self, members: list[nn.Module], randomness: str) -> None:
        if not members:
            raise ValueError("a packed ensemble needs at least one member: pass num_members >= 1 or seeds")
        if randomness not in ("different", "same", "error"):
            raise ValueError(f"randomness={randomness!r}; choose 'different', 'same' or 'error' (torch.func.vmap)")
        _check_same_architecture(members)
        params, buffers = stack_module_state(members)
        self.num_members = len(members)
        self.randomness = randomness
        self._param_names = list(params)
        self._buffer_names = list(buffers)
        persistent = set(members[0].state_dict())
        for name, value in params.items():
            self.register_parameter(_mangle(name), nn.Parameter(value.detach()))
        for name, value in buffers.items():
            self.register_buffer(_mangle(name), value, persistent=name in persistent)
        # The skeleton that functional_call runs with the stacked tensors swapped in; kept out of .parameters().
        # It must be a real module on the members' device (a "meta" copy gives NaN in some transformers models).
        object.__setattr__(self, "_base", copy.deepcopy(members[0]))

    # ------------------------------------------------------------------------------------------ module plumbing

    def _apply(self, fn, recurse=True):  # .to(), .cuda(), .double() move the skeleton too
        super()._apply(fn, recurse)
        self._base._apply(fn, recurse)
        return self

    def train(self, mode: bool = True) -> PackedEnsemble:
        super().train(mode)
        self._base.train(mode)
        return self

    def stacked_parameters(self) -> dict[str, torch.Tensor]:
        """The member module's parameter names -> stacked ``[M, ...]`` parameters (views, not copies)."""
        return {name: getattr(self, _mangle(name)) for name in self._param_names}

    def stacked_buffers(self) -> dict[str, torch.Tensor]:
        """The member module's buffer names -> stacked ``[M, ...]`` buffers."""
        return {name: getattr(self, _mangle(name)) for name in self._buffer_names}

    def members(self) -> list[nn.Module]:
        """M ordinary modules, each holding a copy of its member's parameters and buffers (tied weights stay
        tied), in the mode (train/eval) of the ensemble."""
        params, buffers = self.stacked_parameters(), self.stacked_buffers()
        out = []
        with torch.no_grad():
            for m in range(self.num_members):  # unstacking only; not the hot path
                member = copy.deepcopy(self._base)
                for name, tensor in member.named_parameters():
                    tensor.copy_(params[name][m])
                for name, tensor in member.named_buffers():
                    tensor.copy_(buffers[name][m])
                out.append(member)
        return out

    # ------------------------------------------------------------------------------------------ forward

    def _member_call(self, params, buffers, args, kwargs, pick=None):
        output = functional_call(self._base, (params, buffers), args, kwargs)
        return _tensors_only(output) if pick is None else pick(output)

    def _run(self, args, kwargs, pick=None):
        params, buffers = self.stacked_parameters(), self.stacked_buffers()
        run = vmap(self._member_call, in_dims=(0, 0, None, None, None), randomness=self.randomness)
        try:
            return run(params, buffers, args, kwargs, pick)
        except (RuntimeError, NotImplementedError, ValueError) as exc:
            error = self._diagnose(exc, args, kwargs, pick)
            if error is exc:
                raise
            raise error from exc

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run every member on the same inputs; each output tensor gets a leading M dim. Non-tensor outputs
        (a transformers KV cache) are dropped: a transformers output comes back as a dict of its tensors.

        Raises:
            UnsupportedModuleError: the module uses an op vmap cannot batch (names the submodule and why).
        """
        return self._run(args, kwargs)

    def logits(self, input_ids: torch.Tensor, **model_kwargs: Any) -> torch.Tensor:
        """The members' logits ``[M, B, T, V]`` for ``input_ids`` [B, T] (a tensor, tuple or ``.logits`` output)."""
        return self._run((input_ids,), model_kwargs, logits_of)

    def _diagnose(self, exc: Exception, args, kwargs, pick) -> Exception:
        """The error to raise for a failed vmapped call: ``exc`` itself when member 0 alone fails the same way
        (a bug of the call, not of vmap), else an :class:`UnsupportedModuleError` naming the innermost
        submodule running when vmap failed."""
        params = {n: p[0].detach() for n, p in self.stacked_parameters().items()}
        buffers = {n: b[0].clone() for n, b in self.stacked_buffers().items()}  # a diagnosis changes no state
        with torch.no_grad():
            try:
                self._member_call(params, buffers, args, kwargs, pick)
            except Exception:  # noqa: BLE001 - the plain call fails too: the original error is the answer
                return exc
            where = _failing_submodule(self._base, lambda: vmap(
                self._member_call, in_dims=(0, 0, None, None, None), randomness=self.randomness)(
                {n: p.detach() for n, p in self.stacked_parameters().items()},
                {n: b.clone() for n, b in self.stacked_buffers().items()}, args, kwargs, pick))
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        hint = next((h for keys, h in _HINTS if any(k in str(exc) for k in keys)), "an op without a vmap "
                    "batching rule; train the members in a loop instead")
        return UnsupportedModuleError(
            f"PackedEnsemble cannot run {type(self._base).__name__} under torch.func.vmap: {where} failed with "
            f"{type(exc).__name__}: {message}. Likely cause: {hint}.")


def _tensors_only(output: Any) -> Any:
    """``output`` with its non-tensor parts dropped (vmap returns tensors only): a tensor as is, a mapping
    (a transformers ``ModelOutput``) as a dict of its tensors, a tuple/list as a tuple of its tensors."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):
        return {k: v for k, v in output.items() if isinstance(v, torch.Tensor)}
    if isinstance(output, (tuple, list)):
        return tuple(v for v in output if isinstance(v, torch.Tensor))
    return output


def _failing_submodule(root: nn.Module, call: Callable[[], Any]) -> str:
    """``"submodule 'name' (Class)"`` innermost running when ``call()`` raises (forward hooks track it)."""
    stack: list[str] = []
    failed: list[str] = []
    names = {module: name for name, module in root.named_modules()}

    def enter(module, _inputs):
        stack.append(names.get(module, "?"))

    def leave(module, _inputs, _output):
        stack.pop()

    handles = [m.register_forward_pre_hook(enter) for m in names] + [m.register_forward_hook(leave) for m in names]
    try:
        call()
    except Exception:  # noqa: BLE001 - the failure being located
        failed = list(stack)
    finally:
        for handle in handles:
            handle.remove()
    if not failed or not failed[-1]:
        return f"the top-level module ({type(root).__name__})"
    module = root.get_submodule(failed[-1])
    return f"submodule {failed[-1]!r} ({type(module).__name__})"


# ---------------------------------------------------------------------------------------------- loss and step


def member_mean(rows: torch.Tensor, valid: torch.Tensor, sample_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Per-member mean of per-position losses: what each member's own ``reduction="mean"`` loss would be.

    Without weights ``loss_m = Σ_bt rows[m,b,t] / #valid`` (0 when nothing is valid), kd_loss's own mean.
    With per-sample weights w [M, B] (bagging multiplicities, boosting weights):
    ``loss_m = Σ_b w[m,b] Σ_t rows[m,b,t] / Σ_b w[m,b] · #valid[b]``, the mean over a batch in which sequence b
    appears w[m,b] times (0 for a member whose weights are all 0).

    Args:
        rows: [M, B, T] per-position losses, 0 at ignored positions (``reduction="none"``).
        valid: [B, T] (or [M, B, T]) bool, the positions that count.
        sample_weights: [M, B] or [B] non-negative weights, or None.

    Returns:
        [M] losses.
    """
    valid = valid.to(rows.dtype).expand_as(rows)  # [M, B, T]
    if sample_weights is None:
        return rows.sum((1, 2)) / valid.sum((1, 2)).clamp_min(1)
    w = torch.as_tensor(sample_weights, device=rows.device).to(rows.dtype)
    w = w.expand(rows.shape[:2]).unsqueeze(-1)  # [M, B, 1]
    numerator, denominator = (rows * w).sum((1, 2)), (valid * w).sum((1, 2))
    return torch.where(denominator > 0, numerator / denominator.clamp_min(torch.finfo(rows.dtype).tiny), 0.0)


def _check_sample_weights(sample_weights: Any, m: int, b: int) -> torch.Tensor | None:
    if sample_weights is None:
        return None
    w = torch.as_tensor(sample_weights)
    if w.is_complex() or w.dtype == torch.bool or tuple(w.shape) not in ((m, b), (b,)):
        raise ValueError(f"sample_weights must be real [M, B] = [{m}, {b}] (or [B]) weights, got "
                         f"{tuple(w.shape)} {w.dtype}")
    if bool((w < 0).any()) or not bool(torch.isfinite(w).all()):
        raise ValueError("sample_weights must be finite and >= 0 (a sequence's multiplicity or weight per member)")
    return w


def packed_kd_loss(logits: torch.Tensor, batch: Mapping[str, Any], *, sample_weights: Any = None,
                   **loss_kwargs: Any) -> torch.Tensor:
    """Per-member KD (+ CE) losses [M] of ``logits`` [M, B, T, V] against one cache batch, in one fused call.

    The batch's per-position tensors (every ``[B, T, ...]`` entry: ``topk_*``, ``sample_*``, ``lse*``,
    labels) are broadcast to ``[M, B, T, ...]`` as expanded views, :func:`kdlib.kd_loss_from_batch` runs once
    with ``reduction="none"``, and :func:`member_mean` reduces each member on its own, so loss m equals the
    loss a single-member step computes and ``losses.sum().backward()`` gives every member its own gradient.

    Args:
        logits: [M, B, T, V] the members' logits (:meth:`PackedEnsemble.logits`).
        batch: a cache batch (``kdlib.make_loader``); labels from it, else its tokens shifted.
        sample_weights: optional [M, B] (or [B]) per-member weights of the sequences (see :func:`member_mean`).
        **loss_kwargs: ``kdlib.kd_loss_from_batch`` options (``ce_weight``, ``temperature``, ...), not
            ``reduction`` (each member is reduced on its own).

    Returns:
        [M] losses.

    Raises:
        ValueError: logits not [M, B, T, V] matching the batch, bad sample_weights, ``reduction`` given, or what
            kd_loss_from_batch raises.
    """
    from kdlib.losses import kd_loss_from_batch

    if "reduction" in loss_kwargs or "labels" in loss_kwargs:
        raise ValueError("packed_kd_loss reduces each member itself and takes the labels from the batch; drop "
                         "reduction=/labels= (call kdlib.kd_loss on the logits for anything else)")
    ignore_index = int(loss_kwargs.get("ignore_index", DEFAULT_IGNORE_INDEX))
    labels = batch_labels(batch, ignore_index)  # [B, T]
    if logits.dim() != 4 or tuple(logits.shape[1:3]) != tuple(labels.shape):
        raise ValueError(f"logits must be [M, B, T, V] with [B, T] = {tuple(labels.shape)} (the batch's), got "
                         f"{tuple(logits.shape)}")
    m, b, t = logits.shape[:3]
    weights = _check_sample_weights(sample_weights, m, b)
    labels = labels.to(logits.device, non_blocking=True)
    expanded = {key: (value.unsqueeze(0).expand(m, *value.shape)
                      if isinstance(value, torch.Tensor) and tuple(value.shape[:2]) == (b, t) else value)
                for key, value in batch.items()}
    rows = kd_loss_from_batch(logits, expanded, labels=labels.expand(m, b, t), reduction="none",
                              **loss_kwargs)  # [M, B, T]
    return member_mean(rows, labels != ignore_index, weights)


def check_per_member_optimizer(optimizer: torch.optim.Optimizer) -> None:
    """Raise ValueError unless ``optimizer`` updates each entry from its own gradient and state only
    (:data:`PER_MEMBER_OPTIMIZERS`), i.e. unless one instance over [M, ...] tensors is M independent ones."""
    if not isinstance(optimizer, PER_MEMBER_OPTIMIZERS):
        names = ", ".join(c.__name__ for c in PER_MEMBER_OPTIMIZERS)
        raise ValueError(
            f"{type(optimizer).__name__} is not known to be elementwise: an optimizer that takes a norm or a "
            "factorization of a whole parameter tensor (LAMB, LARS, Adafactor, Muon) mixes the members of a "
            f"stacked [M, ...] parameter. Use one of {names}, or pass check_optimizer=False if yours is elementwise")


@torch.no_grad()
def clip_grad_norm_per_member(ensemble: PackedEnsemble, max_norm: float) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` for each member on its own: member m's gradients are scaled by
    ``min(1, max_norm / (norm_m + 1e-6))`` with norm_m the L2 norm over all of ITS gradients.

    Returns:
        [M] the members' gradient norms before clipping.
    """
    grads = [p.grad for p in ensemble.stacked_parameters().values() if p.grad is not None]
    if not grads:
        return torch.zeros(ensemble.num_members)
    squares = torch.stack([g.detach().flatten(1).float().pow(2).sum(1) for g in grads]).sum(0)  # [M]
    norms = squares.sqrt()
    coef = (float(max_norm) / (norms + 1e-6)).clamp(max=1.0)  # [M]
    for g in grads:
        g.mul_(coef.to(g.dtype).view(-1, *([1] * (g.dim() - 1))))
    return norms


def packed_step(ensemble: PackedEnsemble, batch: Mapping[str, Any], optimizer: torch.optim.Optimizer, *,
                sample_weights: Any = None, max_grad_norm: float | None = None, check_optimizer: bool = True,
                model_kwargs: Mapping[str, Any] | None = None, **loss_kwargs: Any) -> torch.Tensor:
    """One training step of every member on one cache batch: forward, fused loss, backward, clip, update.

    Args:
        ensemble: the :class:`PackedEnsemble` (its parameters are the optimizer's).
        batch: a cache batch; the members see its own ``input_ids``.
        optimizer: one elementwise optimizer over ``ensemble.parameters()`` (per-member state).
        sample_weights: optional [M, B] per-member sequence weights (bagging, boosting).
        max_grad_norm: clip each member's gradient norm to this (per member), or None.
        check_optimizer: refuse optimizers not in :data:`PER_MEMBER_OPTIMIZERS`.
        model_kwargs: extra keyword arguments of the model call (``{"use_cache": False}``).
        **loss_kwargs: :func:`packed_kd_loss` options.

    Returns:
        [M] the members' losses (detached).
    """
    if check_optimizer:
        check_per_member_optimizer(optimizer)
    ids = student_input_ids(batch, next(iter(ensemble.parameters())).device)
    logits = ensemble.logits(ids, **dict(model_kwargs or {}))  # [M, B, T, V]
    losses = packed_kd_loss(logits, batch, sample_weights=sample_weights, **loss_kwargs)  # [M]
    optimizer.zero_grad(set_to_none=True)
    losses.sum().backward()
    if max_grad_norm is not None:
        clip_grad_norm_per_member(ensemble, max_grad_norm)
    optimizer.step()
    return losses.detach()

