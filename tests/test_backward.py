"""The vocabulary-chunked backward (lowering/backward.py), run by Triton's interpreter on CPU.

Every option through the templates against the float64 reference, with vocabulary chunks one
tile (128 classes) wide so that every V here takes several chunks and the fp32 dE accumulator;
the skip-before-recompute rule; filtering dE only; memory read from the generated code; and the
fp32 consistency of the recomputed logits with the forward's. Shapes are tiny: the interpreter
is slow.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch

import cce_inductor
import reference
from cce_inductor import compat, filter_stats
from cce_inductor.lowering import backward, configs
from cce_inductor.tools import interpreter
from cce_inductor.tools.wrapper_memory import replay

# Two and a half 128-class tiles; 16-bit tiles are 64 rows (two row blocks, the second
# partial), fp32 tiles 32 rows (three); D spans several BLOCK_D steps, ragged.
N, V, D = 70, 300, 40


pytestmark = pytest.mark.usefixtures("fresh_compile", "one_tile_chunks")


def compiled_api(dynamic: bool = False, **options):
    return functools.partial(
        torch.compile(cce_inductor.linear_cross_entropy, backend="inductor", dynamic=dynamic),
        **options,
    )


def run(dtype, fn, inputs, **options):
    """Loss and gradients of `fn` under the interpreter, checked against the reference; the
    results and the generated wrappers."""
    with interpreter.interpreted():
        return compat.run_and_get_code(reference.check_against_reference, fn, inputs, dtype,
                                       **options)


CASES = {
    "bf16-bias-softcap-mean": (torch.bfloat16, dict(bias=True), dict(softcap=5.0)),
    "fp16-ignored-none": (torch.float16, dict(ignored="some"), dict(reduction="none")),
    "fp32-weights-smoothing-sum": (torch.float32, dict(class_weight=True, ignored="some"),
                                   dict(label_smoothing=0.1, reduction="sum")),
    "bf16-weights-smoothing-softcap": (torch.bfloat16, dict(class_weight=True, bias=True),
                                       dict(label_smoothing=0.2, softcap=3.0)),
    "fp32-ignore-index-3": (torch.float32, dict(bias=True), dict(ignore_index=3)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference_over_chunks(case):
    dtype, input_options, options = CASES[case]
    inputs = reference.make_inputs(N, V, D, dtype, **input_options)
    if "ignore_index" in options:
        inputs["target"][::4] = options["ignore_index"]
    _, codes = run(dtype, compiled_api(), inputs, **options)
    source = "".join(codes)
    assert "ACCUMULATE : tl.constexpr = True" in source  # three chunks, fp32 dE accumulator
    assert source.count("triton_tem_") >= 4


@pytest.mark.parametrize("trainable", [("input",), ("linear_weight",), ("linear_bias",),
                                       ("linear_weight", "linear_bias")],
                         ids=lambda names: "+".join(names))
def test_only_requested_gradients(trainable):
    """A frozen tensor's gradient costs no work: NEED_* constexprs off, no buffer for it."""
    inputs = reference.make_inputs(N, V, D, torch.bfloat16, bias=True, seed=2)

    def grads(fn, dtype):
        leaves = {name: inputs[name].detach().to(dtype).requires_grad_(name in trainable)
                  for name in reference.GRAD_NAMES}
        fn(leaves["input"], leaves["linear_weight"], inputs["target"],
           linear_bias=leaves["linear_bias"]).backward()
        return {name: leaves[name].grad for name in trainable}

    with interpreter.interpreted():
        ours, codes = compat.run_and_get_code(grads, compiled_api(), torch.bfloat16)
    source = "".join(codes)
    for flag, name in (("NEED_DE", "input"), ("NEED_DC", "linear_weight"),
                       ("NEED_DBIAS", "linear_bias")):
        assert f"{flag} : tl.constexpr = {name in trainable}" in source
    reference.assert_close_to_reference(
        ours, grads(reference.torch_linear_cross_entropy, torch.bfloat16), lambda: None,
        grads(reference.torch_linear_cross_entropy, torch.float64), torch.bfloat16,
    )


def test_dynamic_rows_and_split_forward():
    """dynamic=True: one compiled backward for several N (its chunk count is a constant, the
    dz buffer follows N), after a forward whose vocabulary is split (V = 300 takes 3 splits
    at N <= 64 on the interpreter's 4 SMs)."""
    fn = compiled_api(dynamic=True)
    with interpreter.interpreted():
        _, codes = compat.run_and_get_code(
            reference.check_against_reference, fn,
            reference.make_inputs(N, V, D, torch.bfloat16, bias=True), torch.bfloat16)
        for n in (5, 33):
            reference.check_against_reference(
                fn, reference.make_inputs(n, V, D, torch.bfloat16, bias=True, seed=n),
                torch.bfloat16)
    assert len(codes) == 2


