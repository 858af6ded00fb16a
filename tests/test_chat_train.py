"""Chat training (lessons 14-16): SFT loss masking checked token by token, the RL advantage and loss against a hand
computation, RL steps with and without reward signal, and exact resume of mid_train, chat_sft and chat_rl after a real
SIGKILL.

Data comes from $HF_ENDPOINT, or from a loopback server over ../shared/hf-mirror started here; everything is written
under temporary NANOCHAT_BASE_DIRs. The model is a depth-2 GPT with random weights (the stages don't care what it knows)
and a 512-token tokenizer, saved as the base, mid and sft checkpoints every stage starts from.
"""
import os, sys, signal, shutil, subprocess, dataclasses
from pathlib import Path
from unittest import mock
import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]


# `endpoint` (HF_ENDPOINT or the loopback mirror) comes from conftest.py


def _random_model(seq_len=64, vocab=512):
    "A depth-2 GPT whose zero-initialised projections are randomised too, so that it has opinions."
    from nanochat.gpt import GPT, GPTConfig
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_depth(2, vocab_size=vocab, sequence_len=seq_len))
    model.init_weights()
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.c_proj.weight.normal_(0, 0.02); block.mlp.c_proj.weight.normal_(0, 0.02)
        model.lm_head.weight.normal_(0, 0.02)
    return model


@pytest.fixture(scope="module")
def prepared(endpoint, tmp_path_factory):
    "A base dir with a 512-token tokenizer, the task data, and one random depth-2 model saved as base, mid and sft d2."
    base = tmp_path_factory.mktemp("prepared")
    env = dict(os.environ, HF_ENDPOINT=endpoint, NANOCHAT_BASE_DIR=str(base), NANOCHAT_NUM_SHARDS="4",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")  # one thread: the same kernels in every run, and no oversubscription
    with mock.patch.dict(os.environ, env):
        from nanochat.dataset import download_shards, iter_texts
        from nanochat.tokenizer import Tokenizer
        from nanochat.checkpoint_manager import save_checkpoint, checkpoint_dir
        from nanochat.mid_train import mid_mixture
        from nanochat.chat_sft import sft_mixture
        from nanochat.tasks import GSM8K
        download_shards(1)
        Tokenizer.train_from_iterator(iter_texts("train", max_chars=300_000), vocab_size=512).save(base / "tokenizer")
        mid_mixture("train"), mid_mixture("val"), sft_mixture("train"), sft_mixture("val"), GSM8K("main", "test")  # download once
        model = _random_model()
        for source in ("base", "mid", "sft"):
            save_checkpoint(checkpoint_dir(source, "d2"), 1, model.state_dict(), None,
                            dict(model_config=dataclasses.asdict(model.config),
                                 derived=dict(max_seq_len=64, device_batch_size=2, total_batch_size=256)))
    return env


def fresh(prepared, tmp_path, name):
    "A copy of the prepared base dir (each run writes its own checkpoints) and its environment."
    d = tmp_path / name
    shutil.copytree(prepared["NANOCHAT_BASE_DIR"], d)
    return dict(prepared, NANOCHAT_BASE_DIR=str(d))


# ---- SFT: the loss sees only what the assistant writes

def test_sft_targets_exact(prepared):
    from nanochat.tokenizer import get_tokenizer
    from nanochat.chat_sft import sft_batch
    with mock.patch.dict(os.environ, prepared): tok = get_tokenizer()
    S, enc = tok.encode_special, tok.encode
    conv = {"messages": [
        {"role": "user", "content": "What is 3 times 4?"},
        {"role": "assistant", "content": [{"type": "text", "text": "Let me compute "}, {"type": "python", "text": "3*4"},
                                          {"type": "python_output", "text": "12"}, {"type": "text", "text": "#### 12"}]}]}
    short = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}
    x, y = sft_batch([conv, short], tok, max_seq_len=100)
    user = [S("<|user_start|>")] + enc("What is 3 times 4?") + [S("<|user_end|>"), S("<|assistant_start|>")]
    call = [S("<|python_start|>")] + enc("3*4") + [S("<|python_end|>")]
    output = [S("<|output_start|>")] + enc("12") + [S("<|output_end|>")]
    ids = [tok.get_bos_token_id()] + user + enc("Let me compute ") + call + output + enc("#### 12") + [S("<|assistant_end|>")]
    # a target is the next token, or -1 where that token is BOS/user/<|assistant_start|> or the calculator's output
    want = [-1] * len(user) + enc("Let me compute ") + call + [-1] * len(output) + enc("#### 12") + [S("<|assistant_end|>")]
    assert x.shape == y.shape == (2, len(ids) - 1)
    assert x[0].tolist() == ids[:-1] and y[0].tolist() == want
    short_ids = [tok.get_bos_token_id(), S("<|user_start|>")] + enc("Hi") + [S("<|user_end|>"), S("<|assistant_start|>")] + \
                enc("Hello!") + [S("<|assistant_end|>")]
    n = len(short_ids) - 1
    assert x[1, :n].tolist() == short_ids[:-1]
    assert y[1].tolist() == [-1] * (3 + len(enc("Hi"))) + enc("Hello!") + [S("<|assistant_end|>")] + [-1] * (len(ids) - 1 - n)
    # and cropping keeps the rule: a 10-token limit leaves only user tokens, all ignored
    _, y_crop = sft_batch([conv], tok, max_seq_len=10)
    assert y_crop.shape == (1, 10) and (y_crop == -1).all()


