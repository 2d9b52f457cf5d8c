"""Stores with a remote (editors.store.Remote): a miss in the folder is read from the remote, every entry
written is copied there, an entry's parts are pulled, and a remote that fails to take a write leaves the
entry in the folder with a warning."""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from editors.stats import SecondMoment, StatsKey, StatsStore
from editors.store import Store


@dataclass(frozen=True)
class Key:
    name: str


class FolderRemote:
    """A remote that is another folder, counting what crosses."""

    def __init__(self, root: Path, fail: bool = False) -> None:
        self.root, self.fail = root, fail
        self.fetched: list[str] = []
        self.published: list[str] = []

    def exists(self, name: str) -> bool:
        return (self.root / name).is_file()

    def fetch(self, name: str, dest: Path) -> bool:
        src = self.root / name
        if not src.is_file():
            return False
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest)
        self.fetched.append(name)
        return True

    def publish(self, name: str, src: Path) -> None:
        if self.fail:
            raise OSError("access denied")
        (self.root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, self.root / name)
        self.published.append(name)

    def names(self, folder: str) -> list[str]:
        d = self.root / folder
        return sorted(p.name for p in d.iterdir()) if d.is_dir() else []


def test_an_entry_written_on_one_cluster_is_read_on_another_through_the_remote(tmp_path):
    remote = FolderRemote(tmp_path / "bucket")
    first = Store(tmp_path / "a", "t.v1", remote)
    first.put_tensors(Key("x"), {"w": torch.arange(6.0).reshape(2, 3)}, {"n": 7})
    first.put_json(Key("y"), {"score": 0.5})
    assert len(remote.published) == 2 and not remote.fetched

    second = Store(tmp_path / "b", "t.v1", remote)  # an empty folder: a new cluster's disk
    assert second.has(Key("x")) and not remote.fetched  # counted by its name: a plan copies nothing
    assert second.metadata(Key("x"))["n"] == "7"
    tensors, _ = second.get_tensors(Key("x"))
    assert torch.equal(tensors["w"], torch.arange(6.0).reshape(2, 3))
    assert second.get_json(Key("y")) == {"score": 0.5}
    assert (tmp_path / "b").joinpath(remote.fetched[0]).is_file()  # copied once into the folder ...
    n = len(remote.fetched)
    assert second.get_json(Key("y")) == {"score": 0.5} and len(remote.fetched) == n  # ... and read there after
    assert second.get_tensors(Key("absent")) is None and not second.has(Key("absent"))
    assert Store(tmp_path / "c", "other.v1", remote).get_tensors(Key("x")) is None  # the format still checked


def test_an_entrys_parts_are_pulled_from_the_remote(tmp_path):
    remote = FolderRemote(tmp_path / "bucket")
    first = Store(tmp_path / "a", "t.v1", remote)
    for i in range(3):
        first.put_json(Key("facts"), {"part": i}, part=f"p{i}")
    local = Store(tmp_path / "b", "t.v1", remote)
    local.put_json(Key("facts"), {"part": 0}, part="p0")  # one part already here
    assert sorted(d["part"] for d in local.iter_parts(Key("facts"), ext="json")) == [0, 1, 2]
    assert sorted(name.split("/")[1] for name in remote.fetched) == ["p1.json", "p2.json"]  # the missing ones only


def test_statistics_stored_under_a_remote_are_read_back_bit_identical(tmp_path):
    remote = FolderRemote(tmp_path / "bucket")
    key = StatsKey("dir:m:0", 1, "corpus", None, 100, 0, "float32")
    mom2 = torch.randn(4, 4)
    StatsStore(tmp_path / "a", remote).put(key, SecondMoment(mom2, 100))
    other = StatsStore(tmp_path / "b", remote)
    assert key in other and other.n_tokens(key) == 100
    assert torch.equal(other.get(key).mom2, mom2)


def test_a_remote_that_refuses_a_write_leaves_the_entry_here_with_a_warning(tmp_path, caplog):
    store = Store(tmp_path / "a", "t.v1", FolderRemote(tmp_path / "bucket", fail=True))
    with caplog.at_level(logging.WARNING, logger="editors.store"):
        store.put_json(Key("y"), [1, 2])
    assert store.get_json(Key("y")) == [1, 2]
    assert "not copied to the store's remote (access denied)" in caplog.text
