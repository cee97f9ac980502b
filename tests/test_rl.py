"""The RL head on CPU: `linear_log_probs` (log-probabilities, entropy, temperature, softcap) and
`linear_cross_entropy(logit_scale=)` against float64, the gradient filter's bound with entropy
gradients, and GRPO- and PPO-style losses under torch.compile(backend="cce") against eager.

Numerics follow tests/reference.py: values and the gradients of the RL objective
`(log_probs * adv).sum() + c * entropy.sum()` may be off float64 by at most a small multiple of
torch's own error in the same dtype (the materialized head written as TRL and verl write it).
"""

from __future__ import annotations

import functools
import math
import zlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cce_inductor
import reference
from cce_inductor import blocked
from support import cce_counters

pytestmark = pytest.mark.usefixtures("single_threaded")

# V and D are multiples of no block size; N spans several small token blocks.
N, V, D = 42, 1031, 24


@pytest.fixture
def small_blocks(monkeypatch):
    """Several row chunks and gradient vocabulary blocks, ragged last ones, at test sizes."""
    monkeypatch.setattr(blocked, "chunk_rows", lambda n, vocab, hidden, dtype: 16)
    monkeypatch.setattr(blocked, "VOCAB_BLOCK", 256)


def _ours(input, linear_weight, target, *, linear_bias=None, **options):
    return cce_inductor.linear_log_probs(input, linear_weight, target, linear_bias=linear_bias,
                                         return_entropy=True, **options)


def check_log_probs(inputs, dtype, **options):
    return reference.check_log_probs_against_reference(_ours, inputs, dtype, **options)


