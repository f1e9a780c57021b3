"""The harness every GPU benchmark (eval/bench_*.py) runs on: one place for timing, floors, checks and the CLI.

- Timing: `median_ms` (triton.testing.do_bench, median), `graph_ms` (calls captured in one CUDA graph and
  replayed: the GPU's time alone, as decode runs), `copy_ms` (a device copy of the same bytes).
- Floors: `Work` counts what a pass must do at least (bytes read + written, tensor-core FLOPs, fp32 FLOPs, exps);
  `Ceilings` turns that into milliseconds at the device's measured rates. The rates live in CEILINGS alone,
  picked by device name, or measured now (`--ceilings measure`), or overridden (`--copy-tbs`, `--gemm-tflops`).
- Checks: `rel_err`, `compare_grads` (ours in bf16 against the reference in fp32, outputs and every gradient),
  `report`; `passes` builds the fwd / fwd+bwd closures the tables time.
- Sweeps: `Budget`, `greedy` and `best_of` over the kernels' TUNING tables (`flat`, `set_flat`); pure Python,
  tested on CPU.
- CLI: `main` runs a benchmark's command line: `parser` (--out, the ceilings, --debug; --sweep, --budget,
  --skip-correctness for ops with a sweep), the command's own checks, `begin` (checks --out, needs CUDA,
  resolves the ceilings) and the benchmark, which writes with `Run.write` (the markdown file with device, date
  and command: eval.plots.write_result).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from typing import Callable, Iterable, NamedTuple, Optional, Sequence

import torch

from eval.plots import add_out_argument, check_out, require_positive, write_result
from hybrid.errors import ConfigError

# ------------------------------------------------------------------------------------------------- ceilings

_EXPS_PER_S = 16 * 132 * 1.98e9  # SFU: 16 exps per clock per SM, 132 SMs at 1.98 GHz (H100 and H200 SXM)


@dataclasses.dataclass(frozen=True)
class Work:
    """The least a pass must do: bytes read + written, tensor-core (bf16) FLOPs, fp32 FLOPs, exponentials."""
    bytes: float = 0.0
    tensor_flops: float = 0.0
    fp32_flops: float = 0.0
    exps: float = 0.0


@dataclasses.dataclass(frozen=True)
class Ceilings:
    """A device's rates (per second): a device-to-device copy (bytes read + written), a large bf16 matmul,
    fp32 FLOPs off the tensor cores, exponentials on the SFU; `source` says where they come from."""
    name: str
    copy_bytes: float
    gemm_flops: float
    fp32_flops: float = 60e12
    exps: float = _EXPS_PER_S
    source: str = ""

    def floor_ms(self, work: Work) -> tuple[float, dict[str, float]]:
        """(floor, {part: ms}): the slowest of the parts a pass cannot avoid, each at its ceiling."""
        parts = {"bytes": work.bytes / self.copy_bytes, "tensor FLOPs": work.tensor_flops / self.gemm_flops,
                 "fp32 FLOPs": work.fp32_flops / self.fp32_flops, "exps": work.exps / self.exps}
        parts = {k: 1e3 * v for k, v in parts.items() if v}
        return max(parts.values(), default=0.0), parts

    def floor_line(self, label: str, work: Work) -> str:
        total, parts = self.floor_ms(work)
        return f"floor {label}: {total:.3f} ms (" + ", ".join(f"{k} {v:.3f}" for k, v in parts.items()) + ")"

    def describe(self) -> str:
        return (f"copy {self.copy_bytes / 1e12:.2f} TB/s (read + write), bf16 matmul {self.gemm_flops / 1e12:.0f} "
                f"TFLOP/s, fp32 {self.fp32_flops / 1e12:.0f} TFLOP/s, {self.exps / 1e12:.2f}e12 exp/s ({self.source})")


# Measured (not datasheet) rates: a torch device-to-device copy and an 8192^3 bf16 matmul on random data;
# `--ceilings measure` measures them again on the GPU at hand (measure_ceilings).
CEILINGS = {
    "H100": Ceilings("H100", copy_bytes=3.0e12, gemm_flops=735e12, source="measured on an H100 SXM"),
    "H200": Ceilings("H200", copy_bytes=4.3e12, gemm_flops=780e12,
                     source="measured on an H200: copy 4.3 TB/s, matmul 769-798 TFLOP/s"),
}


def resolve_ceilings(device: str, choice: str = "auto", copy_tbs: Optional[float] = None,
                     gemm_tflops: Optional[float] = None, measure: Optional[Callable[[str], Ceilings]] = None
                     ) -> Ceilings:
    """The ceilings for GPU `device` (its name): CEILINGS[choice], or the entry whose key is in the name under
    'auto', or `measure(device)` under 'measure' and for a GPU CEILINGS does not know; then the overrides."""
    if choice in CEILINGS:
        base = CEILINGS[choice]
    elif choice == "auto" and any(k in device for k in CEILINGS):
        base = next(v for k, v in CEILINGS.items() if k in device)
    elif choice in ("auto", "measure"):
        if measure is None:
            raise ConfigError(f"--ceilings {choice}: no rates known for {device!r} (known: "
                              f"{', '.join(CEILINGS)}); pass --copy-tbs and --gemm-tflops")
        if choice == "auto":
            print(f"no recorded ceilings for {device!r} ({', '.join(CEILINGS)} known): measuring them", flush=True)
        base = measure(device)
    else:
        raise ConfigError(f"--ceilings {choice}: expected auto, measure or one of {', '.join(CEILINGS)}")
    if copy_tbs:
        base = dataclasses.replace(base, copy_bytes=copy_tbs * 1e12, source=base.source + "; copy from --copy-tbs")
    if gemm_tflops:
        base = dataclasses.replace(base, gemm_flops=gemm_tflops * 1e12,
                                   source=base.source + "; matmul from --gemm-tflops")
    return base


def measure_ceilings(device: str) -> Ceilings:
    """Copy and bf16 matmul rates measured now on the current GPU; fp32 and exp rates stay H100 / H200's."""
    moved = 1 << 31  # 1 GiB read + 1 GiB written: far past L2
    copy = moved / (copy_ms(moved) * 1e-3)
    n = 8192
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    gemm = 2 * n ** 3 / (median_ms(lambda: a @ b) * 1e-3)
    return Ceilings(device, copy_bytes=copy, gemm_flops=gemm, source=f"copy and matmul measured now on {device}")


