#!/usr/bin/env bash
# The "$100 speedrun": the whole course at full scale on one 8xH100 node, in about four hours.
#
#   bash scripts/speedrun.sh                      # on a fresh 8xH100 box; best inside `screen` or `tmux`
#   WANDB_RUN=speedrun WITH_RL=1 bash scripts/speedrun.sh   # log to wandb, and run the optional RL stage
#
# The same stages as scripts/runcpu.sh, at full size: tokenizer on 2B characters, a depth-20 GPT (561M parameters)
# pretrained on 11.2B tokens of FineWeb-Edu, midtraining, supervised finetuning, optionally RL on GSM8K, the
# evaluations after each stage, and the report card ($NANOCHAT_BASE_DIR/report/report.md) at the end. Then talk to it:
#   python -m nanochat.chat_web    # a ChatGPT-like UI on port 8000 (or: python -m nanochat.chat_cli)
#
# Settings (environment variables):
#   WANDB_RUN=name     log training curves to Weights & Biases (needs `pip install wandb` and `wandb login`); default off
#   WITH_RL=1          also run reinforcement learning on GSM8K (lesson 16) and evaluate it; default off
#   DEVICE_BATCH_SIZE  rows per GPU per forward/backward (default: as many as fit the 524,288-token batch, at most 32);
#                      lower it if CUDA runs out of memory: gradient accumulation keeps the total batch, only slower
#   NPROC_PER_NODE     GPUs per node (default 8)
#   NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT, RUN_ID, JOIN_TIMEOUT: several nodes, see below
#   HF_ENDPOINT        where the data comes from (default https://huggingface.co; the offline test mirror holds
#                      4 shards, far too few for this run, so unlike runcpu.sh this script doesn't look for it)
#   NANOCHAT_BASE_DIR  where everything is written (default ~/.cache/nanochat): ~24 GB of shards, plus checkpoints
#
# ---------------------------------------------------------------------------------------------------------------
# Where the numbers come from. `--depth` is the one dial; everything else follows from it. The plan this script
# prints first (the `plan` function below; the model is built on PyTorch's "meta" device, so it takes a second on
# any CPU) is, for the defaults:
#
#   d20: 560,988,160 params (width 1280, 10 heads of 128)
#   horizon: 20 tokens per param (Chinchilla) = 11,219,763,200 tokens = 21,400 steps of 524,288 tokens
#   compute: 3.49e+09 FLOPs per token x tokens = 3.92e+19 FLOPs
#   batch: 32 rows x 2,048 tokens x 8 GPUs = 524,288 tokens per forward/backward, 1 per step
#   data: 11.2B tokens x 4.8 chars/token / 250M chars per shard = 216 shards; downloading 240
#   time: 3.92e+19 FLOPs / (8 GPUs x 989 TFLOP/s x 40% MFU) = 3.4 h of pretraining
#   cost: 3.4 h x 8 H100 at $3.00 per GPU-hour ($24/h) = $83 of pretraining
#
# In words:
# - params: a depth-20 model is 1280 wide (64 x depth) with 10 heads of 128; its embedding, 20 blocks and head hold 561M
#   parameters (lesson 04's `depth_table`; this uses base_train's `derive_config`, which the training run itself uses).
# - tokens: Chinchilla's compute-optimal rule, ~20 tokens per parameter: 20 x 561M = 11.2B tokens.
# - steps: at 524,288 (2^19) tokens per optimizer step that is 11.2B / 524,288 = 21,400 steps.
# - FLOPs: 6 per parameter per token (2 forward, 4 backward; the embedding lookup doesn't count) plus attention's
#   12 x layers x width x sequence length = 3.49 GFLOPs per token; times 11.2B tokens = 3.9e19 FLOPs.
# - shards: a FineWeb-Edu shard holds ~250M characters and our 65,536-token tokenizer averages ~4.8 characters per
#   token on it (lesson 02b measures yours), so a shard is ~52M tokens and 11.2B tokens need 11.2B x 4.8 / 250M = 216
#   shards. We fetch 240: ~10% spare for documents the packing crops away and for a tokenizer that compresses a bit
#   less. The validation shard comes on top. (Each shard is ~100 MB: ~24 GB in all.)
# - time: FLOPs / (GPUs x peak bf16 FLOP/s x MFU). An H100 SXM peaks at 989 TFLOP/s (dense bf16); a well-tuned
#   training run reaches ~40% of that (model FLOPs utilisation; base_train logs the real number every step).
#   3.9e19 / (8 x 989e12 x 0.4) = 12,400 s = 3.4 h. Midtraining, SFT and the evaluations add roughly half an hour
#   (the reference run took 3 h 51 min in all).
# - cost: at ~$3 per H100-hour an 8xH100 node is ~$24/h: 3.4 h of pretraining is ~$83, the whole run ~$100.
#
# What to expect (reference run, 8xH100): CORE 0.22 after pretraining (GPT-2 1.5B: 0.26); after SFT ARC-Easy 0.39,
# ARC-Challenge 0.28, MMLU 0.32, GSM8K 0.05 (0.08 after RL), HumanEval 0.09, ChatCORE 0.09. A kindergartener.
#
# ---------------------------------------------------------------------------------------------------------------
# Several nodes. Every training and evaluation stage runs under torchrun; with NNODES > 1 it rendezvouses over
# torch's c10d backend instead of `--standalone`:
#   torchrun --nnodes N --node-rank R --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:PORT -m nanochat.X
# Run this same script on every node, with the same settings and
#   NNODES=4 NODE_RANK=0 MASTER_ADDR=10.0.0.1 bash scripts/speedrun.sh   # on the node at MASTER_ADDR
#   NNODES=4 NODE_RANK=1 MASTER_ADDR=10.0.0.1 bash scripts/speedrun.sh   # on each other node (NODE_RANK 1, 2, 3)
# - NANOCHAT_BASE_DIR must be one filesystem that every node sees (NFS, Lustre...): the nodes read the same
#   tokenizer and shards, and each stage loads the checkpoint that the previous stage's rank 0 wrote.
# - Node 0 alone does the one-process work (report, downloads, tokenizer, eval bundle); the other nodes go straight
#   to pretraining and wait in its rendezvous (up to JOIN_TIMEOUT seconds, default 3600) until node 0 joins.
# - c10d numbers the nodes as they join; NODE_RANK (passed on to torchrun) decides which node does the one-process
#   work. Each stage gets its own rendezvous id and port (MASTER_PORT + stage number, default from 29500), so a node
#   that finishes a stage first can't join the previous stage's finished rendezvous.
# - The batch stays 524,288 tokens: with more GPUs each one gets fewer rows (DEVICE_BATCH_SIZE), so it is the same
#   training, and the wall time divides by NNODES (the cost doesn't). NNODES: 1, 2, 4, 8, 16 or 32
#   (256 rows per step must split evenly; the plan says so at once if they don't).
# ---------------------------------------------------------------------------------------------------------------
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

