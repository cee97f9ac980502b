"""GPU readiness without a GPU: the default template configs, rendered at Gemma 2 2B's shape
(N=8192, V=256000, D=2304, bf16), compile for sm_80 and sm_90a without register spills, within
shared memory, reaching the CTAs per SM their grids plan with, and with wgmma on Hopper for
16-bit inputs, their operand loads software-pipelined (every kernel but the forward combine,
which does no matmul).

Runs the real chain (Inductor renders the kernels under the CPU interpreter with launches
skipped, triton.compile with its bundled ptxas builds cubins, cuobjdump reads them). Every
shipped config at every preset is checked by
`python -m cce_inductor.tools.gpu_readiness --preset NAME --all` (tens of minutes; not in CI).
"""

from __future__ import annotations

import pytest

from cce_inductor.lowering import configs, forward
from cce_inductor.tools import gpu_readiness
from cce_inductor.tools.presets import PRESETS


@pytest.fixture(scope="module")
def default_rows():
    try:
        gpu_readiness.cuobjdump()
    except RuntimeError as error:
        pytest.skip(str(error))
    return gpu_readiness.resource_table(PRESETS["gemma2-2b"], all_configs=False)


def test_every_default_kernel_is_measured(default_rows):
    kinds = {(row.kernel.split("[")[0], row.arch) for row in default_rows}
    assert kinds == {(kernel, arch) for kernel in gpu_readiness.KERNELS for arch in configs.ARCHS}
    print("\n" + gpu_readiness.format_table(default_rows))


def has_matmul(row: gpu_readiness.Resources) -> bool:
    return row.kernel != forward.FORWARD_COMBINE.name


def test_defaults_do_not_spill_and_fit_shared_memory(default_rows):
    for row in default_rows:
        assert row.spill_bytes == 0, row
        assert row.shared_bytes <= gpu_readiness.SHARED_LIMIT[row.arch], row
        assert row.shared_bytes > 0 or not has_matmul(row), row  # matmul operands are staged
        assert 0 < row.registers <= 255, row
        assert row.ctas >= row.declared_ctas, row


def test_hopper_uses_wgmma_for_16_bit(default_rows):
    for row in default_rows:
        assert row.wgmma == (row.arch >= 90 and has_matmul(row)), row


def test_matmul_loads_are_pipelined(default_rows):
    """Every matmul loop loads its operands with asynchronous copies (software pipelining): the
    gradient kernel loops over lists of kept tiles, not under `if kept:`, for that."""
    for row in default_rows:
        assert row.pipelined or not has_matmul(row), row
