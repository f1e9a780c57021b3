"""train.py / training/ on CPU: loss falls, exact resume, crash-safe saves, DeepSpeed ZeRO on gloo."""
import importlib.util
import json
import math
import os

import pytest
import torch
from omegaconf import OmegaConf

from training import checkpoint as ckpt
from hybrid import load_layout
from hybrid.errors import ConfigError
from training.config import RunConfig
from training.engines import TorchEngine
from training.loop import run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "layouts", "tiny.yaml")
SMALL = ["model.d_model=64", "model.vocab_size=384", "layers.0.d_ff=128", "layers.1.d_ff=128", "layers.2.d_ff=128",
         "layers.3.d_ff=128", "layers.4.d_ff=128", "layers.5.d_ff=128"]


def config(out_dir, tokenizer, **train):
    base = dict(steps=12, micro_batch=2, seq_len=64, lr=3e-3, warmup=3, out_dir=str(out_dir), tokenizer=tokenizer,
                log_every=100, eval_every=100, eval_batches=2, sample_tokens=0, save_every=0)
    base.update(train)
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(RunConfig(name="t")), {"train": base}))


def layout():
    return load_layout(TINY, SMALL)


def test_loss_falls(tmp_path, tokenizer):
    out = run(layout(), config(tmp_path, tokenizer, steps=30, eval_every=30), layout_path=TINY)
    losses = [out["losses"][s] for s in sorted(out["losses"])]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5
    assert out["heldout_loss"] < losses[0]
    metrics = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert any("heldout_loss" in m for m in metrics)


class Stop(Exception):
    pass


def test_interrupted_and_resumed_equals_uninterrupted(tmp_path, tokenizer):
    full = run(layout(), config(tmp_path / "a", tokenizer), layout_path=TINY)["losses"]

    def crash(step):
        if step == 7:
            raise Stop
    with pytest.raises(Stop):
        run(layout(), config(tmp_path / "b", tokenizer, save_every=3), layout_path=TINY, on_step=crash)
    assert ckpt.latest(str(tmp_path / "b" / "checkpoints")).endswith("step_00000006")
    resumed = run(layout(), config(tmp_path / "b", tokenizer, save_every=3), layout_path=TINY)["losses"]
    assert sorted(resumed) == list(range(6, 12))
    for step in range(6, 12):
        assert resumed[step] == full[step], (step, resumed[step], full[step])  # exact, fp32 on CPU


def test_epoch_sampler_resumes_exactly_mid_epoch(tmp_path, tokenizer):
    """train.sampler=epoch: an interrupted run continues with the next windows of the epoch, losses equal."""
    kw = dict(sampler="epoch")  # 64-token windows, 2 a step: the 12 steps stay inside the first epoch
    full = run(layout(), config(tmp_path / "a", tokenizer, **kw), layout_path=TINY)["losses"]

    def crash(step):
        if step == 5:
            raise Stop
    with pytest.raises(Stop):
        run(layout(), config(tmp_path / "b", tokenizer, save_every=4, **kw), layout_path=TINY, on_step=crash)
    resumed = run(layout(), config(tmp_path / "b", tokenizer, save_every=4, **kw), layout_path=TINY)["losses"]
    assert sorted(resumed) == list(range(4, 12))
    assert all(resumed[s] == full[s] for s in range(4, 12))


def test_epoch_windows_are_disjoint_over_ranks_and_cover_the_epoch():
    import numpy as np
    from training.data import EpochSampler, TokenStream
    stream = TokenStream(np.arange(1001), np.array([0]))
    sampler = EpochSampler(stream, seq_len=10, seed=3)  # 100 windows
    world, rows = 2, 5
    seen = []
    for step in range(10):  # one epoch: 10 steps x 2 ranks x 5 rows
        for rank in range(world):
            seen += sampler.starts(step * world * rows + rank * rows, rows).tolist()
    assert sorted(seen) == [10 * w for w in range(100)]
    nxt = sampler.starts(100, 100)  # the next epoch: every window again, in another order
    assert sorted(nxt.tolist()) == sorted(seen) and nxt.tolist() != seen
    assert sampler.starts(37, 6).tolist() == seen[37:43]  # a resume mid-epoch continues exactly
    with pytest.raises(Exception, match="too few"):
        EpochSampler(TokenStream(np.arange(5), np.array([0])), seq_len=10, seed=0)


