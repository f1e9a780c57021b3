"""Training attention backends (FlexAttention, flash-attn) against the SDPA reference.

On CPU FlexAttention runs its unfused forward (no backward there): that checks the mask rules. On the GPU
(-m gpu) the compiled kernels run forward and backward at real shapes; flash-attn tests run where it is installed.
"""
import importlib.util

import pytest
import torch

from kernels.attention import reference as ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
MASKS = [("global", 0, 0, 0), ("local", 1, 0, 0), ("local", 7, 0, 0), ("local", 128, 0, 0), ("sparse", 5, 3, 0),
         ("sparse", 4, 0, 9), ("sparse", 6, 2, 11)]


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def packed_ids(lens, batch):
    return torch.stack([torch.cat([torch.full((n,), i) for i, n in enumerate(lens[r:] + lens[:r])])
                        for r in range(batch)]).to(DEVICE)


@pytest.mark.parametrize("kind,window,sinks,stride", MASKS)
@pytest.mark.parametrize("packed", [False, True])
def test_flex_forward_matches_sdpa(kind, window, sinks, stride, packed):
    from kernels.attention.flex import attention
    g = torch.Generator().manual_seed(0)
    lens = [40, 7, 1, 100, 52]
    t = sum(lens)
    seq_idx = packed_ids(lens, 2) if packed else None
    q = torch.randn(2, t, 4, 16, generator=g, dtype=torch.float64).to(DEVICE)
    k, v = (torch.randn(2, t, 2, 16, generator=g, dtype=torch.float64).to(DEVICE) for _ in range(2))
    kw = dict(kind=kind, window=window, sinks=sinks, stride=stride, seq_idx=seq_idx)
    want = ref.attention(q, k, v, **kw)
    got = attention(q.float(), k.float(), v.float(), compiled=DEVICE == "cuda", **kw)
    assert rel(got, want) <= 1e-5


@pytest.mark.parametrize("kind,window,sinks,stride", MASKS)
@pytest.mark.parametrize("packed", [False, True])
def test_flex_pads_rows_shorter_than_its_block(kind, window, sinks, stride, packed, monkeypatch):
    """Compiled FlexAttention has no kernel for rows under 128 tokens (torch 2.11 on the H100): the compiled
    path pads them (the padding its own document) and cuts the padding off. On CPU the eager kernel stands in
    for the compiled one, which checks the padding; on the GPU it is the real compiled kernel."""
    from kernels.attention import flex
    if DEVICE == "cpu":
        from torch.nn.attention.flex_attention import flex_attention
        monkeypatch.setattr(flex, "_compiled_flex", lambda: flex_attention)
    g = torch.Generator().manual_seed(2)
    lens = [20, 3, 1, 13]
    t = sum(lens)
    seq_idx = packed_ids(lens, 2) if packed else None
    q = torch.randn(2, t, 4, 16, generator=g, dtype=torch.float64).to(DEVICE)
    k, v = (torch.randn(2, t, 2, 16, generator=g, dtype=torch.float64).to(DEVICE) for _ in range(2))
    kw = dict(kind=kind, window=window, sinks=sinks, stride=stride, seq_idx=seq_idx)
    got = flex.attention(q.float(), k.float(), v.float(), compiled=True, **kw)
    assert got.shape == q.shape
    assert rel(got, ref.attention(q, k, v, **kw)) <= 1e-5


def test_flex_rejects_unknown_kind():
    from kernels.attention.flex import mask_mod
    with pytest.raises(ValueError, match="kind"):
        mask_mod("dense", 0, 0, 0)


def test_cu_seqlens_of_packed_rows():
    from kernels.attention.flash import cu_seqlens
    seq_idx = torch.tensor([[0, 0, 1, 1, 1], [3, 4, 4, 4, 4]])
    cu, longest = cu_seqlens(seq_idx)
    assert cu.tolist() == [0, 2, 5, 6, 10] and longest == 4 and cu.dtype == torch.int32


def _flash_runs():
    from kernels.attention import flash
    return flash.available(DEVICE)