# --------------------------------------------------------------------------------------------------- timing

def require_cuda(command: str) -> None:
    """ConfigError when there is no CUDA GPU: the benchmarks time Triton kernels and CUDA graphs."""
    if not torch.cuda.is_available():
        raise ConfigError(f"{command} needs a CUDA GPU (torch {torch.__version__} sees none); the CPU checks of "
                          "the same kernels are the tests: python -m pytest -q")


def median_ms(fn: Callable[[], object], rep: int = 100) -> float:
    """Median milliseconds of fn() by `triton.testing.do_bench` (`rep`: ms of timing), after one call of its own
    (compiles, autotunes). Called from Python: the launch overhead is included."""
    import triton.testing
    fn()
    torch.cuda.synchronize()
    return triton.testing.do_bench(fn, warmup=10, rep=rep, return_mode="median")


def graph(fn: Callable[[], object], steps: int = 1) -> Callable[[], None]:
    """`steps` calls of fn captured in one CUDA graph, after warm-up calls on a side stream (which also run any
    autotuning); returns its replay. Replayed, the time is the GPU's alone: a call that enqueues work faster
    than Python launches it would otherwise time the launch."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(steps):
            fn()
    return g.replay


def graph_ms(fn: Callable[[], object], steps: int = 1, rep: int = 100) -> float:
    """Median ms per call of fn, `steps` calls captured in one CUDA graph (decode: a lone microsecond kernel
    would time its launch)."""
    return median_ms(graph(fn, steps), rep) / steps


def copy_ms(moved: int, steps: int = 0) -> float:
    """Median ms of a device-to-device copy moving `moved` bytes in all (half read, half written); with
    `steps`, per copy of `steps` captured in one CUDA graph (as the decode steps are timed)."""
    src = torch.empty(moved // 2, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return graph_ms(lambda: dst.copy_(src), steps, 200) if steps else median_ms(lambda: dst.copy_(src))


# --------------------------------------------------------------------------------------------------- checks

def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


def _is_float(v) -> bool:
    return torch.is_tensor(v) and v.is_floating_point()


def split_leaves(kw: dict) -> tuple[dict, dict]:
    """(the floating tensors of kw: what gets gradients, everything else)."""
    leaves = {k: v for k, v in kw.items() if _is_float(v)}
    return leaves, {k: v for k, v in kw.items() if k not in leaves}


def doc_ids(batch: int, seqlen: int, first: int, dtype=torch.long) -> torch.Tensor:
    """(batch, seqlen) document ids with boundaries at `first` and `first + 777`: three documents a row."""
    pos = torch.arange(seqlen, device="cuda")
    return ((pos >= first).to(dtype) + (pos >= first + 777).to(dtype)).expand(batch, -1).contiguous()


def as_double(args):
    """A tuple / dict of arguments with every floating tensor in float64 (for the exact reference)."""
    cast = lambda v: v.double() if _is_float(v) else v
    return {k: cast(v) for k, v in args.items()} if isinstance(args, dict) else tuple(cast(v) for v in args)


def compare_grads(ours: Callable, reference: Callable, leaves: dict, names: Sequence[str]) -> dict[str, float]:
    """Relative errors of ours(**leaves) (inputs as given, bf16) against reference(**leaves in fp32): each
    output (named `names`) and, after a backward of the same random cotangents, each leaf's gradient (d<leaf>)."""
    mine = {k: v.detach().clone().requires_grad_() for k, v in leaves.items()}
    exact = {k: v.detach().float().requires_grad_() for k, v in leaves.items()}
    got, want = ours(**mine), reference(**exact)
    got, want = (got,) if torch.is_tensor(got) else tuple(got), (want,) if torch.is_tensor(want) else tuple(want)
    cots = [torch.randn_like(w) for w in want]
    sum((g.float() * c).sum() for g, c in zip(got, cots)).backward()
    sum((w * c).sum() for w, c in zip(want, cots)).backward()
    errs = {n: rel_err(g, w) for n, g, w in zip(names, got, want)}
    errs.update({f"d{k}": rel_err(mine[k].grad, exact[k].grad) for k in leaves})
    return errs


