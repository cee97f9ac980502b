"""Lowering of cce::linear_cross_entropy_bwd to the backward Triton templates.

Default: `cce_backward`, one program per logit tile, accumulating fp32 gradients with atomics
(then cast to the inputs' dtypes). Under torch.use_deterministic_algorithms(True):
`cce_backward_owned`, launched once for dE and once for dC/dbias, each program owning its
output tile (no atomics, bitwise reproducible, more logit recomputation).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import torch

from cce_inductor import compat, filter_stats
from cce_inductor.lowering import common, configs
from cce_inductor.lowering.forward import input_gen_fns as forward_input_gen_fns


def lower_backward(
    input: Any,
    weight: Any,
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
    weight_needs_grad: bool,
    bias_needs_grad: bool,
) -> tuple[Any, Any, Any]:
    op = torch.ops.cce.linear_cross_entropy_bwd.default
    args = (input, weight, bias, target, class_weight, lse, grad_lse, grad_target_logit,
            grad_logit_sum, softcap, filter_eps, input_needs_grad, weight_needs_grad,
            bias_needs_grad)
    device, dtype = input.get_device(), input.get_dtype()
    reason = common.template_unavailable_reason(device, dtype)
    if reason is not None:
        return common.fallback(op, reason, *args)

    bias_needs_grad = bool(bias_needs_grad and bias is not None)
    bias_dtype = bias.get_dtype() if bias is not None else weight.get_dtype()
    input, weight, target, lse, grad_lse, grad_target_logit = (
        common.realize(x) for x in (input, weight, target, lse, grad_lse, grad_target_logit)
    )
    n, d = input.get_size()
    v = weight.get_size()[0]
    needs = {"NEED_DE": bool(input_needs_grad), "NEED_DC": bool(weight_needs_grad),
             "NEED_DBIAS": bias_needs_grad}
    if not any(needs.values()):
        return (common.empty([0], dtype, device), common.empty([0], weight.get_dtype(), device),
                common.empty([0], bias_dtype, device))

    counting = filter_stats.counting_enabled()
    counts = (common.zeros([2], torch.int64, device) if counting
              else common.placeholder(device, torch.int64))
    # The smoothing term grad_logit_sum * class_weight is dense: no tile is negligible then.
    filtering = filter_eps is not None and filter_eps > 0 and grad_logit_sum is None
    inputs = [
        input, weight,
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
        **common.dot_options(dtype),
    )
    gen_fns = _input_gen_fns(compat.size_hints_of([v])[0])
    arch = configs.arch_of(device)
    all_configs = compat.max_autotune_enabled()
    marker = common.fixed_layout(device, torch.float32, [1])

    def launch(kernel: str, outputs: list[Any], mutated: list[Any], count: bool = True,
               **extra: Any) -> None:
        """One template launch; `count`: this launch counts the filter tiles (once per tile)."""
        count = count and counting
        cfgs = configs.tile_configs(kernel, dtype, arch, all_configs)
        common.choose(
            f"cce_{kernel}", f"cce_{kernel}", cfgs, inputs + outputs + [counts], marker,
            mutated=mutated + ([counts] if count else []), call_sizes=[n, v, d],
            input_gen_fns=gen_fns, COUNT_TILES=count, **constexprs, **extra,
        )

    if torch.are_deterministic_algorithms_enabled():
        grads = _deterministic(launch, needs, n, d, v, dtype, weight.get_dtype(), bias_dtype,
                               device)
    else:
        grads = _atomic(launch, needs, n, d, v, dtype, weight.get_dtype(), bias_dtype, device)
    if counting:  # a host-side call after the kernels: see filter_stats
        lowering = compat.inductor_lowering_module()
        lowering.fallback_handler(torch.ops.cce.record_filter_stats.default,
                                  add_to_fallback_set=False)(counts)
    return grads


def _atomic(launch: Callable[..., None], needs: dict[str, bool], n: Any, d: Any, v: Any,
            dtype: torch.dtype, weight_dtype: torch.dtype, bias_dtype: torch.dtype,
            device: torch.device) -> tuple[Any, Any, Any]:
    shapes = {"NEED_DE": [n, d], "NEED_DC": [v, d], "NEED_DBIAS": [v]}
    accumulators = {
        key: common.zeros(shapes[key], torch.float32, device) if needed
        else common.placeholder(device, torch.float32)
        for key, needed in needs.items()
    }
    launch(configs.BACKWARD, list(accumulators.values()),
           [acc for key, acc in accumulators.items() if needs[key]], **needs)
    to_dtype = compat.inductor_lowering_module().to_dtype
    out_dtypes = {"NEED_DE": dtype, "NEED_DC": weight_dtype, "NEED_DBIAS": bias_dtype}
    return tuple(
        to_dtype(accumulators[key], out_dtypes[key]) if needs[key]
        else common.empty([0], out_dtypes[key], device)
        for key in ("NEED_DE", "NEED_DC", "NEED_DBIAS")
    )


def _deterministic(launch: Callable[..., None], needs: dict[str, bool], n: Any, d: Any, v: Any,
                   dtype: torch.dtype, weight_dtype: torch.dtype, bias_dtype: torch.dtype,
                   device: torch.device) -> tuple[Any, Any, Any]:
    grad_input = common.empty([n, d] if needs["NEED_DE"] else [0], dtype, device)
    grad_weight = common.empty([v, d] if needs["NEED_DC"] else [0], weight_dtype, device)
    grad_bias = common.empty([v] if needs["NEED_DBIAS"] else [0], bias_dtype, device)
    outputs = [grad_input, grad_weight, grad_bias]
    if needs["NEED_DE"]:
        launch(configs.BACKWARD_OWNED, outputs, [grad_input], OWNS_ROWS=True, **needs)
    if needs["NEED_DC"] or needs["NEED_DBIAS"]:
        launch(configs.BACKWARD_OWNED, outputs,
               [g for g, key in ((grad_weight, "NEED_DC"), (grad_bias, "NEED_DBIAS")) if needs[key]],
               count=not needs["NEED_DE"], OWNS_ROWS=False, **needs)
    return grad_input, grad_weight, grad_bias


def _input_gen_fns(vocab: int) -> dict[int, Callable[[Any], torch.Tensor]]:
    """As the forward's, plus the row statistics of such logits: lse ~ log(V) + 1/2 (the
    log-mean-exp of N(0, 1) logits) so the softmax, and thus filtering, looks realistic."""
    fns = dict(forward_input_gen_fns(vocab))

    def lse(node: Any) -> torch.Tensor:
        (rows,) = compat.size_hints(node)
        return torch.full((rows,), math.log(vocab) + 0.5, device=node.get_device())

    def row_grad(node: Any) -> torch.Tensor:
        (rows,) = compat.size_hints(node)
        return torch.full((rows,), 1.0 / max(rows, 1), device=node.get_device())

    fns.update({5: lse, 6: row_grad, 7: lambda node: -row_grad(node)})
    return fns
