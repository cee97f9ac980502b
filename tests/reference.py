"""The float64 reference of `linear -> cross_entropy` and the tolerance rule of the numerics tests.

The reference is torch itself: `F.linear`, the optional softcap `s * tanh(z / s)` and
`F.cross_entropy`, run in float64 on the same (already dtype-rounded) inputs.

Tolerance rule, in the style of ml-cross-entropy: for every compared quantity (the loss and each
gradient) our error against the float64 reference may be at most `factor` times the error that
torch itself makes in the same dtype on the same inputs (`F.linear + F.cross_entropy` in that
dtype), plus `margin`. Errors are max-abs errors divided by the reference's largest magnitude,
so one table serves losses and gradients of any scale.

Where torch's same-dtype result is not finite but the float64 one is (fp16 with label smoothing:
the smoothing sum over V classes and N rows overflows fp16), torch gives no usable error. The
baseline then is the float32 computation on the same inputs with its results rounded to the
dtype: the error of correctly rounding the answer to that dtype, which no same-dtype result can
beat.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclasses.dataclass(frozen=True)
class Tolerance:
    factor: float  # times torch's own same-dtype error
    margin: float  # plus this much, relative to the reference's largest magnitude


# factor: rounding order differs from torch's (tiled online log-sum-exp, per-tile matmuls), so
# equal quality means "within a small multiple", not "at most". margin: a few ulps at the
# reference's largest magnitude, for quantities where torch happens to be nearly exact.
TOLERANCES: dict[torch.dtype, Tolerance] = {
    torch.float32: Tolerance(factor=2.0, margin=4 * 2.0**-23),  # 4 fp32 ulps
    torch.bfloat16: Tolerance(factor=2.0, margin=2.0**-8),  # half a bf16 ulp
    torch.float16: Tolerance(factor=2.0, margin=2.0**-11),  # half an fp16 ulp
}

GRAD_NAMES = ("input", "linear_weight", "linear_bias")


def torch_linear_cross_entropy(
    input: Tensor,
    linear_weight: Tensor,
    target: Tensor,
    *,
    linear_bias: Optional[Tensor] = None,
    weight: Optional[Tensor] = None,
    reduction: str = "mean",
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    softcap: Optional[float] = None,
) -> Tensor:
    """Materialized-logits `linear -> [softcap] -> cross_entropy`, in the inputs' dtype."""
    logits = softcapped_logits(input, linear_weight, linear_bias, softcap)
    if weight is not None:
        weight = weight.to(logits.dtype)
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]) if logits.dim() > 2 else logits,
        target.reshape(-1) if logits.dim() > 2 else target,
        weight=weight, reduction=reduction, ignore_index=ignore_index,
        label_smoothing=label_smoothing,
    ).reshape(target.shape if reduction == "none" else ())


def softcapped_logits(
    input: Tensor, linear_weight: Tensor, linear_bias: Optional[Tensor], softcap: Optional[float]
) -> Tensor:
    logits = F.linear(input, linear_weight, linear_bias)
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return logits


def torch_log_probs_and_entropy(
    input: Tensor,
    linear_weight: Tensor,
    target: Tensor,
    *,
    linear_bias: Optional[Tensor] = None,
    temperature: float = 1.0,
    softcap: Optional[float] = None,
    ignore_index: int = -100,
) -> tuple[Tensor, Tensor]:
    """Materialized log-probabilities of `target` (0 where ignored) and entropies of
    softmax(softcap(linear) / temperature), in the inputs' dtype, written as RL trainers do."""
    logits = softcapped_logits(input, linear_weight, linear_bias, softcap) / temperature
    log_p = logits.log_softmax(-1)
    valid = target != ignore_index
    picked = log_p.gather(-1, torch.where(valid, target, 0).unsqueeze(-1)).squeeze(-1)
    return torch.where(valid, picked, 0.0), -(log_p.exp() * log_p).sum(-1)


ENTROPY_COEF = 0.3


def rl_objective(head: Callable[..., tuple[Tensor, Tensor]]) -> Callable[..., Tensor]:
    """`(log_probs * adv).sum() + ENTROPY_COEF * entropy.sum()` of a head returning (log_probs,
    entropy), as a loss in the calling convention of `loss_and_grads` (`weight` unused), with
    advantages exactly representable in every dtype."""
    def objective(input, linear_weight, target, *, linear_bias=None, weight=None, **options):
        log_probs, entropy = head(input, linear_weight, target, linear_bias=linear_bias,
                                  **options)
        advantages = upstream_grad(log_probs.shape, seed=7).to(log_probs.dtype)
        return (log_probs * advantages).sum() + ENTROPY_COEF * entropy.sum()

    return objective


