"""Tile configurations of the CCE templates: the config types, the table mechanics and the
logit tile every kernel shares.

Each kernel family's module (`lowering.forward`, `lowering.backward`) holds its own tables,
beside its grid and lowering. A table lists configs per input width (16-bit or fp32) and GPU
generation; its first config is the default (used without max-autotune) and max-autotune
benchmarks the whole list. Every shipped config is compiled for sm_80 and sm_90a at the
presets' shapes by `python -m cce_inductor.tools.gpu_readiness`, which checks registers,
spills, shared memory and the CTAs per SM a config declares.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterator, Optional, Union

import torch

from cce_inductor.ops import TILE_MAX_COLS, TILE_MAX_ROWS

ARCHS = (80, 90)  # Ampere (sm_80) and Hopper (sm_90a)
SIXTEEN_BIT, FLOAT32 = "16-bit", "fp32"  # input widths: bf16 / fp16, and fp32
WIDTHS = (SIXTEEN_BIT, FLOAT32)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LogitTile:
    """The blocking of every logit computation, one per input width and arch (LOGIT_TILES):
    the forward and the backward's dz kernel compute each logit with the same `cce_logits`
    call on the same tile, so they round it identically (where the forward's softmax is exactly
    one-hot, dz is exactly 0); the forward's tile_max blocks line up with the dz kernel's
    tiles; the gradient kernel steps through dz tile by tile. So the kernels' configs vary only
    what leaves the arithmetic alone: pipeline stages, vocabulary splits, program order, the
    gradient kernel's output width and warps."""
    block_n: int  # rows of E per tile, a multiple of TILE_MAX_ROWS
    block_v: int  # classes per tile: TILE_MAX_COLS
    block_d: int  # step along D of the logit matmul
    num_warps: int

    def __post_init__(self) -> None:
        if self.block_v != TILE_MAX_COLS or self.block_n % TILE_MAX_ROWS:
            raise ValueError(f"{self}: tiles are {TILE_MAX_COLS} classes wide and a multiple "
                             f"of {TILE_MAX_ROWS} rows high (the tile_max blocks)")

    def kwargs(self) -> dict[str, int]:
        return {"BLOCK_N": self.block_n, "BLOCK_V": self.block_v, "BLOCK_D": self.block_d,
                "num_warps": self.num_warps}

    def name(self) -> str:
        return f"{self.block_n}x{self.block_v}x{self.block_d}_w{self.num_warps}"


@dataclasses.dataclass(frozen=True, kw_only=True)
class ForwardConfig:
    num_stages: int
    waves: int  # split the vocabulary for at most waves x (CTA slots) programs (0: never split)
    ctas_per_sm: int  # CTAs resident per SM, which the grid plans with (checked ahead of time)
    group_rows: int  # row blocks per program group (L2 reuse of E rows and C tiles)

    def kwargs(self) -> dict[str, int]:
        return {"num_stages": self.num_stages, "WAVES": self.waves,
                "CTAS_PER_SM": self.ctas_per_sm, "GROUP_ROWS": self.group_rows}

    def name(self) -> str:
        return f"s{self.num_stages}_waves{self.waves}_ctas{self.ctas_per_sm}_g{self.group_rows}"


@dataclasses.dataclass(frozen=True, kw_only=True)
class DzConfig:
    num_stages: int
    ctas_per_sm: int
    group_rows: int

    def kwargs(self) -> dict[str, int]:
        return {"num_stages": self.num_stages, "CTAS_PER_SM": self.ctas_per_sm,
                "GROUP_ROWS": self.group_rows}

    def name(self) -> str:
        return f"s{self.num_stages}_ctas{self.ctas_per_sm}_g{self.group_rows}"


