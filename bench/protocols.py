"""The cost of the evaluation protocols, side by side in one run on SmolLM2-135M:

    python -m bench.protocols --facts 64 --write-results

- per fact: teacher-forced scoring (``sweep.evals.metrics.score_records``: every prompt's target tokens in
  batched forwards) against generation-based scoring (``scoring.generated``: the WILD protocol, greedy
  decoding on the KV cache to a natural stop, ``sweep.evals.generation``), on the same CounterFact and ZsRE
  facts: once as the shared pre-edit work pays it (every prompt decoded) and as a trial pays it (the
  neighbourhood against that reference: decoded and compared, before, or checked by one forward,
  ``decodes_to``);
- one probe point (AlphaEdit's six ``glue_eval`` tasks, ``--probe-items`` each, ``sweep.evals.probes``)
  against one batch of edits (MEMIT at layer 0, ``--edit-batch`` facts, 10 value steps on the bare
  prompt: the value settings of the SmolLM2 studies), the edit restored afterwards.

Each measurement runs once after a warm-up call on two facts; the machine and torch's thread count are
printed with the table.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("bench.protocols")

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
BEGIN, END = "<!-- bench:protocols:begin -->", "<!-- bench:protocols:end -->"
TASKS = ("sst2", "mrpc", "cola", "rte", "nli", "mmlu")


def _timed(fn: Any) -> tuple[Any, float]:
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def _decode_and_compare(model: Any, tok: Any, questions: Any, references: Any, *args: Any) -> list[bool]:
    """An edited model's neighbourhood as it was scored before :func:`sweep.evals.generation.decodes_to`:
    each prompt decoded to its natural stop, then its ids compared with the reference's."""
    from sweep.evals import generation

    gens = generation._generate_questions(model, tok, questions, *args)
    return [tuple(g) == tuple(r) for g, r in zip(gens, references)]


def _scores(g: Any) -> tuple[float, float, float]:
    return (g.gen_es, g.gen_ps, g.gen_ns)


def scoring_costs(model: Any, tok: Any, records: list[Any], gen_tokens: int) -> dict[str, float]:
    """Seconds per fact of each protocol on ``records`` (one dataset), and the generated scores' means.

    Generation is timed as a trial pays it: with the reference (the unedited model's neighbourhood
    generations, made once by the shared pre-edit work, timed too): before, every question decoded to its
    natural stop and the neighbourhood compared with the reference; now, a question's decoding ends once
    its exact match is settled (``answer_settled``) and the neighbourhood is checked by one teacher-forced
    forward (``decodes_to``)."""
    from editors import spec_for
    from sweep.evals import generation
    from sweep.evals.metrics import GenSettings, aggregate, generated_scores, score_records

    spec = spec_for(model)
    score_records(model, tok, spec, records[:2])  # warm-up
    tf, tf_s = _timed(lambda: score_records(model, tok, spec, records, batch_size=64))
    gs = GenSettings("bare", gen_tokens, 64)
    pre, pre_s = _timed(lambda: generated_scores(model, tok, records, gs, None))
    reference = [g.neighbour_ids for g in pre]
    check, settled = generation._check_questions, generation.answer_settled
    generation._check_questions, generation.answer_settled = _decode_and_compare, lambda *a: False
    try:  # before: every question decoded to its stop, the neighbourhood compared with the reference after
        gen0, gen0_s = _timed(lambda: generated_scores(model, tok, records, gs, reference))
    finally:
        generation._check_questions, generation.answer_settled = check, settled
    gen, gen_s = _timed(lambda: generated_scores(model, tok, records, gs, reference))
    n = len(records)
    return {
        "facts": n,
        "teacher_forced_s_per_fact": tf_s / n,
        "pre_edit_generated_s_per_fact": pre_s / n,
        "generated_before_s_per_fact": gen0_s / n,
        "generated_s_per_fact": gen_s / n,
        "generated_same": sum(_scores(a) == _scores(b) for a, b in zip(gen0, gen)),
        "ratio_before": gen0_s / tf_s,
        "ratio": gen_s / tf_s,
        "es": aggregate(tf)["es"],
        "gen_es": 100 * sum(g.gen_es for g in gen) / n,
        "gen_ns": 100 * sum(g.gen_ns for g in gen) / n,
    }


def separate_passes(model: Any, tok: Any, folder: Path, items: int) -> dict[str, tuple[list[int], list[int]]]:
    """The probe point as it ran before one prefill served both predictions: task by task, the
    generation's passes, then the label words' own passes. Returns task -> (generated, likelihood)."""
    import math

    from sweep.evals.probes import encode_task, generate_answers, likelihood_nll, likelihood_prediction

    out = {}
    for name in TASKS:
        enc = encode_task(tok, name, folder, items)
        gen, _ = generate_answers(model, tok, enc, batch_size=32)
        nll = likelihood_nll(model, tok, enc, batch_size=32)
        out[name] = (gen, [likelihood_prediction(enc.task, [math.exp(-v) for v in row]) for row in nll.tolist()])
    return out


