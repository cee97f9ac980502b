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

from pathlib import Path
from typing import Iterator

import pytest

from device_harness import Harness, activate, harness_device, unavailable_reason


@pytest.fixture
def harness(fresh_compile) -> Iterator[Harness]:
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    device = harness_device()
    with activate(device):
        yield Harness(device)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = Path(__file__).resolve().parent
    for item in items:
        if here in Path(item.path).resolve().parents:
            item.add_marker(pytest.mark.gpu)
