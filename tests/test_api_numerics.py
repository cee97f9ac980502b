"""Numerics of the explicit API on CPU against a float64 `linear -> cross_entropy` reference.

Every comparison uses the tolerance rule of `reference.py` (our error no worse than torch's own
same-dtype error times a factor plus a margin). Parity tests run with filter_eps=None; the
gradient filter has its own tests at the end.
"""

from __future__ import annotations

import functools
import zlib

import pytest
import torch
import torch.nn.functional as F

import cce_inductor
import reference
from cce_inductor import arguments, blocked, filter_stats

pytestmark = pytest.mark.usefixtures("single_threaded")

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# V and D are multiples of no block size; N spans several small token blocks.
N, V, D = 37, 2053, 67

unfiltered = functools.partial(cce_inductor.linear_cross_entropy, filter_eps=None)


@pytest.fixture
def small_blocks(monkeypatch):
    """Several token and vocab tiles (with ragged last tiles) at test sizes."""
    monkeypatch.setattr(blocked, "TOKEN_BLOCK", 16)
    monkeypatch.setattr(blocked, "VOCAB_BLOCK", 256)


def _seed(*params) -> int:
    return zlib.crc32(repr(params).encode())


@pytest.mark.parametrize("class_weight", [False, True], ids=["", "class_weight"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1], ids=["", "smooth"])
@pytest.mark.parametrize("softcap", [None, 5.0], ids=["", "softcap"])
@pytest.mark.parametrize("bias", [False, True], ids=["", "bias"])
@pytest.mark.parametrize("ignored", ["none", "some", "all"], ids=lambda s: f"ignored_{s}")
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_reference(
    small_blocks, dtype, reduction, ignored, bias, softcap, label_smoothing, class_weight
):
    params = (dtype, reduction, ignored, bias, softcap, label_smoothing, class_weight)
    inputs = reference.make_inputs(
        N, V, D, dtype, bias=bias, class_weight=class_weight, ignored=ignored, seed=_seed(*params)
    )
    reference.check_against_reference(
        unfiltered, inputs, dtype,
        reduction=reduction, label_smoothing=label_smoothing, softcap=softcap,
    )