def test_flash_says_what_it_cannot_run_and_hands_it_on(monkeypatch):
    """Sparse masks, fp32 inputs and odd head dims go to the fallback (FlexAttention, else SDPA) with the reason
    recorded, and the result is the fallback's; the library is never asked. Checked without flash-attn: a
    library that raises stands in for it."""
    from kernels.attention import flash
    monkeypatch.setattr(flash, "FALLBACKS", {})
    monkeypatch.setattr(flash, "library", lambda: pytest.fail("the library was asked"))
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 20, h, 16, generator=g) for h in (4, 2, 2))
    with pytest.warns(UserWarning, match="torch.float32 inputs"):
        got = flash.attention(q, k, v, kind="local", window=5)
    assert rel(got, ref.attention(q, k, v, kind="local", window=5)) < 1e-5
    got = flash.attention(q, k, v, kind="sparse", window=4, sinks=2, stride=5)  # by design: no warning
    assert rel(got, ref.attention(q, k, v, kind="sparse", window=4, sinks=2, stride=5)) < 1e-5
    assert set(flash.FALLBACKS) == {"torch.float32 inputs (flash-attn runs fp16/bf16; train under autocast)",
                                    "sparse masks (sinks and strided keys)"}
    assert flash.unsupported(q.bfloat16()[..., :12], "global") == "head dim 12 (flash-attn has multiples of 8 up to 256)"
    assert flash.unsupported(q.bfloat16(), "global") is None


def test_flash_windows_match_the_reference_rule():
    """local window w = the query plus w - 1 earlier keys, in both libraries' conventions."""
    from kernels.attention import flash
    assert flash._window("local", 7, "fa4") == (6, 0) and flash._window("local", 1, "fa2") == (0, 0)
    assert flash._window("global", 0, "fa4") == (None, None) and flash._window("global", 0, "fa2") == (-1, -1)


def test_flash_shares_one_cu_seqlens_per_forward_pass():
    from kernels.attention import flash
    seq_idx = torch.tensor([[0, 0, 1, 1, 1]])
    first = flash._shared_cu_seqlens(seq_idx)
    assert flash._shared_cu_seqlens(seq_idx) is first
    seq_idx[0, 1] = 1  # modified in place: recomputed
    assert flash._shared_cu_seqlens(seq_idx)[0].tolist() == [0, 1, 5]


def _grads(fn, q, k, v, dout, **kw):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v, **kw)
    out.backward(dout)
    return out, q.grad, k.grad, v.grad


@pytest.mark.gpu
@pytest.mark.parametrize("kind,window,sinks,stride", [("global", 0, 0, 0), ("local", 1, 0, 0), ("local", 7, 0, 0),
                                                      ("local", 128, 0, 0), ("local", 1024, 0, 0),
                                                      ("sparse", 256, 4, 64)])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("backend", ["flex", "flash"])
@pytest.mark.parametrize("d", [64, 128])
def test_backend_fwd_bwd_gpu(backend, kind, window, sinks, stride, packed, d):
    if backend == "flash" and not _flash_runs():
        pytest.skip("flash-attn not installed")
    mod = importlib.import_module(f"kernels.attention.{backend}")
    g = torch.Generator().manual_seed(1)
    t = 2048
    seq_idx = packed_ids([700, 13, 1, 1000, 334], 2) if packed else None
    q = torch.randn(2, t, 8, d, generator=g).to(DEVICE, torch.bfloat16)
    k, v = (torch.randn(2, t, 2, d, generator=g).to(DEVICE, torch.bfloat16) for _ in range(2))
    dout = torch.randn(2, t, 8, d, generator=g).to(DEVICE, torch.bfloat16)
    kw = dict(kind=kind, window=window, sinks=sinks, stride=stride, seq_idx=seq_idx)
    want = _grads(ref.attention, q.double(), k.double(), v.double(), dout.double(), **kw)
    got = _grads(mod.attention, q, k, v, dout, **kw)
    for name, a, b in zip(["out", "dq", "dk", "dv"], got, want):
        if name in ("dq", "dk") and window == 1:  # one visible key: softmax is constant, dq = dk = 0 exactly
            assert float(a.abs().max()) <= 1e-3, name
        else:
            assert rel(a, b) <= 1e-2, name


