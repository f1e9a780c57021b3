"""Reference ops against independently written loops (float64): chunked scans vs. token recurrences,
conv1d vs. an explicit tap loop, decode steps vs. the chunked ops, packed rows vs. separate documents."""
import pytest
import torch
import torch.nn.functional as F

from kernels.conv1d.reference import causal_conv1d, causal_conv1d_update
from kernels.norm.reference import rmsnorm, rmsnorm_gated
from kernels.selective_scan.reference import selective_scan, selective_scan_sequential, selective_state_update
from kernels.ssd.reference import ssd_chunk_scan, ssd_sequential, ssd_state_update

F64 = torch.float64


def close(a, b, rtol=1e-10, atol=1e-10):
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


def leaf(t):
    return t.detach().to(F64).requires_grad_()


def rnd(*shape):
    return leaf(torch.randn(*shape, dtype=F64))


def make_seq_idx(seqlen, rows):
    """rows: per row (first id, [positions where a new document starts]) -> (batch, seqlen) int64."""
    out = []
    for first, starts in rows:
        flags = torch.zeros(seqlen, dtype=torch.long)
        flags[list(starts)] = 1
        out.append(first + flags.cumsum(0))
    return torch.stack(out)


def outputs_and_grads(fn, args, kwargs):
    """Outputs of fn and the gradients of a fixed random projection of them w.r.t. every leaf input."""
    out = fn(*args, **kwargs)
    outs = out if isinstance(out, tuple) else (out,)
    g = torch.Generator().manual_seed(1234)
    loss = sum((o * torch.randn(o.shape, generator=g, dtype=o.dtype)).sum() for o in outs)
    leaves = [t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor) and t.requires_grad]
    return outs, torch.autograd.grad(loss, leaves)


def assert_same(fn_a, fn_b, args, kwargs):
    outs_a, grads_a = outputs_and_grads(fn_a, args, kwargs)
    outs_b, grads_b = outputs_and_grads(fn_b, args, kwargs)
    for a, b in zip(outs_a + grads_a, outs_b + grads_b):
        assert torch.isfinite(a).all()
        close(a, b)


# ---------------------------------------------------------------- SSD (Mamba-2)

def ssd_args(batch, seqlen, nheads=4, ngroups=2, headdim=3, d_state=5, *, initial=True, D_2d=False):
    x, dt = rnd(batch, seqlen, nheads, headdim), leaf(torch.randn(batch, seqlen, nheads) - 1.0)
    # slow decays on some heads so that state carried across chunks matters
    A = leaf(-torch.empty(nheads).uniform_(0.05, 1.5))
    B, C = rnd(batch, seqlen, ngroups, d_state), rnd(batch, seqlen, ngroups, d_state)
    kwargs = dict(D=rnd(nheads, headdim) if D_2d else rnd(nheads), z=rnd(batch, seqlen, nheads, headdim),
                  dt_bias=leaf(0.5 * torch.randn(nheads)), dt_softplus=True, dt_limit=(0.05, 1.5),
                  initial_state=rnd(batch, nheads, headdim, d_state) if initial else None,
                  return_final_state=True)
    return [x, dt, A, B, C], kwargs


SCAN_CASES = [  # (batch, seqlen, chunk, ngroups, initial state, seq_idx rows or None)
    (1, 37, 8, 1, False, None),
    (3, 37, 8, 2, True, None),
    (2, 5, 8, 2, True, None),                                         # shorter than one chunk
    (3, 37, 8, 2, True, [(0, [5, 16, 30]), (7, [8, 24, 25]), (2, [])]),  # inside chunks and at chunk starts
    (2, 32, 8, 1, False, [(0, [8, 16]), (3, [1, 31])]),               # one-token documents at both ends
    (2, 5, 8, 2, True, [(0, [2]), (0, [4])]),
]


