# The part of the libzmq (>= 4.1) C ABI the compiled core uses, declared here so that no zmq.h
# is needed to build. The functions are not linked: _libzmq.pyx resolves them at import in the
# libzmq that pyzmq loaded and hands them out as a ZmqApi struct of function pointers.
#
#     from orbitmesh._core._zmqabi cimport zmq_msg_t, ZmqApi, ZMQ_SNDMORE, EAGAIN, ...
#     from orbitmesh._core._libzmq cimport zmq_api, socket_handle

cdef extern from *:
    """
    #include <errno.h>
    #include <stddef.h>
    #include <stdint.h>
    #ifndef __ZMQ_H_INCLUDED__  /* zmq.h's own guard: if it is in, use its definitions */
    /* As in libzmq 4.3's zmq.h: 64 opaque bytes aligned like a pointer. */
    typedef struct zmq_msg_t {
    #if defined(_MSC_VER) && (defined(_M_X64) || defined(_M_ARM64))
        __declspec(align(8)) unsigned char _[64];
    #elif defined(_MSC_VER)
        __declspec(align(4)) unsigned char _[64];
    #else
        unsigned char _[64] __attribute__((aligned(sizeof(void *))));
    #endif
    } zmq_msg_t;
    typedef struct zmq_pollitem_t {
        void *socket;
    #if defined(_WIN32)
        uintptr_t fd;  /* SOCKET */
    #else
        int fd;
    #endif
        short events;
        short revents;
    } zmq_pollitem_t;
    #define ZMQ_DONTWAIT 1
    #define ZMQ_SNDMORE 2
    #define ZMQ_POLLIN 1
    #define ZMQ_POLLOUT 2
    #define ZMQ_RCVMORE 13
    #define ZMQ_EVENTS 15
    #define ETERM (156384712 + 53)  /* ZMQ_HAUSNUMERO + 53: the context was terminated */
    #endif
    """
    ctypedef struct zmq_msg_t:
        pass

    ctypedef struct zmq_pollitem_t:
        void* socket
        int fd
        short events
        short revents

    enum:
        ZMQ_DONTWAIT
        ZMQ_SNDMORE
        ZMQ_POLLIN
        ZMQ_POLLOUT
        ZMQ_RCVMORE
        ZMQ_EVENTS
        ETERM
        EAGAIN
        EINTR
        EHOSTUNREACH
        ENOMEM


ctypedef int (*zmq_msg_init_fn)(zmq_msg_t* msg) noexcept nogil
ctypedef int (*zmq_msg_init_size_fn)(zmq_msg_t* msg, size_t size) noexcept nogil
ctypedef void (*zmq_free_fn)(void* data, void* hint) noexcept nogil
ctypedef int (*zmq_msg_init_data_fn)(zmq_msg_t* msg, void* data, size_t size, zmq_free_fn ffn, void* hint) noexcept nogil
ctypedef void* (*zmq_msg_data_fn)(zmq_msg_t* msg) noexcept nogil
ctypedef size_t (*zmq_msg_size_fn)(const zmq_msg_t* msg) noexcept nogil
ctypedef int (*zmq_msg_more_fn)(const zmq_msg_t* msg) noexcept nogil
ctypedef int (*zmq_msg_close_fn)(zmq_msg_t* msg) noexcept nogil
ctypedef int (*zmq_msg_copy_fn)(zmq_msg_t* dest, zmq_msg_t* src) noexcept nogil
ctypedef int (*zmq_msg_move_fn)(zmq_msg_t* dest, zmq_msg_t* src) noexcept nogil
ctypedef int (*zmq_msg_send_fn)(zmq_msg_t* msg, void* socket, int flags) noexcept nogil
ctypedef int (*zmq_msg_recv_fn)(zmq_msg_t* msg, void* socket, int flags) noexcept nogil
ctypedef int (*zmq_poll_fn)(zmq_pollitem_t* items, int nitems, long timeout) noexcept nogil
ctypedef int (*zmq_getsockopt_fn)(void* socket, int option, void* optval, size_t* optvallen) noexcept nogil
ctypedef int (*zmq_errno_fn)() noexcept nogil
ctypedef const char* (*zmq_strerror_fn)(int errnum) noexcept nogil
ctypedef void (*zmq_version_fn)(int* major, int* minor, int* patch) noexcept nogil
ctypedef const char* (*zmq_msg_gets_fn)(const zmq_msg_t* msg, const char* prop) noexcept nogil


ctypedef struct ZmqApi:
    # One pointer per libzmq function, filled once at import by orbitmesh._core._libzmq.
    zmq_msg_init_fn zmq_msg_init
    zmq_msg_init_size_fn zmq_msg_init_size
    zmq_msg_init_data_fn zmq_msg_init_data  # with ffn NULL: a view of constant data, no allocation
    zmq_msg_data_fn zmq_msg_data
    zmq_msg_size_fn zmq_msg_size
    zmq_msg_more_fn zmq_msg_more
    zmq_msg_close_fn zmq_msg_close
    zmq_msg_copy_fn zmq_msg_copy
    zmq_msg_move_fn zmq_msg_move
    zmq_msg_send_fn zmq_msg_send
    zmq_msg_recv_fn zmq_msg_recv
    zmq_poll_fn zmq_poll
    zmq_getsockopt_fn zmq_getsockopt
    zmq_errno_fn zmq_errno
    zmq_strerror_fn zmq_strerror
    zmq_version_fn zmq_version
    zmq_msg_gets_fn zmq_msg_gets
