import os
import sys

import pytest
import torch

# Triton kernels run in Triton's interpreter on CPU-only machines (set before any kernel module imports triton)
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _environment():
    """Each test starts from the same environment: a single-process DeepSpeed run sets RANK, WORLD_SIZE, ...
    (as its launcher would), which would make every later in-process run think it is under the launcher."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def pytest_collection_modifyitems(config, items):
    """Tests marked gpu are skipped where no CUDA device exists (they run on the device with -m gpu)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def one_thread():
    """torch on one thread for the test (restored after it), as train.threads=1 runs: on a busy two-core machine
    two threads make small ops many times slower (tests/test_expert_parallel.py's ranks run on one each)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture
def registry():
    """kernels.registry, with whatever a test registers (e.g. a GPU backend made available on the CPU, to run
    its Triton kernels in the interpreter inside the model) removed again when the test ends."""
    from kernels import registry as reg
    saved = {op: list(impls) for op, impls in reg.IMPLEMENTATIONS.items()}
    yield reg
    reg.IMPLEMENTATIONS.clear()
    reg.IMPLEMENTATIONS.update(saved)
    reg._choose.cache_clear()


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    """One small tokenizer (384 pieces, the embedded corpus) for every training run of the session: training one
    is the slow part of a tiny run."""
    from training.data import default_corpus, split_documents
    from training.tokenizer import Tokenizer
    path = str(tmp_path_factory.mktemp("tok") / "tok.model")
    Tokenizer.train(split_documents(default_corpus(), 0.05, 0)[0], 384, path)
    return path
