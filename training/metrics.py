"""What a run reports: metrics.jsonl (+ tensorboard), throughput and MFU, ETA."""
from __future__ import annotations

import json
import os
from typing import Optional

import torch

from .config import TrainConfig

# dense bf16 tensor-core peaks used for MFU (datasheet, no sparsity); override with train.peak_tflops
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0,
               "B200": 2250.0}


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
