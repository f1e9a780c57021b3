"""Registers, spills and the SASS instruction mix of our Triton kernels, compiled for an NVIDIA GPU on a machine
that has none (Triton's bundled ptxas, cuobjdump and nvdisasm): a first look at a kernel change before device time.

    python -m eval.kernel_stats selective_scan_bwd
    python -m eval.kernel_stats selective_scan_fwd selective_scan_bwd --set BLOCK_T=4 BLOCK_D=16 --warps 1 2

Each KERNEL is compiled with the tiles and num_warps its own launch code picks (from the kernel's TUNING) at d_inner
1024, d_state 16 (the quality table's jamba), and the flags of Mamba training (D, z, delta_bias, softplus,
documents), changed by `--set NAME=VALUE` and `--warps`. A row gives the registers per thread (255 is the cap; a
kernel that needs more spills to local memory: the stack and LDL/STL columns), the shared memory, the resident warps
per SM that the registers allow, and the static count of SASS instructions by kind (SHFL shuffles, LDG/STG global
loads and stores, RED/ATOM atomics, MUFU special functions such as exp2, the fp32 arithmetic, integer and predicate
work, barriers). Static counts are not timings: a loop's body counts once, however often it runs; comparing two
settings of one kernel under one Triton is what they are for: the Triton installed here compiles the same source
differently from the GPU machine's (the scan forward of commit e6e7e68: 222 registers under Triton 3.9 on the CPU
machine, 158 under the H200 machine's 3.6). Times come from the GPU (`python -m eval.bench_selective_scan`).
Writes the table to `--out` (default runs/eval/kernel_stats/kernel_stats.md under the current directory).
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from eval.plots import add_out_argument, check_out, md_table, write_result
from hybrid.errors import ConfigError, cli

REGS_PER_SM, MAX_WARPS_PER_SM = 65536, 64  # sm_80 / sm_90


D_INNER, D_STATE = 1024, 16  # the width the launch tiles are picked for


@dataclass
class Spec:
    """How to compile one kernel outside a launch: its module and name, the element type of each pointer argument
    (by name; `*` for the rest), its flag constexprs, and `tiles(module)`: the tile constexprs and num_warps that
    the module's launch code picks at D_INNER, D_STATE."""
    module: str
    kernel: str
    pointers: dict
    flags: dict
    tiles: Callable


def _scan_fwd_tiles(ts) -> tuple[dict, int]:
    block_t, block_d, block_n, warps = ts.forward_tiles(D_INNER, D_STATE)
    return dict(BLOCK_T=block_t, BLOCK_D=block_d, BLOCK_N=block_n), warps


def _scan_bwd_tiles(ts) -> tuple[dict, int]:
    block_t = ts.forward_tiles(D_INNER, D_STATE)[0]  # the backward replays the forward's time blocks
    block_d, block_n, warps = ts.backward_tiles(D_INNER, D_STATE, block_t)
    return dict(BLOCK_T=block_t, BLOCK_D=block_d, BLOCK_N=block_n), warps


_SCAN_FP32 = ("A_ptr", "D_ptr", "dtb_ptr", "h0_ptr", "hT_ptr", "hs_ptr", "p_ptr", "dhT_ptr", "dB_ptr", "dC_ptr",
              "dA_ptr", "dD_ptr", "ddtb_ptr", "dh0_ptr", "scratch_ptr")
_SCAN_TYPES = {**{n: "*fp32" for n in _SCAN_FP32}, "keep_ptr": "*fp32", "*": "*bf16"}
_SCAN_FLAGS = dict(HAS_D=True, HAS_Z=True, HAS_DTB=True, SOFTPLUS=True, HAS_SEQ=True)
_SCAN = "kernels.selective_scan.triton_scan"
SPECS = {
    "selective_scan_fwd": Spec(_SCAN, "_selective_scan_fwd_kernel", _SCAN_TYPES,
                               dict(_SCAN_FLAGS, HAS_H0=False, SAVE=True, SUMMARY=False), _scan_fwd_tiles),
    "selective_scan_bwd": Spec(_SCAN, "_selective_scan_bwd_kernel", _SCAN_TYPES,
                               dict(_SCAN_FLAGS, HAS_DHT=False, ATOMIC=True), _scan_bwd_tiles),
}
TILE_NAMES = ("BLOCK_T", "BLOCK_D", "BLOCK_N")  # the tile constexprs every spec's `tiles` returns
# instruction kinds: (column, regular expression on the SASS opcode)
KINDS = [("SHFL", r"^SHFL"), ("LDG", r"^LDG"), ("STG", r"^STG"), ("RED/ATOM", r"^(RED|ATOM)"), ("MUFU", r"^MUFU"),
         ("fp32 FMA/MUL/ADD", r"^(FFMA|FMUL|FADD)"), ("int", r"^(IMAD|IADD|LEA|SHF|LOP|IABS|IMNMX)"),
         ("predicates/selects", r"^(ISETP|FSETP|PLOP|FSEL|SEL)\b"), ("LDL/STL", r"^(LDL|STL)"), ("BAR", r"^BAR")]


def tools() -> str:
    """The folder of Triton's bundled CUDA tools; ConfigError when this Triton has none."""
    try:
        import triton
    except ImportError:
        raise ConfigError("eval.kernel_stats needs triton (pip install triton)") from None
    folder = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    missing = [t for t in ("ptxas", "cuobjdump", "nvdisasm") if not os.path.isfile(os.path.join(folder, t))]
    if missing:
        raise ConfigError(f"eval.kernel_stats: this triton ({triton.__version__}) has no {', '.join(missing)} in "
                          f"{folder}; it needs a triton wheel with the NVIDIA backend")
    return folder


