"""The `train.*` section of a run: every key with its default and help line, and its validation.

`train.py` merges command-line `train.key=value` overrides onto `RunConfig` (omegaconf structured config);
`check` rejects values no engine can run with a ConfigError naming the key.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

from hybrid.errors import ConfigError


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
    expert_parallel: int = _opt(1, "E_p: split each MoE layer's experts over groups of E_p ranks (n_experts / E_p "
                                   "per rank, tokens exchanged all-to-all); divides the ranks and n_experts; "
                                   "torch engine (auto picks it)")
    # data and tokenizer
    data: Optional[str] = _opt(None, ".jsonl ({\"text\": ...} per line) / .txt / directory; unset: the embedded corpus")
    tokenizer: Optional[str] = _opt(None, "a sentencepiece .model; unset: train one on the training split")
    tokenizer_type: str = _opt("bpe", "bpe | unigram, when training one")
    heldout_fraction: float = _opt(0.05, "documents held out for evaluation")
    sampler: str = _opt("auto", "random (rows at random offsets) | epoch (shuffled windows, each once per epoch, "
                                "disjoint over ranks) | auto (epoch for a prepared corpus, else random)")
    # outputs
    out_dir: str = _opt("runs/${name}", "run directory: checkpoints, metrics.jsonl, tokenizer, data shards")
    log_every: int = _opt(10, "steps between log lines")
    eval_every: int = _opt(40, "steps between held-out evaluations")
    eval_batches: int = _opt(8, "micro-batches per held-out evaluation")
    save_every: int = _opt(100, "steps between checkpoints (also at the end; 0: only at the end)")
    keep_checkpoints: int = _opt(2, "newest complete checkpoints kept (0: all)")
    keep_best: bool = _opt(False, "after each held-out evaluation that beats the best so far, write the weights to "
                                  "out_dir/best (a weights-only checkpoint, with best.json: step, tokens, loss)")
    early_stop: int = _opt(0, "stop once this many held-out evaluations in a row have not beaten the best (0: "
                              "never); a rerun then has nothing left to train, unless it raises early_stop")
    max_wall_time: Optional[str] = _opt(None, "stop, save and exit (status 75) after this long: seconds or "
                                              "[D-]HH:MM:SS; SIGTERM/SIGUSR1/SIGINT do the same")
    on_save_error: str = _opt("stop", "a save that fails (disk full, permissions): stop | continue (the previous "
                                      "checkpoint stays intact either way)")
    spike_factor: float = _opt(0.0, "a loss above this many times its running mean rolls the run back to the last "
                                    "checkpoint and skips that step's data (0: off)")
    max_rollbacks: int = _opt(3, "loss-spike rollbacks allowed per run")
    max_bad_steps: int = _opt(10, "stop after this many non-finite steps in a row (their updates are skipped; "
                                  "0: never stop)")
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
    if cfg.on_save_error not in ("stop", "continue"):
        bad("on_save_error", cfg.on_save_error, "stop or continue")
    if cfg.sampler not in ("auto", "random", "epoch"):
        bad("sampler", cfg.sampler, "auto, random or epoch")
    for key in ("micro_batch", "grad_accum", "seq_len", "log_every", "eval_every", "eval_batches", "expert_parallel"):
        if getattr(cfg, key) < 1:
            bad(key, getattr(cfg, key), "an integer >= 1")
    if min(cfg.steps, cfg.warmup, cfg.save_every, cfg.keep_checkpoints, cfg.max_bad_steps, cfg.max_rollbacks,
           cfg.early_stop) < 0:
        raise ConfigError("train.steps, train.warmup, train.save_every, train.keep_checkpoints, "
                          "train.max_bad_steps, train.max_rollbacks and train.early_stop must be >= 0")
    if cfg.spike_factor != 0 and not cfg.spike_factor > 1:
        bad("spike_factor", cfg.spike_factor, "0 (off) or a factor > 1")
    from .faults import parse_duration
    parse_duration(cfg.max_wall_time)
    if not 0 < cfg.heldout_fraction < 1:
        bad("heldout_fraction", cfg.heldout_fraction, "a fraction in (0, 1)")
