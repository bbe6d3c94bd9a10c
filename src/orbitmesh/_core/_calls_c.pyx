"""A client's calls in flight, compiled (see ``_calls_py.py`` for the behaviour).

The entries are a C type (no instance dict, from a free list), the deadlines a binary heap
of C structs (no tuple per call), and ``settle`` reads each reply's header in place.
"""

cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from cpython.dict cimport PyDict_Contains, PyDict_DelItem, PyDict_GetItem, PyDict_SetItem
from cpython.long cimport PyLong_FromUnsignedLongLong
from cpython.mem cimport PyMem_Free, PyMem_Realloc
from cpython.ref cimport PyObject
from cpython.pyport cimport PY_SSIZE_T_MAX
from libc.stdint cimport int64_t, uint8_t, uint16_t, uint64_t
from posix.time cimport CLOCK_REALTIME, clock_gettime, timespec

from orbitmesh._core._frame_c cimport (
    OM_HEADER_SIZE,
    om_hdr_corr,
    om_hdr_flags,
    om_hdr_job,
    om_msg_header,
    om_write_header,
)

from orbitmesh.errors import ErrorCode, OrbitMeshError, SerializationError
from orbitmesh.protocol import F_RAW_REPLY, Kind
from orbitmesh.serializers import SERIALIZER_MASK, SERIALIZER_SHIFT, RawSerializer

public_api = ["CallTable", "Pending", "decode_reply"]

cdef int _REQUEST = Kind.REQUEST
cdef int _REPLY = Kind.REPLY
cdef int _ACCEPTED = Kind.ACCEPTED
cdef uint16_t _F_RAW_REPLY = F_RAW_REPLY
cdef uint16_t _SER_MASK = SERIALIZER_MASK
cdef int _SER_SHIFT = SERIALIZER_SHIFT
cdef int _RAW_ID = RawSerializer.id
cdef double _INF = float("inf")
cdef double _NO_DEADLINE_S = 1e12  # a timeout this long (~31,700 years) or longer sends no deadline
cdef bytes EMPTY = b""


@cython.freelist(512)
cdef class Pending:
    """A call waiting for its answer: the future it resolves, the serializer it was sent with
    and its kind (a Kind value), plus what jobs (``accepted``, ``waiter``) and streams
    (``items``, ``waiter``, ``token``) add."""

    cdef public object fut
    cdef readonly object serializer  # fixed: its id is read once, into sid
    cdef public int kind
    cdef public unsigned long long corr
    cdef public object accepted
    cdef public object items
    cdef public object waiter
    cdef public object token
    cdef public object agent
    cdef int sid  # serializer.id, read once

    def __init__(self, fut, serializer, int kind, unsigned long long corr=0):
        self.fut = fut
        self.serializer = serializer
        self.sid = serializer.id
        self.kind = kind
        self.corr = corr
        self.token = EMPTY
        self.agent = ""


cpdef decode_reply(fut, serializer, body):
    """Resolve ``fut`` with ``body`` decoded by ``serializer`` (an empty body is None, except for
    raw), or fail it with the reason the body does not decode."""
    if not body and serializer.id != _RAW_ID:
        fut.set_result(None)
        return
    try:
        value = serializer.loads(body)
    except OrbitMeshError as exc:
        fut.set_exception(exc)
        return
    except Exception as exc:  # a plugin's own error type: still the caller's error, not the loop's
        message = f"serializer {serializer.name!r} cannot decode the reply: {exc!r}"
        fut.set_exception(SerializationError(message, code=ErrorCode.BAD_PAYLOAD))
        return
    fut.set_result(value)


cdef struct Deadline:
    double at
    uint64_t corr


cdef inline bint _before(Deadline* a, Deadline* b) noexcept nogil:
    # (at, corr) order, as the reference's tuples
    return a.at < b.at or (a.at == b.at and a.corr < b.corr)


