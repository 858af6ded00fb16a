#!/usr/bin/env bash
# The "$1000" tier: the same recipe as scripts/speedrun.sh with a depth-32 GPT (1.9B parameters) trained on 37.6B
# tokens. About 42 hours on one 8xH100 node (~$1000), or ~11 hours on four nodes for about the same money.
#
#   bash scripts/run1000.sh                       # on an 8xH100 box; inside `screen` or `tmux`
#   NNODES=4 NODE_RANK=... MASTER_ADDR=... bash scripts/run1000.sh   # on each of 4 nodes (see "Several nodes")
#
# Same stages, same settings (environment variables) as scripts/speedrun.sh; read that one first. What changes:
#   --depth=32, 800 shards instead of 240, at most 8 rows per GPU instead of 32 (each row needs ~2.6x the activation
#   memory of depth 20, depth x width, and the weights and optimizer state are 3.3x larger; 8 rows are expected to fit
#   in 80 GB, not measured here), and a checkpoint every 1000 steps (~35 min) since a lost half day hurts more.
#
# Settings (environment variables):
#   WANDB_RUN=name     log training curves to Weights & Biases (needs `pip install wandb` and `wandb login`); default off
#   WITH_RL=1          also run reinforcement learning on GSM8K (lesson 16) and evaluate it; default off
#   DEVICE_BATCH_SIZE  rows per GPU per forward/backward (default: as many as fit the 524,288-token batch, at most 8);
#                      lower it if CUDA runs out of memory: gradient accumulation keeps the total batch, only slower
#   NPROC_PER_NODE     GPUs per node (default 8)
#   NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT, RUN_ID, JOIN_TIMEOUT: several nodes, see below
#   HF_ENDPOINT        where the data comes from (default https://huggingface.co; the offline test mirror holds
#                      4 shards, far too few for this run, so unlike runcpu.sh this script doesn't look for it)
#   NANOCHAT_BASE_DIR  where everything is written (default ~/.cache/nanochat): ~80 GB of shards, plus checkpoints
#
# ---------------------------------------------------------------------------------------------------------------
# Where the numbers come from: the plan this script prints first (the `plan` function below, built on PyTorch's
# "meta" device, a second on any CPU), for the defaults:
#
#   d32: 1,879,048,192 params (width 2048, 16 heads of 128)
#   horizon: 20 tokens per param (Chinchilla) = 37,580,963,840 tokens = 71,680 steps of 524,288 tokens
#   compute: 1.21e+10 FLOPs per token x tokens = 4.54e+20 FLOPs
#   batch: 8 rows x 2,048 tokens x 8 GPUs = 131,072 tokens per forward/backward, 4 per step
#   data: 37.6B tokens x 4.8 chars/token / 250M chars per shard = 722 shards; downloading 800
#   time: 4.54e+20 FLOPs / (8 GPUs x 989 TFLOP/s x 40% MFU) = 39.8 h of pretraining
#   cost: 39.8 h x 8 H100 at $3.00 per GPU-hour ($24/h) = $956 of pretraining
#
# In words:
# - params: 2048 wide (64 x 32), 16 heads of 128, 32 blocks: 1.88B parameters, 3.3x depth 20's 561M.
# - tokens: 20 per parameter = 37.6B tokens; at 524,288 tokens per step, 71,680 steps (3.3x the speedrun's 21,400).
# - FLOPs: 12.1 GFLOPs per token (3.5x depth 20's) x 37.6B tokens = 4.5e20 FLOPs, 11.6x the speedrun's 3.9e19.
#   With tokens proportional to params, compute grows as params^2: 3.35x the params costs ~11x the compute.
# - batch: 8 rows per GPU x 2048 tokens x 8 GPUs = 131,072 tokens per forward/backward, so gradient accumulation
#   adds up 4 of them per optimizer step; the step is the same 524,288 tokens as the speedrun's.
# - shards: 37.6B tokens x ~4.8 chars/token / ~250M chars per shard = 722 shards; 800 with ~10% spare (~80 GB).
# - time: 4.54e20 / (8 x 989e12 FLOP/s x 0.4 MFU) = 143,000 s = 39.8 h of pretraining. Midtraining, SFT and the
#   evaluations cost ~3.5x what they do at depth 20 (FLOPs per token): another ~2 hours. ~42 h in all: too long to
#   babysit in one sitting, which is what several nodes are for (4 nodes: ~11 h if it scales well, same cost).
# - cost: ~42 h x $24/h (8 H100 at ~$3 per GPU-hour) = ~$1000, hence the name; $956 of it is pretraining.
#
# What to expect: better than the speedrun on every benchmark (for scale: GPT-2 1.5B's CORE is 0.26, the speedrun's
# 0.22), still a small model; the report card has the numbers of your run.
#
# ---------------------------------------------------------------------------------------------------------------
# Several nodes. Every training and evaluation stage runs under torchrun; with NNODES > 1 it rendezvouses over
# torch's c10d backend instead of `--standalone`:
#   torchrun --nnodes N --node-rank R --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:PORT -m nanochat.X
# Run this same script on every node, with the same settings and
#   NNODES=4 NODE_RANK=0 MASTER_ADDR=10.0.0.1 bash scripts/run1000.sh   # on the node at MASTER_ADDR
#   NNODES=4 NODE_RANK=1 MASTER_ADDR=10.0.0.1 bash scripts/run1000.sh   # on each other node (NODE_RANK 1, 2, 3)
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
# everything else is scripts/speedrun.sh: the same stages, launcher and multi-node support
DEPTH=32 NUM_SHARDS=800 MAX_DEVICE_BATCH=8 SAVE_EVERY=1000 RUN_ID="${RUN_ID:-nanochat-d32}" \
  exec bash "$(dirname "${BASH_SOURCE[0]}")/speedrun.sh" "$@"
