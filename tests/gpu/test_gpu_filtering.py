"""Gradient filtering in the backward templates, on the device: with peaked softmax rows (as in
trained models) most logit tiles are skipped and the gradients still match float64; with
filtering off none is skipped; and a threshold that drops real probability mass breaks the
tolerance, so the first check is able to fail."""

from __future__ import annotations

import functools

import pytest
import torch

import cce_inductor
import generated_code
import reference
from cce_inductor import compat, filter_stats


def peaked(harness) -> dict:
    # Few row blocks, many vocabulary tiles: a row block keeps at most (its rows + a quarter)
    # of the tiles, fewer than half of them.
    n, v, d = harness.pick(cpu=(8, 4096, 256), cuda=(2048, 131072, 256))
    return harness.to_device(reference.peaked_inputs(torch.bfloat16, n, v, d))


def filtered_run(inputs: dict, filter_eps) -> tuple[filter_stats.FilterStats, list[str]]:
    compiled = functools.partial(
        torch.compile(cce_inductor.linear_cross_entropy, backend="inductor"),
        filter_eps=filter_eps,
    )
    with filter_stats.counting(), filter_stats.collect() as stats:
        _, codes = compat.run_and_get_code(
            reference.check_against_reference, compiled, inputs, torch.bfloat16
        )
    return stats, codes


def test_filter_skips_most_tiles_of_peaked_rows(harness):
    stats, codes = filtered_run(peaked(harness), "auto")
    assert "torch.ops.cce.record_filter_stats" in generated_code.kernel_calls(codes)
    assert stats.total > 0 and stats.fraction >= 0.5, (stats.skipped, stats.total)


def test_filter_off_skips_nothing(harness):
    stats, _ = filtered_run(peaked(harness), None)
    assert stats.total > 0 and stats.skipped == 0, (stats.skipped, stats.total)


def test_too_coarse_a_filter_breaks_the_tolerance(harness):
    with pytest.raises(AssertionError, match="exceeds"):
        filtered_run(peaked(harness), 0.1)
