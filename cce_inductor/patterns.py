"""Recognising the consumers of a linear classifier head's logits in a Dynamo FX graph
(torch-level IR): `linear -> cross_entropy` and the RL/regularizer statistics beside it.

A site is one consumer, read backwards from its result through the ops that may lie between the
classifier head and it, down to the head (`F.linear`, or a matmul with a `[D, V]` matrix). The
consumers, and what the fused head returns for each (cce_inductor.api.linear_head):

- `F.cross_entropy(z, t)`, `F.nll_loss(F.log_softmax(z, -1), t)`           -> the loss
- `torch.logsumexp(z, -1)` (z-loss, PaLM / OLMo style)                     -> lse
- `gather(log_softmax(z, -1), -1, ids[..., None])` (TRL, verl log-probs)   -> log_probs
- `gather(z, -1, ids[..., None])` (so `gather(z) - logsumexp(z)` is both)  -> target_logit
- `(softmax(z) * log_softmax(z)).sum(-1)`, also with `exp(log_softmax(z))` -> -entropy
- `(softmax(z) * z).sum(-1)` (so `logsumexp(z) - (softmax(z) * z).sum(-1)`) -> lse - entropy
Several consumers of one head are rewritten together (cce_inductor.rewrite), from one fused pass
where their rows allow; the arithmetic users put around them (negation, subtraction, means)
stays in the graph.

Every op on the path from the head to the consumer is one of:
- a row op: view/reshape/flatten/contiguous or indexing that keeps the vocabulary (last) dim
  whole. These commute with the head (`linear(x)[rows] == linear(x[rows])`), so the fused
  computation applies them to the hidden states instead. Shifted logits and shifted labels both
  reduce to this: the labels are used as they are, whatever computed them.
- a cast to float32 (or a no-op cast);
- one softcap `tanh(z / s) * s`;
- a multiplication or division by a constant (a Python number, as Dynamo bakes in a module's
  float attribute such as Cohere's `logit_scale` or a float argument, or `torch.tensor(c)`):
  a temperature or logit scale. Scales compose, and one before the softcap moves behind it
  (c tanh(s x / c) = s (c / |s|) tanh(x / (c / |s|))), so the head computes
  logit_scale * softcap(x) as the ops do;
- a DTensor `redistribute` (the same values in another layout; see cce_inductor.dtensor_sites).

Anything else makes the node "not a site", with a reason code that the graph pass counts and
logs. A loss always counts; the other consumers are common elsewhere in models (attention's
logsumexp, gathers of embeddings), so they count only once their path has reached a classifier
head. Arguments are read through `torch.fx.operator_schemas.normalize_function`.
"""

from __future__ import annotations

import dataclasses
import math
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
    "logsumexp",      # torch.logsumexp(z, -1)
    "gather_log_softmax",  # gather(log_softmax(z, -1), -1, ids[..., None])
    "gather_logits",  # gather(z, -1, ids[..., None])
    "entropy",        # (softmax(z) * log_softmax(z)).sum(-1), or exp(log_softmax(z)) for softmax
    "softmax_mean_logit",  # (softmax(z) * z).sum(-1)
    "softcap",        # tanh(z / s) * s between head and consumer
    "scale",          # z * c, z / c with a constant c between head and consumer
    "cast",           # .float() / .to(torch.float32) between head and consumer
    "row_reshape",    # view / reshape / flatten / contiguous of the leading dims
    "row_index",      # indexing of the leading dims, e.g. logits[..., :-1, :]
})

