"""nanochat.tasks (lesson 10) on the real files of the offline mirror: schemas and row counts, rendering and loss
masks of every task, GSM8K's calculator calls, all HumanEval reference solutions in the sandbox, mixtures, slicing,
the synthetic tasks, and lazy, once-only downloads."""
import ast, os, re, subprocess, sys, threading, time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import tiktoken
from hypothesis import given, settings, strategies as st

from nanochat.dataset import DownloadError, hf_download
from nanochat.execution import use_calculator
from nanochat.tokenizer import SPECIAL_TOKENS, SPLIT_PATTERN, Tokenizer
from nanochat.tasks import (ARC, GSM8K, LETTERS, MMLU, HumanEval, Identity, SimpleSpelling, SmolTalk, SpellingBee, Task,
                            TaskMixture, TaskSequence, extract_answer, extract_code, humaneval_program, render_mc, words_for)

REPO = Path(__file__).resolve().parents[1]
MIRROR = Path(__file__).resolve().parents[2] / "shared" / "hf-mirror"


class MirrorServer:
    "Serves `root` on 127.0.0.1 (quietly) and counts GET requests per path."
    def __init__(self, root):
        self.gets, srv = {}, self
        class Handler(SimpleHTTPRequestHandler):
            def log_message(self, *args): pass
            def do_GET(self):
                srv.gets[self.path.lstrip("/")] = srv.gets.get(self.path.lstrip("/"), 0) + 1
                super().do_GET()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(root)))
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
    def close(self): self.httpd.shutdown(); self.httpd.server_close()


@pytest.fixture(scope="module", autouse=True)
def endpoint(tmp_path_factory):
    "HF_ENDPOINT from the session if set, else a loopback server over the mirror; a throw-away NANOCHAT_BASE_DIR."
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NANOCHAT_BASE_DIR", str(tmp_path_factory.mktemp("base")))
        srv = None
        if not os.environ.get("HF_ENDPOINT"):
            if not MIRROR.is_dir(): pytest.skip(f"no HF_ENDPOINT and no offline mirror at {MIRROR}")
            srv = MirrorServer(MIRROR)
            mp.setenv("HF_ENDPOINT", srv.url)
        yield os.environ["HF_ENDPOINT"]
        if srv: srv.close()


@pytest.fixture(scope="module")
def tok():
    "A byte-level tokenizer (no merges) with nanochat's special tokens: decoding is exact, no training needed."
    ranks = {bytes([i]): i for i in range(256)}
    return Tokenizer(tiktoken.Encoding("bytes", pat_str=SPLIT_PATTERN, mergeable_ranks=ranks,
                                       special_tokens={s: 256 + i for i, s in enumerate(SPECIAL_TOKENS)}))


# ---------------------------------------------------------------- the mirror's files: schemas and row counts

