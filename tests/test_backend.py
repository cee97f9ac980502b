"""torch.compile(backend="cce"): numerics of every rewrite variant against eager, the backend's
options (torch.compile's mode= and options=, the cce.* options, drop_logits, filter_eps), the
entry point, and recompilation under varying sequence lengths.

Numerics follow tests/reference.py: the compiled loss and gradients may be off the float64 run
of the same code by at most a small multiple of eager torch's own error in the same dtype.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import zlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import reference
from cce_inductor import compat, filter_stats
from cce_inductor.backend import cce_backend, make_cce_backend
from support import CONSUMERS, UPCASTING, VARIANTS, cce_counters, variant_inputs

pytestmark = pytest.mark.usefixtures("fresh_dynamo")


# Every variant in float32, where the tolerance is a few ulps (catching any inexact rewrite), except
# those whose code upcasts to float32: a float64 run of them rounds to float32, so they are only
# checkable with 16-bit inputs. bfloat16 for the variants whose dtype handling differs (loss cast
# back to bf16, upcasts, softcap before the upcast, options), within the CI time budget.
BF16_VARIANTS = ("linear_ce", "hf_label_shift", "upcast_to", "softcapped", "loss_module",
                 "divided_logits", "verl_entropy", "rl_log_probs_entropy", "ce_z_loss_entropy")
NUMERICS_CASES = [
    pytest.param(name, dtype, id=f"{name}-{dtype}", marks=[pytest.mark.skipif(
        name == "torch_linear_cross_entropy" and not compat.HAS_TORCH_LINEAR_CROSS_ENTROPY,
        reason=compat.NO_TORCH_LINEAR_CROSS_ENTROPY)])
    for name, dtype in (
        *((name, torch.float32) for name in VARIANTS if name not in UPCASTING),
        *((name, torch.bfloat16) for name in BF16_VARIANTS),
    )
]


@pytest.mark.parametrize("name, dtype", NUMERICS_CASES)
def test_variant_matches_eager(name, dtype):
    fn = VARIANTS[name]
    inputs = variant_inputs(name, seed=zlib.crc32(f"{name}{dtype}".encode()))
    compiled = torch.compile(fn, backend="cce", fullgraph=True)
    ours = reference.loss_and_grads(compiled, inputs, dtype)
    assert cce_counters() == {"rewritten": CONSUMERS.get(name, 1)}
    eager = reference.loss_and_grads(fn, inputs, dtype)
    assert ours["loss"].dtype == eager["loss"].dtype
    assert {k: v.dtype for k, v in ours.items()} == {k: v.dtype for k, v in eager.items()}
    reference.assert_close_to_reference(
        ours, eager, lambda: reference.loss_and_grads(fn, inputs, torch.float32),
        reference.loss_and_grads(fn, inputs, torch.float64), dtype,
    )


def test_autocast_matches_eager():
    """Under CPU autocast the fused op gets the bf16 casts of the fp32 leaves, as autocast's
    linear does; gradients come back to the fp32 leaves."""

    def autocast_ce(input, linear_weight, target, linear_bias=None, weight=None):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = F.linear(input, linear_weight, linear_bias)
        return F.cross_entropy(logits.float(), target)

    inputs = variant_inputs("linear_ce", torch.bfloat16, seed=1)  # bf16-exact fp32 leaves
    ours = reference.loss_and_grads(torch.compile(autocast_ce, backend="cce"), inputs,
                                    torch.float32)
    assert cce_counters() == {"rewritten": 1}
    eager = reference.loss_and_grads(autocast_ce, inputs, torch.float32)
    assert {k: v.dtype for k, v in ours.items()} == {k: v.dtype for k, v in eager.items()}
    exact = reference.loss_and_grads(reference.torch_linear_cross_entropy, inputs, torch.float64)
    reference.assert_close_to_reference(
        ours, eager, lambda: reference.loss_and_grads(autocast_ce, inputs, torch.float32),
        exact, torch.bfloat16,
    )


# --- A tiny causal LM in the Hugging Face style (loss and logits returned) --------------------

VOCAB, HIDDEN = 96, 32


class TinyCausalLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.lm_head = nn.Linear(HIDDEN, VOCAB, bias=False)

    def forward(self, ids: torch.Tensor, labels: torch.Tensor):
        logits = self.lm_head(self.embed(ids))
        labels = F.pad(labels, (0, 1), value=-100)[..., 1:]
        loss = F.cross_entropy(logits.float().view(-1, VOCAB), labels.reshape(-1))
        return loss, logits


def _step(model: nn.Module, ids: torch.Tensor, run=None) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Loss, logits and parameter gradients of one step of `run` (default: the model itself)."""
    model.zero_grad()
    loss, logits = (model if run is None else run)(ids, ids)
    loss.backward()
    return loss.detach(), logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_logits_kept_by_default():
    model = TinyCausalLM()
    ids = torch.randint(0, VOCAB, (2, 8))
    loss, logits, grads = _step(model, ids)
    compiled = torch.compile(model, backend="cce")
    compiled_loss, compiled_logits, compiled_grads = _step(model, ids, compiled)
    assert cce_counters() == {"rewritten": 1}
    torch.testing.assert_close(compiled_loss, loss)
    torch.testing.assert_close(compiled_logits, logits)
    torch.testing.assert_close(compiled_grads, grads)


