"""What the tests of the bench/reference runners and patch scripts share: loading a script of
bench/reference as a module (they run in other venvs, so they are not a package) and a tree of files
holding every patch anchor exactly as often as the script expects."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterable
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]
REFERENCE = ROOT / "bench" / "reference"


def load(name: str) -> ModuleType:
    """``bench/reference/<name>.py`` as a module (its folder on ``sys.path`` for its sibling imports)."""
    sys.path.insert(0, str(REFERENCE))
    spec = importlib.util.spec_from_file_location(name, REFERENCE / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def fake_tree(tmp_path: Path, patches: Iterable[tuple[str, str, str, int]], sep: str = "") -> Path:
    """Files holding each anchor of ``patches`` ((file, old, new, count)) exactly ``count`` times, each file's
    anchors followed by ``sep`` and a line of code."""
    texts: dict[str, str] = {}
    for rel, old, _new, count in patches:
        texts[rel] = texts.get(rel, "# head\n") + old * count + sep + "x = 1\n"
    for rel, text in texts.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    return tmp_path
