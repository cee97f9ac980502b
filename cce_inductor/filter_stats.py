"""Counting the gradient tiles that filtering skips (a debugging and benchmarking aid).

    with cce_inductor.filter_stats.collect() as stats:
        loss = cce_inductor.linear_cross_entropy(...)
        loss.backward()
    print(stats.skipped, stats.total, stats.fraction)

Filtering happens where dz is formed: in the backward, or in the forward of a scalar loss whose
gradients the CPU path computes in one pass with the loss (see cce_inductor.one_pass).

Implementations report through `record`; outside `collect()` it costs one attribute lookup.
skipped: tiles whose softmax the filter found negligible (their gradient products are skipped,
for grad_input only with filter_grads='input'); early: those of them the compiled backward
skipped before recomputing their logits (from the forward's tile maxima).

The blocked (CPU) backward always reports. The compiled backward reports only when counting
was on while its graph was lowered (`CCE_COUNT_FILTERED_TILES=1` in the environment, or
`counting()`): the compiled graph then calls `cce::record_filter_stats` (cce_inductor.ops)
after the backward kernels with their kept-tile map, which counts the verdicts and hands them
to `record`. The switch is part of the FX graph cache key; counting costs a host sync per
backward.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Iterator, Optional

ENV_VAR = "CCE_COUNT_FILTERED_TILES"


@dataclasses.dataclass
class FilterStats:
    skipped: int = 0
    total: int = 0
    early: int = 0

    @property
    def fraction(self) -> float:
        return self.skipped / self.total if self.total else 0.0


_active: Optional[FilterStats] = None
_counting_forced: Optional[bool] = None


def record(skipped: int, total: int, early: int = 0) -> None:
    if _active is not None:
        _active.skipped += skipped
        _active.total += total
        _active.early += early


@contextlib.contextmanager
def collect() -> Iterator[FilterStats]:
    """Collect filter statistics of every gradient computation run inside the block."""
    global _active
    previous, _active = _active, FilterStats()
    try:
        yield _active
    finally:
        _active = previous


def counting_enabled() -> bool:
    """Whether graphs lowered now build backward kernels that count their filtered tiles."""
    if _counting_forced is not None:
        return _counting_forced
    return os.environ.get(ENV_VAR, "0") not in ("", "0")


@contextlib.contextmanager
def counting(on: bool = True) -> Iterator[None]:
    """Graphs lowered inside the block count filtered tiles (or not, with on=False)."""
    global _counting_forced
    previous, _counting_forced = _counting_forced, on
    try:
        yield
    finally:
        _counting_forced = previous
