"""No [N, V] buffer on the device: the peak memory of the compiled loss + backward, beyond its
inputs, stays below N * V * 2 bytes (one bf16 logit matrix) at a shape where that bound is far
above everything the fused path needs (inputs' gradients and fp32 accumulators); torch's
materialized loss at the same shape goes over it, so the measurement can see such a buffer.

Measured with cce_inductor.tools.measure.peak_extra_bytes: the CUDA caching allocator's peak on
a GPU; on the CPU the torch allocator's events (the interpreter's numpy temporaries are not
torch allocations, but every buffer the generated wrapper allocates is)."""

from __future__ import annotations

import torch

import cce_inductor
import reference
from cce_inductor.tools import measure


def peak_of_loss_and_backward(fn, inputs: dict, device: torch.device) -> int:
    leaves = {name: inputs[name].detach().clone().requires_grad_()
              for name in ("input", "linear_weight")}

    def run() -> None:
        fn(leaves["input"], leaves["linear_weight"], inputs["target"]).backward()

    run()  # compiles, and leaves the gradients allocated as a training step would
    for leaf in leaves.values():
        leaf.grad = None
    return measure.peak_extra_bytes(run, device)[1]


def test_peak_memory_is_below_one_logit_matrix(harness, record_property):
    n, v, d = harness.pick(cpu=(128, 2048, 8), cuda=(16384, 131072, 256))
    inputs = harness.to_device(reference.make_inputs(n, v, d, torch.bfloat16))
    bound = n * v * 2
    compiled = torch.compile(cce_inductor.linear_cross_entropy, backend="inductor")
    ours = peak_of_loss_and_backward(compiled, inputs, harness.device)
    materialized = peak_of_loss_and_backward(
        reference.torch_linear_cross_entropy, inputs, harness.device)
    # Decisive: the fused path's own buffers (gradients, fp32 accumulators) are far below it.
    needed = (n + v) * d * (2 + 4)
    assert 2 * needed < bound, (needed, bound)
    for name, value in (("fused_peak_bytes", ours), ("materialized_peak_bytes", materialized),
                        ("bound_bytes", bound)):
        record_property(name, value)
    assert 0 < ours < bound, (ours, bound)
    assert materialized > bound, (materialized, bound)
