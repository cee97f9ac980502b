"""cce-gpu-check: the GPU claims of cce-inductor, checked by one command in at most 8 minutes.

    cce-gpu-check --out DIR              # on a CUDA machine
    cce-gpu-check --out DIR --dry-run    # the same pipeline on the CPU at tiny shapes

Stages, each in processes of its own, each within its share of the time budget:
  1. the GPU tests (tests/gpu of the checkout) through pytest: pass / fail / skip counts, the
     failures and the figures the tests record;
  2. cce-bench at the gemma2-2b and llama3-8b presets (bf16, loss and loss+grad): every
     implementation side by side, timed with CUDA events, peak memory beyond the inputs, error
     against float64 on a sub-block, filter tiles skipped;
  3. reproducibility: two runs of the compiled loss + backward (backend="cce"), under
     torch.use_deterministic_algorithms(True) and in the default mode, must give the same bits
     in both (the backward has no atomics in either: one owner per output tile).
DIR gets report.md, results.json, a chart per preset (bench-PRESET.png) and each stage's log,
rewritten after every stage, so a run cut short leaves what it had. A stage that does not fit in
the time left is recorded as skipped, with the reason. Nothing is installed: peers that are
missing show as "not installed" rows.

Budget: the stages share the time (--budget, default 480 s) by STAGE_SHARES; each stage gets
its share of what is left when it starts (so time one stage leaves unused goes to the next),
stops on its own at that limit (pytest is interrupted, cce-bench starts no implementation it
cannot finish) and is killed KILL_GRACE_SECONDS later. REPORT_RESERVE_SECONDS are kept for
writing the report.

--dry-run (any machine): the GPU tests under Triton's interpreter (CCE_GPU_TESTS_ON_CPU=1),
cce-bench on the CPU at tiny shapes with cce-inductor's templates interpreted and every
implementation in one process, the determinism stage interpreted; the report says what a dry
run cannot exercise.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import re
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from cce_inductor.tools import bench, gpu_check_report, measure
from cce_inductor.tools.presets import PRESETS, Shape

PRESET_NAMES = ("gemma2-2b", "llama3-8b")
# cce-bench's implementations that the check runs (Inductor's auto_chunker, off by default in
# torch, is left out to save time).
BENCH_IMPLEMENTATIONS = (
    "torch eager", "torch.compile", "torch F.linear_cross_entropy chunked", "cut-cross-entropy",
    "liger fused linear CE", "cce-inductor API", 'cce-inductor backend="cce"',
)
DEFAULT_BUDGET_SECONDS = 480.0
# Relative shares of the budget (see the module doc; the estimates behind them are in README).
STAGE_SHARES = {"gpu tests": 150, "bench gemma2-2b": 125, "bench llama3-8b": 115,
                "determinism": 50}
MIN_STAGE_SECONDS = 20.0  # a stage given less than this is skipped
KILL_GRACE_SECONDS = 20.0
BENCH_WRITE_SECONDS = 15.0  # what cce-bench keeps of its stage's limit for writing its results
REPORT_RESERVE_SECONDS = 20.0
DETERMINISM_PRESET = "gemma2-2b"
ENV_ON_CPU = "CCE_GPU_TESTS_ON_CPU"  # tests/gpu/device_harness.py reads it


def dry_run_shape(shape: Shape) -> Shape:
    """A preset scaled down for the CPU (the interpreter): same dtype, V / 500, D / 64."""
    return Shape(n=64, v=shape.v // 500, d=shape.d // 64, dtype=shape.dtype)


@dataclasses.dataclass
class Context:
    out: Path
    dry_run: bool
    tests: Path
    tests_k: Optional[str]
    presets: list[str]
    deadline: float  # time.monotonic() by which the report is written

    def shape(self, preset: str) -> Shape:
        shape = PRESETS[preset]
        return dry_run_shape(shape) if self.dry_run else shape


@dataclasses.dataclass
class Stage:
    name: str
    share: float
    run: Callable[[Context, float], dict[str, Any]]  # (context, seconds) -> its record


# --- running a subprocess within a time limit ------------------------------------------------


def run_process(command: list[str], log: Path, limit: float, env: dict[str, str],
                cwd: Optional[Path] = None) -> tuple[Optional[int], str]:
    """Run `command` with stdout and stderr to `log`; at `limit` seconds send it SIGINT (pytest
    then ends its session and writes its reports), KILL_GRACE_SECONDS later kill it. Signals
    go to its whole process group, so that its own workers (benchmark processes, spawned
    ranks) end with it. Returns (exit status or None when killed, how it ended)."""
    with open(log, "w") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=env,
                                   cwd=cwd, stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            try:
                return process.wait(timeout=limit), "finished"
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGINT)
            try:
                return (process.wait(timeout=KILL_GRACE_SECONDS),
                        f"interrupted at its {limit:.0f} s limit")
            except subprocess.TimeoutExpired:
                return None, f"killed {KILL_GRACE_SECONDS:.0f} s after its {limit:.0f} s limit"
        finally:  # also when this process is interrupted: leave nothing of the stage running
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            process.wait()


def log_tail(log: Path, lines: int = 15) -> str:
    text = log.read_text(errors="replace") if log.exists() else ""
    return "\n".join(text.splitlines()[-lines:])


# --- stage 1: the GPU tests --------------------------------------------------------------------


def junit_results(path: Path) -> dict[str, Any]:
    """Counts, failures, skip reasons, recorded properties and durations from pytest's JUnit
    XML (legacy family: it keeps the properties)."""
    root = ElementTree.parse(path).getroot()
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    failures, skips, properties, durations = [], [], [], []
    for case in root.iter("testcase"):
        if case.get("name") is None:  # what an interrupted session leaves of the cut test
            continue
        test = f"{case.get('classname', '')}::{case.get('name')}"
        durations.append({"test": test, "seconds": float(case.get("time") or 0.0)})
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error"):
                outcome = "failed" if child.tag == "failure" else "errors"
                failures.append({"test": test, "kind": child.tag,
                                 "message": (child.get("message") or "").strip()[:2000]})
            elif child.tag == "skipped":
                outcome = "skipped"
                skips.append({"test": test, "reason": (child.get("message") or "").strip()})
        counts[outcome] += 1
        for prop in case.iter("property"):
            properties.append({"test": test, "name": prop.get("name"), "value": prop.get("value")})
    durations.sort(key=lambda entry: -entry["seconds"])
    return {"counts": counts, "failures": failures, "skips": skips, "properties": properties,
            "durations": durations}


def selected_tests(log: Path) -> Optional[int]:
    """How many tests pytest selected, from its "collected N items / M deselected" line."""
    match = re.search(r"collected (\d+) items?(?: / (\d+) deselected)?",
                      log.read_text(errors="replace") if log.exists() else "")
    if match is None:
        return None
    return int(match.group(1)) - int(match.group(2) or 0)


def run_gpu_tests(context: Context, limit: float) -> dict[str, Any]:
    if not context.tests.is_dir():
        return {"status": "skipped",
                "reason": f"{context.tests} not found: run from a checkout of cce-inductor "
                "(pip install -e .) or pass --tests"}
    xml_path = context.out / "gpu-tests.xml"
    xml_path.unlink(missing_ok=True)
    command = [sys.executable, "-m", "pytest", str(context.tests), "-rfEs",
               "-p", "no:cacheprovider", f"--junitxml={xml_path}", "-o", "junit_family=legacy"]
    if context.tests_k:
        command += ["-k", context.tests_k]
    env = dict(os.environ)
    if context.dry_run:
        env[ENV_ON_CPU] = "1"
    else:
        env.pop(ENV_ON_CPU, None)
    log = context.out / "gpu-tests.log"
    # pytest's rootdir (pyproject.toml's settings and markers) is the checkout above tests/.
    returncode, ended = run_process(command, log, limit, env, cwd=context.tests.parent.parent)
    record: dict[str, Any] = {"command": " ".join(command), "ended": ended,
                              "returncode": returncode, "log": log.name}
    if not xml_path.exists():
        return dict(record, status="error", reason="pytest wrote no report", tail=log_tail(log))
    record.update(junit_results(xml_path))
    counts = record["counts"]
    ran = sum(counts.values())
    record["selected"] = selected_tests(log)
    if ended != "finished":
        status = "interrupted"
    elif ran == 0 or returncode not in (0, 1):
        status = "error"
        record["tail"] = log_tail(log)
    elif counts["failed"] or counts["errors"]:
        status = "failed"
    elif counts["passed"] == 0:
        status = "skipped"
        record["reason"] = "every test skipped"
    else:
        status = "passed"
    return dict(record, status=status)


# --- stage 2: cce-bench at the presets ---------------------------------------------------------


def bench_arguments(context: Context, preset: str, limit: float) -> list[str]:
    # cce-bench stops its workers at its own limit, then writes its table, JSON and chart.
    own_limit = max(limit - BENCH_WRITE_SECONDS, 1.0)
    arguments = ["--modes", "loss", "loss+grad", "--time-limit", f"{own_limit:.0f}",
                 "--json", str(context.out / f"bench-{preset}.json"),
                 "--png", str(context.out / f"bench-{preset}.png")]
    for name in BENCH_IMPLEMENTATIONS:
        arguments += ["--impl", name]
    if context.dry_run:
        shape = context.shape(preset)
        return arguments + [
            "--preset", "default", "--n", str(shape.n), "--v", str(shape.v), "--d", str(shape.d),
            "--dtype", shape.dtype, "--device", "cpu", "--interpret-templates",
            "--same-process", "--warmup", "0", "--repetitions", "1",
        ]
    # A few timed runs are plenty at these sizes (tens of ms each); compiling dominates.
    return arguments + ["--preset", preset, "--device", "cuda", "--warmup", "1",
                        "--repetitions", "5", "--budget", "3"]


def run_bench(preset: str) -> Callable[[Context, float], dict[str, Any]]:
    def run(context: Context, limit: float) -> dict[str, Any]:
        json_path = context.out / f"bench-{preset}.json"
        json_path.unlink(missing_ok=True)
        command = [sys.executable, "-m", "cce_inductor.tools.bench",
                   *bench_arguments(context, preset, limit)]
        log = context.out / f"bench-{preset}.log"
        returncode, ended = run_process(command, log, limit, dict(os.environ))
        record: dict[str, Any] = {"preset": preset, "shape": dataclasses.asdict(
            context.shape(preset)), "command": " ".join(command), "ended": ended,
            "returncode": returncode, "log": log.name}
        if not json_path.exists():
            return dict(record, status="error", reason="cce-bench wrote no results",
                        tail=log_tail(log))
        record["bench"] = json.loads(json_path.read_text())
        png = context.out / f"bench-{preset}.png"
        record["chart"] = png.name if png.exists() else None
        results = record["bench"]["results"]
        cut = [name for name, reason in record["bench"]["not_run"].items()
               if reason.startswith("not started: the --time-limit")]
        if not results:
            return dict(record, status="skipped",
                        reason="its time limit was spent before any implementation ran")
        if any("error" in entry for entry in results):
            status = "failed"
        else:
            status = "interrupted" if cut or ended != "finished" else "passed"
        return dict(record, status=status)

    return run


# --- stage 3: deterministic mode ---------------------------------------------------------------


def run_determinism(context: Context, limit: float) -> dict[str, Any]:
    payload = {"dry_run": context.dry_run,
               "shape": dataclasses.asdict(context.shape(DETERMINISM_PRESET))}
    result = measure.run_worker("cce_inductor.tools.gpu_check", payload, limit)
    if "error" in result:
        return {"status": "error", "reason": result["error"], **payload}
    equal = all(all(result[mode]["equal"].values()) for mode in ("deterministic", "default"))
    return {"status": "passed" if equal else "failed", **payload, **result}


def reproducibility(payload: dict[str, Any]) -> dict[str, Any]:
    """In the worker: two runs of the compiled loss + backward in deterministic mode, then in
    the default mode; for each, whether loss and gradients are bitwise equal and whether the
    generated template kernels are free of atomics."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before cuBLAS starts
    from cce_inductor import compat
    from cce_inductor.tools.interpreter import triton_on_cpu

    device = torch.device("cpu" if payload["dry_run"] else "cuda")
    shape = Shape(**payload["shape"])
    inputs = bench.make_inputs(shape, seed=0)
    hidden, classifier, target = (inputs[name].to(device)
                                  for name in ("hidden", "classifier", "target"))
    result = {}
    for mode, deterministic in (("deterministic", True), ("default", False)):
        torch.compiler.reset()
        torch.use_deterministic_algorithms(deterministic)
        loss_fn = bench.implementation('cce-inductor backend="cce"').build(device)
        runs: list[dict[str, torch.Tensor]] = []

        def step() -> None:
            e, c = hidden.clone().requires_grad_(), classifier.clone().requires_grad_()
            loss = loss_fn(e, c, target)
            loss.backward()
            runs.append({"loss": loss.detach(), "grad_input": e.grad, "grad_weight": c.grad})

        with triton_on_cpu(device.type == "cpu"):
            _, codes = compat.run_and_get_code(step)  # compiles
            seconds = measure.seconds_of(step, device)
        first, second = runs
        source = "".join(codes)
        result[mode] = {
            "equal": {name: bool(torch.equal(first[name], second[name])) for name in first},
            "max_abs_difference": {
                name: (first[name].double() - second[name].double()).abs().max().item()
                for name in first},
            "atomics_free": not re.search(r"\btl\.atomic_\w+\(", source),
            "second_run_seconds": seconds,
        }
    torch.use_deterministic_algorithms(False)
    return result


