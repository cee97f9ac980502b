"""Helpers shared by test modules (their fixtures live in conftest.py): the cce counters, and
the `linear -> cross_entropy` variants the graph pass meets (tests/test_rewrite.py snapshots
their graphs, tests/test_backend.py checks their numerics)."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

import reference
from cce_inductor import compat


def fresh_dynamo_state() -> dict:
    """Drop Dynamo's compiled code and clear its process-wide counters (torch.compiler.reset()
    leaves those); returns the counters."""
    torch.compiler.reset()
    counters = compat.dynamo_counters()
    counters.clear()
    return counters


def cce_counters() -> dict[str, int]:
    """The graph pass's decisions since the counters were cleared."""
    return dict(compat.dynamo_counters()["cce"])


B, T, D, V = 2, 8, 32, 96
N = B * T
SOFTCAP = 5.0


# --- Variants: fn(input [N, D], linear_weight [V, D], target [N], linear_bias=, weight=) -------
# The calling convention of tests/reference.py; each spells `linear -> cross_entropy` one way.


def linear_ce(input, linear_weight, target, linear_bias=None, weight=None):
    return F.cross_entropy(F.linear(input, linear_weight, linear_bias), target, weight=weight)


def matmul_t(input, linear_weight, target, linear_bias=None, weight=None):
    return F.cross_entropy(input @ linear_weight.t(), target)


def torch_matmul_T(input, linear_weight, target, linear_bias=None, weight=None):
    return F.cross_entropy(torch.matmul(input, linear_weight.T), target)


def matmul_unembedding(input, linear_weight, target, linear_bias=None, weight=None):
    """x @ M with a [D, V] matrix that is not a transpose node of a [V, D] one."""
    unembedding = linear_weight.t().contiguous()
    return F.cross_entropy(input @ unembedding, target)


def view_flatten(input, linear_weight, target, linear_bias=None, weight=None):
    logits = F.linear(input.view(B, T, D), linear_weight, linear_bias).contiguous()
    return F.cross_entropy(logits.flatten(0, 1).reshape(-1, V), target)


def shift_logits(input, linear_weight, target, linear_bias=None, weight=None):
    """The classic causal-LM shift: logits[..., :-1, :] against labels[..., 1:]."""
    logits = F.linear(input.view(B, T, D), linear_weight, linear_bias)
    logits = logits[..., :-1, :].contiguous()
    labels = target.view(B, T)[..., 1:].contiguous()
    return F.cross_entropy(logits.view(-1, logits.size(-1)), labels.view(-1))


def hf_label_shift(input, linear_weight, target, linear_bias=None, weight=None):
    """transformers' ForCausalLMLoss: upcast, pad-shift the labels (not the logits)."""
    logits = F.linear(input.view(B, T, D), linear_weight, linear_bias).float()
    labels = F.pad(target.view(B, T), (0, 1), value=-100)[..., 1:].contiguous()
    return F.cross_entropy(logits.view(-1, V), labels.view(-1), ignore_index=-100)


def upcast_to(input, linear_weight, target, linear_bias=None, weight=None):
    logits = F.linear(input, linear_weight, linear_bias).to(torch.float32)
    return F.cross_entropy(logits, target, weight=weight.float() if weight is not None else None)


def softcapped(input, linear_weight, target, linear_bias=None, weight=None):
    logits = F.linear(input, linear_weight, linear_bias)
    logits = torch.tanh(logits / SOFTCAP) * SOFTCAP
    return F.cross_entropy(logits, target)


def loss_module(input, linear_weight, target, linear_bias=None, weight=None):
    """nn.CrossEntropyLoss with every option: inlined to F.cross_entropy by Dynamo."""
    criterion = nn.CrossEntropyLoss(
        weight=weight, ignore_index=3, reduction="sum", label_smoothing=0.1
    )
    return criterion(F.linear(input, linear_weight, linear_bias), target)


def unreduced(input, linear_weight, target, linear_bias=None, weight=None):
    return F.cross_entropy(
        F.linear(input, linear_weight, linear_bias), target, reduction="none", label_smoothing=0.2
    )


def log_softmax_nll(input, linear_weight, target, linear_bias=None, weight=None):
    log_probs = F.log_softmax(F.linear(input, linear_weight, linear_bias), dim=-1)
    return F.nll_loss(log_probs, target, weight=weight)


def unbatched(input, linear_weight, target, linear_bias=None, weight=None):
    """A 1-D loss input [V] with a scalar target (the last row only)."""
    return F.cross_entropy(F.linear(input[-1], linear_weight, linear_bias), target[-1])


def torch_linear_cross_entropy(input, linear_weight, target, linear_bias=None, weight=None):
    return F.linear_cross_entropy(
        input, linear_weight, target, linear_bias=linear_bias, weight=weight, label_smoothing=0.1
    )


VARIANTS: dict[str, Callable[..., torch.Tensor]] = {
    fn.__name__: fn for fn in (
        linear_ce, matmul_t, torch_matmul_T, matmul_unembedding, view_flatten, shift_logits,
        hf_label_shift, upcast_to, softcapped, loss_module, unreduced, log_softmax_nll,
        unbatched, torch_linear_cross_entropy,
    )
}
# Variants whose code casts to float32 (only meaningful, and only checkable against a float64
# run of the same code, for 16-bit inputs).
UPCASTING = {"hf_label_shift", "upcast_to"}
# Variants that use linear_bias / class weights when given.
WITH_BIAS = {"linear_ce", "view_flatten", "shift_logits", "hf_label_shift", "upcast_to",
             "softcapped", "loss_module", "unreduced", "log_softmax_nll", "unbatched",
             "torch_linear_cross_entropy"}
WITH_CLASS_WEIGHT = {"linear_ce", "upcast_to", "loss_module", "log_softmax_nll",
                     "torch_linear_cross_entropy"}


def variant_inputs(name: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> dict:
    """Inputs in the form of tests/reference.py's make_inputs, with targets the variant
    accepts (loss_module ignores class 3, the others -100)."""
    inputs = reference.make_inputs(
        N, V, D, dtype, bias=name in WITH_BIAS, class_weight=name in WITH_CLASS_WEIGHT,
        ignored="some", ignore_index=3 if name == "loss_module" else -100, seed=seed,
    )
    if name == "unbatched":
        inputs["target"][-1] = 7  # its only row: not ignored
    return inputs
