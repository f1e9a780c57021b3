"""Mixture-of-experts MLPs (hybrid/moe.py, kernels/moe/): the grouped path equals the per-expert loop (fp64, forward
and every gradient), routing is deterministic and per token, the router losses equal a hand computation (and
transformers' Jamba / Mixtral loss), capacity drops exactly the documented assignments, shared experts and the
sigmoid router, the model's loss in training and eval, cache decode, a MoE layout training and resuming exactly,
training under DeepSpeed ZeRO-1/2/3 with activation checkpointing, and which export targets take MoE layouts.
Expert parallelism: tests/test_expert_parallel.py."""
import json
import math
import os

import pytest
import torch

from hybrid import HybridLM, generate, load_layout
from hybrid.moe import MoE, route
from hybrid.spec import MoeSpec
from kernels.moe import grouped, reference
from tests.test_train import Stop, config
from training import checkpoint as ckpt
from training.loop import run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JAMBA_MOE = os.path.join(ROOT, "layouts", "jamba-moe.yaml")
# jamba-moe at CPU-test size: M1 M1:moe Ag M1:moe (moe_every 2, offset 1), 4 experts, a capacity limit in training
SMALL = ["model.d_model=64", "model.vocab_size=384", "defaults.mlp.d_ff=64", "defaults.attention.n_heads=4",
         "defaults.attention.n_kv_heads=2", "defaults.mamba1.d_state=4", "defaults.mlp.n_experts=4",
         "defaults.mlp.capacity_factor=1.0", "defaults.mlp.z_loss_weight=0.001", "layers=M1 M1 Ag M1"]


def spec(**kw) -> MoeSpec:
    base = dict(d_model=16, kind="moe", d_ff=24, n_experts=5, top_k=2, n_shared_experts=0, router="softmax",
                norm_topk_prob=True, capacity_factor=0.0, aux_loss_weight=0.01, z_loss_weight=0.001)
    return MoeSpec(**{**base, **kw})


def moe(dtype=torch.float64, **kw) -> MoE:
    torch.manual_seed(0)
    m = MoE(spec(**kw)).to(dtype)
    with torch.no_grad():
        m.router.weight.normal_(0, 1)  # routing far from uniform, so experts get different loads
    return m


def run_module(m: MoE, x: torch.Tensor, backend: str, registry):
    """Output and the gradients of the input and every parameter of one forward + backward under `backend`."""
    import kernels
    registry.register("moe_experts", "grouped-anywhere", "kernels.moe.grouped", "moe_experts", lambda d: True)
    kernels.set_backend(backend)
    try:
        m.zero_grad()
        x = x.detach().clone().requires_grad_()
        out = m(x)
        loss = (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum()
        if m.stats is not None:
            loss = loss + m.stats.aux + m.stats.z
        loss.backward()
        return out.detach(), {"x": x.grad, **{n: p.grad.clone() for n, p in m.named_parameters()}}
    finally:
        kernels.set_backend(None)


# ------------------------------------------------------------------------------------------ grouped == loop
@pytest.mark.parametrize("kw", [{}, {"capacity_factor": 0.75}, {"n_shared_experts": 2, "router": "sigmoid"},
                                {"top_k": 1, "norm_topk_prob": False}])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dense_max", [0, 10 ** 6], ids=["sorted", "every-expert"])
def test_grouped_path_equals_the_per_expert_loop_in_fp64(kw, training, dense_max, registry, monkeypatch):
    """Both GPU paths: tokens sorted into expert groups, and (few tokens, decode steps, CUDA graph captures) every
    expert on every token combined by the router weights."""
    monkeypatch.setattr(grouped, "DENSE_MAX_TOKENS", dense_max)
    m = moe(**kw).train(training)
    x = torch.randn(3, 17, 16, dtype=torch.float64)
    want, want_grads = run_module(m, x, "reference", registry)
    got, grads = run_module(m, x, "grouped-anywhere", registry)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-13)
    assert want_grads.keys() == grads.keys() and all(g is not None for g in grads.values())
    for name in want_grads:
        torch.testing.assert_close(grads[name], want_grads[name], rtol=1e-12, atol=1e-13, msg=name)


