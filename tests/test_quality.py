"""eval.quality on the CPU: a run trains a tiny layout on a prepared corpus with train.py, evaluates it at 1x-4x
the training length on the prepared held-out split and the text passkey, and writes quality.json; report turns
runs into the table and plots; bad options are refused naming them."""
import json
import math
import os

from eval import quality
from hybrid.errors import cli
from test_prepare import corpus, tokenizer  # noqa: F401  (fixtures: small mixed inputs and a tokenizer)
from training import prepare as prep

TINY = ["model.d_model=32", "defaults.mamba2.headdim=16", "defaults.attention.n_heads=2", "defaults.mlp.d_ff=64"]


def test_a_run_then_a_report(tmp_path, corpus, tokenizer, capsys):  # noqa: F811
    data = str(tmp_path / "prep")
    prep.prepare(corpus, data, tokenizer, workers=1, heldout_fraction=0.3, progress=False)
    runs = []
    for name, spec in (("hyb", "tiny:M2 Ag"), ("tf", "tiny:Ag Ag")):
        out = str(tmp_path / name)
        argv = ["run", spec, "--data", data, "--tokens", "256", "--seq-len", "32", "--micro-batch", "2", "--set",
                *TINY, "--passkey-trials", "1", "--max-eval-tokens", "256", "--device", "cpu", "--out", out]
        if name == "hyb":  # paused by --max-wall-time after its first step: status 75, no summary; rerun continues
            assert cli(quality.main, argv + ["--max-wall-time", "0.001"]) == quality.PAUSED
            assert "paused" in capsys.readouterr().out and not os.path.exists(os.path.join(out, "quality.json"))
            assert json.load(open(os.path.join(out, quality.CLOCK)))["seconds"] > 0
        if name == "tf":  # stops once one evaluation (one per step here) fails to beat the best
            argv += ["--early-stop", "1"]
        assert cli(quality.main, argv) == 0
        r = json.load(open(os.path.join(out, "quality.json")))
        assert r["non_embedding_params"] < r["params"]
        assert r["tokens"] == 256 if name == "hyb" else r["stopped_early"] == (r["tokens"] < 256)
        # the evaluated weights are those of the lowest held-out loss logged (curve steps count from 0)
        step, loss = min(r["curve"]["heldout"], key=lambda p: p[1])
        assert r["evaluated"]["checkpoint"] == "best" and r["evaluated"]["step"] == step + 1
        assert r["evaluated"]["loss"] == loss and r["evaluated"]["tokens"] == (step + 1) * 64
        assert r["data_tokens"] == json.load(open(os.path.join(data, "manifest.json")))["totals"]["train"]["tokens"]
        assert set(r["heldout"]) == {"1", "2", "4"} and r["heldout"]["4"]["window"] == 128
        assert all(0 < h["loss"] < 20 and h["by_position"] for h in r["heldout"].values())
        assert set(r["passkey"]) == {"1", "2", "4"} and r["curve"]["train"]
        runs.append(out)
    sweep = str(tmp_path / "sweep")
    assert cli(quality.main, ["sweep", "tiny:M2 Ag", "--data", data, "--tokens", "128", "--seq-len", "32",
                              "--micro-batch", "2", "--set", *TINY, "--lrs", "1e-3", "3e-3", "--parallel", "2",
                              "--out", sweep]) == 0
    s = json.load(open(os.path.join(sweep, "sweep.json")))
    assert set(s["runs"]) == {"0.001", "0.003"} and all(r["status"] == 0 for r in s["runs"].values())
    assert s["best_lr"] == min(s["runs"].values(), key=lambda r: r["heldout_loss"])["lr"]
    md = str(tmp_path / "quality.md")
    assert cli(quality.main, ["report", *runs, "--sweeps", sweep, "--out", md]) == 0
    text_md = open(md).read()
    assert "| tiny:M2 Ag |" in text_md and "| tiny:Ag Ag |" in text_md and "held-out ppl 4x" in text_md
    assert "| warm-up |" in text_md and "| 10% |" in text_md and "| best (0M" in text_md
    epochs = f"| {256 / r['data_tokens']:.1f} |"  # tokens over the prepared corpus' train tokens
    best = min(r["curve"]["heldout"], key=lambda p: p[1])  # the last run's lowest held-out loss in training
    assert "| epochs |" in text_md and epochs in text_md and f"{math.exp(best[1]):.2f} (" in text_md
    assert "Learning-rate sweep" in text_md and "**" in text_md
    if "Plots not drawn" not in text_md:  # with matplotlib: train loss, held-out perplexity by tokens, by position
        for name in ("loss", "heldout", "by_position"):
            assert os.path.isfile(str(tmp_path / f"quality_{name}.png")), name


