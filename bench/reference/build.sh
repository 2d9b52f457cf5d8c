#!/usr/bin/env bash
# Build the paper's reference implementation for CPU runs on SmolLM2-135M. Idempotent: each step is
# skipped when its output exists and its inputs (commit, script, requirements) are unchanged.
#
#   bash bench/reference/build.sh          # from anywhere; works in the repository root
#
# 1. extracts unified-model-editing at $REF_COMMIT from a local git clone ($REF_MIRROR) into .ref/unified-model-editing
# 2. applies bench/reference/patch_reference.py (fails loudly if an anchor changed)
# 3. creates the venv .ref/venv with bench/reference/requirements.txt (transformers 4.46.3, torch 2.13.0 CPU)
# 4. writes .ref/smollm2-hf/ with the SYSTEM python (our transformers 5.x) via prepare_model.py
# 5. checks, inside the venv, that the reference env's tokenisation and logits equal ours (.ref/check_model.json)
#
# Env overrides: REF_MIRROR (git dir; default .ref/unified-model-editing.git), REF_COMMIT, SYSTEM_PYTHON (default python3).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
cd "$ROOT"

REF_MIRROR="${REF_MIRROR:-.ref/unified-model-editing.git}"
REF_COMMIT="${REF_COMMIT:-23d72b560e52992e675377cc2d1deed7a45b1cd0}"
SYSTEM_PYTHON="${SYSTEM_PYTHON:-python3}"
REF=.ref/unified-model-editing
VENV=.ref/venv
MODEL=.ref/smollm2-hf
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" MKL_NUM_THREADS="${MKL_NUM_THREADS:-1}"

sha() { sha256sum "$@" | sha256sum | cut -c1-16; }
mkdir -p .ref

# 1-2. source + patches -------------------------------------------------------------------------------
want_src="$REF_COMMIT $(sha "$HERE/patch_reference.py" "$HERE/anchors.py")"
if [[ -f "$REF/.patched" && -f "$REF/.build_stamp" && "$(cat "$REF/.build_stamp")" == "$want_src" ]]; then
    echo "[build] $REF up to date ($REF_COMMIT)"
else
    if ! git --git-dir="$REF_MIRROR" cat-file -e "$REF_COMMIT^{commit}" 2>/dev/null; then
        cat >&2 <<EOF
[build] the reference's git mirror is missing or lacks commit $REF_COMMIT:
        $REF_MIRROR
  Clone it once:  git clone --bare https://github.com/scalable-model-editing/unified-model-editing .ref/unified-model-editing.git
  or point REF_MIRROR at any clone (bare or not: its .git folder) that has that commit.
EOF
        exit 1
    fi
    rm -rf "$REF"
    mkdir -p "$REF"
    git --git-dir="$REF_MIRROR" archive "$REF_COMMIT" | tar -x -C "$REF"
    echo "$REF_COMMIT" > "$REF/REF_COMMIT"
    "$SYSTEM_PYTHON" "$HERE/patch_reference.py" "$REF"
    echo "$want_src" > "$REF/.build_stamp"
fi

# 3. venv ------------------------------------------------------------------------------------------------
want_venv="$(sha "$HERE/requirements.txt")"
if [[ -x "$VENV/bin/python" && -f "$VENV/.build_stamp" && "$(cat "$VENV/.build_stamp")" == "$want_venv" ]]; then
    echo "[build] $VENV up to date"
else
    [[ -x "$VENV/bin/python" ]] || python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check -r "$HERE/requirements.txt"
    "$VENV/bin/python" -c "import torch, transformers; assert transformers.__version__ == '4.46.3', transformers.__version__; print('[build] venv: torch', torch.__version__, 'transformers', transformers.__version__, 'cuda', torch.version.cuda)"
    echo "$want_venv" > "$VENV/.build_stamp"
fi

# 4. model folder (system python: our loader) -------------------------------------------------------------
want_model="$(sha "$HERE/prepare_model.py")"
if [[ -f "$MODEL/model.safetensors" && -f "$MODEL/reference_check.pt" && -f "$MODEL/.build_stamp" && "$(cat "$MODEL/.build_stamp")" == "$want_model" ]]; then
    echo "[build] $MODEL up to date"
else
    "$SYSTEM_PYTHON" "$HERE/prepare_model.py" --out "$MODEL"
    echo "$want_model" > "$MODEL/.build_stamp"
fi

# 5. the reference env sees the same model ------------------------------------------------------------------
"$VENV/bin/python" "$HERE/run_reference.py" --check-model "$MODEL" --out .ref/check_model.json > /dev/null
"$VENV/bin/python" - <<'EOF'
import json
d = json.load(open(".ref/check_model.json"))
diffs = [p["max_abs_logit_diff"] for p in d["prompts"]]
print(f"[build] model check ok={d['ok']}: max |logit diff| {max(diffs):.3g} on {len(diffs)} prompts, "
      f"padded batch {d['padded_batch_max_abs_logit_diff']:.3g}, {d['token_texts_checked']} texts tokenised identically "
      f"(no BOS), rope_theta {d['rope_theta']}, tied head {d['tied_lm_head']}")
EOF
echo "[build] done: .ref/venv/bin/python bench/reference/run_reference.py --spec <spec.json> --out <out.json>"
