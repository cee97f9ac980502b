"""Hugging Face Trainer with the cce backend: `model.compile(backend="cce")` before building
the Trainer (README, "Hugging Face Trainer, TRL, Lightning").

`TrainingArguments(torch_compile=True, torch_compile_backend="cce")` does not work: accelerate
checks the backend name against its own list of Dynamo backends and raises "'CCE' is not a
valid DynamoBackend". Compiling the model in place first does: the Trainer then calls the
compiled module like any other. A few optimizer steps of a tiny Llama (from a config, no
download) on CPU give the same losses and parameters as the same steps under the inductor
backend, with the loss site rewritten. Needs the `test` extra (accelerate, which the Trainer
requires).
"""

from __future__ import annotations

import pytest
import torch

from support import cce_counters

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

pytestmark = pytest.mark.usefixtures("fresh_dynamo")

VOCAB, SEQ, ROWS, STEPS = 128, 8, 12, 3


def train(backend: str, output_dir: str) -> tuple[list[float], dict[str, torch.Tensor]]:
    """The logged per-step losses and the final parameters of STEPS Trainer steps."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1,
    )
    model = transformers.LlamaForCausalLM(config)
    model.compile(backend=backend)  # in place, before the Trainer sees the model
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (ROWS, SEQ), generator=gen)
    data = [{"input_ids": row, "labels": row.clone()} for row in ids]
    args = transformers.TrainingArguments(
        output_dir=output_dir, max_steps=STEPS, per_device_train_batch_size=4, logging_steps=1,
        learning_rate=1e-3, seed=0, data_seed=0, use_cpu=True, report_to=[],
        save_strategy="no", dataloader_num_workers=0, disable_tqdm=True,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return losses, {name: p.detach().clone() for name, p in model.named_parameters()}


def test_trainer_steps_match_inductor(tmp_path):
    expected_losses, expected_params = train("inductor", str(tmp_path / "inductor"))
    assert cce_counters() == {}
    losses, params = train("cce", str(tmp_path / "cce"))
    assert cce_counters() == {"rewritten": 1}
    assert len(losses) == STEPS
    # float32 throughout: the fused loss only reorders float32 rounding (the logged losses
    # are Python floats of the step's loss).
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(expected_losses))
    torch.testing.assert_close(params, expected_params)