def test_a_sweep_whose_runs_all_fail_names_them(tmp_path, corpus, tokenizer, capsys):  # noqa: F811
    data = str(tmp_path / "prep")
    prep.prepare(corpus, data, tokenizer, workers=1, heldout_fraction=0.3, progress=False)
    out = str(tmp_path / "sweep")
    assert cli(quality.main, ["sweep", "tiny", "--data", data, "--tokens", "64", "--seq-len", "32", "--set",
                              "model.d_model=-1", "--lrs", "1e-3", "--out", out]) == 2
    assert "no run finished" in capsys.readouterr().err
    assert not os.path.exists(os.path.join(out, "sweep.json"))
    assert "d_model" in open(os.path.join(out, "lr0.001", "train.log")).read()


def test_bad_options_are_named(tmp_path, capsys):
    assert cli(quality.main, ["run", "tiny", "--data", str(tmp_path), "--tokens", "10", "--out", "x"]) == 2
    assert "--data" in capsys.readouterr().err
    assert cli(quality.main, ["run", "tiny", "--data", str(tmp_path), "--tokens", "0", "--out", "x"]) == 2
    assert "--tokens 0" in capsys.readouterr().err
    assert cli(quality.main, ["report", str(tmp_path), "--out", str(tmp_path / "q.md")]) == 2
    assert "quality.json" in capsys.readouterr().err
    (tmp_path / "manifest.json").write_text("{}")
    assert cli(quality.main, ["run", "tiny", "--data", str(tmp_path), "--tokens", "10", "--out", "x",
                              "--max-wall-time", "soon"]) == 2
    assert "--max-wall-time soon" in capsys.readouterr().err
    assert cli(quality.main, ["run", "tiny", "--data", str(tmp_path), "--tokens", "10", "--out", "x",
                              "--early-stop", "-1"]) == 2
    assert "--early-stop -1" in capsys.readouterr().err
    assert cli(quality.main, ["sweep", "tiny", "--data", str(tmp_path), "--tokens", "10", "--out", "x",
                              "--lrs", "1e-3", "-1"]) == 2
    assert "--lrs -1" in capsys.readouterr().err
    assert cli(quality.main, ["sweep", "tiny", "--data", str(tmp_path), "--tokens", "10", "--out", "x",
                              "--lrs", "1e-3", "--warmup-fraction", "1.5"]) == 2
    assert "--warmup-fraction 1.5" in capsys.readouterr().err


def test_the_warm_up_is_a_fraction_of_the_steps(tmp_path):
    (tmp_path / "manifest.json").write_text("{}")
    args = quality.parse_args(["run", "tiny", "--data", str(tmp_path), "--tokens", str(100 * 64 * 8), "--seq-len", "64",
                               "--micro-batch", "8", "--out", "x"])
    assert "train.warmup=10" in quality.train_command(args) and "train.steps=100" in quality.train_command(args)
    args.warmup_fraction = 0.0
    assert "train.warmup=1" in quality.train_command(args)  # at least one step
    assert "train.keep_best=true" in quality.train_command(args) and "train.early_stop=0" in quality.train_command(args)
    sweep = quality.parse_args(["sweep", "tiny", "--data", str(tmp_path), "--tokens", "6400", "--lrs", "1e-3",
                                "--out", "x"])
    sweep.lr = 1e-3  # as _start sets it for each of --lrs
    assert not any("keep_best" in a or "early_stop" in a for a in quality.train_command(sweep))  # short runs: none


