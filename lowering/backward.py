"""Lowering of cce::linear_cross_entropy_bwd: the vocabulary-chunked, atomics-free backward.

The vocabulary is cut into `chunks` chunks of VC classes (a multiple of the logit tile's
BLOCK_V). Per chunk, two launches:
  cce_backward_dz     recomputes the chunk's logits tile by tile with the forward's own tile
                      (same rounding), forms dz, writes it in the inputs' dtype (fp32 for fp32)
                      into one [N, VC] buffer reused by every chunk, and records per tile whether
                      it is kept; tiles the forward's tile_max proves negligible are skipped
                      before their logits are recomputed;
  cce_backward_grads  dC[chunk] = dz.T @ E and dbias[chunk] (complete per chunk, stored once in
                      the classifier's dtype), and dE += dz @ C[chunk] into an fp32 [N, D]
                      accumulator (none with a single chunk: dE is then stored once).
Every output tile has one owner summing in a fixed order: no atomics, the same bits on every
run, so torch.use_deterministic_algorithms needs no other variant. The work is the atomic
design's (2 N V D FLOPs for the logits, 2 N V D for each product, all times the kept fraction)
plus the dz traffic (written once, read twice).

Memory beyond dE and dC: the dz buffer (N x VC, at most DZ_BUDGET_BYTES and a quarter of the
gradients' bytes at the planned N), the
fp32 dE accumulator (N x D x 4 bytes, when there are several chunks), the kept map (one byte per
tile) and the forward's tile_max (4 bytes per 16 x 128 logits). The chunk count is a constant of
the generated code (one pair of launches per chunk), chosen from the size hints of N and V;
with dynamic shapes a larger N than its hint grows the dz buffer in proportion (VC is fixed).
The chunk index reaches each launch through device memory (the dz kernel of chunk k writes k + 1
for the next chunk, two one-element buffers taking turns), so every chunk launches the same two
compiled kernels.

This module holds both kernels' grids, config tables and the lowering.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Iterator, Optional

import torch

from cce_inductor import compat, filter_stats, ops
from cce_inductor.lowering import common, configs, forward
from cce_inductor.lowering.configs import (
    FLOAT32, SIXTEEN_BIT, ConfigTable, DzConfig, GradsConfig, Row,
)

# The dz buffer's size at the planned N, at most: with the tile_max and kept maps it keeps the
# working space beyond the gradients and the fp32 dE accumulator under 37 MiB at the presets.
DZ_BUDGET_BYTES = 32 << 20
# and at most this fraction of the gradients' own bytes, (N + V) x D x itemsize: so that a small
# problem's backward holds no buffer the size of its logits either (a few more chunks then).
DZ_GRADIENT_FRACTION = 1 / 4
# The gradient kernel lists a program's kept tiles this many verdicts at a time.
LIST_BLOCK = 64
# Early skipping compares exp(tile_max - lse + EARLY_LOG_MARGIN) with filter_eps. The margin
# (in logit units) absorbs the rounding of exp and a recomputed logit that differs from the
# forward's by a few ulps, should a GPU's code contract the two kernels' arithmetic differently;
# it keeps at most exp(2**-7) - 1 = 0.8 % of the bound's headroom from early skipping.
EARLY_LOG_MARGIN = 2.0**-7
# The verdicts the dz kernel writes into the kept map.
SKIPPED_EARLY, SKIPPED, KEPT = 0, 1, 2


def _dz_grid(n, v, d, vc, meta, *, cdiv):
    return (cdiv(n, meta["BLOCK_N"]) * cdiv(vc, meta["BLOCK_V"]), 1, 1)


def grads_programs(n, v, d, vc, meta, *, cdiv) -> tuple:
    """(dC/dbias programs, dE programs) of one cce_backward_grads launch."""
    tiles = cdiv(vc, meta["BLOCK_V"])
    d_tiles = cdiv(d, meta["BLOCK_DO"])
    dc = tiles * (d_tiles if meta["NEED_DC"] else 1) if meta["NEED_DC"] or meta["NEED_DBIAS"] else 0
    de = cdiv(n, meta["BLOCK_N"]) * d_tiles if meta["NEED_DE"] else 0
    return dc, de


def _grads_grid(n, v, d, vc, meta, *, cdiv):
    dc, de = grads_programs(n, v, d, vc, meta, cdiv=cdiv)
    return (dc + de, 1, 1)


# Both kernels run on the logit tile of the width and arch (configs.LOGIT_TILES); the dz kernel
# takes its warps, the gradient kernel has its own.
BACKWARD_DZ = common.Kernel(
    name="backward_dz", grid=_dz_grid,
    table=ConfigTable(
        Row(widths=(SIXTEEN_BIT,), archs=(90,), configs=(
            DzConfig(num_stages=3, ctas_per_sm=1, group_rows=8),
            DzConfig(num_stages=4, ctas_per_sm=1, group_rows=8),
            DzConfig(num_stages=3, ctas_per_sm=1, group_rows=16))),
        Row(widths=(SIXTEEN_BIT, FLOAT32), archs=(80,), configs=(
            DzConfig(num_stages=3, ctas_per_sm=2, group_rows=8),
            DzConfig(num_stages=4, ctas_per_sm=2, group_rows=8),
            DzConfig(num_stages=3, ctas_per_sm=2, group_rows=16))),
        Row(widths=(FLOAT32,), archs=(90,), configs=(
            DzConfig(num_stages=3, ctas_per_sm=2, group_rows=8),
            DzConfig(num_stages=4, ctas_per_sm=2, group_rows=8),
            DzConfig(num_stages=3, ctas_per_sm=2, group_rows=16))),
    ),
)
BACKWARD_GRADS = common.Kernel(
    name="backward_grads", grid=_grads_grid,
    table=ConfigTable(
        Row(widths=(SIXTEEN_BIT,), configs=(
            GradsConfig(block_do=128, num_warps=8, num_stages=3, ctas_per_sm=1),
            GradsConfig(block_do=64, num_warps=4, num_stages=3, ctas_per_sm=2))),
        # fp32 products on FMA units: 64 columns need 8 warps to stay within registers.
        Row(widths=(FLOAT32,), configs=(
            GradsConfig(block_do=64, num_warps=8, num_stages=2, ctas_per_sm=1),
            GradsConfig(block_do=32, num_warps=4, num_stages=2, ctas_per_sm=2))),
    ),
)
KERNELS = (BACKWARD_DZ, BACKWARD_GRADS)


_planned: list[tuple[int, ...]] = []


@contextlib.contextmanager
def planned_for(*sizes: int) -> Iterator[None]:
    """Plan the chunks of backwards lowered in the block for N, V, D = sizes instead of their
    size hints (nothing changes without arguments). The memory report generates code at a tiny
    shape planned for a preset's, as a compile at the preset would plan it; a model with
    dynamic N can plan the working space for its largest batch."""
    if sizes:
        _planned.append(tuple(sizes))
    try:
        yield
    finally:
        if sizes:
            _planned.pop()


def planned_sizes() -> tuple[int, int, int] | None:
    """The (N, V, D) that planned_for() set, if any (part of the FX graph cache key)."""
    return _planned[-1] if _planned else None


def chunk_count(n: int, v: int, d: int, itemsize: int, block_v: int) -> int:
    """How many vocabulary chunks keep the dz buffer N x VC x itemsize within DZ_BUDGET_BYTES
    and DZ_GRADIENT_FRACTION of the gradients (VC a multiple of block_v, at least one tile)."""
    budget = min(DZ_BUDGET_BYTES, int(DZ_GRADIENT_FRACTION * (n + v) * d * itemsize))
    tiles_fitting = max(1, budget // (max(n, 1) * itemsize * block_v))
    return -(-(-(-v // block_v)) // tiles_fitting)


def chunk_width(v: Any, chunks: int, block_v: int, *, cdiv: Callable) -> Any:
    """VC: the vocabulary's tiles shared out over `chunks` (V may be symbolic)."""
    return block_v * cdiv(cdiv(v, block_v), chunks)


