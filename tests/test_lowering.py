"""The CCE Inductor lowering, run end to end on the CPU through Triton's interpreter.

torch.compile(backend="inductor") of the explicit API renders the Triton templates, launches them
from Inductor's wrapper, and Triton interprets them; the loss and gradients are checked against
the float64 reference (tests/reference.py), the generated code for template kernels and for the
buffers it allocates (none may be O(N*V)). Shapes are tiny: the interpreter is slow.
"""

from __future__ import annotations

import functools
import logging
import re

import pytest
import torch

import cce_inductor
import reference
from cce_inductor import compat, filter_stats
from cce_inductor.lowering import filter_counting, interpreter

# N*V = 1680 is neither N*D = 960 nor V*D = 2800; V and D are no multiples of any block size.
N, D, V = 24, 40, 70


@pytest.fixture(autouse=True)
def fresh_compile():
    """Each test compiles from scratch (no FX-graph-cache hit hides the code being checked)."""
    torch._dynamo.reset()
    with compat.fresh_inductor_cache():
        yield
    torch._dynamo.reset()


def compiled_api(dynamic: bool = False):
    return torch.compile(cce_inductor.linear_cross_entropy, backend="inductor", dynamic=dynamic)


def kernel_calls(codes: list[str]) -> list[str]:
    """Names of the kernels and extern ops the generated wrappers launch."""
    calls = []
    for code in codes:
        calls += re.findall(r"\b(triton_\w+)\.run\(", code)
        calls += re.findall(r"\b(torch\.ops\.\w+\.\w+)\.default\(", code)
        calls += re.findall(r"\b(extern_kernels\.\w+)\(", code)
    return calls


def allocated_numels(codes: list[str], rows: int = N, hidden: int = D) -> list[int]:
    """Element counts of every buffer the generated wrappers allocate. With dynamic shapes a
    symbol that is the sole size of a 1-D buffer is the row count (the row statistics are
    [N]); any other symbol is the hidden size (in these tests V stays static)."""
    shapes = [
        [x for x in shape.replace(" ", "").split(",") if x]
        for code in codes for shape in re.findall(r"empty_strided_\w+\(\(([^)]*)\)", code)
    ]
    row_symbols = {dims[0] for dims in shapes if len(dims) == 1 and not dims[0].isdigit()}

    def value(dim: str) -> int:
        return int(dim) if dim.isdigit() else rows if dim in row_symbols else hidden

    return [int(torch.tensor([value(x) for x in dims]).prod().item()) if dims else 1
            for dims in shapes]


def run_compiled(dtype, options, *, n=N, v=V, d=D, bias=False, class_weight=False,
                 ignored="none", dynamic=False):
    inputs = reference.make_inputs(n, v, d, dtype, bias=bias, class_weight=class_weight,
                                   ignored=ignored)
    with interpreter.interpreted():
        _, codes = compat.run_and_get_code(
            reference.check_against_reference, compiled_api(dynamic), inputs, dtype, **options
        )
    return codes


def assert_fused(codes: list[str], n=N, v=V, d=D) -> None:
    calls = kernel_calls(codes)
    assert any(c.startswith("triton_tem_fused_linear_cross_entropy_fwd") for c in calls), calls
    assert any(c.startswith("triton_tem_") and "linear_cross_entropy_bwd" in c for c in calls), calls
    assert not any("linear_cross_entropy" in c for c in calls if c.startswith("torch.ops")), calls
    assert not any(c.startswith("extern_kernels") for c in calls), calls
    numels = allocated_numels(codes, rows=n, hidden=d)
    assert numels, "no allocation found: the wrapper format changed"
    assert n * v not in numels and max(numels) <= max(n * d, v * d), numels


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


def test_dynamic_rows():
    """One dynamic-shape graph serves several N (the templates take N as a kernel argument)."""
    compiled = compiled_api(dynamic=True)
    with interpreter.interpreted():
        for n in (N, 7, 33):
            inputs = reference.make_inputs(n, V, D, torch.float32, bias=True, seed=n)
            _, codes = compat.run_and_get_code(
                reference.check_against_reference, compiled, inputs, torch.float32
            )
            if n == N:  # the first call compiles, with a symbolic N
                assert_fused(codes)
                assert not re.search(r"empty_strided_cpu\(\(24, ", "".join(codes))


def test_deterministic_backward_is_reproducible():
    """use_deterministic_algorithms selects the atomics-free template: same bits every run."""
    inputs = reference.make_inputs(N, V, D, torch.bfloat16, bias=True)
    compiled = compiled_api()
    torch.use_deterministic_algorithms(True)
    try:
        with interpreter.interpreted():
            first, codes = compat.run_and_get_code(
                reference.check_against_reference, compiled, inputs, torch.bfloat16
            )
            second = reference.loss_and_grads(compiled, inputs, torch.bfloat16)
    finally:
        torch.use_deterministic_algorithms(False)
    assert_fused(codes)
    source = "".join(codes)
    assert "OWNS_ROWS : tl.constexpr = True" in source  # the dE kernel
    assert "OWNS_ROWS : tl.constexpr = False" in source  # the dC / dbias kernel
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
    assert V * D not in allocated_numels(codes)
    assert "NEED_DC : tl.constexpr = False" in "".join(codes)
    assert any("linear_cross_entropy_bwd" in c for c in kernel_calls(codes))
    reference.assert_close_to_reference(
        ours, input_grad(reference.torch_linear_cross_entropy, torch.float32), lambda: None,
        input_grad(reference.torch_linear_cross_entropy, torch.float64), torch.float32,
    )


def peaked_inputs(dtype):
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
    inputs, v = peaked_inputs(torch.bfloat16)
    with interpreter.interpreted(), filter_counting.counting(), filter_stats.collect() as stats:
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


def test_cpu_without_harness_falls_back_to_eager_ops(caplog):
    """Plain CPU: the ops' blocked eager implementation runs, and the log says why (forward
    only: the C++ compile of the surrounding graph is slow)."""
    inputs = reference.make_inputs(N, V, D, torch.float32)
    with caplog.at_level(logging.INFO, logger="cce_inductor"), torch.no_grad():
        loss, codes = compat.run_and_get_code(
            compiled_api(), inputs["input"], inputs["linear_weight"], inputs["target"]
        )
    calls = kernel_calls(codes)
    assert "torch.ops.cce.linear_cross_entropy_fwd" in calls
    assert not any(c.startswith("triton_") for c in calls)
    assert "blocked eager implementation" in caplog.text
    expected = reference.torch_linear_cross_entropy(
        inputs["input"].double(), inputs["linear_weight"].double(), inputs["target"]
    )
    assert abs(loss.item() - expected.item()) <= 1e-5 * abs(expected.item())


def test_max_autotune_benchmarks_every_config():
    """With max-autotune the template choices are benchmarked (here by the interpreter)."""
    import torch._inductor.config as inductor_config

    from cce_inductor.lowering import configs

    assert len(configs.tile_configs(configs.FORWARD, torch.float32, 80, True)) > 1
    with inductor_config.patch(max_autotune=True):
        codes = run_compiled(torch.float32, {}, n=8, v=40, d=16)
    assert_fused(codes, n=8, v=40, d=16)