def test_mid_targets_keep_every_token(prepared):
    "Midtraining trains on whole conversations: the targets are the next tokens everywhere, masked or not."
    from nanochat.tokenizer import get_tokenizer
    from nanochat.mid_train import conversation_loader, mid_mixture
    with mock.patch.dict(os.environ, prepared): tok, mix = get_tokenizer(), mid_mixture("train", max_examples=50)
    x, y, _ = next(conversation_loader(mix, tok, 4, 64))
    assert (y >= 0).all() and torch.equal(x[:, 1:], y[:, :-1]) and (x[:, 0] == tok.get_bos_token_id()).all()


# ---- RL: advantages and the policy-gradient loss, by hand

def test_rl_advantage_and_loss_by_hand():
    from nanochat.chat_rl import rl_batch, policy_gradient_loss
    model = _random_model(seq_len=16, vocab=32)
    prompt = [1, 2, 3]
    completions = [([4, 5, 6], [1, 0, 1]),  # token 5 was forced by the calculator
                   ([7], [1]), ([8, 9], [1, 1]), ([10, 11, 12, 13], [1, 1, 1, 1])]
    rewards = [1.0, 0.0, 0.0, 1.0]
    x, y, adv = rl_batch(prompt, completions, rewards, pad_id=0)
    assert adv.tolist() == [0.5, -0.5, -0.5, 0.5]
    assert y.tolist() == [[-1, -1, 4, -1, 6, -1], [-1, -1, 7, -1, -1, -1], [-1, -1, 8, 9, -1, -1], [-1, -1, 10, 11, 12, 13]]
    assert x.tolist()[1] == [1, 2, 3, 0, 0, 0]
    # by hand: log p of each sampled token, from the logits at the position before it
    logp = F.log_softmax(model(x).double(), dim=-1)
    sampled = {0: [(2, 4), (4, 6)], 1: [(2, 7)], 2: [(2, 8), (3, 9)], 3: [(2, 10), (3, 11), (4, 12), (5, 13)]}
    n_tokens = sum(map(len, sampled.values()))
    want = -sum(adv[i].item() * logp[i, t, tok].item() for i, pairs in sampled.items() for t, tok in pairs) / n_tokens
    got = policy_gradient_loss(model, x, y, adv, torch.tensor(n_tokens))
    assert abs(got.item() - want) < 1e-5, (got.item(), want)
    # token-level normalization: the loss of the step is the sum of its batches' losses, each divided by the step's count
    parts = sum(policy_gradient_loss(model, x[i:i + 2], y[i:i + 2], adv[i:i + 2], n_tokens) for i in (0, 2))
    assert abs(parts.item() - got.item()) < 1e-6