@dataclasses.dataclass(frozen=True, kw_only=True)
class GradsConfig:
    """The gradient kernel reduces in steps of the logit tile (BLOCK_N rows of dz for dC,
    BLOCK_V classes for dE); each program owns BLOCK_DO columns of D of its output tile. Its
    num_warps is its own (no logit is computed there)."""
    block_do: int
    num_warps: int
    num_stages: int
    ctas_per_sm: int

    def kwargs(self) -> dict[str, int]:
        return {"BLOCK_DO": self.block_do, "num_warps": self.num_warps,
                "num_stages": self.num_stages, "CTAS_PER_SM": self.ctas_per_sm}

    def name(self) -> str:
        return f"do{self.block_do}_w{self.num_warps}_s{self.num_stages}_ctas{self.ctas_per_sm}"


@dataclasses.dataclass(frozen=True, kw_only=True)
class CombineConfig:
    """The forward combine: BLOCK_N rows per program, BLOCK_S vocabulary splits per step."""
    block_n: int
    block_s: int
    num_warps: int
    ctas_per_sm: int = 8  # a few floats per row: register-light, many CTAs fit

    def kwargs(self) -> dict[str, int]:
        return {"BLOCK_N": self.block_n, "BLOCK_S": self.block_s, "num_warps": self.num_warps,
                "num_stages": 1}

    def name(self) -> str:
        return f"{self.block_n}x{self.block_s}_w{self.num_warps}"


Config = Union[LogitTile, ForwardConfig, DzConfig, GradsConfig, CombineConfig]


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


# The logit tile of each input width and arch. 16-bit: tensor-core tiles (mma.sync on sm_80,
# two CTAs per SM; wgmma on sm_90a, one). fp32: FMA (or TF32) tiles, fewer rows to stay within
# registers; 8 warps on sm_90a, where ptxas holds the 4-warp tile to 128 registers and spills.
LOGIT_TILES = ConfigTable(
    Row(widths=(SIXTEEN_BIT,), archs=(80,), configs=(
        LogitTile(block_n=64, block_v=128, block_d=64, num_warps=4),)),
    Row(widths=(SIXTEEN_BIT,), archs=(90,), configs=(
        LogitTile(block_n=128, block_v=128, block_d=64, num_warps=8),)),
    Row(widths=(FLOAT32,), archs=(80,), configs=(
        LogitTile(block_n=32, block_v=128, block_d=32, num_warps=4),)),
    Row(widths=(FLOAT32,), archs=(90,), configs=(
        LogitTile(block_n=32, block_v=128, block_d=32, num_warps=8),)),
)

_forced: dict[str, tuple[Config, ...]] = {}
_forced_tile: list[LogitTile] = []


def select(kernel: str, table: ConfigTable, dtype: torch.dtype, arch: int,
           all_configs: bool) -> list[Config]:
    """The default config of `kernel`, or with `all_configs` (max-autotune) every config to
    benchmark; configs forced for the kernel name replace the table's."""
    shipped = _forced.get(kernel) or table.shipped(width_of(dtype), arch)
    return list(shipped) if all_configs else [shipped[0]]


def logit_tile(dtype: torch.dtype, arch: int) -> LogitTile:
    """The logit tile of every kernel for this dtype and arch (the forced one, if any)."""
    return _forced_tile[-1] if _forced_tile else LOGIT_TILES.shipped(width_of(dtype), arch)[0]


@contextlib.contextmanager
def forced(tile: Optional[LogitTile] = None,
           **per_kernel: Union[Config, tuple[Config, ...]]) -> Iterator[None]:
    """Lower with this logit tile and these configs (kernel name -> config, or a tuple of
    configs standing for the kernel's shipped list: its first is the default); used to render
    every shipped config for the GPU-readiness check and by tests."""
    previous = dict(_forced)
    _forced.update({kernel: cfg if isinstance(cfg, tuple) else (cfg,)
                    for kernel, cfg in per_kernel.items()})
    if tile is not None:
        _forced_tile.append(tile)
    try:
        yield
    finally:
        _forced.clear()
        _forced.update(previous)
        if tile is not None:
            _forced_tile.pop()
