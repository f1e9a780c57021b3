"""Expert parallelism (hybrid/expert_parallel.py, training/parallel.py) on CPU ranks with gloo, started as processes:
the forward output and every gradient (after the engine's averaging and clipping) equal one process's on the same
global batch in fp64, with 2 ranks holding 2 experts each and with 4 ranks as 2 replicas of that split; train.py's
loop on 2 ranks trains as one rank with the same micro-batches, writes checkpoints with every expert, and resumes
exactly; bad settings are ConfigErrors naming train.expert_parallel."""
import multiprocessing
import os
import socket
import traceback

import pytest
import torch

from hybrid import HybridLM, load_layout
from hybrid.errors import ConfigError
from tests.test_train import config
from training import checkpoint as ckpt
from training.loop import run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JAMBA_MOE = os.path.join(ROOT, "layouts", "jamba-moe.yaml")
# jamba-moe at CPU-test size (as tests/test_moe.py): M1 M1:moe Ag M1:moe, 4 experts, a capacity limit in training
SMALL = ["model.d_model=64", "model.vocab_size=384", "defaults.mlp.d_ff=64", "defaults.attention.n_heads=4",
         "defaults.attention.n_kv_heads=2", "defaults.mamba1.d_state=4", "defaults.mlp.n_experts=4",
         "defaults.mlp.capacity_factor=1.0", "defaults.mlp.z_loss_weight=0.001", "layers=M1 M1 Ag M1"]
# (layout overrides, activation checkpointing): Jamba's softmax top-2 with a capacity limit; a sigmoid top-3 router
# with a shared expert, dropless, recomputed in backward (the all-to-alls run again there)
CASES = [(SMALL, False),
         (SMALL + ["defaults.mlp.router=sigmoid", "defaults.mlp.top_k=3", "defaults.mlp.n_shared_experts=1",
                   "defaults.mlp.norm_topk_prob=true", "defaults.mlp.capacity_factor=0"], True)]
ROWS, SEQ, CLIP = 2, 24, 0.05  # rows per rank, tokens per row, a clipping norm that clips


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn, rank, world, port, out, args):
    """A rank: the launcher's environment, then fn(rank, world, out, *args); a failure's traceback is saved."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
        fn(rank, world, out, *args)
        torch.distributed.destroy_process_group()
    except BaseException:
        with open(os.path.join(out, f"error{rank}.txt"), "w") as f:
            f.write(traceback.format_exc())
        raise


def ranks(fn, world: int, out, *args, timeout: float = 300) -> None:
    """fn on `world` gloo ranks, each a process (a rank that hangs or fails fails the test with its traceback)."""
    ctx, port = multiprocessing.get_context("spawn"), _free_port()
    procs = [ctx.Process(target=_entry, args=(fn, r, world, port, str(out), args)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    for p in procs:
        if p.is_alive():
            p.kill()
    errors = [open(os.path.join(out, f)).read() for f in sorted(os.listdir(out)) if f.startswith("error")]
    assert not errors and all(p.exitcode == 0 for p in procs), "\n".join(errors) or [p.exitcode for p in procs]


def _model(overrides) -> HybridLM:
    torch.manual_seed(0)
    return HybridLM(load_layout(JAMBA_MOE, overrides)).double().train()


def _batch(world: int):
    """The global batch: ids and targets (world * ROWS, SEQ), packed rows of two documents."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 384, (world * ROWS, SEQ + 1), generator=g)
    seq_idx = (torch.arange(SEQ) >= 9).int().expand(world * ROWS, SEQ)
    return ids[:, :-1], ids[:, 1:], seq_idx


def _grads_rank(rank, world, out, ep_size):
    """One rank of the equivalence test: this rank's rows through the sharded model, then the engine's gradient
    averaging and clipping; saves logits, loss, grads (local shapes), norm and the gathered full weights."""
    from hybrid.expert_parallel import full_state_dict
    from training import parallel
    from training.parallel import Parallel
    parallel.BUCKET = 5000  # several all-reduce buffers per dtype, as a large model has
    results = []
    for overrides, recompute in CASES:
        model = _model(overrides)
        par = Parallel(ep_size)
        par.shard(model)
        model.activation_checkpointing = recompute
        ids, targets, seq_idx = (t[rank * ROWS:(rank + 1) * ROWS] for t in _batch(world))
        with torch.no_grad():
            logits = model(ids, seq_idx=seq_idx)
        loss = model(ids, seq_idx=seq_idx, targets=targets)
        loss.backward()
        par.average_gradients(model)
        norm = par.clip_grad_norm(model, CLIP)
        results.append(dict(logits=logits, loss=loss.detach(), norm=norm, full=full_state_dict(model),
                            grads={n: p.grad for n, p in model.named_parameters()}))
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))


