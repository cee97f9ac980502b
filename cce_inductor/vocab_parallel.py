"""Vocabulary-parallel CCE: the classifier's classes are split across a process group's ranks.

Reached through `cce_inductor.linear_cross_entropy(..., vocab_parallel_group=group)`.

Layout. Each rank holds one contiguous block of classes [start, start + V_local): its rows of
`linear_weight [V_local, D]`, of `linear_bias [V_local]` and of the class weights
`weight [V_local]`; every per-class tensor is sharded the same way, so a model shards its head once.
By default the blocks lie in rank order (start = the sizes of the lower ranks' blocks summed;
uneven sizes are fine), or each rank names its `start_index`; the blocks must tile [0, V).
`input [..., D]` and `target [...]` (global class ids) are the same on every rank, every rank
gets the same loss, equal to the unsharded one, and every rank must backpropagate that loss.

Forward. Each rank runs the fused forward op on its block with targets shifted by `start` (a
target outside the block has no logit there: target_logit 0), then the row statistics combine:
    lse          = log sum_r exp(lse_r)      max over ranks M, then a sum of exp(lse_r - M)
    target_logit = sum_r target_logit_r      only the block holding t_i contributes
    logit_sum    = sum_r logit_sum_r         (label smoothing)
    entropy      = B / S + log S             S = sum_r exp(lse_r - M),
                                             B = sum_r exp(lse_r - M) (H_r + M - lse_r)
    w[t_i], W    = sums over ranks of the block's w[t_i] (0 off the block) and of sum_j w_j
and `losses.head_outputs` forms the outputs with the global V. The entropy's combine is the
mean-logit merge mu = sum_r exp(lse_r - lse) mu_r written for H = lse - mu: every term of B is
>= 0 (H_r >= 0, M >= lse_r), so it adds no cancellation (see cce_inductor.ops).

Backward. The loss's gradients with respect to the global statistics are identical on every
rank (the loss is replicated), so on rank r
    dz_ij = p_ij (g_lse_i - g_H_i (log p_ij + H_i)) + g_t_i * [j == t_i] + g_s_i * w_j,
with p_ij = exp(z_ij - lse_i), j in the block, which is the bwd op on the block given the
GLOBAL lse and entropy: dC and db are exactly the unsharded
gradient's rows of the block, and dE = sum_r dz_r C_r is all-reduced. Letting autograd route
through the fwd op's local lse instead gives the same dz (d lse / d lse_r = exp(lse_r - lse), and
exp(z - lse_r) exp(lse_r - lse) = exp(z - lse)), but the gradient filter would then judge the
softmax of the block alone, exp(lse - lse_r) times larger, and skip next to nothing on the blocks
holding little probability mass; with the global lse it skips what the unsharded filter skips.

Traffic per call, per rank (s = 4 bytes for the fp32 statistics, 8 for fp64 inputs):

| pass     | collective                       | elements                    | dtype       |
|----------|----------------------------------|-----------------------------|-------------|
| forward  | all_gather: layout and checks    | 5 per rank                  | int64       |
| forward  | all_reduce max: lse_r            | N                           | statistics  |
| forward  | all_reduce sum: row statistics   | (2 + ls + cw + h) N + cw    | statistics  |
| backward | all_reduce sum: dE (if needed)   | N D                         | input dtype |

ls = 1 with label smoothing, cw = 1 with class weights, h = 1 with the entropy, else 0. Example, Gemma 2 2B's shapes
(N = 8192, D = 2304, bf16, V = 256000 in any number of blocks): forward 32 KiB + 64 KiB,
backward 36 MiB, the same dE all-reduce as any column-parallel linear's backward; gathering the
logits instead would move N V values. The layout all_gather is read back to the host: a device
sync under NCCL, and a graph break when torch.compile traces this function. `sharded_loss` is
the loss for a layout known in advance, without that all_gather: the graph pass calls it for
tensor-parallel heads, whose layout the DTensor spec gives (cce_inductor.dtensor_sites).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor

from cce_inductor import arguments, compat, dispatch, losses, ops
from cce_inductor.arguments import LossOptions
from cce_inductor.losses import RowStatistics

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

# The layout all_gather's fields, one row per rank.
_OK, _START, _SIZE, _ROWS, _HIDDEN = range(5)


def vocab_parallel_loss(
    input: Tensor, linear_weight: Tensor, target: Optional[Tensor], linear_bias: Optional[Tensor],
    weight: Optional[Tensor], options: LossOptions,
    *,
    group: ProcessGroup,
    start_index: Optional[int] = None,
) -> tuple[Tensor, ...]:
    """`linear_head` with the classes sharded over `group` (see the module doc); the explicit
    API calls this for `vocab_parallel_group=group`.

    Every rank of the group must call this with the same input, target and options.
    """
    try:
        arguments.check_arguments(input, linear_weight, target, linear_bias, weight, options)
        if start_index is not None and not (isinstance(start_index, int) and start_index >= 0):
            raise ValueError(f"vocab_start_index must be an int >= 0, got {start_index!r}")
        local_error = None
    except (ValueError, TypeError) as error:
        local_error = error
    start, vocab = _agree_on_layout(local_error, input, linear_weight, start_index, group)
    return sharded_loss(input, linear_weight, target, linear_bias, weight, options,
                        group=group, start=start, vocab=vocab)


def sharded_loss(
    input: Tensor, linear_weight: Tensor, target: Optional[Tensor], linear_bias: Optional[Tensor],
    weight: Optional[Tensor], options: LossOptions,
    *,
    group: Union[ProcessGroup, str],
    start: int,
    vocab: int,
) -> tuple[Tensor, ...]:
    """The outputs of the head on this rank's block [start, start + V_local) of `vocab`
    classes, for a layout already known to tile [0, vocab) (the arguments checked): no layout
    collective, nothing read back to the host, so it traces into one graph. `group` is a
    process group or its name."""
    if target is not None:
        arguments.check_target_values(target, vocab, options.ignore_index)
    rows = losses.flatten(input, target, weight, options)
    *stats, class_weight_sums = _ShardedRowStatistics.apply(
        rows.input, linear_weight, linear_bias,
        rows.target - start if target is not None else rows.target, rows.class_weight,
        rows.softcap, rows.logit_scale, rows.with_logit_sum, rows.with_entropy,
        arguments.resolve_filter_eps(options.filter_eps, input.dtype), options.filter_classifier,
        group,
    )
    sharded_class_weight = (
        (class_weight_sums[:-1], class_weight_sums[-1]) if weight is not None else None
    )
    return losses.head_outputs(RowStatistics(*stats), rows, options, vocab,
                               sharded_class_weight=sharded_class_weight)


def _agree_on_layout(
    local_error: Optional[Exception],
    input: Tensor,
    linear_weight: Tensor,
    start_index: Optional[int],
    group: ProcessGroup,
) -> tuple[int, int]:
    """(this rank's first class, the global V), from one all_gather of every rank's
    (arguments valid, start or -1, block size, N, D).

    Every rank learns whether every rank's arguments passed their checks, so all ranks raise
    together instead of the valid ones waiting forever in the next collective.
    """
    hidden = input.shape[-1] if input.dim() else 0
    row = [
        local_error is None,
        -1 if start_index is None or local_error is not None else start_index,
        linear_weight.shape[0] if linear_weight.dim() else 0,
        input.numel() // hidden if hidden else 0,
        hidden,
    ]
    table = compat.all_gather(
        torch.tensor(row, dtype=torch.int64, device=input.device), group
    ).view(-1, len(row)).tolist()
    if local_error is not None:
        raise local_error
    failed = [rank for rank, fields in enumerate(table) if not fields[_OK]]
    if failed:
        raise RuntimeError(
            f"vocabulary-parallel linear_cross_entropy: rank(s) {failed} of the group rejected "
            "their arguments (their own error says why)"
        )
    shapes = [(fields[_ROWS], fields[_HIDDEN]) for fields in table]
    if len(set(shapes)) > 1:
        raise ValueError(
            "vocabulary-parallel linear_cross_entropy: input must have the same number of rows N "
            f"and width D on every rank, got (N, D) per rank {shapes}"
        )
    sizes = [fields[_SIZE] for fields in table]
    given = [fields[_START] >= 0 for fields in table]
    if all(given):
        starts = [fields[_START] for fields in table]
    elif not any(given):
        starts = [sum(sizes[:rank]) for rank in range(len(sizes))]
    else:
        raise ValueError("vocab_start_index must be given on every rank of the group or on none")
    vocab = sum(sizes)
    end = 0
    for start, size in sorted(zip(starts, sizes)):
        if start != end:
            raise ValueError(
                f"the vocabulary blocks (start, size) per rank {list(zip(starts, sizes))} must "
                f"tile [0, {vocab}) with no gap or overlap"
            )
        end = start + size
    return starts[dist.get_rank(group)], vocab


class _ShardedRowStatistics(torch.autograd.Function):
    """The global row statistics (lse, target_logit, logit_sum, entropy) from this rank's block
    of classes, plus the summed class-weight lookups (w[t_i] per row, then W; no gradient).
    The backward runs the bwd op on the block with the global lse and entropy and all-reduces
    dE."""

    @staticmethod
    def forward(
        ctx,
        input: Tensor,
        classifier: Tensor,
        bias: Optional[Tensor],
        local_target: Tensor,
        class_weight: Optional[Tensor],
        softcap: Optional[float],
        logit_scale: float,
        with_logit_sum: bool,
        with_entropy: bool,
        filter_eps: Optional[float],
        filter_classifier: bool,
        group: Union[ProcessGroup, str],
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        block_lse, target_logit, logit_sum, block_entropy, tile_max, _ = dispatch.call(
            torch.ops.cce.linear_cross_entropy_fwd, input, classifier, bias, local_target,
            class_weight, softcap, with_logit_sum, filter_eps, filter_classifier, logit_scale,
            with_entropy,
        )
        class_weight_parts = []
        if class_weight is not None:
            block = classifier.shape[0]
            in_block = (local_target >= 0) & (local_target < block)
            row_weight = class_weight[local_target.clamp(0, block - 1)]
            class_weight_parts = [torch.where(in_block, row_weight, 0.0), class_weight.sum()[None]]
        # Subtracting the max over ranks keeps every exp in range; it cancels in the lse.
        row_max = compat.all_reduce(block_lse, "max", group)
        block_weight = torch.exp(block_lse - row_max)
        entropy_parts = [block_weight * (block_entropy + (row_max - block_lse))] \
            if with_entropy else []
        parts = [block_weight, target_logit, logit_sum, *entropy_parts, *class_weight_parts]
        summed = compat.all_reduce(torch.cat(parts), "sum", group)
        sum_exp, target_logit, logit_sum, entropy_sum, class_weight_sums = (
            piece.clone() for piece in summed.split(
                [block_lse.numel(), target_logit.numel(), logit_sum.numel(),
                 sum(part.numel() for part in entropy_parts),
                 sum(part.numel() for part in class_weight_parts)]
            )
        )
        log_sum_exp = sum_exp.log()
        lse = row_max + log_sum_exp
        entropy = entropy_sum / sum_exp + log_sum_exp if with_entropy else block_entropy
        # tile_max bounds this block's logits, so it stays valid against the global lse; the
        # global lse comes without parts (its softmax keeps lse's fp32 rounding).
        ctx.save_for_backward(input, classifier, bias, local_target, class_weight, lse, entropy,
                              tile_max, None)
        ctx.options = ops.StatisticsOptions(softcap, logit_scale, with_logit_sum, with_entropy,
                                            filter_eps, filter_classifier)
        ctx.group = group
        ctx.mark_non_differentiable(class_weight_sums)
        return lse, target_logit, logit_sum, entropy, class_weight_sums

    @staticmethod
    def backward(ctx, grad_lse, grad_target_logit, grad_logit_sum, grad_entropy, _):
        grad_input, grad_classifier, grad_bias = ops.statistics_gradients(
            functools.partial(dispatch.call, torch.ops.cce.linear_cross_entropy_bwd),
            ctx.saved_tensors, grad_lse, grad_target_logit, grad_logit_sum, grad_entropy,
            ctx.options, ctx.needs_input_grad,
        )
        if grad_input is not None:
            # input is replicated and every block contributes to its gradient.
            grad_input = compat.all_reduce(grad_input, "sum", ctx.group)
        return (grad_input, grad_classifier, grad_bias, *(None,) * 9)
