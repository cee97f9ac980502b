"""The `[N]`-sized algebra around the fused ops: from per-row statistics to the head's outputs.

The ops compute per-row statistics of the logits (lse, target logit, logit sum, entropy);
ignore_index, class weights, label smoothing, the reductions and the log-probabilities are cheap
torch arithmetic on those, written once here for the explicit API and the vocabulary-parallel
losses, so autograd, Inductor and the graph pass all see the same small graph.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import Tensor

from cce_inductor import ops
from cce_inductor.arguments import LossOptions

# The op's target for a row that has none (no output of the call needs one): outside [0, V).
NO_TARGET = -1


@dataclasses.dataclass(frozen=True)
class FlatProblem:
    """The head's inputs as the ops take them: rows `[N, D]` and `[N]`, class weights in the
    statistics' dtype, the options as plain Python values."""

    leading: torch.Size  # the input's leading dimensions, which per-position outputs keep
    input: Tensor
    target: Tensor
    class_weight: Optional[Tensor]
    softcap: Optional[float]
    logit_scale: float
    label_smoothing: float
    with_logit_sum: bool  # the op computes logit_sum (label smoothing of the loss)
    with_entropy: bool  # the op computes the entropy


@dataclasses.dataclass(frozen=True)
class RowStatistics:
    """The fwd op's outputs (see cce_inductor.ops), over the whole vocabulary."""

    lse: Tensor
    target_logit: Tensor
    logit_sum: Tensor
    entropy: Tensor


def flatten(
    input: Tensor, target: Optional[Tensor], class_weight: Optional[Tensor],
    options: LossOptions,
) -> FlatProblem:
    rows = input.reshape(-1, input.shape[-1])
    return FlatProblem(
        leading=input.shape[:-1],
        input=rows,
        target=target.reshape(-1) if target is not None
        else rows.new_full(rows.shape[:1], NO_TARGET, dtype=torch.long),
        class_weight=class_weight.to(ops.stats_dtype(input.dtype))
        if class_weight is not None else None,
        softcap=None if options.softcap is None else float(options.softcap),
        logit_scale=float(options.logit_scale),
        label_smoothing=float(options.label_smoothing),
        with_logit_sum="loss" in options.outputs and options.label_smoothing > 0,
        with_entropy="entropy" in options.outputs,
    )


def row_losses(
    lse: Tensor,
    target_logit: Tensor,
    logit_sum: Tensor,
    target: Tensor,
    class_weight: Optional[Tensor],
    ignore_index: Optional[int],
    label_smoothing: float,
    vocab: int,
    sharded_class_weight: Optional[tuple[Tensor, Tensor]] = None,
) -> tuple[Tensor, Tensor]:
    """Per-row loss from the row statistics, and the 'mean' denominator, as F.cross_entropy.

    loss_i = (1 - eps) * w[t_i] * (lse_i - z_i,t_i) + eps / V * (W * lse_i - sum_j w_j z_ij),
    with W = sum_j w_j, and 0 where t_i == ignore_index. The mean divides by sum_i w[t_i]
    over non-ignored rows. sharded_class_weight, given instead of class_weight when no rank holds
    all class weights (cce_inductor.vocab_parallel), is the pair (w[t_i] per row, W).
    """
    valid = _valid(target, ignore_index)
    if sharded_class_weight is not None:
        row_weight, total_weight = sharded_class_weight
        target_weight = row_weight * valid
    elif class_weight is not None:
        target_weight = class_weight[target.clamp(0, vocab - 1)] * valid
        total_weight = class_weight.sum()
    else:
        target_weight = valid.to(lse.dtype)
        total_weight = vocab
    loss = (1.0 - label_smoothing) * target_weight * (lse - target_logit)
    if label_smoothing > 0:
        smooth = total_weight * lse - logit_sum
        loss = loss + (label_smoothing / vocab) * torch.where(valid, smooth, 0.0)
    # where, not the zero weight alone: with every row ignored the 'mean' is 0/0 and its
    # gradient inf, which a multiplication by 0 turns into nan; F.cross_entropy gives zeros.
    return torch.where(valid, loss, 0.0), target_weight.sum()


def head_outputs(
    stats: RowStatistics,
    rows: FlatProblem,
    options: LossOptions,
    vocab: int,
    sharded_class_weight: Optional[tuple[Tensor, Tensor]] = None,
) -> tuple[Tensor, ...]:
    """The outputs named by options.outputs (see arguments.OUTPUTS), in that order, each shaped
    by the input's leading dimensions (the loss: by its reduction)."""
    results = []
    for name in options.outputs:
        if name == "loss":
            loss, denominator = row_losses(
                stats.lse, stats.target_logit, stats.logit_sum, rows.target,
                None if sharded_class_weight is not None else rows.class_weight,
                options.ignore_index, rows.label_smoothing, vocab, sharded_class_weight,
            )
            value = reduce_loss(loss, denominator, rows.leading, options.reduction)
        elif name == "log_probs":
            value = torch.where(_valid(rows.target, options.ignore_index),
                                stats.target_logit - stats.lse, 0.0).reshape(rows.leading)
        else:
            value = getattr(stats, name).reshape(rows.leading)
        results.append(value)
    return tuple(results)


def _valid(target: Tensor, ignore_index: Optional[int]) -> Tensor:
    """The rows whose target is not ignore_index (every row when there is none)."""
    if ignore_index is None:
        return torch.ones_like(target, dtype=torch.bool)
    return target != ignore_index


def reduce_loss(loss: Tensor, denominator: Tensor, leading: torch.Size, reduction: str) -> Tensor:
    """The per-row losses under `reduction`, shaped by the input's leading dimensions."""
    if reduction == "none":
        return loss.reshape(leading)
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / denominator


def loss_gradients(
    target: Tensor,
    class_weight: Optional[Tensor],
    ignore_index: int,
    label_smoothing: float,
    vocab: int,
    reduction: str,
    dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor]:
    """The gradients of a 'sum' or 'mean' loss with respect to the row statistics (lse,
    target_logit, logit_sum), [N] each, as autograd finds them through `row_losses` and
    `reduce_loss`.

    The loss is linear in the statistics with no constant term, so its gradient with respect to
    one statistic is `row_losses` of that statistic set to the reduction's gradient (1, or
    1 / denominator for 'mean') and the others to 0: the products autograd forms, so ignored
    rows get 0 even when every row is ignored, and a 'mean' whose class weights sum to 0 over
    the valid rows gets autograd's (and F.cross_entropy's) nan.
    """
    zero = torch.zeros(target.shape, dtype=dtype, device=target.device)
    options = (target, class_weight, ignore_index, label_smoothing, vocab)
    scale = torch.ones_like(zero)
    if reduction == "mean":
        scale = scale / row_losses(zero, zero, zero, *options)[1]
    lse, target_logit, logit_sum = (
        row_losses(*unit, *options)[0]
        for unit in ((scale, zero, zero), (zero, scale, zero), (zero, zero, scale))
    )
    return lse, target_logit, logit_sum
