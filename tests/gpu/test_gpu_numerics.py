"""Every Triton template path of the compiled explicit API against float64 (tests/reference.py's
tolerance rule), on the device: fp32 / bf16 / fp16, bias, softcap, ignore_index (some rows, all
rows, an index inside the vocabulary), the three reductions, label smoothing, class weights,
filtering on and off, the forward with and without vocabulary splits, dynamic N, and backwards
that compute only some of the gradients.

Sizes are no multiple of any block size. On a GPU: V = 4099, D = 200 and N = 1000 (few row
blocks: the forward splits the vocabulary) or N just above the rows that fill the GPU's
programs (one vocabulary range); under the interpreter the same at tiny sizes.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import zlib
from typing import Optional, Union

import pytest
import torch

import cce_inductor
import generated_code
import reference
from cce_inductor import compat

SPLIT, UNSPLIT = "split", "unsplit"


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    dtype: torch.dtype
    rows: str  # SPLIT: few row blocks, the forward splits V; UNSPLIT: enough row blocks not to
    reduction: str = "mean"
    bias: bool = False
    class_weight: bool = False
    ignored: str = "none"
    ignore_index: int = -100
    label_smoothing: float = 0.0
    softcap: Optional[float] = None
    filter_eps: Union[str, None] = None

    def options(self) -> dict:
        return dict(reduction=self.reduction, ignore_index=self.ignore_index,
                    label_smoothing=self.label_smoothing, softcap=self.softcap)


CASES = [
    Case("fp32-bias-ignored-mean", torch.float32, SPLIT, bias=True, ignored="some"),
    Case("fp32-softcap-none", torch.float32, UNSPLIT, reduction="none", softcap=3.0),
    Case("fp32-smoothing-weights-sum", torch.float32, SPLIT, reduction="sum",
         label_smoothing=0.1, class_weight=True, ignored="some"),
    Case("bf16-bias-softcap-filtered", torch.bfloat16, SPLIT, bias=True, softcap=5.0,
         filter_eps="auto"),
    Case("bf16-weights-ignore-index-3", torch.bfloat16, UNSPLIT, class_weight=True,
         ignored="some", ignore_index=3),
    Case("bf16-smoothing-none-filtered", torch.bfloat16, SPLIT, reduction="none",
         label_smoothing=0.2, ignored="some", filter_eps="auto"),
    Case("bf16-all-ignored", torch.bfloat16, SPLIT, ignored="all", filter_eps="auto"),
    Case("fp16-bias-filtered", torch.float16, UNSPLIT, bias=True, filter_eps="auto"),
    Case("fp16-smoothing-weights-softcap-sum", torch.float16, SPLIT, reduction="sum",
         label_smoothing=0.1, class_weight=True, softcap=5.0),
]


def vocab_and_hidden(harness) -> tuple[int, int]:
    return harness.pick(cpu=(300, 40), cuda=(4099, 200))


def rows(harness, regime: str, dtype: torch.dtype) -> int:
    if regime == SPLIT:
        return harness.pick(cpu=24, cuda=1000)
    return harness.unsplit_rows(dtype) + harness.pick(cpu=5, cuda=37)


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_compiled_templates_match_float64(harness, case):
    v, d = vocab_and_hidden(harness)
    n = rows(harness, case.rows, case.dtype)
    inputs = harness.to_device(reference.make_inputs(
        n, v, d, case.dtype, bias=case.bias, class_weight=case.class_weight,
        ignored=case.ignored, ignore_index=case.ignore_index, seed=zlib.crc32(case.name.encode()),
    ))
    compiled = functools.partial(
        torch.compile(cce_inductor.linear_cross_entropy, backend="inductor"),
        filter_eps=case.filter_eps,
    )
    _, codes = compat.run_and_get_code(
        reference.check_against_reference, compiled, inputs, case.dtype, **case.options()
    )
    generated_code.assert_fused(codes, n, v, d)
    [(row_blocks, splits)] = generated_code.forward_launches(codes)
    assert (splits > 1) == (case.rows == SPLIT), (case.rows, row_blocks, splits)


def test_dynamic_rows_share_one_graph(harness):
    """dynamic=True: one Dynamo frame, one graph, one forward and one backward wrapper serve N
    values on both sides of the split threshold (the split count follows N at run time)."""
    v, d = vocab_and_hidden(harness)
    dtype = torch.bfloat16
    all_rows = (rows(harness, SPLIT, dtype), harness.pick(cpu=7, cuda=77),
                rows(harness, UNSPLIT, dtype))
    compiled = torch.compile(cce_inductor.linear_cross_entropy, backend="inductor", dynamic=True)
    counters = compat.dynamo_counters()  # process-wide: compare before and after
    frames, graphs = counters["frames"]["total"], counters["stats"]["unique_graphs"]

    def run_all_rows() -> None:
        for n in all_rows:
            inputs = harness.to_device(
                reference.make_inputs(n, v, d, dtype, bias=True, ignored="some", seed=n))
            reference.check_against_reference(compiled, inputs, dtype, softcap=5.0)

    _, codes = compat.run_and_get_code(run_all_rows)
    assert counters["frames"]["total"] - frames == 1, dict(counters["frames"])
    assert counters["stats"]["unique_graphs"] - graphs == 1, dict(counters["stats"])
    assert len(codes) == 2, len(codes)
    generated_code.assert_fused(codes, all_rows[0], v, d)


@pytest.mark.parametrize("frozen, skipped_flag", [
    ("linear_weight", "NEED_DC"), ("input", "NEED_DE"),
])
def test_backward_of_some_gradients_only(harness, frozen, skipped_flag):
    """A frozen classifier (or input) gets no gradient, and the backward template is built
    without that gradient's work; the other gradients match float64."""
    v, d = vocab_and_hidden(harness)
    n = rows(harness, SPLIT, torch.bfloat16)
    inputs = harness.to_device(reference.make_inputs(n, v, d, torch.bfloat16, bias=True, seed=7))
    compiled = torch.compile(cce_inductor.linear_cross_entropy, backend="inductor")
    result, codes = compat.run_and_get_code(
        reference.check_against_reference, compiled, inputs, torch.bfloat16, frozen=(frozen,)
    )
    assert frozen not in result
    source = "".join(codes)
    assert re.search(rf"\b{skipped_flag} : tl.constexpr = False", source), skipped_flag
    assert any("linear_cross_entropy_bwd" in call for call in generated_code.kernel_calls(codes))
