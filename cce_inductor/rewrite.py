"""The graph pass: the consumers of a linear classifier head in a Dynamo FX graph
(`linear -> cross_entropy`, z-loss, log-probs, entropy; see cce_inductor.patterns) become the
fused CCE head.

It runs on the graph Dynamo hands to a backend (torch-level IR, before AOT autograd), where
`F.cross_entropy` is still one node; the replacement calls `cce_inductor.api.linear_head`
(one call per group of consumers reading the same rows, see `_groups`), so AOT autograd traces
the `cce` custom ops and the partitioner never sees `[N, V]` logits. `cce_inductor.patterns`
says what a site is; this module replaces sites and reports. The consumers of one head are
rewritten all or none: a use of the logits that is not a consumer keeps them all.

Semantics of the replacement:

- Same values: every consumer keeps its value, shape and dtype (the fused head computes in
  float32, or float64 for float64 inputs, and each result is cast back to the consumer's dtype,
  e.g. bfloat16 when no upcast preceded it). Row ops between head and consumer (reshape, shift
  slicing) are applied to the hidden states, or to the row statistics of a wider call.
- Precision: with 16-bit weights, `linear(x).float()` rounds the logits to 16 bits and then
  upcasts them; the fused op computes the logits from the same 16-bit inputs with float32
  accumulation and never rounds them, so its float32 statistics are at least as accurate. A
  softcap or a scale applied in 16 bits before the upcast is likewise computed in float32 (a
  scale as one multiplication by the product of the constants). This is the intended CCE
  semantics; differences stay within the 16-bit rounding of the logits.
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
"skipped:<reason>"), one per consumer node, and logged on the `cce_inductor.rewrite` logger
(INFO), one line per consumer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import logging
import operator
from typing import Any, Callable, Iterator, Optional

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
    """What the pass decided for one consumer node (a loss, logsumexp, gather or sum)."""

    node: str                      # the consumer node's name in the original graph
    rewritten: bool
    reason: str                    # "rewritten" or the skip reason code
    detail: str = ""
    patterns: frozenset[str] = frozenset()
    logits_outputs: int = 0        # graph outputs holding tensors derived from the logits


@dataclasses.dataclass
class _Group:
    """Consumers of one head served by one fused call: the call runs on the owner's rows (and
    target); every member's rows are the base node's rows, or rows selected from them."""

    owner: patterns.Site
    base: Node
    members: list[patterns.Site]
    anchor: Node  # the call goes before this node: the first member's consumer

    def call_rows(self) -> Node:
        """The logits node whose rows the call takes: the owner's with a target, else the
        base."""
        return self.owner.logits if self.owner.kind in patterns.TARGET_KINDS else self.base

    def outputs(self) -> tuple[str, ...]:
        """The fused head's outputs the members need, in arguments.OUTPUTS order."""
        needed = {name for site in self.members for name in _OUTPUTS_OF[site.kind]}
        return tuple(name for name in arguments.OUTPUTS if name in needed)


# The fused head's outputs (arguments.OUTPUTS) each consumer kind is computed from.
_OUTPUTS_OF = {
    "loss": ("loss",), "lse": ("lse",), "log_probs": ("log_probs",),
    "target_logit": ("target_logit",), "neg_entropy": ("entropy",),
    "mean_logit": ("lse", "entropy"),
}
# Ops that change a target tensor's shape but not the order of its elements.
_TARGET_RESHAPES = ("view", "reshape", "flatten", "squeeze", "unsqueeze", "contiguous")


def rewrite_linear_cross_entropy(
    gm: GraphModule, options: RewriteOptions = RewriteOptions()
) -> list[SiteReport]:
    """Replace every site of `gm` in place (the consumers of each classifier head together);
    report each consumer node, in graph order."""
    position = {node: index for index, node in enumerate(gm.graph.nodes)}
    reports: list[tuple[int, SiteReport]] = []
    heads: dict[Node, list[patterns.Site]] = {}
    for node in list(gm.graph.nodes):
        try:
            site = patterns.find_site(node)
        except patterns.NotASite as skip:
            reports.append((position[node], SiteReport(node.name, False, skip.reason,
                                                       skip.detail)))
            continue
        except Exception as error:  # a bug here must cost the fusion, never the compilation
            log.warning("cce: reading %s failed; left unchanged", node.name, exc_info=True)
            reports.append((position[node], SiteReport(node.name, False, "internal_error",
                                                       repr(error))))
            continue
        if site is not None:
            heads.setdefault(site.head, []).append(site)
    for sites in heads.values():
        reports += [(position[site.consumer], report)
                    for site, report in zip(sites, _rewrite_head(gm, sites, options))]
    ordered = [report for _, report in sorted(reports, key=lambda entry: entry[0])]
    for report in ordered:
        _record(report)
    if any(report.rewritten for report in ordered):
        gm.graph.lint()
        gm.recompile()
    return ordered