@pytest.mark.parametrize("all_options", [False, True], ids=["plain", "all_options"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_reference_default_blocks(dtype, all_options):
    """The shipped block sizes: one token block, V > VOCAB_BLOCK with a 5-column last tile."""
    assert N < blocked.TOKEN_BLOCK < V and V % blocked.VOCAB_BLOCK
    inputs = reference.make_inputs(
        N, V, D, dtype, bias=all_options, class_weight=all_options,
        ignored="some" if all_options else "none", seed=_seed(dtype, all_options),
    )
    reference.check_against_reference(
        unfiltered, inputs, dtype,
        label_smoothing=0.1 if all_options else 0.0, softcap=5.0 if all_options else None,
    )


def test_many_token_blocks_default_vocab_block(monkeypatch):
    """N > TOKEN_BLOCK with the shipped VOCAB_BLOCK (TOKEN_BLOCK lowered to keep N small)."""
    monkeypatch.setattr(blocked, "TOKEN_BLOCK", 8)
    inputs = reference.make_inputs(N, V, D, torch.float32, bias=True, ignored="some", seed=3)
    reference.check_against_reference(unfiltered, inputs, torch.float32, reduction="sum")


@pytest.mark.parametrize("non_default", [-1, 3], ids=["negative", "inside_vocab"])
def test_other_ignore_index(small_blocks, non_default):
    inputs = reference.make_inputs(
        N, V, D, torch.float32, ignored="some", ignore_index=non_default, seed=4
    )
    reference.check_against_reference(
        unfiltered, inputs, torch.float32, ignore_index=non_default, label_smoothing=0.1
    )


# ---------------------------------------------------------------- lse and z-loss

def _logsumexp_reference(input, linear_weight, target, *, linear_bias, weight, softcap):
    return reference.softcapped_logits(input, linear_weight, linear_bias, softcap).logsumexp(-1)


def _lse_ours(input, linear_weight, target, *, linear_bias, weight, softcap):
    _, lse = unfiltered(
        input, linear_weight, target, linear_bias=linear_bias, weight=weight, softcap=softcap,
        return_lse=True,
    )
    return lse


@pytest.mark.parametrize("softcap", [None, 5.0], ids=["", "softcap"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_return_lse(small_blocks, dtype, softcap):
    """lse and its gradients (a random upstream gradient on lse alone)."""
    inputs = reference.make_inputs(N, V, D, dtype, bias=True, ignored="some", seed=5)
    result = reference.check_against_reference(
        _lse_ours, inputs, dtype, reference=_logsumexp_reference, softcap=softcap
    )
    assert result["loss"].dtype == torch.float32 and result["loss"].shape == (N,)


Z_LOSS = 1e-4


def _z_loss_reference(input, linear_weight, target, *, linear_bias, weight):
    logits = F.linear(input, linear_weight, linear_bias)
    loss = F.cross_entropy(logits, target, weight=weight)
    return loss + Z_LOSS * (logits.logsumexp(-1) ** 2).mean()


def _z_loss_ours(input, linear_weight, target, *, linear_bias, weight):
    loss, lse = unfiltered(
        input, linear_weight, target, linear_bias=linear_bias, weight=weight, return_lse=True
    )
    return loss + Z_LOSS * (lse**2).mean()


def test_z_loss_gradients(small_blocks):
    inputs = reference.make_inputs(N, V, D, torch.float32, bias=True, ignored="some", seed=6)
    reference.check_against_reference(
        _z_loss_ours, inputs, torch.float32, reference=_z_loss_reference
    )
    # The z-loss term is visible at this precision: dropping it breaks the tolerance.
    with_z = reference.loss_and_grads(_z_loss_reference, inputs, torch.float64)
    without_z = reference.loss_and_grads(unfiltered, inputs, torch.float64)
    error = reference.relative_error(without_z["input"], with_z["input"])
    assert error > 100 * reference.TOLERANCES[torch.float32].margin


# ---------------------------------------------------------------- API surface

def test_module_matches_function(small_blocks):
    inputs = reference.make_inputs(N, V, D, torch.float32, bias=True, class_weight=True,
                                   ignored="some", ignore_index=-1, seed=7)
    options = dict(reduction="sum", ignore_index=-1, label_smoothing=0.1, softcap=5.0,
                   filter_eps=None, return_lse=True)
    module = cce_inductor.LinearCrossEntropy(weight=inputs["weight"], **options)
    args = (inputs["input"], inputs["linear_weight"], inputs["target"])
    loss, lse = module(*args, linear_bias=inputs["linear_bias"])
    expected_loss, expected_lse = cce_inductor.linear_cross_entropy(
        *args, linear_bias=inputs["linear_bias"], weight=inputs["weight"], **options
    )
    torch.testing.assert_close(loss, expected_loss, rtol=0, atol=0)
    torch.testing.assert_close(lse, expected_lse, rtol=0, atol=0)
    assert "weight" in dict(module.named_buffers())


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_leading_dimensions(small_blocks, reduction):
    """input [B, T, D] with target [B, T] is the flattened problem; 'none' keeps [B, T]."""
    b, t = 3, 13
    flat = reference.make_inputs(b * t, V, D, torch.float32, bias=True, ignored="some", seed=8)
    batched = dict(flat, input=flat["input"].reshape(b, t, D), target=flat["target"].reshape(b, t))
    result = reference.check_against_reference(
        unfiltered, batched, torch.float32, reduction=reduction
    )
    assert result["loss"].shape == ((b, t) if reduction == "none" else ())
    assert result["input"].shape == (b, t, D)
    # For 'none' both runs draw the same upstream gradient, in row-major order.
    flat_result = reference.loss_and_grads(unfiltered, flat, torch.float32, reduction=reduction)
    torch.testing.assert_close(result["loss"].flatten(), flat_result["loss"].flatten())
    torch.testing.assert_close(result["input"].reshape(b * t, D), flat_result["input"])


def test_one_dimensional_input():
    """input [D] with a 0-d target, as F.cross_entropy takes logits [C] with a 0-d target."""
    inputs = reference.make_inputs(1, V, D, torch.float32, bias=True, seed=9)
    single = dict(inputs, input=inputs["input"][0], target=inputs["target"][0])
    for reduction in ("mean", "none"):
        result = reference.check_against_reference(
            unfiltered, single, torch.float32, reduction=reduction
        )
        assert result["loss"].shape == () and result["input"].shape == (D,)


def test_non_contiguous_inputs_and_int32_target(small_blocks):
    """Strided views (a transposed input, every other classifier column) and int32 targets."""
    inputs = reference.make_inputs(N, V, 2 * D, torch.float32, bias=True, ignored="some", seed=16)
    strided = dict(
        inputs,
        input=inputs["input"][:, :D].T.contiguous().T,
        linear_weight=inputs["linear_weight"][:, ::2],
        target=inputs["target"].int(),
    )
    assert not strided["input"].is_contiguous() and not strided["linear_weight"].is_contiguous()
    contiguous = dict(strided, input=strided["input"].contiguous(),
                      linear_weight=strided["linear_weight"].contiguous(), target=inputs["target"])
    ours = reference.loss_and_grads(unfiltered, strided, torch.float32, label_smoothing=0.1)
    expected = reference.loss_and_grads(unfiltered, contiguous, torch.float32, label_smoothing=0.1)
    for name, value in expected.items():
        torch.testing.assert_close(ours[name], value)
    reference.check_against_reference(unfiltered, contiguous, torch.float32, label_smoothing=0.1)


def test_full_label_smoothing(small_blocks):
    inputs = reference.make_inputs(N, V, D, torch.float32, class_weight=True, ignored="some",
                                   seed=17)
    reference.check_against_reference(unfiltered, inputs, torch.float32, label_smoothing=1.0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_output_and_gradient_dtypes(dtype):
    inputs = reference.make_inputs(5, 300, 16, dtype, bias=True, class_weight=True, seed=10)
    for reduction in ("mean", "none"):
        result = reference.loss_and_grads(
            cce_inductor.linear_cross_entropy, inputs, dtype, reduction=reduction,
            label_smoothing=0.1,
        )
        assert result["loss"].dtype == torch.float32
        for name in reference.GRAD_NAMES:
            assert result[name].dtype == dtype, name
    _, lse = cce_inductor.linear_cross_entropy(
        inputs["input"], inputs["linear_weight"], inputs["target"], return_lse=True
    )
    assert lse.dtype == torch.float32


@pytest.mark.parametrize(
    "trainable",
    [("input",), ("linear_weight",), ("linear_bias",), ("input", "linear_bias"),
     ("linear_weight", "linear_bias")],
    ids=lambda names: "+".join(names),
)
def test_only_requested_gradients_computed(monkeypatch, trainable):
    """A frozen tensor's gradient is neither returned nor computed by the backward op."""
    calls = []
    original = blocked.backward

    def spy(*args):
        calls.append(args[11:14])  # input_needs_grad, weight_needs_grad, bias_needs_grad
        return original(*args)

    monkeypatch.setattr(blocked, "backward", spy)
    inputs = reference.make_inputs(11, 300, 16, torch.float32, bias=True, ignored="some", seed=11)
    full = reference.loss_and_grads(unfiltered, inputs, torch.float32)
    calls.clear()

    tensors = {name: inputs[name].clone().requires_grad_(name in trainable)
               for name in reference.GRAD_NAMES}
    unfiltered(
        tensors["input"], tensors["linear_weight"], inputs["target"],
        linear_bias=tensors["linear_bias"],
    ).backward()
    assert calls == [tuple(name in trainable for name in reference.GRAD_NAMES)]
    for name, tensor in tensors.items():
        if name in trainable:
            torch.testing.assert_close(tensor.grad, full[name], rtol=0, atol=0)
        else:
            assert tensor.grad is None


def test_nothing_trainable_runs_no_backward():
    inputs = reference.make_inputs(11, 300, 16, torch.float32, seed=12)
    loss = cce_inductor.linear_cross_entropy(
        inputs["input"], inputs["linear_weight"], inputs["target"]
    )
    assert not loss.requires_grad


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_empty_input(reduction):
    """N = 0 gives what F.cross_entropy gives: nan mean, 0 sum, empty 'none'; zero gradients."""
    inputs = reference.make_inputs(0, 300, 16, torch.float32, bias=True, seed=13)
    ours = reference.loss_and_grads(unfiltered, inputs, torch.float32, reduction=reduction)
    expected = reference.loss_and_grads(
        reference.torch_linear_cross_entropy, inputs, torch.float32, reduction=reduction
    )
    for name, value in expected.items():
        torch.testing.assert_close(ours[name], value, equal_nan=True, rtol=0, atol=0)
    if reduction == "mean":
        assert ours["loss"].isnan()


def test_all_ignored_mean_is_nan_with_zero_gradients(small_blocks):
    inputs = reference.make_inputs(N, V, D, torch.float32, bias=True, class_weight=True,
                                   ignored="all", seed=14)
    for label_smoothing in (0.0, 0.1):
        ours = reference.loss_and_grads(unfiltered, inputs, torch.float32,
                                        label_smoothing=label_smoothing)
        expected = reference.loss_and_grads(reference.torch_linear_cross_entropy, inputs,
                                            torch.float32, label_smoothing=label_smoothing)
        assert ours["loss"].isnan() and expected["loss"].isnan()
        for name in reference.GRAD_NAMES:
            assert torch.equal(ours[name], expected[name]) and not ours[name].any(), name


# ---------------------------------------------------------------- gradient filtering

@pytest.fixture
def filter_blocks(monkeypatch):
    # 4 token blocks x 32 vocab tiles x 2 filter blocks: a token block's 16 rows need at most
    # 16 + 4 of its 64 filter blocks.
    monkeypatch.setattr(blocked, "TOKEN_BLOCK", 16)
    monkeypatch.setattr(blocked, "VOCAB_BLOCK", 256)
    monkeypatch.setattr(blocked, "FILTER_BLOCK", 128)


def test_filter_skips_most_blocks_of_peaked_rows(filter_blocks):
    inputs = reference.peaked_inputs(torch.bfloat16)
    with filter_stats.collect() as stats:
        reference.check_against_reference(
            functools.partial(cce_inductor.linear_cross_entropy, filter_eps="auto"),
            inputs, torch.bfloat16,
        )
    assert stats.total == 4 * 32 * 2
    assert stats.fraction > 0.6, stats
    # Control: an eps that also drops the p ~ 1e-2 columns u breaks the tolerance, so the
    # check above is able to fail.
    with pytest.raises(AssertionError, match="exceeds"):
        reference.check_against_reference(
            functools.partial(cce_inductor.linear_cross_entropy, filter_eps=0.1),
            inputs, torch.bfloat16,
        )


def test_filter_off_skips_nothing(filter_blocks):
    inputs = reference.peaked_inputs(torch.bfloat16)
    for filter_eps in (None, 0.0):
        with filter_stats.collect() as stats:
            reference.loss_and_grads(cce_inductor.linear_cross_entropy, inputs, torch.bfloat16,
                                     filter_eps=filter_eps)
        assert stats.skipped == 0, (filter_eps, stats)


def test_filter_auto_is_off_for_float32(filter_blocks):
    assert arguments.resolve_filter_eps("auto", torch.float32) is None
    assert arguments.resolve_filter_eps("auto", torch.bfloat16) == 2.0**-12
    inputs = reference.peaked_inputs(torch.float32)
    with filter_stats.collect() as stats:
        reference.loss_and_grads(cce_inductor.linear_cross_entropy, inputs, torch.float32)
    assert stats.skipped == 0, stats
    # An explicit eps does filter fp32: the data above is skippable.
    with filter_stats.collect() as stats:
        reference.loss_and_grads(cce_inductor.linear_cross_entropy, inputs, torch.float32,
                                 filter_eps=2.0**-12)
    assert stats.fraction > 0.6, stats


def test_filter_never_skips_with_label_smoothing(filter_blocks):
    """Label smoothing makes every dz entry non-negligible."""
    inputs = reference.peaked_inputs(torch.bfloat16)
    with filter_stats.collect() as stats:
        reference.loss_and_grads(cce_inductor.linear_cross_entropy, inputs, torch.bfloat16,
                                 label_smoothing=0.1)
    assert stats.skipped == 0, stats
