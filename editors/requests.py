"""Edit requests and the token bookkeeping every algorithm shares.

A request rewrites ``(subject, relation) -> target_new``, given as a prompt that holds the subject
either as a ``{}`` placeholder (the ROME/CounterFact format) or written in (the EasyEdit format).
Token positions are found from character offsets of the *full* text, so a tokenizer that adds BOS
(Llama-3) or merges across the subject boundary still gets the right position.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch


class RequestError(ValueError):
    """An edit request cannot be used; the message names the case and the field."""


@dataclass(frozen=True)
class EditRequest:
    """One fact to write: ``prompt.format(subject) + " " + target_new``.

    Attributes:
        prompt: e.g. ``"{} is located in"`` or ``"The Eiffel Tower is located in"``.
        subject: e.g. ``"The Eiffel Tower"``; must occur in the prompt if there is no ``{}``.
        target_new: the new object, e.g. ``"Rome"`` (a leading space is added when tokenising).
        target_true: the current object, if known (used by scoring, not by editing).
        case_id: an identifier carried through to results.
    """

    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None
    case_id: int | str | None = None

    @property
    def name(self) -> str:
        return f"case {self.case_id}" if self.case_id is not None else f"request {self.subject!r}"

    @property
    def template(self) -> str:
        """The prompt with the subject as ``{}`` (first occurrence)."""
        if "{}" in self.prompt:
            return self.prompt
        i = self.prompt.find(self.subject)
        if not self.subject or i < 0:
            raise RequestError(f"{self.name}: subject {self.subject!r} not found in the prompt {self.prompt!r}")
        return self.prompt[:i] + "{}" + self.prompt[i + len(self.subject) :]


def as_request(r: EditRequest | dict[str, Any]) -> EditRequest:
    """Accept an :class:`EditRequest` or a dict with the same keys (``ground_truth`` = target_true)."""
    if isinstance(r, EditRequest):
        return r
    d = dict(r)
    if "ground_truth" in d and "target_true" not in d:
        d["target_true"] = d.pop("ground_truth")
    try:
        return EditRequest(**{k: d[k] for k in d if k in EditRequest.__dataclass_fields__})
    except TypeError as e:
        raise RequestError(f"request {d.get('case_id', d)!r}: {e}") from None


def fill(template: str, subject: str) -> tuple[str, int]:
    """Substitute the subject for the first ``{}``; return (text, char index one past the subject)."""
    i = template.index("{}")
    return template[:i] + subject + template[i + 2 :], i + len(subject)


def target_ids(tok: Any, target: str) -> list[int]:
    """Token ids of ``" " + target`` without special tokens (no BOS inside targets: the Llama-3 pitfall)."""
    text = target if target.startswith(" ") else " " + target
    return list(tok(text, add_special_tokens=False)["input_ids"])


def validate_requests(tok: Any, requests: Sequence[EditRequest]) -> None:
    """Fail early, naming the case and field, for anything that would break an edit later."""
    for r in requests:
        if not r.subject.strip():
            raise RequestError(f"{r.name}: subject is empty")
        tpl = r.template
        if tpl.count("{}") != 1:
            raise RequestError(f"{r.name}: prompt must hold exactly one '{{}}' for the subject, got {tpl!r}")
        if not r.target_new.strip() or not target_ids(tok, r.target_new):
            raise RequestError(f"{r.name}: target_new {r.target_new!r} is empty after tokenisation")


def encode(tok: Any, text: str) -> tuple[list[int], Any]:
    """Token ids of ``text`` with the tokenizer's special tokens (BOS if it adds one), plus the
    encoding for offset lookups (None for slow tokenizers)."""
    enc = tok(text)
    return list(enc["input_ids"]), (enc if getattr(enc, "_encodings", None) else None)


def encode_at(tok: Any, text: str, char_end: int) -> tuple[list[int], int]:
    """Token ids of ``text`` (as :func:`encode`) and the index of the token that holds character
    ``char_end - 1``, from one tokenisation.

    With a fast tokenizer the index comes from the offsets of the full text; otherwise it counts the
    tokens of the prefix (the reference code's method).
    """
    ids, enc = encode(tok, text)
    if enc is not None:
        c = char_end - 1
        while c >= 0 and text[c].isspace():
            c -= 1
        idx = enc.char_to_token(max(c, 0))
        if idx is not None:
            return ids, idx
    return ids, len(tok(text[:char_end])["input_ids"]) - 1


def token_at_char(tok: Any, text: str, char_end: int) -> int:
    """Index of the token that holds character ``char_end - 1`` of ``text`` in ``tok(text)``."""
    return encode_at(tok, text, char_end)[1]


def pad_right(seqs: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token lists: (input_ids [n, L], attention_mask [n, L]). Right padding keeps every
    position id equal to its index, so positions read from unpadded encodings stay valid."""
    n, length = len(seqs), max(len(s) for s in seqs)
    ids = torch.full((n, length), pad_id, dtype=torch.long)
    mask = torch.zeros((n, length), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids.to(device), mask.to(device)


def pad_id(tok: Any) -> int:
    for v in (tok.pad_token_id, tok.eos_token_id, 0):
        if v is not None:
            return int(v)
    return 0