def test_native_grouped_mm_equals_its_fallback_and_the_loop(monkeypatch):
    """torch._grouped_mm where this torch runs it (fp32 on CPU, if at all), against the group-by-group matmuls and
    the reference loop; fp64 and unaligned widths take the fallback."""
    monkeypatch.setattr(grouped, "DENSE_MAX_TOKENS", 0)
    torch.manual_seed(0)
    n, d, f, e, k = 40, 16, 32, 4, 2
    x = torch.randn(n, d)
    w = [torch.randn(e, f, d) / 4, torch.randn(e, f, d) / 4, torch.randn(e, d, f) / 4]
    expert = torch.stack([torch.randperm(e)[:k] for _ in range(n)])
    weight = torch.rand(n, k)
    want = reference.moe_experts(x, *w, expert, weight)
    torch.testing.assert_close(grouped.moe_experts(x, *w, expert, weight, force_loop=True), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grouped.moe_experts(x, *w, expert, weight), want, rtol=1e-5, atol=1e-5)
    assert not grouped.native(x.double(), w[0].double()) and not grouped.native(x[:, :5], w[0][:, :, :5])
    if hasattr(torch, "_grouped_mm"):  # torch 2.13 on CPU runs it in fp32 (16-byte aligned rows)
        assert grouped.native(x, w[0]) == grouped._probe("cpu", torch.float32)
    torch.testing.assert_close(grouped.dense(x, *w, expert, weight), want, rtol=1e-5, atol=1e-5)


def test_few_tokens_run_every_expert(monkeypatch):
    """Up to DENSE_MAX_TOKENS tokens (decode batches) go through `dense`, more through the sorted groups."""
    calls, real = [], grouped.dense
    monkeypatch.setattr(grouped, "dense", lambda *a, **k: calls.append(a[0].shape[0]) or real(*a, **k))
    for n in (1, grouped.DENSE_MAX_TOKENS, grouped.DENSE_MAX_TOKENS + 1):
        w = [torch.randn(4, 32, 16), torch.randn(4, 32, 16), torch.randn(4, 16, 32)]
        expert = torch.stack([torch.randperm(4)[:2] for _ in range(n)])
        grouped.moe_experts(torch.randn(n, 16), *w, expert, torch.rand(n, 2))
    assert calls == [1, grouped.DENSE_MAX_TOKENS]


# ------------------------------------------------------------------------------------------ routing
def test_routing_is_deterministic_ties_go_to_the_lower_expert_and_tokens_route_alone():
    s = spec(n_experts=4, top_k=2)
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, 2.0, 2.0, 2.0], [3.0, 1.0, 3.0, 1.0], [0.5, 0.1, 0.2, 0.5]])
    r = route(logits, s, training=False)
    assert r.expert.tolist() == [[0, 1], [1, 2], [0, 2], [0, 3]]
    for _ in range(3):
        assert torch.equal(route(logits, s, training=False).expert, r.expert)
    m = moe(dtype=torch.float32).eval()
    x = torch.randn(2, 9, 16)
    with torch.no_grad():
        batch = m(x)
        alone = torch.cat([m(x[:, i:i + 1]) for i in range(9)], dim=1)
    torch.testing.assert_close(batch, alone, rtol=1e-6, atol=1e-6)


def _softmax(row):
    exps = [math.exp(v) for v in row]
    return [v / sum(exps) for v in exps]


