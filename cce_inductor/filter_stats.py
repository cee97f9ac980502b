"""Counting the gradient tiles that filtering skips (a debugging and benchmarking aid).

    with cce_inductor.filter_stats.collect() as stats:
        loss.backward()
    print(stats.skipped, stats.total, stats.fraction)

Implementations report through `record`; outside `collect()` it costs one attribute lookup.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterator, Optional


@dataclasses.dataclass
class FilterStats:
    skipped: int = 0
    total: int = 0

    @property
    def fraction(self) -> float:
        return self.skipped / self.total if self.total else 0.0


_active: Optional[FilterStats] = None


def record(skipped: int, total: int) -> None:
    if _active is not None:
        _active.skipped += skipped
        _active.total += total


@contextlib.contextmanager
def collect() -> Iterator[FilterStats]:
    """Collect filter statistics of every backward run inside the block."""
    global _active
    previous, _active = _active, FilterStats()
    try:
        yield _active
    finally:
        _active = previous