def chunk_plan(n: Any, v: Any, d: Any, itemsize: int, block_v: int) -> tuple[int, Any]:
    """(number of chunks, chunk width VC) planned at the size hints of N, V and D (or at
    planned_for's sizes); VC may be symbolic (V dynamic), the count never is."""
    n_hint, v_hint, d_hint = planned_sizes() or compat.size_hints_of([n, v, d])
    chunks = chunk_count(n_hint, v_hint, d_hint, itemsize, block_v)
    return chunks, chunk_width(v, chunks, block_v, cdiv=compat.sympy_size_functions()[0])


def lower_backward(
    input: Any,
    classifier: Any,
    bias: Optional[Any],
    target: Any,
    class_weight: Optional[Any],
    lse: Any,
    grad_lse: Any,
    grad_target_logit: Any,
    grad_logit_sum: Optional[Any],
    softcap: Optional[float],
    filter_eps: Optional[float],
    input_needs_grad: bool,
    classifier_needs_grad: bool,
    bias_needs_grad: bool,
    tile_max: Optional[Any] = None,
    lse_parts: Optional[Any] = None,
    filter_classifier: bool = True,
    logit_scale: float = 1.0,
    entropy: Optional[Any] = None,
    grad_entropy: Optional[Any] = None,
) -> tuple[Any, Any, Any]:
    op = torch.ops.cce.linear_cross_entropy_bwd.default
    args = (input, classifier, bias, target, class_weight, lse, grad_lse, grad_target_logit,
            grad_logit_sum, softcap, filter_eps, input_needs_grad, classifier_needs_grad,
            bias_needs_grad, tile_max, lse_parts, filter_classifier, logit_scale, entropy,
            grad_entropy)
    device, dtype = input.get_device(), input.get_dtype()
    reason = common.template_unavailable_reason(device, dtype)
    if reason is not None:
        return common.fallback(op, reason, *args)

    bias_needs_grad = bool(bias_needs_grad and bias is not None)
    bias_dtype = bias.get_dtype() if bias is not None else classifier.get_dtype()
    input, classifier, target, lse, grad_lse, grad_target_logit = (
        common.realize(x) for x in (input, classifier, target, lse, grad_lse, grad_target_logit)
    )
    n, d = input.get_size()
    v = classifier.get_size()[0]
    needs = {"NEED_DE": bool(input_needs_grad), "NEED_DC": bool(classifier_needs_grad),
             "NEED_DBIAS": bias_needs_grad}
    dtypes = {"NEED_DE": dtype, "NEED_DC": classifier.get_dtype(), "NEED_DBIAS": bias_dtype}
    if not any(needs.values()):
        return tuple(common.empty([0], dtypes[key], device) for key in needs)

    arch = configs.arch_of(device)
    all_configs = compat.max_autotune_enabled()
    tile = configs.logit_tile(dtype, arch)
    filtering = ops.filters(filter_eps, grad_logit_sum is not None)
    filter_dc = filtering and bool(filter_classifier)
    # Some requested gradient sums every tile: dz is then written for negligible tiles too,
    # and no tile may be skipped before its logits are recomputed.
    write_all = (needs["NEED_DE"] and not filtering) or (
        (needs["NEED_DC"] or needs["NEED_DBIAS"]) and not filter_dc)
    has_tile_max = tile_max is not None and tile_max.get_numel() != 0
    early_skip = filtering and has_tile_max and not write_all

    chunks, width = chunk_plan(n, v, d, dtype.itemsize, tile.block_v)
    cdiv = compat.sympy_size_functions()[0]
    dz = common.empty([n, width], dtype, device)
    kept = common.empty([cdiv(n, tile.block_n), cdiv(v, tile.block_v)], torch.int8, device)
    chunk_index = [common.zeros([1], torch.int32, device), common.empty([1], torch.int32, device)]
    accumulate = needs["NEED_DE"] and chunks > 1
    grad_input = (common.zeros([n, d], torch.float32, device) if accumulate
                  else common.empty([n, d] if needs["NEED_DE"] else [0], dtype, device))
    grad_classifier = common.empty([v, d] if needs["NEED_DC"] else [0], dtypes["NEED_DC"],
                                   device)
    grad_bias = common.empty([v] if needs["NEED_DBIAS"] else [0], bias_dtype, device)

    def optional(node: Optional[Any], dtype: torch.dtype) -> Any:
        return common.realize(node) if node is not None else common.placeholder(device, dtype)

    with_entropy = grad_entropy is not None

    dz_inputs = [
        input, classifier, optional(bias, dtype), target, optional(class_weight, torch.float32),
        lse, common.realize(lse_parts) if lse_parts is not None else common.placeholder_2d(device),
        common.realize(tile_max) if early_skip else common.placeholder(device, torch.float32),
        grad_lse, grad_target_logit, optional(grad_logit_sum, torch.float32),
        # The entropy's gradient term needs the forward's entropy (both given or neither).
        optional(entropy if with_entropy else None, torch.float32),
        optional(grad_entropy, torch.float32),
    ]
    dz_constexprs = dict(
        HAS_BIAS=bias is not None, HAS_CLASS_WEIGHT=class_weight is not None,
        HAS_GRAD_LOGIT_SUM=grad_logit_sum is not None, HAS_GRAD_ENTROPY=with_entropy,
        HAS_SOFTCAP=softcap is not None, SOFTCAP=float(softcap) if softcap is not None else 0.0,
        SCALE=float(logit_scale), HAS_LSE_PARTS=lse_parts is not None, FILTERING=filtering,
        FILTER_EPS=float(filter_eps) if filtering else 0.0,
        EARLY_SKIP=early_skip, EARLY_LOG_MARGIN=EARLY_LOG_MARGIN, WRITE_ALL=write_all,
        TILE_MAX_ROWS=ops.TILE_MAX_ROWS, **tile.kwargs(), **common.dot_options(device, dtype),
    )
    grads_configs = BACKWARD_GRADS.configs_for(dtype, arch, all_configs)
    grads_constexprs = dict(
        FILTER_DE=filtering, FILTER_DC=filter_dc, ACCUMULATE=accumulate, LIST_BLOCK=LIST_BLOCK,
        BLOCK_N=tile.block_n, BLOCK_V=tile.block_v, **needs, **common.dot_options(device, dtype),
    )
    grads_mutated = [grad for grad, key in ((grad_input, "NEED_DE"),
                                            (grad_classifier, "NEED_DC"),
                                            (grad_bias, "NEED_DBIAS")) if needs[key]]
    marker = common.marker_layout(device)
    call_sizes = [n, v, d, width]
    vocab = compat.size_hints_of([v])[0]
    # Each filtering program of the gradient kernel lists its kept tiles in a row of its own:
    # room for the most programs a config launches, as long as its longest list.
    if filtering:
        _, min_, max_ = compat.sympy_size_functions()
        programs = max_(*(sum(grads_programs(
            n, v, d, width, {"BLOCK_N": tile.block_n, "BLOCK_V": tile.block_v,
                             "BLOCK_DO": cfg.block_do, **needs}, cdiv=cdiv))
            for cfg in grads_configs))
        lists = common.empty([programs, max_(cdiv(n, tile.block_n), cdiv(width, tile.block_v))],
                             torch.int32, device)
    else:
        lists = common.placeholder_2d(device)
    for chunk in range(chunks):
        current, following = chunk_index[chunk % 2], chunk_index[(chunk + 1) % 2]
        common.choose(
            BACKWARD_DZ, BACKWARD_DZ.configs_for(dtype, arch, all_configs),
            dz_inputs + [current, following, dz, kept], marker,
            mutated=[following, dz, kept], call_sizes=call_sizes,
            input_gen_fns=dz_input_gen_fns(vocab), **dz_constexprs,
        )
        common.choose(
            BACKWARD_GRADS, grads_configs,
            [input, classifier, dz, kept, current, lists, grad_input, grad_classifier,
             grad_bias],
            marker, mutated=grads_mutated + ([lists] if filtering else []),
            call_sizes=call_sizes,
            input_gen_fns=grads_input_gen_fns(), **grads_constexprs,
        )
    if filter_stats.counting_enabled():  # a host-side call after the kernels: see filter_stats
        compat.lower_as_fallback(torch.ops.cce.record_filter_stats.default, kept)
    if accumulate:
        grad_input = compat.cast_buffer(grad_input, dtype)
    return grad_input, grad_classifier, grad_bias


