"""The chunked LM-head cross entropy (kernels/loss/triton_loss.py) against the reference in float64: the loss and
both gradients, ignored targets, several chunks, autocast, no_grad; and the model's `targets=` path."""
import importlib.util

import pytest
import torch

from kernels.loss import reference as ref

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def inputs(n=2, t=7, d=24, vocab=300, ignore_every=0, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, t, d, generator=g).to(DEVICE, dtype).requires_grad_()
    w = (torch.randn(vocab, d, generator=g) * 0.3).to(DEVICE, dtype).requires_grad_()
    targets = torch.randint(0, vocab, (n, t), generator=g).to(DEVICE)
    if ignore_every:
        targets.view(-1)[::ignore_every] = -100
    return h, w, targets


def grads(fn, h, w, targets, **kw):
    h, w = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    loss = fn(h, w, targets, **kw)
    loss.backward()
    return loss, h.grad, w.grad


@pytest.mark.parametrize("chunk", [0, 5, 14, 100])
@pytest.mark.parametrize("ignore_every", [0, 3])
def test_matches_reference(chunk, ignore_every):
    from kernels.loss.triton_loss import linear_cross_entropy
    h, w, targets = inputs(ignore_every=ignore_every)
    loss, dh, dw = grads(linear_cross_entropy, h, w, targets, chunk_tokens=chunk)
    loss_r, dh_r, dw_r = grads(ref.linear_cross_entropy, h.double(), w.double(), targets)
    assert loss.dtype == torch.float32 and loss.shape == ()
    errs = {"loss": rel(loss, loss_r), "dh": rel(dh, dh_r), "dw": rel(dw, dw_r)}
    assert max(errs.values()) < 1e-5, errs


def test_vocab_over_one_block_and_bf16():
    """A vocabulary longer than one row block (the online max / sum runs over several), in bf16."""
    from kernels.loss import triton_loss
    h, w, targets = inputs(t=9, vocab=700, dtype=torch.bfloat16, ignore_every=4)
    saved = dict(triton_loss.TUNING)
    triton_loss.TUNING["BLOCK"] = 128
    try:
        loss, dh, dw = grads(triton_loss.linear_cross_entropy, h, w, targets, chunk_tokens=4)
    finally:
        triton_loss.TUNING.update(saved)
    loss_r, dh_r, dw_r = grads(ref.linear_cross_entropy, h.double(), w.double(), targets)
    assert dh.dtype == torch.bfloat16 and dw.dtype == torch.bfloat16
    errs = {"loss": rel(loss, loss_r), "dh": rel(dh, dh_r), "dw": rel(dw, dw_r)}
    assert max(errs.values()) < 2e-2, errs


def test_autocast_fp32_weights_get_fp32_grads():
    """Under bf16 autocast the matmuls run in bf16 (as F.linear would) and the fp32 leaves get fp32 grads."""
    from kernels.loss.triton_loss import linear_cross_entropy
    h, w, targets = inputs(vocab=257)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        loss, dh, dw = grads(linear_cross_entropy, h, w, targets, chunk_tokens=6)
        loss_r, dh_r, dw_r = grads(ref.linear_cross_entropy, h, w, targets)
    assert dh.dtype == torch.float32 and dw.dtype == torch.float32
    errs = {"loss": rel(loss, loss_r), "dh": rel(dh, dh_r), "dw": rel(dw, dw_r)}
    assert max(errs.values()) < 2e-2, errs


def test_no_grad_and_all_ignored():
    from kernels.loss.triton_loss import linear_cross_entropy
    h, w, targets = inputs()
    with torch.no_grad():
        loss = linear_cross_entropy(h, w, targets, chunk_tokens=3)
    assert not loss.requires_grad
    assert rel(loss, ref.linear_cross_entropy(h.double(), w.double(), targets)) < 1e-5
    none = torch.full_like(targets, -100)
    assert torch.isnan(linear_cross_entropy(h, w, none)) and torch.isnan(ref.linear_cross_entropy(h, w, none))


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_bad_input_is_named(impl):
    from kernels.loss import triton_loss
    fn = ref.linear_cross_entropy if impl == "reference" else triton_loss.linear_cross_entropy
    h, w, targets = inputs()
    with pytest.raises(ValueError, match="targets"):
        fn(h, w, targets[:, :-1])
    with pytest.raises(ValueError, match="weight"):
        fn(h, w[:, :-1], targets)
    with pytest.raises(ValueError, match="integer"):
        fn(h, w, targets.float())


def test_model_targets_equal_lm_loss(registry):
    """HybridLM(ids, targets=...) is lm_loss of its logits, forward and backward, with either backend."""
    from hybrid.layout import load_layout
    from hybrid.model import HybridLM, lm_loss
    layout = load_layout("layouts/tiny.yaml", ["model.d_model=32", "model.vocab_size=97", "layers=M2 Ag",
                                               "defaults.mamba2.headdim=8", "defaults.mamba2.d_state=8",
                                               "defaults.mamba2.chunk_size=4", "defaults.attention.n_heads=2",
                                               "defaults.mlp.d_ff=64"])
    model = HybridLM(layout).to(DEVICE)
    ids = torch.randint(0, 97, (2, 10), device=DEVICE)
    targets = torch.randint(0, 97, (2, 10), device=DEVICE)
    targets[:, -1] = -100
    model.zero_grad()
    lm_loss(model(ids), targets).backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    loss_want = lm_loss(model(ids), targets).item()
    registry.register("linear_cross_entropy", "chunked-test", "kernels.loss.triton_loss", "linear_cross_entropy",
                      lambda device_type: True, preferred=True)
    model.zero_grad()
    loss = model(ids, targets=targets)
    loss.backward()
    assert abs(loss.item() - loss_want) < 1e-5
    for n, p in model.named_parameters():
        assert rel(p.grad, want[n]) < 1e-4, n
    with pytest.raises(ValueError, match="targets"):
        model(ids, targets=targets, last_only=True)
