"""Running a test module's worker on several processes (ranks) and collecting what each saved."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
import torch.multiprocessing as mp


def spawn_ranks(worker: Callable[..., None], directory: Path, world: int,
                *extra: Any) -> list[dict[str, Any]]:
    """Spawn `worker(rank, init_file, directory, *extra)` on `world` processes once; each rank
    saves its results to directory/rank<r>.pt, returned in rank order."""
    mp.spawn(worker, args=(str(directory / "init"), str(directory), *extra), nprocs=world,
             join=True)
    return [torch.load(directory / f"rank{rank}.pt") for rank in range(world)]
