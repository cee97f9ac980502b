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


# --- Scaled logits and the RL / regularizer consumers (cce_inductor.patterns) -----------------
TEMPERATURE = 0.7
Z_LOSS = 1e-4
ENTROPY_COEF = 0.01


def advantages(target):
    """Fixed per-position weights in [-1, 1] for the RL-style losses (a graph constant)."""
    return torch.linspace(-1.0, 1.0, target.numel()).view(target.shape)


def scaled_logits(input, linear_weight, target, linear_bias=None, weight=None):
    """Cohere's `logits * logit_scale` (a float attribute, which Dynamo bakes in)."""
    return F.cross_entropy(F.linear(input, linear_weight, linear_bias) * 0.0625, target)


def divided_logits(input, linear_weight, target, linear_bias=None, weight=None):
    """Granite's `logits / logits_scaling`, after an upcast."""
    return F.cross_entropy(F.linear(input, linear_weight, linear_bias).float() / 8.0, target)


def z_loss(input, linear_weight, target, linear_bias=None, weight=None):
    """PaLM / OLMo: cross-entropy plus a z-loss on the same logits."""
    logits = F.linear(input, linear_weight, linear_bias)
    return F.cross_entropy(logits, target) + Z_LOSS * torch.logsumexp(logits, -1).square().mean()


def log_probs_gather(input, linear_weight, target, linear_bias=None, weight=None):
    """TRL / verl: gather(log_softmax(logits / T), ids), weighted by advantages."""
    logits = F.linear(input.view(B, T, D), linear_weight, linear_bias) / TEMPERATURE
    ids = target.view(B, T)
    log_probs = torch.gather(logits.log_softmax(-1), -1, ids.unsqueeze(-1)).squeeze(-1)
    return (log_probs * advantages(ids)).sum()


def gather_minus_logsumexp(input, linear_weight, target, linear_bias=None, weight=None):
    """TRL's selective_log_softmax for fp32: the target logit minus the log-sum-exp, with
    the log-sum-exp taken row by row (Dynamo unrolls the loop)."""
    logits = F.linear(input.view(B, T, D), linear_weight, linear_bias)
    ids = target.view(B, T)
    selected = torch.gather(logits, -1, ids.unsqueeze(-1)).squeeze(-1)
    lse = torch.stack([torch.logsumexp(row, dim=-1) for row in logits])
    return ((selected - lse) * advantages(ids)).sum()


def entropy_softmax(input, linear_weight, target, linear_bias=None, weight=None):
    """-(softmax * log_softmax).sum(-1): the entropy alone (no target)."""
    logits = F.linear(input, linear_weight, linear_bias)
    entropy = -(F.softmax(logits, dim=-1) * F.log_softmax(logits, dim=-1)).sum(-1)
    return entropy.mean()


def rl_log_probs_entropy(input, linear_weight, target, linear_bias=None, weight=None):
    """(logp * adv).sum() + c * entropy.sum() with a softcap and a temperature, the entropy as
    TRL writes it (exp of the log-probabilities): one fused call serves both."""
    logits = F.linear(input, linear_weight, linear_bias)
    logits = torch.tanh(logits / SOFTCAP) * SOFTCAP / TEMPERATURE
    log_p = logits.log_softmax(-1)
    log_probs = log_p.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    return (log_probs * advantages(target)).sum() + ENTROPY_COEF * entropy.sum()


def verl_entropy(input, linear_weight, target, linear_bias=None, weight=None):
    """verl's entropy_from_logits: logsumexp(z) - (softmax(z) * z).sum(-1)."""
    logits = F.linear(input, linear_weight, linear_bias).float()
    probabilities = F.softmax(logits, dim=-1)
    entropy = torch.logsumexp(logits, dim=-1) - torch.sum(probabilities * logits, dim=-1)
    return entropy.mean()


def ce_z_loss_entropy(input, linear_weight, target, linear_bias=None, weight=None):
    """Three consumers of one head, from one fused call: cross-entropy, z-loss, entropy."""
    logits = F.linear(input, linear_weight, linear_bias)
    log_p = F.log_softmax(logits, dim=-1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    return (F.cross_entropy(logits, target) + Z_LOSS * logits.logsumexp(-1).square().mean()
            - ENTROPY_COEF * entropy.mean())


VARIANTS: dict[str, Callable[..., torch.Tensor]] = {
    fn.__name__: fn for fn in (
        linear_ce, matmul_t, torch_matmul_T, matmul_unembedding, view_flatten, shift_logits,
        hf_label_shift, upcast_to, softcapped, loss_module, unreduced, log_softmax_nll,
        unbatched, torch_linear_cross_entropy, scaled_logits, divided_logits, z_loss,
        log_probs_gather, gather_minus_logsumexp, entropy_softmax, rl_log_probs_entropy,
        verl_entropy, ce_z_loss_entropy,
    )
}
# Variants whose consumers are rewritten, by count (the others: 1).
CONSUMERS = {"z_loss": 2, "gather_minus_logsumexp": 1 + B, "rl_log_probs_entropy": 2,
             "verl_entropy": 2, "ce_z_loss_entropy": 3}
# Variants whose code casts to float32 (only meaningful, and only checkable against a float64
# run of the same code, for 16-bit inputs).
UPCASTING = {"hf_label_shift", "upcast_to", "divided_logits", "verl_entropy"}
# Variants that use linear_bias / class weights when given.
WITH_BIAS = {"linear_ce", "view_flatten", "shift_logits", "hf_label_shift", "upcast_to",
             "softcapped", "loss_module", "unreduced", "log_softmax_nll", "unbatched",
             "torch_linear_cross_entropy", "scaled_logits", "divided_logits", "z_loss",
             "log_probs_gather", "gather_minus_logsumexp", "entropy_softmax",
             "rl_log_probs_entropy", "verl_entropy", "ce_z_loss_entropy"}
# Variants whose targets are token ids for a gather (no ignore_index: every one a class).
GATHERING = {"log_probs_gather", "gather_minus_logsumexp", "rl_log_probs_entropy"}
WITH_CLASS_WEIGHT = {"linear_ce", "upcast_to", "loss_module", "log_softmax_nll",
                     "torch_linear_cross_entropy"}


def variant_inputs(name: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> dict:
    """Inputs in the form of tests/reference.py's make_inputs, with targets the variant
    accepts (loss_module ignores class 3, the others -100)."""
    inputs = reference.make_inputs(
        N, V, D, dtype, bias=name in WITH_BIAS, class_weight=name in WITH_CLASS_WEIGHT,
        ignored="none" if name in GATHERING else "some",
        ignore_index=3 if name == "loss_module" else -100, seed=seed,
    )
    if name == "unbatched":
        inputs["target"][-1] = 7  # its only row: not ignored
    return inputs