CASES = {
    "plain": (dict(), dict()),
    "temperature": (dict(), dict(temperature=0.7)),
    "softcap_temperature": (dict(), dict(softcap=5.0, temperature=1.3)),
    "bias_temperature": (dict(bias=True), dict(temperature=0.6)),
    "ignore_index": (dict(ignored="some"), dict(temperature=0.9)),
    "other_ignore_index": (dict(ignored="some", ignore_index=5), dict(ignore_index=5)),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_log_probs_and_entropy_match_reference(small_blocks, dtype, case):
    """Filtering is 'auto': on for bf16 (with the entropy term in its bound), off for fp32."""
    input_options, options = CASES[case]
    inputs = reference.make_inputs(N, V, D, dtype, seed=zlib.crc32(f"{case}{dtype}".encode()),
                                   **input_options)
    check_log_probs(inputs, dtype, **options)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_leading_dims(small_blocks, dtype):
    inputs = reference.make_inputs(N, V, D, dtype, bias=True, ignored="some", seed=5)
    inputs["input"] = inputs["input"].view(2, 3, 7, D)
    inputs["target"] = inputs["target"].view(2, 3, 7)
    check_log_probs(inputs, dtype, temperature=0.8, softcap=4.0)


def test_ignored_positions_are_zero_with_no_gradient(small_blocks):
    inputs = reference.make_inputs(N, V, D, torch.float32, ignored="all", seed=6)
    input = inputs["input"].requires_grad_()
    log_probs, entropy = _ours(input, inputs["linear_weight"], inputs["target"])
    assert torch.equal(log_probs, torch.zeros(N))
    log_probs.sum().backward()
    assert torch.equal(input.grad, torch.zeros_like(input))
    assert (entropy > 0).all()  # computed at every position


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cross_entropy_logit_scale(small_blocks, dtype):
    """linear_cross_entropy(logit_scale=s) is cross_entropy(s * softcap(linear(x)))."""

    def scaled(input, linear_weight, target, *, linear_bias=None, weight=None, **options):
        logits = reference.softcapped_logits(input, linear_weight, linear_bias, 3.0) * 1.7
        return F.cross_entropy(logits, target, **options)

    inputs = reference.make_inputs(N, V, D, dtype, bias=True, ignored="some", seed=8)
    ours = functools.partial(cce_inductor.linear_cross_entropy, softcap=3.0, logit_scale=1.7)
    reference.check_against_reference(ours, inputs, dtype, reference=scaled,
                                      label_smoothing=0.1)


# --- The filter's bound with entropy gradients ------------------------------------------------


ROWS, COLUMNS, ROW_BLOCK = 64, 4096, 16


def _peaked_tiles():
    """Logits of a trained-looking model: every target column (all in the first column block)
    far above the rest, and the other column blocks shifted from -6 to 2, so that their largest
    softmax values span eps / 30 to eps. The RL objective's row gradients: grad_lse = -adv,
    grad_target_logit = adv, grad_entropy = c."""
    gen = torch.Generator().manual_seed(0)
    shift = torch.linspace(-6.0, 2.0, COLUMNS // blocked.FILTER_BLOCK, dtype=torch.float64)
    logits = torch.randn(ROWS, COLUMNS, generator=gen, dtype=torch.float64) \
        + shift.repeat_interleave(blocked.FILTER_BLOCK)
    target = torch.randint(0, blocked.FILTER_BLOCK, (ROWS,), generator=gen)
    logits[torch.arange(ROWS), target] += 16.0
    advantages = torch.randn(ROWS, generator=gen, dtype=torch.float64)
    return logits, target, -advantages, advantages, torch.full((ROWS,), 0.5, dtype=torch.float64)


def _exact_dz(logits, target, grad_lse, grad_target_logit, grad_entropy):
    log_p = logits.log_softmax(-1)
    p = log_p.exp()
    entropy = -(p * log_p).sum(-1)
    dz = p * (grad_lse[:, None] - grad_entropy[:, None] * (log_p + entropy[:, None]))
    dz[torch.arange(len(target)), target] += grad_target_logit
    return dz, p, entropy


def _tiles(values: torch.Tensor) -> torch.Tensor:
    """[row blocks, ROW_BLOCK, column blocks, FILTER_BLOCK] view of a [ROWS, COLUMNS] tensor."""
    return values.view(ROWS // ROW_BLOCK, ROW_BLOCK, -1, blocked.FILTER_BLOCK)


def _skipped_tiles(p, negligible):
    """Which (ROW_BLOCK rows x FILTER_BLOCK columns) tiles the blocked backward's rule skips:
    every row negligible (by `negligible(p_max)` on each row's largest p in the block) and no
    row's target in it (column block 0 holds them all)."""
    p_max = _tiles(p).amax(3).reshape(ROWS, -1)
    skipped = negligible(p_max).view(ROWS // ROW_BLOCK, ROW_BLOCK, -1).all(1)
    skipped[:, 0] = False
    return skipped


def test_filter_bound_never_skips_a_block_that_matters():
    """Every entry of a tile the filter skips is below filter_eps relative to its row's
    gradient scale r = max(|grad_lse|, |grad_target_logit|, |grad_entropy|), computed exactly
    in float64. The same data make the cross-entropy rule p < eps (which ignores the entropy
    term) skip tiles whose entries are not negligible: the check can fail. The bound still
    skips some tiles."""
    logits, target, grad_lse, grad_target_logit, grad_entropy = _peaked_tiles()
    dz, p, entropy = _exact_dz(logits, target, grad_lse, grad_target_logit, grad_entropy)
    eps = 2.0**-12
    scale = torch.stack([grad_lse.abs(), grad_target_logit.abs(), grad_entropy.abs()]).amax(0)
    largest_relative = _tiles(dz.abs() / scale[:, None]).amax(dim=(1, 3))  # per tile

    ours = _skipped_tiles(p, lambda p_max: blocked.negligible_rows(
        p_max, eps, grad_lse, grad_target_logit, grad_entropy, entropy))
    assert (largest_relative[ours] < eps).all(), largest_relative[ours].max()
    assert ours.float().mean() > 0.1, ours.float().mean()

    cross_entropy_rule = _skipped_tiles(p, lambda p_max: p_max < eps)
    assert (largest_relative[cross_entropy_rule] >= eps).sum() >= 10


def test_filter_bound_reduces_to_the_cross_entropy_rule():
    """Without entropy gradients the bound is the paper's rule p < eps for rows with a
    gradient; rows without one (ignored) never need a block."""
    logits, target, grad_lse, grad_target_logit, _ = _peaked_tiles()
    p = logits.softmax(-1)
    p_max = p.view(ROWS, -1, blocked.FILTER_BLOCK).amax(2)
    eps = 2.0**-12
    ours = blocked.negligible_rows(p_max, eps, grad_lse, grad_target_logit, None, None)
    assert torch.equal(ours, p_max < eps)
    grad_lse[:5] = grad_target_logit[:5] = 0.0
    ours = blocked.negligible_rows(p_max, eps, grad_lse, grad_target_logit, None, None)
    assert ours[:5].all()


def test_filtered_entropy_gradient_through_the_backward(small_blocks):
    """The blocked backward with filtering on (bf16, peaked softmax, every target in the first
    vocabulary tile) skips tiles and keeps the RL objective's gradients within the tolerance
    rule."""
    from cce_inductor import filter_stats

    gen = torch.Generator().manual_seed(2)
    d = 64  # wide enough that other classifier rows lie far from the target's
    weight = torch.randn(V, d, generator=gen) / math.sqrt(d)
    target = torch.randint(0, 64, (N,), generator=gen)
    hidden = 3.0 * math.sqrt(d) * weight[target] + 0.5 * torch.randn(N, d, generator=gen)
    inputs = {"input": hidden.to(torch.bfloat16), "linear_weight": weight.to(torch.bfloat16),
              "linear_bias": None, "weight": None, "target": target}
    with filter_stats.collect() as stats:
        check_log_probs(inputs, torch.bfloat16, temperature=0.8)
    assert 0 < stats.skipped < stats.total, (stats.skipped, stats.total)


# --- GRPO and PPO losses under backend="cce" --------------------------------------------------
# Written from the public descriptions of TRL's GRPOTrainer and verl's PPO actor (own code).

PROMPT, COMPLETION, GROUP, VOCAB, HIDDEN = 3, 5, 4, 97, 16
TEMPERATURE = 0.7


class TinyPolicy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.mix = nn.Linear(HIDDEN, HIDDEN)
        self.lm_head = nn.Linear(HIDDEN, VOCAB, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm_head(torch.tanh(self.mix(self.embed(ids))))


def grpo_loss(model, ids, mask, advantages, ref_log_probs, beta=0.04, epsilon=0.2):
    """GRPO (TRL's description): per-token log-probs of the completion under logits / T, a
    clipped importance ratio against the detached log-probs, a k3 KL term against a reference
    policy, averaged per sequence over the completion mask."""
    logits = model(ids)[:, PROMPT - 1:-1, :] / TEMPERATURE
    completion = ids[:, PROMPT:]
    log_probs = torch.gather(logits.log_softmax(-1), -1, completion.unsqueeze(-1)).squeeze(-1)
    ratio = torch.exp(log_probs - log_probs.detach())
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + epsilon)
    per_token = -torch.min(ratio * advantages[:, None], clipped * advantages[:, None])
    delta = ref_log_probs - log_probs
    per_token = per_token + beta * (torch.exp(delta) - delta - 1)
    return ((per_token * mask).sum(-1) / mask.sum(-1)).mean()


def ppo_loss(model, ids, mask, advantages, old_log_probs, clip=0.2, entropy_coef=0.01):
    """PPO (verl's actor, as documented): log-probs and entropy from the same logits / T
    (entropy as logsumexp - sum(softmax * logits)), dual-side clipped policy loss, masked means,
    minus the entropy bonus."""
    logits = model(ids)[:, PROMPT - 1:-1, :].float() / TEMPERATURE
    responses = ids[:, PROMPT:]
    log_probs = torch.gather(F.log_softmax(logits, dim=-1), -1,
                             responses.unsqueeze(-1)).squeeze(-1)
    probabilities = F.softmax(logits, dim=-1)
    entropy = torch.logsumexp(logits, dim=-1) - torch.sum(probabilities * logits, dim=-1)
    ratio = torch.exp(log_probs - old_log_probs)
    losses = torch.maximum(-advantages * ratio,
                           -advantages * torch.clamp(ratio, 1 - clip, 1 + clip))

    def masked_mean(values):
        return (values * mask).sum() / mask.sum()

    return masked_mean(losses) - entropy_coef * masked_mean(entropy)


def _rollout():
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, VOCAB, (GROUP, PROMPT + COMPLETION), generator=gen)
    mask = torch.ones(GROUP, COMPLETION)
    mask[0, -2:] = 0  # a completion that ended early
    rewards = torch.randn(GROUP, generator=gen)
    advantages = (rewards - rewards.mean()) / rewards.std()
    return ids, mask, advantages, gen


def _step(model, loss_fn, *args):
    model.zero_grad(set_to_none=True)
    loss = loss_fn(model, *args)
    loss.backward()
    return {"loss": loss.detach(), **{n: p.grad.clone() for n, p in model.named_parameters()}}


@pytest.mark.parametrize("algorithm", ["grpo", "ppo"])
def test_rl_loss_under_cce_backend_matches_eager(algorithm, fresh_dynamo):
    torch.manual_seed(0)
    model = TinyPolicy()
    ids, mask, advantages, gen = _rollout()
    # The reference policy's (GRPO) or the behaviour policy's (PPO) log-probs.
    other_log_probs = -4.0 - torch.rand(GROUP, COMPLETION, generator=gen)
    if algorithm == "grpo":
        loss_fn = grpo_loss  # advantages per sequence
    else:
        loss_fn, advantages = ppo_loss, advantages[:, None].expand(GROUP, COMPLETION)
    expected = _step(model, loss_fn, ids, mask, advantages, other_log_probs)
    compiled = torch.compile(loss_fn, backend="cce")
    got = _step(model, compiled, ids, mask, advantages, other_log_probs)
    # GRPO: one consumer (the log-probs); PPO: log-probs, logsumexp and the softmax sum.
    assert cce_counters() == {"rewritten": 1 if algorithm == "grpo" else 3}
    torch.testing.assert_close(got, expected)
