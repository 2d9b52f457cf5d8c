"""Side-by-side benchmark: this project vs the paper's reference code (unified-model-editing).

    bash bench/reference/build.sh        # once: the reference code, its own venv, SmolLM2 as an HF folder
    python -m bench.run                  # every configuration, then bench/out/results.md
    python -m bench.run --write-results  # ... and the tables in bench/RESULTS.md replaced in place
    python -m bench.run --configs memit-16 --steps 5   # a quick look

Same model (SmolLM2-135M-Instruct, fp32), same facts (the first records of CounterFact's edit split),
same hyperparameters (this project's ``smollm2-135m`` presets, at ``--layer``), the same context
templates (ours, handed to the reference) and the same second-moment matrix C (ours, converted to the
reference's file format) on both sides. The value optimisation runs a fixed number of steps without
early stop (``--steps``; ``--steps 0`` keeps the presets' 25 steps with the 5e-2 early stop) so that
both sides do the same work. Protocol: the reference's batch (non-sequential) mode: each batch of B
facts edited into the unedited model, its facts scored, the weights restored.

Each configuration runs in a fresh process per side, one after the other (peak memory = that process's
peak resident set); the machine should be otherwise idle. Timings per edit: keys, values, solve (the
rest of the edit call) and scoring (ES/PS/NS prompts; the reference's optional 50-token generation test
is timed separately on ``--generation-facts`` facts). Statistics: tokens/s of the second-moment
collection for one shallow layer, and for every layer in one pass (ours) vs one pass per layer (the
reference collects one layer per pass; its all-layer cost is the sum over the layers it was timed on,
interpolated linearly between them and labelled as such).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from editors.store import write_json_atomic, write_text_atomic

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
FACTS = SHARED / "counterfact" / "counterfact-edit.json"
REF_PY = ROOT / ".ref" / "venv" / "bin" / "python"
REF_RUNNER = ROOT / "bench" / "reference" / "run_reference.py"
REF_MODEL = ROOT / ".ref" / "smollm2-hf"
OUT = ROOT / "bench" / "out"
RESULTS = ROOT / "bench" / "RESULTS.md"
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
STATS_BEGIN, STATS_END = "<!-- bench:stats:begin -->", "<!-- bench:stats:end -->"

# name -> (algorithm, batch size, edits)
CONFIGS: dict[str, tuple[str, int, int]] = {
    "rome-1": ("rome", 1, 4),
    "memit-16": ("memit", 16, 16),
    "memit-64": ("memit", 64, 64),
    "emmet-16": ("emmet", 16, 16),
    "emmet-64": ("emmet", 64, 64),
}
# The preset fields the reference runner maps onto its own hyperparameter classes.
SHARED_HP = (
    "v_num_grad_steps",
    "v_loss_layer",
    "v_lr",
    "v_weight_decay",
    "clamp_norm_factor",
    "kl_factor",
    "mom2_dtype",
)
ALG_HP = {
    "rome": ("mom2_adjustment",),
    "memit": ("mom2_update_weight",),
    "emmet": ("mom2_update_weight", "emmet_lambda"),
}

log = logging.getLogger("bench.run")


def machine_info(threads: int) -> dict[str, Any]:
    """The machine line's facts: CPU, cores, torch threads per side, torch and transformers versions."""
    import torch
    import transformers

    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "threads": threads,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def peak_rss_mb() -> float:
    """Peak resident set of this process (Linux reports kB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ----------------------------------------------------------------------------------------------------
# Our side (runs in a fresh process: ``python -m bench.run --side ours --spec ... --out ...``)


def trial_config(spec: dict[str, Any], mode: str = "batch") -> dict[str, Any]:
    """The sweep.trial configuration of one benchmark configuration: ``spec``'s algorithm, layer, facts and
    batch size, its ``hp`` overrides and, with ``steps``, that many value steps with no early stop."""
    hp: dict[str, Any] = dict(spec.get("hp", {}))
    if spec["steps"]:
        hp.update(v_num_grad_steps=spec["steps"], early_stop_loss=0.0)
    return {
        "algorithm": spec["algorithm"],
        "hparams": "smollm2-135m",
        "hp": hp,
        "layers": [spec["layer"]],
        "n_edits": spec["n_edits"],
        "batch_size": spec["batch_size"],
        "mode": mode,
        "model": {"device": "cpu"},
        "dataset": {"source": str(FACTS)},
        "scoring": {"pre": False, "ppl": False},
    }


def run_ours(spec: dict[str, Any]) -> dict[str, Any]:
    """One configuration with this project's trial runner; also exports what the reference must share."""
    import torch

    from editors.stats import StatsStore
    from sweep.config import parse_config
    from sweep.shared.keys import model_identity, stats_keys
    from sweep.trial import trial_alone

    torch.set_num_threads(spec["threads"])
    cfg = parse_config(trial_config(spec))
    res = trial_alone(cfg, progress=False)
    layer = spec["layer"]
    key = stats_keys(cfg, [layer], model_identity(cfg.model))[layer]
    stats_file = StatsStore(cfg.stats.store).path(key)
    t = res.timings
    return {
        "timings": {k: t.get(k, 0.0) for k in ("load", "shared", "keys", "values", "solve", "score")},
        "n_edits": spec["n_edits"],
        "per_record": [
            {"case_id": r["case_id"], **{m: r[f"at_edit_{m}"] for m in ("es", "ps", "ns")}} for r in res.per_record
        ],
        "metrics": {m: res.metrics["at_edit"][m] for m in ("es", "ps", "ns")},
        "peak_rss_mb": peak_rss_mb(),
        "templates": res.templates,
        "hparams": res.hparams,
        "stats_file": str(stats_file) if stats_file.is_file() else None,
        "versions": res.versions,
    }


