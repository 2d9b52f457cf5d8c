"""Exact-anchor patching of the authors' code, shared by ``patch_reference.py`` (unified-model-editing),
``patch_authors.py`` (AlphaEdit, SPHERE, RLSEdit, ENCORE) and ``patch_ultraedit.py``.

A patch is (relative path, old text, new text, expected count of old). Every anchor is counted on the text
the earlier patches left, and all are checked in memory before anything is written, so an upstream change
stops the build with the file and the anchor named and leaves the tree untouched.
"""

from __future__ import annotations

Patch = tuple[str, str, str, int]

#: the early-stop loss of the value optimisation, read from REF_EARLY_STOP_LOSS (the runners set -inf for a
#: fixed number of steps)
EARLY_STOP_OLD = "        if loss < 5e-2:\n            break\n"
EARLY_STOP_NEW = (
    '        if loss < float(__import__("os").environ.get("REF_EARLY_STOP_LOSS", "5e-2")):\n            break\n'
)


class PatchError(SystemExit):
    """An anchor is missing, miscounted or its file absent: upstream changed (a script exits with it)."""


def patched_texts(texts: dict[str, str], patches: list[Patch] | tuple[Patch, ...]) -> dict[str, str]:
    """The patched texts (a new dict: relative path -> text).

    Raises:
        PatchError: a file is missing from ``texts`` or an anchor does not occur exactly as often as expected.
    """
    out = dict(texts)
    for rel, old, new, count in patches:
        if rel not in out:
            raise PatchError(f"patch anchor file missing: {rel}")
        found = out[rel].count(old)
        if found != count:
            raise PatchError(f"{rel}: expected {count} occurrence(s) of {old!r}, found {found}; upstream changed?")
        out[rel] = out[rel].replace(old, new)
    return out


def marker_text(patches: list[Patch] | tuple[Patch, ...]) -> str:
    """What the ``.patched`` marker file records: one line per patch."""
    return "\n".join(f"{rel}: {old!r} -> {new!r} x{n}" for rel, old, new, n in patches) + "\n"
