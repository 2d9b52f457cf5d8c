"""The model mirror and stores under a URI (sweep.shared.mirror), on a folder standing for the cluster's
storage (the same code reads S3: tests/sweep/test_cluster.py runs it against S3 on loopback): the Hub is
asked once per model and commit, every node's copy is checked against the manifest, a torn upload is
refused, and a model loaded from the mirror computes what the original does."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from editors import load_model
from sweep.config import ModelConfig, SweepConfig, TrialConfig
from sweep.shared import mirror
from sweep.shared.keys import ScoresStore, ValuesStore, stats_store
from tests.conftest import write_tiny_assets

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture()
def hub(tmp_path, tok_bos, monkeypatch):
    """The Hub as a folder holding one tiny Llama; every download of it is counted."""
    assets = write_tiny_assets(tmp_path / "hub", tok_bos)
    calls: list[tuple[str, str]] = []

    def download(repo: str, commit: str, dest: Path, patterns: list[str]) -> None:
        calls.append((repo, commit))
        shutil.copytree(assets / "model", dest)
        (dest / ".cache").mkdir()  # snapshot_download's own bookkeeping: never mirrored
        (dest / ".cache" / "x.lock").write_text("")

    monkeypatch.setattr(mirror, "_hub_download", download)
    monkeypatch.setenv(mirror.CACHE_ENV, str(tmp_path / "node-a"))
    mirror.bucket.cache_clear()
    return assets / "model", calls


def _mc(tmp_path: Path) -> ModelConfig:
    return ModelConfig(source="org/tiny", revision=COMMIT, mirror=str(tmp_path / "mirror"), device="cpu")


def test_the_hub_is_asked_once_and_every_node_loads_a_checked_copy(tmp_path, hub, monkeypatch):
    original, calls = hub
    mc = _mc(tmp_path)
    trial = TrialConfig(model=mc)
    mirror.prepare(SweepConfig(name="s"), [trial, trial])
    mirror.prepare(SweepConfig(name="s"), [trial])  # a second launch: the mirror has it
    assert calls == [("org/tiny", COMMIT)]
    manifest = json.loads((tmp_path / "mirror" / "org--tiny" / COMMIT / mirror.MANIFEST).read_text())
    assert "model.safetensors" in manifest and "config.json" in manifest
    assert not any(name.startswith(".") for name in manifest)

    monkeypatch.setenv(mirror.CACHE_ENV, str(tmp_path / "node-b"))  # a new node: an empty cache
    loaded = mirror.loadable(mc)
    assert loaded.revision is None and loaded.mirror is None
    assert Path(loaded.source).is_relative_to(tmp_path / "node-b") and calls == [("org/tiny", COMMIT)]
    for name, want in manifest.items():
        assert (Path(loaded.source) / name).stat().st_size == want["size"]
    model, tok = load_model(loaded.source)
    ref, _ = load_model(str(original))
    ids = tok("The Eiffel Tower is in", return_tensors="pt")["input_ids"]
    assert torch.equal(model(ids).logits, ref(ids).logits)


def test_a_torn_upload_is_refused_and_a_missing_model_names_the_driver(tmp_path, hub, monkeypatch):
    mc = _mc(tmp_path)
    with pytest.raises(mirror.MirrorError, match="has no org/tiny@"):
        mirror.loadable(mc)  # a worker never fills the mirror
    mirror.fill(mc)
    weights = tmp_path / "mirror" / "org--tiny" / COMMIT / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)  # same size, other bytes
    monkeypatch.setenv(mirror.CACHE_ENV, str(tmp_path / "node-c"))
    with pytest.raises(mirror.MirrorError, match=r"model\.safetensors does not match its manifest"):
        mirror.loadable(mc)
    assert not (tmp_path / "node-c" / "models" / "org--tiny" / COMMIT / mirror.MANIFEST).exists()


def test_the_plan_reads_a_mirrored_models_shape_from_the_copy(tmp_path, hub):
    from sweep.shared.needs import shape_of

    mc = _mc(tmp_path)
    assert mirror.config_source(mc) == ("org/tiny", None, COMMIT)  # before: the Hub's config (a dry run)
    mirror.fill(mc)
    assert mirror.config_source(mc)[0] == str(mirror.local_copy(mc))
    assert shape_of(mc).n_layers == 4


def test_stores_under_a_uri_are_a_local_copy_backed_by_the_prefix(tmp_path, monkeypatch):
    """A URI store resolves to a folder in this node's cache and a remote; entries cross both ways."""
    from editors.stats import SecondMoment, StatsKey

    monkeypatch.setenv(mirror.CACHE_ENV, str(tmp_path / "node-a"))
    folder, remote = mirror.store_location("s3://lab/stores/stats")
    assert folder == tmp_path / "node-a" / "stores" / "s3" / "lab" / "stores" / "stats" and remote is not None
    assert mirror.store_location(str(tmp_path / "plain")) == (tmp_path / "plain", None)

    # the same through a local-folder remote, so the round trip runs offline
    monkeypatch.setattr(mirror, "store_location", lambda v: (tmp_path / "copy", mirror.Bucket(str(tmp_path / "b"))))
    import sweep.shared.keys as keys

    monkeypatch.setattr(keys, "store_location", mirror.store_location)
    key = StatsKey("dir:m:0", 1, "corpus", None, 100, 0, "float32")
    stats_store("s3://lab/stats").put(key, SecondMoment(torch.eye(3), 5))
    assert (tmp_path / "b" / f"{key.digest()}.safetensors").is_file()
    shutil.rmtree(tmp_path / "copy")
    assert torch.equal(stats_store("s3://lab/stats").get(key).mom2, torch.eye(3))
    assert isinstance(ValuesStore("s3://x").store.remote, mirror.Bucket)
    assert isinstance(ScoresStore("s3://x").store.remote, mirror.Bucket)


def test_a_store_that_cannot_be_written_fails_before_any_work(tmp_path):
    from editors.config import ConfigError

    (tmp_path / "a-file").write_text("")  # a prefix no folder can be made under
    with pytest.raises(ConfigError, match=r"^values_store: cannot write under"):
        mirror.Bucket(str(tmp_path / "a-file" / "values")).check_writable("values_store")
    mirror.Bucket(str(tmp_path / "ok")).check_writable("values_store")
    assert list((tmp_path / "ok").iterdir()) == []  # the check leaves nothing behind
