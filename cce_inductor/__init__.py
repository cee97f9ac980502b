"""cce-inductor: Cut Cross-Entropy for torch.compile.

`linear -> cross_entropy` computed without materializing the `[N, V]` logits, through an
explicit API (`linear_cross_entropy`, `LinearCrossEntropy`) and a torch.compile backend
(`cce_backend`, `backend="cce"`) that rewrites unmodified models.
"""

from cce_inductor import ops  # noqa: F401  (registers torch.ops.cce.*)
from cce_inductor.lowering import registration  # noqa: F401  (Inductor lowerings, registered lazily)
from cce_inductor.api import LinearCrossEntropy, linear_cross_entropy

__all__ = ["LinearCrossEntropy", "linear_cross_entropy"]
