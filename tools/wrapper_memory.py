"""The memory an Inductor-compiled graph allocates, read from its generated Python wrapper.

The wrapper's `call(args)` is straight-line code: buffers come from `empty_strided_<device>(...)`
or from fallback ops (`torch.ops.<ns>.<op>.default(...)`), alias each other through
`reinterpret_tensor`, indexing and `bufX = bufY; del bufY  # reuse`, and die at `del`. This
module replays those statements on the `meta` device, with every symbolic size bound to the
value asked for, so a graph compiled at a tiny shape with dynamic shapes tells what it would
allocate at any shape, without allocating or running anything. Kernel launches are skipped
(they write into buffers that already exist). The live bytes after each statement give the
peak; what is still live at `return` is what the graph hands back (outputs, saved tensors).

Live bytes count from zero at the call: buffers the graph allocates add, and inputs the graph
owns subtract once the wrapper drops them. A backward owns what AOT autograd hands over to it
(the tensors saved for it, the incoming gradient); `primals_*` (and `argN_M` of a forward-only
graph) are the caller's tensors and never freed here. Memory a fallback op uses inside itself,
beyond its outputs, is invisible (on CUDA every CCE buffer is a wrapper buffer).
"""

from __future__ import annotations

import ast
import dataclasses
import re
from typing import Any, Optional

import torch

from cce_inductor import compat


@dataclasses.dataclass
class Allocation:
    name: str
    source: str  # "empty_strided" or the fallback op that returned it
    shape: tuple[int, ...]
    dtype: torch.dtype
    nbytes: int


@dataclasses.dataclass
class GraphMemory:
    allocations: list[Allocation]
    peak_bytes: int  # the most live bytes (allocated minus owned inputs freed) at one time
    returned_bytes: int  # allocated by this graph and still live at return


def caller_owned(name: str) -> bool:
    """Graph inputs the caller keeps (the user's tensors): primals, and a forward-only graph's
    arguments."""
    return name.startswith("primals_") or re.fullmatch(r"arg\d+_\d+", name) is not None


class UnsupportedWrapper(ValueError):
    """The wrapper holds a statement this replay cannot follow; no number is better than a
    wrong one."""


def call_body(source: str) -> list[str]:
    """The statements of the wrapper's `call` function, `;`-joined lines split."""
    return [ast.unparse(statement) for statement in _flatten(_function(source, "call").body)]


def _flatten(statements: list[ast.stmt]) -> list[ast.stmt]:
    """`with` blocks (device guards, profiler records) contribute their bodies."""
    flat = []
    for statement in statements:
        if isinstance(statement, ast.With):
            flat.extend(_flatten(statement.body))
        else:
            flat.append(statement)
    return flat


def _function(source: str, name: str) -> ast.FunctionDef:
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef) and node.name == name:
            return node
    raise UnsupportedWrapper(f"no `def {name}` in the wrapper source")


def argument_names(source: str) -> list[str]:
    """The names `call` unpacks its arguments into (primals_1, tangents_1, ...)."""
    for statement in _function(source, "call").body:
        if isinstance(statement, ast.Assign) and ast.unparse(statement.value) == "args":
            target = statement.targets[0]
            return [ast.unparse(element) for element in getattr(target, "elts", [target])]
    raise UnsupportedWrapper("call() does not unpack its arguments")


def _asserted_layouts(source: str) -> dict[str, tuple[str, str]]:
    """name -> (sizes, strides) source text of each `assert_size_stride` in `call`, and of
    each tensor of an `assert_size_stride_grouped((names), (sizes), (strides), ...)` (the form
    torch 2.14's wrappers use for the inputs)."""
    layouts = {}
    for statement in call_body(source):
        node = ast.parse(statement).body[0]
        if not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Call)):
            continue
        function, args = ast.unparse(node.value.func), node.value.args
        if function == "assert_size_stride":
            name, sizes, strides = (ast.unparse(arg) for arg in args[:3])
            layouts[name] = (sizes, strides)
        elif function == "assert_size_stride_grouped":
            for name, sizes, strides in zip(*(arg.elts for arg in args[:3])):
                layouts[ast.unparse(name)] = (ast.unparse(sizes), ast.unparse(strides))
    return layouts


def _symbols(source: str, arguments: dict[str, Any]) -> dict[str, int]:
    """The symbolic sizes `call` binds (`s48 = primals_1`, `s59 = s48`) at the values of the
    integer arguments given."""
    values = {name: value for name, value in arguments.items() if isinstance(value, int)}
    for statement in call_body(source):
        node = ast.parse(statement).body[0]
        if (isinstance(node, ast.Assign) and isinstance(node.value, ast.Name)
                and node.value.id in values and isinstance(node.targets[0], ast.Name)):
            values[node.targets[0].id] = values[node.value.id]
    return values