def readme_rows() -> dict:
    "{path: rows} from the mirror README's table."
    text = (MIRROR / "README.md").read_text()
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^\| `(datasets/[^`]+\.parquet)` \| (\d+) \|", text, re.M)}

SCHEMAS = {  # file (under datasets/) -> {column: arrow type}
    "HuggingFaceTB/smol-smoltalk/resolve/main/data/{}-00000-of-00001.parquet":
        {"messages": "list<element: struct<content: string, role: string>>"},
    "cais/mmlu/resolve/main/all/{}-00000-of-00001.parquet":
        {"question": "string", "subject": "string", "choices": "list<element: string>", "answer": "int64"},
    "allenai/ai2_arc/resolve/main/{}-00000-of-00001.parquet":
        {"id": "string", "question": "string", "choices": "struct<text: list<element: string>, label: list<element: string>>",
         "answerKey": "string"},
    "openai/gsm8k/resolve/main/main/{}-00000-of-00001.parquet": {"question": "string", "answer": "string"},
    "openai/openai_humaneval/resolve/main/openai_humaneval/{}-00000-of-00001.parquet":
        {"task_id": "string", "prompt": "string", "canonical_solution": "string", "test": "string", "entry_point": "string"},
}
TASKS = [  # (task factory, split name in the file path, schema key)
    (lambda: SmolTalk("train"), "train", 0), (lambda: SmolTalk("test"), "test", 0),
    *[(partial(MMLU, "all", s), s, 1) for s in ("test", "validation", "dev", "auxiliary_train")],
    *[(partial(ARC, sub, s), f"{sub}/{s}", 2) for sub in ("ARC-Easy", "ARC-Challenge") for s in ("train", "validation", "test")],
    (partial(GSM8K, "main", "train"), "train", 3), (partial(GSM8K, "main", "test"), "test", 3),
    (HumanEval, "test", 4),
]

@pytest.mark.parametrize("make,split,schema", TASKS, ids=[f"{list(SCHEMAS)[k].split('/')[1]}-{s}" for _, s, k in TASKS])
def test_schema_and_rows(make, split, schema):
    path, columns = list(SCHEMAS.items())[schema]
    path = "datasets/" + path.format(split)
    table = pq.read_table(hf_download(path))
    assert {f.name: str(f.type) for f in table.schema} == columns, f"{path}: unexpected columns"
    task = make()
    assert len(task) == table.num_rows
    if MIRROR.is_dir(): assert table.num_rows == readme_rows()[path], f"{path}: row count differs from the mirror README"
    assert table.num_rows > 0 and all(table[c].null_count == 0 for c in columns)
    for conv in [task[0], task[len(task) // 2], task[-1]]: check_conversation(conv, task)


def check_conversation(conv, task):
    "Required fields and types of a task's conversation."
    msgs = [m for m in conv["messages"] if m["role"] != "system"]
    assert len(msgs) >= 2 and len(msgs) % 2 == 0  # user, assistant, ..., assistant
    for k, m in enumerate(msgs):
        assert m["role"] == ("user", "assistant")[k % 2]
        c = m["content"]
        assert isinstance(c, str) or (m["role"] == "assistant" and all(p["type"] in ("text", "python", "python_output")
                                                                      and isinstance(p["text"], str) for p in c))
    if isinstance(task, (MMLU, ARC)):
        assert task.eval_type == "categorical"
        assert conv["letters"] == list(LETTERS[:len(conv["letters"])]) and 3 <= len(conv["letters"]) <= 5
        assert msgs[-1]["content"] in conv["letters"]
        assert all(f"\n{l}. " in msgs[0]["content"] for l in conv["letters"])
    else:
        assert task.eval_type == "generative"


def test_arc_numeric_labels_become_letters():
    task = ARC("ARC-Easy", "train")
    rows = task.table.to_pylist()
    numeric = [i for i, r in enumerate(rows) if r["choices"]["label"][0] == "1"]
    assert len(numeric) == 102  # 101 rows labelled 1-4, one 1-3
    for i in numeric:
        conv = task[i]
        assert conv["messages"][1]["content"] == LETTERS[int(rows[i]["answerKey"]) - 1]
    mixed = [len(r["choices"]["text"]) for r in rows]
    assert {3, 4, 5} <= set(mixed)


def test_bad_arguments_are_clear():
    for make, words in [(lambda: MMLU("nope"), "MMLU subset"), (lambda: MMLU("all", "train"), "MMLU split"),
                        (lambda: MMLU("auxiliary_train", "test"), "auxiliary_train split"),
                        (lambda: ARC("ARC-Hard"), "ARC subset"),
                        (lambda: GSM8K(split="dev"), "GSM8K split"), (lambda: SmolTalk("val"), "SmolTalk split"),
                        (lambda: SpellingBee(split="val"), "split"), (lambda: GSM8K(step=0), "step >= 1")]:
        with pytest.raises(ValueError, match=words): make()
    with pytest.raises(ValueError): render_mc("q", "AB", ["x"])


# ---------------------------------------------------------------- rendering and loss masks

def expected_render(conv):
    "(full text, trained text) of a conversation, built independently of the tokenizer."
    full, trained = "<|bos|>", ""
    msgs = conv["messages"]
    for m in msgs:
        if m["role"] == "user": full += f"<|user_start|>{m['content']}<|user_end|>"; continue
        full += "<|assistant_start|>"
        parts = [{"type": "text", "text": m["content"]}] if isinstance(m["content"], str) else m["content"]
        for p in parts:
            s = (p["text"] if p["type"] == "text" else f"<|python_start|>{p['text']}<|python_end|>" if p["type"] == "python"
                 else f"<|output_start|>{p['text']}<|output_end|>")
            full += s
            if p["type"] != "python_output": trained += s
        full += "<|assistant_end|>"; trained += "<|assistant_end|>"
    return full, trained

RENDERED = [lambda: SmolTalk("test"), lambda: MMLU("all", "test"), lambda: MMLU("auxiliary_train"),
            lambda: ARC("ARC-Challenge", "test"),
            lambda: GSM8K(split="test"), HumanEval, lambda: SpellingBee(size=50, split="test"),
            lambda: SimpleSpelling(size=50), lambda: Identity()]

@pytest.mark.parametrize("make", RENDERED)
def test_render_and_mask(make, tok):
    task = make()
    n = len(task)
    for i in sorted({0, 1, 2, n // 3, n // 2, n - 1}):
        conv = task[i]
        ids, mask = tok.render_conversation(conv, max_tokens=10**7)
        full, trained = expected_render(conv)
        assert len(ids) == len(mask) and tok.decode(ids) == full
        assert tok.decode([t for t, m in zip(ids, mask) if m]) == trained  # mask 1 exactly on what the assistant writes
        if isinstance(task, (MMLU, ARC)):
            letter = conv["messages"][-1]["content"]
            assert trained == f"{letter}<|assistant_end|>"
            assert task.evaluate(conv, letter) and task.evaluate(conv, f" {letter}\n")
            assert not any(task.evaluate(conv, l) for l in conv["letters"] if l != letter)
            prompt = tok.render_for_completion(conv)
            assert prompt == ids[:len(prompt)] and prompt[-1] == tok.encode_special("<|assistant_start|>")


# ---------------------------------------------------------------- GSM8K: calculator calls and the final answer

PLAIN = re.compile(r"[\d\s.+\-*/()]+")

def test_gsm8k_tool_calls_on_real_answers():
    task = GSM8K("main", "train", stop=200)
    raw = task.table.slice(0, 200).to_pylist()
    total = plain = matched = 0
    for conv, row in zip(task, raw):
        parts = conv["messages"][1]["content"]
        calls = re.findall(r"<<([^<>]*)>>", row["answer"])
        total += len(calls)
        assert [p["text"] for p in parts if p["type"] == "python"] == [c.rpartition("=")[0] for c in calls]
        assert [p["text"] for p in parts if p["type"] == "python_output"] == [c.rpartition("=")[2] for c in calls]
        # the text parts alone are the answer with the annotations cut out
        assert "".join(p["text"] for p in parts if p["type"] == "text") == re.sub(r"<<[^<>]*>>", "", row["answer"])
        for expr, out in zip(parts, parts[1:]):
            if expr["type"] != "python" or not PLAIN.fullmatch(expr["text"]): continue
            plain += 1
            got = use_calculator(expr["text"])
            matched += got is not None and abs(float(got) - float(out["text"])) <= 1e-6 * max(1.0, abs(float(out["text"])))
        final = row["answer"].split("####")[-1].strip().replace(",", "")
        assert extract_answer(parts[-1]["text"]) == final
        assert parts[-1]["text"].endswith(f"#### {row['answer'].split('#### ')[-1]}")
        assert task.evaluate(conv, f"blah\n#### {final}") and not task.evaluate(conv, f"#### {float(final) + 1}")
    print(f"\nGSM8K train[:200]: {total} calculator calls, {plain} plain arithmetic, {matched} reproduced by use_calculator")
    assert total > 500 and plain > 0.95 * total
    assert matched == plain


@pytest.mark.parametrize("completion,ok", [("#### 72", True), ("So 72.\n#### 72.0", True), ("#### $72", True),
                                           ("#### 7,2", True), ("#### 71", False), ("72", False), ("", False),
                                           ("#### 72\n#### 73", True), ("#### 73\n#### 72", False)])
def test_gsm8k_evaluate(completion, ok):
    task = GSM8K(split="train")
    assert task.evaluate(task[0], completion) is ok


# ---------------------------------------------------------------- HumanEval in the sandbox

def test_humaneval_canonical_solutions_pass():
    task = HumanEval()
    rows = task.table.to_pylist()
    assert len(rows) == 164
    for r in rows: ast.parse(r["prompt"])  # humaneval_program relies on it: a repeated `def` just redefines the prompt's
    t0 = time.time()
    with ThreadPoolExecutor(2) as ex:
        results = list(ex.map(lambda i: task.evaluate(task[i], rows[i]["canonical_solution"]), range(len(rows))))
    print(f"\nHumanEval: {sum(results)}/{len(results)} canonical solutions pass in {time.time() - t0:.1f}s (2 workers)")
    assert all(results), [rows[i]["task_id"] for i, r in enumerate(results) if not r]


def test_humaneval_completion_forms():
    task = HumanEval()
    for i in (0, 10, 38):  # 10 and 38 have helper functions in the prompt that the solution calls
        conv, body = task[i], task.table.slice(i, 1).to_pylist()[0]["canonical_solution"]
        whole = conv["messages"][1]["content"]
        assert whole.startswith(conv["messages"][0]["content"])
        for completion in [body, f"```python\n{whole}```", f"Sure:\n```py\n{whole}\n```\nDone.", f"```python\n{whole}",
                           whole[whole.find(f"def {conv['entry_point']}("):]]:
            assert task.evaluate(conv, completion), (i, completion[:200])
        assert not task.evaluate(conv, "")
        assert not task.evaluate(conv, "    return None\n")
    assert extract_code("no fence") == "no fence"
    assert humaneval_program("def f():\n", "    return 1\n", "def check(c): assert c() == 1", "f").endswith("check(f)\n")


