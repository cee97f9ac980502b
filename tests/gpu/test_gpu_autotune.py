"""Under max-autotune the lowering offers every shipped tile config of the device's family and
Inductor benchmarks each on the device (the interpreter on the CPU); the chosen kernels give
the float64 answer."""

from __future__ import annotations

import math

import torch

import cce_inductor
import generated_code
import reference
from cce_inductor import compat
from cce_inductor.lowering import backward, configs, forward


def test_max_autotune_benchmarks_every_shipped_config(harness):
    import torch._inductor.config as inductor_config

    dtype = torch.bfloat16
    n, v, d = harness.pick(cpu=(8, 40, 16), cuda=(2048, 16384, 512))
    inputs = harness.to_device(reference.make_inputs(n, v, d, dtype, bias=True))
    compiled = torch.compile(cce_inductor.linear_cross_entropy, backend="inductor")
    with inductor_config.patch(max_autotune=True), compat.autotune_timings() as timings:
        _, codes = compat.run_and_get_code(
            reference.check_against_reference, compiled, inputs, dtype
        )
    generated_code.assert_fused(codes, n, v, d)
    arch = configs.arch_of(harness.device)
    for kernel in (forward.FORWARD, *backward.KERNELS):
        shipped = kernel.configs_for(dtype, arch, all_configs=True)
        assert len(shipped) > 1, kernel.name
        # Every launch of a kernel offers the same choices; the chunked backward launches its
        # kernels once per vocabulary chunk, so each of its configs is timed once per launch
        # (or once in all, when Inductor's autotuning cache serves the later launches).
        benchmarked = timings.get(kernel.template_name, [])
        assert benchmarked and len(benchmarked) % len(shipped) == 0, (
            kernel.name, benchmarked, len(shipped))
        assert all(math.isfinite(t) and t > 0 for t in benchmarked), (kernel.name, benchmarked)