def _meta_empty_strided(size, stride, dtype=None, *args, **kwargs) -> torch.Tensor:
    return torch.empty_strided(tuple(size), tuple(stride), dtype=dtype, device="meta")


def _reinterpret_tensor(tensor, size, stride, offset=0) -> torch.Tensor:
    return tensor.as_strided(tuple(size), tuple(stride), offset)


def _namespace() -> dict[str, Any]:
    functions = {
        "torch": torch,
        "reinterpret_tensor": _reinterpret_tensor,
        "empty_strided": _meta_empty_strided,
        "get_raw_stream": lambda *args: 0,
    }
    for device in ("cpu", "cuda", "xpu", "mps", "cpu_pinned"):
        functions[f"empty_strided_{device}"] = _meta_empty_strided
    return functions


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [tensor for item in value for tensor in _tensors(item)]
    return []


def _storage(tensor: torch.Tensor) -> int:
    return compat.storage_key(tensor)


def replay(source: str, sizes: Optional[dict[int, int]] = None) -> GraphMemory:
    """Replay a wrapper's `call` on the meta device.

    sizes maps the example value of each symbolic size (as `get_args` shows it) to the value
    wanted; None keeps the example shape. A symbolic size missing from `sizes` is an error,
    so a shape the caller did not mean can never slip in.
    """
    return _Replay(source, sizes).run(call_body(source))


