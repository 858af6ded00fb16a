"""The whole course pipeline end to end on CPU, as a user runs it: tok_train -> base_train -> mid_train -> chat_sft ->
chat_rl -> chat_eval, each a `python -m nanochat.X` subprocess reading the checkpoint the previous one wrote.

Data comes from $HF_ENDPOINT, or from a loopback server over ../shared/hf-mirror started here (NANOCHAT_NUM_SHARDS=4:
the mirror's 3 train shards and the validation shard); everything is written under a temporary NANOCHAT_BASE_DIR.
Settings are tiny (depth 2, 64-token rows, a 512-token vocabulary, a few steps per stage): this checks that the stages
fit together, not that the model learns.
"""
import os, sys, json, time, subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


# `endpoint` (HF_ENDPOINT or the loopback mirror) comes from conftest.py


# (module, flags, what its log must say about where it loaded from, the files it must leave behind)
PIPELINE = [
    ("nanochat.dataset", ["-n", "1"], None, ["base_data/shard_00000.parquet", "base_data/shard_00003.parquet"]),
    ("nanochat.tok_train", ["--max-chars=300000", "--vocab-size=512"], None, ["tokenizer/tokenizer.bpe", "tokenizer/token_bytes.pt"]),
    ("nanochat.base_train", ["--device-type=cpu", "--depth=2", "--max-seq-len=64", "--device-batch-size=4", "--total-batch-size=-1",
                             "--num-iterations=20", "--eval-every=-1", "--eval-tokens=1024", "--sample-every=0"],
     None, ["base_checkpoints/d2/model_000020.pt", "base_checkpoints/d2/meta_000020.json"]),
    ("nanochat.mid_train", ["--device-type=cpu", "--num-iterations=10", "--eval-every=-1", "--eval-tokens=1024"],
     "loaded base model d2 step 20 from {base}/base_checkpoints/d2", ["mid_checkpoints/d2/model_000010.pt", "mid_checkpoints/d2/meta_000010.json"]),
    ("nanochat.chat_sft", ["--device-type=cpu", "--num-iterations=10", "--device-batch-size=4", "--target-examples-per-step=4", "--eval-every=-1",
                           "--eval-steps=4", "--eval-metrics-every=-1", "--eval-metrics-max-problems=8"],
     "loaded mid model d2 step 10 from {base}/mid_checkpoints/d2", ["chatsft_checkpoints/d2/model_000010.pt", "chatsft_checkpoints/d2/meta_000010.json"]),
    ("nanochat.chat_rl", ["--device-type=cpu", "--num-iterations=2", "--examples-per-step=2", "--num-samples=2", "--device-batch-size=2",
                          "--max-new-tokens=16", "--eval-every=-1", "--eval-examples=2", "--eval-samples=2"],
     "loaded sft model d2 step 10 from {base}/chatsft_checkpoints/d2", ["chatrl_checkpoints/d2/model_000002.pt", "chatrl_checkpoints/d2/meta_000002.json"]),
    ("nanochat.chat_eval", ["--device-type=cpu", "-i", "rl", "-a", "ARC-Easy|GSM8K", "-x", "4", "-m", "16"],
     "chat eval of rl/d2 step 2", ["chat_eval/rl_d2.json"]),
]


def test_pipeline_end_to_end(endpoint, tmp_path):
    base = tmp_path / "base"
    env = dict(os.environ, HF_ENDPOINT=endpoint, NANOCHAT_BASE_DIR=str(base), NANOCHAT_NUM_SHARDS="4", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    times = {}
    for module, flags, loaded, files in PIPELINE:
        assert not any((base / f).exists() for f in files), f"{module}'s outputs exist before it ran"
        t0 = time.time()
        r = subprocess.run([sys.executable, "-m", module, *flags], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
        times[module] = round(time.time() - t0, 1)
        assert r.returncode == 0, f"{module} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
        for f in files: assert (base / f).is_file(), f"{module} did not write {f}"
        if loaded: assert loaded.format(base=base) in r.stdout, f"{module} doesn't say it loaded {loaded!r}:\n{r.stdout[-2000:]}"
    # each stage's checkpoint records the one it started from
    for stage, (src, step) in {"mid_checkpoints": ("base", 20), "chatsft_checkpoints": ("mid", 10), "chatrl_checkpoints": ("sft", 10)}.items():
        meta = json.loads(next((base / stage / "d2").glob("meta_*.json")).read_text())
        assert meta["derived"]["source"] == dict(source=src, step=step), (stage, meta["derived"]["source"])
    report = json.loads((base / "chat_eval" / "rl_d2.json").read_text())
    assert set(report["results"]) == {"ARC-Easy", "GSM8K"} and all(0 <= v <= 1 for v in report["results"].values())
    # and each stage wrote its section of the report card, with the summary its main() returned
    for section in ("base-model-training", "midtraining", "chat-sft", "chat-rl", "chat-evaluation-rl"):
        assert (base / "report" / f"{section}.md").is_file(), f"no report section {section}"
    assert json.loads((base / "report" / "chat-rl.json").read_text())["steps"] == 2
    print(times)
