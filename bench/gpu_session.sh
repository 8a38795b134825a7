#!/usr/bin/env bash
# One prepared GPU session (see bench/gpu_session.py): bash bench/gpu_session.sh [--dry-run] OUT_DIR
#
# On a GPU machine: ~7 minutes on one H100/H200 (internal deadline RLCORE_SESSION_DEADLINE, default 450 s, plus a hard
# stop 30 s later), writing env.json, accuracy.json, tests.xml, bench.csv, sweep.csv, summary.md and session.log into
# OUT_DIR as each step finishes. Wheels carried in .whl/ (Liger, Cut Cross-Entropy; see README "The GPU run") are
# installed into /tmp/site first, without dependencies.
# --dry-run: the same steps on CPU with tiny shapes under Triton's interpreter (CI runs it, so it cannot rot).
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=()
if [ "${1:-}" = "--dry-run" ]; then DRY=(--dry-run); shift; fi
OUT="${1:?usage: bash bench/gpu_session.sh [--dry-run] OUT_DIR}"
mkdir -p "$OUT"
PY="$(command -v python || command -v python3)"
if [ ${#DRY[@]} -gt 0 ]; then
  export TRITON_INTERPRET=1 RLCORE_CPP="${RLCORE_CPP:-0}"
  DEADLINE="${RLCORE_SESSION_DEADLINE:-420}"
else
  DEADLINE="${RLCORE_SESSION_DEADLINE:-450}"
  if compgen -G ".whl/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
  fi
fi
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION="${TRITON_DEFAULT_FP_FUSION:-1}"
timeout --kill-after=10 "$((DEADLINE + 30))" "$PY" -m bench.gpu_session "${DRY[@]}" --deadline "$DEADLINE" "$OUT"
rc=$?
"$PY" -m bench.gpu_session --check "$OUT" || rc=1
exit $rc
