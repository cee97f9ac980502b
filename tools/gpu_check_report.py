"""What cce-gpu-check writes: the environment it ran in (device, driver, CUDA, versions, commit)
and report.md / results.json from its stage records (see cce_inductor.tools.gpu_check)."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any, Optional

import torch
from tabulate import tabulate

from cce_inductor.tools import bench

CHECKOUT = Path(__file__).resolve().parent.parent
DISTRIBUTIONS = ("cce-inductor", "triton", "cut-cross-entropy", "liger-kernel", "transformers")

# What a dry run cannot show, whatever its outcome.
NOT_EXERCISED_BY_A_DRY_RUN = (
    "timing with CUDA events and the CUDA caching allocator's peak memory (the CPU measures "
    "wall time and profiler allocation events)",
    "the GPU's name, driver and SM count (nvidia-smi, torch.cuda device properties)",
    "the templates built by the CUDA backend for the real GPU (sm_90a configs, its SM count "
    "for vocabulary splits, real autotuning timings); the interpreter runs sm_80 configs",
    "cut-cross-entropy's impl='cce' and Liger's Triton kernels (they need CUDA; on a CPU "
    "cut-cross-entropy runs its torch_compile impl and Liger is not run)",
    "the NCCL probe of the vocabulary-parallel test (the CPU uses gloo)",
    "the GPU's concurrent program scheduling (the interpreter runs programs one after another, "
    "so an order-dependent sum could not show as a difference between runs)",
    "the time budget's split: compile and autotune times on the GPU machine are estimates",
)


def _version(distribution: str) -> Optional[str]:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _command(command: list[str], cwd: Optional[Path] = None) -> Optional[str]:
    """stdout of `command`, or None when it is missing or fails."""
    if shutil.which(command[0]) is None:
        return None
    try:
        done = subprocess.run(command, capture_output=True, text=True, cwd=cwd, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def commit() -> str:
    head = _command(["git", "rev-parse", "HEAD"], CHECKOUT)
    if head is None:
        return "unknown (not a git checkout)"
    dirty = _command(["git", "status", "--porcelain", "--untracked-files=no"], CHECKOUT)
    return head + (" (with uncommitted changes)" if dirty else "")


def environment(dry_run: bool) -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": platform.python_version(), "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda, "commit": commit(), "host": platform.node(),
        "cpus": os.cpu_count(),
        "packages": {name: _version(name) or "not installed" for name in DISTRIBUTIONS},
    }
    if dry_run:
        info["device"] = f"CPU ({platform.processor() or platform.machine()}; dry run, no GPU)"
        return info
    properties = torch.cuda.get_device_properties(0)
    driver = _command(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    info.update(
        device=properties.name, devices=torch.cuda.device_count(),
        capability=f"sm_{properties.major}{properties.minor}",
        sms=properties.multi_processor_count,
        memory_gib=round(properties.total_memory / 2**30, 1),
        driver=driver.splitlines()[0] if driver else "unknown (no nvidia-smi)",
    )
    return info


# --- report.md ---------------------------------------------------------------------------------


def _environment_lines(results: dict[str, Any]) -> list[str]:
    env = results["environment"]
    packages = env["packages"]
    device = env["device"]
    if not results["dry_run"]:
        device += (f" ({env['capability']}, {env['sms']} SMs, {env['memory_gib']} GiB; "
                   f"{env['devices']} visible), driver {env['driver']}")
    return [
        f"- device: {device}",
        f"- CUDA runtime (torch's build): {env['cuda_runtime']}",
        f"- torch {env['torch']}, triton {packages['triton']}, Python {env['python']}",
        "- peers: " + ", ".join(f"{name} {packages[name]}" for name in
                                ("cut-cross-entropy", "liger-kernel", "transformers")),
        f"- cce-inductor {packages['cce-inductor']}, commit {env['commit']}",
        f"- host {env['host']}, {env['cpus']} CPUs; started {results['started']}",
    ]


def _budget_table(results: dict[str, Any]) -> list[str]:
    rows = [[stage["name"], stage["status"], _seconds(stage.get("limit_s")),
             _seconds(stage.get("used_s")), stage.get("reason") or stage.get("ended") or ""]
            for stage in results["stages"]]
    total = results.get("seconds")
    return [
        f"Budget {results['budget_seconds']:.0f} s; used {_seconds(total)} s so far."
        if results["stages"][-1]["status"] == "pending" else
        f"Budget {results['budget_seconds']:.0f} s; used {_seconds(total)} s.",
        "",
        tabulate(rows, headers=["stage", "status", "limit s", "used s", "note"],
                 tablefmt="github", disable_numparse=True),
    ]


def _seconds(value: Optional[float]) -> str:
    return "—" if value is None else f"{value:.0f}"


def _gpu_tests_section(stage: dict[str, Any]) -> list[str]:
    lines = ["## GPU tests", ""]
    if "counts" not in stage:
        return lines + [_status_line(stage), *_tail(stage)]
    counts = stage["counts"]
    reported = sum(counts.values())
    selected = stage.get("selected")
    not_reached = (f", {selected - reported} not reached" if selected is not None
                   and selected > reported else "")
    lines += [", ".join(f"{value} {name}" for name, value in counts.items()) + not_reached
              + f" of {selected if selected is not None else '?'} selected ({stage['ended']}); "
              f"log: {stage['log']}", ""]
    for failure in stage["failures"]:
        first = failure["message"].splitlines()[0] if failure["message"] else ""
        lines.append(f"- {failure['kind']}: `{failure['test']}`: {first[:300]}")
    reasons: dict[str, int] = {}
    for skip in stage["skips"]:
        reasons[skip["reason"]] = reasons.get(skip["reason"], 0) + 1
    lines += [f"- skipped ({count}): {reason}" for reason, count in reasons.items()]
    if stage["durations"]:
        lines += ["", "Slowest tests (s): " + ", ".join(
            f"`{entry['test'].rsplit('::', 1)[-1]}` {entry['seconds']:.0f}"
            for entry in stage["durations"][:5])]
    if stage["properties"]:
        lines += ["", "Figures the tests recorded:", ""]
        lines += [f"- `{p['test']}`: {p['name']} = {p['value']}" for p in stage["properties"]]
    return lines + [""]


def _bench_section(stage: dict[str, Any]) -> list[str]:
    lines = [f"## cce-bench {stage.get('preset', stage['name'])}", ""]
    if "bench" not in stage:
        return lines + [_status_line(stage), *_tail(stage)]
    data = stage["bench"]
    shape = data["shape"]
    lines += [
        f"N={shape['n']}, V={shape['v']}, D={shape['d']}, {shape['dtype']} on {data['device']}"
        f"; timing: {data['timing']} (median of up to {data['repetitions']} runs after "
        f"{data['warmup']} warmup); peak memory beyond the inputs; gradient errors on "
        f"grad_input rows [0, {min(shape['n'], data['error_rows'])}) and grad_weight rows "
        f"[0, {min(shape['v'], data['error_classes'])}) against float64; {stage['ended']}; "
        f"log: {stage['log']}",
        "",
        tabulate(bench.table_rows(data["results"]), headers=bench.TABLE_HEADERS,
                 tablefmt="github", disable_numparse=True)
        if data["results"] else "No implementation ran.",
        "",
    ]
    lines += [f"- not run: {name}: {reason}" for name, reason in data["not_run"].items()]
    for name, counts in data["rewrites"].items():
        lines.append(f"- graph pass of {name}: "
                     + ", ".join(f"{key}: {value}" for key, value in sorted(counts.items())))
    if stage.get("chart"):
        lines += ["", f"![{stage['preset']}]({stage['chart']})"]
    else:
        lines.append(f"- no chart was written (see {stage['log']})")
    return lines + [""]


def _determinism_section(stage: dict[str, Any]) -> list[str]:
    lines = ["## Deterministic mode", ""]
    if "deterministic" not in stage:
        return lines + [_status_line(stage)]
    shape = stage["shape"]
    lines += [
        f"Compiled loss + backward (`backend=\"cce\"`), N={shape['n']}, V={shape['v']}, "
        f"D={shape['d']}, {shape['dtype']}, run twice per mode; judged: both modes (the "
        "backward has no atomics in either).", "",
    ]
    rows = []
    for mode in ("deterministic", "default"):
        result = stage[mode]
        rows.append([mode, "yes" if result["atomics_free"] else "no"] + [
            "equal" if result["equal"][name] else
            f"differ (max {result['max_abs_difference'][name]:.2g})"
            for name in ("loss", "grad_input", "grad_weight")
        ] + [f"{result['second_run_seconds'] * 1e3:,.1f}"])
    lines.append(tabulate(rows, headers=["mode", "atomics-free kernels", "loss", "grad_input",
                                         "grad_weight", "second run ms"],
                          tablefmt="github", disable_numparse=True))
    return lines + [""]


def _status_line(stage: dict[str, Any]) -> str:
    reason = stage.get("reason")
    return f"{stage['status']}" + (f": {reason}" if reason else "")


def _tail(stage: dict[str, Any]) -> list[str]:
    return ["", "```", stage["tail"], "```"] if stage.get("tail") else []


def render(results: dict[str, Any]) -> str:
    title = "cce-gpu-check" + (" (dry run on the CPU)" if results["dry_run"] else "")
    lines = [f"# {title}", "", *_environment_lines(results), "", "## Time budget", "",
             *_budget_table(results), ""]
    for stage in results["stages"]:
        if stage["status"] == "pending":
            continue
        if stage["name"] == "gpu tests":
            lines += _gpu_tests_section(stage)
        elif stage["name"].startswith("bench "):
            lines += _bench_section(stage)
        else:
            lines += _determinism_section(stage)
    if results["dry_run"]:
        lines += ["## Not exercised by a dry run", ""]
        lines += [f"- {item}" for item in NOT_EXERCISED_BY_A_DRY_RUN]
        lines.append("")
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines))  # one blank line between blocks


def write(out: Path, results: dict[str, Any]) -> None:
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    (out / "report.md").write_text(render(results))
