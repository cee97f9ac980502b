"""The CCE Inductor lowering, run end to end on the CPU through Triton's interpreter.

torch.compile(backend="inductor") of the explicit API renders the Triton templates, launches them
from Inductor's wrapper, and Triton interprets them; the loss and gradients are checked against
the float64 reference (tests/reference.py), the generated code for template kernels and for the
buffers it allocates (none may be O(N*V)). Shapes are tiny: the interpreter is slow.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import re

import pytest
import torch

import cce_inductor
import generated_code
import reference
from cce_inductor import compat, filter_stats
from cce_inductor.lowering import backward, configs, forward
from cce_inductor.tools import interpreter
from generated_code import allocated_shapes, forward_launches, kernel_calls, kernel_sources

# N*V = 1680 is neither N*D = 960 nor V*D = 2800; V and D are no multiples of any block size.
N, D, V = 24, 40, 70


# Fresh compiles; the backward's vocabulary chunks one tile wide (several chunks beyond V = 128).
pytestmark = pytest.mark.usefixtures("fresh_compile", "one_tile_chunks")


assert_fused = functools.partial(generated_code.assert_fused, n=N, v=V, d=D)


def compiled_api(dynamic: bool = False):
    return torch.compile(cce_inductor.linear_cross_entropy, backend="inductor", dynamic=dynamic)


def run_compiled(dtype, options, *, n=N, v=V, d=D, bias=False, class_weight=False,
                 ignored="none", dynamic=False):
    inputs = reference.make_inputs(n, v, d, dtype, bias=bias, class_weight=class_weight,
                                   ignored=ignored)
    with interpreter.interpreted():
        _, codes = compat.run_and_get_code(
            reference.check_against_reference, compiled_api(dynamic), inputs, dtype, **options
        )
    return codes


CASES = {
    "fp32-bias-mean": (torch.float32, dict(bias=True), dict(reduction="mean")),
    "fp32-softcap-ignore-none": (torch.float32, dict(ignored="some"),
                                 dict(softcap=3.0, reduction="none")),
    "fp32-smoothing-weights-sum": (torch.float32, dict(class_weight=True, ignored="some"),
                                   dict(label_smoothing=0.1, reduction="sum")),
    "bf16-bias-softcap": (torch.bfloat16, dict(bias=True), dict(softcap=5.0)),
    "fp16-smoothing-weights": (torch.float16, dict(class_weight=True),
                               dict(label_smoothing=0.2, reduction="mean")),
}


@pytest.mark.parametrize("case", list(CASES))
def test_compiled_matches_reference(case):
    dtype, input_options, options = CASES[case]
    codes = run_compiled(dtype, options, **input_options)
    assert_fused(codes)


# 16-row tiles, vocabulary split to fill two waves of the interpreter's 4 "SMs" (one CTA each),
# row blocks in groups of two.
SPLIT_TILE = configs.LogitTile(block_n=16, block_v=128, block_d=16, num_warps=4)
SPLIT = configs.ForwardConfig(num_stages=1, waves=2, ctas_per_sm=1, group_rows=2)
SPLIT_V = 600  # 5 tiles of 128, the last one 88 wide


@pytest.mark.parametrize("n, grid", [(N, (2, 4)), (36, (3, 2))])
def test_split_vocabulary_forward(n, grid):
    """The forward splits V = 600 (5 tiles) into at most floor(2 waves x 4 slots / row blocks)
    ranges: at N = 24, 2 row blocks x 4 ranges of 2 tiles, [0, 256), [256, 512), [512, 600)
    and an empty one; at N = 36, 3 row blocks (groups of 2 and 1) x 2 ranges. Label smoothing
    with class weights and softcap exercise all three partial statistics."""
    with configs.forced(tile=SPLIT_TILE, forward=SPLIT):
        codes = run_compiled(torch.bfloat16, dict(label_smoothing=0.1, softcap=5.0), n=n,
                             v=SPLIT_V, bias=True, class_weight=True)
    assert forward_launches(codes) == [grid]
    assert_fused(codes, n=n, v=SPLIT_V)


def test_autotuned_forward_fills_unused_split_slots():
    """PARTIALS has a slot for the most ranges any candidate config launches (4 here); a chosen
    config with fewer ranges (here none split) gives the others neutral statistics, which the
    combine then reads. Autotuning is steered to that config by Inductor's choice filter."""
    import torch._inductor.config as inductor_config

    unsplit = dataclasses.replace(SPLIT, waves=0)
    defaults = {kernel.name: kernel.configs_for(torch.float32, 80, False)[0]
                for kernel in backward.KERNELS}
    with configs.forced(tile=SPLIT_TILE, forward=(SPLIT, unsplit), **defaults), \
            inductor_config.patch({"max_autotune": True,
                                   "test_configs.autotune_choice_desc_regex": "^(?!.*WAVES=2)"}):
        codes = run_compiled(torch.float32, dict(label_smoothing=0.1), v=SPLIT_V,
                             class_weight=True)
    assert forward_launches(codes) == [(2, 1)]
    assert "4, 4, 24" in allocated_shapes(codes)
    assert_fused(codes, v=SPLIT_V)


