"""One training step of whole models, side by side: tokens/s, MFU, peak memory and where the step's time goes.

    python -m eval.bench_train                                   # ~370M models at seq 4096, micro-batch 8
    python -m eval.bench_train --size 125m --seq-len 16384 --micro-batch 2 --models hybrid transformer
    python -m eval.bench_train --out eval/results/train_speed.md # update the recorded results

Each model is a layout at the `--size` preset (see MODELS and SIZES), stepped exactly as `train.py`'s torch
engine steps it (training/engines.py TorchEngine: bf16 autocast, AdamW over training/optim.py's parameter
groups, gradient clipping), on random tokens of packed rows of one document. `hf-llama` is transformers'
LlamaForCausalLM of the transformer layout's shape (interop/native.py maps it), eager and `torch.compile`d,
stepped with the same optimizer settings and clipping. MFU counts 3x the layout's
forward FLOPs per token (hybrid/budget.py, attention included) against the dense bf16 peak (989 TFLOP/s on
H100/H200). The breakdown comes from the profiler over two steps: GPU kernel time by part (matmuls,
attention, SSD / selective scan, conv1d, norms, loss, optimizer, other) and the host gap (wall time the GPU
was idle). `--baseline REV --baseline-modules kernels.selective_scan.triton_scan` steps each model a second
time with those kernel modules as they were at git revision REV (eval/baseline.py), a row "MODEL at REV" beside
its own: a kernel change measured on the whole model, side by side in one process.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
import time
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from eval import harness
from eval.baseline import installed, module_at
from eval.plots import md_table
from hybrid.budget import budget
from hybrid.errors import ConfigError, cli
from hybrid.model import HybridLM
from hybrid.spec import Layout
from training.config import TrainConfig
from training.metrics import peak_flops
from training.optim import param_groups

# model name -> (layout file, layers pattern); sizes come from SIZES
MODELS = {
    "hybrid": ("transformer", "[M2 M2 M2 Ag M2 M2 M2 M2] x {r}"),
    "mamba2": ("transformer", "M2:none x {m2}"),
    "mamba1-hybrid": ("transformer", "[M1 M1 M1 M1 Ag M1 M1 M1] x {r}"),
    "transformer": ("transformer", "Ag x {t}"),
    # the hybrid with every other MLP (the odd layers, as Jamba) a mixture of 8 SwiGLU experts of the dense
    # d_ff, top-2 softmax routing, dropless; MFU counts the active parameters (hybrid/budget.py)
    "hybrid-moe": ("transformer", "[M2 M2 M2 Ag M2 M2 M2 M2] x {r}"),
}
# extra dotlist overrides of a model, after the size's
MODEL_OVER = {
    "hybrid-moe": ["defaults.mlp.moe_every=2", "defaults.mlp.moe_offset=1", "defaults.mlp.n_experts=8",
                   "defaults.mlp.top_k=2", "defaults.mlp.router=softmax", "defaults.mlp.aux_loss_weight=0.001"],
}
# size -> pattern repeats and dotlist overrides (d_model, heads, MLP width), ~125M and ~370M with a 32K vocab
SIZES = {
    "tiny": dict(r=1, m2=4, t=2, over=["model.d_model=64", "defaults.attention.n_heads=4", "defaults.mlp.d_ff=128",
                                       "defaults.mamba2.headdim=16", "defaults.mamba2.d_state=16",
                                       "defaults.mamba2.chunk_size=16", "model.vocab_size=512"]),
    "125m": dict(r=2, m2=24, t=14, over=["model.d_model=768", "defaults.attention.n_heads=12"]),
    "370m": dict(r=3, m2=48, t=24, over=["model.d_model=1024", "defaults.attention.n_heads=16",
                                         "defaults.mlp.d_ff=2816"]),
}
PARTS = [  # (part, substrings of CUDA kernel names, lower case), first match wins: our Triton kernels are named
    # after their op (kernels/*/triton_*.py); FlexAttention's compiled kernels are inductor templates (triton_tem)
    ("optimizer", ("adam", "multi_tensor", "foreach")),
    ("conv1d", ("conv1d", "conv_step")),
    ("selective scan", ("selective_scan", "selective_step")),
    ("ssd scan", ("ssd_step", "chunk_state_kernel", "chunk_out_kernel", "log_decays_kernel", "carry_fwd_kernel",
                  "carry_bwd_kernel", "cb_kernel", "bwd_dsl_kernel", "bwd_dx_kernel", "bwd_dbdc_kernel")),
    ("attention", ("flash", "fmha", "attention", "flex", "triton_tem", "decode_partial", "_rope")),
    ("norms", ("rmsnorm", "rms_norm", "layer_norm")),
    ("loss", ("log_softmax", "softmax", "nll", "cross_entropy", "_ce_rows")),
    ("swiglu", ("swiglu", "silu")),
    ("matmul", ("gemm", "xmma", "cutlass", "matmul", "nvjet", "_proj_kernel")),
    ("moe routing", ("topk", "sort", "histc", "bincount", "cumsum", "index")),
    ("compiled elementwise", ("triton_poi", "triton_red", "triton_per")),
]


def model_layout(name: str, size: str) -> Layout:
    from eval.sizing import sized_layout
    file, pattern = MODELS[name]
    s = SIZES[size]
    return sized_layout(f"{file}:{pattern.format(**s)}", s["over"] + MODEL_OVER.get(name, []))


@dataclass
class StepResult:
    model: str
    params: int
    tokens_per_s: float
    mfu: Optional[float]
    peak_gib: Optional[float]
    step_ms: float
    parts_ms: dict


def part_of(kernel: str) -> str:
    k = kernel.lower()
    return next((part for part, keys in PARTS if any(s in k for s in keys)), "other")


def idle_before(kernels, min_us: float = 2.0) -> dict:
    """GPU idle time attributed to the kernel that ended each idle stretch: {kernel name: (microseconds, count)}
    from (start_us, end_us, name) kernel intervals. A kernel that waited long for the GPU to be free of work
    is the one the host launched late, so the names with the most idle before them say where the host is slow.
    Overlapping kernels (several streams) count no idle; stretches under min_us are the GPU's own launch
    spacing and are left out."""
    out: dict = {}
    busy_until = None
    for start, end, name in sorted(kernels):
        if busy_until is not None and start - busy_until >= min_us:
            us, n = out.get(name, (0.0, 0))
            out[name] = (us + start - busy_until, n + 1)
        busy_until = end if busy_until is None else max(busy_until, end)
    return out


def _print_gaps(prof, steps: int, top: int) -> None:
    kernels = [(ev.time_range.start, ev.time_range.end, ev.name) for ev in prof.events()
               if ev.device_type == torch.autograd.DeviceType.CUDA and ev.time_range.end > ev.time_range.start
               and "#" not in ev.name and not ev.name.startswith("ProfilerStep")
               and not getattr(ev, "is_user_annotation", False)]
    gaps = sorted(((us / steps, n // steps, name) for name, (us, n) in idle_before(kernels).items()), reverse=True)
    total = sum(g[0] for g in gaps)
    print(f"  GPU idle {total / 1e3:.2f} ms per step (profiled), by the kernel that ended the wait:", flush=True)
    for us, n, name in gaps[:top]:
        print(f"  {us / 1e3:8.2f} ms  x{n:<4d} {part_of(name):<14s} {name[:110]}", flush=True)


def host_profile(step, device: torch.device, top: int) -> None:
    """Where the host's time goes in one step (cProfile, one synchronized step): the `top` functions by their
    own time and by cumulative time. cProfile slows Python calls, so read it for proportions."""
    import cProfile
    import pstats
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    pr = cProfile.Profile()
    pr.enable()
    step()
    sync()
    pr.disable()
    for key in ("tottime", "cumulative"):
        print(f"  host profile of one step by {key}:", flush=True)
        pstats.Stats(pr, stream=sys.stdout).sort_stats(key).print_stats(top)


def breakdown(step, device: torch.device, step_ms: float, steps: int = 2, top: int = 0, gaps: int = 0) -> dict:
    """GPU kernel milliseconds per part for one step (mean of `steps` profiled steps), plus 'host gap' = the
    unprofiled step time `step_ms` less the GPU's busy time (the profiler slows the host, not the kernels).
    top: also print the `top` kernels by GPU time with their part; gaps: the `gaps` kernels with the most GPU
    idle time before them (`idle_before`)."""
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        sync()
        wall = (time.perf_counter() - t0) * 1e3 / steps
    parts: dict = {}
    if device.type != "cuda":
        return {"host (CPU)": wall}
    kernels = []
    for ev in prof.key_averages():
        gpu_us = getattr(ev, "self_device_time_total", 0) or getattr(ev, "self_cuda_time_total", 0)
        # a record_function range (e.g. "Optimizer.step#AdamW.step") is also reported on the GPU timeline,
        # spanning kernels that are counted on their own: not a kernel
        annotation = getattr(ev, "is_user_annotation", False) or "#" in ev.key or ev.key.startswith("ProfilerStep")
        if gpu_us and ev.device_type == torch.autograd.DeviceType.CUDA and not annotation:
            parts[part_of(ev.key)] = parts.get(part_of(ev.key), 0.0) + gpu_us / 1e3 / steps
            kernels.append((gpu_us / 1e3 / steps, ev.count // steps, ev.key))
    for ms, n, key in sorted(kernels, reverse=True)[:top]:
        print(f"  {ms:8.2f} ms  x{n:<4d} {part_of(key):<14s} {key[:110]}", flush=True)
    if gaps:
        _print_gaps(prof, steps, gaps)
    parts["host gap"] = max(0.0, step_ms - sum(parts.values()))
    return parts


def batches(vocab: int, micro_batch: int, seq_len: int, device: torch.device):
    ids = torch.randint(0, vocab, (micro_batch, seq_len + 1), device=device)
    seq_idx = torch.zeros(micro_batch, seq_len, dtype=torch.int32, device=device)
    return [(ids[:, :-1], ids[:, 1:].contiguous(), seq_idx)]


def ours(layout: Layout, device: torch.device, bf16: bool):
    """(model, step(micro_batches)) of train.py's torch engine, as it is."""
    from training.engines import TorchEngine
    cfg = TrainConfig()
    engine = TorchEngine(HybridLM(layout), cfg, device, bf16)
    return engine.model, lambda micro: engine.train_step(micro, cfg.lr)


