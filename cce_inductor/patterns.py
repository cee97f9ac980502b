"""Recognising `linear -> cross_entropy` sites in a Dynamo FX graph (torch-level IR).

A site is read backwards from a loss node (`F.cross_entropy`, or `F.nll_loss` of a
`log_softmax`) through the ops that may lie between the classifier head and the loss, down to
the head (`F.linear`, or a matmul with a `[D, V]` matrix). Every op on that path is one of:

- a row op: view/reshape/flatten/contiguous or indexing that keeps the vocabulary (last) dim
  whole. These commute with the head (`linear(x)[rows] == linear(x[rows])`), so the fused
  computation applies them to the hidden states instead. Shifted logits and shifted labels both
  reduce to this: the labels are used as they are, whatever computed them.
- a cast to float32 (or a no-op cast);
- one softcap `tanh(z / s) * s`;
- a DTensor `redistribute` (the same values in another layout; see cce_inductor.dtensor_sites).

Anything else makes the loss node "not a site", with a reason code that the graph pass counts
and logs. Arguments are read through `torch.fx.operator_schemas.normalize_function`.
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch.fx import Node
from torch.fx.operator_schemas import normalize_function

from cce_inductor import compat
from cce_inductor.arguments import REDUCTIONS, SUPPORTED_DTYPES

# Named pieces of a site; a graph pass can be limited to some of them (RewriteOptions.patterns).
PATTERNS = frozenset({
    "linear",         # head: F.linear / nn.Linear (also inside torch's F.linear_cross_entropy)
    "matmul",         # head: x @ W.T, torch.matmul(x, W.T), torch.mm, x @ M with M [D, V]
    "cross_entropy",  # loss: F.cross_entropy / nn.CrossEntropyLoss
    "nll_loss",       # loss: F.nll_loss(F.log_softmax(z, -1))
    "softcap",        # tanh(z / s) * s between head and loss
    "cast",           # .float() / .to(torch.float32) between head and loss
    "row_reshape",    # view / reshape / flatten / contiguous of the leading dims
    "row_index",      # indexing of the leading dims, e.g. logits[..., :-1, :]
})

_LINEAR_FUNCTIONS = (*compat.linear_functions(), F.linear)
_MATMUL_FUNCTIONS = (torch.matmul, operator.matmul, torch.mm)
_MATMUL_METHODS = ("matmul", "mm", "__matmul__")
_CAST_METHODS = ("float", "to", "type", "type_as")
_RESHAPE_METHODS = ("view", "reshape")
_DIV_FUNCTIONS = (operator.truediv, torch.div, torch.true_divide)
_DIV_METHODS = ("div", "true_divide", "__truediv__")
_TANH_FUNCTIONS = (torch.tanh, F.tanh)
_MUL_FUNCTIONS = (operator.mul, torch.mul)
_MUL_METHODS = ("mul", "__mul__", "__rmul__")
_LOG_SOFTMAX_FUNCTIONS = (F.log_softmax, torch.log_softmax, torch.special.log_softmax)


class NotASite(Exception):
    """The loss node cannot be rewritten exactly; `reason` is a short code for counters."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclasses.dataclass
class Site:
    """One `linear -> cross_entropy` site, as found in the graph (nothing changed yet)."""

    loss: Node                     # the cross_entropy / nll_loss node
    log_softmax: Optional[Node]    # the log_softmax feeding nll_loss
    head: Node                     # the linear / matmul node producing the logits
    input: Node                    # hidden states [..., D]
    classifier: Node               # [V, D], or [D, V] when classifier_is_transposed
    classifier_is_transposed: bool # classifier holds the [D, V] matrix of `x @ M`
    bias: Optional[Node]
    compute_dtype: torch.dtype     # the head's output dtype (differs from input's under autocast)
    classifier_view: Optional[Node]  # the W.T node feeding a matmul head, if any
    path: list[Node]               # nodes after the head up to the loss input, in graph order
    row_ops: list[Node]            # the reshapes and indexing in path, to apply to the input
    softcap: Optional[float]
    target: Node
    class_weight: Optional[Node]
    reduction: str
    ignore_index: int
    label_smoothing: float
    patterns: set[str]

    def logit_nodes(self) -> list[Node]:
        """The head and every node between it and the loss: tensors derived from the logits."""
        return [self.head, *self.path]


