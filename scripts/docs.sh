#!/usr/bin/env bash
# The course as a static web site: one page per lesson, a home page from nbs/index.ipynb, a sidebar in lesson order.
#
#   bash scripts/docs.sh              # writes _docs/ (git-ignored); open _docs/index.html, or serve it:
#   python -m http.server -d _docs    #   then http://localhost:8000
#   bash scripts/docs.sh /tmp/site    # any other folder (or set NANOCHAT_DOCS_DIR)
#
# Two ways to build the site:
# - Offline (this script): nbconvert renders each notebook with its saved outputs (nothing is re-executed) after
#   nbdev's processing (hidden cells dropped, directive lines removed, exported cells badged); see
#   scripts/build_docs.py. The pages need no network: no CDN scripts, math as MathML, one local stylesheet.
#   Takes ~10 s for the whole course.
# - With Quarto (nbdev's own docs, with the API reference that show_doc renders): install Quarto once with
#   `nbdev-install-quarto` (it downloads Quarto, so it needs the internet and sudo), then run `nbdev-docs`, which also
#   writes _docs/. Quarto can't be installed on the offline build machines, hence the offline path above.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${1:-${NANOCHAT_DOCS_DIR:-}}"
case "$OUT" in ""|/*) ;; *) OUT="$PWD/$OUT" ;; esac  # relative to where you are, not to the repo
cd "$ROOT"
# the full set-up only when the venv can't render yet (nbdev, nbconvert and latex2mathml are dev dependencies;
# without latex2mathml the math shows as TeX)
if ! .venv/bin/python -c "import nbdev, nbconvert" 2>/dev/null; then bash scripts/setup.sh; fi
exec .venv/bin/python scripts/build_docs.py ${OUT:+"$OUT"}
