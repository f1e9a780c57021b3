"""Few-row projections (kernels/linear/triton_gemv.py) against F.linear in float64: several weights in one launch
(with and without biases, widths that do not divide the column block), the fused SwiGLU, row counts 1..MAX_ROWS,
strided input rows. Where it was not measured to pay, under autograd, for many rows and for bad shapes the op takes
the reference's path and errors."""
import importlib.util

import pytest
import torch
import torch.nn.functional as F

from kernels.linear import reference as ref

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def rand(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(DEVICE, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows, k, widths, bias", [
    ((1, 1), 96, (96, 32, 32), False),      # q, k, v of a GQA layer
    ((3, 1), 80, (200,), True),             # one projection, bias, 200 not a multiple of the block
    ((2,), 33, (5, 7, 9, 11, 13), True),    # five weights: two launches; odd K
    ((8,), 64, (48, 16), False),            # MAX_ROWS rows
])
def test_linears_match_f_linear(dtype, rows, k, widths, bias):
    from kernels.linear import triton_gemv
    x = rand(*rows, k, dtype=dtype)
    ws = [rand(n, k, dtype=dtype) / k ** 0.5 for n in widths]
    bs = [rand(n, dtype=dtype) if bias and i != 1 else None for i, n in enumerate(widths)] if bias else None
    with torch.no_grad():
        out = triton_gemv.linears(x, ws, bs)
    for i, (y, w) in enumerate(zip(out, ws)):
        want = F.linear(x.double(), w.double(), bs[i].double() if bs and bs[i] is not None else None)
        assert y.shape == (*rows, w.shape[0]) and y.dtype == dtype
        assert rel(y, want) < TOL[dtype], (i, rel(y, want))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows, k, n", [((1, 1), 64, 176), ((5,), 100, 33), ((2, 4), 256, 64)])
def test_swiglu_linear_matches_reference(dtype, rows, k, n):
    from kernels.linear import triton_gemv
    x = rand(*rows, k, dtype=dtype)
    wg, wu = rand(n, k, dtype=dtype) / k ** 0.5, rand(n, k, dtype=dtype) / k ** 0.5
    with torch.no_grad():
        y = triton_gemv.swiglu_linear(x, wg, wu)
    assert y.shape == (*rows, n) and y.dtype == dtype
    assert rel(y, ref.swiglu_linear(x.double(), wg.double(), wu.double())) < TOL[dtype]


def test_strided_rows_and_the_paths_that_stay_on_f_linear(monkeypatch):
    """A slice of a wider tensor is read through its row stride; with autograd, or more rows than MAX_ROWS, the
    op is F.linear (gradients flow, the kernel is not launched)."""
    from kernels.linear import triton_gemv
    wide = rand(3, 1, 100)
    x = wide[..., 10:74]
    w = rand(40, 64)
    with torch.no_grad():
        (y,) = triton_gemv.linears(x, [w])
    assert rel(y, F.linear(x.double(), w.double())) < 1e-5

    launched = []
    monkeypatch.setattr(triton_gemv, "_proj_kernel", _Spy(launched))
    wg = rand(40, 64).requires_grad_()
    (y,) = triton_gemv.linears(x, [wg])
    y.sum().backward()
    assert wg.grad is not None
    triton_gemv.swiglu_linear(x, wg, w).sum().backward()
    with torch.no_grad():
        triton_gemv.linears(rand(triton_gemv.MAX_ROWS + 1, 64), [w])
        triton_gemv.linears(rand(4, 64), [rand(4384, 64)])  # 4 rows of a wide in-projection: the library's
        triton_gemv.swiglu_linear(rand(1, 8), rand(11008, 8), rand(11008, 8))  # one row, widest SwiGLU
    assert launched == []


class _Spy:
    def __init__(self, calls):
        self.calls = calls

    def __getitem__(self, grid):
        self.calls.append(grid)
        raise AssertionError("the kernel was launched")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows, k, widths, swiglu, bias", [
    ((1, 1), 96, (96, 32, 32), False, True),   # an attention layer's pre-norm and q / k / v
    ((3,), 80, (120,), False, False),           # a Mamba in-projection
    ((2, 1), 64, (176, 176), True, False),      # an MLP's pre-norm, gate and up
    ((1,), 40, (8, 8, 8, 8, 8), False, False),  # more weights than one launch takes: add_rmsnorm, then linears
])
def test_add_rmsnorm_linears_matches_the_unfused_ops(dtype, rows, k, widths, swiglu, bias):
    """The sum is the unfused op's bit for bit on the GPU (Triton's CPU interpreter rounds to bf16 by truncation,
    so there within one bf16 step); the projections are within the dtype's tolerance of float64."""
    from kernels.linear import triton_gemv
    from kernels.norm import reference as norm_ref
    x, r = rand(*rows, k, dtype=dtype), rand(*rows, k, dtype=dtype)
    nw = (1 + 0.3 * torch.randn(k)).to(DEVICE, dtype)
    ws = [rand(n, k, dtype=dtype) / k ** 0.5 for n in widths]
    bs = [rand(n, dtype=dtype) for n in widths] if bias else None
    with torch.no_grad():
        outs, s = triton_gemv.add_rmsnorm_linears(x, r, nw, 1e-5, ws, bs, swiglu=swiglu)
    h, s_want = norm_ref.add_rmsnorm(x, r, nw, 1e-5)
    assert torch.equal(s, s_want) if DEVICE == "cuda" else rel(s, s_want) < TOL[dtype]
    hd = h.double()
    want = ([ref.swiglu_linear(hd, ws[0].double(), ws[1].double())] if swiglu else
            ref.linears(hd, [w.double() for w in ws], None if bs is None else [b.double() for b in bs]))
    assert len(outs) == len(want)
    for y, w in zip(outs, want):
        assert y.dtype == dtype and rel(y, w) < TOL[dtype] * (2 if swiglu else 1)  # silu(g) * u: two roundings


