"""Everything that differs across the supported torch versions (2.11 to 2.15), and every use of
a private torch API, lives here so the rest of the project reads as plain torch."""

from __future__ import annotations

import torch
from torch import Tensor

TORCH_VERSION = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])


def is_traced(tensor: Tensor) -> bool:
    """True while Dynamo or AOT autograd traces (fake or functional tensors): data-dependent
    Python control flow is impossible there, so checks must become graph asserts."""
    if torch.compiler.is_compiling():
        return True
    from torch._subclasses.fake_tensor import is_fake

    return is_fake(tensor) or torch._is_functional_tensor(tensor)
