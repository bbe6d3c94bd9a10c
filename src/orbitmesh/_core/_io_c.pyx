"""Socket I/O for the client and agent loops, compiled (see ``_io_py.py`` for the behaviour).

pyzmq's send_multipart / recv_multipart cost ~4.5 us for a 4-part message, most of it its
Python layer per frame; these call libzmq (pyzmq's own, see _libzmq.pyx) once per part.
"""

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_CheckExact, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.string cimport memcpy

from orbitmesh._core._frame_c cimport om_check_packed, om_is_packed, om_pack_count, om_packable, om_unpack_list, om_write_packed
from orbitmesh._core._libzmq cimport raise_zmq_error, socket_handle, zmq_api
from orbitmesh._core._zmqabi cimport EAGAIN, EINTR, ZMQ_DONTWAIT, ZMQ_SNDMORE, ZmqApi, zmq_msg_t

from orbitmesh._core._frame_c import pack_parts
from orbitmesh._core._io_py import BATCH_BYTES

public_api = [
    "BATCH_BYTES",
    "Outbox",
    "pack_messages",
    "pack_runs",
    "recv_batch",
    "send_parts",
    "send_queue",
    "unpack_messages",
]

cdef size_t _BATCH_BYTES = BATCH_BYTES


cdef inline void _st32(char* p, size_t v) noexcept:
    p[0] = <char>(v & 0xFF)
    p[1] = <char>((v >> 8) & 0xFF)
    p[2] = <char>((v >> 16) & 0xFF)
    p[3] = <char>((v >> 24) & 0xFF)


cdef Py_ssize_t _part_len(object part) except -1:
    cdef Py_buffer view
    cdef Py_ssize_t n
    if PyBytes_CheckExact(part):
        return PyBytes_GET_SIZE(part)
    PyObject_GetBuffer(part, &view, PyBUF_SIMPLE)
    n = view.len
    PyBuffer_Release(&view)
    return n


cdef Py_ssize_t _message_bytes(object parts) except -1:
    """The bytes in the parts of a message to pack (whose part count it checks)."""
    cdef Py_ssize_t count = len(parts), total = 0
    if not 0 < count <= 0xFFFF:
        raise ValueError(f"a packed message has 1 to 65535 parts, not {count}")
    for part in parts:
        total += _part_len(part)
    return total


cdef bytes _pack(list messages, Py_ssize_t begin, Py_ssize_t end, Py_ssize_t total):
    """messages[begin:end] packed, ``total`` bytes in all."""
    cdef Py_ssize_t i, count
    cdef size_t n
    cdef Py_buffer view
    out = PyBytes_FromStringAndSize(NULL, total)
    cdef char* p = PyBytes_AS_STRING(out)
    for i in range(begin, end):
        parts = messages[i]
        count = len(parts)
        p[0] = <char>(count & 0xFF)
        p[1] = <char>(count >> 8)
        p += 2
        for part in parts:
            if PyBytes_CheckExact(part):
                n = <size_t>PyBytes_GET_SIZE(part)
                _st32(p, n)
                memcpy(p + 4, PyBytes_AS_STRING(part), n)
            else:
                PyObject_GetBuffer(part, &view, PyBUF_SIMPLE)
                try:
                    n = <size_t>view.len
                    _st32(p, n)
                    memcpy(p + 4, view.buf, n)
                finally:
                    PyBuffer_Release(&view)
            p += 4 + n
    return out


cdef class Outbox:
    """The control plane's messages for its data plane, queued in one turn of the loop (see
    ``_io_py.Outbox``). Compiled, a durable job's three messages cost a C call each."""

    cdef bytes _op_send
    cdef object _schedule
    cdef list _out
    cdef public bint closed

    def __init__(self, bytes op_send, schedule):
        self._op_send = op_send
        self._schedule = schedule
        self._out = []
        self.closed = True

    cpdef ctl(self, frames):
        """Queue an op for the data plane: ``[op, ...]``."""
        if self.closed:
            return
        self._out.append(frames)
        if len(self._out) == 1:
            self._schedule()

    def send(self, rid, frames):
        """Queue a message to the peer ``rid`` (an ``OP_SEND``)."""
        if not self.closed:
            self.ctl([self._op_send, rid, *frames])

    def take(self):
        """What was queued since the last take, in order; the outbox is empty after."""
        out = self._out
        self._out = []
        return out


