"""Tile configurations of the CCE templates, per kernel, input dtype and GPU generation.

The first config of each list is the default (used without max-autotune); max-autotune
benchmarks the whole list. Every shipped config is compiled for sm_80 and sm_90a by
`cce_inductor.tools.gpu_readiness`, which checks it for register spills and shared memory.

The forward splits the vocabulary when there are too few row blocks to fill the GPU: its
config's `waves` asks for about waves x (SM count) programs, see `vocab_splits`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any, Callable, Iterator, Union

import torch

FORWARD = "forward"  # partial row statistics per (row block, vocabulary split)
FORWARD_COMBINE = "forward_combine"  # merges the vocabulary splits' partial statistics
BACKWARD = "backward"  # one program per (row block, vocab block) tile, atomic accumulation
BACKWARD_OWNED = "backward_owned"  # deterministic: each program owns an output tile
KERNELS = (FORWARD, FORWARD_COMBINE, BACKWARD, BACKWARD_OWNED)
ARCHS = (80, 90)  # Ampere (sm_80) and Hopper (sm_90a)
# The interpreter has no SMs; a small count lets tiny test shapes split the vocabulary as
# realistic shapes do on a GPU.
INTERPRETER_SM_COUNT = 4


@dataclasses.dataclass(frozen=True)
class TileConfig:
    block_n: int  # rows of E per tile
    block_v: int  # vocabulary rows of C per tile
    block_d: int  # hidden-dimension step of the logit matmul
    num_warps: int
    num_stages: int
    block_do: int = 0  # BACKWARD_OWNED: width of the owned gradient tile along D
    waves: int = 0  # FORWARD: aim at waves x SMs programs by splitting the vocabulary (0: never)

    def kwargs(self) -> dict[str, int]:
        """Template constexprs and launch options."""
        kw = {"BLOCK_N": self.block_n, "BLOCK_V": self.block_v, "BLOCK_D": self.block_d,
              "num_warps": self.num_warps, "num_stages": self.num_stages}
        if self.block_do:
            kw["BLOCK_DO"] = self.block_do
        if self.waves:
            kw["WAVES"] = self.waves
        return kw

    def name(self) -> str:
        do = f"x{self.block_do}" if self.block_do else ""
        waves = f"_waves{self.waves}" if self.waves else ""
        return (f"{self.block_n}x{self.block_v}x{self.block_d}{do}"
                f"_w{self.num_warps}_s{self.num_stages}{waves}")


@dataclasses.dataclass(frozen=True)
class CombineConfig:
    """FORWARD_COMBINE: BLOCK_N rows per program, BLOCK_S vocabulary splits per step."""
    block_n: int
    block_s: int
    num_warps: int

    def kwargs(self) -> dict[str, int]:
        return {"BLOCK_N": self.block_n, "BLOCK_S": self.block_s, "num_warps": self.num_warps,
                "num_stages": 1}

    def name(self) -> str:
        return f"{self.block_n}x{self.block_s}_w{self.num_warps}"


Config = Union[TileConfig, CombineConfig]


def vocab_splits(n: Any, v: Any, block_n: int, block_v: int, programs: int, *,
                 cdiv: Callable, min: Callable, max: Callable) -> Any:
    """How many vocabulary ranges the forward splits into: enough for about `programs` programs
    over the cdiv(N, BLOCK_N) row blocks, at most one per vocabulary tile, 1 when the row blocks
    alone are that many (or programs is 0). Works on ints and on sympy sizes (the grid and the
    partial-statistics buffer of dynamic shapes): cdiv/min/max are passed in for that."""
    if programs <= 0:
        return 1
    row_blocks = max(1, cdiv(n, block_n))
    return max(1, min(cdiv(programs, row_blocks), cdiv(v, block_v)))


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of `device` (INTERPRETER_SM_COUNT for the CPU interpreter)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return INTERPRETER_SM_COUNT


_C = TileConfig
_F = functools.partial(TileConfig, waves=2)  # forward: split to about two waves of programs
# The combine reads a few floats per row and split: any small tile does.
_COMBINE = (CombineConfig(128, 8, 4),)
# (kernel, is 16-bit input, arch) -> configs, default first.
_TABLE: dict[tuple[str, bool, int], tuple[Config, ...]] = {
    (FORWARD, True, 80): (_F(64, 128, 64, 4, 3), _F(128, 128, 32, 8, 3), _F(64, 256, 32, 8, 3),
                          _F(128, 64, 64, 4, 3), _F(32, 128, 64, 4, 4),
                          _C(64, 128, 64, 4, 3, waves=4), _C(64, 128, 64, 4, 3)),
    (FORWARD, True, 90): (_F(128, 128, 64, 8, 3), _F(64, 128, 64, 4, 3), _F(128, 256, 64, 8, 3),
                          _F(64, 256, 64, 8, 3), _C(128, 128, 64, 8, 3, waves=4),
                          _C(128, 128, 64, 8, 3)),
    (FORWARD, False, 80): (_F(64, 64, 32, 4, 3), _F(64, 128, 32, 4, 3), _F(128, 64, 32, 8, 3),
                           _C(64, 64, 32, 4, 3)),
    (FORWARD, False, 90): (_F(64, 64, 32, 4, 3), _F(64, 128, 32, 4, 3), _F(128, 64, 32, 8, 3),
                           _C(64, 64, 32, 4, 3)),
    (FORWARD_COMBINE, True, 80): _COMBINE,
    (FORWARD_COMBINE, True, 90): _COMBINE,
    (FORWARD_COMBINE, False, 80): _COMBINE,
    (FORWARD_COMBINE, False, 90): _COMBINE,
    (BACKWARD, True, 80): (_C(64, 128, 64, 8, 3), _C(128, 128, 32, 8, 3), _C(64, 64, 64, 4, 3),
                           _C(128, 64, 64, 8, 3)),
    (BACKWARD, True, 90): (_C(128, 128, 64, 8, 3), _C(64, 128, 64, 8, 3), _C(128, 64, 64, 8, 3)),
    (BACKWARD, False, 80): (_C(32, 64, 32, 4, 3), _C(32, 32, 32, 4, 3)),
    # 8 warps: with 4, the 32x64x32 tile spills 8 bytes on sm_90a.
    (BACKWARD, False, 90): (_C(32, 64, 32, 8, 3), _C(32, 32, 32, 4, 3)),
    (BACKWARD_OWNED, True, 80): (_C(64, 64, 64, 4, 3, 128), _C(64, 128, 64, 8, 3, 128)),
    (BACKWARD_OWNED, True, 90): (_C(64, 64, 64, 4, 3, 128), _C(128, 64, 64, 8, 3, 128)),
    (BACKWARD_OWNED, False, 80): (_C(32, 64, 32, 4, 3, 32),),
    (BACKWARD_OWNED, False, 90): (_C(32, 64, 32, 4, 3, 32),),
}


def arch_of(device: torch.device) -> int:
    """The config family of a device: 90 for Hopper and newer, else 80 (also the interpreter)."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9:
        return 90
    return 80


_forced: dict[str, tuple[Config, ...]] = {}


def tile_configs(kernel: str, dtype: torch.dtype, arch: int, all_configs: bool) -> list[Config]:
    """The default config, or with `all_configs` (max-autotune) every config to benchmark."""
    table = _forced.get(kernel) or _TABLE[(kernel, dtype in (torch.float16, torch.bfloat16), arch)]
    return list(table) if all_configs else [table[0]]


@contextlib.contextmanager
def forced(**per_kernel: Union[Config, tuple[Config, ...]]) -> Iterator[None]:
    """Lower with these configs (kernel name -> config, or a tuple of configs standing for the
    kernel's shipped list: its first is the default); used to render every shipped config for
    the GPU-readiness check and by tests."""
    previous = dict(_forced)
    _forced.update({kernel: cfg if isinstance(cfg, tuple) else (cfg,)
                    for kernel, cfg in per_kernel.items()})
    try:
        yield
    finally:
        _forced.clear()
        _forced.update(previous)


def shipped_configs() -> dict[tuple[str, bool, int], tuple[Config, ...]]:
    """Every config that can be launched, keyed by (kernel, 16-bit input, arch)."""
    return dict(_TABLE)
