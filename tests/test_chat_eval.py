"""nanochat.chat_eval (lesson 13) where a lesson can't show it well: rigged models that always know (or always miss)
the answer, right padding against one-at-a-time predictions, pass@k with a scripted engine, ChatCORE arithmetic, and
two gloo processes (torch.multiprocessing, and the real command under torchrun) against one.

Data comes from $HF_ENDPOINT, or from a loopback server over ../shared/hf-mirror started here; everything is written
under a temporary NANOCHAT_BASE_DIR. The tokenizer is byte-level (no training): every answer letter is one token."""
import os, sys, json, functools, subprocess, threading, http.server, dataclasses
from pathlib import Path
import pytest
import tiktoken
import torch
import torch.nn as nn
import torch.distributed as dist
import torch.multiprocessing as mp

from nanochat.gpt import GPT, GPTConfig
from nanochat.tasks import ARC, MMLU, GSM8K, Task
from nanochat.tokenizer import SPECIAL_TOKENS, SPLIT_PATTERN, Tokenizer
from nanochat.chat_eval import (BASELINES, TASKS, chatcore, letter_token_ids, predict_letters, problem_indices,
                                run_categorical_eval, run_generative_eval)

ROOT = Path(__file__).resolve().parents[1]
MIRROR = Path(__file__).resolve().parents[2] / "shared" / "hf-mirror"
N = 24  # problems per categorical check: a few ragged batches


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args): pass


@pytest.fixture(scope="module", autouse=True)
def env(tmp_path_factory):
    "HF_ENDPOINT from the session if set, else a loopback server over the mirror; a throw-away NANOCHAT_BASE_DIR."
    with pytest.MonkeyPatch.context() as mp_:
        mp_.setenv("NANOCHAT_BASE_DIR", str(tmp_path_factory.mktemp("base")))
        server = None
        if not os.environ.get("HF_ENDPOINT"):
            if not MIRROR.is_dir(): pytest.skip(f"no HF_ENDPOINT and no offline mirror at {MIRROR}")
            server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(MIRROR)))
            threading.Thread(target=server.serve_forever, daemon=True).start()
            mp_.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_port}")
        mp_.setenv("OMP_NUM_THREADS", "1")
        yield dict(os.environ)
        if server: server.shutdown(); server.server_close()


def byte_tokenizer():
    "256 byte tokens + the special tokens, no merges: decoding is exact and each character of ASCII is one token."
    ranks = {bytes([i]): i for i in range(256)}
    return Tokenizer(tiktoken.Encoding("bytes", pat_str=SPLIT_PATTERN, mergeable_ranks=ranks,
                                       special_tokens={s: 256 + i for i, s in enumerate(SPECIAL_TOKENS)}))


@pytest.fixture(scope="module")
def tok(): return byte_tokenizer()


VOCAB = 256 + len(SPECIAL_TOKENS)

def tiny_gpt(seed=0, sequence_len=512):
    "A random depth-2 GPT with nonzero output projections (its predictions depend on the prompt)."
    torch.manual_seed(seed)
    model = GPT(GPTConfig(sequence_len=sequence_len, vocab_size=VOCAB, n_layer=2, n_head=2, n_kv_head=2, n_embd=64))
    model.init_weights()
    with torch.no_grad():
        for b in model.transformer.h: b.attn.c_proj.weight.normal_(0, 0.5); b.mlp.c_proj.weight.normal_(0, 0.5)
        model.lm_head.weight.normal_(0, 2.0)
    return model.eval()


class Rigged(nn.Module):
    """Random logits (a fixed random vector per token: cheap on long byte-level prompts) plus, at each prompt's true
    last position, a bonus for the letter `pick(conversation)`. Two traps:
    a non-letter token beats every letter at every position (so an unrestricted argmax never yields a letter), and the
    padding positions favour a different letter (so reading the padded end of a row gives another answer)."""
    def __init__(self, tok, convs, pick):
        super().__init__()
        torch.manual_seed(0)
        self.inner, self.bos, self.trap = nn.Embedding(VOCAB, VOCAB), tok.get_bos_token_id(), tok.encode("?")[0]
        self.want, self.decoy = {}, {}
        for c in convs:
            key, choice = tuple(tok.render_for_completion(c)), pick(c)
            self.want[key] = tok.encode(choice)[0]
            self.decoy[key] = tok.encode(next(l for l in reversed(c["letters"]) if l != choice))[0]
    @torch.no_grad()
    def forward(self, idx):
        logits = self.inner(idx)
        logits[:, :, self.trap] += 1000.0
        for r, row in enumerate(idx.tolist()):
            n = len(row)
            while row[n - 1] == self.bos: n -= 1  # right padding (a prompt ends with <|assistant_start|>, never BOS)
            key = tuple(row[:n])
            logits[r, n - 1, self.want[key]] += 100.0
            logits[r, n:, self.decoy[key]] += 200.0
        return logits


