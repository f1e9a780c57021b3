"""The pretraining loop behind train.py, in the order a run takes its steps:

    setup      where this process runs: ranks, device, precision, engine kind (`Placement`)
    build      data and tokenizer, the model (vocabulary fitted to the tokenizer, optional init_from weights)
    resume     the newest checkpoint (or train.resume=PATH): weights, optimizer, step, data sampler, RNGs
    step       one optimizer step on the engine, then its log line
    evaluate   held-out loss on fixed windows
    save       one checkpoint directory, written whole then renamed (training/checkpoint.py owns the format)
    sample     a short generation at the end

One loop serves both engines (training/engines.py): plain PyTorch AdamW, or DeepSpeed ZeRO 1/2/3 under the
`deepspeed` launcher. Both take the learning rate from `lr_at(step)` and clip the global gradient norm, so a
run's schedule does not depend on the engine.
"""
from __future__ import annotations

import dataclasses
import math
import os
import random
import time
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch

from hybrid.budget import budget
from hybrid.errors import CheckpointError, ConfigError
from hybrid.generate import generate
from hybrid.model import HybridLM
from hybrid.moe import MOE_METRICS
from hybrid.spec import Layout

from . import checkpoint as ckpt
from .config import RunConfig, TrainConfig, check
from .data import EpochSampler, ShardedStream, TokenStream, packed_batch, prepare_data, random_starts
from .distributed import HostGroup, barrier, launched_by_deepspeed, world
from .engines import Engine, make_engine, universal_checkpoint
from .faults import BadSteps, LossSpikes, Preempted, Spike, StopRequests, parse_duration
from .metrics import Metrics, fmt_eta, peak_flops
from .optim import lr_at
from .parallel import check_expert_parallel


@dataclass
class Placement:
    """Where this process runs and how it computes."""
    rank: int
    world_size: int
    device: torch.device
    bf16: bool
    deepspeed: bool

    @property
    def main(self) -> bool:
        return self.rank == 0


def uses_deepspeed(cfg: TrainConfig, deepspeed_config: Optional[str]) -> bool:
    """train.engine=deepspeed, or auto under the deepspeed launcher (or with --deepspeed_config), except that auto
    picks the torch engine for expert parallelism (which DeepSpeed cannot run: training/parallel.py)."""
    if cfg.engine != "auto":
        return cfg.engine == "deepspeed"
    return bool(deepspeed_config) or (launched_by_deepspeed() and cfg.expert_parallel == 1)


def setup(cfg: TrainConfig, deepspeed_config: Optional[str]) -> Placement:
    """Join the launcher's process group (DeepSpeed's, or torch.distributed's for the torch engine on several
    ranks), pick the device and precision."""
    use_ds = uses_deepspeed(cfg, deepspeed_config)
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
    if not use_ds and world_size > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    return Placement(rank, world_size, device, bf16, bool(use_ds))


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
            losses.append(model(ids, seq_idx=seq_idx, targets=targets).item())
    model.train(was_training)
    return float(np.mean(losses))


def fit_vocab(layout: Layout, vocab_size: int) -> Layout:
    """The layout with model.vocab_size set to the tokenizer's: a small corpus yields fewer pieces than asked
    for, and ids past the tokenizer's last piece could never be trained, yet sampling would draw them."""
    return dataclasses.replace(layout, model=dataclasses.replace(layout.model, vocab_size=vocab_size))


