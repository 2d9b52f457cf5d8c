"""Shared fixtures: a tiny random Llama on CPU with a small BPE tokenizer trained here (no downloads),
in two flavours: one that adds BOS (like Llama-3) and one that does not (like SmolLM2)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]  # the repository
SHARED = ROOT.parent / "shared"
DATA = SHARED / "data"
WIKI = DATA / "wiki" / "wiki.utf8"
COUNTERFACT = DATA / "counterfact"

_FALLBACK_TEXT = (
    "The Eiffel Tower is located in Paris. Danielle Darrieux is a French actress. "
    "The mother tongue of Danielle Darrieux is French. Rome is the capital of Italy. "
) * 50


#: Fixtures that start Ray, load SmolLM2 or open an MLflow store: a test that uses one is an integration
#: test (``-m "not integration"`` leaves it out). Tests that start processes or clusters of their own
#: carry the marker themselves.
INTEGRATION_FIXTURES = frozenset({"local_ray", "smollm2", "sweep_store", "report", "study", "multi"})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if INTEGRATION_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)


def corpus_text(max_chars: int = 400_000) -> str:
    """Wikipedia text from ../shared/data (or a fallback sentence block if the folder is absent)."""
    if WIKI.is_file():
        text = WIKI.read_text(encoding="utf-8")[:max_chars]
        return re.sub(r"<[^>]+>", " ", text)
    return _FALLBACK_TEXT


def make_tokenizer(add_bos: bool):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token=None))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator([corpus_text(200_000), _FALLBACK_TEXT], trainer=trainer)
    if add_bos:
        tk.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tk.token_to_id("<s>"))]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>", padding_side="right"
    )


@pytest.fixture(scope="session")
def tok():
    """Tokenizer that adds no BOS (the SmolLM2 convention)."""
    return make_tokenizer(add_bos=False)


@pytest.fixture(scope="session")
def tok_bos():
    """Tokenizer that adds BOS to every encoding (the Llama-3 convention)."""
    t = make_tokenizer(add_bos=True)
    assert t("Paris")["input_ids"][0] == t.bos_token_id
    return t


def make_model(vocab_size: int, seed: int = 0, layers: int = 4, dtype=torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg).to(dtype).eval()
    model.requires_grad_(False)
    return model


@pytest.fixture()
def model(tok):
    """A fresh tiny random Llama (4 layers, d_model 32, d_key 48) per test."""
    return make_model(len(tok))


@pytest.fixture(scope="session")
def smollm2():
    """The embedded SmolLM2-135M (float32, CPU), loaded once per session."""
    from editors.model import load_model

    try:
        return load_model(None)
    except FileNotFoundError as e:  # pragma: no cover - the README's set-up installs it
        pytest.fail(str(e))


def write_tiny_assets(d: Path, tok) -> Path:
    """A tiny Llama + tokenizer saved with save_pretrained (``d/model``), a corpus text file and a
    4-record ROME-format CounterFact file (``d/cf.json``), for trials and sweeps on real loading code."""
    import json

    make_model(len(tok)).save_pretrained(d / "model")
    tok.save_pretrained(d / "model")
    (d / "corpus.txt").write_text(corpus_text(60_000))
    facts = [
        ("Danielle Darrieux", "English", "French"),
        ("Toko Yasuda", "piano", "guitar"),
        ("Rome", "Berlin", "Italy"),
        ("The Eiffel Tower", "London", "Paris"),
    ]
    recs = []
    for i, (subj, new, true) in enumerate(facts):
        recs.append(
            {
                "case_id": i,
                "requested_rewrite": {
                    "prompt": "The mother tongue of {} is",
                    "subject": subj,
                    "target_new": {"str": new},
                    "target_true": {"str": true},
                },
                "paraphrase_prompts": [f"{subj} spoke the language", f"{subj}'s tongue is"],
                "neighborhood_prompts": ["Michel Rocard is a native speaker of", "Robert Schuman, speaker of"],
            }
        )
    (d / "cf.json").write_text(json.dumps(recs))
    return d


def write_sweep_yaml(
    d: Path, name: str, grid: dict, out: Path | None = None, scoring: dict | None = None, **extra
) -> Path:
    """A tiny-Llama sweep over ``write_tiny_assets(d)`` (``d/<name>.yaml``) whose storage, stores and
    MLflow database live under ``out`` (default ``d/<name>``: the driver's disk in the cluster tests);
    ``scoring`` adds to the base trial's scoring settings."""
    import yaml

    out = out or d / name
    cfg = {
        "name": name,
        "base": {
            "hparams": "smollm2-135m",
            "n_edits": 4,
            "model": {"source": str(d / "model"), "device": "cpu"},
            "dataset": {"source": str(d / "cf.json")},
            "stats": {"corpus": str(d / "corpus.txt"), "max_tokens": 3000, "store": str(out / "stats")},
            "hp": {"v_num_grad_steps": 3, "context_templates": "none"},
            "scoring": {"ppl": True, "ppl_offset": 0, "ppl_texts": 2, "ppl_max_len": 64, **(scoring or {})},
        },
        "grid": grid,
        "resources": {"cpu": 1, "gpu": 0},
        "mlflow": {"tracking_uri": f"sqlite:///{out / 'mlflow.db'}", "experiment": "test"},
        "storage": str(out / "ray"),
        "values_store": str(out / "values"),
        "scores_store": str(out / "scores"),
        "retries": 1,
        **extra,
    }
    path = d / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path
