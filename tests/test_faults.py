"""training/faults.py on CPU: stop requests (signals, wall time) save and resume exactly; non-finite steps are
skipped, counted, and stop the run when they keep coming."""
import math
import os
import signal
import subprocess
import sys

import pytest
import torch

from hybrid.errors import ConfigError
from training import checkpoint as ckpt
from training.faults import PREEMPTED, BadSteps, BadStepsError, Preempted, StopRequests, parse_duration
from training.loop import run
from tests.test_train import TINY, config, layout

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_sigterm_mid_run_saves_and_the_resumed_run_equals_an_uninterrupted_one(tmp_path, tokenizer):
    full = run(layout(), config(tmp_path / "a", tokenizer), layout_path=TINY)["losses"]

    def terminate(step):
        if step == 5:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives while the run is inside its loop
    with pytest.raises(Preempted) as stopped:
        run(layout(), config(tmp_path / "b", tokenizer, save_every=0), layout_path=TINY, on_step=terminate)
    assert stopped.value.reason == "SIGTERM" and stopped.value.step == 5
    assert stopped.value.checkpoint.endswith("step_00000005")
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is gone after the run
    resumed = run(layout(), config(tmp_path / "b", tokenizer), layout_path=TINY)["losses"]
    assert sorted(resumed) == list(range(5, 12))
    for step in range(5, 12):
        assert resumed[step] == full[step], step  # exact: fp32 on the CPU


def test_wall_time_limit_stops_with_a_checkpoint(tmp_path, tokenizer, monkeypatch):
    import training.faults as faults
    clock = iter(range(0, 10 ** 6, 10))  # every reading of the clock is 10 s later
    monkeypatch.setattr(faults.time, "monotonic", lambda: next(clock))
    with pytest.raises(Preempted) as stopped:
        run(layout(), config(tmp_path, tokenizer, max_wall_time="0:00:35"), layout_path=TINY)
    assert stopped.value.reason.startswith("train.max_wall_time") and 1 <= stopped.value.step < 12
    assert ckpt.latest(str(tmp_path / "checkpoints")) == stopped.value.checkpoint


def test_train_py_exits_75_and_a_second_signal_exits_at_once(tmp_path, tokenizer, monkeypatch, capsys):
    """train.py's main: one SIGTERM -> a checkpoint, its path printed, status 75, no traceback. In a real process,
    a second SIGTERM exits at once (status 128 + 15) without a checkpoint."""
    import training.loop as loop
    from hybrid.errors import cli
    import train
    orig = loop.Run.train_step

    def step(self):
        out = orig(self)
        if self.step == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return out
    monkeypatch.setattr(loop.Run, "train_step", step)
    args = [TINY, *SMALL_ARGS, f"train.out_dir={tmp_path / 'a'}", f"train.tokenizer={tokenizer}"]
    assert cli(train.main, args) == PREEMPTED
    out, err = capsys.readouterr()
    assert "SIGTERM: finishing this step" in err and "Traceback" not in err
    assert f"stopped by SIGTERM after step 4: checkpoint {tmp_path / 'a' / 'checkpoints' / 'step_00000004'}" in out
    args_b = [*args[:-2], f"train.out_dir={tmp_path / 'b'}", args[-1]]
    code = ("import os, signal, sys, train\n"
            "import training.loop as loop\n"
            "orig = loop.Run.train_step\n"
            "def step(self):\n"
            "    out = orig(self)\n"
            "    if self.step == 3:\n"
            "        os.kill(os.getpid(), signal.SIGTERM)\n"
            "        os.kill(os.getpid(), signal.SIGTERM)\n"
            "    return out\n"
            "loop.Run.train_step = step\n"
            f"sys.exit(train.main({args_b!r}))\n")
    twice = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": ROOT}, cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
    assert twice.returncode == 128 + signal.SIGTERM and "exiting now" in twice.stderr, twice.stderr[-2000:]
    assert ckpt.latest(str(tmp_path / "b" / "checkpoints")) is None


SMALL_ARGS = ["model.d_model=64", "model.vocab_size=384", "train.steps=8", "train.micro_batch=2",
              "train.seq_len=64", "train.save_every=0", "train.sample_tokens=0", "train.eval_batches=1",
              "train.log_every=100"] + [f"layers.{i}.d_ff=128" for i in range(6)]


