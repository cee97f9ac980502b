"""cce-demo: train a tiny causal LM with torch.compile's default backend and with backend="cce".

    cce-demo                      # 8 steps of a 2-layer GPT, vocabulary 32768, on CPU or CUDA
    cce-demo --steps 30 --batch-size 8

Both runs start from the same weights and see the same batches, each in its own process, so
their per-step losses can be compared line by line. Peak memory is that of the last step's
forward and backward (gradients included) beyond what was live before it (weights, optimizer
state); the optimizer's own temporaries are left out.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from typing import Any, Optional

import torch
from tabulate import tabulate

from cce_inductor import compat
from cce_inductor.tools import measure
from cce_inductor.tools.toy_lm import TEXT, ToyLMConfig, WordTokenizer, batches, build_model

RUNS = (("inductor", "torch.compile (inductor)"), ("cce", 'torch.compile(backend="cce")'))


def _parse(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="cce-demo",
        description="Train a tiny causal LM with torch.compile's default backend and with "
        "backend='cce'; compare losses, time and peak memory.",
    )
    parser.add_argument("--steps", type=int, default=8, help="training steps (default 8)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=32768, help="vocabulary size")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu",
        help="cpu or cuda (default: cuda when available)",
    )
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error("--steps must be at least 2 (the last step is the profiled one)")
    text_tokens = len(WordTokenizer().encode(TEXT))
    if not 2 <= args.seq_len < text_tokens:
        parser.error(f"--seq-len must be in [2, {text_tokens}) (the built-in text's length)")
    return args


def train(payload: dict[str, Any]) -> dict[str, Any]:
    """One run (in a worker process): compile, train, time, profile the last step's memory."""
    device = torch.device(payload["device"])
    label = payload["label"]
    config = ToyLMConfig(
        vocab_size=payload["vocab"], hidden=payload["hidden"], layers=payload["layers"],
        max_seq_len=payload["seq_len"],
    )
    model = build_model(config, payload["seed"], payload["device"])
    compile_start = time.perf_counter()  # resolving the backend is part of compiling
    compiled = torch.compile(model, backend=payload["backend"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=payload["lr"])
    data = batches(
        WordTokenizer(), payload["batch_size"], payload["seq_len"], payload["steps"],
        payload["seed"],
    )

    def forward_backward(ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        loss = compiled(ids, labels)
        loss.backward()
        return loss.detach()

    losses, seconds = [], []
    peak = None
    for index, (ids, labels) in enumerate(data):
        last = index == len(data) - 1
        measure.synchronize(device)
        start = compile_start if index == 0 else time.perf_counter()
        ids, labels = ids.to(device), labels.to(device)
        if last:
            loss, peak = measure.peak_extra_bytes(lambda: forward_backward(ids, labels), device)
        else:
            loss = forward_backward(ids, labels)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss = loss.item()
        measure.synchronize(device)
        seconds.append(time.perf_counter() - start)
        losses.append(loss)
        note = " (compile + run)" if index == 0 else " (profiled)" if last else ""
        print(
            f"  [{label}] step {index + 1:>3}/{len(data)}  loss {loss:.4f}  "
            f"{seconds[-1]:.2f} s{note}",
            flush=True,
        )
        if index == 0:
            measure.pass_gate(payload)
    counters = {key: value for key, value in compat.dynamo_counters()["cce"].items()}
    return {"losses": losses, "seconds": seconds, "peak_bytes": peak, "counters": counters}


def _median_step(seconds: list[float]) -> Optional[float]:
    """Median of the steps that neither compiled (the first) nor ran under the profiler (the
    last); None when there are none."""
    return statistics.median(seconds[1:-1]) if len(seconds) > 2 else None


def _report(args: argparse.Namespace, results: dict[str, dict[str, Any]]) -> str:
    names = [label for _, label in RUNS]
    rows = []
    for step in range(args.steps):
        losses = [results[name].get("losses", [])[step:step + 1] for name in names]
        row = [step + 1] + [f"{loss[0]:.5f}" if loss else "—" for loss in losses]
        if all(losses):
            row.append(f"{abs(losses[0][0] - losses[1][0]):.2e}")
        else:
            row.append("—")
        rows.append(row)
    lines = [tabulate(rows, headers=["step", *names, "|difference|"], tablefmt="github")]

    summary = []
    for name in names:
        result = results[name]
        if "error" in result:
            summary.append([name, f"failed: {result['error']}", "", ""])
            continue
        median = _median_step(result["seconds"])
        summary.append([
            name,
            f"{result['seconds'][0]:.1f}",
            "—" if median is None else f"{median:.3f}",
            measure.megabytes(result["peak_bytes"]),
        ])
    headers = [
        "run", "compile + first step (s, side by side)", "median step (s)",
        "peak fwd+bwd memory (MB)",
    ]
    lines += ["", tabulate(summary, headers=headers, tablefmt="github")]

    counters = results[names[1]].get("counters")
    if counters is not None:
        described = ", ".join(f"{key}: {value}" for key, value in sorted(counters.items()))
        lines += ["", f"rewrite summary (torch._dynamo.utils.counters['cce']): "
                      f"{described or 'no linear -> cross_entropy site seen'}"]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    payload = measure.worker_payload(argv)
    if payload is not None:
        measure.write_worker_result(payload, train(payload))
        return 0
    args = _parse(argv)
    tokens = args.batch_size * args.seq_len
    print(
        f"cce-demo: {args.layers}-layer GPT (hidden {args.hidden}, vocabulary {args.vocab}), "
        f"{args.steps} AdamW steps of {args.batch_size} x {args.seq_len} tokens on {args.device}; "
        f"the logits of one step take {tokens * args.vocab * 4 / measure.MB:.0f} MB in fp32. "
        f"A fresh loss starts near ln(V) = {math.log(args.vocab):.2f}.",
        flush=True,
    )
    # Both runs compile side by side (compilation is mostly one core's work), then train one
    # after the other, so that neither's step times share the machine with the other.
    print("\ncompiling both (first step), then training one after the other", flush=True)
    workers = {
        label: measure.Worker(
            "cce_inductor.tools.demo", dict(vars(args), backend=backend, label=label), gated=True
        )
        for backend, label in RUNS
    }
    for worker in workers.values():
        worker.wait_at_gate()
    results = {}
    for label, worker in workers.items():
        worker.release()
        results[label] = worker.result()
    print()
    print(_report(args, results))
    return 1 if any("error" in result for result in results.values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
