"""CORE evaluation (lessons 09 and 09a): scores checked against a hand computation on a tiny model for every task
type, a rigged model that must get exactly the designed items right, 2 gloo ranks against 1 (evaluate_task and
evaluate_core), the eval bundle fetched once from a loopback server over ../shared/hf-mirror, and base_eval under
torchrun against a single process.

The hand computation is deliberately plain: one sequence at a time, no padding, log_softmax and indexing, with the
context/continuation split written down from the strings (the items are chosen so that the split is clean)."""
import os, sys, csv, json, random, zipfile, functools, threading, subprocess, http.server
from pathlib import Path
from unittest import mock
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from nanochat.gpt import GPT, GPTConfig
from nanochat.tokenizer import Tokenizer
from nanochat.dataset import DownloadError
from nanochat.core_eval import evaluate_example, evaluate_task, evaluate_core, get_eval_bundle, eval_bundle_url

ROOT = Path(__file__).resolve().parents[1]
MIRROR = Path(__file__).resolve().parents[2] / "shared" / "hf-mirror"
BUNDLE = "s3/karpathy-public/eval_bundle.zip"

# ---- a tiny tokenizer, tiny GPT, and hand-made items of each type

MC = [dict(query="Question: What color is the cow?", choices=["purple", "green", "blue"], gold=0),
      dict(query="Question: What color is the sky?", choices=["blue", "purple"], gold=0),
      dict(query="Question: What does the dog chase?", choices=["the cat", "purple", "a ball"], gold=0),
      dict(query="Question: What color is grass?", choices=["green", "purple"], gold=0),
      dict(query="Question: What does the cat say?", choices=["meow", "bark", "purple"], gold=2)]
SCHEMA = [dict(context_options=["The dog chased the cat", "The cat chased the dog"], continuation="sleeps.", gold=0),
          dict(context_options=["The cat chased the dog", "The dog chased the cat"], continuation="sleeps.", gold=0),
          dict(context_options=["The cow saw the dog", "The dog saw the cat"], continuation="sleeps.", gold=0),
          dict(context_options=["The cow saw the cat", "The cat saw the cow"], continuation="sleeps.", gold=1),
          dict(context_options=["The sky saw the cat", "The cow saw the dog"], continuation="sleeps.", gold=0)]
LM = [dict(context="The capital of France is", continuation="Paris"),
      dict(context="The capital of Italy is", continuation="Rome"),
      dict(context="The capital of France is", continuation="Paris."),
      dict(context="The capital of Spain is", continuation="Madrid."),
      dict(context="  The capital of Japan is ", continuation="Paris")]  # whitespace around the context is stripped
MC_META = dict(label="mc", task_type="multiple_choice", num_fewshot=0, continuation_delimiter="\nAnswer: ")
SCHEMA_META = dict(label="schema", task_type="schema", num_fewshot=0, continuation_delimiter=" ")
LM_META = dict(label="lm", task_type="language_modeling", num_fewshot=0, continuation_delimiter=" ")
TASKS = [(MC, MC_META), (SCHEMA, SCHEMA_META), (LM, LM_META)]
# what the rigged model must get right: the gold option is " purple" (MC), the context ending in " cat" (schema),
# and the continuation " Paris" / " Paris." (LM)
RIGGED_CORRECT = {"mc": [True, False, False, False, True], "schema": [True, False, False, False, True],
                  "lm": [True, False, True, False, True]}
CORPUS = [f"{m['query']}\nAnswer: {c}." for m in MC for c in m["choices"]] + \
         [f"{c} {s['continuation']}" for s in SCHEMA for c in s["context_options"]] + \
         [f"{l['context'].strip()} {l['continuation']} The capital of Italy is Rome. Madrid is in Spain." for l in LM]


def make_tokenizer():
    return Tokenizer.train_from_iterator(iter(CORPUS * 20), vocab_size=400)