def test_killed_save_keeps_the_last_good_checkpoint(tmp_path, tokenizer, monkeypatch):
    cfg = config(tmp_path, tokenizer, steps=4, save_every=2)
    run(layout(), cfg, layout_path=TINY)
    good = ckpt.latest(str(tmp_path / "checkpoints"))
    assert good.endswith("step_00000004")
    real_save = TorchEngine.save

    def dies_midway(self, path):
        real_save(self, path)
        with open(os.path.join(path, "model.safetensors"), "r+b") as f:
            f.truncate(100)  # a torn write
        raise Stop
    monkeypatch.setattr(TorchEngine, "save", dies_midway)
    with pytest.raises(Stop):
        run(layout(), config(tmp_path, tokenizer, steps=6, save_every=2), layout_path=TINY)
    assert ckpt.latest(str(tmp_path / "checkpoints")) == good
    assert any(n.startswith(".tmp-") for n in os.listdir(tmp_path / "checkpoints"))
    model = __import__("hybrid").HybridLM(layout())
    ckpt.load_model(model, os.path.join(good, "model.safetensors"))  # still loadable
    monkeypatch.setattr(TorchEngine, "save", real_save)
    out = run(layout(), config(tmp_path, tokenizer, steps=6, save_every=2), layout_path=TINY)
    assert sorted(out["losses"]) == [4, 5]
    assert not any(n.startswith(".tmp-") for n in os.listdir(tmp_path / "checkpoints"))


def test_early_stop_keeps_the_best_weights_and_survives_a_resume(tmp_path, tokenizer, monkeypatch):
    """train.keep_best writes the weights of the lowest held-out loss to out_dir/best; train.early_stop=2 ends the
    run after two evaluations without a new best, also across an interruption; a rerun has nothing to train."""
    from safetensors.torch import load_file
    from training.loop import Run
    script = {1: 5.0, 2: 4.0, 3: 4.5, 4: 4.2, 5: 3.9, 6: 3.0}  # held-out loss after each step
    monkeypatch.setattr(Run, "evaluate", lambda self: script.get(self.step, 3.5))
    kw = dict(eval_every=1, save_every=1, keep_checkpoints=0, keep_best=True)
    out = run(layout(), config(tmp_path / "a", tokenizer, early_stop=2, **kw), layout_path=TINY)
    assert out["stopped_early"] and out["tokens"] == 4 * 2 * 64 and sorted(out["losses"]) == [0, 1, 2, 3]
    assert out["heldout_best"] == {"loss": 4.0, "step": 2, "tokens": 2 * 2 * 64, "since": 2}
    logged = [json.loads(line) for line in open(tmp_path / "a" / "metrics.jsonl")]
    assert {"step": 3, "early_stop": True, "best_step": 2, "best_heldout_loss": 4.0}.items() <= logged[-1].items()
    root = str(tmp_path / "a" / "checkpoints")
    assert ckpt.latest(root).endswith("step_00000004") and ckpt.read_meta(ckpt.latest(root))["stopped_early"]
    best, info = ckpt.read_best(str(tmp_path / "a"))
    assert info == {"loss": 4.0, "step": 2, "tokens": 256}
    at_two = load_file(os.path.join(root, "step_00000002", "model.safetensors"))
    for name, value in load_file(os.path.join(best, "model.safetensors")).items():
        assert torch.equal(value, at_two[name]), name  # the weights after step 2, not the last ones
    model, tok = ckpt.load_checkpoint(best)
    assert tok is not None and model.layout.n_layers == layout().n_layers
    again = run(layout(), config(tmp_path / "a", tokenizer, early_stop=2, **kw), layout_path=TINY)
    assert again["losses"] == {} and again["tokens"] == out["tokens"] and again["stopped_early"]
    on = run(layout(), config(tmp_path / "a", tokenizer, early_stop=0, **kw), layout_path=TINY)  # continue it
    assert not on["stopped_early"] and sorted(on["losses"]) == list(range(4, 12))
    assert ckpt.read_best(str(tmp_path / "a"))[1]["step"] == 6  # 3.0, after step 6

    def crash(step):  # after step 3's evaluation (one without a new best) and its checkpoint
        if step == 3:
            raise Stop
    with pytest.raises(Stop):
        run(layout(), config(tmp_path / "b", tokenizer, early_stop=2, **kw), layout_path=TINY, on_step=crash)
    resumed = run(layout(), config(tmp_path / "b", tokenizer, early_stop=2, **kw), layout_path=TINY)
    assert resumed["stopped_early"] and sorted(resumed["losses"]) == [3] and resumed["tokens"] == out["tokens"]
    assert ckpt.read_best(str(tmp_path / "b"))[1] == info
    full = run(layout(), config(tmp_path / "c", tokenizer, steps=8, **kw), layout_path=TINY)  # no early stop
    assert not full["stopped_early"] and len(full["losses"]) == 8
    assert ckpt.read_best(str(tmp_path / "c"))[1]["step"] == 6