# What a consumer computes (Site.kind); cce_inductor.rewrite maps each to the fused head's
# outputs.
CONSUMER_KINDS = ("loss", "lse", "log_probs", "target_logit", "neg_entropy", "mean_logit")
# Consumers whose value depends on a target per row.
TARGET_KINDS = ("loss", "log_probs", "target_logit")
# What a node on the path from the head to the consumer does. The first five keep the values
# of each row (a row's logits are the same numbers before and after); "index" selects rows.
PATH_ROLES = ("cast", "contiguous", "reshape", "redistribute", "index", "softcap", "scale")
ROW_PRESERVING_ROLES = ("cast", "contiguous", "reshape", "redistribute")

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
_SOFTMAX_FUNCTIONS = (F.softmax, torch.softmax, torch.special.softmax)
_LOGSUMEXP_FUNCTIONS = (torch.logsumexp, torch.special.logsumexp)
_GATHER_FUNCTIONS = (torch.gather,)
_SUM_FUNCTIONS = (torch.sum,)
_EXP_FUNCTIONS = (torch.exp,)
_TENSOR_FUNCTIONS = (torch.tensor, torch.as_tensor, torch.scalar_tensor)


class NotASite(Exception):
    """The node cannot be rewritten exactly; `reason` is a short code for counters."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclasses.dataclass
class Site:
    """One consumer of a linear head's logits, as found in the graph (nothing changed yet)."""

    consumer: Node                 # the node whose value the fused head replaces
    kind: str                      # what it computes, one of CONSUMER_KINDS
    internal: list[Node]           # nodes between the logits and the consumer (log_softmax, ...)
    logits: Node                   # the tensor the consumer reads: the head or path[-1]
    keepdim: bool                  # the consumer's result keeps the vocabulary dim as size 1
    head: Node                     # the linear / matmul node producing the logits
    input: Node                    # hidden states [..., D]
    classifier: Node               # [V, D], or [D, V] when classifier_is_transposed
    classifier_is_transposed: bool # classifier holds the [D, V] matrix of `x @ M`
    bias: Optional[Node]
    compute_dtype: torch.dtype     # the head's output dtype (differs from input's under autocast)
    classifier_view: Optional[Node]  # the W.T node feeding a matmul head, if any
    path: list[Node]               # nodes after the head up to `logits`, in graph order
    roles: dict[Node, str]         # each path node's role, one of PATH_ROLES
    row_ops: list[Node]            # the reshapes and indexing in path, to apply to the input
    softcap: Optional[float]
    logit_scale: float             # the logits are logit_scale * softcap(head output)
    target: Optional[Node]         # class ids per row of `logits` (TARGET_KINDS), else None
    class_weight: Optional[Node]   # the loss's options (kind 'loss'; defaults otherwise)
    reduction: str
    ignore_index: Optional[int]    # None: no row is ignored (a gather's index)
    label_smoothing: float
    patterns: set[str]

    def logit_nodes(self) -> list[Node]:
        """The head and every node between it and the consumer's input: tensors derived from
        the logits."""
        return [self.head, *self.path]


@dataclasses.dataclass
class _Consumer:
    """A consumer read back to the logits it takes (the start of a site)."""

    kind: str
    pattern: str
    logits: Node
    internal: list[Node]
    keepdim: bool = False
    target: Optional[Node] = None
    loss_arguments: dict[str, Any] = dataclasses.field(default_factory=dict)


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
    try:
        pair = normalize_function(
            node.target, node.args, node.kwargs, arg_types=arg_types,
            normalize_to_only_use_kwargs=True,
        )
    except (TypeError, RuntimeError):  # torch 2.11 binds some overloads' signatures wrongly
        pair = None
    if pair is None:
        raise NotASite("unsupported_arguments", f"cannot normalize the arguments of {node}")
    return pair.kwargs


def find_site(node: Node) -> Optional[Site]:
    """The site whose consumer is `node`; None when `node` is no consumer of a classifier head;
    NotASite when it is one that cannot be rewritten exactly."""
    consumer = _read_consumer(node)
    if consumer is None:
        return None
    patterns = {consumer.pattern}
    try:
        path, roles, transforms, head = _read_path(consumer.logits, patterns)
        head_kind, input, classifier, classifier_view, bias = _read_head(head)
    except NotASite:
        if consumer.kind == "loss":
            raise
        return None  # no classifier head behind it: not a site (see the module doc)
    patterns.add(head_kind)
    softcap, logit_scale = _compose(transforms)
    compute_dtype = example_value(head).dtype
    _check_dtypes(input, classifier, bias, compute_dtype)
    options = dict(class_weight=None, reduction="none", ignore_index=None, label_smoothing=0.0)
    options.update(consumer.loss_arguments)
    return Site(
        consumer=node, kind=consumer.kind, internal=consumer.internal, logits=consumer.logits,
        keepdim=consumer.keepdim, head=head, input=input, classifier=classifier,
        classifier_is_transposed=classifier_view is None and head_kind == "matmul", bias=bias,
        compute_dtype=compute_dtype, classifier_view=classifier_view, path=path, roles=roles,
        row_ops=[node for node in path if roles[node] in ("reshape", "index")],
        softcap=softcap, logit_scale=logit_scale, target=consumer.target, patterns=patterns,
        **options,
    )


