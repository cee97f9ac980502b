"""The graph pass: `linear -> cross_entropy` in a Dynamo FX graph becomes the fused CCE loss.

It runs on the graph Dynamo hands to a backend (torch-level IR, before AOT autograd), where
`F.cross_entropy` is still one node; the replacement calls `cce_inductor.api.linear_cross_entropy`,
so AOT autograd traces the `cce` custom ops and the partitioner never sees `[N, V]` logits.
`cce_inductor.patterns` says what a site is; this module replaces sites and reports.

Semantics of the replacement:

- Same loss: value, shape and dtype (the fused loss is float32, or float64 for float64 inputs,
  and is cast back to the original loss dtype, e.g. bfloat16 when no upcast preceded the loss).
  Row ops between head and loss (reshape, shift slicing) are applied to the hidden states.
- Precision: with 16-bit weights, `linear(x).float()` rounds the logits to 16 bits and then
  upcasts them; the fused op computes the logits from the same 16-bit inputs with float32
  accumulation and never rounds them, so its float32 statistics are at least as accurate. A
  softcap applied in 16 bits before the upcast is likewise computed in float32. This is the
  intended CCE semantics; differences stay within the 16-bit rounding of the logits.
- Under autocast the head's inputs are cast to the head's output dtype, as autocast's linear does.
- Filtering: the backward skips gradient tiles below `filter_eps` ('auto': finfo(dtype).eps / 32
  for 16-bit inputs, off for float32), as the explicit API does.
- Logits that leave the graph (Hugging Face `*ForCausalLM` return them beside the loss) are
  still computed and returned unchanged by default; only the loss stops depending on them, so
  the float32 copy, the log-softmax and the logit gradient of the loss disappear. With
  `drop_logits=True` the caller promises not to read them: each such output becomes an empty
  tensor of shape `[..., 0]` (leading dims kept, no vocabulary entries, same dtype and device,
  not requiring grad), so indexing a logit fails loudly instead of reading stale values, and
  the `[N, V]` head matmul is not computed at all.

Every decision is counted in `torch._dynamo.utils.counters["cce"]` ("rewritten", and
"skipped:<reason>") and logged on the `cce_inductor.rewrite` logger (INFO), one line per site.
"""

from __future__ import annotations

import dataclasses
import logging
import operator
from typing import Any, Callable

import torch
from torch.fx import GraphModule, Node
from torch.fx.node import map_arg

from cce_inductor import arguments, compat, dtensor_sites, patterns
from cce_inductor.arguments import FilterEps

log = logging.getLogger(__name__)

COUNTER = "cce"


@dataclasses.dataclass(frozen=True)
class RewriteOptions:
    """Options of the graph pass (and of `make_cce_backend`).

    filter_eps: gradient filter threshold of the fused backward ('auto', None or a float).
    filter_grads: the gradients that filter: 'all', or 'input' (the classifier's gradient sums
        every tile, the paper's pretraining recipe).
    patterns: names from `cce_inductor.patterns.PATTERNS` that may be rewritten; a site that
        needs any other is left alone (reason "disabled:<name>").
    drop_logits: return logits that leave the graph as empty `[..., 0]` tensors (see module doc).
    """

    filter_eps: FilterEps = "auto"
    filter_grads: str = "all"
    patterns: frozenset[str] = patterns.PATTERNS
    drop_logits: bool = False

    def __post_init__(self) -> None:
        arguments.resolve_filter_eps(self.filter_eps, torch.float32)  # validates
        arguments.check_filter_grads(self.filter_grads)
        unknown = set(self.patterns) - patterns.PATTERNS
        if unknown:
            raise ValueError(
                f"unknown patterns {sorted(unknown)}; known: {sorted(patterns.PATTERNS)}"
            )
        object.__setattr__(self, "patterns", frozenset(self.patterns))


@dataclasses.dataclass(frozen=True)
class SiteReport:
    """What the pass decided for one loss node."""

    loss: str                      # the loss node's name in the original graph
    rewritten: bool
    reason: str                    # "rewritten" or the skip reason code
    detail: str = ""
    patterns: frozenset[str] = frozenset()
    logits_outputs: int = 0        # graph outputs holding tensors derived from the logits


def rewrite_linear_cross_entropy(
    gm: GraphModule, options: RewriteOptions = RewriteOptions()
) -> list[SiteReport]:
    """Replace every `linear -> cross_entropy` site of `gm` in place; report each loss node."""
    reports = []
    for loss in [node for node in gm.graph.nodes if patterns.is_loss(node)]:
        report = _rewrite_one(gm, loss, options)
        _record(report)
        reports.append(report)
    if any(report.rewritten for report in reports):
        gm.graph.lint()
        gm.recompile()
    return reports