def _poison_from(call: int, value: float, checks=None, last: int = 10 ** 9, engine=None, rank=None):
    """An engine's train_step (TorchEngine by default) whose gradients are `value` in its calls `call`..`last`
    (1-based), on every rank or only on `rank`; with a `checks` list, each poisoned call records whether the
    weights stayed as they were. tests/test_faults.py INJECT uses it in a launched process too."""
    if engine is None:
        from training.engines import TorchEngine as engine
    orig, calls = engine.train_step, [0]

    def step(self, micro_batches, lr):
        calls[0] += 1
        if not call <= calls[0] <= last or rank is not None and os.environ.get("RANK", "0") != str(rank):
            return orig(self, micro_batches, lr)
        before = None if checks is None else {k: v.clone() for k, v in self.model.state_dict().items()}
        handle = next(self.model.parameters()).register_hook(lambda g: torch.full_like(g, value))
        try:
            out = orig(self, micro_batches, lr)
        finally:
            handle.remove()
        if checks is not None:
            checks.append(all(torch.equal(v, before[k]) for k, v in self.model.state_dict().items()))
        return out
    return step


def test_injected_inf_step_is_skipped_counted_and_logged(tmp_path, tokenizer, monkeypatch, capsys):
    """Step 3's gradients are made infinite: the weights stay as they were, the step is counted in the log and
    the metrics, and the run goes on."""
    from training.engines import TorchEngine
    checks = []
    monkeypatch.setattr(TorchEngine, "train_step", _poison_from(4, math.inf, checks, last=4))
    out = run(layout(), config(tmp_path, tokenizer, log_every=1), layout_path=TINY)
    assert checks == [True]
    log = capsys.readouterr().out
    assert "non-finite steps skipped: 1" in log and "non-finite steps skipped" not in log.split("step     3/")[0]
    assert all(math.isfinite(out["losses"][s]) for s in range(12))
    metrics = [__import__("json").loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [m.get("bad_steps") for m in metrics if "loss" in m][2:4] == [0, 1]


def test_bad_steps_in_a_row_stop_the_run_with_a_clear_error(tmp_path, tokenizer, monkeypatch):
    """NaN gradients from step 3 on: each update skipped, and the fourth in a row stops the run naming the
    steps and the last checkpoint, whose weights are those after step 2."""
    from training.engines import TorchEngine
    checks = []
    monkeypatch.setattr(TorchEngine, "train_step", _poison_from(4, math.nan, checks))
    with pytest.raises(BadStepsError, match=r"4 steps in a row \(3-6\).*max_bad_steps=4.*step_00000006"):
        run(layout(), config(tmp_path, tokenizer, max_bad_steps=4, save_every=2, log_every=1), layout_path=TINY)
    assert checks == [True] * 4
    a, b = ckpt.complete(str(tmp_path / "checkpoints"))[-2:]
    from tests.test_train import _same_weights
    _same_weights(a, b)  # step 4's and step 6's checkpoints: nothing was applied in between


def test_bad_step_counter_and_durations():
    bad = BadSteps(3)
    assert not bad.record(0, 1.0, 1.0, None)
    assert bad.record(1, math.nan, 1.0, None) and bad.record(2, 1.0, math.inf, None)
    assert not bad.record(3, 1.0, 1.0, None) and bad.in_a_row == 0 and bad.total == 2
    for step in (4, 5):
        bad.record(step, math.nan, math.nan, "ck")
    with pytest.raises(BadStepsError, match=r"3 steps in a row \(4-6\).*skipped.*ck"):
        bad.record(6, math.nan, 1.0, "ck")
    assert parse_duration(None) is None and parse_duration("") is None
    assert parse_duration("5400") == 5400 and parse_duration(90.5) == 90.5
    assert parse_duration("1:30:00") == 5400 and parse_duration("45:00") == 2700
    assert parse_duration("2-00:00:10") == 2 * 86400 + 10
    for bad_value in ("soon", "-5", "0", "inf"):
        with pytest.raises(ConfigError, match="train.max_wall_time"):
            parse_duration(bad_value)


def test_stop_requests_restore_the_previous_handlers():
    previous = signal.getsignal(signal.SIGUSR1)
    stops = StopRequests().install()
    assert signal.getsignal(signal.SIGUSR1) != previous and stops.requested() is None
    os.kill(os.getpid(), signal.SIGUSR1)
    assert stops.requested() == "SIGUSR1"
    stops.restore()
    assert signal.getsignal(signal.SIGUSR1) == previous


def _flip_byte(path: str, offset: int = -100) -> None:
    with open(path, "r+b") as f:
        f.seek(offset, os.SEEK_END)
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 0xFF]))


