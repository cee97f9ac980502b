"""Problem shapes of the benchmark and the memory report: tokens N, vocabulary V, hidden D."""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass(frozen=True)
class Shape:
    n: int
    v: int
    d: int
    dtype: str  # a torch dtype name: "float32", "bfloat16", ...

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def describe(self) -> str:
        return f"N={self.n}, V={self.v}, D={self.d}, {self.dtype}"


PRESETS: dict[str, Shape] = {
    # Small enough for a few minutes on 2 CPU cores, large enough that logits (128 MB) dominate.
    "default": Shape(n=1024, v=32768, d=256, dtype="float32"),
    # The paper's Table 1 (Gemma 2 2B on an A100).
    "gemma2-2b": Shape(n=8192, v=256000, d=2304, dtype="bfloat16"),
    "llama3-8b": Shape(n=8192, v=128256, d=4096, dtype="bfloat16"),
    # Qwen 2.5 7B's head.
    "qwen2.5": Shape(n=8192, v=151936, d=3584, dtype="bfloat16"),
}

DTYPES = ("float32", "bfloat16", "float16")


def resolve(preset: str, n: int | None, v: int | None, d: int | None, dtype: str | None) -> Shape:
    """A preset with any of its sizes or dtype overridden."""
    base = PRESETS[preset]
    return Shape(
        n=n or base.n, v=v or base.v, d=d or base.d, dtype=dtype or base.dtype
    )
