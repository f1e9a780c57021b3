"""Triton RoPE (kernels/rope/triton_rope.py) against the reference in float64, forward and backward."""
import importlib.util

import pytest
import torch

from kernels.rope import reference as ref

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("shape", [(2, 9, 3, 16), (1, 5, 1, 6), (2, 3, 70, 8)])
def test_matches_reference(dtype, tol, shape):
    from kernels.rope.triton_rope import rope
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g).to(DEVICE, dtype).requires_grad_()
    pos = torch.randint(0, 5000, shape[:2], generator=g).to(DEVICE)
    xd = x.detach().double().requires_grad_()
    out, out_ref = rope(x, pos, 10000.0), ref.rope(xd, pos, 10000.0)
    assert out.dtype == dtype and out.shape == x.shape
    dy = torch.randn(shape, generator=g).double().to(DEVICE)
    (out.double() * dy).sum().backward()
    (out_ref * dy).sum().backward()
    errs = {"out": rel(out, out_ref), "dx": rel(x.grad, xd.grad)}
    assert max(errs.values()) < tol, errs


def test_strided_input_and_bad_input():
    """q as a strided view (a slice of a fused projection) and wrong shapes named."""
    from kernels.rope.triton_rope import rope
    both = torch.randn(2, 4, 6, 8, device=DEVICE)
    x = both[:, :, :3]
    pos = torch.arange(4, device=DEVICE).expand(2, 4)
    assert rel(rope(x, pos, 500.0), ref.rope(x.double(), pos, 500.0)) < 1e-5
    for fn in (rope, ref.rope):
        with pytest.raises(ValueError, match="pos"):
            fn(x, pos[:, :-1], 500.0)
        with pytest.raises(ValueError, match="head_dim"):
            fn(x[..., :7], pos, 500.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rope_on", [True, False])
@pytest.mark.parametrize("hq,hk,d,ring", [(4, 2, 16, 8), (3, 3, 6, 5), (8, 1, 32, 64)])
def test_decode_rope_and_cache_write_match_the_reference(dtype, rope_on, hq, hk, d, ring):
    """One launch rotates q and the new key and writes key, value and position into each row's ring slot (rows at
    different positions, some past the ring's size so the slot wraps); nothing else in the cache changes."""
    from kernels.rope.triton_rope import rope_kv_write
    g = torch.Generator().manual_seed(hq * 100 + d)
    batch, slots = 3, ring
    q = torch.randn(batch, hq, d, generator=g).to(DEVICE, dtype)
    k, v = (torch.randn(batch, hk, d, generator=g).to(DEVICE, dtype) for _ in range(2))
    pos = torch.tensor([0, ring - 1, 3 * ring + 2])[:batch].to(DEVICE)
    caches = [torch.randn(batch, slots, hk, d, generator=g).to(DEVICE, dtype) for _ in range(2)]
    pos_cache = torch.randint(0, 100, (batch, slots), generator=g).to(DEVICE)
    want_caches = [c.clone() for c in caches] + [pos_cache.clone()]
    theta = 10000.0 if rope_on else None
    want = ref.rope_kv_write(q, k, v, pos, *want_caches, ring, theta)
    got = rope_kv_write(q, k, v, pos, *caches, pos_cache, ring, theta)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert got.dtype == dtype and rel(got, want) < tol
    for a, b in zip(caches + [pos_cache], want_caches):
        assert rel(a, b) < tol if a.is_floating_point() else torch.equal(a, b)
    if not rope_on:
        assert torch.equal(got, q)


def test_decode_rope_and_cache_write_refuse_bad_shapes():
    with pytest.raises(ValueError, match="rope_kv_write"):
        ref.rope_kv_write(torch.zeros(2, 4, 8), torch.zeros(2, 2, 8), torch.zeros(2, 2, 8),
                          torch.zeros(3, dtype=torch.long), torch.zeros(2, 4, 2, 8), torch.zeros(2, 4, 2, 8),
                          torch.zeros(2, 4, dtype=torch.long), 4, 1e4)
