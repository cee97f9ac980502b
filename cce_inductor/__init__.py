"""cce-inductor: Cut Cross-Entropy for torch.compile.

`linear -> cross_entropy` (and the RL head: log-probabilities, entropy, with a temperature)
computed without materializing the `[N, V]` logits, through an explicit API
(`linear_cross_entropy`, `linear_log_probs`, `LinearCrossEntropy`) and a torch.compile backend
(`cce_backend`, `backend="cce"`) that rewrites unmodified models.
"""

from cce_inductor import ops  # noqa: F401  (registers torch.ops.cce.*)
from cce_inductor.lowering import registration  # noqa: F401  (Inductor lowerings, registered lazily)
from cce_inductor.api import LinearCrossEntropy, linear_cross_entropy, linear_log_probs
from cce_inductor.backend import cce_backend, make_cce_backend

__all__ = [
    "LinearCrossEntropy", "cce_backend", "linear_cross_entropy", "linear_log_probs",
    "make_cce_backend",
]
