"""The fused CCE operators, `torch.ops.cce.*`: every custom op of the project is defined here.

Two ops carry the whole computation; everything else (ignore_index, reductions, label
smoothing, class weights, z-loss) is cheap `[N]`-sized torch arithmetic around them
(`cce_inductor.losses`), so autograd, Inductor and the graph pass all see the same small graph.

`cce::linear_cross_entropy_fwd(input [N, D], classifier [V, D], bias [V]?, target [N], ...)`
returns per-row fp32 statistics of the logits z = logit_scale * softcap(input @ classifier.T +
bias) (softcap optional; logit_scale is 1 / temperature, or a model's constant logit scale):
    lse          log-sum-exp over the vocabulary
    target_logit z[i, target[i]], 0 where target[i] is outside [0, V)
    logit_sum    sum_j class_weight[j] * z[i, j] (or sum_j z[i, j]); shape [0] unless asked for
    entropy      H = lse - sum_j p[i, j] z[i, j] with p = softmax(z); shape [0] unless asked for
    tile_max     an upper bound of z over each block of TILE_MAX_ROWS rows x TILE_MAX_COLS
                 classes, [cdiv(N, 16) * cdiv(V, 128)] (row groups x vocabulary tiles, flat:
                 a dimension cdiv(N, 16), which is 1 for every N <= 16, would have Dynamo
                 specialize on it), when the backward will filter (filter_eps set and no logit
                 sum), else shape [0]. The Triton forward records the blocks'
                 maximum logits (of z itself: after softcap and scale, the logits the softmax
                 sees), so that the backward can skip negligible tiles without
                 recomputing them; the blocked implementation records +inf (no bound: nothing is
                 skipped early). Any upper bound is correct; tighter bounds skip more.
    lse_parts    [N, 2]: (m, l) with lse = m + l, m the row's largest logit and l the log of
                 sum_j exp(z_ij - m), unrounded: the backward's softmax exp((z - m) - l) then
                 keeps fp32 precision where |lse| >> 1 (logits of order 100 and more). The
                 blocked implementation returns (lse, 0): its backward reads lse itself.
A target outside [0, V) simply has no logit here: ignore_index and vocabulary shards use this.
The entropy is kept as H, not as the mean logit mu = sum_j p_j z_j = lse - H: the kernels
accumulate sum_j exp(z_j - m)(m - z_j) >= 0 against the running maximum m, so H comes out
without subtracting two numbers of the size of the logits (mu and lse agree to many digits when
the softmax is peaked). Partial results over vocabulary ranges k (splits, ranks) combine as
    lse = log sum_k exp(lse_k),  H = sum_k w_k (H_k + lse - lse_k),  w_k = exp(lse_k - lse),
the same merge as mu = sum_k w_k mu_k.

`cce::linear_cross_entropy_bwd` takes the gradients of the first four statistics (and the
forward's tile_max and lse_parts) and returns (grad_input, grad_classifier, grad_bias), each of
shape [0] when not requested, so a frozen head costs no dC work. filter_eps skips negligible
tiles for every gradient, or with filter_classifier=False for grad_input only (grad_classifier
and grad_bias then sum every tile). With
    dz[i, j] = p[i, j] (grad_lse[i] - grad_entropy[i] (log p[i, j] + H[i]))
               + grad_target_logit[i] [j == t_i] + grad_logit_sum[i] class_weight[j]
(dH/dz_j = -p_j (z_j - mu) = -p_j (log p_j + H)), times dz/dx = logit_scale * (1 - tanh^2) with
a softcap (logit_scale without), x being the logits before softcap and scale:
    grad_input = dx @ classifier,  grad_classifier = dx.T @ input,  grad_bias = dx.sum(0).
Gradient filtering skips tiles whose dz is negligible: see `cce_inductor.blocked.negligible_rows`
(the bound).

`cce::linear_cross_entropy_fwd_bwd(input, classifier, bias, target, class_weight, grad_lse,
grad_target_logit, grad_logit_sum, ...)` is both in one pass over the logits, for gradients of
the statistics known before the forward runs (a loss reduced to a scalar: `cce_inductor.dispatch`
decides when that holds). It returns fwd's first three statistics and bwd's three gradients and
has no autograd of its own (`cce_inductor.one_pass` hands the gradients to autograd). Only the
blocked CPU implementation has it: the Triton lowering does not take it, so it is never chosen
where the templates serve. It has no entropy (whose upstream gradient is per row): the RL head
takes the two ops.

`cce::record_filter_stats` hands the compiled backward's kept-tile map to
`cce_inductor.filter_stats` (see there).
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Callable, Optional

import torch
from torch import Tensor

from cce_inductor import blocked, filter_stats

# Arguments whose dim 0 follows N (one entry per row, or per TILE_MAX_ROWS rows): the dispatch
# marks that dim dynamic.
ROW_ARGUMENT_NAMES = ("input", "target", "lse", "grad_lse", "grad_target_logit", "grad_logit_sum",
                      "entropy", "grad_entropy", "tile_max", "lse_parts")
# The block of the tile_max statistic: every Triton logit tile is TILE_MAX_COLS classes wide
# and a whole number of TILE_MAX_ROWS-row groups high, so one tile reads whole blocks.
TILE_MAX_ROWS = 16
TILE_MAX_COLS = 128


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """Row statistics are fp32, or fp64 for fp64 inputs (gradcheck)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def filters(filter_eps: Optional[float], with_logit_sum: bool) -> bool:
    """Whether the backward skips negligible tiles: a threshold is set and the label smoothing
    term (grad_logit_sum * class_weight, dense: no tile of dz is negligible) is absent."""
    return filter_eps is not None and filter_eps > 0 and not with_logit_sum


