"""train.py as a user meets it: every mistake ends in one `error:` line naming the key or file, exit status 2 and
no traceback; --help lists the train.* keys; saves are logged; metrics.jsonl has each step once after a resume."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from hybrid.errors import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "layouts", "tiny.yaml")
SMALL = ["model.d_model=64", "model.vocab_size=384", "defaults.mlp.d_ff=128"]
SHORT = ["train.steps=2", "train.micro_batch=2", "train.seq_len=32", "train.eval_batches=1", "train.sample_tokens=0",
         "train.log_every=1"]


def _train_module():
    spec = importlib.util.spec_from_file_location("train_cli", os.path.join(ROOT, "train.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


TRAIN = _train_module()


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from training.data import default_corpus, split_documents
    from training.tokenizer import Tokenizer
    path = str(tmp_path_factory.mktemp("tok") / "tok.model")
    Tokenizer.train(split_documents(default_corpus(), 0.05, 0)[0], 384, path)
    return path


def user_error(capsys, argv) -> str:
    """Run train.py's main under the CLI wrapper; assert exit 2 and one error line; return that line."""
    assert cli(TRAIN.main, argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("override, named, expected", [
    ("train.steps=abc", "train.steps=abc", "Integer"),
    ("train.lr=fast", "train.lr=fast", "Float"),
    ("train.nosuch=1", "train.nosuch=1", "no such key"),
    ("train.steps", "train.steps", "key=value"),
    ("train.engine=jax", "train.engine='jax'", "auto, torch or deepspeed"),
    ("train.seq_len=0", "train.seq_len=0", ">= 1"),
    ("model.d_model=abc", "model.d_model", "integer"),
])
def test_bad_override_names_the_key(capsys, tmp_path, override, named, expected):
    msg = user_error(capsys, [TINY, override, f"train.out_dir={tmp_path}"])
    assert named in msg and expected in msg, msg


def test_missing_layout_file(capsys):
    assert "nosuch.yaml" in user_error(capsys, ["nosuch.yaml"])


def test_missing_data_path(capsys, tmp_path):
    msg = user_error(capsys, [TINY, *SMALL, *SHORT, f"train.data={tmp_path}/nope.jsonl", f"train.out_dir={tmp_path}"])
    assert f"train.data={tmp_path}/nope.jsonl" in msg and "no such file" in msg


def test_empty_data_file(capsys, tmp_path):
    (tmp_path / "empty.txt").write_text("")
    msg = user_error(capsys, [TINY, *SMALL, *SHORT, f"train.data={tmp_path}/empty.txt", f"train.out_dir={tmp_path}/r"])
    assert "empty.txt" in msg and "no text" in msg


def test_directory_without_text(capsys, tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "image.png").write_bytes(b"\x89PNG")
    msg = user_error(capsys, [TINY, *SMALL, *SHORT, f"train.data={tmp_path}/d", f"train.out_dir={tmp_path}/r"])
    assert f"{tmp_path}/d" in msg and "no text" in msg


def test_bad_jsonl_line_is_named_by_its_line_number(capsys, tmp_path):
    good = json.dumps({"text": "some words here"})
    (tmp_path / "c.jsonl").write_text(f"{good}\n\n{good}\n{{\"text\": \"unclosed\"\n{good}\n")
    msg = user_error(capsys, [TINY, *SMALL, *SHORT, f"train.data={tmp_path}/c.jsonl", f"train.out_dir={tmp_path}/r"])
    assert f"{tmp_path}/c.jsonl:4:" in msg and "not valid JSON" in msg, msg
    (tmp_path / "d.jsonl").write_text(f"{good}\n[1, 2]\n")
    msg = user_error(capsys, [TINY, *SMALL, *SHORT, f"train.data={tmp_path}/d.jsonl", f"train.out_dir={tmp_path}/r"])
    assert f"{tmp_path}/d.jsonl:2:" in msg and "'text'" in msg, msg


def test_binary_data_file(capsys, tmp_path):
    (tmp_path / "b.txt").write_bytes(b"caf\xe9 au lait " * 10)
    msg = user_error(capsys, [TINY, *SMALL, *SHORT, f"train.data={tmp_path}/b.txt", f"train.out_dir={tmp_path}/r"])
    assert "b.txt" in msg and "UTF-8" in msg


def test_corpus_too_short_for_seq_len(capsys, tmp_path, tokenizer):
    (tmp_path / "short.txt").write_text("a few words of text\nand a second line of text here\n")
    msg = user_error(capsys, [TINY, *SMALL, *SHORT, "train.seq_len=512", f"train.tokenizer={tokenizer}",
                              f"train.data={tmp_path}/short.txt", f"train.out_dir={tmp_path}/r"])
    assert "train.seq_len=512" in msg


def test_missing_tokenizer(capsys, tmp_path):
    msg = user_error(capsys, [TINY, *SMALL, *SHORT, f"train.tokenizer={tmp_path}/no.model", f"train.out_dir={tmp_path}"])
    assert f"train.tokenizer={tmp_path}/no.model" in msg


def test_single_text_file_trains(tmp_path, tokenizer):
    """One .txt file is one document: it is cut into train / held-out text instead of going all to held-out."""
    from training.data import split_documents
    text = "\n".join(f"line {i} of a small book about nothing" for i in range(200))
    train, held = split_documents([text], 0.05)
    assert train[0] + "\n" + held[0] == text and 0 < len(held[0]) < len(train[0]) / 10


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tokenizer):
    """A finished 4-step run that saved at steps 2 and 4; returns its out_dir."""
    out = tmp_path_factory.mktemp("run")
    assert cli(TRAIN.main, [TINY, *SMALL, *SHORT, "train.steps=4", "train.save_every=2", f"train.tokenizer={tokenizer}",
                            f"train.out_dir={out}"]) == 0
    return out