def make_inputs(
    n: int,
    v: int,
    d: int,
    dtype: torch.dtype,
    *,
    bias: bool = False,
    class_weight: bool = False,
    ignored: str = "none",
    ignore_index: int = -100,
    seed: int = 0,
) -> dict[str, Optional[Tensor]]:
    """Random inputs with logits of standard deviation about 2 (a softmax that is neither flat
    nor one-hot). ignored: 'none', 'some' (about a third of the rows) or 'all'. Class weights
    are in [0.5, 1.5] and representable in `dtype`, so every computation sees the same ones."""
    gen = torch.Generator().manual_seed(seed)
    target = torch.randint(0, v, (n,), generator=gen)
    if ignored == "some":
        target[torch.rand(n, generator=gen) < 1 / 3] = ignore_index
    elif ignored == "all":
        target[:] = ignore_index
    else:
        assert ignored == "none", ignored
    return {
        "input": torch.randn(n, d, generator=gen).to(dtype),
        "linear_weight": (torch.randn(v, d, generator=gen) * (2 / d**0.5)).to(dtype),
        "linear_bias": (torch.randn(v, generator=gen) * 0.5).to(dtype) if bias else None,
        "weight": (torch.rand(v, generator=gen) + 0.5).to(dtype) if class_weight else None,
        "target": target,
    }


def upstream_grad(shape: torch.Size, seed: int = 1) -> Tensor:
    """A random gradient for reduction='none' outputs, exactly representable in fp16 and bf16."""
    gen = torch.Generator().manual_seed(seed)
    magnitude = torch.rand(shape, generator=gen) + 0.5
    sign = torch.randint(0, 2, shape, generator=gen) * 2 - 1
    return (magnitude * sign).to(torch.bfloat16).float()


def loss_and_grads(
    fn: Callable[..., Tensor], inputs: dict[str, Optional[Tensor]], dtype: torch.dtype, *,
    frozen: tuple[str, ...] = (), **options
) -> dict[str, Tensor]:
    """Run `fn(input, linear_weight, target, linear_bias=, weight=, **options)` on copies of
    `inputs` cast to `dtype` (on the inputs' device), backpropagate (a random upstream gradient
    for reduction='none'), and return the loss and the gradients of input, linear_weight and
    linear_bias, less those named in `frozen` (which take no gradient)."""
    leaves = {
        name: inputs[name].detach().to(dtype).requires_grad_(name not in frozen)
        for name in GRAD_NAMES if inputs[name] is not None
    }
    weight = inputs["weight"].to(dtype) if inputs["weight"] is not None else None
    loss = fn(
        leaves["input"], leaves["linear_weight"], inputs["target"],
        linear_bias=leaves.get("linear_bias"), weight=weight, **options,
    )
    grad_output = upstream_grad(loss.shape).to(loss.device, loss.dtype) if loss.dim() else None
    loss.backward(grad_output)
    result = {"loss": loss.detach()}
    result.update({name: leaf.grad for name, leaf in leaves.items() if name not in frozen})
    return result


def relative_error(value: Tensor, reference: Tensor) -> float:
    """max |value - reference| / max |reference| over the entries where the reference is finite
    (a zero reference divides by 1, so an exactly-zero answer is required up to the margin)."""
    value, reference = value.double(), reference.double()
    finite = torch.isfinite(reference)
    if not finite.any():
        return 0.0
    scale = reference[finite].abs().max().item() or 1.0
    return (value[finite] - reference[finite]).abs().max().item() / scale


def assert_close_to_reference(
    ours: dict[str, Tensor],
    torch_same_dtype: dict[str, Tensor],
    torch_upcast: Callable[[], dict[str, Tensor]],
    exact: dict[str, Tensor],
    dtype: torch.dtype,
) -> None:
    """Apply the tolerance rule to every quantity in `exact` (the float64 reference).

    torch_upcast: computes torch's float32 result on the same inputs, the fallback baseline
    (rounded to `dtype`) for quantities where torch's same-dtype result is not finite.
    """
    tolerance = TOLERANCES[dtype]
    assert ours.keys() == exact.keys(), (ours.keys(), exact.keys())
    for name, reference in exact.items():
        value = ours[name]
        assert value.shape == reference.shape, (name, value.shape, reference.shape)
        # Non-finite entries (the nan of an all-ignored mean) must be where torch has them.
        assert torch.equal(torch.isnan(value), torch.isnan(reference)), (name, value, reference)
        assert torch.equal(torch.isinf(value), torch.isinf(reference)), (name, value, reference)
        baseline = torch_same_dtype[name]
        finite = torch.isfinite(reference)
        if not torch.isfinite(baseline[finite]).all():
            baseline = torch_upcast()[name].to(dtype)
        ours_error = relative_error(value, reference)
        torch_error = relative_error(baseline, reference)
        bound = tolerance.factor * torch_error + tolerance.margin
        assert ours_error <= bound, (
            f"{name}: error {ours_error:.3g} vs float64 exceeds {tolerance.factor} x torch's "
            f"{dtype} error {torch_error:.3g} + {tolerance.margin:.3g}"
        )