def logits_as_inputs(logits: torch.Tensor, target: torch.Tensor, dtype: torch.dtype) -> dict:
    """Inputs whose logits are `logits` (exactly, when representable): classifier = identity."""
    v = logits.shape[1]
    return {"input": logits.to(dtype), "linear_weight": torch.eye(v).to(dtype),
            "linear_bias": None, "weight": None, "target": target}


def peaked_inputs(dtype: torch.dtype, n: int = N, v: int = 512):
    """Confident rows: target logit 16, the others in [-2, 2], targets in the first tile; the
    other tiles' softmax is below 1e-6, negligible by far."""
    gen = torch.Generator().manual_seed(0)
    target = torch.randint(0, 64, (n,), generator=gen)
    logits = torch.rand(n, v, generator=gen) * 4 - 2
    logits[torch.arange(n), target] = 16.0
    return logits_as_inputs(logits, target, dtype)


def test_filter_grads_input_sums_every_tile_for_the_classifier():
    """filter_grads='input' (the paper's pretraining recipe): the classifier's gradient is
    bitwise that of the unfiltered backward, the input's that of the filtered one."""
    inputs = peaked_inputs(torch.bfloat16)
    results = {}
    for label, options in (("all", {}), ("input", {"filter_grads": "input"}),
                           ("none", {"filter_eps": None})):
        torch.compiler.reset()
        with filter_stats.counting(), filter_stats.collect() as stats:
            results[label], _ = run(torch.bfloat16, compiled_api(**options), inputs)
        results[label]["stats"] = stats
    assert results["all"]["stats"].skipped > 0
    assert results["input"]["stats"].early == 0  # the classifier needs every tile's dz
    assert torch.equal(results["input"]["linear_weight"], results["none"]["linear_weight"])
    assert torch.equal(results["input"]["input"], results["all"]["input"])
    assert not torch.equal(results["all"]["linear_weight"], results["none"]["linear_weight"])


def adversarial_logits(dtype: torch.dtype) -> dict:
    """Logits set directly (logits_as_inputs, V = 256): two row groups of 16, targets in tile 0. Group 0 holds row 0, confident (lse ~ 20) with large logits (8) in tile
    1, and row 1, unsure (lse ~ 5.9) with logits 0 there: tile 1's maximum comes from row 0,
    yet row 1's softmax there is about 3e-3 > 2**-12, so the tile matters. Group 1's rows are
    all confident: tile 1 is negligible for them, provably so from the forward's tile maxima."""
    logits = torch.zeros(32, 256)
    target = torch.arange(32) % 64
    logits[torch.arange(32), target] = 20.0
    logits[0, 128:] = 8.0
    logits[1, target[1]] = 5.0
    return logits_as_inputs(logits, target, dtype)


def exact_negligible_tiles(inputs: dict, block_n: int, eps: float) -> int:
    """Tiles (block_n rows x 128 classes) whose float64 softmax is below eps with no target."""
    z = inputs["input"].double() @ inputs["linear_weight"].double().T
    p = (z - z.logsumexp(1, keepdim=True)).exp()
    count = 0
    for r0 in range(0, z.shape[0], block_n):
        for v0 in range(0, z.shape[1], 128):
            rows = slice(r0, r0 + block_n)
            targets = inputs["target"][rows]
            holds = bool(((targets >= v0) & (targets < v0 + 128)).any())
            count += bool(p[rows, v0:v0 + 128].max() < eps) and not holds
    return count


