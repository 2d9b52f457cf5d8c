"""CounterFact scoring, side by side: ours (shared-prompt KV cache, batched) vs the reference code.

    bash bench/reference/build.sh                      # once (see bench/README.md)
    python -m bench.scoring --facts 64 --write-results # SmolLM2-135M, the first 64 CounterFact facts

Every record's rewrite, paraphrase and neighbourhood prompts are scored with both targets on the
unedited model (the generation test excluded, as in bench.run), by:

- ``reference``: ``compute_rewrite_quality_counterfact`` one record per call, in its own venv;
- ``ours, per fact``: ``sweep.evals.metrics.score_records`` one record per call (the same granularity);
- ``ours, batched``: all records in one call (what a sweep does), ``scoring.batch_size`` prompts per
  forward;
- ``ours, full rows``: the previous algorithm (each (prompt, target) pair a row of its own, so every
  prompt runs twice), for the gain of the shared prompt;
- ``ours, bf16``: batched with bf16 weights and activations.

Also: a FLOP estimate of the useful work (2 × non-embedding parameters per token run, plus the LM head
at each target token) and the machine's fp32 and bf16 matmul rates, so the achieved rate can be read
against the machine's limit; and every record's ES/PS/NS compared between the methods.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import time
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("bench.scoring")

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- bench:scoring:begin -->", "<!-- bench:scoring:end -->"


def matmul_gflops(dtype: torch.dtype, n: int = 1536, m: int = 2048, reps: int = 20) -> float:
    a, b = torch.randn(m, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * m * n * n * reps / (time.perf_counter() - t) / 1e9


@torch.no_grad()
def full_rows_scores(model: Any, tok: Any, spec: Any, pairs: list[tuple[str, str]], batch_size: int = 64) -> Any:
    """The previous scoring: one right-padded row per (prompt, target) pair (the prompt runs per target)."""
    from editors.model import get_module, hooks, model_device, run_until
    from editors.requests import encode, pad_id, pad_right, target_ids

    device = model_device(model)
    seqs, spans = [], []
    for prompt, target in pairs:
        p_ids, t_ids = encode(tok, prompt)[0], target_ids(tok, target)
        seqs.append(p_ids + t_ids)
        spans.append((len(p_ids), t_ids))
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    nll = torch.zeros(len(seqs), dtype=torch.float64)
    lm_head = get_module(model, spec.lm_head)
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        ids, mask = pad_right([seqs[i] for i in idx], pad_id(tok), device)
        with hooks(model, outputs=[spec.final_norm], stop_after=spec.final_norm) as st:
            run_until(model, input_ids=ids, attention_mask=mask)
        hidden = st[f"out:{spec.final_norm}"]
        for j, i in enumerate(idx):
            start, t_ids = spans[i]
            logp = torch.log_softmax(lm_head(hidden[j, start - 1 : start - 1 + len(t_ids)]).float(), -1)
            nll[i] = -logp.gather(1, torch.tensor(t_ids)[:, None]).mean()
    return nll


def pairs_of(records: list[Any]) -> list[tuple[str, str]]:
    """The (prompt, target) pairs ``score_records`` scores: each prompt with the new target and the true
    one (the neighbourhood's answer for neighbourhood prompts)."""
    out = []
    for r in records:
        for p in (r.rewrite_prompt, *r.paraphrase_prompts):
            out += [(p, r.target_new), (p, r.target_true)]
        for p in r.neighborhood_prompts:
            out += [(p, r.target_new), (p, r.neighborhood_answer)]
    return out


def useful_flops(model: Any, tok: Any, records: list[Any]) -> float:
    """2 × non-embedding parameters per token the shared-prompt method runs (each prompt but its last
    token once, then per target its length), plus 2·d·vocab per target token for the LM head."""
    from editors.requests import encode, target_ids

    pairs = pairs_of(records)
    prompts = {p for p, _ in pairs}
    tokens = sum(len(encode(tok, p)[0]) - 1 for p in prompts) + sum(len(target_ids(tok, t)) for _, t in pairs)
    target_tokens = sum(len(target_ids(tok, t)) for _, t in pairs)
    cfg = model.config
    emb = cfg.vocab_size * cfg.hidden_size
    params = sum(p.numel() for p in model.parameters()) - emb * (1 if cfg.tie_word_embeddings else 2)
    return 2 * params * tokens + 2 * cfg.hidden_size * cfg.vocab_size * target_tokens


def timed(fn: Any, reps: int = 2) -> tuple[Any, float]:
    """(fn(), the best wall time of ``reps`` calls): the first call also warms caches up."""
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return out, best


def run(n_facts: int, threads: int, reference: bool) -> dict[str, Any]:
    from bench.run import REF_PY, REF_RUNNER, rome_records, subprocess_json
    from editors import load_model, spec_for
    from sweep.evals.data import load_counterfact, select
    from sweep.evals.metrics import score_records

    torch.set_num_threads(threads)
    records = select(load_counterfact(str(ROOT.parent / "shared/data/counterfact/counterfact-edit.json")), n=n_facts)
    model, tok = load_model(None, device="cpu")
    spec = spec_for(model)
    score_records(model, tok, spec, records[:2])  # warm-up
    res: dict[str, Any] = {
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "threads": threads,
        "facts": n_facts,
        "torch": torch.__version__,
        "matmul_gflops": {"float32": matmul_gflops(torch.float32), "bfloat16": matmul_gflops(torch.bfloat16)},
    }
    batched, res["batched_s"] = timed(lambda: score_records(model, tok, spec, records))
    per_fact, res["per_fact_s"] = timed(lambda: [score_records(model, tok, spec, [r])[0] for r in records])
    _, res["full_rows_s"] = timed(lambda: full_rows_scores(model, tok, spec, pairs_of(records)))
    res["useful_gflop"] = useful_flops(model, tok, records) / 1e9
    model16, tok16 = load_model(None, device="cpu", dtype="bfloat16")
    score_records(model16, tok16, spec, records[:2])
    bf16, res["bf16_s"] = timed(lambda: score_records(model16, tok16, spec, records))
    metrics = ("es", "ps", "ns")
    res["differ_batched_vs_per_fact"] = sum(
        getattr(a, m) != getattr(b, m) for a, b in zip(batched, per_fact) for m in metrics
    )
    res["differ_bf16_vs_fp32"] = sum(getattr(a, m) != getattr(b, m) for a, b in zip(batched, bf16) for m in metrics)
    res["bf16_minus_fp32"] = {
        m: 100 * (sum(getattr(b, m) for b in bf16) - sum(getattr(a, m) for a in batched)) / n_facts for m in metrics
    }
    if reference:
        out = ROOT / "bench" / "out"
        out.mkdir(parents=True, exist_ok=True)
        spec_file = out / "score_bench.json"
        spec_file.write_text(json.dumps({"records": str(rome_records(n_facts)), "threads": threads}))
        env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "PATH": "/usr/bin:/bin"}
        cmd = [str(REF_PY), str(REF_RUNNER), "--score-bench", str(spec_file), "--out", str(out / "score_ref.json")]
        ref = subprocess_json(cmd, out / "score_ref.json", env)
        res["reference_s"] = ref["seconds"]
        ours = {s.case_id: s for s in per_fact}
        res["differ_vs_reference"] = sum(
            float(getattr(ours[r["case_id"]], m)) != r[m]
            for r in ref["per_record"]
            for m in metrics
            if r[m] is not None
        )
    return res


