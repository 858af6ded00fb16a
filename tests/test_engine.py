"""nanochat.engine (lesson 12) beyond what the lesson shows: cached == naive over several model shapes (GQA, MQA),
batch/seed behaviour, one prefill + single-token decode steps, tool-call injection with a scripted model, stop
handling, and UTF-8 streaming (property-based). CPU only, no network: the tokenizer trains on text defined here."""
import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings, strategies as st

import nanochat.engine as engine_mod
from nanochat.engine import Engine, RowState, StreamDecoder, sample_next_token
from nanochat.gpt import GPT, GPTConfig
from nanochat.tokenizer import Tokenizer

TEXT = ("The engine keeps the keys and values of every earlier position in a cache, so each new token costs one "
        "small forward pass. A calculator answers 2+3 and 12*7 when the model asks. Prices: 1,000 + 250 = 1250. ") * 20


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    "Tiny models run fastest on one thread (and don't fight other processes for the two cores)."
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train_from_iterator(iter([TEXT]), vocab_size=320)


def S(tok, name): return tok.encode_special(f"<|{name}|>")


def random_gpt(vocab_size, seed=0, special_ids=(), **kw):
    "A random GPT with nonzero output projections; `special_ids` get zero head rows (logit 0, never the greedy pick)."
    torch.manual_seed(seed)
    cfg = GPTConfig(**(dict(sequence_len=64, vocab_size=vocab_size, n_layer=2, n_head=4, n_kv_head=2, n_embd=64) | kw))
    m = GPT(cfg)
    m.init_weights()
    with torch.no_grad():
        for b in m.transformer.h: b.attn.c_proj.weight.normal_(0, 0.1); b.mlp.c_proj.weight.normal_(0, 0.1)
        m.lm_head.weight.normal_(0, 0.5)
        m.lm_head.weight[list(special_ids)] = 0  # keeps random models away from stop and tool tokens
    return m.eval()


def specials(tok): return [tok.encode_special(s) for s in tok.get_special_tokens()]


class Scripted(nn.Module):
    """A real GPT underneath (so the KV cache is used as in production) whose logits are replaced by a script:
    after token t the next token is uniform over `script[t]`, after any other token it is `default`. Without a
    script it passes the real logits through. Records the shape of every forward call."""
    def __init__(self, model, script: dict | None = None, default: int = 0):
        super().__init__()
        self.model, self.config, self.calls, self.table = model, model.config, [], None
        if script is None: return
        V = model.config.vocab_size
        self.table = torch.full((V, V), float("-inf"))
        self.table[:, default] = 0
        for t, nxt in script.items():
            self.table[t] = float("-inf"); self.table[t, nxt] = 0

    def get_device(self): return self.model.get_device()

    def forward(self, idx, kv_cache=None):
        self.calls.append(tuple(idx.shape))
        logits = self.model(idx, kv_cache=kv_cache)
        return logits if self.table is None else self.table[idx]


def chain(*seqs):
    "A script walking through each token sequence; every token may appear in only one place."
    script = {}
    for seq in seqs:
        for a, b in zip(seq, seq[1:]):
            assert a not in script, f"token {a} appears twice in the script"
            script[a] = [b]
    return script


def columns(engine, tokens, **kw):
    "All (column, masks) pairs of a generate call."
    return list(engine.generate(tokens, **kw))


def row(cols, i=0): return [c[i] for c, _ in cols], [m[i] for _, m in cols]


# ---------------------------------------------------------------- cached decoding == naive decoding

SHAPES = {
    "mha": dict(n_layer=2, n_head=2, n_kv_head=2, n_embd=64),
    "gqa": dict(n_layer=2, n_head=4, n_kv_head=2, n_embd=64),
    "mqa": dict(n_layer=3, n_head=4, n_kv_head=1, n_embd=32),
    "deep-narrow": dict(n_layer=4, n_head=1, n_kv_head=1, n_embd=16),
}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_cached_greedy_equals_naive(tok, shape):
    model = random_gpt(tok.get_vocab_size(), seed=len(shape), special_ids=specials(tok), **SHAPES[shape])
    eng = Engine(model, tok)
    bos = tok.get_bos_token_id()
    prompts = [[bos], tok.encode("The engine keeps", prepend=bos), tok.encode(TEXT[:300], prepend=bos)[:60]]
    for p in prompts:
        n = 30  # the last prompt ends past sequence_len=64: decoding continues in the rotary headroom
        cached, masks = row(columns(eng, p, max_tokens=n, temperature=0))
        assert cached == list(model.generate(p, n, temperature=0)), (shape, p)
        assert masks == [1] * n


