"""GPU readiness without a GPU: compile every shipped template config for sm_80 and sm_90a at
the shapes it will run at.

Each config is rendered by Inductor itself at a preset's N, V, D (a static-shape CCE loss +
backward, the configs forced) under the CPU interpreter harness with every kernel launch skipped:
generating the code needs the tensors but not the kernels' results, and sizes as the real
kernels see them (constants, loop trip counts, the backward's chunk width) decide registers and
pipelining. Its kernel source is compiled ahead of time, in a fresh subprocess (the interpreter
leaves triton.language patched in its process), with
`triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))` using triton's bundled
ptxas, and `cuobjdump --dump-resource-usage` reads registers and spill stack from the cubin.
Shared memory is Triton's dynamic allocation (compiled metadata); the cubin's static SHARED is 0.
sm_90a kernels are also checked for wgmma (Hopper tensor cores) in the PTX, and every kernel
for asynchronous copies (cp.async: its loads software-pipelined). Pointer arguments
are compiled as 16-byte aligned, as Inductor marks them for GPU inputs (see compile_for_gpu).
CTAs per SM follow from registers, warps and shared memory (see `ctas_per_sm`); a config must
reach the CTAs per SM it declares (its grid plans waves with them).

    python -m cce_inductor.tools.gpu_readiness [--preset gemma2-2b] [--all] [--head rl]
"""

from __future__ import annotations

import argparse
import contextlib
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
from typing import Any, Iterator, Optional

import torch

from cce_inductor.lowering import backward, configs, forward
from cce_inductor.tools.presets import PRESETS, Shape

# What the rendered kernels compute: the cross-entropy loss, or the heaviest variant, every
# optional term at once (the logit scale after the softcap, the entropy's running sum in the
# forward, its gradient term and its filter bound in dz), the kernels with the most live state.
HEADS = {"loss": "cross-entropy", "rl": "cross-entropy + entropy, logit scale 1/0.7"}
# Every template kernel, by name (the key of configs.forced).
KERNELS = {kernel.name: kernel for kernel in (*forward.KERNELS, *backward.KERNELS)}

# Opt-in shared memory per block: A100 163 KiB, H100 227 KiB; per SM 164 and 228 KiB, of which
# the driver reserves 1 KiB per resident block.
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
SHARED_PER_SM = {80: 164 * 1024, 90: 228 * 1024}
REGISTERS_PER_SM = 65536
THREADS_PER_SM = 2048
BLOCKS_PER_SM = 32
_KERNEL_DEF = re.compile(r"async_compile\.triton\('(\w+)', '''(.*?)'''", re.S)
# The interpreter's bf16 tl.dot workaround must not reach GPU code.
_INTERPRETER_ONLY = ("DOT_FP32 : tl.constexpr = True", "DOT_FP32 : tl.constexpr = False")


@dataclasses.dataclass(frozen=True)
class Resources:
    kernel: str  # a name of KERNELS
    dtype: str
    config: str
    arch: int
    registers: int
    spill_bytes: int
    shared_bytes: int
    wgmma: bool
    pipelined: bool  # cp.async in the PTX: operand loads overlap the matmuls
    num_warps: int = 4
    declared_ctas: int = 1  # the CTAs per SM the config's grid plans with

    @property
    def ctas(self) -> int:
        return ctas_per_sm(self.registers, self.num_warps, self.shared_bytes, self.arch)

    @property
    def fits(self) -> bool:
        return (self.spill_bytes == 0 and self.shared_bytes <= SHARED_LIMIT[self.arch]
                and self.ctas >= self.declared_ctas)


