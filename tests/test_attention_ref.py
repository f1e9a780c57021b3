"""The attention reference: masks against a brute-force definition, cached attention against full attention."""
import math

import pytest
import torch

from kernels.attention.reference import attention, attention_with_cache, token_positions, visible
from hybrid.cache import KVState


def brute_visible(i, j, kind, window, sinks, stride):
    if j > i or j < 0:
        return False
    if kind == "global":
        return True
    if kind == "local":
        return i - j < window
    return i - j < window or j < sinks or (stride > 0 and (j + 1) % stride == 0)


@pytest.mark.parametrize("kind,window,sinks,stride", [
    ("global", 0, 0, 0), ("local", 1, 0, 0), ("local", 7, 0, 0), ("sparse", 3, 2, 0), ("sparse", 2, 0, 5),
    ("sparse", 4, 1, 3)])
def test_visible_matches_definition(kind, window, sinks, stride):
    n = 23
    pos = torch.arange(n)
    got = visible(pos[:, None], pos[None, :], kind, window, sinks, stride)
    want = torch.tensor([[brute_visible(i, j, kind, window, sinks, stride) for j in range(n)] for i in range(n)])
    assert torch.equal(got, want)


def naive_attention(q, k, v, allowed):
    # q (lq, h, d), k/v (lk, hkv, d), allowed (lq, lk): loops over heads, float64
    h, hkv = q.shape[1], k.shape[1]
    out = torch.zeros_like(q)
    for head in range(h):
        kh = head // (h // hkv)
        s = (q[:, head] @ k[:, kh].T) / math.sqrt(q.shape[-1])
        s = s.masked_fill(~allowed, float("-inf"))
        out[:, head] = torch.softmax(s, -1) @ v[:, kh]
    return out


@pytest.mark.parametrize("kind,window,sinks,stride", [("global", 0, 0, 0), ("local", 1, 0, 0), ("local", 6, 0, 0),
                                                      ("sparse", 3, 2, 4)])
def test_packed_attention_matches_naive(kind, window, sinks, stride):
    torch.manual_seed(0)
    lens = [4, 9, 1, 6]
    t = sum(lens)
    seq_idx = torch.cat([torch.full((n,), i) for i, n in enumerate(lens)])[None].int()
    q = torch.randn(1, t, 4, 8, dtype=torch.float64)
    k, v = torch.randn(2, 1, t, 2, 8, dtype=torch.float64)
    got = attention(q, k, v, kind=kind, window=window, sinks=sinks, stride=stride, seq_idx=seq_idx)
    pos = token_positions(seq_idx, 1, t, "cpu")[0]
    allowed = torch.tensor([[seq_idx[0, i] == seq_idx[0, j] and brute_visible(int(pos[i]), int(pos[j]), kind, window,
                                                                              sinks, stride)
                             for j in range(t)] for i in range(t)])
    torch.testing.assert_close(got[0], naive_attention(q[0], k[0], v[0], allowed), rtol=1e-10, atol=1e-10)


CACHE_MASKS = [("local", 1, 0, 0), ("local", 5, 0, 0), ("sparse", 4, 2, 3), ("sparse", 3, 0, 4), ("global", 0, 0, 0)]


def empty_kv(kind, window, sinks, stride, max_len, batch=2, n_kv=2, d=8):
    """An empty KVState laid out as HybridCache lays out this layer (far slots, ring, trash slot)."""
    far = sinks + (max_len // stride if stride else 0) if kind == "sparse" else 0
    ring = max_len if kind == "global" else window
    slots = far + ring + 1
    return KVState(k=torch.zeros(batch, slots, n_kv, d, dtype=torch.float64),
                   v=torch.zeros(batch, slots, n_kv, d, dtype=torch.float64),
                   pos=torch.full((batch, slots), -1), ring_start=far, ring_size=ring, sinks=sinks, stride=stride)


@pytest.mark.parametrize("kind,window,sinks,stride", CACHE_MASKS)
@pytest.mark.parametrize("chunk", [1, 3])
def test_cached_attention_after_many_wraps(kind, window, sinks, stride, chunk):
    """Feed 40 tokens (many ring wraps) `chunk` at a time through a KVState; compare with full attention."""
    torch.manual_seed(1)
    t, max_len = 40, 40
    q = torch.randn(2, t, 4, 8, dtype=torch.float64)
    k, v = torch.randn(2, 2, t, 2, 8, dtype=torch.float64)
    full = attention(q, k, v, kind=kind, window=window, sinks=sinks, stride=stride)
    kv = empty_kv(kind, window, sinks, stride, max_len)
    far = kv.ring_start
    outs = []
    for s in range(0, t, chunk):
        e = min(t, s + chunk)
        pos = torch.arange(s, e).expand(2, -1)
        outs.append(attention_with_cache(q[:, s:e], k[:, s:e], v[:, s:e], kv.k, kv.v, kv.pos, pos,
                                         ring_start=far, kind=kind, window=window, sinks=sinks, stride=stride))
        kv.write(k[:, s:e], v[:, s:e], pos, torch.ones_like(pos, dtype=torch.bool))
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-10, atol=1e-10)
    assert kv.pos[:, -1].eq(-1).all()  # the trash slot is never readable


@pytest.mark.parametrize("kind,window,sinks,stride", CACHE_MASKS)
def test_decode_write_then_read_after_many_wraps(kind, window, sinks, stride):
    """Decode writes the new key first, then reads only the cache: equal to full attention at every step."""
    from kernels.attention.reference import attention_decode
    torch.manual_seed(2)
    t, max_len = 40, 40
    q = torch.randn(2, t, 4, 8, dtype=torch.float64)
    k, v = torch.randn(2, 2, t, 2, 8, dtype=torch.float64)
    full = attention(q, k, v, kind=kind, window=window, sinks=sinks, stride=stride)
    kv = empty_kv(kind, window, sinks, stride, max_len)
    far = kv.ring_start
    outs = []
    for s in range(t):
        pos = torch.full((2, 1), s)
        kv.write(k[:, s:s + 1], v[:, s:s + 1], pos, torch.ones_like(pos, dtype=torch.bool))
        outs.append(attention_decode(q[:, s], kv.k, kv.v, kv.pos, pos[:, 0], ring_start=far, kind=kind,
                                     window=window, sinks=sinks, stride=stride))
    torch.testing.assert_close(torch.stack(outs, 1), full, rtol=1e-10, atol=1e-10)