def test_a_damaged_checkpoint_is_named_and_resume_falls_back_to_the_previous(tmp_path, tokenizer, capsys):
    from hybrid.errors import CheckpointError
    root = tmp_path / "checkpoints"
    run(layout(), config(tmp_path, tokenizer, save_every=4, keep_checkpoints=3), layout_path=TINY)
    step4, step8, step12 = ckpt.complete(str(root))
    manifest = __import__("json").load(open(os.path.join(step12, "manifest.json")))["files"]
    assert {"model.safetensors", "optimizer.safetensors", "rng_rank0.safetensors", "layout.yaml", "tokenizer.model"} <= set(manifest)
    _flip_byte(os.path.join(step12, "model.safetensors"))
    with open(os.path.join(step8, "optimizer.safetensors"), "r+b") as f:
        f.truncate(100)
    with pytest.raises(CheckpointError, match=r"step_00000012/model.safetensors: its sha256 differs"):
        ckpt.load_checkpoint(step12)
    with pytest.raises(CheckpointError, match=r"step_00000008/optimizer.safetensors: 100 bytes, the manifest says"):
        run(layout(), config(tmp_path, tokenizer, steps=16, resume=step8), layout_path=TINY)
    capsys.readouterr()
    resumed = run(layout(), config(tmp_path, tokenizer, steps=16, save_every=4, keep_checkpoints=3),
                  layout_path=TINY)
    out = capsys.readouterr().out
    assert "step_00000012/model.safetensors: its sha256 differs" in out and "step_00000008/optimizer.safetensors" in out
    assert f"resumed from {step4}" in out and sorted(resumed["losses"]) == list(range(4, 16))


def test_a_full_disk_during_a_save_keeps_the_previous_checkpoint(tmp_path, tokenizer, monkeypatch):
    import errno
    from hybrid.errors import CheckpointError
    orig, saves = ckpt.save_rng, []

    def full_disk(path, rank, state):
        saves.append(path)
        if len(saves) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", os.path.join(path, "rng_rank0.safetensors"))
        return orig(path, rank, state)
    monkeypatch.setattr(ckpt, "save_rng", full_disk)
    with pytest.raises(CheckpointError, match=r"step 8 failed: No space left on device .*step_00000004\) is intact"):
        run(layout(), config(tmp_path / "a", tokenizer, save_every=4), layout_path=TINY)
    root = tmp_path / "a" / "checkpoints"
    assert [os.path.basename(p) for p in ckpt.complete(str(root))] == ["step_00000004"]
    assert not [n for n in os.listdir(root) if n.startswith(".tmp")]
    saves.clear()
    out = run(layout(), config(tmp_path / "b", tokenizer, save_every=4, on_save_error="continue"), layout_path=TINY)
    assert [os.path.basename(p) for p in ckpt.complete(str(tmp_path / "b" / "checkpoints"))] == \
        ["step_00000004", "step_00000012"]
    assert out["checkpoint"].endswith("step_00000012")


@pytest.mark.skipif(__import__("importlib").util.find_spec("deepspeed") is None, reason="deepspeed not installed")
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_skips_a_non_finite_step_too(tmp_path, tokenizer, monkeypatch, stage, capsys):
    """Under DeepSpeed (one rank here; two ranks below) an infinite gradient makes its own overflow check skip
    the update; the loop counts it like the torch engine's."""
    from training.engines import DeepSpeedEngine
    monkeypatch.setenv("MASTER_PORT", str(29871 + stage))
    monkeypatch.setattr(DeepSpeedEngine, "train_step", _poison_from(3, math.inf, last=3, engine=DeepSpeedEngine))
    run(layout(), config(tmp_path, tokenizer, engine="deepspeed", zero_stage=stage, precision="fp32", steps=4,
                         save_every=1, keep_checkpoints=0, log_every=1), layout_path=TINY)
    assert "non-finite steps skipped: 1" in capsys.readouterr().out
    _same_zero_weights(tmp_path / "checkpoints", 2, 3)


