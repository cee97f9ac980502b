"""Bodies of Triton functions for the interpreter: the libdevice functions that
`triton.language.math` lacks, and a probe kernel of the interpreter's bf16 `tl.dot`.

These are plain functions on purpose: `cce_inductor.tools.interpreter` wraps them with
`triton.jit` only after TRITON_INTERPRET=1 is set, so they become interpreted functions.
Each libdevice function computes in fp64 and rounds back, so fp32/fp16/bf16 results are
correctly rounded for all practical purposes (the interpreter runs on numpy, where fp64 is cheap).
"""

import triton.language as tl


def tanh(x):
    y = x.to(tl.float64)
    t = tl.exp(-2.0 * tl.abs(y))
    r = (1.0 - t) / (1.0 + t)
    return tl.where(y < 0, -r, r).to(x.dtype)


def log1p(x):
    y = x.to(tl.float64)
    small = y * (1.0 - y * (0.5 - y / 3.0))
    return tl.where(tl.abs(y) < 1e-5, small, tl.log(1.0 + y)).to(x.dtype)


def expm1(x):
    y = x.to(tl.float64)
    small = y * (1.0 + y * (0.5 + y / 6.0))
    return tl.where(tl.abs(y) < 1e-5, small, tl.exp(y) - 1.0).to(x.dtype)


def isnan(x):
    return x != x


def isinf(x):
    return tl.abs(x.to(tl.float64)) == float("inf")


def trunc(x):
    return tl.where(x < 0, tl.ceil(x), tl.floor(x))


def log10(x):
    return (tl.log(x.to(tl.float64)) * 0.4342944819032518).to(x.dtype)


MISSING = (tanh, log1p, expm1, isnan, isinf, trunc, log10)


def dot_probe(A, B, C, SIZE: tl.constexpr):
    """C = A @ B for SIZE x SIZE row-major matrices, through one tl.dot."""
    rows, cols = tl.arange(0, SIZE)[:, None], tl.arange(0, SIZE)[None, :]
    product = tl.dot(tl.load(A + rows * SIZE + cols), tl.load(B + rows * SIZE + cols))
    tl.store(C + rows * SIZE + cols, product)
