"""The GPU check: one command, one JSON, on a Llama-3-8B-shaped model with random bf16 weights.

    bash bench/gpu.sh                       # on a CUDA machine: < 8 minutes, bench/out/gpu.json
    python -m bench.gpu --tiny --out x.json # the same code on a tiny model on the CPU (the test suite)

Needs only torch, transformers and this repository's ``editors`` (plus the Ray- and MLflow-free
``sweep.evals.metrics`` and ``sweep.shared.needs`` planning helpers): no Ray, MLflow, gguf or download, since a bare
GPU machine may have nothing else. It records, each with its wall time and peak device memory:

- ``tests``: the ``gpu``-marked tests (``python -m pytest -m gpu``), passed or not;
- ``stats_one_layer``: statistics tokens/s of layer 1 alone;
- ``stats_all_layers``: all 32 layers in the passes :func:`sweep.shared.needs.split_passes` plans for this
  card's memory (the same rule as a sweep's pre-pass), tokens/s of the whole set;
- ``values``: target values at B = 100 (25 fixed steps, no early stop), s/edit;
- ``solves``: MEMIT, EMMET, AlphaEdit and RLSEdit updates at B = 4,096 from layer 1's C, SPHERE's
  projection of one update, UltraEdit's solve from 3 answer tokens per edit;
- ``per_edit``: values + AlphaEdit's solve per edit at B = 100, beside AlphaEdit's Table 7 (≈ 2.2 s per
  edit for MEMIT/AlphaEdit at batch 100 on Llama-3-8B, an A100);
- ``scoring``: CounterFact scoring of 256 facts, s/fact.

The weights are random, so the timings are honest and the edits meaningless.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from editors import EditRequest, load_hparams, spec_for
from editors.algorithms import sphere
from editors.common import sync
from editors.solvers import (
    alphaedit_delta,
    emmet_delta,
    memit_delta,
    null_space_projector,
    rls_initial_inverse,
    rls_step,
    ultraedit_delta,
)
from editors.stats import collect_second_moments
from editors.store import write_json_atomic
from editors.targets import optimize_values

log = logging.getLogger("bench.gpu")

ROOT = Path(__file__).resolve().parents[1]

#: (layers, hidden, MLP width, heads, kv heads, vocab) of the two sizes.
SHAPES = {
    "llama3-8b": (32, 4096, 14336, 32, 8, 128256),
    "tiny": (4, 64, 128, 4, 2, 1100),
}
SIZES = {  # stats tokens one layer / all layers, values B, solves B, scored facts
    "llama3-8b": (262_144, 65_536, 100, 4096, 256),
    "tiny": (4096, 2048, 4, 32, 4),
}


def random_llama(kind: str, device: str) -> tuple[Any, Any]:
    """A Llama with random weights (bf16 on a GPU, fp32 on a CPU) and a word-level toy tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    n, d, dk, h, kv, vocab = SHAPES[kind]
    cfg = LlamaConfig(
        hidden_size=d,
        intermediate_size=dk,
        num_hidden_layers=n,
        num_attention_heads=h,
        num_key_value_heads=kv,
        vocab_size=vocab,
        max_position_embeddings=8192,
        rope_theta=5e5,
    )
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg).eval().requires_grad_(False)
    finally:
        torch.set_default_dtype(old)
    tk = Tokenizer(models.WordLevel({f"w{i}": i for i in range(1000)} | {"<unk>": 1000}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<unk>", eos_token="<unk>")
    return model, tok


def texts(n: int, words: int = 512, seed: int = 0) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    return [" ".join(f"w{i}" for i in torch.randint(0, 1000, (words,), generator=g).tolist()) for _ in range(n)]


def requests(n: int) -> list[EditRequest]:
    return [
        EditRequest(f"w{i % 50} w{i % 7} {{}} w3 w4", f"w{100 + i % 800}", f"w{500 + i % 400}", f"w{900 + i % 99}")
        for i in range(n)
    ]


def measure(device: str, fn: Callable[[], Any]) -> tuple[Any, dict[str, float]]:
    """(fn(), {seconds, peak_memory_gb}) with the device synchronised around the call."""
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    sync(dev)
    t = time.perf_counter()
    out = fn()
    sync(dev)
    rec = {"seconds": time.perf_counter() - t}
    if dev.type == "cuda":
        rec["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9
    else:
        rec["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    return out, rec


def gpu_tests() -> dict[str, Any]:
    t = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests/test_gpu.py", "-p", "no:cacheprovider"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-1:] or [""]
    return {"returncode": proc.returncode, "summary": tail[0], "seconds": time.perf_counter() - t}


def planned_passes(kind: str, device: str, n_layers: int) -> list[tuple[int, ...]]:
    """The statistics passes a sweep would plan for this model on this device (sweep.shared.needs's rule)."""
    from sweep.config import parse_config
    from sweep.shared.needs import BUDGET_SHARE, Shape, pass_memory_gb, split_passes

    n, d, dk, _, _, vocab = SHAPES[kind]
    params = vocab * d * 2 + n * (2 * d * d + 2 * d * d * 8 / 32 + 3 * d * dk)
    shape = Shape(n, d, dk, vocab, params)
    t = parse_config(
        {"hparams": "llama3-8b", "layers": [1], "n_edits": 1, "batch_size": 1, "model": {"dtype": "bfloat16"}}
    )
    if not device.startswith("cuda"):
        return [tuple(range(n_layers))]
    budget = torch.cuda.get_device_properties(0).total_memory / 1e9
    return split_passes(range(n_layers), lambda k: pass_memory_gb(shape, k, t, on_gpu=True) <= BUDGET_SHARE * budget)


def run(kind: str, device: str, with_tests: bool) -> dict[str, Any]:
    from sweep.evals.data import Record
    from sweep.evals.metrics import score_records

    n_tok_one, n_tok_all, b_values, b_solve, n_score = SIZES[kind]
    out: dict[str, Any] = {
        "model": f"{kind} (random weights)",
        "device": torch.cuda.get_device_name(0) if device.startswith("cuda") else platform.processor() or "cpu",
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    if device.startswith("cuda"):
        out["device_memory_gb"] = torch.cuda.get_device_properties(0).total_memory / 1e9
    if with_tests:
        out["tests"] = gpu_tests()
        log.info("gpu tests: %s", out["tests"])
    (model, tok), rec = measure(device, lambda: random_llama(kind, device))
    out["load"] = rec
    spec = spec_for(model)
    n_layers = SHAPES[kind][0]
    corpus = texts(max(n_tok_one, n_tok_all) // 512 + 8)

    st, rec = measure(
        device, lambda: collect_second_moments(model, tok, spec, [1], corpus, max_tokens=n_tok_one, progress=False)
    )
    out["stats_one_layer"] = {**rec, "tokens": n_tok_one, "tokens_per_s": n_tok_one / rec["seconds"]}
    log.info("statistics, layer 1: %s", out["stats_one_layer"])
    cov = st[1].mom2
    passes = planned_passes(kind, device, n_layers)
    recs = []
    for p in passes:
        got, r = measure(
            device,
            lambda p=p: collect_second_moments(model, tok, spec, list(p), corpus, max_tokens=n_tok_all, progress=False),
        )
        del got
        recs.append({"layers": [p[0], p[-1]], **r})
    total = sum(r["seconds"] for r in recs)
    out["stats_all_layers"] = {
        "passes": recs,
        "tokens": n_tok_all,
        "seconds": total,
        "tokens_per_s": n_tok_all / total,
        "layer_tokens_per_s": n_tok_all * n_layers / total,
    }
    log.info("statistics, all layers: %s", out["stats_all_layers"])

    hp = load_hparams("memit", "llama3-8b", layers=[1], v_num_grad_steps=25, early_stop_loss=0.0)
    reqs = requests(b_values)
    tpl = ["{}", "w1 w2 w3. {}", "w4 w5. {}", "w6 w7 w8 w9. {}", "w10. {}", "w11 w12. {}"]
    _, rec = measure(
        device, lambda: optimize_values(model, tok, spec, 1, reqs, tpl, hp, at="block", max_requests=hp.value_batch)
    )
    out["values"] = {**rec, "batch": b_values, "steps": 25, "s_per_edit": rec["seconds"] / b_values}
    log.info("values: %s", out["values"])

    g = torch.Generator(device=cov.device).manual_seed(0)
    dk, dm = spec.d_key, spec.d_model
    keys = torch.randn(dk, b_solve, generator=g, device=cov.device) * cov.diagonal().sqrt()[:, None]
    resid = torch.randn(dm, b_solve, generator=g, device=cov.device) * 0.01
    c = cov.float()
    solves = {}
    _, solves["memit"] = measure(device, lambda: memit_delta(keys, resid, c, 15_000.0))
    _, solves["emmet"] = measure(device, lambda: emmet_delta(keys, resid, c, 1.0, 0.1))
    proj, solves["alphaedit_projector"] = measure(device, lambda: null_space_projector(c, 2e-2))
    _, solves["alphaedit"] = measure(device, lambda: alphaedit_delta(keys, resid, proj.to(c.dtype), None, 10.0))
    p0, solves["rlsedit_initial_inverse"] = measure(device, lambda: rls_initial_inverse(c, 15_000.0, 0.0, 1.0))
    _, solves["rlsedit_step"] = measure(device, lambda: rls_step(p0, keys, resid))
    w = torch.randn(dm, dk, generator=g, device=cov.device)
    delta = torch.randn(dm, dk, generator=g, device=cov.device)
    _, solves["sphere_projection"] = measure(device, lambda: sphere.project(delta, w, 0.5, 0.5))
    rows = torch.randn(3 * b_values, dk, generator=g, device=cov.device)
    targets = torch.randn(3 * b_values, dm, generator=g, device=cov.device) * 1e-3
    _, solves["ultraedit_b100"] = measure(device, lambda: ultraedit_delta(rows, targets))
    out["solves"] = {"batch": b_solve, **solves}
    log.info("solves: %s", out["solves"])
    b = min(b_values, b_solve)
    _, small = measure(device, lambda: alphaedit_delta(keys[:, :b], resid[:, :b], proj.to(c.dtype), None, 10.0))
    per_edit = out["values"]["s_per_edit"] + small["seconds"] / b
    out["per_edit"] = {"batch": b, "alphaedit_s": per_edit, "alphaedit_table7_s": 2.2}
    log.info("per edit at B=%d: values + AlphaEdit solve %.3f s (AlphaEdit's Table 7: ~2.2 s)", b, per_edit)

    facts = [
        Record(
            case_id=i,
            prompt=f"w{i % 50} w{i % 7} {{}} w3",
            subject=f"w{10 + i % 80}",
            target_new=f"w{100 + i % 800}",
            target_true=f"w{200 + i % 700}",
            paraphrase_prompts=(f"w5 w{10 + i % 80} w6",),
            neighborhood_prompts=("w7 w8 w9",),
            neighborhood_answer=f"w{200 + i % 700}",
        )
        for i in range(n_score)
    ]
    _, rec = measure(device, lambda: score_records(model, tok, spec, facts, batch_size=64))
    out["scoring"] = {**rec, "facts": n_score, "s_per_fact": rec["seconds"] / n_score}
    log.info("scoring: %s", out["scoring"])
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="a 4-layer model and small sizes (CPU, the test suite)")
    ap.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    ap.add_argument("--no-tests", action="store_true", help="skip the gpu-marked pytest run")
    ap.add_argument("--out", default="bench/out/gpu.json")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if not args.tiny and not device.startswith("cuda"):
        print("error: --device: the full-size check needs a CUDA GPU; use --tiny on a CPU", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    result = run("tiny" if args.tiny else "llama3-8b", device, with_tests=not args.no_tests)
    write_json_atomic(args.out, result)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
