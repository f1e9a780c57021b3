"""Model, cache and generation: prefill + decode == full forward, left padding, packing, memory, dtypes."""
import copy
import glob
import importlib.util
import os

import pytest
import torch

from hybrid import HybridLM, generate, load_layout
from hybrid.budget import budget
from hybrid.cache import HybridCache
from tests.shrink import shrink

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LAYOUTS = sorted(glob.glob(os.path.join(ROOT, "layouts", "*.yaml")))
TOL = 1e-4


def small_model(path, **kw):
    torch.manual_seed(0)
    model = HybridLM(load_layout(shrink(path, **kw))).float().eval()
    # the init makes Mamba decays gentle; random D and dt_bias exercise more of the recurrence
    for name, p in model.named_parameters():
        if name.endswith(("dt_bias", ".D")):
            p.data.normal_(0, 1)
    return model


@pytest.fixture(scope="module")
def window4_model():
    """small_model(path, window=4), built once per layout for the tests below that only run it forward (eval, no
    gradients, parameters untouched): building the eight shrunk layouts again for each was a good part of their
    time."""
    built = {}

    def get(path):
        if path not in built:
            built[path] = small_model(path, window=4)
        return built[path]
    yield get
    built.clear()


def decode_logits(model, ids, prefix, max_len=None):
    """Logits of every position from a prefill of `prefix` tokens followed by one-token decode steps."""
    b, t = ids.shape
    cache = model.allocate_cache(b, max_len or t)
    outs = [model(ids[:, :prefix], cache=cache)]
    for i in range(prefix, t):
        outs.append(model(ids[:, i:i + 1], cache=cache))
    return torch.cat(outs, dim=1), cache


def test_every_layout_is_tested():
    names = {os.path.basename(p)[:-5] for p in LAYOUTS}
    assert {"tiny", "jamba", "jamba-moe", "samba", "griffin", "mamba2", "transformer", "nemotron-h"} <= names


@pytest.mark.parametrize("path", LAYOUTS, ids=lambda p: os.path.basename(p)[:-5])
def test_prefill_then_decode_equals_full_forward(path):
    model = small_model(path, window=5)
    ids = torch.randint(0, 101, (2, 26))  # > 4 x window: every ring buffer wraps several times
    with torch.no_grad():
        full = model(ids)
        for prefix in (1, 7):
            stepped, cache = decode_logits(model, ids, prefix)
            assert (stepped - full).abs().max().item() <= TOL, f"prefix {prefix}"
            assert cache.seqlens.tolist() == [26, 26]


@pytest.mark.parametrize("path", LAYOUTS, ids=lambda p: os.path.basename(p)[:-5])
def test_left_padded_batch_equals_each_sequence_alone(path, window4_model):
    model = window4_model(path)
    lengths, new = [3, 11, 7], 9
    seqs = [torch.randint(1, 101, (n + new,)) for n in lengths]
    width = max(lengths)
    ids = torch.zeros(len(seqs), width, dtype=torch.int64)
    mask = torch.zeros_like(ids)
    for i, (s, n) in enumerate(zip(seqs, lengths)):
        ids[i, width - n:] = s[:n]
        mask[i, width - n:] = 1
    with torch.no_grad():
        cache = model.allocate_cache(len(seqs), width + new)
        batch_logits = [model(ids, cache=cache, attention_mask=mask)[:, -1]]
        for j in range(new):
            step = torch.stack([s[n + j] for s, n in zip(seqs, lengths)])[:, None]
            batch_logits.append(model(step, cache=cache)[:, -1])
        batch_logits = torch.stack(batch_logits, dim=1)  # (batch, new + 1, vocab)
        for i, (s, n) in enumerate(zip(seqs, lengths)):
            alone = model(s[None, : n + new])[0, n - 1:]
            assert (batch_logits[i] - alone).abs().max().item() <= TOL, f"row {i}"
        assert cache.seqlens.tolist() == [n + new for n in lengths]