def report(label: str, errs: dict[str, float], tol: float = 1e-2) -> bool:
    """Print the worst error (OK / FAIL against `tol`) and each one; True when all are within `tol`."""
    worst = max(errs.values())
    print(f"correctness {label}: worst rel err {worst:.2e} ({'OK' if worst <= tol else 'FAIL'})", flush=True)
    print("  " + "  ".join(f"{k}={v:.1e}" for k, v in errs.items()), flush=True)
    return worst <= tol


class Passes(NamedTuple):
    fwd: Callable[[], None]        # no autograd
    train_fwd: Callable[[], None]  # inputs that need gradients: saves what the backward needs
    fwd_bwd: Callable[[], None]    # forward, then backward of a fixed random dy


def passes(fn: Callable, *args, **kw) -> Passes:
    """The passes a table times for fn(*args, **kw). The backward's leaves are the floating tensors among the
    arguments (detached views: strides kept); dy is shaped like the first of them (x, u, q: the output's)."""
    leaf = lambda v: v.detach().requires_grad_() if _is_float(v) else v
    largs, lkw = [leaf(a) for a in args], {k: leaf(v) for k, v in kw.items()}
    grads = [v for v in (*largs, *lkw.values()) if _is_float(v)]
    dy = torch.randn_like(next(v for v in (*args, *kw.values()) if _is_float(v)))

    def fwd():
        with torch.no_grad():
            fn(*args, **kw)

    def train_fwd():
        fn(*largs, **lkw)

    def fwd_bwd():
        for v in grads:
            v.grad = None
        fn(*largs, **lkw).backward(dy)
    return Passes(fwd, train_fwd, fwd_bwd)


