"""The learning-rate schedule and the AdamW parameter groups, shared by every engine and by eval.recall."""
from __future__ import annotations

import math

import torch

NO_DECAY = ("A_log", "D", "dt_bias", "bias", "weight_norm", "norm.weight", "norm_weight")


def lr_at(step: int, total: int, lr: float, warmup: int, min_lr_ratio: float) -> float:
    """Learning rate of step `step` (0-based) of `total`: linear warm-up over `warmup` steps to `lr`, then cosine
    decay to lr * min_lr_ratio at the last step."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


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