# ---------------------------------------------------------------- mixtures and slicing

class Range(Task):
    "Toy task: example i is a one-turn conversation whose answer is f'{name}{i}'."
    def __init__(self, n, name="x", **kw): super().__init__(**kw); self.n, self.name = n, name
    def num_examples(self): return self.n
    def get_example(self, i):
        return {"messages": [{"role": "user", "content": "?"}, {"role": "assistant", "content": f"{self.name}{i}"}]}

def ans(task): return [c["messages"][1]["content"] for c in task]


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 30), st.integers(0, 40), st.one_of(st.none(), st.integers(0, 40)), st.integers(1, 7))
def test_slicing_is_list_slicing(n, start, stop, step):
    t = Range(n, start=start, stop=stop, step=step)
    want = [f"x{i}" for i in range(n)][start:stop:step]
    assert len(t) == len(want) and ans(t) == want
    assert [t[i]["messages"][1]["content"] for i in range(-len(t), len(t))] == want + want
    assert [c["messages"][1]["content"] for c in t[1::2]] == want[1::2]
    for bad in (len(t), -len(t) - 1):
        with pytest.raises(IndexError): t[bad]


def test_slicing_real_task():
    full, part = GSM8K(split="test"), GSM8K(split="test", start=10, stop=40, step=3)
    assert len(part) == 10 and [part[k] for k in range(10)] == [full[10 + 3 * k] for k in range(10)]
    assert len(GSM8K(split="test", start=2000)) == 0 and len(GSM8K(split="test", stop=10**6)) == 1319


