"""The work the CCE kernels do at a preset on a named GPU: an estimate, from their own configs.

    cce-bench --preset gemma2-2b --work-model --gpu H100 [--kept-fraction 0.36]
    python -m cce_inductor.tools.work_model --preset gemma2-2b --gpu A100

Per kernel: launches, programs per launch (from the kernel's grid function and default config
for the GPU's arch), waves over the GPU's CTA slots (SMs x the config's CTAs per SM) and how
full the last one is, FLOPs, HBM bytes, and a time, for three designs: this backward (which is
also the deterministic one: it has no atomics), and the two backwards it replaced (main at
1a80b4e: the atomic default and the per-D-tile deterministic variant, their configs recorded in
MAIN below). The totals sit next to the floors: 6 N V D FLOPs (a forward and the two gradient
products, logits kept) and 8 N V D (the same plus one recomputation of the logits, CCE without
filtering).

The model, an estimate and nothing measured:
  * FLOPs: 2 N V D per logit computation and per gradient product, times the fraction of tiles
    that take part (kept: gradient products; recomputed: the backward's logits; the forward
    computes every tile);
  * HBM bytes: every input a launch reads is read once and every output written once
    (re-reads of operand tiles by other programs are assumed to hit L2, which the grouped
    program order is for); the atomic backward's fp32 read-modify-writes are L2 traffic,
    listed apart;
  * time per launch: max(FLOPs / peak dense tensor-core rate, bytes / HBM bandwidth), divided
    by the wave efficiency (programs / (slots x whole waves), all programs of a launch taken
    as equally long); kernels in sequence, no overlap between launches.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from typing import Optional

import torch
from tabulate import tabulate

from cce_inductor import ops
from cce_inductor.lowering import backward, configs, forward
from cce_inductor.tools.presets import DTYPES, PRESETS, Shape, resolve


@dataclasses.dataclass(frozen=True)
class Gpu:
    name: str
    arch: int  # the config family
    sms: int
    tensor_flops: float  # dense 16-bit tensor-core FLOP/s
    fp32_flops: float  # fp32 FMA FLOP/s (the templates' fp32 dot without TF32)
    hbm_bytes_per_s: float


# Datasheet peaks (SXM parts): A100 80 GB (108 SMs) and H100 80 GB (132, as the H200).
GPUS = {
    "A100": Gpu("A100 SXM", 80, 108, 312e12, 19.5e12, 2.04e12),
    "H100": Gpu("H100 SXM", 90, 132, 989e12, 67e12, 3.35e12),
}
# The kept-tile fraction measured on the demo LM's hidden states, which autotuning's inputs
# reproduce (see backward.KEPT_FRACTION); recomputed, there the same.
MEASURED_KEPT = backward.KEPT_FRACTION

# The backward this branch replaced (main at 1a80b4e), for comparison: its default configs,
# (block_n, block_v, block_d, num_warps) per (16-bit, arch), and the deterministic variant's
# output width along D. Its forward used the same tiles as configs of its own, split to about
# two waves of one CTA per SM.
MAIN = {
    "forward": {(True, 80): (64, 128, 64, 4), (True, 90): (128, 128, 64, 8),
                (False, 80): (64, 64, 32, 4), (False, 90): (64, 64, 32, 4)},
    "atomic": {(True, 80): (64, 128, 64, 8), (True, 90): (128, 128, 64, 8),
               (False, 80): (32, 64, 32, 4), (False, 90): (32, 64, 32, 8)},
    "owned": {(True, 80): (64, 64, 64, 4, 128), (True, 90): (64, 64, 64, 4, 128),
              (False, 80): (32, 64, 32, 4, 32), (False, 90): (32, 64, 32, 4, 32)},
}
MAIN_WAVES = 2


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _sixteen_bit(shape: Shape) -> bool:
    return configs.width_of(shape.torch_dtype) == configs.SIXTEEN_BIT


@dataclasses.dataclass(frozen=True)
class KernelWork:
    kernel: str
    launches: int
    programs: int  # per launch
    slots: int  # CTAs resident at once on the GPU
    flops: float  # all launches
    hbm_bytes: float  # all launches
    l2_atomic_bytes: float = 0.0

    @property
    def waves(self) -> float:
        return self.programs / self.slots

    @property
    def last_wave_fill(self) -> float:
        whole = math.ceil(self.waves)
        return self.waves - (whole - 1) if whole else 0.0

    def seconds(self, gpu: Gpu, tensor_cores: bool) -> float:
        rate = gpu.tensor_flops if tensor_cores else gpu.fp32_flops
        per_launch = max(self.flops / rate, self.hbm_bytes / gpu.hbm_bytes_per_s) / self.launches
        efficiency = self.waves / math.ceil(self.waves) if self.programs else 1.0
        return self.launches * per_launch / efficiency


@dataclasses.dataclass(frozen=True)
class Design:
    name: str
    kernels: list[KernelWork]
    logit_recomputations: float  # backward logit FLOPs / 2 N V D

    def flops(self) -> float:
        return sum(kernel.flops for kernel in self.kernels)

    def seconds(self, gpu: Gpu, tensor_cores: bool) -> float:
        return sum(kernel.seconds(gpu, tensor_cores) for kernel in self.kernels)


def ours(shape: Shape, gpu: Gpu, kept: float, recomputed: float) -> Design:
    """This branch's forward and backward, from their grid functions and default configs."""
    n, v, d, size = shape.n, shape.v, shape.d, shape.torch_dtype.itemsize
    dtype, arch = shape.torch_dtype, gpu.arch
    tile = configs.LOGIT_TILES.shipped(configs.width_of(dtype), arch)[0]
    nvd = 2.0 * n * v * d
    fwd, dz_cfg, grads_cfg, combine_cfg = (
        kernel.table.shipped(configs.width_of(dtype), arch)[0]
        for kernel in (forward.FORWARD, backward.BACKWARD_DZ, backward.BACKWARD_GRADS,
                       forward.FORWARD_COMBINE))
    meta = {**tile.kwargs(), **fwd.kwargs(), "SM_COUNT": gpu.sms}
    rows, splits, _ = forward.FORWARD.grid(n, v, d, meta, cdiv=_cdiv, min=min, max=max)
    tile_max = _cdiv(n, ops.TILE_MAX_ROWS) * _cdiv(v, ops.TILE_MAX_COLS) * 4
    logits = KernelWork("forward", 1, rows * splits, gpu.sms * fwd.ctas_per_sm, nvd,
                        (n + v) * d * size + tile_max + 16 * n * splits)
    combine = KernelWork("forward_combine", 1, _cdiv(n, combine_cfg.block_n),
                         gpu.sms * combine_cfg.ctas_per_sm, 0.0, 16 * n * splits)

    chunks = backward.chunk_count(n, v, d, size, tile.block_v)
    width = backward.chunk_width(v, chunks, tile.block_v, cdiv=_cdiv)
    needs = {"NEED_DE": True, "NEED_DC": True, "NEED_DBIAS": False}
    dz_meta = {**tile.kwargs(), **dz_cfg.kwargs()}
    dz_programs = backward.BACKWARD_DZ.grid(n, v, d, width, dz_meta, cdiv=_cdiv)[0]
    dz = KernelWork("backward_dz", chunks, dz_programs, gpu.sms * dz_cfg.ctas_per_sm,
                    nvd * recomputed,
                    chunks * n * d * size + v * d * size + kept * n * v * size + tile_max
                    + chunks * 16 * n)
    grads_meta = {"BLOCK_N": tile.block_n, "BLOCK_V": tile.block_v, **grads_cfg.kwargs(),
                  **needs}
    dc_programs, de_programs = backward.grads_programs(n, v, d, width, grads_meta, cdiv=_cdiv)
    accumulator = 2 * n * d * 4 * chunks if chunks > 1 else n * d * size
    grads = KernelWork("backward_grads", chunks, dc_programs + de_programs,
                       gpu.sms * grads_cfg.ctas_per_sm, 2 * nvd * kept,
                       2 * kept * n * v * size + chunks * kept * n * d * size
                       + 2 * v * d * size + accumulator)
    kernels = [logits, combine, dz, grads]
    if chunks > 1:
        kernels.append(KernelWork("dE cast", 1, _cdiv(n * d, 1024), gpu.sms * 8, 0.0,
                                  n * d * (4 + size)))
    return Design(f"this branch, default = deterministic ({chunks} chunks of {width})",
                  kernels, recomputed)