def _rewrite_one(gm: GraphModule, loss: Node, options: RewriteOptions) -> SiteReport:
    name = loss.name
    try:
        site = patterns.find_site(loss)
        disabled = sorted(site.patterns - options.patterns)
        if disabled:
            raise patterns.NotASite(f"disabled:{disabled[0]}", f"patterns {disabled} are off")
        escaping = _escaping_logits(site)
        _replace(gm, site, escaping, options)
    except patterns.NotASite as skip:
        return SiteReport(name, False, skip.reason, skip.detail)
    except Exception as error:  # a bug here must cost the fusion, never the compilation
        log.warning("cce: rewriting %s failed; left unchanged", name, exc_info=True)
        return SiteReport(name, False, "internal_error", repr(error))
    return SiteReport(
        name, True, "rewritten", _summary(site, escaping, options), frozenset(site.patterns),
        len(escaping),
    )


def _escaping_logits(site: patterns.Site) -> list[Node]:
    """Logit-derived nodes that are graph outputs; any other extra use stops the rewrite."""
    nodes = site.logit_nodes()
    consumers = [*nodes[1:], site.log_softmax or site.loss, site.loss]
    escaping = []
    for node, consumer in zip(nodes, consumers):
        others = [user for user in node.users if user is not consumer]
        if any(user.op != "output" for user in others):
            used_by = [user.name for user in others if user.op != "output"]
            raise patterns.NotASite(
                "logits_used_elsewhere",
                f"{node.name} is also used by {used_by}; the fused loss would not remove them",
            )
        if others:
            escaping.append(node)
    return escaping


def _replace(
    gm: GraphModule, site: patterns.Site, escaping: list[Node], options: RewriteOptions
) -> None:
    graph = gm.graph
    fused_loss, layout = dtensor_sites.fused_loss(site)  # the vocab-parallel loss on DTensors
    new = _NodeFactory(graph, site.loss)
    try:
        fused, stand_ins = _insert_fused(graph, new, site, escaping, options, fused_loss, layout)
    except BaseException:
        new.undo()  # the graph is untouched until uses move to the new nodes
        raise
    site.loss.replace_all_uses_with(fused)
    output = next(node for node in graph.nodes if node.op == "output")
    for node, empty in stand_ins.items():
        output.replace_input_with(node, empty)
    replaced = (site.loss, site.log_softmax, *reversed(site.path), site.head, site.classifier_view)
    for node in replaced:
        if node is not None and not node.users:
            graph.erase_node(node)


def _insert_fused(
    graph,
    new: _NodeFactory,
    site: patterns.Site,
    escaping: list[Node],
    options: RewriteOptions,
    fused_loss: Callable[..., Any],
    layout: dict[str, Any],
) -> tuple[Node, dict[Node, Node]]:
    """Insert the fused loss before the loss node, and with drop_logits an empty stand-in for
    each escaping logits node; return the loss and {escaping node: stand-in}."""
    with graph.inserting_before(site.loss):
        classifier = new.call_function(torch.t, site.classifier) if site.classifier_is_transposed \
            else site.classifier
        # Under autocast the head ran on its inputs cast to the autocast dtype; so does the op.
        input, classifier, bias = (
            new.cast(node, site.compute_dtype) if node is not None else None
            for node in (site.input, classifier, site.bias)
        )
        hidden_of = {site.head: input}
        hidden = input
        for node in site.path:
            if node in site.row_ops:
                hidden = new.row_op(node, hidden, classifier)
            hidden_of[node] = hidden
        _check_rows(hidden, site.path[-1] if site.path else site.head)
        fused = new.call_function(
            fused_loss, hidden, classifier, site.target, **layout,
            linear_bias=bias, weight=site.class_weight, reduction=site.reduction,
            ignore_index=site.ignore_index, label_smoothing=site.label_smoothing,
            softcap=site.softcap, filter_eps=options.filter_eps,
            # Only when set, so that graphs with the default stay as they were.
            **({"filter_grads": options.filter_grads} if options.filter_grads != "all" else {}),
        )
        fused = new.cast(fused, patterns.example_value(site.loss).dtype)
        stand_ins = {
            node: new.empty_rows(hidden_of[node], patterns.example_value(node).dtype)
            for node in (escaping if options.drop_logits else ())
        }
    return fused, stand_ins