def test_cached_sampling_equals_naive_same_seed(tok):
    "One row, same seed: both draw from the generator in the same order, so even sampled tokens agree."
    model = random_gpt(tok.get_vocab_size(), special_ids=specials(tok))
    p = tok.encode("A calculator answers", prepend=tok.get_bos_token_id())
    for seed in (0, 1):
        cached, _ = row(columns(Engine(model, tok), p, max_tokens=25, temperature=1.0, seed=seed))
        assert cached == list(model.generate(p, 25, temperature=1.0, seed=seed))


def test_cached_differs_from_no_prefix(tok):
    "The comparison can fail: a model that loses its cache (here: fed only the last token) gives other tokens."
    model = random_gpt(tok.get_vocab_size(), special_ids=specials(tok))
    p = tok.encode("The engine keeps the keys", prepend=tok.get_bos_token_id())
    cached, _ = row(columns(Engine(model, tok), p, max_tokens=20, temperature=0))
    forgetful = list(model.generate(p[-1:], 20, temperature=0))
    assert cached != forgetful


# ---------------------------------------------------------------- prefill once, decode all rows together

def test_one_prefill_then_single_token_steps(tok, monkeypatch):
    caches = []
    class Recording(engine_mod.KVCache):
        def __init__(self, *a, **kw): super().__init__(*a, **kw); caches.append(self)
    monkeypatch.setattr(engine_mod, "KVCache", Recording)
    model = random_gpt(tok.get_vocab_size(), special_ids=specials(tok))
    spy = Scripted(model)  # real logits; records the forward calls
    p = tok.encode("The engine", prepend=tok.get_bos_token_id())
    cols = columns(Engine(spy, tok), p, num_samples=3, max_tokens=5, temperature=1.0)
    assert len(cols) == 5 and all(len(c) == 3 and len(m) == 3 for c, m in cols)
    assert spy.calls == [(1, len(p))] + [(3, 1)] * 4  # one prompt forward; no wasted forward after the last step
    c = model.config
    assert caches[0].shape[2] == 1 and caches[0].get_pos() == len(p)
    assert caches[1].shape == [c.n_layer, 2, 3, c.n_kv_head, len(p) + 5, c.head_dim]  # preallocated: prompt + max_tokens
    assert caches[1].get_pos() == len(p) + 4


def test_num_samples_rows(tok):
    model = random_gpt(tok.get_vocab_size(), special_ids=specials(tok))
    eng = Engine(model, tok)
    p = tok.encode("Prices:", prepend=tok.get_bos_token_id())
    kw = dict(num_samples=6, max_tokens=10)
    hot, hot_masks = eng.generate_batch(p, temperature=1.0, seed=3, **kw)
    assert all(r[:len(p)] == p and len(r) == len(p) + 10 for r in hot)
    assert all(m == [0] * len(p) + [1] * 10 for m in hot_masks)
    assert len({r[len(p)] for r in hot}) > 1, "rows draw their own first token from the shared prefill"
    assert len({tuple(r) for r in hot}) == 6
    assert eng.generate_batch(p, temperature=1.0, seed=3, **kw) == (hot, hot_masks)  # reproducible per seed
    assert eng.generate_batch(p, temperature=1.0, seed=4, **kw)[0] != hot
    cold, _ = eng.generate_batch(p, temperature=0, **kw)
    single, _ = eng.generate_batch(p, temperature=0, max_tokens=10)
    assert cold == single * 6  # every greedy row is the batch-1 greedy continuation


def test_top_k_top_p_stay_in_the_allowed_set():
    logits = torch.randn(4000, 50, generator=torch.Generator().manual_seed(0))
    rng = torch.Generator().manual_seed(1)
    k_ids = sample_next_token(logits, rng, temperature=1.0, top_k=3)
    assert (k_ids == logits.topk(3).indices).any(-1).all()
    p_ids = sample_next_token(logits, rng, temperature=0.7, top_p=0.5)
    probs, order = (logits / 0.7).softmax(-1).sort(-1, descending=True)
    rank = (order == p_ids).float().argmax(-1)  # rank of the sampled token
    mass_above = probs.cumsum(-1).gather(-1, rank[:, None])[:, 0] - probs.gather(-1, rank[:, None])[:, 0]
    assert (mass_above < 0.5).all()
    assert (rank > 0).any()  # and not just greedy
    assert torch.equal(sample_next_token(logits, None, temperature=0), logits.argmax(-1, keepdim=True))