# (scripts/run1000.sh runs this same script with the four settings below changed)
DEPTH="${DEPTH:-20}"                      # the one dial
NUM_SHARDS="${NUM_SHARDS:-240}"           # train shards to download (derived above)
MAX_DEVICE_BATCH="${MAX_DEVICE_BATCH:-32}"  # rows per GPU that fit in 80 GB at depth 20 with 2048-token rows
SAVE_EVERY="${SAVE_EVERY:-2000}"          # pretraining checkpoint cadence in steps (~20 min at depth 20)
MFU=0.4                 # assumed for the time estimate only
NNODES="${NNODES:-1}"; NODE_RANK="${NODE_RANK:-0}"; NPROC_PER_NODE="${NPROC_PER_NODE:-8}"
MASTER_ADDR="${MASTER_ADDR:-}"; MASTER_PORT="${MASTER_PORT:-29500}"; RUN_ID="${RUN_ID:-nanochat-d$DEPTH}"
JOIN_TIMEOUT="${JOIN_TIMEOUT:-3600}"
WANDB_RUN="${WANDB_RUN:-}"; WITH_RL="${WITH_RL:-0}"
# 524,288 tokens per step = 256 rows of 2048 tokens, shared by every GPU of every node
ROWS_PER_GPU=$(( 256 / (NNODES * NPROC_PER_NODE) ))
DEVICE_BATCH_SIZE="${DEVICE_BATCH_SIZE:-$(( ROWS_PER_GPU < MAX_DEVICE_BATCH ? ROWS_PER_GPU : MAX_DEVICE_BATCH ))}"
if [ "$NNODES" -gt 1 ] && [ -z "$MASTER_ADDR" ]; then
  echo "NNODES=$NNODES needs MASTER_ADDR (the address of node 0, which hosts the rendezvous)" >&2; exit 2
