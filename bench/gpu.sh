#!/usr/bin/env bash
# The GPU check on a CUDA machine (needs torch + transformers only): < 8 minutes, one JSON.
#   bash bench/gpu.sh [--out bench/out/gpu.json]
set -euo pipefail
cd "$(dirname "$0")/.."
exec timeout 480 python3 -m bench.gpu "$@"