def test_router_losses_equal_a_hand_computation():
    """4 tokens, 3 experts, top-2 softmax: aux = n_experts * sum_e f_e * P_e, z = mean logsumexp(logits)^2."""
    rows = [[2.0, 0.0, -1.0], [0.0, 1.0, 0.5], [-1.0, 0.0, 3.0], [1.0, 0.2, 0.0]]
    r = route(torch.tensor(rows, dtype=torch.float64), spec(n_experts=3, top_k=2, norm_topk_prob=False), training=True)
    probs = [_softmax(row) for row in rows]
    chosen = [[0, 1], [1, 2], [2, 1], [0, 1]]  # each token's two highest logits, best first
    assert r.expert.tolist() == chosen
    torch.testing.assert_close(r.weight, torch.tensor([[p[e] for e in c] for p, c in zip(probs, chosen)],
                                                      dtype=torch.float64))
    f = [sum(e in c for c in chosen) / 4 for e in range(3)]          # [2/4, 4/4, 2/4]: sums to top_k
    p_mean = [sum(p[e] for p in probs) / 4 for e in range(3)]
    aux = 3 * sum(fe * pe for fe, pe in zip(f, p_mean))
    z = sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in rows) / 4
    assert r.stats.aux.item() == pytest.approx(aux, rel=1e-12)
    assert r.stats.z.item() == pytest.approx(z, rel=1e-12)
    assert r.stats.load.tolist() == pytest.approx([0.25, 0.5, 0.25])
    assert r.stats.dropped.item() == 0
    # normalized top-k: the two weights of a token sum to 1
    r = route(torch.tensor(rows, dtype=torch.float64), spec(n_experts=3, top_k=2), training=True)
    torch.testing.assert_close(r.weight.sum(-1), torch.ones(4, dtype=torch.float64))


def test_aux_loss_is_transformers_jamba_load_balancing_loss():
    jamba = pytest.importorskip("transformers.models.jamba.modeling_jamba")
    torch.manual_seed(0)
    logits = torch.randn(50, 8)
    r = route(logits, spec(n_experts=8, top_k=2, norm_topk_prob=False), training=True)
    want = jamba.load_balancing_loss_func((logits,), num_experts=8, top_k=2)
    torch.testing.assert_close(r.stats.aux, want.float(), rtol=1e-5, atol=1e-6)


def test_sigmoid_router():
    rows = [[2.0, 0.0, -1.0, 0.5], [-3.0, 1.0, 0.5, 0.0]]
    sig = [[1 / (1 + math.exp(-v)) for v in row] for row in rows]
    for norm in (False, True):
        r = route(torch.tensor(rows, dtype=torch.float64), spec(n_experts=4, top_k=2, router="sigmoid",
                                                                norm_topk_prob=norm), training=True)
        assert r.expert.tolist() == [[0, 3], [1, 2]]
        want = [[sig[0][0], sig[0][3]], [sig[1][1], sig[1][2]]]
        if norm:
            want = [[w / sum(pair) for w in pair] for pair in want]
        torch.testing.assert_close(r.weight, torch.tensor(want, dtype=torch.float64))
        p_mean = [sum(s[e] / sum(s) for s in sig) / 2 for e in range(4)]   # scores normalized over experts
        f = [0.5, 0.5, 0.5, 0.5]
        assert r.stats.aux.item() == pytest.approx(4 * sum(a * b for a, b in zip(f, p_mean)), rel=1e-12)


