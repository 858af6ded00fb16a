"""The GPU run recipes (scripts/speedrun.sh, scripts/run1000.sh) can't run here, so this checks what can drift from the
code without a GPU: bash syntax; every `-m nanochat.X` they launch exists and accepts the flags they pass (parsed by the
entry point's own parser); the torchrun launcher flags, single- and multi-node, are valid torchrun flags; and
the numbers quoted in their header comments are exactly what their `plan` prints today."""
import importlib, importlib.util, re, shlex, subprocess, sys
from pathlib import Path

import pytest
from fastcore.script import anno_parser

ROOT = Path(__file__).resolve().parents[1]
SPEEDRUN, RUN1000 = ROOT / "scripts" / "speedrun.sh", ROOT / "scripts" / "run1000.sh"
RECIPES = [SPEEDRUN, RUN1000]
ids = [p.name for p in RECIPES]


def settings(script: Path) -> dict:
    "The recipe's DEPTH/NUM_SHARDS/MAX_DEVICE_BATCH/MFU: speedrun.sh's defaults, or what run1000.sh passes to it."
    text, body = script.read_text(), SPEEDRUN.read_text()
    out = {k: m.group(1) for k in ("DEPTH", "NUM_SHARDS", "MAX_DEVICE_BATCH", "MFU")
           if (m := re.search(rf'^{k}=(?:"\$\{{{k}:-)?([\d.]+)', body, re.M))}
    if script != SPEEDRUN: out.update(re.findall(r"\b(DEPTH|NUM_SHARDS|MAX_DEVICE_BATCH)=(\d+)", code_lines(text)[-1]))
    return out


def code_lines(text: str):
    "The script's command lines: continuations joined; comments (whole-line and trailing), echo lines and heredoc bodies dropped."
    lines, heredoc = [], None
    for line in text.replace("\\\n", " ").splitlines():
        s = line.strip()
        if heredoc:
            if s == heredoc: heredoc = None
            continue
        if m := re.search(r"<<-?\s*'?(\w+)'?", s): heredoc = m.group(1)
        s = re.sub(r"\s+#\s.*$", "", s)  # a trailing comment (our scripts put no ' # ' inside strings)
        if s and not s.startswith(("#", "echo ")): lines.append(s)
    return lines


def cli_parser(main):
    "The parser an entry point's command line uses: nanochat.common's `call_parse` keeps it (short flags included), else fastcore's."
    return main.parser() if hasattr(main, "parser") else anno_parser(main)


def nanochat_calls(text: str) -> list:
    "(module, args) for every `-m nanochat.X ...` command; shell variables become `1` (valid for str, int and float)."
    calls = []
    for s in code_lines(text):
        if not (m := re.search(r"-m\s+(nanochat\.\w+)(.*)$", s)): continue
        args = re.sub(r'"?\$\{?\w+\}?"?', "1", m.group(2)).strip().rstrip("&").strip()
        args = shlex.split(args)
        calls.append((m.group(1), args[1:] if args[:1] == ["--"] else args))
    return calls


@pytest.mark.parametrize("script", RECIPES, ids=ids)
def test_bash_syntax(script):
    r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_run1000_is_speedrun_at_depth_32():
    last = code_lines(RUN1000.read_text())[-1]
    assert "exec bash" in last and "speedrun.sh" in last, last
    assert settings(RUN1000)["DEPTH"] == "32" and settings(SPEEDRUN)["DEPTH"] == "20"


@pytest.mark.parametrize("script", [SPEEDRUN], ids=["speedrun.sh"])
def test_entry_points_and_flags_exist(script):
    text = script.read_text()
    calls = nanochat_calls(text)
    modules = {m for m, _ in calls}
    # the whole pipeline must be there, so that a parser that finds nothing can't pass
    assert {"nanochat.report", "nanochat.dataset", "nanochat.tok_train", "nanochat.core_eval", "nanochat.base_train",
            "nanochat.base_eval", "nanochat.mid_train", "nanochat.chat_sft", "nanochat.chat_rl", "nanochat.chat_eval"} <= modules
    for mod in set(re.findall(r"-m\s+(nanochat\.[a-z_]+)\b", text)):  # comments too ("nanochat.X" is a placeholder)
        assert importlib.util.find_spec(mod), f"{script.name} mentions {mod}, which does not exist"
    for mod, args in calls:
        parser = cli_parser(importlib.import_module(mod).main)
        parser.exit_on_error = False
        try: parser.parse_args(args)
        except (SystemExit, Exception) as e:
            pytest.fail(f"{script.name}: `{mod} {' '.join(args)}` is not accepted by {mod}'s command line: {e}")


