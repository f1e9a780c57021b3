"""A module as it was at another git revision, loaded beside the current one, so that a benchmark times both in
one process (`--baseline REV` of eval.bench_selective_scan and eval.bench_train).

`module_at(rev, name)` takes `git show REV:path/of/name.py` from this checkout, writes it to a file (Triton's
`@jit` reads a kernel's source from its file), turns its relative imports into absolute ones and imports it under
a name of its own. Only that one file is taken from REV: what it imports (`from .. import tuning`) is today's.
`installed(rev, names)` swaps such modules in for the current ones while a block runs, so code that resolves its
kernels through `kernels.registry` at call time runs the baseline's.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import re
import subprocess
import sys
import tempfile
from types import ModuleType
from typing import Iterator, Sequence

from hybrid.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_RELATIVE = re.compile(r"^(\s*)from (\.+)([\w.]*) import ", re.MULTILINE)
_loaded: dict[tuple[str, str], ModuleType] = {}


def _git(*args: str) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
    except FileNotFoundError:
        raise ConfigError("--baseline needs git on PATH (it reads the file at that revision)") from None


def absolute_imports(source: str, name: str) -> str:
    """`source` of module `name` (dotted) with `from .x import y` / `from .. import y` made absolute."""
    package = name.rsplit(".", 1)[0].split(".") if "." in name else []

    def fix(m: re.Match) -> str:
        up = len(m.group(2)) - 1  # "." is the package itself, each further dot one package up
        if up >= len(package):
            raise ConfigError(f"--baseline: {name} has a relative import beyond its package: {m.group(0).strip()}")
        base = package[:len(package) - up]
        target = ".".join(base + ([m.group(3)] if m.group(3) else []))
        return f"{m.group(1)}from {target} import "
    return _RELATIVE.sub(fix, source)


def module_at(rev: str, name: str) -> ModuleType:
    """Module `name` (e.g. kernels.selective_scan.triton_scan) as it was at git revision `rev`; ConfigError when
    the revision or the file there does not exist."""
    key = (rev, name)
    if key in _loaded:
        return _loaded[key]
    if not re.fullmatch(r"[\w./~^@{}-]+", rev) or rev.startswith("-"):
        raise ConfigError(f"--baseline {rev!r}: not a git revision")
    commit = _git("rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}")
    if commit.returncode != 0:
        raise ConfigError(f"--baseline {rev}: no such commit in {ROOT}")
    sha = commit.stdout.strip()
    path = name.replace(".", "/") + ".py"
    shown = _git("show", f"{sha}:{path}")
    if shown.returncode != 0:
        raise ConfigError(f"--baseline {rev}: {path} does not exist at {sha[:12]}")
    folder = os.path.join(tempfile.gettempdir(), f"braidlm-baseline-{sha[:12]}")
    os.makedirs(folder, exist_ok=True)
    file = os.path.join(folder, name.replace(".", "_") + ".py")
    tmp = f"{file}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(absolute_imports(shown.stdout, name))
    os.replace(tmp, file)
    mod_name = f"{name}__at_{sha[:12]}"
    spec = importlib.util.spec_from_file_location(mod_name, file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module  # dataclasses and Triton look their module up by name
    spec.loader.exec_module(module)
    _loaded[key] = module
    return module


@contextlib.contextmanager
def installed(rev: str, names: Sequence[str]) -> Iterator[list[ModuleType]]:
    """Within the block, `import name` (and kernels.registry's resolution) gives each module as it was at `rev`;
    the current modules are back afterwards."""
    from kernels import registry
    mods = [module_at(rev, n) for n in names]
    saved = {n: sys.modules.get(n) for n in names}
    try:
        for n, m in zip(names, mods):
            importlib.import_module(n)  # the parent package must exist (and keeps its attribute untouched)
            sys.modules[n] = m
        registry._choose.cache_clear()
        yield mods
    finally:
        for n, m in saved.items():
            if m is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = m
        registry._choose.cache_clear()
