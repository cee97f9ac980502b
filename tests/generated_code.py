"""Reading Inductor's generated wrapper code: which kernels it launches, which buffers it
allocates, the forward's launch grid. Shared by the lowering tests (CPU interpreter) and the
GPU tests (tests/gpu), whose wrappers differ only in the device of their buffers."""

from __future__ import annotations

import math
import re


def kernel_calls(codes: list[str]) -> list[str]:
    """Names of the kernels and extern ops the generated wrappers launch."""
    calls = []
    for code in codes:
        calls += re.findall(r"\b(triton_\w+)\.run\(", code)
        calls += re.findall(r"\b(torch\.ops\.\w+\.\w+)\.default\(", code)
        calls += re.findall(r"\b(extern_kernels\.\w+)\(", code)
    return calls


def allocated_shapes(codes: list[str]) -> list[str]:
    """The size tuple (source text) of every buffer the generated wrappers allocate."""
    shapes = []
    for code in codes:
        for match in re.finditer(r"empty_strided_\w+\(\(", code):
            depth, end = 1, match.end()
            while depth:  # sizes of dynamic shapes hold parenthesized expressions
                depth += {"(": 1, ")": -1}.get(code[end], 0)
                end += 1
            shapes.append(code[match.end():end - 1])
    return shapes


def allocated_numels(codes: list[str], rows: int, hidden: int) -> list[int]:
    """Element counts of every buffer the generated wrappers allocate. With dynamic shapes a
    symbol that is the sole size of a 1-D buffer is the row count (the row statistics are
    [N]); any other symbol is the hidden size (V stays static in every test that calls this)."""
    shapes = allocated_shapes(codes)
    row_symbols = {shape.strip(", ") for shape in shapes if re.fullmatch(r"\s*s\d+,\s*", shape)}
    values = {symbol: rows if symbol in row_symbols else hidden
              for shape in shapes for symbol in re.findall(r"\bs\d+\b", shape)}
    sizes = (shape.rstrip(", ") for shape in shapes)
    return [math.prod(eval(f"({size},)", {"min": min, "max": max}, values)) if size else 1
            for size in sizes]


def kernel_sources(codes: list[str]) -> dict[str, str]:
    """Source of every Triton kernel the generated wrappers define, by kernel name."""
    pattern = re.compile(r"async_compile\.triton\('(\w+)', '''(.*?)'''", re.S)
    return {name: src for code in codes for name, src in pattern.findall(code)}


def forward_launches(codes: list[str]) -> list[tuple[int, int]]:
    """(row blocks, vocabulary splits) of each launch of the forward's first pass (static
    shapes: the wrapper passes the grid as integers)."""
    names = [name for name, src in kernel_sources(codes).items()
             if "arg_PARTIALS" in src and re.search(r"\barg_E\b", src)]  # not arg_ENTROPY
    assert names, "no forward kernel found"
    return [(int(rows), int(splits)) for code in codes for name in names
            for rows, splits in re.findall(rf"\b{name}\.run\(.*?(\d+), (\d+), 1, stream", code)]


def assert_templates_launched(calls: list[str]) -> None:
    """`calls` (kernel_calls of some wrappers) hold the CCE forward and backward templates."""
    assert any(c.startswith("triton_tem_fused_linear_cross_entropy_fwd") for c in calls), calls
    assert any(c.startswith("triton_tem_") and "linear_cross_entropy_bwd" in c
               for c in calls), calls


def dz_chunk_numel(n: int, v: int, d: int) -> int:
    """The most elements the backward's dz chunk [N, VC] may have: VC as planned for 4-byte
    elements, whose budget in elements is the largest (the gradients' own fraction caps it)."""
    from cce_inductor import ops
    from cce_inductor.lowering import backward

    chunks = min(backward.chunk_count(n, v, d, itemsize, ops.TILE_MAX_COLS)
                 for itemsize in (2, 4))
    return n * backward.chunk_width(v, chunks, ops.TILE_MAX_COLS, cdiv=lambda a, b: -(-a // b))


def assert_fused(codes: list[str], n: int, v: int, d: int) -> None:
    """The wrappers launch the CCE forward and backward templates (no eager op, no extern
    matmul), and allocate no buffer larger than the inputs but the backward's dz chunk, nor
    (when the vocabulary takes several chunks) one of N * V elements."""
    calls = kernel_calls(codes)
    assert_templates_launched(calls)
    assert not any("linear_cross_entropy" in c for c in calls if c.startswith("torch.ops")), calls
    assert not any(c.startswith("extern_kernels") for c in calls), calls
    numels = allocated_numels(codes, rows=n, hidden=d)
    assert numels, "no allocation found: the wrapper format changed"
    chunk = dz_chunk_numel(n, v, d)
    larger = [numel for numel in numels if numel > max(n * d, v * d)]
    assert len(larger) <= 1 and all(numel <= chunk for numel in larger), (numels, chunk)
    if chunk < n * v:
        assert n * v not in numels, numels
