"""Pretrain a hybrid layout on the embedded corpus (or your own text), then print a sample.

    python train.py                                  # layouts/tiny.yaml, CPU, a few minutes
    python train.py layouts/jamba.yaml model.d_model=512 train.steps=1000 train.lr=1e-3

Arguments after the layout are omegaconf dotlist overrides: `train.*` keys set the training run (see
TrainConfig), every other key overrides the layout.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
from omegaconf import OmegaConf

from hybrid import HybridLM, LayoutError, generate, lm_loss, load_layout
from hybrid.data import TokenStream, default_corpus, packed_batch, random_starts, split_documents
from hybrid.tokenizer import Tokenizer

NO_DECAY = ("A_log", "D", "dt_bias", "bias", "weight_norm", "norm.weight", "norm_weight")


@dataclass
class TrainConfig:
    steps: int = 300
    batch_size: int = 8
    seq_len: int = 256
    lr: float = 2e-3
    min_lr_ratio: float = 0.1     # cosine decays to lr * min_lr_ratio
    warmup: int = 30
    weight_decay: float = 0.1
    clip: float = 1.0
    seed: int = 0
    tokenizer: Optional[str] = None   # a sentencepiece .model; None trains one on the corpus
    heldout_fraction: float = 0.05
    out_dir: str = "runs/${name}"
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 8
    sample_prompt: str = "The "
    sample_tokens: int = 64
    threads: int = 0              # torch CPU threads (0 = torch's default)


@dataclass
class RunConfig:
    name: str = "run"
    train: TrainConfig = field(default_factory=TrainConfig)


def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("layout", nargs="?", default=os.path.join(os.path.dirname(__file__), "layouts", "tiny.yaml"))
    ap.add_argument("overrides", nargs="*", help="dotlist overrides: train.steps=100 model.d_model=512 ...")
    ap.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    args = ap.parse_args(argv)
    if "=" in args.layout:  # only overrides were given
        args.overrides.insert(0, args.layout)
        args.layout = ap.get_default("layout")
    train_over = [o for o in args.overrides if o.startswith("train.")]
    layout_over = [o for o in args.overrides if not o.startswith("train.")]
    name = os.path.splitext(os.path.basename(args.layout))[0]
    run = OmegaConf.merge(OmegaConf.structured(RunConfig(name=name)), OmegaConf.from_dotlist(train_over))
    return args, OmegaConf.to_object(run), layout_over


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def optimizer_for(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or name.endswith(NO_DECAY) else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)


@torch.no_grad()
def evaluate(model: HybridLM, stream: TokenStream, cfg: TrainConfig) -> float:
    model.eval()
    seq_len = min(cfg.seq_len, len(stream) - 2)
    starts = np.linspace(0, len(stream) - seq_len - 2, cfg.eval_batches * cfg.batch_size).astype(np.int64)
    losses = []
    for chunk in np.array_split(starts, cfg.eval_batches):
        ids, targets, seq_idx = packed_batch(stream, chunk, seq_len)
        losses.append(lm_loss(model(ids, seq_idx=seq_idx), targets).item())
    model.train()
    return float(np.mean(losses))


def main(argv=None) -> int:
    args, run, layout_over = parse(argv)
    cfg = run.train
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    out_dir = run.train.out_dir
    docs_train, docs_held = split_documents(default_corpus(), cfg.heldout_fraction, cfg.seed)
    tok_path = cfg.tokenizer or os.path.join(out_dir, "tokenizer.model")
    if cfg.tokenizer is None and not os.path.exists(tok_path):
        vocab = int(load_layout(args.layout, layout_over).model.vocab_size)
        print(f"training a {vocab}-piece sentencepiece tokenizer on the corpus -> {tok_path}", flush=True)
        Tokenizer.train(docs_train, vocab, tok_path)
    tok = Tokenizer(tok_path)
    layout = load_layout(args.layout, [*layout_over, f"model.vocab_size={tok.vocab_size}"])
    if args.print_config:
        print(OmegaConf.to_yaml(OmegaConf.structured(run)))
        return 0
    train = TokenStream.from_docs(tok.encode_batch(docs_train), tok.eos_id)
    held = TokenStream.from_docs(tok.encode_batch(docs_held), tok.eos_id)
    model = HybridLM(layout)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{layout.name}: {n_params / 1e6:.2f}M params, {layout.n_layers} layers; corpus {len(train):,} train / "
          f"{len(held):,} held-out tokens", flush=True)
    opt = optimizer_for(model, cfg)
    rng = np.random.default_rng(cfg.seed)
    t0, tokens = time.time(), 0
    for step in range(cfg.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        ids, targets, seq_idx = packed_batch(train, random_starts(train, cfg.batch_size, cfg.seq_len, rng), cfg.seq_len)
        loss = lm_loss(model(ids, seq_idx=seq_idx), targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
        opt.step()
        tokens += ids.numel()
        if step % cfg.log_every == 0 or step == cfg.steps - 1:
            print(f"step {step:5d}  loss {loss.item():.3f}  lr {lr_at(step, cfg):.2e}  "
                  f"{tokens / (time.time() - t0):,.0f} tok/s", flush=True)
        if (step + 1) % cfg.eval_every == 0 or step == cfg.steps - 1:
            print(f"step {step:5d}  held-out loss {evaluate(model, held, cfg):.3f}", flush=True)
    os.makedirs(out_dir, exist_ok=True)
    model.eval()
    prompt = tok.encode(cfg.sample_prompt)
    out = generate(model, [prompt], max_new_tokens=cfg.sample_tokens, temperature=0.8, top_p=0.95,
                   stop_tokens=[tok.eos_id], generator=torch.Generator().manual_seed(cfg.seed))[0]
    print("sample:", repr(cfg.sample_prompt + tok.decode(out)))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except LayoutError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
