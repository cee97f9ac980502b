"""The one-pass path of the CPU implementation: a 'mean' or 'sum' loss computes its gradients in
its forward (`cce::linear_cross_entropy_fwd_bwd`), and its backward only scales them.

It is valid only while the loss's upstream gradient is a scalar. These tests check that it is
chosen exactly then (reduction='none', return_lse, no_grad, frozen inputs and class weights that
require grad take the other paths), that every way of using its loss stays exact (a loss used
twice, retained graphs) or fails with a clear error (a scaled second backward, a double
backward), and that its row coefficients are what autograd finds through `losses.row_losses`.
"""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch

import cce_inductor
import reference
from cce_inductor import blocked, dispatch, losses
from cce_inductor.arguments import LossOptions
from cce_inductor.lowering import common

pytestmark = pytest.mark.usefixtures("single_threaded")

N, V, D = 23, 300, 16

unfiltered = functools.partial(cce_inductor.linear_cross_entropy, filter_eps=None)


@pytest.fixture
def calls(monkeypatch):
    """Names of the blocked functions each call ran, in order."""
    ran: list[str] = []
    for name in ("forward", "backward", "forward_and_backward"):
        original = getattr(blocked, name)

        def spy(*args, _name=name, _original=original):
            ran.append(_name)
            return _original(*args)

        monkeypatch.setattr(blocked, name, spy)
    return ran


def _leaves(inputs, trainable=reference.GRAD_NAMES):
    return {name: inputs[name].clone().requires_grad_(name in trainable)
            for name in reference.GRAD_NAMES if inputs[name] is not None}


# Every option the loss algebra knows, so that the one-pass coefficients meet all of them.
ONE_PASS_CASES = {
    "mean": dict(reduction="mean"),
    "sum": dict(reduction="sum"),
    "smoothing_class_weight": dict(reduction="mean", label_smoothing=0.2, class_weight=True),
    "ignore_index_softcap": dict(reduction="sum", ignored="some", ignore_index=7, softcap=4.0),
    "all_ignored": dict(reduction="mean", ignored="all", class_weight=True, label_smoothing=0.1),
}


@pytest.mark.parametrize("name", ONE_PASS_CASES)
def test_scalar_loss_takes_one_pass_and_matches_reference(calls, name):
    case = dict(ONE_PASS_CASES[name])
    inputs = reference.make_inputs(
        N, V, D, torch.float32, bias=True, class_weight=case.pop("class_weight", False),
        ignored=case.pop("ignored", "none"), ignore_index=case.get("ignore_index", -100),
        seed=len(name),
    )
    reference.check_against_reference(unfiltered, inputs, torch.float32, **case)
    # The float64 and same-dtype references run torch's loss; ours is the last call.
    assert calls == ["forward_and_backward"]


@pytest.mark.parametrize(
    "options,expected",
    [
        (dict(reduction="none"), ["forward", "backward"]),
        (dict(return_lse=True), ["forward", "backward"]),
    ],
    ids=["reduction_none", "return_lse"],
)
def test_non_scalar_upstream_gradient_recomputes(calls, options, expected):
    """reduction='none' and return_lse give the loss (or lse) a gradient per row, unknown in the
    forward: the forward and the recompute backward run, and stay exact."""
    inputs = reference.make_inputs(N, V, D, torch.float32, bias=True, ignored="some", seed=2)
    if options.get("return_lse"):
        def ours(*args, **kwargs):
            loss, lse = unfiltered(*args, return_lse=True, **kwargs)
            return loss + 0.5 * lse.sum()

        def theirs(input, linear_weight, target, *, linear_bias, weight):
            logits = torch.nn.functional.linear(input, linear_weight, linear_bias)
            return (torch.nn.functional.cross_entropy(logits, target)
                    + 0.5 * logits.logsumexp(-1).sum())

        reference.check_against_reference(ours, inputs, torch.float32, reference=theirs)
    else:
        reference.check_against_reference(unfiltered, inputs, torch.float32, **options)
    assert calls == expected


def _reason(inputs, trainable=reference.GRAD_NAMES, class_weight_grad=False, **options):
    leaves = _leaves(inputs, trainable)
    class_weight = inputs["weight"].clone().requires_grad_(class_weight_grad) \
        if inputs["weight"] is not None else None
    return dispatch.one_pass_unavailable_reason(
        leaves["input"], leaves["linear_weight"], leaves.get("linear_bias"), class_weight,
        LossOptions(**options))


