"""KDLossOptions: defaults, validation, frozen, and keyword arguments vs ``options=`` at every entry point.

Shape notation: N rows, V vocabulary, K teacher top-k, H hidden size.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import kdlib
from kdlib.losses import KDLossOptions, kd_loss_reference
from kdlib.losses import torch_pass
from kdlib.losses.backends import RowStats
from kdlib.losses.options import ENTRY_POINT_OPTIONS

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

N, V, K, H = 7, 53, 5, 8
# every setting not at its default, valid for every entry point
CHANGED = dict(ce_weight=0.4, kd_weight=0.7, temperature=2.0, divergence="jsd", tail="bucket", tau_squared=False,
               ignore_index=-1, beta=0.3, reduction="sum", backend="torch", validate=False, chunk_rows=3)


def make_case(seed=0):
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(N, V, generator=g, dtype=torch.float64) * 2.0
    logprobs, ids = torch.log_softmax(teacher, -1).topk(K, dim=-1)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[::3] = -1
    return dict(
        logits=torch.randn(N, V, generator=g), ids=ids.to(torch.int32), logprobs=logprobs.float(), labels=labels,
        lse=torch.logsumexp(teacher, -1).float(), lse_t2=torch.logsumexp(teacher / 2.0, -1).float(),
        hidden=torch.randn(N, H, generator=g), weight=torch.randn(V, H, generator=g) * 0.3)


def tensors(case):
    return dict(labels=case["labels"], teacher_lse=case["lse"], teacher_lse_at_temperature=case["lse_t2"])


def value_and_grad(fn, leaf):
    leaf = leaf.clone().requires_grad_(True)
    value = fn(leaf)
    (grad,) = torch.autograd.grad(value, leaf)
    return value.detach(), grad


def assert_identical(a, b):
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


# --- the object ------------------------------------------------------------------------------------------------
def test_defaults_are_the_documented_ones():
    assert dataclasses.asdict(KDLossOptions()) == dict(
        ce_weight=0.0, kd_weight=1.0, temperature=1.0, divergence="forward_kl", tail="bucket", tau_squared=True,
        ignore_index=-100, beta=0.5, reduction="mean", backend="auto", validate=True, chunk_rows=None,
        chunk_size=1024, allow_padded_vocab=False)
    assert KDLossOptions().non_defaults() == {}
    assert KDLossOptions(temperature=2.0, tail="none").non_defaults() == {"temperature": 2.0, "tail": "none"}


def test_frozen_and_keyword_only():
    options = KDLossOptions(ce_weight=0.5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.ce_weight = 1.0
    with pytest.raises(TypeError):
        KDLossOptions(0.5)  # positional fields would silently shift when a field is added
    assert dataclasses.replace(options, temperature=2.0) == KDLossOptions(ce_weight=0.5, temperature=2.0)
    assert hash(options) == hash(KDLossOptions(ce_weight=0.5))


@pytest.mark.parametrize("field,value,match", [
    ("divergence", "kl", "unknown divergence 'kl'; choose one of"),
    ("tail", "zero", "unknown tail 'zero'; choose one of"),
    ("reduction", "avg", "unknown reduction 'avg'; choose one of"),
    ("backend", "cuda", "unknown backend 'cuda'; choose one of"),
    ("temperature", 0.0, "temperature must be a finite number > 0"),
    ("temperature", math.inf, "temperature must be a finite number > 0"),
    ("temperature", "2", "temperature must be a finite number > 0"),
    ("beta", 1.5, r"beta must be in \[0, 1\]"),
    ("ce_weight", -1.0, "ce_weight and kd_weight must be >= 0"),
    ("kd_weight", -0.1, "ce_weight and kd_weight must be >= 0"),
    ("chunk_rows", 0, "chunk_rows must be >= 1"),
    ("chunk_size", 0, "chunk_size must be >= 1"),
])
def test_every_setting_is_validated_on_construction(field, value, match):
    with pytest.raises(ValueError, match=match):
        KDLossOptions(**{field: value})
    with pytest.raises(ValueError, match=match):  # and through replace(): the same __post_init__
        dataclasses.replace(KDLossOptions(), **{field: value})
    with pytest.raises(ValueError, match=match):  # and at construction of the module, not at its first call
        kdlib.KDLoss(**{field: value})


def test_needs_teacher_lse_and_kd_scale():
    assert not KDLossOptions().needs_teacher_lse
    assert KDLossOptions(temperature=2.0).needs_teacher_lse
    assert KDLossOptions(temperature=2.0, tail="none").needs_teacher_lse
    assert not KDLossOptions(temperature=2.0, tail="renormalize").needs_teacher_lse
    assert not KDLossOptions(temperature=2.0, kd_weight=0.0).needs_teacher_lse
    assert KDLossOptions(kd_weight=0.5, temperature=2.0).kd_scale == 2.0
    assert KDLossOptions(kd_weight=0.5, temperature=2.0, tau_squared=False).kd_scale == 0.5
    assert KDLossOptions(divergence="jsd", beta=0.0).effective_divergence == "forward_kl"
    assert KDLossOptions(divergence="jsd", beta=1.0).effective_divergence == "reverse_kl"


# --- keyword arguments vs options= -------------------------------------------------------------------------------
def test_kd_loss_kwargs_and_options_are_bit_identical():
    case = make_case()
    args = (case["ids"], case["logprobs"])
    by_kwargs = value_and_grad(lambda z: kdlib.kd_loss(z, *args, **tensors(case), **CHANGED), case["logits"])
    options = KDLossOptions(**CHANGED)
    by_options = value_and_grad(lambda z: kdlib.kd_loss(z, *args, **tensors(case), options=options), case["logits"])
    assert_identical(by_kwargs, by_options)
    # a keyword given with options= replaces that one field
    mixed = value_and_grad(lambda z: kdlib.kd_loss(z, *args, **tensors(case), options=dataclasses.replace(
        options, temperature=1.0), temperature=2.0), case["logits"])
    assert_identical(by_kwargs, mixed)
    defaults = value_and_grad(lambda z: kdlib.kd_loss(z, *args), case["logits"])
    assert_identical(defaults, value_and_grad(lambda z: kdlib.kd_loss(z, *args, options=KDLossOptions()),
                                              case["logits"]))


def test_reference_kwargs_and_options_are_bit_identical():
    case = make_case(1)
    math_only = {k: v for k, v in CHANGED.items() if k in ENTRY_POINT_OPTIONS["kd_loss_reference"]}
    args = (case["ids"], case["logprobs"])
    by_kwargs = value_and_grad(lambda z: kd_loss_reference(z, *args, **tensors(case), **math_only), case["logits"])
    # an options object may carry settings the reference does not use (backend, chunking)
    by_options = value_and_grad(lambda z: kd_loss_reference(z, *args, **tensors(case),
                                                            options=KDLossOptions(**CHANGED)), case["logits"])
    assert_identical(by_kwargs, by_options)
    via_kd_loss = value_and_grad(lambda z: kdlib.kd_loss(z, *args, **tensors(case), options=KDLossOptions(
        **{**CHANGED, "backend": "reference"})), case["logits"])
    assert_identical(by_kwargs, via_kd_loss)


def test_from_hidden_kwargs_and_options_are_bit_identical():
    case = make_case(2)
    kw = dict(CHANGED, chunk_size=2)
    args = (case["ids"], case["logprobs"])

    def loss(options=None, **overrides):
        return lambda h: kdlib.kd_loss_from_hidden(h, case["weight"], *args, **tensors(case), options=options,
                                                   **overrides)

    by_kwargs = value_and_grad(loss(**kw), case["hidden"])
    assert_identical(by_kwargs, value_and_grad(loss(KDLossOptions(**kw)), case["hidden"]))
    assert_identical(by_kwargs, value_and_grad(loss(KDLossOptions(**CHANGED), chunk_size=2), case["hidden"]))


def test_from_batch_and_module_kwargs_and_options_are_bit_identical():
    case = make_case(3)
    batch = {"topk_ids": case["ids"], "topk_logprobs": case["logprobs"], "lse": case["lse"], "lse_t2": case["lse_t2"],
             "labels": case["labels"], "teacher_vocab_size": torch.tensor(V - 2)}
    kw = dict(CHANGED, allow_padded_vocab=True)
    options = KDLossOptions(**kw)
    expected = value_and_grad(lambda z: kdlib.kd_loss_from_batch(z, batch, **kw), case["logits"])
    for fn in (lambda z: kdlib.kd_loss_from_batch(z, batch, options=options),
               lambda z: kdlib.KDLoss(**kw).from_batch(z, batch),
               lambda z: kdlib.KDLoss(options).from_batch(z, batch),
               lambda z: kdlib.KDLoss().from_batch(z, batch, options=options),
               lambda z: kdlib.KDLoss(dataclasses.replace(options, temperature=1.0)).from_batch(z, batch,
                                                                                               temperature=2.0)):
        assert_identical(expected, value_and_grad(fn, case["logits"]))
    module = kdlib.KDLoss(options)
    direct = value_and_grad(lambda z: kdlib.kd_loss(z, case["ids"], case["logprobs"], **tensors(case), **CHANGED),
                            case["logits"])
    assert_identical(direct, value_and_grad(lambda z: module(z, case["ids"], case["logprobs"], **tensors(case)),
                                            case["logits"]))
    assert module.options is options
    assert "temperature=2.0" in repr(module) and "chunk_size" not in repr(module)
    with pytest.raises(kdlib.AlignmentError, match="allow_padded_vocab"):
        kdlib.KDLoss(options, allow_padded_vocab=False).from_batch(case["logits"], batch)


# --- wrong keywords ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("call,keyword", [
    (lambda c, **kw: kdlib.kd_loss(c["logits"], c["ids"], c["logprobs"], **kw), "chunk_size"),
    (lambda c, **kw: kdlib.kd_loss(c["logits"], c["ids"], c["logprobs"], **kw), "temprature"),
    (lambda c, **kw: kdlib.kd_loss(c["logits"], c["ids"], c["logprobs"], **kw), "allow_padded_vocab"),
    (lambda c, **kw: kd_loss_reference(c["logits"], c["ids"], c["logprobs"], **kw), "backend"),
    (lambda c, **kw: kdlib.kd_loss_from_hidden(c["hidden"], c["weight"], c["ids"], c["logprobs"], **kw),
     "allow_padded_vocab"),
    (lambda c, **kw: kdlib.kd_loss_from_batch(c["logits"], {"topk_ids": c["ids"], "topk_logprobs": c["logprobs"]},
                                              **kw), "chunk_size"),
    (lambda c, **kw: kdlib.KDLoss(**kw), "lables"),
])
def test_a_keyword_the_entry_point_does_not_take_is_a_type_error(call, keyword):
    with pytest.raises(TypeError, match=f"unexpected keyword argument.*'{keyword}'.*its options are"):
        call(make_case(), **{keyword: 1})


def test_options_of_another_type_is_a_type_error():
    case = make_case()
    with pytest.raises(TypeError, match="options must be a kdlib.losses.KDLossOptions, got dict"):
        kdlib.kd_loss(case["logits"], case["ids"], case["logprobs"], options={"ce_weight": 0.5})


@pytest.mark.parametrize("setting,match", [(dict(reduction="none"), "reduction='mean' or 'sum'"),
                                           (dict(backend="reference"), "backend must be 'auto', 'torch' or 'triton'")])
def test_from_hidden_refuses_what_it_cannot_do_however_given(setting, match):
    case = make_case()
    args = (case["hidden"], case["weight"], case["ids"], case["logprobs"])
    with pytest.raises(ValueError, match=match):
        kdlib.kd_loss_from_hidden(*args, **setting)
    with pytest.raises(ValueError, match=match):
        kdlib.kd_loss_from_hidden(*args, options=KDLossOptions(**setting))


# --- the constants kdlib passes to the V-wide passes ---------------------------------------------------------------
def test_torch_pass_takes_the_floor_and_record_from_the_caller():
    # K = V: the student's tail is exactly 0, so log T is the floor the caller passes (no copy of 1e-30)
    logits = torch.randn(3, 6)
    ids = torch.arange(6).repeat(3, 1)
    for floor in (math.log(1e-30), math.log(1e-10)):
        stats = torch_pass.row_stats(logits, ids, torch.zeros(3, dtype=torch.int64), 1.0, need_lse_1=True,
                                     need_tail=True, log_tail_floor=floor, stats_type=RowStats)
        assert isinstance(stats, RowStats)
        torch.testing.assert_close(stats.log_tail, torch.full((3,), floor), rtol=0, atol=1e-6)
