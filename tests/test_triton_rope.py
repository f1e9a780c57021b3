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
