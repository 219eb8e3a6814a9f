#!/usr/bin/env bash
# The GPU check of issue 15 (docs/compose.md, "Fused kernel"): <= 8 minutes on one GPU; writes
# benchmarks/results/gpu_check.json (and a copy into $OUT when the device tool sets it).
#
# Here, once, before a GPU session: the GPU image has torch and Triton but lacks these pure-Python packages, and
# nothing can be downloaded there, so copy them from .venv into .gpu-pkgs/ (git-ignored through .git/info/exclude):
#   bash benchmarks/gpu_check.sh --prepare
# Then, on the GPU machine (device tool: carry [".gpu-pkgs", "artifacts/pyro-tvc-tiny"], timeout_s 600):
#   bash benchmarks/gpu_check.sh
# The artefacts are needed only for the SVI-step section (recorded as skipped without them).
set -euo pipefail
cd "$(dirname "$0")/.."
PKGS_DIR=.gpu-pkgs
PY=${PYTHON:-python3}
RESULT=benchmarks/results/gpu_check.json

if [ "${1:-}" = "--prepare" ]; then
  SITE=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  rm -rf "$PKGS_DIR"
  mkdir -p "$PKGS_DIR"
  for p in open_clip ftfy wcwidth pyro pyroapi; do cp -r "$SITE/$p" "$PKGS_DIR/"; done
  find "$PKGS_DIR" -name __pycache__ -type d -prune -exec rm -rf {} +
  grep -qxF "/$PKGS_DIR/" .git/info/exclude 2>/dev/null || echo "/$PKGS_DIR/" >> .git/info/exclude
  du -sh "$PKGS_DIR"
  exit 0
fi

# Fail fast, with one line, where there is no GPU.
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu_check: no CUDA device visible to $PY ($("$PY" -c 'import torch; print("torch", torch.__version__)' 2>&1 | tail -1)); run this on a GPU machine" >&2
  exit 2
fi

export PYTHONPATH="$PWD:$PWD/$PKGS_DIR${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
if ! "$PY" -c "import open_clip, pyro" 2>/dev/null; then
  echo "gpu_check: open_clip or pyro missing: run 'bash benchmarks/gpu_check.sh --prepare' here and carry $PKGS_DIR" >&2
  exit 2
fi
# pyro_tvc.models / .guides are mapped by setuptools (package-dir): an editable install provides the mapping.
if ! "$PY" -c "import pyro_tvc.models" 2>/dev/null; then
  "$PY" -m pip install -q --no-deps --no-index --no-build-isolation -e . \
    || echo "gpu_check: editable install failed; the SVI-step section will record the import error" >&2
fi

rc=0
timeout 470 "$PY" -u benchmarks/gpu_check.py --out "$RESULT" "$@" || rc=$?
if [ -n "${OUT:-}" ] && [ -f "$RESULT" ]; then cp "$RESULT" "$OUT/"; fi
echo "gpu_check: exit $rc, results in $RESULT" >&2
exit $rc
