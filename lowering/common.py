"""Pieces shared by the forward and backward lowerings."""

from __future__ import annotations

import logging
from typing import Any, Optional

import torch

from cce_inductor import compat
from cce_inductor.tools import interpreter

log = logging.getLogger("cce_inductor")

TEMPLATE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def template_unavailable_reason(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """Why the Triton templates cannot serve these inputs, or None when they can.

    CUDA always takes the templates; a CPU takes them only under the interpreter harness (tests),
    otherwise the ops' blocked eager implementation is the CPU path.
    """
    if device.type == "cpu" and not interpreter.is_active():
        return "CPU tensors use the blocked eager implementation"
    if device.type not in ("cuda", "cpu"):
        return f"no Triton template for device type {device.type!r}"
    if dtype not in TEMPLATE_DTYPES:
        return f"no Triton template for dtype {dtype} (templates serve fp32, fp16, bf16)"
    return None


def fallback(op: Any, reason: str, *args: Any) -> Any:
    """Lower `op` as a call of its eager implementation, logging why."""
    log.info("cce_inductor: %s falls back to its eager implementation: %s", op, reason)
    lowering = compat.inductor_lowering_module()
    return lowering.fallback_handler(op, add_to_fallback_set=False)(*args)


def dot_options(dtype: torch.dtype) -> dict[str, Any]:
    """Constexprs steering tl.dot.

    DOT_FP32 upcasts 16-bit dot operands to fp32 under the interpreter: triton 3.9's interpreter
    multiplies bf16 wrongly (triton-lang/triton#11584); the upcast is exact, so the numerics stay
    those of a 16-bit dot with fp32 accumulation. PRECISION follows torch's fp32 matmul setting.
    """
    tf32 = dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32
    return {
        "DOT_FP32": interpreter.is_active() and dtype != torch.float32,
        "PRECISION": "'tf32'" if tf32 else "'ieee'",
    }


def realize(node: Any) -> Any:
    """A template input must be a realized buffer with a fixed layout."""
    return compat.realize_template_input(node)


def placeholder(device: torch.device, dtype: torch.dtype) -> Any:
    """An empty [0] buffer standing for an absent optional tensor (kernel arity is fixed)."""
    return compat.inductor_lowering_module().empty_strided(
        [0], None, dtype=dtype, device=device
    )


def empty(size: list[Any], dtype: torch.dtype, device: torch.device) -> Any:
    return compat.inductor_lowering_module().empty_strided(size, None, dtype=dtype, device=device)


def zeros(size: list[Any], dtype: torch.dtype, device: torch.device) -> Any:
    """A realized zero-filled buffer (an accumulator that kernels atomically add into)."""
    node = compat.inductor_lowering_module().full(size, 0, dtype=dtype, device=device)
    node.realize()
    return node


def fixed_layout(device: torch.device, dtype: torch.dtype, size: list[Any]) -> Any:
    ir = compat.inductor_ir_module()
    return ir.FixedLayout(device, dtype, size, ir.FlexibleLayout.contiguous_strides(size))


def choose(name: str, template_name: str, configs: list, input_nodes: list, layout: Any,
           mutated: list, call_sizes: list, input_gen_fns: dict, **constexprs: Any) -> Any:
    """Append one TritonTemplate choice per config and let Inductor pick (benchmarking only
    when there is more than one)."""
    from cce_inductor.lowering import templates

    choices: list = []
    errors = []
    for cfg in configs:
        error = templates.template(template_name).maybe_append_choice(
            choices=choices, input_nodes=input_nodes, layout=layout, mutated_inputs=mutated,
            call_sizes=call_sizes, **constexprs, **cfg.kwargs(),
        )
        if error is not None:
            errors.append(error)
    if not choices:
        raise RuntimeError(f"{name}: no template config could be generated: {errors}")
    return compat.autotune_select(name, choices, input_nodes, layout, input_gen_fns)
