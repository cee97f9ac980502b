"""torch.use_deterministic_algorithms(True) selects the backward without atomics: on the device,
two runs of the compiled loss + backward give the same bits, loss and every gradient."""

from __future__ import annotations

import pytest
import torch

import cce_inductor
import generated_code
import reference
from cce_inductor import compat


@pytest.fixture
def deterministic():
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(previous)


def test_deterministic_backward_is_bitwise_reproducible(harness, deterministic):
    n, v, d = harness.pick(cpu=(24, 70, 40), cuda=(4096, 32768, 256))
    inputs = harness.to_device(reference.make_inputs(n, v, d, torch.bfloat16, bias=True,
                                                     ignored="some"))
    compiled = torch.compile(cce_inductor.linear_cross_entropy, backend="inductor")
    first, codes = compat.run_and_get_code(
        reference.check_against_reference, compiled, inputs, torch.bfloat16, softcap=5.0
    )
    generated_code.assert_fused(codes, n, v, d)
    source = "".join(codes)
    assert "OWNS_ROWS : tl.constexpr = True" in source  # the dE launch
    assert "OWNS_ROWS : tl.constexpr = False" in source  # the dC / dbias launch
    second = reference.loss_and_grads(compiled, inputs, torch.bfloat16, softcap=5.0)
    for name in first:
        assert torch.equal(first[name], second[name]), name
