"""Checking the arguments of the fused loss and resolving `filter_eps`.

Shared by every entry point (the explicit API, the vocabulary-parallel and tensor-parallel
losses, the graph pass and its options), so that a bad argument gets the same error, naming
the argument, whichever way it came in. The names are those of the public API: `linear_weight`
is the classifier, `weight` the class weights.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Union

import torch
from torch import Tensor

from cce_inductor import compat

REDUCTIONS = ("mean", "sum", "none")
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# What the fused head can return (cce_inductor.api.linear_head), per position unless said:
#   loss          cross-entropy under the reduction (a scalar for 'mean' and 'sum')
#   lse           log-sum-exp of the logits
#   log_probs     log-softmax at the target, 0 where the target is ignore_index
#   target_logit  the logit at the target
#   entropy       entropy of the softmax (every position, ignored or not)
OUTPUTS = ("loss", "lse", "log_probs", "target_logit", "entropy")
TARGET_OUTPUTS = ("loss", "log_probs", "target_logit")

FilterEps = Union[float, str, None]
# Which gradients filter: all of them, or only the input's (the paper's pretraining recipe).
FILTER_GRADS = ("all", "input")


@dataclasses.dataclass(frozen=True)
class LossOptions:
    """The fused head's options beyond its tensors, as the public API names them; how the
    explicit API hands them to the vocabulary- and tensor-parallel losses. ignore_index None:
    no position is ignored, every target must be a class (as for torch.gather)."""

    reduction: str = "mean"
    ignore_index: Optional[int] = -100
    label_smoothing: float = 0.0
    softcap: Optional[float] = None
    logit_scale: float = 1.0
    filter_eps: FilterEps = "auto"
    filter_grads: str = "all"
    outputs: tuple[str, ...] = ("loss",)

    @property
    def filter_classifier(self) -> bool:
        """Whether the classifier's (and bias's) gradients skip negligible tiles too."""
        return self.filter_grads == "all"


def check_filter_grads(filter_grads: str) -> None:
    if filter_grads not in FILTER_GRADS:
        raise ValueError(f"filter_grads must be one of {FILTER_GRADS}, got {filter_grads!r}")


def resolve_filter_eps(filter_eps: FilterEps, dtype: torch.dtype) -> Optional[float]:
    """'auto' is finfo(dtype).eps / 32 for 16-bit inputs (2**-12 for bf16) and off otherwise."""
    if filter_eps == "auto":
        return torch.finfo(dtype).eps / 32 if dtype in (torch.float16, torch.bfloat16) else None
    if filter_eps is None:
        return None
    if isinstance(filter_eps, str) or not float(filter_eps) >= 0:
        raise ValueError(f"filter_eps must be 'auto', None or a float >= 0, got {filter_eps!r}")
    return float(filter_eps) or None


def check_number(name: str, value: float, *, positive: bool = False) -> float:
    """`value`, or an error naming the argument: it must be a finite real number (and > 0 with
    `positive`). Comparisons, not math.isfinite: Dynamo traces numbers as symbolic floats (e.g.
    under dynamic=True), which comparisons only guard on."""
    if isinstance(value, bool) or not isinstance(value, (int, float, torch.SymFloat)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    if not -math.inf < value < math.inf or (positive and not value > 0):
        raise ValueError(f"{name} must be a finite number{' > 0' if positive else ''}, "
                         f"got {value!r}")
    return value


def check_arguments(
    input: Tensor, linear_weight: Tensor, target: Optional[Tensor], linear_bias: Optional[Tensor],
    weight: Optional[Tensor], options: LossOptions,
) -> Optional[float]:
    """Every check that needs no data: shapes, dtypes, devices and option values; returns
    filter_eps resolved for the input's dtype. target may be None when no output needs it."""
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
    unknown = [name for name in options.outputs if name not in OUTPUTS]
    if unknown or not options.outputs:
        raise ValueError(f"outputs must name some of {OUTPUTS}, got {options.outputs!r}")
    if target is not None:
        _check_target(target, input)
    elif any(name in TARGET_OUTPUTS for name in options.outputs):
        raise ValueError(f"a target is needed for the outputs {options.outputs}")
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
    if options.reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {options.reduction!r}")
    if not 0.0 <= options.label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {options.label_smoothing}")
    if options.softcap is not None and not options.softcap > 0:
        raise ValueError(f"softcap must be None or > 0, got {options.softcap}")
    check_filter_grads(options.filter_grads)
    check_number("logit_scale", options.logit_scale)
    return resolve_filter_eps(options.filter_eps, input.dtype)


def _check_target(target: Tensor, input: Tensor) -> None:
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


def check_target_values(target: Tensor, vocab: int, ignore_index: Optional[int]) -> None:
    """Targets must lie in [0, V) or equal ignore_index (None: none may): a bad one raises,
    never a wrong loss."""
    bad = (target < 0) | (target >= vocab)
    if ignore_index is not None:
        bad &= target != ignore_index
    if compat.is_traced(target):
        # No f-string of vocab here: formatting a symbolic V would specialize it.
        compat.assert_async(~bad.any(), "target values must be in [0, V) or equal ignore_index")
    elif bad.any():
        example = int(target[bad].flatten()[0])
        raise IndexError(
            f"target values must be in [0, {vocab}) or equal ignore_index ({ignore_index}); "
            f"got {example}"
        )
