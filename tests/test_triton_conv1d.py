"""Triton causal conv1d (training fwd + bwd) against the reference in float64: interpreter on CPU, native on GPU."""
import importlib.util

import pytest
import torch

from kernels.conv1d import reference as ref

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def make_seq_idx(batch, seqlen, kind):
    """(batch, seqlen) document ids: 'early' starts a document at position 1 (inside the first width - 1),
    'mid' adds boundaries in the middle; rows differ."""
    if kind is None:
        return None
    pos = torch.arange(seqlen)
    ids = torch.stack([(pos >= 1).long() + (pos >= seqlen // 2).long() if kind == "early" or b == 0
                       else (pos >= seqlen // 3).long() * 2 for b in range(batch)])
    return ids.to(DEVICE)


def check(batch, seqlen, channels, width, dtype=torch.float32, seq=None, init=False, bias=True, act="silu",
          final=True, strided=False, seed=0):
    from kernels.conv1d.triton_conv import causal_conv1d
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)
    xbig = r(batch, seqlen, channels + 5)  # x as a channel slice of a wider projection when strided
    leaves = {"x": xbig[..., 2:2 + channels].contiguous(), "weight": r(channels, width) * 0.5}
    if bias:
        leaves["bias"] = r(channels)
    if init:
        leaves["initial_state"] = r(batch, channels, width - 1)
    seq_idx = make_seq_idx(batch, seqlen, seq)
    ours = {k: v.to(DEVICE, dtype if k == "x" else torch.float32).clone().requires_grad_() for k, v in leaves.items()}
    theirs = {k: ours[k].detach().double().requires_grad_() for k in leaves}  # same (rounded) inputs
    args = dict(ours)
    if strided:
        big = xbig.to(DEVICE, dtype).requires_grad_()
        args["x"] = big[..., 2:2 + channels]
        assert args["x"].stride(1) == channels + 5
    y = causal_conv1d(**args, activation=act, seq_idx=seq_idx, return_final_state=final)
    y_ref = ref.causal_conv1d(**theirs, activation=act, seq_idx=seq_idx, return_final_state=final)
    outs, outs_ref = (y, y_ref) if final else ((y,), (y_ref,))
    assert outs[0].dtype == dtype and outs[0].shape == (batch, seqlen, channels)
    grads = [torch.randn_like(o) for o in outs_ref]
    loss = sum((o.double() * gr).sum() for o, gr in zip(outs, grads))
    loss_ref = sum((o * gr).sum() for o, gr in zip(outs_ref, grads))
    loss.backward()
    loss_ref.backward()
    errs = {f"out{i}": rel(a, b) for i, (a, b) in enumerate(zip(outs, outs_ref)) if b.norm() > 0}
    if strided:
        ours["x"].grad = big.grad[..., 2:2 + channels]
        assert big.grad[..., :2].abs().max() == 0 and big.grad[..., 2 + channels:].abs().max() == 0
    errs.update({f"d{k}": rel(ours[k].grad, theirs[k].grad) for k in leaves})
    bad = {k: v for k, v in errs.items() if not v <= TOL[dtype]}
    assert not bad, f"rel errors over {TOL[dtype]}: {bad}"


CONV_SHAPES = [(1, 1, 7, None, False), (2, 5, 19, "early", True), (2, 70, 100, "early", False),
               (1, 70, 37, None, True), (2, 70, 37, "mid", True)]
# CPU: width 4 (the layouts') at every shape, widths 2 and 3 at the short ones and at the 70-token rows with
# documents and an initial state (tiles of 16: the taps cross tile edges); the other 70-token widths with -m gpu
CONV_GPU_ONLY = {(2, CONV_SHAPES[2]), (3, CONV_SHAPES[2]), (2, CONV_SHAPES[3]), (3, CONV_SHAPES[3])}


@pytest.mark.parametrize("width,batch,seqlen,channels,seq,init", [
    pytest.param(width, *shape, marks=pytest.mark.gpu if (width, shape) in CONV_GPU_ONLY else ())
    for shape in CONV_SHAPES for width in (2, 3, 4)])
def test_conv1d_matches_reference(width, batch, seqlen, channels, seq, init):
    check(batch, seqlen, channels, width, seq=seq, init=init)


@pytest.mark.parametrize("bias,act", [(False, None), (True, None), (False, "silu")])
def test_conv1d_options(bias, act):
    check(2, 37, 20, 4, seq="early", init=True, bias=bias, act=act)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_conv1d_strided_x_no_final_state(dtype):
    check(2, 33, 24, 4, dtype=dtype, seq="mid", init=True, final=False, strided=True)


def test_conv1d_bf16_dpre_in_bf16(monkeypatch):
    from kernels.conv1d import triton_conv
    monkeypatch.setattr(triton_conv, "DPRE_FP32", False)
    check(2, 40, 24, 4, dtype=torch.bfloat16, seq="early", init=True)


@pytest.mark.parametrize("atomic", [False, True])
def test_conv1d_several_chunks(monkeypatch, atomic):
    # small tiles so the backward walks several chunks and dx tiles per row; both dweight reductions
    from kernels.conv1d import triton_conv
    monkeypatch.setitem(triton_conv.TUNING, "bwd_dpre", dict(BLOCK_L=16, BLOCK_C=32, CHUNK=32, num_warps=2))
    monkeypatch.setitem(triton_conv.TUNING, "bwd_dx", dict(BLOCK_L=16, BLOCK_C=32, num_warps=2))
    monkeypatch.setitem(triton_conv.TUNING, "fwd", dict(BLOCK_L=16, BLOCK_C=32, num_warps=2))
    monkeypatch.setattr(triton_conv, "ATOMIC_DW", atomic)
    check(2, 70, 45, 4, seq="mid", init=True)


def test_conv1d_short_sequence_state_from_initial():
    # seqlen 1 < width - 1: the final state takes columns from the initial state
    check(2, 1, 9, 4, seq="early", init=True)
    check(1, 2, 9, 4, seq=None, init=True)


def test_conv1d_bad_inputs():
    from kernels.conv1d.triton_conv import causal_conv1d
    x = torch.randn(2, 8, 6)
    with pytest.raises(ValueError, match="width"):
        causal_conv1d(x, torch.randn(6, 5))
    with pytest.raises(ValueError, match="weight"):
        causal_conv1d(x, torch.randn(5, 4))
    with pytest.raises(ValueError, match="x must be"):
        causal_conv1d(x[0], torch.randn(6, 4))
    with pytest.raises(ValueError, match="bias"):
        causal_conv1d(x, torch.randn(6, 4), torch.randn(7))
    with pytest.raises(ValueError, match="seq_idx"):
        causal_conv1d(x, torch.randn(6, 4), seq_idx=torch.zeros(2, 7, dtype=torch.long))
    with pytest.raises(ValueError, match="initial_state"):
        causal_conv1d(x, torch.randn(6, 4), initial_state=torch.randn(2, 6, 4))
    with pytest.raises(ValueError, match="activation"):
        causal_conv1d(x, torch.randn(6, 4), activation="gelu")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_conv1d_gpu_real_shape(dtype):
    check(2, 4096, 3328, 4, dtype=dtype, seq="mid", init=True, strided=True)
    check(1, 300, 3328, 3, dtype=dtype, seq="early", init=False)


def step_tol(dtype):  # decode steps
    return dict(rtol=1e-2, atol=1e-2) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-5)


def test_conv1d_update_reads_a_strided_slice():
    """x of a batched decode step is a slice of the in-projection ([x | z]): read through its row stride."""
    from kernels.conv1d.triton_step import causal_conv1d_update
    g = torch.Generator().manual_seed(4)
    xz = torch.randn(3, 2 * 40, generator=g).to(DEVICE)
    x = xz[:, :40]
    state = torch.randn(3, 40, 3, generator=g).to(DEVICE)
    w, b = torch.randn(40, 4, generator=g).to(DEVICE), torch.randn(40, generator=g).to(DEVICE)
    want_state, got_state = state.clone(), state.clone()
    want = ref.causal_conv1d_update(x, want_state, w, b, activation="silu")
    got = causal_conv1d_update(x, got_state, w, b, activation="silu")
    torch.testing.assert_close(got_state, want_state, rtol=0, atol=0)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch,channels,width", [(1, 7, 2), (3, 300, 3), (2, 33, 4)])
@pytest.mark.parametrize("bias,act", [(True, "silu"), (False, None)])
def test_conv1d_update_matches_reference(dtype, batch, channels, width, bias, act):
    from kernels.conv1d.triton_step import causal_conv1d_update
    g = torch.Generator().manual_seed(2)
    state = torch.randn(batch, channels, width - 1, generator=g).to(DEVICE, dtype)
    w = torch.randn(channels, width, generator=g).to(DEVICE)
    b = torch.randn(channels, generator=g).to(DEVICE) if bias else None
    want_state, got_state = state.clone(), state.clone()
    for step in range(width + 1):  # several steps: the shift must carry values through every column
        x = torch.randn(batch, channels, generator=g).to(DEVICE, dtype)
        want = ref.causal_conv1d_update(x, want_state, w, b, activation=act)
        got = causal_conv1d_update(x, got_state, w, b, activation=act)
        torch.testing.assert_close(got_state, want_state, rtol=0, atol=0)
        torch.testing.assert_close(got.float(), want.float(), **step_tol(dtype))
