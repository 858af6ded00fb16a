"""Fault injection and multi-process checks for nanochat.checkpoint_manager (lesson 06): a saving process killed with
SIGKILL at random moments, corrupted and missing files, and a 2-rank gloo run where every rank saves and gets back its
own optimizer, RNG and data state."""
import json, os, random, signal, subprocess, sys, time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nanochat.checkpoint_manager import (build_model, capture_rng_state, find_last_step, load_checkpoint,
                                         restore_rng_state, save_checkpoint)
from nanochat.gpt import GPT, GPTConfig

REPO = Path(__file__).resolve().parents[1]

# The child saves a checkpoint per step, forever: 8 weight matrices (8 MB) and two moments each (16 MB), so a save
# takes a noticeable time and a kill lands inside one most of the time. Every tensor of one save holds the same value
# (generation * 10000 + step), so a step assembled from files of two different saves is detectable. It keeps the last
# two checkpoints. A restart resumes after the last complete step, or saves that step again when an older complete
# one exists (a re-save un-commits the step while rewriting it, so the older one is what stays loadable meanwhile).
CHILD = r"""
import sys, time, torch
from pathlib import Path
from nanochat.checkpoint_manager import save_checkpoint, find_last_step
ckpt_dir, gen = sys.argv[1], int(sys.argv[2])
shapes = [(256, 1024)] * 8
try: step = find_last_step(ckpt_dir) + (len(list(Path(ckpt_dir).glob("meta_*.json"))) < 2)
except FileNotFoundError: step = 0
print("ready", flush=True)
while True:
    t0, v = time.perf_counter(), float(gen * 10000 + step)
    model = {f"layer{i}.weight": torch.full(s, v) for i, s in enumerate(shapes)}
    optim = [{"state": {i: {"exp_avg": torch.full(s, v), "exp_avg_sq": torch.full(s, v), "step": torch.tensor(v)}
                        for i, s in enumerate(shapes)},
              "param_groups": [{"lr": 0.02, "params": list(range(len(shapes)))}]}]
    save_checkpoint(ckpt_dir, step, model, optim, {"model_config": {}, "value": v},
                    extra_state={"value": torch.tensor(v), "data_pos": step}, keep=2)
    print("saved", step, time.perf_counter() - t0, flush=True)
    step += 1
"""


def _values(obj):
    "The values held by the tensors in a nested structure of dicts and lists (a sample of each: whole files are atomic)."
    if isinstance(obj, torch.Tensor): return set(obj.reshape(-1)[::1009].tolist() + obj.reshape(-1)[-1:].tolist())
    if isinstance(obj, dict): return set().union(*map(_values, obj.values())) if obj else set()
    if isinstance(obj, (list, tuple)): return set().union(*map(_values, obj)) if obj else set()
    return set()


def check_folder(ckpt_dir: Path) -> bool:
    """Every committed step (meta file present) is complete and consistent, the last one loads through the public API;
    returns whether the kill left debris of a save in flight (temp files, or files of a step without meta)."""
    names = {p.name for p in ckpt_dir.iterdir()}
    metas = sorted(n for n in names if n.startswith("meta_"))
    assert 1 <= len(metas) <= 3, metas  # keep=2, plus one just committed if the kill came before the pruning
    for name in metas:
        meta = json.loads((ckpt_dir / name).read_text())
        assert meta["files"] and all(f in names for f in meta["files"]), (name, meta["files"], sorted(names))
        for f in meta["files"]:  # all files of a committed step come from the same save
            assert _values(torch.load(ckpt_dir / f, weights_only=True)) == {meta["value"]}, (name, f)
    last = find_last_step(ckpt_dir)
    assert f"meta_{last:06d}.json" == metas[-1]
    model, optim, meta, extra = load_checkpoint(ckpt_dir, load_optimizer=True)
    assert meta["step"] == last and extra["data_pos"] == last
    assert _values(model) == _values(optim) == _values(extra) == {meta["value"]}
    listed = {f for name in metas for f in json.loads((ckpt_dir / name).read_text())["files"]} | set(metas)
    return any(n.endswith(".tmp") for n in names) or bool(names - listed)


def test_sigkill_during_saves_leaves_a_loadable_checkpoint(tmp_path):
    rng, ckpt = random.Random(0), tmp_path / "d2"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    steps, mid_save, save_time = [], 0, None
    for gen in range(1, 8):
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(ckpt), str(gen)], env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            assert child.stdout.readline().strip() == b"ready", child.stderr.read().decode()[-2000:]
            if save_time is None:  # the first generation: wait for a commit, and time a save
                line = child.stdout.readline().split()
                assert line[:1] == [b"saved"], child.stderr.read().decode()[-2000:]
                save_time = float(line[2])
            # even generations die early, mostly during the re-save of the last step; odd ones after a few saves
            time.sleep(rng.uniform(0.2, 1.2) * save_time if gen % 2 == 0 else rng.uniform(2, 5) * save_time)
            assert child.poll() is None, child.stderr.read().decode()[-2000:]
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait()
        mid_save += check_folder(ckpt)
        steps.append(find_last_step(ckpt))
    # every restart picked up where the last left off (one step back at most: a kill during a re-save of the last step)
    assert all(b >= a - 1 for a, b in zip(steps, steps[1:])) and steps[-1] > steps[0], steps
    assert mid_save >= 1  # the kills did land inside saves (else this test checked nothing)
    # the next successful save clears the debris of the interrupted ones
    step = steps[-1] + 1
    v = float(99 * 10000 + step)
    save_checkpoint(ckpt, step, {"w": torch.full((4,), v)}, [{"m": torch.full((4,), v)}], {"model_config": {}, "value": v},
                    extra_state={"value": torch.tensor(v), "data_pos": step}, keep=2)
    assert not check_folder(ckpt)
    assert not any(n.name.startswith(".") for n in ckpt.iterdir())


