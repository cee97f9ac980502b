"""A scalar loss whose gradients come from its forward: the CPU path's one pass.

A 'mean' or 'sum' loss with no lse returned has an upstream gradient that is one scalar, so the
gradient of the loss with respect to every row statistic is known before the logits are computed
(`losses.loss_gradients`). `cce::linear_cross_entropy_fwd_bwd` then computes the statistics and
the gradients for an upstream gradient of 1 in one sweep over the logits (each logit computed
once, not once in the forward and again in the backward), and the backward only scales them by
the upstream scalar. `cce_inductor.dispatch.one_pass_unavailable_reason` says when this is valid;
the explicit API (and with it the graph pass, whose replacement calls it) takes it then.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from cce_inductor import compat, losses, ops
from cce_inductor.arguments import LossOptions


def scalar_loss(
    rows: losses.FlatProblem,
    classifier: Tensor,
    bias: Optional[Tensor],
    options: LossOptions,
    filter_eps: Optional[float],
) -> Tensor:
    """The 'mean' or 'sum' loss of `rows` (see the module docstring)."""
    return _ScalarLossWithGradients.apply(
        rows.input, classifier, bias, rows.target, rows.class_weight, options.ignore_index,
        rows.label_smoothing, options.reduction, rows.softcap, filter_eps,
        options.filter_classifier, rows.logit_scale,
    )


class _ScalarLossWithGradients(torch.autograd.Function):
    """The loss, with the gradients of its inputs for an upstream gradient of 1 computed in its
    forward; its backward scales them by the upstream scalar.

    The scaling is in place unless the scalar is 1, so the gradients are not held twice; a
    second backward through the same graph (retain_graph=True) after an in-place scaling raises
    rather than scaling twice. A double backward raises (its second derivatives would need the
    Hessian of the loss): with create_graph=True the gradients come back differentiable, and
    differentiating them fails with a clear error instead of silently giving zero.
    """

    @staticmethod
    def forward(
        ctx,
        input: Tensor,
        classifier: Tensor,
        bias: Optional[Tensor],
        target: Tensor,
        class_weight: Optional[Tensor],
        ignore_index: int,
        label_smoothing: float,
        reduction: str,
        softcap: Optional[float],
        filter_eps: Optional[float],
        filter_classifier: bool,
        logit_scale: float,
    ) -> Tensor:
        vocab = classifier.shape[0]
        grad_lse, grad_target_logit, grad_logit_sum = losses.loss_gradients(
            target, class_weight, ignore_index, label_smoothing, vocab, reduction,
            ops.stats_dtype(input.dtype),
        )
        needs = ctx.needs_input_grad
        lse, target_logit, logit_sum, *grads = torch.ops.cce.linear_cross_entropy_fwd_bwd(
            input, classifier, bias, target, class_weight, grad_lse, grad_target_logit,
            grad_logit_sum if label_smoothing > 0 else None, softcap, filter_eps,
            needs[0], needs[1], bias is not None and needs[2], filter_classifier, logit_scale,
        )
        ctx.save_for_backward(*grads)
        ctx.scaled_in_place = False
        loss, denominator = losses.row_losses(
            lse, target_logit, logit_sum, target, class_weight, ignore_index, label_smoothing,
            vocab,
        )
        return losses.reduce_loss(loss, denominator, torch.Size(), reduction)

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        if ctx.scaled_in_place:
            raise RuntimeError(
                "linear_cross_entropy: a second backward through this loss (retain_graph=True) "
                "after one whose upstream gradient was not 1: the gradients were computed in the "
                "forward and have been scaled in place. Call the loss again for another backward, "
                "or use reduction='none' with .sum() to get the recompute path."
            )
        grads = list(ctx.saved_tensors)
        if compat.is_traced(grad_loss):
            grads = [grad * grad_loss for grad in grads]
        elif not bool(grad_loss == 1):
            for grad in grads:
                grad.mul_(grad_loss)
            ctx.scaled_in_place = True
        if torch.is_grad_enabled() and not compat.is_traced(grad_loss):  # create_graph=True
            anchor = grad_loss.new_empty((0,)).requires_grad_()
            grads = [_SecondDerivativeRefused.apply(grad, anchor) for grad in grads]
        needs = ctx.needs_input_grad
        return (
            *(grad if need else None for grad, need in zip(grads, needs[:3])),
            None, None, None, None, None, None, None, None, None,
        )


class _SecondDerivativeRefused(torch.autograd.Function):
    """The identity on a one-pass gradient, made differentiable (through `anchor`, an empty
    leaf) only so that differentiating it raises."""

    @staticmethod
    def forward(ctx, grad: Tensor, anchor: Tensor) -> Tensor:
        return grad.view_as(grad)

    @staticmethod
    def backward(ctx, _):
        raise RuntimeError(
            "linear_cross_entropy has no second derivative (double backward): its gradients, "
            "here computed in the forward of a 'mean' or 'sum' loss by the CPU one-pass path, "
            "are not differentiable"
        )
