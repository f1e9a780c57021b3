"""Pretraining loop behind train.py: config, data shards, plain-PyTorch or DeepSpeed ZeRO engine, logging,
checkpoints and exact resume.

One loop serves both engines. `TorchEngine` (CPU, or one GPU without DeepSpeed) is AdamW with fp32 weights
(bf16 autocast on request). `DeepSpeedEngine` runs ZeRO stage 1/2/3 with bf16 weights and fp32 master copies;
it is used under the `deepspeed` launcher, or with train.engine=deepspeed. Both take the learning rate from
`lr_at(step)` and clip the global gradient norm, so a run's schedule does not depend on the engine.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from . import checkpoint as ckpt
from .errors import CheckpointError, ConfigError, DataError
from .data import TokenStream, default_corpus, load_texts, packed_batch, random_starts, split_documents
from .model import HybridLM, lm_loss
from .tokenizer import Tokenizer

NO_DECAY = ("A_log", "D", "dt_bias", "bias", "weight_norm", "norm.weight", "norm_weight")
# dense bf16 tensor-core peaks used for MFU (datasheet, no sparsity); override with train.peak_tflops
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0,
               "B200": 2250.0}


def _opt(default, help: str):
    """A TrainConfig field with its help line (listed by `train.py --help`)."""
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    # run length: `tokens` (if set) overrides `steps`
    steps: int = _opt(120, "optimizer steps")
    tokens: Optional[int] = _opt(None, "train this many tokens instead (overrides steps)")
    # batch: micro_batch rows of seq_len tokens per rank, grad_accum micro-batches per step
    micro_batch: int = _opt(4, "rows per micro-batch per rank")
    grad_accum: int = _opt(1, "micro-batches per optimizer step")
    seq_len: int = _opt(256, "tokens per row (documents are packed across rows' boundaries)")
    # optimizer: AdamW(betas 0.9/0.95), linear warmup then cosine to lr * min_lr_ratio
    lr: float = _opt(2e-3, "peak learning rate (AdamW, betas 0.9/0.95)")
    min_lr_ratio: float = _opt(0.1, "cosine decay ends at lr * min_lr_ratio")
    warmup: int = _opt(10, "linear warm-up steps")
    weight_decay: float = _opt(0.1, "on matrices only (never norms, biases, A_log, D, dt_bias)")
    clip: float = _opt(1.0, "global gradient-norm clipping")
    seed: int = _opt(0, "model init, data order and sampling")
    # engine: auto = deepspeed under the deepspeed launcher, else torch
    engine: str = _opt("auto", "auto | torch | deepspeed (auto: deepspeed under the deepspeed launcher)")
    precision: str = _opt("auto", "auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16")
    zero_stage: int = _opt(2, "DeepSpeed ZeRO stage 0-3")
    activation_checkpointing: bool = _opt(False, "recompute each layer in backward")
    # data and tokenizer
    data: Optional[str] = _opt(None, ".jsonl ({\"text\": ...} per line) / .txt / directory; unset: the embedded corpus")
    tokenizer: Optional[str] = _opt(None, "a sentencepiece .model; unset: train one on the training split")
    tokenizer_type: str = _opt("bpe", "bpe | unigram, when training one")
    heldout_fraction: float = _opt(0.05, "documents held out for evaluation")
    # outputs
    out_dir: str = _opt("runs/${name}", "run directory: checkpoints, metrics.jsonl, tokenizer, data shards")
    log_every: int = _opt(10, "steps between log lines")
    eval_every: int = _opt(40, "steps between held-out evaluations")
    eval_batches: int = _opt(8, "micro-batches per held-out evaluation")
    save_every: int = _opt(100, "steps between checkpoints (also at the end; 0: only at the end)")
    keep_checkpoints: int = _opt(2, "newest complete checkpoints kept (0: all)")
    resume: str = _opt("auto", "auto (newest checkpoint in out_dir, if any) | never | <checkpoint dir>")
    init_from: Optional[str] = _opt(None, "start a new run from these weights: a checkpoint dir or .safetensors "
                                          "(optimizer starts fresh)")
    tensorboard: bool = _opt(True, "tensorboard scalars when the package is installed")
    peak_tflops: Optional[float] = _opt(None, "device peak for MFU (default: known GPUs' dense bf16 peak)")
    sample_prompt: str = _opt("The", "prompt of the sample printed at the end")
    sample_tokens: int = _opt(64, "length of that sample (0: none)")
    threads: int = _opt(0, "torch CPU threads (0: torch's default)")


def train_keys_help() -> str:
    """One line per `train.*` key: name, default and what it does (the `train.py --help` epilog)."""
    lines = []
    for f in dataclasses.fields(TrainConfig):
        d = f.default
        shown = "" if d is None else str(d).lower() if isinstance(d, bool) else repr(d) if isinstance(d, str) and \
            d != d.strip() else d
        lines.append(f"  train.{f.name}={shown}".ljust(34) + f"  {f.metadata['help']}")
    return "\n".join(lines)


@dataclass
class RunConfig:
    name: str = "run"
    train: TrainConfig = field(default_factory=TrainConfig)


def check(cfg: TrainConfig) -> None:
    def bad(key, value, allowed):
        raise ConfigError(f"train.{key}={value!r}: expected {allowed}")
    if cfg.engine not in ("auto", "torch", "deepspeed"):
        bad("engine", cfg.engine, "auto, torch or deepspeed")
    if cfg.precision not in ("auto", "fp32", "bf16"):
        bad("precision", cfg.precision, "auto, fp32 or bf16")
    if cfg.zero_stage not in (0, 1, 2, 3):
        bad("zero_stage", cfg.zero_stage, "0, 1, 2 or 3")
    if cfg.tokenizer_type not in ("bpe", "unigram"):
        bad("tokenizer_type", cfg.tokenizer_type, "bpe or unigram")
    for key in ("micro_batch", "grad_accum", "seq_len", "log_every", "eval_every", "eval_batches"):
        if getattr(cfg, key) < 1:
            bad(key, getattr(cfg, key), "an integer >= 1")
    if cfg.steps < 0 or cfg.warmup < 0 or cfg.save_every < 0 or cfg.keep_checkpoints < 0:
        raise ConfigError("train.steps, train.warmup, train.save_every and train.keep_checkpoints must be >= 0")
    if not 0 < cfg.heldout_fraction < 1:
        bad("heldout_fraction", cfg.heldout_fraction, "a fraction in (0, 1)")


def lr_at(step: int, cfg: TrainConfig, total: int) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, total - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices (embeddings included, the GPT convention); never on norms, biases, conv biases
    or A_log / D / dt_bias. Tied weights appear once."""
    decay, no_decay = [], []
    seen = set()
    for name, p in model.named_parameters():
        if id(p) in seen:  # tied weights
            continue
        seen.add(id(p))
        (no_decay if p.ndim < 2 or name.endswith(NO_DECAY) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# ---------------------------------------------------------------------------------------------- distributed

def world() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from the launcher's environment (1 process when absent)."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def launched_by_deepspeed() -> bool:
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


# ---------------------------------------------------------------------------------------------------- engines

class TorchEngine:
    """AdamW on plain PyTorch: fp32 weights, optional bf16 autocast, gradient accumulation and clipping."""
    name = "torch"

    def __init__(self, model: HybridLM, cfg: TrainConfig, device: torch.device, bf16: bool):
        self.model, self.cfg, self.device, self.bf16 = model.to(device), cfg, device, bf16
        self.opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def train_step(self, micro_batches, lr: float) -> tuple[float, float]:
        """One optimizer step over the micro-batches. Returns (mean loss, grad norm before clipping)."""
        for g in self.opt.param_groups:
            g["lr"] = lr
        total = 0.0
        for ids, targets, seq_idx in micro_batches:
            with self.autocast():
                loss = lm_loss(self.model(ids, seq_idx=seq_idx), targets)
            (loss / len(micro_batches)).backward()
            total += loss.item()
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return total / len(micro_batches), float(norm)

    def save(self, path: str) -> None:
        ckpt.save_model(self.model, os.path.join(path, "model.safetensors"))
        torch.save(self.opt.state_dict(), os.path.join(path, "optimizer.pt"))

    def load(self, path: str) -> None:
        ckpt.load_model(self.model, os.path.join(path, "model.safetensors"))
        self.opt.load_state_dict(ckpt.load_torch(os.path.join(path, "optimizer.pt"), map_location=self.device))


class DeepSpeedEngine:
    """DeepSpeed ZeRO (stage 1/2/3): bf16 weights with fp32 master copies, or fp32."""
    name = "deepspeed"

    def __init__(self, model: HybridLM, cfg: TrainConfig, device: torch.device, bf16: bool,
                 user_config: Optional[str] = None, universal: Optional[str] = None):
        """universal: a universal checkpoint directory (see `universal_checkpoint`) that `load` reads instead of
        the ZeRO partitions, for a resume on another number of ranks."""
        import deepspeed
        self.cfg, self.device, self.bf16, self.universal = cfg, device, bf16, universal
        if cfg.zero_stage == 3:  # ZeRO-3 flattens all parameters into one dtype
            model.keep_fp32_ssm_params(False)
        ds_config = self.config(cfg, bf16) if user_config is None else _read_user_config(user_config, cfg)
        if universal:
            ds_config = {**ds_config, "checkpoint": {**ds_config.get("checkpoint", {}), "load_universal": True}}
        self.ds_config = ds_config
        self.engine, self.opt, _, _ = deepspeed.initialize(
            model=model, model_parameters=param_groups(model, cfg.weight_decay), config=ds_config)
        self.model = self.engine.module

    @staticmethod
    def config(cfg: TrainConfig, bf16: bool) -> dict:
        """The DeepSpeed JSON generated from the train section."""
        return {
            "train_micro_batch_size_per_gpu": cfg.micro_batch,
            "gradient_accumulation_steps": cfg.grad_accum,
            "gradient_clipping": cfg.clip,
            "bf16": {"enabled": bf16},
            "zero_optimization": {"stage": cfg.zero_stage, "overlap_comm": True, "contiguous_gradients": True},
            "optimizer": {"type": "AdamW", "params": {"lr": cfg.lr, "betas": [0.9, 0.95], "eps": 1e-8,
                                                      "weight_decay": cfg.weight_decay,
                                                      # torch's AdamW: DeepSpeed's FusedAdam needs nvcc at run time
                                                      "torch_adam": True}},
            "steps_per_print": 10 ** 9,
            "wall_clock_breakdown": False,
        }

    def autocast(self):
        return torch.autocast(self.device.type, enabled=False)

    def train_step(self, micro_batches, lr: float) -> tuple[float, float]:
        for g in self.opt.param_groups:
            g["lr"] = lr
        total = 0.0
        for ids, targets, seq_idx in micro_batches:
            loss = lm_loss(self.engine(ids, seq_idx=seq_idx), targets)
            self.engine.backward(loss)
            self.engine.step()  # applies the update at the accumulation boundary
            total += loss.item()
        norm = self.engine.get_global_grad_norm()
        loss = torch.tensor(total / len(micro_batches), device=self.device)
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            torch.distributed.all_reduce(loss)  # the logged loss is the mean over all ranks' batches
            loss /= torch.distributed.get_world_size()
        return float(loss), float(norm) if norm is not None else float("nan")

    def save(self, path: str) -> None:
        # the marker DeepSpeed's universal-checkpoint converter asks of its clients (no tensor-parallel layout)
        self.engine.save_checkpoint(os.path.join(path, "zero"), tag="zero",
                                    client_state={"universal_checkpoint_info": {"universal_checkpoint_version": 0.2}})

    def load(self, path: str) -> None:
        where = self.universal or os.path.join(path, "zero")
        if not os.path.isdir(os.path.join(where, "zero")):
            raise CheckpointError(f"{where}: missing (a DeepSpeed checkpoint keeps its ZeRO partitions there)")
        loaded, _ = self.engine.load_checkpoint(where, tag="zero")
        if loaded is None:  # DeepSpeed only warns when it finds nothing to load
            raise CheckpointError(f"{where}: DeepSpeed could not load this checkpoint; is it complete?")


def universal_checkpoint(checkpoint: str, out_dir: str, main_rank: bool) -> str:
    """DeepSpeed's universal form of a ZeRO checkpoint (per-parameter fp32 weights and optimizer moments, not
    tied to a number of ranks), converted once by rank 0 into out_dir/universal/<step dir>/ and reused.
    Returns the directory that `load_checkpoint(..., tag="zero")` reads."""
    import shutil
    import subprocess
    root = os.path.join(out_dir, "universal", os.path.basename(os.path.normpath(checkpoint)))
    if main_rank and not os.path.exists(os.path.join(root, "zero", "mp_rank_00_model_states.pt")):
        tmp = root + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)   # left by a conversion that was killed
        workers = str(max(1, min(8, os.cpu_count() or 1)))
        cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
               "--input_folder", os.path.join(checkpoint, "zero", "zero"), "--output_folder", os.path.join(tmp, "zero"),
               "--inject_missing_state", "--num_extract_workers", workers, "--num_merge_workers", workers]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"converting {checkpoint} to a universal checkpoint failed:\n{proc.stderr[-3000:]}")
        shutil.rmtree(root, ignore_errors=True)  # an incomplete one (no model states file)
        os.replace(tmp, root)
    barrier()
    return root


