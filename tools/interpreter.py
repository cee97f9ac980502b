"""Run Inductor's real Triton code (the CCE templates included) on the CPU via Triton's interpreter.

Test and tool support, not production code: no machine of this project has a GPU, yet the
templates must be exercised end to end: rendered by Inductor, launched by its wrapper,
numerically checked (tests), and their kernels and buffers shown (cce-dump, the memory
report, the GPU-readiness check). With this harness active, Inductor compiles CPU graphs with
its Triton backend and Triton runs every kernel in its numpy interpreter:

    from cce_inductor.tools import interpreter
    with interpreter.interpreted():
        torch.compile(fn)(cpu_tensors)

What it arranges (each piece is needed, see DESIGN.md "Testing without a GPU"):
  * TRITON_INTERPRET=1, so every `triton.jit` made from now on is interpreted; the jitted
    helpers made before (triton.language's, Inductor's triton_helpers) are swapped for
    interpreted versions;
  * Inductor's Triton backend for CPU graphs, no epilogue-fusion benchmarking, and kernels
    compiled in this process (`compat.inductor_triton_on_cpu`);
  * an active Triton driver that reports an sm_80 GPU target, since the interpreter has none;
  * `triton_helpers.set_driver_to_cpu` a no-op (no triton-cpu backend exists here);
  * `triton_helpers.libdevice` served by `triton.language.math` plus interpreted versions of
    the functions it lacks (`interpreter_math`; the same ones in triton 3.6, 3.8 and 3.9);
  * where the interpreter cannot use a scalar as a Python int (triton 3.6 with numpy >= 2.4),
    scalars that can (see `_scalar_index_refused`);
  * and the one switch production code reads: CPU tensors take the Triton templates
    (`lowering.common.cpu_tensors_take_templates`), and whether their bf16 `tl.dot` operands
    are upcast: where this interpreter multiplies bf16 wrongly (`bf16_dot_is_exact`; so far
    every triton tried: 3.6, 3.8, 3.9).
Interpreter timings mean nothing and Inductor's generic reductions run element by element, so
keep shapes tiny. Process-wide state is changed; `interpreted()` restores it on exit (kernels
compiled inside stay interpreted).
"""

from __future__ import annotations

import contextlib
import functools
import operator
import os
import sys
import types
import warnings
from typing import Any, Callable, Iterator

from cce_inductor import compat
from cce_inductor.lowering import common

_active_depth = 0


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


class _Reinterpreter:
    """Interpreted stand-ins for compiled-mode `triton.jit` functions, one per function.

    `triton.jit` decides between compiled and interpreted when a function is decorated, so
    the helpers defined when triton was imported (tl.zeros, tl.sum, triton_helpers.max2, ...)
    would refuse to run inside an interpreted kernel if triton came before TRITON_INTERPRET.
    """

    def __init__(self) -> None:
        self._interpreted: dict[int, Any] = {}

    def __call__(self, function: Any) -> Any:
        from triton.runtime.interpreter import InterpretedFunction

        return self._interpreted.setdefault(id(function), InterpretedFunction(function.fn))

    def swap_triton_language(self) -> list[tuple[Any, str, Any]]:
        """Swap every jitted function of triton.language for its stand-in; return what was
        replaced, for restoring."""
        from triton.runtime.jit import JITFunction
        import triton.language as tl

        owners: list[Any] = [
            module for name, module in list(sys.modules.items())
            if module is not None and (name == "triton.language"
                                       or name.startswith("triton.language."))
        ]
        owners.append(tl.tensor)  # member functions such as x.sum(), x.to()
        replaced = []
        for owner in owners:
            for name, value in list(vars(owner).items()):
                if isinstance(value, JITFunction):
                    setattr(owner, name, self(value))
                    replaced.append((owner, name, value))
        return replaced


def _scalar_index(tensor: Any) -> int:
    """A scalar of an interpreted kernel (a one-element numpy array) as a Python int."""
    return int(tensor.handle.data.squeeze())