# ---------------------------------------------------------------- tool calls

def tool_engine(tok, expr: str, after: str = " ok", branch=None):
    "A scripted model that answers a chat with <|python_start|>expr<|python_end|>, then `after`, then ends its turn."
    call = [S(tok, "assistant_start"), S(tok, "python_start"), *tok.encode(expr), S(tok, "python_end")]
    tail = [S(tok, "output_end"), *tok.encode(after), S(tok, "assistant_end")]
    script = chain(call, tail)
    script[S(tok, "python_end")] = [tail[1]]  # what the model "wants" after the call: used when nothing is injected
    if branch is not None:  # first token: the tool call or a short answer that ends at once
        script[S(tok, "assistant_start")] = [S(tok, "python_start"), branch]
        script[branch] = [S(tok, "assistant_end")]
    model = Scripted(random_gpt(tok.get_vocab_size()), script, default=S(tok, "assistant_end"))
    return Engine(model, tok)


def chat(tok, q="What is it?"): return tok.render_for_completion([{"role": "user", "content": q}])


@pytest.mark.parametrize("expr,result", [("2+3", "5"), ("12*7", "84"), ("1,250+3", "1253"), ("7/2", "3.5"), ("(4+5)*3", "27")])
def test_tool_call_injects_result_with_mask_0(tok, expr, result):
    p = chat(tok)
    (seq,), (mask,) = tool_engine(tok, expr).generate_batch(p, max_tokens=40)
    out, m = seq[len(p):], mask[len(p):]
    forced = [S(tok, "output_start"), *tok.encode(result), S(tok, "output_end")]
    call = [S(tok, "python_start"), *tok.encode(expr), S(tok, "python_end")]
    assert out == call + forced + tok.encode(" ok")
    assert m == [1] * len(call) + [0] * len(forced) + [1] * len(tok.encode(" ok"))
    assert tok.decode(out[len(call):len(call) + len(forced)]) == f"<|output_start|>{result}<|output_end|>"


@pytest.mark.parametrize("expr", ["2+", "1/0", "x*2", "(4+5"])
def test_invalid_expression_injects_nothing(tok, expr):
    p = chat(tok)
    (seq,), (mask,) = tool_engine(tok, expr).generate_batch(p, max_tokens=40)
    out = seq[len(p):]
    assert S(tok, "output_start") not in out
    assert out == [S(tok, "python_start"), *tok.encode(expr), S(tok, "python_end"), *tok.encode(" ok")]
    assert set(mask[len(p):]) == {1}


def test_tool_state_is_per_row(tok):
    "Rows that call the tool get the injection; rows that answered directly end early and are padded."
    short = tok.encode("y")[0]
    eng = tool_engine(tok, "2+3", branch=short)
    p = chat(tok)
    cols = columns(eng, p, num_samples=8, max_tokens=40, temperature=1.0, seed=0)
    firsts = [t for t in cols[0][0]]
    assert set(firsts) == {S(tok, "python_start"), short}, "the seed should give both kinds of rows"
    for i, first in enumerate(firsts):
        toks, masks = row(cols, i)
        if first == short:  # answered, ended, then padded with <|assistant_end|> (mask 0) while the others run
            assert toks == [short] + [S(tok, "assistant_end")] * (len(cols) - 1)
            assert masks == [1, 1] + [0] * (len(cols) - 2)
        else:
            assert tok.decode(toks) == "<|python_start|>2+3<|python_end|><|output_start|>5<|output_end|> ok<|assistant_end|>"
    seqs, _ = eng.generate_batch(p, num_samples=8, max_tokens=40, temperature=1.0, seed=0)
    assert sorted({tok.decode(s[len(p):]) for s in seqs}) == [
        "<|python_start|>2+3<|python_end|><|output_start|>5<|output_end|> ok", "y"]


def test_row_state_machine(tok):
    r = RowState(tok)
    for t in [S(tok, "python_start"), *tok.encode("6*7"), S(tok, "python_end")]: r.push(r.choose(t)[0])
    forced = [S(tok, "output_start"), *tok.encode("42"), S(tok, "output_end")]
    assert [r.choose(-1) for _ in range(len(forced) + 1)] == [(t, 0) for t in forced] + [(-1, 1)]
    r = RowState(tok)
    r.push(S(tok, "python_end"))  # a stray end without a start runs nothing
    assert not r.forced and not r.done


