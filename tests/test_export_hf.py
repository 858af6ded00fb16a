"""Lesson 21's export to Hugging Face transformers, checked beyond what the lesson shows: logits of transformers' own
NanoChatForCausalLM equal ours (fp32, max abs difference < 1e-4) for a trained toy model and for GQA/MQA shapes; greedy
`generate` gives our engine's tokens; the chat template renders conversations (system message, tool calls) to our ids;
the fast tokenizer encodes random text (hypothesis) as tiktoken does; export -> safetensors -> our GPT gives the same
weights bit for bit; and `python -m nanochat.export_hf` works as a command, also saying what to install without
transformers. Skipped, saying why, when transformers is not installed (pip install 'nanochat[hf]')."""
import json, os, shutil, subprocess, sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the Hugging Face export needs transformers: pip install 'nanochat[hf]'")
from hypothesis import given, settings, strategies as st  # noqa: E402
from jinja2.exceptions import TemplateError  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast  # noqa: E402

from conftest import MIRROR  # noqa: E402
from nanochat.export_hf import export_hf, import_hf  # noqa: E402
from nanochat.tokenizer import SPECIAL_TOKENS  # noqa: E402

transformers.utils.logging.disable_progress_bar()  # no "Loading weights" bars in the test log

REPO = Path(__file__).resolve().parents[1]
SHARDS = "datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main/shard_*.parquet"


@pytest.fixture(scope="module")
def toy(endpoint):
    "(base dir, sft model, tokenizer) from the toy fixtures' `toy_run('sft')`, with NANOCHAT_BASE_DIR pointing there."
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_ENDPOINT", endpoint)
        if not os.environ.get("NANOCHAT_NUM_SHARDS") and MIRROR.is_dir():  # the mirror's last shard is the validation one
            mp.setenv("NANOCHAT_NUM_SHARDS", str(len(list(MIRROR.glob(SHARDS)))))
        from nanochat.toy import toy_run
        run = toy_run("sft")
        mp.setenv("NANOCHAT_BASE_DIR", str(run))
        from nanochat.checkpoint_manager import load_model
        torch.set_num_threads(1)
        model, tokenizer, _ = load_model("sft", "cpu")
        yield run, model, tokenizer
    shutil.rmtree(run, ignore_errors=True)


@pytest.fixture(scope="module")
def exported(toy, tmp_path_factory):
    "The sft model exported, and loaded back by transformers: (folder, NanoChatForCausalLM, fast tokenizer)."
    _, model, tokenizer = toy
    out = export_hf(model, tokenizer, tmp_path_factory.mktemp("hf") / "sft")
    return out, AutoModelForCausalLM.from_pretrained(out).eval(), AutoTokenizer.from_pretrained(out)


def max_logit_diff(ours, theirs, vocab_size, seed=0):
    "Max |logits| difference on a batch of 4 random sequences of 64 tokens and one of the model's full length."
    g = torch.Generator().manual_seed(seed)
    batches = [torch.randint(0, vocab_size, (4, 64), generator=g),
               torch.randint(0, vocab_size, (1, ours.config.sequence_len), generator=g)]
    with torch.no_grad(): return max((ours(x) - theirs(x).logits).abs().max().item() for x in batches)


