"""The command-line tools (cce-demo, cce-bench, cce-dump, the memory report) on tiny shapes:
they run, write their files, and list every implementation that is installed; and the memory
report, read from generated code without running, agrees with what that code allocates."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from collections import Counter

import pytest
import torch

from cce_inductor import compat
from cce_inductor.tools import bench, demo, dump, measure, memory_report
from cce_inductor.tools.presets import PRESETS, Shape
from cce_inductor.tools.wrapper_memory import replay

# A shape other than the compile-time one (memory_report.TINY), so that the sizes really are
# substituted into the symbolic code. float32: on a CPU, bf16 matmuls (extern kernels) allocate
# float32 scratch copies of their operands that no wrapper shows.
pytestmark = pytest.mark.usefixtures("fresh_dynamo")

SMALL = Shape(n=64, v=400, d=48, dtype="float32")


def _allocations(fn) -> list[int]:
    """Sizes of the allocations (positive allocator events) `fn()` makes, in order."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        fn()
    return [nbytes for _, nbytes in compat.allocation_events(profiler)]


def _loss_and_gradient(backend: str, shape: Shape):
    """Compile loss+grad at TINY with dynamic shapes, planned for Gemma 2 2B as the memory
    report plans it; the two wrappers replayed at `shape`, and the allocator events of the same
    compiled code run at `shape`."""
    device = torch.device("cpu")
    tiny = dataclasses.replace(memory_report.TINY, dtype=shape.dtype)
    sources, compiled = memory_report.compile_wrappers(backend, "loss+grad", tiny, device,
                                                       planned=PRESETS["gemma2-2b"])
    forward, backward = (replay(source, memory_report.sizes_at(shape)) for source in sources)
    hidden, classifier, target = memory_report.make_inputs(shape, device, with_grad=True, seed=1)
    with memory_report.code_generation(backend, device, PRESETS["gemma2-2b"]):
        events = _allocations(lambda: compiled(hidden, classifier, target).backward())
    return sources, forward, backward, events


def test_memory_report_agrees_with_the_default_backends_allocations():
    _, forward, backward, events = _loss_and_gradient("inductor", SMALL)
    # The logits [N, V] are saved for the backward: the forward's largest buffer.
    assert max(a.nbytes for a in forward.allocations) == SMALL.n * SMALL.v * 4
    live = peak = 0
    for nbytes in events:
        live += nbytes
        peak = max(peak, live)
    predicted = max(forward.peak_bytes, forward.returned_bytes + backward.peak_bytes)
    # The only allocation outside the compiled code: autograd's incoming gradient of the loss
    # (a float32 scalar, 4 bytes, rounded up by nothing else).
    assert 0 <= peak - predicted <= 8, (peak, predicted)
    # Every buffer the report lists is allocated, at the size the report says.
    listed = Counter(a.nbytes for a in forward.allocations + backward.allocations if a.nbytes)
    assert not listed - Counter(nbytes for nbytes in events if nbytes > 0)


def test_memory_report_agrees_with_the_cce_templates_allocations():
    shape = dataclasses.replace(SMALL, dtype="bfloat16")  # templates: no hidden scratch
    sources, forward, backward, events = _loss_and_gradient("cce", shape)
    allocated = Counter(nbytes for nbytes in events if nbytes > 0)
    listed = Counter(a.nbytes for a in forward.allocations + backward.allocations if a.nbytes)
    # Exactly the buffers of the generated code, and autograd's incoming gradient of the loss
    # (a scalar of the inputs' dtype).
    assert allocated - listed == Counter({shape.torch_dtype.itemsize: 1}), (allocated, listed)
    assert not listed - allocated
    # No buffer of the fused loss grows with N * V (at an LLM's shape: at tiny ones, split
    # counts that are capped for large N can still follow V).
    for source in sources:
        memory, facts = memory_report.analyse(source, PRESETS["gemma2-2b"])
        assert not [fact for fact in facts if fact[1]], list(zip(memory.allocations, facts))


def test_memory_report_at_gemma2_2b(capsys):
    assert bench.main(["--preset", "gemma2-2b", "--memory-report"]) == 0
    text = capsys.readouterr().out
    assert "The paper's Table 1" in text
    summary = text.split("\n\n")[1]  # the first table: MB per implementation
    rows = {line.split("|")[1].strip(): line for line in summary.splitlines()}
    # torch.compile keeps the bf16 logits, 8192 * 256000 * 2 bytes = 4000 MB; cce about nothing.
    assert "4,000.0" in rows["torch.compile"] or "4,000.1" in rows["torch.compile"]
    loss_mb, _, both_mb = (
        float(cell.replace(",", "")) for cell in rows['backend="cce"'].split("|")[2:5])
    assert loss_mb < 1.0
    # The gradients' floor, 1161 MB, plus the fp32 dE accumulator (N x D x 4 bytes: 72 MB) and
    # at most 37 MB of working space (dz chunk, tile maps, row statistics).
    assert both_mb <= 1161 + 72 + 37, both_mb
    quadratic = next(line for line in text.splitlines() if line.startswith("Buffers that grow"))
    assert "torch.compile forward buf" in quadratic and "[N, V]" in quadratic
    assert 'backend="cce"' not in quadratic


