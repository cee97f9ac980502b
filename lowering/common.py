"""Pieces shared by the forward and backward lowerings: which inputs the templates serve, the
kernel definition (template sources, grid, config table), Inductor buffers, and the choice
among a kernel's configs."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch

from cce_inductor import compat
from cce_inductor.lowering import configs

log = logging.getLogger("cce_inductor")

TEMPLATE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# lowering/ and templates/ are siblings both in the checkout and once installed under cce_inductor/.
TEMPLATE_DIR = Path(__file__).resolve().parent.parent / "templates"
# A CPU has no SMs; under the interpreter harness a small count lets tiny test shapes split the
# vocabulary as realistic shapes do on a GPU.
CPU_SM_COUNT = 4

_cpu_takes_templates = 0
_cpu_upcasts_bf16_dots = False


@contextlib.contextmanager
def cpu_tensors_take_templates(upcast_bf16_dots: bool) -> Iterator[None]:
    """Within the block, CPU tensors take the Triton templates instead of the ops' blocked eager
    implementation, with their bf16 `tl.dot` operands upcast to fp32 when `upcast_bf16_dots`.
    The one switch production code reads from the Triton-interpreter harness
    (`cce_inductor.tools.interpreter`), which sets it: templates on a CPU only ever run there,
    and the harness knows whether its interpreter multiplies bf16 right."""
    global _cpu_takes_templates, _cpu_upcasts_bf16_dots
    saved_upcast = _cpu_upcasts_bf16_dots
    _cpu_takes_templates += 1
    _cpu_upcasts_bf16_dots = upcast_bf16_dots
    try:
        yield
    finally:
        _cpu_takes_templates -= 1
        _cpu_upcasts_bf16_dots = saved_upcast


def template_unavailable_reason(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """Why the Triton templates cannot serve these inputs, or None when they can.

    CUDA always takes the templates; a CPU takes them only under the interpreter harness (tests),
    otherwise the ops' blocked eager implementation is the CPU path.
    """
    if device.type == "cpu" and not _cpu_takes_templates:
        return "CPU tensors use the blocked eager implementation"
    if device.type not in ("cuda", "cpu"):
        return f"no Triton template for device type {device.type!r}"
    if dtype not in TEMPLATE_DTYPES:
        return f"no Triton template for dtype {dtype} (templates serve fp32, fp16, bf16)"
    return None


def fallback(op: Any, reason: str, *args: Any) -> Any:
    """Lower `op` as a call of its eager implementation, logging why."""
    log.info("cce_inductor: %s falls back to its eager implementation: %s", op, reason)
    return compat.lower_as_fallback(op, *args)


def dot_options(device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """Constexprs steering tl.dot.

    DOT_FP32 upcasts bf16 dot operands to fp32 for CPU tensors (which take the templates only
    under the interpreter) where the harness found its interpreter multiplying bf16 wrongly
    (triton 3.6, 3.8 and 3.9: triton-lang/triton#11584); the upcast is exact, so the numerics stay
    those of a bf16 dot with fp32 accumulation. fp16 dots run as they are (the interpreter gets
    them right). PRECISION follows torch's fp32 matmul setting.
    """
    tf32 = dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32
    return {
        "DOT_FP32": device.type == "cpu" and dtype == torch.bfloat16 and _cpu_upcasts_bf16_dots,
        "PRECISION": "'tf32'" if tf32 else "'ieee'",
    }


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of `device` (CPU_SM_COUNT for the CPU, which takes the templates
    only under the interpreter)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return CPU_SM_COUNT


# --- Inductor buffers -------------------------------------------------------------------------


def realize(node: Any) -> Any:
    """A template input must be a realized buffer with a fixed layout."""
    return compat.realize_template_input(node)


def placeholder(device: torch.device, dtype: torch.dtype) -> Any:
    """An empty [0] buffer standing for an absent optional tensor (kernel arity is fixed)."""
    return compat.empty_buffer([0], dtype, device)


def placeholder_2d(device: torch.device) -> Any:
    """An empty [0, 0] fp32 buffer standing for an absent 2-D input (tile_max, lse_parts)."""
    return compat.empty_buffer([0, 0], torch.float32, device)


def empty(size: list[Any], dtype: torch.dtype, device: torch.device) -> Any:
    return compat.empty_buffer(size, dtype, device)


def zeros(size: list[Any], dtype: torch.dtype, device: torch.device) -> Any:
    """A realized zero-filled buffer (an accumulator, a chunk index)."""
    return compat.zeros_buffer(size, dtype, device)


def marker_layout(device: torch.device) -> Any:
    """The layout of a template's own one-element output, for templates whose results are all
    mutated buffers (Inductor needs one output written through store_output)."""
    return compat.fixed_layout(device, torch.float32, [1])


# --- kernels ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class Kernel:
    """One TritonTemplate: its jinja sources, launch grid and config table."""

    name: str  # "forward", ...: the key of configs.forced; the template is cce_<name>
    grid: Callable[..., tuple]  # grid(*call_sizes, meta, *, cdiv, ...) on sympy sizes
    table: configs.ConfigTable
    # templates/<source>.py.jinja, concatenated in this order; by default the shared macros,
    # cce_<name> and the shared device functions.
    sources: tuple[str, ...] = ()

    @property
    def template_name(self) -> str:
        return f"cce_{self.name}"

    def configs_for(self, dtype: torch.dtype, arch: int, all_configs: bool
                    ) -> list[configs.Config]:
        """The default config, or with `all_configs` (max-autotune) every config to benchmark."""
        return configs.select(self.name, self.table, dtype, arch, all_configs)

    def source(self) -> str:
        parts = self.sources or ("cce_macros", self.template_name, "cce_common")
        return "".join((TEMPLATE_DIR / f"{part}.py.jinja").read_text() for part in parts)

    def template(self) -> Any:
        """The TritonTemplate (built on first use: building one imports Inductor's
        select_algorithm)."""
        return _template(self)


@functools.cache
def _template(kernel: Kernel) -> Any:
    return compat.triton_template(kernel.template_name, kernel.grid, kernel.source())


def template_files() -> list[Path]:
    """Every jinja file the templates are rendered from (for the FX-graph-cache key)."""
    return sorted(TEMPLATE_DIR.glob("*.py.jinja"))


def choose(kernel: Kernel, cfgs: list[configs.Config], input_nodes: list, layout: Any,
           mutated: list, call_sizes: list, input_gen_fns: dict, **constexprs: Any) -> Any:
    """Append one choice of `kernel`'s template per config and let Inductor pick (benchmarking
    only when there is more than one)."""
    compat.freeze_template_inputs(input_nodes)
    choices: list = []
    errors = []
    for cfg in cfgs:
        error = kernel.template().maybe_append_choice(
            choices=choices, input_nodes=input_nodes, layout=layout, mutated_inputs=mutated,
            call_sizes=call_sizes, **constexprs, **cfg.kwargs(),
        )
        if error is not None:
            errors.append(error)
    if not choices:
        raise RuntimeError(f"{kernel.template_name}: no template config could be generated: "
                           f"{errors}")
    return compat.autotune_select(kernel.template_name, choices, input_nodes, layout,
                                  input_gen_fns)