def probe_vs_edit(model: Any, tok: Any, records: list[Any], items: int, stats: dict[int, Any]) -> dict[str, float]:
    """Seconds of one probe point (one prefill per prompt, the tasks pooled: ``run_probes``) beside the
    same point run as before (:func:`separate_passes`) and one MEMIT batch of ``records`` (restored
    afterwards); how many of the 2 × items × tasks predictions the two probe runs share."""
    from editors import load_hparams, run_schedule
    from sweep.evals.probes import encode_task, run_probes

    folder = DATA / "glue_eval"
    run_probes(model, tok, ["sst2"], folder, n_items=2)  # warm-up (and the tokenisation cache)
    for name in TASKS:
        encode_task(tok, name, folder, items)  # every task's prompts tokenised before timing (cached)
    before, before_s = _timed(lambda: separate_passes(model, tok, folder, items))
    point, probe_s = _timed(lambda: run_probes(model, tok, list(TASKS), folder, n_items=items, batch_size=32))
    same = sum(
        (a == b)
        for name in TASKS
        for old, new in zip(before[name], (point.predictions[name].generated, point.predictions[name].likelihood))
        for a, b in zip(old, new)
    )
    hp = load_hparams("memit", "smollm2-135m", layers=[0], v_num_grad_steps=10, context_templates="none")
    reqs = [r.request() for r in records]
    _, edit_s = _timed(lambda: run_schedule(model, tok, reqs, "memit", hp, stats, batch_size=len(reqs), mode="batch"))
    return {
        "probe_items": items * len(TASKS),
        "probe_point_before_s": before_s,
        "predictions_same": same,
        "probe_point_s": probe_s,
        "edit_batch": len(reqs),
        "edit_batch_s": edit_s,
        "probe_over_edit": probe_s / edit_s,
        "probe_s_per_item": probe_s / (items * len(TASKS)),
        "probe_sst2_f1": point.metrics()["probe_sst2_f1"],
    }


def layer0_stats(model: Any, tok: Any) -> dict[int, Any]:
    """Layer 0's second moments from 20,000 tokens of the embedded Wikipedia text."""
    from editors import spec_for
    from editors.corpus import EMBEDDED_WIKI, CorpusSpec, iter_texts
    from editors.stats import collect_second_moments

    texts = iter_texts(CorpusSpec(EMBEDDED_WIKI))
    return collect_second_moments(model, tok, spec_for(model), [0], texts, max_tokens=20_000, progress=False)


def run(n_facts: int, threads: int, items: int, edit_batch: int, gen_tokens: int) -> dict[str, Any]:
    from editors import load_model
    from sweep.evals.data import load_dataset, select
    from sweep.stages import machine

    torch.set_num_threads(threads)
    model, tok = load_model(None)
    cf = select(load_dataset("counterfact", str(DATA / "counterfact" / "counterfact-edit.json")), n=n_facts)
    zs = load_dataset("zsre", str(DATA / "zsre" / "zsre_mend_eval_portability_gpt4.json"))[:n_facts]
    out: dict[str, Any] = {"machine": machine(), "gen_max_new_tokens": gen_tokens}
    out["counterfact"] = scoring_costs(model, tok, cf, gen_tokens)
    out["zsre"] = scoring_costs(model, tok, zs, gen_tokens)
    out["probe_vs_edit"] = probe_vs_edit(model, tok, cf[:edit_batch], items, layer0_stats(model, tok))
    return out


def table(res: dict[str, Any]) -> str:
    m = res["machine"]
    lines = [
        f"### Protocol costs, SmolLM2-135M fp32, {m['threads']} threads ({m['cpu']})",
        "",
        "| dataset | facts | teacher-forced s/fact | generated s/fact, the unedited model (every prompt decoded: "
        "the shared pre-edit work, once) | generated s/fact in a trial, neighbourhood decoded (before) "
        "| generated s/fact in a trial, neighbourhood checked by one forward | generated ÷ teacher-forced in a "
        "trial (before → now) | facts scored the same | ES teacher-forced | ES / NS generated |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in ("counterfact", "zsre"):
        r = res[name]
        lines.append(
            f"| {name} | {r['facts']} | {r['teacher_forced_s_per_fact']:.3f} "
            f"| {r['pre_edit_generated_s_per_fact']:.3f} "
            f"| {r['generated_before_s_per_fact']:.3f} | {r['generated_s_per_fact']:.3f} "
            f"| {r['ratio_before']:.1f}× → {r['ratio']:.1f}× | {r['generated_same']} / {r['facts']} | {r['es']:.1f} "
            f"| {r['gen_es']:.1f} / {r['gen_ns']:.1f} |"
        )
    p = res["probe_vs_edit"]
    lines += [
        "",
        f"Generation capped at {res['gen_max_new_tokens']} new tokens, batches of 64 prompts.",
        "",
        "| one probe point (6 tasks) | task by task, two passes (before) s | one prefill, tasks pooled s "
        "| speed-up | predictions equal | one edit batch (MEMIT, layer 0, 10 value steps) | seconds | probe ÷ edit |",
        "|---|---:|---:|---:|---:|---|---:|---:|",
        f"| {p['probe_items']} items ({p['probe_s_per_item']:.2f} s/item) | {p['probe_point_before_s']:.1f} "
        f"| {p['probe_point_s']:.1f} | {p['probe_point_before_s'] / p['probe_point_s']:.2f}× "
        f"| {p['predictions_same']} / {2 * p['probe_items']} "
        f"| {p['edit_batch']} facts | {p['edit_batch_s']:.1f} | {p['probe_over_edit']:.2f} |",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.protocols", description=__doc__.split("\n\n")[0])
    ap.add_argument("--facts", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--probe-items", type=int, default=100, help="items per task (AlphaEdit: 100)")
    ap.add_argument("--edit-batch", type=int, default=32)
    ap.add_argument("--gen-tokens", type=int, default=20)
    ap.add_argument("--out", default="bench/out/protocols.json")
    ap.add_argument("--write-results", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    res = run(args.facts, args.threads, args.probe_items, args.edit_batch, args.gen_tokens)
    from bench.run import publish

    publish(table(res), res, args.out, BEGIN, END, args.write_results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
