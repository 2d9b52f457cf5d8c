"""UltraEdit, the authors' code and ours, on SmolLM2-135M on the CPU: one side per process.

    .ref/venv-ultraedit/bin/python bench/reference/run_ultraedit.py --side theirs --spec spec.json --out theirs.json
    python3 bench/reference/run_ultraedit.py --side ours --spec spec.json --out ours.json

Normally run by ``python -m bench.ultraedit_authors`` (which builds the authors' side first). The spec
(JSON): ``records`` (ZsRE MEND-format file), ``n_records``, ``n_edits`` (edits per turn), ``sub_batch``,
``layers``, ``lr``, ``ridge`` (1: hard-coded on the authors' side), ``threads``, ``model_dir`` (the
authors' side: the HF folder of SmolLM2), ``dump`` (a folder for the per-turn tensors).

The authors' side (``XiaojieGu/UltraEdit`` @ 0beb222, extracted and patched under ``.ref/ultraedit``):
their ``main.py`` is not run (hydra); the runner builds the same config with omegaconf (``half: false``,
both devices ``cpu``, the edited modules ``model.layers.{L}.mlp.down_proj``), loads the records with
their ``ZSREDataset`` + ``make_loader`` (the records' ``answers[0]`` written as the ``ans`` their loader
reads), the model with their ``make_model`` and runs their ``ULTRAEDIT.sequential_valid``: per turn
``cache`` -> ``predict_param_shifts`` -> ``edit_model``, then their evaluation (``succ_ratios``) on the
final model. Their methods are wrapped (instance attributes) only to time them and to copy what they
produce: the running statistics after each turn, the keys/gradients they cache, the shifts they apply.

Our side: ``editors.load_model()`` (SmolLM2 from the GGUF), ``sweep.evals.data.parse_qa_records`` for the
requests, ``editors.run_schedule(..., "ultraedit", hp, None, batch_size=n_edits, mode="sequential-batch",
state=..., callback=...)`` in file order: the authors' collate sorts the edits of a turn by token length
(longest first) before cutting sub-batches, and so does ``editors.algorithms.ultraedit``. Our
``editors.algorithms.ultraedit.capture`` is wrapped (module attribute) only to copy the keys and
gradients it returns.

Both sides score the final model with the authors' metric (teacher-forced token accuracy of the
answer: prompt + " " + answer[:-1] fed, arg-max at each answer position vs the answer token, per record
the mean over its answer tokens), computed by this file's replica of their ``tok_tuples``/``collate_fn``/
``succ_ratios`` on the same sorted, right-padded sub-batches; the authors' side also reports their own
``succ_ratios`` values, which must equal the replica's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
REF_DIR = Path(os.environ.get("ULTRAEDIT_DIR", ROOT / ".ref" / "ultraedit"))
KEYS = ("edit", "equiv", "unrel")  # the authors' edit_tuples / equiv_tuples / unrel_tuples
MODULE_TMP = "model.layers.{}.mlp.down_proj"


# ----------------------------------------------------------------------------------------------------
# Pure parts (no torch, no model): records, the authors' tokenised tuples and sort order


def load_records(path: str | os.PathLike, n: int) -> list[dict[str, Any]]:
    """The first ``n`` MEND-format ZsRE records, each with ``ans`` = ``answers[0]`` added (the field the
    authors' ``data/zsre.py`` reads; this file's ``answers[0]`` is the gold answer, MEMIT's target)."""
    data = json.loads(Path(path).read_text())[:n]
    if len(data) < n:
        raise SystemExit(f"{path}: {len(data)} records, need {n}")
    return [dict(r, ans=r["answers"][0]) for r in data]


def tuple_texts(rec: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """(prompt, answer) per key, as the authors' ``ZSREDataset.__getitem__``."""
    return {
        "edit": (rec["src"], rec["ans"]),
        "equiv": (rec["rephrase"], rec["ans"]),
        "unrel": (rec["loc"] + "?", rec["loc_ans"]),
    }


def tok_tuple(prompt_ids: Sequence[int], answer_ids: Sequence[int]) -> dict[str, list[int]]:
    """The authors' ``tok_tuples`` on token lists: input = prompt + answer[:-1]; labels pre-shifted:
    -100 for the prompt but its last token, then the answer ids (labels[i] is the target of position i)."""
    p, a = list(prompt_ids), list(answer_ids)
    if not p or not a:
        raise ValueError("tok_tuple: empty prompt or answer")
    return {
        "input_ids": p + a[:-1],
        "attention_mask": [1] * (len(p) + len(a) - 1),
        "labels": [-100] * (len(p) - 1) + a,
    }


def turn_order(lengths: Sequence[int]) -> list[int]:
    """Indices of a turn's tuples in the authors' ``collate_fn`` order: sorted by attention-mask sum,
    longest first (Python's stable sort with reverse=True keeps ties in their original order)."""
    return sorted(range(len(lengths)), key=lambda i: lengths[i], reverse=True)


def sub_batches(order: Sequence[int], size: int) -> list[list[int]]:
    return [list(order[s : s + size]) for s in range(0, len(order), size)]


def encode_records(tok: Any, records: Sequence[dict[str, Any]]) -> list[dict[str, dict[str, list[int]]]]:
    """Per record, per key, the authors' tuple (``tok(prompt)`` with special tokens; ``tok(" " + answer)``
    without)."""
    out = []
    for r in records:
        item = {}
        for k, (prompt, answer) in tuple_texts(r).items():
            p = tok(prompt)["input_ids"]
            a = tok(" " + answer, add_special_tokens=False)["input_ids"]
            item[k] = tok_tuple(p, a)
        out.append(item)
    return out


def plan(
    encoded: Sequence[dict[str, dict[str, list[int]]]], n_edits: int, sub: int
) -> dict[str, list[list[list[int]]]]:
    """key -> turn -> sub-batch -> global record indices, as the authors' DataLoader (``n_edits`` per
    turn, drop_last) + ``collate_fn`` (each key sorted by its own lengths) form them."""
    n_turns = len(encoded) // n_edits
    out: dict[str, list[list[list[int]]]] = {k: [] for k in KEYS}
    for k in KEYS:
        for t in range(n_turns):
            idx = list(range(t * n_edits, (t + 1) * n_edits))
            order = turn_order([len(encoded[i][k]["input_ids"]) for i in idx])
            out[k].append([[idx[j] for j in b] for b in sub_batches(order, sub)])
    return out


def mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


# ----------------------------------------------------------------------------------------------------
# Torch parts shared by both sides


def pad(tuples: Sequence[dict[str, list[int]]]):
    """The authors' ``pad_tok_tuples``: right padding, 0 for ids and mask, -100 for labels."""
    import torch

    length = max(len(t["input_ids"]) for t in tuples)
    out = {}
    for key, fill in (("input_ids", 0), ("attention_mask", 0), ("labels", -100)):
        rows = [t[key] + [fill] * (length - len(t[key])) for t in tuples]
        out[key] = torch.tensor(rows, dtype=torch.long)
    return out


def succ_ratios(logits, labels) -> list[float]:
    """The authors' ``util.succ_ratios`` (3-D logits, no old labels)."""
    n_corr = (logits.argmax(-1) == labels).sum(-1)
    n_tokens = (labels != -100).sum(-1)
    return (n_corr / n_tokens).to("cpu").numpy().tolist()


def score(model, encoded, batches: dict[str, list[list[list[int]]]]) -> dict[str, list[float]]:
    """Per key, per record (global order), the authors' metric on ``model``, in their sub-batches."""
    import torch

    n = len(encoded)
    out = {k: [float("nan")] * n for k in KEYS}
    with torch.no_grad():
        for k in KEYS:
            for turn in batches[k]:
                for b in turn:
                    t = pad([encoded[i][k] for i in b])
                    logits = model(input_ids=t["input_ids"], attention_mask=t["attention_mask"]).logits
                    for i, v in zip(b, succ_ratios(logits, t["labels"]), strict=True):
                        out[k][i] = float(v)
    return out


def snapshot_stats(n, mean_, m2, std) -> dict[str, Any]:
    return {
        "n": n.detach().clone(),
        "mean": mean_.detach().clone(),
        "m2": m2.detach().clone(),
        "std": std.detach().clone(),
    }


def versions() -> dict[str, Any]:
    import platform

    import torch
    import transformers

    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "machine": platform.machine(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
    }


# ----------------------------------------------------------------------------------------------------
# The authors' side


def run_theirs(spec: dict[str, Any]) -> dict[str, Any]:
    import random

    import numpy as np
    import torch
    from omegaconf import OmegaConf

    if not (REF_DIR / ".patched").is_file():
        raise SystemExit(f"{REF_DIR} is missing or unpatched: run python -m bench.ultraedit_authors")
    sys.path.insert(0, str(REF_DIR))
    import data.base as dbase
    import data.zsre as dzsre
    import editor.base as ebase
    import editor.ultraedit as eultra
    import model as emodel

    dump = Path(spec["dump"])
    dump.mkdir(parents=True, exist_ok=True)
    records = load_records(spec["records"], spec["n_records"])
    rec_file = dump / "records_ans.json"
    rec_file.write_text(json.dumps(records))
    n_turns = spec["n_records"] // spec["n_edits"]
    modules = [MODULE_TMP.format(layer) for layer in spec["layers"]]
    config = OmegaConf.create(
        {
            "num_seq": n_turns,
            "model_device": "cpu",
            "editor_device": "cpu",
            "model_cache": False,
            "model_cache_dir": "",
            "dataset": {
                "name": "zsre",
                "n_edits": spec["n_edits"],
                "batch_size": spec["sub_batch"],
                "train_path": str(rec_file),
                "valid_path": str(rec_file),
                "num_seq": n_turns,
            },
            "model": {
                "name_or_path": str(Path(spec["model_dir"]).resolve()),
                "name": "smollm2-135m",
                "class_name": "AutoModelForCausalLM",
                "edit_modules": modules,
                "half": False,  # their default is True (bf16); float32 here, as our side
            },
            "editor": {
                "name": "ultraedit",
                "lr": spec["lr"],
                "batch_size": 128,
                "token": "ans",
                "cache_dir": str(dump / "cache"),
                "save_checkpoint": False,
                "load_checkpoint": False,
            },
        }
    )
    if spec.get("ridge", 1.0) != 1.0:
        raise SystemExit("the authors' ridge is hard-coded to 1")
    # main.py: set_seed(42) (nothing random runs on this path)
    random.seed(42)
    np.random.seed(42)
    torch.manual_seed(42)
    _, loader = dbase.make_loader(config, dzsre.ZSREDataset)
    model = emodel.make_model(config.model).to(config.model_device)
    editor = eultra.ULTRAEDIT(config, model)
    tok = editor.tok
    encoded = encode_records(tok, records)
    batches = plan(encoded, spec["n_edits"], spec["sub_batch"])
    pre = score(model, encoded, batches)

    turns: list[dict[str, Any]] = []
    cur: dict[str, Any] = {}
    orig_cache, orig_predict, orig_edit = editor.cache, editor.predict_param_shifts, editor.edit_model

    def cache(tuples):
        # their sub-batches must be ours: check the ids of every row against the plan
        t_idx = len(turns)
        for b, t in enumerate(tuples):
            want = [encoded[i]["edit"]["input_ids"] for i in batches["edit"][t_idx][b]]
            got = [row[m.bool()].tolist() for row, m in zip(t["input_ids"], t["attention_mask"], strict=True)]
            if got != want:
                raise SystemExit(f"turn {t_idx} sub-batch {b}: the authors' rows differ from the plan")
        t0 = time.perf_counter()
        orig_cache(tuples)
        cur["cache"] = time.perf_counter() - t0

    def predict():
        t0 = time.perf_counter()
        shifts = orig_predict()
        cur["solve"] = time.perf_counter() - t0
        cur["shifts"] = shifts
        return shifts

    def edit_model(shifts, is_reverse):
        before = {m: ebase.get_module(editor.model, m).weight.detach().clone() for m in modules}
        t0 = time.perf_counter()
        orig_edit(shifts, is_reverse)
        cur["apply"] = time.perf_counter() - t0
        t = len(turns)
        norm = editor.lifelong_normalizer
        stats = {k: snapshot_stats(v.n, v.mean, v.var, v.std) for k, v in norm.items()}
        cache_dir = Path(config.editor.cache_dir) / f"smollm2-135m_zsre_ultraedit_{spec['n_edits']}_{n_turns}"
        n_sub = -(-spec["n_edits"] // spec["sub_batch"])
        kg = {}
        for mi, m in enumerate(modules):
            k = torch.cat([torch.load(cache_dir / f"{mi}_{i}_keys.pth") for i in range(n_sub)])
            g = torch.cat([torch.load(cache_dir / f"{mi}_{i}_values_grad.pth") for i in range(n_sub)])
            kg[m] = {"keys": k, "grads": g}
        deltas = {m: shifts[m].T.contiguous().float() for m in modules}  # (d_in, d_out) -> weight layout
        torch.save(
            {"stats": stats, "kg": kg, "deltas": deltas},
            dump / f"theirs_turn{t}.pt",
        )
        turns.append(
            {
                "seconds": {"cache": cur["cache"], "solve": cur["solve"], "apply": cur["apply"]},
                "update_norms": {m: float(deltas[m].double().norm()) for m in modules},
                "applied_norms": {
                    m: float((ebase.get_module(editor.model, m).weight.detach() - before[m]).double().norm())
                    for m in modules
                },
                "tokens": int(kg[modules[0]]["keys"].shape[0]),
                "stats_keys": sorted(stats),
            }
        )
        cur.clear()

    captured: list[list[float]] = []
    final: dict[str, Any] = {}
    orig_succ = ebase.succ_ratios

    def succ(logits, labels, *a, **k):
        out = orig_succ(logits, labels, *a, **k)
        captured.append(list(out))
        return out

    editor.cache, editor.predict_param_shifts, editor.edit_model = cache, predict, edit_model
    ebase.succ_ratios = succ
    ebase.wandb.log = lambda d, *a, **k: final.update({k2: float(v) for k2, v in d.items()})
    t0 = time.perf_counter()
    editor.sequential_valid(loader)
    total = time.perf_counter() - t0
    # their own per-record values: calls in the order key -> turn -> sub-batch, rows as planned
    theirs_own = {k: [float("nan")] * len(records) for k in KEYS}
    calls = iter(captured)
    for k in KEYS:
        for turn in batches[k]:
            for b in turn:
                for i, v in zip(b, next(calls), strict=True):
                    theirs_own[k][i] = float(v)
    post = score(editor.model, encoded, batches)
    return {
        "side": "theirs",
        "versions": versions(),
        "commit": (REF_DIR / "REF_COMMIT").read_text().strip() if (REF_DIR / "REF_COMMIT").is_file() else None,
        "pre": pre,
        "post": post,
        "post_authors_own": theirs_own,
        "authors_final_results": final,
        "turns": turns,
        "seconds_sequential_valid": total,
        "plan": batches,
        "input_ids": [e["edit"]["input_ids"] for e in encoded],
    }


# ----------------------------------------------------------------------------------------------------
# Our side


def run_ours(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    sys.path.insert(0, str(ROOT))
    import editors.algorithms.ultraedit as ue
    from editors import load_model, run_schedule
    from editors.common import EditState
    from editors.hparams import load_hparams
    from editors.model import get_module
    from sweep.evals.data import parse_qa_records

    dump = Path(spec["dump"])
    dump.mkdir(parents=True, exist_ok=True)
    records = load_records(spec["records"], spec["n_records"])
    model, tok = load_model()
    encoded = encode_records(tok, records)
    batches = plan(encoded, spec["n_edits"], spec["sub_batch"])
    pre = score(model, encoded, batches)
    parsed = parse_qa_records(json.loads(Path(spec["records"]).read_text())[: spec["n_records"]], "zsre")
    requests = [r.request() for r in parsed]
    # file order: editors.algorithms.ultraedit sorts each batch as the authors' collate_fn does
    order = list(range(len(requests)))
    reqs = [requests[i] for i in order]
    # the texts and ids our side feeds must be the authors'
    mismatch = []
    for i, r in zip(order, reqs, strict=True):
        seqs, _ = ue.teacher_forced_rows(tok, [r])
        if seqs[0] != encoded[i]["edit"]["input_ids"]:
            mismatch.append(i)
    hp = load_hparams(
        "ultraedit",
        "smollm2-135m",
        layers=list(spec["layers"]),
        ultra_lr=spec["lr"],
        ultra_ridge=spec.get("ridge", 1.0),
        ultra_sub_batch=spec["sub_batch"],
    )
    modules = [MODULE_TMP.format(layer) for layer in spec["layers"]]
    state = EditState()
    captured: list[tuple[dict, dict]] = []
    orig_capture = ue.capture

    def capture(*a, **k):
        keys, grads = orig_capture(*a, **k)
        captured.append(({n: v.clone() for n, v in keys.items()}, {n: v.clone() for n, v in grads.items()}))
        return keys, grads

    ue.capture = capture
    turns: list[dict[str, Any]] = []
    prev = {m: get_module(model, m).weight.detach().clone() for m in modules}
    clock = {"t": 0.0, "callbacks": 0.0}

    def callback(event) -> None:
        t_in = time.perf_counter()
        seconds = t_in - clock["t"]
        info = event.result.info
        kg = {
            m: {"keys": torch.cat([c[0][m] for c in captured]), "grads": torch.cat([c[1][m] for c in captured])}
            for m in modules
        }
        captured.clear()
        stats = {str(k): snapshot_stats(v.n, v.mean, v.m2, v.std) for k, v in state.running.items()}
        deltas = {m: event.result.deltas[m].detach().float().clone() for m in modules}
        torch.save({"stats": stats, "kg": kg, "deltas": deltas}, dump / f"ours_turn{event.index}.pt")
        now = {m: get_module(model, m).weight.detach().clone() for m in modules}
        turns.append(
            {
                "seconds": {
                    "total": seconds,
                    "keys": float(info.get("time_keys", float("nan"))),
                    "solve": float(info.get("time_solve", float("nan"))),
                },
                "update_norms": dict(event.update_norms),
                "applied_norms": {m: float((now[m] - prev[m]).double().norm()) for m in modules},
                "tokens": int(kg[modules[0]]["keys"].shape[0]),
                "stats_keys": sorted(stats),
            }
        )
        prev.update(now)
        clock["t"] = time.perf_counter()  # the callback's own work is not timed

    clock["t"] = time.perf_counter()
    t0 = clock["t"]
    run_schedule(
        model,
        tok,
        reqs,
        "ultraedit",
        hp,
        None,
        batch_size=spec["n_edits"],
        mode="sequential-batch",
        callback=callback,
        state=state,
    )
    total = time.perf_counter() - t0
    post = score(model, encoded, batches)
    return {
        "side": "ours",
        "versions": versions(),
        "pre": pre,
        "post": post,
        "turns": turns,
        "seconds_schedule_wall": total,
        "request_order": order,
        "request_id_mismatch": mismatch,
        "plan": batches,
        "input_ids": [e["edit"]["input_ids"] for e in encoded],
    }


SIDES: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {"theirs": run_theirs, "ours": run_ours}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--side", choices=sorted(SIDES), required=True)
    ap.add_argument("--spec", required=True, help="JSON text or a path to a JSON file")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    spec = json.loads(Path(args.spec).read_text()) if Path(args.spec).is_file() else json.loads(args.spec)
    import torch

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    out = SIDES[args.side](spec)
    out["spec"] = spec
    Path(args.out).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
