"""Vocabulary-parallel CCE (`linear_cross_entropy(..., vocab_parallel_group=...)`) on CPU.

Two gloo processes are spawned ONCE for the module; they run every case (each rank on its block
of the classes) and save their results, which the tests compare with the single-process float64
`linear -> cross_entropy` reference: the loss and the input gradient on every rank, and each
rank's classifier-row gradients against the matching rows of the reference gradient.
"""

from __future__ import annotations

import datetime
import functools
import os
from typing import Any

import pytest
import torch
import torch.distributed as dist

import cce_inductor
import ranks
import reference
from cce_inductor import compat, filter_stats
from vocab_parallel_cases import (
    D, LAYOUTS, WORLD, Case, N, check_against_single_process, make_inputs, vocab_parallel_loss,
)

CASES = [
    Case("mean"),
    Case("sum_bias_softcap", reduction="sum", bias=True, softcap=3.0),
    Case("none_3d", reduction="none", leading=(4, 12)),
    Case("z_loss_return_lse", reduction="none", bias=True, z_loss=True),
    Case("smoothing_class_weight", label_smoothing=0.1, class_weight=True),
    Case("smoothing_sum", reduction="sum", label_smoothing=0.2, ignored="none"),
    Case("class_weight_sum", reduction="sum", class_weight=True, bias=True),
    Case("swapped_blocks", layout="swapped", class_weight=True, label_smoothing=0.1, bias=True),
    Case("even_ignore_index_in_block", layout="even", ignore_index=7),
    Case("all_ignored", ignored="all"),
    Case("frozen_input", frozen_input=True, bias=True),
    Case("fp32_all_options", dtype=torch.float32, bias=True, softcap=3.0,
         label_smoothing=0.1, class_weight=True),
    Case("bf16_filtered", dtype=torch.bfloat16, filter_eps="auto"),
    # (log_probs * adv).sum() + c * entropy.sum(): the entropy's one more all-reduced row sum.
    Case("log_probs_entropy", log_probs=True, bias=True, softcap=3.0, temperature=0.7),
    Case("log_probs_swapped_blocks", layout="swapped", log_probs=True, temperature=1.5),
    Case("log_probs_bf16_filtered", dtype=torch.bfloat16, log_probs=True, filter_eps="auto",
         temperature=0.8),
]


# --- the worker processes -----------------------------------------------------------------


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
        timeout=datetime.timedelta(seconds=60),
    )
    group = dist.group.WORLD
    try:
        results = {case.name: _run_case(case, rank, group) for case in CASES}
        results["filter_far_block"] = _run_far_block_filter(rank, group)
        results["traffic"] = _run_traffic(rank, group)
        results["errors"] = _run_errors(rank, group)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _run_case(case: Case, rank: int, group) -> dict[str, torch.Tensor]:
    start, size = LAYOUTS[case.layout][1][rank]
    result = reference.loss_and_grads(
        vocab_parallel_loss(case, group, start, size), make_inputs(case), case.dtype,
        **case.options(),
    )
    return {name: value for name, value in result.items() if value is not None}


def _run_far_block_filter(rank: int, group) -> list[int]:
    """Rank 1's block has logits ~40 below rank 0's and no target: the global softmax there is
    ~exp(-40), so with filter_eps 1e-6 every tile of rank 1 is skipped. (Judged against the
    block's own lse, each of its 401 classes would have probability ~1/401 and none would be.)"""
    case = Case("far_block", dtype=torch.float32, bias=True, ignored="none", filter_eps=1e-6)
    inputs = make_inputs(case)
    inputs["linear_bias"][600:] -= 40.0
    inputs["target"] = inputs["target"] % 600
    start, size = LAYOUTS[case.layout][1][rank]
    with filter_stats.collect() as stats:
        result = reference.loss_and_grads(
            vocab_parallel_loss(case, group, start, size), inputs, case.dtype, **case.options()
        )
    return [stats.skipped, stats.total, result["linear_weight"].abs().max().item()]


def _run_traffic(rank: int, group) -> dict[str, list[tuple]]:
    """Every collective of one forward and backward: (kind, elements, dtype)."""
    calls: list[tuple] = []

    def recorded(kind, collective):
        @functools.wraps(collective)
        def wrapper(tensor, *args):
            calls.append((kind, *args[:-1], tensor.numel(), str(tensor.dtype)))
            return collective(tensor, *args)

        return wrapper

    original = compat.all_reduce, compat.all_gather
    compat.all_reduce = recorded("all_reduce", compat.all_reduce)
    compat.all_gather = recorded("all_gather", compat.all_gather)
    traffic = {}
    try:
        for case in (
            Case("plain", dtype=torch.bfloat16),
            Case("smoothing_class_weight", dtype=torch.float32, class_weight=True,
                 label_smoothing=0.1),
            Case("frozen_input", dtype=torch.float32, frozen_input=True),
            Case("log_probs_entropy", dtype=torch.float32, log_probs=True),
        ):
            calls.clear()
            start, size = LAYOUTS[case.layout][1][rank]
            reference.loss_and_grads(
                vocab_parallel_loss(case, group, start, size), make_inputs(case), case.dtype,
                **case.options(),
            )
            traffic[case.name] = list(calls)
    finally:
        compat.all_reduce, compat.all_gather = original
    return traffic


