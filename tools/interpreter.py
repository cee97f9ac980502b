"""Run Inductor's real Triton code (the CCE templates included) on the CPU via Triton's interpreter.

No machine of this project has a GPU, yet the templates must be exercised end to end: rendered
by Inductor, launched by its wrapper, numerically checked. With this harness active, Inductor
compiles CPU graphs with its Triton backend and Triton runs every kernel in its numpy
interpreter:

    from cce_inductor.tools import interpreter
    with interpreter.interpreted():
        torch.compile(fn)(cpu_tensors)

What it arranges (each piece is needed, see DESIGN.md "Testing without a GPU"):
  * TRITON_INTERPRET=1, so every `triton.jit` made from now on is interpreted; the jitted
    helpers made before (triton.language's, Inductor's triton_helpers) are swapped for
    interpreted versions;
  * `torch._inductor.config.cpu_backend = "triton"`, no epilogue-fusion benchmarking, and
    kernels compiled in this process (compile_threads=1);
  * an active Triton driver that reports an sm_80 GPU target, since the interpreter has none;
  * `triton_helpers.set_driver_to_cpu` a no-op (no triton-cpu backend exists here);
  * `triton_helpers.libdevice` served by `triton.language.math` plus interpreted versions of
    the functions it lacks (`interpreter_math`).

The lowering asks `is_active()` to decide whether CPU tensors get the Triton templates (and
to upcast bf16 `tl.dot` operands, which triton 3.9's interpreter multiplies wrongly).
Interpreter timings mean nothing and Inductor's generic reductions run element by element, so
keep shapes tiny. Process-wide state is changed; `interpreted()` restores it on exit (kernels
compiled inside stay interpreted).
"""

from __future__ import annotations

import contextlib
import os
import sys
import types
from typing import Any, Iterator

_active_depth = 0


def is_active() -> bool:
    """True inside `interpreted()`: CPU tensors then take the Triton template path."""
    return _active_depth > 0


class _InterpreterDriver:
    """The smallest Triton driver Inductor and the interpreter need: an sm_80 target on CPU."""

    def __init__(self) -> None:
        import torch

        self._torch = torch

    @classmethod
    def is_active(cls) -> bool:
        return True

    def get_current_target(self) -> Any:
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", 80, 32)

    def get_active_torch_device(self) -> Any:
        return self._torch.device("cpu")

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_device_interface(self) -> Any:
        return self._torch.cpu

    def map_python_to_cpp_type(self, ty: str) -> str:
        raise NotImplementedError("the interpreter driver launches nothing natively")

    def get_benchmarker(self) -> Any:
        from triton.testing import do_bench

        return do_bench

    def get_empty_cache_for_benchmark(self) -> Any:
        return self._torch.empty(1 << 20, dtype=self._torch.int8)

    def clear_cache(self, cache: Any) -> None:
        cache.zero_()


class _Libdevice(types.SimpleNamespace):
    """`libdevice` for interpreted kernels: `triton.language.math`, then the fp64 fallbacks."""

    def __init__(self, missing: dict[str, Any]) -> None:
        super().__init__(**missing)

    def __getattr__(self, name: str) -> Any:
        import triton.language as tl

        try:
            return getattr(tl.math, name)
        except AttributeError:
            raise AttributeError(
                f"libdevice.{name} has no interpreter version; add one to "
                "cce_inductor.tools.interpreter_math"
            ) from None


_libdevice: _Libdevice | None = None


def _interpreted_libdevice() -> _Libdevice:
    global _libdevice
    if _libdevice is None:
        import triton

        from cce_inductor.tools import interpreter_math

        _libdevice = _Libdevice({fn.__name__: triton.jit(fn) for fn in interpreter_math.MISSING})
    return _libdevice


def _reinterpret_jitted() -> list[tuple[Any, str, Any]]:
    """Swap every compiled-mode `triton.jit` function of triton.language and of Inductor's
    triton_helpers for an interpreted one; return what was replaced, for restoring.

    `triton.jit` decides between compiled and interpreted when a function is decorated, so
    the helpers defined when triton was imported (tl.zeros, tl.sum, triton_helpers.max2, ...)
    would refuse to run inside an interpreted kernel if triton came before TRITON_INTERPRET.
    """
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    owners: list[Any] = [
        module for name, module in list(sys.modules.items())
        if module is not None and (name == "triton.language" or name.startswith("triton.language.")
                                   or name == "torch._inductor.runtime.triton_helpers")
    ]
    import triton.language as tl

    owners.append(tl.tensor)  # member functions such as x.sum(), x.to()
    interpreted_of: dict[int, Any] = {}
    replaced = []
    for owner in owners:
        for name, value in list(vars(owner).items()):
            if isinstance(value, JITFunction):
                new = interpreted_of.setdefault(id(value), InterpretedFunction(value.fn))
                setattr(owner, name, new)
                replaced.append((owner, name, value))
    return replaced


@contextlib.contextmanager
def interpreted() -> Iterator[None]:
    """Within the block, Inductor compiles CPU graphs to Triton and Triton interprets them."""
    global _active_depth
    saved_env = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    import torch._inductor.config as inductor_config
    import triton

    from cce_inductor import compat

    triton_helpers = compat.inductor_triton_helpers()
    replaced = _reinterpret_jitted()
    driver = triton.runtime.driver
    saved_driver = driver._active
    saved_helpers = (triton_helpers.set_driver_to_cpu, triton_helpers.libdevice)
    driver.set_active(_InterpreterDriver())
    triton_helpers.set_driver_to_cpu = lambda: None
    triton_helpers.libdevice = _interpreted_libdevice()
    _active_depth += 1
    try:
        # compile_threads=1: compile-pool workers would build kernels without the interpreter.
        with inductor_config.patch(cpu_backend="triton", benchmark_epilogue_fusion=False,
                                   compile_threads=1):
            yield
    finally:
        _active_depth -= 1
        triton_helpers.set_driver_to_cpu, triton_helpers.libdevice = saved_helpers
        driver._active = saved_driver
        for owner, name, original in replaced:
            setattr(owner, name, original)
        if saved_env is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved_env
