"""The CCE TritonTemplates: jinja sources from cce_inductor.templates and their launch grids.

Templates are built on first use (building one imports Inductor's select_algorithm).
Every template is launched with call_sizes (N, V, D), but the forward combine with (N,).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from cce_inductor import compat
from cce_inductor.lowering import configs

# lowering/ and templates/ are siblings both in the checkout and once installed under cce_inductor/.
TEMPLATE_DIR = Path(__file__).resolve().parent.parent / "templates"

COMMON = "cce_common"
# template name -> jinja sources concatenated into its kernel module
SOURCES = {
    "cce_forward": ("cce_forward", COMMON),
    "cce_forward_combine": ("cce_forward_combine",),
    "cce_backward": ("cce_backward", COMMON),
    "cce_backward_owned": ("cce_backward_owned", COMMON),
}


def template_files() -> list[Path]:
    """Every jinja file the templates are rendered from (for the FX-graph-cache key)."""
    return sorted(TEMPLATE_DIR.glob("*.py.jinja"))


def read_source(name: str) -> str:
    return "".join((TEMPLATE_DIR / f"{part}.py.jinja").read_text() for part in SOURCES[name])


def _forward_grid(n, v, d, meta, *, cdiv, min, max):
    splits = configs.vocab_splits(n, v, meta["BLOCK_N"], meta["BLOCK_V"],
                                  meta.get("WAVES", 0) * meta["SM_COUNT"],
                                  cdiv=cdiv, min=min, max=max)
    return (cdiv(n, meta["BLOCK_N"]), splits, 1)


def _forward_combine_grid(n, meta, *, cdiv):
    return (cdiv(n, meta["BLOCK_N"]), 1, 1)


def _backward_grid(n, v, d, meta, *, cdiv):
    return (cdiv(n, meta["BLOCK_N"]) * cdiv(v, meta["BLOCK_V"]), 1, 1)


def _backward_owned_grid(n, v, d, meta, *, cdiv):
    owned = cdiv(n, meta["BLOCK_N"]) if meta["OWNS_ROWS"] else cdiv(v, meta["BLOCK_V"])
    return (owned, cdiv(d, meta["BLOCK_DO"]), 1)


_GRIDS = {
    "cce_forward": _forward_grid,
    "cce_forward_combine": _forward_combine_grid,
    "cce_backward": _backward_grid,
    "cce_backward_owned": _backward_owned_grid,
}


@functools.cache
def template(name: str) -> Any:
    """The TritonTemplate `name` (one of SOURCES)."""
    return compat.triton_template(name, _GRIDS[name], read_source(name))