def test_dynamic_rows_compile_once():
    """dynamic=True: one graph serves every N, like torch.compile of a plain linear ->
    cross_entropy: Dynamo traces one frame (no recompile) and Inductor writes one forward and
    one backward wrapper for all four N. The templates take N as a kernel argument; the number
    of vocabulary splits and the partial-statistics buffer follow N at run time."""
    compiled = compiled_api(dynamic=True)
    counters = compat.dynamo_counters()  # process-wide, not cleared by torch.compiler.reset()
    frames, graphs = counters["frames"]["total"], counters["stats"]["unique_graphs"]

    def run_all_rows():
        for n in (N, 7, 33, 40):
            inputs = reference.make_inputs(n, V, D, torch.float32, bias=True, seed=n)
            reference.check_against_reference(compiled, inputs, torch.float32)

    with interpreter.interpreted():
        _, codes = compat.run_and_get_code(run_all_rows)
    assert counters["frames"]["total"] - frames == 1, dict(counters["frames"])
    assert counters["stats"]["unique_graphs"] - graphs == 1, dict(counters["stats"])
    assert len(codes) == 2, len(codes)  # the forward and the backward wrapper
    assert_fused(codes)
    assert not re.search(r"empty_strided_cpu\(\(24, ", "".join(codes))


def test_eager_call_runs_the_templates():
    """An eager call of the explicit API on tensors the templates serve (CUDA; here CPU tensors
    under the interpreter harness) goes through the internal torch.compile: the generated
    wrappers launch the template kernels, loss and gradients match the reference, and another N
    reuses the compiled graph. Dynamo captures one graph for N = 24 and 33, and one for N = 1,
    which it specializes (being fullgraph, the internal compile does not count in
    counters["frames"]). With one row, Inductor drops the LSE store's mask: this checks that
    every lane stores the right value."""
    counters = compat.dynamo_counters()
    graphs = counters["stats"]["unique_graphs"]
    options = dict(softcap=5.0, label_smoothing=0.1)

    def check(n: int) -> None:
        inputs = reference.make_inputs(n, V, D, torch.bfloat16, bias=True, seed=n)
        reference.check_against_reference(cce_inductor.linear_cross_entropy, inputs,
                                          torch.bfloat16, **options)

    with interpreter.interpreted():
        _, codes = compat.run_and_get_code(check, N)
        check(33)
        assert counters["stats"]["unique_graphs"] - graphs == 1, dict(counters["stats"])
        check(1)
        assert counters["stats"]["unique_graphs"] - graphs == 2, dict(counters["stats"])
    assert_fused(codes)


