"""Inference speed of nanochat.engine (lesson 12): prefill tokens/s, time to first token (TTFT) and decode tokens/s at
batch 1 and 8, for the KV-cached `Engine` and, in the same run, the naive no-cache sampler (the algorithm of
`GPT.generate`: rerun the whole sequence for every new token, batched here). The last line prints the speed-ups.

Models are random-init (speed does not depend on the weights) with the real vocabulary size, 65,536, and a stand-in
tokenizer of that size (256 bytes + byte pairs + the 9 special tokens). The special tokens' head rows are zeroed so
greedy decoding never stops early or opens a tool call: every run decodes exactly --new-tokens steps. Decoding is
greedy, so the cached and naive token streams are also compared (they must be equal).

    python benchmarks/inference.py                       # d4 and d6 on CPU (and d20 on CUDA when there is a GPU)
    python benchmarks/inference.py --depths 4 --threads 1
"""
import argparse, os, statistics, time

import tiktoken
import torch

from nanochat.common import autocast_ctx
from nanochat.engine import Engine
from nanochat.gpt import GPT, GPTConfig, KVCache
from nanochat.tokenizer import SPECIAL_TOKENS, SPLIT_PATTERN, Tokenizer

VOCAB = 65536


def standin_tokenizer(vocab_size: int = VOCAB) -> Tokenizer:
    "A tokenizer of the real size without training one: all single bytes, then byte pairs, then the special tokens."
    ranks = {bytes([i]): i for i in range(256)}
    pairs = (bytes([a, b]) for a in range(256) for b in range(256))
    for r, p in zip(range(256, vocab_size - len(SPECIAL_TOKENS)), pairs): ranks[p] = r
    specials = {s: len(ranks) + i for i, s in enumerate(SPECIAL_TOKENS)}
    return Tokenizer(tiktoken.Encoding("standin", pat_str=SPLIT_PATTERN, mergeable_ranks=ranks, special_tokens=specials))


def random_model(depth: int, tok: Tokenizer, device: str) -> GPT:
    cfg = GPTConfig.from_depth(depth, vocab_size=VOCAB)
    with torch.device("meta"): model = GPT(cfg)
    model.to_empty(device=device)
    torch.manual_seed(depth)
    model.init_weights()
    with torch.no_grad():  # nonzero output projections (init zeroes them), so the blocks actually matter
        for b in model.transformer.h: b.attn.c_proj.weight.normal_(0, 0.02); b.mlp.c_proj.weight.normal_(0, 0.02)
        model.lm_head.weight.normal_(0, 0.02)
        model.lm_head.weight[[tok.encode_special(s) for s in SPECIAL_TOKENS]] = 0
    return model.eval()


def sync(device):
    if device == "cuda": torch.cuda.synchronize()


@torch.inference_mode()
def time_prefill(model, prompt, device, reps):
    "Median seconds of one forward over the prompt into an empty KV cache (what the engine's prefill does)."
    c, times = model.config, []
    ids = torch.tensor([prompt], device=device)
    for i in range(reps + 1):
        cache = KVCache(1, c.n_kv_head, len(prompt), c.head_dim, c.n_layer)
        sync(device); t0 = time.perf_counter()
        with autocast_ctx(device): model(ids, kv_cache=cache)
        sync(device)
        if i: times.append(time.perf_counter() - t0)  # the first run is a warm-up
    return statistics.median(times)


def timed_stream(stream, device):
    "Consume a generator of per-step token columns: (TTFT seconds, seconds for the remaining steps, all columns)."
    cols, t0 = [], time.perf_counter()
    for col in stream:
        sync(device)
        if not cols: t1 = time.perf_counter()
        cols.append(col)
    return t1 - t0, time.perf_counter() - t1, cols


