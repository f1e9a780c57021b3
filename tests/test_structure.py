"""The shape of the code, checked: imports go one way (interop, training -> hybrid -> kernels), one module names
a checkpoint's files, and no function outside Triton kernel bodies runs past 80 lines."""
import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("hybrid", "training", "interop", "kernels", "eval")
# package -> the first-party packages it must never import
NEVER = {
    "kernels": {"hybrid", "training", "interop", "eval"},
    "hybrid": {"training", "interop", "eval"},
    "training": {"interop", "eval"},
    "interop": {"eval"},
}


def sources(*packages):
    for package in packages:
        for folder, dirs, files in os.walk(os.path.join(ROOT, package)):
            dirs[:] = [d for d in dirs if d not in ("__pycache__", "results")]
            for name in sorted(files):
                if name.endswith(".py"):
                    path = os.path.join(folder, name)
                    yield os.path.relpath(path, ROOT), ast.parse(open(path).read(), path)


def imported_packages(rel: str, tree: ast.AST) -> dict[str, int]:
    """First-party top-level packages a module imports (at any depth: lazy imports count), with a line each."""
    package = rel.split(os.sep)[0]
    found = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [package] if node.level else [node.module or ""]
        else:
            continue
        for name in names:
            top = name.split(".")[0]
            if top in PACKAGES:
                found.setdefault(top, node.lineno)
    return found


@pytest.mark.parametrize("package", sorted(NEVER))
def test_imports_go_one_way(package):
    wrong = [f"{rel}:{line} imports {top}" for rel, tree in sources(package)
             for top, line in imported_packages(rel, tree).items() if top in NEVER[package]]
    assert not wrong, wrong


def test_the_walk_sees_imports():
    """The walk itself: a module known to import the model is seen doing so."""
    tree = ast.parse(open(os.path.join(ROOT, "training", "loop.py")).read())
    assert "hybrid" in imported_packages(os.path.join("training", "loop.py"), tree)


def test_one_module_names_the_checkpoint_files():
    names = ('"trainer.json"', '"optimizer.safetensors"', '"layout.yaml"', "rng_rank")
    owner = os.path.join("training", "checkpoint.py")
    elsewhere = [f"{rel}: {n}" for rel, _ in sources("hybrid", "training", "interop", "eval") if rel != owner
                 for n in names if n in open(os.path.join(ROOT, rel)).read()]
    assert not elsewhere, elsewhere


def _is_triton_kernel(fn: ast.FunctionDef) -> bool:
    for d in fn.decorator_list:
        target = d.func if isinstance(d, ast.Call) else d
        if isinstance(target, ast.Attribute) and target.attr in ("jit", "autotune", "heuristics"):
            return True
    return False


def test_no_function_longer_than_80_lines():
    long = []
    for rel, tree in sources(*PACKAGES):
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not _is_triton_kernel(node):
                lines = node.end_lineno - node.lineno + 1
                if lines > 80:
                    long.append(f"{rel}:{node.lineno} {node.name} ({lines} lines)")
    long += [f"train.py: {n.name}" for n in ast.walk(ast.parse(open(os.path.join(ROOT, "train.py")).read()))
             if isinstance(n, ast.FunctionDef) and n.end_lineno - n.lineno + 1 > 80]
    assert not long, long
