"""The job log's hand-off between the control plane and its writer thread, pure-Python reference
(``_handoff_c.pyx`` does the same in C: one call per batch on the writer's side, where this
twin's loops run per record).

* ``RecordQueue``: the control plane puts ``(job id, snapshot, callback)`` items, never waiting;
  the writer takes up to a batch of them at once, waiting (without the GIL) while there are none.
  Once ``down`` (the log can no longer write), ``offer`` refuses a record: it returns False and
  queues nothing (``put`` queues regardless: barriers, deletes, the writer's wake-up).
* ``split_batch``: what one batch writes (the latest snapshot of each job, in the order the jobs
  first appear), which jobs it deletes, and the callbacks to run once it is written.
* ``merge``: a dict brought up to date, a None value removing its key.
* ``run_callbacks``: a written batch's callbacks, on the control plane's loop.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

public_api = ["RecordQueue", "merge", "run_callbacks", "split_batch"]

log = logging.getLogger("orbitmesh.joblog")

# A queued item: (job id, snapshot, callback). A snapshot of None deletes the job (id 0: a barrier).
Item = tuple[int, Any, "Callable[[BaseException | None], None] | None"]


class RecordQueue:
    """A queue of job-log items: ``put`` / ``offer`` from any thread, ``take`` by the one writer."""

    def __init__(self) -> None:
        self._items: deque[Any] = deque()
        self._ready = threading.Condition(threading.Lock())
        self.down = False

    def put(self, item: Any) -> None:
        """Queue ``item``, down or not (a barrier, a delete, a wake-up)."""
        with self._ready:
            self._items.append(item)
            self._ready.notify()

    def offer(self, item: Any) -> bool:
        """Queue ``item`` unless the queue is ``down``: True if queued, else False."""
        if self.down:
            return False
        self.put(item)
        return True

    def take(self, most: int, timeout: float | None = None) -> list[Any]:
        """Up to ``most`` items, oldest first. With none queued, waits for one for at most
        ``timeout`` seconds (None: for as long as it takes; 0: not at all); [] if none came."""
        if most < 1:
            raise ValueError(f"most must be at least 1, not {most}")
        with self._ready:
            if not self._items and timeout != 0:
                self._ready.wait_for(lambda: self._items, timeout)
            items = self._items
            return [items.popleft() for _ in range(min(most, len(items)))]

    def __len__(self) -> int:
        return len(self._items)


def split_batch(batch: list[Item]) -> tuple[list[Any], list[int], list[Callable[[BaseException | None], None]]]:
    """``(snapshots, deletes, callbacks)`` of ``batch``: each job's latest snapshot (a later one
    supersedes, a delete drops it), in the order the jobs first appear; the ids to delete; every
    callback, in order (a barrier's too)."""
    latest: dict[int, Any] = {}
    deletes: list[int] = []
    callbacks = []
    for job_id, snapshot, done in batch:
        if snapshot is not None:
            latest[job_id] = snapshot
        elif job_id:
            latest.pop(job_id, None)
            deletes.append(job_id)
        if done is not None:
            callbacks.append(done)
    return list(latest.values()), deletes, callbacks


def merge(target: dict[Any, Any], updates: dict[Any, Any]) -> None:
    """``target`` updated from ``updates``: a value set, or its key removed where it is None."""
    for key, value in updates.items():
        if value is None:
            target.pop(key, None)
        else:
            target[key] = value


def run_callbacks(callbacks: list[Callable[[BaseException | None], None]], error: BaseException | None) -> None:
    """Call each of ``callbacks`` with ``error`` (None: written), in order; one that raises is
    logged, and the others still run."""
    for done in callbacks:
        try:
            done(error)
        except Exception:
            log.exception("job log callback failed")