def test_add_rmsnorm_linears_bad_input():
    from kernels.linear import triton_gemv
    x = rand(1, 16)
    for fn in (triton_gemv.add_rmsnorm_linears, ref.add_rmsnorm_linears):
        with pytest.raises(ValueError, match="residual"):
            fn(x, rand(2, 16), torch.ones(16), 1e-5, [rand(4, 16)])
        with pytest.raises(ValueError, match="norm weight"):
            fn(x, rand(1, 16), torch.ones(15), 1e-5, [rand(4, 16)])
        with pytest.raises(ValueError, match="swiglu takes two weights"):
            fn(x, rand(1, 16), torch.ones(16), 1e-5, [rand(4, 16)], swiglu=True)


def test_bad_input_names_the_weight():
    from kernels.linear import triton_gemv
    x = rand(1, 64)
    for fn in (triton_gemv.linears, ref.linears):
        with pytest.raises(ValueError, match=r"weight 1 has shape \(8, 63\)"):
            fn(x, [rand(8, 64), rand(8, 63)])
        with pytest.raises(ValueError, match="bias 0 has shape"):
            fn(x, [rand(8, 64)], [rand(9)])
        with pytest.raises(ValueError, match="no weight"):
            fn(x, [])
    for fn in (triton_gemv.swiglu_linear, ref.swiglu_linear):
        with pytest.raises(ValueError, match="differ"):
            fn(x, rand(8, 64), rand(9, 64))
    with pytest.raises(ValueError, match="float64 on"):
        ref.linears(x, [rand(8, 64).double()])


def test_the_fused_kernel_runs_where_it_was_measured_to_pay():
    from kernels.linear.reference import MAX_ROWS, fused_pays
    assert fused_pays(1, [768, 768, 768]) and fused_pays(1, [4096] * 3) and not fused_pays(1, [11008])
    assert fused_pays(4, [2048]) and not fused_pays(4, [3072]) and not fused_pays(4, [768, 4384])
    assert fused_pays(8, [1024, 256, 256]) and not fused_pays(8, [2048])
    assert not fused_pays(MAX_ROWS + 1, [64])


@pytest.mark.parametrize("rows, n, k", [(1, 768, 768), (1, 2048, 768), (16, 4096, 1024), (1, 80, 1536)])
def test_blocks_cover_every_sm_and_bound_the_tile(rows, n, k):
    from kernels.linear import triton_gemv
    bm, bn, bk = triton_gemv.blocks(rows, n, k, 132)
    assert bm >= rows and bm * bn * bk <= 8192 and bk >= 16
    assert -(-n // bn) >= 2 * 132 or bn == 2


@pytest.mark.parametrize("setting", [[2, 11, 1], [8, 14, 4], [4, 12, 2]])
def test_every_launch_setting_gives_the_same_projections(setting):
    """The autotuner (BRAIDLM_AUTOTUNE=1) may pick any of CANDIDATES per shape: each gives the default's values."""
    from kernels.linear import triton_gemv
    assert setting in triton_gemv.CANDIDATES and all(d in triton_gemv.CANDIDATES for d in triton_gemv.TUNING.values())
    x, r = rand(2, 1, 72), rand(2, 1, 72)
    ws = [rand(40, 72) / 72 ** 0.5, rand(24, 72) / 72 ** 0.5]
    s_out, nw = torch.empty(2, 72, device=DEVICE), torch.ones(72, device=DEVICE)
    with torch.no_grad():
        got = triton_gemv._launch_with(x.reshape(2, 72), ws, None, False, (r.reshape(2, 72), nw, 1e-5, s_out), *setting)
    want, s = ref.add_rmsnorm_linears(x, r, torch.ones(72, device=DEVICE), 1e-5, ws)
    assert rel(s_out, s.reshape(2, 72)) < 1e-6
    for y, w in zip(got, want):
        assert rel(y, w.reshape(2, -1)) < 1e-5
