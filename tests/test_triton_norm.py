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


@pytest.mark.parametrize("x_dtype,r_dtype,out_dtype", [(torch.float32, torch.float32, None),
                                                       (torch.bfloat16, torch.float32, torch.bfloat16),
                                                       (torch.bfloat16, torch.bfloat16, None),
                                                       (torch.float32, None, torch.bfloat16)])
def test_add_rmsnorm_matches_reference(x_dtype, r_dtype, out_dtype):
    """The fused residual add + norm: both outputs and the gradients of x, residual and weight (each output
    carrying a gradient, as the next block's add and this block's mixer give them)."""
    from kernels.norm.triton_norm import add_rmsnorm
    g = torch.Generator().manual_seed(1)
    shape = (3, 7, 40)
    x = (torch.randn(*shape, generator=g) * 2).to(DEVICE, x_dtype).requires_grad_()
    r = None if r_dtype is None else torch.randn(*shape, generator=g).to(DEVICE, r_dtype).requires_grad_()
    w = (1 + 0.3 * torch.randn(40, generator=g)).to(DEVICE).requires_grad_()
    xd, wd = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    rd = None if r is None else r.detach().double().requires_grad_()
    out, s = add_rmsnorm(x, r, w, 1e-5, out_dtype=out_dtype)
    out_r, s_r = ref.add_rmsnorm(xd, rd, wd, 1e-5)
    s_want = torch.promote_types(x_dtype, r_dtype or x_dtype)
    assert out.dtype == (out_dtype or s_want) and s.dtype == s_want
    dy, ds = torch.randn(shape, generator=g).double().to(DEVICE), torch.randn(shape, generator=g).double().to(DEVICE)
    ((out.double() * dy).sum() + (s.double() * ds).sum()).backward()
    ((out_r * dy).sum() + (s_r * ds).sum()).backward()
    tol = 1e-4 if x_dtype == torch.float32 and out_dtype is None else 1e-2
    errs = {"out": rel(out, out_r), "s": rel(s, s_r), "dx": rel(x.grad, xd.grad), "dw": rel(w.grad, wd.grad)}
    if r is not None:
        errs["dr"] = rel(r.grad, rd.grad)
        assert r.grad.dtype == r.dtype
    assert x.grad.dtype == x.dtype
    assert max(errs.values()) < tol, errs


def test_add_rmsnorm_unused_sum_and_bad_input():
    """The model's last norm: the sum gets no gradient. Bad shapes name the argument."""
    from kernels.norm.triton_norm import add_rmsnorm
    x, r = torch.randn(2, 5, 16, device=DEVICE, requires_grad=True), torch.randn(2, 5, 16, device=DEVICE)
    w = torch.ones(16, device=DEVICE)
    out, _ = add_rmsnorm(x, r, w, 1e-5)
    out.sum().backward()
    xd = x.detach().double().requires_grad_()
    ref.add_rmsnorm(xd, r.double(), w.double(), 1e-5)[0].sum().backward()
    assert rel(x.grad, xd.grad) < 1e-4
    for fn in (add_rmsnorm, ref.add_rmsnorm):
        with pytest.raises(ValueError, match="residual"):
            fn(x, r[:, :-1], w, 1e-5)
    with pytest.raises(ValueError, match="weight"):
        add_rmsnorm(x, r, w[:-1], 1e-5)