def _main_forward(shape: Shape, gpu: Gpu) -> list[KernelWork]:
    n, v, d, size = shape.n, shape.v, shape.d, shape.torch_dtype.itemsize
    block_n, block_v, _, _ = MAIN["forward"][(_sixteen_bit(shape), gpu.arch)]
    rows = _cdiv(n, block_n)
    splits = max(1, min(_cdiv(MAIN_WAVES * gpu.sms, rows), _cdiv(v, block_v)))
    return [KernelWork("forward", 1, rows * splits, gpu.sms, 2.0 * n * v * d,
                       (n + v) * d * size + 12 * n * splits),
            KernelWork("forward_combine", 1, _cdiv(n, 128), gpu.sms * 8, 0.0, 12 * n * splits)]


def main_atomic(shape: Shape, gpu: Gpu, kept: float) -> Design:
    """main's default backward: one program per tile, every tile recomputed, fp32 atomics."""
    n, v, d, size = shape.n, shape.v, shape.d, shape.torch_dtype.itemsize
    block_n, block_v, _, _ = MAIN["atomic"][(_sixteen_bit(shape), gpu.arch)]
    nvd = 2.0 * n * v * d
    rows, tiles = _cdiv(n, block_n), _cdiv(v, block_v)
    accumulators = (n + v) * d
    backward_kernel = KernelWork(
        "backward (atomic)", 1, rows * tiles, gpu.sms, nvd + 2 * nvd * kept,
        (n + v) * d * size + accumulators * 4 * 2,
        l2_atomic_bytes=kept * (tiles * n * d + rows * v * d) * 4)
    zero_and_cast = KernelWork("fp32 accumulators: zero, cast", 2, _cdiv(accumulators, 1024),
                               gpu.sms * 8, 0.0, accumulators * (4 + 4 + size))
    return Design("main 1a80b4e, default (atomic)",
                  _main_forward(shape, gpu) + [backward_kernel, zero_and_cast], 1.0)


