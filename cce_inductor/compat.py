"""Everything that differs across the supported torch versions (2.11 to 2.15), and every use of
a private torch API, lives here so the rest of the project reads as plain torch."""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Iterator, Optional

import torch
from torch import Tensor

TORCH_VERSION = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])

# torch's own fused loss, F.linear_cross_entropy (chunked, with LinearCrossEntropyOptions),
# exists from torch 2.13; before it there is no such call for the graph pass to find.
HAS_TORCH_LINEAR_CROSS_ENTROPY = hasattr(torch.nn.functional, "linear_cross_entropy")
NO_TORCH_LINEAR_CROSS_ENTROPY = (f"torch {torch.__version__} has no "
                                 "torch.nn.functional.linear_cross_entropy (added in 2.13)")


def assert_async(condition: Tensor, message: str) -> None:
    """A graph assert: fails at run time when `condition` (a bool tensor) is false, without a
    host sync while tracing."""
    torch._assert_async(condition, message)


def is_traced(tensor: Tensor) -> bool:
    """True while Dynamo or AOT autograd traces (fake or functional tensors): data-dependent
    Python control flow is impossible there, so checks must become graph asserts."""
    if torch.compiler.is_compiling():
        return True
    from torch._subclasses.fake_tensor import is_fake

    return is_fake(tensor) or torch._is_functional_tensor(tensor)


# --- Command-line tools (cce_inductor.tools): allocator events, storages, Inductor config -----


def storage_key(tensor: Tensor) -> int:
    """An id of the tensor's storage, the same for every view of it (also on the meta device,
    where data pointers are all 0)."""
    return tensor.untyped_storage()._cdata


