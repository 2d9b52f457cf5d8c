"""Engine benchmark: seconds per edit (values, keys, solve) and statistics throughput.

    python -m bench.engine [--device cpu|cuda] [--model smollm2|llama3-8b-random] [--batches 1,16,64]

Value optimisation is timed with a fixed number of steps (no early stop) so that batched and
one-at-a-time runs do the same work; one-at-a-time is measured on ``--single`` requests and reported
per edit (its per-edit cost does not depend on the batch size). Statistics throughput compares one
layer against every layer collected in one pass. Results go to stdout as a Markdown table and to
``bench/out/engine.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import time
from pathlib import Path

import torch

from editors import EditRequest, load_hparams, load_model, spec_for
from editors.common import sync
from editors.corpus import EMBEDDED_WIKI, CorpusSpec, iter_texts
from editors.solvers import memit_delta
from editors.stats import collect_second_moments
from editors.targets import compute_keys, optimize_values
from editors.templates import context_templates, flat

log = logging.getLogger("bench.engine")


def counterfact_requests(n: int) -> list[EditRequest]:
    """The first n records of ../shared/data/counterfact/counterfact-edit.json (EasyEdit format)."""
    path = Path(__file__).resolve().parents[2] / "shared/data/counterfact/counterfact-edit.json"
    recs = json.loads(path.read_text())[:n]
    return [EditRequest(r["prompt"], r["subject"], r["target_new"], r["ground_truth"], r["case_id"]) for r in recs]


def random_llama3_8b(device: str):
    """Llama-3-8B-shaped model with random bf16 weights (honest timings without the download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    cfg = LlamaConfig(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        max_position_embeddings=8192,
        rope_theta=5e5,
    )
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval().requires_grad_(False)
    tk = Tokenizer(models.WordLevel({f"w{i}": i for i in range(1000)} | {"<unk>": 1000}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<unk>", eos_token="<unk>")
    return model, tok


def timed(fn):
    dev = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    sync(dev)
    t = time.perf_counter()
    out = fn()
    sync(dev)
    return out, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", default="smollm2", choices=["smollm2", "llama3-8b-random"])
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--single", type=int, default=4, help="requests timed one at a time")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--layer", type=int, default=2)
    ap.add_argument("--stats-tokens", type=int, default=8192)
    ap.add_argument("--out", default="bench/out/engine.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.manual_seed(0)

    if args.model == "smollm2":
        model, tok = load_model(None, device=args.device)
    else:
        model, tok = random_llama3_8b(args.device)
    spec = spec_for(model)
    hp = load_hparams(
        "memit",
        "smollm2-135m" if args.model == "smollm2" else "llama3-8b",
        layers=[args.layer],
        v_num_grad_steps=args.steps,
        early_stop_loss=0.0,
    )
    batches = [int(b) for b in args.batches.split(",")]
    reqs = counterfact_requests(max(batches))
    if args.model != "smollm2":  # a word-level toy vocabulary: write the facts in its words
        reqs = [
            EditRequest(f"w{i % 50} w{i % 7} {{}} w3 w4", f"w{100 + i}", f"w{500 + i % 400}", case_id=i)
            for i in range(len(reqs))
        ]
    templates = context_templates(model, tok, "memit", 0)
    rows, res = (
        [],
        {
            "device": str(model.device),
            "model": args.model,
            "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
        },
    )
    if torch.cuda.is_available() and args.device != "cpu":
        res["gpu"] = torch.cuda.get_device_name()

    # One-at-a-time value optimisation, per edit: as the reference does it (every step runs the whole
    # prompts), and with this project's prefix reuse.
    def one_at_a_time(reuse: bool) -> float:
        _, t = timed(
            lambda: [
                optimize_values(model, tok, spec, args.layer, [r], flat(templates), hp, at="block", reuse_prefix=reuse)
                for r in reqs[: args.single]
            ]
        )
        return t / args.single

    single_ref = one_at_a_time(False)
    single = one_at_a_time(True)
    res["values_one_at_a_time_full_prompts_s_per_edit"] = single_ref
    c = torch.eye(spec.d_key, device=model.device, dtype=torch.float64)
    for b in batches:
        chunk = reqs[:b]
        v, t_val = timed(
            lambda chunk=chunk: optimize_values(
                model, tok, spec, args.layer, chunk, flat(templates), hp, at="block", max_requests=len(chunk)
            )
        )
        k, t_keys = timed(lambda chunk=chunk: compute_keys(model, tok, spec, args.layer, chunk, templates))
        r = (v.values - v.init).T.double()
        _, t_solve = timed(lambda k=k, r=r: memit_delta(k.double(), r, c, 1.0))
        rows.append(
            {
                "batch": b,
                "values_s_per_edit": t_val / b,
                "values_one_at_a_time_s_per_edit": single,
                "values_one_at_a_time_full_prompts_s_per_edit": single_ref,
                "speedup_vs_reference_procedure": single_ref / (t_val / b),
                "speedup": single / (t_val / b),
                "keys_s_per_edit": t_keys / b,
                "solve_s_per_edit": t_solve / b,
            }
        )
        log.info("%s", rows[-1])
    res["values"] = rows

    # Statistics throughput: one layer vs every layer in one pass.
    def texts():
        return iter_texts(CorpusSpec(EMBEDDED_WIKI))

    stats_rows = []
    for label, layers in (
        ("1 layer", [args.layer]),
        (f"all {spec.n_layers} layers, one pass", list(range(spec.n_layers))),
    ):
        st, t = timed(
            lambda layers=layers: collect_second_moments(
                model, tok, spec, layers, texts(), max_tokens=args.stats_tokens, progress=False
            )
        )
        n = next(iter(st.values())).n_tokens
        stats_rows.append(
            {
                "layers": label,
                "tokens": n,
                "seconds": t,
                "tokens_per_s": n / t,
                "layer_tokens_per_s": n * len(layers) / t,
            }
        )
        log.info("%s", stats_rows[-1])
    res["stats"] = stats_rows

    print(
        f"\n{args.model} on {res.get('gpu', res['cpu'])} ({res['threads']} threads), torch {res['torch']}, "
        f"{args.steps} value steps, MEMIT templates (6 prompts + KL per request)\n"
    )
    print(
        "| batch | values s/edit, batched | one at a time, full prompts (reference procedure) | speed-up | "
        "one at a time, prefix reuse | speed-up | keys s/edit | solve s/edit |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['batch']} | {r['values_s_per_edit']:.3f} | "
            f"{r['values_one_at_a_time_full_prompts_s_per_edit']:.3f} | "
            f"{r['speedup_vs_reference_procedure']:.2f}x | {r['values_one_at_a_time_s_per_edit']:.3f} | "
            f"{r['speedup']:.2f}x | {r['keys_s_per_edit']:.4f} | {r['solve_s_per_edit']:.5f} |"
        )
    print("\n| statistics | tokens | seconds | tokens/s | layer-tokens/s |\n|---|---|---|---|---|")
    for r in stats_rows:
        print(
            f"| {r['layers']} | {r['tokens']} | {r['seconds']:.1f} | {r['tokens_per_s']:.0f} | "
            f"{r['layer_tokens_per_s']:.0f} |"
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