@pytest.mark.parametrize("batch, seqlen, chunk, ngroups, initial, rows", SCAN_CASES)
def test_ssd_chunk_scan_matches_sequential(batch, seqlen, chunk, ngroups, initial, rows):
    args, kwargs = ssd_args(batch, seqlen, ngroups=ngroups, initial=initial, D_2d=ngroups == 1)
    kwargs.update(chunk_size=chunk, seq_idx=None if rows is None else make_seq_idx(seqlen, rows))
    assert_same(ssd_chunk_scan, ssd_sequential, args, kwargs)


def test_ssd_plain_dt_and_no_extras():
    args, _ = ssd_args(2, 19, ngroups=4)
    args[1] = leaf(F.softplus(args[1]))
    assert_same(ssd_chunk_scan, ssd_sequential, args, dict(chunk_size=4))


def test_ssd_sequential_matches_explicit_formula():
    """Guard the ground truth itself: one head, one group, a hand-written recurrence."""
    (x, dt, A, B, C), _ = ssd_args(1, 6, nheads=1, ngroups=1, headdim=2, d_state=3)
    dt = F.softplus(dt)
    h, ys = torch.zeros(2, 3, dtype=F64), []
    for t in range(6):
        h = torch.exp(dt[0, t, 0] * A[0]) * h + dt[0, t, 0] * torch.outer(x[0, t, 0], B[0, t, 0])
        ys.append(h @ C[0, t, 0])
    y, final = ssd_sequential(x, dt, A, B, C, return_final_state=True)
    close(y[0, :, 0], torch.stack(ys))
    close(final[0, 0], h)


def test_dt_processing_bias_softplus_limit():
    (x, dt, A, B, C), _ = ssd_args(2, 9)
    dt = leaf(3 * torch.randn(2, 9, 4))
    bias, lo, hi = leaf(torch.randn(4)), 0.2, 1.0
    eff = torch.clamp(torch.log1p(torch.exp(dt + bias)), lo, hi)
    assert (eff == lo).any() and (eff == hi).any()  # both limits bite
    close(ssd_sequential(x, dt, A, B, C, dt_bias=bias, dt_softplus=True, dt_limit=(lo, hi)),
          ssd_sequential(x, eff, A, B, C))
    (u, delta, A, B, C), _ = ss_args(2, 9)
    bias = leaf(torch.randn(6))
    close(selective_scan_sequential(u, delta, A, B, C, delta_bias=bias, delta_softplus=True),
          selective_scan_sequential(u, torch.log1p(torch.exp(delta + bias)), A, B, C))


# ---------------------------------------------------------------- selective scan (Mamba-1)

def ss_args(batch, seqlen, d_inner=6, d_state=4, *, initial=True):
    u, delta = rnd(batch, seqlen, d_inner), leaf(torch.randn(batch, seqlen, d_inner) - 1.0)
    A = leaf(-torch.empty(d_inner, d_state).uniform_(0.05, 2.0))
    B, C = rnd(batch, seqlen, d_state), rnd(batch, seqlen, d_state)
    kwargs = dict(D=rnd(d_inner), z=rnd(batch, seqlen, d_inner), delta_bias=leaf(0.5 * torch.randn(d_inner)),
                  delta_softplus=True, initial_state=rnd(batch, d_inner, d_state) if initial else None,
                  return_final_state=True)
    return [u, delta, A, B, C], kwargs


@pytest.mark.parametrize("batch, seqlen, chunk, _ngroups, initial, rows", SCAN_CASES)
def test_selective_scan_matches_sequential(batch, seqlen, chunk, _ngroups, initial, rows):
    args, kwargs = ss_args(batch, seqlen, initial=initial)
    kwargs.update(chunk_size=chunk, seq_idx=None if rows is None else make_seq_idx(seqlen, rows))
    assert_same(selective_scan, selective_scan_sequential, args, kwargs)


