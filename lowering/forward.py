"""The forward kernel family: cce::linear_cross_entropy_fwd lowered to two Triton templates.

`cce_forward` computes partial row statistics over (row block, vocabulary range) programs into
a small fp32 buffer PARTIALS [2 or 3, slots, N] (slots: the most vocabulary ranges any
candidate config launches for this shape, see `vocab_splits`: O(N + SMs x BLOCK_N), never
O(N x V)), and `cce_forward_combine` merges the ranges into lse, target_logit and logit_sum.
Splitting the vocabulary keeps the GPU busy when there are few row blocks (small batches,
inference): a forward config's `waves` asks for about waves x (SM count) programs.

This module holds both kernels' grids, config tables and the lowering.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import torch

from cce_inductor import compat
from cce_inductor.lowering import common, configs
from cce_inductor.lowering.configs import (
    FLOAT32, SIXTEEN_BIT, CombineConfig, ConfigTable, Row, tiles,
)


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


def _forward_grid(n, v, d, meta, *, cdiv, min, max):
    splits = vocab_splits(n, v, meta["BLOCK_N"], meta["BLOCK_V"],
                          meta.get("WAVES", 0) * meta["SM_COUNT"], cdiv=cdiv, min=min, max=max)
    return (cdiv(n, meta["BLOCK_N"]), splits, 1)


def _combine_grid(n, meta, *, cdiv):
    return (cdiv(n, meta["BLOCK_N"]), 1, 1)


# Tiles are named BLOCK_NxBLOCK_VxBLOCK_D_w<warps>_s<stages>_waves<waves> (configs.tiles);
# most split the vocabulary to about two waves of programs.
FORWARD = common.Kernel(
    name="forward", grid=_forward_grid,
    table=ConfigTable(
        Row(widths=(SIXTEEN_BIT,), archs=(80,), configs=tiles(
            "64x128x64_w4_s3_waves2", "128x128x32_w8_s3_waves2", "64x256x32_w8_s3_waves2",
            "128x64x64_w4_s3_waves2", "32x128x64_w4_s4_waves2", "64x128x64_w4_s3_waves4",
            "64x128x64_w4_s3")),
        Row(widths=(SIXTEEN_BIT,), archs=(90,), configs=tiles(
            "128x128x64_w8_s3_waves2", "64x128x64_w4_s3_waves2", "128x256x64_w8_s3_waves2",
            "64x256x64_w8_s3_waves2", "128x128x64_w8_s3_waves4", "128x128x64_w8_s3")),
        Row(widths=(FLOAT32,), configs=tiles(
            "64x64x32_w4_s3_waves2", "64x128x32_w4_s3_waves2", "128x64x32_w8_s3_waves2",
            "64x64x32_w4_s3")),
    ),
)
# The combine reads a few floats per row and split: any small tile does.
FORWARD_COMBINE = common.Kernel(
    name="forward_combine", grid=_combine_grid, sources=("cce_forward_combine",),
    table=ConfigTable(Row(configs=(CombineConfig(block_n=128, block_s=8, num_warps=4),))),
)
KERNELS = (FORWARD, FORWARD_COMBINE)


def lower_forward(
    input: Any,
    classifier: Any,
    bias: Optional[Any],
    target: Any,
    class_weight: Optional[Any],
    softcap: Optional[float],
    with_logit_sum: bool,
    filter_eps: Optional[float],
) -> tuple[Any, Any, Any]:
    op = torch.ops.cce.linear_cross_entropy_fwd.default
    device, dtype = input.get_device(), input.get_dtype()
    reason = common.template_unavailable_reason(device, dtype)
    if reason is not None:
        return common.fallback(op, reason, input, classifier, bias, target, class_weight,
                               softcap, with_logit_sum, filter_eps)

    input, classifier, target = (common.realize(x) for x in (input, classifier, target))
    n, d = input.get_size()
    v = classifier.get_size()[0]
    bias_node = common.realize(bias) if bias is not None else common.placeholder(device, dtype)
    class_weight_node = (common.realize(class_weight) if class_weight is not None
                         else common.placeholder(device, torch.float32))
    arch, autotune = configs.arch_of(device), compat.max_autotune_enabled()
    cfgs = FORWARD.configs_for(dtype, arch, autotune)
    sm_count = common.sm_count(device)
    cdiv, min_, max_ = compat.sympy_size_functions()
    slots = max_(*(
        vocab_splits(n, v, cfg.block_n, cfg.block_v, cfg.waves * sm_count,
                     cdiv=cdiv, min=min_, max=max_)
        for cfg in cfgs
    ))
    partials = common.empty([3 if with_logit_sum else 2, slots, n], torch.float32, device)
    # See NOTE:[TritonTemplates with multiple outputs] in torch/_inductor/ir.py: the outputs are
    # buffers the kernels mutate, beside each template's own output (here a marker, then LSE).
    common.choose(
        FORWARD, cfgs, [input, classifier, bias_node, target, class_weight_node, partials],
        common.marker_layout(device), mutated=[partials],
        call_sizes=[n, v, d], input_gen_fns=input_gen_fns(compat.size_hints_of([v])[0]),
        HAS_BIAS=bias is not None, HAS_CLASS_WEIGHT=class_weight is not None,
        WITH_LOGIT_SUM=bool(with_logit_sum), HAS_SOFTCAP=softcap is not None,
        SOFTCAP=float(softcap) if softcap is not None else 0.0, SM_COUNT=sm_count,
        **common.dot_options(device, dtype),
    )
    target_logit = common.empty([n], torch.float32, device)
    logit_sum = common.empty([n] if with_logit_sum else [0], torch.float32, device)
    lse = common.choose(
        FORWARD_COMBINE, FORWARD_COMBINE.configs_for(dtype, arch, autotune),
        [common.realize(partials), target_logit, logit_sum],
        compat.fixed_layout(device, torch.float32, [n]), mutated=[target_logit, logit_sum],
        call_sizes=[n], input_gen_fns={}, WITH_LOGIT_SUM=bool(with_logit_sum),
    )
    return lse, target_logit, logit_sum


def input_gen_fns(vocab: int) -> dict[int, Callable[[Any], torch.Tensor]]:
    """Benchmark inputs shaped like a trained model's: logits of order one and every target
    inside the vocabulary (random bits would give inf logits and out-of-range targets)."""
    def hidden(node: Any) -> torch.Tensor:
        n, d = compat.size_hints(node)
        scale = 1.0 / math.sqrt(math.sqrt(d))  # so that e . c ~ N(0, 1)
        return torch.randn(n, d, device=node.get_device()).mul_(scale).to(node.get_dtype())

    def target(node: Any) -> torch.Tensor:
        (n,) = compat.size_hints(node)
        return torch.randint(0, vocab, (n,), device=node.get_device(), dtype=node.get_dtype())

    return {0: hidden, 1: hidden, 3: target}