def pack_messages(messages):
    """Several messages as the bytes of one frame (see ``_io_py.pack_messages``)."""
    cdef list todo = messages if type(messages) is list else list(messages)
    cdef Py_ssize_t total = 0
    for parts in todo:
        total += 2 + 4 * len(parts) + _message_bytes(parts)
    return _pack(todo, 0, len(todo), total)


def pack_runs(list messages, Py_ssize_t limit):
    """``messages`` in order, as what to send (see ``_io_py.pack_runs``)."""
    cdef list out = []
    cdef Py_ssize_t i, start = 0, total = 0, size
    for i in range(len(messages)):
        parts = messages[i]
        size = _message_bytes(parts)
        if size > limit:
            if i > start:
                out.append(_pack(messages, start, i, total))
            out.append(parts)
            start = i + 1
            total = 0
        else:
            total += 2 + 4 * len(parts) + size
    if len(messages) > start:
        out.append(_pack(messages, start, len(messages), total))
    return out


cdef int _send_msg(ZmqApi* z, void* h, zmq_msg_t* m, int flags) noexcept:
    """Send ``m``; 0, or the errno (then ``m`` is closed)."""
    cdef int err
    while z.zmq_msg_send(m, h, flags) < 0:
        err = z.zmq_errno()
        if err != EINTR:
            z.zmq_msg_close(m)
            return err
    return 0


cdef int _send_one(ZmqApi* z, void* h, const char* data, size_t size, int flags) noexcept:
    """0, or the errno; the part is consumed either way."""
    cdef zmq_msg_t m
    if z.zmq_msg_init_size(&m, size) != 0:
        return z.zmq_errno()
    if size:
        memcpy(z.zmq_msg_data(&m), data, size)
    return _send_msg(z, h, &m, flags)


cdef int _send_packed(ZmqApi* z, void* h, list parts, Py_ssize_t k, size_t size, int flags) noexcept:
    """Send the header frame of ``parts`` with parts 1..k inline (``size`` bytes in all); 0 or the errno."""
    cdef zmq_msg_t m
    if z.zmq_msg_init_size(&m, size) != 0:
        return z.zmq_errno()
    om_write_packed(<unsigned char*>z.zmq_msg_data(&m), parts, k)
    return _send_msg(z, h, &m, flags)


def send_parts(sock, parts, bint packed=False):
    """Send bytes-like ``parts`` as one message without blocking, copying them; ``packed``: in
    packed framing (protocol 2, see ``_frame_py.pack_parts``), ``parts[0]`` being its header.

    Returns False (nothing sent) if the socket cannot take it now; raises
    zmq.ZMQError for anything else.
    """
    return _send(socket_handle(sock), zmq_api(), parts, packed) == 1


def send_queue(sock, out, bint packed=False):
    """Send the messages at the front of the deque ``out`` as ``send_parts`` does, popping
    each once sent, up to the first that is not a list or tuple (left for the caller).

    Returns True if it stopped because the socket cannot take more now, else False (``out``
    is empty, or starts with such a message). Raises zmq.ZMQError as ``send_parts``.
    """
    cdef void* h = socket_handle(sock)
    cdef ZmqApi* z = zmq_api()
    popleft = out.popleft
    while out:
        parts = out[0]
        if type(parts) is not list and type(parts) is not tuple:
            return False
        if not _send(h, z, parts, packed):
            return True
        popleft()
    return False


