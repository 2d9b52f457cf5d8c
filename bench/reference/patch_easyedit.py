"""Extract EasyEdit (zjunlp/EasyEdit @ 14cea82) at its pinned commit and patch it for a CPU run of MEMIT/AlphaEdit.

    python3 bench/reference/patch_easyedit.py [--mirror GITDIR] [--force]     # into .ref/easyedit

The repository is read from a local git clone (bare or not; nothing is fetched here): ``--mirror``, else
``$EASYEDIT_MIRROR``, else ``.ref/easyedit.git`` (``git clone --bare https://github.com/zjunlp/EasyEdit
.ref/easyedit.git`` once). Only what the MEMIT/AlphaEdit path imports is extracted (``git archive <commit> --
<paths>``, :data:`PATHS`); nothing of it is committed (``.ref/`` is git-ignored). An extracted tree carries
``.patched`` and ``.build_stamp`` (commit + the hash of this script and the modules it imports): a rerun
with the same inputs does nothing.

Every patch is an exact string replacement with the number of times its anchor must occur
(:mod:`anchors`); a missing or miscounted anchor stops the script before anything is written. The
numerics are untouched except for the configurable early stop. Patches, one reason each:

 1. ``easyeditor/__init__.py``: import only ``.util`` (the package imports every editor, dataset,
    evaluator and trainer at import time: peft, sentence-transformers, openai, matplotlib, ...).
 2. ``easyeditor/models/__init__.py``: import only ``memit``, ``rome`` (its ``layer_stats``) and
    ``alphaedit``, instead of all 30 methods and their dependencies.
 3. ``easyeditor/editors/__init__.py``: import nothing (``editor.py`` pulls in every method through
    ``util/alg_dict.py``); ``editors/utils.py`` and ``editors/batch_editor.py`` stay importable, and the
    runner compiles ``BaseEditor.batch_edit`` alone from ``editor.py``'s source.
 4. ``models/rome/layer_stats.py``: import ``datasets`` lazily (not installed; our C is read from its
    cache file, so the Wikipedia pass never runs).
 5. ``models/rome/compute_v.py``: drop ``from matplotlib.style import context`` (unused; avoids matplotlib).
 6. ``models/memit/compute_z.py``, ``models/alphaedit/compute_z.py``: the ``if loss < 5e-2: break`` early
    stop reads its threshold from ``REF_EARLY_STOP_LOSS`` (default ``5e-2`` = unchanged; ``-inf`` runs
    exactly ``v_num_grad_steps`` evaluations).

Not patched: the device (``hparams.device = "cpu"``; EasyEdit routes every tensor through
``util.device.normalize_device``, and ``torch.cuda.empty_cache()`` is a no-op without CUDA), the
statistics (our C is placed where EasyEdit's own ``layer_stats`` looks for its cache file), the context
templates (``CONTEXT_TEMPLATES_CACHE`` set to ours) and AlphaEdit's ``null_space_project.pt`` (written to
and read back from the runner's temporary working folder, as EasyEdit does in its own): see
``run_easyedit.py``.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script or loaded by path: its siblings
from anchors import EARLY_STOP_NEW, EARLY_STOP_OLD, Patch, PatchError, patched_texts
from patch_authors import LAZY_DATASETS_NEW, Source, extract, patch_tree

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
REF = ROOT / ".ref"
DEST = REF / "easyedit"
REPO = "zjunlp/EasyEdit"
COMMIT = "14cea8245f06715684592ab55184939b99d70784"
STAMP = ".build_stamp"
MARKER = ".patched"
#: the git folder of a clone of zjunlp/EasyEdit: $EASYEDIT_MIRROR, else .ref/easyedit.git
DEFAULT_MIRROR = REF / "easyedit.git"

#: what the MEMIT/AlphaEdit path imports, plus the hparams files the runner starts from
PATHS = (
    "LICENSE",
    "easyeditor/__init__.py",
    "easyeditor/models/__init__.py",
    "easyeditor/models/memit",
    "easyeditor/models/alphaedit",
    "easyeditor/models/rome",
    "easyeditor/util",
    "easyeditor/editors/__init__.py",
    "easyeditor/editors/batch_editor.py",
    "easyeditor/editors/editor.py",
    "easyeditor/editors/utils.py",
    "hparams/MEMIT",
    "hparams/AlphaEdit",
)

#: the methods ``easyeditor/models/__init__.py`` imports upstream, in order
UPSTREAM_MODELS = (
    "ft ike kn memit memit_FE mend rome serac pmet melo grace malmen dinm wise r_rome qlora lora dpo alphaedit "
    "SPHERE deco dola deepedit_api defer unke unke_ARE ft_uns lora_uns ultraedit simie"
).split()
KEPT_MODELS = ("memit", "rome", "alphaedit")
UPSTREAM_EDITORS = ("editor", "multimodal_editor", "per_editor", "concept_editor", "safety_editor", "steer_editor")


def _star_imports(names: tuple[str, ...] | list[str]) -> str:
    return "".join(f"from .{n} import *\n" for n in names)


PATCHES: list[Patch] = [
    # 1. the package imports only .util
    (
        "easyeditor/__init__.py",
        _star_imports(["dataset", "editors", "evaluate", "models"]),
        "# patched: only .util is imported here (the rest pulls in every method's dependencies)\n",
        1,
    ),
    ("easyeditor/__init__.py", "\nfrom .trainer import *", "\n", 1),
    # 2. models: only what MEMIT and AlphaEdit import
    (
        "easyeditor/models/__init__.py",
        _star_imports(UPSTREAM_MODELS),
        "# patched: only the methods benchmarked here (the others pull in peft, sentence-transformers, ...)\n"
        + _star_imports(KEPT_MODELS),
        1,
    ),
    # 3. editors: nothing at package import (BaseEditor.batch_edit is compiled from editor.py's source)
    (
        "easyeditor/editors/__init__.py",
        _star_imports(UPSTREAM_EDITORS).rstrip("\n"),
        "# patched: nothing imported here (editor.py imports every method through util/alg_dict.py)\n",
        1,
    ),
    # 4-5. optional imports of rome/
    ("easyeditor/models/rome/layer_stats.py", "from datasets import load_dataset\n", LAZY_DATASETS_NEW, 1),
    ("easyeditor/models/rome/compute_v.py", "from matplotlib.style import context\n", "", 1),
    # 6. the configurable early stop
    ("easyeditor/models/memit/compute_z.py", EARLY_STOP_OLD, EARLY_STOP_NEW, 1),
    ("easyeditor/models/alphaedit/compute_z.py", EARLY_STOP_OLD, EARLY_STOP_NEW, 1),
]

SOURCE = Source("easyedit", REPO, COMMIT, DEST.name, PATHS, tuple(PATCHES))

log = logging.getLogger("patch_easyedit")


def check(texts: dict[str, str]) -> dict[str, str]:
    """Every patch applied to ``texts`` (relative path -> file text) in memory (:func:`anchors.patched_texts`):
    :class:`anchors.PatchError` on a missing file or an anchor whose count differs from the expected one."""
    return patched_texts(texts, PATCHES)


def script_hash() -> str:
    """This script's inputs: itself and the sibling modules it imports."""
    h = hashlib.sha256()
    for name in ("patch_easyedit.py", "patch_authors.py", "anchors.py"):
        h.update((HERE / name).read_bytes())
    return h.hexdigest()[:16]


