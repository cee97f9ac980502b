"""Vocabulary-parallel cases shared by the CPU test (tests/test_distributed.py, gloo) and the GPU
test (tests/gpu/test_gpu_vocab_parallel.py): the layouts of the classes over two ranks, each
case's inputs and loss, how the ranks' results are put together and checked against the
single-process float64 `linear -> cross_entropy`."""

from __future__ import annotations

import dataclasses
import zlib
from typing import Any, Optional

import torch

import cce_inductor
import reference

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
    log_probs: bool = False  # the RL objective of linear_log_probs instead of the loss
    temperature: float = 1.0  # (log_probs)

    def options(self) -> dict[str, Any]:
        if self.log_probs:
            return dict(ignore_index=self.ignore_index, softcap=self.softcap,
                        temperature=self.temperature)
        return dict(
            reduction=self.reduction, ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing, softcap=self.softcap,
        )


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


def reference_loss(case: Case):
    """The float64 reference of what `vocab_parallel_loss` computes."""
    if case.log_probs:
        return reference.rl_objective(reference.torch_log_probs_and_entropy)

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


def vocab_parallel_loss(case: Case, group, start: int, size: int):
    """The case's loss on this rank's block [start, start + size) of the classes."""
    explicit_start = LAYOUTS[case.layout][2]
    block = slice(start, start + size)

    def log_probs(input, linear_weight, target, *, linear_bias=None, **options):
        return cce_inductor.linear_log_probs(
            input, linear_weight[block], target,
            linear_bias=linear_bias[block] if linear_bias is not None else None,
            return_entropy=True, filter_eps=case.filter_eps, vocab_parallel_group=group,
            vocab_start_index=start if explicit_start else None, **options,
        )

    if case.log_probs:
        return reference.rl_objective(log_probs)

    def loss(input, linear_weight, target, *, linear_bias=None, weight=None, **options):
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


def assemble(case: Case, per_rank: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
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


def check_against_single_process(case: Case, per_rank: list[dict[str, torch.Tensor]]) -> None:
    """The ranks' results of `case` put together, against the single-process float64 reference
    (the same math in float64; in another dtype, reference.py's tolerance rule)."""
    ours = assemble(case, per_rank)
    inputs = make_inputs(case)
    loss = reference_loss(case)
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
