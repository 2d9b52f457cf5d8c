"""Run and time EasyEdit's MEMIT or AlphaEdit (zjunlp/EasyEdit @ 14cea82) on CPU, sequential-batch editing.

Runs INSIDE ``.ref/venv-easyedit``, from the repository root, after ``bench/reference/patch_easyedit.py``
(``python -m bench.easyedit`` builds both and writes the spec):

    .ref/venv-easyedit/bin/python bench/reference/run_easyedit.py --spec spec.json --out out.json

Spec keys: ``method`` (memit | alphaedit), ``model_dir`` (the HF folder of SmolLM2), ``layers``, ``hparams``
(overrides of EasyEdit's ``hparams/MEMIT/llama-7b.yaml`` / ``hparams/AlphaEdit/llama3-8b.yaml``; the module
templates are Llama's with ``lm_head_module = model.embed_tokens``, SmolLM2 ties its head; ``v_loss_layer``
defaults to the last block), ``early_stop`` (false: the ``5e-2`` loss stop off), ``context_templates``
(list of lists, in place of EasyEdit's generated ones), ``records`` (ROME-format CounterFact), ``n_records``,
``batch_size``, ``stats`` (an ``.npz`` of ``stats_to_npz.py``), ``threads``, ``weights_dir`` (where the edited
weights go, one file per batch, for ``python -m bench.easyedit`` to score).

Protocol: EasyEdit's own driver, ``BaseEditor.batch_edit(prompts, target_new, ground_truth, subject=...,
sequential_edit=True)``, compiled verbatim from ``easyeditor/editors/editor.py`` (the module itself imports
every method) and called on an editor object holding what ``BaseEditor.__init__`` would set: the model and
tokenizer as its Llama branch loads them (float32, ``pad_token_id = eos_token_id``, right padding for
MEMIT/AlphaEdit), ``alg_name``, ``hparams`` (``batch_size`` = the spec's, ``device = "cpu"``) and
``apply_algo`` = ``apply_memit_to_model`` / ``apply_AlphaEdit_to_model``. Per chunk of ``batch_size`` requests
it calls ``apply_algo(model, tok, chunk, hparams, copy=False, return_orig_weights=True)`` and keeps the
edited model (``sequential_edit=True``): sequential-batch editing. AlphaEdit keeps its accumulated key
covariance ``cache_c`` and projection ``P`` in module globals, which only sequential editing uses as the
method intends (with ``sequential_edit=False`` the weights are restored after each chunk but ``cache_c``
still grows). EasyEdit's own evaluation (``compute_edit_quality``: teacher-forced token accuracy, another
definition than CounterFact's NLL comparisons) is replaced by a no-op; ES/PS/NS are computed afterwards by
our scorer on the weights this runner saves after each chunk.

What the runner sets, and why (no patch): ``hparams.model_name`` ends in ``(llama)`` so that AlphaEdit's
shape branch takes Llama's (d_ff = ``down_proj.weight.shape[1]``; any other name leaves ``P``/``cache_c``
undefined), ``model.config._name_or_path`` is the folder's name so that EasyEdit's ``layer_stats`` finds
our C as its cache file ``<stats_dir>/<name>/wikipedia_stats/<layer>_float32_mom2_<N>.npz`` (a symlink to
the spec's ``stats``, ``mom2_n_samples`` = its sample size; the matrix EasyEdit loads is checked equal to the
file), ``CONTEXT_TEMPLATES_CACHE`` holds our templates, and the working folder is a temporary one where
AlphaEdit writes and later reads back its ``null_space_project.pt`` (``P_loc``), as it does in its own runs.

Timings per batch (``time.perf_counter``): ``edit`` = the ``apply_algo`` call minus the loading of the C file
(ours has C in memory; kept as ``c_load``); it includes AlphaEdit's null-space projection (an SVD of C,
computed in its first call, as ours does in its first edit); ``keys`` = ``compute_ks`` (AlphaEdit calls it
twice per batch: the solve's keys and ``cache_c``'s), ``values`` = ``compute_z``, ``solve`` = the rest.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import random
import sys
import tempfile
import time
import types
from collections import defaultdict
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))
import run_authors as ra  # noqa: E402  (function_from_source, timed, serve)
import run_reference as rr  # noqa: E402  (install_stats, npz_moment, LLAMA_TEMPLATES, versions, ...)

EE_DIR = Path(os.environ.get("EASYEDIT_DIR", ROOT / ".ref" / "easyedit"))

# method -> (main module, apply function, hparams class, base hparams file, alg_name)
METHODS = {
    "memit": (
        "easyeditor.models.memit.memit_main",
        "apply_memit_to_model",
        "MEMITHyperParams",
        "hparams/MEMIT/llama-7b.yaml",
        "MEMIT",
    ),
    "alphaedit": (
        "easyeditor.models.alphaedit.AlphaEdit_main",
        "apply_AlphaEdit_to_model",
        "AlphaEditHyperParams",
        "hparams/AlphaEdit/llama3-8b.yaml",
        "AlphaEdit",
    ),
}

log = logging.getLogger("run_easyedit")


def build_hparams(method: str, spec: dict[str, Any], n_layers: int, work: Path, model_label: str) -> Any:
    """EasyEdit's hparams object: its Llama file, our module templates, layers and overrides, CPU."""
    import importlib

    from easyeditor.util.hparams import load_hparams_config

    main_name, _, cls_name, base, alg = METHODS[method]
    cls = getattr(importlib.import_module(main_name), cls_name)
    data = load_hparams_config(EE_DIR / base)
    if data.get("alg_name") != alg:
        raise SystemExit(f"{base}: alg_name {data.get('alg_name')!r}, expected {alg!r}")
    data.update(rr.LLAMA_TEMPLATES)
    data.update(
        layers=list(spec["layers"]),
        v_loss_layer=n_layers - 1,
        device="cpu",
        model_name=model_label,
        stats_dir=str(work / "stats"),
        batch_size=int(spec["batch_size"]),
    )
    if method == "alphaedit":
        data["P_loc"] = "null_space_project.pt"  # in the temporary working folder: computed, saved, read back
    data.update({k: v for k, v in spec.get("hparams", {}).items() if v is not None})
    try:
        return cls(**data)
    except TypeError as e:
        raise SystemExit(f"hparams: {e}") from None


