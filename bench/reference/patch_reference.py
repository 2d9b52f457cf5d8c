"""Patch the reference implementation (scalable-model-editing/unified-model-editing) to run on the CPU.

    python3 bench/reference/patch_reference.py [.ref/unified-model-editing]

Every patch is an exact string replacement with the number of times its anchor must occur; a missing or
miscounted anchor stops the script with an error (so a changed upstream is noticed, not silently run
unpatched). Patching is idempotent: an already patched tree (marker file ``.patched``) is left alone.
Only the code paths used by ``run_reference.py`` are patched (MEMIT, EMMET, ROME, layer_stats, the
CounterFact evaluation). The numerics are untouched except where the list says so.

Patches, one reason each:

 1. memit/, emmet/, rome/ ``.to("cuda")`` / ``device="cuda"`` -> ``"cpu"``: the device is hard-coded to
    CUDA; a CPU-only run has none. (``torch.cuda.empty_cache()`` is left: it is a no-op without CUDA.)
 2. rome/layer_stats.py ``dict_to_(batch, "cuda")`` -> ``"cpu"``: same, in the statistics loop.
 3. experiments/py/eval_utils_counterfact.py ``.to("cuda")`` -> ``"cpu"``: same, in the evaluation.
 4. memit/compute_z.py, emmet/compute_z.py, rome/compute_v.py ``if loss < 5e-2: break`` -> threshold
    read from the env var ``REF_EARLY_STOP_LOSS`` at each step (default ``5e-2`` = unchanged behaviour;
    ``-inf`` disables the early stop so that every edit runs exactly ``v_num_grad_steps`` steps).
 5. rome/compute_v.py: drop ``from matplotlib.style import context`` (unused; avoids installing
    matplotlib).
 6. rome/layer_stats.py, rome/layer_stats_dynamic.py: import ``datasets.load_dataset`` lazily (a stub
    that raises if ``datasets`` is missing): the runner never downloads Wikipedia (statistics are given
    as files, or read from local texts by ``--stats-bench``, which replaces ``load_dataset``), and this
    avoids installing ``datasets`` and its dependencies.
 7. rome/layer_stats.py ``download=True`` -> ``download=False`` (default of ``layer_stats``): never fetch
    statistics from the authors' server; a missing statistics file then fails loudly in ``load_dataset``.
 8. util/globals.py: read ``globals.yml`` next to the code instead of from the working directory, and let
    the env var ``REF_STATS_DIR`` override ``STATS_DIR`` (where ``layer_stats`` looks for ``.npz`` files).
 9. experiments/py/eval_utils_counterfact.py: a module flag ``SKIP_SLIDING_GENERATION`` (default False =
    unchanged) that skips the 50-token ``generate_fast`` "sliding" generation test inside
    ``test_batch_prediction`` (its ``sliding_text``/``sliding_correct`` fields become None). It feeds
    none of ES/PS/NS (they come from the teacher-forced NLLs) and is most of the evaluation's time.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script or loaded by path: its siblings
from anchors import EARLY_STOP_NEW, EARLY_STOP_OLD, Patch, marker_text, patched_texts

LAZY_DATASETS_NEW = (
    "try:\n"
    "    from datasets import load_dataset\n"
    "except ImportError:  # patched: datasets is optional (statistics come from local files)\n"
    "    def load_dataset(*args, **kwargs):\n"
    '        raise RuntimeError("reference patched for offline use: no statistics file found and the datasets package '
    'is not installed; pass the statistics (stats_to_npz.py) or use run_reference.py --stats-bench")\n'
)

# (relative path, old, new, expected number of occurrences of old)
PATCHES: list[Patch] = [
    # 1. CUDA -> CPU in the editing algorithms
    ("memit/memit_main.py", '.to("cuda")', '.to("cpu")', 5),
    ("memit/compute_z.py", '.to("cuda")', '.to("cpu")', 2),
    ("memit/compute_z.py", 'device="cuda"', 'device="cpu"', 1),
    ("emmet/emmet_main.py", '.to("cuda")', '.to("cpu")', 5),
    ("emmet/compute_z.py", '.to("cuda")', '.to("cpu")', 2),
    ("emmet/compute_z.py", 'device="cuda"', 'device="cpu"', 1),
    ("rome/rome_main.py", '.to("cuda")', '.to("cpu")', 2),
    ("rome/compute_u.py", '.to("cuda")', '.to("cpu")', 2),
    ("rome/compute_v.py", '.to("cuda")', '.to("cpu")', 2),
    ("rome/compute_v.py", 'device="cuda"', 'device="cpu"', 3),
    # 2. CUDA -> CPU in the statistics loop
    ("rome/layer_stats.py", 'dict_to_(batch, "cuda")', 'dict_to_(batch, "cpu")', 1),
    # 3. CUDA -> CPU in the evaluation
    ("experiments/py/eval_utils_counterfact.py", '.to("cuda")', '.to("cpu")', 1),
    # 4. early stop of the value optimisation, configurable
    ("memit/compute_z.py", EARLY_STOP_OLD, EARLY_STOP_NEW, 1),
    ("emmet/compute_z.py", EARLY_STOP_OLD, EARLY_STOP_NEW, 1),
    ("rome/compute_v.py", EARLY_STOP_OLD, EARLY_STOP_NEW, 1),
    # 5. unused matplotlib import
    ("rome/compute_v.py", "from matplotlib.style import context\n", "", 1),
    # 6. lazy datasets import
    ("rome/layer_stats.py", "from datasets import load_dataset\n", LAZY_DATASETS_NEW, 1),
    ("rome/layer_stats_dynamic.py", "from datasets import load_dataset\n", LAZY_DATASETS_NEW, 1),
    # 7. never download statistics
    ("rome/layer_stats.py", "    download=True,\n    progress=tqdm,\n", "    download=False,\n    progress=tqdm,\n", 1),
    # 8. globals.yml next to the code; STATS_DIR from the environment
    (
        "util/globals.py",
        'with open("globals.yml", "r") as stream:',
        'with open(Path(__file__).resolve().parents[1] / "globals.yml", "r") as stream:',
        1,
    ),
    (
        "util/globals.py",
        'REMOTE_ROOT_URL = data["REMOTE_ROOT_URL"]\n',
        'REMOTE_ROOT_URL = data["REMOTE_ROOT_URL"]\n'
        "\n"
        "import os as _os  # patched: statistics folder from the environment\n"
        'if _os.environ.get("REF_STATS_DIR"):\n'
        '    STATS_DIR = Path(_os.environ["REF_STATS_DIR"])\n',
        1,
    ),
    # 9. optional skip of the sliding generation test in the CounterFact evaluation
    (
        "experiments/py/eval_utils_counterfact.py",
        "from util.perplexity import perplexity\n",
        "from util.perplexity import perplexity\n"
        "\n"
        "# patched: True skips the 50-token generate_fast test in test_batch_prediction (feeds no ES/PS/NS)\n"
        "SKIP_SLIDING_GENERATION = False\n",
        1,
    ),
    (
        "experiments/py/eval_utils_counterfact.py",
        "    prompt_gen = generate_fast(\n",
        "    prompt_gen = None if SKIP_SLIDING_GENERATION else generate_fast(\n",
        1,
    ),
    (
        "experiments/py/eval_utils_counterfact.py",
        "            full_text = prompt_gen[i//2] # is a string\n",
        "            full_text = prompt_gen[i//2] if prompt_gen is not None else None # is a string\n",
        1,
    ),
    (
        "experiments/py/eval_utils_counterfact.py",
        "            generated_suffix = full_text[len(prefx):]\n",
        "            generated_suffix = full_text[len(prefx):] if full_text is not None else None\n",
        1,
    ),
    (
        "experiments/py/eval_utils_counterfact.py",
        "            correct = correct_sufx in generated_suffix\n",
        "            correct = (correct_sufx in generated_suffix) if generated_suffix is not None else None\n",
        1,
    ),
]

MARKER = ".patched"


def apply(root: Path) -> int:
    if not root.is_dir():
        raise SystemExit(f"{root}: no such folder (extract the reference first: bench/reference/build.sh)")
    if (root / MARKER).exists():
        print(f"{root} is already patched ({MARKER} exists)")
        return 0
    # Every anchor checked on the original text first, so a failure leaves the tree untouched.
    files = dict.fromkeys(rel for rel, *_ in PATCHES)
    missing = [rel for rel in files if not (root / rel).is_file()]
    if missing:
        raise SystemExit(f"patch anchor file missing: {missing[0]}")
    texts = patched_texts({rel: (root / rel).read_text() for rel in files}, PATCHES)
    for rel, text in texts.items():
        (root / rel).write_text(text)
    (root / MARKER).write_text(marker_text(PATCHES))
    print(f"patched {len(PATCHES)} anchors in {len(texts)} files under {root}")
    return len(PATCHES)


if __name__ == "__main__":
    default = Path(__file__).resolve().parents[2] / ".ref" / "unified-model-editing"
    apply(Path(sys.argv[1]) if len(sys.argv) > 1 else default)
