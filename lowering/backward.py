"""The backward kernel family: cce::linear_cross_entropy_bwd lowered to Triton templates.

Default: `cce_backward`, one program per logit tile, accumulating fp32 gradients with atomics
(then cast to the inputs' dtypes). Under torch.use_deterministic_algorithms(True):
`cce_backward_owned`, launched once for dE and once for dC/dbias, each program owning its
output tile (no atomics, bitwise reproducible, more logit recomputation).

This module holds both kernels' grids, config tables and the lowering.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import torch

from cce_inductor import compat, filter_stats
from cce_inductor.lowering import common, configs, forward
from cce_inductor.lowering.configs import FLOAT32, SIXTEEN_BIT, ConfigTable, Row, tiles


def _backward_grid(n, v, d, meta, *, cdiv):
    return (cdiv(n, meta["BLOCK_N"]) * cdiv(v, meta["BLOCK_V"]), 1, 1)


def _owned_grid(n, v, d, meta, *, cdiv):
    owned = cdiv(n, meta["BLOCK_N"]) if meta["OWNS_ROWS"] else cdiv(v, meta["BLOCK_V"])
    return (owned, cdiv(d, meta["BLOCK_DO"]), 1)


# Tiles are named BLOCK_NxBLOCK_VxBLOCK_D[xBLOCK_DO]_w<warps>_s<stages> (configs.tiles).
BACKWARD = common.Kernel(
    name="backward", grid=_backward_grid,
    table=ConfigTable(
        Row(widths=(SIXTEEN_BIT,), archs=(80,), configs=tiles(
            "64x128x64_w8_s3", "128x128x32_w8_s3", "64x64x64_w4_s3", "128x64x64_w8_s3")),
        Row(widths=(SIXTEEN_BIT,), archs=(90,), configs=tiles(
            "128x128x64_w8_s3", "64x128x64_w8_s3", "128x64x64_w8_s3")),
        Row(widths=(FLOAT32,), archs=(80,), configs=tiles("32x64x32_w4_s3", "32x32x32_w4_s3")),
        # 8 warps: with 4, the 32x64x32 tile spills 8 bytes on sm_90a.
        Row(widths=(FLOAT32,), archs=(90,), configs=tiles("32x64x32_w8_s3", "32x32x32_w4_s3")),
    ),
)
# The deterministic backward owns BLOCK_DO columns of D per program.
BACKWARD_OWNED = common.Kernel(
    name="backward_owned", grid=_owned_grid,
    table=ConfigTable(
        Row(widths=(SIXTEEN_BIT,), archs=(80,), configs=tiles(
            "64x64x64x128_w4_s3", "64x128x64x128_w8_s3")),
        Row(widths=(SIXTEEN_BIT,), archs=(90,), configs=tiles(
            "64x64x64x128_w4_s3", "128x64x64x128_w8_s3")),
        Row(widths=(FLOAT32,), configs=tiles("32x64x32x32_w4_s3")),
    ),
)
KERNELS = (BACKWARD, BACKWARD_OWNED)


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
) -> tuple[Any, Any, Any]:
    op = torch.ops.cce.linear_cross_entropy_bwd.default
    args = (input, classifier, bias, target, class_weight, lse, grad_lse, grad_target_logit,
            grad_logit_sum, softcap, filter_eps, input_needs_grad, classifier_needs_grad,
            bias_needs_grad)
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

    counting = filter_stats.counting_enabled()
    counts = (common.zeros([2], torch.int64, device) if counting
              else common.placeholder(device, torch.int64))
    # The smoothing term grad_logit_sum * class_weight is dense: no tile is negligible then.
    filtering = filter_eps is not None and filter_eps > 0 and grad_logit_sum is None
    inputs = [
        input, classifier,
        common.realize(bias) if bias is not None else common.placeholder(device, dtype),
        target,
        common.realize(class_weight) if class_weight is not None
        else common.placeholder(device, torch.float32),
        lse, grad_lse, grad_target_logit,
        common.realize(grad_logit_sum) if grad_logit_sum is not None
        else common.placeholder(device, torch.float32),
    ]
    constexprs = dict(
        HAS_BIAS=bias is not None, HAS_CLASS_WEIGHT=class_weight is not None,
        HAS_GRAD_LOGIT_SUM=grad_logit_sum is not None, HAS_SOFTCAP=softcap is not None,
        SOFTCAP=float(softcap) if softcap is not None else 0.0,
        FILTER_EPS=float(filter_eps) if filtering else 0.0,
        **common.dot_options(device, dtype),
    )
    gen_fns = _input_gen_fns(compat.size_hints_of([v])[0])
    arch = configs.arch_of(device)
    all_configs = compat.max_autotune_enabled()
    marker = common.marker_layout(device)

    def launch(kernel: common.Kernel, outputs: list[Any], mutated: list[Any], count: bool = True,
               **extra: Any) -> None:
        """One template launch; `count`: this launch counts the filter tiles (once per tile)."""
        count = count and counting
        common.choose(
            kernel, kernel.configs_for(dtype, arch, all_configs), inputs + outputs + [counts],
            marker,
            mutated=mutated + ([counts] if count else []), call_sizes=[n, v, d],
            input_gen_fns=gen_fns, COUNT_TILES=count, **constexprs, **extra,
        )

    if torch.are_deterministic_algorithms_enabled():
        grads = _deterministic(launch, needs, dtypes, n, d, v, device)
    else:
        grads = _atomic(launch, needs, dtypes, n, d, v, device)
    if counting:  # a host-side call after the kernels: see filter_stats
        compat.lower_as_fallback(torch.ops.cce.record_filter_stats.default, counts)
    return grads


def _atomic(launch: Callable[..., None], needs: dict[str, bool], dtypes: dict[str, torch.dtype],
            n: Any, d: Any, v: Any, device: torch.device) -> tuple[Any, Any, Any]:
    shapes = {"NEED_DE": [n, d], "NEED_DC": [v, d], "NEED_DBIAS": [v]}
    accumulators = {
        key: common.zeros(shapes[key], torch.float32, device) if needed
        else common.placeholder(device, torch.float32)
        for key, needed in needs.items()
    }
    launch(BACKWARD, list(accumulators.values()),
           [acc for key, acc in accumulators.items() if needs[key]], **needs)
    return tuple(
        compat.cast_buffer(accumulators[key], dtypes[key]) if needs[key]
        else common.empty([0], dtypes[key], device)
        for key in needs
    )


def _deterministic(launch: Callable[..., None], needs: dict[str, bool],
                   dtypes: dict[str, torch.dtype], n: Any, d: Any, v: Any,
                   device: torch.device) -> tuple[Any, Any, Any]:
    shapes = {"NEED_DE": [n, d], "NEED_DC": [v, d], "NEED_DBIAS": [v]}
    grads = {key: common.empty(shapes[key] if needs[key] else [0], dtypes[key], device)
             for key in needs}
    outputs = list(grads.values())
    if needs["NEED_DE"]:
        launch(BACKWARD_OWNED, outputs, [grads["NEED_DE"]], OWNS_ROWS=True, **needs)
    if needs["NEED_DC"] or needs["NEED_DBIAS"]:
        launch(BACKWARD_OWNED, outputs,
               [grads[key] for key in ("NEED_DC", "NEED_DBIAS") if needs[key]],
               count=not needs["NEED_DE"], OWNS_ROWS=False, **needs)
    return tuple(outputs)


def _input_gen_fns(vocab: int) -> dict[int, Callable[[Any], torch.Tensor]]:
    """As the forward's, plus the row statistics of such logits: lse ~ log(V) + 1/2 (the
    log-mean-exp of N(0, 1) logits) so the softmax, and thus filtering, looks realistic."""
    fns = dict(forward.input_gen_fns(vocab))

    def lse(node: Any) -> torch.Tensor:
        (rows,) = compat.size_hints(node)
        return torch.full((rows,), math.log(vocab) + 0.5, device=node.get_device())

    def row_grad(node: Any) -> torch.Tensor:
        (rows,) = compat.size_hints(node)
        return torch.full((rows,), 1.0 / max(rows, 1), device=node.get_device())

    fns.update({5: lse, 6: row_grad, 7: lambda node: -row_grad(node)})
    return fns
