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
and the other waits and reads it. A claim is a lease that its holder renews every :data:`LEASE_RENEW_S`;
one not renewed for :data:`LEASE_S` (its holder died or was pre-empted, on any host) is taken over.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import logging
import os
import re
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

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


#: a claim whose file a waiter sees unchanged for this long is taken over, whatever host holds it
LEASE_S = 180.0
#: how often the holder of a claim renews it (rewrites its ``time`` field); keep it well under LEASE_S
#: (NFS attribute caching can delay what a waiter on another host sees by up to a minute)
LEASE_RENEW_S = 30.0


@contextlib.contextmanager
def claim(
    path: str | os.PathLike,
    done: Callable[[], bool],
    poll_s: float = 1.0,
    *,
    lease_s: float = LEASE_S,
    renew_s: float = LEASE_RENEW_S,
) -> Iterator[bool]:
    """A lease on computing the entry at ``path`` among processes sharing a store.

    Yields True when this process holds it (compute and store; the lease is released on exit, also on
    an exception), or False once ``done()`` says another process has stored the entry meanwhile (read
    it). The lease is a file ``<path>.lock`` holding the holder's host, pid, a token unique to this
    claim and a ``time``, which a daemon thread rewrites every ``renew_s`` seconds while the block runs.
    It is created whole: the record is written to an alias ``.<name>.lock.<token>.lease`` next to it and
    hard-linked to ``<path>.lock`` (atomic, and fails if that exists, on local and NFS file systems);
    the holder keeps both names. Where hard links are not supported, it is created with ``O_EXCL``, is
    empty for a moment, and has no alias.

    Waiters poll every ``poll_s`` seconds. One takes the lease over when its file has not changed for
    ``lease_s`` seconds of the waiter's own clock (clock skew between hosts does not matter; a waiter
    that arrives at a long-dead lease waits one full ``lease_s``), or at once when its holder's pid is
    dead on this host. Takeover is race-safe between waiters: a waiter first renames the stale lease's
    alias (named by its token) to a name of its own, which only one waiter can do, and removes
    ``<path>.lock`` only if it is still that file with the content judged stale. A lease file without an
    alias (no hard links, written by hand, or its alias gone for ``2 * lease_s`` because a waiter died
    taking it over) is itself renamed aside, removed if it is the content judged stale, else linked
    back; there, a third process creating a lease in the moment before that link can make two holders
    (each logs a warning).

    Renewal rewrites the record in place through the holder's open descriptor, at a fixed length: it
    only touches the holder's own file, so a holder that lost its lease (stalled for ``lease_s``) can
    never overwrite its successor's, and a read torn by a renewal differs only in the digits of
    ``time``, so it is still valid JSON and still reads as a change. A holder that finds the lease file
    no longer its own (another token) logs a warning, stops renewing and leaves the file on exit; the
    entry may then be computed twice, which the atomic writes make harmless.
    Raises ValueError unless ``0 < renew_s < lease_s``, and OSError when the folder is not writable.
    """
    import time

    if not 0 < renew_s < lease_s:
        raise ValueError(f"claim: need 0 < renew_s < lease_s, got renew_s={renew_s}, lease_s={lease_s}")
    lock = Path(f"{path}.lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    me = _Lease(lock)
    seen: bytes | None = None  # the lease file's content as last read, and since when (monotonic)
    seen_since = 0.0
    waited = False
    while True:
        try:
            got = lock.read_bytes()
        except FileNotFoundError:
            if me.create():
                break
            continue
        if done():
            yield False
            return
        if got != seen:
            seen, seen_since = got, time.monotonic()
        age = time.monotonic() - seen_since
        why = _dead_here(got, me.host) or (f"not renewed for {age:.0f} s" if age >= lease_s else None)
        if why is not None and _take_over(lock, got, why, without_alias=age >= 2 * lease_s):
            continue
        if not waited:
            log.info("another process is computing %s; waiting for it", path)
            waited = True
        time.sleep(poll_s)
    stop = threading.Event()
    renewer = threading.Thread(target=me.renew, args=(renew_s, stop), name=f"renew {lock.name}", daemon=True)
    try:
        renewer.start()
        yield True
    finally:
        stop.set()
        if renewer.is_alive():
            renewer.join()
        me.release()


_TOKEN = re.compile(r"[0-9a-f]{32}")


def _record(content: bytes) -> dict[str, Any]:
    """A lease file's record ({} when unreadable: written by hand, or torn)."""
    try:
        info = json.loads(content)
    except ValueError:
        return {}
    return info if isinstance(info, dict) else {}


def _alias(lock: Path, token: str) -> Path:
    return lock.with_name(f".{lock.name}.{token}.lease")


class _Lease:
    """This process's side of a lease on ``lock``: created by :meth:`create`, renewed, released."""

    def __init__(self, lock: Path) -> None:
        import socket
        import uuid

        self.lock, self.host, self.token = lock, socket.gethostname(), uuid.uuid4().hex
        self.alias: Path | None = _alias(lock, self.token)
        self.fd = -1

    def _write(self) -> None:
        """The record at offset 0 and at a fixed length, so that renewals overwrite it in place."""
        import time

        info = {"host": self.host, "pid": os.getpid(), "token": self.token, "alias": self.alias is not None}
        os.lseek(self.fd, 0, os.SEEK_SET)
        os.write(self.fd, f'{json.dumps(info)[:-1]}, "time": {time.time():20.3f}}}'.encode())
        os.fsync(self.fd)  # the descriptor stays open: without this, NFS may not show it to other hosts

    def create(self) -> bool:
        """Whether this process created the lease file (holds the lease); False when another one exists."""
        if self.alias is not None:
            linked = self._link()
            if linked is not None:
                return linked
            self.alias = None  # no hard links on this file system: from now on, O_EXCL
        try:
            self.fd = os.open(self.lock, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
        except FileExistsError:
            return False
        try:
            self._write()  # the file is empty until this returns
        except BaseException:
            os.close(self.fd)
            self.fd = -1
            self.lock.unlink(missing_ok=True)  # created a moment ago: nobody can have taken it over yet
            raise
        return True

    def _link(self) -> bool | None:
        """:meth:`create` by hard-linking the alias, written first; None when hard links are not supported."""
        assert self.alias is not None
        self.fd = os.open(self.alias, os.O_CREAT | os.O_TRUNC | os.O_RDWR, 0o644)
        try:
            self._write()
            os.link(self.alias, self.lock)
            return True
        except FileExistsError:
            # NFSv2/3 can answer EEXIST to a retried link that had succeeded: the link count tells
            if os.fstat(self.fd).st_nlink == 2:
                return True
            self._close()
            return False
        except OSError as e:
            self._close()
            if e.errno in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.ENOSYS):
                return None
            raise
        except BaseException:
            self._close()
            raise

    def _close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.alias is not None:
            self.alias.unlink(missing_ok=True)

    def _mine(self) -> bool:
        return _record(self.lock.read_bytes()).get("token") == self.token

    def renew(self, renew_s: float, stop: threading.Event) -> None:
        while not stop.wait(renew_s):
            try:
                mine = self._mine()
            except FileNotFoundError:
                mine = False
            except OSError as e:
                log.warning("could not read the claim %s to renew it (%s); trying again", self.lock, e)
                continue
            if not mine:
                log.warning(
                    "the claim %s was taken over by another process (this one did not renew it for a lease); "
                    "both may compute the entry",
                    self.lock,
                )
                return
            try:
                self._write()
            except OSError as e:
                log.warning("could not renew the claim %s (%s); trying again", self.lock, e)

    def release(self) -> None:
        try:
            mine = self._mine()
        except FileNotFoundError:
            mine = False
        if mine:
            self.lock.unlink(missing_ok=True)
        else:
            log.warning("the claim %s is no longer this process's (taken over); leaving it to its holder", self.lock)
        self._close()


def _dead_here(content: bytes, host: str) -> str | None:
    """Why the lease recorded in ``content`` is dead at once (its holder's pid is gone on this host), or None."""
    info = _record(content)
    if info.get("host") != host:
        return None
    try:
        os.kill(int(info["pid"]), 0)
    except ProcessLookupError:
        return f"its holder (pid {info['pid']}) is dead"
    except (KeyError, TypeError, ValueError, OSError):  # no pid, or another user's live process
        return None
    return None


def _take_over(lock: Path, stale: bytes, why: str, without_alias: bool = False) -> bool:
    """Remove the lease file ``lock`` if it still holds ``stale``, with no race between waiters (see
    :func:`claim`); whether it did (False: another waiter took it over first, or its holder released or
    renewed it). ``without_alias``: a lease whose alias is gone (a waiter died taking it over) is taken
    over as one that never had an alias."""
    import uuid

    grave = lock.with_name(f".{lock.name}.{uuid.uuid4().hex}.stale")
    info = _record(stale)
    token = info.get("token")
    if info.get("alias") is True and isinstance(token, str) and _TOKEN.fullmatch(token):
        try:
            os.rename(_alias(lock, token), grave)  # one waiter only: the name is gone for the others
        except FileNotFoundError:
            if not without_alias:
                return False  # another waiter took it over first, or its holder released it
        else:
            return _take_over_aliased(lock, stale, why, token, grave)
    # no alias to take first: move the lease file itself aside, then check it was the stale one
    try:
        os.rename(lock, grave)
    except FileNotFoundError:
        return False
    try:
        if grave.read_bytes() == stale:
            log.warning("taking over the claim %s: %s", lock, why)
            return True
        try:  # another waiter took it over first, and this one moved its new lease: put it back
            os.link(grave, lock)  # the same inode, so its holder's renewals still land on it
        except FileExistsError:
            log.warning("claim %s: a lease moved aside could not be put back; two processes may hold it", lock)
        except OSError:  # no hard links on this file system
            if not lock.exists():
                os.replace(grave, lock)
        return False
    finally:
        grave.unlink(missing_ok=True)


def _take_over_aliased(lock: Path, stale: bytes, why: str, token: str, grave: Path) -> bool:
    """:func:`_take_over` once this waiter moved the alias of the lease it judged stale to ``grave``."""
    try:
        try:
            same = os.path.samestat(os.stat(lock), os.stat(grave))
        except FileNotFoundError:
            same = False
        if same and grave.read_bytes() == stale:
            # only the stale lease's holder could still change `lock` (by releasing it) before this
            log.warning("taking over the claim %s: %s", lock, why)
            lock.unlink(missing_ok=True)
            return True
        if same:  # renewed meanwhile: its holder lives; give its alias back
            os.rename(grave, _alias(lock, token))
        return False
    finally:
        grave.unlink(missing_ok=True)


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


class Store:
    """A folder of content-keyed entries; ``fmt`` names the payload format and is checked on read.

    Args:
        root: the folder (created on the first write).
        fmt: a format tag such as ``"editors.stats.v2"``; files of another tag are misses.
    """

    def __init__(self, root: str | os.PathLike, fmt: str) -> None:
        self.root = Path(root)
        self.fmt = fmt

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
        return atomic_write(self.path(key, part), lambda p: save_file(payload, str(p), metadata=self._meta(key, meta)))

    def get_tensors(self, key: Any, part: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
        """(tensors, metadata) of ``key``, or None when absent, unreadable, truncated or of another key
        (the last three are reported once, as a warning)."""
        path = self.path(key, part)
        return self._read_tensors(path, key) if path.is_file() else None

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
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = dict(f.metadata() or {})
        except (OSError, SafetensorError, ValueError, RuntimeError):
            return None
        return meta if self._matches(meta, key) else None

    def has(self, key: Any, part: str | None = None) -> bool:
        """Whether a readable entry of ``key`` exists (reads the header only)."""
        path = self.path(key, part)
        try:
            with safe_open(str(path), framework="pt") as f:
                return self._matches(f.metadata(), key)
        except (OSError, SafetensorError, ValueError, RuntimeError):
            return False

    # -- JSON --------------------------------------------------------------------------------------

    def put_json(self, key: Any, data: Any, part: str | None = None) -> Path:
        doc = {"format": self.fmt, "key": json.loads(key_json(key)), "data": data}
        return write_json_atomic(self.path(key, part, "json"), doc, indent=None)

    def get_json(self, key: Any, part: str | None = None) -> Any | None:
        path = self.path(key, part, "json")
        return self._read_json(path, key) if path.is_file() else None

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
        if not folder.is_dir():
            return
        for path in sorted(folder.glob(f"[!.]*.{ext}")):
            got = self._read_tensors(path, key) if ext == "safetensors" else self._read_json(path, key)
            if got is not None:
                yield got


def part_name(items: list[str]) -> str:
    """A part's file name from the fact digests it holds (the same chunk always lands in one file)."""
    return hashlib.sha256("\n".join(items).encode()).hexdigest()[:16]


__all__ = ["Store", "atomic_write", "key_digest", "key_json", "part_name", "write_json_atomic", "write_text_atomic"]