# ------------------------------------------------------------------------------------------ capacity
def test_capacity_overflow_drops_the_later_tokens_of_a_full_expert():
    """6 tokens, 2 experts, top-1, capacity_factor 1: C = ceil(1 * 6 * 1 / 2) = 3 per expert. Five tokens pick
    expert 0: the first three in token order keep it, tokens 4 and 5 get nothing from it (with a shared expert:
    only its output); in eval mode no token is dropped."""
    m = moe(n_experts=2, top_k=1, capacity_factor=1.0, n_shared_experts=1, norm_topk_prob=False)
    with torch.no_grad():
        m.router.weight.zero_()
        m.router.weight[0, 0] = 1.0                                  # router logit 0 = x[:, 0], logit 1 = 0
    x = torch.randn(6, 16, dtype=torch.float64)
    x[:, 0] = torch.tensor([1.0, 2.0, -1.0, 3.0, 0.5, 1.5])          # token 2 picks expert 1, the others expert 0
    s = m.spec
    r = route(m.router(x), s, training=True)
    assert r.expert[:, 0].tolist() == [0, 0, 1, 0, 0, 0]
    assert r.keep[:, 0].tolist() == [True, True, True, True, False, False]
    assert r.stats.dropped.item() == pytest.approx(2 / 6)
    with torch.no_grad():
        out = m.train()(x)
        routed = reference.moe_experts(x, m.gate_proj, m.up_proj, m.down_proj, r.expert, r.weight)
        shared = m.shared(x)
        torch.testing.assert_close(out[4:], shared[4:], rtol=0, atol=0)
        torch.testing.assert_close(out[:4], routed[:4] + shared[:4], rtol=1e-12, atol=1e-12)
        assert route(m.router(x), s, training=False).keep is None
        torch.testing.assert_close(m.eval()(x), routed + shared, rtol=1e-12, atol=1e-12)
    assert m.stats is None


