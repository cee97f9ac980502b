"""cce-bench: linear -> cross_entropy, loss only and loss + gradient, every implementation at hand.

    cce-bench                                  # preset 'default' (N=1024, V=32768, D=256, fp32)
    cce-bench --preset gemma2-2b --json out.json --png out.png     # on a GPU
    cce-bench --preset gemma2-2b --memory-report                   # no run: read compiled code
    cce-bench --preset gemma2-2b --work-model --gpu A100           # no run: estimated work
    cce-bench --interleaved --repetitions 5                        # on a shared, noisy machine
    cce-bench --task logprobs                  # the RL head: log-probs and entropy

`--task logprobs` measures the RL policy head instead: per-token log-probabilities of the
targets and the entropy under softmax(linear(hidden) / 0.7), in the objective
`(log_probs * adv).sum() + 0.01 * entropy.sum()` (adv fixed, from -1 to 1 over the tokens), "loss"
being its forward and "loss+grad" forward and backward: torch eager and torch.compile of the
materialized code (written as TRL and verl write it), verl's fused ops when installed (the
chunked torch FusedLinearForPPO; its Triton linear_cross_entropy and Liger's on CUDA), and
cce-inductor's `linear_log_probs` and backend="cce" on the same code.

Each implementation runs in its own process (compile caches and memory peaks stay apart) on the
same inputs, saved once: one after the other, or with --interleaved all started at once and
taking turns, a repetition each per round, each one's time also given as its median per-round
ratio to a reference (on a noisy machine only such ratios mean anything). Per implementation and
mode: median time over repetitions after warmup, peak memory beyond the inputs (gradients included), and the relative L2 error of the
loss and of both gradients against a float64 reference computed once. For cce-inductor also the
fraction of backward filter tiles skipped. The gradients are compared on a sub-block (the
first ERROR_ROWS rows of grad_input, the first ERROR_CLASSES rows of grad_weight), so that no
full-size gradient has to travel between processes. Timing uses CUDA events on a GPU, the wall
clock on a CPU; with --interpret-templates (a CPU, testing) cce-inductor's Triton templates run
under Triton's interpreter. Inputs are synthetic: targets uniform over the
vocabulary, hidden states leaning towards their target's classifier row, so that the softmax is
peaked as in a trained model (a loss near 1); how many tiles filtering skips depends on data.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import json
import math
import os
import statistics
import sys
import tempfile
import time
from typing import Any, Callable, ContextManager, Optional

import torch
import torch.nn.functional as F
from tabulate import tabulate

from cce_inductor import compat, filter_stats
from cce_inductor.tools import measure, work_model
from cce_inductor.tools.interpreter import triton_on_cpu
from cce_inductor.tools.presets import DTYPES, PRESETS, Shape, resolve

MODES = ("loss", "loss+grad")
LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

# How strongly each hidden state leans towards its target's classifier row (logit units).
TARGET_PULL = 10.0
REFERENCE_ROWS = 1024  # rows of fp64 logits the reference holds at a time
ERROR_ROWS = 1024  # grad_input is compared on its first rows ...
ERROR_CLASSES = 4096  # ... and grad_weight on its first classes
# With --time-limit, an implementation is not started with fewer seconds than this left.
MIN_START_SECONDS = 10.0


def _torch_reference(hidden: torch.Tensor, classifier: torch.Tensor, target: torch.Tensor):
    return F.cross_entropy(F.linear(hidden, classifier), target)


def _cross_entropy_rows(hidden, classifier, target, start: int, n: int) -> torch.Tensor:
    """Rows [start, start + len(target)) of n of the mean cross-entropy."""
    return F.cross_entropy(F.linear(hidden, classifier), target, reduction="sum") / n


# --- task logprobs: the RL head -----------------------------------------------------------------
TEMPERATURE = 0.7
ENTROPY_COEF = 0.01


def _advantages(n: int, device: torch.device) -> torch.Tensor:
    return torch.linspace(-1.0, 1.0, n, device=device)


def _rl_objective(log_probs: torch.Tensor, entropy: torch.Tensor) -> torch.Tensor:
    advantages = _advantages(log_probs.shape[0], log_probs.device).to(log_probs.dtype)
    return (log_probs * advantages).sum() + ENTROPY_COEF * entropy.sum()


def _torch_log_probs(hidden, classifier, target, advantages=None):
    """The materialized RL objective as trainers write it (16-bit logits upcast to fp32, over
    the temperature, gather of log_softmax, entropy from the log-probabilities). The upcast
    never narrows: in float64 this is the reference."""
    logits = F.linear(hidden, classifier)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32)) / TEMPERATURE
    log_p = logits.log_softmax(-1)
    log_probs = log_p.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    if advantages is None:
        return _rl_objective(log_probs, entropy)
    return (log_probs * advantages).sum() + ENTROPY_COEF * entropy.sum()


def _log_probs_rows(hidden, classifier, target, start: int, n: int) -> torch.Tensor:
    """Rows [start, start + len(target)) of n of the RL objective (a sum over rows)."""
    advantages = _advantages(n, hidden.device)[start:start + target.shape[0]]
    return _torch_log_probs(hidden, classifier, target, advantages.to(hidden.dtype))


def _cce_log_probs(device: torch.device) -> LossFn:
    import cce_inductor

    return lambda e, c, t: _rl_objective(*cce_inductor.linear_log_probs(
        e, c, t, temperature=TEMPERATURE, return_entropy=True))


def _verl_torch_module() -> Any:
    """verl's chunked torch FusedLinearForPPO, loaded from its file: the op needs only torch,
    while importing the verl package imports ray and the rest of verl's stack."""
    spec = importlib.util.find_spec("verl")
    path = os.path.join(os.path.dirname(spec.origin), "utils", "experimental",
                        "torch_functional.py")
    module_spec = importlib.util.spec_from_file_location("verl_torch_functional", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def _verl_torch(device: torch.device) -> LossFn:
    fused = _verl_torch_module().FusedLinearForPPO(chunk_size=512)
    return lambda e, c, t: _rl_objective(*fused(e, c, t, temperature=TEMPERATURE))


def _verl_missing(device: torch.device) -> Optional[str]:
    if importlib.util.find_spec("verl") is None:
        return "not installed (pip install verl)"
    return None


def _verl_triton(device: torch.device) -> LossFn:
    from verl.utils.kernel.linear_cross_entropy import linear_cross_entropy

    return lambda e, c, t: _rl_objective(*linear_cross_entropy(e, c, t, TEMPERATURE))


def _verl_triton_missing(device: torch.device) -> Optional[str]:
    return _verl_missing(device) or (None if device.type == "cuda" else "Triton kernels need CUDA")


def _liger_log_probs(device: torch.device) -> LossFn:
    from liger_kernel.ops import LigerFusedLinearScaledCrossEntropyFunction as Function

    def objective(e: torch.Tensor, c: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        nll, entropy = Function.apply(e, c, t, TEMPERATURE)
        return _rl_objective(-nll, entropy)

    return objective


def _liger_log_probs_missing(device: torch.device) -> Optional[str]:
    if importlib.util.find_spec("liger_kernel") is None:
        return "not installed (pip install liger-kernel)"
    return None if device.type == "cuda" else "Triton kernels need CUDA"


@dataclasses.dataclass(frozen=True)
class Implementation:
    name: str
    build: Callable[[torch.device], LossFn]
    unavailable: Callable[[torch.device], Optional[str]] = lambda device: None
    counts_filter_tiles: bool = False
    # Runs cce-inductor's Triton templates (on a CPU: through the interpreter, when asked).
    triton_templates: bool = False
    # Held while the implementation runs (its compilation happens at the first calls).
    config: Callable[[], ContextManager[Any]] = contextlib.nullcontext


def _torch_compile(device: torch.device) -> LossFn:
    return torch.compile(_torch_reference, dynamic=False)


def _torch_chunked(device: torch.device) -> LossFn:
    options = torch.nn.LinearCrossEntropyOptions()
    return lambda e, c, t: F.linear_cross_entropy(e, c, t, options=options)


def _torch_chunked_missing(device: torch.device) -> Optional[str]:
    return None if compat.HAS_TORCH_LINEAR_CROSS_ENTROPY else compat.NO_TORCH_LINEAR_CROSS_ENTROPY


def _apple_impl(device: torch.device) -> str:
    return "cce" if device.type == "cuda" else "torch_compile"


def _apple(device: torch.device) -> LossFn:
    from cut_cross_entropy import linear_cross_entropy

    impl = _apple_impl(device)
    return lambda e, c, t: linear_cross_entropy(e, c, t, impl=impl)


def _apple_missing(device: torch.device) -> Optional[str]:
    if importlib.util.find_spec("cut_cross_entropy") is None:
        return "not installed (pip install --no-deps cut-cross-entropy)"
    return None


def _liger(device: torch.device) -> LossFn:
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    loss_module = LigerFusedLinearCrossEntropyLoss()

    def loss(e: torch.Tensor, c: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        result = loss_module(c, e, t)  # Liger takes the weight first
        return result[0] if isinstance(result, tuple) else result

    return loss


def _liger_missing(device: torch.device) -> Optional[str]:
    if importlib.util.find_spec("liger_kernel") is None:
        return "not installed (pip install liger-kernel)"
    if device.type != "cuda":
        return "Triton kernels need CUDA"
    return None


def _cce_api(device: torch.device) -> LossFn:
    import cce_inductor

    return lambda e, c, t: cce_inductor.linear_cross_entropy(e, c, t)


def _cce_backend(device: torch.device) -> LossFn:
    return torch.compile(_torch_reference, backend="cce", dynamic=False)


IMPLEMENTATIONS = (
    Implementation("torch eager", lambda device: _torch_reference),
    Implementation("torch.compile", _torch_compile),
    Implementation(
        "torch.compile auto_chunker", _torch_compile, config=compat.inductor_auto_chunker
    ),
    Implementation("torch F.linear_cross_entropy chunked", _torch_chunked, _torch_chunked_missing),
    Implementation("cut-cross-entropy", _apple, _apple_missing),
    Implementation("liger fused linear CE", _liger, _liger_missing),
    Implementation("cce-inductor API", _cce_api, counts_filter_tiles=True,
                   triton_templates=True),
    Implementation('cce-inductor backend="cce"', _cce_backend, counts_filter_tiles=True,
                   triton_templates=True),
)


LOG_PROBS_IMPLEMENTATIONS = (
    Implementation("torch eager", lambda device: _torch_log_probs),
    Implementation("torch.compile", lambda device: torch.compile(_torch_log_probs,
                                                                 dynamic=False)),
    Implementation("verl FusedLinearForPPO (torch)", _verl_torch, _verl_missing),
    Implementation("verl linear_cross_entropy (Triton)", _verl_triton, _verl_triton_missing),
    Implementation("liger fused linear scaled CE", _liger_log_probs, _liger_log_probs_missing),
    Implementation("cce-inductor linear_log_probs", _cce_log_probs, counts_filter_tiles=True),
    Implementation('cce-inductor backend="cce"',
                   lambda device: torch.compile(_torch_log_probs, backend="cce", dynamic=False),
                   counts_filter_tiles=True),
)


@dataclasses.dataclass(frozen=True)
class Task:
    """What is measured: the implementations of one objective, and that objective on a block
    of rows (rows [start, start + rows) of n; the blocks' values sum to the whole), which the
    float64 reference runs a block at a time."""

    implementations: tuple[Implementation, ...]
    rows_objective: Callable[..., torch.Tensor]
    describe: str


TASKS = {
    "cross_entropy": Task(IMPLEMENTATIONS, _cross_entropy_rows, "linear -> cross_entropy"),
    "logprobs": Task(LOG_PROBS_IMPLEMENTATIONS, _log_probs_rows,
                     f"log-probs + entropy, temperature {TEMPERATURE}"),
}


def implementation(name: str, task: str = "cross_entropy") -> Implementation:
    return next(impl for impl in TASKS[task].implementations if impl.name == name)


def display_name(impl: Implementation, device: torch.device) -> str:
    if impl.build is _apple:
        return f"{impl.name} ({_apple_impl(device)})"
    return impl.name


# --- inputs and reference ---------------------------------------------------------------------


def make_inputs(shape: Shape, seed: int) -> dict[str, torch.Tensor]:
    """Hidden states [N, D], classifier [V, D] (rows of norm ~1) and targets [N], on the CPU."""
    generator = torch.Generator().manual_seed(seed)
    classifier = torch.randn(shape.v, shape.d, generator=generator) / math.sqrt(shape.d)
    target = torch.randint(0, shape.v, (shape.n,), generator=generator)
    hidden = torch.randn(shape.n, shape.d, generator=generator)
    hidden += TARGET_PULL * classifier[target]
    dtype = shape.torch_dtype
    return {"hidden": hidden.to(dtype), "classifier": classifier.to(dtype), "target": target}


def gradient_blocks(
    grad_input: torch.Tensor, grad_weight: torch.Tensor
) -> dict[str, torch.Tensor]:
    """The sub-blocks of the gradients that the errors are measured on, on the CPU."""
    return {"grad_input": grad_input[:ERROR_ROWS].cpu(),
            "grad_weight": grad_weight[:ERROR_CLASSES].cpu()}


def reference(inputs: dict[str, torch.Tensor], device: torch.device,
              task: Task = TASKS["cross_entropy"]) -> dict[str, Any]:
    """float64 loss and gradient sub-blocks of the task's objective (by default linear ->
    cross_entropy, mean), computed a block of rows at a time (never [N, V] float64 logits at
    once)."""
    hidden = inputs["hidden"].to(device, torch.float64)
    classifier = inputs["classifier"].to(device, torch.float64).requires_grad_(True)
    target = inputs["target"].to(device)
    n = hidden.shape[0]
    loss = 0.0
    grad_hidden = torch.empty_like(hidden)
    for start in range(0, n, REFERENCE_ROWS):
        rows = hidden[start:start + REFERENCE_ROWS].clone().requires_grad_(True)
        part = task.rows_objective(rows, classifier, target[start:start + REFERENCE_ROWS],
                                   start, n)
        part.backward()
        grad_hidden[start:start + REFERENCE_ROWS] = rows.grad
        loss += part.item()
    return {"loss": loss, **gradient_blocks(grad_hidden, classifier.grad)}


def relative_error(value: torch.Tensor, expected: torch.Tensor) -> float:
    """||value - expected|| / ||expected|| in float64, a block of rows at a time."""
    squared_error = squared_norm = 0.0
    for start in range(0, expected.shape[0], 65536):
        exact = expected[start:start + 65536].double()
        squared_error += (value[start:start + 65536].double() - exact).square().sum().item()
        squared_norm += exact.square().sum().item()
    return math.sqrt(squared_error / squared_norm) if squared_norm else math.sqrt(squared_error)


# --- one implementation, in its worker process ------------------------------------------------


def _device_inputs(
    inputs: dict[str, torch.Tensor], device: torch.device, with_grad: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (
        inputs["hidden"].to(device).requires_grad_(with_grad),
        inputs["classifier"].to(device).requires_grad_(with_grad),
        inputs["target"].to(device),
    )


def _measure_mode(
    loss_fn: LossFn, inputs: dict[str, torch.Tensor], mode: str, device: torch.device,
    payload: dict[str, Any], label: str,
) -> dict[str, Any]:
    with_grad = mode == "loss+grad"
    hidden, classifier, target = _device_inputs(inputs, device, with_grad)

    def run() -> torch.Tensor:
        loss = loss_fn(hidden, classifier, target)
        if with_grad:
            loss.backward()
        return loss.detach()

    def fresh_run() -> torch.Tensor:
        hidden.grad = classifier.grad = None
        return run()

    # In an interleaved run every step waits for this worker's turn (pass_gate is a no-op else).
    measure.pass_gate(payload)
    start = time.perf_counter()
    fresh_run()
    measure.synchronize(device)
    first_call = time.perf_counter() - start
    times = None
    if payload.get("interleaved"):
        times = measure.gated_seconds(
            fresh_run, device, payload["warmup"], payload["repetitions"],
            lambda: measure.pass_gate(payload),
        )
        seconds, repetitions = statistics.median(times), len(times)
    else:
        seconds, repetitions = measure.median_seconds(
            fresh_run, device, payload["warmup"], payload["repetitions"],
            payload["budget_seconds"],
        )
    measure.pass_gate(payload)
    # The old gradients are freed before the measurement, so the peak counts the new ones.
    hidden.grad = classifier.grad = None
    loss, peak = measure.peak_extra_bytes(run, device)
    result = {
        "mode": mode, "first_call_s": first_call, "median_ms": seconds * 1e3,
        "repetitions": repetitions,
        "peak_bytes": peak, "loss": loss.double().item(),
    }
    if times is not None:
        result["times_ms"] = [value * 1e3 for value in times]
    if with_grad:
        torch.save(gradient_blocks(hidden.grad, classifier.grad), payload["gradients_path"])
    print(
        f"    {label} {mode}: first call {first_call:.1f} s, median {seconds * 1e3:.1f} ms, "
        f"peak {measure.megabytes(peak)} MB",
        flush=True,
    )
    return result


def _running(impl: Implementation, device: torch.device,
             interpret_templates: bool) -> ContextManager[Any]:
    """What an implementation runs under: its config, and for cce-inductor on a CPU with
    --interpret-templates, Triton's interpreter."""
    stack = contextlib.ExitStack()
    stack.enter_context(impl.config())
    stack.enter_context(triton_on_cpu(
        interpret_templates and impl.triton_templates and device.type == "cpu"))
    return stack


def _filter_tiles(
    impl: Implementation, inputs: dict[str, torch.Tensor], device: torch.device,
    interpret_templates: bool,
) -> list[int]:
    """[skipped, total] backward filter tiles of one loss+grad run. Compiled kernels count
    only when lowered with counting on (it costs a host sync), so this run compiles
    afresh, after the timed ones."""
    hidden, classifier, target = _device_inputs(inputs, device, with_grad=True)
    torch.compiler.reset()
    with filter_stats.counting(), _running(impl, device, interpret_templates), \
            filter_stats.collect() as stats:
        impl.build(device)(hidden, classifier, target).backward()
    return [stats.skipped, stats.total]


def worker(payload: dict[str, Any]) -> dict[str, Any]:
    device = torch.device(payload["device"])
    inputs = torch.load(payload["inputs_path"], mmap=True)
    if payload["implementation"] == "float64 reference":
        result = reference(inputs, device, TASKS[payload["task"]])
        torch.save(result, payload["reference_path"])
        return {"loss": result["loss"]}
    impl = implementation(payload["implementation"], payload["task"])
    label = display_name(impl, device)
    compat.dynamo_counters()["cce"].clear()
    torch.compiler.reset()
    with _running(impl, device, payload["interpret_templates"]):
        loss_fn = impl.build(device)
        modes = [
            _measure_mode(loss_fn, inputs, mode, device, payload, label)
            for mode in payload["modes"]
        ]
    if impl.counts_filter_tiles and "loss+grad" in payload["modes"]:
        measure.pass_gate(payload)
        modes[payload["modes"].index("loss+grad")]["filter_tiles"] = _filter_tiles(
            impl, inputs, device, payload["interpret_templates"]
        )
    # The graph pass's decisions (empty for implementations that do not use it).
    return {"modes": modes, "rewrites": dict(compat.dynamo_counters()["cce"])}


# --- the driver -------------------------------------------------------------------------------


def _parse(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="cce-bench",
        description="Benchmark linear -> cross_entropy implementations (loss, loss+grad): "
        "time, peak memory, error against float64.",
    )
    parser.add_argument(
        "--task", choices=sorted(TASKS), default="cross_entropy",
        help="cross_entropy (default), or logprobs: log-probs + entropy of an RL objective",
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default")
    parser.add_argument("--n", type=int, help="tokens (overrides the preset)")
    parser.add_argument("--v", type=int, help="vocabulary size (overrides the preset)")
    parser.add_argument("--d", type=int, help="hidden size (overrides the preset)")
    parser.add_argument("--dtype", choices=DTYPES, help="overrides the preset's dtype")
    parser.add_argument(
        "--impl", action="append", metavar="NAME",
        help="run only these implementations (repeatable); names: "
        + "; ".join(f"{task}: " + ", ".join(impl.name for impl in TASKS[task].implementations)
                    for task in TASKS),
    )
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs after the first")
    parser.add_argument("--repetitions", type=int, default=3, help="timed runs (median)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu",
        help="cpu or cuda (default: cuda when available)",
    )
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON")
    parser.add_argument("--png", metavar="PATH", help="write a chart (needs matplotlib)")
    parser.add_argument(
        "--allow-slow", action="store_true",
        help="let presets other than 'default' run on the CPU (they are meant for GPUs)",
    )
    parser.add_argument(
        "--budget", type=float, default=15.0, metavar="SECONDS",
        help="per implementation and mode: no further warmup or timed run starts once this much "
        "time went into them (at least one timed run; default 15)",
    )
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per implementation")
    parser.add_argument(
        "--time-limit", type=float, metavar="SECONDS",
        help="for the whole run: implementations that would start with less than "
        f"{MIN_START_SECONDS:.0f} s of it left are reported as not run, and no worker runs past "
        "it (their results are reported as far as they got)",
    )
    parser.add_argument(
        "--interpret-templates", action="store_true",
        help="on a CPU, run cce-inductor's Triton templates under Triton's interpreter (a test "
        "of the GPU code path at tiny shapes: its timings mean nothing)",
    )
    parser.add_argument(
        "--interleaved", action="store_true",
        help="start every implementation's process first, then let them take turns: round r "
        "runs repetition r of each, one at a time, so that a noisy machine slows all of a "
        "round alike; reports each one's median per-round time ratio to --ratio-to (no --budget)",
    )
    parser.add_argument(
        "--ratio-to", default="torch.compile", metavar="NAME",
        help="with --interleaved: the implementation the per-round ratios divide by "
        "(default torch.compile)",
    )
    parser.add_argument(
        "--same-process", action="store_true",
        help="run every implementation in this process (quicker to start; but then compile "
        "caches and allocator state of one implementation may affect the next)",
    )
    parser.add_argument(
        "--memory-report", action="store_true",
        help="instead of running, report the buffers the compiled loss+grad allocates at this "
        "shape (read from Inductor's generated code; see cce_inductor.tools.memory_report)",
    )
    parser.add_argument(
        "--work-model", action="store_true",
        help="instead of running, estimate the CCE kernels' work at this shape on --gpu "
        "(see cce_inductor.tools.work_model)",
    )
    work_model.add_arguments(parser)
    args = parser.parse_args(argv)
    if args.interpret_templates and args.device != "cpu":
        parser.error("--interpret-templates is for --device cpu (a GPU runs the templates)")
    if args.interleaved and args.same_process:
        parser.error("--interleaved takes turns between worker processes; drop --same-process")
    if args.memory_report and args.task != "cross_entropy":
        parser.error("--memory-report reads the cross_entropy task's compiled code only")
    known = {impl.name for impl in TASKS[args.task].implementations}
    for name in args.impl or ():
        if name not in known:
            parser.error(f"unknown implementation {name!r}; known: {sorted(known)}")
    if (
        not (args.memory_report or args.work_model) and args.device == "cpu"
        and args.preset != "default" and not args.allow_slow
    ):
        parser.error(
            f"preset {args.preset!r} takes hours on a CPU; pass --allow-slow to run it anyway, "
            "or --memory-report to read its memory use from the compiled code without running"
        )
    return args


def _format(value: Optional[float], spec: str) -> str:
    return "—" if value is None else format(value, spec)


def table_rows(results: list[dict[str, Any]]) -> list[list[str]]:
    rows = []
    ratios = any("round_ratio" in entry for entry in results)
    for entry in results:
        if "error" in entry:
            blank = [""] * (len(TABLE_HEADERS) - 3 + ratios)
            rows.append([entry["implementation"], entry.get("mode", ""), entry["error"]] + blank)
            continue
        tiles = entry.get("filter_tiles")
        rows.append([
            entry["implementation"], entry["mode"],
            f"{entry['median_ms']:,.1f} ({entry['repetitions']})",
            *([_format(entry.get("round_ratio"), ".3f")] if ratios else []),
            measure.megabytes(entry["peak_bytes"]),
            _format(entry["loss_error"], ".1e"),
            _format(entry.get("grad_input_error"), ".1e"),
            _format(entry.get("grad_weight_error"), ".1e"),
            f"{tiles[0] / tiles[1]:.1%} of {tiles[1]}" if tiles and tiles[1] else "—",
            _format(entry["first_call_s"], ".1f"),
        ])
    return rows


TABLE_HEADERS = [
    "implementation", "mode", "median ms (runs)", "peak extra MB", "loss rel err",
    "grad input rel err", "grad weight rel err", "filter tiles skipped", "first call s",
]


def table_headers(results: list[dict[str, Any]], ratio_to: str) -> list[str]:
    """TABLE_HEADERS, with the per-round ratio column after the time in an interleaved run."""
    if not any("round_ratio" in entry for entry in results):
        return TABLE_HEADERS
    return TABLE_HEADERS[:3] + [f"x {ratio_to} (median per round)"] + TABLE_HEADERS[3:]


def add_round_ratios(results: list[dict[str, Any]], ratio_to: str) -> None:
    """Per implementation and mode of an interleaved run: the median over rounds of its time
    divided by `ratio_to`'s time in the same round (the rounds shared the machine's noise)."""
    reference = {
        entry["mode"]: entry["times_ms"] for entry in results
        if entry["implementation"] == ratio_to and "times_ms" in entry
    }
    for entry in results:
        base = reference.get(entry.get("mode"))
        if base and "times_ms" in entry:
            entry["round_ratio"] = statistics.median(
                value / base_value for value, base_value in zip(entry["times_ms"], base)
            )


def _run_interleaved(payloads: list[dict[str, Any]], args: argparse.Namespace,
                     timeout: float) -> list[dict[str, Any]]:
    """Every payload's worker started at once; then they take turns, one step each per round
    (see `_measure_mode`), so no two ever run at the same time. `timeout` bounds the wait for
    their results after the last round."""
    workers = [
        measure.Worker("cce_inductor.tools.bench", dict(payload, interleaved=True), gated=True)
        for payload in payloads
    ]
    # Per mode: the first call, the warmups, the repetitions and the memory run; then the
    # filter-tile count. Workers that have finished simply end their turns at once.
    steps = len(args.modes) * (args.warmup + args.repetitions + 2) + 1
    for _ in range(steps):
        for worker in workers:
            worker.step()
    return [worker.result(timeout) for worker in workers]


def write_png(results: list[dict[str, Any]], title: str, path: str) -> Optional[str]:
    """Bar charts of time and memory per mode; returns a message when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install 'cce-inductor[bench]'); no PNG written"
    ok = [entry for entry in results if "error" not in entry]
    modes = [mode for mode in MODES if any(entry["mode"] == mode for entry in ok)]
    figure, axes = plt.subplots(
        len(modes), 2, figsize=(13, 1.2 + 0.45 * len(ok)), squeeze=False
    )
    for row, mode in enumerate(modes):
        entries = [entry for entry in ok if entry["mode"] == mode]
        names = [entry["implementation"] for entry in entries]
        panels = (("median_ms", 1.0, "median time (ms)"),
                  ("peak_bytes", 1 / measure.MB, "peak extra memory (MB)"))
        for column, (key, scale, unit) in enumerate(panels):
            axis = axes[row][column]
            values = [entry[key] * scale for entry in entries]
            colors = [
                "tab:orange" if name.startswith("cce-inductor") else "tab:blue" for name in names
            ]
            axis.barh(names, values, color=colors)
            axis.invert_yaxis()
            axis.set_xlabel(unit)
            axis.set_title(mode)
            for y, value in enumerate(values):
                axis.text(value, y, f" {value:,.1f}", va="center", fontsize=8)
            if column:
                axis.set_yticklabels([])
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return None


def _run(payload: dict[str, Any], args: argparse.Namespace, timeout: float) -> dict[str, Any]:
    """One implementation's measurements, in a process of its own unless --same-process (then
    nothing stops it at `timeout`)."""
    if not args.same_process:
        return measure.run_worker("cce_inductor.tools.bench", payload, timeout)
    try:
        return worker(payload)
    except Exception as error:  # reported in the table like a failed worker process
        return {"error": f"{type(error).__name__}: {error}"}


def main(argv: Optional[list[str]] = None) -> int:
    payload = measure.worker_payload(argv)
    if payload is not None:
        measure.write_worker_result(payload, worker(payload))
        return 0
    args = _parse(argv)
    shape = resolve(args.preset, args.n, args.v, args.d, args.dtype)
    if args.memory_report:
        from cce_inductor.tools import memory_report

        print(memory_report.render(memory_report.build(shape, args.preset)))
        return 0
    if args.work_model:
        print(work_model.report(shape, args.preset, args))
        return 0
    device = torch.device(args.device)
    task = TASKS[args.task]
    selected = [
        impl for impl in task.implementations if not args.impl or impl.name in args.impl
    ]
    name = args.preset if shape == PRESETS[args.preset] else "custom shape"
    title = f"cce-bench {name}, {task.describe}: {shape.describe()} on {device.type}"
    if args.interleaved:
        schedule = (f"interleaved: {args.warmup} warmup and {args.repetitions} timed rounds, "
                    "the implementations taking turns within each")
    else:
        schedule = (f"{args.warmup} warmup, {args.repetitions} timed repetitions (fewer once "
                    f"{args.budget:.0f} s went into them)")
    print(f"{title}; {schedule}", flush=True)

    results: list[dict[str, Any]] = []
    skipped = []
    rewrites: dict[str, dict[str, int]] = {}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="cce-bench-") as folder:
        inputs_path = os.path.join(folder, "inputs.pt")
        torch.save(make_inputs(shape, args.seed), inputs_path)
        common = {
            "device": args.device, "task": args.task, "inputs_path": inputs_path,
            "modes": args.modes,
            "warmup": args.warmup, "repetitions": args.repetitions,
            "budget_seconds": args.budget,
            "reference_path": os.path.join(folder, "reference.pt"),
            "interpret_templates": args.interpret_templates,
        }
        deadline = None if args.time_limit is None else started + args.time_limit

        def timeout() -> float:
            if deadline is None:
                return args.timeout
            return min(args.timeout, deadline - time.perf_counter())

        print("  float64 reference", flush=True)
        outcome = _run(dict(common, implementation="float64 reference"), args, timeout())
        if "error" in outcome:
            print(f"the float64 reference failed: {outcome['error']}", file=sys.stderr)
            return 1
        expected = torch.load(common["reference_path"], mmap=True)
        print(f"  reference loss {expected['loss']:.4f}", flush=True)
        payloads: dict[str, dict[str, Any]] = {}
        outcomes: dict[str, dict[str, Any]] = {}
        for impl in selected:
            reason = impl.unavailable(device)
            name = display_name(impl, device)
            if not reason and not args.interleaved and timeout() < MIN_START_SECONDS:
                reason = f"not started: the --time-limit of {args.time_limit:.0f} s was spent"
            if reason:
                skipped.append([name, reason])
                continue
            payloads[name] = dict(
                common, implementation=impl.name,
                gradients_path=os.path.join(folder, f"gradients-{len(payloads)}.pt"),
            )
            if not args.interleaved:
                print(f"  {name}", flush=True)
                outcomes[name] = _run(payloads[name], args, timeout())
        if args.interleaved:
            print(f"  {', '.join(payloads)}: taking turns", flush=True)
            outcomes = dict(zip(payloads, _run_interleaved(list(payloads.values()), args,
                                                           timeout())))
        for name, payload in payloads.items():
            outcome = outcomes[name]
            if "error" in outcome:
                results.append({"implementation": name, "error": outcome["error"]})
                continue
            if outcome["rewrites"]:
                rewrites[name] = outcome["rewrites"]
            for entry in outcome["modes"]:
                entry = dict(entry, implementation=name)
                entry["loss_error"] = abs(entry["loss"] - expected["loss"]) / abs(expected["loss"])
                if entry["mode"] == "loss+grad":
                    gradients = torch.load(payload["gradients_path"], mmap=True)
                    for key in ("grad_input", "grad_weight"):
                        entry[f"{key}_error"] = relative_error(gradients[key], expected[key])
                results.append(entry)
    elapsed = time.perf_counter() - started
    if args.interleaved:
        add_round_ratios(results, args.ratio_to)

    print()
    print(title)
    print(tabulate(
        table_rows(results), headers=table_headers(results, args.ratio_to), tablefmt="github",
        disable_numparse=True,
    ))
    for name, counts in rewrites.items():
        described = ", ".join(f"{key}: {value}" for key, value in sorted(counts.items()))
        print(f"graph pass of {name}: {described}")
    for name, reason in skipped:
        print(f"not run: {name}: {reason}")
    print(f"gradient errors on grad_input rows [0, {min(shape.n, ERROR_ROWS)}) and grad_weight "
          f"rows [0, {min(shape.v, ERROR_CLASSES)})")
    print(f"total {elapsed:.0f} s")
    if args.json:
        with open(args.json, "w") as file:
            json.dump({
                "preset": args.preset, "task": args.task, "shape": dataclasses.asdict(shape),
                "device": args.device,
                "torch": torch.__version__, "warmup": args.warmup,
                "repetitions": args.repetitions, "interleaved": args.interleaved,
                "results": results,
                "error_rows": ERROR_ROWS, "error_classes": ERROR_CLASSES,
                "timing": "CUDA events" if device.type == "cuda" else "wall clock",
                "interpret_templates": args.interpret_templates, "time_limit": args.time_limit,
                "not_run": dict(skipped), "rewrites": rewrites, "seconds": elapsed,
            }, file, indent=2)
    if args.png:
        message = write_png(results, title, args.png)
        if message:
            print(message, file=sys.stderr)
    return 1 if any("error" in entry for entry in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
