"""Context templates: short generated prefixes that make keys and values robust to context.

ROME (``rome_main.get_context_templates``): ``"{}"`` plus 10 samples of at most 5 tokens and 10 of at
most 10 tokens generated from ``"<|endoftext|>"``, each followed by ``". {}"``; keys are the plain
mean over all 21. MEMIT/EMMET/AlphaEdit (``memit_main.get_context_templates``): groups
``[["{}"], [5 texts from "The", "Therefore", "Because", "I", "You", at most 10 tokens]]``; keys
average within each group, then across groups. Generation is top-k (k = 5) sampling as in the
reference's ``generate_fast``, where the length limit counts the prompt's tokens.

Differences from the reference, on purpose: generation is seeded (the reference draws from the global
RNG, so two runs edit with different templates) and leaves the caller's RNG state untouched; special
tokens are skipped when decoding (the reference keeps e.g. Llama-3's BOS text in the template).
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from .model import model_device

#: Template groups; every template holds one ``{}`` for the request's prompt.
TemplateGroups = tuple[tuple[str, ...], ...]
Style = Literal["rome", "memit", "none"]

#: Number of templates of each style (prompts per request in the key average and the value optimisation).
N_TEMPLATES: dict[str, int] = {"rome": 21, "memit": 6, "none": 1}


def generate_texts(
    model: nn.Module, tok: Any, prompts: Sequence[str], n_per_prompt: int, max_len: int, seed: int
) -> list[str]:
    """Top-k (k = 5) samples continuing each prompt; ``max_len`` counts the prompt's tokens.

    Returns ``len(prompts) * n_per_prompt`` texts that include the prompt, NFKD-normalised, with
    blank lines folded and ``{``/``}`` replaced by spaces (so the text is a safe template).
    """
    device = model_device(model)
    out: list[str] = []
    devices = [] if device.type == "cpu" else [device.index or 0]
    with torch.random.fork_rng(devices=devices, device_type=device.type), torch.no_grad():
        torch.manual_seed(seed)
        for prompt in prompts:
            enc = tok([prompt] * n_per_prompt, return_tensors="pt")
            ids = enc["input_ids"].to(device)
            new = max(max_len - ids.shape[1], 0)
            if new:
                ids = model.generate(
                    ids,
                    attention_mask=enc["attention_mask"].to(device),
                    do_sample=True,
                    top_k=5,
                    top_p=1.0,
                    temperature=1.0,
                    max_new_tokens=new,
                    min_new_tokens=new,
                    pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
                )
            for row in ids.tolist():
                text = tok.decode(row, skip_special_tokens=True)
                text = unicodedata.normalize("NFKD", text).replace("\n\n", " ").replace("<|endoftext|>", "")
                out.append(text.replace("{", " ").replace("}", " "))
    return out


def context_templates(model: nn.Module, tok: Any, style: Style, seed: int = 0) -> TemplateGroups:
    """The reference's context templates for ``style`` ("rome", "memit", or "none" = just ``"{}"``)."""
    if style == "none":
        return (("{}",),)
    if style == "rome":
        texts = generate_texts(model, tok, ["<|endoftext|>"], 10, 5, seed)
        texts += generate_texts(model, tok, ["<|endoftext|>"], 10, 10, seed + 1)
        return (("{}", *(t + ". {}" for t in texts)),)
    if style == "memit":
        texts = generate_texts(model, tok, ["The", "Therefore", "Because", "I", "You"], 1, 10, seed)
        return (("{}",), tuple(t + ". {}" for t in texts))
    raise ValueError(f"context_templates: unknown style {style!r}; use 'rome', 'memit' or 'none'")


@dataclass
class TemplateCache:
    """Caller-owned cache of generated templates, keyed by (model name, style, seed).

    Templates depend on the unedited model; a sweep generates them once per model and reuses them in
    every trial (the reference keeps a module-level global instead).
    """

    entries: dict[tuple[str, str, int], TemplateGroups] = field(default_factory=dict)

    def get(self, model: nn.Module, tok: Any, style: Style, seed: int = 0) -> TemplateGroups:
        key = (str(getattr(model.config, "name_or_path", "")) or type(model).__name__, style, seed)
        if key not in self.entries:
            self.entries[key] = context_templates(model, tok, style, seed)
        return self.entries[key]


def flat(groups: TemplateGroups) -> tuple[str, ...]:
    """All templates in order (value optimisation weighs every prompt equally)."""
    return tuple(t for g in groups for t in g)