def example_value(node: Any) -> Any:
    """The fake value Dynamo recorded for a node; constants stand for themselves."""
    return compat.example_value(node) if isinstance(node, Node) else node


def is_call(node: Any, functions: tuple = (), methods: tuple = ()) -> bool:
    if not isinstance(node, Node):
        return False
    if node.op == "call_function":
        return node.target in functions
    return node.op == "call_method" and node.target in methods


def normalized(node: Node) -> dict[str, Any]:
    """The node's arguments by parameter name (call_function nodes)."""
    arg_types = tuple(type(example_value(a)) for a in node.args)
    pair = normalize_function(
        node.target, node.args, node.kwargs, arg_types=arg_types,
        normalize_to_only_use_kwargs=True,
    )
    if pair is None:
        raise NotASite("unsupported_arguments", f"cannot normalize the arguments of {node}")
    return pair.kwargs


def find_site(loss: Node) -> Site:
    """Read the site ending at `loss`, or raise NotASite."""
    loss_kind, arguments, log_softmax, logits = _read_loss(loss)
    patterns = {loss_kind}
    path: list[Node] = []
    row_ops: list[Node] = []
    softcap: Optional[float] = None
    node = logits
    while not _is_head(node):
        if not isinstance(node, Node) or node.op == "placeholder":
            raise NotASite(
                "logits_are_graph_input",
                f"the loss input comes from outside the graph ({node}); a graph break between "
                "the head and the loss hides the head",
            )
        if _is_cast(node):
            patterns.add("cast")
            path.append(node)
            node = node.args[0]
        elif _is_row_reshape(node):
            patterns.add("row_reshape")
            path.append(node)
            if not is_call(node, (), ("contiguous",)):
                row_ops.append(node)
            node = node.args[0]
        elif _is_row_index(node):
            patterns.add("row_index")
            path.append(node)
            row_ops.append(node)
            node = node.args[0]
        elif compat.is_dtensor_redistribute(node):  # DTensor layout change, same values
            path.append(node)  # (see cce_inductor.dtensor_sites)
            node = node.args[0]
        elif softcap is None and (capped := _read_softcap(node)) is not None:
            patterns.add("softcap")
            softcap, capped_nodes, node = capped
            path.extend(capped_nodes)
        else:
            raise NotASite("unsupported_op", f"{_describe(node)} between the head and the loss")
    head = node
    path.reverse()
    row_ops.reverse()
    head_kind, input, classifier, classifier_view, bias = _read_head(head)
    patterns.add(head_kind)
    compute_dtype = example_value(head).dtype
    _check_dtypes(input, classifier, bias, compute_dtype)
    return Site(
        loss=loss, log_softmax=log_softmax, head=head, input=input, classifier=classifier,
        classifier_is_transposed=classifier_view is None and head_kind == "matmul", bias=bias,
        compute_dtype=compute_dtype, classifier_view=classifier_view, path=path, row_ops=row_ops,
        softcap=softcap, patterns=patterns, **arguments,
    )


def is_loss(node: Node) -> bool:
    return is_call(node, (F.cross_entropy, F.nll_loss))


def _read_loss(loss: Node) -> tuple[str, dict[str, Any], Optional[Node], Node]:
    """(kind, loss arguments, log_softmax node or None, logits node)."""
    args = normalized(loss)
    kind = "cross_entropy" if loss.target is F.cross_entropy else "nll_loss"
    logits = args["input"]
    input_value, target_value = example_value(logits), example_value(args["target"])
    if input_value.dim() > 2:
        raise NotASite(
            "k_dimensional_loss",
            f"loss input of shape {tuple(input_value.shape)}: the class dim is not the last",
        )
    if target_value.dtype.is_floating_point:
        raise NotASite("probability_target", "targets are class probabilities")
    if args.get("size_average") is not None or args.get("reduce") is not None:
        _require_constant("size_average", args["size_average"])
        _require_constant("reduce", args["reduce"])
        reduction = compat.legacy_reduction(args["size_average"], args["reduce"])
    else:
        reduction = _require_constant("reduction", args["reduction"])
    if reduction not in REDUCTIONS:
        raise NotASite("unsupported_arguments", f"reduction={reduction!r}")
    log_softmax = None
    if kind == "nll_loss":
        log_softmax = logits
        if not is_call(log_softmax, _LOG_SOFTMAX_FUNCTIONS, ("log_softmax",)):
            raise NotASite("nll_loss_without_log_softmax", f"nll_loss of {_describe(logits)}")
        logits = _read_log_softmax(log_softmax, loss)
    arguments = {
        "target": args["target"],
        "class_weight": args["weight"],
        "reduction": reduction,
        "ignore_index": int(_require_constant("ignore_index", args["ignore_index"])),
        "label_smoothing": float(
            _require_constant("label_smoothing", args.get("label_smoothing", 0.0))
        ),
    }
    return kind, arguments, log_softmax, logits


