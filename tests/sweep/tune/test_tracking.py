"""The MLflow callback's writer: every call off Tune's loop, in order, curve points merged."""

from __future__ import annotations

import threading

from sweep.tune.tracking import Writer


def test_the_writer_keeps_the_order_and_merges_what_queued_together():
    """While the writer is busy, queued curve jobs wait; it then runs them as one call on their list, in
    submission order, and a plain job between two groups splits them (a run's end after its curves)."""
    w = Writer()
    gate = threading.Event()
    calls: list = []
    w.submit(lambda: (gate.wait(10), calls.append(("first",))))

    def curves(items):
        calls.append(("curves", [i[0] for i in items]))

    for i in range(3):
        w.submit_many(curves, f"a{i}")
    w.submit(lambda: calls.append(("end",)))
    for i in range(2):
        w.submit_many(curves, f"b{i}")
    gate.set()
    w.flush()
    assert calls == [("first",), ("curves", ["a0", "a1", "a2"]), ("end",), ("curves", ["b0", "b1"])]


def test_a_failing_job_does_not_stop_the_writer(caplog):
    w = Writer()
    done: list[int] = []
    w.submit(lambda: 1 / 0)
    w.submit(lambda: done.append(1))
    w.flush()
    assert done == [1] and "failed" in caplog.text