def _rewrite_head(
    gm: GraphModule, sites: list[patterns.Site], options: RewriteOptions
) -> list[SiteReport]:
    """Rewrite every consumer of one head, or none (each then reports why)."""
    names = [site.consumer.name for site in sites]
    try:
        for site in sites:
            disabled = sorted(site.patterns - options.patterns)
            if disabled:
                raise patterns.NotASite(f"disabled:{disabled[0]}",
                                        f"{site.consumer.name} needs patterns {disabled}, off")
        escaping = _escaping_logits(sites)
        position = {node: index for index, node in enumerate(gm.graph.nodes)}
        groups = _groups(sites, position)
        _replace(gm, sites, groups, escaping, options, position)
    except patterns.NotASite as skip:
        return [SiteReport(name, False, skip.reason, skip.detail) for name in names]
    except Exception as error:  # a bug here must cost the fusion, never the compilation
        log.warning("cce: rewriting %s failed; left unchanged", ", ".join(names), exc_info=True)
        return [SiteReport(name, False, "internal_error", repr(error)) for name in names]
    group_of = {id(site): group for group in groups for site in group.members}
    return [
        SiteReport(site.consumer.name, True, "rewritten",
                   _summary(site, group_of[id(site)], escaping, options),
                   frozenset(site.patterns), len(escaping))
        for site in sites
    ]


def _escaping_logits(sites: list[patterns.Site]) -> list[Node]:
    """Logit-derived nodes that are graph outputs; any use of the logits (or of the
    probabilities computed from them) outside the consumers stops the rewrite."""
    logit_nodes = {node: None for site in sites for node in site.logit_nodes()}
    internal = {node: None for site in sites for node in site.internal}
    claimed = {*logit_nodes, *internal, *(site.consumer for site in sites)}
    escaping = []
    for node in [*logit_nodes, *internal]:
        others = [user for user in node.users if user not in claimed]
        used_by = [user.name for user in others if user.op != "output"]
        if node in internal and others:
            raise patterns.NotASite(
                "log_probs_used_elsewhere",
                f"{node.name} is also used by {[user.name for user in others]}; the fused head "
                "would not remove it",
            )
        if used_by:
            raise patterns.NotASite(
                "logits_used_elsewhere",
                f"{node.name} is also used by {used_by}; the fused head would not remove them",
            )
        if others:
            escaping.append(node)
    return escaping


def _groups(sites: list[patterns.Site], position: dict[Node, int]) -> list[_Group]:
    """The fused calls for one head's consumers, in graph order of their anchors.

    Consumers with a target share a call when they read the same rows (the same base node, up
    to reshapes and casts) with equivalent targets: a gather with another gather of the same
    index, a loss only with itself (its options are its own). A consumer without a target
    joins a call whose rows it selects from (only row ops lie between that call's base and it)
    if the call can be placed before it (its target and row-op arguments are defined by then),
    else one call per transform end (the head, or its last scale or softcap), which covers
    every row of the head."""
    groups: list[_Group] = []
    by_key: dict[tuple, _Group] = {}
    for site in sites:
        if site.kind not in patterns.TARGET_KINDS:
            continue
        base = _base(site, stop_at_index=True)
        key = (base, _target_root(site.target), site.consumer if site.kind == "loss" else None)
        if key not in by_key:
            by_key[key] = _Group(owner=site, base=base, members=[], anchor=site.consumer)
            groups.append(by_key[key])
        by_key[key].members.append(site)
    free: dict[Node, _Group] = {}
    for site in sites:
        if site.kind in patterns.TARGET_KINDS:
            continue
        host = next((group for group in groups if _selects_rows_of(site, group.base)
                     and _inputs_defined_before(group.owner, site.consumer, position)), None)
        if host is None:
            base = _base(site, stop_at_index=False)
            if base not in free:
                free[base] = _Group(owner=site, base=base, members=[], anchor=site.consumer)
                groups.append(free[base])
            host = free[base]
        host.members.append(site)
        if position[site.consumer] < position[host.anchor]:
            host.anchor = site.consumer
    groups.sort(key=lambda group: position[group.anchor])
    for group in groups:
        group.members.sort(key=lambda site: position[site.consumer])
    return groups