def test_rl_zero_and_empty_groups_give_zero_gradient():
    from nanochat.chat_rl import rl_batch, policy_gradient_loss
    model = _random_model(seq_len=16, vocab=32)
    for completions, rewards in [([([4, 5], [1, 1]), ([6], [1])], [0.0, 0.0]),    # all wrong: zero advantage
                                 ([([4, 5], [1, 1]), ([6], [1])], [1.0, 1.0]),    # all right: zero advantage too
                                 ([([4, 5], [0, 0]), ([6], [0])], [1.0, 0.0])]:   # "empty": no sampled token at all
        x, y, adv = rl_batch([1, 2, 3], completions, rewards, pad_id=0)
        model.zero_grad(set_to_none=True)
        loss = policy_gradient_loss(model, x, y, adv, (y >= 0).sum().clamp(min=1))
        loss.backward()
        assert loss.item() == 0.0 and torch.isfinite(loss)
        assert all(p.grad is None or (p.grad == 0).all() for p in model.parameters())


def _final_weights(base_dir, source):
    from nanochat.checkpoint_manager import load_checkpoint, checkpoint_dir
    with mock.patch.dict(os.environ, NANOCHAT_BASE_DIR=str(base_dir)):
        state, _, meta, _ = load_checkpoint(checkpoint_dir(source, "d2"))
    return state, meta


def test_rl_step_changes_weights_only_with_signal(prepared, tmp_path):
    "One real chat_rl step: a reward with signal moves the weights; an all-zero reward leaves them exactly (no NaN)."
    from nanochat import chat_rl
    from nanochat.tasks import GSM8K
    start, _ = _final_weights(prepared["NANOCHAT_BASE_DIR"], "sft")
    args = dict(num_iterations=1, examples_per_step=2, num_samples=4, device_batch_size=4, max_new_tokens=12,
                eval_every=0, device_type="cpu")
    moved = {}
    for name, reward in [("signal", lambda self, conv, text: len(text) % 2 == 0), ("zero", lambda self, conv, text: False)]:
        env = fresh(prepared, tmp_path, name)
        with mock.patch.dict(os.environ, env), mock.patch.object(GSM8K, "evaluate", reward):
            summary = chat_rl.main(**args)
        state, meta = _final_weights(env["NANOCHAT_BASE_DIR"], "rl")
        assert all(torch.isfinite(v).all() for v in state.values())
        moved[name] = max((state[k] - start[k]).abs().max().item() for k in start)
        if name == "zero": assert summary["reward"] == 0.0
        else: assert 0 < summary["reward"] < 1  # some of the 8 samples, not all: the groups had signal
    assert moved["signal"] > 1e-4 and moved["zero"] == 0.0, moved


# ---- exact resume after SIGKILL, for each stage

RL_REWARD = ("from nanochat.tasks import GSM8K; GSM8K.evaluate = lambda self, conv, text: len(text) % 2 == 0; ")
STAGES = {  # stage: (module, flags, a patch run before it: RL needs a reward a random model sometimes earns)
    "mid": ("nanochat.mid_train", ["--num-iterations=24", "--save-every=3", "--eval-every=8", "--eval-tokens=512",
                                   "--max-examples=400"], ""),
    "sft": ("nanochat.chat_sft", ["--num-iterations=24", "--save-every=3", "--device-batch-size=2",
                                  "--target-examples-per-step=4", "--max-seq-len=64", "--eval-every=8", "--eval-steps=1",
                                  "--eval-metrics-every=0"], ""),
    "rl": ("nanochat.chat_rl", ["--num-iterations=12", "--save-every=2", "--examples-per-step=2", "--num-samples=4",
                                "--device-batch-size=4", "--max-new-tokens=12", "--eval-every=0"], RL_REWARD),
}


