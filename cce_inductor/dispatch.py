"""Call-time dispatch of the cce ops: eager calls reach the Triton templates.

Called outside torch.compile, a cce op would run its blocked eager implementation. On CUDA
tensors (and on CPU tensors under the interpreter harness, which is how this is tested) `call`
instead runs the op through an internal `torch.compile(fullgraph=True)`: Inductor lowers it to
the CCE templates, and for the forward op AOT autograd compiles its backward (the backward op)
to theirs when the gradients are asked for. Every entry point that runs the ops eagerly (the
explicit API, the vocabulary-parallel loss) calls them through here.

One compiled function per op, option set (the op's non-tensor arguments and which optional
tensors are absent: constants of the graph, which the lowering needs as Python values) and
input signature (devices, dtypes, shapes but the rows, whether gradients are wanted), each with
its own code object: Dynamo keeps graphs and counts recompiles per code object, and with
fullgraph=True running out of recompiles is an error, so no compiled function should collect
many variants. The row dimension (`ops.ROW_ARGUMENTS`) is marked dynamic: a new N does not
recompile (N = 1 is specialized, as Dynamo always does), while V and D stay static for the
kernels' sake.

Where the templates do not serve (a plain CPU), `one_pass_unavailable_reason` decides whether a
loss may compute its gradients in its forward (`cce_inductor.one_pass`) instead of running the
forward op now and the backward op later.
"""

from __future__ import annotations

import dataclasses
import functools
import types
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from cce_inductor import compat, filter_stats, ops
from cce_inductor.arguments import LossOptions
from cce_inductor.lowering import common


def call(op: Any, *args: Any) -> Any:
    """`op(*args)` for a cce op (`torch.ops.cce.<name>`), through the compiled templates when
    called eagerly on tensors they serve (see the module docstring)."""
    input = args[0]
    if not routes_to_templates(input):
        return op(*args)
    rows = ops.ROW_ARGUMENTS[op.__name__]
    tensors = [i for i, arg in enumerate(args) if isinstance(arg, Tensor)]
    constants = tuple((i, arg) for i, arg in enumerate(args) if not isinstance(arg, Tensor))
    compiled = _compiled(op.__name__, len(args), constants, _signature(args, tensors, rows),
                         _lowering_switches())
    return compiled(*(_rows_dynamic(args[i]) if i in rows else args[i] for i in tensors))


def routes_to_templates(input: Tensor) -> bool:
    """Whether an eager call on `input` goes through the internal torch.compile: not while
    tracing already (the lowering takes the op from there), and only for a device and dtype
    the templates serve."""
    if compat.is_traced(input) or compat.functorch_transforms_active():
        return False
    return common.template_unavailable_reason(input.device, input.dtype) is None


# The LossOptions fields whose every value the one pass computes exactly. Any other option (a new
# output, say) that is not at its default sends the loss to the forward and backward ops, until
# the one pass learns it.
ONE_PASS_OPTIONS = frozenset({
    "reduction", "ignore_index", "label_smoothing", "softcap", "logit_scale", "filter_eps",
    "filter_grads",
})


def one_pass_unavailable_reason(
    input: Tensor, classifier: Tensor, bias: Optional[Tensor], class_weight: Optional[Tensor],
    options: LossOptions,
) -> Optional[str]:
    """Why the loss must not compute its gradients in its forward (`cce_inductor.one_pass`), or
    None when it may.

    That is valid only while the loss's upstream gradient is a scalar: the loss is reduced
    ('mean' or 'sum') and is the only output (`outputs` at its default: no lse, log-probs or
    entropy, whose upstream gradients are per row), so every row's gradient weight is known in
    the forward and the backward only scales the gradients. It must also pay: some gradient is
    wanted (not under no_grad, not every input frozen). Class weights must not require grad
    (the backward op refuses that gradient with a clear error), no torch.func transform may be
    active (the one pass is an autograd.Function without a vmap rule), and the blocked
    implementation must be the one serving (the Triton templates have no one-pass kernel)."""
    defaults = LossOptions()
    for field in dataclasses.fields(options):
        if field.name not in ONE_PASS_OPTIONS and (
                getattr(options, field.name) != getattr(defaults, field.name)):
            return f"option {field.name}={getattr(options, field.name)!r}"
    if options.reduction == "none":
        return "reduction='none' (an upstream gradient per row)"
    if not torch.is_grad_enabled():
        return "gradients are disabled"
    if not any(t is not None and t.requires_grad for t in (input, classifier, bias)):
        return "no input requires grad"
    if class_weight is not None and class_weight.requires_grad:
        return "class weights require grad"
    if compat.functorch_transforms_active():
        return "a torch.func transform is active"
    if common.template_unavailable_reason(input.device, input.dtype) is None:
        return "the Triton templates serve this device and dtype"
    return None


def _signature(args: tuple, tensors: list[int], rows: tuple[int, ...]) -> tuple:
    """What Dynamo would guard on besides N: devices, dtypes, shapes but the rows, whether
    gradients are wanted."""
    wants_grad = torch.is_grad_enabled() and any(args[i].requires_grad for i in tensors)
    return tuple(
        (i, args[i].device, args[i].dtype, tuple(args[i].shape)[1 if i in rows else 0:])
        for i in tensors
    ) + (wants_grad,)


def _lowering_switches() -> tuple[bool, bool]:
    """Global settings the lowering reads (so the compiled graph depends on them) that Dynamo's
    guards may not cover: filter-tile counting, TF32 matmuls. (Deterministic algorithms need no
    entry: the backward has no atomics either way.)"""
    return (filter_stats.counting_enabled(), bool(torch.backends.cuda.matmul.allow_tf32))


def _rows_dynamic(tensor: Tensor) -> Tensor:
    """An alias of `tensor` whose dim 0 (the rows) Dynamo treats as dynamic; the alias keeps
    the mark off the caller's tensor."""
    alias = tensor.view(tensor.shape)
    compat.maybe_mark_dynamic(alias, 0)
    return alias


@functools.cache
def _compiled(name: str, arity: int, constants: tuple, signature: tuple,
              switches: tuple[bool, bool]) -> Callable[..., Any]:
    """The compiled op `name` with its non-tensor arguments (`constants`: (position, value))
    fixed; it takes the tensor arguments in order. `signature` and `switches` (see
    _lowering_switches) only key the cache."""
    op = getattr(torch.ops.cce, name)
    fixed = dict(constants)
    tensor_positions = [i for i in range(arity) if i not in fixed]

    def run(*tensors: Tensor) -> Any:
        args = [fixed.get(i) for i in range(arity)]
        for position, tensor in zip(tensor_positions, tensors):
            args[position] = tensor
        return op(*args)

    # Dynamo caches compiled graphs per code object: give this function its own.
    own = types.FunctionType(run.__code__.replace(), run.__globals__, run.__name__,
                             run.__defaults__, run.__closure__)
    return torch.compile(own, backend="inductor", fullgraph=True)