def test_selective_scan_sequential_matches_explicit_formula():
    (u, delta, A, B, C), _ = ss_args(1, 5, d_inner=2, d_state=3)
    h, ys = torch.zeros(2, 3, dtype=F64), []
    for t in range(5):
        for d in range(2):
            for n in range(3):
                h[d, n] = torch.exp(delta[0, t, d] * A[d, n]) * h[d, n] + delta[0, t, d] * B[0, t, n] * u[0, t, d]
        ys.append(h @ C[0, t])
    close(selective_scan_sequential(u, delta, A, B, C)[0], torch.stack(ys).detach())


@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_selective_scan_large_delta_is_finite_and_exact(dtype):
    (u, _, _, B, C), _ = ss_args(2, 40)
    delta = leaf(50 + torch.rand(2, 40, 6))
    A = leaf(-16 - torch.rand(6, 4))
    args = [t.detach().to(dtype).requires_grad_() for t in (u, delta, A, B, C)]
    kwargs = dict(chunk_size=8, return_final_state=True, seq_idx=make_seq_idx(40, [(0, [9]), (0, [16, 17])]))
    outs_a, grads_a = outputs_and_grads(selective_scan, args, kwargs)
    outs_b, grads_b = outputs_and_grads(selective_scan_sequential, args, kwargs)
    for a, b in zip(outs_a + grads_a, outs_b + grads_b):
        assert torch.isfinite(a).all()
        close(a, b, rtol=1e-10 if dtype == F64 else 1e-5, atol=1e-10 if dtype == F64 else 1e-5)


