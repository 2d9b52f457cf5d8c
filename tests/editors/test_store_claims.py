"""Claims (editors.store.claim): one holder at a time among processes and threads, a live holder waited for,
a dead one's claim taken at once (the kernel drops its flock), and an entry stored meanwhile read, not
computed again."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import socket
import threading
import time
from pathlib import Path

import pytest

from editors.store import claim

POLL = 0.02

# fork: the children start in milliseconds (spawn would import torch again in each)
ctx = mp.get_context("fork")


pytestmark = pytest.mark.integration  # claims taken by several processes


def _after(seconds: float):
    t0 = time.monotonic()
    return lambda: time.monotonic() - t0 > seconds


def _never(within: float = 10.0):
    """A done() that stays False, and fails the test instead of waiting forever for a claim."""
    t0 = time.monotonic()

    def done() -> bool:
        if time.monotonic() - t0 > within:
            raise AssertionError(f"the claim was not taken within {within} s")
        return False

    return done


def _hold(entry: str, out: str, seconds: float, store: bool) -> None:
    with claim(entry, _never(), poll_s=POLL) as held:
        assert held
        Path(out, "start").write_text(str(time.time()))
        time.sleep(seconds)
        if store:
            Path(out, "result").write_text("x")  # the entry, stored
    Path(out, "end").write_text(str(time.time()))


def _started(holder, out: Path) -> None:
    deadline = time.monotonic() + 10
    while not (out / "start").exists():
        assert time.monotonic() < deadline and holder.is_alive(), "the holder never took its claim"
        time.sleep(0.01)


def test_a_live_holder_is_waited_for_and_its_stored_entry_read(tmp_path):
    entry, out = tmp_path / "e", tmp_path / "out"
    out.mkdir()
    holder = ctx.Process(target=_hold, args=(str(entry), str(out), 1.0, True))
    holder.start()
    try:
        _started(holder, out)
        t0 = time.monotonic()
        with claim(entry, (out / "result").exists, poll_s=POLL) as held:
            assert not held  # stored by the holder: read it, never computed twice
            assert (out / "result").exists()
        assert time.monotonic() - t0 > 0.5
        holder.join(10)
        assert holder.exitcode == 0
        info = json.loads(Path(f"{entry}.lock").read_text())  # who held it last, for a person looking
        assert info == {"host": socket.gethostname(), "pid": holder.pid}
    finally:
        if holder.is_alive():
            holder.kill()


def test_a_holder_that_lets_go_without_storing_hands_the_claim_on(tmp_path):
    """A holder that failed (left its block without storing): the waiter takes the claim as soon as it
    lets go, not before."""
    entry, out = tmp_path / "e", tmp_path / "out"
    out.mkdir()
    holder = ctx.Process(target=_hold, args=(str(entry), str(out), 0.6, False))
    holder.start()
    try:
        _started(holder, out)
        with claim(entry, _never(), poll_s=POLL) as held:
            assert held
            got = time.time()
        holder.join(10)
        assert got >= float((out / "end").read_text()) - 0.05  # only once the holder had let go
    finally:
        if holder.is_alive():
            holder.kill()


def _die_holding(entry: str, out: str) -> None:
    with claim(entry, _never(), poll_s=POLL) as held:
        assert held
        Path(out, "start").write_text("")
        time.sleep(60)


def test_a_claim_whose_holder_died_is_taken_at_once(tmp_path):
    """SIGKILL: no finally runs in the holder, yet the kernel drops its lock with its process."""
    entry, out = tmp_path / "e", tmp_path / "out"
    out.mkdir()
    holder = ctx.Process(target=_die_holding, args=(str(entry), str(out)))
    holder.start()
    _started(holder, out)
    with claim(entry, _after(0.3), poll_s=POLL) as held:
        assert not held  # alive: waited for until done() says to stop
    os.kill(holder.pid, signal.SIGKILL)
    holder.join(10)
    t0 = time.monotonic()
    with claim(entry, _never(), poll_s=POLL) as held:
        assert held
    assert time.monotonic() - t0 < 1.0


def _wait_and_hold(entry: str, holders: str, out: str, go: float) -> None:
    time.sleep(max(0.0, go - time.time()))
    with claim(entry, _never(), poll_s=0.005) as held:
        assert held
        me = Path(holders, str(os.getpid()))
        me.write_text("")
        most = len(os.listdir(holders))
        time.sleep(0.1)
        most = max(most, len(os.listdir(holders)))
        me.unlink()
    Path(out, str(os.getpid())).write_text(str(most))


def test_waiters_hold_a_claim_one_at_a_time(tmp_path):
    n = 6
    entry, holders, out = tmp_path / "e", tmp_path / "holders", tmp_path / "out"
    holders.mkdir()
    out.mkdir()
    go = time.time() + 0.3
    procs = [ctx.Process(target=_wait_and_hold, args=(str(entry), str(holders), str(out), go)) for _ in range(n)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
        if p.is_alive():
            p.kill()
    assert [p.exitcode for p in procs] == [0] * n
    most = [int(f.read_text()) for f in out.iterdir()]
    assert len(most) == n and max(most) == 1, f"holders at once: {most}"


def test_threads_of_one_process_exclude_each_other(tmp_path):
    """Each claim opens its own descriptor: two threads of one process (the driver's fulfilment threads)
    never hold one claim at once."""
    entry = tmp_path / "e"
    inside: list[int] = []
    most: list[int] = []

    def work() -> None:
        with claim(entry, _never(), poll_s=0.005) as held:
            assert held
            inside.append(1)
            most.append(len(inside))
            time.sleep(0.05)
            inside.pop()

    threads = [threading.Thread(target=work) for _ in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(most) == 5 and max(most) == 1


def test_an_entry_stored_just_before_the_lock_is_taken_is_read(tmp_path):
    """The holder stores and lets go; a waiter that gets the lock then is told the entry is there."""
    stored = tmp_path / "stored"
    with claim(tmp_path / "e", stored.exists, poll_s=POLL) as held:
        assert held
        stored.write_text("x")
    with claim(tmp_path / "e", stored.exists, poll_s=POLL) as held:
        assert not held
