"""Tokenizer training speed: our Rust trainer against two baselines, on the same text.

    python benchmarks/tokenizer_train.py [--max-chars 25000000] [--vocab-size 4096] [--threads 2]

Trainers, each in its own subprocess (same thread count, no shared warm caches):
  ours            nanochat_rustbpe (rustbpe/ in this repo; `bash rustbpe/install.sh`)
  rustbpe(PyPI)   the `rustbpe` package from PyPI, nanochat's original trainer
  hf-tokenizers   HuggingFace `tokenizers` BPE with the same split regex, byte-level
All get the same texts (the pretraining shards of the offline mirror, read with pyarrow),
the same split pattern and the same vocabulary size. Reading the data is not timed. Each
trainer runs --repeats times, in interleaved rounds, and its best wall-clock time counts.
The last line printed is our speed ratio to each baseline.
"""
import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MIRROR = REPO.parent / "shared" / "hf-mirror"
SHARDS = "datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main"
TRAINERS = {"ours": "nanochat_rustbpe", "rustbpe(PyPI)": "rustbpe", "hf-tokenizers": "tokenizers"}
# nanochat's split pattern (nanochat_rustbpe.GPT4_SPLIT_PATTERN): GPT-4's, with \p{N}{1,2}
PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""


def load_texts(mirror, max_chars):
    "Whole documents from the shards, in order, until max_chars characters."
    import pyarrow.parquet as pq

    shards = sorted((Path(mirror) / SHARDS).glob("shard_*.parquet"))
    if not shards:
        sys.exit(f"no shards under {Path(mirror) / SHARDS}: pass --mirror")
    texts, n = [], 0
    for shard in shards:
        for doc in pq.read_table(shard, columns=["text"]).column("text").to_pylist():
            if n >= max_chars:
                return texts, n
            texts.append(doc)
            n += len(doc)
    return texts, n


def train_once(name, texts, vocab_size, pattern):
    "Train one tokenizer; returns (its vocabulary size, a digest of its vocabulary)."
    if name in ("ours", "rustbpe(PyPI)"):
        module = __import__(TRAINERS[name])
        tok = module.Tokenizer()
        tok.train_from_iterator(iter(texts), vocab_size, pattern=pattern)
        ranks = tok.get_mergeable_ranks()
        digest = hashlib.sha256(repr(ranks).encode()).hexdigest()[:12]
        return len(ranks), digest
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts, trainer)
    return tok.get_vocab_size(), "-"


def worker(args):
    "Runs in a subprocess: time one training run, print a JSON line."
    texts, n_chars = load_texts(args.mirror, args.max_chars)
    t0 = time.perf_counter()
    n_vocab, digest = train_once(args.worker, texts, args.vocab_size, PATTERN)
    seconds = time.perf_counter() - t0
    print(json.dumps({"seconds": seconds, "chars": n_chars, "docs": len(texts), "vocab": n_vocab, "digest": digest}))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mirror", default=str(DEFAULT_MIRROR), help="offline data mirror root")
    ap.add_argument("--max-chars", type=int, default=25_000_000, help="characters of text to train on")
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="threads for every trainer")
    ap.add_argument("--repeats", type=int, default=3, help="runs per trainer; the best one counts")
    ap.add_argument("--worker", choices=list(TRAINERS), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)

    env = dict(os.environ)
    threads = str(args.threads)
    # rayon (both Rust trainers; HF tokenizers also reads its own variable) and no BLAS
    # threads spinning in the background.
    env.update(RAYON_NUM_THREADS=threads, RAYON_RS_NUM_CPUS=threads, TOKENIZERS_PARALLELISM="true",
               OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    print(f"training BPE to vocab {args.vocab_size} on up to {args.max_chars:,} chars from {args.mirror}, "
          f"{args.threads} threads, best of {args.repeats}")
    results, failed = {}, set()
    # Rounds interleave the trainers so that background load, if any, hits them alike.
    for _ in range(args.repeats):
        for name, module in TRAINERS.items():
            if name in failed:
                continue
            cmd = [sys.executable, __file__, "--worker", name, "--mirror", args.mirror,
                   "--max-chars", str(args.max_chars), "--vocab-size", str(args.vocab_size)]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                reason = "not installed" if f"No module named '{module}'" in proc.stderr else "failed"
                print(f"  {name}: {reason}\n{proc.stderr.strip()[-2000:]}", file=sys.stderr)
                failed.add(name)
                continue
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            if name not in results or r["seconds"] < results[name]["seconds"]:
                results[name] = r

    if not results:
        sys.exit("no trainer ran")
    first = next(iter(results.values()))
    print(f"text: {first['chars']:,} chars in {first['docs']:,} documents")
    print(f"{'trainer':<15} {'seconds':>8} {'chars/s':>12} {'vocab':>6}  vocab digest")
    for name, r in results.items():
        print(f"{name:<15} {r['seconds']:>8.3f} {r['chars'] / r['seconds'] / 1e6:>10.2f} M {r['vocab']:>6}  {r['digest']}")
    if "ours" in results:
        ratios = [f"ours/{name}={r['seconds'] / results['ours']['seconds']:.2f}x"
                  for name, r in results.items() if name != "ours"]
        # speed ratio = baseline seconds / our seconds (above 1: we are faster)
        print("ratio " + " ".join(ratios) if ratios else "ratio: no baseline ran")


if __name__ == "__main__":
    main()
