"""Triton SwiGLU gate (kernels/swiglu/triton_swiglu.py) against the reference in float64, forward and backward."""
import importlib.util

import pytest
import torch

from kernels.swiglu import reference as ref

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(3, 5, 40), (1, 9000), (7,)])
def test_matches_reference(dtype, shape):
    from kernels.swiglu import triton_swiglu
    g = torch.Generator().manual_seed(0)
    leaves = [(torch.randn(*shape, generator=g) * 3).to(DEVICE, dtype).requires_grad_() for _ in range(2)]
    doubles = [t.detach().double().requires_grad_() for t in leaves]
    out, out_ref = triton_swiglu.swiglu(*leaves), ref.swiglu(*doubles)
    assert out.dtype == dtype and out.shape == tuple(shape)
    dy = torch.randn(shape, generator=g).double()
    (out.double() * dy.to(DEVICE)).sum().backward()
    (out_ref * dy.to(DEVICE)).sum().backward()
    errs = {"out": rel(out, out_ref), "dgate": rel(leaves[0].grad, doubles[0].grad),
            "dup": rel(leaves[1].grad, doubles[1].grad)}
    assert max(errs.values()) < TOL[dtype], errs


def test_strided_inputs_and_bad_input():
    """Non-contiguous inputs (slices of one projection) give the reference's values; mismatched ones its error."""
    from kernels.swiglu import triton_swiglu
    both = torch.randn(4, 6, 2 * 33, device=DEVICE)
    gate, up = both[..., :33], both[..., 33:]
    assert rel(triton_swiglu.swiglu(gate, up), ref.swiglu(gate.double(), up.double())) < 1e-5
    for fn in (triton_swiglu.swiglu, ref.swiglu):
        with pytest.raises(ValueError, match="swiglu: gate"):
            fn(gate, up[..., :-1])