def answer(c): return c["messages"][-1]["content"]
def wrong(c): return next(l for l in c["letters"] if l != answer(c))


@pytest.fixture(scope="module")
def arc(): return ARC("ARC-Easy", "test")


@pytest.fixture(scope="module")
def mmlu(): return MMLU("all", "test")


# ---- categorical

@pytest.mark.parametrize("name", ["arc", "mmlu"])
def test_rigged_model_scores_one_and_zero(request, tok, name):
    task = request.getfixturevalue(name)
    convs = [task[i] for i in problem_indices(len(task), N)]
    lengths = {len(tok.render_for_completion(c)) for c in convs}
    assert len(lengths) > 10  # ragged batches: most rows are padded
    for pick, expected in ((answer, 1.0), (wrong, 0.0)):
        model = Rigged(tok, convs, pick)
        for bs in (1, 5, N):
            assert run_categorical_eval(task, tok, model, batch_size=bs, max_problems=N) == expected
    with torch.no_grad():  # the trap works: left unrestricted, the top token is never a letter
        top = Rigged(tok, convs[:1], answer)(torch.tensor([tok.render_for_completion(convs[0])]))[0, -1].argmax().item()
    assert tok.decode([top]) == "?"


def test_batched_equals_one_at_a_time(tok, arc, mmlu):
    model = tiny_gpt()
    convs = [arc[i] for i in range(12)] + [mmlu[i] for i in problem_indices(len(mmlu), 12)]
    lengths = [len(tok.render_for_completion(c)) for c in convs]
    assert len(set(lengths)) > 10 and max(lengths) > model.config.sequence_len  # ragged, and some prompts get cropped
    batched = predict_letters(model, tok, convs)
    single = [predict_letters(model, tok, [c])[0] for c in convs]
    assert batched == single
    assert all(p in c["letters"] for p, c in zip(batched, convs))
    assert len(set(batched)) > 1, "the model always picks the same letter: this check could not catch a padding bug"


def test_multi_token_letter_is_refused(tok, arc):
    class Words(Task):
        eval_type = "categorical"
        def num_examples(self): return 1
        def get_example(self, i):
            return {"messages": [{"role": "user", "content": "yes or no?"}, {"role": "assistant", "content": "yes"}],
                    "letters": ["yes", "no"]}
        def evaluate(self, c, completion): return completion == "yes"
    with pytest.raises(ValueError, match="must be one token"):
        run_categorical_eval(Words(), tok, tiny_gpt(), 4)
    assert letter_token_ids(tok, list("ABCD")) == [tok.encode(l)[0] for l in "ABCD"]
    with pytest.raises(ValueError, match="use run_generative_eval"):
        run_categorical_eval(GSM8K("main", "test"), tok, tiny_gpt(), 4)


# ---- generative

class ScriptedEngine:
    "Sample `lucky` of each problem gives the reference GSM8K answer, the others a wrong number; records its calls."
    def __init__(self, tok, task, indices, lucky=1, solved=None):
        self.tok, self.lucky, self.calls = tok, lucky, []
        self.answers = {tuple(tok.render_for_completion(task[i])): task[i]["messages"][-1]["content"][-1]["text"]
                        for i in indices if solved is None or i in solved}
    def generate_batch(self, tokens, num_samples=1, **kwargs):
        self.calls.append(dict(num_samples=num_samples, **kwargs))
        right = self.answers.get(tuple(tokens), "#### -1")
        out = [list(tokens) + self.tok.encode(right if k == self.lucky else "#### -1") for k in range(num_samples)]
        return out, [[0] * len(tokens) + [1] * (len(r) - len(tokens)) for r in out]


def test_pass_at_k(tok):
    gsm8k = GSM8K("main", "test")
    engine = ScriptedEngine(tok, gsm8k, problem_indices(len(gsm8k), 6))
    run = lambda k: run_generative_eval(gsm8k, tok, tiny_gpt(), engine, k, 32, 1.0, 50, max_problems=6)
    assert (run(3), run(1), run(2)) == (1.0, 0.0, 1.0)
    assert engine.calls[0] == dict(num_samples=3, max_tokens=32, temperature=1.0, top_k=50, seed=engine.calls[0]["seed"])
    assert len({c["seed"] for c in engine.calls[:6]}) == 6  # a different seed per problem


def test_only_generated_text_is_graded(tok):
    class Echo(Task):
        "Correct iff the completion is exactly 'ok': a grader that would fail on prompt + completion."
        eval_type = "generative"
        def num_examples(self): return 3
        def get_example(self, i): return {"messages": [{"role": "user", "content": f"say ok #{i}"}]}
        def evaluate(self, c, completion): return completion == "ok"
    class Says:
        def generate_batch(self, tokens, num_samples=1, **kw): return [list(tokens) + tok.encode("ok")] * num_samples, None
    assert run_generative_eval(Echo(), tok, tiny_gpt(), Says(), 1, 8, 0.0, None) == 1.0


# ---- ChatCORE

