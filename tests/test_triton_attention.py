"""Triton decode attention against the reference: interpreter on CPU (small shapes), native on the GPU."""
import importlib.util

import pytest
import torch

from hybrid.cache import KVState
from kernels.attention import reference as ref

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def filled_cache(batch, n_kv, d, kind, window, sinks, stride, max_len, steps, dtype, g):
    """A KVState after `steps` single-token writes (rows at different lengths), as the model's decode leaves it."""
    far = sinks + (max_len // stride if stride else 0) if kind == "sparse" else 0
    ring = max_len if kind == "global" else min(window, max_len)
    slots = far + ring + 1
    kv = KVState(k=torch.zeros(batch, slots, n_kv, d, dtype=dtype, device=DEVICE),
                 v=torch.zeros(batch, slots, n_kv, d, dtype=dtype, device=DEVICE),
                 pos=torch.full((batch, slots), -1, device=DEVICE), ring_start=far, ring_size=ring, sinks=sinks,
                 stride=stride)
    lengths = torch.tensor([steps - 3 * r for r in range(batch)])  # rows of unequal lengths
    for s in range(steps):
        k, v = (torch.randn(batch, 1, n_kv, d, generator=g).to(DEVICE, dtype) for _ in range(2))
        pos = torch.full((batch, 1), s, device=DEVICE)
        kv.write(k, v, pos, (s < lengths)[:, None].to(DEVICE))
    return kv, (lengths - 1).to(DEVICE)


CASES = [("global", 0, 0, 0, 50), ("local", 1, 0, 0, 50), ("local", 7, 0, 0, 50), ("sparse", 5, 2, 4, 50),
         ("sparse", 3, 0, 6, 50)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind,window,sinks,stride,max_len", CASES)
@pytest.mark.parametrize("n_heads,n_kv,d", [(4, 2, 8), (3, 3, 12)])
def test_decode_matches_reference(dtype, kind, window, sinks, stride, max_len, n_heads, n_kv, d):
    from kernels.attention.triton_decode import attention_decode
    g = torch.Generator().manual_seed(0)
    batch = 3
    kv, q_pos = filled_cache(batch, n_kv, d, kind, window, sinks, stride, max_len, 41, dtype, g)
    q = torch.randn(batch, n_heads, d, generator=g).to(DEVICE, dtype)
    args = (kv.k, kv.v, kv.pos, q_pos)
    kw = dict(ring_start=kv.ring_start, kind=kind, window=window, sinks=sinks, stride=stride)
    want = ref.attention_decode(q.double(), kv.k.double(), kv.v.double(), kv.pos, q_pos, **kw)
    got = attention_decode(q, *args, **kw)
    assert got.dtype == dtype and got.shape == want.shape
    assert rel(got, want) <= (1e-2 if dtype == torch.bfloat16 else 1e-5)


@pytest.mark.parametrize("kind,window,sinks,stride", [("global", 0, 0, 0), ("sparse", 9, 2, 4)])
def test_decode_merges_many_ranges(monkeypatch, kind, window, sinks, stride):
    """Ranges of 16 slots (BLOCK 16): 40+ partial results per head, more than the merge kernel takes at once,
    some of them with no visible slot."""
    from kernels.attention import triton_decode
    monkeypatch.setitem(triton_decode.TUNING, "decode_partial", dict(BLOCK=16, num_warps=4))
    monkeypatch.setattr(triton_decode, "_split", lambda batch, n_kv, slots, device: (-(-slots // 16), 16))
    g = torch.Generator().manual_seed(2)
    kv, q_pos = filled_cache(2, 2, 8, kind, window, sinks, stride, 700, 650, torch.float32, g)
    q = torch.randn(2, 4, 8, generator=g).to(DEVICE)
    kw = dict(ring_start=kv.ring_start, kind=kind, window=window, sinks=sinks, stride=stride)
    want = ref.attention_decode(q.double(), kv.k.double(), kv.v.double(), kv.pos, q_pos, **kw)
    assert rel(triton_decode.attention_decode(q, kv.k, kv.v, kv.pos, q_pos, **kw), want) <= 1e-5


def test_decode_rejects_bad_input():
    from kernels.attention.triton_decode import attention_decode
    q = torch.randn(2, 4, 8)
    k = torch.randn(2, 5, 3, 8)
    pos = torch.zeros(2, 5, dtype=torch.long)
    with pytest.raises(ValueError, match="multiple"):
        attention_decode(q, k, k, pos, pos[:, 0], ring_start=0, kind="global")
    with pytest.raises(ValueError, match="kind"):
        attention_decode(q, k, k, pos, pos[:, 0], ring_start=0, kind="dense")


@pytest.mark.gpu
@pytest.mark.parametrize("kind,window,sinks,stride", [("global", 0, 0, 0), ("local", 1024, 0, 0),
                                                      ("sparse", 512, 4, 64)])
@pytest.mark.parametrize("d", [64, 128])
def test_decode_real_shapes_gpu(kind, window, sinks, stride, d):
    from kernels.attention.triton_decode import attention_decode
    g = torch.Generator().manual_seed(1)
    kv, q_pos = filled_cache(8, 8, d, kind, window, sinks, stride, 2048, 1500, torch.bfloat16, g)
    q = torch.randn(8, 32, d, generator=g).to(DEVICE, torch.bfloat16)
    kw = dict(ring_start=kv.ring_start, kind=kind, window=window, sinks=sinks, stride=stride)
    want = ref.attention_decode(q.double(), kv.k.double(), kv.v.double(), kv.pos, q_pos, **kw)
    assert rel(attention_decode(q, kv.k, kv.v, kv.pos, q_pos, **kw), want) <= 1e-2