@pytest.mark.parametrize("path", LAYOUTS, ids=lambda p: os.path.basename(p)[:-5])
def test_chunked_prefill_of_padded_prompts_equals_each_prompt_alone(path, window4_model):
    """Left-padded prompts prefilled in pieces of 1, 3 and 5 tokens (padding filling whole pieces of some rows,
    ring buffers wrapping inside the prompt), then decode: every row's logits are those of its sequence
    alone, and the cache holds what a whole prefill leaves."""
    from hybrid.generate import left_pad, prefill
    model = window4_model(path)
    lengths, new = [2, 13, 8], 4
    seqs = [torch.randint(1, 101, (n + new,)) for n in lengths]
    ids, mask = left_pad([s[:n].tolist() for s, n in zip(seqs, lengths)], 0)
    with torch.no_grad():
        alone = [model(s[None])[0, n - 1:] for s, n in zip(seqs, lengths)]
        for chunk in (1, 3, 5):
            cache = model.allocate_cache(len(seqs), ids.shape[1] + new)
            rows = [prefill(model, ids, mask, cache, chunk)]
            for j in range(new):
                rows.append(model(torch.stack([s[n + j] for s, n in zip(seqs, lengths)])[:, None],
                                  cache=cache)[:, -1])
            got = torch.stack(rows, dim=1)  # (batch, new + 1, vocab)
            for i in range(len(seqs)):
                assert (got[i] - alone[i][: new + 1]).abs().max().item() <= TOL, f"chunk {chunk}, row {i}"
            assert cache.seqlens.tolist() == [n + new for n in lengths]


def test_generate_streams_reports_and_checks_its_arguments():
    """generate() hands each step's tokens to on_token, fills stats, gives the same tokens for any prefill
    chunk, and names a bad prefill_chunk."""
    from hybrid import generate
    model = small_model(os.path.join(ROOT, "layouts", "jamba.yaml"), window=4)
    prompts = [[5, 9, 2, 7, 7, 1, 3], [4]]
    seen, stats = [], {}
    whole = generate(model, prompts, max_new_tokens=5, on_token=lambda step, tok: seen.append((step, tok.tolist())),
                     stats=stats)
    assert [s for s, _ in seen] == list(range(5)) and [t for _, t in seen] == [list(c) for c in zip(*whole)]
    assert stats["prompt_tokens"] == 8 and stats["decode_steps"] == 5 and stats["decode_tokens_per_s"] > 0
    assert generate(model, prompts, max_new_tokens=5, prefill_chunk=2) == whole
    with pytest.raises(ValueError, match="prefill_chunk"):
        generate(model, prompts, max_new_tokens=2, prefill_chunk=-1)
    for bad in ([], [[4], []]):
        for graph in (False, True):
            with pytest.raises(ValueError, match="every prompt needs at least one token"):
                generate(model, bad, max_new_tokens=2, graph=graph)


def test_bucketed_decode_steps_equal_plain_generate_and_are_kept_until_stale():
    """graph=True on the CPU: batch rounded up to a bucket with filler rows, the cache and step kept per (bucket,
    length) and reused by the next call; same tokens as the plain path. A changed model (new parameter tensors,
    train mode) gets a new step; release() frees them."""
    from hybrid import decode
    model = small_model(os.path.join(ROOT, "layouts", "samba.yaml"), window=4)
    prompts = [[5, 9, 2, 7, 7, 1, 3], [4], [8, 8, 3]]
    plain = generate(model, prompts, max_new_tokens=6)
    stats = {}
    assert generate(model, prompts, max_new_tokens=6, graph=True, stats=stats) == plain
    assert stats["batch_bucket"] == 4 and stats["decode"] == "bucketed, eager" and stats["prompt_tokens"] == 11
    kept = decode._KEPT[model]
    assert len(kept) == 1 and next(iter(kept)) == (4, decode.SLOT_ROUND, False)
    first = next(iter(kept.values()))[1]
    # another batch in the same bucket, other prompt lengths: the same step, its cache emptied first
    assert generate(model, prompts[:2] + [[1, 2]] * 2, max_new_tokens=6, graph=True) == \
        generate(model, prompts[:2] + [[1, 2]] * 2, max_new_tokens=6)
    assert next(iter(kept.values()))[1] is first
    sampled = dict(max_new_tokens=5, temperature=0.9, top_p=0.9)
    assert generate(model, prompts[:1], graph=True, generator=torch.Generator().manual_seed(3), **sampled) == \
        generate(model, prompts[:1], generator=torch.Generator().manual_seed(3), **sampled)
    with torch.no_grad():
        for p in model.parameters():
            p.data = p.data.clone()  # new storage: a kept step would read the old weights
    assert generate(model, prompts, max_new_tokens=6, graph=True) == plain
    assert kept[(4, decode.SLOT_ROUND, False)][1] is not first
    decode.release(model)
    assert model not in decode._KEPT


