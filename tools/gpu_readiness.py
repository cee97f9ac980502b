"""GPU readiness without a GPU: compile every shipped template config for sm_80 and sm_90a.

Each config is rendered by Inductor itself (a tiny graph compiled under the CPU interpreter
harness, the config forced), its kernel source is compiled ahead of time, in a fresh
subprocess (the interpreter leaves triton.language patched in its process), with
`triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))` using triton's bundled
ptxas, and `cuobjdump --dump-resource-usage` reads registers and spill stack from the cubin.
Shared memory is Triton's dynamic allocation (compiled metadata); the cubin's static SHARED is 0.
sm_90a kernels are also checked for wgmma (Hopper tensor cores) in the PTX. Pointer arguments
are compiled as 16-byte aligned, as Inductor marks them for GPU inputs (see compile_for_gpu).

    python -m cce_inductor.tools.gpu_readiness [--all]
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import types
from pathlib import Path
from typing import Any, Optional

import torch

from cce_inductor.lowering import backward, configs, forward

# Opt-in shared memory per block: A100 163 KiB, H100 227 KiB.
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
HIDDEN = 256  # D of the graph the kernels are rendered from
_KERNEL_DEF = re.compile(r"async_compile\.triton\('(\w+)', '''(.*?)'''", re.S)
# Every template kernel, by name (the key of configs.forced).
KERNELS = {kernel.name: kernel for kernel in (*forward.KERNELS, *backward.KERNELS)}
# The interpreter's bf16 tl.dot workaround must not reach GPU code.
_INTERPRETER_ONLY = ("DOT_FP32 : tl.constexpr = True", "DOT_FP32 : tl.constexpr = False")


@dataclasses.dataclass(frozen=True)
class Resources:
    kernel: str  # a name of KERNELS (backward_owned with [dE] or [dC])
    dtype: str
    config: str
    arch: int
    registers: int
    spill_bytes: int
    shared_bytes: int
    wgmma: bool

    @property
    def fits(self) -> bool:
        return self.spill_bytes == 0 and self.shared_bytes <= SHARED_LIMIT[self.arch]


def cuobjdump() -> str:
    """cuobjdump from triton's bundled CUDA tools, else from PATH."""
    import triton

    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    found = str(bundled) if bundled.exists() else shutil.which("cuobjdump")
    if not found:
        raise RuntimeError("cuobjdump not found (neither in triton's bundled tools nor on PATH)")
    return found


def render(dtype: torch.dtype, deterministic: bool, **forced: configs.Config) -> dict[str, str]:
    """Inductor's source of the template kernels for a small CCE graph (forward and backward),
    with the given configs forced; keyed by kernel name in the wrapper."""
    import cce_inductor
    from cce_inductor import compat
    from cce_inductor.tools import interpreter

    # D spans several BLOCK_D steps, as real hidden sizes do: the D loop is then kept and
    # software-pipelined (a single step would be folded away and compile differently).
    gen = torch.Generator().manual_seed(0)
    e = torch.randn(8, HIDDEN, generator=gen).to(dtype).requires_grad_()
    c = torch.randn(40, HIDDEN, generator=gen).to(dtype).requires_grad_()
    b = torch.randn(40, generator=gen).to(dtype).requires_grad_()
    t = torch.randint(0, 40, (8,), generator=gen)

    def step() -> None:
        fn = torch.compile(cce_inductor.linear_cross_entropy, backend="inductor")
        fn(e, c, t, linear_bias=b, softcap=20.0).backward()

    torch.compiler.reset()
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        with compat.fresh_inductor_cache(), interpreter.interpreted(), configs.forced(**forced):
            _, codes = compat.run_and_get_code(step)
    finally:
        torch.use_deterministic_algorithms(previous)
        torch.compiler.reset()
    return {name: src for code in codes for name, src in _KERNEL_DEF.findall(code)
            if name.startswith("triton_tem_")}


def compile_for_gpu(source: str, name: str, arch: int) -> Any:
    """triton.compile the Inductor kernel `name` of `source` for sm_{arch} (sm_90a for 90)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    source = source.replace(*_INTERPRETER_ONLY)
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(source)  # triton.jit reads the source back from the file
    module = types.ModuleType(f"cce_gpu_readiness_{name}")
    module.__file__ = f.name
    interpret = os.environ.pop("TRITON_INTERPRET", None)
    try:
        exec(compile(source, f.name, "exec"), module.__dict__)
    finally:
        if interpret is not None:
            os.environ["TRITON_INTERPRET"] = interpret
    autotuner = getattr(module, name)
    meta = autotuner.triton_meta
    attrs = {tuple(k): v for k, v in meta["configs"][0].items()} if meta.get("configs") else {}
    # Rendered for CPU tensors, the kernel calls its graph inputs unaligned (Inductor only
    # checks the alignment of GPU inputs); on a GPU, inputs at an aligned storage offset and
    # every buffer Inductor allocates are 16-byte aligned, which decides vectorized and
    # asynchronous (pipelined) loads, so the check compiles with that alignment.
    for index, arg_type in enumerate(meta["signature"].values()):
        if arg_type.startswith("*"):
            attrs[(index,)] = [["tt.divisibility", 16]]
    src = ASTSource(autotuner.fn, meta["signature"], constexprs={}, attrs=attrs)
    options = {"num_warps": autotuner.inductor_meta.get("num_warps") or _launch(source, "num_warps"),
               "num_stages": _launch(source, "num_stages")}
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


def _launch(source: str, key: str) -> int:
    return int(re.search(rf"\b{key}=(\d+)", source).group(1))


def usage(compiled: Any) -> tuple[int, int]:
    """(registers, spill stack bytes) of the compiled kernel, read with cuobjdump."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(compiled.asm["cubin"])
    out = subprocess.run([cuobjdump(), "--dump-resource-usage", f.name], capture_output=True,
                         text=True, check=True).stdout
    os.unlink(f.name)
    match = re.search(r"REG:(\d+)\s+STACK:(\d+)", out)
    if match is None:
        raise RuntimeError(f"unexpected cuobjdump output:\n{out}")
    return int(match.group(1)), int(match.group(2))


