"""The graph pass on Dynamo graphs: what each variant looks like before and after the rewrite,
and the sites that must stay untouched (with the reason counted).

Graphs are snapshotted as a normalized op sequence (see `op_sequence`), not as raw FX code, so
the snapshots do not depend on Dynamo's node naming. No Inductor here: the capturing backend
runs the rewritten graph eagerly. The variants (tests/support.py) are shared with
tests/test_backend.py, which checks their numerics under torch.compile(backend="cce").
"""

from __future__ import annotations

import operator
import unittest
from typing import Any, Callable

import expecttest
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cce_inductor import compat
from cce_inductor.rewrite import RewriteOptions, SiteReport, rewrite_linear_cross_entropy
from support import B, CONSUMERS, D, N, T, V, VARIANTS, cce_counters, variant_inputs

pytestmark = pytest.mark.usefixtures("fresh_dynamo")

# --- Capturing and describing graphs ----------------------------------------------------------


class Capture:
    """A backend that snapshots the Dynamo graph, rewrites it and runs it without Inductor."""

    def __init__(self, options: RewriteOptions = RewriteOptions()) -> None:
        self.options = options
        self.before: list[str] = []
        self.after: list[str] = []
        self.reports: list[SiteReport] = []

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
        self.before.append(op_sequence(gm))
        self.reports.extend(rewrite_linear_cross_entropy(gm, self.options))
        self.after.append(op_sequence(gm))
        return gm.forward


def op_sequence(gm: torch.fx.GraphModule) -> str:
    """The graph's computation, one line per node: inputs are named a, b, c... in order and
    results %0, %1...; targets by their function or method name; constants by repr."""
    names: dict[torch.fx.Node, str] = {}
    lines = []
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            names[node] = chr(ord("a") + len(names))
            continue
        args = torch.fx.node.map_arg(node.args, lambda n: _Name(names[n]))
        kwargs = torch.fx.node.map_arg(node.kwargs, lambda n: _Name(names[n]))
        rendered = [_render(a) for a in args] + [f"{k}={_render(v)}" for k, v in kwargs.items()]
        if node.op == "output":
            lines.append(f"return {', '.join(rendered)}")
            continue
        names[node] = f"%{sum(1 for n in names.values() if n.startswith('%'))}"
        lines.append(f"{names[node]} = {_target_name(node)}({', '.join(rendered)})")
    return "\n".join(lines)


class _Name(str):
    def __repr__(self) -> str:
        return str(self)


def _render(value: Any) -> str:
    if isinstance(value, slice):
        start, stop = ("" if p is None else _render(p) for p in (value.start, value.stop))
        return f"{start}:{stop}" + ("" if value.step is None else f":{_render(value.step)}")
    if isinstance(value, (tuple, list)):
        return "(" + ", ".join(_render(v) for v in value) + ("," if len(value) == 1 else "") + ")"
    if value is Ellipsis:
        return "..."
    return repr(value)


def _target_name(node: torch.fx.Node) -> str:
    if node.op == "call_method":
        return f".{node.target}"
    if node.target in compat.linear_functions():
        return "linear"
    if node.target is operator.getitem:
        return "getitem"
    return getattr(node.target, "__name__", str(node.target))


def capture(fn: Callable, *args, options: RewriteOptions = RewriteOptions(), **kwargs):
    backend = Capture(options)
    torch.compile(fn, backend=backend, fullgraph=True)(*args, **kwargs)
    return backend


def call_variant(name: str, backend: Callable) -> Any:
    inputs = variant_inputs(name)
    return torch.compile(VARIANTS[name], backend=backend, fullgraph=True)(
        inputs["input"], inputs["linear_weight"].requires_grad_(), inputs["target"],
        linear_bias=inputs["linear_bias"], weight=inputs["weight"],
    )


# --- Snapshots --------------------------------------------------------------------------------