def test_skip_before_recompute_never_skips_a_tile_that_matters():
    """With 16-row tiles (two row blocks, the groups of tile_max), tile 1 of row block 0 matters
    (row 1) although its maximum logit comes from a row for which it is negligible: a rule
    comparing the block's maximum with anything but each row's own lse would skip it (and dE of
    row 1 would miss ~3e-3 x 128 of its softmax). It is kept; row block 1's tile 1 is skipped
    before its logits are recomputed; the counts are exactly float64's."""
    inputs = adversarial_logits(torch.float32)
    eps = 2.0**-12
    tile = configs.LogitTile(block_n=16, block_v=128, block_d=32, num_warps=4)
    fn = compiled_api(filter_eps=eps)
    with configs.forced(tile=tile), filter_stats.counting(), \
            filter_stats.collect() as stats, interpreter.interpreted():
        ours = reference.loss_and_grads(fn, inputs, torch.float32, reduction="sum")
    assert exact_negligible_tiles(inputs, 16, eps) == 1
    assert (stats.total, stats.skipped, stats.early) == (4, 1, 1)
    # The gradients (the loss of rows with lse ~ 20 is another matter: lse - target logit
    # in fp32 keeps ulp(20) of it, where torch's log_softmax keeps its own precision).
    grads = {name: ours[name] for name in ("input", "linear_weight")}

    def torch_grads(dtype):
        result = reference.loss_and_grads(reference.torch_linear_cross_entropy, inputs, dtype,
                                          reduction="sum")
        return {name: result[name] for name in grads}

    reference.assert_close_to_reference(grads, torch_grads(torch.float32), lambda: None,
                                        torch_grads(torch.float64), torch.float32)


def test_early_skipping_on_peaked_rows():
    """Confident rows (peaked_inputs, one 64-row block, 4 tiles): the 3 tiles without targets
    are negligible, as in float64, and all of them are skipped before their logits are
    recomputed; gradients match the reference."""
    inputs = peaked_inputs(torch.bfloat16, n=16)
    with filter_stats.counting(), filter_stats.collect() as stats:
        run(torch.bfloat16, compiled_api(filter_eps=2.0**-12), inputs)
    assert stats.total == 4
    assert stats.skipped == exact_negligible_tiles(inputs, 64, 2.0**-12) == 3
    assert stats.early == 3