def test_resets_keep_fp32_gradients_finite():
    seq_idx = make_seq_idx(30, [(0, [3, 8, 9, 20]), (0, [16])])
    args, kwargs = ssd_args(2, 30)
    args = [t.detach().float().requires_grad_() for t in args]
    kwargs = {k: (v.detach().float().requires_grad_() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
    _, grads = outputs_and_grads(ssd_chunk_scan, args, dict(kwargs, chunk_size=8, seq_idx=seq_idx))
    assert all(torch.isfinite(g).all() for g in grads)


# ---------------------------------------------------------------- causal conv1d

def conv_loop(x, weight, bias, activation, seq_idx, initial_state):
    """Explicit per-token, per-tap loop; returns (out, final_state)."""
    batch, seqlen, channels = x.shape
    width = weight.shape[1]
    ids = seq_idx if seq_idx is not None else torch.zeros(batch, seqlen, dtype=torch.long)

    def tap(b, pos, t):  # input at position pos as seen by token t (pos may be negative: history)
        if pos >= 0:
            return x[b, pos] if ids[b, pos] == ids[b, t] else torch.zeros(channels, dtype=x.dtype)
        if initial_state is not None and ids[b, t] == ids[b, 0]:
            return initial_state[b, :, width - 1 + pos]
        return torch.zeros(channels, dtype=x.dtype)

    rows, finals = [], []
    for b in range(batch):
        outs = []
        for t in range(seqlen):
            acc = bias.clone() if bias is not None else torch.zeros(channels, dtype=x.dtype)
            for k in range(width):
                acc = acc + weight[:, k] * tap(b, t - (width - 1) + k, t)
            outs.append(F.silu(acc) if activation == "silu" else acc)
        rows.append(torch.stack(outs))
        tail = [tap(b, seqlen - (width - 1) + i, seqlen - 1) for i in range(width - 1)]
        finals.append(torch.stack(tail, -1) if tail else torch.zeros(channels, 0, dtype=x.dtype))
    return torch.stack(rows), torch.stack(finals)


CONV_CASES = [  # (width, seqlen, activation, bias, initial state, seq_idx rows)
    (4, 9, "silu", True, False, None),
    (4, 9, "silu", True, True, None),
    (3, 10, None, False, True, [(0, [1, 4, 5]), (2, [8])]),
    (2, 7, "silu", True, True, [(0, [3]), (1, [1])]),
    (4, 2, "silu", True, True, None),                # shorter than the history
    (4, 2, None, True, True, [(0, []), (0, [1])]),
    (1, 5, "silu", True, False, [(0, [2]), (0, [])]),
]


@pytest.mark.parametrize("width, seqlen, activation, has_bias, initial, rows", CONV_CASES)
def test_causal_conv1d_matches_loop(width, seqlen, activation, has_bias, initial, rows):
    x, weight = rnd(2, seqlen, 3), rnd(3, width)
    kwargs = dict(activation=activation, seq_idx=None if rows is None else make_seq_idx(seqlen, rows),
                  initial_state=rnd(2, 3, width - 1) if initial else None, return_final_state=True)
    bias = rnd(3) if has_bias else None

    def loop(x, weight, bias, *, activation, seq_idx, initial_state, return_final_state):
        return conv_loop(x, weight, bias, activation, seq_idx, initial_state)
    assert_same(causal_conv1d, loop, [x, weight, bias], kwargs)


def test_causal_conv1d_final_state_semantics():
    x, weight = rnd(1, 6, 2), rnd(2, 4)
    init = rnd(1, 2, 3)
    _, final = causal_conv1d(x, weight, initial_state=init, return_final_state=True)
    close(final, x[:, -3:].transpose(1, 2))  # raw inputs, not outputs
    _, final = causal_conv1d(x[:, :2], weight, initial_state=init, return_final_state=True)
    close(final, torch.cat([init[:, :, 2:], x[:, :2].transpose(1, 2)], -1))
    _, final = causal_conv1d(x, weight, initial_state=init, seq_idx=make_seq_idx(6, [(0, [4])]),
                             return_final_state=True)
    close(final, torch.cat([torch.zeros(1, 2, 1, dtype=F64), x[:, 4:].transpose(1, 2)], -1))


# ---------------------------------------------------------------- decode steps == chunked ops

def test_conv_update_matches_causal_conv1d():
    x, weight, bias, init = rnd(2, 7, 5), rnd(5, 4), rnd(5), rnd(2, 5, 3)
    y, final = causal_conv1d(x, weight, bias, initial_state=init, return_final_state=True)
    state = init.detach().clone()
    steps = [causal_conv1d_update(x[:, t], state, weight, bias) for t in range(7)]
    close(torch.stack(steps, 1), y)
    close(state, final)


def test_ssd_state_update_matches_chunk_scan():
    (x, dt, A, B, C), kw = ssd_args(2, 11, D_2d=True)
    y, final = ssd_chunk_scan(x, dt, A, B, C, chunk_size=4, **kw)
    state = kw["initial_state"].detach().clone()
    step_kw = {k: kw[k] for k in ("D", "dt_bias", "dt_softplus", "dt_limit")}
    steps = [ssd_state_update(state, x[:, t], dt[:, t], A, B[:, t], C[:, t], z=kw["z"][:, t], **step_kw)
             for t in range(11)]
    close(torch.stack(steps, 1), y)
    close(state, final)


def test_selective_state_update_matches_scan():
    (u, delta, A, B, C), kw = ss_args(2, 11)
    y, final = selective_scan(u, delta, A, B, C, chunk_size=4, **kw)
    state = kw["initial_state"].detach().clone()
    step_kw = {k: kw[k] for k in ("D", "delta_bias", "delta_softplus")}
    steps = [selective_state_update(state, u[:, t], delta[:, t], A, B[:, t], C[:, t], z=kw["z"][:, t], **step_kw)
             for t in range(11)]
    close(torch.stack(steps, 1), y)
    close(state, final)


# ---------------------------------------------------------------- packed rows == separate documents

def _split(t, s, e):
    """Tokens s:e of a sequence tensor (batch, seqlen, ...); parameters (at most 2-D here) pass through."""
    return t if not isinstance(t, torch.Tensor) or t.dim() < 3 else t[:, s:e]


@pytest.mark.parametrize("op", ["ssd", "selective", "conv"])
@pytest.mark.parametrize("split", [3, 8, 13])
def test_packed_equals_separate(op, split):
    seqlen = 20
    if op == "ssd":
        fn, (args, kw) = ssd_chunk_scan, ssd_args(1, seqlen)
        kw["chunk_size"], init_key = 8, "initial_state"
    elif op == "selective":
        fn, (args, kw) = selective_scan, ss_args(1, seqlen)
        kw["chunk_size"], init_key = 8, "initial_state"
    else:
        fn, args = causal_conv1d, [rnd(1, seqlen, 4), rnd(4, 4), rnd(4)]
        kw, init_key = dict(initial_state=rnd(1, 4, 3), return_final_state=True), "initial_state"
    seq_idx = make_seq_idx(seqlen, [(5, [split])])
    y, final = fn(*args, **kw, seq_idx=seq_idx)
    seq_kw = {k: _split(v, 0, split) if k == "z" else v for k, v in kw.items()}
    y1, _ = fn(*[_split(a, 0, split) for a in args], **seq_kw)
    seq_kw = {k: _split(v, split, seqlen) if k == "z" else v for k, v in kw.items()}
    y2, final2 = fn(*[_split(a, split, seqlen) for a in args], **dict(seq_kw, **{init_key: None}))
    close(y, torch.cat([y1, y2], 1))
    close(final, final2)


# ---------------------------------------------------------------- norms

def test_rmsnorm():
    x, w = rnd(2, 3, 8), rnd(8)
    close(rmsnorm(x, w, 1e-5), x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-5) * w)
    xb = x.detach().bfloat16()
    out = rmsnorm(xb, w.detach().float(), 1e-5)
    assert out.dtype == torch.bfloat16
    close(out.float(), rmsnorm(xb.float(), w.detach().float(), 1e-5).bfloat16().float(), rtol=0, atol=0)


@pytest.mark.parametrize("norm_before_gate", [False, True])
@pytest.mark.parametrize("group_size", [None, 4, 12])
def test_rmsnorm_gated(norm_before_gate, group_size):
    x, z, w, eps = rnd(2, 3, 12), rnd(2, 3, 12), rnd(12), 1e-6
    gs = group_size or 12
    pieces = []
    for g in range(12 // gs):
        sl = slice(g * gs, (g + 1) * gs)
        xs, gate = x[..., sl], z[..., sl] * torch.sigmoid(z[..., sl])
        v = xs if norm_before_gate else xs * gate
        normed = v / torch.sqrt((v * v).mean(-1, keepdim=True) + eps) * w[sl]
        pieces.append(normed * gate if norm_before_gate else normed)
    expect = torch.cat(pieces, -1)
    close(rmsnorm_gated(x, z, w, eps, group_size=group_size, norm_before_gate=norm_before_gate), expect)


# ---------------------------------------------------------------- dtypes

def test_low_precision_inputs_keep_dtype_and_fp32_states():
    args, kw = ssd_args(2, 13)
    y64, f64 = ssd_sequential(*args, **kw)
    low = [a.detach().bfloat16() if a.dim() > 1 else a.detach().float() for a in args]
    kw_low = {k: (v.detach().float() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    kw_low["z"] = kw_low["z"].bfloat16()
    y, f = ssd_chunk_scan(*low, **dict(kw_low, chunk_size=4))
    assert y.dtype == torch.bfloat16 and f.dtype == torch.float32
    ref_y, ref_f = ssd_sequential(*[a.double() for a in low], **{k: (v.double() if isinstance(v, torch.Tensor) else v)
                                                             for k, v in kw_low.items()})
    close(f.double(), ref_f, rtol=1e-4, atol=1e-4)
    close(y.double(), ref_y, rtol=2e-2, atol=2e-2)

    (u, delta, A, B, C), kw = ss_args(2, 13)
    y, f = selective_scan(u.detach().half(), delta.detach().half(), A.detach().float(), B.detach().half(),
                          C.detach().half(), return_final_state=True)
    assert y.dtype == torch.float16 and f.dtype == torch.float32
    out = causal_conv1d(u.detach().bfloat16(), rnd(6, 4).detach().float())
    assert out.dtype == torch.bfloat16
