"""Tests for the Rust BPE trainer in `rustbpe/` (Python module `nanochat_rustbpe`).

Build it first with `bash rustbpe/install.sh`. The Rust trainer must reproduce, merge for
merge, a small pure-Python reference trainer written here to be obviously correct, and
its vocabulary must work in tiktoken.
"""
import collections
import functools
import json
import random
import textwrap
from pathlib import Path

import pytest
import regex
import tiktoken
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

try:
    import nanochat_rustbpe
except ImportError as e:  # fail loudly: a silent skip would hide a broken build
    raise ImportError("nanochat_rustbpe is not installed: run `bash rustbpe/install.sh`") from e

Tokenizer = nanochat_rustbpe.Tokenizer
GPT4_SPLIT_PATTERN = nanochat_rustbpe.GPT4_SPLIT_PATTERN
# The shared offline data mirror sits next to the repo: /work/main -> /work/shared/hf-mirror.
MIRROR = Path(__file__).resolve().parents[2] / "shared" / "hf-mirror"
SHARD = MIRROR / "datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main/shard_00000.parquet"

# ---------------------------------------------------------------------------------------
# The reference: count chunks, then repeatedly merge the most frequent pair.
# ---------------------------------------------------------------------------------------


def merge_word(word, pair, new_id):
    "Replace every occurrence of `pair` in `word`, left to right, by `new_id`."
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            out.append(new_id)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out


def reference_train(texts, vocab_size, pattern=GPT4_SPLIT_PATTERN):
    """BPE merges as ((left, right), new_id). Each step merges the most frequent pair; ties
    go to the smallest (left, right). Stops early when no pair is left. To stay quick it
    recounts only the words that hold the merged pair, each one wholly."""
    chunks = collections.Counter(m.group() for t in texts for m in regex.finditer(pattern, t))
    words = [list(c.encode("utf-8")) for c in chunks]
    freqs = list(chunks.values())
    counts = collections.Counter()  # pair -> occurrences in the corpus
    where = collections.defaultdict(set)  # pair -> indices of words that (may) hold it
    for i, w in enumerate(words):
        for p in zip(w, w[1:]):
            counts[p] += freqs[i]
            where[p].add(i)
    merges = []
    for new_id in range(256, vocab_size):
        top = max(counts.values(), default=0)
        if top == 0:
            break
        best = min(p for p, c in counts.items() if c == top)
        merges.append((best, new_id))
        for i in where.pop(best):
            for p in zip(words[i], words[i][1:]):
                counts[p] -= freqs[i]
            words[i] = merge_word(words[i], best, new_id)
            for p in zip(words[i], words[i][1:]):
                counts[p] += freqs[i]
                where[p].add(i)
    return merges


def train(texts, vocab_size, **kw):
    tok = Tokenizer()
    tok.train_from_iterator(iter(texts), vocab_size, **kw)
    return tok


# ---------------------------------------------------------------------------------------
# Corpora
# ---------------------------------------------------------------------------------------


def real_text():
    "The first ~200 KB of the first pretraining shard (real English prose)."
    if not SHARD.exists():
        pytest.skip(f"offline data mirror not found at {SHARD}")
    import pyarrow.parquet as pq

    docs, n = [], 0
    for doc in pq.read_table(SHARD, columns=["text"]).column("text").to_pylist():
        docs.append(doc)
        n += len(doc)
        if n >= 200_000:
            break
    return docs


def code_text():
    "Python source from the standard library: indentation runs, operators, identifiers."
    files = [textwrap.__file__, json.decoder.__file__, json.encoder.__file__, collections.__file__]
    return [Path(f).read_text(encoding="utf-8")[:40_000] for f in files]