def _read_user_config(path: str, cfg: TrainConfig) -> dict:
    with open(path) as f:
        user = json.load(f)
    mb = user.get("train_micro_batch_size_per_gpu", cfg.micro_batch)
    ga = user.get("gradient_accumulation_steps", cfg.grad_accum)
    if (mb, ga) != (cfg.micro_batch, cfg.grad_accum):
        raise ConfigError(f"--deepspeed_config {path}: micro batch {mb} x accumulation {ga} disagrees with "
                          f"train.micro_batch={cfg.micro_batch} train.grad_accum={cfg.grad_accum}")
    return user


# ------------------------------------------------------------------------------------------------------ data

def prepare_data(cfg: TrainConfig, vocab_size: int, out_dir: str, rank: int):
    """Tokenizer (trained on the training split when none is given) and memory-mapped train / held-out token
    shards under <out_dir>/data, built once by rank 0 and reused while corpus and tokenizer are unchanged."""
    docs = load_texts(cfg.data) if cfg.data else default_corpus()
    docs_train, docs_held = split_documents(docs, cfg.heldout_fraction, cfg.seed)
    tok_path = cfg.tokenizer or os.path.join(out_dir, "tokenizer.model")
    if cfg.tokenizer is not None and not os.path.isfile(cfg.tokenizer):
        raise ConfigError(f"train.tokenizer={cfg.tokenizer}: no such file (a sentencepiece .model; leave it unset "
                          "to train one)")
    if rank == 0 and cfg.tokenizer is None and not os.path.exists(tok_path):
        print(f"training a {vocab_size}-piece sentencepiece {cfg.tokenizer_type} tokenizer -> {tok_path}", flush=True)
        os.makedirs(out_dir, exist_ok=True)
        try:
            Tokenizer.train(docs_train, vocab_size, tok_path, model_type=cfg.tokenizer_type)
        except RuntimeError as e:  # sentencepiece reports a corpus it cannot learn from as RuntimeError
            raise DataError(f"{'train.data=' + cfg.data if cfg.data else 'the corpus'}: cannot train a tokenizer on "
                            f"it ({str(e).strip()})") from None
    barrier()
    tok = Tokenizer(tok_path)
    with open(tok_path, "rb") as f:
        key = hashlib.sha256(f.read() + repr((cfg.data, cfg.heldout_fraction, cfg.seed, len(docs))).encode())
    key.update("\0".join(docs[:64]).encode())
    data_dir = os.path.join(out_dir, "data", key.hexdigest()[:12])
    streams = {}
    for split, split_docs in (("train", docs_train), ("heldout", docs_held)):
        path = os.path.join(data_dir, split)
        if rank == 0 and not TokenStream.exists(path):
            TokenStream.from_docs(_encode(tok, split_docs, split), tok.eos_id).save(path, tok.vocab_size)
        barrier()
        streams[split] = TokenStream.load(path, tok.vocab_size)
    return tok, tok_path, streams["train"], streams["heldout"]