def tiny_model():
    # built on the CPU directly: the meta-device route (used by build_model) costs an import of torch._dynamo, seconds
    # that every spawned process would pay again
    model = GPT(GPTConfig.from_depth(1, vocab_size=64, sequence_len=8))
    model.init_weights()
    return model


def tiny_checkpoint(ckpt_dir, step=5):
    "A depth-1 model, one AdamW step, saved with optimizer and extra state; returns (model, optimizer)."
    model = tiny_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.zeros(1, 8, dtype=torch.long), torch.zeros(1, 8, dtype=torch.long)).backward()
    opt.step()
    save_checkpoint(ckpt_dir, step, model.state_dict(), [opt.state_dict()], {"model_config": model.config},
                    extra_state={"data_pos": 1})
    return model, opt


@pytest.mark.parametrize("kind", ["model", "optim", "state"])
def test_corrupted_file_error_names_the_path(tmp_path, kind):
    tiny_checkpoint(tmp_path)
    path = next(tmp_path.glob(f"{kind}_000005*.pt"))
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 3])
    with pytest.raises(RuntimeError, match="corrupted") as e:  # the checksum sees it first (truncated: "corrupted or truncated")
        load_checkpoint(tmp_path, load_optimizer=True)
    assert str(path) in str(e.value)
    if kind == "model":
        with pytest.raises(RuntimeError, match="corrupted"): build_model(tmp_path, 5, "cpu", "eval")


def test_missing_optimizer_shard(tmp_path):
    model, opt = tiny_checkpoint(tmp_path / "a")
    # a rank that did not save: e.g. resuming on 2 processes a checkpoint saved by 1
    with pytest.raises(RuntimeError, match=r"saved by 1 rank\(s\) but this run has 2.*nproc_per_node=1"):
        load_checkpoint(tmp_path / "a", load_optimizer=True, rank=1, world_size=2)
    # the shard deleted from disk: the step no longer counts, and the error says what is missing
    (tmp_path / "a" / "optim_000005_rank0.pt").unlink()
    with pytest.raises(FileNotFoundError, match="step 5 lacks optim_000005_rank0.pt"):
        load_checkpoint(tmp_path / "a", load_optimizer=True)
    with pytest.raises(FileNotFoundError, match=r"step 5 .* is incomplete: it lacks optim_000005_rank0.pt; complete steps: \[\]"):
        load_checkpoint(tmp_path / "a", step=5)
    # saved without optimizer state at all
    save_checkpoint(tmp_path / "b", 1, model.state_dict(), None, {"model_config": model.config})
    with pytest.raises(FileNotFoundError, match="saved without optimizer state"):
        load_checkpoint(tmp_path / "b", load_optimizer=True)
    assert load_checkpoint(tmp_path / "b")[1] is None


def _rank_main(rank, world_size, ckpt_dir, init_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        torch.manual_seed(0)  # the same model on both ranks
        model = tiny_model()
        config = model.config
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        torch.manual_seed(100 + rank)  # each rank its own data, hence its own moments and RNG state (as with sharding)
        for step in (1, 2, 3):
            x = torch.randint(0, 64, (2, 9))
            model(x[:, :-1], x[:, 1:]).backward()
            opt.step(); opt.zero_grad()
            extra = {"rank": rank, "data_pos": 10 * step + rank, "rng": capture_rng_state()}
            save_checkpoint(ckpt_dir, step, model.state_dict(), [opt.state_dict()], {"model_config": config},
                            rank=rank, world_size=world_size, extra_state=extra, keep=2)
        expected_next = torch.rand(3)  # what this rank's RNG draws after step 3
        model_state, optim_states, meta, extra = load_checkpoint(ckpt_dir, load_optimizer=True, rank=rank)
        assert meta["step"] == 3 and meta["world_size"] == world_size
        assert extra["rank"] == rank and extra["data_pos"] == 30 + rank
        mine = opt.state_dict()
        for i, s in mine["state"].items():
            for k in ("exp_avg", "exp_avg_sq", "step"): assert torch.equal(optim_states[0]["state"][i][k], s[k])
        restore_rng_state(extra["rng"])
        assert torch.equal(torch.rand(3), expected_next)
        # the ranks really hold different state: rank 1 sees a different first moment from rank 0's
        other = load_checkpoint(ckpt_dir, load_optimizer=True, rank=1 - rank)[1]
        assert not torch.equal(other[0]["state"][0]["exp_avg"], mine["state"][0]["exp_avg"])
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_two_ranks_each_get_their_own_state_back(tmp_path):
    ckpt = tmp_path / "ckpt"
    mp.spawn(_rank_main, args=(2, str(ckpt), str(tmp_path / "pg_init")), nprocs=2, join=True)
    names = {p.name for p in ckpt.iterdir()}  # keep=2: step 1 is gone
    assert names == {f"{kind}_{step:06d}{suffix}" for step in (2, 3) for kind, suffix in
                     [("meta", ".json"), ("model", ".pt"), ("optim", "_rank0.pt"), ("optim", "_rank1.pt"),
                      ("state", "_rank0.pt"), ("state", "_rank1.pt")]}, sorted(names)
    meta = json.loads((ckpt / "meta_000003.json").read_text())
    assert meta["world_size"] == 2 and len(meta["files"]) == 5
    # resuming this checkpoint on one process is refused with what to do
    with pytest.raises(RuntimeError, match="saved by 2 rank"):
        load_checkpoint(ckpt, load_optimizer=True)
    # while the weights alone load anywhere
    model, meta = build_model(ckpt, None, "cpu", "eval")
    assert meta["step"] == 3