def run_ours_stats(spec: dict[str, Any]) -> dict[str, Any]:
    """Statistics throughput on the texts the reference reads: one layer, then every layer in one pass."""
    import torch

    from editors import load_model, spec_for
    from editors.stats import collect_second_moments

    torch.set_num_threads(spec["threads"])
    texts = json.loads(Path(spec["texts"]).read_text())
    model, tok = load_model(None, device="cpu")
    ms = spec_for(model)
    rows = {}
    for label, layers in (("one", [spec["layer"]]), ("all", list(range(ms.n_layers)))):
        t = time.perf_counter()
        st = collect_second_moments(model, tok, ms, layers, iter(texts), max_tokens=spec["tokens"], progress=False)
        dt = time.perf_counter() - t
        n = next(iter(st.values())).n_tokens
        rows[label] = {"layers": len(layers), "tokens": n, "seconds": dt, "tokens_per_s": n / dt}
    rows["peak_rss_mb"] = peak_rss_mb()
    return rows


# ----------------------------------------------------------------------------------------------------
# The driver


def rome_records(n: int) -> Path:
    """The first n CounterFact records in the ROME format the reference reads (built from the EasyEdit copy)."""
    from sweep.evals.data import load_counterfact, select

    recs = select(load_counterfact(str(FACTS)), n=n)
    out = [
        {
            "case_id": r.case_id,
            "requested_rewrite": {
                "prompt": r.prompt,
                "subject": r.subject,
                "target_new": {"str": r.target_new},
                "target_true": {"str": r.target_true},
            },
            "paraphrase_prompts": list(r.paraphrase_prompts),
            "neighborhood_prompts": list(r.neighborhood_prompts),
            "attribute_prompts": [],
            # EasyEdit records carry no generation prompts: the reference's generation test gets the rewrite
            # prompt (its cost does not depend on which prompt it continues).
            "generation_prompts": list(r.generation_prompts) or [r.rewrite_prompt],
        }
        for r in recs
    ]
    path = OUT / f"records_{n}.json"
    path.write_text(json.dumps(out))
    return path


def stats_texts(n_texts: int) -> Path:
    from editors.corpus import EMBEDDED_WIKI, CorpusSpec, iter_texts

    path = OUT / "stats_texts.json"
    path.write_text(json.dumps(list(iter_texts(CorpusSpec(EMBEDDED_WIKI, max_texts=n_texts)))))
    return path