def make_model(vocab_size, seq_len=64, seed=0):
    "A 1-layer GPT with large random weights, so that options differ in loss by O(1) and near-ties don't happen."
    torch.manual_seed(seed)
    with torch.device("meta"): model = GPT(GPTConfig(sequence_len=seq_len, vocab_size=vocab_size, n_layer=1, n_head=2, n_kv_head=2, n_embd=32))
    model.to_empty(device="cpu")
    model.init_weights()
    with torch.no_grad():
        for i, p in enumerate(model.parameters()): p.normal_(0, 0.5, generator=torch.Generator().manual_seed(1000 * seed + i))
    return model.eval()


class Rigged(torch.nn.Module):
    "After token a, token b gets a huge logit, for every bigram (a, b): the model 'knows' a few continuations."
    def __init__(self, model, bigrams, bonus=100.0):
        super().__init__()
        self.model, self.bigrams, self.bonus, self.config = model, bigrams, bonus, model.config

    def forward(self, idx):
        logits = self.model(idx).clone()
        for a, b in self.bigrams: logits[..., b] += self.bonus * (idx == a)
        return logits


def rig(model, tok):
    one = lambda s: (lambda ids: ids[0] if len(ids) == 1 else pytest.fail(f"{s!r} is not one token: {ids}"))(tok.encode(s))
    return Rigged(model, [(one(":"), one(" purple")), (one(" cat"), one(" sleeps")), (one(" sleeps"), one(".")),
                          (one(" is"), one(" Paris")), (one(" Paris"), one("."))])


@pytest.fixture(scope="module")
def tok(): return make_tokenizer()


@pytest.fixture(scope="module")
def model(tok): return make_model(tok.get_vocab_size())


# ---- the hand computation

def split_item(tok, item, meta, fewshot_prefix=""):
    "[(context ids, continuation ids)] per sequence, from the strings; asserts that the split is clean."
    bos, d = tok.get_bos_token_id(), meta["continuation_delimiter"]
    if meta["task_type"] == "multiple_choice":
        pairs = [(fewshot_prefix + item["query"] + d.rstrip(), d[len(d.rstrip()):] + c) for c in item["choices"]]
    elif meta["task_type"] == "schema":
        pairs = [(fewshot_prefix + c, d + item["continuation"]) for c in item["context_options"]]
    else:
        pairs = [(fewshot_prefix + item["context"].strip(), d + item["continuation"])]
    out = []
    for ctx, cont in pairs:
        c_ids, k_ids = [bos] + tok.encode(ctx), tok.encode(cont)
        assert c_ids + k_ids == [bos] + tok.encode(ctx + cont), f"the test item {ctx + cont!r} does not split cleanly"
        out.append((c_ids, k_ids))
    if meta["task_type"] == "multiple_choice": assert len({k[0] for _, k in out}) == len(out), "options must differ at once"
    if meta["task_type"] == "schema": assert len({c[-1] for c, _ in out}) == len(out), "contexts must differ at the end"
    return out


@torch.no_grad()
def by_hand(model, pairs, max_len=None):
    "Mean continuation loss and 'all argmax' per sequence, one sequence at a time; left-cropped to max_len."
    losses, hits = [], []
    for ctx, cont in pairs:
        ids = ctx + cont
        if max_len: ids = ids[-max_len:]
        logp = model(torch.tensor([ids]))[0].log_softmax(-1)
        first = len(ids) - len(cont)  # position of the first continuation token
        nll = [-logp[first - 1 + j, t].item() for j, t in enumerate(cont)]
        losses.append(sum(nll) / len(nll))
        hits.append(all(logp[first - 1 + j].argmax().item() == t for j, t in enumerate(cont)))
    return losses, hits


def expected(model, tok, data, meta, idx, **kw):
    losses, hits = by_hand(model, split_item(tok, data[idx], meta, **{k: v for k, v in kw.items() if k != "max_len"}), kw.get("max_len"))
    if meta["task_type"] == "language_modeling": return dict(correct=hits[0], pred=None, losses=losses)
    pred = min(range(len(losses)), key=losses.__getitem__)
    return dict(correct=pred == data[idx]["gold"], pred=pred, losses=losses)