def _read_path(
    logits: Any, patterns: set[str]
) -> tuple[list[Node], dict[Node, str], list[tuple[str, float]], Node]:
    """(path, roles, transforms, head) from the consumer's input back to the head, in graph
    order; transforms are ('scale', factor) and ('softcap', cap) in the order applied."""
    path: list[Node] = []
    roles: dict[Node, str] = {}
    transforms: list[tuple[str, float]] = []
    node = logits
    while not _is_head(node):
        if not isinstance(node, Node) or node.op == "placeholder":
            raise NotASite(
                "logits_are_graph_input",
                f"the consumer's input comes from outside the graph ({node}); a graph break "
                "between the head and the consumer hides the head",
            )
        if _is_cast(node):
            patterns.add("cast")
            role, source = "cast", node.args[0]
        elif _is_row_reshape(node):
            patterns.add("row_reshape")
            role = "contiguous" if is_call(node, (), ("contiguous",)) else "reshape"
            source = node.args[0]
        elif _is_row_index(node):
            patterns.add("row_index")
            role, source = "index", node.args[0]
        elif compat.is_dtensor_redistribute(node):  # DTensor layout change, same values
            role, source = "redistribute", node.args[0]  # (see cce_inductor.dtensor_sites)
        elif "softcap" not in patterns and (capped := _read_softcap(node)) is not None:
            patterns.add("softcap")
            cap, capped_nodes, node = capped
            transforms.append(("softcap", cap))
            path.extend(capped_nodes)
            roles.update((capped_node, "softcap") for capped_node in capped_nodes)
            continue
        elif (scaled := _read_scale(node)) is not None:
            patterns.add("scale")
            factor, source = scaled
            transforms.append(("scale", factor))
            role = "scale"
        else:
            raise NotASite("unsupported_op",
                           f"{_describe(node)} between the head and the consumer")
        path.append(node)
        roles[node] = role
        node = source
    path.reverse()
    transforms.reverse()
    return path, roles, transforms, node


def _compose(transforms: list[tuple[str, float]]) -> tuple[Optional[float], float]:
    """(softcap, logit_scale) such that the transforms, applied in order to x, give
    logit_scale * softcap(x)."""
    softcap, scale = None, 1.0
    for kind, value in transforms:
        if kind == "scale":
            scale *= value
        else:  # c tanh(s x / c) = s (c / |s|) tanh(x / (c / |s|))
            softcap = value / abs(scale)
    return softcap, scale


def is_loss(node: Node) -> bool:
    return is_call(node, (F.cross_entropy, F.nll_loss))


def _read_consumer(node: Node) -> Optional[_Consumer]:
    """The consumer pattern `node` ends, or None."""
    if is_loss(node):
        kind, arguments, log_softmax, logits = _read_loss(node)
        return _Consumer("loss", kind, logits, [log_softmax] if log_softmax is not None else [],
                         target=arguments.pop("target"), loss_arguments=arguments)
    if is_call(node, _LOGSUMEXP_FUNCTIONS, ("logsumexp",)):
        args = _arguments(node, ("input", "dim", "keepdim"))
        if not _is_last_dim(args["input"], args.get("dim")):
            return None
        return _Consumer("lse", "logsumexp", args["input"], [],
                         keepdim=bool(args.get("keepdim", False)))
    if is_call(node, _GATHER_FUNCTIONS, ("gather",)):
        return _read_gather(node)
    if is_call(node, _SUM_FUNCTIONS, ("sum",)):
        return _read_softmax_sum(node)
    return None