def _encode(tok: Tokenizer, docs: list[str], split: str) -> list[list[int]]:
    try:
        from tqdm import tqdm
    except ImportError:
        return tok.encode_batch(docs)
    batch = 64
    out: list[list[int]] = []
    for i in tqdm(range(0, len(docs), batch), desc=f"tokenizing {split}", unit_scale=batch, unit="doc",
                  disable=not sys.stderr.isatty()):
        out += tok.encode_batch(docs[i:i + batch])
    return out


# ------------------------------------------------------------------------------------------------------ loop

@torch.no_grad()
def evaluate(model: HybridLM, stream: TokenStream, cfg: TrainConfig, device, autocast) -> float:
    """Mean loss over fixed, evenly spaced windows of the held-out stream (the same every time)."""
    was_training = model.training
    model.eval()
    seq_len = min(cfg.seq_len, len(stream) - 2)
    starts = np.linspace(0, len(stream) - seq_len - 2, cfg.eval_batches * cfg.micro_batch).astype(np.int64)
    losses = []
    for chunk in np.array_split(starts, cfg.eval_batches):
        ids, targets, seq_idx = (t.to(device) for t in packed_batch(stream, chunk, seq_len))
        with autocast():
            losses.append(lm_loss(model(ids, seq_idx=seq_idx), targets).item())
    model.train(was_training)
    return float(np.mean(losses))


