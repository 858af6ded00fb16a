# Sourced by the run scripts. Chooses where datasets come from:
#   HF_ENDPOINT if you set it; else an offline mirror served on loopback if one is present
#   (NANOCHAT_MIRROR, default ../shared/hf-mirror beside the repo); else https://huggingface.co.
use_mirror() {
  local root="$1"
  if [ -n "${HF_ENDPOINT:-}" ]; then echo "[data] HF_ENDPOINT=$HF_ENDPOINT"; return 0; fi
  local dir="${NANOCHAT_MIRROR:-$root/../shared/hf-mirror}"
  if [ ! -d "$dir" ]; then echo "[data] no mirror at $dir: downloading from https://huggingface.co"; return 0; fi
  local port
  port=$(python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  python -m http.server --bind 127.0.0.1 --directory "$dir" "$port" >/dev/null 2>&1 &
  MIRROR_PID=$!
  trap 'kill $MIRROR_PID 2>/dev/null || true' EXIT
  export HF_ENDPOINT="http://127.0.0.1:$port"
  export NANOCHAT_EVAL_BUNDLE_URL="$HF_ENDPOINT/s3/karpathy-public/eval_bundle.zip"
  # a mirror holds fewer pretraining shards than the real 1823; the last one present is the validation shard
  export NANOCHAT_NUM_SHARDS="$(ls "$dir"/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main/shard_*.parquet 2>/dev/null | wc -l)"
  for _ in $(seq 50); do curl -sf -o /dev/null "$HF_ENDPOINT/" && break; sleep 0.1; done
  echo "[data] serving the offline mirror $dir at $HF_ENDPOINT"
}
