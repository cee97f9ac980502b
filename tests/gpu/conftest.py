"""The GPU tests' harness: a CUDA device, or with CCE_GPU_TESTS_ON_CPU=1 the CPU under Triton's
interpreter (tiny shapes), so that the same tests are shown to run, and to be able to fail,
on a machine without a GPU.

Every test here takes the `harness` fixture, which skips (saying why) when neither is at hand,
compiles from scratch (tests/conftest.py's fresh_compile: no cache hit hides the code or the
autotuning a test checks), and picks each test's sizes for the device:
`harness.pick(cpu=..., cuda=...)`. The shared helpers (reference.py, generated_code.py, ...)
are importable because pytest puts tests/ on sys.path for tests/conftest.py.
Every test here carries the `gpu` marker (`pytest -m "not gpu"` leaves them out).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import pytest

from device_harness import Harness, activate, harness_device, unavailable_reason

# Deterministic mode on CUDA refuses cuBLAS matmuls (the references' F.linear) unless this is
# set; torch reads it once, at the process's first cuBLAS call, so before any test runs.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


@pytest.fixture
def harness(fresh_compile) -> Iterator[Harness]:
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    device = harness_device()
    with activate(device):
        yield Harness(device)


# The most telling first: a run cut short by a time limit (cce-gpu-check) keeps those.
MODULE_ORDER = ("test_gpu_numerics", "test_gpu_eager", "test_gpu_memory",
                "test_gpu_determinism", "test_gpu_filtering", "test_gpu_autotune",
                "test_gpu_vocab_parallel")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark this folder's tests `gpu` and run them in MODULE_ORDER (in their own places in
    the session)."""
    here = Path(__file__).resolve().parent
    places = [index for index, item in enumerate(items)
              if here in Path(item.path).resolve().parents]

    def rank(item: pytest.Item) -> int:
        name = Path(item.path).stem
        return MODULE_ORDER.index(name) if name in MODULE_ORDER else len(MODULE_ORDER)

    ordered = sorted((items[index] for index in places), key=rank)
    for index, item in zip(places, ordered):
        item.add_marker(pytest.mark.gpu)
        items[index] = item