def test_mixture_determinism_and_coverage():
    tasks = [Range(37, "a"), Range(5, "b"), Range(20, "c", start=3, step=2), ARC("ARC-Challenge", "validation", stop=30)]
    mix = TaskMixture(tasks)
    convs = list(mix)
    assert len(mix) == sum(map(len, tasks)) == 37 + 5 + 9 + 30
    keys = sorted(str(c["messages"]) for c in convs)
    assert keys == sorted(str(c["messages"]) for t in tasks for c in t)  # each example exactly once
    assert sorted(mix.index) == [(t, i) for t, task in enumerate(tasks) for i in range(len(task))]
    assert list(TaskMixture(tasks)) == convs and ans(TaskMixture(tasks[:3], seed=42)) != ans(TaskMixture(tasks[:3], seed=43))
    assert len({t for t, _ in mix.index[:20]}) > 1 and mix.index != sorted(mix.index)  # actually shuffled
    # a task listed twice comes twice as often; a sliced mixture is a view of the same order
    twice = TaskMixture([tasks[0], tasks[1], tasks[1]])
    assert sorted(ans(twice)) == sorted(ans(tasks[0]) + ans(tasks[1]) * 2)
    assert ans(TaskMixture(tasks[:3], start=5, step=4)) == ans(TaskMixture(tasks[:3]))[5::4]
    # in a fresh process the order is the same (no hash randomization, no global random state)
    code = ("from nanochat.tasks import *\nclass R(Task):\n def num_examples(self): return 50\n"
            " def get_example(self, i): return i\nprint(list(TaskMixture([R(), R(start=7)], seed=3)))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                       env={**os.environ, "PYTHONHASHSEED": "1"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str([int(a[1:]) for a in ans(TaskMixture([Range(50), Range(50, start=7)], seed=3))])


def test_sequence_is_in_order():
    tasks = [Range(3, "a"), Range(0, "e"), Range(4, "b", start=1), Range(2, "c")]
    seq = TaskSequence(tasks)
    assert ans(seq) == ["a0", "a1", "a2", "b1", "b2", "b3", "c0", "c1"]
    assert ans(TaskSequence(tasks, start=2, stop=7, step=2)) == ["a2", "b2", "c0"]


# ---------------------------------------------------------------- synthetic tasks

def test_spelling_bee():
    train, test = SpellingBee(size=600, split="train"), SpellingBee(size=300, split="test")
    assert not set(words_for("train")) & set(words_for("test")) and len(words_for("test")) > 30
    train_words = {re.search(r"'(\w+)'\.count", c["messages"][1]["content"][1]["text"]).group(1) for c in train}
    test_words = {re.search(r"'(\w+)'\.count", c["messages"][1]["content"][1]["text"]).group(1) for c in test}
    assert train_words <= set(words_for("train")) and test_words <= set(words_for("test"))
    assert not {str(c) for c in train} & {str(c) for c in test}  # disjoint
    assert train[17] == SpellingBee(size=600, split="train")[17] and train[17] != SpellingBee(size=600, split="train", seed=1)[17]
    zeros = 0
    for conv in list(train) + list(test):
        q, parts = conv["messages"][0]["content"], conv["messages"][1]["content"]
        assert [p["type"] for p in parts] == ["text", "python", "python_output", "text"]
        word, letter = re.fullmatch(r"'(\w+)'\.count\('(\w)'\)", parts[1]["text"]).groups()
        assert word in q and letter in q
        assert use_calculator(parts[1]["text"]) == parts[2]["text"] == str(word.count(letter))
        n = word.count(letter)
        zeros += n == 0
        assert train.evaluate(conv, f"...\n#### {n}") and not train.evaluate(conv, f"#### {n + 1}")
    assert 0 < zeros < 0.4 * 900  # some questions have answer 0, most don't


def test_simple_spelling_and_identity(tok):
    sp = SimpleSpelling(size=200, split="test")
    for conv in sp:
        word = conv["messages"][1]["content"].replace("-", "")
        assert word in words_for("test") and word in conv["messages"][0]["content"]
        assert sp.evaluate(conv, "-".join(word) + "\n") and not sp.evaluate(conv, word)
    assert not {c["messages"][1]["content"] for c in SimpleSpelling(size=300)} & {c["messages"][1]["content"] for c in sp}
    ident = Identity()
    assert 24 <= len(ident) <= 100 and list(ident) == list(Identity())
    text = " ".join(m["content"] for c in ident for m in c["messages"])
    assert "nanochat" in text and "{" not in text
    assert "Ada" in " ".join(m["content"] for c in Identity(creator="Ada") for m in c["messages"])
    with pytest.raises(NotImplementedError): ident.evaluate(ident[0], "hi")


# ---------------------------------------------------------------- laziness and downloads

def test_import_downloads_nothing(tmp_path):
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(tmp_path / "base"), "HF_ENDPOINT": "http://127.0.0.1:9"}
    r = subprocess.run([sys.executable, "-c", "import nanochat.tasks as t; t.SpellingBee(5)[0]; t.Identity()[0]"],
                       capture_output=True, text=True, cwd=REPO, env=env)
    assert r.returncode == 0, r.stderr
    assert not (tmp_path / "base" / "hf").exists()


@pytest.mark.skipif(not MIRROR.is_dir(), reason="needs the offline mirror")
def test_each_file_is_downloaded_once(tmp_path, monkeypatch):
    srv = MirrorServer(MIRROR)
    try:
        monkeypatch.setenv("HF_ENDPOINT", srv.url)
        monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
        for _ in range(3): GSM8K(split="test"); SmolTalk("test")
        assert set(srv.gets.values()) == {1} and len(srv.gets) == 2, srv.gets
        assert (tmp_path / "hf" / "datasets/openai/gsm8k/resolve/main/main/test-00000-of-00001.parquet").exists()
        empty = tmp_path / "empty"; empty.mkdir()
        srv.close(); srv = MirrorServer(empty)
        monkeypatch.setenv("HF_ENDPOINT", srv.url)
        with pytest.raises(DownloadError, match="no 'train' split"): SmolTalk("train")
        assert len(srv.gets) == 2  # both known layouts tried (1 file, 4 files), each failing fast with 404
    finally:
        srv.close()
