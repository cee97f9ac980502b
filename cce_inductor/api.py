"""The explicit API: `linear_cross_entropy`, `linear_log_probs` and the `LinearCrossEntropy`
module, and `linear_head`, the general form both functions call (and the graph pass inserts).

Shaped like torch's `torch.nn.functional.linear_cross_entropy` (input `[..., D]`, target
`[...]`, `linear_weight`, `linear_bias`, class weights `weight`) with CCE's options added. The
results are fp32 whatever the inputs' dtype; gradients come back in the inputs' dtypes. The
`[..., V]` logits are never materialized.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Union

import torch
from torch import Tensor, nn

from cce_inductor import arguments, dispatch, losses, one_pass, vocab_parallel
from cce_inductor.arguments import FilterEps

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup


def linear_cross_entropy(
    input: Tensor,
    linear_weight: Tensor,
    target: Tensor,
    *,
    linear_bias: Optional[Tensor] = None,
    weight: Optional[Tensor] = None,
    reduction: str = "mean",
    ignore_index: Optional[int] = -100,
    label_smoothing: float = 0.0,
    softcap: Optional[float] = None,
    logit_scale: float = 1.0,
    filter_eps: FilterEps = "auto",
    filter_grads: str = "all",
    return_lse: bool = False,
    vocab_parallel_group: Optional[ProcessGroup] = None,
    vocab_start_index: Optional[int] = None,
) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """`cross_entropy(linear(input, linear_weight, linear_bias), target)` without the logits.

    Args:
        input: hidden states `[..., D]` (fp32, fp16 or bf16; fp64 for testing).
        linear_weight: classifier `[V, D]`, same dtype as input.
        target: class indices `[...]`; values in [0, V) or equal to `ignore_index`.
        linear_bias: optional classifier bias `[V]`.
        weight: optional class weights `[V]`, as in `F.cross_entropy`.
        reduction: 'mean' (weighted by class weights of non-ignored targets), 'sum' or 'none'.
        ignore_index: target value that contributes no loss and no gradient (None means -100).
        label_smoothing: in [0, 1], as in `F.cross_entropy`.
        softcap: if given, logits become softcap * tanh(logits / softcap) (Gemma 2).
        logit_scale: the logits (after the softcap) are multiplied by this finite number, as
            Cohere's (`* logit_scale`) and Granite's (`/ logits_scaling`) models do, or a
            sampling temperature (1 / temperature). An extension of torch's signature.
        filter_eps: skip backward tiles whose softmax values are all below this; 'auto' is
            finfo(dtype).eps / 32 for 16-bit inputs and off for fp32; None disables.
        filter_grads: which gradients skip those tiles: 'all' (input, linear_weight and
            linear_bias) or 'input' (linear_weight's and linear_bias's gradients then sum every
            tile, as the paper recommends for pretraining). filter_eps means the same for both.
        return_lse: also return the per-position log-sum-exp `[...]` (fp32), e.g. for z-loss;
            gradients flow through it.
        vocab_parallel_group: the vocabulary is sharded over this process group: linear_weight,
            linear_bias and weight hold this rank's contiguous block of classes, target holds
            global class ids, input and target are the same on every rank, and every rank gets
            the whole loss (see `cce_inductor.vocab_parallel`).
        vocab_start_index: with vocab_parallel_group, the global id of this rank's first class;
            by default the blocks lie in rank order.

    Returns:
        the loss (fp32; shape `[...]` for reduction='none', else a scalar), and with
        `return_lse` the pair (loss, lse).
    """
    results = linear_head(
        input, linear_weight, target, outputs=("loss", "lse") if return_lse else ("loss",),
        linear_bias=linear_bias, weight=weight, reduction=reduction,
        ignore_index=-100 if ignore_index is None else ignore_index,
        label_smoothing=label_smoothing, softcap=softcap, logit_scale=logit_scale,
        filter_eps=filter_eps, filter_grads=filter_grads,
        vocab_parallel_group=vocab_parallel_group, vocab_start_index=vocab_start_index,
    )
    return results if return_lse else results[0]


def linear_log_probs(
    input: Tensor,
    linear_weight: Tensor,
    target: Tensor,
    *,
    linear_bias: Optional[Tensor] = None,
    temperature: float = 1.0,
    softcap: Optional[float] = None,
    return_entropy: bool = False,
    ignore_index: int = -100,
    filter_eps: FilterEps = "auto",
    vocab_parallel_group: Optional[ProcessGroup] = None,
    vocab_start_index: Optional[int] = None,
) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """Per-position log-probabilities of `target` under softmax(linear(input) / temperature),
    and optionally the softmax's entropy, without the logits (the RL policy head).

    Args:
        input, linear_weight, linear_bias, vocab_parallel_group, vocab_start_index: as for
            `linear_cross_entropy`.
        target: token ids `[...]`; values in [0, V) or equal to `ignore_index`.
        temperature: the logits are divided by this finite number > 0 (after the softcap, as
            Gemma's model and then the trainer's sampling temperature would).
        softcap: if given, logits become softcap * tanh(logits / softcap) first.
        return_entropy: also return the entropy of the softmax at every position (ignored
            positions included).
        ignore_index: positions with this target get log-probability 0 and no gradient.
        filter_eps: as for `linear_cross_entropy`; the filter accounts for the entropy's
            gradient (see `cce_inductor.blocked.negligible_rows`).

    Returns:
        fp32 log-probabilities shaped `[...]`, and with `return_entropy` the pair (log_probs,
        entropy). Both are differentiable with respect to input, linear_weight and linear_bias.
    """
    scale = 1.0 / arguments.check_number("temperature", temperature, positive=True)
    results = linear_head(
        input, linear_weight, target,
        outputs=("log_probs", "entropy") if return_entropy else ("log_probs",),
        linear_bias=linear_bias, ignore_index=ignore_index, softcap=softcap, logit_scale=scale,
        filter_eps=filter_eps, vocab_parallel_group=vocab_parallel_group,
        vocab_start_index=vocab_start_index,
    )
    return results if return_entropy else results[0]


def linear_head(
    input: Tensor,
    linear_weight: Tensor,
    target: Optional[Tensor] = None,
    *,
    outputs: tuple[str, ...],
    linear_bias: Optional[Tensor] = None,
    weight: Optional[Tensor] = None,
    reduction: str = "mean",
    ignore_index: Optional[int] = -100,
    label_smoothing: float = 0.0,
    softcap: Optional[float] = None,
    logit_scale: float = 1.0,
    filter_eps: FilterEps = "auto",
    filter_grads: str = "all",
    vocab_parallel_group: Optional[ProcessGroup] = None,
    vocab_start_index: Optional[int] = None,
) -> tuple[Tensor, ...]:
    """The `outputs` (names from `cce_inductor.arguments.OUTPUTS`: loss, lse, log_probs,
    target_logit, entropy) of the linear head `logit_scale * softcap(linear(input))`, all from
    one pass over the vocabulary. The arguments are `linear_cross_entropy`'s, except that
    target may be None when no output needs it, and ignore_index None means that no position
    is ignored (every target must be a class)."""
    options = arguments.LossOptions(
        reduction=reduction, ignore_index=None if ignore_index is None else int(ignore_index),
        label_smoothing=label_smoothing, softcap=softcap, logit_scale=logit_scale,
        filter_eps=filter_eps, filter_grads=filter_grads, outputs=tuple(outputs),
    )
    if vocab_parallel_group is not None:
        return vocab_parallel.vocab_parallel_loss(
            input, linear_weight, target, linear_bias, weight, options,
            group=vocab_parallel_group, start_index=vocab_start_index,
        )
    if vocab_start_index is not None:
        raise ValueError("vocab_start_index is only meaningful with vocab_parallel_group")
    eps = arguments.check_arguments(input, linear_weight, target, linear_bias, weight, options)
    if not (torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (input, linear_weight, linear_bias))):
        eps = None  # no backward: the forward need not record tile maxima for its filter
    vocab = linear_weight.shape[0]
    if target is not None:
        arguments.check_target_values(target, vocab, options.ignore_index)

    rows = losses.flatten(input, target, weight, options)
    if dispatch.one_pass_unavailable_reason(rows.input, linear_weight, linear_bias,
                                            rows.class_weight, options) is None:
        return (one_pass.scalar_loss(rows, linear_weight, linear_bias, options, eps),)
    # Eager calls on a GPU run the op through an internal torch.compile (the Triton templates).
    stats = losses.RowStatistics(*dispatch.call(
        torch.ops.cce.linear_cross_entropy_fwd, rows.input, linear_weight, linear_bias,
        rows.target, rows.class_weight, rows.softcap, rows.with_logit_sum, eps,
        options.filter_classifier, rows.logit_scale, rows.with_entropy,
    )[:4])
    return losses.head_outputs(stats, rows, options, vocab)


class LinearCrossEntropy(nn.Module):
    """Module form of `linear_cross_entropy` holding the options; call as
    `module(input, linear_weight, target, linear_bias=None)`."""

    def __init__(
        self,
        *,
        weight: Optional[Tensor] = None,
        reduction: str = "mean",
        ignore_index: int = -100,
        label_smoothing: float = 0.0,
        softcap: Optional[float] = None,
        logit_scale: float = 1.0,
        filter_eps: FilterEps = "auto",
        filter_grads: str = "all",
        return_lse: bool = False,
    ) -> None:
        super().__init__()
        self.register_buffer("weight", weight)
        self.reduction = reduction
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing
        self.softcap = softcap
        self.logit_scale = logit_scale
        self.filter_eps = filter_eps
        self.filter_grads = filter_grads
        self.return_lse = return_lse

    def forward(
        self,
        input: Tensor,
        linear_weight: Tensor,
        target: Tensor,
        linear_bias: Optional[Tensor] = None,
    ) -> Union[Tensor, tuple[Tensor, Tensor]]:
        return linear_cross_entropy(
            input, linear_weight, target,
            linear_bias=linear_bias, weight=self.weight, reduction=self.reduction,
            ignore_index=self.ignore_index, label_smoothing=self.label_smoothing,
            softcap=self.softcap, logit_scale=self.logit_scale, filter_eps=self.filter_eps,
            filter_grads=self.filter_grads,
            return_lse=self.return_lse,
        )
