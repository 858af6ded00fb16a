"""The web server of lesson 18 (nanochat.chat_web) as a real uvicorn server, started by its own entry point on a random
loopback port with a tiny random model, checked with the official `openai` client: plain and streamed answers, n > 1,
seeds, stop strings, max_tokens, usage; 50 concurrent streams; invalid requests (a battery, plus property-based fuzzing
with hypothesis: never a 500); a client that hangs up mid-stream; a full queue (503).

The helpers at the top (`tiny_chat_base`, `ChatServer`) are shared with tests/test_chat_browser.py and
tests/test_chat_cli.py."""
import dataclasses, json, os, socket, subprocess, sys, threading, time
from concurrent.futures import ThreadPoolExecutor
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from functools import partial
from pathlib import Path

import httpx
import openai
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

REPO = Path(__file__).resolve().parents[1]
MIRROR = REPO.parent / "shared" / "hf-mirror"  # the offline data mirror beside the repo (used only if HF_ENDPOINT is unset)
MODEL = "nanochat-sft-d2"
CONTEXT = 2048  # the tiny model's sequence_len: long enough that a 1000-token answer takes about a second


def _serve_mirror():
    "Serve the offline mirror on loopback (for runs outside scripts/test.sh, which sets HF_ENDPOINT itself)."
    if not MIRROR.is_dir(): pytest.fail(f"set HF_ENDPOINT (scripts/test.sh does) or put the offline mirror at {MIRROR}")
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(SimpleHTTPRequestHandler, directory=str(MIRROR)))
    httpd.RequestHandlerClass.log_message = lambda *a: None
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd


