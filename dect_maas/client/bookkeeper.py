"""The client's bookkeeping thread: its requests' cache writes and ledger transactions, in order.

One thread per client, so writes queue instead of contending for SQLite's write locks (whose busy
handler sleeps) and for the GIL. Commits (answers to store and settle) that pile up while the
thread waits for the GIL or the disk are written together, one batch per call of ``write``: a
thread that falls behind catches up in fewer, larger transactions instead of holding up requests.

Futures are plain ``concurrent.futures.Future``: the client checks ``done()`` before awaiting, so
work that finished while a request was in flight costs no event-loop wake-up.
"""

from __future__ import annotations

import atexit
import queue
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

__all__ = ["Bookkeeper"]

C = TypeVar("C")
R = TypeVar("R")
T = TypeVar("T")

MAX_BATCH = 256  # commits per write: bounds one transaction's size and time


@dataclass(frozen=True)
class _Job:
    future: Future[Any]
    call: Callable[[], Any] | None = None  # a plain call, or
    item: Any = None  # a commit, batched with the commits queued right behind it


_live: weakref.WeakSet[Bookkeeper[Any, Any]] = weakref.WeakSet()


@atexit.register
def _finish_all() -> None:
    """At exit, write what is queued: those answers were paid for."""
    for keeper in list(_live):
        keeper.close()


class Bookkeeper(Generic[C, R]):
    """A thread that runs calls and writes commits in submission order.

    ``write(items)`` writes a batch of commits and returns one result per item; if it raises,
    every commit of the batch gets the exception. ``orphan(result)`` receives the result of a
    commit whose future was cancelled (the write happened all the same).
    """

    def __init__(
        self,
        write: Callable[[list[C]], list[R]],
        orphan: Callable[[R], None],
        name: str = "dect-maas-bookkeeping",
    ) -> None:
        self._write, self._orphan = write, orphan
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._lock = threading.Lock()
        self._closed = False
        self._thread.start()
        _live.add(self)

    def submit(self, call: Callable[[], T]) -> Future[T]:
        future: Future[T] = Future()
        self._put(_Job(future, call=call))
        return future

    def commit(self, item: C) -> Future[R]:
        future: Future[R] = Future()
        self._put(_Job(future, item=item))
        return future

    def close(self) -> None:
        """Finish everything queued, then stop the thread."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(None)
        if threading.current_thread() is not self._thread:
            self._thread.join()

    def _put(self, job: _Job) -> None:
        with self._lock:
            if self._closed:
                raise RuntimeError("the bookkeeping thread is closed")
            self._queue.put(job)

    def _run(self) -> None:
        held: _Job | None = None  # a call taken while gathering a batch: it runs next
        while True:
            job = held if held is not None else self._queue.get()
            held = None
            if job is None:
                return
            if job.call is not None:
                if job.future.set_running_or_notify_cancel():
                    try:
                        job.future.set_result(job.call())
                    except BaseException as exc:
                        job.future.set_exception(exc)
                continue
            batch, stop = [job], False
            while len(batch) < MAX_BATCH:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                if nxt.call is not None:
                    held = nxt
                    break
                batch.append(nxt)
            self._write_batch(batch)
            if stop:
                return

    def _write_batch(self, batch: list[_Job]) -> None:
        live = [j.future.set_running_or_notify_cancel() for j in batch]
        try:
            results = self._write([j.item for j in batch])
        except BaseException as exc:
            for j, running in zip(batch, live, strict=True):
                if running:
                    j.future.set_exception(exc)
            return
        for j, running, result in zip(batch, live, results, strict=True):
            if running:
                j.future.set_result(result)
            else:
                self._orphan(result)
