"""Blocked eager implementation of the `cce` ops (the CPU path; also correct on any device).

Rows are processed a chunk at a time, each chunk with the whole vocabulary: one matmul gives the
chunk's logits `[rows, V]`, which are turned into row statistics and, when gradients are wanted,
in place into dz, then consumed by the two gradient matmuls. `chunk_rows` sizes a chunk so that
its temporaries take at most a third of the gradients' bytes, and never more than
CHUNK_ELEMENTS logits (28 MB of fp32) unless V > 114688 (then MIN_CHUNK_ROWS rows), so the
extra memory is O(N*D + V*D + N) plus a few chunk-sized temporaries, never `[N, V]`. (A sweep
without gradients, the forward's, sizes its chunks as fp32's.)

One sweep over the chunks serves all three ops, so the backward recomputes exactly the logits and
row statistics that the forward computed:
- `forward`: the row statistics.
- `backward`: gradients for given gradients of the statistics, recomputing each chunk.
- `forward_and_backward`: both at once, when the statistics' gradients are known before the
  forward runs (a loss reduced to a scalar): the logits are computed once, not twice.
(bf16's backward takes smaller row chunks than its forward; a row's logits do not depend on the
chunk's size with oneDNN's kernels, and were they to, p = softmax(z) * exp(own lse - given lse)
would keep the backward exact.)

With bf16 inputs the gradients are written in bf16 once each, as torch's own bf16 products
round them, with no fp32 accumulator of the classifier's [V, D] gradient (twice the bf16
gradient's memory): grad_input comes from the row sweep (each chunk's rows see every class),
grad_classifier and grad_bias from a second sweep over blocks of classes with every row
(`_VocabPass`), which recomputes the logits (8 N*V*D FLOPs in all instead of 6) so that each
class's gradient is one product over all N rows. Measured on 2 AVX-512 cores (N=4096, V=32768,
D=1024) it takes 1.135x the earlier layout's step run alternately in one process (no difference
in cce-bench's separate processes) and 97 instead of 216 MB (README, "The CPU path").

The softmax is exp(z - m) / s as torch's softmax computes it (m the row max, s the sum of
exp(z - m)); exp(z - lse) with the fp32 lse = m + log(s) would be off by up to half an ulp of
|m| in every p (and dz = p - 1 at a peaked target would no longer be 0 where torch's is). The
whole-row steps (max, softmax) are single torch kernels over the chunk, the softmax one pass that
works row by row in cache.

Matmuls run in the inputs' dtype for bf16 (the logits and gradients are rounded to bf16 exactly
as torch's own bf16 products round them) and in fp32 otherwise (fp16 matmuls are not faster on
CPUs). On a CPU with AVX-512 the fp32 logits and grad_input come from oneDNN (see `_linear`),
grad_classifier from torch's matmul (see `_classifier_products`: with 2 threads MKL's product
with a short inner dimension, the chunk's rows, beat oneDNN's). Everything after the matmul
(softcap, exp, sums, accumulation across chunks) is fp32, or fp64 for fp64 inputs. The order of
every operation is fixed: results are deterministic for a given thread count.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch
from torch import Tensor

from cce_inductor import compat, filter_stats

# A chunk holds at most CHUNK_ELEMENTS logits, and its temporaries at most 1 / GRADIENT_FRACTION
# of the gradients' (N + V) * D elements' bytes (its memory is the one thing the sweep adds to
# theirs), but never fewer than MIN_CHUNK_ROWS rows (which keeps the grad_classifier matmul,
# whose inner dimension is the chunk's rows, efficient at large V). 28 MB of fp32 stays below
# glibc's largest mmap threshold (32 MB), so each chunk reuses the last one's freed heap memory
# instead of faulting in fresh pages.
CHUNK_ELEMENTS = 7 << 20
GRADIENT_FRACTION = 3
MIN_CHUNK_ROWS = 64
# Gradient filtering decides per FILTER_BLOCK columns of a chunk: coarse enough that the kept
# columns are gathered into one matmul, fine enough that peaked rows skip most of them.
FILTER_BLOCK = 128
# The gradient products run this many classes at a time when they must be split (see
# _input_product, _classifier_products); a multiple of FILTER_BLOCK.
VOCAB_BLOCK = 2048


def chunk_rows(n: int, vocab: int, hidden: int, dtype: torch.dtype) -> int:
    """Rows per chunk of an [n, hidden] input and a [vocab, hidden] classifier of `dtype` (see
    CHUNK_ELEMENTS).

    The gradients take the bytes of their accumulation dtype, or 2 for bf16 (written in bf16);
    a logit's temporaries take those of the accumulation dtype, plus 2 for bf16 (the bf16
    product beside its fp32 copy, and dz's bf16 copy beside dz)."""
    acc = _acc_dtype(dtype).itemsize
    sixteen_bit = _matmul_dtype(dtype).itemsize == 2
    gradient_bytes = (n + vocab) * hidden * (2 if sixteen_bit else acc)
    logit_bytes = acc + (2 if sixteen_bit else 0)
    elements = min(CHUNK_ELEMENTS, gradient_bytes // (GRADIENT_FRACTION * logit_bytes))
    return max(MIN_CHUNK_ROWS, elements // max(vocab, 1))


def vocab_block_classes(n: int, vocab: int, hidden: int, dtype: torch.dtype) -> Optional[int]:
    """Classes per block of the classifier's sweep over all n rows (`_VocabPass`): a block
    holds as many logits as a row chunk, in whole FILTER_BLOCKs; None where one FILTER_BLOCK
    of n rows would hold more (then the classifier's gradient accumulates over the row
    chunks in fp32)."""
    elements = chunk_rows(n, vocab, hidden, dtype) * vocab
    classes = elements // max(n, 1) // FILTER_BLOCK * FILTER_BLOCK
    return min(classes, vocab) if classes >= FILTER_BLOCK else None


def _matmul_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in (torch.bfloat16, torch.float64) else torch.float32


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _linear(x: Tensor, w: Tensor) -> Tensor:
    """x @ w.T, through oneDNN for fp32 CPU tensors where `compat.onednn_linear` serves them."""
    if x.dtype == torch.float32 and x.device.type == "cpu":
        out = compat.onednn_linear(x, w)
        if out is not None:
            return out
    return x @ w.T


@dataclasses.dataclass
class _RowGradients:
    """Gradients of the row statistics, [N] each (logit_sum's and entropy's None when not
    used); `entropy_value` is the entropy H itself, which the entropy's gradient term reads."""

    lse: Tensor
    target_logit: Tensor
    logit_sum: Optional[Tensor]
    entropy: Optional[Tensor] = None
    entropy_value: Optional[Tensor] = None


@dataclasses.dataclass
class _Problem:
    """One call's inputs in the dtypes the sweep computes in."""

    input: Tensor
    classifier: Tensor  # in the matmul dtype
    bias: Optional[Tensor]  # in the accumulation dtype
    hit: Tensor  # per row: whether its target is a class in [0, V)
    col: Tensor  # per row: its target, clamped into [0, V)
    class_weight: Optional[Tensor]  # in the accumulation dtype
    softcap: Optional[float]
    acc: torch.dtype
    mm: torch.dtype
    logit_scale: float = 1.0  # z = logit_scale * softcap(x)

    @classmethod
    def of(cls, input, classifier, bias, target, class_weight, softcap,
           logit_scale: float = 1.0) -> "_Problem":
        acc, mm = _acc_dtype(input.dtype), _matmul_dtype(input.dtype)
        vocab = classifier.shape[0]
        return cls(
            input=input, classifier=classifier.to(mm),
            bias=bias.to(acc) if bias is not None else None,
            hit=(target >= 0) & (target < vocab), col=target.clamp(0, vocab - 1),
            class_weight=class_weight.to(acc) if class_weight is not None else None,
            softcap=softcap, acc=acc, mm=mm, logit_scale=float(logit_scale),
        )

    @property
    def sixteen_bit(self) -> bool:
        """Whether the matmuls run in 16 bits (bf16): their products are rounded to it."""
        return self.mm.itemsize == 2


@dataclasses.dataclass
class _Gradients:
    """The requested gradients, None for the others: fp32 accumulators (fp64 for fp64), except
    in bf16 for a bf16 problem grad_input (each chunk writes its rows once) and, where the
    classes are swept in blocks (`vocab_block`, see `_VocabPass`), grad_classifier.

    Unless `zeroed`, input and classifier start uninitialized: the sweep's first chunk assigns
    its products instead of adding them (one pass over the [V, D] accumulator less). They are
    zeroed where some product may be skipped (filtering) or there is no chunk (N = 0)."""

    input: Optional[Tensor]
    classifier: Optional[Tensor]
    bias: Optional[Tensor]
    zeroed: bool
    vocab_block: Optional[int]  # classes per block of the classifier's sweep, or None

    @classmethod
    def new(cls, problem: _Problem, input_needs_grad: bool, classifier_needs_grad: bool,
            bias_needs_grad: bool, filter_eps: Optional[float]) -> "_Gradients":
        n, d = problem.input.shape
        v = problem.classifier.shape[0]
        zeroed = n == 0 or (filter_eps is not None and filter_eps > 0)
        new = problem.input.new_zeros if zeroed else problem.input.new_empty
        vocab_block = (
            vocab_block_classes(n, v, d, problem.input.dtype)
            if problem.sixteen_bit and classifier_needs_grad and n else None
        )
        return cls(
            input=new((n, d), dtype=problem.mm if problem.sixteen_bit else problem.acc)
            if input_needs_grad else None,
            classifier=new((v, d), dtype=problem.mm if vocab_block else problem.acc)
            if classifier_needs_grad else None,
            bias=problem.input.new_zeros((v,), dtype=problem.acc)
            if bias_needs_grad and problem.bias is not None else None,
            zeroed=zeroed, vocab_block=vocab_block,
        )

    def any(self) -> bool:
        return any(g is not None for g in (self.input, self.classifier, self.bias))

    def results(self, input: Tensor, classifier: Tensor, bias: Optional[Tensor]):
        """In the inputs' dtypes; shape [0] for a gradient nobody asked for."""
        def result(grad: Optional[Tensor], like: Tensor) -> Tensor:
            return grad.to(like.dtype) if grad is not None else like.new_zeros((0,))

        return (
            result(self.input, input), result(self.classifier, classifier),
            result(self.bias, bias if bias is not None else classifier),
        )


@dataclasses.dataclass
class _Statistics:
    lse: Tensor
    target_logit: Tensor
    logit_sum: Tensor  # shape [0] unless asked for
    entropy: Tensor  # shape [0] unless asked for

    def results(self) -> tuple[Tensor, Tensor, Tensor]:
        return self.lse, self.target_logit, self.logit_sum


def forward(
    input: Tensor,
    classifier: Tensor,
    bias: Optional[Tensor],
    target: Tensor,
    class_weight: Optional[Tensor],
    softcap: Optional[float],
    with_logit_sum: bool,
    logit_scale: float = 1.0,
    with_entropy: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(lse, target_logit, logit_sum, entropy) per row (see cce_inductor.ops)."""
    problem = _Problem.of(input, classifier, bias, target, class_weight, softcap, logit_scale)
    stats = _new_statistics(problem, with_logit_sum, with_entropy)
    with torch.no_grad():
        _sweep(problem, stats, None, None, None, None)
    return (*stats.results(), stats.entropy)


def backward(
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
    filter_classifier: bool = True,
    logit_scale: float = 1.0,
    entropy: Optional[Tensor] = None,
    grad_entropy: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(grad_input, grad_classifier, grad_bias) for the given gradients of the statistics
    (grad_entropy with the forward's entropy, both or neither); with filter_classifier=False
    filtering narrows grad_input's product only.

    p is exp(z - lse) with the given lse, computed as softmax(z) * exp(own lse - given lse):
    exactly the forward's softmax where the given lse is the one this sweep recomputes (the
    forward's own, not a global one from cce_inductor.vocab_parallel)."""
    problem = _Problem.of(input, classifier, bias, target, class_weight, softcap, logit_scale)
    grads = _Gradients.new(problem, input_needs_grad, classifier_needs_grad, bias_needs_grad,
                           filter_eps)
    if grads.any():
        row_grads = _RowGradients(grad_lse, grad_target_logit, grad_logit_sum, grad_entropy,
                                  entropy if grad_entropy is not None else None)
        with torch.no_grad():
            _sweep(problem, _new_statistics(problem, grad_logit_sum is not None, False),
                   row_grads, lse, grads, filter_eps, filter_classifier)
    return grads.results(input, classifier, bias)


def forward_and_backward(
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
    """`forward`'s statistics and `backward`'s gradients in one sweep (logit_sum is computed
    when grad_logit_sum is given)."""
    problem = _Problem.of(input, classifier, bias, target, class_weight, softcap, logit_scale)
    stats = _new_statistics(problem, grad_logit_sum is not None, False)
    grads = _Gradients.new(problem, input_needs_grad, classifier_needs_grad, bias_needs_grad,
                           filter_eps)
    row_grads = _RowGradients(grad_lse, grad_target_logit, grad_logit_sum)
    with torch.no_grad():
        _sweep(problem, stats, row_grads if grads.any() else None, None, grads, filter_eps,
               filter_classifier)
    return (*stats.results(), *grads.results(input, classifier, bias))


def _new_statistics(problem: _Problem, with_logit_sum: bool, with_entropy: bool) -> _Statistics:
    n = problem.input.shape[0]
    new = problem.input.new_zeros
    return _Statistics(
        lse=new((n,), dtype=problem.acc), target_logit=new((n,), dtype=problem.acc),
        logit_sum=new((n,) if with_logit_sum else (0,), dtype=problem.acc),
        entropy=new((n,) if with_entropy else (0,), dtype=problem.acc),
    )


def _sweep(
    problem: _Problem,
    stats: _Statistics,
    row_grads: Optional[_RowGradients],
    given_lse: Optional[Tensor],
    grads: Optional[_Gradients],
    filter_eps: Optional[float],
    filter_classifier: bool = True,
) -> None:
    """Fill `stats`, and with `row_grads` add the chunks' dz products to `grads` (with
    filtering, grad_input's only over the needed blocks, and the classifier's too where
    filter_classifier); where `grads.vocab_block` is set, the classifier's and the bias's
    gradients then come from the sweep over blocks of classes (`_VocabPass`)."""
    n = problem.input.shape[0]
    vocab = problem.classifier.shape[0]
    # Without gradients the chunk is all the sweep holds: it is sized as fp32's, whose larger
    # chunks make faster products (bf16's gradient sweeps hold more bytes per logit).
    rows = chunk_rows(n, vocab, problem.input.shape[1],
                      problem.input.dtype if row_grads is not None else problem.acc)
    # The smoothing term grad_logit_sum * class_weight is dense: no block of dz is negligible.
    filtering = (
        row_grads is not None and filter_eps is not None and filter_eps > 0
        and row_grads.logit_sum is None
    )
    vocab_pass = (
        _VocabPass.new(problem, grads.vocab_block, filtering and filter_classifier)
        if row_grads is not None and grads is not None and grads.vocab_block else None
    )
    for n0 in range(0, n, rows):
        _chunk(problem, n0, min(n0 + rows, n), stats, row_grads, given_lse, grads,
               filter_eps if filtering else None, filter_classifier, vocab_pass)
    if vocab_pass is not None:
        vocab_pass.run(problem, row_grads, grads)


def _chunk(
    problem: _Problem,
    n0: int,
    n1: int,
    stats: _Statistics,
    row_grads: Optional[_RowGradients],
    given_lse: Optional[Tensor],
    grads: Optional[_Gradients],
    filter_eps: Optional[float],
    filter_classifier: bool,
    vocab_pass: Optional["_VocabPass"],
) -> None:
    """Rows [n0, n1) of the sweep. A function of its own so that the chunk's logits are freed
    before the next chunk's are allocated."""
    e = problem.input[n0:n1].to(problem.mm)
    z = _linear(e, problem.classifier).to(problem.acc)
    hit, col = problem.hit[n0:n1], problem.col[n0:n1]
    rows = slice(n0, n1)
    # Without grad_input, a vocabulary pass computes every dz: this sweep needs no derivative.
    computes_dz = row_grads is not None and (vocab_pass is None or grads.input is not None)
    derivative = _finish_logits(problem, z, slice(None), computes_dz)
    _chunk_statistics(problem, z, rows, hit, col, stats, vocab_pass)
    if row_grads is None:
        return
    p = z  # softmax(z), in place
    if given_lse is not None:
        # exp(z - given lse) = p * exp(own lse - given lse): unchanged where the lse is own.
        shift = stats.lse[rows] - given_lse[rows]
        if bool(shift.any()):
            p.mul_(torch.exp(shift)[:, None])
            if vocab_pass is not None:
                vocab_pass.scale[rows] *= torch.exp(shift)
    needed = _needed_blocks(p, hit, col, filter_eps, row_grads, rows) \
        if filter_eps is not None else None
    if vocab_pass is not None:
        vocab_pass.add_needed(needed)
        if not computes_dz:
            return
    dz, aside = _dz(problem, p, rows, hit, col, row_grads, derivative)
    _accumulate(problem, dz, e, n0, n1, needed, filter_classifier, grads, aside)


def _finish_logits(
    problem: _Problem, z: Tensor, classes: slice | Tensor, want_derivative: bool
) -> Optional[Tensor]:
    """Finish the logits z [rows, len(classes)] in place (bias, softcap, logit scale:
    z = logit_scale * softcap(x)). Returns the softcap derivative (1 - tanh^2) when asked for;
    the logit scale's factor is `_dz`'s."""
    if problem.bias is not None:
        z += _take(problem.bias, 0, classes)
    derivative = None
    if problem.softcap is not None:
        tanh = z.div_(problem.softcap).tanh_()
        if want_derivative:
            derivative = 1.0 - tanh * tanh
        z.mul_(problem.softcap * problem.logit_scale)
    elif problem.logit_scale != 1.0:
        z.mul_(problem.logit_scale)
    return derivative


def _chunk_statistics(
    problem: _Problem,
    z: Tensor,
    rows: slice,
    hit: Tensor,
    col: Tensor,
    stats: _Statistics,
    vocab_pass: Optional["_VocabPass"],
) -> None:
    """Write the row statistics of the chunk's finished logits z [rows, V] (and the softmax's
    row factors that `vocab_pass` needs); z becomes softmax(z) in place."""
    stats.target_logit[rows] = torch.where(hit, z.gather(1, col[:, None])[:, 0], 0.0)
    if stats.logit_sum.numel():
        stats.logit_sum[rows] = (
            z @ problem.class_weight if problem.class_weight is not None else z.sum(1)
        )
    row_max = z.amax(1)
    if stats.entropy.numel():
        # H = log s + sum_j exp(z_j - m)(m - z_j) / s: no difference of two logit-sized numbers
        # (lse and sum_j p_j z_j agree to many digits where the softmax is peaked).
        shifted = z - row_max[:, None]
        weights = shifted.exp()
        total = weights.sum(1)
        stats.entropy[rows] = total.log() - weights.mul_(shifted).sum(1) / total
    # In place: the kernel reads each row whole before writing it. p = exp(z - m) / s.
    torch.softmax(z, 1, out=z)
    # The largest p is exp(0) / s, at the max: lse = m + log(s) = m - log(max p).
    p_max = z.amax(1)
    stats.lse[rows] = row_max - p_max.log()
    if vocab_pass is not None:
        vocab_pass.row_max[rows] = row_max
        vocab_pass.scale[rows] = p_max


@dataclasses.dataclass
class _TargetTerms:
    """The one-hot part of a chunk's dz kept out of its grad_input product (see `_dz`): chunk
    row rows[k] adds values[k] at class cols[k]."""

    rows: Tensor
    cols: Tensor
    values: Tensor


def _dz(
    problem: _Problem,
    p: Tensor,
    rows: slice,
    hit: Tensor,
    col: Tensor,
    row_grads: _RowGradients,
    derivative: Optional[Tensor],
) -> tuple[Tensor, _TargetTerms]:
    """dz = `_dense_dz` + grad_target_logit * onehot(target) * logit_scale * softcap'(x), in
    place of the softmax p.

    In fp32 (and fp64) the one-hot term goes into dz only on rows whose target holds most of
    the mass (p >= 1/2), where it cancels the target's p; elsewhere it is returned aside, for
    `_accumulate` to add after grad_input's product. Without it that product's running sums
    stay small, which keeps their rounding error below torch's for the long sums over V (oneDNN
    sums in plain order). In bf16 it always goes into dz: grad_input is then one bf16 product,
    rounded once, as torch's is."""
    hit_rows = hit.nonzero()[:, 0]
    cols = col[hit_rows]
    if problem.sixteen_bit:
        peaked = torch.ones_like(hit_rows, dtype=torch.bool)
    else:
        peaked = p[hit_rows, cols] >= 0.5
    values = _target_values(problem, row_grads.target_logit[rows][hit_rows],
                            derivative[hit_rows, cols] if derivative is not None else None)
    dz = _dense_dz(problem, p, rows, slice(None), row_grads, derivative)
    dz[hit_rows[peaked], cols[peaked]] += values[peaked]
    flat = ~peaked
    return dz, _TargetTerms(hit_rows[flat], cols[flat], values[flat])


def _dense_dz(
    problem: _Problem,
    p: Tensor,
    rows: slice,
    classes: slice | Tensor,
    row_grads: _RowGradients,
    derivative: Optional[Tensor],
) -> Tensor:
    """dz without its one-hot term, in place of the softmax p [rows, classes]:
    (p (grad_lse - grad_entropy (log p + H)) + grad_logit_sum * class_weight)
    * logit_scale * softcap'(x) (the entropy's term as p (grad_lse - grad_entropy H)
    - grad_entropy p log p, 0 where p underflows to 0)."""
    grad_lse = row_grads.lse[rows]
    if row_grads.entropy is not None:
        grad_entropy = row_grads.entropy[rows]
        p_log_p = torch.special.xlogy(p, p).mul_(grad_entropy[:, None])
        coefficient = grad_lse - grad_entropy * row_grads.entropy_value[rows]
        dz = p.mul_(coefficient[:, None]).sub_(p_log_p)
        del p_log_p
    else:
        dz = p.mul_(grad_lse[:, None])
    if row_grads.logit_sum is not None:
        grad_logit_sum = row_grads.logit_sum[rows]
        if problem.class_weight is not None:
            dz.addr_(grad_logit_sum, _take(problem.class_weight, 0, classes))
        else:
            dz += grad_logit_sum[:, None]
    if derivative is not None:
        dz.mul_(derivative)
    if problem.logit_scale != 1.0:
        dz.mul_(problem.logit_scale)
    return dz


def _target_values(problem: _Problem, grad_target_logit: Tensor,
                   derivative: Optional[Tensor]) -> Tensor:
    """The one-hot term's entries of dz for the given rows' grad_target_logit, with the
    softcap derivative at their targets."""
    values = grad_target_logit
    if derivative is not None:
        values = values * derivative
    if problem.logit_scale != 1.0:
        values = values * problem.logit_scale
    return values


@dataclasses.dataclass
class _VocabPass:
    """The classifier's (and bias's) gradients of a bf16 problem, swept after the rows: `block`
    classes at a time, each block's logits recomputed for all N rows, so that every class's
    gradient is one bf16 product over all rows, rounded once as torch's is, and no fp32 [V, D]
    accumulator is needed (it would take twice the bf16 gradient's memory). The row sweep
    leaves each row's max logit and softmax factor (p = exp(z - row_max) * scale: the
    softmax's own 1 / s, times exp(own lse - given lse) where an lse is given) and, with
    filtering, the blocks some chunk needed."""

    block: int
    row_max: Tensor
    scale: Tensor
    needed: Optional[Tensor]  # per FILTER_BLOCK of classes; None: every class

    @classmethod
    def new(cls, problem: _Problem, block: int, filtering: bool) -> "_VocabPass":
        n = problem.input.shape[0]
        vocab = problem.classifier.shape[0]
        new = problem.input.new_empty
        needed = (problem.input.new_zeros((-(-vocab // FILTER_BLOCK),), dtype=torch.bool)
                  if filtering else None)
        return cls(block, new((n,), dtype=problem.acc), new((n,), dtype=problem.acc), needed)

    def add_needed(self, chunk_needed: Optional[Tensor]) -> None:
        """Count the blocks a chunk needed (None: all) as needed."""
        if self.needed is not None:
            if chunk_needed is None:
                self.needed.fill_(True)
            else:
                self.needed |= chunk_needed

    def run(self, problem: _Problem, row_grads: _RowGradients, grads: _Gradients) -> None:
        e = problem.input.to(problem.mm)
        vocab = problem.classifier.shape[0]
        for v0 in range(0, vocab, self.block):
            v1 = min(v0 + self.block, vocab)
            classes = (slice(v0, v1) if self.needed is None
                       else _block_classes(self.needed, v0, v1))
            if classes is not None:
                self._classes(problem, e, classes, row_grads, grads)

    def _classes(self, problem: _Problem, e: Tensor, classes: slice | Tensor,
                 row_grads: _RowGradients, grads: _Gradients) -> None:
        """The gradients of one block's classes (a function of its own, so that the block's
        logits are freed before the next block's are allocated)."""
        z = _linear(e, _take(problem.classifier, 0, classes)).to(problem.acc)
        derivative = _finish_logits(problem, z, classes, want_derivative=True)
        p = z.sub_(self.row_max[:, None]).exp_().mul_(self.scale[:, None])
        hit_rows, cols = _targets_among(classes, problem.hit, problem.col)
        values = _target_values(problem, row_grads.target_logit[hit_rows],
                                derivative[hit_rows, cols] if derivative is not None else None)
        dz = _dense_dz(problem, p, slice(None), classes, row_grads, derivative)
        dz.index_put_((hit_rows, cols), values, accumulate=True)
        if grads.bias is not None:
            _add_rows(grads.bias, classes, dz.sum(0), assign=True)
        if grads.classifier is not None:
            dz_mm = dz.to(problem.mm)
            del z, p, dz, derivative
            if isinstance(classes, slice):
                torch.mm(dz_mm.T, e, out=grads.classifier[classes])
            else:
                _add_rows(grads.classifier, classes, dz_mm.T @ e, assign=True)


def _targets_among(classes: slice | Tensor, hit: Tensor, col: Tensor) -> tuple[Tensor, Tensor]:
    """The rows whose target is one of `classes` (a slice, or sorted class indices), and each
    one's position among them."""
    if isinstance(classes, slice):
        rows = (hit & (col >= classes.start) & (col < classes.stop)).nonzero()[:, 0]
        return rows, col[rows] - classes.start
    position = torch.searchsorted(classes, col).clamp_max_(classes.numel() - 1)
    rows = (hit & (classes[position] == col)).nonzero()[:, 0]
    return rows, position[rows]


def _needed_blocks(
    p: Tensor, hit: Tensor, col: Tensor, filter_eps: float, row_grads: _RowGradients,
    rows: slice,
) -> Optional[Tensor]:
    """Which FILTER_BLOCK-wide column blocks of the chunk need their dz computed (a bool per
    block), or None for all.

    A block is skipped when every softmax value in it is below filter_eps and no row's target
    lies in it: its dz entries are then all below working precision. With the entropy's
    gradient every row's entries must be negligible by `negligible_rows`' bound instead.
    """
    width = p.shape[1]
    nblocks = -(-width // FILTER_BLOCK)
    if row_grads.entropy is not None:
        padded = torch.nn.functional.pad(p, (0, nblocks * FILTER_BLOCK - width))
        p_max = padded.view(p.shape[0], nblocks, FILTER_BLOCK).amax(dim=2)
        needed = ~negligible_rows(p_max, filter_eps, row_grads.lse[rows],
                                  row_grads.target_logit[rows], row_grads.entropy[rows],
                                  row_grads.entropy_value[rows]).all(dim=0)
        needed[col[hit] // FILTER_BLOCK] = True
        filter_stats.record(skipped=int(nblocks - needed.sum()), total=nblocks)
        return None if bool(needed.all()) else needed
    full = width // FILTER_BLOCK * FILTER_BLOCK
    block_max = p.new_empty((nblocks,))
    if full:
        block_max[:full // FILTER_BLOCK] = (
            p[:, :full].reshape(p.shape[0], -1, FILTER_BLOCK).amax(dim=(0, 2))
        )
    if full < width:
        block_max[-1] = p[:, full:].amax()
    needed = block_max >= filter_eps
    needed[col[hit] // FILTER_BLOCK] = True
    filter_stats.record(skipped=int(nblocks - needed.sum()), total=nblocks)
    return None if bool(needed.all()) else needed


def negligible_rows(
    p_max: Tensor, filter_eps: float, grad_lse: Tensor, grad_target_logit: Tensor,
    grad_entropy: Optional[Tensor], entropy: Optional[Tensor],
) -> Tensor:
    """Which rows' entries of a block of dz are negligible at working precision, given each
    row's largest softmax value p_max in the block (the block holding no row's target column).

    The bound. Off the target column, dz_j = p_j (a - b (log p_j + H)) with a = grad_lse,
    b = grad_entropy (0 without entropy), H >= 0 the row's entropy; dz/dx multiplies this by
    logit_scale (1 - tanh^2), a factor common to the whole gradient (logit_scale) times one in
    [0, 1] (the softcap's), so it only shrinks entries relative to the rest. For 0 < p_j <= P:
        p_j |log p_j| <= P |log P| if P <= 1/e (p |log p| increases on (0, 1/e]), and <= 1/e always,
    hence, writing phi(P) for that bound,
        |dz_j| <= P |a| + |b| (P H + phi(P)).
    An entry is negligible when it is below filter_eps relative to the row's gradient scale
    r = max(|a|, |grad_target_logit|, |b|), the largest coefficient of any term of the row's dz.
    For cross-entropy alone (a = -grad_target_logit, b = 0) this is the paper's rule p < eps;
    a row whose softmax terms vanish (a = b = 0: ignored rows) never needs a block. The entropy
    term needs the larger margin: at P = eps = 2**-12 it alone is eps (H + 8.3) |b|. The Triton
    dz kernel applies the same bound (cce_negligible in templates/cce_common.py.jinja).
    """
    a = grad_lse.abs()
    scale = torch.maximum(a, grad_target_logit.abs())
    bound = p_max * a[:, None]
    if grad_entropy is not None:
        b = grad_entropy.abs()
        scale = torch.maximum(scale, b)
        spread = torch.where(p_max <= math.exp(-1.0),
                             -p_max * torch.log(p_max.clamp_min(torch.finfo(p_max.dtype).tiny)),
                             math.exp(-1.0))
        bound = bound + b[:, None] * (p_max * entropy[:, None] + spread)
    return (bound < filter_eps * scale[:, None]) | (bound == 0)


def _block_classes(needed: Tensor, v0: int, v1: int) -> Optional[slice | Tensor]:
    """The classes of [v0, v1) whose dz counts: a slice when all do, the kept ones' indices,
    or None when none does (v0 is a multiple of FILTER_BLOCK)."""
    blocks = needed[v0 // FILTER_BLOCK:-(-v1 // FILTER_BLOCK)]
    if bool(blocks.all()):
        return slice(v0, v1)
    if not bool(blocks.any()):
        return None
    first = blocks.nonzero()[:, 0] * FILTER_BLOCK + v0
    columns = (first[:, None] + torch.arange(FILTER_BLOCK, device=needed.device)).flatten()
    return columns[columns < v1]


def _accumulate(
    problem: _Problem, dz: Tensor, e: Tensor, n0: int, n1: int, needed: Optional[Tensor],
    filter_classifier: bool, grads: _Gradients, aside: _TargetTerms,
) -> None:
    """Add one chunk's dz [rows, V] products, and the target terms kept aside, to the
    gradients. With filtering (`needed` given) grad_input's product runs over the needed blocks
    only, and so do the classifier's and the bias's where filter_classifier.

    The target terms kept aside join grad_input after its product (see `_dz`), and dz before
    the classifier's and the bias's, whose sums over the chunk's rows are short: a few
    scattered rows and entries instead of index updates of the [V, D] accumulator."""
    classifier_needed = needed if filter_classifier else None
    want_classifier = grads.vocab_block is None and (
        grads.classifier is not None or grads.bias is not None)
    # The operand of the products over every class, converted once for both.
    dense = (needed is None and grads.input is not None
             or classifier_needed is None and want_classifier)
    dz_mm = dz.to(problem.mm) if dense else None
    if grads.input is not None:
        chunk = grads.input[n0:n1]
        chunk.copy_(_input_product(problem, dz, dz_mm, needed))
        if aside.rows.numel():
            _add_rows(chunk, aside.rows,
                      aside.values[:, None] * problem.classifier.index_select(0, aside.cols))
    if want_classifier:
        if aside.rows.numel():
            dz.index_put_((aside.rows, aside.cols), aside.values, accumulate=True)
            if dz_mm is not None and dz_mm is not dz:
                dz_mm.index_put_((aside.rows, aside.cols),
                                 dz[aside.rows, aside.cols].to(dz_mm.dtype))
        _classifier_products(problem, dz, dz_mm, e, n0, classifier_needed, grads)


def _input_product(
    problem: _Problem, dz: Tensor, dz_mm: Optional[Tensor], needed: Optional[Tensor]
) -> Tensor:
    """dz @ classifier for the chunk: one product over all V classes through oneDNN where
    `_linear` serves (fewer rounding errors than torch's own fp32 product, with the target terms
    aside), or with filtering the sum in fp32 of the needed blocks' products, VOCAB_BLOCK
    classes at a time (the gathered columns stay block-sized)."""
    if needed is None:
        return _linear(dz_mm, problem.classifier.T)
    vocab = dz.shape[1]
    total = None
    for v0 in range(0, vocab, VOCAB_BLOCK):
        classes = _block_classes(needed, v0, min(v0 + VOCAB_BLOCK, vocab))
        if classes is None:
            continue
        product = _linear(_take(dz, 1, classes).to(problem.mm),
                          _take(problem.classifier, 0, classes).T)
        total = product.to(problem.acc) if total is None else total.add_(product)
    if total is None:
        return dz.new_zeros((dz.shape[0], problem.classifier.shape[1]))
    return total


def _classifier_products(
    problem: _Problem, dz: Tensor, dz_mm: Optional[Tensor], e: Tensor, n0: int,
    needed: Optional[Tensor], grads: _Gradients,
) -> None:
    """Add dz.T @ e to grad_classifier and dz.sum(0) to grad_bias, over every class or only the
    `needed` blocks' (VOCAB_BLOCK classes at a time).

    Over every class, grad_classifier is added in place (beta = 1) by torch's matmul, which
    reads dz transposed without a copy, in blocks of VOCAB_BLOCK classes when the product needs
    a cast (a 16-bit one cannot accumulate in fp32), so that its temporary stays block-sized."""
    vocab = dz.shape[1]
    if needed is None:
        if grads.bias is not None:
            grads.bias += dz.sum(0)
        if grads.classifier is not None:
            width = vocab if problem.mm == problem.acc else VOCAB_BLOCK
            for v0 in range(0, vocab, width):
                _add_product(grads.classifier[v0:v0 + width], dz_mm[:, v0:v0 + width].T, e,
                             assign=n0 == 0 and not grads.zeroed)
        return
    for v0 in range(0, vocab, VOCAB_BLOCK):
        classes = _block_classes(needed, v0, min(v0 + VOCAB_BLOCK, vocab))
        if classes is None:
            continue
        dz_block = _take(dz, 1, classes)
        if grads.bias is not None:
            _add_rows(grads.bias, classes, dz_block.sum(0))
        if grads.classifier is not None:
            _add_rows(grads.classifier, classes, dz_block.to(problem.mm).T @ e)


def _take(tensor: Tensor, dim: int, indices: slice | Tensor) -> Tensor:
    """tensor's entries at `indices` along dim 0 or 1: a view for a slice, else index_select
    (on CPU, advanced indexing of rows takes milliseconds where index_select takes
    microseconds)."""
    if isinstance(indices, slice):
        return tensor[indices] if dim == 0 else tensor[:, indices]
    return tensor.index_select(dim, indices)


def _add_rows(out: Tensor, rows: slice | Tensor, values: Tensor, assign: bool = False) -> None:
    """out[rows] += values (= values when assign), for a slice or an index tensor of rows
    (repeats add up, in order; distinct rows when assign).

    index_put_ rather than index_add_: on CPU, index_add_ into a tall tensor takes time in
    proportion to the tensor, not to the rows added (about 0.2 s into 32768 x 256)."""
    if isinstance(rows, slice):
        if assign:
            out[rows] = values
        else:
            out[rows] += values
    else:
        out.index_put_((rows,), values.to(out.dtype), accumulate=not assign)


def _add_product(out: Tensor, a: Tensor, b: Tensor, assign: bool) -> None:
    """out += a @ b (out = a @ b when assign), in place (no temporary) when the matmul already
    runs in out's dtype."""
    if a.dtype == out.dtype:
        if assign:
            torch.mm(a, b, out=out)
        else:
            out.addmm_(a, b)
    elif assign:
        out.copy_(a @ b)
    else:
        out += a @ b