def filled_cache(kind, window, sinks, stride, cached, max_len=64, hkv=2, d=16, seed=0):
    """A KV cache (k, v, pos, ring_start) holding the first cached[r] tokens of row r, written as the model
    writes them (hybrid/cache.py KVState), so rings have wrapped and sparse far slots are filled."""
    from hybrid.cache import KVState
    g = torch.Generator().manual_seed(seed)
    ring_start = sinks + (max_len // stride if stride else 0) if kind == "sparse" else 0
    ring = max_len if kind == "global" else min(window, max_len)
    slots = ring_start + ring + 1
    b = len(cached)
    state = KVState(k=torch.zeros(b, slots, hkv, d), v=torch.zeros(b, slots, hkv, d),
                    pos=torch.full((b, slots), -1, dtype=torch.int64), ring_start=ring_start, ring_size=ring,
                    sinks=sinks if kind == "sparse" else 0, stride=stride if kind == "sparse" else 0)
    n = max(cached)
    pos = torch.arange(n).expand(b, n)
    keep = pos < torch.tensor(cached)[:, None]
    state.write(torch.randn(b, n, hkv, d, generator=g), torch.randn(b, n, hkv, d, generator=g), pos, keep)
    return state


@pytest.mark.gpu
@pytest.mark.parametrize("kind,window", [("global", 0), ("local", 64), ("local", 1)])
@pytest.mark.parametrize("d", [64, 128])
def test_flash_decode_gpu(kind, window, d, monkeypatch):
    """flash-attn's decode over the unified cache (rows at different lengths, a wrapped ring, GQA), eager and
    replayed in a CUDA graph, against the reference (FlashAttention-4 forced at this small batch)."""
    if not _flash_runs():
        pytest.skip("flash-attn not installed")
    from kernels.attention import flash
    monkeypatch.setattr(flash, "FA4_DECODE_MIN_BLOCKS", 0)
    cached = [1000, 37, 1, 64]
    st = filled_cache(kind, window, 0, 0, cached, max_len=1024, hkv=2, d=d)
    kc, vc, pc = (x.to("cuda") for x in (st.k.bfloat16(), st.v.bfloat16(), st.pos))
    q = torch.randn(len(cached), 8, d, device="cuda", dtype=torch.bfloat16)
    q_pos = torch.tensor(cached, device="cuda") - 1
    kw = dict(ring_start=0, kind=kind, window=window)
    want = ref.attention_decode(q.float(), kc.float(), vc.float(), pc, q_pos, **kw)
    assert rel(flash.attention_decode(q, kc, vc, pc, q_pos, **kw), want) < 1e-2
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        flash.attention_decode(q, kc, vc, pc, q_pos, **kw)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = flash.attention_decode(q, kc, vc, pc, q_pos, **kw)
    q.copy_(torch.randn_like(q))
    graph.replay()
    want = ref.attention_decode(q.float(), kc.float(), vc.float(), pc, q_pos, **kw)
    assert rel(out, want) < 1e-2


@pytest.mark.parametrize("kind,window,sinks,stride", MASKS)
def test_flex_attention_with_cache_matches_reference(kind, window, sinks, stride):
    """New tokens over a filled cache plus themselves, FlexAttention (unfused on CPU) vs the reference's dense
    masks: a second document starting inside the new tokens (it must not see the cache), rows holding different
    numbers of cached tokens, an empty row, GQA."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    from kernels.attention import flex
    cached = [13, 6, 0]
    st = filled_cache(kind, window, sinks, stride, cached)
    b, t, hq, d = 3, 7, 4, 16
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(b, t, h, d, generator=g) for h in (hq, 2, 2))
    seq_idx = torch.tensor([[0, 0, 0, 1, 1, 1, 1], [0] * 7, [0, 0, 1, 1, 1, 2, 2]])
    q_pos = ref.token_positions(seq_idx, b, t, "cpu", torch.tensor(cached))
    kw = dict(ring_start=st.ring_start, kind=kind, window=window, sinks=sinks, stride=stride, seq_idx=seq_idx)
    want = ref.attention_with_cache(q, k, v, st.k, st.v, st.pos, q_pos, **kw)
    got = flex.attention_with_cache(q, k, v, st.k, st.v, st.pos, q_pos, compiled=False, **kw)
    assert rel(got, want) < 1e-5
    got = flex.attention_with_cache(q, k, v, st.k, st.v, st.pos, q_pos, compiled=False,
                                    **{**kw, "seq_idx": None})
    assert rel(got, ref.attention_with_cache(q, k, v, st.k, st.v, st.pos, q_pos, **{**kw, "seq_idx": None})) < 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("kind,window,sinks,stride", MASKS)
def test_gpu_flex_attention_with_cache_compiled(kind, window, sinks, stride):
    """The compiled kernels (rows and caches shorter than a block padded) against the reference, bf16."""
    from kernels.attention import flex
    cached = [700, 33]
    st = filled_cache(kind, window, sinks, stride, cached, max_len=1024, hkv=2, d=64)
    b, t = 2, 300
    q, k, v = (torch.randn(b, t, h, 64, device="cuda", dtype=torch.bfloat16) for h in (8, 2, 2))
    seq_idx = (torch.arange(t, device="cuda") >= 200).long().expand(b, t).contiguous()
    q_pos = ref.token_positions(seq_idx, b, t, "cuda", torch.tensor(cached, device="cuda"))
    kc, vc, pc = (x.to("cuda") for x in (st.k.bfloat16(), st.v.bfloat16(), st.pos))
    kw = dict(ring_start=st.ring_start, kind=kind, window=window, sinks=sinks, stride=stride, seq_idx=seq_idx)
    want = ref.attention_with_cache(q.float(), k.float(), v.float(), kc.float(), vc.float(), pc, q_pos, **kw)
    got = flex.attention_with_cache(q, k, v, kc, vc, pc, q_pos, **kw)
    assert rel(got, want) < 2e-2


@pytest.mark.parametrize("t", [300, 512, 700])
@pytest.mark.parametrize("window", [None, 1, 64, 130, 300])
def test_tile_level_block_masks_list_every_visible_tile_and_only_full_tiles_as_full(t, window):
    """kernels/attention/flex.py document_block_mask against the element-wise rule: every tile with a visible
    (query, key) pair is listed, and a tile listed as full (its mask_mod skipped) is visible everywhere; packed
    rows with boundaries at, next to and inside tiles."""
    from kernels.attention import flex
    from kernels.attention.reference import token_positions
    seq_idx = torch.zeros(3, t, dtype=torch.int64)
    for x in (5, 127, 128, 129, 256, 400):
        seq_idx[0, x:] += int(x < t)
    seq_idx[1] = torch.arange(t) // 97
    w = flex.UNBOUNDED if window is None else window
    pos = token_positions(seq_idx, 3, t, "cpu")
    mod = flex.mask_mod("global" if window is None else "local", w, 0, 0, pos, seq_idx)
    mask = flex.document_block_mask(w, seq_idx, mod)
    visible = torch.stack([mod(torch.tensor(b), 0, torch.arange(t)[:, None], torch.arange(t)[None, :])
                           for b in range(3)])
    nb, full_seen = -(-t // flex.BLOCK), 0
    for b in range(3):
        for i in range(nb):
            full = set(mask.full_kv_indices[b, 0, i, :mask.full_kv_num_blocks[b, 0, i]].tolist())
            partial = set(mask.kv_indices[b, 0, i, :mask.kv_num_blocks[b, 0, i]].tolist())
            assert not full & partial
            for j in range(nb):
                tile = visible[b, i * flex.BLOCK:(i + 1) * flex.BLOCK, j * flex.BLOCK:(j + 1) * flex.BLOCK]
                assert not bool(tile.any()) or j in full | partial, (b, i, j)
                assert j not in full or bool(tile.all()), (b, i, j)
                full_seen += j in full
    assert full_seen > 0 or window is not None and window < 2 * flex.BLOCK