def tile_max_shape(rows, vocab, filter_eps: Optional[float], with_logit_sum: bool) -> tuple:
    """Shape of the forward's tile_max output (rows and vocab may be symbolic)."""
    if not filters(filter_eps, with_logit_sum):
        return (0,)
    return (((rows + TILE_MAX_ROWS - 1) // TILE_MAX_ROWS)
            * ((vocab + TILE_MAX_COLS - 1) // TILE_MAX_COLS),)


def _row_positions(fn: Callable) -> tuple[int, ...]:
    names = list(inspect.signature(fn).parameters)
    return tuple(i for i, name in enumerate(names) if name in ROW_ARGUMENT_NAMES)


def _forward(
    input: Tensor,
    classifier: Tensor,
    bias: Optional[Tensor],
    target: Tensor,
    class_weight: Optional[Tensor],
    softcap: Optional[float],
    with_logit_sum: bool,
    filter_eps: Optional[float],
    filter_classifier: bool = True,
    logit_scale: float = 1.0,
    with_entropy: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    # The filter options only shape tile_max here; the forward carries them so autograd can
    # hand them to the backward.
    lse, target_logit, logit_sum, entropy = blocked.forward(
        input, classifier, bias, target, class_weight, softcap, with_logit_sum, logit_scale,
        with_entropy,
    )
    shape = tile_max_shape(input.shape[0], classifier.shape[0], filter_eps, with_logit_sum)
    lse_parts = torch.stack([lse, torch.zeros_like(lse)], dim=1)
    return lse, target_logit, logit_sum, entropy, lse.new_full(shape, float("inf")), lse_parts


def _backward_op(
    input: Tensor,
    classifier: Tensor,
    bias: Optional[Tensor],
    target: Tensor,
    class_weight: Optional[Tensor],
    lse: Tensor,
    grad_lse: Tensor,
    grad_target_logit: Tensor,
    grad_logit_sum: Optional[Tensor],
    softcap: Optional[float],
    filter_eps: Optional[float],
    input_needs_grad: bool,
    classifier_needs_grad: bool,
    bias_needs_grad: bool,
    tile_max: Optional[Tensor] = None,
    lse_parts: Optional[Tensor] = None,
    filter_classifier: bool = True,
    logit_scale: float = 1.0,
    entropy: Optional[Tensor] = None,
    grad_entropy: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    # tile_max only lets kernels skip tiles early and lse_parts refines their softmax; the
    # blocked loops decide from the logits and read lse.
    return blocked.backward(
        input, classifier, bias, target, class_weight, lse, grad_lse, grad_target_logit,
        grad_logit_sum, softcap, filter_eps, input_needs_grad, classifier_needs_grad,
        bias_needs_grad, filter_classifier, logit_scale, entropy, grad_entropy,
    )


# Positions of the row arguments of each op, by op name.
ROW_ARGUMENTS = {
    "linear_cross_entropy_fwd": _row_positions(_forward),
    "linear_cross_entropy_bwd": _row_positions(_backward_op),
}
linear_cross_entropy_fwd = torch.library.custom_op(
    "cce::linear_cross_entropy_fwd", mutates_args=())(_forward)
linear_cross_entropy_bwd = torch.library.custom_op(
    "cce::linear_cross_entropy_bwd", mutates_args=())(_backward_op)


def _fake_row_statistics(input: Tensor, with_logit_sum: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(lse, target_logit, logit_sum) as the ops return them."""
    n = input.shape[0]
    dtype = stats_dtype(input.dtype)
    return (input.new_empty((n,), dtype=dtype), input.new_empty((n,), dtype=dtype),
            input.new_empty((n,) if with_logit_sum else (0,), dtype=dtype))


def _fake_gradients(input: Tensor, classifier: Tensor, bias: Optional[Tensor],
                    input_needs_grad: bool, classifier_needs_grad: bool,
                    bias_needs_grad: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(grad_input, grad_classifier, grad_bias) as the ops return them: [0] for a gradient
    nobody asked for."""
    bias_dtype = bias.dtype if bias is not None else classifier.dtype
    return (
        input.new_empty(tuple(input.shape) if input_needs_grad else (0,)),
        classifier.new_empty(tuple(classifier.shape) if classifier_needs_grad else (0,)),
        input.new_empty(tuple(bias.shape) if bias is not None and bias_needs_grad else (0,),
                        dtype=bias_dtype),
    )


@linear_cross_entropy_fwd.register_fake
def _(input, classifier, bias, target, class_weight, softcap, with_logit_sum, filter_eps,
      filter_classifier=True, logit_scale=1.0, with_entropy=False):
    n = input.shape[0]
    dtype = stats_dtype(input.dtype)
    entropy = input.new_empty((n,) if with_entropy else (0,), dtype=dtype)
    tile_max = input.new_empty(
        tile_max_shape(n, classifier.shape[0], filter_eps, with_logit_sum), dtype=dtype
    )
    return (*_fake_row_statistics(input, with_logit_sum), entropy, tile_max,
            input.new_empty((n, 2), dtype=dtype))


@linear_cross_entropy_bwd.register_fake
def _(input, classifier, bias, target, class_weight, lse, grad_lse, grad_target_logit,
      grad_logit_sum, softcap, filter_eps, input_needs_grad, classifier_needs_grad,
      bias_needs_grad, tile_max=None, lse_parts=None, filter_classifier=True, logit_scale=1.0,
      entropy=None, grad_entropy=None):
    return _fake_gradients(input, classifier, bias, input_needs_grad, classifier_needs_grad,
                           bias_needs_grad)


@torch.library.custom_op("cce::linear_cross_entropy_fwd_bwd", mutates_args=())
def linear_cross_entropy_fwd_bwd(
    input: Tensor,
    classifier: Tensor,
    bias: Optional[Tensor],
    target: Tensor,
    class_weight: Optional[Tensor],
    grad_lse: Tensor,
    grad_target_logit: Tensor,
    grad_logit_sum: Optional[Tensor],
    softcap: Optional[float],
    filter_eps: Optional[float],
    input_needs_grad: bool,
    classifier_needs_grad: bool,
    bias_needs_grad: bool,
    filter_classifier: bool = True,
    logit_scale: float = 1.0,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(lse, target_logit, logit_sum, grad_input, grad_classifier, grad_bias); logit_sum is
    computed when grad_logit_sum is given."""
    return blocked.forward_and_backward(
        input, classifier, bias, target, class_weight, grad_lse, grad_target_logit,
        grad_logit_sum, softcap, filter_eps, input_needs_grad, classifier_needs_grad,
        bias_needs_grad, filter_classifier, logit_scale,
    )


@linear_cross_entropy_fwd_bwd.register_fake
def _(input, classifier, bias, target, class_weight, grad_lse, grad_target_logit, grad_logit_sum,
      softcap, filter_eps, input_needs_grad, classifier_needs_grad, bias_needs_grad,
      filter_classifier=True, logit_scale=1.0):
    return (*_fake_row_statistics(input, grad_logit_sum is not None),
            *_fake_gradients(input, classifier, bias, input_needs_grad, classifier_needs_grad,
                             bias_needs_grad))


@dataclasses.dataclass(frozen=True)
class StatisticsOptions:
    """The forward's non-tensor arguments that its backward needs (autograd keeps them)."""

    softcap: Optional[float]
    logit_scale: float
    with_logit_sum: bool
    with_entropy: bool
    filter_eps: Optional[float]
    filter_classifier: bool = True


def statistics_gradients(
    backward_op: Callable[..., tuple[Tensor, Tensor, Tensor]],
    saved: tuple[Tensor, ...],
    grad_lse: Tensor,
    grad_target_logit: Tensor,
    grad_logit_sum: Optional[Tensor],
    grad_entropy: Optional[Tensor],
    options: StatisticsOptions,
    needs_input_grad: tuple[bool, ...],
) -> tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """(grad_input, grad_classifier, grad_bias) of the row statistics from `backward_op` (the
    bwd op, or a dispatch of it), None where autograd wants none. `saved` is (input, classifier,
    bias, target, class_weight, lse, entropy, tile_max, lse_parts); `needs_input_grad` is
    autograd's flags for the forward's arguments in the fwd op's order. The gradients of
    statistics that were not asked for (logit_sum, entropy: shape [0]) are ignored."""
    input, classifier, bias, target, class_weight, lse, entropy, tile_max, lse_parts = saved
    if needs_input_grad[4]:
        raise NotImplementedError(
            "linear_cross_entropy: the gradient with respect to `weight` (class weights) is not "
            "implemented (torch's cross_entropy does not implement it either)"
        )
    needs = (needs_input_grad[0], needs_input_grad[1], bias is not None and needs_input_grad[2])
    grads = backward_op(
        input, classifier, bias, target, class_weight, lse, grad_lse, grad_target_logit,
        grad_logit_sum if options.with_logit_sum else None, options.softcap, options.filter_eps,
        *needs, tile_max, lse_parts, options.filter_classifier, options.logit_scale,
        entropy if options.with_entropy else None,
        grad_entropy if options.with_entropy else None,
    )
    return tuple(grad if need else None for grad, need in zip(grads, needs))


def _setup_context(ctx, inputs, output) -> None:
    (input, classifier, bias, target, class_weight, softcap, with_logit_sum, filter_eps,
     filter_classifier, logit_scale, with_entropy) = inputs
    lse, _, _, entropy, tile_max, lse_parts = output
    ctx.save_for_backward(input, classifier, bias, target, class_weight, lse, entropy, tile_max,
                          lse_parts)
    ctx.options = StatisticsOptions(softcap, logit_scale, with_logit_sum, with_entropy,
                                    filter_eps, filter_classifier)


def _autograd_backward(ctx, grad_lse, grad_target_logit, grad_logit_sum, grad_entropy, _tile_max,
                       _lse_parts):
    grads = statistics_gradients(
        torch.ops.cce.linear_cross_entropy_bwd, ctx.saved_tensors, grad_lse, grad_target_logit,
        grad_logit_sum, grad_entropy, ctx.options, ctx.needs_input_grad,
    )
    return (*grads, None, None, None, None, None, None, None, None)


linear_cross_entropy_fwd.register_autograd(_autograd_backward, setup_context=_setup_context)


@torch.library.custom_op("cce::record_filter_stats", mutates_args=("kept",))
def record_filter_stats(kept: Tensor) -> None:
    """Report the verdicts of the compiled backward's kept-tile map (0: skipped before the
    logits were recomputed, 1: skipped, 2: kept; see lowering/backward.py) to filter_stats.

    Declared as mutating `kept` so that Inductor keeps the call although nothing reads it
    (the map is dead afterwards; it is left as it is).
    """
    counts = torch.bincount(kept.flatten().long(), minlength=3).tolist()
    filter_stats.record(skipped=counts[0] + counts[1], total=kept.numel(), early=counts[0])