def test_decode_buckets_and_lengths():
    from hybrid import decode
    assert [decode.batch_bucket(b) for b in (1, 3, 5, 64, 65, 256, 257)] == [1, 4, 8, 64, 96, 256, 320]
    assert decode.cache_length(1) == decode.SLOT_ROUND and decode.cache_length(decode.SLOT_ROUND + 1) == \
        2 * decode.SLOT_ROUND
    for bad in (lambda: decode.batch_bucket(0), lambda: decode.cache_length(0)):
        with pytest.raises(ValueError, match="must be >= 1"):
            bad()
    with pytest.raises(ValueError, match="CUDA"):
        decode.decode_step(small_model(os.path.join(ROOT, "layouts", "samba.yaml"), window=4), 2, 10, capture=True)


def test_cache_reset_of_some_rows():
    model = small_model(os.path.join(ROOT, "layouts", "samba.yaml"), window=4)
    cache = model.allocate_cache(3, 16)
    with torch.no_grad():
        model(torch.randint(1, 101, (3, 6)), cache=cache)
    from hybrid.cache import KVState
    before = [t.clone() for t in cache.tensors()]
    cache.reset(torch.tensor([False, True, False]))
    for old, now in zip(before, cache.tensors()):
        assert torch.equal(old[[0, 2]], now[[0, 2]])
    assert cache.seqlens[1] == 0
    for state in cache.layers:  # emptied: SSM states zero, every KV slot's position -1 (its keys never read)
        held = [state.pos] if isinstance(state, KVState) else [state.conv, state.ssm]
        assert all((t[1] == (-1 if isinstance(state, KVState) else 0)).all() for t in held)
    with pytest.raises(ValueError, match="bool"):
        cache.reset(torch.tensor([1, 0, 1]))


@pytest.mark.parametrize("ring_start,ring,t", [(0, 16, 5), (0, 8, 8), (0, 8, 11), (0, 4, 13), (3, 4, 9)])
def test_a_fresh_write_equals_the_scattered_write(ring_start, ring, t):
    """write_fresh (slice copies into an empty cache) leaves every slot a step would read as write does: the same
    position in every slot and the same keys wherever a position is held (the trash slot's keys are never read)."""
    from hybrid.cache import KVState

    def state():
        slots = ring_start + ring + 1
        return KVState(k=torch.zeros(2, slots, 2, 4), v=torch.zeros(2, slots, 2, 4),
                       pos=torch.full((2, slots), -1, dtype=torch.int64), ring_start=ring_start, ring_size=ring,
                       sinks=2 if ring_start else 0, stride=4 if ring_start else 0)
    k, v = torch.randn(2, t, 2, 4), torch.randn(2, t, 2, 4)
    pos = torch.arange(t).expand(2, t)
    a, b = state(), state()
    a.write(k, v, pos, torch.ones_like(pos, dtype=torch.bool))
    b.write_fresh(k, v, pos)
    assert torch.equal(a.pos, b.pos)
    held = a.pos >= 0
    assert torch.equal(a.k[held], b.k[held]) and torch.equal(a.v[held], b.v[held])
    far = [] if ring_start == 0 else [0, 1, 3]  # sinks 0, 1; the strided key 3 (7 would need a 4th far slot)
    assert sorted(a.pos[0][held[0]].tolist()) == far + list(range(max(0, t - ring), t))


