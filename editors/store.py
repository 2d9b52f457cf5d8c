"""Content-keyed files: the project's one atomic writer and one store for every cache.

Every cache of the project (second moments here in ``editors``; target values and pre-edit scores in
``sweep``) is a :class:`Store`: a folder of files named by the sha256 of a frozen key dataclass, whose
metadata holds the key's full canonical JSON, so a file of another key (a hash collision, a file copied
by hand, a format change) is a miss, never a wrong answer. Payloads are safetensors (tensors) or JSON,
never pickles. Every write goes through :func:`atomic_write`: a temp file in the target's folder, then
``os.replace``, so a reader sees the old file or the new one, never a torn one, and a process killed
mid-write leaves at most a hidden ``.*.tmp`` file, which readers never open.

An entry can hold several *parts* (``<digest>/<part>.<ext>``): a store of per-fact results written
chunk by chunk as the work finishes, so that a killed run keeps every chunk it finished. Processes that
share a store (two sweeps at once) :func:`claim` an entry before computing it, so only one computes it
and the other waits and reads it. A claim is an ``flock`` on a lock file next to the entry: the kernel
releases it when its holder exits, however it exits, so a dead holder's entry is taken over at once.

A store can have a :class:`Remote`: a second home of its entries (a prefix on cloud storage, given by
``sweep``). A miss in the folder is looked up there and copied into the folder; every entry written is
copied there after its local write. Entries are content-keyed and never rewritten, so the folder is a
cache of the remote that needs no invalidation.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

log = logging.getLogger(__name__)

_WARNED: set[str] = set()


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temp file next to ``path``, then rename it onto ``path``.

    Raises whatever ``write`` raises, after removing the temp file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide caches and reports from other users
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def write_json_atomic(path: str | os.PathLike, data: Any, indent: int | None = 1) -> Path:
    """JSON (``default=str`` for paths and numpy scalars) written through :func:`atomic_write`."""
    return write_text_atomic(path, json.dumps(data, indent=indent, default=str))


@contextlib.contextmanager
def claim(path: str | os.PathLike, done: Callable[[], bool], poll_s: float = 1.0) -> Iterator[bool]:
    """A lock on computing the entry at ``path`` among the processes that share a store.

    Yields True when this process holds it (compute and store; released on exit, also on an exception),
    or False once ``done()`` says another process has stored the entry (read it), also when it is found
    stored right after the lock is taken. The lock is an exclusive ``flock`` on ``<path>.lock``, polled
    every ``poll_s`` seconds while another process holds it. The kernel drops it when its holder's
    descriptor closes, however the process ends (an exception, SIGKILL, a crash), so a dead holder's
    entry is taken over at once, with no lease to renew or expire. Threads of one process exclude each
    other too (each claim opens its own descriptor). The lock file stays: removing it could let a
    waiter lock a name no longer in the folder while a newcomer locks a new file of the same name. It
    holds the last holder's host and pid, for a person looking at the folder.

    The stores are folders on the disk of the process that fulfils (the driver, on a cluster's head).
    On NFS, Linux maps ``flock`` to the server's byte-range locks, released when a dead client's lease
    with the server runs out.
    Raises OSError when the folder is not writable.
    """
    import fcntl
    import socket
    import time

    lock = Path(f"{path}.lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    waited = False
    while True:
        fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            if done():
                yield False
                return
            if not waited:
                log.info("another process is computing %s; waiting for it", path)
                waited = True
            time.sleep(poll_s)
            continue
        except BaseException:
            os.close(fd)
            raise
        break
    try:
        if done():  # stored by the holder this process waited for, just before it let go
            yield False
            return
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid()}).encode(), 0)
        yield True
    finally:
        os.close(fd)  # the lock goes with the descriptor


def key_json(key: Any) -> str:
    """Canonical JSON of a dataclass key (sorted keys, no spaces)."""
    return json.dumps(dataclasses.asdict(key), sort_keys=True, separators=(",", ":"), default=str)


def key_digest(key: Any, n: int = 24) -> str:
    """First ``n`` hex digits of the sha256 of :func:`key_json`."""
    return hashlib.sha256(key_json(key).encode()).hexdigest()[:n]


def _warn_once(path: Path, why: str) -> None:
    if str(path) not in _WARNED:
        _WARNED.add(str(path))
        log.warning("cache file %s %s; ignoring it (it will be recomputed)", path, why)


class Remote(Protocol):
    """A second home of a store's entries, each named by its path under the store's folder ("/"-separated)."""

    def exists(self, name: str) -> bool:
        """Whether the remote holds entry ``name`` (nothing is copied)."""
        ...

    def fetch(self, name: str, dest: Path) -> bool:
        """Copy entry ``name`` to ``dest`` (atomically); False when the remote has none."""
        ...

    def publish(self, name: str, src: Path) -> None:
        """Copy the local file ``src`` to entry ``name`` (readers see all of it or nothing)."""
        ...

    def names(self, folder: str) -> list[str]:
        """The file names in ``folder`` (an entry's parts); empty when there is none."""
        ...


class Store:
    """A folder of content-keyed entries; ``fmt`` names the payload format and is checked on read.

    Args:
        root: the folder (created on the first write).
        fmt: a format tag such as ``"editors.stats.v2"``; files of another tag are misses.
        remote: where the entries are also kept (a miss here is looked up there; writes go to both).
    """

    def __init__(self, root: str | os.PathLike, fmt: str, remote: Remote | None = None) -> None:
        self.root = Path(root)
        self.fmt = fmt
        self.remote = remote

    def _name(self, path: Path) -> str:
        """The remote's name of the folder's ``path``."""
        return path.relative_to(self.root).as_posix()

    def _here(self, path: Path) -> bool:
        """Whether ``path`` is a file in the folder, copied from the remote on a local miss."""
        if path.is_file():
            return True
        return self.remote is not None and self.remote.fetch(self._name(path), path)

    def _written(self, path: Path) -> Path:
        """``path``, just written, copied to the remote. A remote that fails is a warning: the entry stays
        in the folder only (the remote lacks it until it is written again), and the sweep goes on."""
        if self.remote is not None:
            try:
                self.remote.publish(self._name(path), path)
            except OSError as e:
                log.warning("%s was not copied to the store's remote (%s); it stays in the folder", path, e)
        return path

    def path(self, key: Any, part: str | None = None, ext: str = "safetensors") -> Path:
        digest = key_digest(key)
        return self.root / digest / f"{part}.{ext}" if part is not None else self.root / f"{digest}.{ext}"

    def _meta(self, key: Any, meta: Mapping[str, str] | None) -> dict[str, str]:
        return {"format": self.fmt, "key": key_json(key), **{k: str(v) for k, v in (meta or {}).items()}}

    def _matches(self, meta: Mapping[str, str] | None, key: Any) -> bool:
        if not meta or meta.get("format") != self.fmt:
            return False
        try:
            return json.loads(meta.get("key", "")) == json.loads(key_json(key))
        except json.JSONDecodeError:
            return False

    # -- tensors ---------------------------------------------------------------------------------

    def put_tensors(
        self,
        key: Any,
        tensors: Mapping[str, torch.Tensor],
        meta: Mapping[str, Any] | None = None,
        part: str | None = None,
    ) -> Path:
        """Write ``tensors`` (moved to CPU, made contiguous) with ``meta`` under ``key`` atomically."""
        payload = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        path = atomic_write(self.path(key, part), lambda p: save_file(payload, str(p), metadata=self._meta(key, meta)))
        return self._written(path)

    def get_tensors(self, key: Any, part: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
        """(tensors, metadata) of ``key``, or None when absent, unreadable, truncated or of another key
        (the last three are reported once, as a warning)."""
        path = self.path(key, part)
        return self._read_tensors(path, key) if self._here(path) else None

    def _read_tensors(self, path: Path, key: Any) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = dict(f.metadata() or {})
                if not self._matches(meta, key):
                    _warn_once(path, "holds another key or format")
                    return None
                return {k: f.get_tensor(k) for k in f.keys()}, meta
        except (OSError, SafetensorError, ValueError, RuntimeError) as e:
            _warn_once(path, f"is unreadable ({e})")
            return None

    def metadata(self, key: Any, part: str | None = None) -> dict[str, str] | None:
        """The metadata of ``key``'s entry from its file header alone (no tensor read), or None when
        absent, unreadable or of another key."""
        path = self.path(key, part)
        if not self._here(path):
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = dict(f.metadata() or {})
        except (OSError, SafetensorError, ValueError, RuntimeError):
            return None
        return meta if self._matches(meta, key) else None

    def has(self, key: Any, part: str | None = None) -> bool:
        """Whether a readable entry of ``key`` exists (reads the header only). An entry only the remote
        holds counts by its content-keyed name and is not copied (a plan, or a dry run, copies nothing;
        the read that needs it copies it and checks its key)."""
        path = self.path(key, part)
        if not path.is_file():
            return self.remote is not None and self.remote.exists(self._name(path))
        try:
            with safe_open(str(path), framework="pt") as f:
                return self._matches(f.metadata(), key)
        except (OSError, SafetensorError, ValueError, RuntimeError):
            return False

    # -- JSON --------------------------------------------------------------------------------------

    def put_json(self, key: Any, data: Any, part: str | None = None) -> Path:
        doc = {"format": self.fmt, "key": json.loads(key_json(key)), "data": data}
        return self._written(write_json_atomic(self.path(key, part, "json"), doc, indent=None))

    def get_json(self, key: Any, part: str | None = None) -> Any | None:
        path = self.path(key, part, "json")
        return self._read_json(path, key) if self._here(path) else None

    def _read_json(self, path: Path, key: Any) -> Any | None:
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            _warn_once(path, f"is unreadable ({e})")
            return None
        if not isinstance(doc, dict) or doc.get("format") != self.fmt or doc.get("key") != json.loads(key_json(key)):
            _warn_once(path, "holds another key or format")
            return None
        return doc.get("data")

    # -- parts -------------------------------------------------------------------------------------

    def iter_parts(self, key: Any, ext: str = "safetensors") -> Iterator[Any]:
        """Every readable part of ``key``: ``(tensors, meta)`` for safetensors, the data for JSON."""
        folder = self.root / key_digest(key)
        if self.remote is not None:  # the parts the remote holds and the folder lacks
            for name in self.remote.names(folder.name):
                if name.endswith(f".{ext}") and not name.startswith("."):
                    self._here(folder / name)
        if not folder.is_dir():
            return
        for path in sorted(folder.glob(f"[!.]*.{ext}")):
            got = self._read_tensors(path, key) if ext == "safetensors" else self._read_json(path, key)
            if got is not None:
                yield got


def part_name(items: list[str]) -> str:
    """A part's file name from the fact digests it holds (the same chunk always lands in one file)."""
    return hashlib.sha256("\n".join(items).encode()).hexdigest()[:16]


__all__ = [
    "Remote",
    "Store",
    "atomic_write",
    "key_digest",
    "key_json",
    "part_name",
    "write_json_atomic",
    "write_text_atomic",
]
