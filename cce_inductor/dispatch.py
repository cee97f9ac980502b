"""Eager calls of the explicit API reach the Triton templates.

Called outside torch.compile, `cce_inductor.linear_cross_entropy` would run the cce ops' blocked
eager implementation. On CUDA tensors (and on CPU tensors under the interpreter harness, which is
how this is tested) it instead runs the forward op through an internal
`torch.compile(fullgraph=True)`: Inductor lowers it to the CCE templates, and AOT autograd
compiles its backward (the backward op) to theirs when the gradients are asked for.

One compiled function per option set (softcap, logit sum, filter eps: constants of the graph,
which the lowering needs as Python values) and input signature (dtype, classifier shape, which
optional tensors are given, whether gradients are wanted), each with its own code object:
Dynamo keeps graphs and counts recompiles per code object, and with fullgraph=True running out
of recompiles is an error, so no compiled function should collect many variants. The row
dimension is marked dynamic: a new N does not recompile (N = 1 is specialized, as Dynamo always
does), while V and D stay static for the kernels' sake.
"""

from __future__ import annotations

import functools
import types
from typing import Callable, Optional

import torch
from torch import Tensor

from cce_inductor import compat
from cce_inductor.lowering import common, filter_counting

StatsFn = Callable[..., tuple[Tensor, Tensor, Tensor]]


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
    """`torch.ops.cce.linear_cross_entropy_fwd`, through the compiled templates when called
    eagerly on tensors they serve (see the module docstring)."""
    if not routes_to_templates(input):
        return torch.ops.cce.linear_cross_entropy_fwd(
            input, weight, bias, target, class_weight, softcap, with_logit_sum, filter_eps
        )
    compiled = _compiled(softcap, bool(with_logit_sum), filter_eps,
                         _signature(input, weight, bias, class_weight), _lowering_switches())
    return compiled(_rows_dynamic(input), weight, bias, _rows_dynamic(target), class_weight)


def routes_to_templates(input: Tensor) -> bool:
    """Whether an eager call on `input` goes through the internal torch.compile: not while
    tracing already (the lowering takes the op from there), and only for a device and dtype
    the templates serve."""
    if compat.is_traced(input) or compat.functorch_transforms_active():
        return False
    return common.template_unavailable_reason(input.device, input.dtype) is None


def _signature(input: Tensor, weight: Tensor, bias: Optional[Tensor],
               class_weight: Optional[Tensor]) -> tuple:
    """What Dynamo would guard on besides N: device, dtype, classifier shape, which optional
    tensors are given, whether gradients are wanted."""
    wants_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (input, weight, bias))
    return (input.device, input.dtype, tuple(weight.shape), bias is not None,
            class_weight is not None, wants_grad)


def _lowering_switches() -> tuple[bool, bool, bool]:
    """Global settings the lowering reads (so the compiled graph depends on them) that Dynamo's
    guards may not cover: filter-tile counting, TF32 matmuls, deterministic algorithms."""
    return (filter_counting.enabled(), bool(torch.backends.cuda.matmul.allow_tf32),
            torch.are_deterministic_algorithms_enabled())


def _rows_dynamic(tensor: Tensor) -> Tensor:
    """An alias of `tensor` whose dim 0 (the rows) Dynamo treats as dynamic; the alias keeps
    the mark off the caller's tensor."""
    alias = tensor.view(tensor.shape)
    compat.maybe_mark_dynamic(alias, 0)
    return alias


@functools.cache
def _compiled(softcap: Optional[float], with_logit_sum: bool, filter_eps: Optional[float],
              signature: tuple, switches: tuple[bool, bool, bool]) -> StatsFn:
    """The compiled forward op for one option set; `signature` (the inputs') and `switches`
    (see _lowering_switches) only key the cache."""
    def forward(input: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor,
                class_weight: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        return torch.ops.cce.linear_cross_entropy_fwd(
            input, weight, bias, target, class_weight, softcap, with_logit_sum, filter_eps
        )

    # Dynamo caches compiled graphs per code object: give this function its own.
    own = types.FunctionType(forward.__code__.replace(), forward.__globals__, forward.__name__,
                             forward.__defaults__, forward.__closure__)
    return torch.compile(own, backend="inductor", fullgraph=True)