def test_loads_as_transformers_own_classes(toy, exported):
    _, _, tokenizer = toy
    out, hf_model, hf_tok = exported
    assert type(hf_model).__name__ == "NanoChatForCausalLM" and hf_model.config.model_type == "nanochat"
    assert isinstance(hf_tok, PreTrainedTokenizerFast) and hf_tok.is_fast
    assert {p.name for p in out.iterdir()} >= {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                                               "tokenizer_config.json", "chat_template.jinja"}
    assert [hf_tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == [tokenizer.encode_special(t) for t in SPECIAL_TOKENS]
    assert len(hf_tok) == tokenizer.get_vocab_size()


def test_logits_equal(toy, exported, tmp_path):
    _, model, tokenizer = toy
    diff = max_logit_diff(model, exported[1], tokenizer.get_vocab_size())
    print(f"trained toy sft model {model.config}: max |logit difference| {diff:.2e}")
    assert diff < 1e-4
    from nanochat.toy import toy_gpt
    for kw in [dict(n_head=4, n_kv_head=2), dict(n_head=4, n_kv_head=1), dict(n_layer=3, n_embd=96, n_head=3, n_kv_head=3)]:
        ours = toy_gpt(vocab_size=tokenizer.get_vocab_size(), seed=1, **kw)
        theirs = AutoModelForCausalLM.from_pretrained(export_hf(ours, tokenizer, tmp_path / str(kw))).eval()
        diff = max_logit_diff(ours, theirs, tokenizer.get_vocab_size())
        print(f"random toy GPT {kw}: max |logit difference| {diff:.2e}")
        assert diff < 1e-4, kw


def test_greedy_generation_equals_engine(toy, exported):
    _, model, tokenizer = toy
    from nanochat.engine import Engine
    engine, hf_model = Engine(model, tokenizer), exported[1]
    python_end = tokenizer.encode_special("<|python_end|>")
    cut = lambda toks: toks[:toks.index(python_end) + 1] if python_end in toks else toks  # then the engine runs the calculator
    compared = 0
    for question in ["Why is the sky blue?", "What is 12 times 7?", "Tell me a joke.", "hello", "Write a haiku about rain."]:
        prompt = tokenizer.render_for_completion([{"role": "system", "content": "Be brief."}, {"role": "user", "content": question}])
        ours = [col[0] for col, _ in engine.generate(prompt, max_tokens=48, temperature=0)]
        theirs = hf_model.generate(torch.tensor([prompt]), max_new_tokens=48, do_sample=False)[0, len(prompt):].tolist()
        assert cut(theirs) == cut(ours), question
        compared += len(cut(ours))
    print(f"greedy: {compared} generated tokens compared, all equal")
    assert compared > 100


def test_chat_template_renders_our_ids(exported, toy):
    _, _, tokenizer = toy
    hf_tok = exported[2]
    ids = lambda msgs, **kw: hf_tok.apply_chat_template(msgs, tokenize=True, return_dict=True, **kw)["input_ids"]
    chat = [{"role": "system", "content": "You are a helpful assistant.\nAnswer in one line."},
            {"role": "user", "content": "Hi! What's 12*7?"},
            {"role": "assistant", "content": [{"type": "text", "text": "Let me check: "}, {"type": "python", "text": "12*7"},
                                              {"type": "python_output", "text": "84"}, {"type": "text", "text": "\n84."}]},
            {"role": "user", "content": "  And   in words?\n\n"},
            {"role": "assistant", "content": "Eighty-four."},
            {"role": "user", "content": "Thanks 🙂"}]
    for n in range(2, len(chat) + 1):
        assert ids(chat[:n], add_generation_prompt=True) == tokenizer.render_for_completion(chat[:n]), n
        assert ids(chat[:n]) == tokenizer.render_conversation(chat[:n], max_tokens=10**9)[0], n
    assert ids(chat[1:], add_generation_prompt=True) == tokenizer.render_for_completion(chat[1:])  # no system message
    assert ids(chat[:5], add_generation_prompt=True)[-1] == tokenizer.encode_special("<|assistant_start|>")
    for bad in [[], chat[:1], [chat[1], chat[1]], [chat[0], chat[4]], [chat[1], chat[4], chat[4], chat[1]], [chat[1], chat[0]]]:
        with pytest.raises(ValueError): tokenizer.render_for_completion(bad)
        with pytest.raises((ValueError, TemplateError)): hf_tok.apply_chat_template(bad, tokenize=False, add_generation_prompt=True)


# text the tokenizers are likely to disagree on if they disagree at all: any unicode, and pieces of it the split pattern
# cares about (whitespace runs, digits, contractions, letters after punctuation), and the special tokens
PIECES = ["  ", "   ", "\n", "\n\n", "\r\n", "\t", " \n ", "123456", "3.14", "'s", "'LL", "'ve", "!!", "...", "é", "漢字", "🙂",
          "the", " the", "ing", "Hello", "    x", *SPECIAL_TOKENS]
texts = st.lists(st.one_of(st.text(max_size=12), st.sampled_from(PIECES)), max_size=12).map("".join)


@settings(max_examples=1000, deadline=None)
@given(text=texts)
def test_tokenizer_encodes_like_ours(exported, toy, text):
    _, _, tokenizer = toy
    hf_tok = exported[2]
    ids = hf_tok(text)["input_ids"]
    assert ids == tokenizer.enc.encode(text, allowed_special="all")            # special tokens' text as special tokens
    plain = hf_tok(text, split_special_tokens=True)["input_ids"]
    assert plain == tokenizer.encode(text)                                     # ... or as text, like Tokenizer.encode
    assert hf_tok.decode(plain) == text == tokenizer.decode(plain)


@settings(max_examples=60, deadline=None)
@given(turns=st.lists(texts.filter(lambda t: "<|" not in t), min_size=1, max_size=5), system=st.none() | texts.filter(lambda t: "<|" not in t))
def test_chat_template_on_random_text(exported, toy, turns, system):
    _, _, tokenizer = toy
    msgs = ([{"role": "system", "content": system}] if system is not None else []) + \
           [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]
    got = exported[2].apply_chat_template(msgs, tokenize=True, return_dict=True, add_generation_prompt=True)["input_ids"]
    assert got == tokenizer.render_for_completion(msgs)


def test_round_trip_gives_the_same_weights(toy, exported, tmp_path):
    _, model, tokenizer = toy
    out = exported[0]
    stored = load_file(out / "model.safetensors")
    assert all(v.dtype == torch.float32 for v in stored.values()) and len(stored) == len(model.state_dict())
    back = import_hf(out)
    assert back.config == model.config
    assert all(torch.equal(back.state_dict()[k], v) for k, v in model.state_dict().items())
    # bfloat16: half the bytes, and the weights come back as the bf16 rounding of ours
    half = export_hf(model, tokenizer, tmp_path / "bf16", dtype=torch.bfloat16)
    assert all(v.dtype == torch.bfloat16 for v in load_file(half / "model.safetensors").values())
    back = import_hf(half)
    assert all(torch.equal(back.state_dict()[k], v.bfloat16().float()) for k, v in model.state_dict().items())


def export_cmd(base, *args, pre=""):
    "Run `python -m nanochat.export_hf ARGS` (after the Python statements `pre`) in NANOCHAT_BASE_DIR=base."
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base), PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    code = f"{pre}; import sys, runpy; sys.argv = ['export_hf', *{list(args)!r}]; runpy.run_module('nanochat.export_hf', run_name='__main__')"
    cmd = [sys.executable, "-m", "nanochat.export_hf", *args] if not pre else [sys.executable, "-c", code]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)