def _arguments(node: Node, names: tuple[str, ...]) -> dict[str, Any]:
    """A call's arguments by name: normalized for functions, by position for methods (whose
    first argument is the tensor) and for functions torch cannot normalize (overloads with
    dimension names, e.g. torch.logsumexp on torch 2.11), whose leading parameters are
    `names`."""
    if node.op == "call_function":
        try:
            return normalized(node)
        except NotASite:
            pass
    return dict(zip(names, node.args), **node.kwargs)


def _is_last_dim(tensor: Any, dim: Any) -> bool:
    """Whether `dim` (an int or a one-element list) names the last dim of `tensor`."""
    if isinstance(dim, (list, tuple)) and len(dim) == 1:
        dim = dim[0]
    value = example_value(tensor)
    if not isinstance(dim, int) or not isinstance(value, torch.Tensor) or value.dim() == 0:
        return False
    return dim % value.dim() == value.dim() - 1


def _read_gather(node: Node) -> Optional[_Consumer]:
    """gather(log_softmax(z, -1), -1, index) or gather(z, -1, index), index [..., 1] with z's
    leading dims (one class per row)."""
    args = _arguments(node, ("input", "dim", "index", "sparse_grad"))
    source, index = args["input"], args.get("index")
    if not _is_last_dim(source, args.get("dim")) or args.get("sparse_grad"):
        return None
    source_value, index_value = example_value(source), example_value(index)
    if not isinstance(index_value, torch.Tensor) or index_value.dim() != source_value.dim():
        return None
    if not compat.same_size(index_value.shape[-1], 1) or not all(
        compat.same_size(a, b) for a, b in zip(index_value.shape[:-1], source_value.shape[:-1])
    ):
        return None  # more than one class per row, or only some of the rows
    if is_call(source, _LOG_SOFTMAX_FUNCTIONS, ("log_softmax",)):
        logits = _read_softmax_input(source)
        if logits is None:
            return None
        return _Consumer("log_probs", "gather_log_softmax", logits, [source], keepdim=True,
                         target=index)
    return _Consumer("target_logit", "gather_logits", source, [], keepdim=True, target=index)


def _read_softmax_input(node: Node) -> Optional[Node]:
    """z of softmax(z, -1) / log_softmax(z, -1) (in z's dtype or float32), else None."""
    args = _arguments(node, ("input", "dim", "dtype"))
    dtype = args.get("dtype")
    if not _is_last_dim(args["input"], args.get("dim")):
        return None
    if dtype is not None and dtype != torch.float32 and dtype != example_value(node).dtype:
        return None
    return args["input"]


def _read_softmax_sum(node: Node) -> Optional[_Consumer]:
    """(p * log_softmax(z)).sum(-1) with p = softmax(z) or exp(log_softmax(z)) (-entropy), or
    (softmax(z) * z).sum(-1) (the mean logit)."""
    args = _arguments(node, ("input", "dim", "keepdim", "dtype"))
    product = args["input"]
    if args.get("dtype") is not None or not _is_last_dim(product, args.get("dim")):
        return None
    if not is_call(product, _MUL_FUNCTIONS, _MUL_METHODS) or len(product.args) != 2 \
            or product.kwargs:
        return None
    first, second = product.args
    if not (isinstance(first, Node) and isinstance(second, Node)) or \
            example_value(first).shape != example_value(second).shape:
        return None
    keepdim = bool(args.get("keepdim", False))
    for p, other in ((first, second), (second, first)):
        probabilities = _read_probabilities(p)
        if probabilities is None:
            continue
        logits, p_nodes = probabilities
        if other is logits and is_call(p, _SOFTMAX_FUNCTIONS, ("softmax",)):
            return _Consumer("mean_logit", "softmax_mean_logit", logits, [product, *p_nodes],
                             keepdim=keepdim)
        if is_call(other, _LOG_SOFTMAX_FUNCTIONS, ("log_softmax",)) and \
                _read_softmax_input(other) is logits:
            return _Consumer("neg_entropy", "entropy", logits,
                             [product, *p_nodes, *([other] if other not in p_nodes else [])],
                             keepdim=keepdim)
    return None