class Metrics:
    """metrics.jsonl always; tensorboard scalars when the package is installed (rank 0 only)."""

    def __init__(self, out_dir: str, enabled: bool, tensorboard: bool, from_step: int = 0):
        """from_step: the step this run starts at; rows a previous run logged at or after it (the work lost
        since its last checkpoint, which this run redoes) are dropped so each step appears once."""
        self.enabled, self.tb = enabled, None
        if not enabled:
            return
        os.makedirs(out_dir, exist_ok=True)
        path = os.path.join(out_dir, "metrics.jsonl")
        self._drop_rows_from(path, from_step)
        self.file = open(path, "a")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(os.path.join(out_dir, "tensorboard"), purge_step=from_step or None)
            except ImportError:
                pass

    @staticmethod
    def _drop_rows_from(path: str, from_step: int) -> None:
        if not os.path.exists(path):
            return
        with open(path) as f:
            lines = f.readlines()
        kept = []
        for line in lines:
            try:
                if json.loads(line)["step"] < from_step:
                    kept.append(line)
            except (ValueError, KeyError, TypeError):  # a row cut short by a kill
                continue
        if len(kept) != len(lines):
            with open(path + ".tmp", "w") as f:
                f.writelines(kept)
            os.replace(path + ".tmp", path)

    def log(self, step: int, **scalars) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps({"step": step, **scalars}) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.tb is not None:
                self.tb.close()