# Benchmark inputs (max-autotune). A trained model's backward keeps a fraction of the tiles:
# 36 % on the demo LM's hidden states (`cce_inductor.tools.kept_tiles`, 600 bf16 steps, where
# every negligible tile was also skippable before recomputation); the generated inputs keep
# about that many, so that autotuning times the work such a model's backward does, not all
# tiles (random logits with random targets) or none.
KEPT_FRACTION = 0.36


def dz_input_gen_fns(vocab: int) -> dict[int, Callable[[Any], torch.Tensor]]:
    """For cce_backward_dz: logits of order one with lse = 0 (its parts too), so every
    recomputed tile is kept;
    tile_max lets about KEPT_FRACTION of the tiles through early skipping; an entropy of order
    one and the row gradients' size for its gradient; chunk index 0."""
    fns = dict(forward.input_gen_fns(vocab))

    def zeros(node: Any) -> torch.Tensor:
        return torch.zeros(compat.size_hints(node), dtype=node.get_dtype(),
                           device=node.get_device())

    def tile_max(node: Any) -> torch.Tensor:
        shape = compat.size_hints(node)
        passes = torch.rand(shape, device=node.get_device()) < KEPT_FRACTION
        return torch.where(passes, 0.0, -1e4).to(node.get_dtype())

    def row_grad(node: Any) -> torch.Tensor:
        (rows,) = compat.size_hints(node)
        return torch.full((rows,), 1.0 / max(rows, 1), device=node.get_device())

    def entropy(node: Any) -> torch.Tensor:
        return torch.ones(compat.size_hints(node), device=node.get_device())

    fns.update({5: zeros, 6: zeros, 7: tile_max, 8: row_grad, 9: lambda node: -row_grad(node),
                11: entropy, 12: row_grad, 13: zeros})
    return fns


def grads_input_gen_fns() -> dict[int, Callable[[Any], torch.Tensor]]:
    """For cce_backward_grads: about KEPT_FRACTION of the tiles kept; chunk index 0."""
    def kept(node: Any) -> torch.Tensor:
        shape = compat.size_hints(node)
        chosen = torch.rand(shape, device=node.get_device()) < KEPT_FRACTION
        return torch.where(chosen, KEPT, SKIPPED).to(torch.int8)

    def dz(node: Any) -> torch.Tensor:
        shape = compat.size_hints(node)
        scale = 1.0 / math.prod(shape[:1] or [1])
        return (torch.randn(shape, device=node.get_device()) * scale).to(node.get_dtype())

    def zeros(node: Any) -> torch.Tensor:
        return torch.zeros(compat.size_hints(node), dtype=node.get_dtype(),
                           device=node.get_device())

    return {2: dz, 3: kept, 4: zeros}