def check_against_hand(m, tok, data, meta, **kw):
    got = [evaluate_example(i, m, tok, data, "cpu", meta) for i in range(len(data))]
    want = [expected(m, tok, data, meta, i, **kw) for i in range(len(data))]
    for i, (g, w) in enumerate(zip(got, want)):
        assert g["pred"] == w["pred"] and g["correct"] == w["correct"], (meta["label"], i, g, w)
        torch.testing.assert_close(torch.tensor(g["losses"]), torch.tensor(w["losses"]), rtol=1e-4, atol=1e-4)
        if meta["task_type"] != "language_modeling":  # a prediction decided by a hair would make this test flaky
            l = sorted(w["losses"])
            assert l[1] - l[0] > 1e-3, (meta["label"], i, w["losses"])
    acc, items = evaluate_task(m, tok, data, "cpu", meta, return_items=True)
    assert items == [w["correct"] for w in want]
    assert acc == sum(items) / len(items)
    return items


@pytest.mark.parametrize("data,meta", TASKS, ids=["mc", "schema", "lm"])
def test_random_model_matches_hand_computation(tok, model, data, meta):
    check_against_hand(model, tok, data, meta)


@pytest.mark.parametrize("data,meta", TASKS, ids=["mc", "schema", "lm"])
def test_rigged_model_gets_the_designed_items_right(tok, model, data, meta):
    "The same pattern on top of two different random models: the rig decides, not the base model's luck."
    for base in (model, make_model(tok.get_vocab_size(), seed=1)):
        assert check_against_hand(rig(base, tok), tok, data, meta) == RIGGED_CORRECT[meta["label"]]


def test_fewshot_prompt_matches_hand_rendering(tok, model):
    "One shot from the other items, drawn with random.Random(1234 + idx); never the item itself."
    meta = dict(MC_META, num_fewshot=1)
    for idx in range(len(MC)):
        others = [i for i in range(len(MC)) if i != idx]
        shot = MC[random.Random(1234 + idx).sample(others, 1)[0]]
        prefix = f"{shot['query']}{meta['continuation_delimiter']}{shot['choices'][shot['gold']]}\n\n"
        got = evaluate_example(idx, model, tok, MC, "cpu", meta)
        want = expected(model, tok, MC, meta, idx, fewshot_prefix=prefix)
        assert got["pred"] == want["pred"]
        torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(want["losses"]), rtol=1e-4, atol=1e-4)


def test_long_prompts_are_cropped_from_the_left(tok, model):
    "A model with a 12-token context sees the last 12 tokens; the continuation is kept whole."
    short = make_model(tok.get_vocab_size(), seq_len=12)
    data = [dict(context="The dog chased the cat. The cow saw the dog. The capital of France is", continuation="Paris."),
            dict(context="What color is the sky? What color is grass? The capital of Italy is", continuation="Rome")]
    assert all(len(tok.encode(d["context"])) > 12 for d in data)
    check_against_hand(short, tok, data, LM_META, max_len=12)
    rigged = rig(short, tok)
    assert check_against_hand(rigged, tok, data, LM_META, max_len=12) == [True, False]


def test_bad_task_meta_and_empty_task(tok, model):
    with pytest.raises(ValueError, match="task_type"): evaluate_task(model, tok, MC, "cpu", dict(MC_META, task_type="mcq"))
    with pytest.raises(ValueError, match="no examples"): evaluate_task(model, tok, [], "cpu", MC_META)


# ---- 2 gloo ranks against 1