def test_demo_smoke(capsys):
    arguments = ["--steps", "2", "--layers", "0", "--vocab", "512", "--hidden", "32",
                 "--batch-size", "2", "--seq-len", "16"]
    assert demo.main(arguments) == 0
    text = capsys.readouterr().out
    for label in ("torch.compile (inductor)", 'torch.compile(backend="cce")'):
        assert label in text
    table = [line for line in text.splitlines() if line.startswith("|      ")]
    assert len(table) == 2  # one row per step, both runs' losses side by side
    assert "rewritten: 1" in text


def test_bench_smoke(tmp_path, capsys):
    json_path, png_path = tmp_path / "bench.json", tmp_path / "bench.png"
    # --same-process: the test's time budget has no room for a process per implementation
    # (cce-demo's test covers the worker processes).
    arguments = ["--n", "64", "--v", "256", "--d", "32", "--dtype", "bfloat16",
                 "--modes", "loss+grad", "--warmup", "0", "--repetitions", "1", "--same-process",
                 "--json", str(json_path), "--png", str(png_path)]
    assert bench.main(arguments) == 0
    captured = capsys.readouterr()
    results = json.loads(json_path.read_text())["results"]
    device = torch.device("cpu")
    expected = {
        bench.display_name(impl, device) for impl in bench.IMPLEMENTATIONS
        if impl.unavailable(device) is None
    }
    assert {"torch eager", 'cce-inductor backend="cce"'} <= expected
    assert {entry["implementation"] for entry in results} == expected
    for entry in results:
        assert entry["mode"] == "loss+grad"
        assert entry["median_ms"] > 0 and entry["peak_bytes"] > 0
        # bf16 inputs: every implementation within a few bf16 roundings of float64.
        assert entry["grad_weight_error"] < 0.05, entry
        assert entry["implementation"] in captured.out
    cce = [entry for entry in results if entry["implementation"].startswith("cce-inductor")]
    assert all(entry["filter_tiles"][1] > 0 for entry in cce)  # bf16: filtering is on
    if importlib.util.find_spec("matplotlib"):
        assert png_path.stat().st_size > 0
    else:
        assert "matplotlib is not installed" in captured.err


def test_bench_interleaved(tmp_path, capsys):
    """--interleaved: the workers take turns (their processes run at once, their timed runs
    one at a time), every timed run is kept, and each one's median per-round time ratio to
    --ratio-to is reported (1 for the reference itself)."""
    json_path = tmp_path / "bench.json"
    arguments = ["--n", "32", "--v", "256", "--d", "16", "--modes", "loss+grad", "--warmup", "0",
                 "--repetitions", "2", "--interleaved", "--impl", "torch eager",
                 "--impl", "cce-inductor API", "--ratio-to", "torch eager", "--device", "cpu",
                 "--json", str(json_path)]
    assert bench.main(arguments) == 0
    assert "x torch eager (median per round)" in capsys.readouterr().out
    data = json.loads(json_path.read_text())
    assert data["interleaved"] is True
    ratios = {entry["implementation"]: entry for entry in data["results"]}
    assert set(ratios) == {"torch eager", "cce-inductor API"}
    for entry in ratios.values():
        assert len(entry["times_ms"]) == 2 and entry["round_ratio"] > 0
    assert ratios["torch eager"]["round_ratio"] == 1.0


def test_round_ratios_divide_within_rounds():
    results = [
        {"implementation": "a", "mode": "loss", "times_ms": [10.0, 40.0, 20.0]},
        {"implementation": "b", "mode": "loss", "times_ms": [5.0, 10.0, 30.0]},
        {"implementation": "b", "mode": "loss+grad", "times_ms": [1.0]},  # no reference there
    ]
    bench.add_round_ratios(results, "a")
    assert results[1]["round_ratio"] == 0.5  # median of 0.5, 0.25, 1.5
    assert "round_ratio" not in results[2]


def test_bench_logprobs_smoke(tmp_path, capsys):
    """--task logprobs: the RL objective's implementations (those that run on a CPU), each
    within a few roundings of float64."""
    json_path = tmp_path / "bench.json"
    arguments = ["--task", "logprobs", "--n", "64", "--v", "256", "--d", "32",
                 "--warmup", "0", "--repetitions", "1", "--same-process", "--json", str(json_path)]
    assert bench.main(arguments) == 0
    report = json.loads(json_path.read_text())
    device = torch.device("cpu")
    expected = {impl.name for impl in bench.TASKS["logprobs"].implementations
                if impl.unavailable(device) is None}
    assert {"torch eager", "cce-inductor linear_log_probs", 'cce-inductor backend="cce"'} \
        <= expected
    assert report["task"] == "logprobs"
    assert {entry["implementation"] for entry in report["results"]} == expected
    for entry in report["results"]:
        assert entry["loss_error"] < 1e-4, entry
        if entry["mode"] == "loss+grad":
            assert entry["grad_input_error"] < 1e-4 and entry["grad_weight_error"] < 1e-4, entry
    assert "log-probs + entropy" in capsys.readouterr().out


