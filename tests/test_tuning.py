"""kernels/tuning.py: candidates timed once per shape class, the fastest kept in memory and on disk, failures
skipped, nothing timed when off or on the CPU; and the kernels that use it stay correct while it times them."""
import json
import time

import pytest
import torch

from kernels import tuning


@pytest.fixture
def tuner(monkeypatch, tmp_path):
    """Autotuning on, a stand-in GPU (no CUDA here), a cache file of the test's own, times by setting."""
    monkeypatch.setenv(tuning.ENV, "1")
    monkeypatch.setenv(tuning.CACHE_ENV, str(tmp_path / "tuning.json"))
    monkeypatch.setattr(tuning, "_can_time", lambda device: True)
    monkeypatch.setattr(tuning, "_device_tag", lambda device: "fake-gpu")
    tuning.clear()
    yield tmp_path / "tuning.json"
    tuning.clear()


def timed_by(costs: dict, calls: list):
    """A run(setting) whose 'time' is costs[setting] (recorded through the last call), and the fake timer."""
    last = {}

    def run(setting):
        calls.append(setting)
        if costs.get(setting) is None:
            raise RuntimeError(f"setting {setting} cannot run")
        last["cost"] = costs[setting]
        return f"result of {setting}"

    def time_ms(fn):
        fn()
        return last["cost"]
    return run, time_ms


def test_fastest_is_kept_then_reused_from_memory_and_disk(tuner, monkeypatch):
    calls = []
    run, time_ms = timed_by({1: 3.0, 2: 1.0, 4: 2.0}, calls)
    monkeypatch.setattr(tuning, "_time_ms", time_ms)
    cpu = torch.device("cpu")
    assert tuning.pick("op", (8, 1024), [2, 4], run, 1, cpu) == "result of 2"
    assert sorted(set(calls)) == [1, 2, 4] and calls[-1] == 2
    saved = json.loads(tuner.read_text())
    assert saved == {'fake-gpu|op|[8, 1024]': 2}
    calls.clear()
    assert tuning.pick("op", (8, 1024), [2, 4], run, 1, cpu) == "result of 2" and calls == [2]
    tuning.clear()  # a new process: the choice comes back from the file, nothing is timed
    calls.clear()
    assert tuning.pick("op", (8, 1024), [2, 4], run, 1, cpu) == "result of 2" and calls == [2]
    calls.clear()
    tuning.pick("op", (1, 1024), [2, 4], run, 1, cpu)  # another shape class is timed on its own
    assert sorted(set(calls)) == [1, 2, 4]


def test_failing_candidates_are_skipped_and_the_default_remains(tuner, monkeypatch):
    calls = []
    run, time_ms = timed_by({1: 2.0, 2: None, 4: 5.0}, calls)
    monkeypatch.setattr(tuning, "_time_ms", time_ms)
    assert tuning.pick("op", (1,), [2, 4], run, 1, torch.device("cpu")) == "result of 1"
    run, time_ms = timed_by({1: None, 2: None}, [])
    monkeypatch.setattr(tuning, "_time_ms", time_ms)
    with pytest.raises(RuntimeError, match="setting 1"):  # nothing can run: the default's own error surfaces
        tuning.pick("op2", (1,), [2], run, 1, torch.device("cpu"))


def test_off_or_untimeable_runs_the_default_only(tuner, monkeypatch):
    calls = []
    run, _ = timed_by({1: 1.0, 2: 0.5}, calls)
    monkeypatch.setenv(tuning.ENV, "0")
    assert tuning.pick("op", (1,), [2], run, 1, torch.device("cpu")) == "result of 1" and calls == [1]
    monkeypatch.setenv(tuning.ENV, "1")
    monkeypatch.setattr(tuning, "_can_time", lambda device: False)  # CPU tensors, or a CUDA graph capture
    assert tuning.pick("op", (1,), [2], run, 1, torch.device("cpu")) == "result of 1" and calls == [1, 1]
    assert not tuner.exists()


def test_an_unwritable_cache_keeps_choices_in_memory(tuner, monkeypatch, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv(tuning.CACHE_ENV, str(blocker / "tuning.json"))  # a path under a file: cannot be created
    calls = []
    run, time_ms = timed_by({1: 2.0, 2: 1.0}, calls)
    monkeypatch.setattr(tuning, "_time_ms", time_ms)
    assert tuning.pick("op", (1,), [2], run, 1, torch.device("cpu")) == "result of 2"
    calls.clear()
    assert tuning.pick("op", (1,), [2], run, 1, torch.device("cpu")) == "result of 2" and calls == [2]


def test_kernels_stay_correct_while_their_settings_are_timed(tuner, monkeypatch):
    """The Mamba-1 scan and the norms, timed over their candidates (each run more than once on the same
    inputs), still give the reference's values and gradients: the runs have no side effects on each other."""
    pytest.importorskip("triton")
    from kernels.norm import reference as norm_ref
    from kernels.norm.triton_norm import add_rmsnorm
    from kernels.selective_scan import reference as ref
    from kernels.selective_scan import triton_scan
    monkeypatch.setattr(tuning, "_time_ms", lambda fn: (lambda t0: (fn(), time.perf_counter() - t0)[1])(
        time.perf_counter()))
    monkeypatch.setattr(tuning, "REPS", 1)
    monkeypatch.setattr(triton_scan, "SPLIT_CANDIDATES", (0, 1 << 20))
    g = torch.Generator().manual_seed(0)
    u, delta = torch.randn(1, 40, 8, generator=g), torch.randn(1, 40, 8, generator=g) * 0.5 - 1
    A = -torch.rand(8, 4, generator=g) * 3 - 0.2
    B, C = torch.randn(1, 40, 4, generator=g), torch.randn(1, 40, 4, generator=g)
    leaves = [t.clone().requires_grad_() for t in (u, delta, A, B, C)]
    y = triton_scan.selective_scan(*leaves, delta_softplus=True, chunk_size=8)
    y.sum().backward()
    doubles = [t.double().requires_grad_() for t in (u, delta, A, B, C)]
    y_ref = ref.selective_scan(*doubles, delta_softplus=True)
    y_ref.sum().backward()
    rel = lambda a, b: float((a.detach().double() - b.detach()).norm() / b.detach().norm())
    assert rel(y, y_ref) < 1e-4
    assert all(rel(a.grad, b.grad) < 1e-4 for a, b in zip(leaves, doubles))
    x, r = torch.randn(3, 16, generator=g, requires_grad=True), torch.randn(3, 16, generator=g, requires_grad=True)
    w = torch.ones(16)
    out, s = add_rmsnorm(x, r, w, 1e-5)
    (out.sum() + s.square().sum()).backward()
    xd, rd = x.detach().double().requires_grad_(), r.detach().double().requires_grad_()
    out_r, s_r = norm_ref.add_rmsnorm(xd, rd, w.double(), 1e-5)
    (out_r.sum() + s_r.square().sum()).backward()
    assert rel(x.grad, xd.grad) < 1e-5 and rel(r.grad, rd.grad) < 1e-5
    ops = {k.split("|")[1] for k in tuning.choices()}
    assert {"selective_scan_fwd", "selective_scan_bwd", "rmsnorm_bwd"} <= ops
