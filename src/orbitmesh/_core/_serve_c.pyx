"""An agent's requests, compiled (see ``_serve_py.py`` for the behaviour).

The header is read in place, the handler's coroutine is stepped with ``PyIter_Send`` (a
coroutine that returns at once raises no StopIteration), and the reply's header is written
straight into its bytes.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from cpython.dict cimport PyDict_GetItem, PyDict_Next
from cpython.object cimport PyObject_Call
from cpython.ref cimport PyObject, Py_XDECREF
from cpython.unicode cimport PyUnicode_Check
from libc.stdint cimport uint16_t, uint32_t, uint64_t

from orbitmesh._core._frame_c cimport (
    OM_HEADER_SIZE,
    om_hdr_aux,
    om_hdr_corr,
    om_hdr_flags,
    om_hdr_job,
    om_msg_header,
    om_write_header,
)

import types

from orbitmesh.protocol import F_TRACKED, Kind
from orbitmesh.serializers import SERIALIZER_MASK, RawSerializer

public_api = ["Dispatcher", "call_args"]

cdef extern from "Python.h":
    int PyIter_Send(object iter, object arg, PyObject** presult) except -1  # PYGEN_*: 0 return, 1 yield

cdef int _REQUEST = Kind.REQUEST
cdef int _REPLY = Kind.REPLY
cdef uint16_t _SER_MASK = SERIALIZER_MASK
cdef uint16_t _F_TRACKED = F_TRACKED
cdef int _RAW_ID = RawSerializer.id
cdef object _Coroutine = types.CoroutineType
cdef tuple _NO_ARGS = ()


cdef inline bint _str_keys(dict d):
    cdef Py_ssize_t pos = 0
    cdef PyObject* key
    cdef PyObject* value
    while PyDict_Next(d, &pos, &key, &value):
        if not PyUnicode_Check(<object>key):
            return False
    return True


cpdef tuple call_args(params):
    """A handler's arguments from its params: a map with string keys as keywords, a list as
    positional arguments, None as none, anything else as the one argument."""
    if params is None:
        return _NO_ARGS, {}
    if isinstance(params, dict) and _str_keys(<dict>params):
        return _NO_ARGS, params
    if isinstance(params, (list, tuple)):
        return tuple(params), {}
    return (params,), {}


cdef class Dispatcher:
    """Serves ``host``'s plain requests from received batches (see the module), and counts the
    requests it has running (``inflight``; ``served`` once they end), for the agent's own
    paths too (``begin`` / ``end``). ``idle``: a future resolved when ``inflight`` falls to 0."""

    cdef public object host
    cdef public object serializers
    cdef public object default
    cdef public dict handlers
    cdef public long long inflight
    cdef public long long served
    cdef public object idle

    def __init__(self, host, serializers):
        self.host = host
        self.serializers = serializers
        self.default = serializers.get(0)  # id 0 is always msgpack: most requests name it
        self.handlers = {}  # command -> (fn, sync)
        self.inflight = 0
        self.served = 0
        self.idle = None

    def add(self, bytes command, fn, bint sync):
        """Serve ``command`` here: ``fn`` a coroutine function, or (``sync``) an inline one."""
        self.handlers[command] = (fn, sync)

    cpdef begin(self):
        """A request starts running."""
        self.inflight += 1

    cpdef end(self):
        """A running request has ended."""
        self.inflight -= 1
        self.served += 1
        if not self.inflight and self.idle is not None and not self.idle.done():
            self.idle.set_result(None)  # stop() is draining: the last handler has finished

    def serve(self, list batch, Py_ssize_t start=0):
        """Serve the plain requests in ``batch`` from ``start`` on, up to the first message of
        another sort; return that one's index (``len(batch)`` if none), for the agent."""
        cdef Py_ssize_t i, n = len(batch), nf
        cdef const unsigned char* h
        cdef uint16_t flags
        cdef int sid
        cdef list frames
        cdef PyObject* entry
        cdef uint64_t job
        host = self.host
        conn = host._conn
        if conn is None or not conn.ready:
            return start  # the agent drops what comes while it is not registered
        for i in range(start, n):
            h = om_msg_header(batch[i], 3, 4, _REQUEST)  # [header, token, command, params?]
            if h == NULL:
                return i
            frames = <list>batch[i]
            nf = len(frames)
            flags = om_hdr_flags(h)
            job = om_hdr_job(h)
            if flags & ~_SER_MASK:
                if flags & ~_SER_MASK != _F_TRACKED or not job:  # a stream, raw, ...
                    return i
            elif job:
                return i
            cmd = frames[2]
            if type(cmd) is not bytes:
                return i
            entry = PyDict_GetItem(self.handlers, cmd)
            if entry == NULL:
                return i
            sid = flags >> 8
            if not sid:
                serializer = self.default
            else:
                try:
                    serializer = self.serializers.from_flags(flags)
                except Exception:
                    return i  # the agent says why
            body = frames[3] if nf == 4 else b""
            try:
                # An empty body means "no params", except to the raw serializer: empty bytes.
                params = serializer.loads(body) if body or sid == _RAW_ID else None
            except Exception:
                return i  # the agent says why
            token = frames[1]
            if job:
                # A tracked job's first delivery (a redelivery is the agent's: it may have run).
                running = host._jobs_running
                if job in running or job in host._jobs_done:
                    return i
                running[job] = [token, om_hdr_corr(h), om_hdr_aux(h)]
            self.inflight += 1
            self._run(<tuple>entry, params, token, om_hdr_corr(h), flags & _SER_MASK, serializer, job, om_hdr_aux(h))
        return n

    cdef int _run(self, tuple entry, params, token, uint64_t corr, uint16_t sflags, s, uint64_t job, uint32_t lease) except -1:
        cdef PyObject* out = NULL
        cdef int rc = 0
        fn = entry[0]
        host = self.host
        args, kwargs = call_args(params)
        cdef bint other = False
        try:
            aw = PyObject_Call(fn, args, kwargs)
            if entry[1]:  # an inline sync handler: that is its result
                value = aw
            elif type(aw) is _Coroutine:
                rc = PyIter_Send(aw, None, &out)
                value = <object>out
                Py_XDECREF(out)
            else:
                other = True  # some other awaitable
        except BaseException as exc:
            host._reply_error(exc, token, corr, job)
            self.end()
            return 0
        if other:
            host._run_eagerly(aw, token, corr, job, sflags, s)
            return 0
        if rc:  # suspended on ``value``: a task ends it
            host._run_eagerly(aw, token, corr, job, sflags, s, value)
            return 0
        try:
            body = s.dumps(value)
        except Exception:
            host._reply(value, token, corr, job, sflags, s)  # says why
        else:
            hdr = PyBytes_FromStringAndSize(NULL, OM_HEADER_SIZE)
            om_write_header(<unsigned char*>PyBytes_AS_STRING(hdr), _REPLY, sflags, 0, lease, corr, job, 0)
            frames = [hdr, token, body]
            if job:  # the agent's _answer: this delivery is done, its answer kept for a redelivery
                host._jobs_running.pop(job, None)
                done = host._jobs_done
                done[job] = frames
                if len(done) > host.remember_jobs:
                    done.popitem(last=False)
            conn = host._conn
            if conn is not None and conn.ready:
                conn.sock_send(frames)
        self.end()
        return 0