def table(r: dict[str, Any]) -> str:
    n = r["facts"]
    rows = [("ours, batched (a sweep)", r["batched_s"]), ("ours, one fact per call", r["per_fact_s"])]
    rows += [("ours, full rows (previous algorithm)", r["full_rows_s"]), ("ours, batched, bf16", r["bf16_s"])]
    if "reference_s" in r:
        rows.insert(0, ("reference, one fact per call", r["reference_s"]))
    ref = r.get("reference_s")
    lines = [
        f"### Scoring s/fact, SmolLM2-135M fp32, {n} CounterFact facts, {r['threads']} threads ({r['machine']})",
        "",
        "| method | s/fact | reference ÷ this | GFLOP/s (useful work) |",
        "|---|---:|---:|---:|",
    ]
    for name, sec in rows:
        ratio = f"{ref / sec:.1f}x" if ref else "–"
        lines.append(f"| {name} | {sec / n:.4f} | {ratio} | {r['useful_gflop'] / sec:.0f} |")
    lines += [
        "",
        f"Useful work: {r['useful_gflop']:.1f} GFLOP for the {n} facts (2 × non-embedding parameters per token "
        "run + the LM head at the target tokens). Machine: a 2048×1536×1536 matmul at "
        f"{r['matmul_gflops']['float32']:.0f} GFLOP/s in fp32 and {r['matmul_gflops']['bfloat16']:.0f} in bf16.",
        f"Records' ES/PS/NS that differ: batched vs one per call {r['differ_batched_vs_per_fact']}, "
        + (f"ours vs the reference {r['differ_vs_reference']}, " if "differ_vs_reference" in r else "")
        + f"bf16 vs fp32 {r['differ_bf16_vs_fp32']} (mean bf16 − fp32, points: "
        + ", ".join(f"{k.upper()} {v:+.2f}" for k, v in r["bf16_minus_fp32"].items())
        + ").",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.scoring", description=__doc__.split("\n\n")[0])
    ap.add_argument("--facts", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-reference", action="store_true")
    ap.add_argument("--out", default="bench/out/scoring.json")
    ap.add_argument("--write-results", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    res = run(args.facts, args.threads, reference=not args.no_reference)
    from bench.run import publish

    publish(table(res), res, args.out, BEGIN, END, args.write_results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
