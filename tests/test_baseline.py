"""eval/baseline.py: a module as it was at a git revision, loaded beside today's (the --baseline option of
eval.bench_selective_scan and eval.bench_train)."""
import argparse
import os
import subprocess
import sys

import pytest
import torch

from eval import baseline
from eval import bench_train as bt
from hybrid.errors import ConfigError, cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.skipif(subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True).returncode,
                                reason="not a git checkout")


def test_relative_imports_become_absolute():
    src = "from .. import tuning\nfrom ..triton_common import softplus\nfrom . import reference as ref\nfrom os import path\n"
    assert baseline.absolute_imports(src, "kernels.selective_scan.triton_scan").splitlines() == [
        "from kernels import tuning", "from kernels.triton_common import softplus",
        "from kernels.selective_scan import reference as ref", "from os import path"]
    with pytest.raises(ConfigError, match="beyond its package"):
        baseline.absolute_imports("from ... import x\n", "kernels.selective_scan.triton_scan")


def test_the_scan_at_head_loads_beside_todays_and_computes_the_same():
    from kernels.selective_scan import triton_scan
    old = baseline.module_at("HEAD", "kernels.selective_scan.triton_scan")
    assert old is not triton_scan and old.__name__.startswith("kernels.selective_scan.triton_scan__at_")
    assert baseline.module_at("HEAD", "kernels.selective_scan.triton_scan") is old  # loaded once
    g = torch.Generator().manual_seed(0)
    u, delta, z = (torch.randn(1, 12, 4, generator=g) for _ in range(3))
    A = -torch.rand(4, 2, generator=g) - 0.5
    B, C = (torch.randn(1, 12, 2, generator=g) for _ in range(2))
    kw = dict(z=z, delta_softplus=True, seq_idx=torch.tensor([[0] * 5 + [1] * 7]))
    torch.testing.assert_close(old.selective_scan(u, delta, A, B, C, **kw),
                               triton_scan.selective_scan(u, delta, A, B, C, **kw))


@pytest.mark.parametrize("rev, name, named", [("no-such-rev", "kernels.ops", "no such commit"),
                                              ("HEAD", "kernels.not_a_module", "kernels/not_a_module.py does not exist"),
                                              ("--help", "kernels.ops", "not a git revision")])
def test_a_bad_revision_or_module_is_named(rev, name, named):
    with pytest.raises(ConfigError, match=named):
        baseline.module_at(rev, name)


def test_installed_swaps_the_module_the_registry_resolves_then_puts_it_back():
    from kernels import registry
    from kernels.selective_scan import reference
    assert registry.resolve("selective_scan", "cpu").function is reference.selective_scan
    with baseline.installed("HEAD", ["kernels.selective_scan.reference"]) as (old,):
        assert sys.modules["kernels.selective_scan.reference"] is old
        assert registry.resolve("selective_scan", "cpu").function is old.selective_scan
    assert sys.modules["kernels.selective_scan.reference"] is reference
    assert registry.resolve("selective_scan", "cpu").function is reference.selective_scan


def test_bench_train_steps_each_model_again_at_the_baseline():
    args = argparse.Namespace(seq_len=[16], models=["mamba1-hybrid"], size="tiny", micro_batch=2, steps=1, top=0,
                              no_profile=True, gaps=0, host=0, baseline="HEAD",
                              baseline_modules=["kernels.selective_scan.reference"])
    text = bt.run_all(args, torch.device("cpu"))
    assert "| mamba1-hybrid |" in text and "| mamba1-hybrid at HEAD |" in text


@pytest.mark.parametrize("module, argv, named", [
    ("bench_train", ["--baseline", "HEAD"], "go together"),
    ("bench_train", ["--baseline", "no-such-rev", "--baseline-modules", "kernels.ops"], "no such commit"),
    ("bench_selective_scan", ["--baseline", "no-such-rev"], "--baseline no-such-rev: no such commit")])
def test_bad_baselines_are_one_line_before_any_gpu_work(capsys, module, argv, named):
    import importlib
    assert cli(importlib.import_module(f"eval.{module}").main, argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and named in err