def test_bad_config_is_a_clear_error(tmp_path, tokenizer):
    with pytest.raises(ConfigError, match="train.early_stop"):
        run(layout(), config(tmp_path, tokenizer, early_stop=-1), layout_path=TINY)
    with pytest.raises(ConfigError, match="train.zero_stage=5"):
        run(layout(), config(tmp_path, tokenizer, zero_stage=5), layout_path=TINY)
    with pytest.raises(ConfigError, match="not a complete checkpoint"):
        run(layout(), config(tmp_path, tokenizer, resume=str(tmp_path / "nope")), layout_path=TINY)


def test_cli_print_config_and_errors(capsys):
    import train
    assert train.main([TINY, "train.steps=7", "model.d_model=64", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "steps: 7" in out and "d_model: 64" in out and "zero_optimization" in out
    with pytest.raises(ConfigError):
        train.main([TINY, "train.no_such_key=1"])


def test_own_corpus_jsonl(tmp_path, tokenizer):
    from training.data import load_texts
    path = tmp_path / "c.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"document number {i} " * 20}) for i in range(40)))
    assert len(load_texts(str(path))) == 40
    out = run(layout(), config(tmp_path / "run", tokenizer, steps=2, data=str(path)), layout_path=TINY)
    assert len(out["losses"]) == 2
    (tmp_path / "bad.jsonl").write_text('{"txt": 1}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        load_texts(str(tmp_path / "bad.jsonl"))


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed not installed")
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_on_cpu_resumes_and_consolidates(tmp_path, tokenizer, stage, monkeypatch):
    """DeepSpeed's CPU accelerator with gloo, one process: ZeRO trains, resumes exactly, consolidates."""
    monkeypatch.setenv("MASTER_PORT", str(29600 + stage))
    kw = dict(engine="deepspeed", zero_stage=stage, precision="fp32", steps=6, keep_best=True)
    full = run(layout(), config(tmp_path / "a", tokenizer, **kw), layout_path=TINY)

    def crash(step):
        if step == 3:
            raise Stop
    with pytest.raises(Stop):
        run(layout(), config(tmp_path / "b", tokenizer, save_every=3, **kw), layout_path=TINY, on_step=crash)
    resumed = run(layout(), config(tmp_path / "b", tokenizer, save_every=3, **kw), layout_path=TINY)
    for step in range(3, 6):
        assert resumed["losses"][step] == pytest.approx(full["losses"][step], rel=1e-5, abs=1e-6)
    final = full["checkpoint"]
    assert os.path.exists(os.path.join(final, "model.safetensors"))  # consolidated at the end
    model = __import__("hybrid").HybridLM(layout())
    ckpt.load_model(model, os.path.join(final, "model.safetensors"))
    trained = full["model"].state_dict()
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value.float(), trained[name].float(), rtol=0, atol=0, msg=name)
    best, info = ckpt.read_best(str(tmp_path / "a"))  # one held-out evaluation, at the end: the final weights
    assert info["step"] == 6
    kept = __import__("hybrid").HybridLM(layout())
    ckpt.load_model(kept, os.path.join(best, "model.safetensors"))  # ZeRO-3: gathered, not the empty partitions
    for name, value in kept.state_dict().items():
        torch.testing.assert_close(value, model.state_dict()[name], rtol=0, atol=0, msg=name)


def test_packed_batch_loss_equals_documents_run_alone():
    """A packed row's per-document losses equal each document run alone (state resets, attention masks)."""
    import numpy as np
    import torch.nn.functional as F
    from hybrid import HybridLM
    from training.data import TokenStream, packed_batch
    torch.manual_seed(0)
    model = HybridLM(layout()).double().eval()
    g = np.random.default_rng(0)
    docs = [list(g.integers(4, 384, size=n)) for n in (9, 30, 5, 20)]
    stream = TokenStream.from_docs(docs, eos_id=3)
    ids, targets, seq_idx = packed_batch(stream, np.array([0]), len(stream) - 1)
    with torch.no_grad():
        logits = model(ids, seq_idx=seq_idx)
        token_loss = F.cross_entropy(logits[0], targets[0], ignore_index=-100, reduction="none")
        for d, doc in enumerate(docs):
            toks = torch.tensor([doc + [3]])
            alone = F.cross_entropy(model(toks[:, :-1])[0], toks[0, 1:], reduction="none")
            packed = token_loss[seq_idx[0] == d][: len(doc)]
            torch.testing.assert_close(packed, alone, rtol=1e-9, atol=1e-9)


def test_activation_checkpointing_gives_the_same_gradients():
    from hybrid import HybridLM, lm_loss
    torch.manual_seed(0)
    model = HybridLM(layout()).double()
    ids = torch.randint(0, 384, (2, 40))
    seq_idx = (torch.arange(40) >= 17).int().expand(2, 40)
    grads = []
    for recompute in (False, True):
        model.zero_grad()
        model.activation_checkpointing = recompute
        lm_loss(model(ids[:, :-1], seq_idx=seq_idx[:, :-1]), ids[:, 1:]).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_tokenizer_vocab_is_an_upper_bound(tmp_path, capsys):
    from training.tokenizer import Tokenizer
    tok = Tokenizer.train(["a small corpus, far too small for many pieces. " * 3] * 5, 5000, str(tmp_path / "t.model"))
    assert 260 < tok.vocab_size < 5000 and "at most" in capsys.readouterr().out


def test_init_from_loads_weights_and_starts_fresh(tmp_path, tokenizer):
    first = run(layout(), config(tmp_path / "a", tokenizer, steps=2), layout_path=TINY)
    out = run(layout(), config(tmp_path / "b", tokenizer, steps=0, init_from=first["checkpoint"]), layout_path=TINY)
    for (name, a), b in zip(out["model"].state_dict().items(), first["model"].state_dict().values()):
        assert torch.equal(a, b), name
    with pytest.raises(ConfigError, match="init_from"):
        run(layout(), config(tmp_path / "c", tokenizer, init_from=str(tmp_path / "none")), layout_path=TINY)


def _two_ranks(out, tokenizer, port, *overrides):
    """train.py on two gloo ranks (torch.distributed.run) under DeepSpeed, fp32."""
    import subprocess
    import sys
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           os.path.join(ROOT, "train.py"), TINY, *SMALL, "train.engine=deepspeed", "train.micro_batch=2",
           "train.seq_len=64", f"train.out_dir={out}", f"train.tokenizer={tokenizer}", "train.sample_tokens=0",
           "train.precision=fp32", *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


def _same_weights(a: str, b: str) -> None:
    from hybrid import HybridLM
    ma, mb = HybridLM(layout()), HybridLM(layout())
    ckpt.load_model(ma, os.path.join(a, "model.safetensors"))
    ckpt.load_model(mb, os.path.join(b, "model.safetensors"))
    sb = mb.state_dict()
    for name, value in ma.state_dict().items():
        torch.testing.assert_close(value, sb[name], rtol=0, atol=0, msg=name)


@pytest.mark.cluster  # launches 2 ranks as processes (~30 s): `python -m pytest -q -m cluster` (.ci/run runs it)
@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed not installed")
@pytest.mark.parametrize("stage", [3])  # ZeRO-2 regrouping: tests/test_multinode.py (4 ranks -> 2) and below
def test_zero_checkpoint_of_two_ranks_resumes_on_one(tmp_path, tokenizer, stage, monkeypatch):
    """Saved by 2 ranks, resumed by 1 through DeepSpeed's universal checkpoint: at lr 0 the weights after two
    more steps are exactly the 2-rank checkpoint's, so they were loaded (a fresh init would differ); the
    step count carries on and the new checkpoint records 1 rank."""
    _two_ranks(tmp_path / "two", tokenizer, 29741 + stage, f"train.zero_stage={stage}", "train.steps=3")
    saved = ckpt.latest(str(tmp_path / "two" / "checkpoints"))
    monkeypatch.setenv("MASTER_PORT", str(29751 + stage))
    out = run(layout(), config(tmp_path / "one", tokenizer, engine="deepspeed", zero_stage=stage, precision="fp32",
                               steps=5, lr=0.0, resume=saved), layout_path=TINY)
    assert sorted(out["losses"]) == [3, 4] and all(math.isfinite(v) for v in out["losses"].values())
    meta = json.load(open(os.path.join(out["checkpoint"], "trainer.json")))
    assert meta["step"] == 5 and meta["world_size"] == 1
    assert os.path.isdir(tmp_path / "one" / "universal" / os.path.basename(saved) / "zero" / "zero")
    _same_weights(saved, out["checkpoint"])


@pytest.mark.cluster  # launches 2 ranks as processes (~25 s)
@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed not installed")
def test_zero_checkpoint_of_one_rank_resumes_on_two(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setenv("MASTER_PORT", "29761")
    first = run(layout(), config(tmp_path / "one", tokenizer, engine="deepspeed", zero_stage=2, precision="fp32",
                                 steps=3), layout_path=TINY)
    log = _two_ranks(tmp_path / "two", tokenizer, 29762, "train.zero_stage=2", "train.steps=5", "train.lr=0",
                     f"train.resume={first['checkpoint']}")
    assert "on 2 ranks (saved by 1)" in log and "global batch 2 -> 4 rows" in log
    final = ckpt.latest(str(tmp_path / "two" / "checkpoints"))
    assert json.load(open(os.path.join(final, "trainer.json")))["world_size"] == 2
    _same_weights(first["checkpoint"], final)


@pytest.mark.cluster  # launches 2 ranks as processes (~25 s)
@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed not installed")
def test_best_weights_and_early_stop_on_two_zero3_ranks(tmp_path, tokenizer):
    """train.keep_best gathers ZeRO-3's partitioned weights from both ranks, and the ranks stop together."""
    out = tmp_path / "two"
    log = _two_ranks(out, tokenizer, 29771, "train.zero_stage=3", "train.steps=6", "train.eval_every=1",
                     "train.save_every=1", "train.keep_checkpoints=0", "train.keep_best=true", "train.early_stop=1")
    best, info = ckpt.read_best(str(out))
    assert "best held-out loss so far" in log
    meta = ckpt.read_meta(ckpt.latest(str(out / "checkpoints")))
    assert meta["heldout_best"]["step"] == info["step"] and meta["stopped_early"] == (meta["step"] < 6)
    at_best = os.path.join(str(out / "checkpoints"), f"step_{info['step']:08d}")
    if not os.path.isfile(os.path.join(at_best, "model.safetensors")):
        ckpt.consolidate(at_best)
    _same_weights(at_best, best)


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed not installed")
def test_regrouped_resume_refuses_a_torch_checkpoint_under_deepspeed(tmp_path, tokenizer, monkeypatch):
    first = run(layout(), config(tmp_path / "t", tokenizer, engine="torch", steps=2), layout_path=TINY)
    meta_path = os.path.join(first["checkpoint"], "trainer.json")
    meta = json.load(open(meta_path))
    meta["world_size"] = 2        # as if saved by two torch ranks
    json.dump(meta, open(meta_path, "w"))
    monkeypatch.setenv("MASTER_PORT", "29771")
    with pytest.raises(ConfigError, match="cannot read its optimizer state"):
        run(layout(), config(tmp_path / "d", tokenizer, engine="deepspeed", zero_stage=2, precision="fp32",
                             steps=4, resume=first["checkpoint"]), layout_path=TINY)


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed not installed")
def test_readme_launcher_commands_and_hostfile_parse(tmp_path):
    """Every `deepspeed ...` command in the README parses with DeepSpeed's launcher, hands train.py our
    arguments unchanged, and parses with train.py itself; the documented hostfile format parses."""
    import shlex
    from deepspeed.launcher import runner
    import train
    lines = [line.strip() for line in open(os.path.join(ROOT, "README.md")) if line.startswith("deepspeed ")]
    assert len(lines) >= 3
    for line in lines:
        argv = shlex.split(line.split("#")[0])[1:]
        args = runner.parse_args(argv)
        assert args.user_script == "train.py"
        parsed, conf, layout_over = train.parse(["--local_rank=0", *args.user_args])
        assert os.path.exists(os.path.join(ROOT, parsed.layout)) and conf.train.zero_stage in (1, 2, 3)
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# hostname slots=GPUs\nnode-a slots=8\nnode-b slots=8\n")
    assert dict(runner.fetch_hostfile(str(hostfile))) == {"node-a": 8, "node-b": 8}


def test_generated_deepspeed_config_overlaps_communication_only_across_ranks():
    from training.config import TrainConfig
    from training.engines import DeepSpeedEngine
    cfg = TrainConfig()
    assert DeepSpeedEngine.config(cfg, True, world_size=1)["zero_optimization"]["overlap_comm"] is False
    assert DeepSpeedEngine.config(cfg, True, world_size=8)["zero_optimization"]["overlap_comm"] is True