def _one_process(world: int, overrides, recompute: bool):
    """The same global batch on one process as `world` micro-batches (each routed, capped and regularized on its
    own, as each rank does), gradients of their mean loss, clipped."""
    model = _model(overrides)
    model.activation_checkpointing = recompute
    ids, targets, seq_idx = _batch(world)
    logits, losses = [], []
    for r in range(world):
        part = slice(r * ROWS, (r + 1) * ROWS)
        with torch.no_grad():
            logits.append(model(ids[part], seq_idx=seq_idx[part]))
        losses.append(model(ids[part], seq_idx=seq_idx[part], targets=targets[part]))
        (losses[-1] / world).backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
    return model, logits, losses, norm


@pytest.mark.cluster  # starts 2 or 4 processes (10-20 s / 15-30 s on two busy cores)
@pytest.mark.parametrize("world,ep_size", [(2, 2), (4, 2)], ids=["2-ranks-ep2", "4-ranks-ep2-two-replicas"])
def test_forward_and_gradients_equal_one_process_in_fp64(tmp_path, world, ep_size, one_thread):
    """Each rank holds 4 / E_p experts; its logits are the one-process logits of its rows, its dense gradients
    and its experts' gradients (averaged over the ranks, and over the replicas of its experts when world > E_p,
    then clipped by the global norm) are the one-process gradients of the mean loss; the gathered weights are
    the one-process model's."""
    ranks(_grads_rank, world, tmp_path, ep_size)
    for case, (overrides, recompute) in enumerate(CASES):
        model, logits, losses, norm = _one_process(world, overrides, recompute)
        want = dict(model.named_parameters())
        for rank in range(world):
            got = torch.load(tmp_path / f"rank{rank}.pt")[case]
            torch.testing.assert_close(got["logits"], logits[rank], rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(got["loss"], losses[rank].detach(), rtol=1e-12, atol=0)
            torch.testing.assert_close(got["norm"], norm, rtol=1e-10, atol=0)
            assert norm > CLIP  # the clipping was exercised
            assert got["grads"].keys() == want.keys()
            n_local = 4 // ep_size
            lo = (rank % ep_size) * n_local
            for name, grad in got["grads"].items():
                full = want[name].grad
                if name.endswith(("gate_proj", "up_proj", "down_proj")):
                    assert grad.shape[0] == n_local
                    full = full[lo:lo + n_local]
                # A_log / D / dt_bias stay fp32: their gradients are summed over the ranks in another order
                tol = dict(rtol=1e-9, atol=1e-13) if grad.dtype == torch.float64 else dict(rtol=1e-5, atol=1e-8)
                torch.testing.assert_close(grad, full, **tol, msg=f"case {case} rank {rank} {name}")
            for name, value in model.state_dict().items():
                assert torch.equal(got["full"][name], value), name


def _train_rank(rank, world, out, tokenizer):
    """train.py's loop on this rank: an uninterrupted run (a), and the same run in two parts (b: 2 steps, then
    resumed to 4); constant lr, so that the schedule does not depend on the number of steps."""
    kw = dict(engine="torch", expert_parallel=2, sampler="epoch", seq_len=32, warmup=0, min_lr_ratio=1.0,
              threads=1, eval_batches=1)
    layout = load_layout(JAMBA_MOE, SMALL)
    a = run(layout, config(os.path.join(out, "a"), tokenizer, steps=4, sample_tokens=4, save_every=1, **kw),
            layout_path=JAMBA_MOE)  # saving (gathering every expert) between steps changes nothing
    run(layout, config(os.path.join(out, "b"), tokenizer, steps=2, **kw), layout_path=JAMBA_MOE)
    b = run(layout, config(os.path.join(out, "b"), tokenizer, steps=4, **kw), layout_path=JAMBA_MOE)
    sharded = {n: tuple(p.shape) for n, p in a["model"].named_parameters()}
    torch.save(dict(a=a["losses"], b=b["losses"], heldout=a["heldout_loss"], sample=a.get("sample"),
                    shapes=sharded), os.path.join(out, f"rank{rank}.pt"))


@pytest.mark.cluster  # 2 processes, three short runs each (15-45 s on two busy cores)
def test_two_rank_training_equals_one_rank_and_resumes_exactly(tmp_path, tokenizer, one_thread):
    """2 ranks, train.expert_parallel=2, one micro-batch each (sampler=epoch: rank r takes windows 2r, 2r+1 of
    the step) against one rank with grad_accum=2 over the same windows: the same losses (fp32; the experts' sums
    run in another order) and final weights; the checkpoint holds every expert; a run saved at step 2 and
    resumed gives exactly the uninterrupted run's losses and weights; the 2-rank checkpoint resumes on one rank."""
    ranks(_train_rank, 2, tmp_path, tokenizer, timeout=600)
    kw = dict(engine="torch", sampler="epoch", seq_len=32, warmup=0, min_lr_ratio=1.0, eval_batches=1, threads=1)
    one = run(load_layout(JAMBA_MOE, SMALL), config(tmp_path / "one", tokenizer, steps=4, grad_accum=2, **kw),
              layout_path=JAMBA_MOE)
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert got[0]["a"] == got[1]["a"] and sorted(got[0]["a"]) == [0, 1, 2, 3]  # the logged means over ranks
    for step in range(4):
        assert got[0]["a"][step] == pytest.approx(one["losses"][step], rel=1e-5), step
    assert got[0]["heldout"] == pytest.approx(one["heldout_loss"], rel=1e-5)
    assert sorted(got[0]["b"]) == [2, 3] and all(got[0]["b"][s] == got[0]["a"][s] for s in (2, 3))  # exact
    assert got[0]["sample"] and got[1]["sample"] is None  # rank 0 samples from the gathered model
    assert got[1]["shapes"]["blocks.1.mlp.gate_proj"] == (4, 64, 64)  # the returned model holds every expert
    a, b = (ckpt.latest(str(tmp_path / run_ / "checkpoints")) for run_ in ("a", "b"))
    model, _ = ckpt.load_checkpoint(a)  # every expert, loadable as one process's model
    resumed, _ = ckpt.load_checkpoint(b)
    mine = one["model"].state_dict()
    for name, value in model.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[name]), name
        # AdamW's update of an element with a near-zero gradient moves by up to ~1e-6 with a sum's rounding; an
        # expert trained on the wrong rows or without its average would be off by about lr (3e-3) a step
        torch.testing.assert_close(value, mine[name], rtol=1e-4, atol=1e-5, msg=name)
    moments = ckpt.load_optimizer(a)["state"]
    assert any(tuple(v["exp_avg"].shape) == (4, 64, 64) for v in moments.values())
    # the 2-rank checkpoint resumes on one rank (every expert on it): at lr 0 its weights come back unchanged
    again = run(load_layout(JAMBA_MOE, SMALL), config(tmp_path / "regroup", tokenizer, steps=5, lr=0.0, resume=a,
                                                      **kw), layout_path=JAMBA_MOE)
    assert sorted(again["losses"]) == [4]
    for name, value in again["model"].state_dict().items():
        assert torch.equal(value, model.state_dict()[name]), name


