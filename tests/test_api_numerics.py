"""Numerics of the explicit API on CPU against a float64 `linear -> cross_entropy` reference.

Every comparison uses the tolerance rule of `reference.py` (our error no worse than torch's own
same-dtype error times a factor plus a margin). Parity tests run with filter_eps=None; the
gradient filter has its own tests at the end.
"""

from __future__ import annotations

import functools
import inspect
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
    """Several row chunks and gradient vocabulary blocks, each with a ragged last one, at test
    sizes."""
    monkeypatch.setattr(blocked, "chunk_rows", lambda n, vocab, hidden, dtype: 16)
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
    """The shipped block sizes: one chunk, V > VOCAB_BLOCK with a ragged last block."""
    assert N < blocked.chunk_rows(N, V, D, dtype)
    assert V > blocked.VOCAB_BLOCK and V % blocked.VOCAB_BLOCK
    inputs = reference.make_inputs(
        N, V, D, dtype, bias=all_options, class_weight=all_options,
        ignored="some" if all_options else "none", seed=_seed(dtype, all_options),
    )
    reference.check_against_reference(
        unfiltered, inputs, dtype,
        label_smoothing=0.1 if all_options else 0.0, softcap=5.0 if all_options else None,
    )


def test_many_chunks_default_vocab_block(monkeypatch):
    """Several chunks with the shipped VOCAB_BLOCK (chunks lowered to 8 rows to keep N small)."""
    monkeypatch.setattr(blocked, "chunk_rows", lambda n, vocab, hidden, dtype: 8)
    inputs = reference.make_inputs(N, V, D, torch.float32, bias=True, ignored="some", seed=3)
    reference.check_against_reference(unfiltered, inputs, torch.float32, reduction="sum")


def _peaked_logits_inputs(target_is_argmax: bool) -> dict:
    """fp32 logits of standard deviation ~500 (input ~ N(0, 40^2), classifier ~ N(0, 3^2),
    D = 16): many rows are one-hot in fp32. With target_is_argmax every other row's target is
    its largest logit; where that row is one-hot, torch's gradient row is exactly 0."""
    gen = torch.Generator().manual_seed(18)
    input = torch.randn(20, 16, generator=gen) * 40
    linear_weight = torch.randn(300, 16, generator=gen) * 3
    target = torch.randint(0, 300, (20,), generator=gen)
    if target_is_argmax:
        target[::2] = (input.double() @ linear_weight.double().T).argmax(1)[::2]
    return {"input": input, "linear_weight": linear_weight, "linear_bias": None, "weight": None,
            "target": target}


@pytest.mark.parametrize("target_is_argmax", [False, True], ids=["random_target", "argmax"])
@pytest.mark.parametrize("reduction", ["mean", "none"], ids=["one_pass", "recompute"])
def test_peaked_fp32_softmax(reduction, target_is_argmax):
    """The softmax of the gradient is torch's exp(log_softmax(z)), in the one-pass path and in
    the recompute backward: a peaked row's dz is 0 where torch's is, and the gradients' error is
    torch's. (p = exp(z - lse) with the fp32 lse had about 75x torch's error in grad input.)"""
    inputs = _peaked_logits_inputs(target_is_argmax)
    ours = reference.check_against_reference(unfiltered, inputs, torch.float32,
                                             reduction=reduction)
    theirs = reference.loss_and_grads(reference.torch_linear_cross_entropy, inputs,
                                      torch.float32, reduction=reduction)
    zero_rows = (theirs["input"] == 0).all(1)
    assert (zero_rows.sum() >= 3) if target_is_argmax else not zero_rows.any()
    assert (ours["input"][zero_rows] == 0).all()


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
    "reduction,implementation",
    [("sum", "forward_and_backward"), ("none", "backward")],
    ids=["one_pass", "recompute"],
)
@pytest.mark.parametrize(
    "trainable",
    [("input",), ("linear_weight",), ("linear_bias",), ("input", "linear_bias"),
     ("linear_weight", "linear_bias")],
    ids=lambda names: "+".join(names),
)
def test_only_requested_gradients_computed(monkeypatch, trainable, reduction, implementation):
    """A frozen tensor's gradient is neither returned nor computed, on the one-pass path (a
    scalar loss) and on the recompute path (the backward op)."""
    calls = []
    original = getattr(blocked, implementation)
    flags = list(inspect.signature(original).parameters).index("input_needs_grad")

    def spy(*args):
        calls.append(args[flags:flags + 3])  # input's, classifier's and bias's needs_grad
        return original(*args)

    monkeypatch.setattr(blocked, implementation, spy)
    inputs = reference.make_inputs(11, 300, 16, torch.float32, bias=True, ignored="some", seed=11)

    def gradients(names):
        tensors = {name: inputs[name].clone().requires_grad_(name in names)
                   for name in reference.GRAD_NAMES}
        unfiltered(
            tensors["input"], tensors["linear_weight"], inputs["target"],
            linear_bias=tensors["linear_bias"], reduction=reduction,
        ).sum().backward()
        return {name: tensor.grad for name, tensor in tensors.items()}

    full = gradients(reference.GRAD_NAMES)
    calls.clear()
    frozen = gradients(trainable)
    assert calls == [tuple(name in trainable for name in reference.GRAD_NAMES)]
    for name, grad in frozen.items():
        if name in trainable:
            torch.testing.assert_close(grad, full[name], rtol=0, atol=0)
        else:
            assert grad is None


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
    # 4 chunks x 64 filter blocks: a chunk's 16 rows need at most 16 + 4 of its 64 blocks.
    monkeypatch.setattr(blocked, "chunk_rows", lambda n, vocab, hidden, dtype: 16)
    monkeypatch.setattr(blocked, "FILTER_BLOCK", 128)


