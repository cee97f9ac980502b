"""Vocabulary-parallel CCE (`linear_cross_entropy(..., vocab_parallel_group=...)`) on CPU.

Two gloo processes are spawned ONCE for the module; they run every case (each rank on its block
of the classes) and save their results, which the tests compare with the single-process float64
`linear -> cross_entropy` reference: the loss and the input gradient on every rank, and each
rank's classifier-row gradients against the matching rows of the reference gradient.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import os
import zlib
from typing import Any, Optional

import pytest
import torch
import torch.distributed as dist

import cce_inductor
import ranks
import reference
from cce_inductor import compat, filter_stats

WORLD = 2
N, D = 48, 24
Z_LOSS = 1e-2  # weight of the lse**2 term of the return_lse case

# name -> (V, [(start, size) per rank], whether the ranks pass vocab_start_index)
LAYOUTS = {
    "even": (1000, [(0, 500), (500, 500)], False),
    "uneven": (1001, [(0, 600), (600, 401)], False),
    "swapped": (1001, [(401, 600), (0, 401)], True),  # rank 0 holds the upper block
}


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    dtype: torch.dtype = torch.float64
    layout: str = "uneven"
    reduction: str = "mean"
    bias: bool = False
    class_weight: bool = False
    label_smoothing: float = 0.0
    softcap: Optional[float] = None
    ignored: str = "some"
    ignore_index: int = -100
    filter_eps: Any = None
    leading: tuple[int, ...] = (N,)  # input is [*leading, D]
    z_loss: bool = False  # add Z_LOSS * lse**2 through return_lse
    frozen_input: bool = False  # input takes no gradient (no dE all-reduce)

    def options(self) -> dict[str, Any]:
        return dict(
            reduction=self.reduction, ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing, softcap=self.softcap,
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
]


def make_inputs(case: Case) -> dict[str, Optional[torch.Tensor]]:
    vocab = LAYOUTS[case.layout][0]
    inputs = reference.make_inputs(
        N, vocab, D, case.dtype, bias=case.bias, class_weight=case.class_weight,
        ignored=case.ignored, ignore_index=case.ignore_index, seed=zlib.crc32(case.name.encode()),
    )
    if case.ignored != "all":
        # Both sides of every block boundary, the ends of the vocabulary, and ignore_index.
        edges = [0, 7, 400, 401, 499, 500, 599, 600, vocab - 1]
        inputs["target"][: len(edges)] = torch.tensor(edges)
    inputs["input"] = inputs["input"].reshape(*case.leading, D)
    inputs["target"] = inputs["target"].reshape(case.leading)
    return inputs


def _reference_loss(case: Case):
    """The float64 reference of what `_vocab_parallel_loss` computes."""

    def loss(input, linear_weight, target, *, linear_bias=None, weight=None, **options):
        value = reference.torch_linear_cross_entropy(
            input, linear_weight, target, linear_bias=linear_bias, weight=weight, **options
        )
        if case.z_loss:
            logits = reference.softcapped_logits(
                input, linear_weight, linear_bias, options["softcap"]
            )
            value = value + Z_LOSS * torch.logsumexp(logits, -1).square()
        return value

    return loss


def _vocab_parallel_loss(case: Case, group, start: int, size: int):
    """The case's loss on this rank's block [start, start + size) of the classes."""
    explicit_start = LAYOUTS[case.layout][2]

    def loss(input, linear_weight, target, *, linear_bias=None, weight=None, **options):
        block = slice(start, start + size)
        result = cce_inductor.linear_cross_entropy(
            input.detach() if case.frozen_input else input,
            linear_weight[block], target,
            linear_bias=linear_bias[block] if linear_bias is not None else None,
            weight=weight[block] if weight is not None else None,
            filter_eps=case.filter_eps, return_lse=case.z_loss,
            vocab_parallel_group=group, vocab_start_index=start if explicit_start else None,
            **options,
        )
        if case.z_loss:
            value, lse = result
            return value + Z_LOSS * lse.square()
        return result

    return loss


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
        _vocab_parallel_loss(case, group, start, size), make_inputs(case), case.dtype,
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
            _vocab_parallel_loss(case, group, start, size), inputs, case.dtype, **case.options()
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
        ):
            calls.clear()
            start, size = LAYOUTS[case.layout][1][rank]
            reference.loss_and_grads(
                _vocab_parallel_loss(case, group, start, size), make_inputs(case), case.dtype,
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


def _assemble(case: Case, per_rank: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The whole result: loss and input gradient from rank 0 (after checking every rank has
    exactly the same), classifier-row gradients put together from the blocks. (Each rank's
    gradient is on the whole classifier, which it sliced: zero outside its block.)"""
    _, blocks, _ = LAYOUTS[case.layout]
    result = {}
    for name in ("loss", "input"):
        if name in per_rank[0]:
            for other in per_rank[1:]:
                torch.testing.assert_close(  # bit-identical on every rank
                    other[name], per_rank[0][name], rtol=0, atol=0, equal_nan=True,
                    msg=lambda message: f"{name} differs across ranks: {message}",
                )
            result[name] = per_rank[0][name]
    for name in ("linear_weight", "linear_bias"):
        if name in per_rank[0]:
            whole = torch.zeros_like(per_rank[0][name])
            for (start, size), rank_result in zip(blocks, per_rank):
                block = rank_result[name][start:start + size]
                assert torch.count_nonzero(rank_result[name]) == torch.count_nonzero(block)
                whole[start:start + size] = block
            result[name] = whole
    return result


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_matches_single_process_reference(rank_results, case):
    ours = _assemble(case, [results[case.name] for results in rank_results])
    inputs = make_inputs(case)
    loss = _reference_loss(case)
    exact = reference.loss_and_grads(loss, inputs, torch.float64, **case.options())
    if case.frozen_input:
        assert "input" not in ours
        del exact["input"]
    if case.dtype == torch.float64:
        # Same math in the same precision, summed in another order.
        for name, expected in exact.items():
            assert torch.equal(torch.isnan(ours[name]), torch.isnan(expected)), name
            error = reference.relative_error(ours[name], expected)
            assert error <= 1e-12, f"{name}: relative error {error:.3g}"
    else:
        same_dtype = reference.loss_and_grads(loss, inputs, case.dtype, **case.options())
        same_dtype = {name: same_dtype[name] for name in exact}
        reference.assert_close_to_reference(
            ours, same_dtype,
            lambda: reference.loss_and_grads(loss, inputs, torch.float32, **case.options()),
            exact, case.dtype,
        )


def test_filter_judges_the_global_softmax(rank_results):
    skipped, total, largest_grad = rank_results[1]["filter_far_block"]
    assert total > 0 and skipped == total, (skipped, total)
    assert largest_grad == 0.0
    skipped0, total0, _ = rank_results[0]["filter_far_block"]
    assert skipped0 < total0  # rank 0 holds the mass and every target


def test_collective_traffic_matches_the_documented_table(rank_results):
    """The module doc's table: layout all_gather (5 int64), lse max (N), row statistics sum
    ((2 + ls + cw) N + cw), and in backward the dE sum (N D in the input dtype) if needed."""
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
