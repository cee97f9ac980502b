"""The memory compiled linear -> cross_entropy allocates at a preset shape, read without running.

    python -m cce_inductor.tools.memory_report --preset gemma2-2b
    cce-bench --preset gemma2-2b --memory-report          # the same

The loss (and loss + gradient) is compiled at a tiny shape with every size dynamic, by
torch.compile's default backend and by backend="cce", the latter planned for the preset (the cce
backward's vocabulary chunk count, which a compile at the preset would choose from the size
hints of N, V and D: `cce_inductor.lowering.backward.planned_for`). The generated wrappers are
then replayed at the preset's sizes on the `meta` device (`wrapper_memory`), which lists every buffer the
compiled code would allocate there and the peak, next to the paper's Table 1. On CUDA the
wrappers are CUDA's own; on a CPU-only machine, the cce graphs are compiled with Inductor's
Triton backend under Triton's interpreter (`cce_inductor.tools.interpreter`), so they hold
the same templates and buffers as on a GPU, while the default backend's graphs come from its
C++ backend (same buffers for this graph: logits, row statistics, gradients).

Columns (peak bytes beyond the inputs, outputs included): loss = the forward-only graph;
gradient = the backward graph (which frees the tensors saved for it as it goes); loss + gradient
= the forward's peak, or what the forward keeps for the backward plus the backward's peak,
whichever is larger.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from tabulate import tabulate

from cce_inductor import compat
from cce_inductor.tools import measure
from cce_inductor.tools.interpreter import triton_on_cpu
from cce_inductor.tools.presets import DTYPES, PRESETS, Shape, resolve
from cce_inductor.tools.wrapper_memory import Allocation, GraphMemory, replay

# A buffer this fraction of the fp32 logits or more that grows with N·V is listed as such; the
# cce backward's small per-tile maps (tile_max: 4 bytes per 2048 logits, the kept map: one byte
# per tile) grow with N·V too, far below it.
LOGIT_SCALE = 1 / 64
# Compile-time sizes: distinct, so each size is its own symbol, and D a multiple of 16 (tl.dot).
TINY = Shape(n=48, v=208, d=32, dtype="float32")
BACKENDS = (("torch.compile", "inductor"), ('backend="cce"', "cce"))
MODES = ("loss", "loss+grad")

# The paper's Table 1 (A100, Gemma 2 2B: N=8192, V=256000, D=2304), MB: loss, gradient, both.
PAPER_GEMMA2_2B = {
    "lower bound": (0.004, 1161, 1161),
    "CCE": (1, 1163, 1164),
    "torch.compile": (4000, 12000, 16000),
    "baseline (eager)": (24000, 16000, 28000),
}


@dataclasses.dataclass
class Buffer:
    implementation: str
    graph: str  # "loss" (forward only), "forward" or "backward" (of loss+grad)
    allocation: Allocation
    dims: str  # the shape in terms of N, V, D
    # At logit scale (at least LOGIT_SCALE of the fp32 [N, V] logits' bytes) and at least 4x
    # the bytes when N and V both double, near this shape.
    grows_with_nv: bool


@dataclasses.dataclass
class Report:
    shape: Shape
    preset: str
    code: str  # which generated code was read
    graphs: dict[tuple[str, str], GraphMemory]  # (implementation, graph)
    buffers: list[Buffer]

    def loss_bytes(self, implementation: str) -> int:
        return self.graphs[implementation, "loss"].peak_bytes

    def gradient_bytes(self, implementation: str) -> int:
        return self.graphs[implementation, "backward"].peak_bytes

    def loss_and_gradient_bytes(self, implementation: str) -> int:
        forward = self.graphs[implementation, "forward"]
        backward = self.graphs[implementation, "backward"]
        return max(forward.peak_bytes, forward.returned_bytes + backward.peak_bytes)


def _loss(hidden: torch.Tensor, classifier: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(F.linear(hidden, classifier), target)


@contextlib.contextmanager
def code_generation(backend: str, device: torch.device,
                    planned: Optional[Shape] = None) -> Iterator[None]:
    """On a CPU, the cce graphs go through the Triton templates (interpreted), as on a GPU;
    with `planned`, the cce backward is planned for that shape's N, V and D."""
    from cce_inductor.lowering import backward

    with triton_on_cpu(backend == "cce" and device.type == "cpu"), \
            backward.planned_for(*((planned.n, planned.v, planned.d) if planned else ())):
        yield


