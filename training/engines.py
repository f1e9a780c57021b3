"""The two engines behind one interface: `TorchEngine` (plain PyTorch AdamW) and `DeepSpeedEngine` (ZeRO 1/2/3).

Each has `name`, `model` (the module to evaluate), `full_model()` (every expert: the module to sample and
hand back), `whole_model()` (a block in which `full_model()`'s parameters are whole on this rank: to read its
weights), `autocast()`, `train_step(micro_batches, lr) -> (mean loss, grad norm)` as 0-dim tensors on the
device (the step does not wait for the GPU: the caller reads them when it logs, so the host queues the next step
while the GPU still runs this one), `save(dir)` and `load(dir)`. Both take the learning rate from the caller
every step and clip the global gradient norm, so a run's schedule does not depend on the engine.

On several ranks the torch engine is data parallel, and with train.expert_parallel > 1 also expert parallel
(training/parallel.py); its checkpoints hold every expert (gathered on save, cut to each rank's share on load),
so they are those of one process and resume on any number of ranks.

With MoE layers the model's training loss includes their weighted router losses: the engines optimize that,
return the language-model loss alone (comparable with dense layouts and the held-out loss) and keep the
router statistics of the step in `moe` (hybrid.moe.MOE_METRICS, means over micro-batches and ranks).
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
from typing import ContextManager, Optional, Protocol

import torch

from hybrid.errors import CheckpointError, ConfigError
from hybrid.expert_parallel import full_state_dict, local_state_dict
from hybrid.model import HybridLM

from . import checkpoint as ckpt
from .config import TrainConfig
from .distributed import barrier
from .optim import param_groups
from .parallel import Parallel


class Engine(Protocol):
    """What the loop needs of an engine."""
    name: str
    model: HybridLM  # the module to evaluate, sample and save from
    moe: Optional[torch.Tensor]  # the last step's (moe_aux, moe_z, moe_dropped) on the device; None without MoE

    def autocast(self): ...

    def full_model(self) -> HybridLM:
        """The model with every expert (gathered from the ranks when they are split: collective)."""

    def whole_model(self) -> ContextManager[HybridLM]:
        """`full_model()`, with every parameter whole on this rank while the block runs (gathered from ZeRO-3's
        partitions: collective), e.g. to read its state_dict."""

    def train_step(self, micro_batches, lr: float) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step over [(ids, targets, seq_idx), ...] at learning rate `lr`; (mean loss over all
        ranks' micro-batches, global gradient norm before clipping), 0-dim float32 tensors on the device."""

    def save(self, path: str) -> None: ...

    def load(self, path: str) -> None: ...


class MoeMeter:
    """Sums the model's `moe_stats` over a step's micro-batches: `lm_loss(total)` takes their added router losses
    out of the summed loss, `metrics(n)` is the mean statistics (None where the model has no MoE layers)."""

    def __init__(self, model: HybridLM):
        self.model, self.sum = model, None

    def add(self) -> None:
        stats = self.model.moe_stats
        if stats is not None:
            self.sum = stats if self.sum is None else self.sum + stats

    def lm_loss(self, total: torch.Tensor) -> torch.Tensor:
        return total if self.sum is None else total - self.sum[3]

    def metrics(self, n: int) -> Optional[torch.Tensor]:
        return None if self.sum is None else self.sum[:3] / n


def make_engine(model: HybridLM, cfg: TrainConfig, device: torch.device, bf16: bool, use_deepspeed: bool,
                deepspeed_config: Optional[str] = None, universal: Optional[str] = None) -> Engine:
    if use_deepspeed:
        return DeepSpeedEngine(model, cfg, device, bf16, deepspeed_config, universal=universal)
    return TorchEngine(model, cfg, device, bf16)