def hf_llama(layout: Layout, device: torch.device, bf16: bool, compiled: bool):
    """transformers' LlamaForCausalLM of the transformer layout's shape, stepped like ours."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from hybrid.layout import layout_to_dict
    from interop import native
    config = native.TARGETS["llama"]["config"](layout_to_dict(layout))
    model = LlamaForCausalLM(LlamaConfig(**config)).to(device)
    fwd = torch.compile(model) if compiled else model
    cfg = TrainConfig()
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)

    def step(micro):
        for ids, targets, _ in micro:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                logits = fwd(input_ids=ids).logits
            loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model, step


def measure(name: str, layout: Layout, micro_batch: int, seq_len: int, device: torch.device,
            steps: int = 5, warmup: int = 2, top: int = 0, profile: bool = True, gaps: int = 0,
            host: int = 0) -> StepResult:
    bf16 = device.type == "cuda"
    if name.startswith("hf-llama"):
        model, step = hf_llama(layout, device, bf16, compiled=name.endswith("compiled"))
    else:
        model, step = ours(layout, device, bf16)
    micro = batches(layout.model.vocab_size, micro_batch, seq_len, device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(warmup):
        step(micro)
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        step(micro)
    sync()
    step_ms = (time.perf_counter() - t0) * 1e3 / steps
    tps = micro_batch * seq_len / (step_ms / 1e3)
    peak = peak_flops(TrainConfig(), device)  # the peak train.py's MFU uses
    mfu = tps * 3 * budget(layout, seq_len).flops_per_token / peak if peak else None
    mem = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None
    if top:
        print(f"{name}: top kernels of one step at seq {seq_len} x {micro_batch}", flush=True)
    parts = breakdown(lambda: step(micro), device, step_ms, top=top, gaps=gaps) if profile else {}
    if host:
        host_profile(lambda: step(micro), device, host)
    params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    return StepResult(name, params, tps, mfu, mem, step_ms, parts)


def table(results: Sequence[StepResult], seq_len: int, micro_batch: int) -> str:
    order = [q for q, _ in PARTS] + ["other", "host gap"]  # a fixed column order (a set's is not)
    parts = sorted({p for r in results for p in r.parts_ms}, key=lambda p: order.index(p) if p in order else len(order))
    rows = []
    for r in results:
        rows.append([r.model, f"{r.params / 1e6:.0f}M", f"{r.tokens_per_s:,.0f}",
                     "-" if r.mfu is None else f"{100 * r.mfu:.1f}%",
                     "-" if r.peak_gib is None else f"{r.peak_gib:.1f}", f"{r.step_ms:.1f}"]
                    + [f"{r.parts_ms.get(p, 0.0):.1f}" for p in parts])
    head = ["model", "params", "tokens/s", "MFU", "peak GiB", "step ms"] + [f"{p} ms" for p in parts]
    return f"seq_len {seq_len}, micro-batch {micro_batch}\n\n" + md_table(head, rows)


NOTE = "\n\nSee the module docstring of eval/bench_train.py for what each column counts."


def run_all(args, device: torch.device, partial=lambda body: None) -> str:
    """The tables of every seq_len; partial(body) gets the tables so far after each model (a run cut short
    keeps its finished rows)."""
    out = []
    for seq_len in args.seq_len:
        results = []
        for name in args.models:
            layout = model_layout("transformer" if name.startswith("hf-llama") else name, args.size)
            for rev in [""] + ([args.baseline] if args.baseline else []):  # "": today's kernels
                with installed(rev, args.baseline_modules) if rev else contextlib.nullcontext():
                    try:
                        r = measure(name, layout, args.micro_batch, seq_len, device, args.steps, top=args.top,
                                    profile=not args.no_profile, gaps=args.gaps, host=args.host)
                        results.append(dataclasses.replace(r, model=f"{name} at {rev}") if rev else r)
                    except torch.OutOfMemoryError:
                        print(f"{name} at seq {seq_len} x {args.micro_batch}: out of memory", flush=True)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                if results:
                    print(table(results[-1:], seq_len, args.micro_batch), flush=True)
                    partial("\n\n".join(out + [table(results, seq_len, args.micro_batch)]))
        out.append(table(results, seq_len, args.micro_batch))
    return "\n\n".join(out)


CHOICES = [*MODELS, "hf-llama", "hf-llama-compiled"]


def options(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--models", nargs="+", default=CHOICES, choices=CHOICES, metavar="MODEL",
                    help=f"models to step (default: all of {', '.join(CHOICES)})")
    ap.add_argument("--size", default="370m", choices=list(SIZES), help="size preset (default: %(default)s)")
    ap.add_argument("--seq-len", type=int, nargs="+", default=[4096], help="sequence lengths (default: 4096)")
    ap.add_argument("--micro-batch", type=int, default=8, help="rows per step (default: %(default)s)")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per model (default: %(default)s)")
    ap.add_argument("--no-profile", action="store_true",
                    help="skip the profiled steps and the per-part columns (quicker, e.g. at long seq_len)")
    ap.add_argument("--top", type=int, default=0, metavar="N",
                    help="also print each model's N slowest kernels of a step (GPU time), with their part")
    ap.add_argument("--gaps", type=int, default=0, metavar="N",
                    help="also print the N kernels with the most GPU idle time before them (where the host is late)")
    ap.add_argument("--baseline", default="", metavar="REV",
                    help="also step each model with the --baseline-modules as they were at this git revision "
                         "(a row 'MODEL at REV' beside each model's)")
    ap.add_argument("--baseline-modules", nargs="+", default=[], metavar="MODULE",
                    help="the kernel modules --baseline takes from REV, e.g. kernels.selective_scan.triton_scan")
    ap.add_argument("--host", type=int, default=0, metavar="N",
                    help="also print a cProfile of one step's host time: the N costliest functions")


def validate(args) -> None:
    for key in ("micro_batch", "steps"):
        if getattr(args, key) < 1:
            raise ConfigError(f"--{key.replace('_', '-')} {getattr(args, key)}: expected an integer >= 1")
    if any(s < 1 for s in args.seq_len):
        raise ConfigError(f"--seq-len {args.seq_len}: expected integers >= 1")
    if bool(args.baseline) != bool(args.baseline_modules):
        raise ConfigError("--baseline REV and --baseline-modules MODULE ... go together: the revision and the kernel "
                          "modules to take from it")
    for name in args.baseline_modules:  # each exists at REV (ConfigError naming it) before any GPU work
        module_at(args.baseline, name)


def bench(args, run: harness.Run) -> int:
    title = "Training step of whole models"
    body = run_all(args, torch.device("cuda"), lambda part: run.write(title, part + NOTE, quiet=True))
    run.write(title, body + NOTE)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return harness.main("bench_train", __doc__, argv, bench, options, validate, floors=False)


if __name__ == "__main__":
    sys.exit(cli(main))
