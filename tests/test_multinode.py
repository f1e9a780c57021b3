"""Launches the way a cluster does, on one CPU machine: the `deepspeed` launcher with a hostfile and --no_ssh per
"node" (gloo), two nodes of two ranks; then a resume on one node of two ranks; and a rank killed with SIGKILL
mid-run, after which the other ranks exit instead of hanging and a restart resumes from the last checkpoint."""
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from training import checkpoint as ckpt

pytestmark = [pytest.mark.cluster,  # about two minutes: `python -m pytest -q -m cluster` (.ci/run runs it)
              pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed not installed")]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = ["layouts/tiny.yaml", "model.d_model=64", "model.vocab_size=384", "defaults.mlp.d_ff=128"]


def launcher(hostfile, node_rank, port, out, tokenizer, *train):
    """One node's `deepspeed --hostfile H --no_ssh --node_rank N` command, as the README's multi-node section
    gives it."""
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", str(hostfile), "--no_ssh",
            "--node_rank", str(node_rank), "--master_addr", "127.0.0.1", "--master_port", str(port),
            "train.py", *MODEL, "train.micro_batch=2", "train.seq_len=64", "train.eval_batches=1",
            "train.sample_tokens=0", "train.precision=fp32", "train.threads=1", f"train.tokenizer={tokenizer}",
            f"train.out_dir={out}", *train]


def nodes(tmp_path, *slots):
    hostfile = tmp_path / f"hostfile{len(slots)}"
    hostfile.write_text("".join(f"node{i} slots={n}\n" for i, n in enumerate(slots)))
    return hostfile


def launch_all(hostfile, n_nodes, port, out, tokenizer, *train, timeout=300):
    procs = [subprocess.Popen(launcher(hostfile, i, port, out, tokenizer, *train), cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for i in range(n_nodes)]
    logs = [p.communicate(timeout=timeout)[0] for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-4000:]
    return logs


def test_two_nodes_of_two_ranks_train_save_and_resume_on_one_node(tmp_path, tokenizer):
    out = tmp_path / "run"
    logs = launch_all(nodes(tmp_path, 2, 2), 2, 29841, out, tokenizer, "train.steps=2", "train.eval_every=2")
    assert "engine deepspeed ZeRO-2, fp32, 4 x cpu" in logs[0]
    first = ckpt.latest(str(out / "checkpoints"))
    meta = json.load(open(os.path.join(first, "trainer.json")))
    assert meta["world_size"] == 4 and len({json.dumps(r) for r in meta["data_rng"]}) == 4  # a sampler per rank
    from hybrid import HybridLM, load_layout
    ckpt.load_model(HybridLM(load_layout(os.path.join(ROOT, MODEL[0]), MODEL[1:])),  # consolidated at the end
                    os.path.join(first, "model.safetensors"))
    assert len([f for f in os.listdir(os.path.join(first, "zero", "zero")) if "optim_states" in f]) == 4  # a part per rank
    logs = launch_all(nodes(tmp_path, 2), 1, 29843, out, tokenizer, "train.steps=3", "train.eval_every=3")
    assert f"resumed from {first} at step 2 on 2 ranks (saved by 4)" in logs[0], logs[0][-3000:]
    assert ckpt.latest(str(out / "checkpoints")).endswith("step_00000003")


def _rank_pid(out, local_rank: int):
    """The pid of the train.py process of `local_rank` writing to `out`."""
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                cmd = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
            except OSError:
                continue
            if f"--local_rank={local_rank}".encode() in cmd and f"train.out_dir={out}".encode() in cmd:
                return int(pid)
    return None


def _steps_logged(out) -> list:
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    return [m["step"] for m in map(json.loads, path.read_text().splitlines()) if "loss" in m]


def test_a_killed_rank_ends_the_run_and_a_restart_resumes(tmp_path, tokenizer):
    """SIGKILL of rank 1 mid-run: rank 0 and the launcher exit within a minute (no hang in a collective); the
    same command then resumes from the last checkpoint and the logged steps continue from it."""
    out = tmp_path / "run"
    hostfile = nodes(tmp_path, 2)
    train = ["train.steps=400", "train.save_every=3", "train.log_every=1", "train.eval_every=1000"]
    proc = subprocess.Popen(launcher(hostfile, 0, 29845, out, tokenizer, *train), cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 240
    while time.time() < deadline and (len(_steps_logged(out)) < 5 or ckpt.latest(str(out / "checkpoints")) is None):
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        time.sleep(0.2)
    pid = _rank_pid(out, 1)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    killed_at = time.time()
    log = proc.communicate(timeout=120)[0]
    assert proc.returncode != 0 and time.time() - killed_at < 90, log[-3000:]
    assert _rank_pid(out, 0) is None  # no rank left behind
    last = ckpt.latest(str(out / "checkpoints"))
    saved_step = int(last[-8:])
    done = max(_steps_logged(out))
    resumed = subprocess.run(launcher(hostfile, 0, 29847, out, tokenizer, f"train.steps={saved_step + 2}", *train[1:]),
                             cwd=ROOT, text=True, capture_output=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"resumed from {last} at step {saved_step}" in resumed.stdout
    steps = _steps_logged(out)
    assert steps[-2:] == [saved_step, saved_step + 1] and done >= saved_step - 1  # step_N: steps 0..N-1 done