# --- the driver --------------------------------------------------------------------------------


def stages(presets: list[str]) -> list[Stage]:
    return [Stage("gpu tests", STAGE_SHARES["gpu tests"], run_gpu_tests),
            *(Stage(f"bench {preset}", STAGE_SHARES[f"bench {preset}"], run_bench(preset))
              for preset in presets),
            Stage("determinism", STAGE_SHARES["determinism"], run_determinism)]


def _parse(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="cce-gpu-check",
        description="Check cce-inductor's GPU claims in one run (at most --budget seconds): "
        "the GPU tests, cce-bench at the gemma2-2b and llama3-8b presets against every peer "
        "at hand, and bitwise reproducibility of deterministic mode. Writes report.md, "
        "results.json and charts into --out.",
    )
    parser.add_argument("--out", required=True, type=Path, help="folder to write")
    parser.add_argument(
        "--dry-run", action="store_true",
        help="run the same pipeline on the CPU at tiny shapes (Triton's interpreter for the "
        "cce templates): a test of the tool, not of a GPU",
    )
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET_SECONDS,
                        metavar="SECONDS", help="wall time for everything (default 480)")
    parser.add_argument("--preset", action="append", choices=PRESET_NAMES, dest="presets",
                        help="benchmark only these presets (repeatable; default both)")
    default_tests = Path(__file__).resolve().parent.parent / "tests" / "gpu"
    parser.add_argument("--tests", type=Path, default=default_tests,
                        help=f"the GPU tests' folder (default {default_tests})")
    parser.add_argument("--tests-k", metavar="EXPRESSION",
                        help="run only the GPU tests matching this pytest -k expression")
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    payload = measure.worker_payload(argv)
    if payload is not None:
        try:
            result = reproducibility(payload)
        except Exception as error:  # the stage reports it as its reason
            result = {"error": f"{type(error).__name__}: {error}"[:2000]}
        measure.write_worker_result(payload, result)
        return 0
    args = _parse(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print(f"cce-gpu-check: needs a CUDA GPU, and torch {torch.__version__} sees none here "
              "(--dry-run runs the pipeline on the CPU at tiny shapes)", file=sys.stderr)
        return 2
    started = time.monotonic()
    context = Context(
        out=args.out, dry_run=args.dry_run, tests=args.tests.resolve(), tests_k=args.tests_k,
        presets=args.presets or list(PRESET_NAMES),
        deadline=started + args.budget - REPORT_RESERVE_SECONDS,
    )
    context.out.mkdir(parents=True, exist_ok=True)
    plan = stages(context.presets)
    results: dict[str, Any] = {
        "tool": "cce-gpu-check", "dry_run": args.dry_run, "budget_seconds": args.budget,
        "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "environment": gpu_check_report.environment(args.dry_run),
        "stages": [{"name": stage.name, "status": "pending"} for stage in plan],
    }
    gpu_check_report.write(context.out, results)
    for index, stage in enumerate(plan):
        left = context.deadline - time.monotonic()
        later = sum(s.share for s in plan[index:])
        limit = left * stage.share / later
        record: dict[str, Any] = {"name": stage.name, "limit_s": round(limit, 1)}
        print(f"cce-gpu-check: {stage.name} ({limit:.0f} s of {left:.0f} s left)", flush=True)
        if limit < MIN_STAGE_SECONDS:
            record.update(status="skipped", used_s=0.0,
                          reason=f"{limit:.0f} s left for it of the {args.budget:.0f} s budget, "
                          f"less than the {MIN_STAGE_SECONDS:.0f} s a stage needs")
        else:
            stage_start = time.monotonic()
            try:
                record.update(stage.run(context, limit))
            except Exception as error:  # the stage is reported failed; the others still run
                record.update(status="error", reason=f"{type(error).__name__}: {error}")
            record["used_s"] = round(time.monotonic() - stage_start, 1)
        print(f"cce-gpu-check: {stage.name}: {record['status']} in {record['used_s']:.0f} s",
              flush=True)
        results["stages"][index] = record
        results["seconds"] = round(time.monotonic() - started, 1)
        gpu_check_report.write(context.out, results)
    print(f"cce-gpu-check: report in {context.out / 'report.md'}", flush=True)
    return 0 if all(stage["status"] == "passed" for stage in results["stages"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
