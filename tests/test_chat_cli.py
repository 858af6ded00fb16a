"""The terminal chat of lesson 17 (`python -m nanochat.chat_cli`) run as a real command in a subprocess, with a tiny
random model: `-p` answers one prompt (the same answer as the library gives in-process), the interactive mode works
when driven through stdin (turns, `clear`, `quit`, end of input), and bad arguments exit with a clear message."""
import os, subprocess, sys

import pytest

from test_chat_web import REPO, tiny_chat_base


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tiny_chat_base(tmp_path_factory.mktemp("clibase"))


def chat_cli(base, *args, stdin=""):
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base), PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "nanochat.chat_cli", "-i", "sft", "--device-type", "cpu", *args],
                          input=stdin, capture_output=True, text=True, env=env, timeout=120)


def test_one_prompt(base, monkeypatch):
    r = chat_cli(base, "-p", "Why is the sky blue?", "--seed", "3", "-t", "0.9", "-k", "20", "-g", "d2", "-s", "0",
                 "-m", "12")
    assert r.returncode == 0, r.stderr
    # the printed answer is exactly what the library answers in-process with the same settings and seed
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base))
    from nanochat.checkpoint_manager import load_model
    from nanochat.engine import ChatSession, Engine
    model, tokenizer, _ = load_model("sft", "cpu")
    session = ChatSession(Engine(model, tokenizer), tokenizer, temperature=0.9, top_k=20, max_tokens=12, seed=3)
    expected = session.send("Why is the sky blue?")
    assert expected and r.stdout == expected + "\n"


def test_interactive_session_through_stdin(base):
    r = chat_cli(base, "--max-new-tokens", "8", "--seed", "1", stdin="Hello there\n\nHow are you?\nclear\nWhat is 2+2?\nquit\nnever read\n")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert out.startswith("nanochat (sft, step 0, cpu)")
    assert out.count("User: ") == 6  # a prompt for each line up to `quit`; "never read" after it is not read
    assert out.count("Assistant: ") == 3 and "(new conversation)" in out
    # end of input (Ctrl-D) also ends the session cleanly
    r = chat_cli(base, "-m", "4", stdin="Hi\n")
    assert r.returncode == 0 and r.stdout.count("Assistant: ") == 1, r.stderr


def test_bad_arguments(base, monkeypatch):
    # as a command: exit status 1 and the message on stderr, no traceback
    r = chat_cli(base, "-g", "d99", "-p", "hi")
    assert r.returncode == 1 and "could not load the 'sft' model" in r.stderr and "d99" in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    # the same checks called from Python raise CliError (what the command turns into that exit)
    from fastcore.script import CliError
    from nanochat.chat_cli import main
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base))
    for kw, message in [(dict(temperature=-1), "--temperature must be >= 0"), (dict(top_k=-5), "--top-k must be >= 0"),
                        (dict(max_new_tokens=0), "--max-new-tokens must be >= 1"), (dict(step=7), "step 7"),
                        (dict(source="nope"), "unknown checkpoint source")]:
        with pytest.raises(CliError, match=message): main(prompt="hi", device_type="cpu", **kw)


def test_short_and_long_flags_name_the_same_arguments():
    "The command line's short and long flags give `main` the keyword arguments a Python caller would pass."
    from nanochat.chat_cli import main
    short = main.parse_args(["-i", "sft", "-g", "d4", "-s", "3", "-t", "0", "-k", "7", "-m", "9", "-p", "hi"])
    long = main.parse_args(["--source", "sft", "--model-tag", "d4", "--step", "3", "--temperature", "0", "--top-k", "7",
                            "--max-new-tokens", "9", "--prompt", "hi"])
    assert short == long == dict(source="sft", model_tag="d4", step=3, prompt="hi", temperature=0.0, top_k=7,
                                 max_new_tokens=9, device_type="", seed=None)
    assert all(k == k.lower() for k in short)  # snake_case names: no capital letters in the Python API
    help_text = main.parser().format_help()
    for flags in ("-i, --source", "-g, --model-tag", "-s, --step", "-p, --prompt", "-t, --temperature", "-k, --top-k",
                  "-m, --max-new-tokens"):
        assert flags in help_text, flags
