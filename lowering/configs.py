"""Tile configurations of the CCE templates, per kernel, input dtype and GPU generation.

The first config of each list is the default (used without max-autotune); max-autotune
benchmarks the whole list. Every shipped config is compiled for sm_80 and sm_90a by
`cce_inductor.lowering.gpu_readiness`, which checks it for register spills and shared memory.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterator

import torch

FORWARD = "forward"
BACKWARD = "backward"  # one program per (row block, vocab block) tile, atomic accumulation
BACKWARD_OWNED = "backward_owned"  # deterministic: each program owns an output tile
KERNELS = (FORWARD, BACKWARD, BACKWARD_OWNED)
ARCHS = (80, 90)  # Ampere (sm_80) and Hopper (sm_90a)


@dataclasses.dataclass(frozen=True)
class TileConfig:
    block_n: int  # rows of E per tile
    block_v: int  # vocabulary rows of C per tile
    block_d: int  # hidden-dimension step of the logit matmul
    num_warps: int
    num_stages: int
    block_do: int = 0  # BACKWARD_OWNED: width of the owned gradient tile along D

    def kwargs(self) -> dict[str, int]:
        """Template constexprs and launch options."""
        kw = {"BLOCK_N": self.block_n, "BLOCK_V": self.block_v, "BLOCK_D": self.block_d,
              "num_warps": self.num_warps, "num_stages": self.num_stages}
        if self.block_do:
            kw["BLOCK_DO"] = self.block_do
        return kw

    def name(self) -> str:
        do = f"x{self.block_do}" if self.block_do else ""
        return (f"{self.block_n}x{self.block_v}x{self.block_d}{do}"
                f"_w{self.num_warps}_s{self.num_stages}")


_C = TileConfig
# (kernel, is 16-bit input, arch) -> configs, default first.
_TABLE: dict[tuple[str, bool, int], tuple[TileConfig, ...]] = {
    (FORWARD, True, 80): (_C(64, 128, 64, 4, 3), _C(128, 128, 32, 8, 3), _C(64, 256, 32, 8, 3),
                          _C(128, 64, 64, 4, 3), _C(32, 128, 64, 4, 4)),
    (FORWARD, True, 90): (_C(128, 128, 64, 8, 3), _C(64, 128, 64, 4, 3), _C(128, 256, 64, 8, 3),
                          _C(64, 256, 64, 8, 3)),
    (FORWARD, False, 80): (_C(64, 64, 32, 4, 3), _C(64, 128, 32, 4, 3), _C(128, 64, 32, 8, 3)),
    (FORWARD, False, 90): (_C(64, 64, 32, 4, 3), _C(64, 128, 32, 4, 3), _C(128, 64, 32, 8, 3)),
    (BACKWARD, True, 80): (_C(64, 128, 64, 8, 3), _C(128, 128, 32, 8, 3), _C(64, 64, 64, 4, 3),
                           _C(128, 64, 64, 8, 3)),
    (BACKWARD, True, 90): (_C(128, 128, 64, 8, 3), _C(64, 128, 64, 8, 3), _C(128, 64, 64, 8, 3)),
    (BACKWARD, False, 80): (_C(32, 64, 32, 4, 3), _C(32, 32, 32, 4, 3)),
    (BACKWARD, False, 90): (_C(32, 64, 32, 4, 3), _C(32, 32, 32, 4, 3)),
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


_forced: dict[str, TileConfig] = {}


def tile_configs(kernel: str, dtype: torch.dtype, arch: int, all_configs: bool) -> list[TileConfig]:
    """The default config, or with `all_configs` (max-autotune) every config to benchmark."""
    if kernel in _forced:
        return [_forced[kernel]]
    table = _TABLE[(kernel, dtype in (torch.float16, torch.bfloat16), arch)]
    return list(table) if all_configs else [table[0]]


@contextlib.contextmanager
def forced(**per_kernel: TileConfig) -> Iterator[None]:
    """Lower with exactly these configs (kernel name -> config); used to render every shipped
    config for the GPU-readiness check."""
    previous = dict(_forced)
    _forced.update(per_kernel)
    try:
        yield
    finally:
        _forced.clear()
        _forced.update(previous)


def shipped_configs() -> dict[tuple[str, bool, int], tuple[TileConfig, ...]]:
    """Every config that can be launched, keyed by (kernel, 16-bit input, arch)."""
    return dict(_TABLE)