def ee_requests(records: list[dict[str, Any]]) -> dict[str, list[str]]:
    """``batch_edit``'s arguments from ROME-format records: the filled-in prompt (EasyEdit puts ``{}`` back in
    place of the subject), the new and true targets, the subject."""
    rw = [r["requested_rewrite"] for r in records]
    return {
        "prompts": [x["prompt"].format(x["subject"]) for x in rw],
        "target_new": [x["target_new"]["str"] for x in rw],
        "ground_truth": [x["target_true"]["str"] for x in rw],
        "subject": [x["subject"] for x in rw],
    }


def run_spec(spec: dict[str, Any], quiet: bool) -> dict[str, Any]:
    """One method, sequential-batch, through EasyEdit's ``batch_edit``; timings, norms and weight files."""
    import importlib

    t_start = time.perf_counter()
    method = spec["method"]
    if method not in METHODS:
        raise SystemExit(f"method: {method!r} is not one of {sorted(METHODS)}")
    if not (EE_DIR / ".patched").is_file():
        raise SystemExit(f"{EE_DIR} is missing or unpatched: run python3 bench/reference/patch_easyedit.py")
    rr.setup_threads(spec.get("threads"))
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    os.environ["REF_EARLY_STOP_LOSS"] = "5e-2" if spec.get("early_stop", True) else "-inf"
    records = json.loads(rr.resolve(spec["records"]).read_text())[: int(spec["n_records"])]
    stats_npz = rr.resolve(spec["stats"])
    model_dir = rr.resolve(spec["model_dir"])
    weights_dir = rr.resolve(spec["weights_dir"])
    weights_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="easyedit-"))
    sys.path.insert(0, str(EE_DIR))
    main_name, apply_name, _, _, _ = METHODS[method]
    main = importlib.import_module(main_name)
    from easyeditor.editors.batch_editor import BatchEditor
    from easyeditor.editors.utils import _chunks, _prepare_requests, normalize_ground_truths, restore_after_edit
    from easyeditor.util import nethook

    # The model and tokenizer as BaseEditor.__init__'s Llama branch loads them (float32; pad = eos; right
    # padding for MEMIT/AlphaEdit); _name_or_path = the folder's name (where layer_stats looks for C).
    model, tok = rr.load_model(model_dir)
    tok.pad_token_id = tok.eos_token_id
    tok.padding_side = "right"
    model.config._name_or_path = model_dir.name
    hparams = build_hparams(method, spec, model.config.num_hidden_layers, work, f"{model_dir.name} (llama)")
    stats_files = rr.install_stats({hparams.layers[0]: str(stats_npz)}, model, hparams, work / "stats")

    templates = [list(g) for g in spec["context_templates"]]
    main.CONTEXT_TEMPLATES_CACHE = templates

    T: dict[str, float] = defaultdict(float)
    want_c, _, _ = rr.npz_moment(stats_npz)
    stats_check: dict[str, Any] = {}
    real_layer_stats = main.layer_stats

    def checked_layer_stats(model: Any, tok: Any, layer_name: str, *a: Any, **k: Any) -> Any:
        """EasyEdit's own layer_stats (reading our file as its cache), timed, its matrix checked."""
        t = time.perf_counter()
        stat = real_layer_stats(model, tok, layer_name, *a, **k)
        got = stat.mom2.moment().double().numpy()
        diff = float(np.abs(got - want_c).max())
        stats_check[layer_name] = {"count": int(stat.mom2.count), "max_abs_diff": diff}
        if diff > 1e-6 * float(np.abs(want_c).max()):
            raise SystemExit(f"{layer_name}: the C EasyEdit loaded differs from {stats_npz} by {diff}")
        T["c_load"] += time.perf_counter() - t
        return stat

    main.layer_stats = checked_layer_stats
    main.COV_CACHE.clear()
    main.compute_ks = ra.timed(main.compute_ks, T, "keys")
    main.compute_z = ra.timed(main.compute_z, T, "values")
    apply_fn = getattr(main, apply_name)

    weight_names = [f"{hparams.rewrite_module_tmp.format(layer)}.weight" for layer in hparams.layers]

    def weights() -> dict[str, torch.Tensor]:
        return {n: nethook.get_parameter(model_ref[0], n).detach().clone() for n in weight_names}

    model_ref = [model]
    w0 = weights()
    torch.save(w0, weights_dir / "w0.pt")
    batches: list[dict[str, Any]] = []
    weight_files: list[str] = []
    out_stream = io.StringIO()

    def apply_algo(model: Any, tok: Any, requests: list[dict[str, Any]], hparams: Any, **kwargs: Any) -> Any:
        """EasyEdit's apply function, timed; the weights it leaves are saved for scoring."""
        model_ref[0] = model
        before = weights()
        t0 = dict(T)
        t = time.perf_counter()
        ret = apply_fn(model, tok, requests, hparams, **kwargs)
        edit_s = time.perf_counter() - t
        model_ref[0] = ret[0]
        after = weights()
        dt = {k: T[k] - t0.get(k, 0.0) for k in ("keys", "values", "c_load")}
        edit_s -= dt["c_load"]
        norms = {n: float((after[n].double() - before[n].double()).norm()) for n in weight_names}
        path = weights_dir / f"batch{len(batches)}.pt"
        torch.save(after, path)
        weight_files.append(str(path))
        batches.append(
            {
                "index": len(batches),
                "n": len(requests),
                "edit": edit_s,
                "keys": dt["keys"],
                "values": dt["values"],
                "solve": edit_s - dt["keys"] - dt["values"],
                "c_load": dt["c_load"],
                "update_norms": norms,
                "update_norm": float(np.sqrt(sum(v * v for v in norms.values()))),
            }
        )
        print(f"batch {len(batches) - 1}: {len(requests)} edits in {edit_s:.1f}s", file=sys.stderr)
        if quiet:
            out_stream.seek(0)
            out_stream.truncate()
        return ret

    # EasyEdit's driver, verbatim, with its evaluation replaced by a no-op (see the module docstring).
    editor_py = EE_DIR / "easyeditor" / "editors" / "editor.py"
    ns: dict[str, Any] = {
        "List": list,
        "Optional": Optional,
        "Dict": dict,
        "time": time.time,
        "BatchEditor": BatchEditor,
        "normalize_ground_truths": normalize_ground_truths,
        "_prepare_requests": _prepare_requests,
        "_chunks": _chunks,
        "restore_after_edit": restore_after_edit,
        "compute_edit_quality": lambda *a, **k: {},
        "LOG": logging.getLogger("easyedit"),
    }
    ra.function_from_source(editor_py, "finalize_locality_metrics", ns)
    batch_edit = ra.function_from_source(editor_py, "BaseEditor.batch_edit", ns)
    editor = types.SimpleNamespace(
        model=model,
        tok=tok,
        hparams=hparams,
        alg_name=hparams.alg_name,
        model_name=hparams.model_name,
        apply_algo=apply_algo,
    )
    old_cwd = Path.cwd()
    os.chdir(work)  # AlphaEdit's null_space_project.pt goes here
    try:
        with contextlib.redirect_stdout(out_stream) if quiet else contextlib.nullcontext():
            batch_edit(editor, **ee_requests(records), sequential_edit=True, verbose=False)
    finally:
        os.chdir(old_cwd)
    extra: dict[str, Any] = {}
    if method == "alphaedit":
        extra["null_space_dim"] = [int(torch.trace(main.P[i]).round()) for i in range(len(hparams.layers))]
    plain = (int, float, str, bool, list, type(None))
    hp = {k: (v if isinstance(v, plain) else str(v)) for k, v in vars(hparams).items()}
    return {
        "side": "easyedit",
        "method": method,
        "repo": "zjunlp/EasyEdit",
        "commit": (EE_DIR / "REF_COMMIT").read_text().strip(),
        "layers": list(hparams.layers),
        "batch_size": int(spec["batch_size"]),
        "n_edits": len(records),
        "early_stop": bool(spec.get("early_stop", True)),
        "batches": batches,
        "weight_names": weight_names,
        "w0": str(weights_dir / "w0.pt"),
        "weights": weight_files,
        "stats_check": stats_check,
        "stats_files": {str(k): str(v) for k, v in stats_files.items()},
        "extra": extra,
        "hparams": hp,
        "context_templates": templates,
        "threads": torch.get_num_threads(),
        "peak_rss_mb": rr.peak_rss_mb(),
        "total_wall": time.perf_counter() - t_start,
        "versions": {k: v for k, v in rr.versions().items() if k != "reference_commit"},
    }


def main() -> None:
    ra.serve(run_spec, "EasyEdit's MEMIT/AlphaEdit", log=True)


if __name__ == "__main__":
    main()