def compile_kernel(spec: Spec, constexprs: dict, warps: int, arch: int):
    """The compiled kernel (triton.compile for `arch`, no GPU needed)."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    fn = getattr(importlib.import_module(spec.module), spec.kernel)
    names = fn.arg_names
    sig = {}
    for n in names:
        if n in constexprs:
            sig[n] = "constexpr"
        elif n.endswith("_ptr"):
            sig[n] = spec.pointers.get(n, spec.pointers["*"])
        else:
            sig[n] = "i32"
    src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(n),): v for n, v in constexprs.items()})
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps})


def stats(compiled, folder: str) -> dict:
    """Registers, stack, shared bytes and SASS counts by KINDS of a compiled kernel, and its SASS text."""
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "k.cubin")
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        res = subprocess.run([os.path.join(folder, "cuobjdump"), "-res-usage", cubin], capture_output=True,
                             text=True, check=True).stdout
        sass = subprocess.run([os.path.join(folder, "nvdisasm"), "-c", cubin], capture_output=True, text=True,
                              check=True).stdout
    ops = [m.group(1) for m in re.finditer(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", sass)]
    num = lambda key: int(m.group(1)) if (m := re.search(rf"\b{key}:(\d+)", res)) else 0
    out = {"regs": num("REG"), "stack": num("STACK"), "shared": num("SHARED"), "instructions": len(ops),
           "sass": sass}
    for name, pattern in KINDS:
        out[name] = sum(1 for op in ops if re.match(pattern, op))
    return out


def parse_sets(items: Sequence[str]) -> dict:
    out = {}
    for item in items:
        name, eq, value = item.partition("=")
        if not eq or not name:
            raise ConfigError(f"--set {item}: expected NAME=VALUE (e.g. BLOCK_T=4)")
        low = value.lower()
        if low in ("true", "false"):
            out[name] = low == "true"
        elif re.fullmatch(r"-?\d+", value):
            out[name] = int(value)
        else:
            raise ConfigError(f"--set {item}: VALUE must be an integer or true/false")
    return out


def validate(args) -> dict:
    """Every option, before anything is compiled: ConfigError naming the first bad one. Returns the --set
    constexprs."""
    if args.warps and any(w < 1 or w & (w - 1) for w in args.warps):
        raise ConfigError(f"--warps {args.warps}: expected powers of two")
    sets = parse_sets(args.set)
    for name in args.kernels:
        allowed = [*SPECS[name].flags, *TILE_NAMES]
        unknown = sorted(set(sets) - set(allowed))
        if unknown:
            raise ConfigError(f"--set {', '.join(unknown)}: not a constexpr of {name} (allowed: "
                              f"{', '.join(allowed)})")
    check_out(args.out)
    return sets


def rows(args, sets: dict) -> tuple[list, list[str]]:
    import importlib
    folder = tools()
    table, sass = [], []
    for name in args.kernels:
        spec = SPECS[name]
        tiles, tuned_warps = spec.tiles(importlib.import_module(spec.module))
        consts = {**spec.flags, **tiles, **sets}
        for warps in args.warps or [tuned_warps]:
            st = stats(compile_kernel(spec, consts, warps, args.arch), folder)
            resident = min(MAX_WARPS_PER_SM, REGS_PER_SM // max(1, st["regs"] * 32 * warps) * warps)
            settings = " ".join(f"{k}={v}" for k, v in consts.items() if k.startswith("BLOCK"))
            table.append([name, settings, warps, st["regs"], st["stack"], st["shared"], resident,
                          st["instructions"], *[st[k] for k, _ in KINDS]])
            sass.append(f"// {name} {settings} num_warps={warps}\n{st['sass']}")
            print(md_table(HEADER, table[-1:]).splitlines()[-1], flush=True)
    return table, sass


HEADER = ["kernel", "tiles", "warps", "registers", "stack bytes", "shared bytes", "warps per SM (registers)",
          "SASS instructions", *[k for k, _ in KINDS]]


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m eval.kernel_stats", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("kernels", nargs="+", choices=sorted(SPECS), metavar="KERNEL",
                    help=f"kernels to compile ({', '.join(sorted(SPECS))})")
    ap.add_argument("--set", nargs="*", default=[], metavar="NAME=VALUE",
                    help="constexprs to change (BLOCK_T=4 ATOMIC=false ...)")
    ap.add_argument("--warps", type=int, nargs="*", help="num_warps to compile with (default: the kernel's tuning)")
    ap.add_argument("--arch", type=int, default=90, help="compute capability x 10 (default: 90, H100/H200)")
    ap.add_argument("--sass", metavar="FILE", help="also write the SASS of every compiled kernel to FILE")
    add_out_argument(ap, "kernel_stats", "kernel_stats")
    ap.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = ap.parse_args(argv)
    sets = validate(args)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        # under Triton's interpreter the kernels are Python functions, not compilable ones: run without it
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        return subprocess.run([sys.executable, "-m", "eval.kernel_stats",
                               *(argv if argv is not None else sys.argv[1:])], env=env).returncode
    table, sass = rows(args, sets)
    import triton
    body = (f"Compiled for sm_{args.arch} without a GPU (Triton {triton.__version__}'s ptxas); static SASS counts, "
            "not timings.\n\n"
            + md_table(HEADER, table))
    write_result(args.out, "Triton kernels compiled: registers and instruction mix", torch.device("cpu"), body,
                 argv if argv is not None else sys.argv[1:], "eval.kernel_stats")
    if args.sass:
        with open(args.sass, "w") as f:
            f.write("\n".join(sass))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(cli(main))