fi
if [ "$DEVICE_BATCH_SIZE" -lt 1 ]; then
  echo "$((NNODES * NPROC_PER_NODE)) GPUs are more than the 256 rows of a 524,288-token batch: use fewer nodes" >&2; exit 2
fi
export OMP_NUM_THREADS=1
export NANOCHAT_BASE_DIR="${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}"
mkdir -p "$NANOCHAT_BASE_DIR"

# --- set-up: .venv with the CUDA build of torch (setup.sh picks it on a machine with nvidia-smi), the package, rustbpe
bash scripts/setup.sh
source .venv/bin/activate

# --- the plan: every number in the header above is printed by this (and it fails now, not hours later, if the
#     batch doesn't divide among the GPUs)
plan() {  # plan DEPTH NUM_SHARDS DEVICE_BATCH_SIZE GPUS MFU
  python - "$@" <<'PLAN'
import math, sys
from nanochat.base_train import derive_config
from nanochat.common import _GPU_PEAK_BF16
from nanochat.report import estimate_cost
depth, shards, dbs, gpus, mfu = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
try: c = derive_config(depth, vocab_size=65536, max_seq_len=2048, device_batch_size=dbs, total_batch_size=524288,
                       world_size=gpus, target_param_data_ratio=20)
except ValueError as e: sys.exit(f"{e}\n(the GPUs of all nodes share 256 rows of 2048 tokens per step: use 1, 2, 4, 8... of them)")
chars_per_shard, chars_per_token = 250e6, 4.8  # FineWeb-Edu shards; our tokenizer on them (lesson 02b)
need = math.ceil(c["tokens"] * chars_per_token / chars_per_shard)
peak = _GPU_PEAK_BF16["H100"]
hours = c["flops"] / (gpus * peak * mfu) / 3600
print(f"d{depth}: {c['params']:,} params (width {c['model_dim']}, {c['n_head']} heads of {c['head_dim']})")
print(f"horizon: 20 tokens per param (Chinchilla) = {c['tokens']:,} tokens = {c['num_iterations']:,} steps of {c['total_batch_size']:,} tokens")
print(f"compute: {c['flops_per_token']:.2e} FLOPs per token x tokens = {c['flops']:.2e} FLOPs")
print(f"batch: {dbs} rows x {c['max_seq_len']:,} tokens x {gpus} GPUs = {dbs * c['max_seq_len'] * gpus:,} tokens per forward/backward, {c['grad_accum_steps']} per step")
print(f"data: {c['tokens'] / 1e9:.1f}B tokens x {chars_per_token} chars/token / {chars_per_shard / 1e6:.0f}M chars per shard = {need} shards; downloading {shards}")
print(f"time: {c['flops']:.2e} FLOPs / ({gpus} GPUs x {peak / 1e12:.0f} TFLOP/s x {mfu:.0%} MFU) = {hours:.1f} h of pretraining")
print(f"cost: {hours:.1f} h x {gpus} H100 at ${estimate_cost('H100', 1, 1):.2f} per GPU-hour (${estimate_cost('H100', gpus, 1):.0f}/h) = ${estimate_cost('H100', gpus, hours):,.0f} of pretraining")
if shards < need: print(f"WARNING: {shards} shards hold fewer tokens than the horizon needs: the data would repeat")
PLAN
}
plan "$DEPTH" "$NUM_SHARDS" "$DEVICE_BATCH_SIZE" "$((NNODES * NPROC_PER_NODE))" "$MFU"

