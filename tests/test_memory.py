"""Peak CPU memory of loss + backward: O(N*D + V*D + N) plus a chunk of logits for the blocked CPU path,
against the materialized reference, which grows with N*V.

Measurement: torch's profiler with profile_memory=True records every CPU tensor allocation and
free with its size and time (the raw "[memory]" events of the kineto results); replaying them in
time order gives the peak of live tensor bytes allocated inside the measured call.
"""

from __future__ import annotations

from typing import Callable

import pytest
import torch
import torch.autograd.profiler

import cce_inductor
import reference
from cce_inductor import blocked

pytestmark = pytest.mark.usefixtures("single_threaded")

V, D = 2048, 32
CHUNK_ROWS = 8
CHUNK_BYTES = CHUNK_ROWS * V * 4  # one chunk of fp32 logits
FLOAT32_BYTES = 4


def peak_bytes(fn: Callable[[], None]) -> int:
    """Peak of the CPU tensor bytes that `fn` allocated and were live at once."""
    with torch.autograd.profiler.profile(profile_memory=True, use_kineto=True) as prof:
        fn()
    events = sorted(
        (event.start_ns(), order, event.nbytes())
        for order, event in enumerate(prof.kineto_results.events())
        if event.name() == "[memory]" and event.device_type() == torch.autograd.DeviceType.CPU
    )
    live = peak = 0
    for _, _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def test_peak_bytes_measures_live_tensors():
    """The measurement itself: sequential allocations count once, overlapping ones add up."""
    mb = 1 << 20

    def sequential():
        for _ in range(4):
            torch.empty(mb, dtype=torch.uint8).fill_(1)

    def overlapping():
        kept = [torch.empty(mb, dtype=torch.uint8) for _ in range(4)]
        del kept

    assert mb <= peak_bytes(sequential) < 2 * mb
    assert 4 * mb <= peak_bytes(overlapping) < 5 * mb


def _loss_and_backward(fn, n: int, reduction: str = "mean") -> Callable[[], None]:
    inputs = reference.make_inputs(n, V, D, torch.float32, bias=True, ignored="some", seed=n)

    def run():
        leaves = {name: inputs[name].clone().requires_grad_() for name in reference.GRAD_NAMES}
        fn(leaves["input"], leaves["linear_weight"], inputs["target"],
           linear_bias=leaves["linear_bias"], label_smoothing=0.1,
           reduction=reduction).sum().backward()

    return run


def _bound(n: int) -> int:
    """Leaves + gradients + fp32 row statistics, with room: 3 x the O(N*D + V*D + N) tensors,
    plus 4 chunks of logits-sized temporaries."""
    return 3 * (n * D + V * D + V + n) * FLOAT32_BYTES + 4 * CHUNK_BYTES


@pytest.fixture
def chunks(monkeypatch):
    monkeypatch.setattr(blocked, "chunk_rows", lambda n, vocab, hidden, dtype: CHUNK_ROWS)


@pytest.mark.parametrize("reduction", ["mean", "none"], ids=["one_pass", "recompute"])
def test_blocked_path_memory_is_linear(chunks, reduction):
    """Ours stays within the O(N*D + V*D + N) bound at two N, and quadrupling N adds O(N*D)
    bytes, on both CPU paths (a scalar loss's one pass, the recompute backward); the
    materialized reference holds [N, V] logits and grows with N*V."""
    sizes = (256, 1024)
    ours = {
        n: peak_bytes(_loss_and_backward(cce_inductor.linear_cross_entropy, n, reduction))
        for n in sizes
    }
    materialized = {
        n: peak_bytes(_loss_and_backward(reference.torch_linear_cross_entropy, n)) for n in sizes
    }
    for n in sizes:
        logits_bytes = n * V * FLOAT32_BYTES
        assert _bound(n) < logits_bytes, "the bound must be able to tell [N, V] apart"
        assert ours[n] <= _bound(n), (n, ours[n], _bound(n))
        assert materialized[n] > logits_bytes, (n, materialized[n], logits_bytes)
    added_rows = sizes[1] - sizes[0]
    assert ours[sizes[1]] - ours[sizes[0]] <= 3 * added_rows * (D + 1) * FLOAT32_BYTES, ours
    assert materialized[sizes[1]] - materialized[sizes[0]] > added_rows * V * FLOAT32_BYTES


def test_bound_catches_full_logits(monkeypatch):
    """Negative control: one chunk holding all [N, V] logits (what materializing does) breaks
    the bound that the chunked path meets."""
    n = 1024
    monkeypatch.setattr(blocked, "chunk_rows", lambda n, vocab, hidden, dtype: n)
    assert peak_bytes(_loss_and_backward(cce_inductor.linear_cross_entropy, n)) > _bound(n)


def test_bf16_gradients_hold_no_fp32_classifier_accumulator(chunks):
    """bf16: the gradients are written in bf16 once each (grad_classifier by the sweep over
    blocks of classes), so loss + backward holds the leaves, their bf16 gradients and a few
    chunks, on both CPU paths. Control: the layout that accumulates grad_classifier over the
    row chunks holds a [V, D] fp32 accumulator besides, and breaks the bound."""
    n, d = 128, 256  # D large enough that the [V, D] fp32 accumulator outweighs the chunks
    inputs = reference.make_inputs(n, V, d, torch.bfloat16, bias=True, seed=3)
    bf16_bytes = 2

    def run(reduction: str) -> Callable[[], None]:
        def loss_and_backward():
            leaves = {name: inputs[name].clone().requires_grad_()
                      for name in reference.GRAD_NAMES}
            cce_inductor.linear_cross_entropy(
                leaves["input"], leaves["linear_weight"], inputs["target"],
                linear_bias=leaves["linear_bias"], reduction=reduction,
            ).sum().backward()
        return loss_and_backward

    leaves_and_grads = 2 * (n * d + V * d + V) * bf16_bytes
    accumulator = V * d * FLOAT32_BYTES
    # A chunk's logits in fp32 with its bf16 copies (the product and dz's), 4 of them, and
    # the fp32 accumulators of grad_bias and the [N] row statistics.
    bound = leaves_and_grads + 4 * CHUNK_BYTES * 6 // FLOAT32_BYTES + 16 * (V + n) * 4
    assert bound < leaves_and_grads + accumulator, "the bound must tell the accumulator apart"
    for reduction in ("mean", "none"):
        assert peak_bytes(run(reduction)) <= bound, reduction
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(blocked, "vocab_block_classes", lambda n, vocab, hidden, dtype: None)
        assert peak_bytes(run("mean")) > bound
