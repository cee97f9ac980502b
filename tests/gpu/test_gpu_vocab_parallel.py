"""Vocabulary-parallel CCE with two ranks on one device, eagerly and compiled, against the
single-process float64 reference (tests/vocab_parallel_cases.py).

On a GPU both ranks use cuda:0. NCCL refuses two ranks on one GPU in most versions ("Duplicate
GPU detected"), so a probe tries it first; where it refuses, the ranks use gloo, whose
collectives take CUDA tensors. Which backend ran is recorded as a test property. Under the
interpreter (CPU) the ranks use gloo on CPU tensors.

Both must run the Triton templates: the compiled loss (torch.compile of the explicit API with a
group: a graph break at the layout check, then the sharded loss in one graph) and the eager
call, whose ops go through the internal torch.compile (cce_inductor.dispatch).
"""

from __future__ import annotations

import datetime
import os
import traceback

import torch
import torch.distributed as dist

import generated_code
import ranks
import reference
from cce_inductor import compat
from device_harness import activate, to_device
from vocab_parallel_cases import (
    LAYOUTS, WORLD, Case, check_against_single_process, make_inputs, vocab_parallel_loss,
)

CASES = [
    Case("fp32_all_options", dtype=torch.float32, bias=True, softcap=3.0, label_smoothing=0.1,
         class_weight=True),
    Case("bf16_swapped_filtered", dtype=torch.bfloat16, layout="swapped", bias=True,
         filter_eps="auto"),
    Case("bf16_sum_3d", dtype=torch.bfloat16, reduction="sum", leading=(4, 12)),
]
TIMEOUT = datetime.timedelta(seconds=60)
# NCCL refuses at once; should it hang instead, its watchdog ends the probe after this.
PROBE_TIMEOUT = datetime.timedelta(seconds=20)


def _init(backend: str, init_file: str, rank: int, device: torch.device,
          timeout: datetime.timedelta = TIMEOUT) -> None:
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD, timeout=timeout)


def _probe_nccl(rank: int, init_file: str, out_dir: str) -> None:
    """One all-reduce over NCCL with both ranks on cuda:0."""
    device = torch.device("cuda", 0)
    _init("nccl", init_file, rank, device, PROBE_TIMEOUT)
    try:
        value = torch.ones(1, device=device)
        dist.all_reduce(value)
        torch.cuda.synchronize(device)
        torch.save({"sum": value.item()}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _worker(rank: int, init_file: str, out_dir: str, backend: str, device_type: str) -> None:
    device = torch.device(device_type, 0) if device_type == "cuda" else torch.device("cpu")
    _init(backend, init_file, rank, device)
    group = dist.group.WORLD
    results = {}
    try:
        with activate(device):
            for case in CASES:
                start, size = LAYOUTS[case.layout][1][rank]
                loss = vocab_parallel_loss(case, group, start, size)
                inputs = to_device(make_inputs(case), device)
                for mode, fn in (("eager", loss),
                                 ("compiled", torch.compile(loss, backend="inductor"))):
                    result, codes = compat.run_and_get_code(
                        reference.loss_and_grads, fn, inputs, case.dtype, **case.options())
                    results[f"{case.name} {mode}"] = _on_cpu(result)
                    results[f"{case.name} {mode} kernels"] = generated_code.kernel_calls(codes)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _on_cpu(result: dict) -> dict:
    return {name: value.cpu() for name, value in result.items() if value is not None}


def _backend(device: torch.device, directory) -> tuple[str, str]:
    """('nccl' or 'gloo', why) for two ranks on this one device."""
    if device.type != "cuda":
        return "gloo", "CPU tensors (interpreter)"
    if not dist.is_nccl_available():
        return "gloo", "this torch has no NCCL"
    probe = directory / "nccl_probe"
    probe.mkdir()
    try:
        sums = [result["sum"] for result in ranks.spawn_ranks(_probe_nccl, probe, WORLD)]
    except Exception:  # noqa: BLE001  (any failure of the probe means: not NCCL)
        lines = traceback.format_exc().strip().splitlines()
        return "gloo", f"NCCL refused two ranks on one GPU: {lines[-1][:300]}"
    if sums != [float(WORLD)] * WORLD:
        return "gloo", f"NCCL all-reduce gave {sums}"
    return "nccl", "NCCL accepted two ranks on one GPU"


def test_vocab_parallel_two_ranks_on_one_device(harness, tmp_path, record_property):
    backend, why = _backend(harness.device, tmp_path)
    record_property("backend", backend)
    record_property("backend_reason", why)
    run = tmp_path / "run"
    run.mkdir()
    per_rank = ranks.spawn_ranks(_worker, run, WORLD, backend, harness.device.type)
    for case in CASES:
        for mode in ("eager", "compiled"):
            check_against_single_process(
                case, [results[f"{case.name} {mode}"] for results in per_rank])
            for results in per_rank:
                generated_code.assert_templates_launched(results[f"{case.name} {mode} kernels"])
