"""bf16 on the CPU: one trial in float32 and in bfloat16 weights and activations, side by side.

    python -m bench.bf16 --write-results     # MEMIT B = 16 and 64 on SmolLM2, the benchmark's facts

The trial is bench.run's (layer 2, 10 fixed value steps, no early stop, the first 16 / 64 CounterFact
facts), run with ``model.dtype`` float32 and bfloat16: keys, values, statistics and scoring then run in
bf16, while δ, its Adam state, the accumulation of C and the solves stay in fp32/fp64 (editors' own
casts). Reported: seconds per edit by stage and every record's ES/PS/NS against fp32.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from typing import Any

import torch

log = logging.getLogger("bench.bf16")
BEGIN, END = "<!-- bench:bf16:begin -->", "<!-- bench:bf16:end -->"


def one(n: int, batch: int, dtype: str, threads: int, store: str) -> dict[str, Any]:
    from bench.run import FACTS
    from sweep.config import parse_config
    from sweep.trial import trial_alone

    torch.set_num_threads(threads)
    cfg = parse_config(
        {
            "algorithm": "memit",
            "hparams": "smollm2-135m",
            "hp": {"v_num_grad_steps": 10, "early_stop_loss": 0.0},
            "layers": [2],
            "n_edits": n,
            "batch_size": batch,
            "mode": "batch",
            "model": {"device": "cpu", "dtype": dtype},
            "dataset": {"source": str(FACTS)},
            "stats": {"corpus": "embedded:wiki", "max_tokens": 20000, "store": store},
            "scoring": {"pre": False, "ppl": False},
        }
    )
    res = trial_alone(cfg, progress=False)
    t = res.timings
    return {
        "dtype": dtype,
        "n": n,
        "batch": batch,
        "s_per_edit": {k: t[k] / n for k in ("keys", "values", "solve", "score")},
        "shared_s": t["shared"],
        "per_record": {r["case_id"]: {m: r[f"at_edit_{m}"] for m in ("es", "ps", "ns")} for r in res.per_record},
        "metrics": {m: res.metrics["at_edit"][m] for m in ("es", "ps", "ns", "s")},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.bf16", description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", default="16:16,64:16,64:64", help="n_edits:batch pairs")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench/out/bf16.json")
    ap.add_argument("--write-results", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    rows = []
    lines = [
        "### fp32 vs bf16 weights and activations on the CPU (MEMIT, layer 2, 10 value steps)",
        "",
        "| facts | B | dtype | keys s/edit | values s/edit | solve s/edit | score s/fact | edit speed-up "
        "| ES | PS | NS | S | records differing (ES/PS/NS) |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    with tempfile.TemporaryDirectory() as store:
        for item in args.configs.split(","):
            n, b = (int(x) for x in item.split(":"))
            pair = {dt: one(n, b, dt, args.threads, store) for dt in ("float32", "bfloat16")}
            rows.append(pair)
            f32 = pair["float32"]
            edit32 = sum(f32["s_per_edit"][k] for k in ("keys", "values", "solve"))
            for dt, r in pair.items():
                se = r["s_per_edit"]
                edit = se["keys"] + se["values"] + se["solve"]
                differ = sum(
                    r["per_record"][c][m] != f32["per_record"][c][m]
                    for c in r["per_record"]
                    for m in ("es", "ps", "ns")
                )
                m = r["metrics"]
                lines.append(
                    f"| {n} | {b} | {dt} | {se['keys']:.3f} | {se['values']:.3f} | {se['solve']:.4f} "
                    f"| {se['score']:.3f} | {edit32 / edit:.1f}x | {m['es']:.1f} | {m['ps']:.1f} | {m['ns']:.1f} "
                    f"| {m['s']:.2f} | {differ} |"
                )
    from bench.run import publish

    publish("\n".join(lines) + "\n", rows, args.out, BEGIN, END, args.write_results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