def test_drop_logits():
    model = TinyCausalLM()
    ids = torch.randint(0, VOCAB, (2, 8))
    loss, _, grads = _step(model, ids)
    compiled = torch.compile(model, backend=make_cce_backend(drop_logits=True))
    compiled_loss, compiled_logits, compiled_grads = _step(model, ids, compiled)
    assert cce_counters() == {"rewritten": 1}
    # An empty [B, T, 0] stand-in: batch dims kept, no vocabulary entries, no gradient.
    assert compiled_logits.shape == (2, 8, 0) and compiled_logits.dtype == torch.float32
    assert not model(ids, ids)[1].shape == compiled_logits.shape
    with pytest.raises(IndexError):
        compiled_logits[0, -1, 0]
    torch.testing.assert_close(compiled_loss, loss)
    torch.testing.assert_close(compiled_grads, grads)


def test_drop_logits_through_options():
    model = TinyCausalLM()
    ids = torch.randint(0, VOCAB, (2, 8))
    _, logits = torch.compile(model, backend="cce", options={"cce.drop_logits": True})(ids, ids)
    assert logits.shape == (2, 8, 0)


def test_varying_sequence_length_recompiles_like_inductor():
    """Same number of graphs as backend="inductor" (one static, then one dynamic in T) and
    correct results at every length."""
    model = TinyCausalLM()
    lengths = (8, 12, 16)
    graphs = {}
    for backend in ("inductor", "cce"):
        torch._dynamo.reset()
        compat.dynamo_counters().clear()
        compiled = torch.compile(model, backend=backend)
        for length in lengths:
            ids = torch.randint(0, VOCAB, (2, length))
            expected_loss, _, expected_grads = _step(model, ids)
            loss, _, grads = _step(model, ids, compiled)
            torch.testing.assert_close(loss, expected_loss)
            torch.testing.assert_close(grads, expected_grads)
        graphs[backend] = compat.dynamo_counters()["stats"]["unique_graphs"]
    assert cce_counters() == {"rewritten": graphs["cce"]}
    assert graphs["cce"] == graphs["inductor"] == 2


# --- Options ----------------------------------------------------------------------------------


def _record_config_patches(monkeypatch) -> list[dict]:
    """Replace Inductor's compile_fx by one that records its config patches and runs eagerly."""
    import torch._inductor.compile_fx as compile_fx_module

    seen = []

    def fake_compile_fx(gm, example_inputs, config_patches=None, **kwargs):
        seen.append(dict(config_patches or {}))
        return gm.forward

    monkeypatch.setattr(compile_fx_module, "compile_fx", fake_compile_fx)
    return seen


def _linear_ce(x, w, y):
    return F.cross_entropy(F.linear(x, w), y)


ARGS = (torch.randn(8, 16), torch.randn(32, 16), torch.randint(0, 32, (8,)))


