"""Extract the authors' code of AlphaEdit, SPHERE, RLSEdit and ENCORE at pinned commits and patch it for the CPU.

    python3 bench/reference/patch_authors.py                       # every method, into .ref/<folder>
    python3 bench/reference/patch_authors.py --methods rlsedit --mirror-root /path/to/mirrors

Each repository is read from a local git clone (bare or not; nothing is fetched here): ``--mirror NAME=PATH``,
else ``$AUTHORS_MIRROR_ROOT/<owner>+<name>[/repo]``, else ``.ref/<owner>+<name>.git``. Only the folders the
benchmark imports are extracted (``git archive <commit> -- <paths>``): some mirrors lack the large data blobs.
Nothing of the authors' code is committed; ``.ref/`` is git-ignored.

Every patch is an exact string replacement with the number of times its anchor must occur (as
``patch_reference.py`` does); a missing or miscounted anchor stops the script before any file is
written. An extracted tree carries ``.patched`` and ``.build_stamp`` (commit + this script's hash), so a
rerun with the same inputs does nothing. The numerics are untouched except for the configurable early stop.

Patches, one reason each (every method):

 1. ``.to("cuda")`` / ``.cuda()`` / ``device="cuda"`` -> CPU in the method's main file and ``compute_z.py``:
    the device is hard-coded to CUDA (``torch.cuda.empty_cache()`` is left: a no-op without CUDA).
 2. ``compute_z.py``: the ``if loss < 5e-2: break`` early stop reads its threshold from ``REF_EARLY_STOP_LOSS``
    (default ``5e-2`` = unchanged; ``-inf`` makes every request run exactly ``v_num_grad_steps`` evaluations).
    ENCORE's own most-probable early stop (``prob_cutoff``) is a hyperparameter and is left as it is.
 3. ``rome/compute_v.py``: drop ``from matplotlib.style import context`` (unused; avoids matplotlib).
 4. ``rome/layer_stats.py`` (and ENCORE's ``rome/layer_stats_dynamic.py``): import ``datasets`` lazily (not
    installed; the runner hands the statistics over in memory, so ``layer_stats`` is never run).

Not patched (runner-side, ``run_authors.py``): ``layer_stats`` is replaced in the method's module by a loader of
our C (the authors' own ``util.runningstats`` classes read the file), the context-template generator by ours,
the SPHERE call gets ``save_weights=False`` (its default writes into ``./Edited_Weight``), RLSEdit's objective
CSV goes to a temporary file (``RLSEDIT_OBJ_CSV``), and ENCORE gets ``hparams.sequential = True`` (its driver
sets it through ``hparams.__dict__``).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script or loaded by path: its siblings
from anchors import EARLY_STOP_NEW, EARLY_STOP_OLD, Patch, PatchError, marker_text, patched_texts

ROOT = Path(__file__).resolve().parents[2]
REF = ROOT / ".ref"
MARKER = ".patched"
STAMP = ".build_stamp"

LAZY_DATASETS_NEW = (
    "try:\n"
    "    from datasets import load_dataset\n"
    "except ImportError:  # patched: datasets is optional (the benchmark hands C over)\n"
    "    def load_dataset(*args, **kwargs):\n"
    '        raise RuntimeError("patched for offline use: the datasets package is not installed")\n'
)
CUDA = '.to("cuda")'
CPU = '.to("cpu")'


def _common(method_dir: str, main_file: str, to: int, dot_cuda: int, dev_main: int, dev_z: int) -> list[Patch]:
    """The patches every method needs: CUDA -> CPU in its main file and compute_z, the early stop, the
    two optional imports of rome/."""
    main = f"{method_dir}/{main_file}"
    z = f"{method_dir}/compute_z.py"
    out: list[Patch] = [(main, CUDA, CPU, to)]
    if dot_cuda:
        out.append((main, ".cuda()", ".cpu()", dot_cuda))
    if dev_main:
        out.append((main, 'device="cuda"', 'device="cpu"', dev_main))
    out += [
        (z, CUDA, CPU, 2),
        (z, 'device="cuda"', 'device="cpu"', dev_z),
        (z, EARLY_STOP_OLD, EARLY_STOP_NEW, 1),
        ("rome/compute_v.py", "from matplotlib.style import context\n", "", 1),
        ("rome/layer_stats.py", "from datasets import load_dataset\n", LAZY_DATASETS_NEW, 1),
    ]
    return out


@dataclass(frozen=True)
class Source:
    """One method's authors' code: where it comes from, what is extracted and how it is patched."""

    method: str
    repo: str  # owner/name on GitHub
    commit: str
    folder: str  # under .ref/
    paths: tuple[str, ...]  # extracted (git archive pathspecs)
    patches: tuple[Patch, ...]

    @property
    def mirror_name(self) -> str:
        return self.repo.replace("/", "+")


SOURCES: dict[str, Source] = {
    "alphaedit": Source(
        "alphaedit",
        "jianghoucheng/AlphaEdit",
        "f5248d3d25f1b3863bff19c387293d635866079f",
        "AlphaEdit",
        ("AlphaEdit", "rome", "util", "experiments/evaluate.py", "hparams/AlphaEdit", "globals.yml"),
        tuple(_common("AlphaEdit", "AlphaEdit_main.py", to=3, dot_cuda=3, dev_main=1, dev_z=3)),
    ),
    "sphere": Source(
        "sphere",
        "PlusLabNLP/SPHERE",
        "6e8978a8f6e707a7937567096f4a92a71ed5f2b2",
        "SPHERE",
        ("AlphaEdit", "rome", "util", "experiments/evaluate.py", "hparams/AlphaEdit", "globals.yml"),
        tuple(_common("AlphaEdit", "AlphaEdit_main.py", to=3, dot_cuda=3, dev_main=1, dev_z=3)),
    ),
    "rlsedit": Source(
        "rlsedit",
        "Euphoria040201/RLSEdit",
        "6688b89e1ea03a9e788ec8f940f4b658e36d1848",
        "RLSEdit",
        ("RLSEdit", "rome", "util", "hparams/RLSEdit", "globals.yml"),
        tuple(_common("RLSEdit", "RLSEdit_main.py", to=6, dot_cuda=0, dev_main=2, dev_z=3)),
    ),
    "encore": Source(
        "encore",
        "scalable-model-editing/knowledge-editing-regularization",
        "6e3ba9a87978a23b6db2676ba7540216bf5d4fd0",
        "knowledge-editing-regularization",
        ("encore", "rome", "util", "hparams/ENCORE", "globals.yml"),
        (
            *_common("encore", "encore_main.py", to=8, dot_cuda=1, dev_main=0, dev_z=1),
            ("rome/layer_stats_dynamic.py", "from datasets import load_dataset\n", LAZY_DATASETS_NEW, 1),
        ),
    ),
}


#: the patching itself (every anchor counted before anything is written): :mod:`anchors`
apply_to_texts = patched_texts
__all__ = ["EARLY_STOP_NEW", "EARLY_STOP_OLD", "Patch", "PatchError", "apply_to_texts"]


def script_hash() -> str:
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]


def find_mirror(src: Source, explicit: dict[str, str], root: str | None) -> Path:
    """The git folder of ``src``'s clone (see the module docstring for the search order)."""
    if src.method in explicit:
        return Path(explicit[src.method])
    cands = []
    if root:
        cands += [Path(root) / src.mirror_name / "repo", Path(root) / src.mirror_name]
    cands += [REF / f"{src.mirror_name}.git"]
    for c in cands:
        if (c / "objects").is_dir() or (c / ".git").is_dir():
            return c / ".git" if (c / ".git").is_dir() else c
    tried = ", ".join(str(c) for c in cands)
    raise SystemExit(
        f"{src.method}: no git clone of {src.repo} found (tried {tried}). Clone it once:\n"
        f"  git clone --bare https://github.com/{src.repo} .ref/{src.mirror_name}.git\n"
        f"or pass --mirror {src.method}=PATH / --mirror-root DIR."
    )