def test_the_call_scratch_lives_for_one_model_call():
    """Positions and slots computed once per HybridLM call are dropped when it returns (a mixer called on its own
    computes them itself), so a later call never sees an earlier one's."""
    model = small_model(os.path.join(ROOT, "layouts", "samba.yaml"), window=4)
    cache = model.allocate_cache(2, 32)
    seen = []
    orig = cache.memo
    cache.memo = lambda key, make: seen.append((key, cache.call is not None)) or orig(key, make)
    with torch.no_grad():
        model(torch.randint(1, 101, (2, 6)), cache=cache)
        model(torch.randint(1, 101, (2, 5)), cache=cache, attention_mask=torch.tensor([[0, 1, 1, 1, 1]] * 2))
    assert cache.call is None and seen and all(inside for _, inside in seen)
    assert cache.memo("x", lambda: 1) == 1 and cache.memo("x", lambda: 2) == 2  # outside a call: no memo


@pytest.mark.parametrize("path", LAYOUTS, ids=lambda p: os.path.basename(p)[:-5])
def test_packed_documents_equal_documents_alone(path, window4_model):
    model = window4_model(path)
    docs = [torch.randint(0, 101, (n,)) for n in (5, 1, 13)]
    ids = torch.cat(docs)[None]
    seq_idx = torch.cat([torch.full((len(d),), i) for i, d in enumerate(docs)])[None].int()
    with torch.no_grad():
        packed = model(ids, seq_idx=seq_idx)[0]
        alone = torch.cat([model(d[None])[0] for d in docs])
    assert (packed - alone).abs().max().item() <= TOL


def test_cache_memory_is_flat_in_length_for_local_attention_and_mamba():
    # tiny has a global layer; its KV grows with max_len by design, so it is excluded from the comparison
    layout = load_layout(os.path.join(ROOT, "layouts", "tiny.yaml"))
    short, long_ = (HybridCache.allocate(layout, 2, n) for n in (1024, 65536))
    for i, layer in enumerate(layout.layers):
        if layer.mixer == "attention" and layer.attention.kind == "global":
            assert long_.nbytes(i) > 32 * short.nbytes(i)
        else:
            assert short.nbytes(i) == long_.nbytes(i), f"layer {i} ({layer.code}) grows with max_len"
    assert any(l.mixer == "attention" and l.attention.kind == "local" for l in layout.layers)
    assert any(l.mixer.startswith("mamba") for l in layout.layers)


@pytest.mark.parametrize("path", LAYOUTS, ids=lambda p: os.path.basename(p)[:-5])
def test_param_count_matches_budget_report(path):
    layout = load_layout(path)
    with torch.device("meta"):
        model = HybridLM(layout)
    assert sum(p.numel() for p in model.parameters()) == budget(layout).params


def test_ssm_parameters_stay_fp32_when_cast():
    model = small_model(os.path.join(ROOT, "layouts", "jamba.yaml")).to(torch.bfloat16)
    model2 = small_model(os.path.join(ROOT, "layouts", "mamba2.yaml")).half()
    for m in (model, model2):
        for name, p in m.named_parameters():
            want = torch.float32 if name.rsplit(".", 1)[-1] in ("A_log", "D", "dt_bias") else m.embed.weight.dtype
            assert p.dtype == want, name
    cache = model.allocate_cache(2, 16)
    states = [s for s in cache.layers if s is not None and hasattr(s, "ssm")]
    assert states and all(s.ssm.dtype == torch.float32 and s.conv.dtype == torch.bfloat16 for s in states)
    with torch.no_grad():
        out = model(torch.randint(0, 101, (2, 9)), cache=cache)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_bad_inputs_raise_clear_errors():
    model = small_model(os.path.join(ROOT, "layouts", "tiny.yaml"))
    ids = torch.randint(0, 101, (2, 6))
    with pytest.raises(ValueError, match="left padding"):
        model(ids, attention_mask=torch.tensor([[1, 1, 0, 1, 1, 1], [1] * 6]))
    with pytest.raises(ValueError, match="max_len"):
        model(ids, cache=model.allocate_cache(2, 4))
    with pytest.raises(ValueError, match="sequences"):
        model(ids, cache=model.allocate_cache(3, 8))
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, [[1, 2]], max_new_tokens=0)