def _same_zero_weights(root, *steps):
    """The ZeRO checkpoints of `steps`, consolidated, hold the same weights."""
    from tests.test_train import _same_weights
    paths = [os.path.join(str(root), f"step_{s:08d}") for s in steps]
    for p in paths:
        ckpt.consolidate(p)
    _same_weights(*paths)


INJECT = '''import math, os, runpy, sys
from tests.test_faults import _poison_from
from training.engines import DeepSpeedEngine
DeepSpeedEngine.train_step = _poison_from(3, math.inf, last=3, engine=DeepSpeedEngine, rank=1)  # rank 1's third step
sys.argv[0] = os.path.join(os.environ["BRAIDLM_ROOT"], "train.py")
runpy.run_path(sys.argv[0], run_name="__main__")
'''


@pytest.mark.cluster
@pytest.mark.skipif(__import__("importlib").util.find_spec("deepspeed") is None, reason="deepspeed not installed")
def test_an_inf_on_one_rank_is_skipped_on_every_rank(tmp_path, tokenizer):
    """Two ranks, ZeRO-2: rank 1's gradients are infinite at step 2. Both ranks skip the update (the weights
    saved after step 2 equal those after step 1) and the run goes on."""
    script = tmp_path / "inject.py"
    script.write_text(INJECT)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29881",
           str(script), TINY, "model.d_model=64", "model.vocab_size=384", "defaults.mlp.d_ff=128",
           "train.engine=deepspeed", "train.zero_stage=2", "train.precision=fp32", "train.micro_batch=2",
           "train.seq_len=64", "train.steps=4", "train.save_every=1", "train.keep_checkpoints=0", "train.log_every=1",
           "train.eval_every=4", "train.eval_batches=1", "train.sample_tokens=0", f"train.tokenizer={tokenizer}",
           f"train.out_dir={out}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "BRAIDLM_ROOT": ROOT, "PYTHONPATH": ROOT})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "non-finite steps skipped: 1" in proc.stdout
    _same_zero_weights(out / "checkpoints", 2, 3)


def test_a_loss_spike_rolls_back_and_skips_that_steps_data(tmp_path, tokenizer, monkeypatch, capsys):
    """A reported loss 10x the running mean at step 25 (after the spike check's 20-step warm-up): the run goes
    back to the checkpoint of step 24, redoes step 24, skips step 25's batch and goes on. From there it equals a
    run told to skip step 25's batch from the start (exact, fp32 on the CPU)."""
    import training.loop as loop
    from training.engines import TorchEngine
    orig, calls = TorchEngine.train_step, [0]

    def spiky(self, micro_batches, lr):
        calls[0] += 1
        loss, norm = orig(self, micro_batches, lr)
        return (loss * 10 if calls[0] == 26 else loss), norm
    monkeypatch.setattr(TorchEngine, "train_step", spiky)
    spiked = run(layout(), config(tmp_path / "a", tokenizer, steps=30, save_every=8, log_every=1, spike_factor=3),
                 layout_path=TINY)
    log = capsys.readouterr().out
    assert "loss spike at step 25" in log and "rolling back to" in log and "step_00000024" in log
    assert "step    25  data skipped" in log
    assert sorted(spiked["losses"]) == [s for s in range(30) if s != 25]
    monkeypatch.setattr(TorchEngine, "train_step", orig)
    init = loop.Run.__init__

    def skipping(self, *a, **k):
        init(self, *a, **k)
        self.skip_data.add(25)
    monkeypatch.setattr(loop.Run, "__init__", skipping)
    reference = run(layout(), config(tmp_path / "b", tokenizer, steps=30, save_every=8, log_every=1),
                    layout_path=TINY)
    assert spiked["losses"] == reference["losses"]
    monkeypatch.setattr(loop.Run, "__init__", init)
    calls[0] = 0
    monkeypatch.setattr(TorchEngine, "train_step", spiky)
    capsys.readouterr()
    capped = run(layout(), config(tmp_path / "c", tokenizer, steps=30, save_every=8, log_every=1, spike_factor=3,
                                  max_rollbacks=0), layout_path=TINY)
    assert "not rolled back (train.max_rollbacks=0 used)" in capsys.readouterr().out
    assert sorted(capped["losses"]) == list(range(30))