class TestRewrittenGraphs(expecttest.TestCase):
    def check(self, name: str) -> tuple[str, str]:
        backend = Capture()
        call_variant(name, backend)
        consumers = CONSUMERS.get(name, 1)
        self.assertEqual([r.reason for r in backend.reports], ["rewritten"] * consumers)
        self.assertEqual(cce_counters(), {"rewritten": consumers})
        (before,), (after,) = backend.before, backend.after
        return before, after

    def test_linear_ce(self):
        before, after = self.check("linear_ce")
        self.assertExpectedInline(before, """\
%0 = linear(a, b, c)
%1 = cross_entropy(%0, d, weight=e)
return (%1,)""")
        self.assertExpectedInline(after, """\
%0 = linear_head(a, b, d, outputs=('loss',), linear_bias=c, weight=e)
%1 = getitem(%0, 0)
return (%1,)""")

    def test_matmul_t(self):
        before, after = self.check("matmul_t")
        self.assertExpectedInline(before, """\
%0 = .t(a)
%1 = matmul(b, %0)
%2 = cross_entropy(%1, c)
return (%2,)""")
        self.assertExpectedInline(after, """\
%0 = linear_head(b, a, c, outputs=('loss',))
%1 = getitem(%0, 0)
return (%1,)""")

    def test_torch_matmul_T(self):
        before, after = self.check("torch_matmul_T")
        # torch 2.14's Dynamo records W.T as a call of aten.numpy_T, earlier ones as a getattr
        # (see compat.transposing_attribute_source): the same site either way.
        if compat.TORCH_VERSION >= (2, 14):
            self.assertExpectedInline(before, """\
%0 = numpy_T(a)
%1 = matmul(b, %0)
%2 = cross_entropy(%1, c)
return (%2,)""")
        else:
            self.assertExpectedInline(before, """\
%0 = getattr(a, 'T')
%1 = matmul(b, %0)
%2 = cross_entropy(%1, c)
return (%2,)""")
        self.assertExpectedInline(after, """\
%0 = linear_head(b, a, c, outputs=('loss',))
%1 = getitem(%0, 0)
return (%1,)""")

    def test_matmul_unembedding(self):
        before, after = self.check("matmul_unembedding")
        self.assertExpectedInline(before, """\
%0 = .t(a)
%1 = .contiguous(%0)
%2 = matmul(b, %1)
%3 = cross_entropy(%2, c)
return (%3,)""")
        self.assertExpectedInline(after, """\
%0 = .t(a)
%1 = .contiguous(%0)
%2 = t(%1)
%3 = linear_head(b, %2, c, outputs=('loss',))
%4 = getitem(%3, 0)
return (%4,)""")

    def test_view_flatten(self):
        before, after = self.check("view_flatten")
        self.assertExpectedInline(before, """\
%0 = .view(a, 2, 8, 32)
%1 = linear(%0, b, c)
%2 = .contiguous(%1)
%3 = .flatten(%2, 0, 1)
%4 = .reshape(%3, -1, 96)
%5 = cross_entropy(%4, d)
return (%5,)""")
        self.assertExpectedInline(after, """\
%0 = .view(a, 2, 8, 32)
%1 = .flatten(%0, 0, 1)
%2 = .reshape(%1, (-1, 32))
%3 = linear_head(%2, b, d, outputs=('loss',), linear_bias=c)
%4 = getitem(%3, 0)
return (%4,)""")

    def test_shift_logits(self):
        before, after = self.check("shift_logits")
        self.assertExpectedInline(before, """\
%0 = .view(a, 2, 8, 32)
%1 = linear(%0, b, c)
%2 = getitem(%1, (..., :-1, :))
%3 = .contiguous(%2)
%4 = .view(d, 2, 8)
%5 = getitem(%4, (..., 1:))
%6 = .contiguous(%5)
%7 = .view(%3, -1, 96)
%8 = .view(%6, -1)
%9 = cross_entropy(%7, %8)
return (%9,)""")
        self.assertExpectedInline(after, """\
%0 = .view(a, 2, 8, 32)
%1 = .view(d, 2, 8)
%2 = getitem(%1, (..., 1:))
%3 = .contiguous(%2)
%4 = .view(%3, -1)
%5 = getitem(%0, (..., :-1, :))
%6 = .reshape(%5, (-1, 32))
%7 = linear_head(%6, b, %4, outputs=('loss',), linear_bias=c)
%8 = getitem(%7, 0)
return (%8,)""")

    def test_hf_label_shift(self):
        before, after = self.check("hf_label_shift")
        self.assertExpectedInline(before, """\
%0 = .view(a, 2, 8, 32)
%1 = linear(%0, b, c)
%2 = .float(%1)
%3 = .view(d, 2, 8)
%4 = pad(%3, (0, 1), 'constant', -100)
%5 = getitem(%4, (..., 1:))
%6 = .contiguous(%5)
%7 = .view(%2, -1, 96)
%8 = .view(%6, -1)
%9 = cross_entropy(%7, %8, ignore_index=-100)
return (%9,)""")
        self.assertExpectedInline(after, """\
%0 = .view(a, 2, 8, 32)
%1 = .view(d, 2, 8)
%2 = pad(%1, (0, 1), 'constant', -100)
%3 = getitem(%2, (..., 1:))
%4 = .contiguous(%3)
%5 = .view(%4, -1)
%6 = .reshape(%0, (-1, 32))
%7 = linear_head(%6, b, %5, outputs=('loss',), linear_bias=c)
%8 = getitem(%7, 0)
return (%8,)""")

    def test_upcast_to(self):
        before, after = self.check("upcast_to")
        self.assertExpectedInline(before, """\
%0 = linear(a, b, c)
%1 = .to(%0, torch.float32)
%2 = .float(d)
%3 = cross_entropy(%1, e, weight=%2)
return (%3,)""")
        self.assertExpectedInline(after, """\
%0 = .float(d)
%1 = linear_head(a, b, e, outputs=('loss',), linear_bias=c, weight=%0)
%2 = getitem(%1, 0)
return (%2,)""")

    def test_softcapped(self):
        before, after = self.check("softcapped")
        self.assertExpectedInline(before, """\
%0 = linear(a, b, c)
%1 = truediv(%0, 5.0)
%2 = tanh(%1)
%3 = mul(%2, 5.0)
%4 = cross_entropy(%3, d)
return (%4,)""")
        self.assertExpectedInline(after, """\
%0 = linear_head(a, b, d, outputs=('loss',), linear_bias=c, softcap=5.0)
%1 = getitem(%0, 0)
return (%1,)""")

    def test_loss_module(self):
        before, after = self.check("loss_module")
        self.assertExpectedInline(before, """\
%0 = linear(b, c, d)
%1 = cross_entropy(%0, e, a, None, 3, None, 'sum', 0.1)
return (%1,)""")
        self.assertExpectedInline(after, """\
%0 = linear_head(b, c, e, outputs=('loss',), linear_bias=d, weight=a, reduction='sum', label_smoothing=0.1, ignore_index=3)
%1 = getitem(%0, 0)
return (%1,)""")

    def test_unreduced(self):
        before, after = self.check("unreduced")
        self.assertExpectedInline(after, """\
%0 = linear_head(a, b, d, outputs=('loss',), linear_bias=c, reduction='none', label_smoothing=0.2)
%1 = getitem(%0, 0)
return (%1,)""")

    def test_log_softmax_nll(self):
        before, after = self.check("log_softmax_nll")
        self.assertExpectedInline(before, """\
%0 = linear(a, b, c)
%1 = log_softmax(%0, dim=-1)
%2 = nll_loss(%1, d, weight=e)
return (%2,)""")
        self.assertExpectedInline(after, """\
%0 = linear_head(a, b, d, outputs=('loss',), linear_bias=c, weight=e)
%1 = getitem(%0, 0)
return (%1,)""")

    def test_unbatched(self):
        before, after = self.check("unbatched")
        self.assertExpectedInline(before, """\
%0 = getitem(a, -1)
%1 = linear(%0, b, c)
%2 = getitem(d, -1)
%3 = cross_entropy(%1, %2)
return (%3,)""")
        self.assertExpectedInline(after, """\
%0 = getitem(a, -1)
%1 = getitem(d, -1)
%2 = linear_head(%0, b, %1, outputs=('loss',), linear_bias=c)
%3 = getitem(%2, 0)
return (%3,)""")

    @unittest.skipIf(not compat.HAS_TORCH_LINEAR_CROSS_ENTROPY, compat.NO_TORCH_LINEAR_CROSS_ENTROPY)
    def test_torch_linear_cross_entropy(self):
        before, after = self.check("torch_linear_cross_entropy")
        self.assertExpectedInline(before, """\
%0 = linear(a, b, d)
%1 = .reshape(%0, (16, 96))
%2 = cross_entropy(%1, c, weight=e, reduction='mean', ignore_index=-100, label_smoothing=0.1)
return (%2,)""")
        self.assertExpectedInline(after, """\
%0 = .reshape(a, (16, 32))
%1 = linear_head(%0, b, c, outputs=('loss',), linear_bias=d, weight=e, label_smoothing=0.1)
%2 = getitem(%1, 0)
return (%2,)""")

    # --- Scaled logits, and the consumers beside (or instead of) the loss ------------------

    def test_scaled_logits(self):
        before, after = self.check("scaled_logits")
        self.assertExpectedInline(before, """\
%0 = linear(a, b, c)
%1 = mul(%0, 0.0625)
%2 = cross_entropy(%1, d)
return (%2,)""")
        self.assertExpectedInline(after, """\
%0 = linear_head(a, b, d, outputs=('loss',), linear_bias=c, logit_scale=0.0625)
%1 = getitem(%0, 0)
return (%1,)""")

    def test_divided_logits(self):
        before, after = self.check("divided_logits")
        self.assertExpectedInline(before, """\
%0 = linear(a, b, c)
%1 = .float(%0)
%2 = truediv(%1, 8.0)
%3 = cross_entropy(%2, d)
return (%3,)""")
        self.assertExpectedInline(after, """\
%0 = linear_head(a, b, d, outputs=('loss',), linear_bias=c, logit_scale=0.125)
%1 = getitem(%0, 0)
return (%1,)""")

    def test_z_loss(self):
        """CE and logsumexp of the same logits: one fused call returns the loss and the lse."""
        before, after = self.check("z_loss")
        self.assertExpectedInline(before, """\
%0 = linear(a, b, c)
%1 = cross_entropy(%0, d)
%2 = logsumexp(%0, -1)
%3 = .square(%2)
%4 = .mean(%3)
%5 = mul(0.0001, %4)
%6 = add(%1, %5)
return (%6,)""")
        self.assertExpectedInline(after, """\
%0 = linear_head(a, b, d, outputs=('loss', 'lse'), linear_bias=c)
%1 = getitem(%0, 0)
%2 = getitem(%0, 1)
%3 = .square(%2)
%4 = .mean(%3)
%5 = mul(0.0001, %4)
%6 = add(%1, %5)
return (%6,)""")

    def test_log_probs_gather(self):
        before, after = self.check("log_probs_gather")
        self.assertExpectedInline(before, """\
%0 = .view(a, 2, 8, 32)
%1 = linear(%0, b, c)
%2 = truediv(%1, 0.7)
%3 = .view(d, 2, 8)
%4 = .log_softmax(%2, -1)
%5 = .unsqueeze(%3, -1)
%6 = gather(%4, -1, %5)
%7 = .squeeze(%6, -1)
%8 = linspace(-1.0, 1.0, 16)
%9 = .view(%8, (2, 8))
%10 = mul(%7, %9)
%11 = .sum(%10)
return (%11,)""")
        self.assertExpectedInline(after, """\
%0 = .view(a, 2, 8, 32)
%1 = .view(d, 2, 8)
%2 = .unsqueeze(%1, -1)
%3 = .squeeze(%2, -1)
%4 = linear_head(%0, b, %3, outputs=('log_probs',), linear_bias=c, logit_scale=1.4285714285714286, ignore_index=None)
%5 = getitem(%4, 0)
%6 = .unsqueeze(%5, -1)
%7 = .squeeze(%6, -1)
%8 = linspace(-1.0, 1.0, 16)
%9 = .view(%8, (2, 8))
%10 = mul(%7, %9)
%11 = .sum(%10)
return (%11,)""")

    def test_gather_minus_logsumexp(self):
        """The row-by-row logsumexp (Dynamo unrolls TRL's loop) reads rows of the gather's
        call: one call, each row's lse indexed out of its result."""
        before, after = self.check("gather_minus_logsumexp")
        self.assertExpectedInline(before, """\
%0 = .view(a, 2, 8, 32)
%1 = linear(%0, b, c)
%2 = .view(d, 2, 8)
%3 = .unsqueeze(%2, -1)
%4 = gather(%1, -1, %3)
%5 = .squeeze(%4, -1)
%6 = getitem(%1, 0)
%7 = getitem(%1, 1)
%8 = logsumexp(%6, dim=-1)
%9 = logsumexp(%7, dim=-1)
%10 = stack((%8, %9))
%11 = sub(%5, %10)
%12 = linspace(-1.0, 1.0, 16)
%13 = .view(%12, (2, 8))
%14 = mul(%11, %13)
%15 = .sum(%14)
return (%15,)""")
        self.assertExpectedInline(after, """\
%0 = .view(a, 2, 8, 32)
%1 = .view(d, 2, 8)
%2 = .unsqueeze(%1, -1)
%3 = .squeeze(%2, -1)
%4 = linear_head(%0, b, %3, outputs=('lse', 'target_logit'), linear_bias=c, ignore_index=None)
%5 = getitem(%4, 0)
%6 = getitem(%4, 1)
%7 = .unsqueeze(%6, -1)
%8 = .squeeze(%7, -1)
%9 = .unsqueeze(%5, -1)
%10 = getitem(%9, 0)
%11 = .squeeze(%10, -1)
%12 = .unsqueeze(%5, -1)
%13 = getitem(%12, 1)
%14 = .squeeze(%13, -1)
%15 = stack((%11, %14))
%16 = sub(%8, %15)
%17 = linspace(-1.0, 1.0, 16)
%18 = .view(%17, (2, 8))
%19 = mul(%16, %18)
%20 = .sum(%19)
return (%20,)""")

    def test_entropy_softmax(self):
        before, after = self.check("entropy_softmax")
        self.assertExpectedInline(before, """\
%0 = linear(a, b, c)
%1 = softmax(%0, dim=-1)
%2 = log_softmax(%0, dim=-1)
%3 = mul(%1, %2)
%4 = .sum(%3, -1)
%5 = neg(%4)
%6 = .mean(%5)
return (%6,)""")
        self.assertExpectedInline(after, """\
%0 = linear_head(a, b, None, outputs=('entropy',), linear_bias=c)
%1 = getitem(%0, 0)
%2 = neg(%1)
%3 = neg(%2)
%4 = .mean(%3)
return (%4,)""")

    def test_rl_log_probs_entropy(self):
        """Softcap then temperature, log-probs and entropy (through exp(log_softmax)): one
        call, the softcap and the scale both in the kernel."""
        before, after = self.check("rl_log_probs_entropy")
        self.assertExpectedInline(before, """\
%0 = linear(a, b, c)
%1 = truediv(%0, 5.0)
%2 = tanh(%1)
%3 = mul(%2, 5.0)
%4 = truediv(%3, 0.7)
%5 = .log_softmax(%4, -1)
%6 = .unsqueeze(d, -1)
%7 = .gather(%5, -1, %6)
%8 = .squeeze(%7, -1)
%9 = .exp(%5)
%10 = mul(%9, %5)
%11 = .sum(%10, -1)
%12 = neg(%11)
%13 = linspace(-1.0, 1.0, 16)
%14 = .view(%13, (16,))
%15 = mul(%8, %14)
%16 = .sum(%15)
%17 = .sum(%12)
%18 = mul(0.01, %17)
%19 = add(%16, %18)
return (%19,)""")
        self.assertExpectedInline(after, """\
%0 = .unsqueeze(d, -1)
%1 = .squeeze(%0, -1)
%2 = linear_head(a, b, %1, outputs=('log_probs', 'entropy'), linear_bias=c, logit_scale=1.4285714285714286, softcap=5.0, ignore_index=None)
%3 = getitem(%2, 0)
%4 = getitem(%2, 1)
%5 = .unsqueeze(%3, -1)
%6 = .squeeze(%5, -1)
%7 = neg(%4)
%8 = neg(%7)
%9 = linspace(-1.0, 1.0, 16)
%10 = .view(%9, (16,))
%11 = mul(%6, %10)
%12 = .sum(%11)
%13 = .sum(%8)
%14 = mul(0.01, %13)
%15 = add(%12, %14)
return (%15,)""")

    def test_verl_entropy(self):
        before, after = self.check("verl_entropy")
        self.assertExpectedInline(before, """\
%0 = linear(a, b, c)
%1 = .float(%0)
%2 = softmax(%1, dim=-1)
%3 = logsumexp(%1, dim=-1)
%4 = mul(%2, %1)
%5 = sum(%4, dim=-1)
%6 = sub(%3, %5)
%7 = .mean(%6)
return (%7,)""")
        self.assertExpectedInline(after, """\
%0 = linear_head(a, b, None, outputs=('lse', 'entropy'), linear_bias=c)
%1 = getitem(%0, 0)
%2 = getitem(%0, 1)
%3 = sub(%1, %2)
%4 = sub(%1, %3)
%5 = .mean(%4)
return (%5,)""")

    def test_ce_z_loss_entropy(self):
        """The entropy comes first in the graph: the call goes before it (its target is
        defined by then)."""
        before, after = self.check("ce_z_loss_entropy")
        self.assertExpectedInline(before, """\
%0 = linear(a, b, c)
%1 = log_softmax(%0, dim=-1)
%2 = .exp(%1)
%3 = mul(%2, %1)
%4 = .sum(%3, -1)
%5 = neg(%4)
%6 = cross_entropy(%0, d)
%7 = .logsumexp(%0, -1)
%8 = .square(%7)
%9 = .mean(%8)
%10 = mul(0.0001, %9)
%11 = add(%6, %10)
%12 = .mean(%5)
%13 = mul(0.01, %12)
%14 = sub(%11, %13)
return (%14,)""")
        self.assertExpectedInline(after, """\
%0 = linear_head(a, b, d, outputs=('loss', 'lse', 'entropy'), linear_bias=c)
%1 = getitem(%0, 0)
%2 = getitem(%0, 1)
%3 = getitem(%0, 2)
%4 = neg(%3)
%5 = neg(%4)
%6 = .square(%2)
%7 = .mean(%6)
%8 = mul(0.0001, %7)
%9 = add(%1, %8)
%10 = .mean(%5)
%11 = mul(0.01, %10)
%12 = sub(%9, %11)
return (%12,)""")

    def test_scale_before_softcap(self):
        """tanh((z * s) / c) * c = s * (c / s) tanh(z / (c / s)): the scale moves behind the
        softcap, whose cap becomes c / s."""

        def scaled_then_capped(x, w, y):
            logits = F.linear(x, w) * 2.0
            return F.cross_entropy(torch.tanh(logits / 5.0) * 5.0, y)

        backend = capture(scaled_then_capped, *_inputs())
        self.assertEqual(cce_counters(), {"rewritten": 1})
        self.assertExpectedInline(backend.after[0], """\
%0 = linear_head(a, b, c, outputs=('loss',), logit_scale=2.0, softcap=2.5)
%1 = getitem(%0, 0)
return (%1,)""")

    def test_scale_tensor_made_in_graph(self):
        def scaled(x, w, y):
            return F.cross_entropy(F.linear(x, w) * torch.tensor(0.5), y)

        backend = capture(scaled, *_inputs())
        self.assertEqual(cce_counters(), {"rewritten": 1})
        self.assertExpectedInline(backend.after[0], """\
%0 = tensor(0.5)
%1 = linear_head(a, b, c, outputs=('loss',), logit_scale=0.5)
%2 = getitem(%1, 0)
return (%2,)""")

    def test_shifted_loss_and_z_loss_on_all_rows(self):
        """A loss on shifted rows and a z-loss on every row read different rows: two calls."""

        def shifted_with_z_loss(x, w, y):
            logits = F.linear(x.view(B, T, D), w)
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, V), y.view(B, T)[:, 1:].reshape(-1))
            return loss + 1e-4 * logits.logsumexp(-1).square().mean()

        backend = capture(shifted_with_z_loss, *_inputs())
        self.assertEqual(cce_counters(), {"rewritten": 2})
        self.assertExpectedInline(backend.after[0], """\
%0 = .view(a, 2, 8, 32)
%1 = .view(c, 2, 8)
%2 = getitem(%1, (:, 1:))
%3 = .reshape(%2, -1)
%4 = getitem(%0, (:, :-1))
%5 = .reshape(%4, (-1, 32))
%6 = linear_head(%5, b, %3, outputs=('loss',))
%7 = getitem(%6, 0)
%8 = linear_head(%0, b, None, outputs=('lse',))
%9 = getitem(%8, 0)
%10 = .square(%9)
%11 = .mean(%10)
%12 = mul(0.0001, %11)
%13 = add(%7, %12)
return (%13,)""")

    def test_modules_with_tied_weights(self):
        """nn.Embedding and an nn.Linear head sharing its weight, nn.CrossEntropyLoss."""

        class TinyLM(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.embed = nn.Embedding(V, D)
                self.head = nn.Linear(D, V, bias=False)
                self.head.weight = self.embed.weight
                self.criterion = nn.CrossEntropyLoss()

            def forward(self, ids, labels):
                logits = self.head(torch.relu(self.embed(ids)))
                return self.criterion(logits.view(-1, V), labels.view(-1))

        ids = torch.randint(0, V, (B, T))
        backend = capture(TinyLM(), ids, ids)
        self.assertEqual(cce_counters(), {"rewritten": 1})
        self.assertExpectedInline(backend.before[0], """\
%0 = embedding(b, a, None, None, 2.0, False, False)
%1 = relu(%0)
%2 = linear(%1, a, None)
%3 = .view(%2, -1, 96)
%4 = .view(b, -1)
%5 = cross_entropy(%3, %4, weight=None, ignore_index=-100, reduction='mean', label_smoothing=0.0)
return (%5,)""")
        self.assertExpectedInline(backend.after[0], """\
%0 = embedding(b, a, None, None, 2.0, False, False)
%1 = relu(%0)
%2 = .view(b, -1)
%3 = .reshape(%1, (-1, 32))
%4 = linear_head(%3, a, %2, outputs=('loss',))
%5 = getitem(%4, 0)
return (%5,)""")

    def test_returned_logits_are_kept(self):
        def loss_and_logits(x, w, y):
            logits = F.linear(x, w)
            return F.cross_entropy(logits.float(), y), logits

        x, w = torch.randn(N, D, dtype=torch.bfloat16), torch.randn(V, D, dtype=torch.bfloat16)
        backend = capture(loss_and_logits, x, w, torch.randint(0, V, (N,)))
        self.assertExpectedInline(backend.after[0], """\
%0 = linear(a, b)
%1 = linear_head(a, b, c, outputs=('loss',))
%2 = getitem(%1, 0)
return (%2, %0)""")
        self.assertEqual(backend.reports[0].logits_outputs, 1)

    def test_returned_logits_dropped(self):
        def loss_and_logits(x, w, y):
            logits = F.linear(x.view(B, T, D), w)
            return F.cross_entropy(logits.float().view(-1, V), y), logits

        x, w = torch.randn(N, D, dtype=torch.bfloat16), torch.randn(V, D, dtype=torch.bfloat16)
        backend = capture(
            loss_and_logits, x, w, torch.randint(0, V, (N,)),
            options=RewriteOptions(drop_logits=True),
        )
        self.assertExpectedInline(backend.after[0], """\
%0 = .view(a, 2, 8, 32)
%1 = .reshape(%0, (-1, 32))
%2 = linear_head(%1, b, c, outputs=('loss',))
%3 = getitem(%2, 0)
%4 = getitem(%0, (..., 0:0))
%5 = empty_like(%4, dtype=torch.bfloat16)
return (%3, %5)""")

    def test_autocast_head(self):
        """Under autocast the head's fp32 inputs are cast to bf16, as autocast's linear does."""

        def autocast_loss(x, w, y):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits = F.linear(x, w)
            return F.cross_entropy(logits.float(), y)

        backend = capture(
            autocast_loss, torch.randn(N, D), torch.randn(V, D), torch.randint(0, V, (N,))
        )
        self.assertEqual(cce_counters(), {"rewritten": 1})
        self.assertExpectedInline(backend.after[0], """\
%0 = _enter_autocast('cpu', torch.bfloat16, True, None)
%1 = _exit_autocast(%0)
%2 = .to(a, torch.bfloat16)
%3 = .to(b, torch.bfloat16)
%4 = linear_head(%2, %3, c, outputs=('loss',))
%5 = getitem(%4, 0)
return (%5,)""")


# --- Sites left alone -------------------------------------------------------------------------


def _inputs(dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    return torch.randn(N, D, dtype=dtype), torch.randn(V, D, dtype=dtype), \
        torch.randint(0, V, (N,))


def k_dimensional(x, w, y):
    logits = F.linear(x.view(B, T, D), w)
    return F.cross_entropy(logits.transpose(1, 2), y.view(B, T))


def probability_targets(x, w, y):
    return F.cross_entropy(F.linear(x, w), F.one_hot(y, V).float())


def accuracy_beside(x, w, y):
    logits = F.linear(x, w)
    return F.cross_entropy(logits, y), (logits.argmax(-1) == y).float().mean()


def log_probs_returned(x, w, y):
    log_probs = F.log_softmax(F.linear(x, w), dim=-1)
    return F.nll_loss(log_probs, y), log_probs


def scale_from_input(x, w, y):
    return F.cross_entropy(F.linear(x, w) / x.norm(), y)


def scale_by_zero(x, w, y):
    return F.cross_entropy(F.linear(x, w) * 0.0, y)


def two_classes_per_row(x, w, y):
    logits = F.linear(x, w)
    pairs = torch.stack([y, y.flip(0)], -1)
    return F.cross_entropy(logits, y) + logits.log_softmax(-1).gather(-1, pairs).sum()


def activation_between(x, w, y):
    return F.cross_entropy(torch.relu(F.linear(x, w)), y)


def vocab_sliced(x, w, y):
    return F.cross_entropy(F.linear(x, w)[:, : V - 1], y.clamp(max=V - 2))


def downcast(x, w, y):
    return F.cross_entropy(F.linear(x, w).to(torch.bfloat16), y)


def log_softmax_wrong_dim(x, w, y):
    return F.nll_loss(F.log_softmax(F.linear(x, w), dim=0), y)


def logits_from_input(logits, w, y):
    return F.cross_entropy(logits, y)


def batched_matmul(x, w, y):
    return F.cross_entropy(torch.bmm(x.view(1, N, D), w.t()[None])[0], y)


@pytest.mark.parametrize("fn, reason", [
    (k_dimensional, "k_dimensional_loss"),
    (probability_targets, "probability_target"),
    (accuracy_beside, "logits_used_elsewhere"),
    (log_probs_returned, "log_probs_used_elsewhere"),
    (scale_from_input, "non_constant_scale"),
    (scale_by_zero, "unsupported_scale"),
    (two_classes_per_row, "logits_used_elsewhere"),
    (activation_between, "unsupported_op"),
    (vocab_sliced, "vocab_dim_touched"),
    (downcast, "unsupported_cast"),
    (log_softmax_wrong_dim, "log_softmax_dim"),
    (batched_matmul, "unsupported_op"),
], ids=lambda v: getattr(v, "__name__", v))
def test_untouched(fn, reason):
    backend = capture(fn, *_inputs())
    assert [r.reason for r in backend.reports] == [reason]
    assert backend.after == backend.before
    assert cce_counters() == {f"skipped:{reason}": 1}


def test_consumers_without_a_head_are_not_sites():
    """logsumexp, gather and softmax sums of tensors that come from no classifier head
    (attention scores, an embedding lookup) are no sites: nothing is counted."""

    def not_a_head(x, w, y):
        scores = x.view(B, T, D) @ x.view(B, T, D).transpose(1, 2)
        mixed = (F.softmax(scores, -1) * scores).sum(-1)
        return scores.logsumexp(-1).sum() + mixed.sum() + x.gather(-1, y[:, None] % D).sum()

    backend = capture(not_a_head, *_inputs())
    assert backend.reports == []
    assert cce_counters() == {}


def test_logits_computed_in_another_graph():
    """A graph break between head and loss leaves the loss graph with logits as an input."""
    x, w, y = _inputs()
    backend = capture(logits_from_input, F.linear(x, w), w, y)
    assert [r.reason for r in backend.reports] == ["logits_are_graph_input"]


def test_disabled_pattern():
    backend = Capture(RewriteOptions(patterns={"linear", "cross_entropy"}))
    call_variant("softcapped", backend)
    assert [r.reason for r in backend.reports] == ["disabled:softcap"]
    assert cce_counters() == {"skipped:disabled:softcap": 1}


def test_internal_error_leaves_graph_unchanged(monkeypatch, caplog):
    """A bug in the pass costs the fusion, never the compilation."""
    from cce_inductor import rewrite

    def broken(*args):
        raise RuntimeError("injected")

    monkeypatch.setattr(rewrite, "_check_rows", broken)
    with caplog.at_level("WARNING", logger="cce_inductor"):
        backend = Capture()
        result = call_variant("shift_logits", backend)
    assert [r.reason for r in backend.reports] == ["internal_error"]
    assert backend.after == backend.before
    assert torch.isfinite(result)
    assert any("rewriting cross_entropy failed" in r.getMessage() for r in caplog.records)


def test_unknown_pattern_name():
    with pytest.raises(ValueError, match="unknown patterns"):
        RewriteOptions(patterns={"linear", "softmax"})


def test_log_says_why(caplog):
    with caplog.at_level("INFO", logger="cce_inductor"):
        capture(accuracy_beside, *_inputs())
        call_variant("softcapped", Capture())
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("cce_inductor")]
    assert any("left cross_entropy unchanged: logits_used_elsewhere" in m for m in messages), \
        messages
    assert any("rewrote cross_entropy" in m and "softcap 5.0" in m for m in messages), messages