# --------------------------------------------------------------------------------------------------- sweeps

class Budget:
    """Seconds after `start` past which a sweep stops; says so once."""

    def __init__(self, seconds: float, start: Optional[float] = None, clock: Callable[[], float] = time.time):
        self.seconds, self.clock = seconds, clock
        self.start = clock() if start is None else start
        self.said = False

    def spent(self) -> bool:
        over = self.clock() - self.start > self.seconds
        if over and not self.said:
            print("sweep: time budget spent", flush=True)
            self.said = True
        return over


def flat(tuning: dict) -> dict:
    """{"kernel.setting": value} of a kernel module's TUNING ({kernel: {setting: value}}): what a sweep varies."""
    return {f"{k}.{s}": v for k, cfg in tuning.items() for s, v in cfg.items()}


def set_flat(tuning: dict, settings: dict) -> None:
    """Write {"kernel.setting": value} back into TUNING, in place: the kernels read it at each launch."""
    for key, value in settings.items():
        kernel, setting = key.split(".", 1)
        tuning[kernel][setting] = value


def _attempt(trial: Callable, cand, label: str) -> Optional[float]:
    try:
        return trial(cand)
    except Exception as e:  # a tile that does not compile or runs out of resources
        print(f"sweep {label}: failed {type(e).__name__}: {str(e)[:150]}", flush=True)
        return None


def greedy(base: dict, choices: Iterable[tuple[str, Sequence]], trial: Callable[[dict], float], budget: Budget,
           gain: float = 0.01) -> tuple[dict, float]:
    """Each (key, values) of `choices` in turn, each value tried (trial(settings) -> ms) against the best
    settings so far and kept when more than `gain` faster. Returns (best settings, its ms)."""
    best_cfg, best = dict(base), trial(dict(base))
    print(f"sweep start: {best:.3f} ms", flush=True)
    for key, value in ((k, v) for k, values in choices for v in values):
        if budget.spent():
            break
        cfg = {**best_cfg, key: value}
        ms = _attempt(trial, cfg, f"{key}={value}")
        kept = ms is not None and ms < (1 - gain) * best
        if ms is not None:
            print(f"sweep {key}={value}: {ms:.3f} ms{' (kept)' if kept else ''}", flush=True)
        if kept:
            best, best_cfg = ms, cfg
    return best_cfg, best


def best_of(cands: Iterable, trial: Callable[[object], float], budget: Budget) -> tuple[float, object]:
    """The fastest of `cands` (trial(cand) -> ms) tried before the budget is spent: (ms, cand), or
    (inf, None) when none ran."""
    best = (math.inf, None)
    for cand in cands:
        if budget.spent():
            break
        ms = _attempt(trial, cand, str(cand))
        if ms is not None:
            print(f"sweep {cand}: {ms:.3f} ms", flush=True)
            best = min(best, (ms, cand), key=lambda b: b[0])
    return best


# ------------------------------------------------------------------------------------------------------ CLI

