"""Unmodified Hugging Face causal LMs under torch.compile(model, backend="cce").

Models are built from tiny configs (no downloads). For each, a training step
`model(input_ids, labels=labels).loss.backward()` must rewrite the loss site (counter) and match
eager's loss, logits and gradients; a few more checks cover `num_items_in_batch` (the gradient
accumulation keyword of transformers' loss), eval mode under no_grad and drop_logits. Varying
sequence lengths are tested in tests/test_backend.py on a model with the same loss code.
float32 throughout, so the comparison uses torch's default float32 tolerances (the fused loss
and Inductor's fusions only reorder float32 rounding).
"""

from __future__ import annotations

from typing import Callable

import pytest
import torch

from cce_inductor.backend import make_cce_backend
from support import cce_counters

pytestmark = pytest.mark.usefixtures("fresh_dynamo")

transformers = pytest.importorskip("transformers")

VOCAB, BATCH, SEQ = 128, 2, 8
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
              num_attention_heads=2, num_key_value_heads=1)

CONFIGS: dict[str, Callable[[], tuple[type, object]]] = {
    "llama": lambda: (transformers.LlamaForCausalLM, transformers.LlamaConfig(**COMMON)),
    # final_logit_softcapping=30 (the default): the softcap pattern inside a real model.
    "gemma2": lambda: (transformers.Gemma2ForCausalLM, transformers.Gemma2Config(
        **COMMON, head_dim=16, final_logit_softcapping=30.0)),
    "qwen2": lambda: (transformers.Qwen2ForCausalLM, transformers.Qwen2Config(**COMMON)),
    "mistral": lambda: (transformers.MistralForCausalLM, transformers.MistralConfig(**COMMON)),
    "phi3": lambda: (transformers.Phi3ForCausalLM, transformers.Phi3Config(
        **COMMON, pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    # `logits * logit_scale` (0.0625 by default): a constant scale between head and loss.
    "cohere": lambda: (transformers.CohereForCausalLM, transformers.CohereConfig(**COMMON)),
    # `logits / logits_scaling`; the default is 1, Granite 3.0 8B uses 8.
    "granite": lambda: (transformers.GraniteForCausalLM, transformers.GraniteConfig(
        **COMMON, logits_scaling=8.0)),
    # Cohere 2 scales like Cohere. (GraniteMoE, which divides like Granite, is not here: with
    # torch 2.11 + transformers 5.17 its experts break the Dynamo graph, so the loss's graph gets
    # the logits as an input and the site is skipped, `logits_are_graph_input`.)
    "cohere2": lambda: (transformers.Cohere2ForCausalLM, transformers.Cohere2Config(**COMMON)),
    # lm_head.weight is wte.weight (tie_word_embeddings defaults to True). No dropout, so eager
    # and compiled runs are deterministic. transformers finds no loss for the class name and
    # calls logger.warning_once between head and loss (see test_gpt2_logging_is_ours_only).
    "gpt2": lambda: (transformers.GPT2LMHeadModel, transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2, n_positions=64, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=2)),
}


def build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    cls, config = CONFIGS[name]()
    return cls(config)


def batch(seq: int = SEQ, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (BATCH, seq), generator=gen)
    labels = ids.clone()
    labels[:, :2] = -100  # a prompt that is not trained on
    return ids, labels


def step(model: torch.nn.Module, run: Callable, ids, labels, **kwargs) -> dict[str, torch.Tensor]:
    """Loss, logits and parameter gradients of one training step of `run` on `model`'s params."""
    model.zero_grad(set_to_none=True)
    out = run(ids, labels=labels, **kwargs)
    out.loss.backward()
    result = {"loss": out.loss.detach(), "logits": out.logits.detach()}
    result.update({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    return result


@pytest.mark.parametrize("name", CONFIGS)
def test_training_step_matches_eager(name):
    model = build(name)
    ids, labels = batch()
    expected = step(model, model, ids, labels)
    compiled = torch.compile(model, backend="cce")
    got = step(model, compiled, ids, labels)
    assert cce_counters() == {"rewritten": 1}
    assert got.keys() == expected.keys()
    torch.testing.assert_close(got, expected)
    if name == "gpt2":  # tied: the shared weight's gradient has both the head and embedding parts
        assert model.lm_head.weight is model.transformer.wte.weight


@pytest.mark.parametrize("name", ["llama", "gemma2"])
def test_num_items_in_batch(name):
    """Gradient accumulation: transformers sums the loss and divides by num_items_in_batch."""
    model = build(name)
    ids, labels = batch()
    num_items = torch.tensor(int((labels[:, 1:] != -100).sum()) * 3)
    expected = step(model, model, ids, labels, num_items_in_batch=num_items)
    got = step(model, torch.compile(model, backend="cce"), ids, labels,
               num_items_in_batch=num_items)
    assert cce_counters() == {"rewritten": 1}
    torch.testing.assert_close(got, expected)


def test_eval_no_grad():
    model = build("llama").eval()
    ids, labels = batch()
    compiled = torch.compile(model, backend="cce")
    with torch.no_grad():
        expected = model(ids, labels=labels)
        got = compiled(ids, labels=labels)
    assert cce_counters() == {"rewritten": 1}
    torch.testing.assert_close(got.loss, expected.loss)
    torch.testing.assert_close(got.logits, expected.logits)


def test_drop_logits():
    model = build("llama")
    ids, labels = batch()
    expected = step(model, model, ids, labels)
    model.zero_grad(set_to_none=True)
    out = torch.compile(model, backend=make_cce_backend(drop_logits=True))(ids, labels=labels)
    out.loss.backward()
    assert cce_counters() == {"rewritten": 1}
    assert out.logits.shape == (BATCH, SEQ, 0)
    torch.testing.assert_close(out.loss.detach(), expected["loss"])
    torch.testing.assert_close(
        {n: p.grad for n, p in model.named_parameters()},
        {n: g for n, g in expected.items() if n not in ("loss", "logits")},
    )


def test_gpt2_logging_is_ours_only():
    """Unmodified GPT2LMHeadModel logs (transformers' warning_once) between head and loss.
    Under backend="cce" Dynamo traces that call as a no-op (test_training_step_matches_eager:
    one graph, one rewrite); under any other backend, before and after, it still breaks the
    graph there: the loss graph then gets the logits as an input."""
    ids, labels = batch()
    reports = []

    def rewrite_only(gm, example_inputs):  # no Inductor: only the decision matters here
        from cce_inductor.rewrite import rewrite_linear_cross_entropy

        reports.extend(r.reason for r in rewrite_linear_cross_entropy(gm))
        return gm.forward

    for backend in (rewrite_only, "cce", rewrite_only):
        torch.compiler.reset()
        torch.compile(build("gpt2"), backend=backend)(ids, labels=labels)
    assert reports == ["logits_are_graph_input", "logits_are_graph_input"]
    assert cce_counters() == {"rewritten": 1, "skipped:logits_are_graph_input": 2}