def _run_errors(rank: int, group) -> dict[str, str]:
    """Bad calls raise on every rank (never leaving one rank waiting in a collective)."""
    inputs = make_inputs(Case("errors", dtype=torch.float32, bias=True))
    start, size = LAYOUTS["uneven"][1][rank]
    block = slice(start, start + size)
    good = dict(input=inputs["input"], linear_weight=inputs["linear_weight"][block],
                linear_bias=inputs["linear_bias"][block], target=inputs["target"])
    out_of_range = inputs["target"].clone()
    out_of_range[3] = 1001  # global V is 1001; rank 0's block ends at 600, that alone is fine
    calls = {
        "target_beyond_global_vocab": dict(good, target=out_of_range),
        "overlapping_blocks": dict(good, vocab_start_index=0),
        "start_on_one_rank_only": dict(good, vocab_start_index=start if rank == 0 else None),
        "bad_bias_on_rank_1": dict(
            good, linear_bias=good["linear_bias"][:-1] if rank == 1 else good["linear_bias"]
        ),
        "rows_differ": dict(
            good, input=good["input"][: N - rank], target=good["target"][: N - rank]
        ),
    }
    errors = {}
    for name, kwargs in calls.items():
        try:
            cce_inductor.linear_cross_entropy(
                kwargs.pop("input"), kwargs.pop("linear_weight"), kwargs.pop("target"),
                vocab_parallel_group=group, **kwargs,
            )
            errors[name] = "no error"
        except Exception as error:  # noqa: BLE001  (the test inspects the type and message)
            errors[name] = f"{type(error).__name__}: {error}"
    return errors


# --- the tests ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory) -> list[dict[str, Any]]:
    return ranks.spawn_ranks(_worker, tmp_path_factory.mktemp("vocab_parallel"), WORLD)


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_matches_single_process_reference(rank_results, case):
    check_against_single_process(case, [results[case.name] for results in rank_results])


def test_filter_judges_the_global_softmax(rank_results):
    skipped, total, largest_grad = rank_results[1]["filter_far_block"]
    assert total > 0 and skipped == total, (skipped, total)
    assert largest_grad == 0.0
    skipped0, total0, _ = rank_results[0]["filter_far_block"]
    assert skipped0 < total0  # rank 0 holds the mass and every target


def test_collective_traffic_matches_the_documented_table(rank_results):
    """The module doc's table: layout all_gather (5 int64), lse max (N), row statistics sum
    ((2 + ls + cw + h) N + cw), and in backward the dE sum (N D in the input dtype) if needed."""
    fp32, bf16 = str(torch.float32), str(torch.bfloat16)
    forward = lambda k, extra: [  # noqa: E731
        ("all_gather", 5, "torch.int64"),
        ("all_reduce", "max", N, fp32),
        ("all_reduce", "sum", k * N + extra, fp32),
    ]
    expected = {
        "plain": forward(2, 0) + [("all_reduce", "sum", N * D, bf16)],
        "smoothing_class_weight": forward(4, 1) + [("all_reduce", "sum", N * D, fp32)],
        "frozen_input": forward(2, 0),
        # exp(lse_r - max), target logit and the entropy part: 3 N.
        "log_probs_entropy": forward(3, 0) + [("all_reduce", "sum", N * D, fp32)],
    }
    for results in rank_results:
        assert results["traffic"] == expected


@pytest.mark.parametrize(
    "name, expected",
    [
        ("target_beyond_global_vocab", ["IndexError: target values must be in [0, 1001)"] * 2),
        ("overlapping_blocks", ["ValueError: the vocabulary blocks"] * 2),
        ("start_on_one_rank_only", ["ValueError: vocab_start_index must be given"] * 2),
        ("bad_bias_on_rank_1", [
            "RuntimeError: vocabulary-parallel linear_cross_entropy: rank(s) [1]",
            "ValueError: linear_bias must have shape (401,)",
        ]),
        ("rows_differ", [
            "ValueError: vocabulary-parallel linear_cross_entropy: input must have",
        ] * 2),
    ],
)
def test_bad_calls_raise_on_every_rank(rank_results, name, expected):
    for rank, prefix in enumerate(expected):
        assert rank_results[rank]["errors"][name].startswith(prefix), (
            rank, rank_results[rank]["errors"][name]
        )


def test_start_index_needs_a_group():
    inputs = make_inputs(Case("no_group"))
    with pytest.raises(ValueError, match="vocab_start_index"):
        cce_inductor.linear_cross_entropy(
            inputs["input"], inputs["linear_weight"], inputs["target"], vocab_start_index=0
        )
