"""Patch the UltraEdit authors' code (XiaojieGu/UltraEdit @ 0beb222) for a CPU run without wandb.

    python3 bench/reference/patch_ultraedit.py [.ref/ultraedit]

Same rules as ``patch_reference.py``: every patch is an exact string replacement with the number of
times its anchor must occur; a missing or miscounted anchor stops the script before anything is
written; an already patched tree (marker ``.patched``) is left alone. The algorithm is untouched:
``editor/ultraedit.py``'s ``cache``/``predict_param_shifts``, ``editor/base.py``'s ``edit_model`` and
``sequential_valid``, ``nets.py``'s ``RunningMeanStd``, ``util.py``'s ``Tracer``/``cross_entropy``/
``succ_ratios`` and ``data/`` run as written.

What needs no patch: the devices (``model_device``/``editor_device``), the model path
(``model.name_or_path``), the precision (``model.half``; false here, so both sides run in float32) and
the K/G cache folder (``editor.cache_dir``) are config fields, which the runner sets
(``bench/reference/run_ultraedit.py``); hydra's ``main.py`` is not run, the runner builds the same
``DictConfig`` with omegaconf. ``torch.cuda.empty_cache()`` (``reset_model``, not called) is a no-op
without CUDA, and ``model.py``'s ``CUDA_VISIBLE_DEVICES = '0'`` has no effect on a CPU run.

Patches, one reason each:

 1. ``editor/base.py``, ``editor/ultraedit.py``: ``import wandb`` -> an optional import with a stub whose
    ``log`` does nothing (wandb only logs; ``sequential_valid`` calls ``wandb.log(final_results)``, the
    runner replaces the stub's ``log`` to record them). Avoids installing wandb and its server login.
 2. ``editor/base.py``: import ``LlamaTokenizerFast``, which ``BaseEditor.__init__`` uses without
    importing it when the model path contains ``llama`` (a NameError upstream; a checkout path such as
    ``/home/llama/...`` would hit it). Same class the authors meant; SmolLM2 paths never take that branch.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script or loaded by path: its siblings
from anchors import Patch, marker_text, patched_texts

WANDB_OLD = "import wandb\n"
WANDB_NEW = (
    "try:  # patched: wandb is optional (it only logs)\n"
    "    import wandb\n"
    "except ImportError:\n"
    "    import types as _types\n"
    "\n"
    "    wandb = _types.SimpleNamespace(init=lambda *a, **k: None, log=lambda *a, **k: None)\n"
)

# (relative path, old, new, expected number of occurrences of old)
PATCHES: list[Patch] = [
    # 1. optional wandb
    ("editor/base.py", WANDB_OLD, WANDB_NEW, 1),
    ("editor/ultraedit.py", WANDB_OLD, WANDB_NEW, 1),
    # 2. the missing LlamaTokenizerFast import
    (
        "editor/base.py",
        "from transformers import AutoTokenizer\n",
        "from transformers import AutoTokenizer\n"
        "from transformers import LlamaTokenizerFast  # patched: used below, never imported\n",
        1,
    ),
]

MARKER = ".patched"


def check(texts: dict[str, str]) -> dict[str, str]:
    """Apply every patch to ``texts`` (relative path -> file text) in memory (:func:`anchors.patched_texts`):
    SystemExit on a missing file or an anchor whose count differs from the expected one."""
    return patched_texts(texts, PATCHES)


def apply(root: Path) -> int:
    if not root.is_dir():
        raise SystemExit(f"{root}: no such folder (extract the authors' code first: python -m bench.ultraedit_authors)")
    if (root / MARKER).exists():
        print(f"{root} is already patched ({MARKER} exists)")
        return 0
    texts = {rel: (root / rel).read_text() for rel in dict.fromkeys(p[0] for p in PATCHES) if (root / rel).is_file()}
    patched = check(texts)  # every anchor checked before anything is written
    for rel, text in patched.items():
        (root / rel).write_text(text)
    (root / MARKER).write_text(marker_text(PATCHES))
    print(f"patched {len(PATCHES)} anchors in {len(patched)} files under {root}")
    return len(PATCHES)


if __name__ == "__main__":
    default = Path(__file__).resolve().parents[2] / ".ref" / "ultraedit"
    apply(Path(sys.argv[1]) if len(sys.argv) > 1 else default)
