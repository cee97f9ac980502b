"""The fused CCE operators, `torch.ops.cce.*`: every custom op of the project is defined here.

Two ops carry the whole computation; everything else (ignore_index, reductions, label
smoothing, class weights, z-loss) is cheap `[N]`-sized torch arithmetic around them
(`cce_inductor.losses`), so autograd, Inductor and the graph pass all see the same small graph.

`cce::linear_cross_entropy_fwd(input [N, D], classifier [V, D], bias [V]?, target [N], ...)`
returns per-row fp32 statistics of the logits z = input @ classifier.T + bias (softcapped):
    lse          log-sum-exp over the vocabulary
    target_logit z[i, target[i]], 0 where target[i] is outside [0, V)
    logit_sum    sum_j class_weight[j] * z[i, j] (or sum_j z[i, j]); shape [0] unless asked for
A target outside [0, V) simply has no logit here: ignore_index and vocabulary shards use this.

`cce::linear_cross_entropy_bwd` takes the gradients of those three statistics and returns
(grad_input, grad_classifier, grad_bias), each of shape [0] when not requested, so a frozen
head costs no dC work. With dz[i, j] = grad_lse[i] * p[i, j] + grad_target_logit[i] * [j == t_i]
+ grad_logit_sum[i] * class_weight[j], times the softcap derivative:
    grad_input = dz @ classifier,  grad_classifier = dz.T @ input,  grad_bias = dz.sum(0).

`cce::record_filter_stats` hands the compiled backward's filter-tile counts to
`cce_inductor.filter_stats` (see there).
"""

from __future__ import annotations

import inspect
from typing import Callable, Optional

import torch
from torch import Tensor

from cce_inductor import blocked, filter_stats