def test_flag_check_catches_drift():
    "The check above fails on a flag an entry point doesn't have (or it would prove nothing)."
    (mod, args), = nanochat_calls('launch -m nanochat.base_train -- --depth="$DEPTH" --no-such-flag=3\n')
    assert args == ["--depth=1", "--no-such-flag=3"]
    with pytest.raises(SystemExit): cli_parser(importlib.import_module(mod).main).parse_args(args)
    (mod, args), = nanochat_calls('launch -m nanochat.chat_eval -- --kind=sft -i sft\n')  # a renamed flag is drift too
    cli_parser(importlib.import_module(mod).main).parse_args(args[1:])
    with pytest.raises(SystemExit): cli_parser(importlib.import_module(mod).main).parse_args(args)


def launcher_args(script: Path, env: str) -> list:
    "The arguments the script's `launch` function hands to torchrun, with `env` set (torchrun replaced by an echo)."
    fn = re.search(r"^launch\(\) \{.*?^\}", script.read_text(), re.S | re.M).group(0)
    prog = f"{env}\nLAUNCHES=0\ntorchrun() {{ printf '%s\\n' \"$@\"; }}\n{fn}\nlaunch -m nanochat.base_train -- --depth=20\n"
    r = subprocess.run(["bash", "-c", prog], capture_output=True, text=True, check=True)
    return r.stdout.splitlines()


@pytest.mark.parametrize("script", [SPEEDRUN], ids=["speedrun.sh"])
def test_torchrun_launcher(script):
    from torch.distributed.run import get_args_parser
    one = get_args_parser().parse_args(launcher_args(script, "NNODES=1 NPROC_PER_NODE=8"))
    assert one.standalone and one.nproc_per_node == "8" and one.module and one.training_script == "nanochat.base_train"
    assert one.training_script_args == ["--depth=20"]
    many = get_args_parser().parse_args(launcher_args(
        script, "NNODES=4 NODE_RANK=2 NPROC_PER_NODE=8 MASTER_ADDR=10.1.2.3 MASTER_PORT=29500 RUN_ID=t JOIN_TIMEOUT=60"))
    assert not many.standalone and many.nnodes == "4" and many.node_rank == 2 and many.nproc_per_node == "8"
    assert many.rdzv_backend == "c10d" and many.rdzv_endpoint == "10.1.2.3:29501" and many.rdzv_id == "t-1"
    assert many.rdzv_conf == "join_timeout=60" and many.training_script_args == ["--depth=20"]


@pytest.mark.parametrize("script", RECIPES, ids=ids)
def test_header_numbers_are_the_plans(script):
    "Every line the plan prints for the script's defaults is quoted in its header, so the comments can't go stale."
    text = script.read_text()
    plan = re.search(r"<<'PLAN'\n(.*?)\nPLAN\n", SPEEDRUN.read_text(), re.S).group(1)
    var = settings(script).__getitem__
    gpus, rows = 8, 256 // 8  # one node of 8 GPUs; 524,288 tokens = 256 rows of 2048
    dbs = min(rows, int(var("MAX_DEVICE_BATCH")))
    r = subprocess.run([sys.executable, "-", var("DEPTH"), var("NUM_SHARDS"), str(dbs), str(gpus), var("MFU")],
                       input=plan, capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    out = r.stdout.strip().splitlines()
    assert len(out) >= 7 and not any("WARNING" in l for l in out), r.stdout
    for line in out:
        assert f"#   {line}\n" in text, f"{script.name}'s header does not quote this line of its plan:\n{line}"
