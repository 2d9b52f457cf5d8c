"""What a cluster keeps beyond its driver's disk: the stores under a URI, and the model mirror.

**Stores under a URI.** The shared-work stores (``stats.store``, ``values_store``, ``scores_store``) are
folders on the driver's disk. Given as a URI (``s3://lab/edit-stores/stats``; any file system pyarrow
opens), a store is a local copy (under ``$MODEL_EDITING_CACHE``: :func:`~sweep.evals.data.cache_dir`)
backed by that prefix: a miss in the copy is looked up under the prefix, and every entry the driver
writes goes there after its local write (:class:`Bucket`, an :class:`editors.store.Remote`). Entries
are content-keyed and never rewritten, so a later cluster, or another lab's, reads what any earlier one
computed: Llama-3-8B's statistics are computed once per lab, not once per cluster. Only the driver
writes (the nodes hand it what they compute, :mod:`sweep.shared.fulfil`).

**The model mirror** (``model.mirror``: a URI, or a folder every node mounts) holds a hub model's files
at one pinned commit, ``<mirror>/<org>--<name>/<commit>/``, and a ``MANIFEST.json`` of each file's size
and sha256, written last. The driver fills it from the Hub once per model and commit (:func:`fill`,
from :func:`sweep.plan.make_plan`); every process that loads the model reads it through
:func:`loadable`, which copies the files to its node's cache once and checks each against the manifest.
64 new nodes make 64 reads of the cluster's storage and no request to the Hub.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from editors.store import atomic_write, claim, write_json_atomic

from ..config import ConfigError, is_uri
from ..evals.data import CACHE_ENV, cache_dir

if TYPE_CHECKING:
    from ..config import ModelConfig, SweepConfig, TrialConfig

log = logging.getLogger(__name__)

MANIFEST = "MANIFEST.json"
#: The files of a hub model the mirror keeps: configs, tokenizers and safetensors weights.
MODEL_FILES = ("*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.jinja")
_CHUNK = 8 << 20


class MirrorError(ValueError):
    """The model mirror lacks a model, or a copied file does not match its manifest (the launcher reports
    it as one line, as it does a config error)."""


# ----------------------------------------------------------------------------------------------------
# A prefix on cloud storage


class Bucket:
    """A prefix on a pyarrow file system (``s3://bucket/prefix``, or a local folder), holding files by
    relative name. Uploads are whole or absent: an S3 object appears when its upload completes; a local
    file is written beside its name and renamed. Implements :class:`editors.store.Remote`."""

    def __init__(self, uri: str) -> None:
        self.uri = uri

    @functools.cached_property
    def _opened(self) -> tuple[Any, str]:
        """(the file system, the prefix), opened on first use: S3 asks for the bucket's region then."""
        from pyarrow import fs

        filesystem, prefix = fs.FileSystem.from_uri(self.uri)
        return filesystem, prefix.rstrip("/")

    @property
    def fs(self) -> Any:
        return self._opened[0]

    @property
    def prefix(self) -> str:
        return self._opened[1]

    @property
    def _local(self) -> bool:
        from pyarrow import fs

        return isinstance(self.fs, fs.LocalFileSystem)

    def _path(self, name: str) -> str:
        return f"{self.prefix}/{name}"

    def exists(self, name: str) -> bool:
        from pyarrow import fs

        return self.fs.get_file_info(self._path(name)).type == fs.FileType.File

    def fetch(self, name: str, dest: Path) -> bool:
        if not self.exists(name):
            return False

        def write(tmp: Path) -> None:
            with self.fs.open_input_stream(self._path(name)) as src, open(tmp, "wb") as out:
                shutil.copyfileobj(src, out, _CHUNK)

        atomic_write(dest, write)
        return True

    def publish(self, name: str, src: Path) -> None:
        target = self._path(name)
        if self._local:
            self.fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
            tmp = f"{target.rsplit('/', 1)[0]}/.{uuid.uuid4().hex}.tmp"
            try:
                self._copy_up(src, tmp)
                self.fs.move(tmp, target)
            finally:
                with contextlib.suppress(OSError):
                    self.fs.delete_file(tmp)
        else:
            self._copy_up(src, target)

    def _copy_up(self, src: Path, target: str) -> None:
        with open(src, "rb") as f, self.fs.open_output_stream(target) as out:
            shutil.copyfileobj(f, out, _CHUNK)

    def names(self, folder: str) -> list[str]:
        from pyarrow import fs

        infos = self.fs.get_file_info(fs.FileSelector(self._path(folder), allow_not_found=True))
        return sorted(i.base_name for i in infos if i.type == fs.FileType.File)

    def read_json(self, name: str) -> Any | None:
        if not self.exists(name):
            return None
        with self.fs.open_input_stream(self._path(name)) as f:
            return json.loads(f.read())

    def check_writable(self, field: str) -> None:
        """Write and remove a small object, or raise a :class:`ConfigError` naming ``field``: a store that
        cannot be written fails before any work, not after hours of statistics."""
        name = f".write-check-{uuid.uuid4().hex}"
        try:
            with tempfile.NamedTemporaryFile() as f:
                f.write(b"ok")
                f.flush()
                self.publish(name, Path(f.name))
            self.fs.delete_file(self._path(name))
        except OSError as e:
            raise ConfigError(
                f"{field}: cannot write under {self.uri} ({e}); check the credentials (AWS_* variables, the "
                "nodes' instance profile) and that the bucket exists"
            ) from None


@functools.lru_cache(maxsize=32)
def bucket(uri: str) -> Bucket:
    return Bucket(uri)


# ----------------------------------------------------------------------------------------------------
# Stores under a URI


def store_location(value: str | os.PathLike) -> tuple[Path, Bucket | None]:
    """(the local folder, its remote or None) of a store given as a folder or a URI: the local copy of
    ``s3://b/p`` is ``<cache_dir>/stores/s3/b/p``."""
    if not is_uri(value):
        return Path(value), None
    scheme, rest = str(value).split("://", 1)
    return cache_dir() / "stores" / scheme / rest.strip("/"), bucket(str(value))


def store_fields(cfg: SweepConfig, trials: Iterable[TrialConfig]) -> list[tuple[str, str]]:
    """(the field that names it, the URI) of every store of the sweep under a URI, each once."""
    out = [(f, v) for f in ("values_store", "scores_store") if is_uri(v := getattr(cfg, f))]
    out += [("stats.store", t.stats.store) for t in trials if is_uri(t.stats.store)]  # type: ignore[misc]
    return list(dict.fromkeys(out))


# ----------------------------------------------------------------------------------------------------
# The model mirror


def _folder(mc: ModelConfig) -> str:
    return f"{mc.source.replace('/', '--')}/{mc.revision}"  # type: ignore[union-attr]


def local_copy(mc: ModelConfig) -> Path:
    """This node's copy of a mirrored model (complete when its manifest is there)."""
    return cache_dir() / "models" / _folder(mc)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def _manifest(folder: Path) -> dict[str, dict[str, Any]]:
    return {
        p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p)}
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    }