def write_fake_bundle(base: Path):
    "A bundle with our three tasks (core.yaml, eval_meta_data.csv with baselines, jsonl files) in base/eval_bundle."
    b = base / "eval_bundle"
    (b / "eval_data" / "t").mkdir(parents=True)
    yml = "icl_tasks:\n"
    for data, meta in TASKS:
        (b / "eval_data" / "t" / f"{meta['label']}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in data))
        yml += (f"-\n  label: {meta['label']}\n  dataset_uri: t/{meta['label']}.jsonl\n  num_fewshot: [1]\n"
                f"  icl_task_type: {meta['task_type']}\n  continuation_delimiter: {json.dumps(meta['continuation_delimiter'])}\n")
    (b / "core.yaml").write_text(yml)
    (b / "eval_meta_data.csv").write_text('Eval Task,Random baseline,Description\nmc,40,"a, quoted"\nschema,50,x\nlm,0,y\n')


def _rank_worker(rank, work: str):
    work = Path(work)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{work}/store", rank=rank, world_size=2)
    try:
        tok = Tokenizer.from_directory(work / "tok")
        model = make_model(tok.get_vocab_size())
        rigged = rig(model, tok)
        out = {meta["label"]: [evaluate_task(m, tok, data, "cpu", dict(meta, num_fewshot=1), return_items=True) for m in (model, rigged)]
               for data, meta in TASKS}
        out["core"] = evaluate_core(rigged, tok, "cpu", verbose=False)
        (work / f"rank{rank}.json").write_text(json.dumps(out))
        dist.barrier()  # tearing gloo down while the peer still talks to it can abort the process
    finally:
        dist.destroy_process_group()


def test_two_ranks_match_one(tok, model, tmp_path, monkeypatch):
    tok.save(tmp_path / "tok")
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))
    write_fake_bundle(tmp_path / "base")
    mp.spawn(_rank_worker, args=(str(tmp_path),), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0] == ranks[1]  # every rank ends with the same (reduced) numbers
    rigged = rig(model, tok)
    for data, meta in TASKS:
        one = [list(evaluate_task(m, tok, data, "cpu", dict(meta, num_fewshot=1), return_items=True)) for m in (model, rigged)]
        assert ranks[0][meta["label"]] == one
    core = evaluate_core(rigged, tok, "cpu", verbose=False)
    assert ranks[0]["core"] == json.loads(json.dumps(core))
    # centered accuracy by hand from the fake csv's baselines (percent): (acc - b) / (1 - b)
    base = {"mc": 0.40, "schema": 0.50, "lm": 0.0}
    for k, acc in core["results"].items():
        assert core["centered_results"][k] == pytest.approx((acc - base[k]) / (1 - base[k]))
    assert core["core_metric"] == pytest.approx(sum(core["centered_results"].values()) / 3)


# ---- the bundle download

class CountingHandler(http.server.SimpleHTTPRequestHandler):
    "Serves the mirror, counts GETs per path, and serves /bogus.zip: a valid zip without core.yaml."
    def log_message(self, *args): pass

    def do_GET(self):
        with self.server.lock: self.server.counts[self.path] = self.server.counts.get(self.path, 0) + 1
        if self.path == "/bogus.zip":
            body = self.server.bogus
            self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
            self.wfile.write(body)
            return
        super().do_GET()


@pytest.fixture
def server(tmp_path):
    if not (MIRROR / BUNDLE).is_file(): pytest.skip(f"no offline mirror at {MIRROR}")
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(CountingHandler, directory=str(MIRROR)))
    srv.counts, srv.lock = {}, threading.Lock()
    zpath = tmp_path / "bogus.zip"
    with zipfile.ZipFile(zpath, "w") as z: z.writestr("eval_bundle/readme.txt", "no core.yaml here")
    srv.bogus = zpath.read_bytes()
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    srv.url = f"http://127.0.0.1:{srv.server_port}"
    yield srv
    srv.shutdown()