def _inputs_defined_before(owner: patterns.Site, anchor: Node, position: dict[Node, int]
                           ) -> bool:
    """Whether a fused call for owner's rows and target can be placed before `anchor`: every
    node it reads besides the head's own inputs (the target, the class weights, the arguments
    of the row ops on owner's path) comes earlier in the graph."""
    needed = [owner.target, owner.class_weight]
    for node in owner.row_ops:
        map_arg((node.args[1:], node.kwargs), needed.append)
    return all(position[node] < position[anchor] for node in needed if isinstance(node, Node))


def _base(site: patterns.Site, stop_at_index: bool) -> Node:
    """The last node of [head, *path] after which the path keeps every row's values: only
    reshapes and casts follow, and with not stop_at_index also row indexing."""
    kept = patterns.ROW_PRESERVING_ROLES + (() if stop_at_index else ("index",))
    nodes = site.logit_nodes()
    index = len(nodes) - 1
    while index > 0 and site.roles[nodes[index]] in kept:
        index -= 1
    return nodes[index]


def _selects_rows_of(site: patterns.Site, base: Node) -> bool:
    """Whether site reads rows of `base`: base lies on its path, followed by row ops only."""
    nodes = site.logit_nodes()
    if base not in nodes:
        return False
    after = nodes[nodes.index(base) + 1:]
    return all(site.roles[node] in patterns.ROW_PRESERVING_ROLES + ("index",) for node in after)


def _target_root(target: Node) -> Any:
    """The tensor `target` reshapes (same elements in the same order): targets with one root
    hold the same class per row."""
    while patterns.is_call(target, (torch.reshape, torch.flatten, torch.squeeze, torch.unsqueeze),
                           _TARGET_RESHAPES):
        target = target.args[0]
    return target


def _replace(
    gm: GraphModule, sites: list[patterns.Site], groups: list[_Group], escaping: list[Node],
    options: RewriteOptions, position: dict[Node, int],
) -> None:
    graph = gm.graph
    new = _NodeFactory(graph)
    replacements: dict[Node, Node] = {}
    try:
        rows = _Rows(new, sites, position)
        for group in groups:
            results = _insert_call(new, rows, group, options)
            for site in group.members:
                with new.before(site.consumer):
                    replacements[site.consumer] = _consumer_value(new, rows, group, site,
                                                                  results)
        with new.before(groups[0].anchor):
            stand_ins = {
                node: new.empty_rows(rows.hidden(node), patterns.example_value(node).dtype)
                for node in (escaping if options.drop_logits else ())
            }
    except BaseException:
        new.undo()  # the graph is untouched until uses move to the new nodes
        raise
    for consumer, value in replacements.items():
        consumer.replace_all_uses_with(value)
    output = next(node for node in graph.nodes if node.op == "output")
    for node, empty in stand_ins.items():
        output.replace_input_with(node, empty)
    replaced = {node for site in sites for node in (
        site.consumer, *site.internal, *site.path, site.head, site.classifier_view)}
    for node in sorted(replaced - {None}, key=lambda n: -position[n]):  # users first
        if not node.users:
            graph.erase_node(node)


class _Rows:
    """The hidden states behind each logits node of one head (the head's input with the path's
    row ops applied), and the classifier and bias as the fused call takes them (cast under
    autocast): built at the factory's insertion point, and reused where that comes later."""

    def __init__(self, new: "_NodeFactory", sites: list[patterns.Site],
                 position: dict[Node, int]) -> None:
        self.new = new
        self.site = sites[0]
        self.position = position
        self.parent: dict[Node, Node] = {}
        self.roles: dict[Node, str] = {}
        for site in sites:
            nodes = site.logit_nodes()
            self.parent.update(zip(nodes[1:], nodes[:-1]))
            self.roles.update(site.roles)
        self._built: dict[Any, tuple[int, Any]] = {}  # key -> (anchor position, value)

    def weights(self) -> tuple[Node, Optional[Node]]:
        """(classifier [V, D], bias) in the head's compute dtype: under autocast the head ran on
        its inputs cast to the autocast dtype; so does the fused call."""
        def build() -> tuple[Node, Optional[Node]]:
            site = self.site
            classifier = self.new.call_function(torch.t, site.classifier) \
                if site.classifier_is_transposed else site.classifier
            return (self.new.cast(classifier, site.compute_dtype),
                    self.new.cast(site.bias, site.compute_dtype)
                    if site.bias is not None else None)
        return self._reuse("weights", build)

    def hidden(self, node: Node) -> Node:
        """The hidden states whose logits are `node`'s rows."""
        def build() -> Node:
            if node is self.site.head:
                return self.new.cast(self.site.input, self.site.compute_dtype)
            source = self.hidden(self.parent[node])
            if self.roles[node] in ("reshape", "index"):
                return self.new.row_op(node, source, self._width())
            return source
        return self._reuse(node, build)

    def path_from(self, base: Node, node: Node) -> list[Node]:
        """The path nodes after base up to node (base is an ancestor)."""
        nodes = []
        while node is not base:
            nodes.append(node)
            node = self.parent[node]
        return nodes[::-1]

    def _reuse(self, key: Any, build: Callable[[], Any]) -> Any:
        """The value built for key before the current insertion point, or a new one."""
        here = self.position[self.new.anchor]
        if key in self._built and self._built[key][0] <= here:
            return self._built[key][1]
        value = build()
        if key not in self._built or here < self._built[key][0]:
            self._built[key] = (here, value)
        return value

    def _width(self) -> Any:
        """D, as an int or as a size node of the classifier."""
        classifier, _ = self.weights()
        hidden_size = patterns.example_value(classifier).shape[1]
        return hidden_size if isinstance(hidden_size, int) else \
            self.new.call_method("size", classifier, 1)


