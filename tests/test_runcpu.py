"The README's main command in its reduced mode (QUICK=1, RL on): every stage runs on the mirror and the report card has its summary."
import os, re, subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def umask() -> int:
    mask = os.umask(0); os.umask(mask)
    return mask


def test_runcpu_quick_end_to_end(endpoint, tmp_path):
    env = dict(os.environ, QUICK="1", WITH_RL="1", HF_ENDPOINT=endpoint, NANOCHAT_BASE_DIR=str(tmp_path / "base"),
               NANOCHAT_EVAL_BUNDLE_URL=f"{endpoint}/s3/karpathy-public/eval_bundle.zip", OMP_NUM_THREADS="2")
    if not os.environ.get("HF_ENDPOINT"): env["NANOCHAT_NUM_SHARDS"] = "4"
    users = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in [ROOT / "report.md"] if p.exists()}  # a user's own run's card
    r = subprocess.run(["bash", str(ROOT / "scripts" / "runcpu.sh")], env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert users == {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in [ROOT / "report.md"] if p.exists()}, "the test run touched ./report.md"
    copy = Path(os.environ["NANOCHAT_REPORT_COPY"])  # conftest.py points copies there
    assert "## Summary" in (copy / "report.md").read_text() and (copy / "report_files" / "curves.png").exists()
    assert oct((copy / "report.md").stat().st_mode & 0o777) == oct(0o666 & ~umask())  # atomic writes get the usual permissions
    report = (tmp_path / "base" / "report" / "report.md").read_text()
    summary = report[report.index("## Summary"):]
    for metric in ["CORE", "ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "ChatCORE"]:
        row = re.search(rf"^\| {re.escape(metric)} \|(.*)\|$", summary, re.M)
        assert row, f"summary table has no {metric} row"
        cells = [c.strip() for c in row.group(1).split("|")]
        assert len(cells) == 4, row.group(0)
    core = re.search(r"^\| CORE \| (\S+) \|", summary, re.M).group(1)
    assert core != "-", "the base model's CORE is missing"
    for metric in ["ARC-Easy", "MMLU", "ChatCORE"]:  # measured for MID and SFT in the quick run
        mid, sft = [c.strip() for c in re.search(rf"^\| {metric} \|(.*)\|$", summary, re.M).group(1).split("|")][1:3]
        assert mid != "-" and sft != "-", (metric, mid, sft)
    gsm_rl = [c.strip() for c in re.search(r"^\| GSM8K \|(.*)\|$", summary, re.M).group(1).split("|")][3]
    assert gsm_rl != "-", "the RL stage's GSM8K is missing"
    for section in ["## Tokenizer training", "## Base model training", "## Base model evaluation", "## Midtraining",
                    "## Chat sft", "## Chat rl", "## Chat evaluation sft"]:
        assert section.lower() in report.lower(), section
    assert (tmp_path / "base" / "report" / "curves.png").stat().st_size > 1000
    assert "python -m nanochat.chat_cli -i sft" in r.stdout  # it ends by saying how to talk to the model
