"""hybrid/projections.py: a decode step fuses a module's projections only where nothing else expects the module
calls (autograd, autocast, many rows, hooks, Linear subclasses, DeepSpeed ZeRO-3 parameters, another dtype);
the fused and the module paths give the same values."""
import torch
from torch import nn

from hybrid import projections as pj
from hybrid.norm import ResidualRMSNorm


def test_fusable_only_where_the_module_calls_are_not_needed():
    lin = nn.Linear(8, 4)
    x = torch.randn(1, 1, 8)
    assert not pj.fusable(x, lin)                       # autograd on
    with torch.no_grad():
        assert pj.fusable(x, lin)
        assert not pj.fusable(torch.randn(pj.DECODE_ROWS + 1, 8), lin)
        assert not pj.fusable(x.double(), lin)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not pj.fusable(x, lin)
        handle = lin.register_forward_hook(lambda *a: None)
        assert not pj.fusable(x, lin)
        handle.remove()

        class Quantized(nn.Linear):
            pass
        assert not pj.fusable(x, Quantized(8, 4))
        lin.weight.ds_id = 7                            # as DeepSpeed ZeRO-3 marks its parameters
        assert not pj.fusable(x, lin)


def test_fused_and_module_paths_agree_and_hooks_fire():
    torch.manual_seed(0)
    q, k = nn.Linear(8, 6), nn.Linear(8, 2, bias=False)
    gate, up = nn.Linear(8, 5, bias=False), nn.Linear(8, 5, bias=False)
    norm = ResidualRMSNorm(8, 1e-5)
    norm.weight.data.normal_()

    class Mixer(nn.Module):
        def input_projections(self):
            return (q, k), False
    res, delta = torch.randn(1, 1, 8), torch.randn(1, 1, 8)
    with torch.no_grad():
        x, s, pre = pj.norm_project(norm, Mixer(), res, delta)   # fused: no x, the projections instead
        h, s_want = norm(res, delta)
        assert x is None and torch.allclose(s, s_want)
        for got, m in zip(pre, (q, k)):
            assert torch.allclose(got, m(h), atol=1e-6)
        assert torch.allclose(pj.swiglu_in(h, gate, up), torch.nn.functional.silu(gate(h)) * up(h), atol=1e-6)
        seen = []
        q.register_forward_hook(lambda *a: seen.append("q"))
        x, _, pre = pj.norm_project(norm, Mixer(), res, delta)    # a hook: the module path, the hook fires
        assert pre is None and x is not None
        pj.project(x, q)
        assert seen == ["q"]