def find_mirror(explicit: str | None) -> Path:
    """The git folder of the clone: ``explicit``, else ``$EASYEDIT_MIRROR``, else ``.ref/easyedit.git``."""
    cand = Path(explicit or os.environ.get("EASYEDIT_MIRROR") or DEFAULT_MIRROR)
    if (cand / ".git").is_dir():
        return cand / ".git"
    if (cand / "objects").is_dir():
        return cand
    raise SystemExit(
        f"no git clone of {REPO} at {cand}. Clone it once:\n"
        f"  git clone --bare https://github.com/{REPO} .ref/easyedit.git\n"
        "or pass --mirror GITDIR / set EASYEDIT_MIRROR."
    )


def build(mirror: str | None = None, force: bool = False, dest: Path = DEST) -> Path:
    """Extract and patch EasyEdit into ``dest`` unless it is up to date; its path."""
    want = f"{COMMIT} {script_hash()}"
    stamp = dest / STAMP
    if not force and (dest / MARKER).is_file() and stamp.is_file() and stamp.read_text().strip() == want:
        log.info("%s up to date (%s @ %s)", dest, REPO, COMMIT[:7])
        return dest
    extract(SOURCE, find_mirror(mirror), dest)
    n = patch_tree(SOURCE, dest)
    stamp.write_text(want + "\n")
    log.info("%s @ %s -> %s: %d anchors patched", REPO, COMMIT[:7], dest, n)
    return dest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mirror", help="git folder of a clone (default: $EASYEDIT_MIRROR, else .ref/easyedit.git)")
    ap.add_argument("--force", action="store_true", help="extract and patch again")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[easyedit] %(message)s")
    try:
        build(args.mirror, args.force)
    except PatchError as e:
        raise SystemExit(f"[easyedit] {e}") from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
