"""Claims as leases (editors.store.claim): renewed while held, taken over once not renewed for lease_s
whatever host holds them, at once when their holder's pid is dead on this host, and by one waiter only."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import socket
import threading
import time
from pathlib import Path

import pytest

from editors.store import claim

DEAD_PID = 2**22 + 7  # above Linux's PID_MAX_LIMIT: never a live process
FAST = {"poll_s": 0.02, "lease_s": 0.6, "renew_s": 0.1}

# fork: the children start in milliseconds (spawn would import torch again in each)
ctx = mp.get_context("fork")


pytestmark = pytest.mark.integration  # claims taken by several processes


def _foreign(lock: Path, t: float, host: str = "other-host", pid: int = 4242) -> None:
    lock.write_text(json.dumps({"host": host, "pid": pid, "time": t}))


def _held_by_me(lock: Path) -> bool:
    info = json.loads(lock.read_text())
    return info["host"] == socket.gethostname() and info["pid"] == os.getpid()


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


def test_a_claim_of_another_host_is_taken_over_after_the_lease_and_not_before(tmp_path):
    lock = tmp_path / "e.lock"
    # an old time by a dead process on another host: taken over after lease_s of not changing, not before
    _foreign(lock, t=0.0)
    t0 = time.monotonic()
    with claim(tmp_path / "e", _never(), **FAST) as held:
        waited = time.monotonic() - t0
        assert held and _held_by_me(lock)
    assert FAST["lease_s"] * 0.95 <= waited < FAST["lease_s"] + 1.5
    assert not lock.exists()

    # a fresh claim of another host blocks while younger than the lease: done() ends the wait
    _foreign(lock, t=time.time())
    with claim(tmp_path / "e", _after(0.6), **FAST) as held:
        assert not held
    assert json.loads(lock.read_text())["host"] == "other-host"

    # one renewed by its holder on another host blocks for as long as it is renewed
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(FAST["renew_s"]):
            _foreign(lock, t=time.time())

    renewer = threading.Thread(target=renew, daemon=True)
    renewer.start()
    try:
        with claim(tmp_path / "e", _after(2 * FAST["lease_s"]), **FAST) as held:
            assert not held
        assert json.loads(lock.read_text())["host"] == "other-host"
    finally:
        stop.set()
        renewer.join()


def _hold(entry: str, out: str, seconds: float) -> None:
    with claim(entry, _never(), **FAST) as held:
        assert held
        Path(out, "start").write_text(str(time.time()))
        time.sleep(seconds)
        Path(out, "result").write_text("x")  # the entry, stored
        mine = json.loads(Path(f"{entry}.lock").read_text())["pid"] == os.getpid()
        Path(out, "end").write_text(json.dumps({"still_mine": mine}))


def test_a_live_holder_renews_its_claim_so_a_waiter_waits_for_it(tmp_path):
    entry, out = tmp_path / "e", tmp_path / "out"
    out.mkdir()
    holder = ctx.Process(target=_hold, args=(str(entry), str(out), 3.0 * FAST["lease_s"]))
    holder.start()
    try:
        deadline = time.monotonic() + 10
        while not (out / "start").exists():
            assert time.monotonic() < deadline and holder.is_alive(), "the holder never took its claim"
            time.sleep(0.01)
        t0 = time.monotonic()
        with claim(entry, (out / "result").exists, **FAST):
            # only once the holder has stored the entry (done) or left its block, never by taking over
            assert (out / "result").exists(), "the waiter took over a claim that was being renewed"
        assert time.monotonic() - t0 > 2 * FAST["lease_s"]
        holder.join(10)
        assert holder.exitcode == 0
        assert json.loads((out / "end").read_text())["still_mine"]
    finally:
        if holder.is_alive():
            holder.kill()


def test_a_claim_whose_holder_is_dead_on_this_host_is_taken_over_at_once(tmp_path):
    lock = tmp_path / "e.lock"
    _foreign(lock, t=time.time(), host=socket.gethostname(), pid=DEAD_PID)
    t0 = time.monotonic()
    with claim(tmp_path / "e", _never(), poll_s=0.02, lease_s=60.0, renew_s=10.0) as held:
        assert held and _held_by_me(lock)
    assert time.monotonic() - t0 < 1.0
    # a live pid on this host is not dead: it waits out the lease
    _foreign(lock, t=time.time(), host=socket.gethostname(), pid=os.getppid())
    with claim(tmp_path / "e", _after(0.5 * FAST["lease_s"]), **FAST) as held:
        assert not held
    assert json.loads(lock.read_text())["pid"] == os.getppid()


def _die_holding(entry: str) -> None:
    """Take a claim as a process of another host, and die holding it."""
    socket.gethostname = lambda: "other-host"
    with claim(entry, _never(), **FAST) as held:
        assert held
        os._exit(0)


def _wait_and_hold(entry: str, holders: str, out: str, go: float, lag: float) -> None:
    import editors.store as store

    # every waiter judges the lease stale at go + lease_s (± a poll), then acts on it `lag` s after the
    # first one did: the window in which another waiter took it over first and a naive one would remove
    # the new holder's lease
    lease_s = 0.4
    take_over = store._take_over
    act = go + lease_s + 0.1 + lag
    store._take_over = lambda *a, **k: (time.sleep(max(0.0, act - time.time())), take_over(*a, **k))[1]
    time.sleep(max(0.0, go - time.time()))
    with claim(entry, _never(), poll_s=0.005, lease_s=lease_s, renew_s=0.05) as held:
        assert held
        me = Path(holders, str(os.getpid()))
        me.write_text("")
        most = len(os.listdir(holders))
        time.sleep(0.1)
        most = max(most, len(os.listdir(holders)))
        me.unlink()
    Path(out, str(os.getpid())).write_text(str(most))


def test_waiters_on_one_stale_claim_hold_it_one_at_a_time(tmp_path):
    n = 6
    entry, holders, out = tmp_path / "e", tmp_path / "holders", tmp_path / "out"
    holders.mkdir()
    out.mkdir()
    dead = ctx.Process(target=_die_holding, args=(str(entry),))  # its lease: stale for all of them at once
    dead.start()
    dead.join(10)
    assert dead.exitcode == 0 and Path(f"{entry}.lock").exists()
    go = time.time() + 0.3
    procs = [
        ctx.Process(target=_wait_and_hold, args=(str(entry), str(holders), str(out), go, 0.01 * i)) for i in range(n)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
        if p.is_alive():
            p.kill()
    assert [p.exitcode for p in procs] == [0] * n
    most = [int(f.read_text()) for f in out.iterdir()]
    assert len(most) == n and max(most) == 1, f"holders at once: {most}"
    assert set(os.listdir(tmp_path)) == {"holders", "out"}  # no lock and no moved-aside lock left behind


def test_a_holder_whose_claim_was_taken_over_leaves_the_new_holders_lock(tmp_path, caplog):
    lock = tmp_path / "e.lock"
    with claim(tmp_path / "e", _never(), **FAST) as held:
        assert held
        _foreign(lock, t=time.time())  # as a waiter that judged this holder stale would
        time.sleep(3 * FAST["renew_s"])
        assert json.loads(lock.read_text())["host"] == "other-host"  # renewal did not overwrite it
    assert json.loads(lock.read_text())["host"] == "other-host"  # nor did the release remove it
    assert any("taken over" in r.getMessage() for r in caplog.records)


def test_without_hard_links_a_claim_is_created_with_o_excl(tmp_path, monkeypatch):
    import editors.store as store

    def no_links(*args, **kwargs):
        raise PermissionError(1, "hard links not supported")

    monkeypatch.setattr(store.os, "link", no_links)
    lock = tmp_path / "e.lock"
    _foreign(lock, t=time.time(), host=socket.gethostname(), pid=DEAD_PID)
    with claim(tmp_path / "e", _never(), **FAST) as held:
        assert held and _held_by_me(lock)
        with claim(tmp_path / "e", _after(0.3 * FAST["lease_s"]), **FAST) as again:
            assert not again
        time.sleep(3 * FAST["renew_s"])
        assert _held_by_me(lock)
    assert set(os.listdir(tmp_path)) == set()  # no lock and no temp file left behind


def test_a_waiter_acting_on_an_outdated_judgement_leaves_the_live_lease(tmp_path):
    """What a waiter does when the lease it judged stale is no longer there: it leaves the live one."""
    import editors.store as store

    lock = tmp_path / "e.lock"
    _foreign(lock, t=0.0)
    by_hand = lock.read_bytes()
    lock.unlink()  # taken over by another waiter first: the claim below
    with claim(tmp_path / "e", _never(), **FAST) as held:
        assert held
        ino = lock.stat().st_ino
        store._take_over(lock, by_hand, "a test")  # moves the live lease aside, sees it is another, puts it back
        assert lock.stat().st_ino == ino and _held_by_me(lock)
        read = lock.read_bytes()
        time.sleep(2 * FAST["renew_s"])  # renewed since the waiter read it
        store._take_over(lock, read, "a test")
        assert lock.stat().st_ino == ino and _held_by_me(lock)
        time.sleep(2 * FAST["renew_s"])
        assert lock.read_bytes() != read  # still renewed: the holder never lost it
    assert set(os.listdir(tmp_path)) == set()


def test_a_lease_whose_alias_is_gone_is_taken_over_after_two_leases(tmp_path):
    """A waiter that died between moving a stale lease's alias aside and removing the lease does not
    block the entry for good."""
    entry, lock = tmp_path / "e", tmp_path / "e.lock"
    dead = ctx.Process(target=_die_holding, args=(str(entry),))
    dead.start()
    dead.join(10)
    (alias,) = tmp_path.glob(".*.lease")
    alias.unlink()
    t0 = time.monotonic()
    with claim(entry, _never(), **FAST) as held:
        waited = time.monotonic() - t0
        assert held and _held_by_me(lock)
    assert 2 * FAST["lease_s"] * 0.95 <= waited < 2 * FAST["lease_s"] + 1.5
    assert set(os.listdir(tmp_path)) == set()