def check_against_reference(
    ours: Callable[..., Tensor],
    inputs: dict[str, Optional[Tensor]],
    dtype: torch.dtype,
    *,
    reference: Callable[..., Tensor] = torch_linear_cross_entropy,
    frozen: tuple[str, ...] = (),
    **options,
) -> dict[str, Tensor]:
    """Loss and gradients of `ours` against `reference` in float64, under the tolerance rule
    with `reference` in `dtype` as the baseline; returns ours. `frozen`: as in loss_and_grads."""
    exact = loss_and_grads(reference, inputs, torch.float64, frozen=frozen, **options)
    same_dtype = loss_and_grads(reference, inputs, dtype, frozen=frozen, **options)
    result = loss_and_grads(ours, inputs, dtype, frozen=frozen, **options)
    assert_close_to_reference(
        result, same_dtype,
        lambda: loss_and_grads(reference, inputs, torch.float32, frozen=frozen, **options),
        exact, dtype,
    )
    return result


def peaked_inputs(dtype: torch.dtype, n: int = 64, v: int = 8192, d: int = 256, seed: int = 15
                  ) -> dict[str, Optional[Tensor]]:
    """Sparse softmax rows, as in trained language models: the mass sits on the target t and
    its neighbour t ^ 1 (same filter block, p about 1/2 each), every 4th row also puts p about
    1e-2 on a column u in another filter block, and the rest is below e^-12 (filter_eps 'auto'
    for bf16 is 2^-12, about e^-8.3).

    Logits z = -20 + 20 (c_t + c_t') . c_j (+ 16 c_u . c_j) with unit classifier rows c_j plus a
    constant feature: the large values cancel inside the matmul, so the kept logits are O(1) and
    bf16 rounds them finely; the tail logits are about N(-20, 1.8^2)."""
    gen = torch.Generator().manual_seed(seed)
    directions = torch.randn(v, d - 1, generator=gen)
    directions /= directions.norm(dim=1, keepdim=True)
    weight = torch.cat([torch.full((v, 1), -1.0), directions], dim=1)
    target = torch.randint(0, v, (n,), generator=gen)
    hidden = 20.0 * (directions[target] + directions[target ^ 1])
    other = (target + 2048) % v  # 16 filter blocks away
    hidden[::4] += 16.0 * directions[other[::4]]
    input = torch.cat([torch.full((n, 1), 20.0), hidden], dim=1)
    target[::7] = -100
    return {"input": input.to(dtype), "linear_weight": weight.to(dtype), "linear_bias": None,
            "weight": None, "target": target}


def log_probs_values_and_grads(
    head: Callable[..., tuple[Tensor, Tensor]], inputs: dict[str, Optional[Tensor]],
    dtype: torch.dtype, **options,
) -> dict[str, Tensor]:
    """log_probs, entropy and the gradients of `rl_objective(head)`, in `dtype`."""
    values = {}

    def recording(*args, **kwargs):
        log_probs, entropy = head(*args, **kwargs)
        values.update(log_probs=log_probs.detach(), entropy=entropy.detach())
        return log_probs, entropy

    result = loss_and_grads(rl_objective(recording), inputs, dtype, **options)
    del result["loss"]
    return {**values, **result}


def check_log_probs_against_reference(
    head: Callable[..., tuple[Tensor, Tensor]], inputs: dict[str, Optional[Tensor]],
    dtype: torch.dtype, **options,
) -> None:
    """Values and RL-objective gradients of `head` (called like torch_log_probs_and_entropy)
    against float64 under the tolerance rule, the materialized head in `dtype` as baseline."""
    exact = log_probs_values_and_grads(torch_log_probs_and_entropy, inputs, torch.float64,
                                       **options)
    assert_close_to_reference(
        log_probs_values_and_grads(head, inputs, dtype, **options),
        log_probs_values_and_grads(torch_log_probs_and_entropy, inputs, dtype, **options),
        lambda: log_probs_values_and_grads(torch_log_probs_and_entropy, inputs, torch.float32,
                                           **options),
        exact, dtype,
    )