class Run:
    """One training run: `Run(...).train()` returns its summary. Each method is one step of the docstring above."""

    def __init__(self, layout: Layout, run_cfg: RunConfig, layout_path: str, deepspeed_config: Optional[str] = None):
        self.cfg = cfg = run_cfg.train
        check(cfg)
        check_expert_parallel(cfg, layout, world()[2], uses_deepspeed(cfg, deepspeed_config))
        self.layout_path, self.deepspeed_config = layout_path, deepspeed_config
        self.at = setup(cfg, deepspeed_config)
        self.ranks = HostGroup()  # host-side agreement (stop requests, checkpoint choice, failed saves)
        self.say = print if self.at.main else (lambda *a, **k: None)
        self.ckpt_root = os.path.join(cfg.out_dir, "checkpoints")
        self.rows_per_step = cfg.micro_batch * cfg.grad_accum * self.at.world_size
        self.total = cfg.steps if cfg.tokens is None else math.ceil(cfg.tokens / (self.rows_per_step * cfg.seq_len))
        self.step, self.tokens = 0, 0
        self.skip_data: set = set()  # steps whose batches a loss-spike rollback skips
        # the lowest held-out loss so far (step and tokens after which it was measured), and how many evaluations
        # since have not beaten it: train.keep_best and train.early_stop; saved in each checkpoint's trainer.json
        self.best = {"loss": None, "step": None, "tokens": None, "since": 0}
        self.rng = np.random.default_rng([cfg.seed, self.at.rank])  # the data sampler: one stream per rank
        self.build(layout)

    # ------------------------------------------------------------------------------------------- build
    def build(self, layout: Layout) -> None:
        cfg, say = self.cfg, self.say
        self.tok, self.tok_path, self.train_stream, self.held = prepare_data(
            cfg, int(layout.model.vocab_size), cfg.out_dir, self.at.rank)
        prepared = isinstance(self.train_stream, ShardedStream)
        epoch = cfg.sampler == "epoch" or (cfg.sampler == "auto" and prepared)
        self.sampler = EpochSampler(self.train_stream, cfg.seq_len, cfg.seed) if epoch else None
        if self.tok.vocab_size != layout.model.vocab_size:
            say(f"model.vocab_size {layout.model.vocab_size} -> {self.tok.vocab_size}, the size of tokenizer "
                f"{self.tok_path}", flush=True)
            layout = fit_vocab(layout, self.tok.vocab_size)
        self.layout = layout
        torch.manual_seed(cfg.seed)  # the model init is the same on every rank
        random.seed(cfg.seed)
        model = HybridLM(layout)
        model.activation_checkpointing = cfg.activation_checkpointing
        if cfg.init_from:
            try:
                weights = ckpt.weights_file(cfg.init_from)
            except CheckpointError as e:
                raise ConfigError(f"train.init_from={e}") from None
            ckpt.load_model(model, weights)
            say(f"initialized from {weights}", flush=True)
        self.n_params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())  # before ZeRO-3
        self.model = model

    # ------------------------------------------------------------------------------------------ resume
    def find_checkpoint(self) -> tuple[Optional[str], Optional[dict]]:
        """(checkpoint to resume from, its trainer.json) or (None, None) for a fresh start."""
        cfg = self.cfg
        if cfg.resume == "never":
            return None, None
        if cfg.resume != "auto" and not ckpt.is_complete(cfg.resume):
            raise ConfigError(f"train.resume={cfg.resume}: not a complete checkpoint (no {ckpt.TRAINER})")
        path, error = self.ranks.from_main(self.verified_checkpoint() if self.at.main else None)
        if error is not None:
            raise CheckpointError(error)
        return (None, None) if path is None else (path, ckpt.read_meta(path))

    def verified_checkpoint(self) -> tuple[Optional[str], Optional[str]]:
        """(checkpoint to resume from, None) or (None, why not), rank 0's check of the files against their
        manifest. train.resume=auto falls back from a damaged checkpoint to the previous complete one."""
        if self.cfg.resume != "auto":
            try:
                ckpt.verify(self.cfg.resume)
            except CheckpointError as e:
                return None, f"train.resume={self.cfg.resume}: {e}"
            return self.cfg.resume, None
        candidates, damaged = ckpt.complete(self.ckpt_root)[::-1], []
        for path in candidates:
            try:
                ckpt.verify(path)
            except CheckpointError as e:
                damaged.append(str(e))
                self.say(f"warning: {e}; resuming from the previous checkpoint instead", flush=True)
                continue
            return path, None
        if damaged:
            return None, (f"no checkpoint under {self.ckpt_root} verifies ({'; '.join(damaged)}): remove them to "
                          "start afresh, or set train.resume=never")
        return None, None

    def make_engine(self, resume_from: Optional[str], meta: Optional[dict]) -> Engine:
        """The engine; on another number of ranks than the checkpoint's, DeepSpeed reads it through its
        universal form (weights and optimizer state carry over, the data order cannot)."""
        at, universal = self.at, None
        regrouped = meta is not None and meta["world_size"] != at.world_size
        engine_name = "deepspeed" if at.deepspeed else "torch"
        if meta is not None and not regrouped and meta.get("engine") != engine_name:
            raise ConfigError(f"{resume_from} was saved by the {meta.get('engine')} engine and this run uses the "
                              f"{engine_name} engine: set train.engine={meta.get('engine')} to resume it, or "
                              "train.init_from=<that checkpoint> to start a new run from its weights")
        if regrouped and at.deepspeed:
            if meta.get("engine") != "deepspeed":
                raise ConfigError(f"{resume_from} was saved by the {meta.get('engine')} engine on "
                                  f"{meta['world_size']} ranks; a DeepSpeed run on {at.world_size} ranks cannot "
                                  "read its optimizer state")
            self.say(f"{resume_from} was saved by {meta['world_size']} ranks, this run has {at.world_size}: "
                     "converting it to DeepSpeed's universal checkpoint", flush=True)
            universal = universal_checkpoint(resume_from, self.cfg.out_dir, at.main)
        return make_engine(self.model, self.cfg, at.device, at.bf16, at.deepspeed, self.deepspeed_config, universal)

    def resume(self, resume_from: str, meta: dict) -> None:
        at, cfg = self.at, self.cfg
        self.engine.load(resume_from)
        self.step, self.tokens = meta["step"], meta["tokens"]
        if meta["world_size"] != at.world_size:
            # each rank's sampler restarts from (seed, rank, step): deterministic, not a replay of any rank's batches
            self.rng = np.random.default_rng([cfg.seed, at.rank, self.step])
            saved_rows = meta["config"]["micro_batch"] * meta["config"]["grad_accum"] * meta["world_size"]
            self.say(f"resumed from {resume_from} at step {self.step} on {at.world_size} ranks (saved by "
                     f"{meta['world_size']}): weights and optimizer state restored; the data order differs from a "
                     f"{meta['world_size']}-rank run; global batch {saved_rows} -> {self.rows_per_step} rows"
                     + ("" if saved_rows == self.rows_per_step else " (set train.grad_accum to keep it)"), flush=True)
            return
        self.rng.bit_generator.state = meta["data_rng"][at.rank]
        state = ckpt.load_rng(resume_from, at.rank)
        torch.set_rng_state(state["torch"])
        if state.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"], at.device)
        random.setstate(state["python"])
        self.say(f"resumed from {resume_from} at step {self.step}", flush=True)

    # -------------------------------------------------------------------------------------------- step
    def next_batches(self) -> list:
        cfg, out = self.cfg, []
        rows = cfg.micro_batch * cfg.grad_accum
        if self.sampler is not None:  # this rank's run of the step's windows, from the tokens trained so far
            first = self.tokens // cfg.seq_len + self.at.rank * rows
            epoch_starts = self.sampler.starts(first, rows)
        for i in range(cfg.grad_accum):
            if self.sampler is not None:
                starts = epoch_starts[i * cfg.micro_batch:(i + 1) * cfg.micro_batch]
            else:
                starts = random_starts(self.train_stream, cfg.micro_batch, cfg.seq_len, self.rng)
            batch = packed_batch(self.train_stream, starts, cfg.seq_len)
            if self.at.device.type == "cuda":  # page-locked: the copy is queued behind the running step
                batch = tuple(t.pin_memory() for t in batch)
            out.append(tuple(t.to(self.at.device, non_blocking=True) for t in batch))
        return out

    def train_step(self) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor], float]:
        """One optimizer step queued on the device; (loss, grad norm, lr), the first two not yet read. A step whose
        data a rollback skips draws its batches and trains nothing: (None, None, lr)."""
        cfg = self.cfg
        lr = lr_at(self.step, self.total, cfg.lr, cfg.warmup, cfg.min_lr_ratio)
        if self.step in self.skip_data:
            self.next_batches()
            self.tokens += self.rows_per_step * cfg.seq_len
            self.say(f"step {self.step:5d}  data skipped (the loss spike the run rolled back from)", flush=True)
            return None, None, lr
        loss, gnorm = self.engine.train_step(self.next_batches(), lr)
        self.tokens += self.rows_per_step * cfg.seq_len
        return loss, gnorm, lr

    def log_step(self, loss: float, gnorm: float, lr: float, tps: float, first_step_s: Optional[float],
                 moe: Optional[list] = None) -> None:
        """The step's log line and metrics row; moe: the step's (moe_aux, moe_z, moe_dropped) with MoE layers."""
        at, cfg = self.at, self.cfg
        skipped = self.bad.total
        mfu = tps * self.flops_per_token / (self.peak * at.world_size) if self.peak else None
        mem = torch.cuda.max_memory_allocated(at.device) / 2 ** 30 if at.device.type == "cuda" else None
        eta = (self.total - self.step - 1) * self.rows_per_step * cfg.seq_len / max(tps, 1e-9)
        self.say(f"step {self.step:5d}/{self.total}  loss {loss:.3f}  lr {lr:.2e}  gnorm {gnorm:.2f}  {tps:,.0f} tok/s"
                 + (f"  moe aux {moe[0]:.3f} z {moe[1]:.3f} dropped {100 * moe[2]:.1f}%" if moe else "")
                 + (f"  MFU {100 * mfu:.1f}%" if mfu is not None else "")
                 + (f"  mem {mem:.1f} GiB" if mem is not None else "")
                 + (f"  ETA {fmt_eta(eta)}" if first_step_s is None else f"  (first step {first_step_s:.2f} s)")
                 + (f"  non-finite steps skipped: {skipped}" if skipped else ""), flush=True)
        self.metrics.log(self.step, loss=loss, lr=lr, grad_norm=gnorm, tokens_per_s=tps, tokens=self.tokens,
                         bad_steps=skipped, **dict(zip(MOE_METRICS, moe or [])),
                         **({"mfu": mfu} if mfu is not None else {}), **({"peak_mem_gib": mem} if mem else {}))

    # ---------------------------------------------------------------------------------------- evaluate
    def evaluate(self) -> float:
        heldout = evaluate(self.engine.model, self.held, self.cfg, self.at.device, self.engine.autocast)
        self.say(f"step {self.step - 1:5d}  held-out loss {heldout:.3f}  ppl {math.exp(heldout):.1f}", flush=True)
        self.metrics.log(self.step - 1, heldout_loss=heldout, heldout_ppl=math.exp(heldout))
        return heldout

    @property
    def stopped_early(self) -> bool:
        """train.early_stop evaluations in a row without a new best (judged by this run's value: raising it, or 0,
        continues a run that stopped early)."""
        return bool(self.cfg.early_stop) and self.best["since"] >= self.cfg.early_stop

    def track_best(self, heldout: float) -> None:
        """Count this evaluation against the best so far: a new best is written to out_dir/best
        (train.keep_best); train.early_stop evaluations in a row without one end the run. Every rank takes rank
        0's loss, so all agree on a new best (a collective save) and on the stop, to the last bit."""
        heldout = self.ranks.from_main(heldout if self.at.main else None)
        if math.isfinite(heldout) and (self.best["loss"] is None or heldout < self.best["loss"]):
            self.best = {"loss": heldout, "step": self.step, "tokens": self.tokens, "since": 0}
            if self.cfg.keep_best:
                self.save_best()
            return
        self.best["since"] += 1
        if self.stopped_early:
            self.say(f"early stop after step {self.step}: {self.best['since']} held-out evaluations without a new "
                     f"best (train.early_stop={self.cfg.early_stop}); the best, loss {self.best['loss']:.3f}, was "
                     f"after step {self.best['step']} ({self.best['tokens']:,} tokens)", flush=True)
            self.metrics.log(self.step - 1, early_stop=True, best_step=self.best["step"],
                             best_heldout_loss=self.best["loss"])

    # -------------------------------------------------------------------------------------------- save
    def save_best(self) -> None:
        """The weights as they are now, as the weights-only checkpoint out_dir/best (replaced whole)."""
        with self.engine.whole_model() as model:  # collective: experts split over ranks, ZeRO-3 partitions
            if self.at.main:
                path = ckpt.write_best(self.cfg.out_dir, model, self.tok_path, {
                    k: self.best[k] for k in ("loss", "step", "tokens")})
                self.say(f"best held-out loss so far: weights in {path}", flush=True)
        barrier()

    def save(self) -> Optional[str]:
        """A checkpoint of the state after `self.step` steps; every rank writes its part. Returns its path on
        rank 0 (None elsewhere)."""
        at, cfg = self.at, self.cfg
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        tmp = self.ranks.from_main(ckpt.begin(self.ckpt_root, self.step) if at.main else None)
        states = [self.rng.bit_generator.state]
        if distributed:
            states = [None] * at.world_size
            torch.distributed.all_gather_object(states, self.rng.bit_generator.state)
        error = None
        try:
            self.engine.save(tmp)
            ckpt.save_rng(tmp, at.rank, {"torch": torch.get_rng_state(), "python": random.getstate(), "cuda":
                                         torch.cuda.get_rng_state(at.device) if at.device.type == "cuda" else None})
        except OSError as e:  # disk full, permissions, a vanished mount: this rank's part is not written
            error = e
        final = None
        if not self.ranks.any(error is not None) and at.main:
            try:
                ckpt.write_run_files(tmp, self.layout, self.tok_path, {
                    "step": self.step, "tokens": self.tokens, "world_size": at.world_size, "data_rng": states,
                    "engine": self.engine.name, "zero_stage": cfg.zero_stage if at.deepspeed else None,
                    "layout_path": self.layout_path, "config": dataclasses.asdict(cfg),
                    "heldout_best": self.best, "stopped_early": self.stopped_early})
                final = ckpt.commit(self.ckpt_root, tmp, self.step, cfg.keep_checkpoints)
            except OSError as e:
                error = e
        failed = self.ranks.any(error is not None)
        if failed:
            return self.save_failed(tmp, error)
        self.say(f"saved checkpoint {final} ({self.step} steps, {self.tokens:,} tokens)", flush=True)
        barrier()
        return final

    def save_failed(self, tmp: str, error: Optional[OSError]) -> None:
        """A save that raised OSError on some rank: its partial directory removed, the previous checkpoint left
        as it was; then stop (train.on_save_error=stop) or go on training with a warning (continue)."""
        import shutil
        barrier()
        if self.at.main:
            shutil.rmtree(tmp, ignore_errors=True)
        what = f"{error.strerror or error} ({error.filename})" if error is not None else "failed on another rank"
        previous = ckpt.latest(self.ckpt_root)
        message = (f"saving the checkpoint of step {self.step} failed: {what}; the previous checkpoint "
                   f"({previous or 'none'}) is intact")
        if self.cfg.on_save_error == "stop":
            raise CheckpointError(message + " and the run stops (train.on_save_error=continue trains on)")
        self.say(f"warning: {message}; training goes on (train.on_save_error=continue)", flush=True)
        return None

    # ------------------------------------------------------------------------------------------ sample
    def sample(self, model: HybridLM) -> str:
        cfg = self.cfg
        model.eval()
        # a trailing space would become a lone word-start piece the model rarely saw; the next piece carries it
        prompt = self.tok.encode(cfg.sample_prompt.rstrip(" "))
        with self.engine.autocast():
            # ZeRO-3 gathers parameters in hooks on every forward: no CUDA graph of the step there
            out = generate(model, [prompt], max_new_tokens=cfg.sample_tokens, temperature=0.8, top_p=0.95,
                           stop_tokens=[self.tok.eos_id], graph=None if self.engine.name == "torch" or
                           cfg.zero_stage < 3 else False,
                           generator=torch.Generator(device=self.at.device).manual_seed(cfg.seed))[0]
        text = self.tok.decode(prompt + list(out))  # decoded whole: sentencepiece drops a first piece's space
        self.say("sample:", repr(text), flush=True)
        return text

    # --------------------------------------------------------------------------------------------- run
    def start(self) -> None:
        """Resume or start fresh, then announce the run."""
        at, cfg = self.at, self.cfg
        resume_from, meta = self.find_checkpoint()
        self.engine = self.make_engine(resume_from, meta)
        counts = budget(self.layout, cfg.seq_len)
        self.flops_per_token = 3 * counts.flops_per_token  # forward + backward (2x); MoE: the active experts only
        self.peak = peak_flops(cfg, at.device)
        active = self.n_params - (counts.params - counts.active_params)
        self.say(f"{self.layout.name}: {self.n_params / 1e6:.2f}M params"
                 + (f" ({active / 1e6:.2f}M active)" if counts.moe else "")
                 + f", {self.layout.n_layers} layers | engine "
                 f"{self.engine.name}{f' ZeRO-{cfg.zero_stage}' if at.deepspeed else ''}, "
                 f"{'bf16' if at.bf16 else 'fp32'}, {at.world_size} x {at.device.type} | corpus "
                 f"{len(self.train_stream):,} train / {len(self.held):,} held-out tokens | {self.total} steps of "
                 f"{self.rows_per_step} x {cfg.seq_len} tokens", flush=True)
        if resume_from:
            self.resume(resume_from, meta)
            self.best = dict(meta.get("heldout_best") or self.best)
            if self.stopped_early:
                self.say(f"{resume_from}: {self.best['since']} held-out evaluations without a new best since step "
                         f"{self.best['step']} (train.early_stop={cfg.early_stop}): nothing left to train (raise "
                         "train.early_stop, or set it to 0, to go on)", flush=True)
            elif self.step >= self.total:
                self.say(f"{resume_from} is at step {self.step} of {self.total}: nothing left to train (raise "
                         "train.steps to go on)", flush=True)

    def train(self, on_step: Optional[Callable[[int], None]] = None) -> dict:
        """Steps until `total`, evaluating and saving on schedule. on_step(step) runs after each step's log,
        evaluation and save (tests use it to interrupt a run)."""
        cfg = self.cfg
        self.start()
        self.metrics = Metrics(cfg.out_dir, self.at.main, cfg.tensorboard, from_step=self.step)
        self.engine.model.train()
        meter = Throughput(self.step, self.tokens, self.total)
        self.bad, self.spikes, self.rollbacks = BadSteps(cfg.max_bad_steps), LossSpikes(cfg.spike_factor), 0
        stops = StopRequests(parse_duration(cfg.max_wall_time), self.ranks).install()
        losses, heldout, last_saved = {}, None, None
        # (step, loss, grad norm, MoE statistics or None) on the device since the last log line: one host sync per
        # log line
        unread = []
        try:
            while self.step < self.total and not self.stopped_early:
                loss, gnorm, lr = self.train_step()
                if loss is not None:
                    unread.append((self.step, loss, gnorm, getattr(self.engine, "moe", None)))
                if self.step % cfg.log_every == 0 or self.step == self.total - 1 or self.step == meter.first_step:
                    try:
                        self.read(unread, losses, last_saved)
                    except Spike as spike:
                        if self.roll_back(spike, losses):
                            unread, meter = [], Throughput(self.step, self.tokens, self.total)
                            continue
                    tps, first_step_s = meter.after_step(self.step, self.tokens)
                    if (self.step % cfg.log_every == 0 or self.step == self.total - 1) and self.step in losses:
                        self.log_step(losses[self.step], unread[-1][2], lr, tps, first_step_s, unread[-1][3])
                    unread = []
                self.step += 1
                if self.step % cfg.eval_every == 0 or self.step == self.total:
                    heldout = self.evaluate()
                    self.track_best(heldout)
                saved_now = ((cfg.save_every and self.step % cfg.save_every == 0) or self.step == self.total
                             or self.stopped_early)
                if self.stopped_early:
                    self.read_before_stop(unread, losses, last_saved)
                if saved_now:
                    last_saved = self.save()
                if on_step is not None:
                    on_step(self.step)
                reason = stops.requested() if self.step < self.total and not self.stopped_early else None
                if reason is not None:
                    self.read_before_stop(unread, losses, last_saved)
                    path = last_saved if saved_now else self.save()
                    self.say(f"stopped by {reason} after step {self.step}: checkpoint {path}; run the same command "
                             "again to continue (train.resume=auto)", flush=True)
                    raise Preempted(reason, self.step, path)
        finally:
            stops.restore()
            self.metrics.close()
        return self.finish(losses, heldout, last_saved, meter.tokens_per_s(self.tokens))

    def read(self, unread: list, losses: dict, last_saved: Optional[str]) -> None:
        """Read the queued steps' losses, gradient norms and MoE statistics (one host sync) into `losses` and the
        bad-step count. Leaves the values on the host in unread[i][1:] (floats, and a list of floats or None).
        Raises Spike, after recording them all, for the first loss spike among them (train.spike_factor)."""
        if not unread:
            return
        values = torch.stack([torch.cat([torch.stack([l, g]), *([] if m is None else [m.to(l.dtype)])])
                              for _, l, g, m in unread]).tolist()
        spike = None
        for i, ((step, _, _, _), (loss, gnorm, *moe)) in enumerate(zip(unread, values)):
            losses[step] = loss
            unread[i] = (step, loss, gnorm, moe or None)
            if not self.bad.record(step, loss, gnorm, last_saved):
                spike = spike or self.spikes.check(step, loss)
        if spike is not None:
            raise spike

    def read_before_stop(self, unread: list, losses: dict, last_saved: Optional[str]) -> None:
        try:
            self.read(unread, losses, last_saved)
        except Spike as spike:  # stopping anyway: the checkpoint is saved, the spike reported
            self.say(f"warning: {spike}; not rolled back (the run is stopping)", flush=True)
        unread.clear()

    def roll_back(self, spike: Spike, losses: dict) -> bool:
        """Back to the newest checkpoint saved before the spike's step, that step's data to be skipped when the
        run gets there again (the steps in between are redone on the same data). False (and a warning) when no
        checkpoint precedes it or train.max_rollbacks are used up: the run goes on."""
        before = [p for p in ckpt.complete(self.ckpt_root) if ckpt.step_of(p) <= spike.step]
        if not before or self.rollbacks >= self.cfg.max_rollbacks:
            why = "no checkpoint precedes it" if not before else f"train.max_rollbacks={self.cfg.max_rollbacks} used"
            self.say(f"warning: {spike}; not rolled back ({why})", flush=True)
            return False
        self.rollbacks += 1
        self.say(f"{spike}: rolling back to {before[-1]}, then skipping step {spike.step}'s data "
                 f"(rollback {self.rollbacks} of at most {self.cfg.max_rollbacks})", flush=True)
        self.resume(before[-1], ckpt.read_meta(before[-1]))
        self.skip_data.add(spike.step)
        for step in [s for s in losses if s >= self.step]:
            del losses[step]
        self.metrics.close()
        self.metrics = Metrics(self.cfg.out_dir, self.at.main, self.cfg.tensorboard, from_step=self.step)
        self.metrics.log(self.step, rollback_from=spike.step, spike_loss=spike.loss, running_mean=spike.mean)
        return True

    def finish(self, losses: dict, heldout: Optional[float], last_saved: Optional[str], tps: float) -> dict:
        at, cfg = self.at, self.cfg
        if at.deepspeed and at.main and last_saved:
            self.say(f"consolidated fp32 weights: {ckpt.consolidate(last_saved)}", flush=True)
        summary = {"losses": losses, "heldout_loss": heldout, "tokenizer": self.tok_path, "checkpoint": last_saved,
                   "steps": self.total, "tokens": self.tokens, "tokens_per_s": tps,
                   "mfu": tps * self.flops_per_token / (self.peak * at.world_size) if self.peak else None,
                   "peak_mem_gib": torch.cuda.max_memory_allocated(at.device) / 2 ** 30
                   if at.device.type == "cuda" else None,
                   "stopped_early": self.stopped_early, "heldout_best": self.best,
                   "engine": self.engine.name, "zero_stage": cfg.zero_stage if at.deepspeed else None,
                   "precision": "bf16" if at.bf16 else "fp32", "world_size": at.world_size, "params": self.n_params}
        if at.main:
            ckpt.write_json(os.path.join(cfg.out_dir, "summary.json"),
                            {**summary, "losses": [losses[k] for k in sorted(losses)]})
        summary["model"] = self.engine.full_model()  # every expert (collective when they are split over ranks)
        # under multi-rank ZeRO-3 every rank must take part in each forward (parameters are gathered on the fly)
        if cfg.sample_tokens > 0 and (at.main or (at.deepspeed and cfg.zero_stage == 3)):
            summary["sample"] = self.sample(summary["model"])
        return summary