cdef class CallTable:
    """The calls a client has in flight: ``pending`` (corr -> Pending), the last ``corr``
    issued, and a heap of deadlines in loop time."""

    cdef public dict pending
    cdef public unsigned long long corr
    cdef Deadline* _heap
    cdef Py_ssize_t _n, _cap

    def __cinit__(self):
        self.pending = {}
        self.corr = 0
        self._heap = NULL
        self._n = 0
        self._cap = 0

    def __dealloc__(self):
        PyMem_Free(self._heap)

    @property
    def deadlines(self):
        """Deadlines held, including those of calls that ended since (dropped in bulk)."""
        return self._n

    cdef int _push(self, double at, uint64_t corr) except -1:
        cdef Py_ssize_t i, parent, cap
        cdef Deadline e
        cdef Deadline* grown
        if self._n == self._cap:
            cap = self._cap * 2 if self._cap else 1024
            grown = <Deadline*>PyMem_Realloc(self._heap, cap * sizeof(Deadline))
            if grown == NULL:
                raise MemoryError()
            self._heap = grown
            self._cap = cap
        e.at = at
        e.corr = corr
        i = self._n
        self._n += 1
        while i > 0:
            parent = (i - 1) >> 1
            if not _before(&e, &self._heap[parent]):
                break
            self._heap[i] = self._heap[parent]
            i = parent
        self._heap[i] = e
        return 0

    cdef void _sift_down(self, Py_ssize_t i) noexcept:
        cdef Py_ssize_t n = self._n, child
        cdef Deadline e = self._heap[i]
        while True:
            child = 2 * i + 1
            if child >= n:
                break
            if child + 1 < n and _before(&self._heap[child + 1], &self._heap[child]):
                child += 1
            if not _before(&self._heap[child], &e):
                break
            self._heap[i] = self._heap[child]
            i = child
        self._heap[i] = e

    cdef Deadline _pop(self) noexcept:
        cdef Deadline top = self._heap[0]
        self._n -= 1
        if self._n:
            self._heap[0] = self._heap[self._n]
            self._sift_down(0)
        return top

    cdef int _compact(self) except -1:
        cdef Py_ssize_t i, k = 0
        cdef dict pending = self.pending
        for i in range(self._n):
            if PyDict_Contains(pending, PyLong_FromUnsignedLongLong(self._heap[i].corr)):
                self._heap[k] = self._heap[i]
                k += 1
        self._n = k
        i = k // 2 - 1
        while i >= 0:
            self._sift_down(i)
            i -= 1
        self._shrink()
        return 0

    cdef void _shrink(self) noexcept:
        """Give back most of an array a burst of calls grew (as a list does as it empties)."""
        cdef Py_ssize_t cap = max(1024, 2 * self._n)
        cdef Deadline* smaller
        if self._cap > 1024 and self._n < self._cap // 4:
            smaller = <Deadline*>PyMem_Realloc(self._heap, cap * sizeof(Deadline))
            if smaller != NULL:  # else keep the larger one
                self._heap = smaller
                self._cap = cap

    cpdef Pending open(self, fut, serializer, int kind, double at=_INF):
        """Record a new call under the next corr (``p.corr``; corrs only rise, the broker
        refuses replays), with its deadline ``at`` (loop time; inf: none; NaN: ValueError)."""
        if at != at:
            raise ValueError("a call's deadline must be a number (is its timeout NaN?)")
        cdef Pending p = Pending.__new__(Pending)
        self.corr += 1
        p.fut = fut
        p.serializer = serializer
        p.sid = serializer.id
        p.kind = kind
        p.corr = self.corr
        p.token = EMPTY
        p.agent = ""
        PyDict_SetItem(self.pending, PyLong_FromUnsignedLongLong(self.corr), p)
        if at != _INF:
            if self._n > 2 * len(self.pending) + 1024:
                # Deadlines stay until they pass, long after most calls ended: at 100k calls/s
                # and a 30 s timeout that was 3M entries before the first one expired.
                self._compact()
            self._push(at, self.corr)
        return p

    def request(self, send, fut, serializer, int kind, int flags, unsigned int aux, double at, double timeout,
                bytes route, bytes command, bytes body, options=None):
        """Open a call (as ``open``) and send it: ``send([header, route, command, body(,
        options)])``, the header naming the serializer besides ``flags`` and carrying the wall
        clock deadline ``timeout`` s from now (none for an infinite one). If ``send`` raises, the
        call was never made."""
        cdef Pending p = self.open(fut, serializer, kind, at)
        cdef timespec ts
        cdef int64_t deadline
        if timeout >= _NO_DEADLINE_S:
            deadline = 0  # no deadline (an infinite timeout, or one past any clock)
        else:
            clock_gettime(CLOCK_REALTIME, &ts)
            deadline = <int64_t>ts.tv_sec * 1000 + ts.tv_nsec // 1000000 + <int64_t>(timeout * 1000)
        hdr = PyBytes_FromStringAndSize(NULL, OM_HEADER_SIZE)
        om_write_header(
            <unsigned char*>PyBytes_AS_STRING(hdr), <uint8_t>kind, <uint16_t>((p.sid << 8) | flags), 0, aux, p.corr, 0,
            <uint64_t>(deadline if deadline > 0 else 0),
        )
        frames = [hdr, route, command, body]
        if options:
            frames.append(options)
        try:
            send(frames)
        except BaseException:
            del self.pending[p.corr]
            raise
        return p

    def next_deadline(self):
        """The earliest deadline held (loop time), inf if none."""
        return self._heap[0].at if self._n else _INF

    def due(self, double now):
        """Take the deadlines up to ``now``: the corrs of those calls still pending, earliest
        first (they stay in ``pending``; the caller ends them)."""
        cdef list out = []
        cdef Deadline e
        cdef dict pending = self.pending
        while self._n and self._heap[0].at <= now:
            e = self._pop()
            key = PyLong_FromUnsignedLongLong(e.corr)
            if PyDict_Contains(pending, key):
                out.append(key)
        if self._n > 64 and self._n > 4 * len(pending):
            self._compact()
        return out

    def take_all(self):
        """Forget every call (the connection is gone) and return their entries."""
        out = list(self.pending.values())
        self.pending.clear()
        self._n = 0
        self._shrink()
        return out

    def settle(self, list batch, Py_ssize_t start=0):
        """Resolve the plain replies and jobs' ACCEPTED and replies in ``batch`` (received
        messages, each a list of frames) from ``start`` on, up to the first message of another
        sort; return that one's index (``len(batch)`` if none), for the client to handle before
        settling on after it."""
        cdef Py_ssize_t i, n = len(batch)
        for i in range(start, n):
            if not self._settle_one(batch[i]):
                return i
        return n

    cdef bint _settle_one(self, frames) except -1:
        cdef list fr
        cdef const unsigned char* h
        cdef Py_ssize_t n
        cdef uint16_t flags
        cdef PyObject* found
        cdef Pending p
        h = om_msg_header(frames, 2, PY_SSIZE_T_MAX, -1)
        if h == NULL or (h[3] != _REPLY and h[3] != _ACCEPTED):
            return False
        fr = <list>frames
        n = len(fr)
        key = PyLong_FromUnsignedLongLong(om_hdr_corr(h))
        found = PyDict_GetItem(self.pending, key)
        if found == NULL:
            return False
        p = <Pending>found
        if h[3] == _ACCEPTED:  # a job is in the log: its call waits on for the outcome
            if p.accepted is None:
                return False
            if not p.accepted.done():
                p.accepted.set_result(PyLong_FromUnsignedLongLong(om_hdr_job(h)))
            return True
        flags = om_hdr_flags(h)
        if (
            p.kind != _REQUEST
            or p.items is not None
            or flags & _F_RAW_REPLY
            or (flags & _SER_MASK) >> _SER_SHIFT != p.sid
        ):
            return False
        PyDict_DelItem(self.pending, key)
        fut = p.fut
        if fut.done():
            return True
        waiter = p.waiter
        if waiter is not None and not waiter.done():  # a Job.result() waiting
            waiter.set_result(None)
        decode_reply(fut, p.serializer, fr[2] if n > 2 else EMPTY)
        if p.accepted is not None and fut.done() and not fut.cancelled():
            fut.exception()  # a job's outcome may never be asked for: not "never retrieved"
        return True
