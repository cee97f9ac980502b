"""torch's own OpInfo samples, mapped onto a linear head and compared with torch.

`nn.functional.cross_entropy` samples give logits, class-index targets and options (weight,
reduction, ignore_index); each supported one becomes `input @ linear_weight.T` twice: with the
identity head (input = the sample's logits, so the logits are exactly torch's) and with a random
head. The samples carry no label smoothing, so each also runs with label_smoothing=0.25.
`nn.functional.linear_cross_entropy` samples (torch >= 2.13) map one to one onto our API.

Unsupported samples are filtered with a counted reason; a minimum number must survive.
"""

from __future__ import annotations

import collections
import functools
from typing import Callable, Optional

import pytest
import torch
import torch.nn.functional as F
from torch.testing._internal.common_methods_invocations import op_db

import cce_inductor
from cce_inductor import compat
import reference

pytestmark = pytest.mark.usefixtures("single_threaded")

DTYPES = (torch.float32, torch.float64)
HIDDEN = 5  # D of the random head
ours = functools.partial(cce_inductor.linear_cross_entropy, filter_eps=None)


def _opinfo(name: str):
    matches = [op for op in op_db if op.name == name and op.variant_test_name == ""]
    return matches[0] if matches else None


def _collect(name: str, unsupported: Callable) -> tuple[list, collections.Counter]:
    """(dtype, sample) pairs we support, and the count of every reason for the others."""
    op = _opinfo(name)
    supported, reasons = [], collections.Counter()
    if op is None:
        return supported, reasons
    torch.manual_seed(0)  # the samples are drawn from the global generator
    for dtype in DTYPES:
        for sample in op.sample_inputs("cpu", dtype, requires_grad=False):
            reason = unsupported(sample)
            if reason is None:
                supported.append((dtype, sample))
            else:
                reasons[reason] += 1
    return supported, reasons


def _cross_entropy_unsupported(sample) -> Optional[str]:
    logits, target = sample.input, sample.args[0]
    if target.dtype.is_floating_point:
        return "probability targets"
    if logits.dim() > 2:
        return "K-dimensional logits [N, C, d1, ...]"
    return None


def _linear_cross_entropy_unsupported(sample) -> Optional[str]:
    linear_weight, target = sample.args
    if target.dtype.is_floating_point:
        return "probability targets"
    if linear_weight.dim() != 2:
        return "linear_weight of more than 2 dimensions (K-dimensional logits)"
    return None


CE_SAMPLES, CE_SKIPPED = _collect("nn.functional.cross_entropy", _cross_entropy_unsupported)
LCE_SAMPLES, LCE_SKIPPED = _collect(
    "nn.functional.linear_cross_entropy", _linear_cross_entropy_unsupported
)


def _describe(dtype: torch.dtype, sample, index: int) -> str:
    options = ",".join(
        f"{key}={tuple(value.shape) if torch.is_tensor(value) else value}"
        for key, value in sample.kwargs.items()
    )
    return f"{str(dtype).removeprefix('torch.')}-{index}-{tuple(sample.input.shape)}-{options}"


def _compare(inputs: dict, dtype: torch.dtype, torch_fn: Callable, **options) -> None:
    """Loss and gradients of our API against torch's on the same tensors (torch.testing's
    default tolerances for the dtype)."""
    expected = reference.loss_and_grads(torch_fn, inputs, dtype, **options)
    result = reference.loss_and_grads(ours, inputs, dtype, **options)
    assert result.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(result[name], value, msg=lambda m: f"{name}: {m}")


def test_cross_entropy_samples_filtered_with_reasons():
    assert set(CE_SKIPPED) <= {"probability targets", "K-dimensional logits [N, C, d1, ...]"}
    # 8 class-index samples with 2-D logits per dtype in torch 2.13; fail if filtering eats them.
    assert len(CE_SAMPLES) >= 12, (len(CE_SAMPLES), CE_SKIPPED)
    covered = {key for _, sample in CE_SAMPLES for key in sample.kwargs}
    assert {"weight", "reduction", "ignore_index"} <= covered, covered


@pytest.mark.parametrize("label_smoothing", [0.0, 0.25], ids=["", "smoothing"])
@pytest.mark.parametrize("head", ["identity", "random"])
@pytest.mark.parametrize(
    "dtype,sample", CE_SAMPLES, ids=[_describe(d, s, i) for i, (d, s) in enumerate(CE_SAMPLES)]
)
def test_cross_entropy_sample(dtype, sample, head, label_smoothing):
    logits, target = sample.input, sample.args[0]
    num_classes = logits.shape[-1]
    if head == "identity":
        input, linear_weight = logits, torch.eye(num_classes, dtype=dtype)
    else:
        gen = torch.Generator().manual_seed(num_classes)
        input = torch.randn(*logits.shape[:-1], HIDDEN, generator=gen, dtype=dtype)
        linear_weight = torch.randn(num_classes, HIDDEN, generator=gen, dtype=dtype)
    options = dict(sample.kwargs)
    inputs = {"input": input, "linear_weight": linear_weight, "linear_bias": None,
              "weight": options.pop("weight", None), "target": target}
    _compare(inputs, dtype, reference.torch_linear_cross_entropy,
             label_smoothing=label_smoothing, **options)


@pytest.mark.skipif(not compat.HAS_TORCH_LINEAR_CROSS_ENTROPY,
                    reason=compat.NO_TORCH_LINEAR_CROSS_ENTROPY)
def test_linear_cross_entropy_samples_filtered_with_reasons():
    assert set(LCE_SKIPPED) <= {
        "probability targets", "linear_weight of more than 2 dimensions (K-dimensional logits)"
    }
    assert len(LCE_SAMPLES) >= 50, (len(LCE_SAMPLES), LCE_SKIPPED)
    covered = {key for _, sample in LCE_SAMPLES for key in sample.kwargs}
    assert {"weight", "reduction", "ignore_index", "linear_bias"} <= covered, covered


@pytest.mark.skipif(not compat.HAS_TORCH_LINEAR_CROSS_ENTROPY,
                    reason=compat.NO_TORCH_LINEAR_CROSS_ENTROPY)
@pytest.mark.parametrize(
    "dtype,sample", LCE_SAMPLES, ids=[_describe(d, s, i) for i, (d, s) in enumerate(LCE_SAMPLES)]
)
def test_linear_cross_entropy_sample(dtype, sample):
    linear_weight, target = sample.args
    options = dict(sample.kwargs)
    inputs = {"input": sample.input, "linear_weight": linear_weight,
              "linear_bias": options.pop("linear_bias", None),
              "weight": options.pop("weight", None), "target": target}
    _compare(inputs, dtype, F.linear_cross_entropy, **options)
