"""The job log writer: group commit of job records on a thread of its own.

The control plane hands records to :meth:`JobLog.append` with an optional
callback; the writer thread takes everything queued (up to ``max_batch``),
writes it in ONE store transaction, and then runs the callbacks on the
control plane's loop. In ``sync`` durability a callback therefore runs only
once its record is on disk: ACCEPTED goes out after that, never before. Many
jobs share one transaction, so durability costs one fsync per batch, not one
per job. In ``batch`` mode the writer also flushes the store every
``flush_ms``; in ``none`` it never does.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from ._core.handoff import RecordQueue, run_callbacks, split_batch
from .errors import ErrorCode, StorageError
from .storage.base import JobRecord, JobStore

log = logging.getLogger("orbitmesh.joblog")

Callback = Callable[[BaseException | None], None]
# A queued item: (job id, the store's prepared snapshot, callback). Job id 0 is a barrier; a
# snapshot of None deletes the job.
_Item = tuple[int, Any, "Callback | None"]
_WAKE: Any = (0, None, None)  # put by stop(): wakes the writer, writes nothing


class JobLog:
    """Group-committing writer in front of a :class:`JobStore`."""

    def __init__(
        self,
        store: JobStore,
        loop: asyncio.AbstractEventLoop,
        *,
        max_batch: int = 2048,
        flush_ms: int = 5,
    ) -> None:
        self.store = store
        self._loop = loop
        self._max_batch = max_batch
        self._flush_s = flush_ms / 1000
        # Not a list under a lock: put() is one C call that never blocks, so the control plane
        # never waits on a lock the writer holds while the writer waits for the GIL; and the
        # writer takes a batch in one call (_core/handoff).
        self._queue = RecordQueue()
        self._stopping = False
        self._down: BaseException | None = None
        # ``append_prepared`` as one C call, for the common-path job table: False when the log is
        # down (nothing queued; the caller then hands ``done`` to ``refuse``).
        self.offer: Callable[[_Item], bool] = self._queue.offer
        self._thread = threading.Thread(target=self._run, name="orbitmesh-joblog", daemon=True)
        self.batches = 0
        self.records = 0
        self.refused = 0  # appends refused because the log is down

    def start(self) -> None:
        self._thread.start()

    @property
    def _failed(self) -> BaseException | None:
        """Why the log is down (a flush failed: no later write can be trusted), or None."""
        return self._down

    @_failed.setter
    def _failed(self, exc: BaseException | None) -> None:
        self._down = exc
        self._queue.down = exc is not None

    def append(self, record: JobRecord, done: Callback | None = None) -> None:
        """Queue ``record`` (a snapshot is taken now); ``done(error)`` runs on the loop once it is
        written (durably, in ``sync`` mode), with the StorageError if the write failed.

        Never raises: a record that cannot be written (the log is down since a flush failed, or
        no store may hold it) is not queued, and ``done`` hears why on the next turn of the loop,
        as it would of a failed write."""
        if self._down is not None:
            self.refuse(done)
            return
        try:
            snapshot = self.store.prepare(record)
        except (ValueError, TypeError) as exc:  # a record no store may hold: refused, not queued
            error = StorageError(f"job {record.id} cannot be logged: {exc}")
            log.error("%s", error)
            if done is not None:
                self._loop.call_soon(done, error)
            return
        if not self._queue.offer((record.id, snapshot, done)):
            self.refuse(done)

    def append_prepared(self, job_id: int, snapshot: Any, done: Callback | None = None) -> None:
        """``append`` for a record the store has already prepared (``JobStore.prepare_encoded``:
        the common-path job table's records). Never raises, as ``append``."""
        if not self._queue.offer((job_id, snapshot, done)):
            self.refuse(done)

    def refuse(self, done: Callback | None) -> None:
        """A record not queued because the log is down: ``done`` hears why on the next turn."""
        self.refused += 1
        if done is not None:
            error = StorageError(f"job log is down: {self._down}", code=ErrorCode.STORAGE_ERROR)
            self._loop.call_soon(done, error)

    def barrier(self, done: Callback) -> None:
        """Run ``done`` on the loop once everything queued before it is written
        (read-your-writes for queries that go to the store)."""
        self._queue.put((0, None, done))

    def delete(self, job_ids: list[int]) -> None:
        """Queue deletions (retention)."""
        put = self._queue.put
        for job_id in job_ids:
            put((job_id, None, None))

    def stop(self, timeout: float = 10.0) -> None:
        """Write what is queued, flush, and stop the thread."""
        self._stopping = True
        self._queue.put(_WAKE)
        if self._thread.is_alive():
            self._thread.join(timeout)
        if self._thread.is_alive():
            log.error("job log writer did not stop within %.1f s", timeout)

    @property
    def pending(self) -> int:
        return len(self._queue)

    def _run(self) -> None:
        batch_mode = self.store.durability == "batch"
        next_flush = time.monotonic() + self._flush_s
        dirty = False
        take, most = self._queue.take, self._max_batch
        while True:
            if self._stopping:
                timeout: float | None = 0.0
            else:
                timeout = max(0.0, next_flush - time.monotonic()) if batch_mode and dirty else None
            batch = take(most, timeout)  # what is queued, up to a batch; waits without the GIL
            batch = [item for item in batch if item is not _WAKE] if self._stopping else batch
            stop = self._stopping and not len(self._queue)
            if batch:
                self._write(batch)
                dirty = True
            if batch_mode and dirty and (stop or time.monotonic() >= next_flush):
                self._flush()
                dirty = False
                next_flush = time.monotonic() + self._flush_s
            if stop:
                return

    def _write(self, batch: list[_Item]) -> None:
        # Each job's latest snapshot (a later one supersedes), the deletes, every callback.
        items, deletes, callbacks = split_batch(batch)
        error: BaseException | None = None
        try:
            self.store.write_prepared(items, deletes)
            self.batches += 1
            self.records += len(items)
        except BaseException as exc:  # reported to every waiter, never swallowed
            log.error("job log write of %d records failed: %s", len(items), exc)
            error = exc if isinstance(exc, StorageError) else StorageError(str(exc))
        if callbacks:
            try:
                self._loop.call_soon_threadsafe(run_callbacks, callbacks, error)
            except RuntimeError:
                pass  # the loop is closed: nobody is waiting any more

    def _flush(self) -> None:
        try:
            self.store.flush()
        except BaseException as exc:
            self._failed = exc  # down: appends refused from now on
            log.error("job log flush failed: %s", exc)


__all__ = ["JobLog"]