def tiny_chat_base(base: Path) -> Path:
    """Make `base` a NANOCHAT_BASE_DIR holding a 1024-token tokenizer (trained on ~300 KB of pretraining text fetched
    through HF_ENDPOINT) and a depth-2 GPT with random weights saved as an "sft" checkpoint (tag d2, step 0)."""
    from nanochat.checkpoint_manager import checkpoint_dir, save_checkpoint
    from nanochat.dataset import SHARD_REPO, hf_download, shard_filename
    from nanochat.gpt import GPT, GPTConfig
    from nanochat.tokenizer import Tokenizer
    import pyarrow.parquet as pq
    old = os.environ.get("NANOCHAT_BASE_DIR")
    httpd = None if os.environ.get("HF_ENDPOINT") else _serve_mirror()
    try:
        os.environ["NANOCHAT_BASE_DIR"] = str(base)
        if httpd: os.environ["HF_ENDPOINT"] = f"http://127.0.0.1:{httpd.server_port}"
        shard = hf_download(f"{SHARD_REPO}/{shard_filename(0)}", base / "shard.parquet", progress=False)
        texts, n = [], 0
        for text in pq.ParquetFile(shard).read_row_group(0, columns=["text"]).column("text").to_pylist():
            texts.append(text); n += len(text)
            if n > 300_000: break
        tok = Tokenizer.train_from_iterator(iter(texts), vocab_size=1024)
        tok.save(base / "tokenizer")
        torch.manual_seed(0)
        config = GPTConfig.from_depth(2, vocab_size=tok.get_vocab_size(), sequence_len=CONTEXT)
        model = GPT(config)
        model.init_weights()
        with torch.no_grad():  # opinions instead of a flat distribution, as in the engine lesson
            for b in model.transformer.h: b.attn.c_proj.weight.normal_(0, 0.1); b.mlp.c_proj.weight.normal_(0, 0.1)
            model.lm_head.weight.normal_(0, 0.5)
        save_checkpoint(checkpoint_dir("sft", "d2"), 0, model.state_dict(), None, {"model_config": dataclasses.asdict(config)})
    finally:
        if old is None: os.environ.pop("NANOCHAT_BASE_DIR", None)
        else: os.environ["NANOCHAT_BASE_DIR"] = old
        if httpd:
            os.environ.pop("HF_ENDPOINT", None)
            httpd.shutdown()
    return base


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ChatServer:
    "`python -m nanochat.chat_web` in a subprocess on a free loopback port; `.url`, `.log()`, `.stop()`."
    def __init__(self, base: Path, *args: str, log_dir: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_dir / f"server_{self.port}.log"
        env = dict(os.environ, NANOCHAT_BASE_DIR=str(base), PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "nanochat.chat_web", "--port", str(self.port), "-i", "sft",
                                          "--device-type", "cpu", *args], env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + 90
        while time.time() < deadline:
            if self.proc.poll() is not None: pytest.fail(f"the server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200: return
            except httpx.HTTPError: pass
            time.sleep(0.1)
        self.stop()
        pytest.fail(f"the server did not answer /health within 90 s:\n{self.log()}")

    def log(self) -> str: return self.log_path.read_text(errors="replace")[-3000:]

    def stats(self) -> dict: return httpx.get(f"{self.url}/stats", timeout=5).json()

    def stop(self):
        self.proc.terminate()
        try: self.proc.wait(10)
        except subprocess.TimeoutExpired: self.proc.kill(); self.proc.wait()


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tiny_chat_base(tmp_path_factory.mktemp("chatbase"))


@pytest.fixture(scope="module")
def server(base, tmp_path_factory):
    # default answers are short (16 tokens) so that fuzzed requests without max_tokens stay quick
    srv = ChatServer(base, "--max-queue", "64", "--max-new-tokens", "16", log_dir=tmp_path_factory.mktemp("logs"))
    yield srv
    srv.stop()
    assert "Traceback" not in srv.log(), srv.log()  # no request made the server crash or log an exception


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def tokenizer(base):
    from nanochat.tokenizer import Tokenizer
    return Tokenizer.from_directory(base / "tokenizer")


USER = [{"role": "user", "content": "Why is the sky blue?"}]


def streamed(client, **kw):
    "(texts by choice index, finish_reasons by index, usage or None, chunks) of a streamed request."
    texts, finish, usage, chunks = {}, {}, None, []
    for chunk in client.chat.completions.create(model=MODEL, stream=True, **kw):
        chunks.append(chunk)
        assert chunk.object == "chat.completion.chunk" and chunk.model == MODEL and chunk.id == chunks[0].id
        if chunk.usage: usage = chunk.usage
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
            if c.finish_reason: finish[c.index] = c.finish_reason
    return texts, finish, usage, chunks


def load_tiny_model(base):
    "The tiny model as the server loads it (fp32 on the CPU)."
    from nanochat.checkpoint_manager import build_model
    return build_model(base / "chatsft_checkpoints" / "d2", 0, "cpu", "eval")[0]


def test_plain_answer_and_usage(client, tokenizer, base):
    r = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=10, seed=1)
    assert r.object == "chat.completion" and r.model == MODEL and r.id.startswith("chatcmpl-")
    (choice,) = r.choices
    assert choice.index == 0 and choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason == "length"  # a random model does not end its turn within 10 tokens
    prompt = len(tokenizer.render_for_completion(USER))
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (prompt, 10, prompt + 10)
    # the content is what the engine samples with that seed, shown as the engine lesson's Reply shows it
    from nanochat.engine import Reply
    from nanochat.engine import Engine
    model = load_tiny_model(base)
    ids = tokenizer.render_for_completion(USER)
    (seq,), _ = Engine(model, tokenizer).generate_batch(ids, max_tokens=10, seed=1)
    reply = Reply(tokenizer)
    assert choice.message.content == "".join(reply.push(t) for t in seq[len(ids):]) + reply.finish()
    r2 = client.chat.completions.create(model=MODEL, messages=USER, max_completion_tokens=10, seed=1)
    assert r2.choices[0].message.content == choice.message.content  # the newer name of max_tokens
    # a system message is merged into the first user turn, as the tokenizer renders it
    sys_msgs = [{"role": "system", "content": "Be brief."}] + USER
    r3 = client.chat.completions.create(model=MODEL, messages=sys_msgs, max_tokens=3)
    assert r3.usage.prompt_tokens == len(tokenizer.render_for_completion(sys_msgs))


def test_streaming_matches_plain(client):
    plain = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=12, seed=5)
    texts, finish, usage, chunks = streamed(client, messages=USER, max_tokens=12, seed=5,
                                            stream_options={"include_usage": True})
    assert texts == {0: plain.choices[0].message.content} and finish == {0: "length"}
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) >= 2  # it did arrive in pieces
    assert chunks[-1].choices == [] and usage.model_dump() == plain.usage.model_dump()
    assert all(c.usage is None for c in chunks[:-1])
    _, _, no_usage, _ = streamed(client, messages=USER, max_tokens=3)
    assert no_usage is None


