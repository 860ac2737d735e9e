"""The bookkeeping thread: order, batching of commits that queue up, failures, closing.

Reaches inside: the bookkeeping thread is an internal of the client.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future

import pytest

from dect_maas.client.bookkeeper import Bookkeeper


class Recorder:
    """``write`` for a Bookkeeper: remembers each batch, answers ``item * 10``."""

    def __init__(self, fail_on: int | None = None) -> None:
        self.batches: list[list[int]] = []
        self.orphans: list[int] = []
        self.fail_on = fail_on

    def write(self, items: list[int]) -> list[int]:
        self.batches.append(list(items))
        if self.fail_on in items:
            raise OSError(f"disk full while writing {self.fail_on}")
        return [i * 10 for i in items]


def blocked(keeper: Bookkeeper[int, int]) -> tuple[threading.Event, Future[bool]]:
    """Hold the thread in a call until the event is set: work queues up behind it."""
    go = threading.Event()
    return go, keeper.submit(lambda: go.wait(5))


def test_commits_queued_behind_a_busy_thread_are_written_in_one_batch() -> None:
    rec = Recorder()
    keeper: Bookkeeper[int, int] = Bookkeeper(rec.write, rec.orphans.append)
    go, _ = blocked(keeper)
    futures = [keeper.commit(i) for i in range(1, 6)]
    go.set()
    assert [f.result(5) for f in futures] == [10, 20, 30, 40, 50]
    assert rec.batches == [[1, 2, 3, 4, 5]]
    keeper.close()


def test_a_call_keeps_its_place_between_commits() -> None:
    rec = Recorder()
    keeper: Bookkeeper[int, int] = Bookkeeper(rec.write, rec.orphans.append)
    go, _ = blocked(keeper)
    first = [keeper.commit(1), keeper.commit(2)]
    seen = keeper.submit(lambda: [b[:] for b in rec.batches])  # what was written before it
    after = [keeper.commit(3), keeper.commit(4)]
    go.set()
    assert seen.result(5) == [[1, 2]]
    assert [f.result(5) for f in first + after] == [10, 20, 30, 40]
    assert rec.batches == [[1, 2], [3, 4]]
    keeper.close()


def test_a_failed_write_fails_its_whole_batch_and_the_thread_goes_on() -> None:
    rec = Recorder(fail_on=2)
    keeper: Bookkeeper[int, int] = Bookkeeper(rec.write, rec.orphans.append)
    go, _ = blocked(keeper)
    batch = [keeper.commit(1), keeper.commit(2)]
    go.set()
    for f in batch:
        with pytest.raises(OSError, match="disk full while writing 2"):
            f.result(5)
    assert keeper.commit(3).result(5) == 30
    keeper.close()


def test_a_failing_call_reaches_its_caller_only() -> None:
    rec = Recorder()
    keeper: Bookkeeper[int, int] = Bookkeeper(rec.write, rec.orphans.append)
    bad = keeper.submit(lambda: 1 // 0)
    with pytest.raises(ZeroDivisionError):
        bad.result(5)
    assert keeper.commit(7).result(5) == 70
    keeper.close()


def test_close_finishes_what_is_queued_then_refuses_more() -> None:
    rec = Recorder()
    keeper: Bookkeeper[int, int] = Bookkeeper(rec.write, rec.orphans.append)
    go, _ = blocked(keeper)
    futures = [keeper.commit(i) for i in (1, 2, 3)]
    threading.Timer(0.05, go.set).start()
    keeper.close()  # waits for the blocked call and the three commits
    assert all(f.done() for f in futures)
    assert rec.batches == [[1, 2, 3]]
    with pytest.raises(RuntimeError, match="closed"):
        keeper.commit(4)
    keeper.close()  # twice is fine


def test_a_cancelled_commit_is_written_and_its_result_handed_to_orphan() -> None:
    # the answer was paid for: it is stored whether or not anyone waits for the result
    rec = Recorder()
    keeper: Bookkeeper[int, int] = Bookkeeper(rec.write, rec.orphans.append)
    go, _ = blocked(keeper)
    gone, kept = keeper.commit(1), keeper.commit(2)
    assert gone.cancel()
    go.set()
    assert kept.result(5) == 20
    keeper.close()
    assert rec.batches == [[1, 2]]
    assert rec.orphans == [10]
