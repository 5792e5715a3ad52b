#!/usr/bin/env bash
# Run the engine benchmarks with their small defaults (about 1-3 minutes each on 2 CPU cores).
set -euo pipefail
cd "$(dirname "$0")"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
for script in collection_overhead reference_comparison pruning_step peak_memory scaling; do
    python "$script.py"
    echo
done