class TestGenerate:
    model = None

    @classmethod
    def setup_class(cls):
        cls.model = small_model(os.path.join(ROOT, "layouts", "tiny.yaml"), window=4)

    def greedy_by_full_forward(self, prompt, n):
        seq = list(prompt)
        with torch.no_grad():
            for _ in range(n):
                seq.append(int(self.model(torch.tensor([seq]))[0, -1].argmax()))
        return seq[len(prompt):]

    def test_greedy_batch_matches_full_forward_argmax(self):
        prompts = [[5, 9, 2], [7, 1, 4, 4, 8, 3, 2, 11], [3]]
        out = generate(self.model, prompts, max_new_tokens=12)
        for p, o in zip(prompts, out):
            assert o == self.greedy_by_full_forward(p, 12)

    def test_stop_tokens_end_each_row(self):
        prompts = [[5, 9, 2], [7, 1, 4]]
        free = generate(self.model, prompts, max_new_tokens=10)
        stop = free[0][3]
        out = generate(self.model, prompts, max_new_tokens=10, stop_tokens=[stop])
        assert out[0] == free[0][: free[0].index(stop) + 1]
        want = free[1][: free[1].index(stop) + 1] if stop in free[1] else free[1]
        assert out[1] == want

    def test_sampling_filters(self):
        prompts = [[5, 9, 2], [7, 1]]
        greedy = generate(self.model, prompts, max_new_tokens=6)
        g = torch.Generator().manual_seed(1)
        assert generate(self.model, prompts, max_new_tokens=6, temperature=1.0, top_k=1, generator=g) == greedy
        assert generate(self.model, prompts, max_new_tokens=6, temperature=1.0, top_p=1e-6, generator=g) == greedy
        a = generate(self.model, prompts, max_new_tokens=6, temperature=1.3, top_p=0.9,
                     generator=torch.Generator().manual_seed(3))
        b = generate(self.model, prompts, max_new_tokens=6, temperature=1.3, top_p=0.9,
                     generator=torch.Generator().manual_seed(3))
        assert a == b and all(0 <= t < 101 for row in a for t in row)

    def test_top_k_and_top_p_keep_only_allowed_tokens(self):
        from hybrid.generate import SamplingConfig, sample_next
        logits = torch.tensor([[0.0, 3.0, 2.0, 1.0, -1.0]]).repeat(4000, 1)
        g = torch.Generator().manual_seed(0)
        k2 = sample_next(logits, SamplingConfig(temperature=1.0, top_k=2), g)
        assert set(k2.tolist()) == {1, 2}
        p = torch.softmax(logits[0], -1)  # sorted probs: 1, 2, 3, 0, 4
        top_p = float(p[1] + p[2]) - 1e-3  # tokens 1 and 2 are needed to reach it, 3 is not
        tp = sample_next(logits, SamplingConfig(temperature=1.0, top_p=top_p), g)
        assert set(tp.tolist()) == {1, 2}


def _gpu_run(model, backend, ids, seq_idx):
    """Logits and every parameter gradient (fp32 copies) of one forward + backward under `backend`."""
    import kernels
    kernels.set_backend(backend)
    try:
        model.zero_grad()
        logits = model(ids, seq_idx=seq_idx)
        logits.float().square().mean().backward()
        return logits.detach().float(), [p.grad.float().clone() for p in model.parameters()]
    finally:
        kernels.set_backend(None)


