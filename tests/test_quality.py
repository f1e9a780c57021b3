"""eval.quality on the CPU: a run trains a tiny layout on a prepared corpus with train.py, evaluates it at 1x-4x
the training length on the prepared held-out split and the text passkey, and writes quality.json; report turns
runs into the table and plots; bad options are refused naming them."""
import json
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
        assert cli(quality.main, ["run", spec, "--data", data, "--tokens", "256", "--seq-len", "32",
                                  "--micro-batch", "2", "--set", *TINY, "--passkey-trials", "1",
                                  "--max-eval-tokens", "256", "--device", "cpu", "--out", out]) == 0
        r = json.load(open(os.path.join(out, "quality.json")))
        assert r["tokens"] == 256 and r["non_embedding_params"] < r["params"]
        assert set(r["heldout"]) == {"1", "2", "4"} and r["heldout"]["4"]["window"] == 128
        assert all(0 < h["loss"] < 20 and h["by_position"] for h in r["heldout"].values())
        assert set(r["passkey"]) == {"1", "2", "4"} and r["curve"]["train"]
        runs.append(out)
    md = str(tmp_path / "quality.md")
    assert cli(quality.main, ["report", *runs, "--out", md]) == 0
    text_md = open(md).read()
    assert "| tiny:M2 Ag |" in text_md and "| tiny:Ag Ag |" in text_md and "held-out ppl 4x" in text_md


def test_bad_options_are_named(tmp_path, capsys):
    assert cli(quality.main, ["run", "tiny", "--data", str(tmp_path), "--tokens", "10", "--out", "x"]) == 2
    assert "--data" in capsys.readouterr().err
    assert cli(quality.main, ["run", "tiny", "--data", str(tmp_path), "--tokens", "0", "--out", "x"]) == 2
    assert "--tokens 0" in capsys.readouterr().err
    assert cli(quality.main, ["report", str(tmp_path), "--out", str(tmp_path / "q.md")]) == 2
    assert "quality.json" in capsys.readouterr().err