def _read_probabilities(node: Node) -> Optional[tuple[Node, list[Node]]]:
    """(z, nodes) when node is softmax(z, -1) or exp(log_softmax(z, -1))."""
    if is_call(node, _SOFTMAX_FUNCTIONS, ("softmax",)):
        logits = _read_softmax_input(node)
        return (logits, [node]) if logits is not None else None
    if is_call(node, _EXP_FUNCTIONS, ("exp",)) and len(node.args) == 1 and not node.kwargs:
        log_p = node.args[0]
        if is_call(log_p, _LOG_SOFTMAX_FUNCTIONS, ("log_softmax",)):
            logits = _read_softmax_input(log_p)
            return (logits, [node, log_p]) if logits is not None else None
    return None


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
        logits = _read_log_softmax(log_softmax)
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


def _read_log_softmax(node: Node) -> Node:
    args = _arguments(node, ("input", "dim", "dtype"))
    ndim = example_value(args["input"]).dim()
    dim = _require_constant("log_softmax dim", args.get("dim"))
    if dim is None or dim % ndim != ndim - 1:
        raise NotASite("log_softmax_dim", f"log_softmax over dim {dim} of a {ndim}-D tensor")
    dtype = args.get("dtype")
    if dtype is not None and dtype != torch.float32 and dtype != example_value(node).dtype:
        raise NotASite("unsupported_cast", f"log_softmax to {dtype}")
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


def _read_scale(node: Node) -> Optional[tuple[float, Node]]:
    """(factor, z) when node is z * c, c * z or z / c with a constant c (see _constant_value);
    None for other multiplications; NotASite for a scale that is not constant or not a finite
    nonzero number."""
    dividing = is_call(node, _DIV_FUNCTIONS, _DIV_METHODS)
    if not (dividing or is_call(node, _MUL_FUNCTIONS, _MUL_METHODS)):
        return None
    if len(node.args) != 2 or node.kwargs:
        return None  # e.g. div(..., rounding_mode=...)
    first, second = node.args
    if dividing or _is_scalar_like(second):
        z, factor = first, second
    else:
        z, factor = second, first
    if not isinstance(z, Node) or not _is_scalar_like(factor) or _is_scalar_like(z):
        return None
    value = _constant_value(factor)
    if value is None:
        raise NotASite("non_constant_scale",
                       f"{_describe(node)} scales the logits by a value computed at run time")
    if dividing:
        value = 1.0 / value if value != 0 else math.inf
    if not math.isfinite(value) or value == 0:
        raise NotASite("unsupported_scale", f"{_describe(node)} scales the logits by {value}")
    return value, z


def _is_scalar_like(value: Any) -> bool:
    """A number, or a node whose value is a number or a 0-d tensor."""
    if isinstance(value, bool):
        return False
    if isinstance(value, (int, float)):
        return True
    if not isinstance(value, Node):
        return False
    example = example_value(value)
    if isinstance(example, torch.Tensor):
        return example.dim() == 0
    return isinstance(example, (int, float, torch.SymInt, torch.SymFloat))


def _constant_value(value: Any) -> Optional[float]:
    """The value of a Python number, or of `torch.tensor(number)` made in the graph; None for a
    value computed or read at run time (a graph input, a buffer: those may change between
    calls without a recompile)."""
    if isinstance(value, (int, float)):
        return float(value)
    if is_call(value, _TENSOR_FUNCTIONS) and len(value.args) == 1 and \
            isinstance(value.args[0], (int, float)) and not isinstance(value.args[0], bool) and \
            not value.kwargs.get("requires_grad", False):
        return float(value.args[0])
    return None


def _describe(node: Any) -> str:
    if not isinstance(node, Node):
        return repr(node)
    target = node.target if node.op == "call_method" else getattr(
        node.target, "__name__", str(node.target)
    )
    return f"{node.op} {target} ({node.name})"