def unicode_text():
    "A deterministic mix of scripts, emoji, combining marks, odd digits and whitespace."
    pieces = [
        "東京は日本の首都です。", "我们一起学习。", "한국어 문장입니다", "Ελληνικά γράμματα", "кириллица и ещё",
        "العربية ١٢٣٤", "हिन्दी में", "ภาษาไทย", "👍🏽", "👩‍👩‍👧", "🎉🎉🎉", "🇫🇷", "e\u0301", "n\u0303o",
        "a\u0308\u0304", "１２３", "٣٤٥٦", "Ⅻ", "½", "\u00a0", "\u3000", "\u2003\u2003", "\t\t", "\r\n", "\r\n\r\n",
        "\n\n\n", "   ", " ", "it's", "WE'LL", "they'Re", "'ſ", "'D", "can't", "$1,234.56", "C++", "-->", "…", "¿qué?",
        "naïve", "Straße", "ǅ", "x²", "\x0b", "\x0c", "\x1c", "\x00",
    ]
    rng = random.Random(0)
    return ["".join(rng.choice(pieces) for _ in range(400)) for _ in range(60)]


CORPORA = {"real": real_text, "code": code_text, "unicode": unicode_text}


@functools.cache
def reference_merges(corpus):
    "Reference merges up to vocab 1000; smaller vocabularies are prefixes of these."
    return reference_train(CORPORA[corpus](), 1000)


# ---------------------------------------------------------------------------------------
# Same merges as the reference
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("vocab_size", [256, 300, 512, 1000])
@pytest.mark.parametrize("corpus", list(CORPORA))
def test_merges_match_reference(corpus, vocab_size):
    texts = CORPORA[corpus]()
    tok = train(texts, vocab_size, buffer_size=7)  # a small buffer exercises refilling
    assert tok.get_merges() == reference_merges(corpus)[: vocab_size - 256]


@pytest.mark.parametrize(
    "texts",
    [[], [""], ["a"], ["  \t \n  "], ["👍🏽🎉🎉 👩‍👩‍👧"], ["e\u0301e\u0301 cafe\u0301"], ["a\r\n\r\nb\r\n\r\n\r\n"], ["aaaaaaa"]],
    ids=["empty", "empty-str", "one-char", "whitespace", "emoji", "combining", "crlf", "repeats"],
)
def test_edge_cases(texts):
    # Tiny inputs run out of pairs long before 300 tokens: both trainers stop early.
    tok = train(texts, 300)
    assert tok.get_merges() == reference_train(texts, 300)
    assert len(tok.get_mergeable_ranks()) == 256 + len(tok.get_merges()) < 300


def test_untrained_and_empty_vocab():
    for tok in (Tokenizer(), train([], 1000)):
        assert tok.get_merges() == []
        assert tok.get_mergeable_ranks() == [(bytes([i]), i) for i in range(256)]
        assert tok.encode("hé") == list("hé".encode())


def test_signature_and_iterables():
    sig = Tokenizer.train_from_iterator.__text_signature__
    assert sig == "(self, iterator, vocab_size, buffer_size=8192, pattern=None)"
    texts = ["hello world"] * 3
    assert train(texts, 270).get_merges() == train(texts, 270, buffer_size=1).get_merges()
    tok = Tokenizer()
    tok.train_from_iterator(texts, 270)  # any iterable, not only iterators
    assert tok.get_merges() == reference_train(texts, 270)


def test_stops_early():
    tok = train(["abab abab"], 10_000)
    assert [pair for pair, _ in tok.get_merges()] == [(97, 98), (256, 256), (32, 257)]


def test_custom_pattern():
    pattern = r"\w+|\s+|[^\w\s]+"
    texts = code_text()
    tok = train(texts, 400, pattern=pattern)
    assert tok.get_pattern() == pattern
    assert tok.get_merges() == reference_train(texts, 400, pattern)


@pytest.mark.parametrize("max_digits", [1, 2, 3])
def test_gpt4_pattern_variants(max_digits):
    "cl100k's {1,3} digit groups (and {1,1}) take the same fast path as the default {1,2}."
    pattern = GPT4_SPLIT_PATTERN.replace(r"\p{N}{1,2}", rf"\p{{N}}{{1,{max_digits}}}")
    # ASCII and Arabic-Indic digits side by side; trained until no pair is left, so that
    # every chunk boundary shows in the merges.
    texts = ["1234567 89 0 12345678901 ٣٤٥٦٧ x1y22z333 1٣ 12٣ 7٣4 ٣1 ١٢٣٤٥٦٧٨"]
    assert train(texts, 10_000, pattern=pattern).get_merges() == reference_train(texts, 10_000, pattern)


