"""Reading checkpoints as a user meets them: `training.checkpoint.load_checkpoint` on broken directories, the
`python -m training.checkpoint` commands and `python -m eval.perplexity` on bad input (exit status 2, one line that
names the directory or file, no traceback)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf

from eval import perplexity
from hybrid import HybridLM, load_layout
from training import checkpoint
from hybrid.errors import CheckpointError, cli
from hybrid.layout import layout_to_dict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "layouts", "tiny.yaml")
SMALL = ["model.d_model=32", "model.max_seq_len=64", "model.vocab_size=64", "defaults.attention.n_heads=2",
         "defaults.attention.n_kv_heads=1", "defaults.attention.window=8", "defaults.mamba2.headdim=16",
         "defaults.mamba2.d_state=8", "defaults.mamba2.chunk_size=16", "defaults.mlp.d_ff=64"]


def run_cli(*args):
    """`python -m <args>` as a user runs it: (exit status, stdout, stderr)."""
    env = {k: v for k, v in os.environ.items() if k != "BRAIDLM_DEBUG"}
    proc = subprocess.run([sys.executable, "-m", *map(str, args)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    return proc.returncode, proc.stdout, proc.stderr


def write_checkpoint(path, extra=()) -> str:
    """A weights-only checkpoint of a tiny model (tokenizer.model is a placeholder: nothing here reads it)."""
    os.makedirs(path)
    model = HybridLM(load_layout(TINY, SMALL + list(extra)))
    checkpoint.save_model(model, os.path.join(path, checkpoint.WEIGHTS))
    OmegaConf.save(OmegaConf.create(layout_to_dict(model.layout)), os.path.join(path, checkpoint.LAYOUT))
    with open(os.path.join(path, checkpoint.TOKENIZER), "wb") as f:
        f.write(b"placeholder")
    return str(path)


def truncate(path: str) -> None:
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])


# ------------------------------------------------------------------------------------------ load_checkpoint
def test_load_checkpoint_reads_a_good_checkpoint(tmp_path):
    ckpt = write_checkpoint(tmp_path / "ckpt")
    model, tok = checkpoint.load_checkpoint(ckpt, dtype=torch.bfloat16)
    assert not model.training and model.embed.weight.dtype == torch.bfloat16
    assert tok == os.path.join(ckpt, checkpoint.TOKENIZER)
    os.remove(tok)
    assert checkpoint.load_checkpoint(ckpt)[1] is None


def test_load_checkpoint_names_what_is_wrong(tmp_path):
    with pytest.raises(CheckpointError, match="nope: no such directory"):
        checkpoint.load_checkpoint(str(tmp_path / "nope"))

    ds = tmp_path / "deepspeed"
    (ds / "zero").mkdir(parents=True)
    with pytest.raises(CheckpointError, match=f"missing layout.yaml, model.safetensors .*DeepSpeed checkpoint: run "
                                              f"`python -m training.checkpoint consolidate {ds}`"):
        checkpoint.load_checkpoint(str(ds))

    ckpt = write_checkpoint(tmp_path / "ckpt")
    layout = os.path.join(ckpt, checkpoint.LAYOUT)
    good = open(layout).read()
    os.remove(layout)
    with pytest.raises(CheckpointError, match="missing layout.yaml .*consolidate"):
        checkpoint.load_checkpoint(ckpt)
    cfg = OmegaConf.to_container(OmegaConf.create(good))
    cfg["layers"][1]["mixer"] = "mamba3"
    OmegaConf.save(OmegaConf.create(cfg), layout)
    with pytest.raises(CheckpointError, match=r"layout.yaml: .*layers\.1\.mixer"):
        checkpoint.load_checkpoint(ckpt)

    other = write_checkpoint(tmp_path / "other", ["model.vocab_size=80"])  # weights of another shape
    os.replace(os.path.join(other, checkpoint.WEIGHTS), os.path.join(ckpt, checkpoint.WEIGHTS))
    with open(layout, "w") as f:
        f.write(good)
    with pytest.raises(CheckpointError, match=r"model.safetensors: embed.weight has shape \(80, 32\), the model "
                                              r"needs \(64, 32\)"):
        checkpoint.load_checkpoint(ckpt)

    truncate(os.path.join(ckpt, checkpoint.WEIGHTS))
    with pytest.raises(CheckpointError, match="model.safetensors: cannot be read .*truncated"):
        checkpoint.load_checkpoint(ckpt)


def test_tied_weights_load_from_either_name(tmp_path):
    """A tied lm_head is stored once (as embed.weight by save_model, either name by other writers)."""
    from safetensors.torch import save_file
    model = HybridLM(load_layout(TINY, SMALL))
    assert model.layout.model.tie_embeddings
    path = str(tmp_path / "w.safetensors")
    state = {k: v.clone() for k, v in model.state_dict().items() if k != "embed.weight"}
    save_file(state, path)
    fresh = HybridLM(load_layout(TINY, SMALL + ["model.init_std=0.5"]))
    checkpoint.load_model(fresh, path)
    assert torch.equal(fresh.embed.weight, model.embed.weight) and fresh.lm_head.weight is fresh.embed.weight
    del state["lm_head.weight"]
    save_file(state, path)
    with pytest.raises(CheckpointError, match=r"w.safetensors: does not match the model: missing \['embed.weight', "
                                              r"'lm_head.weight'\]"):
        checkpoint.load_model(fresh, path)


# ------------------------------------------------------------------------------------ python -m training.checkpoint
def test_consolidate_a_missing_directory_is_one_line():
    rc, _, err = run_cli("training.checkpoint", "consolidate", "no/such/step_00000100")
    assert rc == 2 and "Traceback" not in err, err
    assert "error: no/such/step_00000100: no such checkpoint directory" in err


def test_consolidate_refuses_what_is_not_a_deepspeed_checkpoint(tmp_path, capsys):
    torch_ckpt = write_checkpoint(tmp_path / "torch")  # the plain PyTorch engine writes model.safetensors itself
    assert cli(checkpoint.main, ["consolidate", torch_ckpt]) == 2
    err = capsys.readouterr().err
    assert f"{torch_ckpt}: not a DeepSpeed checkpoint (no zero/ directory); its model.safetensors is already " \
           "consolidated" in err and "Traceback" not in err

    (tmp_path / "empty").mkdir()
    assert cli(checkpoint.main, ["consolidate", str(tmp_path / "empty")]) == 2
    assert f"expected {tmp_path / 'empty' / 'zero'}/" in capsys.readouterr().err

    pytest.importorskip("deepspeed")
    (tmp_path / "broken" / "zero").mkdir(parents=True)  # a save killed before DeepSpeed wrote anything
    assert cli(checkpoint.main, ["consolidate", str(tmp_path / "broken")]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'broken' / 'zero'}: cannot be consolidated" in err and "complete?" in err
    assert not os.path.exists(tmp_path / "broken" / "model.safetensors")


def test_list(tmp_path, capsys):
    assert cli(checkpoint.main, ["list", str(tmp_path / "nope")]) == 2
    assert f"{tmp_path / 'nope'}: no such directory (expected a run's checkpoint directory" in capsys.readouterr().err

    run = tmp_path / "run"
    step = run / "checkpoints" / "step_00000020"
    step.mkdir(parents=True)
    (step / "trainer.json").write_text(json.dumps({"step": 20, "tokens": 40960}))
    assert cli(checkpoint.main, ["list", str(run)]) == 0  # the run, not its checkpoints: a hint
    assert f"did you mean {run / 'checkpoints'}?" in capsys.readouterr().err
    assert cli(checkpoint.main, ["list", str(run / "checkpoints")]) == 0
    assert f"{step}  step 20  tokens 40,960" in capsys.readouterr().out

    (step / "trainer.json").write_text('{"step": 2')  # truncated
    assert cli(checkpoint.main, ["list", str(run / "checkpoints")]) == 2
    assert f"{step / 'trainer.json'}: not valid JSON" in capsys.readouterr().err


# --------------------------------------------------------------------------------------- python -m eval.perplexity
def test_perplexity_on_truncated_weights_is_one_line(tmp_path):
    ckpt = write_checkpoint(tmp_path / "ckpt")
    weights = os.path.join(ckpt, checkpoint.WEIGHTS)
    truncate(weights)
    rc, _, err = run_cli("eval.perplexity", ckpt, "--quick", "--out", tmp_path / "ppl.md")
    assert rc == 2 and "Traceback" not in err, err
    assert f"error: {weights}: cannot be read as safetensors" in err and "truncated" in err
    assert not os.path.exists(tmp_path / "ppl.md")


def test_perplexity_needs_the_tokenizer(tmp_path, capsys):
    ckpt = write_checkpoint(tmp_path / "ckpt")
    os.remove(os.path.join(ckpt, checkpoint.TOKENIZER))
    with pytest.raises(CheckpointError, match="tokenizer.model: missing"):
        perplexity.load_checkpoint(ckpt)
    assert cli(perplexity.main, [ckpt, "--quick", "--out", str(tmp_path / "ppl.md")]) == 2
    assert f"{os.path.join(ckpt, 'tokenizer.model')}: missing" in capsys.readouterr().err