# ---------------------------------------------------------------- stopping

def test_stop_tokens_and_max_tokens(tok):
    bos, end = tok.get_bos_token_id(), S(tok, "assistant_end")
    a, b, c = (tok.encode(ch)[0] for ch in "xyz")
    p = [bos, S(tok, "assistant_start")]
    # first token a (then <|assistant_end|>), b (then <|bos|>) or c (then c forever)
    script = {S(tok, "assistant_start"): [a, b, c], a: [end], b: [bos], c: [c]}
    eng = Engine(Scripted(random_gpt(tok.get_vocab_size()), script, default=c), tok)
    cols = columns(eng, p, num_samples=9, max_tokens=7, temperature=1.0, seed=0)
    assert len(cols) == 7  # the c rows never stop: max_tokens ends everything
    firsts = cols[0][0]
    assert set(firsts) == {a, b, c}
    seqs, masks = eng.generate_batch(p, num_samples=9, max_tokens=7, temperature=1.0, seed=0)
    for first, s, m in zip(firsts, seqs, masks):
        want = {a: [a], b: [b], c: [c] * 7}[first]  # the stop token itself is not in the sequence
        assert s == p + want and m == [0, 0] + [1] * len(want)
    # when every row is done, generation ends before max_tokens; in a chat reply <|bos|> may not be written, so a model
    # that wants only <|bos|> ends its turn instead; a completion (no chat prompt) stops at <|bos|>
    for first, last in [(a, end), (b, end)]:
        eng = Engine(Scripted(random_gpt(tok.get_vocab_size()), {S(tok, "assistant_start"): [first], a: [end], b: [bos]}, c), tok)
        assert columns(eng, p, num_samples=3, max_tokens=50) == [([first] * 3, [1] * 3), ([last] * 3, [1] * 3)]
    eng = Engine(Scripted(random_gpt(tok.get_vocab_size()), {bos: [b], b: [bos]}, c), tok)
    assert columns(eng, [bos], num_samples=3, max_tokens=50) == [([b] * 3, [1] * 3), ([bos] * 3, [1] * 3)]


def test_stop_sequences(tok):
    model = random_gpt(tok.get_vocab_size(), special_ids=specials(tok))
    eng = Engine(model, tok)
    p = tok.encode("The", prepend=tok.get_bos_token_id())
    free, _ = row(columns(eng, p, max_tokens=12, temperature=0))
    stopped, _ = row(columns(eng, p, max_tokens=12, temperature=0, stop=[[-5], free[4:6]]))
    assert stopped == free[:6]  # the stop sequence is emitted, then the row ends
    (seq,), _ = eng.generate_batch(p, max_tokens=12, temperature=0, stop=[free[4:6]])
    assert seq == p + free[:6]
    assert row(columns(eng, p, max_tokens=12, temperature=0, stop=[[free[0], -5]]))[0] == free  # a partial match is no stop


def test_max_tokens_default_and_errors(tok):
    model = random_gpt(tok.get_vocab_size(), special_ids=specials(tok))  # sequence_len 64
    eng = Engine(model, tok)
    p = tok.encode("The engine", prepend=tok.get_bos_token_id())
    assert len(columns(eng, p, temperature=0)) == 64 - len(p)
    assert columns(eng, p, max_tokens=0) == []
    with pytest.raises(ValueError, match="fills the model's sequence_len"): columns(eng, [p[0]] * 64)
    with pytest.raises(ValueError, match="non-empty list of token ids"): columns(eng, [], max_tokens=3)
    with pytest.raises(ValueError, match="num_samples must be >= 1"): columns(eng, p, num_samples=0, max_tokens=3)
    with pytest.raises(ValueError, match="stop is a list of token-id sequences"): columns(eng, p, max_tokens=3, stop=[[]])
    with pytest.raises(ValueError, match="temperature must be >= 0"): columns(eng, p, max_tokens=3, temperature=-1)
    with pytest.raises(ValueError, match="top_k must be"): columns(eng, p, max_tokens=3, top_k=0)


# ---------------------------------------------------------------- UTF-8 streaming

