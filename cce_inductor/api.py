"""The explicit API: `linear_cross_entropy` and the `LinearCrossEntropy` module.

Shaped like torch's `torch.nn.functional.linear_cross_entropy` (input `[..., D]`, target
`[...]`) with CCE's options added. The loss is fp32 whatever the inputs' dtype; gradients come
back in the inputs' dtypes. The `[..., V]` logits are never materialized.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Union

import torch
from torch import Tensor, nn

from cce_inductor import compat, ops  # noqa: F401  (ops registers torch.ops.cce.*)
from cce_inductor import dispatch

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

REDUCTIONS = ("mean", "sum", "none")
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

FilterEps = Union[float, str, None]


def resolve_filter_eps(filter_eps: FilterEps, dtype: torch.dtype) -> Optional[float]:
    """'auto' is finfo(dtype).eps / 32 for 16-bit inputs (2**-12 for bf16) and off otherwise."""
    if filter_eps == "auto":
        return torch.finfo(dtype).eps / 32 if dtype in (torch.float16, torch.bfloat16) else None
    if filter_eps is None:
        return None
    if isinstance(filter_eps, str) or not float(filter_eps) >= 0:
        raise ValueError(f"filter_eps must be 'auto', None or a float >= 0, got {filter_eps!r}")
    return float(filter_eps) or None


def _check_arguments(
    input: Tensor,
    linear_weight: Tensor,
    target: Tensor,
    linear_bias: Optional[Tensor],
    weight: Optional[Tensor],
    reduction: str,
    label_smoothing: float,
    softcap: Optional[float],
) -> None:
    """Every check that needs no data: shapes, dtypes, devices and option values."""
    if input.dim() < 1:
        raise ValueError("input must have at least one dimension [..., D], got a scalar")
    if linear_weight.dim() != 2:
        raise ValueError(
            f"linear_weight must be 2-D [V, D], got shape {tuple(linear_weight.shape)}"
        )
    vocab, hidden = linear_weight.shape
    if vocab == 0:
        raise ValueError("linear_weight must have at least one row (vocabulary size V >= 1)")
    if input.shape[-1] != hidden:
        raise ValueError(
            f"input's last dimension ({input.shape[-1]}) must equal linear_weight's second "
            f"dimension D ({hidden}); input {tuple(input.shape)}, linear_weight {(vocab, hidden)}"
        )
    if tuple(target.shape) != tuple(input.shape[:-1]):
        raise ValueError(
            f"target must have shape {tuple(input.shape[:-1])} (input's leading dimensions), "
            f"got {tuple(target.shape)}"
        )
    if target.dtype.is_floating_point or target.dtype.is_complex or target.dtype == torch.bool:
        raise TypeError(
            f"target must hold class indices (an integer tensor), got dtype {target.dtype}; "
            "probability targets are not supported"
        )
    if input.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"input dtype {input.dtype} is not supported; use one of {SUPPORTED_DTYPES}"
        )
    if linear_weight.dtype != input.dtype:
        raise TypeError(
            f"linear_weight dtype ({linear_weight.dtype}) must match input dtype ({input.dtype})"
        )
    for name, tensor in (("linear_bias", linear_bias), ("weight", weight)):
        if tensor is None:
            continue
        if tuple(tensor.shape) != (vocab,):
            raise ValueError(f"{name} must have shape ({vocab},), got {tuple(tensor.shape)}")
        if not tensor.dtype.is_floating_point:
            raise TypeError(f"{name} must be a floating-point tensor, got {tensor.dtype}")
    if linear_bias is not None and linear_bias.dtype != input.dtype:
        raise TypeError(
            f"linear_bias dtype ({linear_bias.dtype}) must match input dtype ({input.dtype})"
        )
    for name, tensor in (
        ("linear_weight", linear_weight), ("target", target),
        ("linear_bias", linear_bias), ("weight", weight),
    ):
        if tensor is not None and tensor.device != input.device:
            raise ValueError(
                f"{name} is on {tensor.device} but input is on {input.device}; "
                "all tensors must be on one device"
            )
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be None or > 0, got {softcap}")


def _check_target_values(target: Tensor, vocab: int, ignore_index: int) -> None:
    """Targets must lie in [0, V) or equal ignore_index: a bad one raises, never a wrong loss."""
    bad = ((target < 0) | (target >= vocab)) & (target != ignore_index)
    if compat.is_traced(target):
        # No f-string of vocab here: formatting a symbolic V would specialize it.
        torch._assert_async(~bad.any(), "target values must be in [0, V) or equal ignore_index")
    elif bad.any():
        example = int(target[bad].flatten()[0])
        raise IndexError(
            f"target values must be in [0, {vocab}) or equal ignore_index ({ignore_index}); "
            f"got {example}"
        )


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
    filter_eps: FilterEps = "auto",
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
        filter_eps: skip backward tiles whose softmax values are all below this; 'auto' is
            finfo(dtype).eps / 32 for 16-bit inputs and off for fp32; None disables.
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
    ignore_index = -100 if ignore_index is None else int(ignore_index)
    if vocab_parallel_group is not None:
        from cce_inductor import vocab_parallel

        return vocab_parallel.linear_cross_entropy(
            input, linear_weight, target, group=vocab_parallel_group,
            start_index=vocab_start_index, linear_bias=linear_bias, weight=weight,
            reduction=reduction, ignore_index=ignore_index, label_smoothing=label_smoothing,
            softcap=softcap, filter_eps=filter_eps, return_lse=return_lse,
        )
    if vocab_start_index is not None:
        raise ValueError("vocab_start_index is only meaningful with vocab_parallel_group")
    _check_arguments(
        input, linear_weight, target, linear_bias, weight, reduction, label_smoothing, softcap
    )
    vocab = linear_weight.shape[0]
    _check_target_values(target, vocab, ignore_index)
    eps = resolve_filter_eps(filter_eps, input.dtype)

    leading = input.shape[:-1]
    flat_input = input.reshape(-1, input.shape[-1])
    flat_target = target.reshape(-1)
    class_weight = weight.to(ops.stats_dtype(input.dtype)) if weight is not None else None
    smoothing = float(label_smoothing)

    # Eager calls on a GPU run the op through an internal torch.compile (the Triton templates).
    lse, target_logit, logit_sum = dispatch.linear_cross_entropy_fwd(
        flat_input, linear_weight, linear_bias, flat_target, class_weight,
        None if softcap is None else float(softcap), smoothing > 0, eps,
    )
    loss, denominator = row_losses(
        lse, target_logit, logit_sum, flat_target, class_weight, ignore_index, smoothing, vocab
    )
    loss = reduce_loss(loss, denominator, reduction, leading)
    if return_lse:
        return loss, lse.reshape(leading)
    return loss


def row_losses(
    lse: Tensor,
    target_logit: Tensor,
    logit_sum: Tensor,
    target: Tensor,
    class_weight: Optional[Tensor],
    ignore_index: int,
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
    valid = target != ignore_index
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


def reduce_loss(loss: Tensor, denominator: Tensor, reduction: str, shape: torch.Size) -> Tensor:
    if reduction == "none":
        return loss.reshape(shape)
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / denominator


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
        filter_eps: FilterEps = "auto",
        return_lse: bool = False,
    ) -> None:
        super().__init__()
        self.register_buffer("weight", weight)
        self.reduction = reduction
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing
        self.softcap = softcap
        self.filter_eps = filter_eps
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
            softcap=self.softcap, filter_eps=self.filter_eps, return_lse=self.return_lse,
        )
