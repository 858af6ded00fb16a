#!/usr/bin/env bash
# The main job: the whole nanochat pipeline, tiny, on a CPU (a laptop or a 2-core server), in well under 30 minutes.
#
#   bash scripts/runcpu.sh            # the full CPU run (~20-25 min on 2 cores, set-up included)
#   QUICK=1 bash scripts/runcpu.sh    # a few steps per stage: checks the plumbing end to end (~5 min; CI runs this)
#   WITH_RL=1 bash scripts/runcpu.sh  # also run the RL stage on GSM8K (off by default: a tiny model gets ~0 reward)
#
# It ends with a model that answers in the chat format (it is tiny, so don't expect it to be right) and a report card
# (report.md in this folder). The same stages at full scale are in scripts/speedrun.sh (8xH100, ~4 hours).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
cd "$ROOT"
source .venv/bin/activate
source scripts/mirror.sh
use_mirror "$ROOT"
export NANOCHAT_BASE_DIR="${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}"
QUICK="${QUICK:-0}"
t0=$SECONDS
stage() { echo; echo "=== $* ($((SECONDS - t0))s since start)"; }

# ---- sizes. A depth-4 model (width 256, 2 heads) with an 8k vocabulary has ~7M parameters, small enough to train
# at a few thousand tokens/s on two cores. Chinchilla would want 20 tokens per parameter (~150M tokens, hours on a CPU);
# we train on a few million, enough to learn English-looking text and, after mid/SFT, the chat format.
DEPTH=4; VOCAB=8192; SEQ=512; DBS=8; TBS=4096
if [ "$QUICK" = 1 ]; then
  BASE_STEPS=12; BASE_EVAL_EVERY=6; EVAL_TOKENS=8192; CORE_PER_TASK=4; MID_STEPS=6; SFT_STEPS=6; EVAL_PROBLEMS=4; RL_STEPS=2
  TOK_CHARS=5000000
else
  BASE_STEPS=${BASE_STEPS:-300}; BASE_EVAL_EVERY=100; EVAL_TOKENS=65536; CORE_PER_TASK=20; MID_STEPS=${MID_STEPS:-120}
  SFT_STEPS=${SFT_STEPS:-60}; EVAL_PROBLEMS=50; RL_STEPS=20; TOK_CHARS=50000000
fi

stage "report: start a new run"
python -m nanochat.report reset

stage "data: pretraining shards (the last one is the validation shard) and the CORE eval bundle"
python -m nanochat.dataset -n 8
python -m nanochat.core_eval --download

stage "tokenizer: train a ${VOCAB}-token BPE on up to $TOK_CHARS characters, then compare its compression"
python -m nanochat.tok_train --max-chars "$TOK_CHARS" --vocab-size "$VOCAB"
python -m nanochat.tok_eval

stage "pretraining: depth $DEPTH, $BASE_STEPS steps of $TBS tokens"
python -m nanochat.base_train --depth "$DEPTH" --max-seq-len "$SEQ" --device-batch-size "$DBS" --total-batch-size "$TBS" \
  --num-iterations "$BASE_STEPS" --eval-every "$BASE_EVAL_EVERY" --eval-tokens "$EVAL_TOKENS" --sample-every "$BASE_STEPS"

stage "base model evaluation: bits per byte, samples, CORE on $CORE_PER_TASK examples per task"
python -m nanochat.base_eval --max-per-task "$CORE_PER_TASK" --eval-tokens "$EVAL_TOKENS" --device-batch-size "$DBS"

stage "midtraining: conversations, multiple choice, tool use ($MID_STEPS steps)"
python -m nanochat.mid_train --num-iterations "$MID_STEPS" --eval-every "$MID_STEPS" --eval-tokens "$EVAL_TOKENS"
python -m nanochat.chat_eval -i mid -x "$EVAL_PROBLEMS" -m 64 --quiet

stage "supervised finetuning ($SFT_STEPS steps)"
python -m nanochat.chat_sft --num-iterations "$SFT_STEPS" --device-batch-size 8 --target-examples-per-step 16 \
  --eval-every "$SFT_STEPS" --eval-steps 10 \
  --eval-metrics-every -1 --eval-metrics-max-problems "$EVAL_PROBLEMS"
python -m nanochat.chat_eval -i sft -x "$EVAL_PROBLEMS" -m 64 --quiet

if [ "${WITH_RL:-0}" = 1 ]; then
  stage "reinforcement learning on GSM8K ($RL_STEPS steps)"
  python -m nanochat.chat_rl --num-iterations "$RL_STEPS" --examples-per-step 4 --num-samples 4 --max-new-tokens 64 \
    --eval-every -1 --eval-examples "$EVAL_PROBLEMS" --eval-samples 2
  python -m nanochat.chat_eval -i rl -a GSM8K -x "$EVAL_PROBLEMS" -m 64 --quiet
fi

stage "report card"
python -m nanochat.report generate

stage "done in $((SECONDS - t0))s"
lab="jupyter lab nbs/"; [ "$(id -u)" = 0 ] && lab="$lab --allow-root"  # jupyter refuses to run as root without it
cat <<MSG
Talk to your model:
  source .venv/bin/activate
  python -m nanochat.chat_cli -i sft                      # chat in the terminal
  python -m nanochat.chat_cli -i sft -p "Why is the sky blue?"
  python -m nanochat.chat_web                             # ChatGPT-like web UI at http://127.0.0.1:8000
  $(printf '%-56s' "$lab")# the course in JupyterLab (lesson 19: a chat widget)
(models and data are under NANOCHAT_BASE_DIR=$NANOCHAT_BASE_DIR; the report card is ${NANOCHAT_REPORT_COPY:-$ROOT}/report.md)
MSG