def _copy_run(src, dst):
    import shutil
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("name, damage", [
    ("model.safetensors", lambda p: open(p, "r+b").truncate(1000)),
    ("optimizer.safetensors", lambda p: open(p, "r+b").truncate(1000)),
    ("trainer.json", lambda p: open(p, "w").write('{"step": 4, "tok')),
    ("rng_rank0.safetensors", lambda p: os.remove(p)),
    ("layout.yaml", lambda p: open(p, "a").write("#")),
])
def test_damaged_checkpoint_on_resume_names_the_file(capsys, tmp_path, trained, tokenizer, name, damage):
    """train.resume=auto: a warning naming the damaged file, then the previous checkpoint; naming the damaged
    checkpoint itself: an error naming the file."""
    out = _copy_run(trained, tmp_path / "run")
    damaged = out / "checkpoints" / "step_00000004"
    damage(str(damaged / name))
    args = [TINY, *SMALL, *SHORT, "train.steps=6", f"train.tokenizer={tokenizer}", f"train.out_dir={out}"]
    msg = user_error(capsys, args + [f"train.resume={damaged}"])
    assert os.path.join("step_00000004", name) in msg, msg
    assert cli(TRAIN.main, args) == 0
    log = capsys.readouterr().out
    assert "warning: " in log and os.path.join("step_00000004", name) in log, log
    assert f"resumed from {out / 'checkpoints' / 'step_00000002'} at step 2" in log


def test_resume_from_a_path_that_is_not_a_checkpoint(capsys, tmp_path):
    msg = user_error(capsys, [TINY, *SMALL, *SHORT, f"train.resume={tmp_path}", f"train.out_dir={tmp_path}"])
    assert f"train.resume={tmp_path}" in msg


def test_init_from_missing(capsys, tmp_path, tokenizer):
    msg = user_error(capsys, [TINY, *SMALL, *SHORT, f"train.init_from={tmp_path}/none", f"train.tokenizer={tokenizer}",
                              f"train.out_dir={tmp_path}/r"])
    assert f"train.init_from={tmp_path}/none" in msg


def test_saves_are_logged_and_resume_keeps_each_step_once(capsys, tmp_path, trained, tokenizer):
    out = _copy_run(trained, tmp_path / "run")
    # as if the first run had been killed after logging steps 4 and 5 but before saving step 6
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 4, "loss": 1.0}) + "\n" + json.dumps({"step": 5, "loss": 1.0}) + "\n{\"step\": 6")
    assert cli(TRAIN.main, [TINY, *SMALL, *SHORT, "train.steps=6", "train.save_every=2", f"train.tokenizer={tokenizer}",
                            f"train.out_dir={out}"]) == 0
    log = capsys.readouterr().out
    assert "resumed from" in log and f"saved checkpoint {out}/checkpoints/step_00000006" in log
    steps = [json.loads(line)["step"] for line in open(out / "metrics.jsonl") if "loss" in line and "heldout" not in line]
    assert steps == sorted(set(steps)) and steps[-2:] == [4, 5], steps
    assert " 0 tok/s" not in log


def test_default_run_saves_periodically():
    from training.config import TrainConfig
    assert 0 < TrainConfig().save_every < TrainConfig().steps


def test_help_lists_every_train_key(capsys):
    from dataclasses import fields

    from training.config import TrainConfig
    with pytest.raises(SystemExit):
        TRAIN.main(["--help"])
    out = capsys.readouterr().out
    for f in fields(TrainConfig):
        assert f"train.{f.name}=" in out


def test_print_config_is_resolved(capsys, tmp_path):
    assert cli(TRAIN.main, [TINY, "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "out_dir: runs/tiny" in out and "${" not in out


def test_cli_process_prints_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), TINY, "train.steps=abc"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "train.steps=abc" in proc.stderr
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), TINY, "train.steps=abc", "--debug"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "Traceback" in proc.stderr