def test_an_interrupted_sweep_leaves_no_run_behind(tmp_path, monkeypatch):
    import subprocess
    import sys
    import pytest
    started = []

    def start(args, lr):
        proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        started.append(proc)
        return lr, str(tmp_path), proc, open(tmp_path / f"{lr}.log", "w"), 0.0

    def interrupted(_):
        raise KeyboardInterrupt("a time limit's SIGTERM")
    monkeypatch.setattr(quality, "_start", start)
    monkeypatch.setattr(quality.time, "sleep", interrupted)
    (tmp_path / "manifest.json").write_text("{}")
    with pytest.raises(KeyboardInterrupt):
        quality.sweep(quality.parse_args(["sweep", "tiny", "--data", str(tmp_path), "--tokens", "64", "--lrs", "1e-3",
                                          "2e-3", "--parallel", "2", "--out", str(tmp_path)]))
    assert len(started) == 2 and all(p.poll() is not None for p in started)


def _sweep_file(path, layout, runs, parallel=1):
    """A sweep.json as `eval.quality sweep` writes it: runs {lr: (status, held-out loss)}."""
    ok = {lr: loss for lr, (status, loss) in runs.items() if status == 0}
    data = {"layout": layout, "set": ["model.d_model=64"], "tokens": 1000, "seq_len": 32, "micro_batch": 2,
            "warmup_fraction": 0.1, "parallel": parallel,
            "runs": {repr(lr): {"lr": lr, "status": status, "seconds": 1.0, "train_loss": loss, "heldout_loss": loss,
                                "steps": 10} for lr, (status, loss) in runs.items()},
            "best_lr": min(ok, key=ok.get) if ok else None}
    with open(path, "w") as f:
        json.dump(data, f)
    return str(path)


def test_sweeps_of_one_model_at_other_lrs_share_a_row_and_its_best(tmp_path):
    # a first sweep at 1e-3 / 2e-3, a later one at 5e-4 (best in its own file, worse than 1e-3 overall)
    a = _sweep_file(tmp_path / "a.json", "m:M2", {1e-3: (0, 4.0), 2e-3: (0, 4.2)})
    b = _sweep_file(tmp_path / "b.json", "m:M2", {5e-4: (0, 4.1)}, parallel=2)
    c = _sweep_file(tmp_path / "c.json", "t:Ag", {5e-4: (0, 4.5), 1e-3: (1, None)})
    run = {"layout": "m:M2", "set": ["model.d_model=64"], "lr": 1e-3}  # the table's run of m:M2 (no run of t:Ag)
    text = quality.sweep_table([a, b, c], [run])
    rows = [line for line in text.splitlines() if line.startswith("| m:M2") or line.startswith("| t:Ag")]
    assert len(rows) == 2, text
    m_row = rows[0].split("|")
    # columns: layout, tokens, lr 5e-4, lr 1e-3, lr 2e-3
    assert m_row[3].strip() == f"{math.exp(4.1):.2f}" and m_row[4].strip() == f"**{math.exp(4.0):.2f}**"
    assert m_row[5].strip() == f"{math.exp(4.2):.2f}" and m_row[6].strip() == "0.001"  # the run's lr
    t_row = rows[1].split("|")
    assert t_row[3].strip() == f"**{math.exp(4.5):.2f}**" and t_row[4].strip() == "failed (1)"
    assert t_row[6].strip() == ""
    assert "up to 2 runs at once" in text
    # another token count is another sweep: its own row
    d = _sweep_file(tmp_path / "d.json", "m:M2", {5e-4: (0, 3.0)})
    with open(d) as f:
        data = json.load(f)
    data["tokens"] = 2000
    with open(d, "w") as f:
        json.dump(data, f)
    assert len([line for line in quality.sweep_table([a, d]).splitlines() if line.startswith("| m:M2")]) == 2
