"""Triton decode steps against the reference: interpreter on CPU (small shapes), native on the GPU."""
import importlib.util

import pytest
import torch

from kernels.state_update import reference as ref

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def tol(dtype):
    return dict(rtol=1e-2, atol=1e-2) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch,nheads,headdim,dstate,ngroups", [(1, 2, 8, 16, 1), (3, 4, 6, 5, 2)])
@pytest.mark.parametrize("opts", ["plain", "full", "clamp"])
def test_ssd_state_update_matches_reference(dtype, batch, nheads, headdim, dstate, ngroups, opts):
    from kernels.state_update.triton_step import ssd_state_update
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
    got = ssd_state_update(got_state, *args, **kw_dev)
    assert got.dtype == want.dtype
    torch.testing.assert_close(got_state, want_state, **tol(torch.float32))
    torch.testing.assert_close(got.float(), want.float(), **tol(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch,dinner,dstate", [(1, 8, 16), (3, 37, 5)])
@pytest.mark.parametrize("full", [False, True])
def test_selective_state_update_matches_reference(dtype, batch, dinner, dstate, full):
    from kernels.state_update.triton_step import selective_state_update
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
    got = selective_state_update(got_state, u, delta, A, B, C, **kw)
    torch.testing.assert_close(got_state, want_state, **tol(torch.float32))
    torch.testing.assert_close(got.float(), want.float(), **tol(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch,channels,width", [(1, 7, 2), (3, 300, 3), (2, 33, 4)])
@pytest.mark.parametrize("bias,act", [(True, "silu"), (False, None)])
def test_conv1d_update_matches_reference(dtype, batch, channels, width, bias, act):
    from kernels.conv1d import reference as cref
    from kernels.conv1d.triton_step import causal_conv1d_update
    g = torch.Generator().manual_seed(2)
    state = torch.randn(batch, channels, width - 1, generator=g).to(DEVICE, dtype)
    w = torch.randn(channels, width, generator=g).to(DEVICE)
    b = torch.randn(channels, generator=g).to(DEVICE) if bias else None
    want_state, got_state = state.clone(), state.clone()
    for step in range(width + 1):  # several steps: the shift must carry values through every column
        x = torch.randn(batch, channels, generator=g).to(DEVICE, dtype)
        want = cref.causal_conv1d_update(x, want_state, w, b, activation=act)
        got = causal_conv1d_update(x, got_state, w, b, activation=act)
        torch.testing.assert_close(got_state, want_state, rtol=0, atol=0)
        torch.testing.assert_close(got.float(), want.float(), **tol(dtype))