def test_n_choices(client):
    r = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=8, n=3, seed=2)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert len({c.message.content for c in r.choices}) == 3  # three different samples at temperature 1
    assert r.usage.completion_tokens == 3 * 8
    texts, finish, _, _ = streamed(client, messages=USER, max_tokens=8, n=3, seed=2)
    assert texts == {c.index: c.message.content for c in r.choices} and finish == {0: "length", 1: "length", 2: "length"}


def test_seeds(client):
    ask = lambda **kw: client.chat.completions.create(model=MODEL, messages=USER, max_tokens=12, **kw).choices[0].message.content
    assert ask(seed=7) == ask(seed=7) != ask(seed=8)
    assert ask(seed=1, temperature=0) == ask(seed=2, temperature=0)  # greedy: the seed doesn't matter
    # top_k is an extension: the openai client sends it with extra_body
    assert ask(seed=7, extra_body={"top_k": 1}) == ask(temperature=0)  # top-k 1 is greedy too
    assert ask(seed=7, top_p=0.5, extra_body={"top_k": 40}) == ask(seed=7, top_p=0.5, extra_body={"top_k": 40})
    assert ask(seed=7, top_p=1e-9) == ask(temperature=0)               # and so is a tiny nucleus


def test_stop_strings(client):
    full = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=30, seed=11).choices[0].message.content
    stop = full[len(full) // 2:len(full) // 2 + 3]
    cut = full[:full.find(stop)]
    for stops in (stop, [stop], ["this will not appear 123", stop]):
        r = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=30, seed=11, stop=stops)
        assert (r.choices[0].message.content, r.choices[0].finish_reason) == (cut, "stop")
        assert r.usage.completion_tokens < 30
        texts, finish, _, _ = streamed(client, messages=USER, max_tokens=30, seed=11, stop=stops)
        assert (texts, finish) == ({0: cut}, {0: "stop"})
    r = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=30, seed=11, stop="this will not appear 123")
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == (full, "length")


def test_models_health_stats_ui(server, client):
    assert [m.id for m in client.models.list()] == [MODEL]
    health = httpx.get(f"{server.url}/health").json()
    assert health["status"] == "ok" and health["workers"] == 1
    stats = server.stats()
    assert {"workers", "busy", "queue", "requests_served", "tokens_generated"} <= set(stats)
    page = httpx.get(f"{server.url}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html") and "nanochat" in page.text


def test_50_concurrent_streams(server, client):
    before = server.stats()
    def one(i):
        texts, finish, usage, _ = streamed(client, messages=[{"role": "user", "content": f"Question {i}?"}], max_tokens=8,
                                           seed=i, stream_options={"include_usage": True})
        return texts[0], finish[0], usage.completion_tokens
    with ThreadPoolExecutor(50) as ex: results = list(ex.map(one, range(50)))
    assert all((f, n) == ("length", 8) or (f == "stop" and n <= 8) for _, f, n in results), results
    after = server.stats()
    assert after["requests_served"] - before["requests_served"] == 50
    assert after["tokens_generated"] - before["tokens_generated"] == sum(n for _, _, n in results)
    assert (after["busy"], after["queue"]) == (0, 0)
    # answers under load are the same as answers alone (no cross-talk between requests)
    for i in (0, 17, 49):
        alone = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": f"Question {i}?"}],
                                               max_tokens=8, seed=i)
        assert alone.choices[0].message.content == results[i][0]


def _post(server, body=None, **kw):
    if body is not None: kw["json"] = body
    return httpx.post(f"{server.url}/v1/chat/completions", timeout=30, **kw)