def allocation_events(profiler) -> list[tuple[int, int]]:
    """(time in ns, bytes) of each allocation (positive) and free (negative) that a
    `torch.profiler.profile(profile_memory=True)` run saw, in time order. Only kineto's
    event tree keeps them one by one; `profiler.events()` folds allocations into their ops."""
    from torch._C._profiler import _EventType

    events: list[tuple[int, int]] = []
    stack = list(profiler.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation:
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
        stack.extend(node.children)
    return sorted(events, key=lambda event: event[0])


def inductor_auto_chunker():
    """Config patch turning on Inductor's auto_chunker (off by default; static shapes only)."""
    import torch._inductor.config as inductor_config

    return inductor_config.patch({"auto_chunker.enable": True})


# --- oneDNN matmul (cce_inductor.blocked) -----------------------------------------------------
# torch's fp32 CPU matmul calls MKL, which runs its AVX-512 kernels on Intel CPUs only (an AMD
# EPYC with AVX-512 gets about 0.4x the fp32 rate of oneDNN's kernels). oneDNN's inner product
# is reachable through mkldnn::_linear_pointwise, the op Inductor's CPU freezing pass emits.


@functools.cache
def _onednn_linear_op():
    # Only where oneDNN's fp32 kernels are the AVX-512 ones this choice was measured with.
    if not torch.backends.mkldnn.is_available():
        return None
    if not torch.backends.cpu.get_cpu_capability().startswith("AVX512"):
        return None
    try:
        return torch.ops.mkldnn._linear_pointwise.default
    except (AttributeError, RuntimeError):
        return None


def onednn_linear(x: Tensor, w: Tensor) -> Optional[Tensor]:
    """x @ w.T for 2-D fp32 CPU tensors by oneDNN, as a new tensor, or None where it cannot
    serve them. w must be contiguous or the transpose of a contiguous tensor (oneDNN reads both
    layouts in place; any other strides fall to its slow reference kernel); x is copied to
    contiguous when it is not."""
    op = _onednn_linear_op()
    if op is None or x.shape[1] == 0 or not (w.is_contiguous() or w.T.is_contiguous()):
        return None
    return op(x, w, None, "none", [], "")


# --- Functional collectives (cce_inductor.vocab_parallel) ------------------------------------
# torch.distributed._functional_collectives is private, but its out-of-place collectives are the
# form that eager mode, Dynamo and AOT autograd all handle (c10d's in-place ones are eager-only).


def all_reduce(tensor: Tensor, op: str, group) -> Tensor:
    """Out-of-place all-reduce ('sum' or 'max') over a process group, waited for."""
    from torch.distributed import _functional_collectives as funcol

    return _waited(funcol.all_reduce(tensor, op, group))


def all_gather(tensor: Tensor, group) -> Tensor:
    """The ranks' tensors concatenated along dim 0 in group-rank order, waited for."""
    from torch.distributed import _functional_collectives as funcol

    # all_gather_single replaced the (now deprecated) all_gather_tensor in newer releases.
    gather = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor
    return _waited(gather(tensor, 0, group))


def _waited(tensor: Tensor) -> Tensor:
    """Eager collectives return an AsyncCollectiveTensor; unwrap it so it never escapes into
    autograd or user code. While tracing they return plain tensors already."""
    from torch.distributed import _functional_collectives as funcol

    return tensor.wait() if isinstance(tensor, funcol.AsyncCollectiveTensor) else tensor


# --- DTensor layouts (cce_inductor.dtensor_sites) ---------------------------------------------


def real_device_mesh(mesh):
    """The DeviceMesh behind `mesh`: Dynamo's example values hold a FakeScriptObject standing
    for the user's mesh (DeviceMesh is an opaque reference type), which keeps it as real_obj."""
    from torch._library.fake_class_registry import FakeScriptObject

    if isinstance(mesh, FakeScriptObject):
        return object.__getattribute__(mesh, "real_obj")
    return mesh


def shard_block(size: int, num_chunks: int, rank: int) -> tuple[int, int]:
    """(offset, length) of `rank`'s block when a dim of `size` is Shard()-ed over `num_chunks`
    ranks, as DTensor lays it out (torch.chunk: blocks of ceil(size / num_chunks), the last ones
    shorter or empty). The method is public from torch 2.13, private before."""
    from torch.distributed.tensor import Shard

    split = getattr(Shard, "local_shard_size_and_offset", None) or \
        Shard(0)._local_shard_size_and_offset
    length, offset = split(size, num_chunks, rank)
    return int(offset), int(length)


# ---------------------------------------------------------------------------------------------
# Inductor lowering and Triton templates (used by cce_inductor.lowering). Imports are lazy:
# torch._inductor.lowering takes seconds to import and `import cce_inductor` must stay light.
# ---------------------------------------------------------------------------------------------


# The module whose import makes Inductor able to lower graphs (cce_inductor.lowering.registration
# registers the CCE lowerings right after it loads).
INDUCTOR_LOWERING_MODULE = "torch._inductor.lowering"


@contextlib.contextmanager
def inductor_triton_on_cpu(libdevice, interpreted: Callable[[Any], Any]) -> Iterator[None]:
    """Inductor's side of the Triton-interpreter harness (cce_inductor.tools.interpreter), for
    the block: CPU graphs compile with the Triton backend, in this process (compile-pool workers
    would build kernels without the interpreter), with no epilogue-fusion benchmarking; in
    Inductor's runtime triton_helpers, set_driver_to_cpu is a no-op (no triton-cpu backend
    here), libdevice is `libdevice`, and each triton.jit function `fn` is `interpreted(fn)`.
    Everything is restored on exit."""
    import torch._inductor.config as inductor_config
    from torch._inductor.runtime import triton_helpers
    from triton.runtime.jit import JITFunction

    replaced = {name: value for name, value in vars(triton_helpers).items()
                if isinstance(value, JITFunction)}
    replaced.update(set_driver_to_cpu=triton_helpers.set_driver_to_cpu,
                    libdevice=triton_helpers.libdevice)
    for name, value in replaced.items():
        if isinstance(value, JITFunction):
            setattr(triton_helpers, name, interpreted(value))
    triton_helpers.set_driver_to_cpu = lambda: None
    triton_helpers.libdevice = libdevice
    try:
        with inductor_config.patch(cpu_backend="triton", benchmark_epilogue_fusion=False,
                                   compile_threads=1):
            yield
    finally:
        for name, value in replaced.items():
            setattr(triton_helpers, name, value)


def register_inductor_lowering(op, lowering_fn) -> None:
    """Make `lowering_fn` Inductor's lowering of `op` (an OpOverload); re-registering replaces."""
    from torch._inductor.lowering import register_lowering

    register_lowering(op, type_promotion_kind=None)(lowering_fn)


def lower_as_fallback(op, *args):
    """Lower a call of `op` as a call of its eager implementation (an extern kernel)."""
    from torch._inductor.lowering import fallback_handler

    return fallback_handler(op, add_to_fallback_set=False)(*args)


def empty_buffer(size, dtype, device):
    """An uninitialized Inductor buffer with contiguous strides."""
    from torch._inductor.lowering import empty_strided

    return empty_strided(size, None, dtype=dtype, device=device)


def zeros_buffer(size, dtype, device):
    """A realized zero-filled Inductor buffer (an accumulator that kernels add into)."""
    from torch._inductor.lowering import full

    node = full(size, 0, dtype=dtype, device=device)
    node.realize()
    return node


def cast_buffer(node, dtype):
    """`node` converted to `dtype` (an Inductor pointwise node)."""
    from torch._inductor.lowering import to_dtype

    return to_dtype(node, dtype)


def fixed_layout(device, dtype, size):
    """A contiguous FixedLayout, the layout of a template's own output."""
    from torch._inductor.ir import FixedLayout, FlexibleLayout

    return FixedLayout(device, dtype, size, FlexibleLayout.contiguous_strides(size))


def triton_template(name: str, grid, source: str):
    """An Inductor TritonTemplate whose grid is `grid(*call_sizes, meta)` built from sympy sizes.
    Its inputs must have frozen layouts (`freeze_template_inputs`)."""
    from torch._inductor.select_algorithm import SymbolicGridFn, TritonTemplate

    existing = TritonTemplate.all_templates.get(name)
    if existing is not None:
        return existing
    return TritonTemplate(name=name, grid=SymbolicGridFn(grid), source=source)


def freeze_template_inputs(nodes) -> None:
    """Fix the layout of every template input now, before the template renders its strides.

    Otherwise Inductor renders a template with the strides a flexible buffer would get and
    freezes the buffer only later, checking the two agree only when it finalizes a choice among
    several (MultiTemplateBuffer); any other later decision about that buffer's layout would
    leave the kernel reading wrong strides. torch 2.13 offers TritonTemplate(...,
    always_freeze_layout=True) for this (FlexAttention uses it); torch 2.11 has no such argument
    (TypeError), while freezing the inputs, as 2.11's FlexAttention does for its buffers, works on
    every version. Views keep their own fixed layout (their freeze_layout is a no-op)."""
    for node in nodes:
        node.freeze_layout()


def autotune_select(name: str, choices, input_nodes, layout, input_gen_fns):
    """Inductor's autotune_select_algorithm, returning the chosen node: torch 2.11 returns the
    node, 2.13 and later return (node, choice)."""
    from torch._inductor.select_algorithm import autotune_select_algorithm

    result = autotune_select_algorithm(name, choices, input_nodes, layout,
                                       input_gen_fns=input_gen_fns)
    return result[0] if isinstance(result, tuple) else result


@contextlib.contextmanager
def autotune_timings() -> Iterator[dict[str, list[float]]]:
    """Within the block, the benchmark timings Inductor's autotuner takes: the name of each
    autotuned op (e.g. "cce_forward") -> one timing per choice it benchmarked, in ms."""
    from torch._inductor.select_algorithm import get_algorithm_selector_cache

    timings: dict[str, list[float]] = {}

    def save(choice_timings, name, *_):
        timings.setdefault(name, []).extend(float(t) for t in choice_timings.values())

    savers = get_algorithm_selector_cache().feedback_saver_fns
    savers.append(save)
    try:
        yield timings
    finally:
        savers.remove(save)


def max_autotune_enabled() -> bool:
    import torch._inductor.config as inductor_config

    return bool(inductor_config.max_autotune)


def custom_graph_pass_base() -> type:
    from torch._inductor.custom_graph_pass import CustomGraphPass

    return CustomGraphPass


def append_post_grad_pass(graph_pass) -> None:
    """Add `graph_pass` to Inductor's post-grad custom passes, keeping any pass already set
    (torch 2.13 accepts a list of passes)."""
    import torch._inductor.config as inductor_config

    current = inductor_config.post_grad_custom_post_pass
    if current is None:
        inductor_config.post_grad_custom_post_pass = graph_pass
    elif isinstance(current, (list, tuple)):
        if not any(type(p) is type(graph_pass) for p in current):
            inductor_config.post_grad_custom_post_pass = [*current, graph_pass]
    elif type(current) is not type(graph_pass):
        inductor_config.post_grad_custom_post_pass = [current, graph_pass]


def size_hints_of(exprs) -> list[int]:
    """Concrete example values of (possibly symbolic) sizes, for benchmark inputs."""
    from torch._inductor.virtualized import V

    sizevars = V.graph.sizevars
    hint = getattr(sizevars, "optimization_hint", None) or sizevars.size_hint  # 2.13 renamed it
    return [int(hint(e, fallback=8192)) for e in exprs]


def size_hints(node) -> list[int]:
    return size_hints_of(node.get_size())


def realize_template_input(node):
    """A realized buffer with a fixed layout and unit last stride, as templates need."""
    from torch._inductor.select_algorithm import realize_inputs

    return realize_inputs(node)


def sympy_size_functions():
    """(cdiv, min, max) on sympy sizes, as Inductor's symbolic template grids use them."""
    from torch.utils._sympy.functions import CeilDiv, Max, Min

    return CeilDiv, Min, Max


def maybe_mark_dynamic(tensor, dim: int) -> None:
    """Ask Dynamo to trace `dim` of `tensor` as dynamic (without error if it specializes)."""
    torch._dynamo.maybe_mark_dynamic(tensor, dim)


def mark_dynamic(tensor, dim: int) -> None:
    """Make Dynamo trace `dim` of `tensor` as dynamic (an error if it gets specialized)."""
    torch._dynamo.mark_dynamic(tensor, dim)


def functorch_transforms_active() -> bool:
    """True inside torch.func transforms (vmap, grad, ...), whose wrapped tensors an internal
    torch.compile should not see."""
    return bool(torch._C._are_functorch_transforms_active())


# ---------------------------------------------------------------------------------------------
# Graph pass and torch.compile backend (cce_inductor.patterns, .rewrite, .backend): how Dynamo
# graphs spell things, Dynamo's counters, and Inductor's handling of torch.compile's mode/options.
# ---------------------------------------------------------------------------------------------


def linear_functions() -> tuple:
    """How `F.linear` / `nn.Linear` appear as call_function targets in a Dynamo graph."""
    return (torch._C._nn.linear,)


def is_dtensor_redistribute(node) -> bool:
    """A DTensor `redistribute` (same values, another layout) in a Dynamo graph. From torch
    2.13 it is a call_method; torch 2.11's Dynamo traces it as a call of a function it makes on
    the fly, named "prim_redistribute", with the placements baked into its closure
    (torch/_dynamo/variables/tensor.py, method_redistribute)."""
    if node.op == "call_method":
        return node.target == "redistribute"
    return node.op == "call_function" and getattr(node.target, "__name__", None) == \
        "prim_redistribute"


def transposing_attribute_source(node):
    """x when the FX node reads the attribute x.T or x.mT, else None. Dynamo graphs up to torch
    2.13 spell it getattr(x, "T"); torch 2.14's Dynamo calls the aten view op behind the
    attribute instead (aten.numpy_T, aten.mT: torch/_dynamo/variables/tensor.py,
    _VIEW_ATTR_TO_ATEN_OP)."""
    if node.op != "call_function" or not node.args:
        return None
    if node.target is getattr:
        return node.args[0] if node.args[1] in ("T", "mT") else None
    aten = torch.ops.aten
    if node.target in (aten.numpy_T, aten.numpy_T.default, aten.mT, aten.mT.default):
        return node.args[0]
    return None


def example_value(node):
    """The fake tensor (or SymInt) Dynamo recorded for an FX node; None when it has none."""
    return node.meta.get("example_value")


def set_example_value(node, value) -> None:
    node.meta["example_value"] = value


def fake_mode_of(values):
    """The FakeTensorMode of the first fake tensor in `values` (None when there is none). Not
    the ambient one: Dynamo hands its backend inputs from a fresh fake mode, while the graph's
    example values stay in the mode Dynamo traced with."""
    from torch._subclasses.fake_tensor import FakeTensor

    return next((v.fake_mode for v in values if isinstance(v, FakeTensor)), None)


def same_size(a, b) -> bool:
    """Two sizes (ints or SymInts) known to be equal, without adding a guard."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    return statically_known_true(a == b)


def legacy_reduction(size_average, reduce) -> str:
    """The reduction named by the deprecated size_average/reduce loss arguments."""
    from torch.nn import _reduction

    return _reduction.legacy_get_string(size_average, reduce, emit_warning=False)


def dynamo_counters():
    """torch._dynamo.utils.counters: a defaultdict of collections.Counter, shown by
    torch._dynamo.utils.compile_times. torch._dynamo.reset() does not clear it: compare
    values before and after."""
    from torch._dynamo.utils import counters

    return counters


def dynamo_ignoring_calls(functions: frozenset):
    """A context in which Dynamo traces calls of `functions` (logging.Logger methods, or bound
    methods of logger objects) as no-ops, besides those the user's config already ignores:
    torch._dynamo.config.ignore_logging_functions (torch 2.11 to 2.13; 2.11 also names it
    ignore_logger_methods). Dynamo tests membership (`method in ignore_logging_functions`)."""
    import torch._dynamo.config as dynamo_config

    return dynamo_config.patch(ignore_logging_functions=set(
        dynamo_config.ignore_logging_functions) | {_Orderable(fn) for fn in functions})


class _Orderable(str):
    """A function that equals (and hashes as) `fn`, and is otherwise its repr: torch 2.11 sorts
    the config's sets and writes them as JSON when it records compile metrics
    (torch._dynamo.utils, whose blocklist names only the alias ignore_logger_methods), which
    fails on methods and logs an error per compiled frame."""

    fn: Callable[..., Any]

    def __new__(cls, fn: Callable[..., Any]) -> "_Orderable":
        orderable = super().__new__(cls, repr(fn))
        orderable.fn = fn
        return orderable

    def __eq__(self, other: object) -> bool:
        return self.fn == (other.fn if isinstance(other, _Orderable) else other)

    def __hash__(self) -> int:
        return hash(self.fn)


def forward_backend_context(backend_type: type) -> None:
    """Make torch.compile honour the `backend_ctx_ctor` attribute of backends of `backend_type`.

    Dynamo enters a backend's `backend_ctx_ctor()` around every call of a function compiled
    with it (torch._dynamo.eval_frame reads the attribute from the backend it is handed), but
    torch.compile hands it every backend other than Inductor wrapped in
    torch._TorchCompileWrapper, which does not pass the attribute on (2.11 to 2.13): without
    this, the context is only entered under torch._dynamo.optimize. The wrapper then copies the
    attribute from the backend it wraps, for this type only (other backends are not touched).
    Idempotent."""
    wrapper = torch._TorchCompileWrapper
    forwarded = getattr(wrapper, "_cce_forwarded_context_types", None)
    if forwarded is None:
        original_init = wrapper.__init__
        forwarded = wrapper._cce_forwarded_context_types = set()

        def init(self, backend, *args, **kwargs):
            original_init(self, backend, *args, **kwargs)
            compiler = getattr(self, "compiler_fn", None)
            if isinstance(compiler, tuple(forwarded)) and hasattr(compiler, "backend_ctx_ctor"):
                self.backend_ctx_ctor = compiler.backend_ctx_ctor

        wrapper.__init__ = init
    forwarded.add(backend_type)


def inductor_compiler(mode, options):
    """Inductor as torch.compile(backend="inductor", mode=mode, options=options) builds it:
    validates the options and turns both into config patches for compile_fx. torch.compile hands a
    custom backend the same mode= and options= keywords (torch._TorchCompileWrapper)."""
    return torch._TorchCompileInductorWrapper(mode, options, None)


def run_and_get_code(fn, *args, **kwargs):
    """(fn(*args, **kwargs), [source of every wrapper module Inductor generated meanwhile])."""
    from torch._inductor.utils import run_and_get_code as run

    return run(fn, *args, **kwargs)


def fresh_inductor_cache():
    """A context with empty Inductor caches (older torch names it fresh_inductor_cache)."""
    from torch._inductor import utils

    fresh = getattr(utils, "fresh_cache", None) or utils.fresh_inductor_cache
    return fresh()