def main_owned(shape: Shape, gpu: Gpu, kept: float) -> Design:
    """main's deterministic backward: programs own [rows or classes] x BLOCK_DO output tiles
    and recompute every logit tile once per output tile along D, in two launches."""
    n, v, d, size = shape.n, shape.v, shape.d, shape.torch_dtype.itemsize
    block_n, block_v, _, _, block_do = MAIN["owned"][(_sixteen_bit(shape), gpu.arch)]
    nvd = 2.0 * n * v * d
    d_tiles = _cdiv(d, block_do)
    inputs = (n + v) * d * size
    kernels = [
        KernelWork("backward dE (owned)", 1, _cdiv(n, block_n) * d_tiles, gpu.sms,
                   nvd * d_tiles + nvd * kept, inputs + n * d * size),
        KernelWork("backward dC (owned)", 1, _cdiv(v, block_v) * d_tiles, gpu.sms,
                   nvd * d_tiles + nvd * kept, inputs + v * d * size),
    ]
    return Design("main 1a80b4e, deterministic (owned)", _main_forward(shape, gpu) + kernels,
                  2.0 * d_tiles)


def designs(shape: Shape, gpu: Gpu, kept: float, recomputed: float) -> list[Design]:
    return [ours(shape, gpu, kept, recomputed), main_atomic(shape, gpu, kept),
            main_owned(shape, gpu, kept)]


def render(shape: Shape, preset: str, gpu: Gpu, kept: float, recomputed: float) -> str:
    nvd = shape.n * shape.v * shape.d
    tensor_cores = _sixteen_bit(shape)
    lines = [
        f"Work model (an estimate, see cce_inductor.tools.work_model) at {preset} "
        f"({shape.describe()}) on {gpu.name} ({gpu.sms} SMs, "
        f"{(gpu.tensor_flops if tensor_cores else gpu.fp32_flops) / 1e12:.0f} TFLOP/s, "
        f"{gpu.hbm_bytes_per_s / 1e12:.2f} TB/s); kept-tile fraction {kept:.0%}, "
        f"recomputed {recomputed:.0%}. Floors: 6 NVD = {6 * nvd / 1e12:.1f} TFLOP, "
        f"8 NVD = {8 * nvd / 1e12:.1f} TFLOP.",
    ]
    summary = []
    for design in designs(shape, gpu, kept, recomputed):
        rows = [[kernel.kernel, kernel.launches, kernel.programs,
                 f"{kernel.waves:.2f} ({kernel.last_wave_fill:.0%})",
                 f"{kernel.flops / 1e12:.2f}", f"{kernel.hbm_bytes / 1e9:.2f}",
                 f"{kernel.l2_atomic_bytes / 1e9:.1f}" if kernel.l2_atomic_bytes else "—",
                 f"{kernel.seconds(gpu, tensor_cores) * 1e3:.2f}"]
                for kernel in design.kernels]
        lines += ["", design.name + ":",
                  tabulate(rows, headers=["kernel", "launches", "programs / launch",
                                          "waves (last full)", "TFLOP", "HBM GB",
                                          "L2 atomics GB", "est. ms"],
                           tablefmt="github", disable_numparse=True)]
        summary.append([design.name, f"{design.flops() / nvd:.2f} NVD",
                        f"{design.logit_recomputations:.2f}",
                        f"{design.seconds(gpu, tensor_cores) * 1e3:.1f}"])
    lines += ["", "Totals (forward + backward):",
              tabulate(summary, headers=["design", "FLOPs", "backward logit recomputations",
                                         "est. ms"], tablefmt="github", disable_numparse=True)]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gpu", choices=sorted(GPUS), default="H100")
    parser.add_argument("--kept-fraction", type=float, default=MEASURED_KEPT,
                        help=f"tiles whose gradient products run (default {MEASURED_KEPT}, "
                        "measured on the demo LM: cce_inductor.tools.kept_tiles)")
    parser.add_argument("--recomputed-fraction", type=float,
                        help="tiles whose logits the backward recomputes (default: the kept "
                        "fraction)")


def report(shape: Shape, preset: str, args: argparse.Namespace) -> str:
    for name in ("kept_fraction", "recomputed_fraction"):
        value = getattr(args, name)
        if value is not None and not 0.0 <= value <= 1.0:
            raise ValueError(f"--{name.replace('_', '-')} must be in [0, 1], got {value}")
    recomputed = args.kept_fraction if args.recomputed_fraction is None else args.recomputed_fraction
    return render(shape, preset, GPUS[args.gpu], args.kept_fraction, recomputed)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cce_inductor.tools.work_model",
                                     description="Estimated work of the CCE kernels.")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="gemma2-2b")
    parser.add_argument("--dtype", choices=DTYPES)
    add_arguments(parser)
    args = parser.parse_args(argv)
    shape = resolve(args.preset, None, None, None, args.dtype)
    print(report(shape, args.preset, args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
