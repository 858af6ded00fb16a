"""Training throughput of the pretraining step (lesson 08, nanochat.base_train): tokens/s and MFU, eager against
torch.compile, side by side in one run.

    python benchmarks/train_throughput.py                  # CPU: d4 and d6, eager and compiled; CUDA (if present): d12 and d20
    python benchmarks/train_throughput.py --cpu-depths 4 --steps 3 --threads 2

One step is what base_train does per optimizer step without accumulation: forward and backward under the compute
dtype's autocast, gradient clipping, the lr/momentum schedule, AdamW + Muon, zero_grad. Tokens are random (speed does
not depend on the data) and the vocabulary is the real 65,536. The first --warmup steps (compilation, allocator
warm-up) are not timed; tokens/s is from the median of the next --steps steps, eager and compiled steps alternating
so that a change in machine load affects both alike. MFU = 6N+attention FLOPs per token (GPT.estimate_flops)
x tokens/s / peak FLOP/s, the peak from nanochat.common.get_peak_flops (datasheet bf16 for GPUs, a measured fp32
matmul for CPUs). The last line printed is the compile/eager speed ratio per model.
"""
import argparse, os, time, io, contextlib, statistics
import torch
from nanochat.common import autocast_ctx, get_peak_flops
from nanochat.gpt import GPT, GPTConfig
from nanochat.optim import setup_optimizers
from nanochat.base_train import lr_multiplier, muon_momentum
from nanochat.train_loop import clip_grads

VOCAB = 65536


def sync(device):
    if device.type == "cuda": torch.cuda.synchronize()


class Trainer:
    "A depth-`depth` model with its optimizers and one fixed (B, T) batch; `step()` runs and times base_train's step."
    def __init__(self, depth, device, B, T, compiled):
        torch.manual_seed(0)
        with torch.device("meta"): self.model = GPT(GPTConfig.from_depth(depth, vocab_size=VOCAB, sequence_len=T))
        self.model.to_empty(device=device)
        self.model.init_weights()
        with contextlib.redirect_stdout(io.StringIO()): self.optimizers = setup_optimizers(self.model)  # quiet: it prints its lr scale
        self.step_model = torch.compile(self.model, dynamic=False) if compiled else self.model
        g = torch.Generator().manual_seed(1)
        self.x, self.y = (torch.randint(0, VOCAB, (B, T), generator=g).to(device) for _ in range(2))
        self.device, self.n = device, 0

    def step(self) -> float:
        sync(self.device); t0 = time.perf_counter()
        with autocast_ctx(self.device.type): loss = self.step_model(self.x, self.y)
        loss.backward()
        clip_grads(self.model, 1.0, 1)
        for opt in self.optimizers:
            for group in opt.param_groups: group["lr"] = group["initial_lr"] * lr_multiplier(self.n, 1000)
        for group in self.optimizers[1].param_groups: group["momentum"] = muon_momentum(self.n)
        for opt in self.optimizers: opt.step()
        self.model.zero_grad(set_to_none=True)
        loss.item(); sync(self.device)
        self.n += 1
        return time.perf_counter() - t0


def table(device, depths, B, T, warmup, steps):
    """Eager and compiled side by side. On a CPU their timed steps alternate, so a change in machine load hits both
    alike; on a GPU (dedicated, and too small for two d20 models with their activations) they run one after the other."""
    peak = get_peak_flops(device)
    print(f"\n{device.type}: batch {B} x {T} tokens, vocab {VOCAB:,}, peak {peak / 1e12:.3g} TFLOP/s "
          f"({'datasheet bf16' if device.type == 'cuda' else 'measured fp32 matmul'}), {warmup} warm-up + {steps} timed steps")
    print(f"{'model':<6} {'mode':<8} {'tokens/s':>10} {'step ms':>9} {'MFU %':>7} {'warm-up s':>10}")
    ratios = {}
    for depth in depths:
        groups = [("eager", "compile")] if device.type == "cpu" else [("eager",), ("compile",)]
        warm, times = {}, {}
        for modes in groups:
            runs = {mode: Trainer(depth, device, B, T, mode == "compile") for mode in modes}
            flops_per_token = runs[modes[0]].model.estimate_flops()
            warm |= {mode: sum(r.step() for _ in range(warmup)) for mode, r in runs.items()}
            times |= {mode: [] for mode in runs}
            for _ in range(steps):
                for mode, r in runs.items(): times[mode].append(r.step())
            del runs
            if device.type == "cuda": torch.cuda.empty_cache()
        for mode in ("eager", "compile"):
            dt = statistics.median(times[mode])
            tok_s = B * T / dt
            print(f"d{depth:<5} {mode:<8} {tok_s:>10,.0f} {1000 * dt:>9.1f} {100 * flops_per_token * tok_s / peak:>7.2f} {warm[mode]:>10.1f}", flush=True)
        ratios[depth] = statistics.median(times["eager"]) / statistics.median(times["compile"])
    return ratios


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu-depths", type=int, nargs="*", default=[4, 6])
    p.add_argument("--cpu-batch", type=int, nargs=2, default=[2, 256], metavar=("B", "T"))
    p.add_argument("--cuda-depths", type=int, nargs="*", default=[12, 20])
    p.add_argument("--cuda-batch", type=int, nargs=2, default=[32, 2048], metavar=("B", "T"))
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = p.parse_args()
    if args.threads: torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, load average {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} CPUs (other work on the machine slows every row)")
    ratios = []
    for device, depths, (B, T) in [(torch.device("cpu"), args.cpu_depths, args.cpu_batch),
                                   (torch.device("cuda"), args.cuda_depths if torch.cuda.is_available() else [], args.cuda_batch)]:
        if not depths: continue
        ratios += [f"{device.type} d{d} {r:.2f}x" for d, r in table(device, depths, B, T, args.warmup, args.steps).items()]
    if not torch.cuda.is_available(): print("\n(no CUDA device: GPU rows skipped)")
    print("\ncompile/eager tokens/s: " + ", ".join(ratios))


if __name__ == "__main__":
    main()
