"""The job log's hand-off between the control plane and its writer thread, compiled (see
``_handoff_py.py`` for the behaviour).

What compiling buys: the writer takes a whole batch with one call and splits it with one more,
where ``queue.SimpleQueue`` cost it a Python-level ``get`` per record; and every step it makes
with the GIL held is C, so the control plane waits less for the GIL.
"""

from cpython.dict cimport PyDict_Next
from cpython.pythread cimport (
    PyThread_allocate_lock,
    PyThread_free_lock,
    PyThread_release_lock,
    PyThread_type_lock,
    PyLockStatus,
)
from cpython.ref cimport PyObject

import logging

public_api = ["RecordQueue", "merge", "run_callbacks", "split_batch"]

log = logging.getLogger("orbitmesh.joblog")

cdef extern from "pythread.h":
    PyLockStatus PyThread_acquire_lock_timed(PyThread_type_lock lock, long long microseconds, int intr_flag) nogil
    int PyThread_acquire_lock(PyThread_type_lock lock, int mode) nogil


cdef class RecordQueue:
    """A queue of job-log items: ``put`` from any thread, ``take`` by the one writer.

    Every change to its list is made with the GIL held, so it needs no lock of its own; the
    writer, with nothing to take, waits on ``_wake`` without the GIL, and the ``put`` that finds
    it waiting releases it (``_wake`` is a binary semaphore, held while nobody is to be woken)."""

    cdef list _items
    cdef bint _waiting
    cdef PyThread_type_lock _wake
    cdef public bint down

    def __cinit__(self):
        self._items = []
        self._wake = PyThread_allocate_lock()
        if self._wake == NULL:
            raise MemoryError("could not allocate the job log queue's lock")
        PyThread_acquire_lock(self._wake, 1)

    def __dealloc__(self):
        if self._wake != NULL:
            PyThread_free_lock(self._wake)

    cdef int _push(self, item) except -1:
        """Queue ``item``, and wake the writer if it waits."""
        self._items.append(item)
        if self._waiting:
            self._waiting = False
            PyThread_release_lock(self._wake)
        return 0

    def put(self, item):
        """Queue ``item``, down or not (a barrier, a delete, a wake-up)."""
        self._push(item)

    def offer(self, item):
        """Queue ``item`` unless the queue is ``down``: True if queued, else False."""
        if self.down:
            return False
        self._push(item)
        return True

    def take(self, Py_ssize_t most, timeout=None):
        """Up to ``most`` items, oldest first. With none queued, waits for one for at most
        ``timeout`` seconds (None: for as long as it takes; 0: not at all); [] if none came."""
        cdef long long us = -1
        cdef list items
        if most < 1:
            raise ValueError(f"most must be at least 1, not {most}")
        if timeout is not None:
            us = <long long>(max(0.0, min(float(timeout), 86400.0)) * 1e6)
        while not self._items and us != 0:
            self._waiting = True
            with nogil:
                PyThread_acquire_lock_timed(self._wake, us, 0)
            # Woken by a put (which cleared _waiting), or timed out. A put that came between the
            # timeout and this line left _wake released: the next wait returns at once, finding
            # what it queued (or nothing: then waits again, or returns [] if it had a timeout).
            self._waiting = False
            if us >= 0:
                break
        items = self._items
        if len(items) <= most:
            self._items = []
            return items
        self._items = items[most:]
        return items[:most]

    def __len__(self):
        return len(self._items)


def split_batch(list batch):
    """``(snapshots, deletes, callbacks)`` of ``batch`` (see ``_handoff_py.split_batch``)."""
    cdef dict latest = {}
    cdef list deletes = [], callbacks = []
    cdef tuple item
    for entry in batch:
        item = <tuple?>entry
        job_id, snapshot, done = item
        if snapshot is not None:
            latest[job_id] = snapshot
        elif job_id:
            latest.pop(job_id, None)
            deletes.append(job_id)
        if done is not None:
            callbacks.append(done)
    return list(latest.values()), deletes, callbacks


def merge(dict target, dict updates):
    """``target`` updated from ``updates``: a value set, or its key removed where it is None."""
    cdef Py_ssize_t pos = 0
    cdef PyObject* key
    cdef PyObject* value
    while PyDict_Next(updates, &pos, &key, &value):
        if <object>value is None:
            target.pop(<object>key, None)
        else:
            target[<object>key] = <object>value


def run_callbacks(list callbacks, error):
    """Call each of ``callbacks`` with ``error`` (None: written), in order; one that raises is
    logged, and the others still run."""
    for done in callbacks:
        try:
            done(error)
        except Exception:
            log.exception("job log callback failed")