def stage_cmd(stage, *extra):
    module, flags, patch = STAGES[stage]
    argv = [module, *flags, "--device-type=cpu", *extra]
    code = f"import sys, runpy; {patch}sys.argv = {argv!r}; runpy.run_module({module!r}, run_name='__main__')"
    return [sys.executable, "-c", code]


def run_stage(env, stage, *extra):
    r = subprocess.run(stage_cmd(stage, *extra), env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"{stage} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout


@pytest.mark.parametrize("stage", ["mid", "sft", "rl"])
def test_resume_after_sigkill_is_exact(prepared, tmp_path, stage):
    source = stage  # each stage writes checkpoints under its own source name
    straight, victim = fresh(prepared, tmp_path, "straight"), fresh(prepared, tmp_path, "victim")
    # the uninterrupted run and the victim run side by side (one thread each)
    ref = subprocess.Popen(stage_cmd(stage), env=straight, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    p = subprocess.Popen(stage_cmd(stage), env=victim, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, bufsize=1)
    seen = []
    try:  # killed wherever it is when the line arrives: the run goes on while we read
        for line in p.stdout:
            seen.append(line)
            if "saved checkpoint" in line and int(line.split()[1]) >= 4:
                p.send_signal(signal.SIGKILL)
                break
    finally:
        p.stdout.close(); p.wait(timeout=60)
    assert p.returncode == -signal.SIGKILL, f"the {stage} run was not killed mid-way (rc {p.returncode}):\n{''.join(seen[-20:])}"
    ref_out = ref.communicate(timeout=300)[0]
    assert ref.returncode == 0, f"{stage} failed ({ref.returncode}):\n{ref_out[-3000:]}"
    from nanochat.checkpoint_manager import find_last_step, checkpoint_dir
    with mock.patch.dict(os.environ, victim): killed_at = find_last_step(checkpoint_dir(source, "d2"))
    out = run_stage(victim, stage, "--resume")
    assert f"from step {killed_at}" in out
    (w1, m1), (w2, m2) = _final_weights(straight["NANOCHAT_BASE_DIR"], source), _final_weights(victim["NANOCHAT_BASE_DIR"], source)
    assert m1["step"] == m2["step"] > killed_at
    diff = max((w1[k] - w2[k]).abs().max().item() for k in w1)
    assert diff <= 1e-6, f"{stage}: weights differ by {diff} after resume"
    start, _ = _final_weights(prepared["NANOCHAT_BASE_DIR"], "sft")  # the random model every stage started from
    assert max((w1[k] - start[k]).abs().max().item() for k in w1) > 1e-4, "training didn't move the weights: proves nothing"
    h1, h2 = m1["history"], m2["history"]
    key = "reward" if stage == "rl" else "loss"
    assert h1["step"] == h2["step"] and h1[key] == h2[key], f"{stage}: the {key} log differs after resume"


# ---- one epoch under torchrun: the ranks' streams end at different times, and all ranks stop together

def test_mid_epoch_ends_together_on_two_ranks(prepared, tmp_path):
    env = fresh(prepared, tmp_path, "ddp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "nanochat.mid_train",
           "--max-examples=40", "--eval-every=-1", "--eval-tokens=256", "--device-type=cpu"]  # no step count: one epoch
    r = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=180)  # a rank left behind would hang
    assert r.returncode == 0, f"2-rank mid_train failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    _, meta = _final_weights(env["NANOCHAT_BASE_DIR"], "mid")
    assert meta["world_size"] == 2 and meta["loop"]["epoch_progress"] >= 1.0
    steps = meta["history"]["step"]
    assert steps == list(range(1, meta["step"] + 1)) and meta["step"] >= 3  # it trained several steps, then stopped at the epoch
    assert "(100.0%)" in r.stdout and f"step {meta['step']:05d} | saved checkpoint" in r.stdout
