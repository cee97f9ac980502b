"""A tiny GPT-style causal LM with built-in text, shared by cce-demo and cce-dump.

The model is written the way Hugging Face writes its `*ForCausalLM` heads (lm_head -> logits
upcast with `.float()` -> labels shifted with `pad(labels, (0, 1), value=-100)[..., 1:]` ->
`F.cross_entropy`), so the graph pass sees the pattern it meets in real models. The vocabulary
is much larger than the text needs (as a real tokenizer's long tail is): with a hidden size of
128 the `[tokens, vocab]` logits dominate the memory of a training step, as in an LLM.
"""

from __future__ import annotations

import dataclasses
import re

import torch
import torch.nn.functional as F
from torch import Tensor, nn

TEXT = """\
The lighthouse keeper climbed the stairs every evening at dusk. There were one hundred and
twelve of them, worn smooth in the middle by a century of boots, and she counted them aloud
because her grandfather had counted them aloud. At the top she trimmed the wick, wiped the salt
from the great lens, and watched the beam swing out across the water to find the ships that
needed it.

A compiler is a patient translator. It reads a program written for people and rewrites it for a
machine, and the best compilers notice what the author did not say: that a value computed twice
can be computed once, that a loop over a large table can be cut into tiles that fit in fast
memory, that a result nobody reads need never be written at all.

In the valley the river changes its mind every spring. The farmers move their fences and the
ferry moves its landing, and the children learn the new shallows by wading into them. Nobody
draws a map of the river, because by the time the ink is dry the water has gone somewhere else.

The baker starts before the sun. Flour, water, salt and a little of yesterday's dough go into
the bowl, and time does the rest. She says bread cannot be hurried, only waited for, and that
the waiting is most of the work. By the time the town wakes, the shelves are full and warm.

Large language models end with a single enormous layer: every position scores every word of the
vocabulary, and the scores become a probability for the next word. Most of those scores are
tiny and matter very little, yet a plain implementation writes all of them to memory, reads
them back, and writes their gradients too. Cutting that table out of memory is the point of
this demonstration.
"""

PAD_ID = 0


@dataclasses.dataclass(frozen=True)
class ToyLMConfig:
    vocab_size: int = 32768
    hidden: int = 128
    layers: int = 2
    heads: int = 4
    max_seq_len: int = 128


class WordTokenizer:
    """Lower-cased words and punctuation of a text, numbered by first appearance (0 is padding)."""

    def __init__(self, text: str = TEXT) -> None:
        self.words: list[str] = ["<pad>"]
        self.ids: dict[str, int] = {}
        for word in self.split(text):
            if word not in self.ids:
                self.ids[word] = len(self.words)
                self.words.append(word)

    @staticmethod
    def split(text: str) -> list[str]:
        return re.findall(r"[a-z0-9']+|[^\sa-z0-9']", text.lower())

    def encode(self, text: str) -> list[int]:
        return [self.ids[word] for word in self.split(text)]

    def decode(self, ids: list[int]) -> str:
        return " ".join(self.words[i] if i < len(self.words) else f"<{i}>" for i in ids)


class Block(nn.Module):
    def __init__(self, config: ToyLMConfig) -> None:
        super().__init__()
        self.heads = config.heads
        self.norm1 = nn.LayerNorm(config.hidden)
        self.qkv = nn.Linear(config.hidden, 3 * config.hidden)
        self.proj = nn.Linear(config.hidden, config.hidden)
        self.norm2 = nn.LayerNorm(config.hidden)
        self.mlp = nn.Sequential(
            nn.Linear(config.hidden, 4 * config.hidden),
            nn.GELU(),
            nn.Linear(4 * config.hidden, config.hidden),
        )

    def forward(self, x: Tensor) -> Tensor:
        batch, seq, hidden = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(hidden, dim=-1)
        q, k, v = (t.view(batch, seq, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        attention = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attention.transpose(1, 2).reshape(batch, seq, hidden))
        return x + self.mlp(self.norm2(x))


class ToyCausalLM(nn.Module):
    """`forward(input_ids, labels)` returns the mean next-token loss, as HF models do."""

    def __init__(self, config: ToyLMConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden)
        self.position = nn.Embedding(config.max_seq_len, config.hidden)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.layers))
        self.norm = nn.LayerNorm(config.hidden)
        self.lm_head = nn.Linear(config.hidden, config.vocab_size, bias=False)

    def forward(self, input_ids: Tensor, labels: Tensor) -> Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.embed(input_ids) + self.position(positions)
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.norm(x)).float()
        shift_labels = F.pad(labels, (0, 1), value=-100)[..., 1:]
        return F.cross_entropy(
            logits.view(-1, logits.shape[-1]), shift_labels.reshape(-1), ignore_index=-100
        )


def build_model(config: ToyLMConfig, seed: int, device: str = "cpu") -> ToyCausalLM:
    """The same seed gives the same weights, so runs under different backends are comparable."""
    torch.manual_seed(seed)
    return ToyCausalLM(config).to(device)


def batches(
    tokenizer: WordTokenizer, batch_size: int, seq_len: int, steps: int, seed: int
) -> list[tuple[Tensor, Tensor]]:
    """`steps` batches of random windows of the text (input_ids and labels are the same tensor,
    HF style: the model shifts the labels)."""
    stream = torch.tensor(tokenizer.encode(TEXT))
    generator = torch.Generator().manual_seed(seed)
    result = []
    for _ in range(steps):
        starts = torch.randint(0, len(stream) - seq_len, (batch_size,), generator=generator)
        ids = torch.stack([stream[s : s + seq_len] for s in starts.tolist()])
        result.append((ids, ids.clone()))
    return result
