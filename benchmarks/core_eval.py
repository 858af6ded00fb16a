"""CORE evaluation speed: examples per second of nanochat.core_eval, against a naive baseline, on the same examples.

    python benchmarks/core_eval.py [--depth 4] [--vocab-size 8192] [--max-per-task 5] [--device cpu] [--threads 0]
    python benchmarks/core_eval.py --depth 20 --vocab-size 65536 --max-per-task 200 --device cuda   # on a GPU

Both score every example of `--max-per-task` items per CORE task (the same deterministic sample evaluate_core takes):
  batched   nanochat.core_eval.evaluate_task: all options of an example in one padded forward pass
  naive     one forward pass per option (the same prompts, tokens and crops; no padding)
and must make the same predictions. The model is a random-init GPT of `--depth` (speed does not depend on the
weights), the tokenizer is trained here on the pretraining shards (not timed). The bundle comes from
$NANOCHAT_EVAL_BUNDLE_URL, or from a loopback server over ../shared/hf-mirror (18 of the 22 tasks). Prints
examples/s per task type and overall, the projected time of a full CORE run, and the batched/naive ratio last.
"""
import argparse, functools, http.server, os, random, sys, tempfile, threading, time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MIRROR = REPO.parent / "shared" / "hf-mirror"
SHARDS = "datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main"


def serve_mirror():
    "Serve the offline mirror on loopback; returns its base URL."
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *a): pass
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(MIRROR)))
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{srv.server_port}"


def shard_texts(max_chars):
    import pyarrow.parquet as pq
    texts, n = [], 0
    for shard in sorted((MIRROR / SHARDS).glob("shard_*.parquet")):
        for doc in pq.read_table(shard, columns=["text"]).column("text").to_pylist():
            if n >= max_chars: return texts
            texts.append(doc); n += len(doc)
    if not texts: sys.exit(f"no shards under {MIRROR / SHARDS}")
    return texts


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--max-per-task", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--seq-len", type=int, default=2048)
    args = ap.parse_args()

    os.environ.setdefault("NANOCHAT_BASE_DIR", tempfile.mkdtemp(prefix="bench_core_"))
    if not os.environ.get("NANOCHAT_EVAL_BUNDLE_URL"):
        os.environ["NANOCHAT_EVAL_BUNDLE_URL"] = f"{serve_mirror()}/s3/karpathy-public/eval_bundle.zip"
    import torch
    import torch.nn.functional as F
    from nanochat.common import autocast_ctx
    from nanochat.tokenizer import Tokenizer
    from nanochat.gpt import GPT, GPTConfig
    from nanochat.core_eval import (get_eval_bundle, load_core_tasks, load_task_data, evaluate_task, prepare_example,
                                    evaluate_example)
    if args.threads: torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    bundle = get_eval_bundle()
    tasks = load_core_tasks(bundle)
    full = {t["label"]: load_task_data(bundle, t) for t in tasks}
    sample = {}
    for t in tasks:
        data = list(full[t["label"]])
        random.Random(1337).shuffle(data)  # the sample evaluate_core takes
        sample[t["label"]] = data[:args.max_per_task]
    t0 = time.time()
    tok = Tokenizer.train_from_iterator(iter(shard_texts(5_000_000)), vocab_size=args.vocab_size)
    print(f"tokenizer: {tok.get_vocab_size()} tokens, trained in {time.time() - t0:.1f}s (not timed below)")
    cfg = GPTConfig.from_depth(args.depth, vocab_size=tok.get_vocab_size(), sequence_len=args.seq_len)
    torch.manual_seed(0)
    with torch.device("meta"): model = GPT(cfg)
    model.to_empty(device=device); model.init_weights(); model.eval()

    @torch.no_grad()
    def naive_example(idx, data, meta):
        "One forward pass per option; the same decision rule."
        seqs, starts, ends = prepare_example(idx, tok, data, meta, cfg.sequence_len)
        losses, hits = [], []
        for s, a, b in zip(seqs, starts, ends):
            ids = torch.tensor([s], device=device)
            with autocast_ctx(device.type): logits = model(ids)[0].float()
            tgt = ids[0, a:b]
            losses.append(F.cross_entropy(logits[a - 1:b - 1], tgt).item())
            hits.append(bool((logits[a - 1:b - 1].argmax(-1) == tgt).all()))
        if meta["task_type"] == "language_modeling": return hits[0]
        return min(range(len(losses)), key=losses.__getitem__) == data[idx]["gold"]

    def sync():
        if device.type == "cuda": torch.cuda.synchronize()

    # warm-up (allocator, kernels) on one example of each type
    for t in tasks[:1] + [t for t in tasks if t["task_type"] == "schema"][:1] + [t for t in tasks if t["task_type"] == "multiple_choice"][:1]:
        evaluate_example(0, model, tok, sample[t["label"]], device, t); naive_example(0, sample[t["label"]], t)

    rows = {k: dict(n=0, tokens=0, batched=0.0, naive=0.0) for k in ("multiple_choice", "schema", "language_modeling")}
    for t in tasks:
        data, r = sample[t["label"]], rows[t["task_type"]]
        r["tokens"] += sum(len(s) for i in range(len(data)) for s in prepare_example(i, tok, data, t, cfg.sequence_len)[0])
        sync(); t1 = time.perf_counter()
        acc, items = evaluate_task(model, tok, data, device, t, return_items=True)
        sync(); t2 = time.perf_counter()
        naive = [naive_example(i, data, t) for i in range(len(data))]
        sync(); t3 = time.perf_counter()
        assert naive == items, f"{t['label']}: naive and batched predictions differ"
        r["n"] += len(data); r["batched"] += t2 - t1; r["naive"] += t3 - t2

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads, load avg {load:.1f})"
    print(f"d{args.depth} ({model.num_params() / 1e6:.1f}M params, vocab {tok.get_vocab_size()}, seq_len {cfg.sequence_len}) "
          f"on {name}; {args.max_per_task} examples per task, {len(tasks)} tasks")
    print(f"{'task type':<18} {'examples':>8} {'tok/ex':>7} {'batched ex/s':>13} {'naive ex/s':>11} {'ratio':>6}")
    tot = dict(n=0, tokens=0, batched=0.0, naive=0.0)
    for k, r in rows.items():
        for f in tot: tot[f] += r[f]
        if r["n"]: print(f"{k:<18} {r['n']:>8} {r['tokens'] / r['n']:>7.0f} {r['n'] / r['batched']:>13.1f} {r['n'] / r['naive']:>11.1f} "
                         f"{r['naive'] / r['batched']:>5.2f}x")
    rate = tot["n"] / tot["batched"]
    print(f"{'all':<18} {tot['n']:>8} {tot['tokens'] / tot['n']:>7.0f} {rate:>13.1f} {tot['n'] / tot['naive']:>11.1f} "
          f"{tot['naive'] / tot['batched']:>5.2f}x")
    n_full = sum(map(len, full.values()))
    print(f"projected full CORE ({n_full:,} examples in this bundle) at the batched rate: {n_full / rate / 60:.1f} min on 1 device "
          "(task mix differs from the sample; a rough figure)")
    print(f"batched vs naive (one forward per option): {tot['naive'] / tot['batched']:.2f}x faster")


if __name__ == "__main__":
    main()
