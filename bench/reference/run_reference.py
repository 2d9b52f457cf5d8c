"""Run and time the paper's reference implementation (unified-model-editing: ROME / MEMIT / EMMET) on CPU.

Runs INSIDE the reference's venv (transformers 4.46), from the repository root, after ``bench/reference/build.sh``:

    .ref/venv/bin/python bench/reference/run_reference.py --spec spec.json --out out.json
    .ref/venv/bin/python bench/reference/run_reference.py --stats-bench '{"model_dir": ".ref/smollm2-hf",
        "layer": 2, "tokens": 8192, "texts": "texts.json"}' --out stats.json
    .ref/venv/bin/python bench/reference/run_reference.py --check-model .ref/smollm2-hf

Edit protocol (the reference's batch, non-sequential mode of experiments/evaluate_unified_editing.py):
for each batch of ``batch_size`` records: ``apply_<alg>_to_model(copy=False, return_orig_weights=True)``,
evaluate each record of the batch with ``compute_rewrite_quality_counterfact`` (no attribute snippets,
so no ``test_generation``; the 50-token "sliding" ``generate_fast`` test skipped via the patched flag
``SKIP_SLIDING_GENERATION``), then restore the original weights.

Timings (seconds, ``time.perf_counter``; the reference's functions are wrapped by replacing module
attributes): ``keys`` = ``compute_ks`` (MEMIT/EMMET) or ``compute_u`` (ROME, which includes the first
call's inversion of C, see ``detail.cov``); ``values`` = ``compute_z`` / ``compute_v``; ``solve`` = the
rest of the ``apply_*`` call (MEMIT/EMMET: includes ``detail.cov``, the first call's loading of C, and
``detail.cur_zs``, the forward pass for the current values); ``score`` = the evaluation without the
generation test; ``score_generation_per_fact`` = the evaluation with it, per fact, on the first
``generation_records`` records (null unless ``generation`` is true).

Metrics (percent), the reference's summarize.py definitions on its NLLs ("*_prob" fields are mean
token NLLs): ES = mean over rewrite prompts of [nll_new < nll_true]; PS = the same over paraphrase
prompts; NS = mean over neighbourhood prompts of [nll_true < nll_new]; per record first, then the mean
over records x 100.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import re
import resource
import sys
import tempfile
import time
from collections import defaultdict
from copy import deepcopy
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
REF_DIR = Path(os.environ.get("REF_DIR", ROOT / ".ref" / "unified-model-editing"))

LLAMA_TEMPLATES = {
    "rewrite_module_tmp": "model.layers.{}.mlp.down_proj",
    "layer_module_tmp": "model.layers.{}",
    "mlp_module_tmp": "model.layers.{}.mlp",
    "attn_module_tmp": "model.layers.{}.self_attn",
    "ln_f_module": "model.norm",
    "lm_head_module": "model.embed_tokens",  # SmolLM2 ties the output head to the input embeddings
}
# Base hparams files of the reference (there is no ROME llama2-7b file: gpt2-xl's, with Llama templates).
BASE_HPARAMS = {
    "memit": "hparams/MEMIT/llama2-7b.json",
    "emmet": "hparams/EMMET/llama2-7b.json",
    "rome": "hparams/ROME/gpt2-xl.json",
}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def resolve(p: str | os.PathLike) -> Path:
    p = Path(p)
    return p if p.is_absolute() else (Path.cwd() / p).resolve()


def ref_commit() -> str | None:
    f = REF_DIR / "REF_COMMIT"
    return f.read_text().strip() if f.is_file() else None


def versions() -> dict:
    import transformers

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "reference_commit": ref_commit(),
        "python": sys.version.split()[0],
    }


def setup_threads(n: int | None) -> None:
    if n:
        torch.set_num_threads(int(n))


def import_reference() -> None:
    if not (REF_DIR / ".patched").is_file():
        raise SystemExit(f"{REF_DIR} is missing or unpatched: run bench/reference/build.sh first")
    if str(REF_DIR) not in sys.path:
        sys.path.insert(0, str(REF_DIR))


def load_model(model_dir: str | os.PathLike):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = resolve(model_dir)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), torch_dtype=torch.float32)
    model.eval()
    model.requires_grad_(False)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    tok.pad_token = tok.eos_token  # as experiments/evaluate_unified_editing.py does
    tok.padding_side = "right"  # the reference's indexing assumes right padding
    return model, tok


# ----------------------------------------------------------------------------------------------------
# --check-model


def check_model(model_dir: str, tol: float = 1e-4) -> dict:
    """Compare token ids and logits under this env (transformers 4.46) with those prepare_model.py
    recorded under ours (transformers 5.x)."""
    model, tok = load_model(model_dir)
    ref = torch.load(resolve(model_dir) / "reference_check.pt", weights_only=True)
    tied = model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    res = {"tied_lm_head": tied, "rope_theta": model.config.rope_theta, "prompts": []}
    ok = tied
    with torch.no_grad():
        for p in ref["prompts"]:
            ids = tok(p["text"])["input_ids"]
            same_ids = ids == list(p["ids"])
            no_bos = not ids or ids[0] != tok.bos_token_id
            logits = model(input_ids=torch.tensor([ids])).logits[0] if same_ids else None
            diff = float((logits - p["logits"]).abs().max()) if same_ids else None
            ok = ok and same_ids and no_bos and diff is not None and diff <= tol
            res["prompts"].append(
                {"text": p["text"], "same_ids": same_ids, "no_bos": no_bos, "max_abs_logit_diff": diff}
            )
    bad = [t["text"] for t in ref.get("token_texts", []) if tok(t["text"])["input_ids"] != list(t["ids"])]
    bos = [  # a BOS that the text itself does not spell out
        t["text"]
        for t in ref.get("token_texts", [])
        if tok(t["text"])["input_ids"][:1] == [tok.bos_token_id] and not t["text"].startswith(tok.bos_token)
    ]
    res["token_texts_checked"] = len(ref.get("token_texts", []))
    res["token_texts_mismatched"] = bad
    res["token_texts_with_bos"] = bos
    ok = ok and not bad and not bos
    # A right-padded batch (how the reference runs prompts) must give each row's unpadded logits.
    texts = [p["text"] for p in ref["prompts"]]
    batch = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        blog = model(**batch).logits
    pad_diff = 0.0
    for i, p in enumerate(ref["prompts"]):
        n = len(p["ids"])
        pad_diff = max(pad_diff, float((blog[i, :n] - p["logits"]).abs().max()))
    res["padded_batch_max_abs_logit_diff"] = pad_diff
    res["padding_side"] = tok.padding_side
    ok = ok and pad_diff <= 1e-3
    res["ok"] = ok
    res["versions"] = versions()
    return res


# ----------------------------------------------------------------------------------------------------
# Statistics files


def ref_stats_model_name(model) -> str:
    """The folder name rome/layer_stats.py derives from the model (same code)."""
    model_name = model.config._name_or_path
    if "data" in model_name:
        model_name = model_name.split("/")[-1]
    return model_name.replace("/", "_")


def npz_moment(path: Path) -> tuple[np.ndarray, int, int]:
    with np.load(path) as d:
        if "mom2.mom2" not in d or "mom2.count" not in d:
            raise SystemExit(
                f"{path}: not a reference statistics file (keys mom2.mom2, mom2.count); use stats_to_npz.py"
            )
        count = int(d["mom2.count"])
        sample_size = int(d["sample_size"]) if "sample_size" in d else None
        return d["mom2.mom2"] / count, count, sample_size


def install_stats(stats: dict, model, hparams, stats_dir: Path, required: bool = True) -> dict[int, Path]:
    """Place the given .npz files where the reference's layer_stats looks (a symlink per layer in
    ``stats_dir``, which util.globals.STATS_DIR points to) and set mom2_n_samples to their sample_size."""
    by_layer: dict[int, Path] = {}
    sizes = set()
    for layer, path in stats.items():
        path = resolve(path)
        if not path.is_file():
            raise SystemExit(f"stats: {path} not found")
        _, _, sample_size = npz_moment(path)
        if sample_size is None:
            raise SystemExit(f"{path}: no sample_size key (write it with stats_to_npz.py)")
        sizes.add(sample_size)
        by_layer[int(layer)] = path
    missing = [layer for layer in hparams.layers if layer not in by_layer]
    if missing and required:
        raise SystemExit(f"stats: no statistics file for layer(s) {missing}")
    if len(sizes) > 1:
        raise SystemExit(f"stats: the files have different sample_size values {sorted(sizes)}; the reference uses one")
    if not sizes:
        return by_layer
    hparams.mom2_n_samples = sizes.pop()
    model_name = ref_stats_model_name(model)
    for layer, path in by_layer.items():
        layer_name = hparams.rewrite_module_tmp.format(layer)
        dest = (
            stats_dir
            / model_name
            / f"{hparams.mom2_dataset}_stats"
            / f"{layer_name}_{hparams.mom2_dtype}_mom2_{hparams.mom2_n_samples}.npz"
        )
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.exists() or dest.is_symlink():
            dest.unlink()
        dest.symlink_to(path)
    return by_layer


# ----------------------------------------------------------------------------------------------------
# Edit runs


def build_hparams(alg: str, layers: list[int], overrides: dict):
    import emmet
    import memit
    import rome

    cls = {"memit": memit.MEMITHyperParams, "emmet": emmet.EMMETHyperParams, "rome": rome.ROMEHyperParams}[alg]
    data = json.loads((REF_DIR / BASE_HPARAMS[alg]).read_text())
    data.update(LLAMA_TEMPLATES)
    data["layers"] = list(layers)
    data.update(overrides)
    try:
        return cls(**data)
    except TypeError as e:
        raise SystemExit(f"hparams: {e}") from None


def record_metrics(ret: dict) -> dict:
    def frac(key: str, new_better: bool) -> float | None:
        xs = ret.get(f"{key}_prompts_probs") or []
        if not xs:
            return None
        if new_better:
            return float(np.mean([x["target_new_prob"] < x["target_true_prob"] for x in xs]))
        return float(np.mean([x["target_true_prob"] < x["target_new_prob"] for x in xs]))

    return {"es": frac("rewrite", True), "ps": frac("paraphrase", True), "ns": frac("neighborhood", False)}


def run_spec(spec: dict, quiet: bool) -> dict:
    t_start = time.perf_counter()
    setup_threads(spec.get("threads"))
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    alg = spec["algorithm"].lower()
    if alg not in BASE_HPARAMS:
        raise SystemExit(f"algorithm: {alg!r} is not rome, memit or emmet")
    os.environ["REF_EARLY_STOP_LOSS"] = "5e-2" if spec.get("early_stop", True) else "-inf"
    stats_dir = Path(tempfile.mkdtemp(prefix="ref-stats-"))
    os.environ["REF_STATS_DIR"] = str(stats_dir)  # read by the patched util/globals.py at import
    import_reference()

    import emmet.emmet_main as emmet_main
    import experiments.py.eval_utils_counterfact as ecf
    import memit.memit_main as memit_main
    import rome.compute_u as rome_compute_u
    import rome.rome_main as rome_main
    from util import nethook

    ecf.SKIP_SLIDING_GENERATION = True

    t0 = time.perf_counter()
    model, tok = load_model(spec.get("model_dir", ROOT / ".ref" / "smollm2-hf"))
    t_load = time.perf_counter() - t0

    overrides = dict(spec.get("hparams", {}))
    # The base files' v_loss_layer (31 for Llama-2-7B, 47 for GPT-2 XL) is the model's last block: use ours.
    overrides.setdefault("v_loss_layer", model.config.num_hidden_layers - 1)
    hparams = build_hparams(alg, spec["layers"], overrides)
    needs_c = alg != "rome" or bool(hparams.mom2_adjustment)
    by_layer = install_stats(spec.get("stats", {}), model, hparams, stats_dir, required=needs_c)

    # Context templates: exactly the spec's (reference format: list of lists), never generated.
    templates = [list(t) for t in spec.get("context_templates", [["{}"]])]
    flat = [t for group in templates for t in group]
    memit_main.get_context_templates = lambda model, tok: templates
    emmet_main.get_context_templates = lambda model, tok: templates
    rome_main.get_context_templates = lambda model, tok, length_params: flat
    memit_main.CONTEXT_TEMPLATES_CACHE = emmet_main.CONTEXT_TEMPLATES_CACHE = templates
    rome_main.CONTEXT_TEMPLATES_CACHE = flat

    # Timers around the reference's functions (module attributes the apply_* code looks up).
    T: dict[str, float] = defaultdict(float)
    state = {"in_values": False, "value_forwards": 0}

    def timed(name, fn, flag=None):
        def wrapper(*a, **k):
            t = time.perf_counter()
            if flag:
                state[flag] = True
            try:
                return fn(*a, **k)
            finally:
                if flag:
                    state[flag] = False
                T[name] += time.perf_counter() - t

        return wrapper

    def count_forward(mod, args):
        if state["in_values"]:
            state["value_forwards"] += 1

    model.register_forward_pre_hook(count_forward)

    # Check that the C the reference loads equals the file's.
    stats_check: dict[str, dict] = {}

    def checked_layer_stats(fn):
        def wrapper(model, tok, layer_name, *a, **k):
            stat, feats = fn(model, tok, layer_name, *a, **k)
            layer = int(re.search(r"\d+", layer_name).group())
            got = stat.mom2.moment().double().cpu().numpy()
            want, count, _ = npz_moment(by_layer[layer])
            diff = float(np.abs(got - want).max())
            scale = float(np.abs(want).max())
            stats_check[str(layer)] = {
                "file": str(by_layer[layer]),
                "count": count,
                "loaded_count": int(stat.mom2.count),
                "max_abs_diff": diff,
                "max_abs_value": scale,
                "equal": diff <= 1e-6 * scale and count == int(stat.mom2.count),
            }
            if not stats_check[str(layer)]["equal"]:
                raise SystemExit(
                    f"layer {layer}: the reference loaded a C that differs from {by_layer[layer]}: "
                    f"{stats_check[str(layer)]}"
                )
            return stat, feats

        return wrapper

    if alg in ("memit", "emmet"):
        mod = memit_main if alg == "memit" else emmet_main
        mod.layer_stats = checked_layer_stats(mod.layer_stats)
        mod.compute_ks = timed("keys", mod.compute_ks)
        mod.compute_z = timed("values", mod.compute_z, flag="in_values")
        mod.get_cov = timed("cov", mod.get_cov)
        mod.get_module_input_output_at_words = timed("cur_zs", mod.get_module_input_output_at_words)
        mod.COV_CACHE.clear()
        apply_fn = mod.apply_memit_to_model if alg == "memit" else mod.apply_emmet_to_model
    else:
        rome_compute_u.layer_stats = checked_layer_stats(rome_compute_u.layer_stats)
        rome_compute_u.get_inv_cov = timed("cov", rome_compute_u.get_inv_cov)
        rome_compute_u.inv_mom2_cache.clear()
        rome_main.compute_u = timed("keys", rome_main.compute_u)
        rome_main.compute_v = timed("values", rome_main.compute_v, flag="in_values")
        apply_fn = rome_main.apply_rome_to_model

    records = json.loads(resolve(spec["records"]).read_text())
    if spec.get("n_records") is not None:
        records = records[: int(spec["n_records"])]
    for r in records:  # the evaluation reads these keys; the demo records lack them
        r.setdefault("attribute_prompts", [])
        r.setdefault("generation_prompts", [])
    bs = int(spec.get("batch_size", 1))
    want_gen = bool(spec.get("generation", False))
    n_gen = int(spec.get("generation_records", 2)) if want_gen else 0

    out_stream = io.StringIO() if quiet else None
    pre_records = []
    if spec.get("pre_score", False):  # the unedited model's scores, for a baseline (not timed)
        with contextlib.redirect_stdout(io.StringIO()) if quiet else contextlib.nullcontext():
            for r in records:
                ret = ecf.compute_rewrite_quality_counterfact(model, tok, r, None, None)
                pre_records.append({"case_id": r["case_id"], **record_metrics(ret)})
    per_record = []
    t_apply = t_score = t_gen = 0.0
    n_gen_done = 0
    for b in range(0, len(records), bs):
        chunk = records[b : b + bs]
        requests = [{"case_id": r["case_id"], **deepcopy(r["requested_rewrite"])} for r in chunk]
        with contextlib.redirect_stdout(out_stream) if quiet else contextlib.nullcontext():
            t = time.perf_counter()
            model, weights_copy, _ = apply_fn(model, tok, requests, hparams, copy=False, return_orig_weights=True)
            t_apply += time.perf_counter() - t
            for r in chunk:
                ecf.SKIP_SLIDING_GENERATION = True
                t = time.perf_counter()
                ret = ecf.compute_rewrite_quality_counterfact(model, tok, r, None, None)
                t_score += time.perf_counter() - t
                per_record.append({"case_id": r["case_id"], "batch": b // bs, **record_metrics(ret)})
                if n_gen_done < n_gen:
                    ecf.SKIP_SLIDING_GENERATION = False
                    t = time.perf_counter()
                    ecf.compute_rewrite_quality_counterfact(model, tok, r, None, None)
                    t_gen += time.perf_counter() - t
                    ecf.SKIP_SLIDING_GENERATION = True
                    n_gen_done += 1
            with torch.no_grad():
                for k, v in weights_copy.items():
                    nethook.get_parameter(model, k)[...] = v.to(nethook.get_parameter(model, k).device)
        if quiet:
            out_stream.seek(0)
            out_stream.truncate()
        print(f"batch {b // bs}: {len(chunk)} edits, apply {t_apply:.1f}s so far", file=sys.stderr)

    def mean_pct(key, rows=per_record):
        xs = [r[key] for r in rows if r[key] is not None]
        return float(np.mean(xs) * 100) if xs else None

    solve = t_apply - T["keys"] - T["values"]
    return {
        "algorithm": alg,
        "layers": hparams.layers,
        "batch_size": bs,
        "early_stop": bool(spec.get("early_stop", True)),
        "timings": {
            "load": t_load,
            "keys": T["keys"],
            "values": T["values"],
            "solve": solve,
            "apply_total": t_apply,
            "score": t_score,
            "score_generation_per_fact": (t_gen / n_gen_done) if n_gen_done else None,
            "detail": {
                "cov": T["cov"],
                "cur_zs": T["cur_zs"] if alg != "rome" else None,
                "value_forward_passes": state["value_forwards"],
                "score_generation_records": n_gen_done,
                "total_wall": time.perf_counter() - t_start,
            },
        },
        "n_edits": len(per_record),
        "per_record": per_record,
        "metrics": {"es": mean_pct("es"), "ps": mean_pct("ps"), "ns": mean_pct("ns")},
        "pre_metrics": {k: mean_pct(k, pre_records) for k in ("es", "ps", "ns")} if pre_records else None,
        "stats_check": stats_check,
        "hparams": {k: v for k, v in vars(hparams).items()},
        "context_templates": templates,
        "threads": torch.get_num_threads(),
        "peak_rss_mb": peak_rss_mb(),
        "versions": versions(),
    }


# ----------------------------------------------------------------------------------------------------
# --stats-bench


def stats_bench(cfg: dict) -> dict:
    setup_threads(cfg.get("threads"))
    torch.manual_seed(0)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the DataLoader workers fork after we tokenise
    stats_dir = Path(tempfile.mkdtemp(prefix="ref-statsbench-"))
    os.environ["REF_STATS_DIR"] = str(stats_dir)
    import_reference()
    import rome.layer_stats as ls

    t0 = time.perf_counter()
    model, tok = load_model(cfg.get("model_dir", ROOT / ".ref" / "smollm2-hf"))
    t_load = time.perf_counter() - t0
    layer = int(cfg.get("layer", 2))
    layer_name = cfg.get("rewrite_module_tmp", LLAMA_TEMPLATES["rewrite_module_tmp"]).format(layer)
    want = int(cfg.get("tokens", 8192))
    raw = json.loads(resolve(cfg["texts"]).read_text())
    texts = [t["text"] if isinstance(t, dict) else t for t in raw]

    # The texts the loop will read: the first ones whose tokens (as TokenizedDataset truncates them at
    # the model's max positions) add up to about `tokens`. sample_size = their number, so the
    # reference's sampler (a fixed random permutation, seed 1) reads each exactly once.
    maxlen = getattr(model.config, "n_positions", None) or model.config.max_position_embeddings
    chosen, n = [], 0
    for t in texts:
        k = len(tok.encode(t, truncation=True, max_length=maxlen))
        if k == 0:
            continue
        chosen.append({"text": t})
        n += k
        if n >= want:
            break
    ls.load_dataset = lambda *a, **k: {"train": chosen}

    # Which blocks run: count calls of the first and the last block during the loop.
    calls = {"first": 0, "last": 0}
    layers_mod = model.model.layers
    h1 = layers_mod[0].register_forward_pre_hook(lambda m, a: calls.__setitem__("first", calls["first"] + 1))
    h2 = layers_mod[-1].register_forward_pre_hook(lambda m, a: calls.__setitem__("last", calls["last"] + 1))
    t = time.perf_counter()
    stat, _feats = ls.layer_stats(
        model,
        tok,
        layer_name,
        stats_dir,
        "wikipedia",
        to_collect=["mom2"],
        sample_size=len(chosen),
        precision=cfg.get("precision", "float32"),
        progress=lambda it, total=None: it,  # the reference's progress=None path calls lambda x: x with total=: a bug
        force_recompute=True,
        download=False,
    )
    secs = time.perf_counter() - t
    h1.remove()
    h2.remove()
    tokens = int(stat.mom2.count)
    return {
        "layer": layer,
        "texts": len(chosen),
        "tokens": tokens,
        "seconds": secs,
        "tokens_per_s": tokens / secs if secs > 0 else None,
        "load_s": t_load,
        "forward_passes": calls["first"],
        "last_block_runs": calls["last"],
        "stops_after_layer": calls["last"] == 0,
        "mom2_dtype": str(stat.mom2.mom2.dtype),
        "threads": torch.get_num_threads(),
        "peak_rss_mb": peak_rss_mb(),
        "versions": versions(),
    }


def score_bench(spec: dict) -> dict:
    """Time the reference's CounterFact evaluation (``compute_rewrite_quality_counterfact``, generation
    test off) of each record on the unedited model, one record per call as its evaluation loop does."""
    setup_threads(spec.get("threads"))
    import_reference()
    import experiments.py.eval_utils_counterfact as ecf

    ecf.SKIP_SLIDING_GENERATION = True
    model, tok = load_model(spec.get("model_dir", ROOT / ".ref" / "smollm2-hf"))
    records = json.loads(resolve(spec["records"]).read_text())
    rows = []
    with contextlib.redirect_stdout(io.StringIO()):
        ecf.compute_rewrite_quality_counterfact(model, tok, records[0], None, None)  # warm-up, untimed
        t = time.perf_counter()
        for r in records:
            ret = ecf.compute_rewrite_quality_counterfact(model, tok, r, None, None)
            rows.append({"case_id": r["case_id"], **record_metrics(ret)})
        seconds = time.perf_counter() - t
    return {"seconds": seconds, "n_records": len(records), "per_record": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description="Run/time the reference implementation (see module docstring).")
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--spec", help="JSON file of an edit run")
    g.add_argument("--stats-bench", help="JSON object (or file) of a statistics benchmark")
    g.add_argument("--check-model", help="model folder written by prepare_model.py")
    g.add_argument("--score-bench", help="JSON file of a scoring benchmark (records, threads)")
    ap.add_argument("--out", help="write the result JSON here (default: stdout)")
    ap.add_argument("--quiet", action="store_true", help="swallow the reference's own prints during edits")
    args = ap.parse_args()
    if args.spec:
        res = run_spec(json.loads(resolve(args.spec).read_text()), args.quiet)
    elif args.stats_bench:
        s = args.stats_bench
        res = stats_bench(json.loads(s if s.lstrip().startswith("{") else resolve(s).read_text()))
    elif args.score_bench:
        res = score_bench(json.loads(resolve(args.score_bench).read_text()))
    else:
        res = check_model(args.check_model)
    text = json.dumps(res, indent=1)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    print(
        text
        if not args.out or args.check_model
        else json.dumps({k: res[k] for k in res if k not in ("per_record", "hparams")}, indent=1)
    )
    if args.check_model and not res["ok"]:
        raise SystemExit("model check FAILED")


if __name__ == "__main__":
    main()
