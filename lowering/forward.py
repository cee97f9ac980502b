"""The forward kernel family: cce::linear_cross_entropy_fwd lowered to two Triton templates.

`cce_forward` computes partial row statistics over (row block, vocabulary range) programs into
a small fp32 buffer PARTIALS [3 to 5, slots, N] (row maximum, sum of exponentials and target
logit, then logit sum and entropy spread when asked for; slots: the most vocabulary ranges any
candidate config launches for this shape, see `vocab_splits`: O(N + SMs x BLOCK_N), never
O(N x V)), and `cce_forward_combine` merges the ranges into lse, target_logit, logit_sum,
entropy and lse_parts. Splitting the vocabulary fills whole waves of the GPU's CTA slots: a forward
config's `waves` bounds the programs by waves x SMs x its CTAs per SM. When the backward will
filter, `cce_forward` also records tile_max (the maximum logit of every 16 rows x 128 classes:
1/2048 of the logits' count, fp32) for the backward's skipping before recomputation. Every
kernel computes its logits on the one logit tile of `configs.LOGIT_TILES`.

This module holds both kernels' grids, config tables and the lowering.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import torch

from cce_inductor import compat, ops
from cce_inductor.lowering import common, configs
from cce_inductor.lowering.configs import (
    FLOAT32, SIXTEEN_BIT, CombineConfig, ConfigTable, ForwardConfig, Row,
)


def vocab_splits(n: Any, v: Any, block_n: int, block_v: int, slots: int, waves: int, *,
                 cdiv: Callable, min: Callable, max: Callable) -> Any:
    """How many vocabulary ranges the forward splits into: the most that keep the programs
    (row blocks x splits) within `waves` full waves of `slots` CTA slots, at most one per
    vocabulary tile, 1 when the row blocks alone fill that many (or waves is 0).

    Rounding down means no partial extra wave: with R row blocks the programs are more than
    waves x slots - R, so the waves lost to the tail are at most R / (waves x slots) of the
    total. Works on ints and on sympy sizes (the grid and the partial-statistics buffer of
    dynamic shapes): cdiv/min/max are passed in for that."""
    if waves <= 0:
        return 1
    row_blocks = max(1, cdiv(n, block_n))
    fitting = cdiv(waves * slots + 1, row_blocks) - 1  # floor(waves * slots / row_blocks)
    return max(1, min(fitting, cdiv(v, block_v)))


def _forward_grid(n, v, d, meta, *, cdiv, min, max):
    splits = vocab_splits(n, v, meta["BLOCK_N"], meta["BLOCK_V"],
                          meta["CTAS_PER_SM"] * meta["SM_COUNT"], meta["WAVES"],
                          cdiv=cdiv, min=min, max=max)
    return (cdiv(n, meta["BLOCK_N"]), splits, 1)


def _combine_grid(n, meta, *, cdiv):
    return (cdiv(n, meta["BLOCK_N"]), 1, 1)


# On the logit tile of the width and arch (configs.LOGIT_TILES): 16-bit sm_80 tiles fit two
# CTAs per SM, the others one (fp32: two).
FORWARD = common.Kernel(
    name="forward", grid=_forward_grid,
    table=ConfigTable(
        Row(widths=(SIXTEEN_BIT,), archs=(80,), configs=(
            ForwardConfig(num_stages=3, waves=8, ctas_per_sm=2, group_rows=8),
            ForwardConfig(num_stages=4, waves=8, ctas_per_sm=2, group_rows=8),
            ForwardConfig(num_stages=3, waves=4, ctas_per_sm=2, group_rows=4))),
        Row(widths=(SIXTEEN_BIT,), archs=(90,), configs=(
            ForwardConfig(num_stages=3, waves=8, ctas_per_sm=1, group_rows=8),
            ForwardConfig(num_stages=4, waves=8, ctas_per_sm=1, group_rows=8),
            ForwardConfig(num_stages=3, waves=4, ctas_per_sm=1, group_rows=4))),
        Row(widths=(FLOAT32,), configs=(
            ForwardConfig(num_stages=3, waves=8, ctas_per_sm=2, group_rows=8),
            ForwardConfig(num_stages=4, waves=8, ctas_per_sm=2, group_rows=8),
            ForwardConfig(num_stages=3, waves=4, ctas_per_sm=2, group_rows=4))),
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
    filter_classifier: bool = True,
    logit_scale: float = 1.0,
    with_entropy: bool = False,
) -> tuple[Any, Any, Any, Any, Any, Any]:
    op = torch.ops.cce.linear_cross_entropy_fwd.default
    device, dtype = input.get_device(), input.get_dtype()
    reason = common.template_unavailable_reason(device, dtype)
    if reason is not None:
        return common.fallback(op, reason, input, classifier, bias, target, class_weight,
                               softcap, with_logit_sum, filter_eps, filter_classifier,
                               logit_scale, with_entropy)

    input, classifier, target = (common.realize(x) for x in (input, classifier, target))
    n, d = input.get_size()
    v = classifier.get_size()[0]
    bias_node = common.realize(bias) if bias is not None else common.placeholder(device, dtype)
    class_weight_node = (common.realize(class_weight) if class_weight is not None
                         else common.placeholder(device, torch.float32))
    arch, autotune = configs.arch_of(device), compat.max_autotune_enabled()
    cfgs = FORWARD.configs_for(dtype, arch, autotune)
    tile = configs.logit_tile(dtype, arch)
    sm_count = common.sm_count(device)
    cdiv, min_, max_ = compat.sympy_size_functions()
    slots = max_(*(
        vocab_splits(n, v, tile.block_n, tile.block_v, cfg.ctas_per_sm * sm_count, cfg.waves,
                     cdiv=cdiv, min=min_, max=max_)
        for cfg in cfgs
    ))
    partial_rows, statistics = optional_statistics(bool(with_logit_sum), bool(with_entropy))
    partials = common.empty([partial_rows, slots, n], torch.float32, device)
    with_tile_max = ops.filters(filter_eps, with_logit_sum)
    tile_max = (common.empty([cdiv(n, ops.TILE_MAX_ROWS) * cdiv(v, ops.TILE_MAX_COLS)],
                             torch.float32, device) if with_tile_max
                else common.placeholder(device, torch.float32))
    # See NOTE:[TritonTemplates with multiple outputs] in torch/_inductor/ir.py: the outputs are
    # buffers the kernels mutate, beside each template's own output (here a marker, then LSE).
    common.choose(
        FORWARD, cfgs,
        [input, classifier, bias_node, target, class_weight_node, partials, tile_max],
        common.marker_layout(device), mutated=[partials] + ([tile_max] if with_tile_max else []),
        call_sizes=[n, v, d], input_gen_fns=input_gen_fns(compat.size_hints_of([v])[0]),
        HAS_BIAS=bias is not None, HAS_CLASS_WEIGHT=class_weight is not None,
        HAS_SOFTCAP=softcap is not None, SOFTCAP=float(softcap) if softcap is not None else 0.0,
        SCALE=float(logit_scale), SM_COUNT=sm_count, **statistics,
        WITH_TILE_MAX=with_tile_max, TILE_MAX_ROWS=ops.TILE_MAX_ROWS, **tile.kwargs(),
        **common.dot_options(device, dtype),
    )
    target_logit = common.empty([n], torch.float32, device)
    logit_sum = common.empty([n] if with_logit_sum else [0], torch.float32, device)
    entropy = common.empty([n] if with_entropy else [0], torch.float32, device)
    lse_parts = common.empty([n, 2], torch.float32, device)
    lse = common.choose(
        FORWARD_COMBINE, FORWARD_COMBINE.configs_for(dtype, arch, autotune),
        [common.realize(partials), target_logit, logit_sum, entropy, lse_parts],
        compat.fixed_layout(device, torch.float32, [n]),
        mutated=[target_logit, logit_sum] + ([entropy] if with_entropy else []) + [lse_parts],
        call_sizes=[n], input_gen_fns={}, **statistics,
    )
    return lse, target_logit, logit_sum, entropy, tile_max, lse_parts


def optional_statistics(with_logit_sum: bool, with_entropy: bool) -> tuple[int, dict[str, Any]]:
    """The rows of PARTIALS (row maximum, sum of exponentials, target logit, then the optional
    statistics asked for) and the templates' constexprs for those: WITH_<NAME>, and
    <NAME>_ROW, its row in PARTIALS."""
    flags = {"LOGIT_SUM": with_logit_sum, "ENTROPY": with_entropy}
    present = [name for name, on in flags.items() if on]
    constexprs: dict[str, Any] = {}
    for name, on in flags.items():
        constexprs[f"WITH_{name}"] = on
        constexprs[f"{name}_ROW"] = 3 + present.index(name) if on else 0
    return 3 + len(present), constexprs


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
