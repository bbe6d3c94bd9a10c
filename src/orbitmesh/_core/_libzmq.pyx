"""Bind to the libzmq that pyzmq loaded: no zmq.h at build time, no second libzmq at run time.

At import, pyzmq's Cython extension is looked up with ``dlopen(RTLD_NOLOAD)`` and each libzmq
function is resolved with ``dlsym`` on that handle (glibc searches the object's dependencies, so
this finds pyzmq's privately named libzmq). The handle is never closed.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.exc cimport PyErr_CheckSignals
from libc.string cimport memcpy
from posix.dlfcn cimport RTLD_NOW, dlerror, dlopen, dlsym

from orbitmesh._core._zmqabi cimport (
    EAGAIN,
    EINTR,
    ETERM,
    ZMQ_SNDMORE,
    ZmqApi,
    zmq_errno_fn,
    zmq_getsockopt_fn,
    zmq_msg_close_fn,
    zmq_msg_copy_fn,
    zmq_msg_data_fn,
    zmq_msg_init_fn,
    zmq_msg_init_size_fn,
    zmq_msg_init_data_fn,
    zmq_msg_more_fn,
    zmq_msg_move_fn,
    zmq_msg_recv_fn,
    zmq_msg_send_fn,
    zmq_msg_size_fn,
    zmq_msg_t,
    zmq_msg_gets_fn,
    zmq_poll_fn,
    zmq_strerror_fn,
    zmq_version_fn,
)

cdef extern from "<dlfcn.h>" nogil:
    enum:
        RTLD_NOLOAD

import errno
import os

import zmq
import zmq.backend.cython._zmq as _pyzmq_backend
from zmq.error import Again, ContextTerminated, InterruptedSystemCall, ZMQError

_MIN_VERSION = (4, 1, 0)

cdef ZmqApi _api
_Socket = _pyzmq_backend.Socket


cdef ZmqApi* zmq_api() noexcept nogil:
    return &_api


cdef int check_socket(object sock) except -1:
    if not isinstance(sock, _Socket):
        raise TypeError(f"expected a zmq.Socket of pyzmq's Cython backend, not {type(sock).__name__}")
    if sock.closed or not sock.underlying:
        raise ZMQError(errno.ENOTSOCK)
    return 0


cdef int raise_zmq_error(int errnum) except -1:
    # pyzmq's classes for the same errno (its zmq.error._check_rc, which is private)
    if errnum == EAGAIN:
        raise Again(errnum)
    if errnum == ETERM:
        raise ContextTerminated(errnum)
    if errnum == EINTR:
        raise InterruptedSystemCall(errnum)
    raise ZMQError(errnum)


cdef str _dlerror():
    cdef const char* msg = dlerror()
    return msg.decode(errors="replace") if msg != NULL else "unknown error"


cdef void* _sym(void* handle, const char* name, object path) except NULL:
    cdef void* fn = dlsym(handle, name)
    if fn == NULL:
        raise ImportError(
            f"orbitmesh: libzmq function {name.decode()} not found from pyzmq's {path}: {_dlerror()}"
        )
    return fn


cdef tuple _bind():
    global _api
    path = _pyzmq_backend.__file__
    cdef bytes fspath = os.fsencode(path)
    # RTLD_NOLOAD: only a handle on the object pyzmq already loaded; never load a second copy.
    cdef void* h = dlopen(fspath, RTLD_NOW | RTLD_NOLOAD)
    if h == NULL:
        raise ImportError(f"orbitmesh: cannot get a handle on pyzmq's backend {path}: {_dlerror()}")
    # Resolve everything before publishing anything; the handle is deliberately never dlclosed.
    cdef ZmqApi api
    api.zmq_msg_init = <zmq_msg_init_fn>_sym(h, b"zmq_msg_init", path)
    api.zmq_msg_init_size = <zmq_msg_init_size_fn>_sym(h, b"zmq_msg_init_size", path)
    api.zmq_msg_init_data = <zmq_msg_init_data_fn>_sym(h, b"zmq_msg_init_data", path)
    api.zmq_msg_data = <zmq_msg_data_fn>_sym(h, b"zmq_msg_data", path)
    api.zmq_msg_size = <zmq_msg_size_fn>_sym(h, b"zmq_msg_size", path)
    api.zmq_msg_more = <zmq_msg_more_fn>_sym(h, b"zmq_msg_more", path)
    api.zmq_msg_close = <zmq_msg_close_fn>_sym(h, b"zmq_msg_close", path)
    api.zmq_msg_copy = <zmq_msg_copy_fn>_sym(h, b"zmq_msg_copy", path)
    api.zmq_msg_move = <zmq_msg_move_fn>_sym(h, b"zmq_msg_move", path)
    api.zmq_msg_send = <zmq_msg_send_fn>_sym(h, b"zmq_msg_send", path)
    api.zmq_msg_recv = <zmq_msg_recv_fn>_sym(h, b"zmq_msg_recv", path)
    api.zmq_poll = <zmq_poll_fn>_sym(h, b"zmq_poll", path)
    api.zmq_getsockopt = <zmq_getsockopt_fn>_sym(h, b"zmq_getsockopt", path)
    api.zmq_errno = <zmq_errno_fn>_sym(h, b"zmq_errno", path)
    api.zmq_strerror = <zmq_strerror_fn>_sym(h, b"zmq_strerror", path)
    api.zmq_version = <zmq_version_fn>_sym(h, b"zmq_version", path)
    api.zmq_msg_gets = <zmq_msg_gets_fn>_sym(h, b"zmq_msg_gets", path)

    cdef int major = 0, minor = 0, patch = 0
    api.zmq_version(&major, &minor, &patch)
    found = (major, minor, patch)
    expected = tuple(zmq.zmq_version_info())
    if found != expected:
        raise ImportError(
            f"orbitmesh: the libzmq resolved from {path} is {found}, but pyzmq reports {expected}; "
            "refusing to mix two libzmq builds in one process"
        )
    if found < _MIN_VERSION:
        raise ImportError(f"orbitmesh needs libzmq >= 4.1, pyzmq is using {found}")
    _api = api
    return found


_VERSION = _bind()


def libzmq_version():
    """The (major, minor, patch) of the libzmq this module bound to (always pyzmq's)."""
    return _VERSION


cdef int _send(zmq_msg_t* msg, void* sock, int flags) except -1:
    cdef int rc, err = 0
    while True:
        with nogil:
            rc = _api.zmq_msg_send(msg, sock, flags)
            if rc < 0:
                err = _api.zmq_errno()
        if rc >= 0:
            return 0
        if err != EINTR:
            return raise_zmq_error(err)
        PyErr_CheckSignals()  # a signal handler may raise (KeyboardInterrupt); else retry


cdef int _recv(zmq_msg_t* msg, void* sock) except -1:
    cdef int rc, err = 0
    while True:
        with nogil:
            rc = _api.zmq_msg_recv(msg, sock, 0)
            if rc < 0:
                err = _api.zmq_errno()
        if rc >= 0:
            return 0
        if err != EINTR:
            return raise_zmq_error(err)
        PyErr_CheckSignals()


def _selftest_roundtrip(sender, receiver, frames):
    """Send ``frames`` (bytes) as one multipart message on ``sender`` with ``zmq_msg_send``, then
    receive one message on ``receiver`` with ``zmq_msg_recv``; return its frames. Raises
    ``zmq.ZMQError`` for a libzmq failure (e.g. EAGAIN when a socket timeout expires)."""
    cdef void* s = socket_handle(sender)
    cdef void* r = socket_handle(receiver)
    cdef zmq_msg_t msg
    cdef bytes frame
    cdef Py_ssize_t i, size, n = len(frames)
    cdef int more = 1
    if n == 0:
        raise ValueError("a message has at least one frame")
    for i in range(n):
        frame = frames[i]
        size = PyBytes_GET_SIZE(frame)
        if _api.zmq_msg_init_size(&msg, <size_t>size) < 0:
            raise_zmq_error(_api.zmq_errno())
        try:
            memcpy(_api.zmq_msg_data(&msg), PyBytes_AS_STRING(frame), <size_t>size)
            _send(&msg, s, ZMQ_SNDMORE if i < n - 1 else 0)
        finally:
            _api.zmq_msg_close(&msg)  # a no-op once zmq_msg_send took the content
    received = []
    while more:
        _api.zmq_msg_init(&msg)
        try:
            _recv(&msg, r)
            received.append(
                PyBytes_FromStringAndSize(<const char*>_api.zmq_msg_data(&msg), <Py_ssize_t>_api.zmq_msg_size(&msg))
            )
            more = _api.zmq_msg_more(&msg)
        finally:
            _api.zmq_msg_close(&msg)
    return received
