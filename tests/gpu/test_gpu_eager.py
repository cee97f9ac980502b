"""An eager call of the explicit API on device tensors goes through the internal torch.compile
(cce_inductor.dispatch) to the Triton templates, not to the blocked eager implementation:
the generated wrappers launch the templates, loss and gradients match float64, and another N
reuses the compiled graph."""

from __future__ import annotations

import torch

import cce_inductor
import generated_code
import reference
from cce_inductor import compat


def test_eager_call_runs_the_templates(harness):
    v, d = harness.pick(cpu=(70, 40), cuda=(8200, 320))
    first_rows, other_rows = harness.pick(cpu=(24, 33), cuda=(1000, 3001))
    counters = compat.dynamo_counters()
    graphs = counters["stats"]["unique_graphs"]

    def check(n: int) -> None:
        inputs = harness.to_device(
            reference.make_inputs(n, v, d, torch.bfloat16, bias=True, class_weight=True, seed=n))
        reference.check_against_reference(cce_inductor.linear_cross_entropy, inputs,
                                          torch.bfloat16, label_smoothing=0.1, softcap=5.0)

    _, codes = compat.run_and_get_code(check, first_rows)
    generated_code.assert_fused(codes, first_rows, v, d)
    check(other_rows)
    assert counters["stats"]["unique_graphs"] - graphs == 1, dict(counters["stats"])
