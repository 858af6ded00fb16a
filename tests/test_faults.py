"""Faults a training run must survive or report in one clear line: damaged checkpoints, bad shards, a full disk, bad
flags. Each test stages the fault for real (flipped bytes, a truncated or corrupted parquet file, a size-limited tmpfs)
against base_train run as a subprocess in a fresh NANOCHAT_BASE_DIR, and checks what the user sees and what is left
on disk.
"""
import os, sys, shutil, subprocess
from pathlib import Path
from unittest import mock
import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--depth=2", "--max-seq-len=64", "--device-batch-size=2", "--total-batch-size=128", "--device-type=cpu",
        "--sample-every=0", "--eval-tokens=512"]


@pytest.fixture(scope="module")
def data(endpoint, tmp_path_factory):
    "Shards and a 512-token tokenizer, downloaded and trained once; each test gets its own copy (some damage them)."
    base = tmp_path_factory.mktemp("faults_data")
    with mock.patch.dict(os.environ, HF_ENDPOINT=endpoint, NANOCHAT_BASE_DIR=str(base), NANOCHAT_NUM_SHARDS="4"):
        from nanochat.dataset import download_shards, iter_texts
        from nanochat.tokenizer import Tokenizer
        download_shards(2)
        Tokenizer.train_from_iterator(iter_texts("train", max_chars=200_000), vocab_size=512).save(base / "tokenizer")
    return base


@pytest.fixture
def env(data, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(data, base)
    return dict(os.environ, NANOCHAT_BASE_DIR=str(base), NANOCHAT_NUM_SHARDS="4", OMP_NUM_THREADS="1",
                PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))


