"""Blocked eager implementation of the `cce` ops (the CPU path; also correct on any device).

The logits are produced one `[TOKEN_BLOCK, VOCAB_BLOCK]` tile at a time and never all at once,
so the extra memory is O(N*D + V*D + N) plus one tile: an online log-sum-exp in the forward,
and in the backward the tile is recomputed, turned into dz, and consumed by two matmuls.

Matmuls run in the inputs' dtype for bf16 (fast on CPUs with bf16 units; the logits are rounded
to bf16 exactly as torch's own bf16 `linear` rounds them) and in fp32 otherwise (fp16 matmuls
are not faster on CPUs). Everything after the matmul (softcap, exp, sums, accumulation across
tiles) is fp32, or fp64 for fp64 inputs.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from cce_inductor import filter_stats

TOKEN_BLOCK = 1024
VOCAB_BLOCK = 2048
# Gradient filtering decides per FILTER_BLOCK columns of a token block: coarse enough that the
# kept columns are gathered into one matmul, fine enough that peaked rows skip most of them.
FILTER_BLOCK = 128


def _matmul_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in (torch.bfloat16, torch.float64) else torch.float32


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _logit_tile(
    e_blk: Tensor, c_blk: Tensor, b_blk: Optional[Tensor], softcap: Optional[float], acc: torch.dtype
) -> tuple[Tensor, Optional[Tensor]]:
    """z = softcap(e_blk @ c_blk.T + b_blk) in the accumulation dtype, and tanh for its derivative."""
    z = (e_blk @ c_blk.T).to(acc)
    if b_blk is not None:
        z += b_blk
    if softcap is None:
        return z, None
    tanh = z.div_(softcap).tanh_()
    return tanh * softcap, tanh


def _target_columns(t_blk: Tensor, v0: int, width: int) -> tuple[Tensor, Tensor]:
    """For each row: whether its target falls in columns [v0, v0 + width), and its local column."""
    local = t_blk - v0
    hit = (local >= 0) & (local < width)
    return hit, local.clamp(0, width - 1)


def forward(
    input: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    target: Tensor,
    class_weight: Optional[Tensor],
    softcap: Optional[float],
    with_logit_sum: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    n, v = input.shape[0], weight.shape[0]
    acc = _acc_dtype(input.dtype)
    mm = _matmul_dtype(input.dtype)
    lse = input.new_empty((n,), dtype=acc)
    target_logit = input.new_zeros((n,), dtype=acc)
    logit_sum = input.new_zeros((n,) if with_logit_sum else (0,), dtype=acc)
    bias_acc = bias.to(acc) if bias is not None else None
    class_weight_acc = class_weight.to(acc) if class_weight is not None else None

    for n0 in range(0, n, TOKEN_BLOCK):
        n1 = min(n0 + TOKEN_BLOCK, n)
        e_blk = input[n0:n1].to(mm)
        t_blk = target[n0:n1]
        row_max = input.new_full((n1 - n0,), float("-inf"), dtype=acc)
        row_sumexp = input.new_zeros((n1 - n0,), dtype=acc)
        for v0 in range(0, v, VOCAB_BLOCK):
            v1 = min(v0 + VOCAB_BLOCK, v)
            z, _ = _logit_tile(
                e_blk, weight[v0:v1].to(mm), bias_acc[v0:v1] if bias_acc is not None else None,
                softcap, acc,
            )
            hit, col = _target_columns(t_blk, v0, v1 - v0)
            target_logit[n0:n1] += torch.where(hit, z.gather(1, col[:, None])[:, 0], 0.0)
            if with_logit_sum:
                logit_sum[n0:n1] += (
                    z @ class_weight_acc[v0:v1] if class_weight_acc is not None else z.sum(1)
                )
            # Online log-sum-exp: rescale the running sum to the new running max.
            new_max = torch.maximum(row_max, z.amax(1))
            row_sumexp.mul_(torch.exp(row_max - new_max))
            row_sumexp += z.sub_(new_max[:, None]).exp_().sum(1)
            row_max = new_max
        lse[n0:n1] = row_max + row_sumexp.log()
    return lse, target_logit, logit_sum


def backward(
    input: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    target: Tensor,
    class_weight: Optional[Tensor],
    lse: Tensor,
    grad_lse: Tensor,
    grad_target_logit: Tensor,
    grad_logit_sum: Optional[Tensor],
    softcap: Optional[float],
    filter_eps: Optional[float],
    input_needs_grad: bool,
    weight_needs_grad: bool,
    bias_needs_grad: bool,
    filter_classifier: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    n, d = input.shape
    v = weight.shape[0]
    acc = _acc_dtype(input.dtype)
    mm = _matmul_dtype(input.dtype)
    bias_needs_grad = bias_needs_grad and bias is not None
    bias_acc = bias.to(acc) if bias is not None else None
    class_weight_acc = class_weight.to(acc) if class_weight is not None else None
    # The smoothing term grad_logit_sum * class_weight is dense: no tile of dz is negligible.
    filtering = filter_eps is not None and filter_eps > 0 and grad_logit_sum is None
    # Without filter_classifier the classifier's gradients sum every tile: filtering then only
    # narrows the dE product.
    classifier_sums_all = not filter_classifier and (weight_needs_grad or bias_needs_grad)

    grad_input = input.new_zeros((n, d) if input_needs_grad else (0,), dtype=acc)
    grad_weight = weight.new_zeros((v, d) if weight_needs_grad else (0,), dtype=acc)
    grad_bias = weight.new_zeros((v,) if bias_needs_grad else (0,), dtype=acc)
    if input_needs_grad or weight_needs_grad or bias_needs_grad:
        for n0 in range(0, n, TOKEN_BLOCK):
            n1 = min(n0 + TOKEN_BLOCK, n)
            e_blk = input[n0:n1].to(mm)
            t_blk = target[n0:n1]
            for v0 in range(0, v, VOCAB_BLOCK):
                v1 = min(v0 + VOCAB_BLOCK, v)
                c_blk = weight[v0:v1].to(mm)
                z, tanh = _logit_tile(
                    e_blk, c_blk, bias_acc[v0:v1] if bias_acc is not None else None, softcap, acc
                )
                # dz starts as the softmax p = exp(z - lse), computed in place.
                dz = z.sub_(lse[n0:n1, None]).exp_()
                hit, col = _target_columns(t_blk, v0, v1 - v0)
                keep = _kept_columns(dz, hit, col, filter_eps) if filtering else None
                if keep is not None and keep.numel() == 0 and not classifier_sums_all:
                    continue
                dz.mul_(grad_lse[n0:n1, None])
                rows = hit.nonzero()[:, 0]
                dz[rows, col[rows]] += grad_target_logit[n0:n1][rows]
                if grad_logit_sum is not None:
                    w = class_weight_acc[v0:v1] if class_weight_acc is not None else 1.0
                    dz += grad_logit_sum[n0:n1, None] * w
                if tanh is not None:
                    dz.mul_(1.0 - tanh * tanh)
                cols = None
                if keep is not None and classifier_sums_all:
                    _accumulate(dz, e_blk, c_blk, n0, n1, v0, v1, None, mm, None,
                                grad_weight if weight_needs_grad else None,
                                grad_bias if bias_needs_grad else None)
                    if input_needs_grad and keep.numel():
                        _add_product(grad_input[n0:n1], dz[:, keep].to(mm), c_blk[keep])
                    continue
                if keep is not None:
                    dz, c_blk, cols = dz[:, keep], c_blk[keep], keep + v0
                _accumulate(
                    dz, e_blk, c_blk, n0, n1, v0, v1, cols, mm,
                    grad_input if input_needs_grad else None,
                    grad_weight if weight_needs_grad else None,
                    grad_bias if bias_needs_grad else None,
                )
    return (
        grad_input.to(input.dtype),
        grad_weight.to(weight.dtype),
        grad_bias.to(bias.dtype if bias is not None else weight.dtype),
    )


def _kept_columns(p: Tensor, hit: Tensor, col: Tensor, filter_eps: float) -> Optional[Tensor]:
    """Columns of the tile in FILTER_BLOCK-wide blocks that must be computed; None for all.

    A block is skipped when every softmax value in it is below filter_eps and no row's target
    lies in it: its dz entries are then all below working precision.
    """
    width = p.shape[1]
    nblocks = -(-width // FILTER_BLOCK)
    padded = torch.nn.functional.pad(p, (0, nblocks * FILTER_BLOCK - width))
    needed = padded.view(p.shape[0], nblocks, FILTER_BLOCK).amax(dim=(0, 2)) >= filter_eps
    needed[col[hit] // FILTER_BLOCK] = True
    filter_stats.record(skipped=int(nblocks - needed.sum()), total=nblocks)
    if bool(needed.all()):
        return None
    blocks = needed.nonzero()[:, 0]
    offsets = torch.arange(FILTER_BLOCK, device=p.device)
    columns = (blocks[:, None] * FILTER_BLOCK + offsets).flatten()
    return columns[columns < width]


def _accumulate(
    dz: Tensor,
    e_blk: Tensor,
    c_blk: Tensor,
    n0: int,
    n1: int,
    v0: int,
    v1: int,
    cols: Optional[Tensor],
    mm: torch.dtype,
    grad_input: Optional[Tensor],
    grad_weight: Optional[Tensor],
    grad_bias: Optional[Tensor],
) -> None:
    """Add one tile's dz to the three gradients; cols, when given, are the kept vocab rows."""
    dz_mm = dz.to(mm)
    if grad_input is not None:
        _add_product(grad_input[n0:n1], dz_mm, c_blk)
    if grad_weight is not None:
        if cols is None:
            _add_product(grad_weight[v0:v1], dz_mm.T, e_blk)
        else:
            grad_weight.index_add_(0, cols, (dz_mm.T @ e_blk).to(grad_weight.dtype))
    if grad_bias is not None:
        if cols is None:
            grad_bias[v0:v1] += dz.sum(0)
        else:
            grad_bias.index_add_(0, cols, dz.sum(0))


def _add_product(out: Tensor, a: Tensor, b: Tensor) -> None:
    """out += a @ b, in place (no temporary) when the matmul already runs in out's dtype."""
    if a.dtype == out.dtype:
        out.addmm_(a, b)
    else:
        out += a @ b
