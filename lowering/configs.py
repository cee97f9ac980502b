"""Tile configurations of the CCE templates: the config types and the table mechanics.

Each kernel family's module (`lowering.forward`, `lowering.backward`) holds its own tables,
beside its grid and lowering. A table lists configs per input width (16-bit or fp32) and GPU
generation; its first config is the default (used without max-autotune) and max-autotune
benchmarks the whole list. Every shipped config is compiled for sm_80 and sm_90a by
`python -m cce_inductor.tools.gpu_readiness`, which checks it for register spills and shared
memory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from typing import Iterator, Union

import torch

ARCHS = (80, 90)  # Ampere (sm_80) and Hopper (sm_90a)
SIXTEEN_BIT, FLOAT32 = "16-bit", "fp32"  # input widths: bf16 / fp16, and fp32
WIDTHS = (SIXTEEN_BIT, FLOAT32)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TileConfig:
    block_n: int  # rows of E per tile
    block_v: int  # vocabulary rows of C per tile
    block_d: int  # hidden-dimension step of the logit matmul
    num_warps: int
    num_stages: int
    block_do: int = 0  # deterministic backward: width of the owned gradient tile along D
    waves: int = 0  # forward: aim at waves x SMs programs by splitting the vocabulary (0: never)

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
        """BLOCK_NxBLOCK_VxBLOCK_D[xBLOCK_DO]_w<num_warps>_s<num_stages>[_waves<waves>], as the
        GPU-readiness table shows it and the config tables are written (`tiles`)."""
        do = f"x{self.block_do}" if self.block_do else ""
        waves = f"_waves{self.waves}" if self.waves else ""
        return (f"{self.block_n}x{self.block_v}x{self.block_d}{do}"
                f"_w{self.num_warps}_s{self.num_stages}{waves}")


_TILE_NAME = re.compile(
    r"(?P<block_n>\d+)x(?P<block_v>\d+)x(?P<block_d>\d+)(?:x(?P<block_do>\d+))?"
    r"_w(?P<num_warps>\d+)_s(?P<num_stages>\d+)(?:_waves(?P<waves>\d+))?"
)


def tiles(*names: str) -> tuple[TileConfig, ...]:
    """The tile configs of these names (see TileConfig.name), in order."""
    configs = []
    for name in names:
        match = _TILE_NAME.fullmatch(name)
        if match is None:
            raise ValueError(f"not a tile config name: {name!r}")
        configs.append(TileConfig(**{key: int(value) for key, value in match.groupdict().items()
                                     if value is not None}))
    return tuple(configs)


@dataclasses.dataclass(frozen=True, kw_only=True)
class CombineConfig:
    """The forward combine: BLOCK_N rows per program, BLOCK_S vocabulary splits per step."""
    block_n: int
    block_s: int
    num_warps: int

    def kwargs(self) -> dict[str, int]:
        return {"BLOCK_N": self.block_n, "BLOCK_S": self.block_s, "num_warps": self.num_warps,
                "num_stages": 1}

    def name(self) -> str:
        return f"{self.block_n}x{self.block_s}_w{self.num_warps}"


Config = Union[TileConfig, CombineConfig]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Row:
    """The configs (default first) of the input widths and archs named: identical rows of
    several widths or archs are written once."""
    widths: tuple[str, ...] = WIDTHS
    archs: tuple[int, ...] = ARCHS
    configs: tuple[Config, ...]


class ConfigTable:
    """One kernel's configs per (input width, arch); every pair is served by exactly one row."""

    def __init__(self, *rows: Row) -> None:
        self._configs: dict[tuple[str, int], tuple[Config, ...]] = {}
        for row in rows:
            if not row.configs:
                raise ValueError(f"a config row without configs: {row}")
            for key in ((width, arch) for width in row.widths for arch in row.archs):
                if key in self._configs:
                    raise ValueError(f"two rows serve {key}")
                self._configs[key] = row.configs
        missing = {(w, a) for w in WIDTHS for a in ARCHS} - set(self._configs)
        if missing:
            raise ValueError(f"no row serves {sorted(missing)}")

    def shipped(self, width: str, arch: int) -> tuple[Config, ...]:
        return self._configs[(width, arch)]


def width_of(dtype: torch.dtype) -> str:
    return SIXTEEN_BIT if dtype in (torch.float16, torch.bfloat16) else FLOAT32


def arch_of(device: torch.device) -> int:
    """The config family of a device: 90 for Hopper and newer, else 80 (also the interpreter)."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9:
        return 90
    return 80


_forced: dict[str, tuple[Config, ...]] = {}


def select(kernel: str, table: ConfigTable, dtype: torch.dtype, arch: int,
           all_configs: bool) -> list[Config]:
    """The default config of `kernel`, or with `all_configs` (max-autotune) every config to
    benchmark; configs forced for the kernel name replace the table's."""
    shipped = _forced.get(kernel) or table.shipped(width_of(dtype), arch)
    return list(shipped) if all_configs else [shipped[0]]


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