def extract(src: Source, git_dir: Path, dest: Path) -> None:
    """``git archive <commit> -- <paths>`` of ``src`` into ``dest`` (replaced)."""
    ok = subprocess.run(
        ["git", f"--git-dir={git_dir}", "cat-file", "-e", f"{src.commit}^{{commit}}"], capture_output=True
    )
    if ok.returncode != 0:
        raise SystemExit(f"{src.method}: {git_dir} lacks commit {src.commit}")
    p = subprocess.run(
        ["git", f"--git-dir={git_dir}", "archive", "--format=tar", src.commit, "--", *src.paths],
        capture_output=True,
    )
    if p.returncode != 0:
        raise SystemExit(f"{src.method}: git archive failed: {p.stderr.decode(errors='replace')[-2000:]}")
    if dest.exists():
        subprocess.run(["rm", "-rf", str(dest)], check=True)
    dest.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(p.stdout)) as tf:
        tf.extractall(dest, filter="data")
    (dest / "REF_COMMIT").write_text(src.commit + "\n")
    (dest / "REF_REPO").write_text(src.repo + "\n")


def patch_tree(src: Source, root: Path) -> int:
    """Apply ``src.patches`` under ``root`` (all anchors checked before anything is written)."""
    rels = list(dict.fromkeys(rel for rel, *_ in src.patches))
    texts = {}
    for rel in rels:
        if not (root / rel).is_file():
            raise PatchError(f"{src.method}: patch anchor file missing: {rel}")
        texts[rel] = (root / rel).read_text()
    new = apply_to_texts(texts, src.patches)
    for rel, text in new.items():
        (root / rel).write_text(text)
    (root / MARKER).write_text(marker_text(src.patches))
    return len(src.patches)


def build(method: str, explicit: dict[str, str], mirror_root: str | None, force: bool = False) -> Path:
    """Extract and patch one method's code into ``.ref/<folder>`` unless it is up to date; its path."""
    src = SOURCES[method]
    dest = REF / src.folder
    want = f"{src.commit} {script_hash()}"
    if not force and (dest / MARKER).is_file() and (dest / STAMP).is_file() and (dest / STAMP).read_text() == want:
        print(f"[authors] {dest.relative_to(ROOT)} up to date ({src.repo} @ {src.commit[:10]})")
        return dest
    git_dir = find_mirror(src, explicit, mirror_root)
    extract(src, git_dir, dest)
    n = patch_tree(src, dest)
    (dest / STAMP).write_text(want)
    print(f"[authors] {src.repo} @ {src.commit[:10]} -> {dest.relative_to(ROOT)}: {n} anchors patched")
    return dest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", default=",".join(SOURCES), help=f"comma-separated, of {', '.join(SOURCES)}")
    ap.add_argument("--mirror", action="append", default=[], metavar="METHOD=PATH", help="a clone's git folder")
    ap.add_argument(
        "--mirror-root", default=os.environ.get("AUTHORS_MIRROR_ROOT"), help="folder of <owner>+<name> clones"
    )
    ap.add_argument("--force", action="store_true", help="extract and patch again")
    args = ap.parse_args(argv)
    explicit = dict(m.split("=", 1) for m in args.mirror)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in SOURCES]
    if unknown:
        raise SystemExit(f"--methods: unknown {unknown}; choose from {', '.join(SOURCES)}")
    for m in methods:
        try:
            build(m, explicit, args.mirror_root, args.force)
        except PatchError as e:
            raise SystemExit(f"[authors] {m}: {e}") from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