def _read_log_softmax(node: Node, loss: Node) -> Node:
    if node.op == "call_method":
        args = dict(zip(("input", "dim", "dtype"), node.args), **node.kwargs)
    else:
        args = normalized(node)
    ndim = example_value(args["input"]).dim()
    dim = _require_constant("log_softmax dim", args.get("dim"))
    if dim is None or dim % ndim != ndim - 1:
        raise NotASite("log_softmax_dim", f"log_softmax over dim {dim} of a {ndim}-D tensor")
    dtype = args.get("dtype")
    if dtype is not None and dtype != torch.float32 and dtype != example_value(node).dtype:
        raise NotASite("unsupported_cast", f"log_softmax to {dtype}")
    if list(node.users) != [loss]:
        raise NotASite("log_probs_used_elsewhere", f"{node} is also used by {list(node.users)}")
    return args["input"]


def _require_constant(name: str, value: Any) -> Any:
    if isinstance(value, Node):
        raise NotASite("non_constant_argument", f"{name} is computed in the graph ({value})")
    return value


def _is_head(node: Any) -> bool:
    return is_call(node, _LINEAR_FUNCTIONS + _MATMUL_FUNCTIONS, _MATMUL_METHODS)


def _read_head(head: Node) -> tuple[str, Node, Node, Optional[Node], Optional[Node]]:
    """(kind, input, classifier, classifier_view, bias) of a linear or matmul head: the
    classifier is [V, D], or the [D, V] matrix of a matmul when that is not the transpose
    (classifier_view) of one."""
    if head.op == "call_function" and head.target in _LINEAR_FUNCTIONS:
        args = normalized(head)
        input, weight, bias = args["input"], args["weight"], args.get("bias")
        if example_value(weight).dim() != 2:
            raise NotASite("unsupported_head", "linear with a weight that is not 2-D")
        return "linear", input, weight, None, bias
    if len(head.args) == 2 and not head.kwargs:  # operator.matmul has no schema to normalize
        input, other = head.args
    else:
        args = normalized(head)
        input, other = args["input"], args.get("other", args.get("mat2"))
    if example_value(input).dim() < 1 or example_value(other).dim() != 2:
        raise NotASite(
            "unsupported_head",
            f"matmul of shapes {tuple(example_value(input).shape)} and "
            f"{tuple(example_value(other).shape)} is not a classifier head",
        )
    transposed_from = _transposed_matrix(other)
    if transposed_from is not None:
        return "matmul", input, transposed_from, other, None
    return "matmul", input, other, None, None


def _transposed_matrix(node: Any) -> Optional[Node]:
    """W when node is W.T / W.t() / W.mT / W.transpose(0, 1) / W.permute(1, 0) of a 2-D W."""
    if not isinstance(node, Node) or not node.args:
        return None
    source = node.args[0]
    if not isinstance(source, Node) or example_value(source).dim() != 2:
        return None
    if compat.transposing_attribute_source(node) is not None:
        return source
    if is_call(node, (torch.t,), ("t",)):
        return source
    if is_call(node, (torch.transpose,), ("transpose",)):
        dims = [d % 2 for d in node.args[1:3] if isinstance(d, int)]
        return source if sorted(dims) == [0, 1] else None
    if is_call(node, (torch.permute,), ("permute",)):
        dims = node.args[1] if len(node.args) == 2 else node.args[1:]
        return source if tuple(dims) in ((1, 0), (-1, -2), (1, -2), (-1, 0)) else None
    return None


def _check_dtypes(
    input: Node, weight: Node, bias: Optional[Node], compute_dtype: torch.dtype
) -> None:
    if compute_dtype not in SUPPORTED_DTYPES:
        raise NotASite("unsupported_dtype", f"logits of dtype {compute_dtype}")
    for name, node in (("input", input), ("weight", weight), ("bias", bias)):
        if node is not None and not example_value(node).dtype.is_floating_point:
            raise NotASite("unsupported_dtype", f"{name} of dtype {example_value(node).dtype}")