def parser(module: str, doc: str, floors: bool = True, sweep_budget: Optional[float] = None
           ) -> argparse.ArgumentParser:
    """`python -m eval.<module>`: --out (runs/eval/<module>/<name>.md), the ceilings the floors use, --debug;
    with a sweep_budget (seconds) also --sweep, --budget and --skip-correctness."""
    ap = argparse.ArgumentParser(prog=f"python -m eval.{module}", description=doc,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_out_argument(ap, module, module.removeprefix("bench_"))
    if floors:
        ap.add_argument("--ceilings", default="auto", choices=["auto", "measure", *CEILINGS],
                        help="device rates of the floors: auto (by device name; measured for a GPU not in "
                             "eval/harness.py CEILINGS), measure (now, on this GPU) or a device's recorded ones")
        ap.add_argument("--copy-tbs", type=float, metavar="TB/S", help="copy bandwidth, read + write, for floors")
        ap.add_argument("--gemm-tflops", type=float, metavar="TFLOP/S", help="bf16 matmul rate for floors")
    if sweep_budget is not None:
        ap.add_argument("--sweep", action="store_true", help="time the tile settings of the module's SWEEP first")
        ap.add_argument("--budget", type=float, default=sweep_budget, metavar="SECONDS",
                        help="seconds from the start after which the sweep stops (default: %(default)s)")
        ap.add_argument("--skip-correctness", action="store_true", help="no check against the reference first")
    ap.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return ap


@dataclasses.dataclass
class Run:
    """One benchmark command under way: where its table goes, the ceilings its floors use, its sweep budget."""
    module: str
    out: str
    argv: list
    ceilings: Optional[Ceilings] = None
    budget: Optional[Budget] = None
    device: str = "cuda"

    def floor_ms(self, work: Work) -> float:
        return self.ceilings.floor_ms(work)[0]

    def ceiling_args(self) -> list[str]:
        """The ceilings options given on this command line, to hand on to the benchmarks it starts."""
        keep, out = ("--ceilings", "--copy-tbs", "--gemm-tflops"), []
        for i, a in enumerate(self.argv):
            if a.split("=")[0] in keep:
                out += [a] if "=" in a else self.argv[i:i + 2]
        return out

    def write(self, title: str, body: str, quiet: bool = False) -> str:
        """`--out`: title, device, torch, date, the command, the ceilings, then body; printed, path said (quiet:
        written only, e.g. the partial tables of a long run, so that a run cut short still leaves its rows)."""
        head = f"Floors at: {self.ceilings.describe()}.\n\n" if self.ceilings else ""
        md = write_result(self.out, title, torch.device(self.device), head + body, self.argv, f"eval.{self.module}")
        if not quiet:
            print(md, flush=True)
            print(f"wrote {self.out}")
        return md


def begin(module: str, args: argparse.Namespace, argv: Sequence[str]) -> Run:
    """After the command's own checks: --out writable, ceilings options positive, a CUDA GPU; resolve the
    ceilings when the parser has them, start the sweep budget's clock when it has one."""
    check_out(args.out)
    floors = hasattr(args, "ceilings")
    if floors:
        require_positive(copy_tbs=args.copy_tbs, gemm_tflops=args.gemm_tflops)
    require_cuda(f"eval.{module}")
    ceil = None
    if floors:
        ceil = resolve_ceilings(torch.cuda.get_device_name(), args.ceilings, args.copy_tbs, args.gemm_tflops,
                                measure_ceilings)
        print(f"floors at: {ceil.describe()}", flush=True)
    return Run(module, args.out, list(argv), ceil, Budget(args.budget) if hasattr(args, "budget") else None)


def main(module: str, doc: str, argv: Optional[Sequence[str]], bench: Callable[[argparse.Namespace, Run], object],
         options: Callable[[argparse.ArgumentParser], None] = lambda ap: None,
         validate: Callable[[argparse.Namespace], None] = lambda args: None, *, floors: bool = True,
         sweep_budget: Optional[float] = None) -> int:
    """The command line of a benchmark: parser (plus `options`), `validate` (the command's own checks, which
    raise ConfigError before any GPU work), begin, then bench(args, run), which writes with run.write and
    returns its exit status (None: 0)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = parser(module, doc, floors, sweep_budget)
    options(ap)
    args = ap.parse_args(argv)
    validate(args)
    return int(bench(args, begin(module, args, argv)) or 0)
