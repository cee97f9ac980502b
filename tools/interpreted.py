"""Compiling CPU graphs to the Triton kernels a GPU would get, run by Triton's interpreter."""

from __future__ import annotations

import contextlib
import warnings
from typing import Iterator


@contextlib.contextmanager
def triton_on_cpu(active: bool = True) -> Iterator[None]:
    """While active, Inductor compiles CPU graphs with its Triton backend (the CCE templates
    included) and Triton's interpreter runs them (`cce_inductor.tools.interpreter`)."""
    if not active:
        yield
        return
    from cce_inductor.tools import interpreter

    with interpreter.interpreted(), warnings.catch_warnings():
        # numpy, under the interpreter, warns about overflows in masked-off lanes: noise.
        warnings.simplefilter("ignore", RuntimeWarning)
        yield
