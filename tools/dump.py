"""cce-dump: compile a model with backend="cce" and write down everything the compiler made.

    cce-dump --out dump/                               # the built-in tiny causal LM
    cce-dump --out dump/ --model mypkg.models:make --shape batch=4 --shape seq=256
    cce-dump --out dump/ --cpu-backend cpp             # CPU: Inductor's C++ kernels, no Triton

`--model module:factory` names a function returning `(model, args)`; each `--shape KEY=INT` is
passed to it as a keyword. The model's output (a loss tensor, an object with `.loss`, or a
tuple whose first element is the loss) is back-propagated once, so the backward compiles too.

The folder gets:
    dynamo_graph_<i>_before.py / _after.py   each Dynamo graph before and after the CCE pass
    rewrite_decisions.txt                    what the pass did at each loss, and why
    output_code/<j>_<kind>.py                Inductor's generated code (forward, backward, ...)
    kernels/<j>_<kind>/<kernel>.py|.cpp      each generated kernel in its own file
    buffers.txt                              the buffers each compiled graph allocates, largest
                                             first (replayed from the code, see wrapper_memory)
    gpu_resources.txt                        registers, spills, shared memory and CTAs per SM
                                             of the default template configs for sm_80 and
                                             sm_90a at Gemma 2 2B's shape, compiled ahead of
                                             time (cce_inductor.tools.gpu_readiness)
    summary.txt                              the table printed at the end

On CUDA the kernels are the GPU's own. On a CPU, by default, Inductor's Triton backend runs
under Triton's interpreter (`cce_inductor.tools.interpreter`), so the kernels and buffers
are those a GPU would get; keep shapes tiny then, as interpreted kernels are slow.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import importlib
import sys
from pathlib import Path
from typing import Any, Callable, Iterator, Optional
from unittest import mock

import torch
from tabulate import tabulate

from cce_inductor import backend as cce_backend_module
from cce_inductor import compat
from cce_inductor.tools import measure
from cce_inductor.tools.interpreter import triton_on_cpu
from cce_inductor.tools.toy_lm import ToyLMConfig, WordTokenizer, batches, build_model
from cce_inductor.tools.wrapper_memory import (
    GraphMemory,
    UnsupportedWrapper,
    argument_names,
    replay,
)

KERNEL_FACTORIES = {"triton": ".py", "cpp_pybinding": ".cpp", "cpp": ".cpp", "cuda": ".cu"}


def toy_lm(batch: int = 2, seq: int = 16, vocab: int = 512, hidden: int = 32,
           layers: int = 1) -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
    """The built-in example: cce-demo's causal LM, tiny."""
    config = ToyLMConfig(vocab_size=vocab, hidden=hidden, layers=layers, heads=2, max_seq_len=seq)
    (ids, labels), = batches(WordTokenizer(), batch, seq, steps=1, seed=0)
    return build_model(config, seed=0), (ids, labels)


@dataclasses.dataclass
class DynamoGraph:
    before: str
    after: str
    decisions: list[Any]  # cce_inductor.rewrite.SiteReport


@contextlib.contextmanager
def recording_rewrites() -> Iterator[list[DynamoGraph]]:
    """Record each Dynamo graph the cce backend rewrites: the backend itself runs unchanged,
    its call of the pass is observed."""
    graphs: list[DynamoGraph] = []
    rewrite = cce_backend_module.rewrite_linear_cross_entropy

    def observed(gm: torch.fx.GraphModule, *args: Any, **kwargs: Any) -> list[Any]:
        before = gm.print_readable(print_output=False)
        decisions = rewrite(gm, *args, **kwargs)
        graphs.append(DynamoGraph(before, gm.print_readable(print_output=False), decisions))
        return decisions

    with mock.patch.object(cce_backend_module, "rewrite_linear_cross_entropy", observed):
        yield graphs


def graph_kind(source: str) -> str:
    """forward / backward / inference, from the names of the wrapper's arguments."""
    names = argument_names(source)
    if any(name.startswith("tangents_") for name in names):
        return "backward"
    return "forward" if any(name.startswith("primals_") for name in names) else "inference"