def test_chatcore_arithmetic():
    assert chatcore({"ARC-Easy": 0.25, "GSM8K": 0.5}) == pytest.approx(0.25)
    assert chatcore({"MMLU": 0.625}) == pytest.approx(0.5)
    assert chatcore({"MMLU": 0.0, "HumanEval": 0.0}) == pytest.approx(-1 / 6)  # below chance is negative
    assert chatcore(dict.fromkeys(BASELINES, 1.0)) == pytest.approx(1.0)
    ref = {"ARC-Easy": 0.3876, "ARC-Challenge": 0.2807, "MMLU": 0.3151, "GSM8K": 0.0455, "HumanEval": 0.0854}
    assert chatcore(ref) == pytest.approx(0.0884, abs=1e-4)
    assert set(BASELINES) == set(TASKS)
    with pytest.raises(ValueError, match="no chance baseline"): chatcore({"HellaSwag": 0.5})
    with pytest.raises(ValueError): chatcore({})


# ---- two gloo processes == one

M = 31  # odd: the ranks get 16 and 15 problems
SOLVED = set(range(0, 200, 3))  # the rigged model and the scripted engine are right on these problem indices only


def _setups(tok):
    arc, gsm8k = ARC("ARC-Easy", "test"), GSM8K("main", "test")
    idx = problem_indices(len(arc), M)
    rigged = Rigged(tok, [arc[i] for i in idx], answer)
    rigged.want.update({tuple(tok.render_for_completion(arc[i])): tok.encode(wrong(arc[i]))[0]
                        for i in idx if i not in SOLVED})
    gidx = problem_indices(len(gsm8k), M)
    engine = ScriptedEngine(tok, gsm8k, gidx, lucky=0, solved={i for k, i in enumerate(gidx) if k % 3 == 0})
    return arc, rigged, gsm8k, engine


def _scores(tok):
    "(the three scores, how many problems this process sampled)"
    arc, rigged, gsm8k, engine = _setups(tok)
    return (run_categorical_eval(arc, tok, rigged, 4, max_problems=M),
            run_categorical_eval(arc, tok, tiny_gpt(), 4, max_problems=M),
            run_generative_eval(gsm8k, tok, tiny_gpt(), engine, 2, 16, 0.0, None, max_problems=M)), len(engine.calls)


def _worker(rank, store, out):
    torch.set_num_threads(1)  # two processes on a small machine
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        torch.save(_scores(byte_tokenizer()), f"{out}{rank}")
        dist.barrier()  # don't tear gloo down while the peer still talks to it
    finally: dist.destroy_process_group()


def test_two_gloo_processes_equal_one(tok, tmp_path):
    one, calls = _scores(tok)
    assert calls == M
    idx = problem_indices(len(ARC("ARC-Easy", "test")), M)
    assert one[0] == pytest.approx(sum(i in SOLVED for i in idx) / M)
    assert one[2] == pytest.approx(len(range(0, M, 3)) / M)
    mp.spawn(_worker, args=(str(tmp_path / "store"), str(tmp_path / "scores")), nprocs=2, join=True)
    (s0, c0), (s1, c1) = (torch.load(tmp_path / f"scores{rank}") for rank in (0, 1))
    assert s0 == s1 == one  # every rank returns the accuracy over all problems
    assert (c0, c1) == (16, 15)  # and each sampled only its share


# ---- the real command under torchrun

def test_torchrun_cli_equals_one_process(tok, env):
    from nanochat.checkpoint_manager import save_checkpoint, checkpoint_dir
    from nanochat.common import get_base_dir
    from nanochat.chat_eval import main
    tok.save(get_base_dir() / "tokenizer")
    model = tiny_gpt()
    save_checkpoint(checkpoint_dir("sft", "d2"), 5, model.state_dict(), None, {"model_config": dataclasses.asdict(model.config)})
    args = dict(max_problems=5, max_new_tokens=8, device_type="cpu")
    one = main(**args, quiet=True)
    assert set(one["results"]) == set(TASKS) and one["chatcore"] == pytest.approx(chatcore(one["results"]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "nanochat.chat_eval",
           "-i", "sft", "-x", "5", "-m", "8", "--device-type", "cpu", "--quiet"]
    r = subprocess.run(cmd, env=dict(env, PYTHONPATH=str(ROOT)), cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"chat_eval under torchrun failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    assert "ChatCORE:" in r.stdout and r.stdout.count("ChatCORE:") == 1  # printed by rank 0 only
    two = json.loads((get_base_dir() / "chat_eval" / "sft_d2.json").read_text())
    assert two["settings"]["world_size"] == 2 and two["step"] == 5
    assert two["results"] == one["results"] and two["chatcore"] == pytest.approx(one["chatcore"])
    bad = subprocess.run([sys.executable, "-m", "nanochat.chat_eval", "-a", "ARC-Easy|HellaSwag"], env=dict(env, PYTHONPATH=str(ROOT)),
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "unknown task" in bad.stderr + bad.stdout