def make_inputs(
    shape: Shape, device: torch.device, with_grad: bool, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hidden states, classifier and targets with every size marked dynamic."""
    generator = torch.Generator().manual_seed(seed)
    dtype = shape.torch_dtype
    hidden = torch.randn(shape.n, shape.d, generator=generator).to(device, dtype)
    classifier = torch.randn(shape.v, shape.d, generator=generator).to(device, dtype)
    target = torch.randint(0, shape.v, (shape.n,), generator=generator).to(device)
    hidden.requires_grad_(with_grad)
    classifier.requires_grad_(with_grad)
    for tensor in (hidden, classifier, target):
        for dim in range(tensor.dim()):
            compat.mark_dynamic(tensor, dim)
    return hidden, classifier, target


def compile_wrappers(
    backend: str, mode: str, shape: Shape, device: torch.device, planned: Optional[Shape] = None
) -> tuple[list[str], Callable[..., torch.Tensor]]:
    """Compile the loss (one graph) or loss+grad (forward, backward) at `shape` with every
    size dynamic (Dynamo raises if one gets specialized), planned for `planned` (see
    code_generation); return the wrapper sources and the compiled loss, which serves any other
    shape without recompiling."""
    torch.compiler.reset()
    with_grad = mode == "loss+grad"
    hidden, classifier, target = make_inputs(shape, device, with_grad)
    compiled = torch.compile(_loss, backend=backend, dynamic=True)

    def run() -> None:
        loss = compiled(hidden, classifier, target)
        if with_grad:
            loss.backward()

    with code_generation(backend, device, planned):
        _, sources = compat.run_and_get_code(run)
    expected = 2 if with_grad else 1
    if len(sources) != expected:
        raise RuntimeError(f"expected {expected} compiled graphs for {mode}, got {len(sources)}")
    return sources, compiled


def sizes_at(shape: Shape) -> dict[int, int]:
    """The substitution of each compile-time (TINY) size by the size of `shape`."""
    return {TINY.n: shape.n, TINY.v: shape.v, TINY.d: shape.d}


def _dims(base: Allocation, scaled: dict[str, Allocation], shape: Shape) -> str:
    """Name each dimension by the sizes it follows (found by replaying with one size doubled)."""
    values = {"N": shape.n, "V": shape.v, "D": shape.d}
    names = []
    for index, extent in enumerate(base.shape):
        follows = [symbol for symbol, other in scaled.items() if other.shape[index] != extent]
        if not follows:
            names.append(str(extent))
        elif len(follows) == 1 and extent == values[follows[0]]:
            names.append(follows[0])
        else:
            names.append(f"f({','.join(follows)})")
    return "[" + ", ".join(names) + "]"


def analyse(source: str, shape: Shape) -> tuple[GraphMemory, list[tuple[str, bool]]]:
    """Replay at `shape`; for each buffer its dimensions in terms of N, V, D and whether it
    grows with N·V here (sizes such as a split count that is capped, or that shrinks as N
    grows, follow V only for some shapes: the verdict holds near `shape`)."""
    memory = replay(source, sizes_at(shape))
    scaled = {
        "N": replay(source, sizes_at(dataclasses.replace(shape, n=2 * shape.n))),
        "V": replay(source, sizes_at(dataclasses.replace(shape, v=2 * shape.v))),
        "D": replay(source, sizes_at(dataclasses.replace(shape, d=2 * shape.d))),
    }
    both = replay(source, sizes_at(dataclasses.replace(shape, n=2 * shape.n, v=2 * shape.v)))
    logit_bytes = shape.n * shape.v * 4
    facts = [
        (
            _dims(allocation, {key: other.allocations[i] for key, other in scaled.items()}, shape),
            allocation.nbytes >= LOGIT_SCALE * logit_bytes
            and both.allocations[i].nbytes >= 4 * allocation.nbytes,
        )
        for i, allocation in enumerate(memory.allocations)
    ]
    return memory, facts


def build(shape: Shape, preset: str, device: Optional[torch.device] = None) -> Report:
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tiny = dataclasses.replace(TINY, dtype=shape.dtype)
    graphs: dict[tuple[str, str], GraphMemory] = {}
    buffers: list[Buffer] = []
    for implementation, backend in BACKENDS:
        for mode in MODES:
            sources, _ = compile_wrappers(backend, mode, tiny, device, planned=shape)
            names = ["loss"] if mode == "loss" else ["forward", "backward"]
            for graph, source in zip(names, sources):
                memory, facts = analyse(source, shape)
                graphs[implementation, graph] = memory
                buffers += [
                    Buffer(implementation, graph, allocation, dims, grows)
                    for allocation, (dims, grows) in zip(memory.allocations, facts)
                ]
    if device.type == "cuda":
        code = "CUDA wrappers"
    else:
        code = ("CPU: torch.compile from Inductor's C++ backend; cce from its Triton backend "
                "under the Triton interpreter (the GPU templates)")
    return Report(shape, preset, code, graphs, buffers)


def render(report: Report, top: int = 12) -> str:
    shape = report.shape
    lines = [
        f"Memory of compiled linear -> cross_entropy at {report.preset} ({shape.describe()}), "
        f"read from Inductor's generated code compiled at N={TINY.n}, V={TINY.v}, D={TINY.d} "
        f"with dynamic shapes and replayed at full size without running ({report.code}).",
        "",
    ]
    rows = [
        [
            implementation,
            measure.megabytes(report.loss_bytes(implementation)),
            measure.megabytes(report.gradient_bytes(implementation)),
            measure.megabytes(report.loss_and_gradient_bytes(implementation)),
        ]
        for implementation, _ in BACKENDS
    ]
    gradients = (shape.n + shape.v) * shape.d * shape.torch_dtype.itemsize
    rows.append(["lower bound: the gradients (N+V)·D", "—", measure.megabytes(gradients),
                 measure.megabytes(gradients)])
    headers = ["implementation", "loss MB", "gradient MB", "loss + gradient MB"]
    lines.append(tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True))
    if (shape.n, shape.v, shape.d, shape.dtype) == (8192, 256000, 2304, "bfloat16"):
        paper = [[name, *values] for name, values in PAPER_GEMMA2_2B.items()]
        lines += ["", "The paper's Table 1 (A100, measured), MB:",
                  tabulate(paper, headers=["method", "loss", "gradient", "loss + gradient"],
                           tablefmt="github", disable_numparse=True)]
    largest = sorted(
        (buffer for buffer in report.buffers if buffer.allocation.nbytes),
        key=lambda buffer: -buffer.allocation.nbytes,
    )[:top]
    buffer_rows = [
        [buffer.implementation, buffer.graph, buffer.allocation.name, buffer.dims,
         str(buffer.allocation.dtype).replace("torch.", ""),
         measure.megabytes(buffer.allocation.nbytes), buffer.allocation.source]
        for buffer in largest
    ]
    lines += ["", f"Largest buffers ({len(largest)} of {len(report.buffers)}):",
              tabulate(buffer_rows, headers=["implementation", "graph", "buffer", "shape", "dtype",
                                             "MB", "allocated by"],
                       tablefmt="github", disable_numparse=True)]
    quadratic = [
        f"{buffer.implementation} {buffer.graph} {buffer.allocation.name} {buffer.dims}"
        for buffer in report.buffers if buffer.grows_with_nv
    ]
    lines += ["", "Buffers that grow with N·V, of logit scale (at least "
              f"1/{round(1 / LOGIT_SCALE)} of the fp32 logits): " + ("; ".join(quadratic) or "none")]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cce_inductor.tools.memory_report",
        description="Buffers compiled linear -> cross_entropy allocates at a preset shape, read "
        "from Inductor's generated code without running at that shape.",
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="gemma2-2b")
    parser.add_argument("--n", type=int)
    parser.add_argument("--v", type=int)
    parser.add_argument("--d", type=int)
    parser.add_argument("--dtype", choices=DTYPES)
    parser.add_argument("--top", type=int, default=12, help="largest buffers listed")
    args = parser.parse_args(argv)
    shape = resolve(args.preset, args.n, args.v, args.d, args.dtype)
    print(render(build(shape, args.preset), args.top))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