def _insert_call(
    new: "_NodeFactory", rows: _Rows, group: _Group, options: RewriteOptions
) -> dict[str, Node]:
    """Insert the group's fused call before its anchor; {output name: node}, each output with
    the leading dims of the rows the call ran on (the owner's, with a target; else the
    base's)."""
    owner = group.owner
    fused, layout = dtensor_sites.fused_loss(owner)  # the vocab-parallel head on DTensors
    with new.before(group.anchor):
        logits = group.call_rows()
        hidden = rows.hidden(logits)
        classifier, bias = rows.weights()
        _check_rows(hidden, logits)
        target = owner.target
        if owner.kind in ("log_probs", "target_logit"):  # gather's index [..., 1]
            target = new.call_method("squeeze", target, -1)
        outputs = group.outputs()
        keywords = dict(outputs=outputs, linear_bias=bias, logit_scale=owner.logit_scale,
                        softcap=owner.softcap, filter_eps=options.filter_eps, **layout)
        if options.filter_grads != "all":  # so that graphs with the default stay as they were
            keywords.update(filter_grads=options.filter_grads)
        if owner.kind == "loss":
            keywords.update(weight=owner.class_weight, reduction=owner.reduction,
                            label_smoothing=owner.label_smoothing)
        if owner.kind in patterns.TARGET_KINDS:
            keywords.update(ignore_index=owner.ignore_index)
        else:
            target = None
        call = new.call_function(fused, hidden, classifier, target,
                                 **_non_default(fused, keywords))
        return {name: new.call_function(operator.getitem, call, index)
                for index, name in enumerate(outputs)}


def _non_default(fn: Callable, keywords: dict[str, Any]) -> dict[str, Any]:
    """The keywords whose values differ from fn's defaults (the inserted call reads as a user
    would write it)."""
    defaults = {name: parameter.default
                for name, parameter in inspect.signature(fn).parameters.items()}
    return {name: value for name, value in keywords.items()
            if name not in defaults or defaults[name] is inspect.Parameter.empty
            or not _same_value(value, defaults[name])}


def _same_value(value: Any, default: Any) -> bool:
    if isinstance(value, Node) or isinstance(default, Node):
        return value is default
    return type(value) is type(default) and value == default


def _consumer_value(
    new: "_NodeFactory", rows: _Rows, group: _Group, site: patterns.Site,
    results: dict[str, Node],
) -> Node:
    """The node standing for site's consumer, from the group's outputs (inserted at the
    factory's point, before the consumer)."""
    if site.kind == "loss":
        return new.cast(results["loss"], patterns.example_value(site.consumer).dtype)

    def statistic(name: str) -> tuple[Node, bool]:
        """The output for site's rows, and whether it has a trailing dim of 1 (where the
        vocabulary was: row ops apply to it as to the logits)."""
        value = results[name]
        to_call = _row_ops(rows, group.base, group.call_rows())
        to_site = _row_ops(rows, group.base, site.logits)
        if not to_call and not to_site:
            return value, False  # the call ran on exactly these rows, in this shape
        if to_call:  # back to the base's rows: only reshapes lie between
            rows_of_base = new.call_function(
                operator.getitem, rows.hidden(group.base), (Ellipsis, 0))
            value = new.call_method("reshape_as", value, rows_of_base)
        value = new.call_method("unsqueeze", value, -1)
        for node in to_site:
            value = new.row_op(node, value, 1)
        return value, True

    if site.kind == "neg_entropy":
        entropy, trailing = statistic("entropy")
        value = new.call_function(operator.neg, entropy)
    elif site.kind == "mean_logit":
        (lse, trailing), (entropy, _) = statistic("lse"), statistic("entropy")
        value = new.call_function(operator.sub, lse, entropy)
    else:  # lse, log_probs, target_logit
        value, trailing = statistic(_OUTPUTS_OF[site.kind][0])
    if site.keepdim and not trailing:
        value = new.call_method("unsqueeze", value, -1)
    elif trailing and not site.keepdim:
        value = new.call_method("squeeze", value, -1)
    return new.cast(value, patterns.example_value(site.consumer).dtype)