def train(env, *args, ok=True):
    r = subprocess.run([sys.executable, "-m", "nanochat.base_train", *TINY, *args], env=env, cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    if ok: assert r.returncode == 0, f"base_train failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def one_line_error(r) -> str:
    "A failed run's error: exactly one line on stderr and no traceback."
    assert r.returncode != 0, r.stdout[-2000:]
    err = [l for l in r.stderr.splitlines() if l.strip() and not l.startswith("AdamW lr scale")]
    assert "Traceback" not in r.stderr and len(err) == 1, r.stderr[-3000:]
    return err[0]


def ckpt(env, tag="d2") -> Path: return Path(env["NANOCHAT_BASE_DIR"]) / "base_checkpoints" / tag


# ---- 5. silent checkpoint corruption

def flip(path: Path, offset: int, n: int = 4, zero: bool = False):
    raw = bytearray(path.read_bytes())
    raw[offset:offset + n] = bytes(n) if zero else bytes(b ^ 0xFF for b in raw[offset:offset + n])
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("what", ["model", "optim"])
def test_resume_refuses_a_damaged_checkpoint_and_names_the_step_to_fall_back_to(env, what):
    train(env, "--num-iterations=6", "--save-every=3", "--eval-every=-1")
    if what == "model": flip(ckpt(env) / "model_000006.pt", (ckpt(env) / "model_000006.pt").stat().st_size // 2)  # 4 bytes of a weight
    else: flip(ckpt(env) / "optim_000006_rank0.pt", (ckpt(env) / "optim_000006_rank0.pt").stat().st_size // 2, 4096, zero=True)
    bad = f"{what}_000006{'_rank0' if what == 'optim' else ''}.pt"
    line = one_line_error(train(env, "--num-iterations=6", "--save-every=3", "--eval-every=-1", "--resume", ok=False))
    assert bad in line and "corrupted" in line and "--resume-step=3" in line, line
    # asked to, it falls back to step 3, says so, and finishes the run
    r = train(env, "--num-iterations=6", "--save-every=3", "--eval-every=-1", "--resume", "--resume-step=3")
    assert f"resuming {ckpt(env)} from step 3" in r.stdout
    from nanochat.checkpoint_manager import verify_checkpoint
    assert verify_checkpoint(ckpt(env), 6) == []  # step 6 was saved again, whole


# ---- 6. a bad validation shard must not throw the run away

@pytest.mark.parametrize("fault", ["empty", "missing", "num_shards_unset"])
def test_a_bad_validation_shard_is_refused_before_training(env, fault):
    val = Path(env["NANOCHAT_BASE_DIR"]) / "base_data" / "shard_00003.parquet"
    if fault == "empty": val.write_bytes(b"")
    elif fault == "missing": val.unlink()
    else: env = {k: v for k, v in env.items() if k != "NANOCHAT_NUM_SHARDS"}  # against a 4-shard mirror: expects shard_01822
    r = train(env, "--num-iterations=4", "--eval-every=-1", ok=False)
    line = one_line_error(r)
    assert ("shard_00003.parquet" in line or "shard_01822.parquet" in line) and "step 00001" not in r.stdout, line
    assert "python -m nanochat.dataset" in line


def test_a_failing_final_evaluation_loses_no_weights(env):
    "Whatever breaks at the last evaluation, the final checkpoint is already on disk."
    code = ("import sys, runpy; import nanochat.loss_eval as le, nanochat.train_loop as tl\n"
            "def boom(*a, **k): raise RuntimeError('the evaluation broke')\n"
            "tl.evaluate_bpb = boom\n"
            f"sys.argv = ['base_train', *{TINY + ['--num-iterations=4', '--eval-every=-1']!r}]\n"
            "runpy.run_module('nanochat.base_train', run_name='__main__')")
    r = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "the evaluation broke" in r.stderr, r.stderr[-2000:]
    from nanochat.checkpoint_manager import find_last_step, verify_checkpoint
    assert find_last_step(ckpt(env)) == 4 and verify_checkpoint(ckpt(env), 4) == []


# ---- 7. a damaged training shard: which file, what is wrong, how to get it again

def damage_data_pages(path: Path):
    "Overwrite bytes inside the first column chunk's data: the footer stays valid, decompression fails."
    import pyarrow.parquet as pq
    col = pq.ParquetFile(path).metadata.row_group(0).column(0)
    start = col.data_page_offset
    flip(path, start + 64, 256, zero=True)


@pytest.mark.parametrize("fault", ["magic", "pages"])
def test_a_damaged_training_shard_is_named(env, fault):
    shard = Path(env["NANOCHAT_BASE_DIR"]) / "base_data" / "shard_00000.parquet"
    if fault == "magic": flip(shard, 0)  # "Parquet magic bytes not found": caught by the start-up check
    else: damage_data_pages(shard)       # only reading the data finds it
    line = one_line_error(train(env, "--num-iterations=4", "--eval-every=-1", ok=False))
    assert "shard_00000.parquet" in line and "download" in line and "python -m nanochat.dataset" in line, line


# ---- 8. a full disk during a save

def test_a_full_disk_gives_one_line_and_leaves_no_partial_files(env, tmp_path):
    "A small tmpfs (in a private mount namespace), filled up to ~4 MB free: room for the data and the tokenizer, not a checkpoint."
    unshare = shutil.which("unshare")
    probe = subprocess.run([unshare or "unshare", "--user", "--map-root-user", "--mount", "true"], capture_output=True) if unshare else None
    if probe is None or probe.returncode: pytest.skip("no unprivileged mount namespaces here (unshare --user --mount)")
    small = tmp_path / "small"; small.mkdir()
    base = Path(env["NANOCHAT_BASE_DIR"])
    script = tmp_path / "run.sh"
    script.write_text(f"""set -e
mount -t tmpfs -o size=24m tmpfs {small}
mkdir {small}/base && cp -r {base}/tokenizer {small}/base/
mkdir {small}/base/base_data && cp {base}/base_data/shard_00000.parquet {base}/base_data/shard_00003.parquet {small}/base/base_data/
head -c $(( $(df --output=avail -B1 {small} | tail -1) - 4000000 )) /dev/zero > {small}/filler  # leave ~4 MB: less than a checkpoint
set +e
NANOCHAT_BASE_DIR={small}/base {sys.executable} -m nanochat.base_train {' '.join(TINY)} --depth=4 --num-iterations=2 --eval-every=-1 \\
  > {tmp_path}/out 2> {tmp_path}/err
echo $? > {tmp_path}/rc
ls -a {small}/base/base_checkpoints/d4 > {tmp_path}/left 2>/dev/null || true
""")
    r = subprocess.run([unshare, "--user", "--map-root-user", "--mount", "bash", str(script)], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    rc, err = int((tmp_path / "rc").read_text()), (tmp_path / "err").read_text()
    class R: returncode, stderr, stdout = rc, err, (tmp_path / "out").read_text()
    line = one_line_error(R)
    assert "could not save checkpoint step 2" in line and "disk is full" in line and "MB needed" in line, line
    left = [f for f in (tmp_path / "left").read_text().split() if f not in (".", "..")]
    assert left == [], f"the failed save left {left} on the full disk"


# ---- 9. bad flags: one line, not a traceback; no writing outside the checkpoint folder

@pytest.mark.parametrize("flags, expect", [(["--device-type=tpu"], "--device-type must be cuda, mps or cpu"),
                                           (["--model-tag=../../x"], "not a plain folder name"),
                                           (["--model-tag=OUTSIDE"], "not a plain folder name")])
def test_bad_flags_are_one_line(env, tmp_path, flags, expect):
    outside = tmp_path / "outside"  # an absolute tag: checkpoints would land there
    line = one_line_error(train(env, "--num-iterations=2", *[f.replace("OUTSIDE", str(outside)) for f in flags], ok=False))
    assert expect in line, line
    assert not (Path(env["NANOCHAT_BASE_DIR"]).parent / "x").exists() and not outside.exists()
