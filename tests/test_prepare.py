"""training/prepare.py: every input format into shards, on one or several processes with the same bytes,
resumable after a failure or a kill, errors that name the file, and train.py reading the prepared corpus."""
import gzip
import json
import os

import numpy as np
import pytest

from hybrid.errors import DataError, cli
from training import prepare as prep
from training.data import TokenStream, packed_batch, read_prepared

WORDS = ("the model reads every token of the corpus once and keeps only what it needs to predict the next one "
         "state space layers carry a summary forward while attention looks back at the keys it kept").split()


def text(i: int, n: int = 40) -> str:
    rng = np.random.default_rng(i)
    return " ".join(WORDS[j] for j in rng.integers(0, len(WORDS), n)) + f" doc {i}."


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from training.tokenizer import Tokenizer
    path = str(tmp_path_factory.mktemp("tok") / "tok.model")
    Tokenizer.train([text(i, 200) for i in range(60)], 300, path)
    return path


@pytest.fixture
def corpus(tmp_path):
    """A directory of .txt, .md, .jsonl and .jsonl.gz files, and a .jsonl outside it."""
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    for i in range(6):
        (root / f"page{i}.txt").write_text(text(i))
    (root / "sub" / "notes.md").write_text(text(100))
    (root / "sub" / "rows.jsonl").write_text("".join(json.dumps({"text": text(200 + i)}) + "\n" for i in range(25)))
    with gzip.open(root / "sub" / "more.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps({"text": text(300 + i), "id": i}) + "\n" for i in range(15)))
    extra = tmp_path / "extra.jsonl"
    extra.write_text(json.dumps({"text": text(400)}) + "\n\n" + json.dumps({"text": "  "}) + "\n")
    return [str(root), str(extra)]


def shard_bytes(out):
    shards = os.path.join(out, "shards")
    return {f: open(os.path.join(shards, f), "rb").read() for f in sorted(os.listdir(shards))
            if f.endswith((".bin", ".npy"))}


def test_every_format_on_any_number_of_workers(tmp_path, corpus, tokenizer):
    from training.tokenizer import Tokenizer
    one = prep.prepare(corpus, str(tmp_path / "one"), tokenizer, workers=1, heldout_fraction=0.2, unit_bytes=600,
                       progress=False)
    prep.prepare(corpus, str(tmp_path / "two"), tokenizer, workers=2, heldout_fraction=0.2, unit_bytes=600,
                       progress=False)
    assert shard_bytes(tmp_path / "one") == shard_bytes(tmp_path / "two") and len(one["shards"]) > 4
    docs = 6 + 1 + 25 + 15 + 1  # the empty .jsonl row is dropped
    totals = one["totals"]
    assert totals["train"]["docs"] + totals["heldout"]["docs"] == docs and totals["heldout"]["docs"] > 0
    tok = Tokenizer(tokenizer)
    all_text = [text(i) for i in range(6)] + [text(100)] + [text(200 + i) for i in range(25)] + \
        [text(300 + i) for i in range(15)] + [text(400)]
    assert totals["train"]["tokens"] + totals["heldout"]["tokens"] == sum(len(t) + 1 for t in tok.encode_batch(all_text))
    assert {f["path"] for f in one["inputs"]} == {os.path.abspath(p) for p in prep.find_inputs(corpus)}
    assert all(len(f["sha256"]) == 64 for f in one["inputs"]) and one["tokenizer"]["sha256"]
    manifest, train, held = read_prepared(str(tmp_path / "one"))
    assert len(train) == totals["train"]["tokens"] and len(held) == totals["heldout"]["tokens"]
    # rows cut across shard boundaries keep documents apart, as from one stream
    shards = [TokenStream.load(os.path.join(tmp_path, "one", "shards", s["name"]), 300)
              for s in manifest["shards"] if s["split"] == "train"]
    whole = TokenStream(np.concatenate([np.asarray(s.tokens) for s in shards]),
                        np.concatenate([s.starts + o for s, o in zip(shards, np.cumsum([0] + [len(s) for s in shards]))]))
    starts = np.array([0, 5, len(train) - 40])
    for a, b in zip(packed_batch(train, starts, 32), packed_batch(whole, starts, 32)):
        assert a.tolist() == b.tolist()


def test_a_killed_or_failed_run_resumes_to_the_same_shards(tmp_path, corpus, tokenizer, monkeypatch):
    clean = prep.prepare(corpus, str(tmp_path / "clean"), tokenizer, workers=1, unit_bytes=600, progress=False)
    out = str(tmp_path / "out")
    real, calls = prep.run_unit, []

    def killed_after_one(unit, *args):  # the process dies in the second unit: no record of it, no manifest
        if calls:
            raise KeyboardInterrupt
        calls.append(unit.index)
        return real(unit, *args)
    monkeypatch.setattr(prep, "run_unit", killed_after_one)
    with pytest.raises(KeyboardInterrupt):
        prep.prepare(corpus, out, tokenizer, workers=1, unit_bytes=600, progress=False)
    monkeypatch.setattr(prep, "run_unit", real)
    assert not os.path.exists(os.path.join(out, "manifest.json"))
    bad = os.path.join(corpus[0], "sub", "rows.jsonl")
    good = open(bad).read()
    with open(bad, "a") as f:
        f.write('{"text": "unfinished\n')
    with pytest.raises(DataError, match=r"rows\.jsonl:26: not valid JSON"):
        prep.prepare(corpus, out, tokenizer, workers=2, unit_bytes=600, progress=False)
    done = sorted(f for f in os.listdir(os.path.join(out, "shards")) if f.endswith(".json"))
    assert len(done) == len(clean["shards"]) // 2 - 1  # every unit but the bad file's is kept
    before = {f: os.path.getmtime(os.path.join(out, "shards", f)) for f in done}
    with open(bad, "w") as f:
        f.write(good)
    again = prep.prepare(corpus, out, tokenizer, workers=2, unit_bytes=600, progress=False)
    assert shard_bytes(out) == shard_bytes(tmp_path / "clean") and again["totals"] == clean["totals"]
    assert all(os.path.getmtime(os.path.join(out, "shards", f)) == t for f, t in before.items())  # not redone


def test_inputs_that_cannot_be_read_are_named(tmp_path, tokenizer):
    with pytest.raises(DataError, match="nothing.txt: no such file"):
        prep.prepare([str(tmp_path / "nothing.txt")], str(tmp_path / "o"), tokenizer, progress=False)
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(DataError, match="x.csv: unknown format"):
        prep.find_inputs([str(tmp_path / "x.csv")])
    gz = tmp_path / "cut.jsonl.gz"
    gz.write_bytes(gzip.compress(b'{"text": "a b c"}\n' * 200)[:60])
    with pytest.raises(DataError, match="cut.jsonl.gz: cannot be read"):
        prep.prepare([str(gz)], str(tmp_path / "o"), tokenizer, workers=1, progress=False)
    (tmp_path / "latin.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(DataError, match="latin.txt: not UTF-8"):
        prep.prepare([str(tmp_path / "latin.txt")], str(tmp_path / "o2"), tokenizer, workers=1, progress=False)
    (tmp_path / "k.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(DataError, match="k.jsonl:1: expected a JSON object with a string 'text' field"):
        prep.prepare([str(tmp_path / "k.jsonl")], str(tmp_path / "o3"), tokenizer, workers=1, progress=False)


def test_optional_formats_say_which_package_they_need(tmp_path, tokenizer):
    import importlib.util
    (tmp_path / "a.jsonl.zst").write_bytes(b"\x28\xb5\x2f\xfd")
    (tmp_path / "b.parquet").write_bytes(b"PAR1")
    for name, module in (("a.jsonl.zst", "zstandard"), ("b.parquet", "pyarrow")):
        if importlib.util.find_spec(module) is None:
            with pytest.raises(DataError, match=f"{name}: .*needs the {module} package"):
                list(prep.documents(str(tmp_path / name)))


def test_the_command_line(tmp_path, corpus, tokenizer, capsys):
    out = str(tmp_path / "cli")
    assert cli(prep.main, [*corpus, "--tokenizer", tokenizer, "--out", out, "--workers", "2"]) == 0
    assert f"train with train.data={out}" in capsys.readouterr().out
    assert cli(prep.main, [*corpus, "--tokenizer", str(tmp_path / "no.model"), "--out", out]) == 2
    assert "--tokenizer" in capsys.readouterr().err
    assert cli(prep.main, [*corpus, "--tokenizer", tokenizer, "--out", out, "--workers", "-1"]) == 2


def test_train_py_trains_on_a_prepared_corpus(tmp_path, corpus, tokenizer):
    """train.data=<prepared dir>: the manifest's tokenizer, the shards streamed, no tokenizing in the run."""
    import train
    out = str(tmp_path / "prep")
    prep.prepare(corpus, out, tokenizer, workers=1, heldout_fraction=0.3, progress=False)
    run_dir = str(tmp_path / "run")
    rc = cli(train.main, ["layouts/tiny.yaml", "model.d_model=32", "defaults.mamba2.headdim=16", f"train.data={out}",
                          "train.steps=3", "train.seq_len=32", "train.micro_batch=2", "train.eval_every=3",
                          "train.eval_batches=1", "train.sample_tokens=0", f"train.out_dir={run_dir}"])
    assert rc == 0
    assert not os.path.isdir(os.path.join(run_dir, "data"))  # nothing was tokenized again


def test_a_tokenizer_is_trained_on_a_sample_spread_over_the_inputs(tmp_path, corpus, capsys):
    paths = prep.find_inputs(corpus)
    sample = prep.sample_documents(paths, budget_bytes=2000)
    per_file = {p: [d for d in prep.documents(p)] for p in paths}
    assert all(any(d in sample for d in docs[:1]) for docs in per_file.values())  # every source is represented
    assert len(sample) < sum(len(d) for d in per_file.values())                   # and not everything was read
    tok = str(tmp_path / "new.model")
    assert cli(prep.main, [*corpus, "--tokenizer", tok, "--train-tokenizer", "400", "--out", str(tmp_path / "o"),
                           "--workers", "1"]) == 0
    assert os.path.isfile(tok) and "sampled documents" in capsys.readouterr().out
    assert json.load(open(tmp_path / "o" / "manifest.json"))["tokenizer"]["path"] == tok


def test_the_throughput_benchmark_runs_on_the_cpu(tmp_path, tokenizer):
    from eval import bench_prepare
    copies = tmp_path / "copies"
    nbytes = bench_prepare.build_corpus(str(copies), 2)  # the default corpus: --copies files of the embedded one
    assert sorted(os.listdir(copies)) == ["part0000.jsonl", "part0001.jsonl"] and nbytes > 100_000
    out = str(tmp_path / "prepare.md")
    assert cli(bench_prepare.main, ["--input", str(copies / "part0000.jsonl"), "--tokenizer", tokenizer,
                                    "--repeat", "1", "--out", out]) == 0
    report = open(out).read()
    rows = [line for line in report.splitlines() if line.startswith("| prepare") or line.startswith("| single")]
    assert len(rows) == 4 and "tokens/s" in report and f"Corpus: {copies / 'part0000.jsonl'}, " in report
    for row in rows:  # each command also timed on a one-document file, and the scaling with that startup taken off
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert len(cells) == 9 and 0 < float(cells[3]) and (cells[8] == "-" or float(cells[8]) > 0), row
    assert rows[0].split("|")[-2].strip() in ("1.00", "-")  # one pinned core against itself


def _train_tokens(out) -> np.ndarray:
    """The train shards' tokens, concatenated in unit order."""
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    vocab = manifest["tokenizer"]["vocab_size"]
    return np.concatenate([np.asarray(TokenStream.load(os.path.join(out, "shards", s["name"]), vocab).tokens)
                           for s in manifest["shards"] if s["split"] == "train"])


def test_a_large_jsonl_file_is_cut_into_byte_ranges_that_read_every_line_once(tmp_path, tokenizer):
    """A .jsonl file of two units or more is read by several units, each the lines that start in its byte range:
    for every cut point the ranges together read each document exactly once, in order (lines of any length,
    blank lines, multi-byte UTF-8, cuts inside a line and at its newline); the prepared corpus holds the same
    documents as one unit would; errors in a range still name the file and line."""
    rows = [json.dumps({"text": t}, ensure_ascii=False) for t in ("a", "é" * 30, "b c", "", "d" * 7, "ünï", "z")]
    path = tmp_path / "big.jsonl"
    path.write_text("\n".join(rows[:3] + [""] + rows[3:]) + "\n", encoding="utf-8")  # a blank line too
    want = list(prep.documents(str(path)))
    n = path.stat().st_size
    for cut in range(n + 1):
        for cut2 in range(cut, n + 1):
            got = [d for span in ((0, cut), (cut, cut2), (cut2, n)) for d in prep.documents(str(path), span=span)]
            assert got == want, (cut, cut2)
    units = prep.plan_units([str(path)], unit_bytes=n // 3)
    assert len(units) == 3 and [u.span for u in units] == [(0, n // 3), (n // 3, 2 * (n // 3)), (2 * (n // 3), n)]
    assert prep.plan_units([str(path)], unit_bytes=n // 2 + 1)[0].span is None  # under two units: whole
    big = tmp_path / "corpus" / "rows.jsonl"
    big.parent.mkdir()
    big.write_text("".join(json.dumps({"text": text(i)}) + "\n" for i in range(40)))
    whole = prep.prepare([str(big)], str(tmp_path / "whole"), tokenizer, workers=1, heldout_fraction=0.0,
                         progress=False)
    cut = prep.prepare([str(big)], str(tmp_path / "cut"), tokenizer, workers=2, heldout_fraction=0.0,
                       unit_bytes=1000, progress=False)
    assert len(cut["shards"]) // 2 == big.stat().st_size // 1000 > 1
    assert cut["totals"] == whole["totals"] and sum(f["bytes"] for f in cut["inputs"]) == big.stat().st_size
    assert np.array_equal(_train_tokens(tmp_path / "cut"), _train_tokens(tmp_path / "whole"))
    with open(big, "a") as f:
        f.write('{"text": "unfinished\n')
    with pytest.raises(DataError, match=r"rows\.jsonl:41: not valid JSON"):
        prep.prepare([str(big)], str(tmp_path / "cut"), tokenizer, workers=1, unit_bytes=1000, progress=False)


def test_the_prepare_command_starts_without_importing_torch():
    """`python -m training.prepare` needs numpy and sentencepiece, not torch (1.5 s of import on the CPU machine):
    neither the `training` and `hybrid` packages nor training.data import it on the way; the names they export
    are still there, imported on first use."""
    import subprocess
    import sys
    code = ("import sys, training.prepare, training.data; assert 'torch' not in sys.modules, 'torch imported'; "
            "import training, hybrid; assert training.TrainConfig and training.run and hybrid.HybridLM; "
            "print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=os.path.dirname(
        os.path.dirname(os.path.abspath(__file__))))
    assert done.returncode == 0 and done.stdout.strip() == "True", done.stderr
