"""Socket I/O for the client and agent loops, compiled (see ``_io_py.py`` for the behaviour).

pyzmq's send_multipart / recv_multipart cost ~4.5 us for a 4-part message, most of it its
Python layer per frame; these call libzmq (pyzmq's own, see _libzmq.pyx) once per part.
"""

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_CheckExact, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.string cimport memcpy

from orbitmesh._core._libzmq cimport raise_zmq_error, socket_handle, zmq_api
from orbitmesh._core._zmqabi cimport EAGAIN, EINTR, ZMQ_DONTWAIT, ZMQ_SNDMORE, ZmqApi, zmq_msg_t

from orbitmesh._core._io_py import BATCH_BYTES

public_api = ["BATCH_BYTES", "recv_batch", "send_parts"]

cdef size_t _BATCH_BYTES = BATCH_BYTES


cdef int _send_one(ZmqApi* z, void* h, const char* data, size_t size, int flags) noexcept:
    """0, or the errno; the part is consumed either way."""
    cdef zmq_msg_t m
    cdef int err
    if z.zmq_msg_init_size(&m, size) != 0:
        return z.zmq_errno()
    if size:
        memcpy(z.zmq_msg_data(&m), data, size)
    while z.zmq_msg_send(&m, h, flags) < 0:
        err = z.zmq_errno()
        if err != EINTR:
            z.zmq_msg_close(&m)
            return err
    return 0


def send_parts(sock, parts):
    """Send bytes-like ``parts`` as one message without blocking, copying them.

    Returns False (nothing sent) if the socket cannot take it now; raises
    zmq.ZMQError for anything else.
    """
    cdef void* h = socket_handle(sock)
    cdef ZmqApi* z = zmq_api()
    cdef Py_ssize_t i, n = len(parts)
    cdef int flags, err
    cdef Py_buffer view
    if n == 0:
        raise ValueError("a message needs at least one part")
    for i in range(n):
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
            if err == EAGAIN and i == 0:
                return False
            raise_zmq_error(err)
    return True


def recv_batch(sock, int limit):
    """Up to ``limit`` whole messages waiting on ``sock``, each a list of bytes; [] if none;
    a batch also ends once it holds ``BATCH_BYTES`` (see ``_io_py``)."""
    cdef void* h = socket_handle(sock)
    cdef ZmqApi* z = zmq_api()
    cdef zmq_msg_t m
    cdef int err, more, got = 0
    cdef size_t size = 0
    cdef list out = []
    cdef list msg
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
            msg.append(PyBytes_FromStringAndSize(<const char*>z.zmq_msg_data(&m), z.zmq_msg_size(&m)))
            size += z.zmq_msg_size(&m)
            more = z.zmq_msg_more(&m)
            z.zmq_msg_close(&m)
        out.append(msg)
        got += 1
    return out
