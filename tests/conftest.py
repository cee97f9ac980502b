"""Fixtures shared by the test modules; a module takes them with
`pytestmark = pytest.mark.usefixtures(...)` (helpers that are not fixtures: support.py)."""

from __future__ import annotations

import pytest
import torch

import support
from cce_inductor import compat


@pytest.fixture
def fresh_dynamo():
    """Each test compiles from scratch and counts its own graph-pass decisions."""
    support.fresh_dynamo_state()
    yield
    torch.compiler.reset()


@pytest.fixture
def fresh_compile(fresh_dynamo):
    """As fresh_dynamo, and with empty Inductor caches: no FX-graph-cache hit hides the code
    being checked."""
    with compat.fresh_inductor_cache():
        yield


@pytest.fixture
def one_tile_chunks(monkeypatch):
    """The Triton backward's vocabulary chunks one tile (128 classes) wide, so that any V beyond
    one tile takes several chunks and the fp32 dE accumulator, as a long vocabulary does at a
    realistic N."""
    from cce_inductor.lowering import backward

    monkeypatch.setattr(backward, "DZ_BUDGET_BYTES", 1)


@pytest.fixture(scope="module")
def single_threaded():
    """The module runs on one intra-op thread: these tests run many ops on small tensors, where
    threads cost more than they save, and on a busy 2-core machine OpenMP threads spin against
    each other (a 10 ms case took over 1 s)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
