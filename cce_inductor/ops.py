"""The fused CCE operators, `torch.ops.cce.*`.

Two ops carry the whole computation; everything else (ignore_index, reductions, label
smoothing, class weights, z-loss) is cheap `[N]`-sized torch arithmetic around them, done by
`cce_inductor.api`, so autograd, Inductor and the graph pass all see the same small graph.

`cce::linear_cross_entropy_fwd(input [N, D], weight [V, D], bias [V]?, target [N], ...)`
returns per-row fp32 statistics of the logits z = input @ weight.T + bias (softcapped):
    lse          log-sum-exp over the vocabulary
    target_logit z[i, target[i]], 0 where target[i] is outside [0, V)
    logit_sum    sum_j class_weight[j] * z[i, j] (or sum_j z[i, j]); shape [0] unless asked for
A target outside [0, V) simply has no logit here: ignore_index and vocabulary shards use this.

`cce::linear_cross_entropy_bwd` takes the gradients of those three statistics and returns
(grad_input, grad_weight, grad_bias), each of shape [0] when not requested, so a frozen head
costs no dC work. With dz[i, j] = grad_lse[i] * p[i, j] + grad_target_logit[i] * [j == t_i]
+ grad_logit_sum[i] * class_weight[j], times the softcap derivative:
    grad_input = dz @ weight,  grad_weight = dz.T @ input,  grad_bias = dz.sum(0).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from cce_inductor import blocked


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """Row statistics are fp32, or fp64 for fp64 inputs (gradcheck)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.custom_op("cce::linear_cross_entropy_fwd", mutates_args=())
def linear_cross_entropy_fwd(
    input: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    target: Tensor,
    class_weight: Optional[Tensor],
    softcap: Optional[float],
    with_logit_sum: bool,
    filter_eps: Optional[float],
) -> tuple[Tensor, Tensor, Tensor]:
    # filter_eps is unused here; the forward carries it so autograd can hand it to the backward.
    return blocked.forward(input, weight, bias, target, class_weight, softcap, with_logit_sum)


@linear_cross_entropy_fwd.register_fake
def _(input, weight, bias, target, class_weight, softcap, with_logit_sum, filter_eps):
    n = input.shape[0]
    dtype = stats_dtype(input.dtype)
    lse = input.new_empty((n,), dtype=dtype)
    target_logit = input.new_empty((n,), dtype=dtype)
    logit_sum = input.new_empty((n,) if with_logit_sum else (0,), dtype=dtype)
    return lse, target_logit, logit_sum


@torch.library.custom_op("cce::linear_cross_entropy_bwd", mutates_args=())
def linear_cross_entropy_bwd(
    input: Tensor,
    weight: Tensor,
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
    weight_needs_grad: bool,
    bias_needs_grad: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    return blocked.backward(
        input, weight, bias, target, class_weight, lse, grad_lse, grad_target_logit,
        grad_logit_sum, softcap, filter_eps, input_needs_grad, weight_needs_grad, bias_needs_grad,
    )


def _grad_shapes(input, weight, bias, input_needs_grad, weight_needs_grad, bias_needs_grad):
    """Shapes and dtypes of the backward's outputs; [0] for a gradient nobody asked for."""
    return (
        (tuple(input.shape) if input_needs_grad else (0,), input.dtype),
        (tuple(weight.shape) if weight_needs_grad else (0,), weight.dtype),
        (tuple(bias.shape) if bias is not None and bias_needs_grad else (0,),
         bias.dtype if bias is not None else weight.dtype),
    )


@linear_cross_entropy_bwd.register_fake
def _(input, weight, bias, target, class_weight, lse, grad_lse, grad_target_logit,
      grad_logit_sum, softcap, filter_eps, input_needs_grad, weight_needs_grad, bias_needs_grad):
    shapes = _grad_shapes(input, weight, bias, input_needs_grad, weight_needs_grad, bias_needs_grad)
    return tuple(input.new_empty(shape, dtype=dtype) for shape, dtype in shapes)


def _setup_context(ctx, inputs, output) -> None:
    input, weight, bias, target, class_weight, softcap, with_logit_sum, filter_eps = inputs
    lse, _, _ = output
    ctx.save_for_backward(input, weight, bias, target, class_weight, lse)
    ctx.softcap = softcap
    ctx.with_logit_sum = with_logit_sum
    ctx.filter_eps = filter_eps


def _backward(ctx, grad_lse, grad_target_logit, grad_logit_sum):
    input, weight, bias, target, class_weight, lse = ctx.saved_tensors
    if ctx.needs_input_grad[4]:
        raise NotImplementedError(
            "linear_cross_entropy: the gradient with respect to `weight` (class weights) is not "
            "implemented (torch's cross_entropy does not implement it either)"
        )
    needs = ctx.needs_input_grad
    grad_input, grad_weight, grad_bias = torch.ops.cce.linear_cross_entropy_bwd(
        input, weight, bias, target, class_weight, lse, grad_lse, grad_target_logit,
        grad_logit_sum if ctx.with_logit_sum else None,
        ctx.softcap, ctx.filter_eps,
        needs[0], needs[1], bias is not None and needs[2],
    )
    return (
        grad_input if needs[0] else None,
        grad_weight if needs[1] else None,
        grad_bias if bias is not None and needs[2] else None,
        None, None, None, None, None,
    )


linear_cross_entropy_fwd.register_autograd(_backward, setup_context=_setup_context)