def test_bad_settings_name_train_expert_parallel(tmp_path, tokenizer, monkeypatch):
    """Not dividing the experts, not dividing the ranks, a layout without MoE, DeepSpeed, and 0: each a
    ConfigError naming train.expert_parallel; under a launcher, engine auto picks the torch engine."""
    from training.config import TrainConfig
    from training.loop import uses_deepspeed
    from training.parallel import check_expert_parallel
    moe = load_layout(JAMBA_MOE, SMALL)
    cases = [(dict(expert_parallel=3), moe, r"train.expert_parallel=3 must divide the number of experts.*"
                                            r"layers.1.n_experts=4"),
             (dict(expert_parallel=2), moe, r"train.expert_parallel=2 must divide the number of ranks, 1"),
             (dict(expert_parallel=2), load_layout(os.path.join(ROOT, "layouts", "tiny.yaml")),
              r"train.expert_parallel=2: layout tiny has no MoE layer"),
             (dict(expert_parallel=0), moe, r"train.expert_parallel=0: expected an integer >= 1")]
    for kw, layout, message in cases:
        with pytest.raises(ConfigError, match=message):
            run(layout, config(tmp_path, tokenizer, **kw), layout_path=JAMBA_MOE)
    with pytest.raises(ConfigError, match=r"train.expert_parallel=4 must divide the number of ranks, 2"):
        check_expert_parallel(TrainConfig(expert_parallel=4), load_layout(JAMBA_MOE, SMALL + [
            "defaults.mlp.n_experts=8"]), 2, False)
    with pytest.raises(ConfigError, match=r"train.expert_parallel=2 runs on the torch engine only"):
        check_expert_parallel(TrainConfig(expert_parallel=2, engine="deepspeed"), moe, 2, True)
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")  # as under the deepspeed launcher
    assert uses_deepspeed(TrainConfig(), None) and not uses_deepspeed(TrainConfig(expert_parallel=2), None)
