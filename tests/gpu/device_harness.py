"""The device the GPU tests run on: a CUDA GPU, or with CCE_GPU_TESTS_ON_CPU=1 the CPU under
Triton's interpreter at tiny shapes (see conftest.py). Imported by the conftest's fixture and
by the spawned ranks of the vocabulary-parallel test."""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Optional, TypeVar

import torch

from cce_inductor.lowering import common, configs, forward
from cce_inductor.tools.interpreter import triton_on_cpu

ON_CPU_SWITCH = "CCE_GPU_TESTS_ON_CPU"
T = TypeVar("T")
Inputs = dict[str, Optional[torch.Tensor]]


def on_cpu_requested() -> bool:
    return os.environ.get(ON_CPU_SWITCH, "0") not in ("", "0")


def unavailable_reason() -> Optional[str]:
    """Why the GPU tests cannot run here, or None."""
    if on_cpu_requested() or torch.cuda.is_available():
        return None
    build = ("a CPU-only build" if torch.version.cuda is None
             else f"built for CUDA {torch.version.cuda}")
    return (f"needs a CUDA GPU (torch {torch.__version__}, {build}, sees none); "
            f"{ON_CPU_SWITCH}=1 runs these tests on the CPU under Triton's interpreter")


@dataclasses.dataclass(frozen=True)
class Harness:
    device: torch.device

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"

    def pick(self, *, cpu: T, cuda: T) -> T:
        """A size (or anything else) for this device: tiny for the interpreter."""
        return cuda if self.on_gpu else cpu

    def to_device(self, inputs: Inputs) -> Inputs:
        return to_device(inputs, self.device)

    def default_forward_config(self, dtype: torch.dtype) -> configs.ForwardConfig:
        """The forward config the lowering picks without max-autotune."""
        return forward.FORWARD.configs_for(dtype, configs.arch_of(self.device), False)[0]

    def unsplit_rows(self, dtype: torch.dtype) -> int:
        """Rows enough that the default forward config does not split the vocabulary: more
        than half the row blocks its waves of CTA slots hold (forward.vocab_splits)."""
        config = self.default_forward_config(dtype)
        tile = configs.logit_tile(dtype, configs.arch_of(self.device))
        slots = config.waves * config.ctas_per_sm * common.sm_count(self.device)
        return (slots // 2 + 1) * tile.block_n


def to_device(inputs: Inputs, device: torch.device) -> Inputs:
    return {name: None if t is None else t.to(device) for name, t in inputs.items()}


def activate(device: torch.device) -> contextlib.AbstractContextManager:
    """What a test body (or a spawned rank) runs under: the interpreter for the CPU."""
    return triton_on_cpu(device.type == "cpu")


def harness_device() -> torch.device:
    return torch.device("cpu") if on_cpu_requested() else torch.device("cuda")