MULTIBYTE = ["Hi 👋, 你好世界!", "naïve café — ½ € ✓", "🤖🧠 emoji 👨‍👩‍👧 family", "日本語のテキスト", "Ελληνικά"]


@pytest.mark.parametrize("text", MULTIBYTE)
def test_stream_decoder_multibyte(tok, text):
    ids = tok.encode(text)
    assert any("\ufffd" in tok.decode([i]) for i in ids), "the test needs characters split across tokens"
    sd = StreamDecoder(tok)
    pieces = [sd.push(i) for i in ids]
    tail = sd.flush()
    assert "".join(pieces) + tail == text == tok.decode(ids)
    assert tail == "" and not any("\ufffd" in p for p in pieces)
    assert "" in pieces  # some tokens held back the start of a character


@given(st.text(min_size=1, max_size=40))
@settings(max_examples=150, deadline=None)
def test_stream_decoder_any_text(tok, text):
    ids = tok.encode(text)
    sd = StreamDecoder(tok)
    pieces = [sd.push(i) for i in ids] + [sd.flush()]
    assert "".join(pieces) == text
    if "\ufffd" not in text: assert not any("\ufffd" in p for p in pieces)


@given(st.lists(st.integers(0, 319), max_size=40))
@settings(max_examples=150, deadline=None)
def test_stream_decoder_any_ids(tok, ids):
    "Arbitrary ids (invalid UTF-8, special tokens): the stream still equals decoding everything at once."
    sd = StreamDecoder(tok)
    assert "".join(sd.push(i) for i in ids) + sd.flush() == tok.decode(ids)
    assert sd.push(tok.encode("a")[0]) == "a"  # flush leaves the decoder ready for a new stream


def test_stream_decoder_flush_incomplete(tok):
    sd = StreamDecoder(tok)
    ids = tok.encode("👋")
    assert [sd.push(i) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert sd.flush() == "\ufffd"  # a cut-off character becomes one replacement character, like decode()


# ---------------------------------------------------------------- what an assistant may write

def test_chat_replies_never_contain_control_tokens(tok):
    """A model whose logits favour every special token: in an assistant turn (the prompt ends with <|assistant_start|>)
    it can only write <|python_start|>, <|python_end|> and <|assistant_end|>, in every sampling mode; a completion
    (no chat prompt) is unaffected."""
    model = random_gpt(tok.get_vocab_size(), seed=3)
    sp = specials(tok)
    class Loves(nn.Module):  # the real model's logits, plus a large bonus for every special token except <|assistant_end|>
        def __init__(self, m): super().__init__(); self.model, self.config = m, m.config
        def get_device(self): return self.model.get_device()
        def forward(self, idx, kv_cache=None):
            logits = self.model(idx, kv_cache=kv_cache).clone()
            logits[..., [s for s in sp if s != S(tok, "assistant_end")]] += 100.0
            return logits
    eng = Engine(Loves(model), tok)
    allowed = {S(tok, "python_start"), S(tok, "python_end"), S(tok, "assistant_end")}
    chat = tok.render_for_completion([{"role": "user", "content": "hi"}])
    for kw in [dict(temperature=0), dict(temperature=1.0), dict(temperature=1.0, top_k=5), dict(temperature=0.7, top_p=0.9)]:
        out = [t for col, masks in eng.generate(chat, num_samples=4, max_tokens=40, seed=1, **kw)
               for t, m in zip(col, masks) if m == 1]
        assert out and {t for t in out if t in sp} <= allowed, (kw, [tok.id_to_token(t) for t in out if t in sp])
    completion = [t for col, _ in eng.generate(tok.encode("The engine", prepend="<|bos|>"), max_tokens=5, temperature=0) for t in col]
    assert completion[0] in set(sp) - allowed  # without the chat prompt, the model says what it likes


@pytest.mark.parametrize("temperature, top_p", [(1e-38, None), (5e-324, None), (1e-300, None), (1.0, 1e-300),
                                                (1.0, 5e-324), (5e-324, 5e-324)])
def test_sampling_is_safe_for_every_accepted_value(temperature, top_p):
    "Tiny temperatures are greedy in the limit; a tiny top_p keeps the most likely token. No NaN, no error."
    logits = torch.tensor([[1.0, 3.0, 2.0, -4.0], [0.0, 0.0, 9.0, 1.0]])
    got = sample_next_token(logits, torch.Generator().manual_seed(0), temperature, top_p=top_p)
    assert got[:, 0].tolist() == [1, 2]
