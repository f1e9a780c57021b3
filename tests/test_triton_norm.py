"""Triton RMSNorm / gated grouped RMSNorm (fwd + bwd) against the reference in float64."""
import importlib.util

import pytest
import torch

from kernels.norm import reference as ref

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def check(shape, dtype=torch.float32, gated=True, group_size=None, norm_before_gate=False, plain=False,
          strided=False, seed=0):
    from kernels.norm.triton_norm import rmsnorm, rmsnorm_gated
    g = torch.Generator().manual_seed(seed)
    d = shape[-1]
    leaves = {"x": torch.randn(*shape, generator=g) * 2, "weight": 1 + 0.3 * torch.randn(d, generator=g)}
    if gated:
        leaves["z"] = torch.randn(*shape, generator=g)
    ours = {k: v.to(DEVICE, torch.float32 if k == "weight" else dtype).requires_grad_() for k, v in leaves.items()}
    theirs = {k: v.detach().double().requires_grad_() for k, v in ours.items()}  # same (rounded) inputs
    args = dict(ours)
    if strided:  # x as a slice of a wider tensor (rows not contiguous)
        big = torch.cat([ours["x"].detach(), torch.randn(*shape[:-1], 3).to(ours["x"])], -1).requires_grad_()
        args["x"] = big[..., :d]
    if plain:
        out, out_ref = rmsnorm(args["x"], ours["weight"], 1e-5), ref.rmsnorm(theirs["x"], theirs["weight"], 1e-5)
    else:
        kw = dict(group_size=group_size, norm_before_gate=norm_before_gate)
        out = rmsnorm_gated(args["x"], args.get("z"), ours["weight"], 1e-5, **kw)
        out_ref = ref.rmsnorm_gated(theirs["x"], theirs.get("z"), theirs["weight"], 1e-5, **kw)
    assert out.dtype == dtype and out.shape == tuple(shape)
    dy = torch.randn_like(out_ref)
    (out.double() * dy).sum().backward()
    (out_ref * dy).sum().backward()
    if strided:
        ours["x"].grad = big.grad[..., :d]
    errs = {"out": rel(out, out_ref)}
    errs.update({f"d{k}": rel(ours[k].grad, theirs[k].grad) for k in leaves})
    bad = {k: v for k, v in errs.items() if not v <= TOL[dtype]}
    assert not bad, f"rel errors over {TOL[dtype]}: {bad}"


@pytest.mark.parametrize("shape,group_size", [((2, 5, 48), None), ((2, 5, 48), 16), ((7, 100), 25), ((3, 6), 3)])
@pytest.mark.parametrize("gated,norm_before_gate", [(False, False), (True, False), (True, True)])
def test_rmsnorm_gated_matches_reference(shape, group_size, gated, norm_before_gate):
    check(shape, gated=gated, group_size=group_size, norm_before_gate=norm_before_gate)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rmsnorm_gated_half(dtype):
    check((2, 9, 64), dtype=dtype, group_size=32)


def test_rmsnorm_plain_and_strided():
    check((3, 4, 40), plain=True, gated=False)
    check((3, 4, 40), group_size=20, strided=True)


def test_rmsnorm_bad_inputs():
    from kernels.norm.triton_norm import rmsnorm, rmsnorm_gated
    x = torch.randn(4, 12)
    with pytest.raises(ValueError, match="group_size"):
        rmsnorm_gated(x, None, torch.ones(12), 1e-5, group_size=5)
    with pytest.raises(ValueError, match="weight"):
        rmsnorm_gated(x, None, torch.ones(11), 1e-5)
    with pytest.raises(ValueError, match="z must"):
        rmsnorm_gated(x, torch.randn(4, 11), torch.ones(12), 1e-5)
    with pytest.raises(ValueError, match="8192"):
        rmsnorm(torch.randn(1, 16384), torch.ones(16384), 1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("group_size,norm_before_gate", [(3072, False), (384, True), (None, False)])
def test_rmsnorm_gated_gpu_real_shape(dtype, group_size, norm_before_gate):
    check((4, 2048, 3072), dtype=dtype, group_size=group_size, norm_before_gate=norm_before_gate)


@pytest.mark.gpu
def test_rmsnorm_gpu_wide():
    check((1024, 8192), dtype=torch.bfloat16, plain=True, gated=False)
