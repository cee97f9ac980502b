"""The CPU interpreter harness (cce_inductor.tools.interpreter) and the cache-key pass."""

from __future__ import annotations

import os
import shutil

import torch

from cce_inductor import compat
from cce_inductor.lowering import cache, common
from cce_inductor.tools import interpreter


def test_inductor_triton_code_runs_interpreted_on_cpu():
    """Inductor emits Triton (not C++) for a CPU graph, libdevice functions missing from
    triton.language.math included, and the results match eager."""
    def fn(x, y):
        return torch.tanh(x) * torch.log1p(y) + torch.expm1(-y)

    x, y = torch.randn(8, 16), torch.rand(8, 16)
    torch._dynamo.reset()
    with compat.fresh_inductor_cache(), interpreter.interpreted():
        assert interpreter.is_active()
        out, codes = compat.run_and_get_code(torch.compile(fn, backend="inductor"), x, y)
    torch._dynamo.reset()
    source = "".join(codes)
    assert "@triton.jit" in source and "libdevice.tanh" in source
    torch.testing.assert_close(out, fn(x, y), rtol=1e-6, atol=1e-6)


def test_harness_restores_process_state():
    import torch._inductor.config as inductor_config
    import triton

    from torch._inductor.runtime import triton_helpers

    before = (inductor_config.cpu_backend, os.environ.get("TRITON_INTERPRET"),
              triton_helpers.libdevice, triton.language.zeros)
    with interpreter.interpreted():
        assert inductor_config.cpu_backend == "triton"
        assert os.environ["TRITON_INTERPRET"] == "1"
        target = triton.runtime.driver.active.get_current_target()
        assert (target.backend, target.arch) == ("cuda", 80)
    assert not interpreter.is_active()
    after = (inductor_config.cpu_backend, os.environ.get("TRITON_INTERPRET"),
             triton_helpers.libdevice, triton.language.zeros)
    assert after == before


def test_cache_key_follows_template_text(tmp_path, monkeypatch):
    """Editing a template changes the uuid of the post-grad pass, hence Inductor's FX graph
    cache key; unchanged sources keep it."""
    copy = tmp_path / "templates"
    shutil.copytree(common.TEMPLATE_DIR, copy)
    monkeypatch.setattr(common, "TEMPLATE_DIR", copy)
    pass_ = cache.graph_pass()
    first = pass_.uuid()
    assert pass_.uuid() == first
    forward = copy / "cce_forward.py.jinja"
    forward.write_text(forward.read_text() + "\n    # edited\n")
    assert pass_.uuid() != first


def test_cache_pass_is_installed_with_the_lowerings():
    import torch._inductor.config as inductor_config
    import torch._inductor.lowering  # noqa: F401  (triggers the lazy registration)

    from cce_inductor.lowering import registration

    assert registration._registered
    passes = inductor_config.post_grad_custom_post_pass
    passes = passes if isinstance(passes, (list, tuple)) else [passes]
    assert cache.graph_pass() in passes


def test_dot_upcast_only_where_the_interpreter_needs_it():
    """DOT_FP32 (operands upcast before tl.dot) only for bf16 on the CPU under an interpreter
    whose bf16 tl.dot is wrong, as probed; never for fp16/fp32 nor for CUDA tensors."""
    dtypes = (torch.float32, torch.float16, torch.bfloat16)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    with interpreter.interpreted():
        upcast = {dtype: common.dot_options(cpu, dtype)["DOT_FP32"] for dtype in dtypes}
        bf16_exact = interpreter.bf16_dot_is_exact()
    assert upcast == {torch.float32: False, torch.float16: False, torch.bfloat16: not bf16_exact}
    assert not any(common.dot_options(cuda, dtype)["DOT_FP32"] for dtype in dtypes)
