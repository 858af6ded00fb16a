"""DistMuon + DistAdamW on 2 gloo CPU processes against Muon + AdamW in one process on the averaged gradient.

Each rank computes gradients of a depth-2 GPT on its half of a batch and steps the sharded optimizers; the reference
steps the single-process optimizers on the full batch (its mean loss is the mean of the two halves' mean losses, so
its gradient is the average the ranks compute). One spawn runs every scenario; the tests compare what ranks saved.
"""
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from nanochat.gpt import GPT, GPTConfig
from nanochat.optim import Muon, DistMuon, DistAdamW, setup_optimizers, muon_owners

WORLD, STEPS, VOCAB = 2, 4, 256
# Newton-Schulz runs in bf16 and amplifies small singular values ~500x, so a last-bit difference in a gradient (the
# same average summed in another order) moves a few-step run by a few percent of its total update; measured ~3-5%
# here, and the same between two single-process runs that only sum the gradient differently.
REL_TOL = 0.15
ADAM_KW = dict(lr=0.01, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.1)


def make_model():
    torch.manual_seed(0)
    with torch.device("meta"): model = GPT(GPTConfig.from_depth(2, vocab_size=VOCAB, sequence_len=64))
    model.to_empty(device="cpu")
    model.init_weights()
    return model


def make_batch():
    tokens = torch.randint(0, VOCAB, (4, 65), generator=torch.Generator().manual_seed(1))
    return tokens[:, :-1], tokens[:, 1:]


def train(model, opts, x, y):
    for _ in range(STEPS):
        model(x, y).backward()
        for opt in opts: opt.step()
        model.zero_grad(set_to_none=True)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def edge_params():
    """Shapes for the edge cases: a Muon block that needs padding (3 matrices over 2 ranks), a rank that owns nothing
    (1 matrix over 2 ranks), and an AdamW parameter whose dim 0 (7) does not divide by 2 (the all-reduce fallback)."""
    torch.manual_seed(0)
    muon = [torch.nn.Parameter(torch.randn(*s)) for s in [(16, 8), (16, 8), (16, 8), (8, 24)]]
    adam = [torch.nn.Parameter(torch.randn(*s)) for s in [(6, 5), (7, 5)]]
    return muon, adam


def edge_grads(params, step, rank):
    g = torch.Generator().manual_seed(1000 * step + rank)
    return [torch.randn(p.shape, generator=g) for p in params]


def step_edge(muon_opt, adam_opt, muon_ps, adam_ps, grads_for):
    for step in range(STEPS):
        for p, g in zip(muon_ps + adam_ps, grads_for(step)): p.grad = g
        muon_opt.step(); adam_opt.step()
    return [p.detach().clone() for p in muon_ps + adam_ps]


def worker(rank, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/store", rank=rank, world_size=WORLD)
    try:
        model = make_model()
        adamw, muon = setup_optimizers(model)
        x, y = make_batch()
        half = slice(rank * 2, rank * 2 + 2)
        weights = train(model, [adamw, muon], x[half], y[half])
        names = {p: n for n, p in model.named_parameters()}
        muon_ps, adam_ps = edge_params()
        edge_muon, edge_adam = DistMuon(muon_ps), DistAdamW(adam_ps, **ADAM_KW)
        edge = step_edge(edge_muon, edge_adam, muon_ps, adam_ps, lambda step: edge_grads(muon_ps + adam_ps, step, rank))
        torch.save(dict(
            types=(type(adamw).__name__, type(muon).__name__), weights=weights,
            muon_state=sorted(names[p] for p in muon.state),
            adam_state={names[p]: tuple(s["exp_avg"].shape) for p, s in adamw.state.items()},
            edge=edge, edge_muon_state=[i for i, p in enumerate(muon_ps) if p in edge_muon.state],
            edge_adam_state=[tuple(edge_adam.state[p]["exp_avg"].shape) for p in adam_ps],
        ), f"{out_dir}/rank{rank}.pt")
        dist.barrier()  # don't tear gloo down while the peer still talks to it
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("optim_dist")
    mp.spawn(worker, args=(str(out_dir),), nprocs=WORLD, join=True)
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(WORLD)]


def single_process(x, y):
    model = make_model()
    opts = setup_optimizers(model)
    assert [type(o) for o in opts] == [torch.optim.AdamW, Muon]
    return train(model, opts, x, y)


def rel_gaps(a, b, init):
    "Per tensor: |a - b| / |b - init| (Frobenius), the gap as a fraction of the total update."
    return {k: ((a[k] - b[k]).norm() / (b[k] - init[k]).norm()).item() for k in b}


def test_sharded_optimizers_chosen(ranks):
    for r in ranks: assert r["types"] == ("DistAdamW", "DistMuon")


def test_ranks_hold_identical_weights(ranks):
    for k, v in ranks[0]["weights"].items(): assert torch.equal(v, ranks[1]["weights"][k]), k


def test_matches_single_process_on_averaged_gradient(ranks):
    x, y = make_batch()
    ref = single_process(x, y)
    init = {k: v.detach() for k, v in make_model().state_dict().items()}
    gaps = rel_gaps(ranks[0]["weights"], ref, init)
    assert max(gaps.values()) < REL_TOL, f"distributed and single-process weights differ: {gaps}"
    # control: stepping on one rank's half alone lands far away, so the averaging is what this test checks
    control = rel_gaps(single_process(x[:2], y[:2]), ref, init)
    assert min(control.values()) > 0.5, control


def test_muon_state_lives_on_owners_only(ranks):
    model = make_model()
    names = {p: n for n, p in model.named_parameters()}
    matrices = list(model.transformer.h.parameters())
    owners = muon_owners(matrices, WORLD)
    for rank, r in enumerate(ranks):
        mine = sorted(names[p] for p, o in zip(matrices, owners) if o == rank)
        assert mine and r["muon_state"] == mine
    assert sorted(ranks[0]["muon_state"] + ranks[1]["muon_state"]) == sorted(names[p] for p in matrices)


def test_adam_state_is_sharded_by_rows(ranks):
    for r in ranks:
        assert r["adam_state"] == {"transformer.wte.weight": (VOCAB // WORLD, 128), "lm_head.weight": (VOCAB // WORLD, 128)}


def test_edge_cases_padding_idle_owner_and_fallback(ranks):
    muon_ps, adam_ps = edge_params()
    ps = muon_ps + adam_ps
    mean_grads = lambda step: [sum(gs) / WORLD for gs in zip(*(edge_grads(ps, step, r) for r in range(WORLD)))]
    ref = step_edge(Muon(muon_ps), torch.optim.AdamW(adam_ps, **ADAM_KW), muon_ps, adam_ps, mean_grads)
    # well-conditioned random gradients averaged bit for bit the same way: only batching could differ, so a tight
    # tolerance (one step is ~1e-2 per entry; a wrong owner or a missing average would be off by that much)
    for r in ranks:
        for a, b in zip(r["edge"], ref): torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    # (16, 8) x3 in blocks of 2: rank 0 owns #0 #1, rank 1 owns #2; the lone (8, 24) belongs to rank 0
    assert [r["edge_muon_state"] for r in ranks] == [[0, 1, 3], [2]]
    # (6, 5) is split 3 rows per rank; (7, 5) falls back to a full replicated state
    for r in ranks: assert r["edge_adam_state"] == [(3, 5), (7, 5)]
