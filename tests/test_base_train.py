"""base_train end to end on CPU, as subprocesses: exact resume after a real SIGKILL, torchrun with 2 gloo processes
against 1 process accumulating 2 micro-batches, bits-per-byte summed over ranks, and bad input.

Data comes from $HF_ENDPOINT, or from a loopback server over ../shared/hf-mirror started here; everything is written
under a temporary NANOCHAT_BASE_DIR. Models are depth 2 with a 512-token vocabulary, so every run takes seconds.
"""
import os, sys, signal, subprocess
from pathlib import Path
from unittest import mock
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--depth=2", "--max-seq-len=64", "--device-batch-size=2", "--device-type=cpu", "--sample-every=0", "--eval-tokens=512"]


# `endpoint` (HF_ENDPOINT or the loopback mirror) comes from conftest.py


@pytest.fixture(scope="module")
def env(endpoint, tmp_path_factory):
    "Environment for the runs: 3 train shards + the validation shard and a 512-token tokenizer in a fresh base dir."
    base = tmp_path_factory.mktemp("base")
    env = dict(os.environ, HF_ENDPOINT=endpoint, NANOCHAT_BASE_DIR=str(base), NANOCHAT_NUM_SHARDS="4",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")  # one thread: the same kernels in every run, and no oversubscription under torchrun
    with mock.patch.dict(os.environ, env):
        from nanochat.dataset import download_shards, iter_texts
        from nanochat.tokenizer import Tokenizer
        download_shards(3)
        Tokenizer.train_from_iterator(iter_texts("train", max_chars=300_000), vocab_size=512).save(base / "tokenizer")
    return env


def train_cmd(*args, ranks=1):
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"] if ranks > 1 else [sys.executable]
    return [*launch, "-m", "nanochat.base_train", *TINY, *args]


def run(env, *args, ranks=1):
    r = subprocess.run(train_cmd(*args, ranks=ranks), env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"base_train failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout


def final(env, tag, optim=False):
    from nanochat.checkpoint_manager import load_checkpoint
    model, opt, meta, _ = load_checkpoint(Path(env["NANOCHAT_BASE_DIR"]) / "base_checkpoints" / tag, load_optimizer=optim, world_size=1)
    return model, opt, meta


# ---- exact resume after SIGKILL

RESUME = ["--num-iterations=24", "--save-every=3", "--eval-every=8", "--total-batch-size=256"]  # 2 accumulation steps


@pytest.fixture(scope="module")
def resumed(env):
    "An uninterrupted run, and the same run killed with SIGKILL after a checkpoint at step >= 6 and resumed."
    run(env, *RESUME, "--model-tag=straight")
    # the victim keeps training while we read its log: it is killed wherever it is when the message arrives
    p = subprocess.Popen(train_cmd(*RESUME, "--model-tag=victim"), env=env, cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, bufsize=1)
    seen = []
    try:
        for line in p.stdout:
            seen.append(line)
            if "saved checkpoint" in line and int(line.split()[1]) >= 6:
                p.send_signal(signal.SIGKILL)
                break
    finally:
        p.stdout.close(); p.wait(timeout=60)
    assert p.returncode == -signal.SIGKILL, f"the run was not killed mid-way (rc {p.returncode}):\n{''.join(seen[-20:])}"
    from nanochat.checkpoint_manager import find_last_step
    killed_at = find_last_step(Path(env["NANOCHAT_BASE_DIR"]) / "base_checkpoints" / "victim")
    out = run(env, *RESUME, "--model-tag=victim", "--resume")
    return killed_at, out


def test_resume_after_sigkill_is_exact(env, resumed):
    killed_at, out = resumed
    assert 6 <= killed_at < 24 and f"from step {killed_at}" in out
    (w1, o1, m1), (w2, o2, m2) = final(env, "straight", optim=True), final(env, "victim", optim=True)
    for k in w1: assert torch.equal(w1[k], w2[k]), f"weights differ after resume: {k}"
    h1, h2 = m1["history"], m2["history"]
    assert h1["step"] == list(range(1, 25)) and h2["step"] == h1["step"]
    assert h2["loss"] == h1["loss"], "the loss log differs after resume"
    assert h2["val_step"] == h1["val_step"] == [0, 8, 16, 24] and h2["val_bpb"] == h1["val_bpb"]
    for s1, s2 in zip(o1, o2):  # optimizer states too (momentum buffers, Adam moments)
        for p, st in s1["state"].items():
            for k, v in st.items():
                if torch.is_tensor(v): assert torch.equal(v, s2["state"][p][k]), f"optimizer state {p}.{k} differs"


def test_resume_refuses_other_flags(env, resumed):
    from fastcore.script import CliError
    from nanochat.base_train import main
    with mock.patch.dict(os.environ, env), pytest.raises(CliError, match=r"--num-iterations=24 \(now 30\)"):
        main(depth=2, max_seq_len=64, device_batch_size=2, total_batch_size=256, num_iterations=30, save_every=3,
             eval_every=8, eval_tokens=512, sample_every=0, device_type="cpu", model_tag="straight", resume=True)


# ---- torchrun: 2 processes == 1 process with 2 accumulation steps

DDP = ["--num-iterations=6", "--eval-every=-1", "--total-batch-size=256"]
# Muon orthogonalizes in bf16, so each matrix update carries ~bf16-eps (4e-3) relative rounding, and which way a value
# rounds flips with fp32-level differences in the averaged gradient (ranks and accumulation sum in different orders).
# The output projections start at zero and are made only of such updates: measured ~5e-2 relative after 6-8 steps,
# against ~1.0 for the control below. The loss log is the tighter check (measured ~1e-4).
RTOL = 0.2


def rel_diff(a, b): return max(((a[k] - b[k]).norm() / b[k].norm()).item() for k in a)


def test_torchrun_matches_gradient_accumulation(env):
    run(env, *DDP, "--model-tag=ddp2", ranks=2)
    run(env, *DDP, "--model-tag=accum2")
    run(env, *DDP[:-1], "--total-batch-size=128", "--model-tag=half")  # control: stream 0 only (half the batch)
    (w2, _, m2), (w1, _, m1), (wh, _, mh) = final(env, "ddp2"), final(env, "accum2"), final(env, "half")
    assert m2["world_size"] == 2 and m2["derived"]["grad_accum_steps"] == 1 and m1["derived"]["grad_accum_steps"] == 2
    gap, control = rel_diff(w2, w1), rel_diff(wh, w1)
    assert gap < RTOL, f"2 ranks and 2 accumulation steps differ by {gap:.3g} (relative)"
    assert control > 2.5 * RTOL, f"training on half the batch moved the weights by only {control:.3g}: the check proves nothing"
    loss2, loss1, loss_h = (torch.tensor(m["history"]["loss"]) for m in (m2, m1, mh))
    torch.testing.assert_close(loss2, loss1, rtol=0, atol=2e-3)
    assert (loss_h - loss1).abs().max() > 1e-2  # the control's loss log is measurably different


# ---- evaluate_bpb sums over ranks

def _bpb_worker(rank, store, out):
    from nanochat.loss_eval import evaluate_bpb
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        model, (x, y), tb = _bpb_setup()
        mine = slice(0, 1) if rank == 0 else slice(1, 3)  # unequal shares: an average of per-rank ratios would be wrong
        torch.save(evaluate_bpb(model, iter([(x[mine], y[mine])]), 1, tb), f"{out}{rank}")
        dist.barrier()  # don't tear gloo down while the peer still talks to it
    finally:
        dist.destroy_process_group()


def _bpb_setup():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(16, 16))
    model.forward = lambda x, y, loss_reduction="mean": torch.nn.functional.cross_entropy(
        model[0](x).view(-1, 16), y.view(-1), ignore_index=-1, reduction=loss_reduction)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, 16, (3, 8), generator=g), torch.randint(0, 16, (3, 8), generator=g)
    y[0, :3] = -1
    tb = torch.randint(0, 4, (16,), generator=g)  # some tokens have 0 bytes (special)
    return model, (x, y), tb


