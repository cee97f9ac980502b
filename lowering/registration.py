"""Registering the CCE lowerings with Inductor on `import cce_inductor`, without importing Inductor.

torch._inductor.lowering takes seconds to import, and most programs that import cce_inductor
import Inductor anyway when they first compile. So `install()` registers at once if Inductor's
lowering module is already loaded, and otherwise leaves a one-shot import hook that registers
right after that module finishes loading (before Inductor can lower any graph).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import logging
import sys
from typing import Any, Callable, Optional, Sequence

import torch

from cce_inductor import compat

log = logging.getLogger("cce_inductor")
_registered = False


def register() -> None:
    """Install the lowerings of the cce ops and the cache-key pass (idempotent)."""
    global _registered
    if _registered:
        return
    from cce_inductor.lowering import backward, cache, forward

    compat.register_inductor_lowering(torch.ops.cce.linear_cross_entropy_fwd.default,
                                      forward.lower_forward)
    compat.register_inductor_lowering(torch.ops.cce.linear_cross_entropy_bwd.default,
                                      backward.lower_backward)
    compat.append_post_grad_pass(cache.graph_pass())
    _registered = True


class _LoaderWithCallback(importlib.abc.Loader):
    """Delegates to the real loader, then runs `after` on the fully executed module."""

    def __init__(self, loader: importlib.abc.Loader, after: Callable[[], None]) -> None:
        self._loader = loader
        self._after = after

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> Any:
        return self._loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        self._loader.exec_module(module)
        try:
            self._after()
        except Exception:  # never break Inductor's import; the ops then run eagerly
            log.exception("cce_inductor: registering the Inductor lowerings failed")


class _PostImportHook(importlib.abc.MetaPathFinder):
    """Finds `name` with the other finders and wraps its loader; removes itself once used."""

    def __init__(self, name: str, after: Callable[[], None]) -> None:
        self._name = name
        self._after = after

    def find_spec(self, fullname: str, path: Optional[Sequence[str]], target: Any = None) -> Any:
        if fullname != self._name:
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _LoaderWithCallback(spec.loader, self._after)
        return spec


def install() -> None:
    """Register now if Inductor's lowering module is loaded, else as soon as it is."""
    if compat.INDUCTOR_LOWERING_MODULE in sys.modules:
        register()
    elif not any(isinstance(f, _PostImportHook) for f in sys.meta_path):
        sys.meta_path.insert(0, _PostImportHook(compat.INDUCTOR_LOWERING_MODULE, register))


install()