def subprocess_json(cmd: list[str], out: Path, env: dict[str, str]) -> dict[str, Any]:
    """Run one side in a fresh process; its JSON result, or an error naming the command and its output tail."""
    out.unlink(missing_ok=True)
    t = time.perf_counter()
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if p.returncode != 0 or not out.exists():
        tail = (p.stdout + p.stderr)[-3000:]
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {p.returncode}):\n{tail}")
    res = json.loads(out.read_text())
    res["wall_s"] = time.perf_counter() - t
    return res


def check_reference() -> None:
    missing = [str(p.relative_to(ROOT)) for p in (REF_PY, REF_RUNNER, REF_MODEL) if not p.exists()]
    if missing:
        raise SystemExit(
            f"error: the reference is not built ({', '.join(missing)} missing): run bash bench/reference/build.sh"
        )


def ref_spec(spec: dict[str, Any], ours: dict[str, Any], records: Path) -> dict[str, Any]:
    hp = ours["hparams"]
    keys = SHARED_HP + ALG_HP[spec["algorithm"]]
    return {
        "model_dir": str(REF_MODEL),
        "algorithm": spec["algorithm"],
        "layers": [spec["layer"]],
        # v_loss_layer None (ours: the last layer) is left to the runner, which defaults to the model's last block.
        "hparams": {k: hp[k] for k in keys if k != "v_loss_layer" or hp[k] is not None},
        "early_stop": not spec["steps"],
        "context_templates": ours["templates"],
        "records": str(records),
        "n_records": spec["n_edits"],
        "batch_size": spec["batch_size"],
        "stats": {str(spec["layer"]): str(stats_npz(Path(ours["stats_file"])))} if ours["stats_file"] else {},
        "generation": spec["generation_facts"] > 0,
        "generation_records": spec["generation_facts"],
        "threads": spec["threads"],
    }


def stats_npz(src: Path) -> Path:
    """Our C written in the reference's file format (bench/reference/stats_to_npz.py checks the round trip)."""
    out = OUT / f"{src.stem}.npz"
    if not out.exists():
        cmd = [sys.executable, str(ROOT / "bench/reference/stats_to_npz.py"), str(src), "--out", str(out)]
        subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True)
    return out


def compare(ours: dict[str, Any], ref: dict[str, Any]) -> dict[str, Any]:
    """Metric differences, per record and on average (percentage points)."""
    r_by = {r["case_id"]: r for r in ref["per_record"]}
    diffs = {m: [] for m in ("es", "ps", "ns")}
    for o in ours["per_record"]:
        r = r_by.get(o["case_id"])
        if r is None:
            continue
        for m in diffs:
            diffs[m].append(100 * (fraction(o[m]) - fraction(r[m])))
    return {
        m: {
            "mean_pp": sum(v) / len(v) if v else float("nan"),
            "records_differing": sum(abs(x) > 1e-9 for x in v),
            "records": len(v),
        }
        for m, v in diffs.items()
    }


def fraction(x: float) -> float:
    """A per-record score as a fraction of its prompts (0..1)."""
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"per-record score {x} is not a fraction in [0, 1]")
    return float(x)


def machine_line(results: dict[str, Any]) -> str:
    """Where and with what the numbers were measured."""
    m = results["machine"]
    return (
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['threads']} torch threads; torch {m['torch']}; "
        f"ours: transformers {m['transformers']}; reference: {m.get('reference', '?')}."
    )