def test_mode_reaches_inductor(monkeypatch):
    seen = _record_config_patches(monkeypatch)
    torch.compile(_linear_ce, backend="cce", mode="max-autotune-no-cudagraphs")(*ARGS)
    assert seen == [torch._inductor.list_mode_options("max-autotune-no-cudagraphs")]
    assert cce_counters() == {"rewritten": 1}


def test_options_reach_inductor(monkeypatch):
    seen = _record_config_patches(monkeypatch)
    options = {"epilogue_fusion": False, "cce.filter_eps": None}
    torch.compile(_linear_ce, backend=cce_backend, options=options)(*ARGS)
    assert seen == [{"epilogue_fusion": False}]


def test_bad_options_are_refused():
    with pytest.raises(Exception, match="Unexpected optimization option"):
        torch.compile(_linear_ce, backend="cce", options={"no_such_option": 1})(*ARGS)
    torch._dynamo.reset()
    with pytest.raises(Exception, match="unknown cce options"):
        torch.compile(_linear_ce, backend="cce", options={"cce.no_such_option": 1})(*ARGS)
    with pytest.raises(ValueError, match="filter_eps"):
        make_cce_backend(filter_eps=-1.0)
    with pytest.raises(ValueError, match="filter_grads"):
        make_cce_backend(filter_grads="classifier")


@pytest.mark.parametrize("filter_eps, filtered", [("auto", True), (None, False)])
def test_filter_eps(filter_eps, filtered):
    """'auto' filters the bf16 backward (tiles are counted), None does not filter at all."""
    gen = torch.Generator().manual_seed(0)
    # Few peaked rows with targets in one 128-class block: most blocks hold only p < 2**-12.
    x = torch.randn(4, 16, generator=gen).bfloat16().requires_grad_()
    w = (torch.randn(2048, 16, generator=gen) * 3).bfloat16().requires_grad_()
    y = torch.randint(0, 100, (4,), generator=gen)
    compiled = torch.compile(_linear_ce, backend=make_cce_backend(filter_eps=filter_eps))
    # On the CPU the scalar loss's gradients are computed in its forward: count both.
    with filter_stats.collect() as stats:
        compiled(x, w, y).backward()
    assert (stats.total > 0) == filtered
    assert (stats.skipped > 0) == filtered


def test_filter_grads_input():
    """options={"cce.filter_grads": "input"}: the classifier's gradient sums every tile (bitwise
    the unfiltered one), the input's is filtered (bitwise that of filter_grads='all')."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 16, generator=gen).bfloat16()
    w = (torch.randn(2048, 16, generator=gen) * 3).bfloat16()
    y = torch.randint(0, 100, (4,), generator=gen)

    def grads(**options):
        torch._dynamo.reset()
        leaves = [x.clone().requires_grad_(), w.clone().requires_grad_()]
        with filter_stats.collect() as stats:
            torch.compile(_linear_ce, backend="cce", options=options)(*leaves, y).backward()
        return [leaf.grad for leaf in leaves], stats

    (input_only, stats), (everywhere, _), (unfiltered, _) = (
        grads(**{"cce.filter_grads": "input"}), grads(), grads(**{"cce.filter_eps": None}))
    assert stats.skipped > 0
    assert torch.equal(input_only[1], unfiltered[1])
    assert torch.equal(input_only[0], everywhere[0])
    assert not torch.equal(everywhere[1], unfiltered[1])


def test_entry_point_in_fresh_process():
    """backend="cce" works right after installation, without importing cce_inductor."""
    script = textwrap.dedent("""
        import sys, torch, torch.nn.functional as F
        assert "cce_inductor" not in sys.modules
        import torch._inductor.compile_fx as inductor  # Inductor is tested elsewhere: skip codegen
        inductor.compile_fx = lambda gm, example_inputs, **kwargs: gm.forward
        f = torch.compile(lambda x, w, y: F.cross_entropy(F.linear(x, w), y), backend="cce")
        x, w = torch.randn(8, 16, requires_grad=True), torch.randn(32, 16)
        y = torch.randint(0, 32, (8,))
        loss = f(x, w, y)
        loss.backward()
        torch.testing.assert_close(loss, F.cross_entropy(F.linear(x, w), y))
        print(dict(torch._dynamo.utils.counters["cce"]))
    """)
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "{'rewritten': 1}"