t0=$SECONDS
stage() { echo; echo "=== $* ($((SECONDS - t0))s since start)"; }

# --- the launcher: one torchrun per stage, on every GPU of every node
LAUNCHES=0
launch() {  # launch -m nanochat.X -- FLAGS...
  LAUNCHES=$((LAUNCHES + 1))
  if [ "$NNODES" -eq 1 ]; then
    torchrun --standalone --nproc-per-node "$NPROC_PER_NODE" "$@"
  else
    torchrun --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$NPROC_PER_NODE" \
      --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$((MASTER_PORT + LAUNCHES))" --rdzv-id "$RUN_ID-$LAUNCHES" \
      --rdzv-conf "join_timeout=$JOIN_TIMEOUT" "$@"
  fi
}

if [ "$NODE_RANK" -eq 0 ]; then
  # --- a new report card: forget the previous run's sections, record this machine and the start time (lesson 20)
  stage "report: start a new run"
  python -m nanochat.report reset

  # --- data and tokenizer (lessons 01, 02a, 02b). The tokenizer trains on the first 2B characters = 8 shards, so
  #     fetch those first; the rest (~100 MB each) download in the background while the tokenizer trains.
  stage "data and tokenizer"
  python -m nanochat.dataset -n 8
  python -m nanochat.dataset -n "$NUM_SHARDS" &
  DATASET_PID=$!
  trap 'kill "$DATASET_PID" 2>/dev/null || true' EXIT  # if a later step fails, don't leave the download running
  python -m nanochat.tok_train --max-chars=2000000000 --vocab-size=65536
  python -m nanochat.tok_eval

  # --- the CORE eval bundle, fetched now: base_train evaluates CORE every 2000 steps (lesson 09)
  python -m nanochat.core_eval --download

  echo "waiting for the shard downloads to finish..."
  wait "$DATASET_PID"
fi

# --- pretraining (lesson 08): ~3.4 h at depth 20. A checkpoint every SAVE_EVERY steps, the last two kept: if the run dies,
#     rerun just this line with --resume added (same flags, same number of GPUs) and it continues exactly.
stage "pretraining: depth $DEPTH"
launch -m nanochat.base_train -- --depth="$DEPTH" --device-batch-size="$DEVICE_BATCH_SIZE" \
  --save-every="$SAVE_EVERY" --keep-checkpoints=2 --run="$WANDB_RUN"
# bits per byte on train and val, samples, and CORE on all of the bundle's tasks (lesson 09a)
stage "base model evaluation"
launch -m nanochat.base_eval -- --source=base

# --- midtraining (lesson 14): conversations, special tokens, multiple choice, tool use
stage "midtraining"
launch -m nanochat.mid_train -- --run="$WANDB_RUN"
launch -m nanochat.chat_eval -- --source=mid --quiet

# --- supervised finetuning (lesson 15): one epoch over the SFT mixture, loss on the assistant's tokens only
stage "supervised finetuning"
launch -m nanochat.chat_sft -- --run="$WANDB_RUN"
launch -m nanochat.chat_eval -- --source=sft --quiet

# --- optional: reinforcement learning on GSM8K (lesson 16): +3 points of GSM8K in the reference run
if [ "$WITH_RL" = 1 ]; then
  stage "reinforcement learning on GSM8K"
  launch -m nanochat.chat_rl -- --run="$WANDB_RUN"
  launch -m nanochat.chat_eval -- --source=rl --task-name=GSM8K --quiet
fi

# --- the report card: every stage's section, the summary table, time and cost
if [ "$NODE_RANK" -eq 0 ]; then
  stage "report card"
  python -m nanochat.report generate
  echo "done: report.md (here and in $NANOCHAT_BASE_DIR/report). Talk to it: python -m nanochat.chat_web (or nanochat.chat_cli)"
fi