@pytest.mark.gpu
@pytest.mark.parametrize("path", LAYOUTS, ids=lambda p: os.path.basename(p)[:-5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_kernels_match_reference_in_the_model(path, dtype):
    """The whole model on CUDA with the Triton / FlexAttention backends vs the reference ops: logits and every
    parameter gradient, packed rows, window-sized pieces wrapping. fp32: the two directly. bf16: both against
    the fp32 reference run of the same weights; the kernels may not be further from it than the bf16 reference
    ops are (by more than half again), nor beyond the bf16 tolerance when the reference ops are closer."""
    torch.manual_seed(0)
    model = HybridLM(load_layout(shrink(path, window=64))).to("cuda", dtype)
    ids = torch.randint(0, 101, (2, 300), device="cuda")
    seq_idx = (torch.arange(300, device="cuda") >= 123).int().expand(2, 300).contiguous()
    ref_logits, ref_grads = _gpu_run(model, "reference", ids, seq_idx)
    logits, grads = _gpu_run(model, "auto", ids, seq_idx)
    rel = lambda a, b: float((a - b).norm() / b.norm().clamp_min(1e-30))
    names = [n for n, _ in model.named_parameters()]
    if dtype == torch.float32:
        assert rel(logits, ref_logits) <= 2e-3
        bad = {n: rel(a, b) for n, a, b in zip(names, grads, ref_grads) if not rel(a, b) <= 4e-3}
        assert not bad, bad
        return
    gold_logits, gold_grads = _gpu_run(copy.deepcopy(model).float(), "reference", ids, seq_idx)
    allowed = lambda e_ref, tol: max(tol, 1.5 * e_ref)
    assert rel(logits, gold_logits) <= allowed(rel(ref_logits, gold_logits), 2e-2)
    bad = {n: (rel(a, g), rel(b, g)) for n, a, b, g in zip(names, grads, ref_grads, gold_grads)
           if not rel(a, g) <= allowed(rel(b, g), 4e-2)}
    assert not bad, f"(kernels, bf16 reference) errors against fp32: {bad}"


@pytest.mark.gpu
@pytest.mark.parametrize("path", LAYOUTS, ids=lambda p: os.path.basename(p)[:-5])
def test_gpu_prefill_then_decode_equals_full_forward(path):
    """On CUDA with the default backends (Triton decode steps, split-KV attention decode, FlexAttention
    prefill): a prefill then one-token steps give the full forward's logits, ring buffers wrapping."""
    model = small_model(path, window=16).cuda()
    ids = torch.randint(0, 101, (2, 90), device="cuda")
    with torch.no_grad():
        full = model(ids)
        stepped, cache = decode_logits(model, ids, 37)
    assert float((stepped - full).abs().max()) <= 2e-3
    assert cache.seqlens.tolist() == [90, 90]


@pytest.mark.gpu
@pytest.mark.parametrize("path", LAYOUTS, ids=lambda p: os.path.basename(p)[:-5])
def test_gpu_chunked_prefill_then_decode_equals_full_forward(path):
    """On CUDA, bf16, default backends: left-padded prompts prefilled in pieces of 16, 37 and 128 tokens, then
    decode, give each sequence's own logits within bf16 tolerance."""
    from hybrid.generate import left_pad, prefill
    model = small_model(path, window=16).cuda().bfloat16()
    lengths, new = [40, 150, 97], 6
    seqs = [torch.randint(1, 101, (n + new,), device="cuda") for n in lengths]
    ids, mask = left_pad([s[:n].tolist() for s, n in zip(seqs, lengths)], 0, "cuda")
    with torch.no_grad():
        alone = [model(s[None])[0, n - 1:].float() for s, n in zip(seqs, lengths)]
        for chunk in (16, 37, 128):
            cache = model.allocate_cache(len(seqs), ids.shape[1] + new)
            rows = [prefill(model, ids, mask, cache, chunk)]
            for j in range(new):
                rows.append(model(torch.stack([s[n + j] for s, n in zip(seqs, lengths)])[:, None],
                                  cache=cache)[:, -1])
            got = torch.stack(rows, dim=1).float()
            for i in range(len(seqs)):
                err = float((got[i] - alone[i][: new + 1]).norm() / alone[i][: new + 1].norm())
                assert err <= 2e-2, f"chunk {chunk}, row {i}: {err}"


@pytest.mark.gpu
@pytest.mark.parametrize("path", LAYOUTS, ids=lambda p: os.path.basename(p)[:-5])
def test_gpu_generate_through_the_captured_step_equals_eager(path):
    """On CUDA, generate() decodes through a CUDA graph (batch bucket 4 for 3 prompts) and makes the same greedy
    tokens as the eager loop; a second call reuses the captured step."""
    from hybrid import decode
    model = small_model(path, window=16).cuda()
    prompts = [torch.randint(1, 101, (n,)).tolist() for n in (40, 7, 97)]
    eager = generate(model, prompts, max_new_tokens=20, graph=False)
    stats = {}
    assert generate(model, prompts, max_new_tokens=20, stats=stats) == eager
    assert stats["decode"] == "cuda graph" and stats["batch_bucket"] == 4
    step = next(iter(decode._KEPT[model].values()))[1]
    assert generate(model, prompts[::-1], max_new_tokens=20) == eager[::-1]
    assert next(iter(decode._KEPT[model].values()))[1] is step
    decode.release(model)


def _step(model, backend, ids, targets, seq_idx, autocast):
    """The training path's loss and every parameter gradient under `backend`."""
    import kernels
    kernels.set_backend(backend)
    try:
        model.zero_grad()
        with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = model(ids, seq_idx=seq_idx, targets=targets)
        loss.backward()
        return loss.item(), {n: p.grad.float().clone() for n, p in model.named_parameters()}
    finally:
        kernels.set_backend(None)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
def test_fused_training_step_equals_reference_ops(registry):
    """One training step's loss and gradients with every Triton op forced (the fused residual add + norm,
    SwiGLU, conv, SSD, chunked LM-head loss; Triton's interpreter on CPU) equal the reference ops' on the same
    weights and packed rows."""
    torch.manual_seed(0)
    # headdim 16: 4 heads per Mamba-2 layer (the interpreter's time goes by programs, i.e. by heads; the SSD
    # kernels' headdim below their 16-wide tile is tests/test_triton_ssd.py's)
    layout = load_layout("layouts/tiny.yaml", ["model.d_model=32", "model.vocab_size=97", "layers=M2 Ag M2:none",
                                               "defaults.mamba2.headdim=16", "defaults.mamba2.d_state=8",
                                               "defaults.mamba2.chunk_size=16", "defaults.attention.n_heads=2",
                                               "defaults.mlp.d_ff=64"])
    model = HybridLM(layout).to(DEVICE)
    ids = torch.randint(0, 97, (2, 30), device=DEVICE)
    targets = torch.randint(0, 97, (2, 30), device=DEVICE)
    targets[:, 17] = -100
    seq_idx = (torch.arange(30, device=DEVICE) >= 18).int().expand(2, 30).contiguous()
    for op, impls in list(registry.IMPLEMENTATIONS.items()):  # every Triton implementation, also on CPU
        for impl in list(impls):
            if impl.backend == "triton":
                registry.register(op, "triton-anywhere", impl.module, impl.function, lambda device_type: True)
    for autocast in ([False, True] if DEVICE == "cuda" else [False]):
        loss_ref, grads_ref = _step(model, "reference", ids, targets, seq_idx, autocast)
        loss, grads = _step(model, "triton-anywhere", ids, targets, seq_idx, autocast)
        _close(loss, loss_ref, grads, grads_ref, 2e-2 if autocast else 1e-4)


def _close(loss, loss_ref, grads, grads_ref, tol):
    assert abs(loss - loss_ref) <= tol * abs(loss_ref)
    rel = lambda a, b: float((a - b).norm() / b.norm().clamp_min(1e-30))
    bad = {n: rel(grads[n], g) for n, g in grads_ref.items() if not rel(grads[n], g) <= 2 * tol}
    assert not bad, bad


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
def test_decode_steps_with_every_triton_op_equal_reference_ops(registry):
    """Decode steps with every Triton op forced (Triton's interpreter on CPU): the fused projections (q / k / v
    with biases in one launch, SwiGLU's gate and up, Mamba1's x / dt projections, Mamba2's in-projection), RoPE
    with the cache write, the conv and SSM steps give the reference ops' logits, for Mamba1 with dt / B / C
    norms, Mamba2, global and local attention. One prefill on the reference ops fills two caches; then the same
    decode steps run on each (the prefill's Triton scans are the training test's above)."""
    torch.manual_seed(0)
    layout = load_layout("layouts/tiny.yaml", [
        "model.d_model=32", "model.vocab_size=97", "layers=M1 M2 Ag Aw", "defaults.mamba2.headdim=8",
        "defaults.mamba2.d_state=8", "defaults.mamba2.chunk_size=16", "defaults.attention.n_heads=2",
        "defaults.attention.n_kv_heads=1", "defaults.attention.window=4", "defaults.attention.qkv_bias=true",
        "defaults.mamba1.d_state=4", "defaults.mamba1.dt_bc_norm=true", "defaults.mlp.d_ff=48"])
    model = HybridLM(layout).to(DEVICE).eval()
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            p.data.normal_(0, 0.5)
    ids = torch.randint(0, 97, (2, 11), device=DEVICE)
    caches = [model.allocate_cache(2, 11) for _ in range(2)]
    with torch.no_grad():
        for cache in caches:
            model(ids[:, :7], cache=cache)
        # two steps, positions 7 and 8: the local layer's ring of 4 slots wraps between them (slot 3, then 0)
        want = torch.cat([model(ids[:, i:i + 1], cache=caches[0]) for i in range(7, 9)], dim=1)
        for op, impls in list(registry.IMPLEMENTATIONS.items()):
            for impl in list(impls):
                if impl.backend == "triton":
                    registry.register(op, "triton-anywhere", impl.module, impl.function, lambda device_type: True,
                                      preferred=True)
        got = torch.cat([model(ids[:, i:i + 1], cache=caches[1]) for i in range(7, 9)], dim=1)
    assert (got - want).abs().max().item() <= 1e-4


@pytest.mark.parametrize("path", LAYOUTS, ids=lambda p: os.path.basename(p)[:-5])
def test_flex_prefill_over_the_cache_equals_the_reference(path, window4_model, registry):
    """attention_with_cache on FlexAttention (unfused on CPU): chunked prefill of left-padded prompts and then
    decode give the same logits as with the reference's dense masks, every attention kind, rings wrapping."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    from hybrid.generate import left_pad, prefill
    model = window4_model(path)
    lengths, new = [3, 14, 9], 3
    seqs = [torch.randint(1, 101, (n + new,)) for n in lengths]
    ids, mask = left_pad([s[:n].tolist() for s, n in zip(seqs, lengths)], 0)

    def run(chunk):
        cache = model.allocate_cache(len(seqs), ids.shape[1] + new)
        rows = [prefill(model, ids, mask, cache, chunk)]
        for j in range(new):
            rows.append(model(torch.stack([s[n + j] for s, n in zip(seqs, lengths)])[:, None], cache=cache)[:, -1])
        return torch.stack(rows, dim=1)
    with torch.no_grad():
        want = {chunk: run(chunk) for chunk in (5,)}
        registry.register("attention_with_cache", "flex-anywhere", "kernels.attention.flex", "attention_with_cache",
                          lambda device_type: True, preferred=True)
        got = {chunk: run(chunk) for chunk in (5,)}
    for chunk in want:
        assert (got[chunk] - want[chunk]).abs().max().item() <= TOL, f"chunk {chunk}"


def test_the_package_exports_are_the_functions_and_classes_whatever_was_imported_first():
    """hybrid/__init__ imports its exports on first use; `hybrid.generate` stays the function although the
    submodule hybrid.generate exists and binds itself on the package when imported."""
    import hybrid
    import hybrid.generate as gen_module  # noqa: F401  (the import that would rebind hybrid.generate)
    from hybrid import HybridCache, SamplingConfig, generate as gen
    assert callable(gen) and gen is hybrid.generate and gen.__module__ == "hybrid.generate"
    assert HybridCache.__module__ == "hybrid.cache" and SamplingConfig.__module__ == "hybrid.generate"
    assert all(getattr(hybrid, name) is not None for name in hybrid.__all__)  # every export resolves
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        hybrid.nope