@pytest.mark.parametrize("reduction", ["mean", "none"], ids=["one_pass", "recompute"])
def test_filter_skips_most_blocks_of_peaked_rows(filter_blocks, reduction):
    inputs = reference.peaked_inputs(torch.bfloat16)
    with filter_stats.collect() as stats:
        reference.check_against_reference(
            functools.partial(cce_inductor.linear_cross_entropy, filter_eps="auto"),
            inputs, torch.bfloat16, reduction=reduction,
        )
    assert stats.total == 4 * 64
    assert stats.fraction > 0.6, stats
    # Control: an eps that also drops the p ~ 1e-2 columns u breaks the tolerance, so the
    # check above is able to fail.
    with pytest.raises(AssertionError, match="exceeds"):
        reference.check_against_reference(
            functools.partial(cce_inductor.linear_cross_entropy, filter_eps=0.1),
            inputs, torch.bfloat16,
        )


@pytest.mark.parametrize("reduction", ["sum", "none"], ids=["one_pass", "recompute"])
def test_filter_grads_input(filter_blocks, reduction):
    """filter_grads='input': the classifier's and bias's gradients sum every block (bitwise the
    unfiltered ones), the input's skips blocks (bitwise that of filter_grads='all')."""
    inputs = reference.peaked_inputs(torch.bfloat16)
    inputs["linear_bias"] = torch.zeros(inputs["linear_weight"].shape[0], dtype=torch.bfloat16)

    def grads(**options):
        with filter_stats.collect() as stats:
            result = reference.loss_and_grads(cce_inductor.linear_cross_entropy, inputs,
                                              torch.bfloat16, reduction=reduction, **options)
        return result, stats

    (input_only, stats), (everywhere, _), (unfiltered_grads, _) = (
        grads(filter_grads="input"), grads(), grads(filter_eps=None))
    assert stats.skipped > 0
    for name in ("linear_weight", "linear_bias"):
        assert torch.equal(input_only[name], unfiltered_grads[name]), name
        assert not torch.equal(everywhere[name], unfiltered_grads[name]), name
    assert torch.equal(input_only["input"], everywhere["input"])
    assert not torch.equal(input_only["input"], unfiltered_grads["input"])


@pytest.mark.parametrize("reduction", ["mean", "none"], ids=["one_pass", "recompute"])
def test_bf16_classifier_gradient_by_blocks_of_classes(filter_blocks, monkeypatch, reduction):
    """bf16: grad_classifier comes from the sweep over blocks of classes after the rows (here 4
    blocks of 2048), each class's gradient one bf16 product over all rows. With filtering that
    sweep recomputes only the filter blocks some row chunk needed; the others' gradient rows
    stay 0, and the gradients match float64 all the same."""
    swept = []
    original = blocked._VocabPass._classes

    def spy(self, problem, e, classes, *rest):
        swept.append(torch.arange(classes.start, classes.stop) if isinstance(classes, slice)
                     else classes)
        return original(self, problem, e, classes, *rest)

    monkeypatch.setattr(blocked._VocabPass, "_classes", spy)
    inputs = reference.peaked_inputs(torch.bfloat16)
    vocab = inputs["linear_weight"].shape[0]
    for filter_eps in (None, "auto"):
        swept.clear()
        ours = reference.check_against_reference(
            functools.partial(cce_inductor.linear_cross_entropy, filter_eps=filter_eps),
            inputs, torch.bfloat16, reduction=reduction,
        )
        assert ours["linear_weight"].dtype == torch.bfloat16
        classes = torch.cat(swept)
        if filter_eps is None:
            assert [len(block) for block in swept] == [2048] * 4
            assert torch.equal(classes, torch.arange(vocab))
        else:
            skipped = torch.ones(vocab, dtype=torch.bool)
            skipped[classes] = False
            assert 0 < int(skipped.sum()) and len(classes) == len(classes.unique())
            assert not ours["linear_weight"][skipped].any()


@pytest.mark.parametrize("reduction", ["mean", "none"], ids=["one_pass", "recompute"])
@pytest.mark.parametrize(
    "frozen", [("input",), ("linear_weight",), ("input", "linear_bias"),
               ("linear_weight", "linear_bias")],
    ids=lambda names: "frozen_" + "+".join(names))
def test_bf16_frozen_inputs_match_reference(small_blocks, frozen, reduction):
    """bf16 with some inputs frozen: without grad_input the row sweep computes no dz (the
    sweep over blocks of classes does); without grad_classifier the bias's gradient
    accumulates over the row chunks."""
    inputs = reference.make_inputs(N, V, D, torch.bfloat16, bias=True, class_weight=True,
                                   ignored="some", seed=_seed(frozen, reduction))
    reference.check_against_reference(
        functools.partial(cce_inductor.linear_cross_entropy, filter_eps="auto"), inputs,
        torch.bfloat16, frozen=frozen, reduction=reduction, softcap=6.0,
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


# ---------------------------------------------------------------- determinism

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("reduction", ["sum", "none"], ids=["one_pass", "recompute"])
def test_cpu_path_is_deterministic(small_blocks, monkeypatch, dtype, reduction):
    """Two runs give bitwise the same loss and gradients, on two threads (the CPU path has no
    atomics and a fixed order of operations), with several chunks, class weights, a bias and,
    for bf16, filtering ('auto')."""
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        inputs = reference.make_inputs(96, 2048, 64, dtype, bias=True, class_weight=True,
                                       ignored="some", seed=16)
        runs = [reference.loss_and_grads(cce_inductor.linear_cross_entropy, inputs, dtype,
                                         reduction=reduction) for _ in range(2)]
    finally:
        torch.set_num_threads(previous)
    for name, value in runs[0].items():
        assert torch.equal(value, runs[1][name]), name