def _is_cast(node: Node) -> bool:
    """A dtype cast that keeps shape and device, either a no-op or an upcast to float32.

    An upcast between head and loss is absorbed: the fused op computes float32 statistics from
    the head's inputs directly (see cce_inductor.rewrite)."""
    if not is_call(node, (), _CAST_METHODS):
        return False
    source, result = example_value(node.args[0]), example_value(node)
    if result.shape != source.shape or result.device != source.device:
        return False
    if result.dtype == source.dtype:
        return True
    if result.dtype == torch.float32 and source.dtype in (torch.bfloat16, torch.float16):
        return True
    raise NotASite("unsupported_cast", f"{_describe(node)} from {source.dtype} to {result.dtype}")


def _is_row_reshape(node: Node) -> bool:
    if is_call(node, (), ("contiguous",)):
        return True
    if is_call(node, (torch.reshape,), _RESHAPE_METHODS):
        if any(isinstance(a, torch.dtype) for a in node.args[1:]):
            return False  # view(dtype) reinterprets bits
        _check_keeps_vocab(node)
        return True
    if is_call(node, (torch.flatten,), ("flatten",)):
        _check_keeps_vocab(node)
        return True
    return False


def _is_row_index(node: Node) -> bool:
    if not (node.op == "call_function" and node.target is operator.getitem):
        return False
    source = example_value(node.args[0])
    if not isinstance(source, torch.Tensor):
        return False
    index = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
    if not _index_keeps_last_dim(index, source.dim()):
        raise NotASite("vocab_dim_touched", f"{_describe(node)} indexes the vocabulary dim")
    _check_keeps_vocab(node)
    return True


def _index_keeps_last_dim(index: tuple, ndim: int) -> bool:
    """True when `tensor[index]` leaves the last dim whole and last."""
    full = slice(None, None, None)
    if Ellipsis in index:
        after = index[index.index(Ellipsis) + 1:]
        return not after or after[-1] == full
    consumed = 0
    for entry in index:
        if entry is None:
            continue
        value = example_value(entry)
        consumed += value.dim() if isinstance(value, torch.Tensor) and value.dtype == torch.bool \
            else 1
    return consumed < ndim or index[-1] == full


def _check_keeps_vocab(node: Node) -> None:
    """The node's input and output both end with the same (vocabulary) dim."""
    source, result = example_value(node.args[0]), example_value(node)
    if result.dim() == 0 or not compat.same_size(result.shape[-1], source.shape[-1]):
        raise NotASite(
            "vocab_dim_touched",
            f"{_describe(node)} turns {tuple(source.shape)} into {tuple(result.shape)}",
        )
    if is_call(node, (torch.flatten,), ("flatten",)):
        args = dict(zip(("input", "start_dim", "end_dim"), node.args), **node.kwargs)
        start = args.get("start_dim", 0) % source.dim()
        end = args.get("end_dim", -1) % source.dim()
        if end == source.dim() - 1 and start != end:
            raise NotASite("vocab_dim_touched", f"{_describe(node)} merges the vocabulary dim")


def _read_softcap(node: Node) -> Optional[tuple[float, list[Node], Node]]:
    """(s, [div, tanh, mul] nodes, z) when node is `tanh(z / s) * s`, else None."""
    if not is_call(node, _MUL_FUNCTIONS, _MUL_METHODS) or len(node.args) != 2:
        return None
    first, second = node.args
    tanh, scale = (first, second) if isinstance(first, Node) else (second, first)
    if not isinstance(scale, (int, float)) or not is_call(tanh, _TANH_FUNCTIONS, ("tanh",)):
        return None
    div = tanh.args[0]
    if not is_call(div, _DIV_FUNCTIONS, _DIV_METHODS) or len(div.args) != 2 or div.kwargs:
        return None
    z, divisor = div.args
    if not isinstance(z, Node) or divisor != scale or not scale > 0:
        return None
    return float(scale), [node, tanh, div], z


def _describe(node: Any) -> str:
    if not isinstance(node, Node):
        return repr(node)
    target = node.target if node.op == "call_method" else getattr(
        node.target, "__name__", str(node.target)
    )
    return f"{node.op} {target} ({node.name})"