INVALID = {
    "bad role": ({"messages": [{"role": "robot", "content": "hi"}]}, "role"),
    "wrong order": ({"messages": [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "x"}]}, "alternate"),
    "two users": ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}, "alternate"),
    "system after user": ({"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}] + USER}, "alternate"),
    "ends with assistant": ({"messages": USER + [{"role": "assistant", "content": "b"}]}, "last message"),
    "lone system": ({"messages": [{"role": "system", "content": "be nice"}]}, "last message"),
    "empty messages": ({"messages": []}, "at least 1"),
    "no messages": ({"model": MODEL}, "messages"),
    "messages not a list": ({"messages": "hi"}, "messages"),
    "content null": ({"messages": [{"role": "user", "content": None}]}, "content"),
    "image part": ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "content"),
    "temperature 5": ({"messages": USER, "temperature": 5}, "temperature"),
    "temperature -1": ({"messages": USER, "temperature": -1}, "temperature"),
    "top_p 0": ({"messages": USER, "top_p": 0}, "top_p"),
    "top_k -1": ({"messages": USER, "top_k": -1}, "top_k"),
    "n 0": ({"messages": USER, "n": 0}, "n"),
    "n 100": ({"messages": USER, "n": 100}, "n"),
    "max_tokens -1": ({"messages": USER, "max_tokens": -1}, "max_tokens"),
    "max_tokens 0": ({"messages": USER, "max_tokens": 0}, "max_tokens"),
    "max_tokens past the context": ({"messages": USER, "max_tokens": CONTEXT}, "context"),
    "seed text": ({"messages": USER, "seed": "abc"}, "seed"),
    "stop x5": ({"messages": USER, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    "empty stop": ({"messages": USER, "stop": [""]}, "stop"),
    "huge content": ({"messages": [{"role": "user", "content": "x" * 60_000}]}, "characters"),
    "prompt too long": ({"messages": [{"role": "user", "content": "hello " * 2500}]}, "context"),
    "array body": ([1, 2, 3], "JSON object"),
}


@pytest.mark.parametrize("case", INVALID)
def test_invalid_requests_get_a_clear_4xx(server, case):
    body, words = INVALID[case]
    r = _post(server, body)
    assert r.status_code == 400, (r.status_code, r.text)
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and words.lower() in error["message"].lower(), error


def test_invalid_bodies_and_routes(server, client):
    r = _post(server, content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = _post(server, content=b"", headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    r = _post(server, content=json.dumps({"messages": USER}).encode(), headers={"content-type": "text/plain"})
    assert 400 <= r.status_code < 500, r.text
    r = _post(server, content=b"x" * (2 << 20))
    assert r.status_code == 413 and "larger than" in r.json()["error"]["message"]
    assert httpx.get(f"{server.url}/v1/chat/completions").status_code == 405
    assert httpx.get(f"{server.url}/nope").json()["error"]["message"] == "Not Found"
    # the openai client surfaces the message
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model=MODEL, messages=USER, temperature=5)


# Property-based fuzzing: request bodies mixing valid and invalid values of every field (and arbitrary JSON).
# Whatever comes in, the answer is a 200 with a well-formed completion or a 4xx with an OpenAI error, never a 500.
json_values = st.recursive(st.none() | st.booleans() | st.integers(-3, 3) | st.floats(allow_nan=False) | st.text(max_size=8),
                           lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=5), kids, max_size=3),
                           max_leaves=8)
contents = st.text(max_size=40) | st.lists(st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url"]),
                                                                  "text": st.text(max_size=10)}), max_size=3) | json_values
messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant", "tool", ""]),
                                           "content": contents}), max_size=4)