@torch.inference_mode()
def naive_stream(model, prompt, batch, steps, device):
    "The no-cache sampler (greedy): every step reruns the model on the whole (batch, prompt + generated) sequence."
    ids = torch.tensor([prompt] * batch, device=device)
    for _ in range(steps):
        with autocast_ctx(device): logits = model(ids)[:, -1, :]
        nxt = logits.argmax(dim=-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
        yield nxt[:, 0].tolist()


def bench(depth, device, tok, args):
    model = random_model(depth, tok, device)
    engine = Engine(model, tok)
    g = torch.Generator().manual_seed(0)
    prompt = [tok.get_bos_token_id()] + torch.randint(256, 60000, (args.prompt_len - 1,), generator=g).tolist()
    t_prefill = time_prefill(model, prompt, device, args.reps)
    list(engine.generate(prompt, max_tokens=2, temperature=0))  # warm-up
    rows = []
    for batch in (1, 8):
        ttft, t_dec, cols = timed_stream((c for c, _ in engine.generate(prompt, num_samples=batch, max_tokens=args.new_tokens,
                                                                       temperature=0)), device)
        assert len(cols) == args.new_tokens, "the engine stopped early"
        n_naive = min(args.new_tokens, args.naive_tokens)
        nttft, nt_dec, ncols = timed_stream(naive_stream(model, prompt, batch, n_naive, device), device)
        same = ncols == cols[:n_naive]
        cached_tps, naive_tps = batch * (len(cols) - 1) / t_dec, batch * (n_naive - 1) / nt_dec
        rows.append(dict(depth=depth, device=device, batch=batch, params=model.num_params(), prefill_tps=len(prompt) / t_prefill,
                         ttft=ttft, naive_ttft=nttft, cached_tps=cached_tps, naive_tps=naive_tps, same=same,
                         speedup=cached_tps / naive_tps))
        r = rows[-1]
        print(f"d{depth:<3} {device:<5} {r['params'] / 1e6:>6.1f}M  b{batch:<2} {r['prefill_tps']:>10,.0f} {ttft * 1e3:>9.1f} "
              f"{nttft * 1e3:>9.1f} {cached_tps:>10,.1f} {naive_tps:>10,.1f} {r['speedup']:>7.1f}x  {'yes' if same else 'NO'}",
              flush=True)
    del model, engine
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--depths", type=int, nargs="+", default=[4, 6], help="CPU model depths")
    ap.add_argument("--cuda-depth", type=int, default=20, help="model depth on CUDA, when a GPU is present")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=32, help="decode steps of the cached engine")
    ap.add_argument("--naive-tokens", type=int, default=8,
                    help="decode steps of the naive sampler (it is slow; fewer steps slightly favour it: its cost grows with length)")
    ap.add_argument("--reps", type=int, default=3, help="prefill repetitions (median)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads: torch.set_num_threads(args.threads)
    tok = standin_tokenizer()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, load average {os.getloadavg()[0]:.1f}; "
          f"vocab {VOCAB:,} (stand-in tokenizer), random init, greedy; prompt {args.prompt_len} tokens, "
          f"{args.new_tokens} new tokens (naive: {args.naive_tokens})")
    print(f"{'model':<4} {'dev':<5} {'params':>7}  {'bs':<3} {'prefill/s':>10} {'TTFT ms':>9} {'naive ms':>9} "
          f"{'decode/s':>10} {'naive/s':>10} {'speedup':>8}  same tokens")
    rows = []
    for d in args.depths: rows += bench(d, "cpu", tok, args)
    if torch.cuda.is_available():
        rows += bench(args.cuda_depth, "cuda", tok, args)
    else:
        print(f"CUDA: no GPU here, d{args.cuda_depth} skipped")
    print(f"load average at the end {os.getloadavg()[0]:.1f}")
    assert all(r["same"] for r in rows), "cached and naive greedy decoding disagree"
    print("decode tokens/s, cached engine / naive no-cache sampler: " +
          ", ".join(f"d{r['depth']} {r['device']} b{r['batch']} {r['speedup']:.1f}x" for r in rows))


if __name__ == "__main__":
    main()
