"""Packaging: our top-level `kernels` package must not make transformers think the Hugging Face `kernels`
hub package is installed, and transformers must still generate beside it."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = r"""
import importlib.util, torch, transformers, kernels
from transformers.utils.import_utils import is_kernels_available
assert importlib.util.find_spec("kernels").origin.startswith(ROOT), importlib.util.find_spec("kernels").origin
assert not is_kernels_available(), "transformers believes the HF kernels package is installed"
from transformers import LlamaConfig, LlamaForCausalLM
torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)
model = LlamaForCausalLM(cfg).eval()
out = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=5, do_sample=False)
assert out.shape == (1, 8), out.shape
print("ok", transformers.__version__)
"""


def test_transformers_ignores_our_kernels_package():
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-c", f"ROOT = {ROOT!r}\n" + SCRIPT], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.startswith("ok")


def test_python_m_kernels_reports_backends():
    res = subprocess.run([sys.executable, "-m", "kernels"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    for op in ("ssd_chunk_scan", "selective_scan", "causal_conv1d", "attention"):
        assert op in res.stdout
    assert "reference" in res.stdout


def test_forced_backend_names_are_checked():
    import pytest

    import kernels
    try:
        kernels.set_backend("reference")
        assert set(kernels.backends("cpu").values()) == {"reference"}
        kernels.set_backend("tritno")  # a typo must not silently fall back to the automatic choice
        with pytest.raises(kernels.KernelBackendError, match="no such backend"):
            kernels.backend("ssd_chunk_scan", "cpu")
        kernels.set_backend("triton")  # ops without a triton kernel keep their automatic choice
        assert kernels.backend("attention_with_cache", "cpu") == "reference"
        with pytest.raises(kernels.KernelBackendError, match="cannot run"):
            kernels.backend("ssd_state_update", "cpu")
    finally:
        kernels.set_backend(None)
    assert [i.backend for i in kernels.registry.implementations("causal_conv1d_update")] == ["triton", "reference"]


def test_a_kernel_backend_error_is_the_users_one_line_error_and_other_errors_are_not(capsys):
    """hybrid.errors.cli turns a KernelBackendError (an unknown or impossible HYBRID_KERNELS) into `error: ...`
    and status 2 like a UserError, without importing `kernels` itself; a bug still raises with its traceback."""
    import pytest

    import kernels
    from hybrid.errors import ConfigError, cli

    def bad_backend(argv):
        kernels.set_backend("tritno")
        try:
            kernels.backend("ssd_chunk_scan", "cpu")
        finally:
            kernels.set_backend(None)

    assert cli(bad_backend, []) == 2 and "error: " in capsys.readouterr().err
    assert cli(lambda argv: (_ for _ in ()).throw(ConfigError("train.steps: bad")), []) == 2
    assert "error: train.steps: bad" in capsys.readouterr().err
    with pytest.raises(ZeroDivisionError):
        cli(lambda argv: 1 / 0, [])
    with pytest.raises(ConfigError):  # --debug shows the traceback
        cli(lambda argv: (_ for _ in ()).throw(ConfigError("x")), ["--debug"])