fields = {"model": st.sampled_from([MODEL, "gpt-4", ""]) | json_values,
          "temperature": st.floats(-1, 3) | json_values, "top_p": st.floats(-0.5, 1.5) | json_values,
          "top_k": st.integers(-2, 2000) | json_values, "max_tokens": st.integers(-2, 12) | json_values,
          "max_completion_tokens": st.integers(-2, 12), "n": st.integers(-1, 10) | json_values,
          "seed": st.integers(-(1 << 64), 1 << 65) | json_values,
          "stop": st.text(max_size=3) | st.lists(st.text(max_size=3), max_size=6) | json_values,
          "stream": st.booleans() | json_values, "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}) | json_values}
bodies = st.builds(lambda m, extra: {"messages": m, **extra}, messages | json_values,
                   st.fixed_dictionaries({}, optional=fields)) | json_values


@settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(body=bodies)
def test_fuzzed_requests_never_500(server, body):
    r = _post(server, body)
    assert r.status_code == 200 or 400 <= r.status_code < 500, (r.status_code, r.text[:500], body)
    if r.status_code != 200:
        assert r.json()["error"]["message"]
    elif r.headers["content-type"].startswith("text/event-stream"):
        assert r.text.rstrip().endswith("data: [DONE]") and '"error"' not in r.text, r.text[-500:]
    else:
        answer = r.json()
        assert answer["object"] == "chat.completion" and answer["choices"][0]["finish_reason"] in ("stop", "length")


def _wait_idle(server, timeout=5.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        stats = server.stats()
        if stats["busy"] == 0 and stats["queue"] == 0: return stats
        time.sleep(0.05)
    pytest.fail(f"the worker is still busy {timeout} s after the client left: {server.stats()}")


# Greedy decoding of this random model runs in a loop and never ends its turn: 1000 tokens, about a second of work.
LONG = {"messages": USER, "max_tokens": 1000, "temperature": 0}


def test_long_generation_responsive_server_and_client_disconnect(server, client):
    _wait_idle(server)
    # 1. while one long answer is generated (in a worker thread), the event loop still answers at once
    full = {}
    t = threading.Thread(target=lambda: full.update(_post(server, LONG).json()))
    t.start()
    while server.stats()["busy"] == 0: time.sleep(0.01)
    t0 = time.perf_counter()
    assert httpx.get(f"{server.url}/health", timeout=5).status_code == 200
    latency = time.perf_counter() - t0
    t.join()
    assert latency < 0.5, f"/health took {latency:.2f} s while a generation ran"
    assert full["usage"]["completion_tokens"] == 1000, full["usage"]  # the premise of part 2
    # 2. the same request streamed; the client reads a few events and hangs up
    before = server.stats()
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", f"{server.url}/v1/chat/completions", json=LONG | {"stream": True}) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            got = [l for l in (next(lines) for _ in range(6)) if l.startswith("data: ")]
            assert len(got) >= 2
            assert server.stats()["busy"] == 1  # still generating its 1000 tokens
    # leaving the `with` blocks closed the connection mid-stream: the worker is freed, generation stopped early
    after = _wait_idle(server)
    assert after["requests_served"] == before["requests_served"] + 1
    generated = after["tokens_generated"] - before["tokens_generated"]
    assert generated < 1000, f"generation ran to the end ({generated} tokens) instead of stopping when the client left"
    # 3. the same without streaming: a client that times out and hangs up also stops its generation
    before = server.stats()
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/chat/completions", json=LONG, timeout=httpx.Timeout(30, read=0.2))
    after = _wait_idle(server)
    assert after["requests_served"] == before["requests_served"] + 1
    assert after["tokens_generated"] - before["tokens_generated"] < 1000
    r = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=5)
    assert r.choices[0].finish_reason == "length"


def test_full_queue_gets_503(base, tmp_path):
    "A second server with --max-queue 0: while its one worker generates, another request is refused at once."
    srv = ChatServer(base, "--max-queue", "0", log_dir=tmp_path)
    try:
        slow = threading.Thread(target=lambda: _post(srv, LONG))
        slow.start()
        while srv.stats()["busy"] == 0: time.sleep(0.01)
        r = _post(srv, {"messages": USER, "max_tokens": 5})
        slow.join()
        assert r.status_code == 503 and "busy" in r.json()["error"]["message"], r.text
        assert _post(srv, {"messages": USER, "max_tokens": 5}).status_code == 200  # and served again once free
    finally:
        srv.stop()


# ---------------------------------------------------------------- faults: numbers, streams, tool calls, routes, flags

@pytest.mark.parametrize("params", [dict(temperature=1e-38), dict(temperature=5e-324), dict(top_p=1e-300), dict(top_p=5e-324),
                                    dict(temperature=5e-324, top_p=5e-324)])
def test_extreme_valid_sampling_values_answer(server, client, params):
    r = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=4, **params)
    assert r.choices[0].finish_reason in ("stop", "length")
    texts, finish, _, chunks = streamed(client, messages=USER, max_tokens=4, **params)
    assert finish[0] in ("stop", "length")


