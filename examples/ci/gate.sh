#!/usr/bin/env bash
# The same gate as a plain script for any CI system:
#   examples/ci/gate.sh models:/my-lm@candidate production
# Exit 0: the version passed and ALIAS points to it. Exit 1: it failed, ALIAS untouched.
set -euo pipefail
model_uri="$1"
alias="${2:-production}"
mlflow-selprune gate --model-uri "$model_uri" --max-retain-drop "${MAX_RETAIN_DROP:-0.05}" \
    --min-forget-drop "${MIN_FORGET_DROP:-0.2}" --set-alias "$alias"
mlflow-selprune lineage "$model_uri" --verify
