#!/usr/bin/env bash
# Runs every test: set-up, notebooks <-> package sync, notebook hygiene, all lessons (nbdev-test), pytest.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -k tokenizer`).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
cd "$ROOT"
source .venv/bin/activate
# the browser test drives Debian's Chromium (headless, through Playwright); install it when missing
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "[setup] installing Debian's chromium for the browser test"
  { apt-get install -y -q chromium || { apt-get update -q && apt-get install -y -q chromium; }; } >/dev/null 2>&1 \
    || echo "[setup] could not install chromium: the browser test will be skipped"
fi
source scripts/mirror.sh
use_mirror "$ROOT"
# tests and lessons share one throw-away cache so they never touch ~/.cache/nanochat
export NANOCHAT_BASE_DIR="${NANOCHAT_TEST_BASE_DIR:-$ROOT/.cache/test}"
mkdir -p "$NANOCHAT_BASE_DIR"
export NANOCHAT_REPORT_COPY="$NANOCHAT_BASE_DIR"  # report cards of test runs stay there: ./report.md is your run's
export NANOCHAT_TOY_DIR="$NANOCHAT_BASE_DIR/toy"  # the toy fixtures (lesson 08b), built once and shared by lessons and tests
t0=$SECONDS
step() { echo; echo "== $* ($((SECONDS - t0))s)"; }

step "1/5 nbdev-export: the package must match the notebooks"
snap=$(mktemp -d)
cp -r nanochat "$snap/"
nbdev-export
if ! diff -rq -x __pycache__ "$snap/nanochat" nanochat; then
  diff -r -x __pycache__ -x _modidx.py "$snap/nanochat" nanochat | head -40 || true
  echo "FAIL: nanochat/ differed from what the notebooks export (edited by hand or not re-exported)."
  echo "      Edit the notebook, run nbdev-export, commit both."; exit 1
fi
rm -rf "$snap"

step "2/5 nbdev-clean: notebooks must be clean"
before=$(find nbs -name '*.ipynb' -exec md5sum {} + | sort)
nbdev-clean
after=$(find nbs -name '*.ipynb' -exec md5sum {} + | sort)
if [ "$before" != "$after" ]; then
  echo "FAIL: nbdev-clean changed notebooks (now cleaned in your tree; commit them):"
  diff <(echo "$before") <(echo "$after") || true; exit 1
fi

step "3/5 ruff: the package, scripts, tests and benchmarks (rules in pyproject.toml)"
ruff check nanochat scripts tests benchmarks

step "4/5 nbdev-test: every lesson runs and its assertions hold (flags: ${NBDEV_TEST_FLAGS:-none})"
# two notebooks at a time on two cores: one torch thread each, or they spend their time waiting on each other
OMP_NUM_THREADS=1 nbdev-test --n-workers "${NBDEV_TEST_WORKERS:-2}" --timing ${NBDEV_TEST_FLAGS:+--flags "$NBDEV_TEST_FLAGS"}

step "5/5 pytest"
# pytest exits 5 when it collects no test: with `set -e` that fails the run, as it should.
python -m pytest "$@"
step "all tests passed"
