"""Every bounded or typed field of the trial and sweep configs: a bad value is one ConfigError that
names the field by the path the user wrote, raised while parsing (no model, no file, no work)."""

from __future__ import annotations

import pytest
import yaml

from editors.config import ConfigError
from sweep.config import load_config, load_sweep
from sweep.plan import make_plan

TRIAL_BAD = [
    ("algorithm=mend", "algorithm"),
    ("n_edits=0", "n_edits"),
    ("n_edits=abc", "n_edits"),
    ("batch_size=0", "batch_size"),
    ("mode=online", "mode"),
    ("seed=-1", "seed"),
    ("seed=x", "seed"),
    ("layers=[3,1]", "layers"),
    ("hparams=nope", "hparams"),
    ("hp.v_lr=-1", "hp.v_lr"),
    ("hp.v_num_grad_steps=0", "hp.v_num_grad_steps"),
    ("hp.mom2_update_weight=0", "hp.mom2_update_weight"),
    ("hp.rect_keep=1.5", "hp.rect_keep"),
    ("hp.prune_base=1", "hp.prune_base"),
    ("hp.mpes_hits=-1", "hp.mpes_hits"),
    ("hp.nope=1", "hp.nope"),
    ("model.source=/nonexistent/dir", "model.source"),
    ("model.source=./missing.gguf", "model.source"),
    ("model.dtype=float17", "model.dtype"),
    ("model.device=tpu", "model.device"),
    ("model.gguf_file=x.gguf", "model.gguf_file"),
    ("dataset.sample=-1", "dataset.sample"),
    ("dataset.case_ids=[1,1]", "dataset.case_ids"),
    ("dataset.offset=-1", "dataset.offset"),
    ("stats.corpus=/nope.txt", "stats.corpus"),
    ("stats.max_tokens=0", "stats.max_tokens"),
    ("stats.max_texts=0", "stats.max_texts"),
    ("stats.batch_tokens=0", "stats.batch_tokens"),
    ("stats.tolerance=1.5", "stats.tolerance"),
    ("stats.dtype=int8", "stats.dtype"),
    ("stats.model_dtype=float17", "stats.model_dtype"),
    ("scoring.batch_size=0", "scoring.batch_size"),
    ("scoring.pre=maybe", "scoring.pre"),
    ("scoring.generation_prompts=all", "scoring.generation_prompts"),
    ("scoring.generation_per_record=0", "scoring.generation_per_record"),
    ("scoring.generation_max_len=0", "scoring.generation_max_len"),
    ("scoring.ppl_offset=-1", "scoring.ppl_offset"),
    ("scoring.ppl_texts=0", "scoring.ppl_texts"),
    ("scoring.ppl_max_len=1", "scoring.ppl_max_len"),
    ("scoring.retention_every=-1", "scoring.retention_every"),
    ("scoring.retention_every=2", "scoring.retention_every"),  # batch mode has no forgetting curve
    ("scoring.health_every=-1", "scoring.health_every"),
    ("guard.max_ppl_ratio=2", "guard.max_ppl_ratio"),  # needs ppl and health points
    ("guard.min_batch_es=101", "guard.min_batch_es"),
    ("colour=red", "colour"),
]


@pytest.mark.parametrize(("override", "field"), TRIAL_BAD)
def test_a_bad_trial_field_is_one_error_naming_it(override, field):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert str(e.value).startswith(f"{field}:") or str(e.value).startswith(f"{field} "), str(e.value)


SWEEP_BAD = [
    ("name=a b", "name"),
    ("retries=-1", "retries"),
    ("values_chunk=0", "values_chunk"),
    ("resources.cpu=0", "resources.cpu"),
    ("resources.gpu=-1", "resources.gpu"),
    ("resources.max_concurrent=0", "resources.max_concurrent"),
    ("resources.prepass_gpu=-1", "resources.prepass_gpu"),
    ("resources.gpu_memory_gb=0", "resources.gpu_memory_gb"),
    ("estimate.tflops=0", "estimate.tflops"),
    ("share_values=perhaps", "share_values"),
    ("grid.batch_size=[]", "grid.batch_size"),
    ("values_store=http://host/values", "values_store"),
    ("scores_store=ftp://host/scores", "scores_store"),
    ("base.stats.store=https://host/stats", "base.stats.store"),
    ("base.model.mirror=s3://lab/models", "model.mirror"),  # the embedded SmolLM2: not a hub model
    (("base.model.source=org/name", "base.model.mirror=relative/models"), "model.mirror"),
    (("base.model.source=org/name", "base.model.mirror=s3://lab/models"), "model.revision"),
    (("base.model.source=org/name", "base.model.revision=main", "base.model.mirror=s3://lab/models"), "model.revision"),
]


@pytest.mark.parametrize(("override", "field"), SWEEP_BAD)
def test_a_bad_sweep_field_is_one_error_naming_it(override, field, tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"name": "ok", "base": {}, "grid": {"batch_size": [1, 2]}}))
    with pytest.raises(ConfigError) as e:
        cfg = load_sweep(str(path), [override] if isinstance(override, str) else list(override))
        make_plan(cfg, dry_run=True)  # the trial's own fields are checked as the plan expands them
    assert str(e.value).startswith(f"{field}:") or f" {field}:" in str(e.value), str(e.value)


def test_a_bad_variant_names_the_variant(tmp_path):
    from sweep.cells import expand

    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"name": "ok", "variants": {"fast": {"hp": {"v_lr": -1}}}}))
    with pytest.raises(ConfigError, match=r"variants\.fast.*hp\.v_lr"):
        expand(load_sweep(str(path)))