def _compile_jobs(jobs: list[dict]) -> list[dict]:
    """Compile jobs {name, source, arch} in a fresh interpreter-free subprocess; return
    {registers, spill_bytes, shared_bytes, wgmma} for each."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "jobs.json"
        path.write_text(json.dumps(jobs))
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        subprocess.run([sys.executable, "-m", "cce_inductor.tools.gpu_readiness",
                        "--compile-jobs", str(path)], check=True, env=env)
        return json.loads((Path(tmp) / "results.json").read_text())


def _run_compile_jobs(path: Path) -> None:
    results = []
    for job in json.loads(path.read_text()):
        compiled = compile_for_gpu(job["source"], job["name"], job["arch"])
        registers, spill = usage(compiled)
        results.append({"registers": registers, "spill_bytes": spill,
                        "shared_bytes": compiled.metadata.shared,
                        "wgmma": "wgmma" in compiled.asm["ptx"]})
    (path.parent / "results.json").write_text(json.dumps(results))


def kernel_of(source: str) -> str:
    """Which kernel of KERNELS an Inductor-rendered CCE template source is."""
    if "OWNS_ROWS : tl.constexpr" in source:
        return backward.BACKWARD_OWNED.name
    if "arg_PARTIALS" in source:
        return forward.FORWARD.name if "arg_E" in source else forward.FORWARD_COMBINE.name
    return backward.BACKWARD.name


def _label(kernel: str, source: str) -> str:
    if kernel != backward.BACKWARD_OWNED.name:
        return kernel
    return kernel + ("[dE]" if "OWNS_ROWS : tl.constexpr = True" in source else "[dC]")


def _renders(dtype: torch.dtype, arch: int, all_configs: bool
             ) -> list[tuple[bool, dict[str, configs.Config]]]:
    """The (deterministic, forced configs) renders that cover the configs of `arch` (or just
    its defaults): one render forces a config of each kernel it builds, so the forward, combine
    and atomic backward share renders, and the deterministic backward gets its own."""
    lists = {name: kernel.table.shipped(configs.width_of(dtype), arch)
             for name, kernel in KERNELS.items()}
    if not all_configs:
        lists = {kernel: table[:1] for kernel, table in lists.items()}
    groups = [(False, (forward.FORWARD.name, forward.FORWARD_COMBINE.name, backward.BACKWARD.name)),
              (True, (backward.BACKWARD_OWNED.name,))]
    return [(deterministic, {kernel: lists[kernel][i] for kernel in kernels
                             if i < len(lists[kernel])})
            for deterministic, kernels in groups
            for i in range(max(len(lists[kernel]) for kernel in kernels))]


def resource_table(all_configs: bool = False, dtypes: Optional[list[torch.dtype]] = None
                   ) -> list[Resources]:
    """Resources of the default configs (or of every shipped config) on their arch."""
    jobs, labels = [], []
    for dtype in dtypes or [torch.bfloat16, torch.float32]:
        for arch in configs.ARCHS:
            for deterministic, forced in _renders(dtype, arch, all_configs):
                sources = render(dtype, deterministic, **forced)
                for name, source in sorted(sources.items()):
                    kernel = kernel_of(source)
                    if kernel in forced:
                        jobs.append({"name": name, "source": source, "arch": arch})
                        labels.append((_label(kernel, source), str(dtype).replace("torch.", ""),
                                       forced[kernel].name(), arch))
    return [Resources(*label, **result) for label, result in zip(labels, _compile_jobs(jobs))]


def format_table(rows: list[Resources]) -> str:
    header = ("kernel", "dtype", "config", "arch", "regs", "spill B", "shared B", "wgmma", "ok")
    lines = [header] + [
        (r.kernel, r.dtype, r.config, f"sm_{r.arch}{'a' if r.arch >= 90 else ''}",
         str(r.registers), str(r.spill_bytes), str(r.shared_bytes),
         "yes" if r.wgmma else "no", "yes" if r.fits else "NO")
        for r in rows
    ]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)) for line in lines)


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--compile-jobs"]:
        _run_compile_jobs(Path(argv[1]))
        return 0
    rows = resource_table(all_configs="--all" in argv)
    print(format_table(rows))
    return 0 if all(r.fits for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