def fmt_table(results: dict[str, Any]) -> str:
    """The per-edit and metric tables of bench/RESULTS.md (between its ``bench:begin/end`` markers)."""
    lines = [
        f"{machine_line(results)} "
        f"Value steps: {results['steps'] or 'presets (25, early stop 5e-2)'}"
        f"{' fixed, no early stop' if results['steps'] else ''}; layer {results['layer']}. "
        f"Generated by `python -m bench.run` on {results['date']}.",
        "",
        "### Seconds per edit (ours / reference; ratio = reference ÷ ours)",
        "",
        "| config | edits | keys | values | solve | edit total | ratio | scoring | ratio | ES ours/ref | PS ours/ref "
        "| NS ours/ref | peak RSS MB ours/ref |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, c in results["configs"].items():
        o, r = c["ours"], c.get("reference")
        n = o["n_edits"]

        def per(d: dict[str, Any], k: str, n: int = n) -> float:
            return d["timings"].get(k, 0.0) / n

        def pair(k: str, o: dict[str, Any] = o, r: dict[str, Any] | None = r) -> str:
            return f"{per(o, k):.3f} / {per(r, k):.3f}" if r else f"{per(o, k):.3f} / –"

        edit_o = sum(per(o, k) for k in ("keys", "values", "solve"))
        cells = [name, str(n), pair("keys"), pair("values"), pair("solve")]
        if r:
            edit_r = sum(per(r, k) for k in ("keys", "values", "solve"))
            cells += [f"{edit_o:.2f} / {edit_r:.2f}", f"**{edit_r / edit_o:.1f}x**", pair("score")]
            cells.append(f"{per(r, 'score') / per(o, 'score'):.1f}x")
            cells += [f"{o['metrics'][k]:.1f} / {r['metrics'][k]:.1f}" for k in ("es", "ps", "ns")]
            cells.append(f"{o['peak_rss_mb']:.0f} / {r['peak_rss_mb']:.0f}")
        else:
            cells += [f"{edit_o:.2f} / –", "", pair("score"), ""]
            cells += [f"{o['metrics'][k]:.1f} / –" for k in ("es", "ps", "ns")]
            cells.append(f"{o['peak_rss_mb']:.0f} / –")
        lines.append("| " + " | ".join(cells) + " |")
    gen = [
        c["reference"]["timings"].get("score_generation_per_fact")
        for c in results["configs"].values()
        if c.get("reference")
    ]
    gen = [g for g in gen if g]
    if gen:
        lines += [
            "",
            f"The reference's evaluation with its 50-token generation test: {sum(gen) / len(gen):.2f} s per fact "
            "(mean over the configurations above; the scoring column excludes it, as the test feeds none of ES/PS/NS).",
        ]
    lines += ["", "### Metric differences (ours − reference, percentage points, mean over records)", ""]
    lines += ["| config | ES | PS | NS | records differing (ES/PS/NS) |", "|---|---|---|---|---|"]
    for name, c in results["configs"].items():
        d = c.get("diff")
        if d:
            lines.append(
                f"| {name} | {d['es']['mean_pp']:+.1f} | {d['ps']['mean_pp']:+.1f} | {d['ns']['mean_pp']:+.1f} | "
                f"{d['es']['records_differing']}/{d['ps']['records_differing']}/{d['ns']['records_differing']}"
                f" of {d['es']['records']} |"
            )
    return "\n".join(lines) + "\n"


def fmt_stats(results: dict[str, Any]) -> str:
    """The statistics table of bench/RESULTS.md (between its ``bench:stats:begin/end`` markers)."""
    s = results.get("stats")
    lines: list[str] = []
    if s:
        o, r = s["ours"], s.get("reference")
        lines += [
            f"### Statistics (second moments of the MLP keys), ~{o['one']['tokens']} tokens of local Wikipedia",
            "",
            f"{machine_line(results)} Generated by `python -m bench.run` on {results['date']}.",
            "",
            "| | ours | reference | ratio |",
            "|---|---|---|---|",
            f"| layer {results['layer']} alone, tokens/s | {o['one']['tokens_per_s']:.0f} | "
            + (
                f"{r['one']['tokens_per_s']:.0f} | **{o['one']['tokens_per_s'] / r['one']['tokens_per_s']:.1f}x** |"
                if r
                else "– | |"
            ),
            f"| all {o['all']['layers']} layers, seconds | {o['all']['seconds']:.1f} (one pass) | "
            + (
                f"{r['all_seconds']:.1f} (one pass per layer; {r['all_note']}) | "
                f"**{r['all_seconds'] / o['all']['seconds']:.1f}x** |"
                if r
                else "– | |"
            ),
            f"| peak RSS MB | {o['peak_rss_mb']:.0f} | " + (f"{r['peak_rss_mb']:.0f} | |" if r else "– | |"),
        ]
    return "\n".join(lines) + "\n"


def publish(text: str, data: Any, out: str | Path, begin: str, end: str, write: bool) -> None:
    """A benchmark's end: its JSON to ``out``, its table to stdout and, with ``write``, into
    bench/RESULTS.md between ``begin`` and ``end``."""
    write_json_atomic(out, data)
    print(text)
    if write:
        write_results(text, begin, end)


def write_results(table: str, begin: str = BEGIN, end: str = END) -> None:
    """Replace the text between ``begin`` and ``end`` in bench/RESULTS.md (atomically)."""
    text = RESULTS.read_text() if RESULTS.exists() else f"# Benchmarks\n\n{begin}\n{end}\n"
    if begin not in text or end not in text:
        raise SystemExit(f"error: {RESULTS} has no {begin} ... {end} markers to replace")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    write_text_atomic(RESULTS, f"{head}{begin}\n{table}{end}{tail}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, of {', '.join(CONFIGS)}")
    ap.add_argument("--steps", type=int, default=10, help="fixed value steps, no early stop (0: presets)")
    ap.add_argument("--layer", type=int, default=2)
    ap.add_argument("--rome-edits", type=int, default=CONFIGS["rome-1"][2])
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--generation-facts", type=int, default=2, help="facts the reference's generation test is timed on")
    ap.add_argument("--stats-tokens", type=int, default=8192)
    ap.add_argument("--stats-ref-layers", default="2,15,29", help="layers the reference's statistics are timed on")
    ap.add_argument("--no-stats", action="store_true")
    ap.add_argument("--stats-only", action="store_true", help="only the statistics (rewrites only their table)")
    ap.add_argument("--no-reference", action="store_true", help="our side only")
    ap.add_argument("--write-results", action="store_true", help=f"replace the tables in {RESULTS.name}")
    ap.add_argument("--side", choices=["ours", "ours-stats"], help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    if args.side:  # a child process: one side of one configuration
        spec = json.loads(Path(args.spec).read_text())
        res = run_ours(spec) if args.side == "ours" else run_ours_stats(spec)
        Path(args.out).write_text(json.dumps(res, default=str))
        return 0

    names = [] if args.stats_only else [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        raise SystemExit(f"error: --configs: unknown {unknown}; choose from {', '.join(CONFIGS)}")
    if not FACTS.exists():
        raise SystemExit(f"error: {FACTS} not found: the benchmark reads CounterFact from ../shared/data")
    if not args.no_reference:
        check_reference()
    OUT.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))

    results: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "steps": args.steps,
        "layer": args.layer,
        "machine": machine_info(args.threads),
        "configs": {},
    }
    n_max = max((CONFIGS[n][2] if n != "rome-1" else args.rome_edits for n in names), default=0)
    records = rome_records(n_max) if names else None
    for name in names:
        alg, b, n = CONFIGS[name]
        n = args.rome_edits if name == "rome-1" else n
        spec = {
            "algorithm": alg,
            "batch_size": b,
            "n_edits": n,
            "layer": args.layer,
            "steps": args.steps,
            "threads": args.threads,
            "generation_facts": args.generation_facts,
        }
        sp = OUT / f"{name}.ours.spec.json"
        sp.write_text(json.dumps(spec))
        log.info("%s: ours", name)
        cmd = [
            sys.executable,
            "-m",
            "bench.run",
            "--side",
            "ours",
            "--spec",
            str(sp),
            "--out",
            str(OUT / f"{name}.ours.json"),
        ]
        entry: dict[str, Any] = {"ours": subprocess_json(cmd, OUT / f"{name}.ours.json", env)}
        log.info("%s: ours %s, timings %s", name, entry["ours"]["metrics"], entry["ours"]["timings"])
        if not args.no_reference:
            rs = OUT / f"{name}.ref.spec.json"
            rs.write_text(json.dumps(ref_spec(spec, entry["ours"], records)))
            log.info("%s: reference", name)
            cmd = [str(REF_PY), str(REF_RUNNER), "--spec", str(rs), "--out", str(OUT / f"{name}.ref.json")]
            entry["reference"] = ref = subprocess_json(cmd, OUT / f"{name}.ref.json", env)
            # The reference loads (and for ROME inverts) C inside its first edit call; ours loads it before the
            # edits (the statistics stage). Take that one-off out of its per-edit stages, keep it on record.
            c_load = (ref["timings"].get("detail") or {}).get("cov") or 0.0
            ref["timings"]["keys" if alg == "rome" else "solve"] -= c_load
            ref["timings"]["c_load"] = c_load
            entry["diff"] = compare(entry["ours"], entry["reference"])
            results["machine"]["reference"] = "transformers " + entry["reference"]["versions"].get("transformers", "?")
            log.info("%s: reference %s, timings %s", name, entry["reference"]["metrics"], entry["reference"]["timings"])
        results["configs"][name] = entry
        (OUT / "run.json").write_text(json.dumps(results, indent=1, default=str))

    if not args.no_stats:
        texts = stats_texts(400)
        spec = {"layer": args.layer, "tokens": args.stats_tokens, "texts": str(texts), "threads": args.threads}
        sp = OUT / "stats.ours.spec.json"
        sp.write_text(json.dumps(spec))
        log.info("statistics: ours")
        cmd = [
            sys.executable,
            "-m",
            "bench.run",
            "--side",
            "ours-stats",
            "--spec",
            str(sp),
            "--out",
            str(OUT / "stats.ours.json"),
        ]
        stats: dict[str, Any] = {"ours": subprocess_json(cmd, OUT / "stats.ours.json", env)}
        if not args.no_reference:
            per_layer = {}
            peak = 0.0
            for layer in sorted({int(x) for x in args.stats_ref_layers.split(",")} | {args.layer}):
                log.info("statistics: reference, layer %d", layer)
                bench = {
                    "model_dir": str(REF_MODEL),
                    "layer": layer,
                    "tokens": args.stats_tokens,
                    "texts": str(texts),
                    "threads": args.threads,
                }
                out = OUT / f"stats.ref.{layer}.json"
                cmd = [str(REF_PY), str(REF_RUNNER), "--stats-bench", json.dumps(bench), "--out", str(out)]
                r = subprocess_json(cmd, out, env)
                per_layer[layer] = r
                peak = max(peak, r["peak_rss_mb"])
                results["machine"]["reference"] = "transformers " + r.get("versions", {}).get("transformers", "?")
            n_layers = stats["ours"]["all"]["layers"]
            xs = sorted(per_layer)
            secs_per_token = {x: per_layer[x]["seconds"] / per_layer[x]["tokens"] for x in xs}

            def interp(layer: int) -> float:
                lo = max([x for x in xs if x <= layer], default=xs[0])
                hi = min([x for x in xs if x >= layer], default=xs[-1])
                if lo == hi:
                    return secs_per_token[lo]
                w = (layer - lo) / (hi - lo)
                return (1 - w) * secs_per_token[lo] + w * secs_per_token[hi]

            all_s = sum(interp(layer) for layer in range(n_layers)) * stats["ours"]["all"]["tokens"]
            stats["reference"] = {
                "one": per_layer[args.layer],
                "per_layer": per_layer,
                "all_seconds": all_s,
                "all_note": f"sum over {n_layers} layers, timed at layers {xs} and interpolated",
                "peak_rss_mb": peak,
            }
        results["stats"] = stats
        (OUT / "run.json").write_text(json.dumps(results, indent=1, default=str))

    table = "" if args.stats_only else fmt_table(results)
    stats_table = fmt_stats(results)
    (OUT / "results.md").write_text(table + "\n" + stats_table)
    print(table + "\n" + stats_table)
    if args.write_results:
        if names:
            write_results(table)
        if "stats" in results:
            write_results(stats_table, STATS_BEGIN, STATS_END)
    return 0


if __name__ == "__main__":
    sys.exit(main())