def _check_rows(hidden: Node, logits: Node) -> None:
    """The rebuilt hidden states have exactly the rows of the logits fed to the loss."""
    rows = patterns.example_value(hidden).shape[:-1]
    expected = patterns.example_value(logits).shape[:-1]
    if len(rows) != len(expected) or not all(
        compat.same_size(a, b) for a, b in zip(rows, expected)
    ):
        raise patterns.NotASite(
            "internal_shape_mismatch",
            f"hidden states rows {tuple(rows)} differ from logits rows {tuple(expected)}",
        )


class _NodeFactory:
    """Inserts nodes carrying Dynamo's metadata: the example value (computed on fake tensors in
    the graph's fake mode, so later passes see what Dynamo would have recorded) and the anchor's
    stack trace (errors point at the user's loss line)."""

    def __init__(self, graph, anchor: Node) -> None:
        self.graph = graph
        self.anchor = anchor
        self.created: list[Node] = []
        values = [patterns.example_value(n) for n in graph.nodes if n.op == "placeholder"]
        self.fake_mode = compat.fake_mode_of([v for v in values if v is not None])

    def call_function(self, target: Callable, *args: Any, **kwargs: Any) -> Node:
        return self._add(self.graph.call_function(target, args, kwargs))

    def call_method(self, name: str, *args: Any, **kwargs: Any) -> Node:
        return self._add(self.graph.call_method(name, args, kwargs))

    def cast(self, node: Node, dtype: torch.dtype) -> Node:
        if patterns.example_value(node).dtype == dtype:
            return node
        return self.call_method("to", node, dtype)

    def row_op(self, node: Node, hidden: Node, classifier: Node) -> Node:
        """`node`, a reshape or indexing of the logits' leading dims, applied to `hidden`."""
        if node.target is operator.getitem:
            return self.call_function(operator.getitem, hidden, node.args[1])
        if patterns.is_call(node, (torch.flatten,), ("flatten",)):
            return self.call_method("flatten", hidden, *node.args[1:], **node.kwargs)
        # view / reshape: the same leading sizes, the hidden size last (-1 stays -1).
        shape = node.args[1:] or tuple(node.kwargs.values())
        if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)):
            shape = tuple(shape[0])
        last = shape[-1]
        if not (isinstance(last, int) and last == -1):
            hidden_size = patterns.example_value(classifier).shape[1]
            last = hidden_size if isinstance(hidden_size, int) else \
                self.call_method("size", classifier, 1)
        return self.call_method("reshape", hidden, (*shape[:-1], last))

    def empty_rows(self, hidden: Node, dtype: torch.dtype) -> Node:
        """An empty `[..., 0]` tensor with the leading dims of `hidden` (a dropped logits)."""
        rows = self.call_function(operator.getitem, hidden, (Ellipsis, slice(0, 0, None)))
        return self.call_function(torch.empty_like, rows, dtype=dtype)

    def undo(self) -> None:
        for node in reversed(self.created):
            self.graph.erase_node(node)
        self.created.clear()

    def _add(self, node: Node) -> Node:
        self.created.append(node)
        for key in ("stack_trace", "nn_module_stack", "source_fn_stack"):
            if key in self.anchor.meta:
                node.meta[key] = self.anchor.meta[key]
        compat.set_example_value(node, self._fake_value(node))
        return node

    def _fake_value(self, node: Node) -> Any:
        args, kwargs = map_arg((node.args, node.kwargs), patterns.example_value)
        with self.fake_mode:
            if node.op == "call_method":
                return getattr(args[0], node.target)(*args[1:], **kwargs)
            return node.target(*args, **kwargs)


def _summary(site: patterns.Site, escaping: list[Node], options: RewriteOptions) -> str:
    parts = [f"head {site.head.name}", f"reduction {site.reduction}"]
    if site.softcap is not None:
        parts.append(f"softcap {site.softcap}")
    if site.label_smoothing:
        parts.append(f"label_smoothing {site.label_smoothing}")
    if site.class_weight is not None:
        parts.append("class weights")
    if escaping:
        fate = "dropped" if options.drop_logits else "kept"
        parts.append(f"logits returned by {[n.name for n in escaping]} {fate}")
    return ", ".join(parts)


def _record(report: SiteReport) -> None:
    counters = compat.dynamo_counters()[COUNTER]
    if report.rewritten:
        counters["rewritten"] += 1
        log.info(
            "cce: rewrote %s (%s; patterns %s)",
            report.loss, report.detail, ", ".join(sorted(report.patterns)),
        )
    else:
        counters[f"skipped:{report.reason}"] += 1
        log.info("cce: left %s unchanged: %s (%s)", report.loss, report.reason, report.detail)