def _hub_download(repo: str, commit: str, dest: Path, patterns: list[str]) -> None:
    """The Hub's files of ``repo`` at ``commit`` into ``dest`` (the one place the mirror asks the Hub)."""
    from huggingface_hub import snapshot_download

    snapshot_download(repo_id=repo, revision=commit, local_dir=str(dest), allow_patterns=patterns)


def fill(mc: ModelConfig) -> Path:
    """The driver's side: make the mirror hold ``mc`` (from the Hub, once per model and commit, when it
    does not), and return this node's checked copy. Files are uploaded first, the manifest last, so a
    mirror with a manifest is complete."""
    remote, local = bucket(mc.mirror), local_copy(mc)  # type: ignore[arg-type]
    name = _folder(mc)
    if remote.exists(f"{name}/{MANIFEST}"):
        return loadable_folder(mc)
    with claim(str(local), lambda: remote.exists(f"{name}/{MANIFEST}")) as mine:
        if not mine:
            return loadable_folder(mc)
        tmp = local.parent / f".{local.name}.hub"
        shutil.rmtree(tmp, ignore_errors=True)
        patterns = list(MODEL_FILES) + ([mc.gguf_file] if mc.gguf_file else [])
        log.info("model mirror: downloading %s@%s from the Hub once, for %s", mc.source, mc.revision, mc.mirror)
        _hub_download(mc.source, mc.revision, tmp, patterns)  # type: ignore[arg-type]
        manifest = _manifest(tmp)
        if not any(f.endswith((".safetensors", ".gguf")) for f in manifest):
            raise MirrorError(f"model.mirror: {mc.source}@{mc.revision} has no safetensors weights on the Hub")
        for rel in manifest:
            remote.publish(f"{name}/{rel}", tmp / rel)
        shutil.rmtree(local, ignore_errors=True)
        os.replace(tmp, local)
        write_json_atomic(local / MANIFEST, manifest)
        remote.publish(f"{name}/{MANIFEST}", local / MANIFEST)
        log.info("model mirror: %s@%s is in %s (%d files)", mc.source, mc.revision, mc.mirror, len(manifest))
    return local