class _Replay:
    def __init__(self, source: str, sizes: Optional[dict[int, int]]) -> None:
        self.namespace = _namespace()
        self.allocations: dict[int, Allocation] = {}  # by storage
        self.input_storages: set[int] = set()
        self.owned_inputs: dict[int, int] = {}  # storage -> bytes, inputs freed when dropped
        # Every storage seen stays referenced here, so no freed storage's address (the key)
        # can be reused by a later one.
        self.seen: list[torch.Tensor] = []
        self.sizes = sizes
        inputs = self._example_inputs(source)
        for name in argument_names(source):
            value = inputs[name]
            self.namespace[name] = value
            if isinstance(value, torch.Tensor):
                key = _storage(value)
                self.input_storages.add(key)
                self.seen.append(value)
                if not caller_owned(name):
                    self.owned_inputs[key] = value.untyped_storage().nbytes()

    def _example_inputs(self, source: str) -> dict[str, Any]:
        """Execute `get_args()` on the meta device with the sizes substituted: ints are
        symbolic sizes, `rand_strided` makes (dense) tensors, `torch.as_strided` views of a
        storage several inputs share (kept only without substitution). An input whose sizes
        are expressions of the symbolic sizes (a saved [cdiv(N, 16), ...] tensor) takes them
        from the wrapper's `assert_size_stride` of it, evaluated at the substituted sizes."""
        values: dict[str, Any] = {}
        asserted = _asserted_layouts(source)
        for statement in _function(source, "get_args").body:
            if not isinstance(statement, ast.Assign):
                continue
            name, value = ast.unparse(statement.targets[0]), statement.value
            function = ast.unparse(value.func) if isinstance(value, ast.Call) else None
            if isinstance(value, ast.Constant) and isinstance(value.value, int):
                values[name] = self._size(value.value, name)
            elif function == "rand_strided":
                size, stride = (ast.literal_eval(arg) for arg in value.args[:2])
                keywords = {keyword.arg: keyword.value for keyword in value.keywords}
                dtype = getattr(torch, ast.unparse(keywords["dtype"]).split(".")[-1])
                if self.sizes is not None and name in asserted and not all(
                        item in (0, 1) or item in self.sizes for item in size):
                    size, stride = (
                        eval(expression, {"max": max, "min": min}, _symbols(source, values))
                        for expression in asserted[name]
                    )
                else:
                    size, stride = ([self._size(item, name) for item in size],
                                    self._strides(size, stride, name))
                values[name] = _meta_empty_strided(size, stride, dtype)
            elif function == "torch.as_strided" and self.sizes is None:
                base = values[ast.unparse(value.args[0])]
                size, stride, *offset = (ast.literal_eval(arg) for arg in value.args[1:])
                values[name] = base.as_strided(size, stride, *offset)
            else:
                raise UnsupportedWrapper(
                    f"cannot make the example input `{ast.unparse(statement)}`"
                    + (" at other sizes" if function == "torch.as_strided" else "")
                )
        return values

    def _size(self, value: int, name: str) -> int:
        if self.sizes is None or value in (0, 1):
            return value
        if value not in self.sizes:
            raise UnsupportedWrapper(
                f"{name}: size {value} has no value to substitute; known example sizes: "
                f"{sorted(self.sizes)}"
            )
        return self.sizes[value]

    def _strides(self, size: tuple[int, ...], stride: tuple[int, ...], name: str) -> list[int]:
        """Input strides at the new sizes; inputs are dense, in any dimension order."""
        order = sorted(range(len(size)), key=lambda dim: stride[dim])
        new, expected, step = [0] * len(size), 1, 1
        for dim in order:
            if size[dim] != 1 and stride[dim] != expected:
                raise UnsupportedWrapper(f"{name}: input with strides {stride} is not dense")
            new[dim] = step
            expected *= size[dim]
            step *= self._size(size[dim], name)
        return new

    def run(self, statements: list[str]) -> GraphMemory:
        peak = 0
        with torch.device("meta"):  # a stray factory call must never allocate for real
            for statement in statements:
                node = ast.parse(statement).body[0]
                if isinstance(node, ast.Return):
                    returned = self._eval(node.value, statement) if node.value else ()
                    keys = {_storage(tensor) for tensor in _tensors(returned)}
                    returned_bytes = sum(
                        allocation.nbytes for key, allocation in self.allocations.items()
                        if key in keys
                    )
                    return GraphMemory(list(self.allocations.values()), peak, returned_bytes)
                self._execute(node, statement)
                peak = max(peak, self._live_bytes())
        raise UnsupportedWrapper("the wrapper's call() has no return statement")

    def _execute(self, node: ast.stmt, statement: str) -> None:
        if isinstance(node, ast.Delete):
            for target in node.targets:
                self.namespace.pop(ast.unparse(target), None)
        elif isinstance(node, ast.Expr):
            pass  # kernel launches, extern kernels writing into out=, asserts, args.clear()
        elif isinstance(node, ast.Assign) and len(node.targets) == 1:
            if ast.unparse(node.value) == "args":
                return  # the unpacking of the arguments, bound from get_args already
            value = self._eval(node.value, statement)
            target = node.targets[0]
            names = [target] if isinstance(target, ast.Name) else list(getattr(target, "elts", []))
            values = [value] if isinstance(target, ast.Name) else list(value)
            if not names or not all(isinstance(name, ast.Name) for name in names):
                raise UnsupportedWrapper(f"cannot replay `{statement}`")
            for name, item in zip(names, values):
                self.namespace[name.id] = item
                self._record(name.id, node.value, item)
        elif not isinstance(node, (ast.Import, ast.ImportFrom, ast.Pass, ast.Assert)):
            raise UnsupportedWrapper(f"cannot replay `{statement}`")

    def _eval(self, expression: ast.expr, statement: str) -> Any:
        try:
            return eval(ast.unparse(expression), self.namespace)
        except Exception as error:
            raise UnsupportedWrapper(f"cannot replay `{statement}`: {error!r}") from error

    def _record(self, name: str, expression: ast.expr, value: Any) -> None:
        """Register storages never seen before (new buffers); name provisional ones
        (`buf4[0]` of a multi-output op) after the variable they are first bound to."""
        call = ast.unparse(expression.func) if isinstance(expression, ast.Call) else None
        if call is None:
            source = "view"
        elif "empty_strided" in call:
            source = "empty_strided"
        else:
            source = re.sub(r"\.default$", "", call)
        single = isinstance(value, torch.Tensor)
        for index, tensor in enumerate(_tensors(value)):
            key = _storage(tensor)
            if key in self.input_storages:
                continue
            allocation = self.allocations.get(key)
            if allocation is None:
                self.seen.append(tensor)
                self.allocations[key] = Allocation(
                    name if single else f"{name}[{index}]", source, tuple(tensor.shape),
                    tensor.dtype, tensor.untyped_storage().nbytes(),
                )
            elif single and "[" in allocation.name:
                allocation.name = name

    def _live_bytes(self) -> int:
        keys = {_storage(tensor) for value in self.namespace.values() for tensor in _tensors(value)}
        allocated = sum(
            allocation.nbytes for key, allocation in self.allocations.items() if key in keys
        )
        freed = sum(nbytes for key, nbytes in self.owned_inputs.items() if key not in keys)
        return allocated - freed