def test_command_end_to_end(toy, tmp_path):
    run, model, tokenizer = toy
    out = tmp_path / "nanochat-d2"
    r = export_cmd(run, "-i", "sft", "--out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("exported sft step ") and str(out) in r.stdout
    hf_model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert max_logit_diff(model, hf_model, tokenizer.get_vocab_size()) < 1e-4
    assert json.loads((out / "generation_config.json").read_text())["suppress_tokens"]  # a chat model
    # a folder that is not an export is refused, with one line and no traceback
    r = export_cmd(run, "-i", "sft", "-o", str(run / "tokenizer"))
    assert r.returncode == 1 and "is not an earlier export" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert (run / "tokenizer" / "tokenizer.json").exists()


def test_command_in_process(toy, tmp_path, monkeypatch, capsys):
    "The same entry point called from Python: the earlier export is replaced, a base model suppresses nothing, bad input is refused."
    run = toy[0]
    from fastcore.script import CliError
    from nanochat.export_hf import main
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(run))
    assert main.parse_args(["-i", "base", "-g", "d2", "-s", "60", "-o", "x", "--dtype", "bfloat16"]) == \
        dict(source="base", model_tag="d2", step=60, out="x", dtype="bfloat16")
    out = tmp_path / "model"
    main(source="sft", out=str(out))
    assert json.loads((out / "generation_config.json").read_text())["suppress_tokens"]  # a chat model
    main(source="base", model_tag="d2", out=str(out), dtype="bfloat16")
    assert "suppress_tokens" not in json.loads((out / "generation_config.json").read_text())
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert not list(tmp_path.glob(".*.tmp")), "the temporary folder was left behind"
    assert capsys.readouterr().out.count("exported ") == 2
    for kw, message in [(dict(), "--out DIR is required"), (dict(out=str(out), model_tag="d99"), "could not load the 'sft' model"),
                        (dict(out=str(out), dtype="float16"), "--dtype must be float32 or bfloat16")]:
        with pytest.raises(CliError, match=message): main(source="sft", **kw)


def test_without_transformers(toy, tmp_path):
    "A Python without transformers imports the module and gets one line saying what to install from the command."
    run = toy[0]
    r = export_cmd(run, "-i", "sft", "-o", str(tmp_path / "x"), pre="import sys; sys.modules['transformers'] = None")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.strip() == "exporting to Hugging Face needs transformers: pip install 'nanochat[hf]'"
    assert not (tmp_path / "x").exists()
