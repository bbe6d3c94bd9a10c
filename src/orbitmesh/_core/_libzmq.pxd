# What other compiled modules cimport from _libzmq:
#
#     from orbitmesh._core._libzmq cimport zmq_api, socket_handle, raise_zmq_error
#
# zmq_api() is valid once orbitmesh._core._libzmq imported, which Cython does before the
# cimporting module's body runs (an ImportError there says why libzmq could not be bound).

from libc.stdint cimport uintptr_t

from orbitmesh._core._zmqabi cimport ZmqApi

# The libzmq functions pyzmq loaded, resolved once at import; never NULL afterwards.
cdef ZmqApi* zmq_api() noexcept nogil

# Raise unless ``sock`` is an open socket of pyzmq's Cython backend.
cdef int check_socket(object sock) except -1

# Raise what pyzmq raises for this libzmq errno: zmq.Again, zmq.ContextTerminated, ... or zmq.ZMQError.
cdef int raise_zmq_error(int errnum) except -1


cdef inline void* socket_handle(object sock) except NULL:
    """The libzmq ``void*`` of an open pyzmq socket; the caller keeps ``sock`` alive while using it."""
    check_socket(sock)
    return <void*><uintptr_t>sock.underlying