def kernels_of(source: str) -> dict[str, tuple[str, str]]:
    """{kernel name: (file suffix, source)} of the kernels a wrapper compiles."""
    kernels = {}
    for node in ast.parse(source).body:
        if not (isinstance(node, ast.Assign) and isinstance(node.value, ast.Call)):
            continue
        function = node.value.func
        if not isinstance(function, ast.Attribute):
            continue
        if ast.unparse(function.value) != "async_compile":
            continue
        suffix = KERNEL_FACTORIES.get(function.attr)
        strings = [arg.value for arg in node.value.args
                   if isinstance(arg, ast.Constant) and isinstance(arg.value, str)]
        if suffix and strings:
            kernels[node.targets[0].id] = (suffix, max(strings, key=len))
    return kernels


def load_factory(spec: str) -> Callable[..., tuple[torch.nn.Module, tuple[Any, ...]]]:
    module_name, _, attribute = spec.partition(":")
    if not attribute:
        raise SystemExit(f"--model must be module:factory, got {spec!r}")
    return getattr(importlib.import_module(module_name), attribute)


def _loss_of(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if getattr(output, "loss", None) is not None:
        return output.loss
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise SystemExit(f"cannot find a loss in the model's output ({type(output).__name__})")


def _to(value: Any, device: torch.device) -> Any:
    return value.to(device) if isinstance(value, torch.Tensor) else value


def compile_and_capture(
    model: torch.nn.Module, args: tuple[Any, ...], device: torch.device, cpu_backend: str
) -> tuple[list[DynamoGraph], list[str]]:
    """Compile with backend="cce", run forward and backward once; the Dynamo graphs (before and
    after the pass) and Inductor's wrapper sources in compile order."""
    torch.compiler.reset()
    model = model.to(device)
    args = tuple(_to(arg, device) for arg in args)
    compiled = torch.compile(model, backend="cce")

    def step() -> None:
        loss = _loss_of(compiled(*args))
        if loss.requires_grad:
            loss.backward()

    interpret = device.type == "cpu" and cpu_backend == "triton"
    with recording_rewrites() as graphs, triton_on_cpu(interpret):
        _, sources = compat.run_and_get_code(step)
    return graphs, sources


def _gpu_resources() -> tuple[str, str]:
    """(file text, one-line status) of the template configs' ahead-of-time resource usage."""
    try:
        from cce_inductor.tools import gpu_readiness
        from cce_inductor.tools.presets import PRESETS

        # The default configs at Gemma 2 2B's shape (every config at every preset: the
        # gpu_readiness tool, tens of minutes).
        rows = gpu_readiness.resource_table(PRESETS["gemma2-2b"])
    except Exception as error:  # the report says what failed instead of hiding the dump
        lines = str(error).strip().splitlines()
        message = f"{type(error).__name__}: {lines[0] if lines else ''}"
        return f"ahead-of-time compilation failed: {message}\n", f"failed ({message})"
    fits = sum(row.fits for row in rows)
    return gpu_readiness.format_table(rows) + "\n", f"{len(rows)} kernel builds, {fits} fit"


def _buffers_text(label: str, memory: GraphMemory) -> str:
    rows = [
        [a.name, list(a.shape), str(a.dtype).replace("torch.", ""), a.nbytes,
         measure.megabytes(a.nbytes), a.source]
        for a in sorted(memory.allocations, key=lambda a: -a.nbytes)
    ]
    table = tabulate(rows, headers=["buffer", "shape", "dtype", "bytes", "MB", "allocated by"],
                     tablefmt="github", disable_numparse=True)
    return (f"## {label}: peak {measure.megabytes(memory.peak_bytes)} MB, "
            f"returned {measure.megabytes(memory.returned_bytes)} MB\n\n{table}\n\n")


def write_dump(
    out: Path, graphs: list[DynamoGraph], sources: list[str], gpu_resources: bool
) -> list[list[str]]:
    """Write the folder; returns the summary table's rows."""
    out.mkdir(parents=True, exist_ok=True)
    summary = []
    decisions_text = []
    for index, graph in enumerate(graphs):
        (out / f"dynamo_graph_{index}_before.py").write_text(graph.before)
        (out / f"dynamo_graph_{index}_after.py").write_text(graph.after)
        for decision in graph.decisions:
            verdict = "rewritten" if decision.rewritten else f"left unchanged: {decision.reason}"
            decisions_text.append(
                f"dynamo graph {index}, consumer node {decision.node}: {verdict}"
                + (f" ({decision.detail})" if decision.detail else "")
            )
        rewritten = sum(decision.rewritten for decision in graph.decisions)
        summary.append([f"dynamo graph {index}", f"{rewritten} of {len(graph.decisions)} loss "
                        f"sites rewritten", f"dynamo_graph_{index}_before/after.py"])
    (out / "rewrite_decisions.txt").write_text(
        "\n".join(decisions_text or ["no cross_entropy loss in any Dynamo graph"]) + "\n"
    )

    buffers_text = []
    for index, source in enumerate(sources):
        kind = graph_kind(source)
        label = f"{index}_{kind}"
        code_path = out / "output_code" / f"{label}.py"
        code_path.parent.mkdir(exist_ok=True)
        code_path.write_text(source)
        kernels = kernels_of(source)
        kernel_dir = out / "kernels" / label
        kernel_dir.mkdir(parents=True, exist_ok=True)
        for name, (suffix, text) in kernels.items():
            (kernel_dir / f"{name}{suffix}").write_text(text)
        templates = sum(name.startswith("triton_tem_") for name in kernels)
        try:
            memory = replay(source)
        except UnsupportedWrapper as error:
            buffers_text.append(f"## {label}: not replayed: {error}\n\n")
            memory_note = "buffers: not replayed"
        else:
            buffers_text.append(_buffers_text(label, memory))
            largest = max(memory.allocations, key=lambda a: a.nbytes, default=None)
            memory_note = (
                f"{len(memory.allocations)} buffers, peak {measure.megabytes(memory.peak_bytes)}"
                f" MB" + (f", largest {largest.name} {list(largest.shape)}" if largest else "")
            )
        summary.append([
            f"output code {label}",
            f"{len(kernels)} kernels ({templates} templates); {memory_note}",
            f"output_code/{label}.py",
        ])
    (out / "buffers.txt").write_text("".join(buffers_text))

    if gpu_resources:
        text, status = _gpu_resources()
        (out / "gpu_resources.txt").write_text(text)
        summary.append(["template configs, sm_80 / sm_90a", status, "gpu_resources.txt"])
    return summary


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="cce-dump",
        description="Compile a model with backend='cce' and write its graphs, rewrite decisions, "
        "generated code, kernels, buffers and the templates' GPU resource usage to a folder.",
    )
    parser.add_argument("--out", required=True, type=Path, help="folder to write")
    parser.add_argument(
        "--model", metavar="MODULE:FACTORY",
        help="a function returning (model, args); default: the built-in tiny causal LM",
    )
    parser.add_argument(
        "--shape", action="append", default=[], metavar="KEY=INT",
        help="keyword passed to the factory (built-in: batch, seq, vocab, hidden, layers)",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--cpu-backend", choices=("triton", "cpp"), default="triton",
        help="on CPU: Inductor's Triton kernels under the interpreter (as on a GPU; default) "
        "or its C++ kernels",
    )
    parser.add_argument(
        "--no-gpu-resources", action="store_true",
        help="skip the ahead-of-time sm_80/sm_90a compilation of the template configs",
    )
    args = parser.parse_args(argv)
    shapes = {}
    for item in args.shape:
        key, _, value = item.partition("=")
        if not value.lstrip("-").isdigit():
            parser.error(f"--shape takes KEY=INT, got {item!r}")
        shapes[key] = int(value)
    factory = load_factory(args.model) if args.model else toy_lm
    model, model_args = factory(**shapes)
    device = torch.device(args.device)

    graphs, sources = compile_and_capture(model, tuple(model_args), device, args.cpu_backend)
    summary = write_dump(args.out, graphs, sources, not args.no_gpu_resources)
    table = tabulate(summary, headers=["what", "result", "file"], tablefmt="github",
                     disable_numparse=True)
    (args.out / "summary.txt").write_text(table + "\n")
    print(f"cce-dump: wrote {args.out}/")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