class TorchEngine:
    """AdamW on plain PyTorch: fp32 weights, optional bf16 autocast, gradient accumulation and clipping; data (and
    expert) parallel over the launcher's ranks (training/parallel.py). A step whose loss or gradient norm is not
    finite is not applied."""
    name = "torch"
    moe = None

    def __init__(self, model: HybridLM, cfg: TrainConfig, device: torch.device, bf16: bool):
        self.par = Parallel(cfg.expert_parallel)
        self.par.shard(model)  # this rank's experts only, before the optimizer sees the parameters
        self.model, self.cfg, self.device, self.bf16 = model.to(device), cfg, device, bf16
        # fused: one kernel over all parameters per step on the GPU (the same update as the foreach loop)
        self.opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8,
                                     fused=device.type == "cuda")

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def train_step(self, micro_batches, lr: float) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step over the micro-batches (of every rank). Returns (mean loss, grad norm before
        clipping) on the device, without a host sync."""
        for g in self.opt.param_groups:
            g["lr"] = lr
        total, meter = torch.zeros((), device=self.device), MoeMeter(self.model)
        for ids, targets, seq_idx in micro_batches:
            with self.autocast():
                loss = self.model(ids, seq_idx=seq_idx, targets=targets)
            (loss / len(micro_batches)).backward()
            total += loss.detach()
            meter.add()
        self.par.average_gradients(self.model)
        norm = self.par.clip_grad_norm(self.model, self.cfg.clip)
        n, moe = len(micro_batches), meter.metrics(len(micro_batches))
        # means over the ranks' micro-batches; a non-finite loss on any rank makes the mean non-finite everywhere
        logged = self.par.mean(torch.cat([(meter.lm_loss(total) / n).view(1), *([] if moe is None else [moe])]))
        loss, self.moe = logged[0], None if moe is None else logged[1:]
        bad = ~(torch.isfinite(loss) & torch.isfinite(norm))  # a non-finite step is skipped (training/faults.py)
        if self.device.type == "cuda":  # the fused AdamW skips on the device: no host sync
            self.opt.found_inf = bad.float()
            self.opt.step()
        elif not bool(bad):
            self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss, norm.float()

    def full_model(self) -> HybridLM:
        if self.par.ep is None:
            return self.model
        full = HybridLM(self.model.layout).to(self.device)
        ckpt.load_state(full, full_state_dict(self.model), "the experts gathered from the ranks")
        return full.train(self.model.training)

    def whole_model(self) -> ContextManager[HybridLM]:
        return contextlib.nullcontext(self.full_model())

    def save(self, path: str) -> None:
        """model.safetensors and the optimizer state, as one process holds them (every expert), written by rank 0;
        every rank takes part in gathering the experts."""
        state = full_state_dict(self.model) if self.par.ep is not None else None
        opt = self.par.full_optimizer_state(self.opt, self.model) if self.par.ep is not None else None
        if self.par.rank == 0:
            ckpt.save_weights(path, self.model, state)
            ckpt.save_optimizer(path, opt or self.opt.state_dict())

    def load(self, path: str) -> None:
        """Every expert is read; this rank keeps its own share of them."""
        ep = self.par.ep is not None
        ckpt.load_weights(path, self.model, (lambda full: local_state_dict(self.model, full)) if ep else None)
        state = ckpt.load_optimizer(path, map_location=self.device)
        self.opt.load_state_dict(self.par.local_optimizer_state(state, self.opt, self.model) if ep else state)


class DeepSpeedEngine:
    """DeepSpeed ZeRO (stage 1/2/3): bf16 weights with fp32 master copies, or fp32. A non-finite gradient on any
    rank makes DeepSpeed's own overflow check skip the update on every rank (tested in fp32; in bf16 its default
    `check_grad_overflow` does the same, read in DeepSpeed 0.19.8, not yet run on a GPU); the loop counts it
    from the infinite gradient norm DeepSpeed then reports."""
    name = "deepspeed"
    moe = None

    def __init__(self, model: HybridLM, cfg: TrainConfig, device: torch.device, bf16: bool,
                 user_config: Optional[str] = None, universal: Optional[str] = None):
        """universal: a universal checkpoint directory (see `universal_checkpoint`) that `load` reads instead of
        the ZeRO partitions, for a resume on another number of ranks."""
        import deepspeed
        self.cfg, self.device, self.bf16, self.universal = cfg, device, bf16, universal
        if cfg.zero_stage == 3:  # ZeRO-3 flattens all parameters into one dtype
            model.keep_fp32_ssm_params(False)
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else \
            int(os.environ.get("WORLD_SIZE", "1"))
        ds_config = self.config(cfg, bf16, device.type == "cuda", world) if user_config is None else \
            _read_user_config(user_config, cfg)
        if universal:
            ds_config = {**ds_config, "checkpoint": {**ds_config.get("checkpoint", {}), "load_universal": True}}
        self.ds_config = ds_config
        self.engine, self.opt, _, _ = deepspeed.initialize(
            model=model, model_parameters=param_groups(model, cfg.weight_decay), config=ds_config)
        self.model = self.engine.module

    @staticmethod
    def config(cfg: TrainConfig, bf16: bool, fused: bool = False, world_size: int = 1) -> dict:
        """The DeepSpeed JSON generated from the train section (fused: torch's fused AdamW, GPU only). With one
        rank there is no communication to overlap: overlap_comm's side stream and its waits only cost time
        (ZeRO-2 on one H200: 93.6K tokens/s with it, 99.4K without, the torch engine 118.8K)."""
        return {
            "train_micro_batch_size_per_gpu": cfg.micro_batch,
            "gradient_accumulation_steps": cfg.grad_accum,
            "gradient_clipping": cfg.clip,
            "bf16": {"enabled": bf16},
            "zero_optimization": {"stage": cfg.zero_stage, "overlap_comm": world_size > 1,
                                  "contiguous_gradients": True},
            "optimizer": {"type": "AdamW", "params": {"lr": cfg.lr, "betas": [0.9, 0.95], "eps": 1e-8,
                                                      "weight_decay": cfg.weight_decay,
                                                      # torch's AdamW: DeepSpeed's FusedAdam needs nvcc at run time;
                                                      # torch's own fused kernel on the GPU
                                                      "torch_adam": True, **({"fused": True} if fused else {})}},
            "steps_per_print": 10 ** 9,
            "wall_clock_breakdown": False,
        }

    def autocast(self):
        return torch.autocast(self.device.type, enabled=False)

    def full_model(self) -> HybridLM:
        return self.model

    @contextlib.contextmanager
    def whole_model(self):
        if self.cfg.zero_stage != 3:
            yield self.model
            return
        import deepspeed
        with deepspeed.zero.GatheredParameters(list(self.model.parameters())):
            yield self.model

    def train_step(self, micro_batches, lr: float) -> tuple[torch.Tensor, torch.Tensor]:
        for g in self.opt.param_groups:
            g["lr"] = lr
        total, meter = torch.zeros((), device=self.device), MoeMeter(self.model)
        for ids, targets, seq_idx in micro_batches:
            loss = self.engine(ids, seq_idx=seq_idx, targets=targets)
            self.engine.backward(loss)
            self.engine.step()  # applies the update at the accumulation boundary
            total += loss.detach().float()
            meter.add()
        n = len(micro_batches)
        moe = meter.metrics(n)
        logged = torch.cat([(meter.lm_loss(total) / n).view(1), *([] if moe is None else [moe])])
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            torch.distributed.all_reduce(logged)  # the logged values are means over all ranks' batches
            logged /= torch.distributed.get_world_size()
        loss, self.moe = logged[0], None if moe is None else logged[1:]
        norm = self.engine.get_global_grad_norm()
        norm = torch.as_tensor(float("nan") if norm is None else norm, dtype=torch.float32).to(self.device)
        return loss, norm

    def save(self, path: str) -> None:
        # the marker DeepSpeed's universal-checkpoint converter asks of its clients (no tensor-parallel layout)
        self.engine.save_checkpoint(ckpt.zero_dir(path), tag="zero",
                                    client_state={"universal_checkpoint_info": {"universal_checkpoint_version": 0.2}})

    def load(self, path: str) -> None:
        where = self.universal or ckpt.zero_dir(path)
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
               "--input_folder", os.path.join(ckpt.zero_dir(checkpoint), "zero"), "--output_folder", os.path.join(tmp, "zero"),
               "--inject_missing_state", "--num_extract_workers", workers, "--num_merge_workers", workers]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"converting {checkpoint} to a universal checkpoint failed:\n{proc.stderr[-3000:]}")
        shutil.rmtree(root, ignore_errors=True)  # an incomplete one (no model states file)
        os.replace(tmp, root)
    barrier()
    return root


def _read_user_config(path: str, cfg: TrainConfig) -> dict:
    try:
        with open(path) as f:
            user = json.load(f)
    except OSError as e:
        raise ConfigError(f"--deepspeed_config {path}: cannot be read ({e.strerror})") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"--deepspeed_config {path}: not valid JSON (line {e.lineno}: {e.msg})") from None
    mb = user.get("train_micro_batch_size_per_gpu", cfg.micro_batch)
    ga = user.get("gradient_accumulation_steps", cfg.grad_accum)
    if (mb, ga) != (cfg.micro_batch, cfg.grad_accum):
        raise ConfigError(f"--deepspeed_config {path}: micro batch {mb} x accumulation {ga} disagrees with "
                          f"train.micro_batch={cfg.micro_batch} train.grad_accum={cfg.grad_accum}")
    return user