cdef int _send(void* h, ZmqApi* z, parts, bint packed) except -1:
    """send_parts: 1 sent, 0 the socket cannot take it now (nothing sent)."""
    cdef Py_ssize_t i, n = len(parts), first = 0, k = -1
    cdef size_t size
    cdef int flags, err
    cdef Py_buffer view
    if n == 0:
        raise ValueError("a message needs at least one part")
    if packed:
        if type(parts) is list and type(parts[0]) is bytes and om_packable(
            <const unsigned char*>PyBytes_AS_STRING(parts[0]), <size_t>PyBytes_GET_SIZE(parts[0])
        ):
            k = om_pack_count(parts, &size)  # -1: a buffer comes first, packed by the reference
        if k < 0:
            parts = pack_parts(list(parts))  # the general case (and its ValueError)
            n = len(parts)
        else:
            err = _send_packed(z, h, parts, k, size, ZMQ_DONTWAIT | (ZMQ_SNDMORE if k + 1 < n else 0))
            if err:
                if err == EAGAIN:
                    return 0
                raise_zmq_error(err)
            first = k + 1
    for i in range(first, n):
        part = parts[i]
        flags = ZMQ_DONTWAIT | (ZMQ_SNDMORE if i + 1 < n else 0)
        if PyBytes_CheckExact(part):
            err = _send_one(z, h, PyBytes_AS_STRING(part), PyBytes_GET_SIZE(part), flags)
        else:
            PyObject_GetBuffer(part, &view, PyBUF_SIMPLE)
            try:
                err = _send_one(z, h, <const char*>view.buf, view.len, flags)
            finally:
                PyBuffer_Release(&view)
        if err:
            # libzmq queues a multipart message whole or refuses its first part.
            if err == EAGAIN and i == first == 0:
                return 0
            raise_zmq_error(err)
    return 1


def unpack_messages(bytes packed):
    """The messages ``pack_messages`` packed into ``packed`` (see ``_io_py.unpack_messages``)."""
    cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(packed)
    cdef size_t n = <size_t>PyBytes_GET_SIZE(packed), at = 0, size
    cdef unsigned int count, i
    cdef list out = []
    cdef list parts
    while at + 2 <= n:
        count = p[at] | (<unsigned int>p[at + 1] << 8)
        at += 2
        if not count:
            break
        parts = []
        for i in range(count):
            if at + 4 > n:
                return out
            size = p[at] | (<size_t>p[at + 1] << 8) | (<size_t>p[at + 2] << 16) | (<size_t>p[at + 3] << 24)
            if size > n - at - 4:
                return out
            parts.append(PyBytes_FromStringAndSize(<const char*>p + at + 4, <Py_ssize_t>size))
            at += 4 + size
        out.append(parts)
    return out


def recv_batch(sock, int limit):
    """Up to ``limit`` whole messages waiting on ``sock``, each a list of bytes; [] if none;
    a batch also ends once it holds ``BATCH_BYTES`` (see ``_io_py``). A message in packed
    framing comes back unpacked; one whose packing does not add up, as it came."""
    cdef void* h = socket_handle(sock)
    cdef ZmqApi* z = zmq_api()
    cdef zmq_msg_t m
    cdef int err, more, got = 0
    cdef size_t size = 0, ln
    cdef const unsigned char* data
    cdef list out = []
    cdef list msg, parts
    while got < limit and size < _BATCH_BYTES:
        msg = []
        more = 1
        while more:
            z.zmq_msg_init(&m)
            if z.zmq_msg_recv(&m, h, ZMQ_DONTWAIT if not msg else 0) < 0:
                err = z.zmq_errno()
                z.zmq_msg_close(&m)
                if err == EINTR:
                    continue
                if err == EAGAIN and not msg:
                    return out
                raise_zmq_error(err)
            data = <const unsigned char*>z.zmq_msg_data(&m)
            ln = z.zmq_msg_size(&m)
            parts = None
            if not msg and om_is_packed(data, ln) and om_check_packed(data, ln) == 0:
                parts = om_unpack_list(data)
            if parts is None:
                msg.append(PyBytes_FromStringAndSize(<const char*>data, ln))
            else:
                msg = parts
            size += ln
            more = z.zmq_msg_more(&m)
            z.zmq_msg_close(&m)
        out.append(msg)
        got += 1
    return out
