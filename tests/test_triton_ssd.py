"""Triton chunked SSD scan (forward + backward) against the reference in float64: interpreter on CPU at small
shapes, native on the GPU (@gpu) at real shapes."""
import importlib.util

import pytest
import torch

from kernels.ssd import reference as ref

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def make(batch, seqlen, nheads, headdim, d_state, ngroups, dtype, *, docs=False, init=True, D="vec", z=False,
         bias=True, limit=False, seed=0):
    """Inputs rounded to `dtype` (A, D, dt_bias, initial state fp32), and the scan options."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)
    args = dict(x=r(batch, seqlen, nheads, headdim).to(dtype), dt=r(batch, seqlen, nheads).to(dtype),
                A=-torch.rand(nheads, generator=g) - 0.2,
                B=r(batch, seqlen, ngroups, d_state).to(dtype), C=r(batch, seqlen, ngroups, d_state).to(dtype))
    kw = dict(dt_softplus=True)
    if D == "vec":
        kw["D"] = r(nheads)
    elif D == "mat":
        kw["D"] = r(nheads, headdim)
    if z:
        kw["z"] = r(batch, seqlen, nheads, headdim).to(dtype)
    if bias:
        kw["dt_bias"] = r(nheads)
    if limit:
        kw["dt_limit"] = (0.1, 1.0)
    if init:
        kw["initial_state"] = r(batch, nheads, headdim, d_state)
    if docs:  # sorted ids: boundaries land inside chunks, on chunk edges and in runs of short documents
        kw["seq_idx"] = torch.sort(torch.randint(0, max(2, seqlen // 9), (batch, seqlen), generator=g), 1).values
    return args, kw


def on_device(tensors: dict) -> dict:
    return {k: (v.to(DEVICE) if torch.is_tensor(v) else v) for k, v in tensors.items()}


def check(args, kw, dtype, chunk_size, device=DEVICE):
    """Ours vs the reference in fp64 on the same (rounded) values: y, final state and every gradient."""
    from kernels.ssd.triton_scan import ssd_chunk_scan
    leaves = {k: v for k, v in {**args, **kw}.items() if torch.is_tensor(v) and v.is_floating_point()}
    opts = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in kw.items() if k not in leaves}
    ours = {k: v.detach().to(device).clone().requires_grad_() for k, v in leaves.items()}
    want = {k: v.detach().to(device, torch.float64).requires_grad_() for k, v in leaves.items()}
    y, fin = ssd_chunk_scan(**ours, **opts, chunk_size=chunk_size, return_final_state=True)
    y_ref, fin_ref = ref.ssd_chunk_scan(**want, **opts, chunk_size=chunk_size, return_final_state=True)
    assert y.dtype == args["x"].dtype and fin.dtype == torch.float32
    g = torch.Generator(device=device).manual_seed(1)
    dy = torch.randn(y.shape, generator=g, device=device, dtype=torch.float64)
    dfin = torch.randn(fin.shape, generator=g, device=device, dtype=torch.float64)
    ((y.double() * dy).sum() + (fin.double() * dfin).sum()).backward()
    ((y_ref * dy).sum() + (fin_ref * dfin).sum()).backward()
    pairs = {"y": (y, y_ref), "final": (fin, fin_ref)}
    pairs.update({f"d{k}": (ours[k].grad, want[k].grad) for k in leaves})
    assert all(a is not None and b is not None for a, b in pairs.values()), [k for k, (a, b) in pairs.items() if a is None or b is None]
    errs = {k: float((a.detach().double() - b.detach()).norm() / b.detach().norm()) for k, (a, b) in pairs.items()}
    bad = {k: e for k, e in errs.items() if not e <= TOL[dtype]}
    assert not bad, f"rel errors over {TOL[dtype]}: {bad}"


CASES = [  # batch, seqlen, nheads, headdim, d_state, ngroups, chunk, options
    (2, 37, 4, 8, 16, 2, 16, dict(docs=True)),
    (1, 80, 4, 8, 16, 1, 16, dict(docs=True, D="mat", z=True, limit=True)),
    (2, 50, 4, 16, 24, 4, 32, dict(docs=False, init=False, D=None, bias=False)),
    (2, 45, 2, 8, 16, 1, 16, dict(docs=True, init=False)),
    (1, 150, 2, 8, 16, 1, 64, dict(docs=True)),  # chunk 64: the dB/dC kernel tiles rows by 32, the others by 64
]


@pytest.mark.parametrize("case", CASES)
def test_fp32_matches_reference(case):
    batch, L, H, P, N, G, T, opts = case
    args, kw = make(batch, L, H, P, N, G, torch.float32, **opts)
    check(args, kw, torch.float32, T)


@pytest.mark.parametrize("tiles", [
    dict(chunk_out=dict(BT=32), bwd_dsl=dict(BT=16, programs=10**6), bwd_dx=dict(BT=64),
         bwd_dbdc=dict(BT=16, programs=10**6)),  # every head split
    dict(chunk_out=dict(BT=64), bwd_dsl=dict(BT=32, programs=1), bwd_dx=dict(BT=16),
         bwd_dbdc=dict(BT=64, programs=1)),  # no split, coarse dB/dC
])
def test_per_kernel_tiles_and_head_splits(tiles, monkeypatch):
    """Each kernel's own tile rows (the C.B^T buffer is written at the coarsest of its readers') and the dSL
    partial sums over shares of a group's heads give the same function. Two heads in the one group: split into
    two shares (tiles0) or looped over in one program (tiles1)."""
    from kernels.ssd import triton_scan
    for kernel, params in tiles.items():
        monkeypatch.setitem(triton_scan.TUNING, kernel, {**triton_scan.TUNING[kernel], **params})
    args, kw = make(2, 90, 2, 8, 16, 1, torch.float32, docs=True)
    check(args, kw, torch.float32, 64)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_matches_reference(dtype):
    args, kw = make(2, 40, 4, 8, 16, 2, dtype, docs=True, z=dtype == torch.float16)  # two chunks, the 2nd short
    check(args, kw, dtype, 32)


def test_documents_do_not_leak_across_chunks():
    """A document that starts exactly on a chunk edge and one spanning three chunks; the row's second document
    must not see the initial state nor the first document, so its output equals a fresh run on it alone."""
    from kernels.ssd.triton_scan import ssd_chunk_scan
    args, kw = make(1, 64, 2, 8, 16, 1, torch.float32)
    kw["seq_idx"] = (torch.arange(64) >= 16).long()[None]
    check(args, kw, torch.float32, 16)
    args, kw = on_device(args), on_device(kw)
    y = ssd_chunk_scan(**args, **kw, chunk_size=16)
    tail = {k: v[:, 16:] for k, v in args.items() if k != "A"}
    solo = ssd_chunk_scan(**tail, A=args["A"], **{k: v for k, v in kw.items()
                                                  if k not in ("seq_idx", "initial_state")}, chunk_size=16)
    torch.testing.assert_close(y[:, 16:], solo, rtol=1e-5, atol=1e-5)


def test_any_chunk_size_gives_the_same_function():
    """The kernels run a power-of-two chunk in 16..256; other chunk sizes (layouts may ask for 8 or 24) give
    the same outputs as the reference's own chunking."""
    from kernels.ssd import reference as ref
    from kernels.ssd.triton_scan import ssd_chunk_scan
    args = on_device(make(1, 40, 4, 8, 16, 2, torch.float32)[0])
    for chunk in (8, 24):
        got = ssd_chunk_scan(**args, chunk_size=chunk)
        want = ref.ssd_chunk_scan(**{k: v.double() for k, v in args.items()}, chunk_size=chunk)
        assert float((got.double() - want).norm() / want.norm()) <= 1e-4


# CPU: the clamped case (HAS_LIMIT's other branch runs in every other test here); the unclamped one with -m gpu
@pytest.mark.parametrize("limit", [pytest.param(False, marks=pytest.mark.gpu), True])
def test_dt_read_in_place_from_a_slice_and_A_as_A_log(limit):
    """The model passes dt as a strided slice of its in-projection and A as the parameter A_log: the kernels make
    dt (bias, softplus, clamp) and A = -exp(A_log) themselves; outputs and every gradient (the slice's, dt_bias's,
    A_log's) match the reference in float64."""
    from kernels.ssd.triton_scan import ssd_chunk_scan
    args, kw = make(2, 45, 4, 8, 16, 2, torch.float32, docs=True, limit=limit)
    g = torch.Generator().manual_seed(3)
    proj = torch.randn(2, 45, 4 + 7, generator=g)  # dt sits at columns 3..6 of a wider projection
    A_log = torch.rand(4, generator=g) * 2 - 1
    leaves = dict(proj=proj, A_log=A_log, dt_bias=kw.pop("dt_bias"))
    ours = {k: v.detach().to(DEVICE).clone().requires_grad_() for k, v in leaves.items()}
    want = {k: v.detach().to(DEVICE, torch.float64).requires_grad_() for k, v in leaves.items()}
    rest = on_device({k: v for k, v in args.items() if k not in ("dt", "A")})
    kw = on_device(kw)
    outs = []
    for t, impl in ((ours, ssd_chunk_scan), (want, ref.ssd_chunk_scan)):
        cast = {k: (v.to(t["proj"].dtype) if v.is_floating_point() else v) for k, v in rest.items()}
        opts = {k: (v.to(t["proj"].dtype) if torch.is_tensor(v) and v.is_floating_point() else v)
                for k, v in kw.items()}
        y = impl(dt=t["proj"][..., 3:7], A=t["A_log"], dt_bias=t["dt_bias"], A_is_log=True, chunk_size=16,
                 **cast, **opts)
        dy = torch.randn(y.shape, generator=torch.Generator(device=DEVICE).manual_seed(1), device=DEVICE,
                         dtype=torch.float64)
        (y.double() * dy).sum().backward()
        outs.append(y)
    rel = lambda a, b: float((a.detach().double() - b.detach()).norm() / b.detach().norm())
    assert rel(outs[0], outs[1]) < 1e-4
    for k in leaves:
        assert ours[k].grad is not None and want[k].grad is not None, k
        assert rel(ours[k].grad, want[k].grad) < 1e-4, k
    assert ours["proj"].grad[..., :3].abs().max() == 0 and ours["proj"].grad[..., 7:].abs().max() == 0


def test_bad_inputs():
    from kernels.ssd.triton_scan import ssd_chunk_scan
    args, kw = make(1, 20, 4, 8, 16, 2, torch.float32)
    with pytest.raises(ValueError, match="chunk_size"):
        ssd_chunk_scan(**args, chunk_size=0)
    with pytest.raises(ValueError, match="multiple of ngroups"):
        ssd_chunk_scan(**{**args, "B": args["B"][:, :, :1].expand(-1, -1, 3, -1).contiguous(),
                          "C": args["C"][:, :, :1].expand(-1, -1, 3, -1).contiguous()})
    with pytest.raises(ValueError, match="dt must be"):
        ssd_chunk_scan(**{**args, "dt": args["dt"][:, :-1]})
    with pytest.raises(ValueError, match="seq_idx"):
        ssd_chunk_scan(**args, seq_idx=torch.zeros(1, 19, dtype=torch.long))
    with pytest.raises(ValueError, match="D must be"):
        ssd_chunk_scan(**args, D=torch.ones(3))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("chunk", [64, 256])
def test_gpu_real_shapes(dtype, chunk):
    args, kw = make(2, 1000, 8, 64, 128, 1 if chunk == 256 else 2, dtype, docs=True, D="mat", z=chunk == 64)
    check(args, kw, dtype, chunk, device="cuda")


def step_tol(dtype):  # decode steps
    return dict(rtol=1e-2, atol=1e-2) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-5)


def test_ssd_state_update_reads_strided_slices():
    """A batched decode step hands the step slices: x, B, C of the conv output [x | B | C], z and dt of the
    in-projection [z | xBC | dt]. They are read through their strides (no copy) and give the reference's result."""
    from kernels.ssd.triton_step import ssd_state_update
    g = torch.Generator().manual_seed(3)
    batch, nheads, headdim, dstate, ngroups = 3, 4, 6, 5, 2
    d_inner, gn = nheads * headdim, ngroups * dstate
    xbc = torch.randn(batch, d_inner + 2 * gn, generator=g).to(DEVICE)
    zxd = torch.randn(batch, d_inner + 7 + nheads, generator=g).to(DEVICE)
    x = xbc[:, :d_inner].unflatten(-1, (nheads, headdim))
    B, C = (t.unflatten(-1, (ngroups, dstate)) for t in (xbc[:, d_inner:d_inner + gn], xbc[:, d_inner + gn:]))
    z, dt = zxd[:, :d_inner].unflatten(-1, (nheads, headdim)), zxd[:, -nheads:]
    A = -torch.rand(nheads, generator=g).to(DEVICE) * 4 - 0.5
    kw = dict(D=torch.randn(nheads, generator=g).to(DEVICE), z=z, dt_bias=torch.randn(nheads, generator=g).to(DEVICE),
              dt_softplus=True)
    state = torch.randn(batch, nheads, headdim, dstate, generator=g).to(DEVICE)
    want_state = state.clone()
    want = ref.ssd_state_update(want_state, x, dt, A, B, C, **kw)
    assert not any(t.is_contiguous() for t in (x, B, C, z, dt))
    got = ssd_state_update(state, x, dt, A, B, C, **kw)
    torch.testing.assert_close(state, want_state, **step_tol(torch.float32))
    torch.testing.assert_close(got, want, **step_tol(torch.float32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch,nheads,headdim,dstate,ngroups", [(1, 2, 8, 16, 1), (3, 4, 6, 5, 2)])
@pytest.mark.parametrize("opts", ["plain", "full", "clamp"])
def test_ssd_state_update_matches_reference(dtype, batch, nheads, headdim, dstate, ngroups, opts):
    from kernels.ssd.triton_step import ssd_state_update
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)
    state = r(batch, nheads, headdim, dstate)
    x, z = r(batch, nheads, headdim), r(batch, nheads, headdim)
    dt, A = r(batch, nheads), -torch.rand(nheads, generator=g) * 4 - 0.5
    B, C = r(batch, ngroups, dstate), r(batch, ngroups, dstate)
    kw = {}
    if opts != "plain":
        kw = dict(D=r(nheads, headdim) if opts == "clamp" else r(nheads), z=z, dt_bias=r(nheads), dt_softplus=True)
    if opts == "clamp":
        kw["dt_limit"] = (0.05, 0.8)
    to = lambda t: t.to(DEVICE, dtype) if t.dtype.is_floating_point and t.dim() > 1 and t is not state else t.to(DEVICE)
    args = [to(t) for t in (x, dt, A, B, C)]
    kw_dev = {k: (to(v) if torch.is_tensor(v) else v) for k, v in kw.items()}
    want_state = state.clone().to(DEVICE)
    want = ref.ssd_state_update(want_state, *args, **kw_dev)
    got_state = state.clone().to(DEVICE)
    if opts == "full":  # the model's decode step passes A_log and lets the kernel make A = -exp(A_log)
        args[2] = (-args[2]).log()
        kw_dev["A_is_log"] = True
        log_state = state.clone().to(DEVICE)
        torch.testing.assert_close(ref.ssd_state_update(log_state, *args, **kw_dev), want, **step_tol(dtype))
    got = ssd_state_update(got_state, *args, **kw_dev)
    assert got.dtype == want.dtype
    torch.testing.assert_close(got_state, want_state, **step_tol(torch.float32))
    torch.testing.assert_close(got.float(), want.float(), **step_tol(dtype))