def test_bundle_downloaded_once_and_unpacked_atomically(server, tmp_path, monkeypatch):
    base = tmp_path / "base"
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base))
    monkeypatch.setenv("NANOCHAT_EVAL_BUNDLE_URL", f"{server.url}/{BUNDLE}")
    assert eval_bundle_url() == f"{server.url}/{BUNDLE}"
    results = []
    threads = [threading.Thread(target=lambda: results.append(get_eval_bundle())) for _ in range(3)]  # concurrent callers
    for t in threads: t.start()
    for t in threads: t.join()
    assert results == [base / "eval_bundle"] * 3
    assert server.counts == {f"/{BUNDLE}": 1}
    assert get_eval_bundle() == base / "eval_bundle" and server.counts == {f"/{BUNDLE}": 1}  # cached: no request
    with zipfile.ZipFile(MIRROR / BUNDLE) as z:
        want = {n.split("/", 1)[1] for n in z.namelist() if not n.endswith("/") and "/" in n}
    got = {str(p.relative_to(base / "eval_bundle")) for p in (base / "eval_bundle").rglob("*") if p.is_file()}
    assert got == want
    assert [p.name for p in base.iterdir() if not p.name.endswith(".lock")] == ["eval_bundle"]  # no zip, no temp folders left


def test_bundle_errors_name_the_variable(server, tmp_path, monkeypatch):
    base = tmp_path / "base"
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base))
    monkeypatch.setenv("NANOCHAT_EVAL_BUNDLE_URL", f"{server.url}/missing/eval_bundle.zip")
    with pytest.raises(DownloadError, match="NANOCHAT_EVAL_BUNDLE_URL"): get_eval_bundle()
    monkeypatch.setenv("NANOCHAT_EVAL_BUNDLE_URL", f"{server.url}/bogus.zip")
    with pytest.raises(ValueError, match="no core.yaml"): get_eval_bundle()
    assert not (base / "eval_bundle").exists()
    assert [p.name for p in base.iterdir() if not p.name.endswith(".lock")] == []  # nothing half-done left behind


# ---- base_eval: torchrun with 2 ranks writes the same CORE csv as 1 process

def test_base_eval_under_torchrun(server, tmp_path):
    base = tmp_path / "base"
    env = dict(os.environ, HF_ENDPOINT=server.url, NANOCHAT_EVAL_BUNDLE_URL=f"{server.url}/{BUNDLE}",
               NANOCHAT_BASE_DIR=str(base), NANOCHAT_NUM_SHARDS="4", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    with mock.patch.dict(os.environ, env):
        import dataclasses
        from nanochat.dataset import download_shards
        from nanochat.checkpoint_manager import checkpoint_dir, save_checkpoint
        download_shards(1)
        tok = make_tokenizer()
        tok.save(base / "tokenizer")
        m = make_model(tok.get_vocab_size())
        save_checkpoint(checkpoint_dir("base", "d1"), 5, m.state_dict(), None, dict(model_config=dataclasses.asdict(m.config)))
    flags = ["-m", "nanochat.base_eval", "-g", "d1", "--max-per-task", "3", "--device-type", "cpu", "--eval-tokens", "256",
             "--device-batch-size", "2"]
    csv_path = base / "base_eval" / "core_d1.csv"
    runs = {}
    for name, launch in [("one", [sys.executable]), ("two", [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"])]:
        evals = "core" if name == "one" else "bpb,core"
        r = subprocess.run([*launch, *flags, "--evals", evals], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, f"base_eval ({name}) failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
        runs[name] = (r.stdout, list(csv.reader(open(csv_path))))
    assert "val bpb" in runs["two"][0] and "on 2 x cpu" in runs["two"][0]
    assert runs["one"][0].count("CORE metric") == 1 and runs["two"][0].count("CORE metric") == 1  # rank 0 prints
    assert runs["one"][1] == runs["two"][1]
    rows = runs["one"][1]
    assert rows[0] == ["model_tag", "step", "task", "accuracy", "centered"] and rows[-1][:3] == ["d1", "5", "CORE"]
    assert len(rows) == 2 + 18