def test_default_pattern():
    assert Tokenizer().get_pattern() == GPT4_SPLIT_PATTERN
    assert r"\p{N}{1,2}" in GPT4_SPLIT_PATTERN  # nanochat's choice, GPT-4 has {1,3}


# ---------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("vocab_size", [255, 0, -1])
def test_vocab_size_too_small(vocab_size):
    with pytest.raises(ValueError, match="256"):
        Tokenizer().train_from_iterator(iter(["hello"]), vocab_size)


def test_bad_buffer_size():
    with pytest.raises(ValueError, match="buffer_size"):
        Tokenizer().train_from_iterator(iter(["hello"]), 300, buffer_size=0)


def test_invalid_pattern():
    with pytest.raises(ValueError, match="pattern"):
        Tokenizer().train_from_iterator(iter(["hello"]), 300, pattern="(unclosed")


def test_iterator_error_propagates():
    def texts():
        for i in range(20):
            yield f"text number {i} "
        raise RuntimeError("source broke")

    tok = Tokenizer()
    with pytest.raises(RuntimeError, match="source broke"):
        tok.train_from_iterator(texts(), 300, buffer_size=4)
    assert tok.get_merges() == []  # a failed run leaves the tokenizer untouched


@pytest.mark.parametrize("bad", [b"bytes", 42, None])
def test_non_str_items(bad):
    with pytest.raises(TypeError, match="str"):
        Tokenizer().train_from_iterator(iter(["fine", bad]), 300)


# ---------------------------------------------------------------------------------------
# The vocabulary works in tiktoken; our encode agrees with tiktoken's
# ---------------------------------------------------------------------------------------


def to_tiktoken(tok):
    return tiktoken.Encoding(
        name="nanochat-test",
        pat_str=tok.get_pattern(),
        mergeable_ranks=dict(tok.get_mergeable_ranks()),
        special_tokens={},
    )


@functools.cache
def trained_pair():
    tok = train(code_text() + unicode_text(), 1000)
    return tok, to_tiktoken(tok)


def test_mergeable_ranks():
    tok, enc = trained_pair()
    ranks = tok.get_mergeable_ranks()
    assert [r for _, r in ranks] == list(range(len(ranks)))
    assert len({b for b, _ in ranks}) == len(ranks) == enc.n_vocab == 1000
    vocab = [b for b, _ in ranks]
    assert all(vocab[new] == vocab[a] + vocab[b] for (a, b), new in tok.get_merges())


# Python 3.11's unicodedata is Unicode 14; characters it calls unassigned (Cn) may be
# classified differently by the Unicode tables compiled into each Rust regex engine.
unicode_chars = st.characters(exclude_categories=("Cs", "Cn"))
# ASCII-heavy text near the edges of the splitter's ASCII fast path.
edge_chars = st.sampled_from(
    list("aZsStTdlLvVeErRx09 \t\n\r\x0b\x0c\x1c\x00'.,!(-_") + ["é", "ß", "ſ", "\u0301", "٣", "Ⅻ", "\u00a0", "\u0085", "\u3000", "中", "👍"]
)
fast = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@fast
@given(st.text(alphabet=unicode_chars) | st.text(alphabet=edge_chars))
def test_tiktoken_roundtrip_and_same_encoding(text):
    tok, enc = trained_pair()
    ids = enc.encode(text)
    assert enc.decode(ids) == text
    assert tok.encode(text) == ids


@fast
@given(st.lists(st.text(alphabet=edge_chars, max_size=60), max_size=8))
def test_random_texts_match_reference(texts):
    "Random ASCII-heavy texts: chunking and merging both agree with the reference."
    assert train(texts, 320).get_merges() == reference_train(texts, 320)