@functools.cache
def _scalar_index_refused() -> bool:
    """Whether this triton's interpreter cannot use a scalar as a Python int (`range(begin,
    end, BLOCK)` over computed bounds, as the forward template loops): triton 3.6's interpreter
    converts with `int(array)`, which numpy >= 2.4 refuses for a one-element array of ndim 1
    (triton-lang/triton#9171, fixed by #9172; triton 3.8 and 3.9 squeeze first). Probed, since
    it depends on both triton's and numpy's versions."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter as triton_interpreter

    scope = triton_interpreter._LangPatchScope()
    triton_interpreter._patch_lang_tensor(tl.tensor, scope)
    try:
        scalar = tl.tensor(triton_interpreter.TensorHandle(np.array([1], np.int32), tl.int32),
                           tl.int32)
        operator.index(scalar)
        return False
    except TypeError:
        return True
    finally:
        scope.restore()


def _squeezing_scalar_index() -> Callable[[], None]:
    """Make the interpreter's scalars usable as Python ints where it refuses (see
    `_scalar_index_refused`); return the undo. The interpreter patches `tl.tensor` anew for
    every kernel launch, so its patching function is wrapped."""
    from triton.runtime import interpreter as triton_interpreter

    if not _scalar_index_refused():
        return lambda: None
    original = triton_interpreter._patch_lang_tensor

    def patch_lang_tensor(tensor: Any, scope: Any) -> None:
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", _scalar_index)

    triton_interpreter._patch_lang_tensor = patch_lang_tensor

    def undo() -> None:
        triton_interpreter._patch_lang_tensor = original

    return undo


@functools.cache
def bf16_dot_is_exact() -> bool:
    """Whether this triton's interpreter computes a bf16 `tl.dot` right; call it with
    TRITON_INTERPRET=1 set. Triton 3.6, 3.8 and 3.9 store bf16 as uint16 and multiply the bit
    patterns (triton-lang/triton#11584; fp16 and fp32 operands are exact, numpy multiplies them
    in fp32). Probed on small integers, whose products and sums are exact in bf16 with fp32
    accumulation."""
    import torch
    import triton

    from cce_inductor.tools import interpreter_math

    size = 16
    generator = torch.Generator().manual_seed(0)
    a, b = (torch.randint(-2, 3, (size, size), generator=generator).to(torch.bfloat16)
            for _ in range(2))
    product = torch.empty(size, size)
    triton.jit(interpreter_math.dot_probe)[(1,)](a, b, product, SIZE=size)
    return torch.equal(product, a.float() @ b.float())


@contextlib.contextmanager
def interpreted() -> Iterator[None]:
    """Within the block, Inductor compiles CPU graphs to Triton and Triton interprets them."""
    global _active_depth
    saved_env = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    import triton

    reinterpret = _Reinterpreter()
    replaced = reinterpret.swap_triton_language()
    undo_scalar_index = _squeezing_scalar_index()
    driver = triton.runtime.driver
    saved_driver = driver._active
    driver.set_active(_InterpreterDriver())
    _active_depth += 1
    try:
        with compat.inductor_triton_on_cpu(_interpreted_libdevice(), reinterpret), \
                common.cpu_tensors_take_templates(upcast_bf16_dots=not bf16_dot_is_exact()):
            yield
    finally:
        _active_depth -= 1
        driver._active = saved_driver
        for owner, name, original in replaced:
            setattr(owner, name, original)
        undo_scalar_index()
        if saved_env is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved_env


def is_active() -> bool:
    """True inside `interpreted()`."""
    return _active_depth > 0


@contextlib.contextmanager
def triton_on_cpu(active: bool = True) -> Iterator[None]:
    """`interpreted()` when `active` (else nothing), for the tools: Inductor compiles CPU graphs
    to the Triton kernels a GPU would get, the CCE templates included, and Triton's interpreter
    runs them; numpy's overflow warnings from masked-off lanes are silenced."""
    if not active:
        yield
        return
    with interpreted(), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield
