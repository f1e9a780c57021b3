"""Triton selective scan (forward and backward) against the reference in float64.

CPU: Triton's interpreter at small shapes. Its generic `associative_scan` calls the combine function once per
element from Python; the fixture below swaps in one that calls it once per step along the axis on whole slices
(same semantics, vectorized), which keeps this file within seconds. GPU (-m gpu): real shapes.
"""
import importlib.util

import numpy as np
import pytest
import torch

from kernels.selective_scan import reference as ref

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True, scope="module")
def _fast_interpreter_scan():
    if DEVICE == "cuda":
        yield
        return
    from triton.runtime import interpreter

    def generic_scan(self, input):
        datas = [arg.handle.data for arg in input]
        n = datas[0].shape[self.axis]
        outs = [np.empty_like(d) for d in datas]
        acc = None
        for i in range(n):
            cur = tuple(self.to_tensor(np.ascontiguousarray(np.take(d, [i], axis=self.axis)), arg.dtype)
                        for d, arg in zip(datas, input))
            if acc is None:
                acc = cur
            else:
                ret = self.combine_fn.fn(*acc, *cur)
                acc = ret if isinstance(ret, tuple) else (ret,)
            for o, a in zip(outs, acc):
                idx = [slice(None)] * o.ndim
                idx[self.axis] = slice(i, i + 1)
                o[tuple(idx)] = a.handle.data
        return [self.to_tensor(o, arg.dtype) for o, arg in zip(outs, input)]

    old = interpreter.ScanOps.generic_scan
    interpreter.ScanOps.generic_scan = generic_scan
    yield
    interpreter.ScanOps.generic_scan = old


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def make(batch, seqlen, d_inner, d_state, dtype, full=True, init=False, docs=False, seed=0, device=DEVICE):
    """Random inputs (never zeros) in `dtype` (A, D, delta_bias fp32, as in the model)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)
    args = dict(u=r(batch, seqlen, d_inner), delta=r(batch, seqlen, d_inner) * 0.5 - 1.0,
                A=-torch.rand(d_inner, d_state, generator=g) * 3 - 0.2,
                B=r(batch, seqlen, d_state), C=r(batch, seqlen, d_state))
    kw = {}
    if full:
        kw = dict(D=r(d_inner), z=r(batch, seqlen, d_inner), delta_bias=r(d_inner) * 0.5, delta_softplus=True)
    else:
        args["delta"] = args["delta"].abs() * 0.3 + 0.05  # positive steps without softplus
    if init:
        kw["initial_state"] = r(batch, d_inner, d_state)
    if docs:
        # several documents per row, starts at block edges and inside blocks, different per row
        seq = torch.zeros(batch, seqlen, dtype=torch.long)
        for b in range(batch):
            cuts = sorted({c for c in (5 + b, 16, 17 + 3 * b, seqlen // 2, seqlen - 1) if 0 < c < seqlen})
            for c in cuts:
                seq[b, c:] += 1
        kw["seq_idx"] = seq.to(device)
    low = {"u", "delta", "B", "C", "z"}
    args = {k: v.to(device, dtype if k in low else torch.float32) for k, v in args.items()}
    kw = {k: (v.to(device, dtype if k in low else torch.float32) if torch.is_tensor(v) and v.is_floating_point()
              else v) for k, v in kw.items()}
    return args, kw


def check(batch, seqlen, d_inner, d_state, dtype, full=True, init=False, docs=False, final=True, seed=0,
          chunk_size=64):
    from kernels.selective_scan.triton_scan import selective_scan
    args, kw = make(batch, seqlen, d_inner, d_state, dtype, full, init, docs, seed)
    leaves = {k: v for k, v in {**args, **kw}.items() if torch.is_tensor(v) and v.is_floating_point()}
    ours = {k: v.detach().clone().requires_grad_() for k, v in leaves.items()}
    theirs = {k: v.detach().double().requires_grad_() for k, v in leaves.items()}
    opts = {k: v for k, v in kw.items() if k not in leaves}
    y, hT = selective_scan(**ours, **opts, return_final_state=True, chunk_size=chunk_size)
    y_ref, hT_ref = ref.selective_scan(**theirs, **opts, return_final_state=True)
    assert y.dtype == args["u"].dtype and hT.dtype == torch.float32
    assert y.shape == y_ref.shape and hT.shape == hT_ref.shape
    g = torch.Generator().manual_seed(seed + 1)
    dy = torch.randn(y.shape, generator=g).to(DEVICE)
    dh = torch.randn(hT.shape, generator=g).to(DEVICE) if final else None
    tol = 1e-4 if dtype == torch.float32 else 1e-2
    assert rel(y, y_ref) <= tol, rel(y, y_ref)
    assert rel(hT, hT_ref) <= tol, rel(hT, hT_ref)
    loss = (y.float() * dy).sum() + ((hT * dh).sum() if final else 0)
    loss_ref = (y_ref * dy.double()).sum() + ((hT_ref * dh.double()).sum() if final else 0)
    loss.backward()
    loss_ref.backward()
    for k in leaves:
        got, want = ours[k].grad, theirs[k].grad
        assert got is not None and got.dtype == ours[k].dtype, k
        assert rel(got, want) <= tol, (k, rel(got, want))


@pytest.mark.parametrize("batch,seqlen,d_inner,d_state", [(1, 37, 8, 4), (2, 70, 24, 16), (2, 1, 40, 4)])
def test_fp32_full_with_state_and_docs(batch, seqlen, d_inner, d_state):
    check(batch, seqlen, d_inner, d_state, torch.float32, full=True, init=True, docs=True)


@pytest.mark.parametrize("batch,seqlen,d_inner,d_state", [(2, 37, 20, 4), (1, 70, 8, 16)])
def test_fp32_plain_no_extras(batch, seqlen, d_inner, d_state):
    check(batch, seqlen, d_inner, d_state, torch.float32, full=False, final=False)


def test_fp32_state_without_docs():
    check(2, 37, 12, 5, torch.float32, full=True, init=True, docs=False)


# the kernels have no branch per half type (loads widen to fp32, stores cast to the pointer's type): bf16, the
# training dtype, on the CPU; fp16 with -m gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, pytest.param(torch.float16, marks=pytest.mark.gpu)])
def test_low_precision(dtype):
    check(2, 37, 24, 16, dtype, full=True, init=True, docs=True)


def test_state_does_not_leak_across_documents():
    """Two rows that differ only before a document start give the same outputs after it."""
    from kernels.selective_scan.triton_scan import selective_scan
    args, kw = make(1, 40, 8, 4, torch.float32, full=True, init=True)
    args = {k: (torch.cat([v, v]) if v.dim() == 3 and k != "A" else v) for k, v in args.items()}
    kw["z"] = torch.cat([kw["z"], kw["z"]])
    kw["initial_state"] = torch.cat([kw["initial_state"], -kw["initial_state"]])
    args["u"][1, :20] += 1.0
    kw["seq_idx"] = (torch.arange(40, device=DEVICE) >= 20).long().expand(2, 40).contiguous()
    y = selective_scan(**args, **kw)
    assert not torch.allclose(y[0, :20], y[1, :20])
    torch.testing.assert_close(y[0, 20:], y[1, 20:], rtol=0, atol=0)


def test_gradient_does_not_flow_back_across_a_document_start():
    """The backward's carry between blocks (a_first g_first) is zero at a document start: a loss on the second
    document gives no gradient to the first document's inputs nor to the initial state; a loss on the first does."""
    from kernels.selective_scan.triton_scan import _keep_mask, selective_scan
    seq = torch.tensor([[0] * 13 + [1] * 19, [0] * 32], device=DEVICE)
    assert _keep_mask(seq)[0].tolist() == [1.0] * 13 + [0.0] + [1.0] * 18 and _keep_mask(None) is None
    args, kw = make(2, 32, 8, 4, torch.float32, full=True, init=True)
    kw["seq_idx"] = seq
    leaves = {k: v.detach().requires_grad_() for k, v in {**args, **kw}.items()
              if isinstance(v, torch.Tensor) and v.is_floating_point()}
    opts = {k: v for k, v in {**args, **kw}.items() if k not in leaves}
    y = selective_scan(**leaves, **opts)
    y[0, 13:].sum().backward(retain_graph=True)
    for name in ("u", "delta", "z"):
        assert leaves[name].grad[0, :13].abs().max() == 0, name
        assert leaves[name].grad[0, 13:].abs().max() > 0, name
    assert leaves["initial_state"].grad[0].abs().max() == 0
    for t in leaves.values():
        t.grad = None
    y[0, :13].sum().backward()
    assert leaves["initial_state"].grad[0].abs().max() > 0 and leaves["u"].grad[0, 13:].abs().max() == 0


def test_fp64_runs_the_reference():
    from kernels.selective_scan.triton_scan import selective_scan
    args, kw = make(1, 9, 4, 4, torch.float64)
    args = {k: v.double() for k, v in args.items()}
    kw = {k: (v.double() if torch.is_tensor(v) else v) for k, v in kw.items()}
    torch.testing.assert_close(selective_scan(**args, **kw), ref.selective_scan(**args, **kw))


def test_bad_inputs():
    from kernels.selective_scan.triton_scan import selective_scan
    args, kw = make(1, 9, 8, 4, torch.float32)
    with pytest.raises(ValueError, match="u must be"):
        selective_scan(**{**args, "u": args["u"][0]}, **kw)
    with pytest.raises(ValueError, match="A must be"):
        selective_scan(**{**args, "A": args["A"][:3]}, **kw)
    with pytest.raises(ValueError, match="B must have shape"):
        selective_scan(**{**args, "B": args["B"][:, :, :2]}, **kw)
    with pytest.raises(ValueError, match="delta_bias must have shape"):
        selective_scan(**args, **{**kw, "delta_bias": kw["delta_bias"][:2]})
    with pytest.raises(ValueError, match="initial_state must have shape"):
        selective_scan(**args, **kw, initial_state=torch.zeros(1, 8, 5, device=DEVICE))
    with pytest.raises(ValueError, match="seq_idx must be an integer"):
        selective_scan(**args, **kw, seq_idx=torch.zeros(1, 9, device=DEVICE))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("seqlen", [1000, 2048])
def test_gpu_real_shapes(dtype, seqlen):
    check(2, seqlen, 1536, 16, dtype, full=True, init=True, docs=True)
    check(2, seqlen, 768, 16, dtype, full=False, final=False)


# CPU: partial dB/dC sums, and atomics with several blocks per chunk and a channel block wider than d_inner;
# the third tile shape (long time blocks, many narrow channel blocks) with -m gpu
@pytest.mark.parametrize("block_t,block_d,atomic,chunk", [(8, 8, False, 8), (4, 32, True, 12),
                                                          pytest.param(16, 4, True, 16, marks=pytest.mark.gpu)])
def test_other_tiles_chunks_and_partial_dbc(monkeypatch, block_t, block_d, atomic, chunk):
    """Saved states every chunk (= 1, 3 or 1 blocks here), other tile shapes, dB/dC by partial sums."""
    from kernels.selective_scan import triton_scan as ts
    monkeypatch.setitem(ts.TUNING, "fwd", dict(ts.TUNING["fwd"], BLOCK_T=block_t, BLOCK_D=block_d))
    monkeypatch.setitem(ts.TUNING, "bwd", dict(ts.TUNING["bwd"], BLOCK_D=block_d // 2))
    monkeypatch.setattr(ts, "ATOMIC_DBC", atomic)
    check(2, 37, 20, 4, torch.float32, full=True, init=True, docs=True, chunk_size=chunk)


def step_tol(dtype):  # decode steps
    return dict(rtol=1e-2, atol=1e-2) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch,dinner,dstate", [(1, 8, 16), (3, 37, 5)])
@pytest.mark.parametrize("full", [False, True])
def test_selective_state_update_matches_reference(dtype, batch, dinner, dstate, full):
    from kernels.selective_scan.triton_step import selective_state_update
    g = torch.Generator().manual_seed(1)
    r = lambda *s: torch.randn(*s, generator=g)
    state = r(batch, dinner, dstate).to(DEVICE)
    u, delta = r(batch, dinner).to(DEVICE, dtype), r(batch, dinner).to(DEVICE, dtype)
    A = (-torch.rand(dinner, dstate, generator=g) * 4).to(DEVICE)
    B, C = r(batch, dstate).to(DEVICE, dtype), r(batch, dstate).to(DEVICE, dtype)
    kw = dict(D=r(dinner).to(DEVICE), z=r(batch, dinner).to(DEVICE, dtype), delta_bias=r(dinner).to(DEVICE),
              delta_softplus=True) if full else {}
    if not full:
        delta = delta.abs()  # without softplus the step needs dt >= 0
    want_state, got_state = state.clone(), state.clone()
    want = ref.selective_state_update(want_state, u, delta, A, B, C, **kw)
    if full:  # the model's decode step passes A_log and lets the kernel make A = -exp(A_log)
        A, kw = (-A).log(), {**kw, "A_is_log": True}
        torch.testing.assert_close(ref.selective_state_update(state.clone(), u, delta, A, B, C, **kw), want,
                                   **step_tol(dtype))
    got = selective_state_update(got_state, u, delta, A, B, C, **kw)
    torch.testing.assert_close(got_state, want_state, **step_tol(torch.float32))
    torch.testing.assert_close(got.float(), want.float(), **step_tol(dtype))


def test_selective_state_update_reads_strided_rows_without_copies(monkeypatch):
    """x, z, dt, B and C of a batched decode step are slices of wider projection outputs (Mamba1's in_proj gives
    [x | z], x_proj gives [dt | B | C]): the step reads them through their row strides, copies nothing and
    returns the reference's output and state."""
    from kernels.selective_scan.triton_step import selective_state_update
    g = torch.Generator().manual_seed(2)
    batch, dinner, dstate = 3, 24, 8
    xz = torch.randn(batch, 2 * dinner, generator=g).to(DEVICE)
    dbc = torch.randn(batch, 5 + 2 * dstate, generator=g).to(DEVICE)
    u, z = xz[:, :dinner], xz[:, dinner:]
    B, C = dbc[:, 5:5 + dstate], dbc[:, 5 + dstate:]
    delta = torch.randn(batch, 2 * dinner, generator=g).to(DEVICE)[:, ::2]  # last dim strided: the one copy
    A = (-torch.rand(dinner, dstate, generator=g) * 4).to(DEVICE)
    state = torch.randn(batch, dinner, dstate, generator=g).to(DEVICE)
    kw = dict(D=torch.randn(dinner, generator=g).to(DEVICE), z=z, delta_softplus=True)
    want_state = state.clone()
    want = ref.selective_state_update(want_state, u, delta, A, B, C, **kw)
    copies = []
    real = torch.Tensor.contiguous
    monkeypatch.setattr(torch.Tensor, "contiguous",
                        lambda t, *a, **k: (copies.append(tuple(t.shape)) if not t.is_contiguous() else None,
                                            real(t, *a, **k))[1])
    got = selective_state_update(state, u, delta, A, B, C, **kw)
    monkeypatch.undo()
    torch.testing.assert_close(state, want_state, **step_tol(torch.float32))
    torch.testing.assert_close(got, want, **step_tol(torch.float32))
    assert copies == [(batch, dinner)]  # delta alone, whose last dim is strided


@pytest.fixture
def split(monkeypatch):
    """Long rows cut into segments scanned in parallel (SPLIT_PROGRAMS), at the small shapes of this file."""
    from kernels.selective_scan import triton_scan
    monkeypatch.setattr(triton_scan, "SPLIT_PROGRAMS", 1 << 20)
    return triton_scan


SEGMENT_SHAPES = [(1, 70, 8, 4, 8), (2, 61, 24, 16, 16), (1, 37, 16, 4, 8), (1, 9, 8, 4, 8)]
SEGMENT_OPTIONS = [(True, True, True), (False, False, False), (False, True, True)]
# CPU: every shape once and every option set at least once (the interpreter takes seconds per case); the
# rest of the 4 x 3 grid with -m gpu
SEGMENT_ON_CPU = {(SEGMENT_SHAPES[0], SEGMENT_OPTIONS[2]), (SEGMENT_SHAPES[1], SEGMENT_OPTIONS[0]),
                  (SEGMENT_SHAPES[2], SEGMENT_OPTIONS[1]), (SEGMENT_SHAPES[3], SEGMENT_OPTIONS[0])}
SEGMENT_CASES = [pytest.param(*shape, *options, marks=() if (shape, options) in SEGMENT_ON_CPU else pytest.mark.gpu)
                 for options in SEGMENT_OPTIONS for shape in SEGMENT_SHAPES]


@pytest.mark.parametrize("batch,seqlen,d_inner,d_state,chunk_size,init,docs,final", SEGMENT_CASES)
def test_segments_scanned_in_parallel_match_reference(split, batch, seqlen, d_inner, d_state, chunk_size, init,
                                                      docs, final):
    """The split forward (summary, carry, segments) and backward (adjoint summary, carry, segments) give the
    reference's outputs, final state and every gradient: initial states, documents crossing segment edges, a
    final-state gradient or none."""
    nblocks = -(-seqlen // split.TUNING["fwd"]["BLOCK_T"])
    assert split._segments(1, -(-nblocks // (chunk_size // 8)), chunk_size // 8, split.SPLIT_PROGRAMS)[0] > 1 \
        or seqlen <= chunk_size
    check(batch, seqlen, d_inner, d_state, torch.float32, full=True, init=init, docs=docs, final=final,
          chunk_size=chunk_size)


def test_segments_plain_and_bf16(split):
    check(1, 70, 8, 16, torch.float32, full=False, final=False, chunk_size=8)
    check(2, 45, 24, 16, torch.bfloat16, full=True, init=True, docs=True, chunk_size=8)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_segments_at_real_shapes(split, dtype):
    """Batch 1, long rows: the split path at the shapes it is for (documents and an initial state)."""
    check(1, 8192, 512, 16, dtype, full=True, init=True, docs=True)
    check(1, 3000, 1536, 16, dtype, full=False, final=False)