def test_vocab_parallel_eager_call_runs_the_templates(tmp_path):
    """The vocabulary-parallel loss, called eagerly, reaches the templates as the plain API does
    (CUDA; here CPU tensors under the interpreter harness): its forward op and its backward op
    (run with the global lse) both go through the internal torch.compile. One rank holding the
    whole vocabulary, so the collectives are identities and the result is the reference's."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0,
                            world_size=1)
    try:
        loss = functools.partial(cce_inductor.linear_cross_entropy,
                                 vocab_parallel_group=dist.group.WORLD)
        inputs = reference.make_inputs(N, V, D, torch.bfloat16, bias=True, seed=2)
        with interpreter.interpreted():
            _, codes = compat.run_and_get_code(reference.check_against_reference, loss, inputs,
                                               torch.bfloat16, softcap=5.0)
    finally:
        dist.destroy_process_group()
    assert len(codes) == 2, len(codes)  # the forward op's graph and the backward op's
    assert_fused(codes)


@pytest.mark.parametrize("deterministic", [False, True])
def test_backward_is_reproducible(deterministic):
    """With or without use_deterministic_algorithms the backward is the atomics-free one: no
    atomic in any generated kernel, the same bits on every run (V = 300: three chunks)."""
    inputs = reference.make_inputs(N, 300, D, torch.bfloat16, bias=True)
    compiled = compiled_api()
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        with interpreter.interpreted():
            first, codes = compat.run_and_get_code(
                reference.check_against_reference, compiled, inputs, torch.bfloat16
            )
            second = reference.loss_and_grads(compiled, inputs, torch.bfloat16)
    finally:
        torch.use_deterministic_algorithms(previous)
    assert_fused(codes, v=300)
    sources = kernel_sources(codes)
    assert any("arg_DZ" in source for source in sources.values())
    assert not [name for name, source in sources.items() if re.search(r"\batomic_\w+\(", source)]
    for name in first:
        assert torch.equal(first[name], second[name]), name


def test_frozen_head_does_no_weight_gradient_work():
    """weight.requires_grad=False: no [V, D] buffer, and the kernel is built with NEED_DC False."""
    inputs = reference.make_inputs(N, V, D, torch.float32)
    weight, target = inputs["linear_weight"], inputs["target"]

    def input_grad(fn, dtype):
        e = inputs["input"].detach().to(dtype).requires_grad_()
        fn(e, weight.to(dtype), target).backward()
        return {"input": e.grad}

    with interpreter.interpreted():
        ours, codes = compat.run_and_get_code(input_grad, compiled_api(), torch.float32)
    assert V * D not in generated_code.allocated_numels(codes, N, D)
    assert "NEED_DC : tl.constexpr = False" in "".join(codes)
    assert any("linear_cross_entropy_bwd" in c for c in kernel_calls(codes))
    reference.assert_close_to_reference(
        ours, input_grad(reference.torch_linear_cross_entropy, torch.float32), lambda: None,
        input_grad(reference.torch_linear_cross_entropy, torch.float64), torch.float32,
    )


def first_tile_targets(dtype):
    """Rows whose softmax is concentrated near their target, all targets in the first vocab
    tile: most (row block x vocab block) tiles of dz are negligible."""
    v = 512
    gen = torch.Generator().manual_seed(0)
    target = torch.randint(0, 64, (N,), generator=gen)
    weight = torch.randn(v, D, generator=gen) / D**0.5
    hidden = 24.0 * weight[target] + 0.5 * torch.randn(N, D, generator=gen) / D**0.5
    return {"input": hidden.to(dtype), "linear_weight": weight.to(dtype), "linear_bias": None,
            "weight": None, "target": target}, v


@pytest.mark.parametrize("filter_eps", ["auto", None])
def test_filtering_skips_negligible_tiles(filter_eps):
    inputs, v = first_tile_targets(torch.bfloat16)
    with interpreter.interpreted(), filter_stats.counting(), filter_stats.collect() as stats:
        _, codes = compat.run_and_get_code(
            reference.check_against_reference,
            functools.partial(compiled_api(), filter_eps=filter_eps), inputs, torch.bfloat16,
        )
    assert "torch.ops.cce.record_filter_stats" in kernel_calls(codes)
    assert stats.total > 0
    if filter_eps is None:
        assert stats.skipped == 0
    else:
        assert stats.fraction >= 0.5, (stats.skipped, stats.total)


# --- The RL head: log-probs and entropy, temperature, softcap ---------------------------------


def compiled_log_probs(dynamic: bool = False):
    def head(input, linear_weight, target, *, linear_bias=None, **options):
        return cce_inductor.linear_log_probs(input, linear_weight, target,
                                             linear_bias=linear_bias, return_entropy=True,
                                             **options)

    return torch.compile(head, backend="inductor", dynamic=dynamic)


RL_CASES = {
    "fp32-bias-temperature-ignore": (torch.float32, dict(bias=True, ignored="some"),
                                     dict(temperature=0.7)),
    "bf16-softcap-temperature": (torch.bfloat16, dict(), dict(softcap=5.0, temperature=1.3)),
}


@pytest.mark.parametrize("case", list(RL_CASES))
def test_log_probs_and_entropy_templates(case):
    """Values and the RL objective's gradients through the templates (forward with the entropy
    sum, backward with its dz term; bf16 filters with the entropy bound), no [N, V] buffer."""
    dtype, input_options, options = RL_CASES[case]
    inputs = reference.make_inputs(N, V, D, dtype, **input_options)
    with interpreter.interpreted():
        _, codes = compat.run_and_get_code(
            reference.check_log_probs_against_reference, compiled_log_probs(), inputs, dtype,
            **options,
        )
    assert_fused(codes)
    assert "WITH_ENTROPY : tl.constexpr = True" in "".join(codes)
    assert "HAS_GRAD_ENTROPY : tl.constexpr = True" in "".join(codes)


def test_split_vocabulary_entropy():
    """Vocabulary ranges' entropy spreads merge in the combine (2 row blocks x 4 ranges of
    V = 600, one empty), with a logit scale and a softcap in the kernel."""
    with configs.forced(tile=SPLIT_TILE, forward=SPLIT):
        inputs = reference.make_inputs(N, SPLIT_V, D, torch.float32, bias=True)
        with interpreter.interpreted():
            _, codes = compat.run_and_get_code(
                reference.check_log_probs_against_reference, compiled_log_probs(), inputs,
                torch.float32, softcap=3.0, temperature=0.6,
            )
    assert forward_launches(codes) == [(2, 4)]
    assert_fused(codes, v=SPLIT_V)


def test_filtering_with_entropy_gradients_skips_tiles():
    """Peaked rows, every target in the first tile: the entropy-aware bound still skips most
    tiles, and the gradients stay within the tolerance rule. (At temperature 0.9 these rows'
    largest off-target p, about 1e-4, is below eps but its entropy gradient p |log p + H| is
    not: the bound keeps those tiles, as it should.)"""
    inputs, v = first_tile_targets(torch.bfloat16)
    with interpreter.interpreted(), filter_stats.counting(), filter_stats.collect() as stats:
        reference.check_log_probs_against_reference(compiled_log_probs(), inputs,
                                                    torch.bfloat16, temperature=0.5)
    assert stats.total > 0 and stats.fraction >= 0.5, (stats.skipped, stats.total)


def test_cpu_without_harness_falls_back_to_eager_ops(caplog):
    """Plain CPU: the lowering calls the ops' blocked eager implementation, and the log says
    why. The graph holds the forward op alone: a C++ compile of anything around it would take
    half a minute."""
    inputs = reference.make_inputs(N, V, D, torch.float32)
    e, c, t = inputs["input"], inputs["linear_weight"], inputs["target"]

    def row_statistics(e, c, t):
        return torch.ops.cce.linear_cross_entropy_fwd(e, c, None, t, None, None, False, None)

    with caplog.at_level(logging.INFO, logger="cce_inductor"), torch.no_grad():
        (lse, target_logit, _, _, _, _), codes = compat.run_and_get_code(
            torch.compile(row_statistics, backend="inductor"), e, c, t
        )
    calls = kernel_calls(codes)
    assert "torch.ops.cce.linear_cross_entropy_fwd" in calls
    assert not any(c.startswith("triton_") for c in calls)
    assert "blocked eager implementation" in caplog.text
    logits = e.double() @ c.double().T
    torch.testing.assert_close(lse.double(), logits.logsumexp(1), rtol=1e-6, atol=0)
    torch.testing.assert_close(target_logit.double(), logits.gather(1, t[:, None])[:, 0],
                               rtol=1e-6, atol=1e-6)


def test_max_autotune_benchmarks_every_config():
    """With max-autotune the template choices are benchmarked (here by the interpreter)."""
    import torch._inductor.config as inductor_config

    assert len(forward.FORWARD.configs_for(torch.float32, 80, True)) > 1
    with inductor_config.patch(max_autotune=True):
        codes = run_compiled(torch.float32, {}, n=8, v=40, d=16)
    assert_fused(codes, n=8, v=40, d=16)