def ctas_per_sm(registers: int, num_warps: int, shared_bytes: int, arch: int) -> int:
    """Resident CTAs per SM: registers are allocated per warp in units of 256 (8 per thread),
    shared memory per block plus 1 KiB reserved, at most 2048 threads and 32 blocks."""
    per_warp = -(-registers * 32 // 256) * 256
    by_registers = (REGISTERS_PER_SM // per_warp) // num_warps if per_warp else BLOCKS_PER_SM
    by_shared = SHARED_PER_SM[arch] // (shared_bytes + 1024)
    by_threads = THREADS_PER_SM // (32 * num_warps)
    return min(by_registers, by_shared, by_threads, BLOCKS_PER_SM)


def cuobjdump() -> str:
    """cuobjdump from triton's bundled CUDA tools, else from PATH."""
    import triton

    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    found = str(bundled) if bundled.exists() else shutil.which("cuobjdump")
    if not found:
        raise RuntimeError("cuobjdump not found (neither in triton's bundled tools nor on PATH)")
    return found


@contextlib.contextmanager
def _launches_skipped() -> Iterator[None]:
    """Interpreted kernels do nothing: code generation at full size without the compute."""
    from triton.runtime.interpreter import InterpretedFunction

    run = InterpretedFunction.run
    InterpretedFunction.run = lambda self, *args, **kwargs: None
    try:
        yield
    finally:
        InterpretedFunction.run = run


def render(shape: Shape, dtype: torch.dtype, tile: configs.LogitTile, head: str = "loss",
           **forced: configs.Config) -> dict[str, str]:
    """Inductor's source of the template kernels of a CCE head + backward at `shape` (static;
    bias, softcap 30 and the default filter on, as a Gemma 2 head trains; see HEADS), with
    this logit tile and these configs forced; keyed by kernel name in the wrapper. Nothing is
    computed: the tensors are allocated uninitialized and every kernel launch is skipped."""
    import cce_inductor
    from cce_inductor import compat
    from cce_inductor.tools import interpreter

    e = torch.empty(shape.n, shape.d, dtype=dtype).requires_grad_()
    c = torch.empty(shape.v, shape.d, dtype=dtype).requires_grad_()
    b = torch.empty(shape.v, dtype=dtype).requires_grad_()
    t = torch.zeros(shape.n, dtype=torch.int64)

    def step() -> None:
        fn = torch.compile(cce_inductor.api.linear_head, backend="inductor")
        if head == "loss":
            fn(e, c, t, outputs=("loss",), linear_bias=b, softcap=30.0)[0].backward()
        else:
            loss, entropy = fn(e, c, t, outputs=("loss", "entropy"), linear_bias=b,
                               softcap=30.0, logit_scale=1 / 0.7)
            (loss + entropy.mean()).backward()

    torch.compiler.reset()
    try:
        with compat.fresh_inductor_cache(), interpreter.interpreted(), _launches_skipped(), \
                configs.forced(tile=tile, **forced):
            _, codes = compat.run_and_get_code(step)
    finally:
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
    {registers, spill_bytes, shared_bytes, wgmma, pipelined} for each."""
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
                        "wgmma": "wgmma" in compiled.asm["ptx"],
                        "pipelined": "cp.async" in compiled.asm["ptx"]})
    (path.parent / "results.json").write_text(json.dumps(results))


def kernel_of(source: str) -> str:
    """Which kernel of KERNELS an Inductor-rendered CCE template source is."""
    if "arg_DZ" in source:
        return (backward.BACKWARD_DZ if "arg_TILE_MAX" in source else backward.BACKWARD_GRADS).name
    # \b: the combine's arg_ENTROPY is no arg_E.
    return (forward.FORWARD if re.search(r"\barg_E\b", source) else forward.FORWARD_COMBINE).name


def _renders(dtype: torch.dtype, arch: int, all_configs: bool) -> list[dict[str, configs.Config]]:
    """The forced configs of each render that covers the configs of `arch` (or its defaults):
    render i forces config i of every kernel that has one (a kernel's last config stands in
    when its list is shorter)."""
    lists = {name: kernel.table.shipped(configs.width_of(dtype), arch)
             for name, kernel in KERNELS.items()}
    count = max(len(table) for table in lists.values()) if all_configs else 1
    return [{kernel: table[min(i, len(table) - 1)] for kernel, table in lists.items()}
            for i in range(count)]


def _num_warps(config: configs.Config, tile: configs.LogitTile) -> int:
    return getattr(config, "num_warps", None) or tile.num_warps


def resource_table(shape: Shape, all_configs: bool = False,
                   dtypes: Optional[list[torch.dtype]] = None, head: str = "loss"
                   ) -> list[Resources]:
    """Resources of the default configs (or of every shipped config) on their arch, rendered
    at `shape` (in `dtypes`, default the shape's own) for `head` (a key of HEADS)."""
    jobs, labels = [], []
    for dtype in dtypes or [shape.torch_dtype]:
        for arch in configs.ARCHS:
            tile = configs.LOGIT_TILES.shipped(configs.width_of(dtype), arch)[0]
            seen: set[tuple[str, str]] = set()
            for forced in _renders(dtype, arch, all_configs):
                sources = render(shape, dtype, tile, head, **forced)
                for name, source in sorted(sources.items()):
                    kernel = kernel_of(source)
                    config = forced[kernel]
                    label = f"{tile.name()}/{config.name()}"
                    if (kernel, label) in seen:
                        continue
                    seen.add((kernel, label))
                    jobs.append({"name": name, "source": source, "arch": arch})
                    labels.append(dict(kernel=kernel, dtype=str(dtype).replace("torch.", ""),
                                       config=label, arch=arch,
                                       num_warps=_num_warps(config, tile),
                                       declared_ctas=config.ctas_per_sm))
    return [Resources(**label, **result) for label, result in zip(labels, _compile_jobs(jobs))]


def format_table(rows: list[Resources]) -> str:
    header = ("kernel", "dtype", "tile/config", "arch", "regs", "spill B", "shared B",
              "CTAs/SM (declared)", "wgmma", "pipelined", "ok")
    lines = [header] + [
        (r.kernel, r.dtype, r.config, f"sm_{r.arch}{'a' if r.arch >= 90 else ''}",
         str(r.registers), str(r.spill_bytes), str(r.shared_bytes),
         f"{r.ctas} ({r.declared_ctas})", "yes" if r.wgmma else "no",
         "yes" if r.pipelined else "no", "yes" if r.fits else "NO")
        for r in rows
    ]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)) for line in lines)


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--compile-jobs"]:
        _run_compile_jobs(Path(argv[1]))
        return 0
    parser = argparse.ArgumentParser(
        prog="python -m cce_inductor.tools.gpu_readiness",
        description="Compile the shipped template configs for sm_80 and sm_90a at a preset's "
        "shape; print registers, spills, shared memory and CTAs per SM.")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="gemma2-2b")
    parser.add_argument("--all", action="store_true", help="every shipped config, not only "
                        "the defaults")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"],
                        help="render in this dtype (default: the preset's)")
    parser.add_argument("--head", choices=sorted(HEADS), default="loss",
                        help="what the kernels compute: " + "; ".join(
                            f"{name}: {what}" for name, what in HEADS.items()))
    args = parser.parse_args(argv)
    shape = PRESETS[args.preset]
    dtypes = [getattr(torch, args.dtype)] if args.dtype else None
    rows = resource_table(shape, all_configs=args.all, dtypes=dtypes, head=args.head)
    rendered = dataclasses.replace(shape, dtype=args.dtype) if args.dtype else shape
    print(f"{args.preset}: {rendered.describe()}, {HEADS[args.head]}")
    print(format_table(rows))
    return 0 if all(r.fits for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