def test_bench_refuses_large_presets_on_cpu():
    with pytest.raises(SystemExit):
        bench.main(["--preset", "llama3-8b", "--device", "cpu"])


def test_dump_smoke(tmp_path, capsys, monkeypatch):
    from cce_inductor.tools import gpu_readiness

    # The ahead-of-time GPU builds are the lowering's tests' business (minutes); here only
    # that the dump writes what they return.
    row = gpu_readiness.Resources("forward", "bfloat16", "cfg", 90, 128, 0, 32768, True, True)
    monkeypatch.setattr(gpu_readiness, "resource_table", lambda shape, all_configs=False: [row])
    out = tmp_path / "dump"
    assert dump.main(["--out", str(out), "--shape", "layers=0", "--shape", "seq=8"]) == 0
    text = capsys.readouterr().out
    assert "1 of 1 loss sites rewritten" in text
    assert "rewritten" in (out / "rewrite_decisions.txt").read_text()
    before = (out / "dynamo_graph_0_before.py").read_text()
    after = (out / "dynamo_graph_0_after.py").read_text()
    assert "cross_entropy" in before and "linear_head" in after
    codes = sorted(path.name for path in (out / "output_code").iterdir())
    assert codes == ["0_forward.py", "1_backward.py"]
    kernels = list((out / "kernels").rglob("triton_tem_*.py"))
    assert kernels, "the CCE templates appear as kernels of their own"
    buffers = (out / "buffers.txt").read_text()
    assert "## 0_forward" in buffers and "## 1_backward" in buffers
    assert "sm_90a" in (out / "gpu_resources.txt").read_text()
    assert (out / "summary.txt").read_text().strip() in text


def test_megabytes_format():
    assert measure.megabytes(None) == "—"
    assert measure.megabytes(2**20 * 1161) == "1,161.0"
    assert measure.megabytes(32768) == "0.031"


def test_work_model_at_gemma2_2b(capsys):
    """The estimate, from the kernels' own configs and grids: this backward does less work than
    main's atomic one (same products, logits recomputed only where kept) and far less than
    main's deterministic one; the forward fills whole waves of an H100's 132 SMs."""
    from cce_inductor.tools import work_model

    assert bench.main(["--preset", "gemma2-2b", "--work-model", "--gpu", "H100"]) == 0
    text = capsys.readouterr().out
    assert "an estimate" in text and "6 NVD" in text and "8 NVD" in text
    shape, gpu = PRESETS["gemma2-2b"], work_model.GPUS["H100"]
    ours, atomic, owned = work_model.designs(shape, gpu, kept=0.36, recomputed=0.36)
    nvd = shape.n * shape.v * shape.d
    assert ours.flops() == pytest.approx((2 + 2 * 0.36 + 4 * 0.36) * nvd)  # in units of NVD
    assert ours.flops() < atomic.flops() < owned.flops()
    assert not any(kernel.l2_atomic_bytes for kernel in ours.kernels)
    forward = ours.kernels[0]
    assert forward.kernel == "forward" and forward.last_wave_fill > 0.5
    with pytest.raises(ValueError, match="kept-fraction"):
        bench.main(["--work-model", "--kept-fraction", "1.5"])


def test_kept_tiles_smoke(capsys):
    from cce_inductor.tools import kept_tiles

    assert kept_tiles.main(["--steps", "2", "--vocab", "1024", "--hidden", "32", "--layers", "0",
                            "--batch-size", "2", "--rows", "256"]) == 0
    text = capsys.readouterr().out
    for order in ("tokenizer ids", "sorted by mean logit", "random ids"):
        assert order in text


def test_kept_tile_fractions_follow_the_rule():
    """Every tile that holds a target or a softmax value >= 2**-12 is kept; the tiles
    skippable early are negligible ones (here: all of them, the rows being alike)."""
    from cce_inductor.tools import kept_tiles

    logits = torch.full((64, 512), -30.0)
    target = torch.arange(64) % 128
    logits[torch.arange(64), target] = 0.0
    logits[0, 300] = -5.0  # p ~ e^-5 > 2**-12: tile 2 of the first row block is kept
    kept, early = kept_tiles.tile_fractions(logits, target, 32)
    assert kept == pytest.approx(3 / 8) and early == pytest.approx(5 / 8)