class Throughput:
    """Tokens per second since the end of the first step (which compiles and warms allocators); for the first
    step itself, that step's own rate and duration. Called just after a host read of the step's loss, so the
    clock includes the GPU's work up to that step."""

    def __init__(self, step: int, tokens: int, total: int):
        self.first_step, self.total = step, total
        self.t0, self.tokens0 = time.time(), tokens

    def after_step(self, step: int, tokens: int) -> tuple[float, Optional[float]]:
        """(tokens/s, the first step's seconds when `step` is the first step, else None)."""
        if step != self.first_step:
            return self.tokens_per_s(tokens), None
        seconds = time.time() - self.t0
        rate = (tokens - self.tokens0) / max(seconds, 1e-9)
        if self.total - self.first_step > 1:
            self.t0, self.tokens0 = time.time(), tokens
        return rate, seconds

    def tokens_per_s(self, tokens: int) -> float:
        return (tokens - self.tokens0) / max(time.time() - self.t0, 1e-9)


def run(layout: Layout, run_cfg: RunConfig, *, layout_path: str, deepspeed_config: Optional[str] = None,
        on_step: Optional[Callable[[int], None]] = None) -> dict:
    """Train `layout` as `run_cfg` says. Returns a summary dict (losses per step, final held-out loss, tokenizer,
    checkpoint path, model, sample)."""
    return Run(layout, run_cfg, layout_path, deepspeed_config).train(on_step)