def test_one_pass_reasons():
    """Every condition of the one pass, each alone, names itself; all met gives None."""
    inputs = reference.make_inputs(N, V, D, torch.float32, bias=True, class_weight=True, seed=9)
    assert _reason(inputs, reduction="sum", label_smoothing=0.1, softcap=3.0, logit_scale=0.5,
                   filter_grads="input") is None
    assert "reduction='none'" in _reason(inputs, reduction="none")
    assert "outputs=('loss', 'lse')" in _reason(inputs, outputs=("loss", "lse"))
    assert "outputs=('log_probs', 'entropy')" in _reason(inputs, outputs=("log_probs", "entropy"))
    assert "no input requires grad" in _reason(inputs, trainable=())
    assert "class weights" in _reason(inputs, class_weight_grad=True)
    with torch.no_grad():
        assert "disabled" in _reason(inputs)
    with common.cpu_tensors_take_templates(upcast_bf16_dots=False):
        assert "templates" in _reason(inputs)
    seen = []
    classifier = inputs["linear_weight"].clone().requires_grad_()

    def probe(row):
        seen.append(dispatch.one_pass_unavailable_reason(row[None], classifier, None, None,
                                                         LossOptions()))
        return row

    torch.func.vmap(probe)(inputs["input"])
    assert "torch.func" in seen[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("softcap", [None, 4.0], ids=["", "softcap"])
def test_logit_scale_takes_one_pass(calls, dtype, softcap):
    """A logit scale (a temperature, Cohere's and Granite's constant scales) on a scalar loss:
    the one pass applies it, z = scale * softcap(x), within tolerance of float64."""
    def scaled(input, linear_weight, target, *, linear_bias=None, weight=None):
        logits = torch.nn.functional.linear(input, linear_weight, linear_bias)
        if softcap is not None:
            logits = softcap * torch.tanh(logits / softcap)
        return torch.nn.functional.cross_entropy(logits * 0.5, target, weight=weight,
                                                 label_smoothing=0.1)

    inputs = reference.make_inputs(N, V, D, dtype, bias=True, class_weight=True,
                                   ignored="some", seed=3)
    ours = functools.partial(unfiltered, logit_scale=0.5, softcap=softcap, label_smoothing=0.1)
    reference.check_against_reference(ours, inputs, dtype, reference=scaled)
    assert calls == ["forward_and_backward"]


def test_one_pass_options_are_loss_options():
    """The names the one pass claims to compute are LossOptions fields (not stale)."""
    assert dispatch.ONE_PASS_OPTIONS <= {field.name for field in dataclasses.fields(LossOptions)}


def test_an_option_the_one_pass_does_not_know_falls_back(monkeypatch, calls):
    """An option outside ONE_PASS_OPTIONS (as a new output would be until the one pass learns
    it) at a value other than its default sends the loss to the forward and backward ops, which
    stay exact; at its default the one pass still serves."""
    monkeypatch.setattr(dispatch, "ONE_PASS_OPTIONS", dispatch.ONE_PASS_OPTIONS - {"softcap"})
    inputs = reference.make_inputs(N, V, D, torch.float32, bias=True, ignored="some", seed=10)
    assert "option softcap=4.0" in _reason(inputs, softcap=4.0)
    reference.check_against_reference(unfiltered, inputs, torch.float32, softcap=4.0)
    assert calls == ["forward", "backward"]
    calls.clear()
    reference.check_against_reference(unfiltered, inputs, torch.float32)
    assert calls == ["forward_and_backward"]


def test_no_gradient_wanted_runs_the_forward_only(calls):
    inputs = reference.make_inputs(N, V, D, torch.float32, bias=True, seed=3)
    with torch.no_grad():
        leaves = _leaves(inputs)
        loss = unfiltered(leaves["input"], leaves["linear_weight"], inputs["target"],
                          linear_bias=leaves["linear_bias"])
    assert not loss.requires_grad
    frozen = _leaves(inputs, trainable=())
    loss = unfiltered(frozen["input"], frozen["linear_weight"], inputs["target"],
                      linear_bias=frozen["linear_bias"])
    assert not loss.requires_grad
    assert calls == ["forward", "forward"]


def test_class_weights_requiring_grad_take_the_path_that_refuses_their_gradient(calls):
    inputs = reference.make_inputs(N, V, D, torch.float32, class_weight=True, seed=4)
    leaves = _leaves(inputs)
    loss = unfiltered(leaves["input"], leaves["linear_weight"], inputs["target"],
                      weight=inputs["weight"].clone().requires_grad_())
    with pytest.raises(NotImplementedError, match="`weight`"):
        loss.backward()
    assert calls == ["forward"]


def _grads(inputs, backward, reduction="mean"):
    leaves = _leaves(inputs)
    loss = unfiltered(leaves["input"], leaves["linear_weight"], inputs["target"],
                      linear_bias=leaves["linear_bias"], reduction=reduction)
    backward(loss)
    return {name: leaf.grad for name, leaf in leaves.items()}


def test_loss_used_twice_is_exact(calls):
    """(loss + loss) sends an upstream gradient of 2; the gradients are twice those of a single
    backward, exactly (scaling by 2 rounds nothing)."""
    inputs = reference.make_inputs(N, V, D, torch.float32, bias=True, ignored="some", seed=5)
    once = _grads(inputs, lambda loss: loss.backward())
    twice = _grads(inputs, lambda loss: (loss + loss).backward())
    for name, grad in once.items():
        torch.testing.assert_close(twice[name], 2 * grad, rtol=0, atol=0)
    assert calls == ["forward_and_backward"] * 2


def test_retained_graph_backward_twice(calls):
    """A second backward through a retained graph adds the same gradients again while the
    upstream gradient is 1; after one that scaled them in place it raises."""
    inputs = reference.make_inputs(N, V, D, torch.float32, bias=True, ignored="some", seed=6)
    once = _grads(inputs, lambda loss: loss.backward())

    def backward_twice(loss):
        loss.backward(retain_graph=True)
        loss.backward()

    twice = _grads(inputs, backward_twice)
    for name, grad in once.items():
        torch.testing.assert_close(twice[name], 2 * grad, rtol=0, atol=0)

    def scaled_backward_twice(loss):
        scaled = 4 * loss
        scaled.backward(retain_graph=True)
        with pytest.raises(RuntimeError, match="second backward"):
            scaled.backward()

    scaled = _grads(inputs, scaled_backward_twice)
    for name, grad in once.items():  # the first, scaled backward was exact
        torch.testing.assert_close(scaled[name], 4 * grad, rtol=0, atol=0)


def test_double_backward_raises():
    """create_graph=True still gives the right first derivatives; differentiating them raises
    instead of silently contributing nothing."""
    inputs = reference.make_inputs(N, V, D, torch.float32, seed=7)
    leaves = _leaves(inputs)
    loss = unfiltered(leaves["input"], leaves["linear_weight"], inputs["target"])
    grad_input, grad_weight = torch.autograd.grad(
        loss, (leaves["input"], leaves["linear_weight"]), create_graph=True
    )
    expected = reference.loss_and_grads(unfiltered, inputs, torch.float32)
    torch.testing.assert_close(grad_input, expected["input"], rtol=0, atol=0)
    torch.testing.assert_close(grad_weight, expected["linear_weight"], rtol=0, atol=0)
    penalty = grad_input.pow(2).sum() + loss  # the loss term alone would still reach the leaves
    with pytest.raises(RuntimeError, match="second derivative"):
        penalty.backward()


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("ignored", ["none", "some", "all"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.3])
@pytest.mark.parametrize("class_weight", ["none", "random", "zero_for_one_target"])
def test_loss_gradients_are_autograds(reduction, ignored, label_smoothing, class_weight):
    """The one-pass row coefficients equal autograd's gradients of the loss through row_losses
    and reduce_loss, nan included (a 'mean' whose class weights sum to 0 over the valid rows)."""
    gen = torch.Generator().manual_seed(8)
    target = torch.randint(0, V, (N,), generator=gen)
    if ignored == "some":
        target[::3] = -100
    elif ignored == "all":
        target[:] = -100
    weights = None
    if class_weight != "none":
        weights = torch.rand(V, generator=gen) + 0.5
        if class_weight == "zero_for_one_target":
            weights[target[target >= 0]] = 0.0
    stats = [torch.randn(N, generator=gen).requires_grad_() for _ in range(3)]
    loss, denominator = losses.row_losses(*stats, target, weights, -100, label_smoothing, V)
    reduced = losses.reduce_loss(loss, denominator, torch.Size(), reduction)
    expected = torch.autograd.grad(
        reduced, stats,
        allow_unused=True, materialize_grads=True,
    )
    ours = losses.loss_gradients(target, weights, -100, label_smoothing, V, reduction,
                              torch.float32)
    for got, want in zip(ours, expected):
        torch.testing.assert_close(got, want, equal_nan=True)
    if class_weight == "zero_for_one_target" and reduction == "mean" and ignored != "all":
        assert ours[0][target >= 0].isnan().all()  # 0 / 0, as torch's own gradient