def peak_flops(cfg: TrainConfig, device: torch.device) -> Optional[float]:
    if cfg.peak_tflops:
        return cfg.peak_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v * 1e12 for k, v in PEAK_TFLOPS.items() if k in name), None)


def fmt_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def run(layout, run_cfg: RunConfig, *, layout_path: str, deepspeed_config: Optional[str] = None,
        on_step=None) -> dict:
    """Train. Returns a summary dict (losses per step, final held-out loss, tokenizer, checkpoint path, model).
    on_step(step) is called after each step's logging, eval and save (tests use it to interrupt a run)."""
    cfg = run_cfg.train
    check(cfg)
    rank, local_rank, world_size = world()
    use_ds = cfg.engine == "deepspeed" or (cfg.engine == "auto" and (launched_by_deepspeed() or deepspeed_config))
    if use_ds:
        import deepspeed
        if not launched_by_deepspeed():  # a single process started without the launcher
            for k, v in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                             MASTER_PORT=os.environ.get("MASTER_PORT", "29500")).items():
                os.environ.setdefault(k, v)
        deepspeed.init_distributed()
        rank, local_rank, world_size = world()
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out_dir = cfg.out_dir
    main_rank = rank == 0
    say = print if main_rank else (lambda *a, **k: None)

    tok, tok_path, train, held = prepare_data(cfg, int(layout.model.vocab_size), out_dir, rank)
    if tok.vocab_size != layout.model.vocab_size:
        # the embedding and head follow the tokenizer: a smaller corpus yields fewer pieces than asked for, and
        # ids past the tokenizer's last piece could never be trained, yet sampling would draw them
        say(f"model.vocab_size {layout.model.vocab_size} -> {tok.vocab_size}, the size of tokenizer {tok_path}",
            flush=True)
        layout = dataclasses.replace(layout, model=dataclasses.replace(layout.model, vocab_size=tok.vocab_size))
    # seeds: the model init is the same on every rank; the data sampler differs per rank
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    model = HybridLM(layout)
    model.activation_checkpointing = cfg.activation_checkpointing
    rows_per_step = cfg.micro_batch * cfg.grad_accum * world_size
    total = cfg.steps if cfg.tokens is None else math.ceil(cfg.tokens / (rows_per_step * cfg.seq_len))
    if cfg.init_from:
        weights = cfg.init_from if cfg.init_from.endswith(".safetensors") else \
            os.path.join(cfg.init_from, "model.safetensors")
        if not os.path.exists(weights):
            raise ConfigError(f"train.init_from={cfg.init_from}: no {weights}")
        ckpt.load_model(model, weights)
        say(f"initialized from {weights}", flush=True)
    n_params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())  # before ZeRO-3 partitions
    ckpt_root = os.path.join(out_dir, "checkpoints")
    step, tokens = 0, 0
    resume_from, meta = None, None
    if cfg.resume == "auto":
        resume_from = ckpt.latest(ckpt_root)
    elif cfg.resume != "never":
        resume_from = cfg.resume
        if not os.path.exists(os.path.join(resume_from, "trainer.json")):
            raise ConfigError(f"train.resume={resume_from}: not a complete checkpoint (no trainer.json)")
    if resume_from:
        meta = ckpt.read_json(os.path.join(resume_from, "trainer.json"))
    # another number of ranks than the checkpoint's: weights and optimizer state carry over (DeepSpeed through
    # its universal checkpoint; the torch engine's optimizer file is whole), the data order cannot
    regrouped = meta is not None and meta["world_size"] != world_size
    if meta is not None and not regrouped and meta.get("engine") != ("deepspeed" if use_ds else "torch"):
        raise ConfigError(f"{resume_from} was saved by the {meta.get('engine')} engine and this run uses the "
                          f"{'deepspeed' if use_ds else 'torch'} engine: set train.engine={meta.get('engine')} "
                          "to resume it, or train.init_from=<that checkpoint> to start a new run from its weights")
    universal = None
    if use_ds:
        if regrouped:
            if meta.get("engine") != "deepspeed":
                raise ConfigError(f"{resume_from} was saved by the {meta.get('engine')} engine on "
                                  f"{meta['world_size']} ranks; a DeepSpeed run on {world_size} ranks cannot "
                                  "read its optimizer state")
            say(f"{resume_from} was saved by {meta['world_size']} ranks, this run has {world_size}: converting "
                "it to DeepSpeed's universal checkpoint", flush=True)
            universal = universal_checkpoint(resume_from, out_dir, main_rank)
        engine = DeepSpeedEngine(model, cfg, device, bf16, deepspeed_config, universal=universal)
    else:
        engine = TorchEngine(model, cfg, device, bf16)
    rng = np.random.default_rng([cfg.seed, rank])
    from .budget import budget
    flops_per_token = 3 * budget(layout, cfg.seq_len).flops_per_token  # forward + backward (2x)
    peak = peak_flops(cfg, device)
    say(f"{layout.name}: {n_params / 1e6:.2f}M params, {layout.n_layers} layers | engine {engine.name}"
        f"{f' ZeRO-{cfg.zero_stage}' if use_ds else ''}, {'bf16' if bf16 else 'fp32'}, {world_size} x {device.type} | "
        f"corpus {len(train):,} train / {len(held):,} held-out tokens | {total} steps of "
        f"{rows_per_step} x {cfg.seq_len} tokens", flush=True)

    if resume_from:
        engine.load(resume_from)
        step, tokens = meta["step"], meta["tokens"]
        if regrouped:
            # each rank's sampler restarts from (seed, rank, step): deterministic, and not a replay of the
            # batches any rank drew from step 0
            rng = np.random.default_rng([cfg.seed, rank, step])
            saved_rows = meta["config"]["micro_batch"] * meta["config"]["grad_accum"] * meta["world_size"]
            say(f"resumed from {resume_from} at step {step} on {world_size} ranks (saved by {meta['world_size']}): "
                f"weights and optimizer state restored; the data order differs from a {meta['world_size']}-rank "
                f"run; global batch {saved_rows} -> {rows_per_step} rows"
                + ("" if saved_rows == rows_per_step else " (set train.grad_accum to keep it)"), flush=True)
        else:
            rng.bit_generator.state = meta["data_rng"][rank]
            state = ckpt.load_torch(os.path.join(resume_from, f"rng_rank{rank}.pt"))
            torch.set_rng_state(state["torch"])
            if state.get("cuda") is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state(state["cuda"], device)
            random.setstate(state["python"])
            say(f"resumed from {resume_from} at step {step}", flush=True)

    def save(at_step: int) -> str:
        tmp = None
        if main_rank:
            tmp = ckpt.begin(ckpt_root, at_step)
        holder = [tmp]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.broadcast_object_list(holder, src=0)
        tmp = holder[0]
        engine.save(tmp)
        states = [rng.bit_generator.state]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered = [None] * world_size
            torch.distributed.all_gather_object(gathered, rng.bit_generator.state)
            states = gathered
        torch.save({"torch": torch.get_rng_state(), "python": random.getstate(),
                    "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None},
                   os.path.join(tmp, f"rng_rank{rank}.pt"))
        barrier()
        final = None
        if main_rank:
            layout_yaml = os.path.join(tmp, "layout.yaml")
            from .layout import layout_to_dict
            from omegaconf import OmegaConf
            OmegaConf.save(OmegaConf.create(layout_to_dict(layout)), layout_yaml)
            with open(tok_path, "rb") as src, open(os.path.join(tmp, "tokenizer.model"), "wb") as dst:
                dst.write(src.read())
            ckpt.write_json(os.path.join(tmp, "trainer.json"), {  # written last: marks the directory complete
                "step": at_step, "tokens": tokens, "world_size": world_size, "data_rng": states,
                "engine": engine.name, "zero_stage": cfg.zero_stage if use_ds else None,
                "layout_path": layout_path, "config": dataclasses.asdict(cfg)})
            final = ckpt.commit(ckpt_root, tmp, at_step, cfg.keep_checkpoints)
            say(f"saved checkpoint {final} ({at_step} steps, {tokens:,} tokens)", flush=True)
        barrier()
        return final

    metrics = Metrics(out_dir, main_rank, cfg.tensorboard, from_step=step)
    if step >= total:
        say(f"{resume_from} is at step {step} of {total}: nothing left to train (raise train.steps to go on)",
            flush=True)
    losses: dict[int, float] = {}
    heldout = None
    t_start, tokens_at_start = time.time(), tokens
    first_step, first_step_s = step, None
    last_saved = None
    model.train()
    while step < total:
        micro = []
        for _ in range(cfg.grad_accum):
            batch = packed_batch(train, random_starts(train, cfg.micro_batch, cfg.seq_len, rng), cfg.seq_len)
            micro.append(tuple(t.to(device, non_blocking=True) for t in batch))
        lr = lr_at(step, cfg, total)
        loss, gnorm = engine.train_step(micro, lr)
        tokens += rows_per_step * cfg.seq_len
        losses[step] = loss
        if step == first_step:  # later throughput leaves out the first step (compilation, allocator warm-up)
            first_step_s = time.time() - t_start
            tps = rows_per_step * cfg.seq_len / max(first_step_s, 1e-9)
            if total - first_step > 1:
                t_start, tokens_at_start = time.time(), tokens
        else:
            tps = (tokens - tokens_at_start) / max(time.time() - t_start, 1e-9)
        if step % cfg.log_every == 0 or step == total - 1:
            mfu = tps * flops_per_token / (peak * world_size) if peak else None
            eta = (total - step - 1) * rows_per_step * cfg.seq_len / max(tps, 1e-9)
            mem = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None
            say(f"step {step:5d}/{total}  loss {loss:.3f}  lr {lr:.2e}  gnorm {gnorm:.2f}  {tps:,.0f} tok/s"
                + (f"  MFU {100 * mfu:.1f}%" if mfu is not None else "")
                + (f"  mem {mem:.1f} GiB" if mem is not None else "")
                + (f"  ETA {fmt_eta(eta)}" if step > first_step else f"  (first step {first_step_s:.2f} s)"),
                flush=True)
            metrics.log(step, loss=loss, lr=lr, grad_norm=gnorm, tokens_per_s=tps, tokens=tokens,
                        **({"mfu": mfu} if mfu is not None else {}), **({"peak_mem_gib": mem} if mem else {}))
        step += 1
        if step % cfg.eval_every == 0 or step == total:
            heldout = evaluate(engine.model, held, cfg, device, engine.autocast)
            say(f"step {step - 1:5d}  held-out loss {heldout:.3f}  ppl {math.exp(heldout):.1f}", flush=True)
            metrics.log(step - 1, heldout_loss=heldout, heldout_ppl=math.exp(heldout))
        if (cfg.save_every and step % cfg.save_every == 0) or step == total:
            last_saved = save(step)
        if on_step is not None:
            on_step(step)
    metrics.close()
    if use_ds and main_rank and last_saved:
        say(f"consolidated fp32 weights: {ckpt.consolidate(last_saved)}", flush=True)
    tps = (tokens - tokens_at_start) / max(time.time() - t_start, 1e-9)
    summary = {"losses": losses, "heldout_loss": heldout, "tokenizer": tok_path, "checkpoint": last_saved,
               "steps": total, "tokens": tokens, "tokens_per_s": tps,
               "mfu": tps * flops_per_token / (peak * world_size) if peak else None,
               "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None,
               "engine": engine.name, "zero_stage": cfg.zero_stage if use_ds else None,
               "precision": "bf16" if bf16 else "fp32", "world_size": world_size, "params": n_params}
    if main_rank:
        ckpt.write_json(os.path.join(out_dir, "summary.json"),
                        {**summary, "losses": [losses[k] for k in sorted(losses)]})
    summary["model"] = engine.model
    # under multi-rank ZeRO-3 every rank must take part in each forward (parameters are gathered on the fly)
    if cfg.sample_tokens > 0 and (main_rank or (use_ds and cfg.zero_stage == 3)):
        from .generate import generate
        sample_model = engine.model
        sample_model.eval()
        # a trailing space would become a lone word-start piece the model rarely saw; the next piece carries it
        prompt = tok.encode(cfg.sample_prompt.rstrip(" "))
        with engine.autocast():
            out = generate(sample_model, [prompt], max_new_tokens=cfg.sample_tokens, temperature=0.8, top_p=0.95,
                           stop_tokens=[tok.eos_id], generator=torch.Generator(device=device).manual_seed(cfg.seed))[0]
        summary["sample"] = tok.decode(prompt + list(out))  # decoded whole: a first piece's space is dropped
        say("sample:", repr(summary["sample"]), flush=True)
    return summary