def test_tile_max_bounds_the_transformed_logits():
    """tile_max holds each 16-row x 128-class block's largest logit as the softmax sees it,
    z = scale * softcap(x) (softcap 3, temperature 0.4: scale 2.5), not x: compared with the
    float64 block maxima of z (x's would be 2.5 times smaller)."""
    inputs = reference.make_inputs(N, V, D, torch.float32, bias=True)
    softcap, scale = 3.0, 2.5

    def tile_max(e, c, b, t):
        return torch.ops.cce.linear_cross_entropy_fwd(e, c, b, t, None, softcap, False, 2.0**-12,
                                                      True, scale, True)[4]

    with interpreter.interpreted():
        ours = torch.compile(tile_max, backend="inductor")(
            inputs["input"], inputs["linear_weight"], inputs["linear_bias"], inputs["target"])
    x = inputs["input"].double() @ inputs["linear_weight"].double().T + inputs["linear_bias"]
    z = torch.full((-(-N // 16) * 16, -(-V // 128) * 128), float("-inf"), dtype=torch.float64)
    z[:N, :V] = scale * softcap * torch.tanh(x / softcap)
    exact = z.view(-1, 16, z.shape[1] // 128, 128).amax((1, 3)).flatten()
    torch.testing.assert_close(ours.double(), exact, rtol=1e-6, atol=1e-6)


def rl_tile_inputs() -> dict:
    """Logits x set directly (logits_as_inputs; V = 256: two tiles, two row blocks of 16, the
    targets in tile 0 at x = 8, the rest of tile 0 at 0), for temperature 0.5 (z = 2x).
    Row block 0's tile 1 is at x = 3.5: its softmax there, about 2**-13, is below eps = 2**-12,
    but the entropy's gradient p |log p + H| (about 9 p) is not negligible, so the tile
    matters. Row block 1's tile 1 is at x = -4: p about e**-24, negligible with every term."""
    logits = torch.zeros(32, 256)
    target = torch.arange(32) % 64
    logits[:16, 128:] = 3.5
    logits[16:, 128:] = -4.0
    logits[torch.arange(32), target] = 8.0
    return logits_as_inputs(logits, target, torch.float32)


RL_TEMPERATURE = 0.5


def rl_loss(input, linear_weight, target, *, linear_bias=None, weight=None, head=None,
            **options):
    """(log_probs * adv).sum() + entropy.sum() with advantages of +-1/4 (exact in every dtype):
    per row grad_lse = -adv, grad_target_logit = adv, grad_entropy = 1."""
    log_probs, entropy = head(input, linear_weight, target, linear_bias=linear_bias, **options)
    advantages = 0.25 - 0.5 * (torch.arange(log_probs.shape[0]) % 2)
    return (log_probs * advantages).sum() + entropy.sum()


def test_early_skipping_with_entropy_gradients_and_temperature():
    """The dz kernel's two decisions with the entropy's gradient and a logit scale, on
    rl_tile_inputs with 16-row tiles (one tile_max group per row block): row block 1's tile 1
    is skipped before its logits are recomputed; row block 0's tile 1 is kept, although the
    cross-entropy rule (p < eps) would skip it, and although a tile_max of the unscaled logits
    would have skipped it early: both facts are checked on the float64 logits below, so the
    test fails for either mistake. The gradients match the reference."""
    inputs = rl_tile_inputs()
    eps = 2.0**-12
    x = inputs["input"].double()
    z = x / RL_TEMPERATURE
    log_p = z.log_softmax(1)
    p, lse = log_p.exp(), z.logsumexp(1)
    entropy = -(p * log_p).sum(1)
    advantages = 0.25 - 0.5 * (torch.arange(32) % 2)
    dz = p * (-advantages[:, None] - (log_p + entropy[:, None]))
    dz[torch.arange(32), inputs["target"]] += advantages
    tile_1 = (dz[:, 128:].abs() / 1.0).view(2, 16, 128).amax((1, 2))  # r = max(1/4, 1) = 1
    assert tile_1[0] >= eps and tile_1[1] < eps  # row block 0's tile 1 matters, 1's does not
    assert p[:16, 128:].max() < eps  # ... which the cross-entropy rule alone would miss
    unscaled = (x[:16, 128:].max() - lse[:16]).exp()  # a tile_max of x: P far too small
    assert (unscaled * (0.25 + entropy[:16] - unscaled.log())).max() < eps

    head = functools.partial(
        torch.compile(cce_inductor.linear_log_probs, backend="inductor"), return_entropy=True)
    fn = functools.partial(rl_loss, head=head)
    tile = configs.LogitTile(block_n=16, block_v=128, block_d=32, num_warps=4)
    with configs.forced(tile=tile), filter_stats.counting(), \
            filter_stats.collect() as stats, interpreter.interpreted():
        ours = reference.loss_and_grads(fn, inputs, torch.float32, filter_eps=eps,
                                        temperature=RL_TEMPERATURE)
    assert (stats.total, stats.skipped, stats.early) == (4, 1, 1)

    def materialized(dtype):
        return reference.loss_and_grads(
            functools.partial(rl_loss, head=reference.torch_log_probs_and_entropy), inputs,
            dtype, temperature=RL_TEMPERATURE)

    grads = {name: ours[name] for name in ("input", "linear_weight")}
    reference.assert_close_to_reference(
        grads, {name: materialized(torch.float32)[name] for name in grads}, lambda: None,
        {name: materialized(torch.float64)[name] for name in grads}, torch.float32)


def test_long_vocabulary_backward_memory_from_generated_code(monkeypatch):
    """At a long vocabulary the backward allocates, beyond dE and dC, a small fraction of dC:
    the dz chunk [N, 256], the fp32 dE accumulator and the tile maps (read from the wrapper)."""
    monkeypatch.setattr(backward, "DZ_BUDGET_BYTES", 24 * 256 * 2)  # chunks of two tiles
    n, v, d = 24, 4000, 64
    inputs = reference.make_inputs(n, v, d, torch.bfloat16)

    def loss_and_grads(fn):
        leaves = [inputs[name].detach().requires_grad_() for name in ("input", "linear_weight")]
        fn(*leaves, inputs["target"]).backward()

    with interpreter.interpreted():
        _, codes = compat.run_and_get_code(loss_and_grads, compiled_api())
    memory = replay(codes[1])
    gradients = (n + v) * d * 2
    dc_bytes = v * d * 2
    assert memory.peak_bytes - gradients <= 0.15 * dc_bytes, (memory.peak_bytes, gradients)
    shapes = {allocation.shape for allocation in memory.allocations}
    assert (n, 256) in shapes and (n, v) not in shapes


def test_fp32_recomputation_matches_the_forward():
    """fp32, N=20, V=300, D=16, E ~ N(0, 40^2), C ~ N(0, 3^2): logits of order 500, softmax one-hot
    in most rows, where torch's gradient is 0 up to rounding. The backward recomputes exactly
    the forward's logits (the same tile, the same order), so its dE error stays within the
    reference's bound of torch's own fp32 error, as does every other quantity."""
    gen = torch.Generator().manual_seed(0)
    n, v, d = 20, 300, 16
    inputs = {"input": torch.randn(n, d, generator=gen) * 40.0,
              "linear_weight": torch.randn(v, d, generator=gen) * 3.0,
              "linear_bias": None, "weight": None,
              "target": torch.randint(0, v, (n,), generator=gen)}
    assert math.isfinite(float(inputs["input"].abs().max()))
    run(torch.float32, compiled_api(), inputs)