# Arguments with one entry per row (dim 0 is N): the dispatch marks that dim dynamic.
ROW_ARGUMENT_NAMES = ("input", "target", "lse", "grad_lse", "grad_target_logit", "grad_logit_sum")


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """Row statistics are fp32, or fp64 for fp64 inputs (gradcheck)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _row_positions(fn: Callable) -> tuple[int, ...]:
    names = list(inspect.signature(fn).parameters)
    return tuple(i for i, name in enumerate(names) if name in ROW_ARGUMENT_NAMES)


def _forward(
    input: Tensor,
    classifier: Tensor,
    bias: Optional[Tensor],
    target: Tensor,
    class_weight: Optional[Tensor],
    softcap: Optional[float],
    with_logit_sum: bool,
    filter_eps: Optional[float],
) -> tuple[Tensor, Tensor, Tensor]:
    # filter_eps is unused here; the forward carries it so autograd can hand it to the backward.
    return blocked.forward(input, classifier, bias, target, class_weight, softcap, with_logit_sum)


def _backward_op(
    input: Tensor,
    classifier: Tensor,
    bias: Optional[Tensor],
    target: Tensor,
    class_weight: Optional[Tensor],
    lse: Tensor,
    grad_lse: Tensor,
    grad_target_logit: Tensor,
    grad_logit_sum: Optional[Tensor],
    softcap: Optional[float],
    filter_eps: Optional[float],
    input_needs_grad: bool,
    classifier_needs_grad: bool,
    bias_needs_grad: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    return blocked.backward(
        input, classifier, bias, target, class_weight, lse, grad_lse, grad_target_logit,
        grad_logit_sum, softcap, filter_eps, input_needs_grad, classifier_needs_grad,
        bias_needs_grad,
    )


# Positions of the row arguments of each op, by op name.
ROW_ARGUMENTS = {
    "linear_cross_entropy_fwd": _row_positions(_forward),
    "linear_cross_entropy_bwd": _row_positions(_backward_op),
}
linear_cross_entropy_fwd = torch.library.custom_op(
    "cce::linear_cross_entropy_fwd", mutates_args=())(_forward)
linear_cross_entropy_bwd = torch.library.custom_op(
    "cce::linear_cross_entropy_bwd", mutates_args=())(_backward_op)


@linear_cross_entropy_fwd.register_fake
def _(input, classifier, bias, target, class_weight, softcap, with_logit_sum, filter_eps):
    n = input.shape[0]
    dtype = stats_dtype(input.dtype)
    lse = input.new_empty((n,), dtype=dtype)
    target_logit = input.new_empty((n,), dtype=dtype)
    logit_sum = input.new_empty((n,) if with_logit_sum else (0,), dtype=dtype)
    return lse, target_logit, logit_sum


@linear_cross_entropy_bwd.register_fake
def _(input, classifier, bias, target, class_weight, lse, grad_lse, grad_target_logit,
      grad_logit_sum, softcap, filter_eps, input_needs_grad, classifier_needs_grad,
      bias_needs_grad):
    """[0] for a gradient nobody asked for."""
    bias_dtype = bias.dtype if bias is not None else classifier.dtype
    return (
        input.new_empty(tuple(input.shape) if input_needs_grad else (0,)),
        classifier.new_empty(tuple(classifier.shape) if classifier_needs_grad else (0,)),
        input.new_empty(tuple(bias.shape) if bias is not None and bias_needs_grad else (0,),
                        dtype=bias_dtype),
    )


def statistics_gradients(
    backward_op: Callable[..., tuple[Tensor, Tensor, Tensor]],
    saved: tuple[Tensor, ...],
    grad_lse: Tensor,
    grad_target_logit: Tensor,
    grad_logit_sum: Optional[Tensor],
    softcap: Optional[float],
    filter_eps: Optional[float],
    needs_input_grad: tuple[bool, ...],
) -> tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """(grad_input, grad_classifier, grad_bias) of the row statistics from `backward_op` (the
    bwd op, or a dispatch of it), None where autograd wants none. `saved` is (input, classifier,
    bias, target, class_weight, lse); `needs_input_grad` is autograd's flags for the forward's
    arguments in the fwd op's order."""
    input, classifier, bias, target, class_weight, lse = saved
    if needs_input_grad[4]:
        raise NotImplementedError(
            "linear_cross_entropy: the gradient with respect to `weight` (class weights) is not "
            "implemented (torch's cross_entropy does not implement it either)"
        )
    needs = (needs_input_grad[0], needs_input_grad[1], bias is not None and needs_input_grad[2])
    grads = backward_op(
        input, classifier, bias, target, class_weight, lse, grad_lse, grad_target_logit,
        grad_logit_sum, softcap, filter_eps, *needs,
    )
    return tuple(grad if need else None for grad, need in zip(grads, needs))


def _setup_context(ctx, inputs, output) -> None:
    input, classifier, bias, target, class_weight, softcap, with_logit_sum, filter_eps = inputs
    lse, _, _ = output
    ctx.save_for_backward(input, classifier, bias, target, class_weight, lse)
    ctx.softcap = softcap
    ctx.with_logit_sum = with_logit_sum
    ctx.filter_eps = filter_eps


def _autograd_backward(ctx, grad_lse, grad_target_logit, grad_logit_sum):
    grads = statistics_gradients(
        torch.ops.cce.linear_cross_entropy_bwd, ctx.saved_tensors, grad_lse, grad_target_logit,
        grad_logit_sum if ctx.with_logit_sum else None, ctx.softcap, ctx.filter_eps,
        ctx.needs_input_grad,
    )
    return (*grads, None, None, None, None, None)


linear_cross_entropy_fwd.register_autograd(_autograd_backward, setup_context=_setup_context)


@torch.library.custom_op("cce::record_filter_stats", mutates_args=("counts",))
def record_filter_stats(counts: Tensor) -> None:
    """Report counts = [skipped, total] to filter_stats and reset them.

    Declared as mutating `counts` so that Inductor keeps the call although nothing reads it.
    """
    skipped, total = counts.tolist()
    filter_stats.record(skipped=int(skipped), total=int(total))
    counts.zero_()