def test_evaluate_bpb_sums_over_ranks(tmp_path):
    from nanochat.loss_eval import evaluate_bpb
    mp.spawn(_bpb_worker, args=(str(tmp_path / "store"), str(tmp_path / "bpb")), nprocs=2, join=True)
    got = [torch.load(tmp_path / f"bpb{r}") for r in range(2)]
    model, (x, y), tb = _bpb_setup()
    want = evaluate_bpb(model, iter([(x, y)]), 1, tb)
    assert got[0] == got[1] and abs(got[0] - want) < 1e-9, (got, want)
    assert abs(evaluate_bpb(model, iter([(x[:1], y[:1])]), 1, tb) - want) > 1e-3  # rank 0's share alone is different


# ---- bad input

def test_total_batch_not_divisible(env):
    from fastcore.script import CliError
    from nanochat.base_train import main
    with mock.patch.dict(os.environ, env), pytest.raises(CliError, match=r"--total-batch-size=1,000 tokens is not a multiple.*2 x 64 x 1 = 128"):
        main(depth=2, max_seq_len=64, device_batch_size=2, total_batch_size=1000, device_type="cpu")


def test_missing_tokenizer(env, tmp_path):
    bare = dict(env, NANOCHAT_BASE_DIR=str(tmp_path))
    r = subprocess.run(train_cmd("--num-iterations=2"), env=bare, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "python -m nanochat.tok_train" in r.stderr and "Traceback" not in r.stderr, r.stderr


# ---- a time budget as the horizon

def test_time_budget_fixes_a_horizon_that_num_iterations_repeats(env):
    "The budget buys a step count at the measured step time; the log names it, and --num-iterations N is the same run."
    out = run(env, "--time-budget=0.05", "--eval-every=-1", "--total-batch-size=128", "--model-tag=budget")
    line = next(l for l in out.splitlines() if l.startswith("time budget"))
    n = int(line.rsplit("--num-iterations ", 1)[1].rstrip(")"))
    assert n >= 15 and f"step {n:05d}/{n:05d} (100.0%)" in out, line
    run(env, f"--num-iterations={n}", "--eval-every=-1", "--total-batch-size=128", "--model-tag=fixed")
    (w1, _, m1), (w2, _, m2) = final(env, "budget"), final(env, "fixed")
    assert m1["step"] == m2["step"] == n and m1["history"]["loss"] == m2["history"]["loss"]
    assert m1["history"]["val_bpb"] == m2["history"]["val_bpb"] and all(torch.equal(w1[k], w2[k]) for k in w1)
    assert m1["loop"]["budget_horizon"] == n and m2["loop"]["budget_horizon"] is None  # saved: a resumed run keeps it


def test_time_budget_refuses_a_second_horizon(env):
    r = subprocess.run(train_cmd("--time-budget=1", "--num-iterations=5"), env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "--time-budget" in r.stderr and "Traceback" not in r.stderr


def test_time_budget_horizon_survives_a_resume(env):
    "A budgeted run resumed from an early checkpoint keeps the horizon it had fixed (it does not measure again)."
    out = run(env, "--time-budget=0.05", "--eval-every=-1", "--total-batch-size=128", "--save-every=20", "--model-tag=budget_resume")
    n = int(next(l for l in out.splitlines() if l.startswith("time budget")).rsplit("--num-iterations ", 1)[1].rstrip(")"))
    w_straight, _, _ = final(env, "budget_resume")
    ckpt = Path(env["NANOCHAT_BASE_DIR"]) / "base_checkpoints" / "budget_resume"
    for meta in ckpt.glob("meta_*.json"):  # un-commit every step after 20, as if the run had been killed there
        if int(meta.stem.split("_")[1]) > 20: meta.unlink()
    out = run(env, "--time-budget=0.05", "--eval-every=-1", "--total-batch-size=128", "--save-every=20", "--model-tag=budget_resume", "--resume")
    assert "from step 20" in out and "time budget" not in out and f"step {n:05d}/{n:05d}" in out
    w, _, m = final(env, "budget_resume")
    assert m["step"] == n and all(torch.equal(w[k], w_straight[k]) for k in w)