def loadable_folder(mc: ModelConfig) -> Path:
    """This node's copy of mirrored ``mc``, copied from the mirror once per node and commit (one process
    copies, the others wait) and each file checked against the manifest. Raises :class:`MirrorError`
    when the mirror lacks the model (the driver fills it) or a file does not match."""
    local = local_copy(mc)
    if (local / MANIFEST).is_file():
        return local
    remote, name = bucket(mc.mirror), _folder(mc)  # type: ignore[arg-type]
    with claim(str(local), lambda: (local / MANIFEST).is_file()) as mine:
        if not mine:
            return local
        manifest = remote.read_json(f"{name}/{MANIFEST}")
        if manifest is None:
            raise MirrorError(
                f"model.mirror: {mc.mirror} has no {mc.source}@{mc.revision}; the driver fills it when it plans "
                "(python -m sweep.launch), so a worker never asks the Hub"
            )
        for rel, want in manifest.items():
            path = local / rel
            if not (path.is_file() and path.stat().st_size == want["size"] and _sha256(path) == want["sha256"]):
                remote.fetch(f"{name}/{rel}", path)
                if _sha256(path) != want["sha256"]:
                    path.unlink()
                    raise MirrorError(
                        f"model.mirror: {mc.mirror}/{name}/{rel} does not match its manifest's sha256 "
                        "(a torn or altered upload); remove the model's folder from the mirror and launch again"
                    )
        write_json_atomic(local / MANIFEST, manifest)
    log.info("model mirror: %s@%s copied to %s", mc.source, mc.revision, local)
    return local


def loadable(mc: ModelConfig) -> ModelConfig:
    """``mc`` as a process loads it: a mirrored model as its node's checked local copy (the source a
    folder, no revision), any other unchanged. Content identities are taken of ``mc`` itself
    (``sweep.shared.keys.model_identity``), so stores are shared with runs that load from the Hub."""
    if mc.mirror is None:
        return mc
    return dataclasses.replace(mc, source=str(loadable_folder(mc)), revision=None, mirror=None)


def config_source(mc: ModelConfig) -> tuple[str | None, str | None, str | None]:
    """(source, gguf_file, revision) to read ``mc``'s config from without loading weights: this node's
    copy of a mirrored model when it has one (after :func:`prepare`), else ``mc``'s own (a dry run reads
    the Hub's config.json and copies no weights)."""
    if mc.mirror is not None and (local_copy(mc) / MANIFEST).is_file():
        return str(local_copy(mc)), mc.gguf_file, None
    return mc.source, mc.gguf_file, mc.revision


def prepare(cfg: SweepConfig, trials: Iterable[TrialConfig]) -> None:
    """Before any work: every store under a URI is writable, and every mirrored model is in its mirror
    (filled from the Hub by this process, the driver, when it is not)."""
    trials = list(trials)
    for field, uri in store_fields(cfg, trials):
        bucket(uri).check_writable(field)
    seen: set[tuple[str | None, str | None, str]] = set()
    for t in trials:
        mc = t.model
        if mc.mirror is not None and (mc.source, mc.revision, mc.mirror) not in seen:
            seen.add((mc.source, mc.revision, mc.mirror))
            fill(mc)


__all__ = [
    "CACHE_ENV",
    "Bucket",
    "MirrorError",
    "bucket",
    "config_source",
    "fill",
    "loadable",
    "prepare",
    "store_location",
]
