"""Measuring helpers shared by the tools: peak extra memory, median time, one run per process.

Peak extra memory is what a call allocates beyond what was live when it started, gradients and
outputs included. On CUDA it is the caching allocator's peak; on CPU it is replayed from the
allocation events torch.profiler records (the torch allocator only: every tensor, not the
BLAS library's private scratch), which unlike peak RSS is exact and not hidden by a higher peak
earlier in the process (compilation, for one).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import IO, Any, Callable, TypeVar

import torch

from cce_inductor import compat

T = TypeVar("T")

MB = 2**20
WORKER_FLAG = "--worker-payload"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_extra_bytes(fn: Callable[[], T], device: torch.device) -> tuple[T, int]:
    """Run `fn()` once; return its result and the most bytes it had allocated at one time
    beyond what was allocated before it started."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        result = fn()
        synchronize(device)
        return result, torch.cuda.max_memory_allocated(device) - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        result = fn()
    live = peak = 0
    for _, nbytes in compat.allocation_events(profiler):
        live += nbytes
        peak = max(peak, live)
    return result, peak


def seconds_of(fn: Callable[[], Any], device: torch.device) -> float:
    """How long one `fn()` takes: on CUDA between two events recorded on the current stream
    before and after it (what the GPU spent, gaps while the host lags and syncs inside `fn`
    included), on the CPU by the wall clock."""
    synchronize(device)
    if device.type == "cuda":
        start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    start_time = time.perf_counter()
    fn()
    return time.perf_counter() - start_time


def gated_seconds(
    fn: Callable[[], Any], device: torch.device, warmup: int, repetitions: int,
    gate: Callable[[], None],
) -> list[float]:
    """`seconds_of` each of `repetitions` runs of `fn()` after `warmup` untimed ones, every run
    preceded by `gate()` (a worker's turn in an interleaved benchmark, see `Worker.step`)."""
    times = []
    for index in range(warmup + repetitions):
        gate()
        elapsed = seconds_of(fn, device)
        if index >= warmup:
            times.append(elapsed)
    return times


def median_seconds(
    fn: Callable[[], Any], device: torch.device, warmup: int, repetitions: int,
    budget_seconds: float | None = None,
) -> tuple[float, int]:
    """Median time of `fn()` (`seconds_of`) over up to `repetitions` runs after up to `warmup`
    untimed ones, and how many runs were timed. Once `budget_seconds` are spent, no further
    warmup or repetition starts (one timed run always happens), so that very slow
    implementations do not hold a benchmark up for long."""
    spent = 0.0

    def timed() -> float:
        nonlocal spent
        elapsed = seconds_of(fn, device)
        spent += elapsed
        return elapsed

    def within_budget() -> bool:
        return budget_seconds is None or spent < budget_seconds

    for _ in range(warmup):
        if not within_budget():
            break
        timed()
    times = [timed()]
    while len(times) < repetitions and within_budget():
        times.append(timed())
    return statistics.median(times), len(times)


class Worker:
    """`python -m module --worker-payload JSON` in a fresh process; its stdout and stderr go
    straight to ours (progress), its result is the JSON it writes with `write_worker_result`.

    A process per measurement keeps compile caches, allocator state and memory peaks of one
    run from leaking into the next. A gated worker stops at `pass_gate` (after compiling, say)
    until `release()`, so several can compile side by side and then be timed one at a time;
    `step()` runs such a worker from one gate to the next, so several can take turns.
    """

    def __init__(self, module: str, payload: dict[str, Any], gated: bool = False) -> None:
        self._folder = tempfile.TemporaryDirectory(prefix="cce-worker-")
        self._result_path = os.path.join(self._folder.name, "result.json")
        self._gate_path = os.path.join(self._folder.name, "at-gate") if gated else None
        payload = dict(payload, result_path=self._result_path, gate_path=self._gate_path)
        self._process = subprocess.Popen(
            [sys.executable, "-m", module, WORKER_FLAG, json.dumps(payload)],
            stdin=subprocess.PIPE if gated else subprocess.DEVNULL,
            stderr=subprocess.PIPE, text=True,
        )
        self._forward = threading.Thread(
            target=_forward_stderr, args=(self._process.stderr,), daemon=True
        )
        self._forward.start()

    def wait_at_gate(self, poll_seconds: float = 0.2) -> None:
        """Until the worker reached its gate (or ended)."""
        while not os.path.exists(self._gate_path) and self._process.poll() is None:
            time.sleep(poll_seconds)

    def release(self) -> None:
        if self._process.poll() is None:
            self._process.stdin.write("go\n")
            self._process.stdin.flush()

    def step(self) -> None:
        """Let a worker that stops at a gate again and again run to its next gate (or end):
        workers stepped in turn never run at the same time."""
        self.wait_at_gate()
        if self._process.poll() is None:
            os.remove(self._gate_path)
            self.release()
            self.wait_at_gate()

    def result(self, timeout: float | None = None) -> dict[str, Any]:
        """Wait for the worker; its result, or {"error": ...} when it failed."""
        try:
            returncode = self._process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
            return {"error": f"timed out after {timeout:.0f} s"}
        finally:
            self._forward.join()
        try:
            if returncode != 0 or not os.path.exists(self._result_path):
                return {"error": f"worker exited with status {returncode}"}
            with open(self._result_path) as file:
                return json.load(file)
        finally:
            self._folder.cleanup()


def run_worker(module: str, payload: dict[str, Any], timeout: float | None = None) -> dict:
    """Run one ungated `Worker` to its end."""
    return Worker(module, payload).result(timeout)


def pass_gate(payload: dict[str, Any]) -> None:
    """In a gated worker: tell the parent we are at the gate and wait to be released."""
    if payload.get("gate_path"):
        open(payload["gate_path"], "w").close()
        sys.stdin.readline()


def _forward_stderr(stream: IO[str]) -> None:
    """Copy a worker's stderr to ours, less kineto's "USDT: ... profiler_start/stop" chatter
    that every torch.profiler session prints."""
    for line in stream:
        if not line.startswith("USDT:"):
            sys.stderr.write(line)
            sys.stderr.flush()


def worker_payload(argv: list[str] | None) -> dict[str, Any] | None:
    """The payload when this process was started by `run_worker`, else None."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 2 and argv[0] == WORKER_FLAG:
        return json.loads(argv[1])
    return None


def write_worker_result(payload: dict[str, Any], result: dict[str, Any]) -> None:
    with open(payload["result_path"], "w") as file:
        json.dump(result, file)


def megabytes(nbytes: float | None) -> str:
    """MB (2**20 bytes, as the paper counts) with three decimals below 1 MB."""
    if nbytes is None:
        return "—"
    return f"{nbytes / MB:,.3f}" if nbytes < MB else f"{nbytes / MB:,.1f}"