def test_a_streamed_error_still_ends_the_stream(base, tmp_path):
    "A generation that fails mid-answer: an error event, then [DONE], as every stream ends."
    from nanochat.chat_web import stream_chunks
    class Failing:
        async def events(self):
            yield ("text", 0, "partial")
            yield ("error", "generation failed: boom")
        def cancel(self): pass
    class Req:
        async def is_disconnected(self): return False
    async def collect():
        return [c async for c in stream_chunks(Failing(), Req(), dict(id="x", created=0, model="m"), 1, 3, False)]
    import asyncio
    out = asyncio.run(collect())
    assert '"error"' in out[-2] and out[-1] == "data: [DONE]\n\n", out


def test_tool_calls_round_trip_through_the_api(server, base):
    """An answer with a calculator call comes back with `parts`; sent back in the next turn they render exactly as the
    engine generated them (not as the display text `[calc: ...] -> ...`)."""
    from nanochat.chat_web import ChatRequest, render_prompt
    from nanochat.tokenizer import Tokenizer
    tok = Tokenizer.from_directory(base / "tokenizer")
    parts = [{"type": "text", "text": "It is "}, {"type": "python", "text": "6*7"}, {"type": "python_output", "text": "42"},
             {"type": "text", "text": "."}]
    convo = [{"role": "user", "content": "6*7?"}, {"role": "assistant", "content": parts}, {"role": "user", "content": "and 2*3?"}]
    tokens = render_prompt(ChatRequest(messages=convo), tok)
    assert tokens == tok.render_for_completion(convo)  # exactly the tokens the model generated, tool tokens included
    S = tok.encode_special
    assert S("<|python_start|>") in tokens and S("<|output_start|>") in tokens
    display = [{"role": "assistant", "content": "It is [calc: 6*7] → 42."}]
    assert S("<|python_start|>") not in render_prompt(ChatRequest(messages=convo[:1] + display + convo[2:]), tok)
    r = httpx.post(f"{server.url}/v1/chat/completions", json=dict(messages=[{"role": "user", "content": [
        {"type": "python", "text": "1+1"}]}]), timeout=30)
    assert r.status_code == 400 and "only an assistant" in r.json()["error"]["message"]


def test_widget_history_keeps_tool_calls(base):
    "The chat session behind the widget and the CLI keeps an answer's tool call as parts."
    from nanochat.engine import Reply
    from nanochat.tokenizer import Tokenizer
    tok = Tokenizer.from_directory(base / "tokenizer")
    S = tok.encode_special
    reply = Reply(tok)
    for t in [*tok.encode("It is "), S("<|python_start|>"), *tok.encode("6*7"), S("<|python_end|>"), S("<|output_start|>"),
              *tok.encode("42"), S("<|output_end|>"), S("<|assistant_end|>")]: reply.push(t)
    assert [p["type"] for p in reply.message()["content"]] == ["text", "python", "python_output"]


def test_model_retrieve_and_head(server, client):
    assert client.models.retrieve(MODEL).id == MODEL
    missing = httpx.get(f"{server.url}/v1/models/gpt-4", timeout=5)
    assert missing.status_code == 404 and "gpt-4" in missing.json()["error"]["message"]
    assert httpx.head(f"{server.url}/", timeout=5).status_code == 200


@pytest.mark.parametrize("port", ["99999", "-1"])
def test_bad_port_is_one_line(base, port):
    r = subprocess.run([sys.executable, "-m", "nanochat.chat_web", "--port", port, "--device-type", "cpu"],
                       env=dict(os.environ, NANOCHAT_BASE_DIR=str(base)), capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "--port must be a TCP port" in r.stderr