def _row_ops(rows: _Rows, base: Node, node: Node) -> list[Node]:
    """The reshapes and indexing on the path from base to node."""
    return [n for n in rows.path_from(base, node) if rows.roles[n] in ("reshape", "index")]


def _check_rows(hidden: Node, logits: Node) -> None:
    """The rebuilt hidden states have exactly the rows of the logits fed to the consumer."""
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
    stack trace (errors point at the user's loss line). Nodes go before the anchor (`before`)."""

    def __init__(self, graph) -> None:
        self.graph = graph
        self.anchor: Optional[Node] = None
        self.created: list[Node] = []
        values = [patterns.example_value(n) for n in graph.nodes if n.op == "placeholder"]
        self.fake_mode = compat.fake_mode_of([v for v in values if v is not None])

    @contextlib.contextmanager
    def before(self, anchor: Node) -> Iterator[None]:
        previous, self.anchor = self.anchor, anchor
        try:
            with self.graph.inserting_before(anchor):
                yield
        finally:
            self.anchor = previous

    def call_function(self, target: Callable, *args: Any, **kwargs: Any) -> Node:
        return self._add(self.graph.call_function(target, args, kwargs))

    def call_method(self, name: str, *args: Any, **kwargs: Any) -> Node:
        return self._add(self.graph.call_method(name, args, kwargs))

    def cast(self, node: Node, dtype: torch.dtype) -> Node:
        if patterns.example_value(node).dtype == dtype:
            return node
        return self.call_method("to", node, dtype)

    def row_op(self, node: Node, rows: Node, width: Any) -> Node:
        """`node`, a reshape or indexing of the logits' leading dims, applied to `rows`, a
        tensor with the logits' leading dims and `width` (an int or a size node) last: the
        hidden states, or a row statistic with a trailing dim of 1."""
        if node.target is operator.getitem:
            return self.call_function(operator.getitem, rows, node.args[1])
        if patterns.is_call(node, (torch.flatten,), ("flatten",)):
            return self.call_method("flatten", rows, *node.args[1:], **node.kwargs)
        # view / reshape: the same leading sizes, the width last (-1 stays -1).
        shape = node.args[1:] or tuple(node.kwargs.values())
        if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)):
            shape = tuple(shape[0])
        last = shape[-1]
        if not (isinstance(last, int) and last == -1):
            last = width
        return self.call_method("reshape", rows, (*shape[:-1], last))

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
            if self.anchor is not None and key in self.anchor.meta:
                node.meta[key] = self.anchor.meta[key]
        compat.set_example_value(node, self._fake_value(node))
        return node

    def _fake_value(self, node: Node) -> Any:
        args, kwargs = map_arg((node.args, node.kwargs), patterns.example_value)
        with self.fake_mode:
            if node.op == "call_method":
                return getattr(args[0], node.target)(*args[1:], **kwargs)
            return node.target(*args, **kwargs)


def _summary(site: patterns.Site, group: _Group, escaping: list[Node],
             options: RewriteOptions) -> str:
    parts = [f"head {site.head.name}", f"computes {site.kind}"]
    if site.kind == "loss":
        parts.append(f"reduction {site.reduction}")
    if site.softcap is not None:
        parts.append(f"softcap {site.softcap}")
    if site.logit_scale != 1.0:
        parts.append(f"logit_scale {site.logit_scale}")
    if site.label_smoothing:
        parts.append(f"label_smoothing {site.label_smoothing}")
    if site.class_weight is not None:
        parts.append("class weights")
    if len(group.members) > 1:
        parts.append(f"one fused call with {[s.consumer.name for s in group.members]}")
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
            report.node, report.detail, ", ".join(sorted(report.patterns)),
        )
    else:
        counters[f"skipped:{report.reason}"] += 1
        log.info("cce: left %s unchanged: %s (%s)", report.node, report.reason, report.detail)