def test_shared_experts_add_a_swiglu_of_every_token():
    m = moe(n_shared_experts=2).eval()
    assert m.shared.gate_proj.weight.shape == (2 * 24, 16)
    x = torch.randn(7, 16, dtype=torch.float64)
    with torch.no_grad():
        r = route(m.router(x), m.spec, training=False)
        want = reference.moe_experts(x, m.gate_proj, m.up_proj, m.down_proj, r.expert, r.weight) + m.shared(x)
        torch.testing.assert_close(m(x), want, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------------ the model
def small_moe_model(**kw) -> HybridLM:
    torch.manual_seed(0)
    overrides = SMALL + [f"defaults.mlp.{k}={v}" for k, v in kw.items()]
    return HybridLM(load_layout(JAMBA_MOE, overrides)).double()


def test_training_loss_adds_the_weighted_router_losses_and_eval_does_not():
    """Dropless, the routing is the same in both modes: the training loss is the eval loss plus the MoE layers'
    weighted aux and z losses; moe_stats holds their means. With capacity 1.0 some assignments drop in training."""
    model = small_moe_model(capacity_factor=0)
    assert [l.mlp.kind for l in model.layout.layers] == ["swiglu", "moe", "swiglu", "moe"]
    ids = torch.randint(0, 384, (2, 24))
    targets = torch.randint(0, 384, (2, 24))
    lm = model.eval()(ids, targets=targets)
    assert model.moe_stats is None
    total = model.train()(ids, targets=targets)
    layers = [b.mlp for b in model.blocks if isinstance(getattr(b, "mlp", None), MoE)]
    added = sum(m.spec.aux_loss_weight * m.stats.aux + m.spec.z_loss_weight * m.stats.z for m in layers)
    torch.testing.assert_close(total, lm + added, rtol=1e-12, atol=1e-12)
    aux, z, dropped, logged_added = model.moe_stats.tolist()
    assert aux == pytest.approx(sum(m.stats.aux.item() for m in layers) / 2)
    assert z == pytest.approx(sum(m.stats.z.item() for m in layers) / 2)
    assert dropped == 0 and logged_added == pytest.approx(added.item())
    capped = small_moe_model().train()
    capped(ids, targets=targets)
    assert 0 < capped.moe_stats[2].item() < 1


def test_activation_checkpointing_gives_the_same_gradients_with_moe():
    model = small_moe_model()
    ids = torch.randint(0, 384, (2, 30))
    seq_idx = (torch.arange(30) >= 11).int().expand(2, 30)
    grads = []
    for recompute in (False, True):
        model.zero_grad()
        model.activation_checkpointing = recompute
        model(ids[:, :-1], seq_idx=seq_idx[:, :-1], targets=ids[:, 1:]).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kw", [{}, {"router": "sigmoid", "n_shared_experts": 1, "top_k": 3}])
def test_prefill_then_decode_and_bucketed_generate_equal_the_full_forward(kw):
    """MoE layers hold no cache state and route each token alone (capacity applies in training only): prefill +
    one-token steps give the full forward's logits; the bucketed decode step (filler rows) the plain tokens."""
    model = small_moe_model(**kw).float().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        ids = torch.randint(0, 384, (3, 20))
        full = model(ids)
        cache = model.allocate_cache(3, 20)
        stepped = [model(ids[:, :6], cache=cache)] + [model(ids[:, i:i + 1], cache=cache) for i in range(6, 20)]
    assert (torch.cat(stepped, dim=1) - full).abs().max().item() <= 1e-4
    prompts = [[5, 9, 2, 7], [4], [8, 8, 3, 1, 1]]
    assert generate(model, prompts, max_new_tokens=6, graph=True) == generate(model, prompts, max_new_tokens=6)


def test_moe_layout_trains_logs_and_resumes_exactly(tmp_path, tokenizer, capsys):
    """jamba-moe (small) through training.loop.run, train.py's path: the router statistics are in the log line and
    metrics.jsonl; a run interrupted after step 3 and resumed from its step-2 checkpoint gives the uninterrupted
    losses."""
    layout = lambda: load_layout(JAMBA_MOE, SMALL)
    kw = dict(steps=4, seq_len=32, log_every=1, eval_batches=1)
    full = run(layout(), config(tmp_path / "a", tokenizer, **kw), layout_path=JAMBA_MOE)["losses"]
    log = capsys.readouterr().out
    assert "(" in log and "active)" in log and "moe aux" in log and "dropped" in log
    metrics = [json.loads(line) for line in open(tmp_path / "a" / "metrics.jsonl")]
    rows = [m for m in metrics if "loss" in m]
    assert len(rows) == 4 and all({"moe_aux", "moe_z", "moe_dropped"} <= m.keys() for m in rows)
    assert all(1.0 < m["moe_aux"] < 4.0 and 0 <= m["moe_dropped"] < 1 for m in rows)  # 2 = uniform for top-2

    def crash(step):
        if step == 3:
            raise Stop
    with pytest.raises(Stop):
        run(layout(), config(tmp_path / "b", tokenizer, save_every=2, **kw), layout_path=JAMBA_MOE, on_step=crash)
    assert ckpt.latest(str(tmp_path / "b" / "checkpoints")).endswith("step_00000002")
    resumed = run(layout(), config(tmp_path / "b", tokenizer, save_every=2, **kw), layout_path=JAMBA_MOE)["losses"]
    assert sorted(resumed) == [2, 3]
    for step in (2, 3):
        assert resumed[step] == full[step], (step, resumed[step], full[step])  # exact, fp32 on CPU


@pytest.fixture(scope="module")
def torch_engine_moe_run(tmp_path_factory, tokenizer):
    """Three steps of the small jamba-moe layout on the torch engine (fp32, one thread): the reference of the
    DeepSpeed runs below."""
    saved = torch.get_num_threads()
    out = run(load_layout(JAMBA_MOE, SMALL), config(tmp_path_factory.mktemp("torch"), tokenizer, **DS_RUN),
              layout_path=JAMBA_MOE)
    torch.set_num_threads(saved)
    return out


DS_RUN = dict(steps=3, seq_len=32, log_every=1, eval_batches=1, precision="fp32", threads=1)


@pytest.mark.cluster  # DeepSpeed's first start costs ~1 min here: `python -m pytest -q -m cluster` (.ci/run runs it)
@pytest.mark.skipif(__import__("importlib").util.find_spec("deepspeed") is None, reason="deepspeed not installed")
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_moe_layout_trains_under_deepspeed_zero_with_activation_checkpointing(tmp_path, tokenizer, stage,
                                                                               torch_engine_moe_run, monkeypatch,
                                                                               one_thread):
    """DeepSpeed ZeRO-1/2/3 (one gloo rank on the CPU, fp32) with every layer recomputed in backward: the MoE
    layout's losses (router losses included in what is optimized) and router statistics are the torch engine's
    without recomputation, step for step, and the consolidated fp32 weights hold every expert, equal to the
    trained model's."""
    monkeypatch.setenv("MASTER_PORT", str(29650 + stage))
    out = run(load_layout(JAMBA_MOE, SMALL), config(tmp_path, tokenizer, engine="deepspeed", zero_stage=stage,
                                                    activation_checkpointing=True, **DS_RUN), layout_path=JAMBA_MOE)
    assert out["engine"] == "deepspeed" and out["zero_stage"] == stage
    want = torch_engine_moe_run["losses"]
    assert sorted(out["losses"]) == [0, 1, 2]
    for step in range(3):
        assert out["losses"][step] == pytest.approx(want[step], rel=1e-5), step
    rows = [[json.loads(line) for line in open(d / "metrics.jsonl")]
            for d in (tmp_path, __import__("pathlib").Path(torch_engine_moe_run["checkpoint"]).parents[1])]
    for key in ("moe_aux", "moe_z", "moe_dropped"):
        got, ref = ([m[key] for m in r if "loss" in m] for r in rows)
        assert got == pytest.approx(ref, rel=1e-5, abs=1e-7), key
    model = HybridLM(load_layout(JAMBA_MOE, SMALL))
    ckpt.load_model(model, os.path.join(out["checkpoint"], "model.safetensors"))  # consolidated at the end
    assert model.blocks[1].mlp.gate_proj.shape[0] == 4
    trained = out["model"].state_dict()
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, trained[name].float(), rtol=0, atol=0, msg=name)


