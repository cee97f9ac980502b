"""Keeping Inductor's FX graph cache honest about the CCE lowerings.

Inductor keys its FX graph cache on the graph, the config and torch's own sources; it knows
nothing of our lowering and template files, so without this an edited template would keep
returning stale kernels. A post-grad custom pass is the hook Inductor offers: its uuid() enters
the cache key. The pass itself leaves the graph alone.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from typing import Any

from cce_inductor import compat, filter_stats

LOWERING_DIR = Path(__file__).resolve().parent


def source_files() -> list[Path]:
    """The files whose text decides the generated kernels: the lowerings, the templates, compat
    (how the lowerings call Inductor) and ops (the op contract: tile_max's block). The tools and
    the test harness are not among them: they drive the lowering, they do not shape its
    kernels."""
    from cce_inductor import ops
    from cce_inductor.lowering import common

    return (sorted(LOWERING_DIR.glob("*.py")) + common.template_files()
            + [Path(compat.__file__), Path(ops.__file__)])


def source_hash(files: list[Path] | None = None) -> str:
    """sha256 over the names and contents of `files` (default: source_files())."""
    hasher = hashlib.sha256()
    for path in files if files is not None else source_files():
        hasher.update(path.name.encode())
        hasher.update(path.read_bytes())
    from cce_inductor.lowering import backward

    # The filter-counting debug switch changes the backward's graph without changing a file;
    # so does planning the backward for other sizes than the hints (the memory report's).
    hasher.update(b"count_filtered_tiles=%d" % filter_stats.counting_enabled())
    hasher.update(b"planned_for=%r" % (backward.planned_sizes(),))
    return hasher.hexdigest()


@functools.cache
def graph_pass() -> Any:
    """The post-grad pass carrying the hash (a CustomGraphPass instance)."""
    base = compat.custom_graph_pass_base()

    class CCESourcesPass(base):  # type: ignore[misc, valid-type]
        """No-op pass whose uuid is the hash of the CCE lowering and template sources."""

        def __call__(self, graph: Any) -> None:
            return None

        def uuid(self) -> str:
            return "cce_inductor:" + source_hash()

    return CCESourcesPass()
