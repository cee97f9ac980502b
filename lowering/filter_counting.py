"""Filter statistics from the compiled backward (a debugging aid, off by default).

With counting on (`CCE_COUNT_FILTERED_TILES=1` in the environment, or `counting()`), the
backward templates add, per logit tile, one to a small int64 buffer [skipped, total], and
the compiled graph then calls `cce::record_filter_stats`, which hands the counts to
`cce_inductor.filter_stats.record`: `filter_stats.collect()` sees compiled backwards as it
sees the eager one. The switch is read when a graph is lowered and is part of the FX graph
cache key; counting costs two atomics per tile and a host sync per backward.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch
from torch import Tensor

from cce_inductor import filter_stats

ENV_VAR = "CCE_COUNT_FILTERED_TILES"
_forced: bool | None = None


def enabled() -> bool:
    if _forced is not None:
        return _forced
    return os.environ.get(ENV_VAR, "0") not in ("", "0")


@contextlib.contextmanager
def counting(on: bool = True) -> Iterator[None]:
    """Graphs lowered inside the block count filtered tiles (or not, with on=False)."""
    global _forced
    previous, _forced = _forced, on
    try:
        yield
    finally:
        _forced = previous


@torch.library.custom_op("cce::record_filter_stats", mutates_args=("counts",))
def record_filter_stats(counts: Tensor) -> None:
    """Report counts = [skipped, total] to filter_stats and reset them.

    Declared as mutating `counts` so that Inductor keeps the call although nothing reads it.
    """
    skipped, total = counts.tolist()
    filter_stats.record(skipped=int(skipped), total=int(total))
    counts.zero_()