def test_export_of_moe_layouts_by_target(tmp_path):
    """MoE layouts export with the remote code and as Jamba (auto picks it for jamba-moe); the native targets
    without experts refuse them, naming the layer and field (tests/test_export.py compares the exported models'
    logits)."""
    pytest.importorskip("transformers")
    from interop.export import ExportError, export
    model = HybridLM(load_layout(JAMBA_MOE, SMALL))
    assert export(model, str(tmp_path / "auto"), target="auto") == "jamba"
    assert export(model, str(tmp_path / "remote"), target="remote") == "remote"
    refused = {"llama": "layers.0.mixer: mamba1", "mamba2": "layers.0.mixer: mamba1", "bamba": "layers.0.mixer: mamba1"}
    for target, words in refused.items():
        with pytest.raises(ExportError, match=f"cannot export to {target}: {words}"):
            export(model, str(tmp_path / "hf"), target=target)
    as_transformer = HybridLM(load_layout(JAMBA_MOE, SMALL + ["layers=Ag Ag:moe", "defaults.attention.rope=true"]))
    with pytest.raises(ExportError, match="cannot export to llama: layers.1.mlp: every layer needs a SwiGLU MLP"):
        export(as_transformer, str(tmp_path / "hf"), target="llama")
    assert not (tmp_path / "hf").exists()


def test_a_trained_moe_model_can_be_deep_copied():
    """After a training forward the layer holds its router losses with their graph (for backward); a deep copy
    of the model (EMA copies, the GPU parity test's reference model) leaves them behind instead of failing."""
    import copy
    m = moe().train()
    m(torch.randn(2, 5, 16, dtype=torch.float64))
    assert m.stats is not None and m.stats.aux.requires_grad
    twin = copy.deepcopy(m)
    assert twin.stats is None and m.stats is not None
    for a, b in zip(m.parameters(), twin.parameters()):
        assert torch.equal(a, b) and a is not b
