# distutils: language = c++
"""Broker data plane, compiled. The behaviour is that of ``_dataplane_py.py`` (read it first:
its docstring is the control protocol); this file only makes it fast.

The loop runs without the GIL: messages are libzmq ``zmq_msg_t`` parts received and sent
with pyzmq's own libzmq (see ``_libzmq.pyx``), routing state lives in C++ containers, and no
Python object is made per message. The GIL is taken only to format the message of a
malformed header, and to check for signals on EINTR.
"""

from cython.operator cimport dereference as deref, preincrement as inc
from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdio cimport snprintf
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy, strlen
from libcpp cimport bool as cbool
from libcpp.deque cimport deque
from libcpp.string cimport string
from libcpp.unordered_map cimport unordered_map
from libcpp.utility cimport pair
from libcpp.vector cimport vector
from posix.time cimport CLOCK_MONOTONIC, CLOCK_REALTIME, clock_gettime, timespec

from orbitmesh._core._frame_c cimport (
    OM_HEADER_SIZE,
    OM_INLINE_MAX,
    OM_PACK_LIMIT,
    OM_PACKED_VERSION,
    OM_TOKEN_SIZE,
    om_check_header,
    om_check_packed,
    om_is_packed,
    om_ld32,
    om_normalize_packed,
    om_packable,
    om_st32,
    om_hdr_corr,
    om_hdr_deadline,
    om_hdr_flags,
    om_hdr_aux,
    om_hdr_job,
    om_hdr_kind,
    om_token_generation,
    om_token_index,
    om_write_header,
    om_write_token,
)
from orbitmesh._core._libzmq cimport raise_zmq_error, socket_handle, zmq_api
from orbitmesh._core._zmqabi cimport (
    EAGAIN,
    EHOSTUNREACH,
    EINTR,
    ENOMEM,
    ZMQ_DONTWAIT,
    ZMQ_POLLIN,
    ZMQ_SNDMORE,
    ZmqApi,
    zmq_msg_t,
    zmq_pollitem_t,
)

from orbitmesh._core._dataplane_py import (
    ACL_CHECKED as _ACL_CHECKED,
    ACL_NO_REQUESTS as _ACL_NO_REQUESTS,
    COUNTERS,
    CTRL_MAX_FRAMES,
    EV,
    OP,
    STATE_ALIVE,
    STATE_LOST,
    STATE_SUSPECT,
    pack_reg_meta,
)
from orbitmesh._core._frame_py import header_error_message, packed_error_message
from orbitmesh.errors import ErrorCode

public_api = [
    "ACL_CHECKED",
    "ACL_NO_REQUESTS",
    "COUNTERS",
    "CTRL_MAX_FRAMES",
    "DataPlane",
    "EV",
    "OP",
    "STATE_ALIVE",
    "STATE_LOST",
    "STATE_SUSPECT",
    "pack_reg_meta",
]
ACL_CHECKED = _ACL_CHECKED
ACL_NO_REQUESTS = _ACL_NO_REQUESTS

# Kinds, flags, route types, roles and error codes, as in protocol.py / errors.py.
cdef enum:
    K_HELLO = 1
    K_HEARTBEAT = 3
    K_REQUEST = 4
    K_RUNNING = 6
    K_REPLY = 7
    K_STREAM_ITEM = 8
    K_STREAM_END = 9
    K_ERROR = 10
    K_CANCEL = 11
    K_RAW = 12
    K_EVENT = 13
    K_BYE = 14
    K_CREDIT = 15
    K_QUERY = 16
    F_TRACKED = 0x0001
    F_DRAIN = 0x0004
    R_NAME = 1
    R_CAPABILITY = 2
    R_GROUP = 3
    R_COMMAND = 4
    R_LABELS = 5
    S_LEAST_LOADED = 0
    S_ROUND_ROBIN = 1
    S_RANDOM = 2
    ROLE_AGENT = 2
    ST_ALIVE = 0
    ST_SUSPECT = 1
    MAX_FRAMES = 64
    BATCH = 256
    C_RECEIVED = 0
    C_FWD_REQUESTS = 1
    C_FWD_REPLIES = 2
    C_TO_CONTROL = 3
    C_MALFORMED = 4
    C_ERRORS_SENT = 5
    C_QUEUED = 6
    C_QUEUE_EXPIRED = 7
    C_STALE = 8
    C_UNROUTABLE = 9
    C_AGENTS_LOST = 10
    C_LIMITED = 11
    C_FORBIDDEN = 12
    C_REPLAYED = 13
    N_COUNTERS = 14
    A_NO_REQUESTS = 0x1
    A_CHECKED = 0x2
    E_BAD_FRAMES = 104
    E_FRAME_TOO_LARGE = 105
    E_BAD_ROUTE = 106
    E_UNEXPECTED_KIND = 109
    E_NOT_REGISTERED = 200
    E_NO_SUCH_AGENT = 203
    E_NO_AGENT_AVAILABLE = 204
    E_TOO_MANY_REQUESTS = 212
    E_RATE_LIMITED = 213
    E_FORBIDDEN = 216
    E_REPLAYED = 217
    E_QUEUE_FULL = 205
    E_DEADLINE_EXCEEDED = 206
    E_AGENT_LOST = 207
    E_CANCELLED = 302
    E_AGENT_BUSY = 304
    OP_SEND = 1
    OP_REG = 2
    OP_UNREG = 3
    OP_INJECT = 4
    OP_STOP = 5
    OP_SIGNAL = 6
    OP_BATCH = 7
    OP_PACKED = 8
    CTRL_CAP = 4096
    EV_MSG = 1
    EV_LOST = 2
    EV_JOB = 3
    EV_DISPATCHED = 4
    EV_STATE = 5
    EV_LOAD = 6
    EV_STOPPED = 7
    EV_HELLO = 8
    EV_PACKED = 9
    EV_DIRECT = 16384  # an event of more bytes goes up as it is, not packed (see _ev_begin)

if CTRL_MAX_FRAMES != CTRL_CAP or len(COUNTERS) != N_COUNTERS or (_ACL_NO_REQUESTS, _ACL_CHECKED) != (A_NO_REQUESTS, A_CHECKED):
    raise ImportError("orbitmesh._core._dataplane_c is out of step with _dataplane_py (COUNTERS, ACL flags)")


cdef struct Peer:
    cbool used          # slot holds a registered peer
    uint8_t role        # Role.CLIENT / Role.AGENT
    uint8_t state       # ST_ALIVE / ST_SUSPECT
    cbool draining      # said BYE(DRAIN): no new work
    uint32_t capacity   # requests it may run at once (agents)
    uint32_t inflight   # requests dispatched and not yet answered
    uint32_t gen        # bumped when the slot is reused, so stale entries are told apart
    int64_t last_seen   # monotonic ms of its last message
    uint32_t pending    # its own untracked requests in flight or queued (as a client)
    uint32_t acl        # ACL_* flags from the control plane
    uint32_t running    # what its last HEARTBEAT reported running (aux)
    uint64_t last_corr  # corr of its last REQUEST / RAW: each must be greater
    cbool packed        # its session speaks protocol 2: what is sent to it is packed
    double tokens       # rate-limit bucket
    int64_t refill      # monotonic ms the bucket was last topped up
    string rid          # ROUTER routing id
    string name         # agent name
    vector[string] keys  # typed route keys (type byte + key) it is indexed under, name first


cdef struct Entry:
    cbool used          # slot holds an in-flight request
    cbool tracked       # a tracked job: the control plane gets copies
    uint32_t gen        # token generation
    uint32_t agent      # agent peer slot
    uint32_t agent_gen  # that slot's generation at dispatch
    uint64_t corr       # the client's correlation id
    uint64_t job        # job id (tracked) or 0
    uint32_t aux        # the request's aux: a tracked job's lease, echoed on errors about it
    string client       # the client's routing id


cdef struct QItem:
    string client       # routing id of the client that sent it
    zmq_msg_t* frames   # hdr, route, command/body... (malloc'd, owned by the queue)
    int nframes
    uint64_t deadline   # wall-clock ms
    uint64_t seq        # arrival order across all queues


cdef inline int64_t _mono_ms() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <int64_t>ts.tv_sec * 1000 + ts.tv_nsec // 1000000


cdef inline int64_t _wall_ms() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_REALTIME, &ts)
    return <int64_t>ts.tv_sec * 1000 + ts.tv_nsec // 1000000


cdef inline string _typed_key(uint8_t rtype, const char* key, size_t n) noexcept nogil:
    cdef string out
    out.reserve(n + 1)
    out.push_back(<char>rtype)
    out.append(key, n)
    return out


cdef class DataPlane:
    """The broker's forwarding loop over one ROUTER socket (see ``_dataplane_py.DataPlane``)."""

    cdef object _router_obj        # keeps the pyzmq sockets alive while the loop uses them
    cdef object _control_obj
    cdef void* _router
    cdef void* _control
    cdef ZmqApi* _z
    cdef int64_t _hb
    cdef int64_t _woke  # monotonic ms of the loop's last wake-up
    cdef int64_t _liveness
    cdef uint64_t _max_frame
    cdef uint64_t _queue_limit
    cdef int64_t _default_queue_ms
    cdef uint32_t _max_pending             # per-client limit on requests in flight or queued; 0 = none
    cdef double _rate                      # per-client requests per second; 0 = no limit
    cdef double _burst                     # the bucket's size
    cdef uint64_t _rng
    cdef cbool _running
    cdef uint64_t _counters[N_COUNTERS]
    cdef zmq_msg_t* _in                    # parts of the message being handled
    cdef int _nin
    cdef int _in_cap                       # the cap of the message in self._in (see _recv)
    cdef vector[Peer] _peers
    cdef vector[uint32_t] _free_peers
    cdef unordered_map[string, uint32_t] _by_rid
    cdef unordered_map[string, uint32_t] _by_name
    cdef unordered_map[string, vector[uint32_t]] _index
    cdef unordered_map[string, uint32_t] _rr
    cdef vector[Entry] _entries
    cdef vector[uint32_t] _free_entries
    cdef unordered_map[string, deque[QItem]] _queues
    cdef vector[string] _queue_order       # queue keys in creation order (the reference's dict order)
    cdef vector[uint32_t] _peer_order      # peer slots in registration order
    cdef uint64_t _queued
    cdef uint64_t _seq
    cdef string _text                    # the message of the last refusal _select decided
    cdef zmq_msg_t _packed_in            # the packed header frame self._in[1] was unpacked from
    cdef cbool _has_packed_in
    cdef unsigned char _hdr_in[OM_HEADER_SIZE]  # the header it carries (self._in[1] views it)
    cdef uint64_t _views                 # bit i: self._in[i] views _hdr_in or _packed_in (see _own)
    cdef cbool _o_open                   # a packed header frame is being built (see _out)
    cdef int _o_k                        # parts inline in it; -1 before the header
    cdef string _o_buf
    cdef string _ev_buf                  # events not sent up yet, packed (see _ev_begin)
    cdef size_t _ev_at                   # where the event being packed starts in _ev_buf
    cdef int _ev_n                       # its parts so far

    def __cinit__(self):
        self._z = NULL
        self._in = <zmq_msg_t*>malloc(sizeof(zmq_msg_t) * (CTRL_CAP + 1))
        if self._in == NULL:
            raise MemoryError()
        self._nin = 0
        self._has_packed_in = False

    def __dealloc__(self):
        cdef pair[string, deque[QItem]] kv
        cdef QItem item
        if self._z == NULL:
            free(self._in)
            return
        if self._in != NULL:
            self._close_in()
            free(self._in)
            self._in = NULL
        for kv in self._queues:
            for item in kv.second:
                self._free_frames(item.frames, item.nframes)
        self._queues.clear()

    def __init__(
        self,
        router,
        control,
        *,
        int heartbeat_ms=1000,
        int liveness=5,
        max_frame_bytes=64 * 1024 * 1024,
        queue_limit=10_000,
        default_queue_ms=30_000,
        seed=None,
        client_max_inflight=0,
        client_rate=0.0,
        client_burst=0,
    ):
        cdef int i
        if heartbeat_ms <= 0 or liveness < 2:
            raise ValueError("heartbeat_ms must be > 0 and liveness >= 2")
        self._router_obj = router
        self._control_obj = control
        self._router = socket_handle(router)
        self._control = socket_handle(control)
        self._z = zmq_api()
        self._hb = heartbeat_ms
        self._woke = _mono_ms()
        self._liveness = liveness
        self._max_frame = max_frame_bytes
        self._queue_limit = queue_limit
        self._default_queue_ms = default_queue_ms
        self._max_pending = client_max_inflight
        self._rate = client_rate
        self._burst = float(client_burst or max(1, int(client_rate)))
        self._rng = (<uint64_t>(seed if seed is not None else _mono_ms())) * 6364136223846793005ULL + 1442695040888963407ULL
        if self._rng == 0:
            self._rng = 88172645463325252ULL
        for i in range(N_COUNTERS):
            self._counters[i] = 0
        self._queued = 0
        self._seq = 0
        self._running = False

    # ------------------------------------------------------------------ loop

    def run(self):
        """Serve until OP_STOP arrives on the control socket; then send EV_STOPPED."""
        cdef int err
        self._running = True
        with nogil:
            err = self._loop()
        if err:
            raise_zmq_error(err)

    cdef int _loop(self) noexcept nogil:
        cdef zmq_pollitem_t items[2]
        cdef int64_t now, next_tick, timeout
        cdef int rc, i, err
        items[0].socket = self._control
        items[0].fd = 0
        items[0].events = ZMQ_POLLIN
        items[1].socket = self._router
        items[1].fd = 0
        items[1].events = ZMQ_POLLIN
        next_tick = _mono_ms() + self._hb
        while self._running:
            now = _mono_ms()
            timeout = next_tick - now
            if self._queued and timeout > 50:
                timeout = 50
            if timeout < 0:
                timeout = 0
            rc = self._z.zmq_poll(items, 2, <long>timeout)
            self._woke = _mono_ms()  # a peer's last sign of life: this wake-up (one clock read a batch)
            if rc < 0:
                err = self._z.zmq_errno()
                if err == EINTR:
                    continue  # signals are the main thread's; this loop only resumes
                return err
            if items[0].revents & ZMQ_POLLIN:
                for i in range(BATCH):
                    rc = self._recv(self._control, CTRL_CAP)
                    if rc == EAGAIN:
                        break
                    if rc:
                        return rc
                    self._on_control()
                    self._close_in()
                    if not self._running:
                        break
            if self._running and items[1].revents & ZMQ_POLLIN:
                for i in range(BATCH):
                    rc = self._recv(self._router, MAX_FRAMES)
                    if rc == EAGAIN:
                        break
                    if rc:
                        return rc
                    self._on_router()
                    self._close_in()
            if self._queued:
                self._expire_queue(_wall_ms())
            now = _mono_ms()
            if now >= next_tick:
                self._tick(now)
                next_tick = now + self._hb
            self._ev_flush()
        self._send_stopped()
        return 0

    # ------------------------------------------------------- message parts

    cdef int _recv(self, void* sock, int cap) noexcept nogil:
        """Receive one whole message into self._in (parts past ``cap`` + 1 are counted, then
        dropped); 0, EAGAIN, or another errno."""
        cdef int n = 0, rc, err, extra = 0, more
        cdef zmq_msg_t spare
        self._nin = 0
        self._in_cap = cap
        while True:
            if n <= cap:
                self._z.zmq_msg_init(&self._in[n])
                rc = self._z.zmq_msg_recv(&self._in[n], sock, ZMQ_DONTWAIT if n == 0 else 0)
                if rc < 0:
                    err = self._z.zmq_errno()
                    self._z.zmq_msg_close(&self._in[n])
                    if err == EINTR:
                        continue
                    self._nin = n
                    return err
                n += 1
                if not self._z.zmq_msg_more(&self._in[n - 1]):
                    break
            else:
                self._z.zmq_msg_init(&spare)
                rc = self._z.zmq_msg_recv(&spare, sock, 0)
                if rc < 0:
                    err = self._z.zmq_errno()
                    self._z.zmq_msg_close(&spare)
                    if err == EINTR:
                        continue
                    self._nin = n
                    return err
                extra += 1
                more = self._z.zmq_msg_more(&spare)
                self._z.zmq_msg_close(&spare)
                if not more:
                    break
        self._nin = n + extra  # > cap + 1 tells the caller it was too long
        return 0

    cdef void _close_in(self) noexcept nogil:
        cdef int i
        cdef int n = self._nin if self._nin <= self._in_cap + 1 else self._in_cap + 1
        for i in range(n):
            self._z.zmq_msg_close(&self._in[i])
        self._nin = 0
        self._views = 0
        if self._has_packed_in:
            self._z.zmq_msg_close(&self._packed_in)
            self._has_packed_in = False

    cdef void _unpack_in(self) noexcept nogil:
        """Replace the packed header frame self._in[1] (checked, not truncated) by the header and
        the parts it carries; it is kept aside until _close_in, for its connection's metadata and
        to be forwarded as it is (_pass_packed).

        The new parts are views (libzmq's constant messages: no allocation, no copy) of the packed
        frame's bytes and of the header copied into _hdr_in. Whatever the loop reads or packs
        into another frame is read from there; a view that is to outlive the message (sent as a
        frame of its own, or queued) becomes a message of its own first (_own)."""
        cdef unsigned char* p = <unsigned char*>self._z.zmq_msg_data(&self._in[1])
        cdef int k = p[12], i
        cdef size_t at = OM_HEADER_SIZE, ln
        # zmq_msg_t moves by value (libzmq's msg_t::move is a struct copy and a re-init)
        for i in range(self._nin - 1, 1, -1):
            memcpy(&self._in[i + k], &self._in[i], sizeof(zmq_msg_t))
        for i in range(k):
            ln = om_ld32(p + at)
            self._z.zmq_msg_init_data(&self._in[2 + i], p + at + 4, ln, NULL, NULL)
            at += 4 + ln
        memcpy(&self._packed_in, &self._in[1], sizeof(zmq_msg_t))
        self._has_packed_in = True
        memcpy(self._hdr_in, p, OM_HEADER_SIZE)
        om_normalize_packed(self._hdr_in)
        self._z.zmq_msg_init_data(&self._in[1], self._hdr_in, OM_HEADER_SIZE, NULL, NULL)
        self._views = ((<uint64_t>1 << (k + 1)) - 1) << 1  # self._in[1 .. k + 1]
        self._nin += k
        self._in_cap += k  # _close_in closes every part

    cdef int _own(self, zmq_msg_t* m) noexcept nogil:
        """If ``m`` is one of _unpack_in's views, make it a message with its own copy of the
        bytes, in place; 0, or ENOMEM."""
        cdef size_t i
        cdef zmq_msg_t copy
        if not self._views or m < self._in or m >= self._in + 64:
            return 0
        i = <size_t>(m - self._in)
        if not (self._views >> i) & 1:
            return 0
        if self._z.zmq_msg_init_size(&copy, self._size(m)) != 0:
            return ENOMEM
        memcpy(self._z.zmq_msg_data(&copy), self._z.zmq_msg_data(m), self._size(m))
        self._z.zmq_msg_close(m)  # a view: nothing to free
        memcpy(m, &copy, sizeof(zmq_msg_t))
        self._views &= ~(<uint64_t>1 << i)
        return 0

    cdef inline const unsigned char* _data(self, zmq_msg_t* m) noexcept nogil:
        return <const unsigned char*>self._z.zmq_msg_data(m)

    cdef inline size_t _size(self, zmq_msg_t* m) noexcept nogil:
        return self._z.zmq_msg_size(m)

    cdef inline string _str(self, zmq_msg_t* m) noexcept nogil:
        return string(<const char*>self._z.zmq_msg_data(m), self._z.zmq_msg_size(m))

    cdef void _free_frames(self, zmq_msg_t* frames, int n) noexcept nogil:
        cdef int i
        if frames != NULL:
            for i in range(n):
                self._z.zmq_msg_close(&frames[i])
            free(frames)

    # --------------------------------------------------------------- sending

    cdef int _send_bytes(self, void* sock, const char* data, size_t n, int more) noexcept nogil:
        cdef zmq_msg_t m
        cdef int rc, err
        self._z.zmq_msg_init_size(&m, n)
        if n:
            memcpy(self._z.zmq_msg_data(&m), data, n)
        while True:
            rc = self._z.zmq_msg_send(&m, sock, ZMQ_DONTWAIT | (ZMQ_SNDMORE if more else 0))
            if rc >= 0:
                return 0
            err = self._z.zmq_errno()
            if err != EINTR:
                self._z.zmq_msg_close(&m)
                return err

    cdef int _send_msg(self, void* sock, zmq_msg_t* m, int more) noexcept nogil:
        """Send one part (consumed on success; the caller closes it either way)."""
        cdef int rc, err = self._own(m)
        if err:
            return err
        while True:
            rc = self._z.zmq_msg_send(m, sock, ZMQ_DONTWAIT | (ZMQ_SNDMORE if more else 0))
            if rc >= 0:
                return 0
            err = self._z.zmq_errno()
            if err != EINTR:
                return err

    cdef int _send_parts(self, void* sock, zmq_msg_t* parts, int n) noexcept nogil:
        """Send ``parts`` as the rest of a message already begun with SNDMORE."""
        cdef int i, err
        for i in range(n):
            err = self._send_msg(sock, &parts[i], i + 1 < n)
            if err:
                return err
        return 0

    # A message to a peer goes out through _out_begin and _out: packed for a protocol-2 session
    # (the header frame carries the leading parts, as _frame_py.pack_parts), else part by part.

    cdef int _out_begin(self, const string& rid, cbool packed) noexcept nogil:
        """Start a message to peer ``rid``; 0, or the errno (counted)."""
        self._o_open = packed
        self._o_k = -1
        return self._begin(rid, 1)

    cdef int _out(self, const char* data, size_t n, zmq_msg_t* m, cbool last) noexcept nogil:
        """The next part of the message begun by _out_begin: ``m`` (moved, not copied, if it
        goes as a frame of its own; the caller closes it either way), or data[0:n]."""
        cdef int err
        cdef unsigned char lb[4]
        if self._o_open:
            if self._o_k < 0:
                if om_packable(<const unsigned char*>data, n):
                    self._o_buf.assign(data, n)
                    self._o_k = 0
                    return self._out_close(False) if last else 0
                self._o_open = False  # no protocol-1 header first: sent as it is
            elif self._o_k < OM_INLINE_MAX and self._o_buf.size() + 4 + n <= OM_PACK_LIMIT:
                om_st32(lb, <uint32_t>n)
                self._o_buf.append(<const char*>lb, 4)
                self._o_buf.append(data, n)
                self._o_k += 1
                return self._out_close(False) if last else 0
            else:
                err = self._out_close(True)
                if err:
                    return err
        if m != NULL:
            return self._send_msg(self._router, m, not last)
        return self._send_bytes(self._router, data, n, not last)

    cdef int _out_close(self, cbool more) noexcept nogil:
        """Send the packed header frame built so far."""
        cdef unsigned char* p = <unsigned char*>&self._o_buf[0]
        self._o_open = False
        p[2] = OM_PACKED_VERSION
        p[12] = <unsigned char>self._o_k
        return self._send_bytes(self._router, self._o_buf.data(), self._o_buf.size(), more)

    cdef inline int _out_msg(self, zmq_msg_t* m, cbool last) noexcept nogil:
        return self._out(<const char*>self._z.zmq_msg_data(m), self._z.zmq_msg_size(m), m, last)

    cdef int _out_parts(self, zmq_msg_t* parts, int n) noexcept nogil:
        """The remaining ``n`` parts of the message, the last of them last."""
        cdef int i, err
        for i in range(n):
            err = self._out_msg(&parts[i], i + 1 == n)
            if err:
                return err
        return 0

    cdef int _pass_packed(self, const string& rid) noexcept nogil:
        """Send the message in self._in, unpacked from a packed header frame, to packed peer
        ``rid`` as it came: that frame (moved, not copied), then the frames that followed it."""
        cdef int k = self._data(&self._packed_in)[12]
        cdef int rest = self._nin - 2 - k
        cdef int err = self._begin(rid, 1)
        if err == 0:
            err = self._send_msg(self._router, &self._packed_in, rest > 0)
            if err == 0 and rest > 0:
                err = self._send_parts(self._router, &self._in[2 + k], rest)
        return err

    cdef cbool _packed(self, const string& rid) noexcept nogil:
        """Peer ``rid`` is registered with a packed (protocol 2) session."""
        cdef unordered_map[string, uint32_t].iterator it = self._by_rid.find(rid)
        return it != self._by_rid.end() and self._peers[deref(it).second].packed

    cdef int _begin(self, const string& rid, int more) noexcept nogil:
        """Start a message to a ROUTER peer: its routing id; 0, or the errno (counted)."""
        cdef int err = self._send_bytes(self._router, rid.data(), rid.size(), more)
        if err:
            self._counters[C_UNROUTABLE] += 1
        return err

    cdef void _send_error(self, const string& rid, uint16_t code, uint64_t corr, uint64_t job,
                          const char* route, size_t route_n, const string& text) noexcept nogil:
        cdef unsigned char hdr[OM_HEADER_SIZE]
        self._counters[C_ERRORS_SENT] += 1
        om_write_header(hdr, K_ERROR, 0, code, 0, corr, job, 0)
        if self._out_begin(rid, self._packed(rid)):
            return
        if self._out(<const char*>hdr, OM_HEADER_SIZE, NULL, False):
            return
        if self._out(route, route_n, NULL, False):
            return
        self._out(text.data(), text.size(), NULL, True)

    # Events go up to the control plane packed: each is appended to _ev_buf as io.pack_messages
    # writes a message, and what a turn of the loop made goes up as one EV_PACKED message at its
    # end (_ev_flush): one part for libzmq to move and the control plane to receive per turn,
    # not ~5 per event. An event of more than EV_DIRECT bytes goes up as it is, its parts moved
    # rather than copied, after the events packed before it.

    cdef void _ev_begin(self, char ev) noexcept nogil:
        self._counters[C_TO_CONTROL] += 1
        self._ev_at = self._ev_buf.size()
        self._ev_buf.append(2, <char>0)  # its part count, set by _ev_end
        self._ev_n = 0
        self._ev_part(&ev, 1)

    cdef void _ev_part(self, const char* data, size_t n) noexcept nogil:
        cdef unsigned char lb[4]
        om_st32(lb, <uint32_t>n)
        self._ev_buf.append(<const char*>lb, 4)
        if n:
            self._ev_buf.append(data, n)
        self._ev_n += 1

    cdef void _ev_parts(self, zmq_msg_t* parts, int n) noexcept nogil:
        cdef int i
        for i in range(n):
            self._ev_part(<const char*>self._z.zmq_msg_data(&parts[i]), self._z.zmq_msg_size(&parts[i]))

    cdef void _ev_end(self) noexcept nogil:
        cdef char* p = &self._ev_buf[self._ev_at]
        p[0] = <char>(self._ev_n & 0xFF)
        p[1] = <char>(self._ev_n >> 8)

    cdef void _ev_flush(self) noexcept nogil:
        """Send the packed events up (EV_PACKED), if any."""
        cdef char e = EV_PACKED
        if self._ev_buf.empty():
            return
        if self._send_bytes(self._control, &e, 1, 1) == 0:
            self._send_bytes(self._control, self._ev_buf.data(), self._ev_buf.size(), 0)
        self._ev_buf.clear()

    cdef cbool _ev_direct(self, zmq_msg_t* parts, int n, size_t size) noexcept nogil:
        """Whether an event carrying ``parts`` and ``size`` bytes more goes up as it is (more
        than EV_DIRECT bytes after its event byte); if so, what is packed goes first."""
        cdef int i
        for i in range(n):
            size += self._z.zmq_msg_size(&parts[i])
        if size <= EV_DIRECT:
            return False
        self._ev_flush()
        self._counters[C_TO_CONTROL] += 1
        return True

    cdef void _up_error(self, uint16_t code, uint64_t corr, uint64_t job, const string& text, uint32_t aux,
                        const char* agent=NULL, size_t agent_n=0,
                        const char* route=NULL, size_t route_n=0) noexcept nogil:
        """EV_JOB to the control plane: a tracked job failed (in the broker, or its agent was lost)."""
        cdef unsigned char hdr[OM_HEADER_SIZE]
        om_write_header(hdr, K_ERROR, 0, code, aux, corr, job, 0)
        self._ev_begin(EV_JOB)
        self._ev_part(agent, agent_n)
        self._ev_part(<const char*>hdr, OM_HEADER_SIZE)
        self._ev_part(route, route_n)
        self._ev_part(text.data(), text.size())
        self._ev_end()

    cdef void _refuse(self, const string& rid, const unsigned char* hdr, uint16_t code, const string& text) noexcept nogil:
        # A tracked job's answers go to the control plane only: it decides on retries.
        cdef uint64_t corr = om_hdr_corr(hdr), job = om_hdr_job(hdr)
        if om_hdr_flags(hdr) & F_TRACKED:
            self._up_error(code, corr, job, text, om_hdr_aux(hdr))
        else:
            if self._max_pending:
                self._count(rid, -1)
            self._send_error(rid, code, corr, job, NULL, 0, text)

    cdef void _count(self, const string& rid, int delta) noexcept nogil:
        cdef unordered_map[string, uint32_t].iterator it = self._by_rid.find(rid)
        cdef Peer* p
        if it == self._by_rid.end():
            return
        p = &self._peers[deref(it).second]
        if delta < 0 and p.pending == 0:
            return
        p.pending += delta

    cdef void _up_in(self, uint8_t ev, int first) noexcept nogil:
        """Send [ev, self._in[first:]...] to the control plane."""
        cdef char e = <char>ev
        if self._ev_direct(&self._in[first], self._nin - first, 0):
            self._send_bytes(self._control, &e, 1, 1)
            self._send_parts(self._control, &self._in[first], self._nin - first)
            return
        self._ev_begin(e)
        self._ev_parts(&self._in[first], self._nin - first)
        self._ev_end()

    cdef void _up_hello(self) noexcept nogil:
        """EV_HELLO: [ev, user id, rid, hdr, ...]; the User-Id is the ZAP handler's (the CURVE key),
        read from the connection's metadata, so no peer can forge it."""
        cdef const char* uid = self._z.zmq_msg_gets(&self._packed_in if self._has_packed_in else &self._in[1], b"User-Id")
        self._ev_begin(EV_HELLO)
        self._ev_part(uid, strlen(uid) if uid != NULL else 0)
        self._ev_parts(&self._in[0], self._nin)
        self._ev_end()

    cdef void _up_small(self, uint8_t ev, const string& a, const char* b, size_t bn, int nparts) noexcept nogil:
        """Send [ev, a] or [ev, a, b] to the control plane."""
        self._ev_begin(<char>ev)
        self._ev_part(a.data(), a.size())
        if nparts > 1:
            self._ev_part(b, bn)
        self._ev_end()

    cdef void _send_stopped(self) noexcept nogil:
        cdef char e = EV_STOPPED
        self._ev_flush()
        self._send_bytes(self._control, &e, 1, 1)
        self._send_bytes(self._control, <const char*>self._counters, sizeof(uint64_t) * N_COUNTERS, 0)

    # -------------------------------------------------------------- control

    cdef void _on_control(self) noexcept nogil:
        cdef int n = self._nin
        if n < 1 or self._size(&self._in[0]) != 1:
            return
        cdef uint8_t op = self._data(&self._in[0])[0]
        cdef string rid
        if op == OP_SEND and n >= 3:
            rid = self._str(&self._in[1])
            if self._out_begin(rid, self._packed(rid)) == 0:
                self._out_parts(&self._in[2], n - 2)
        elif op == OP_REG and n >= 7:
            self._register()
        elif op == OP_UNREG and n >= 2:
            self._unregister(self._str(&self._in[1]), False)
        elif op == OP_INJECT and n >= 4:
            rid = self._str(&self._in[1])
            self._route_request(rid, &self._in[2], n - 2)
        elif op == OP_STOP:
            self._running = False
        elif op == OP_SIGNAL and n >= 4 and self._size(&self._in[2]) == OM_HEADER_SIZE:
            rid = self._str(&self._in[1])
            self._on_client_signal(rid, om_hdr_kind(self._data(&self._in[2])), om_hdr_corr(self._data(&self._in[2])), 2)
        elif op == OP_BATCH and n >= 2:
            self._on_batch()
        elif op == OP_PACKED and n == 2:
            self._on_packed()

    cdef void _on_batch(self) noexcept nogil:
        """Each message of an OP_BATCH in turn, by pointing self._in at it."""
        cdef zmq_msg_t* base = self._in
        cdef int total = self._nin, off = 2, count
        cdef const unsigned char* layout = self._data(&base[1])
        cdef size_t k, ln = self._size(&base[1])
        if total > self._in_cap + 1:
            return  # truncated by _recv: the layout no longer matches what is here
        k = 0
        while k + 1 < ln:
            count = layout[k] | (<int>layout[k + 1] << 8)
            if count < 1 or off + count > total:
                break
            self._in = base + off
            self._nin = count
            if not (self._size(&self._in[0]) == 1 and (self._data(&self._in[0])[0] == OP_BATCH or self._data(&self._in[0])[0] == OP_PACKED)):
                self._on_control()
            off += count
            k += 2
        self._in = base
        self._nin = total

    cdef void _on_packed(self) noexcept nogil:
        """Each message of an OP_PACKED in turn, by pointing self._in at its parts, made at
        self._in[2...]: views of the packed frame (self._in[1], alive until _close_in), as
        _unpack_in's are (what is to outlive the message is copied first: _own); copies for a
        message of more than 64 parts. Stops at the first message that does not add up."""
        cdef zmq_msg_t* base = self._in
        cdef zmq_msg_t* parts = base + 2
        cdef int total = self._nin, cap = self._in_cap, count, i
        cdef const unsigned char* p = self._data(&base[1])
        cdef size_t ln = self._size(&base[1]), at = 0, size
        cdef cbool fits, views
        while at + 2 <= ln:
            count = p[at] | (<int>p[at + 1] << 8)
            at += 2
            if count < 1 or count > CTRL_CAP - 1:
                break
            fits = True
            size = at
            for i in range(count):  # the whole message is checked before any of it is used
                if size + 4 > ln or size + 4 + om_ld32(p + size) > ln:
                    fits = False
                    break
                size += 4 + om_ld32(p + size)
            if not fits:
                break
            views = count <= 64
            for i in range(count):
                size = om_ld32(p + at)
                if views:
                    self._z.zmq_msg_init_data(&parts[i], <void*>(p + at + 4), size, NULL, NULL)
                elif self._z.zmq_msg_init_size(&parts[i], size) == 0:
                    memcpy(self._z.zmq_msg_data(&parts[i]), p + at + 4, size)
                else:
                    self._z.zmq_msg_init(&parts[i])  # out of memory: an empty part
                at += 4 + size
            self._in = parts
            self._nin = count
            self._in_cap = count
            self._views = ((<uint64_t>1 << count) - 1 if count < 64 else ~(<uint64_t>0)) if views else 0
            if not (self._size(&parts[0]) == 1 and (self._data(&parts[0])[0] == OP_BATCH or self._data(&parts[0])[0] == OP_PACKED)):
                self._on_control()
            for i in range(count):
                self._z.zmq_msg_close(&parts[i])
            self._views = 0
        self._in = base
        self._nin = total
        self._in_cap = cap

    cdef void _register(self) noexcept nogil:
        cdef string rid = self._str(&self._in[1])
        cdef const unsigned char* meta = self._data(&self._in[2])
        if self._size(&self._in[2]) < 9:
            return
        cdef uint8_t role = meta[0]
        cdef uint32_t capacity = meta[1] | (<uint32_t>meta[2] << 8) | (<uint32_t>meta[3] << 16) | (<uint32_t>meta[4] << 24)
        cdef uint32_t acl = meta[5] | (<uint32_t>meta[6] << 8) | (<uint32_t>meta[7] << 16) | (<uint32_t>meta[8] << 24)
        cdef uint32_t slot, inflight = 0
        cdef unordered_map[string, uint32_t].iterator it = self._by_rid.find(rid)
        cdef int t
        cdef Peer blank
        if it != self._by_rid.end():
            slot = deref(it).second
            inflight = self._peers[slot].inflight
            self._unindex(slot, False)
        else:
            if not self._free_peers.empty():
                slot = self._free_peers.back()
                self._free_peers.pop_back()
            else:
                slot = self._peers.size()
                self._peers.push_back(blank)
                self._peers[slot].gen = 0
            self._peer_order.push_back(slot)
        cdef Peer* p = &self._peers[slot]
        p.used = True
        p.role = role
        p.state = ST_ALIVE
        p.draining = False
        p.capacity = capacity
        p.inflight = inflight
        p.last_seen = _mono_ms()
        p.refill = p.last_seen
        p.tokens = self._burst
        if it == self._by_rid.end():
            p.pending = 0
            p.last_corr = 0
        p.acl = acl
        p.running = 0
        p.packed = self._size(&self._in[2]) >= 10 and meta[9] >= OM_PACKED_VERSION
        p.rid = rid
        p.name = self._str(&self._in[3])
        p.keys.clear()
        self._by_rid[rid] = slot
        if role != ROLE_AGENT:
            return
        p.keys.push_back(_typed_key(R_NAME, p.name.data(), p.name.size()))
        for t in range(3):
            self._split_keys(p, R_CAPABILITY + t, &self._in[4 + t])
        self._by_name[p.name] = slot
        cdef size_t k
        for k in range(1, p.keys.size()):
            self._index[p.keys[k]].push_back(slot)
        self._drain_for(slot)

    cdef void _split_keys(self, Peer* p, uint8_t rtype, zmq_msg_t* m) noexcept nogil:
        cdef const char* d = <const char*>self._z.zmq_msg_data(m)
        cdef size_t n = self._z.zmq_msg_size(m), start = 0, i
        for i in range(n + 1):
            if i == n or d[i] == 0:
                if i > start:
                    p.keys.push_back(_typed_key(rtype, d + start, i - start))
                start = i + 1

    cdef void _unindex(self, uint32_t slot, cbool fail_queued) noexcept nogil:
        cdef Peer* p = &self._peers[slot]
        cdef size_t k, j
        cdef unordered_map[string, uint32_t].iterator nit
        cdef unordered_map[string, vector[uint32_t]].iterator it
        if p.role != ROLE_AGENT or p.keys.empty():
            return
        nit = self._by_name.find(p.name)
        if nit != self._by_name.end() and deref(nit).second == slot:
            self._by_name.erase(nit)
            if fail_queued:
                self._fail_queue(p.keys[0], E_AGENT_LOST, string(b"agent left before it could serve"))
        for k in range(1, p.keys.size()):
            it = self._index.find(p.keys[k])
            if it == self._index.end():
                continue
            for j in range(deref(it).second.size()):
                if deref(it).second[j] == slot:
                    deref(it).second.erase(deref(it).second.begin() + j)
                    break
            if deref(it).second.empty():
                self._index.erase(it)
                if fail_queued:
                    self._fail_queue(p.keys[k], E_NO_AGENT_AVAILABLE, string(b"no agent left for the selector"))

    cdef void _unregister(self, string rid, cbool lost) noexcept nogil:
        cdef unordered_map[string, uint32_t].iterator it = self._by_rid.find(rid)
        cdef uint32_t slot, i
        cdef Peer* p
        cdef Entry* e
        cdef unsigned char cancel[OM_HEADER_SIZE]
        cdef unsigned char token[OM_TOKEN_SIZE]
        if it == self._by_rid.end():
            return
        slot = deref(it).second
        self._by_rid.erase(it)
        self._unindex(slot, True)
        p = &self._peers[slot]
        if p.role == ROLE_AGENT and lost:
            self._counters[C_AGENTS_LOST] += 1
        self._text.assign(b"agent ")
        self._text.append(p.name)
        self._text.append(b" was lost")
        for i in range(self._entries.size()):
            e = &self._entries[i]
            if not e.used:
                continue
            if e.agent == slot and e.agent_gen == p.gen:
                self._fail_entry(i, E_AGENT_LOST, self._text)
            elif not e.tracked and e.client == rid:
                # Nobody waits for this answer any more: stop the work (a tracked job goes on).
                om_write_header(cancel, K_CANCEL, 0, 0, 0, e.corr, e.job, 0)
                om_write_token(token, i, e.gen)
                if self._out_begin(self._peers[e.agent].rid, self._peers[e.agent].packed) == 0:
                    self._out(<const char*>cancel, OM_HEADER_SIZE, NULL, False)
                    self._out(<const char*>token, OM_TOKEN_SIZE, NULL, True)
        p.used = False
        p.keys.clear()
        p.gen += 1
        self._free_peers.push_back(slot)
        for i in range(self._peer_order.size()):
            if self._peer_order[i] == slot:
                self._peer_order.erase(self._peer_order.begin() + i)
                break
        if lost:
            self._up_small(EV_LOST, rid, NULL, 0, 1)

    cdef void _fail_entry(self, uint32_t index, uint16_t code, const string& text) noexcept nogil:
        cdef Entry* e = &self._entries[index]
        cdef unsigned char token[OM_TOKEN_SIZE]
        om_write_token(token, index, e.gen)
        if e.tracked:
            self._up_error(code, e.corr, e.job, text, e.aux, self._peers[e.agent].rid.data(), self._peers[e.agent].rid.size(),
                           <const char*>token, OM_TOKEN_SIZE)
        else:
            self._send_error(e.client, code, e.corr, e.job, <const char*>token, OM_TOKEN_SIZE, text)
        self._free_entry(index)

    # --------------------------------------------------------------- router

    cdef void _malformed(self, const string& rid, uint16_t code, uint64_t corr, const string& text) noexcept nogil:
        self._counters[C_MALFORMED] += 1
        self._send_error(rid, code, corr, 0, NULL, 0, text)

    cdef void _bad_packed(self, const string& rid, int code, uint64_t corr,
                          const unsigned char* hdr, size_t hn) noexcept with gil:
        text = packed_error_message(code, (<const char*>hdr)[:hn]).encode()
        self._malformed(rid, <uint16_t>code, corr, text)

    cdef void _bad_header(self, const string& rid, int code, uint64_t corr,
                          const unsigned char* hdr, size_t hn) noexcept with gil:
        # Malformed input only: the one place the loop takes the GIL, for the message text.
        text = header_error_message(code, (<const char*>hdr)[:hn]).encode()
        self._malformed(rid, <uint16_t>code, corr, text)

    cdef void _on_router(self) noexcept nogil:
        cdef int n = self._nin, i
        cdef string rid = self._str(&self._in[0])
        cdef const unsigned char* hdr
        cdef size_t hn
        cdef int code
        cdef uint64_t corr
        cdef uint8_t kind
        cdef char buf[128]
        cdef unsigned char packed_hdr[OM_HEADER_SIZE]
        cdef int64_t now
        self._counters[C_RECEIVED] += 1
        if n < 2:
            self._malformed(rid, E_BAD_FRAMES, 0, string(b"message has no header frame"))
            return
        hdr = self._data(&self._in[1])
        hn = self._size(&self._in[1])
        if om_is_packed(hdr, hn):
            code = om_check_packed(hdr, hn)
            if code:
                self._bad_packed(rid, code, om_hdr_corr(hdr) if hn >= OM_HEADER_SIZE else 0, hdr, hn)
                return
            if n <= self._in_cap + 1:
                self._unpack_in()
                n = self._nin
                hdr = self._data(&self._in[1])
                hn = OM_HEADER_SIZE
            else:  # too many frames (truncated by _recv): the header, then the count, decide
                memcpy(packed_hdr, hdr, OM_HEADER_SIZE)
                om_normalize_packed(packed_hdr)
                n += hdr[12]
                hdr = packed_hdr
                hn = OM_HEADER_SIZE
        code = om_check_header(hdr, hn)
        if code:
            corr = om_hdr_corr(hdr) if hn == OM_HEADER_SIZE else 0
            self._bad_header(rid, code, corr, hdr, hn)
            return
        kind = om_hdr_kind(hdr)
        corr = om_hdr_corr(hdr)
        if n > MAX_FRAMES:
            snprintf(buf, sizeof(buf), "message has %d frames, at most %d", n - 1, MAX_FRAMES - 1)
            self._malformed(rid, E_BAD_FRAMES, corr, string(<const char*>buf))
            return
        for i in range(n):
            if self._size(&self._in[i]) > self._max_frame:
                snprintf(buf, sizeof(buf), "frame of %zu bytes, at most %llu",
                         self._size(&self._in[i]), <unsigned long long>self._max_frame)
                self._malformed(rid, E_FRAME_TOO_LARGE, corr, string(<const char*>buf))
                return
        cdef unordered_map[string, uint32_t].iterator it = self._by_rid.find(rid)
        if it == self._by_rid.end():
            if kind == K_HELLO:
                self._up_hello()
            else:
                self._send_error(rid, E_NOT_REGISTERED, corr, 0, NULL, 0, string(b"say HELLO first"))
            return
        cdef uint32_t slot = deref(it).second
        cdef Peer* p = &self._peers[slot]
        p.last_seen = self._woke
        cdef char state
        if p.state == ST_SUSPECT:
            p.state = ST_ALIVE
            state = ST_ALIVE
            self._up_small(EV_STATE, rid, &state, 1, 2)
        if kind == K_HEARTBEAT:
            p.running = om_hdr_aux(hdr)  # the agent's own load
            return
        cdef const unsigned char* route
        if kind == K_REQUEST or kind == K_RAW:
            if n < (4 if kind == K_REQUEST else 3):
                self._malformed(rid, E_BAD_FRAMES, corr, string(b"request needs route and command frames"))
                return
            if p.acl & A_NO_REQUESTS:
                self._counters[C_FORBIDDEN] += 1
                self._send_error(rid, E_FORBIDDEN, corr, 0, NULL, 0, string(b"this key may not send requests"))
                return
            if corr <= p.last_corr:
                self._counters[C_REPLAYED] += 1
                snprintf(buf, sizeof(buf), "request corr %llu is not above the session's last (%llu): a replay",
                         <unsigned long long>corr, <unsigned long long>p.last_corr)
                self._send_error(rid, E_REPLAYED, corr, 0, NULL, 0, string(<const char*>buf))
                return
            p.last_corr = corr
            if self._rate > 0:
                now = _mono_ms()
                p.tokens = p.tokens + <double>(now - p.refill) * self._rate / 1000.0
                if p.tokens > self._burst:
                    p.tokens = self._burst
                p.refill = now
                if p.tokens < 1.0:
                    self._counters[C_LIMITED] += 1
                    self._send_error(rid, E_RATE_LIMITED, corr, 0, NULL, 0, string(b"request rate limit reached"))
                    return
                p.tokens -= 1.0
            if self._max_pending and not (om_hdr_flags(hdr) & F_TRACKED) and p.pending >= self._max_pending:
                self._counters[C_LIMITED] += 1
                self._send_error(rid, E_TOO_MANY_REQUESTS, corr, 0, NULL, 0, string(b"too many requests in flight"))
                return
            route = self._data(&self._in[2])
            if (om_hdr_flags(hdr) & F_TRACKED or (self._size(&self._in[2]) >= 1 and route[0] == R_LABELS)
                    or p.acl & A_CHECKED):
                self._up_in(EV_MSG, 0)
            else:
                self._route_request(rid, &self._in[1], n - 1)
            return
        if kind == K_RUNNING or kind == K_REPLY or kind == K_STREAM_ITEM or kind == K_STREAM_END or kind == K_ERROR:
            if n < 3:
                self._malformed(rid, E_BAD_FRAMES, corr, string(b"reply needs a route (token) frame"))
                return
            self._on_agent_reply(slot, kind)
            return
        if kind == K_CANCEL or kind == K_CREDIT:
            if n < 3:
                self._malformed(rid, E_BAD_FRAMES, corr, string(b"cancel / credit needs a route frame"))
                return
            self._on_client_signal(rid, kind, corr, 1)
            return
        if kind == K_BYE:
            if om_hdr_flags(hdr) & F_DRAIN:
                p.draining = True
            else:
                self._unregister(rid, False)
            self._up_in(EV_MSG, 0)
            return
        if kind == K_HELLO:
            self._up_hello()
            return
        if kind == K_QUERY or kind == K_EVENT:
            self._up_in(EV_MSG, 0)
            return
        snprintf(buf, sizeof(buf), "a peer may not send kind %d", <int>kind)
        self._malformed(rid, E_UNEXPECTED_KIND, corr, string(<const char*>buf))

    # -------------------------------------------------------------- routing

    cdef inline cbool _has_credit(self, uint32_t slot) noexcept nogil:
        cdef Peer* p = &self._peers[slot]
        return p.state == ST_ALIVE and not p.draining and p.inflight < p.capacity

    cdef inline uint64_t _random(self) noexcept nogil:
        # xorshift64*: selection needs spread, not secrecy
        self._rng ^= self._rng >> 12
        self._rng ^= self._rng << 25
        self._rng ^= self._rng >> 27
        return self._rng * 2685821657736338717ULL

    cdef int64_t _select(self, zmq_msg_t* frames, int n, uint16_t* code) noexcept nogil:
        """Pick an agent slot with credit for request ``frames`` (hdr, route, ...): the slot,
        -1 when matching agents exist but all are busy, or -2 with ``code`` and self._text set."""
        cdef const unsigned char* route = self._data(&frames[1])
        cdef size_t rn = self._size(&frames[1])
        cdef uint8_t rtype, strategy
        cdef string key
        cdef unordered_map[string, uint32_t].iterator nit
        cdef unordered_map[string, vector[uint32_t]].iterator it
        if rn < 2 or route[0] < R_NAME or route[0] > R_COMMAND or route[1] > S_RANDOM:
            code[0] = E_BAD_ROUTE
            self._text.assign(b"bad route frame")
            return -2
        rtype = route[0]
        strategy = route[1]
        if rtype == R_NAME:
            key = string(<const char*>route + 2, rn - 2)
            nit = self._by_name.find(key)
            if nit == self._by_name.end():
                code[0] = E_NO_SUCH_AGENT
                self._text.assign(b"no agent named '")
                self._text.append(<const char*>route + 2, rn - 2)
                self._text.append(b"'")
                return -2
            return deref(nit).second if self._has_credit(deref(nit).second) else -1
        if rtype == R_COMMAND:
            if n < 3 or om_hdr_kind(self._data(&frames[0])) != K_REQUEST:
                code[0] = E_BAD_ROUTE
                self._text.assign(b"a raw request needs an agent, capability or group route")
                return -2
            key = _typed_key(rtype, <const char*>self._data(&frames[2]), self._size(&frames[2]))
        else:
            if rn == 2:
                code[0] = E_BAD_ROUTE
                self._text.assign(b"route key is empty")
                return -2
            key = _typed_key(rtype, <const char*>route + 2, rn - 2)
        it = self._index.find(key)
        if it == self._index.end() or deref(it).second.empty():
            code[0] = E_NO_AGENT_AVAILABLE
            self._text.assign(b"no agent has ")
            self._text.append(b"capability" if rtype == R_CAPABILITY else (b"group" if rtype == R_GROUP else b"command"))
            self._text.append(b" '")
            self._text.append(key.data() + 1, key.size() - 1)
            self._text.append(b"'")
            return -2
        cdef vector[uint32_t]* cands = &deref(it).second
        cdef size_t count = cands.size(), i, ready = 0
        cdef uint32_t* cursor = &self._rr[key]
        cdef uint32_t start = cursor[0] % count, s
        cdef int64_t best = -1
        cdef double load, best_load = 2.0
        if strategy == S_LEAST_LOADED:
            for i in range(count):
                s = deref(cands)[(start + i) % count]
                if self._has_credit(s):
                    load = <double>self._peers[s].inflight / <double>self._peers[s].capacity
                    if load < best_load:
                        best = s
                        best_load = load
            cursor[0] = (start + 1) % count
            return best
        if strategy == S_ROUND_ROBIN:
            for i in range(count):
                s = deref(cands)[(start + i) % count]
                if self._has_credit(s):
                    cursor[0] = (start + i + 1) % count
                    return s
            return -1
        for i in range(count):
            if self._has_credit(deref(cands)[i]):
                ready += 1
        if ready == 0:
            return -1
        ready = self._random() % ready
        for i in range(count):
            if self._has_credit(deref(cands)[i]):
                if ready == 0:
                    return deref(cands)[i]
                ready -= 1
        return -1

    cdef void _route_request(self, const string& rid, zmq_msg_t* frames, int n) noexcept nogil:
        """``frames`` = hdr, route, (command,) body... from client ``rid``."""
        cdef const unsigned char* hdr = self._data(&frames[0])
        cdef uint16_t code = 0
        cdef int64_t target = self._select(frames, n, &code)
        cdef uint64_t wall, deadline
        cdef const unsigned char* route
        cdef QItem item
        cdef int i
        if self._max_pending and not (om_hdr_flags(hdr) & F_TRACKED):
            self._count(rid, 1)  # every path that ends this request counts it back
        if target == -2:
            self._refuse(rid, hdr, code, self._text)
            return
        if target >= 0:
            self._dispatch(<uint32_t>target, rid, frames, n)
            return
        if self._queued >= self._queue_limit:
            self._refuse(rid, hdr, E_QUEUE_FULL, string(b"broker queue is full"))
            return
        wall = <uint64_t>_wall_ms()
        deadline = om_hdr_deadline(hdr)
        if deadline == 0:
            deadline = wall + self._default_queue_ms
        if deadline <= wall:
            self._refuse(rid, hdr, E_DEADLINE_EXCEEDED, string(b"deadline passed before dispatch"))
            return
        self._counters[C_QUEUED] += 1
        self._seq += 1
        route = self._data(&frames[1])
        item.client = rid
        item.nframes = n
        item.deadline = deadline
        item.seq = self._seq
        for i in range(n):
            if self._own(&frames[i]):  # the queue keeps them past this message
                self._refuse(rid, hdr, E_QUEUE_FULL, string(b"broker is out of memory"))
                return
        item.frames = <zmq_msg_t*>malloc(sizeof(zmq_msg_t) * n)
        if item.frames == NULL:
            self._refuse(rid, hdr, E_QUEUE_FULL, string(b"broker is out of memory"))
            return
        for i in range(n):
            self._z.zmq_msg_init(&item.frames[i])
            self._z.zmq_msg_move(&item.frames[i], &frames[i])
        route = self._data(&item.frames[1])
        if route[0] == R_COMMAND:
            key = _typed_key(R_COMMAND, <const char*>self._data(&item.frames[2]), self._size(&item.frames[2]))
        else:
            key = _typed_key(route[0], <const char*>route + 2, self._size(&item.frames[1]) - 2)
        if not self._queues.count(key):
            self._queue_order.push_back(key)
        self._queues[key].push_back(item)
        self._queued += 1

    cdef void _dispatch(self, uint32_t slot, const string& client, zmq_msg_t* frames, int n) noexcept nogil:
        cdef uint32_t index
        cdef Entry* e
        cdef Peer* agent = &self._peers[slot]
        cdef const unsigned char* hdr = self._data(&frames[0])
        cdef unsigned char token[OM_TOKEN_SIZE]
        cdef int err
        cdef string agent_rid
        cdef Entry blank
        if not self._free_entries.empty():
            index = self._free_entries.back()
            self._free_entries.pop_back()
        else:
            index = self._entries.size()
            self._entries.push_back(blank)
            self._entries[index].gen = 1
        e = &self._entries[index]
        e.used = True
        e.tracked = (om_hdr_flags(hdr) & F_TRACKED) != 0
        e.agent = slot
        e.agent_gen = agent.gen
        e.corr = om_hdr_corr(hdr)
        e.job = om_hdr_job(hdr)
        e.aux = om_hdr_aux(hdr)
        e.client = client
        om_write_token(token, index, e.gen)
        cdef char hdr_copy[OM_HEADER_SIZE]
        memcpy(hdr_copy, hdr, OM_HEADER_SIZE)  # for an error after frames[0] was sent
        err = self._out_begin(agent.rid, agent.packed)
        if err == 0:
            err = self._out_msg(&frames[0], False)
            if err == 0:
                err = self._out(<const char*>token, OM_TOKEN_SIZE, NULL, n <= 2)
                if err == 0 and n > 2:
                    err = self._out_parts(&frames[2], n - 2)
        if err:
            # A ROUTER fails on the first part (routing id) or not at all.
            self._release_entry(index)
            if err == EHOSTUNREACH:
                agent_rid = agent.rid
                self._unregister(agent_rid, True)
                self._refuse(client, <const unsigned char*>hdr_copy, E_AGENT_LOST, string(b"agent is gone"))
            else:
                self._refuse(client, <const unsigned char*>hdr_copy, E_AGENT_BUSY, string(b"agent's pipe is full"))
            return
        agent.inflight += 1
        self._counters[C_FWD_REQUESTS] += 1

    cdef void _release_entry(self, uint32_t index) noexcept nogil:
        cdef Entry* e = &self._entries[index]
        e.used = False
        e.client.clear()
        e.gen += 1
        if e.gen == 0:
            e.gen = 1
        self._free_entries.push_back(index)

    cdef void _free_entry(self, uint32_t index) noexcept nogil:
        cdef Entry* e = &self._entries[index]
        cdef Peer* agent
        if e.agent < self._peers.size():
            agent = &self._peers[e.agent]
            if agent.used and agent.gen == e.agent_gen and agent.inflight > 0:
                agent.inflight -= 1
        if self._max_pending and not e.tracked:
            self._count(e.client, -1)
        self._release_entry(index)

    cdef int64_t _lookup(self, zmq_msg_t* token) noexcept nogil:
        cdef const unsigned char* t = self._data(token)
        cdef uint32_t index
        if self._size(token) != OM_TOKEN_SIZE:
            return -1
        index = om_token_index(t)
        if index >= self._entries.size() or not self._entries[index].used:
            return -1
        if self._entries[index].gen != om_token_generation(t):
            return -1
        return index

    cdef void _on_agent_reply(self, uint32_t slot, uint8_t kind) noexcept nogil:
        cdef int64_t found = self._lookup(&self._in[2])
        cdef Entry* e
        cdef int n = self._nin
        cdef char ev
        cdef cbool packed
        if found < 0 or self._entries[found].agent != slot or self._entries[found].agent_gen != self._peers[slot].gen:
            self._counters[C_STALE] += 1
            return
        e = &self._entries[found]
        self._counters[C_FWD_REPLIES] += 1
        if e.tracked:
            ev = EV_JOB
            if self._ev_direct(&self._in[1], n - 1, self._peers[slot].rid.size()):
                self._send_bytes(self._control, &ev, 1, 1)
                self._send_bytes(self._control, self._peers[slot].rid.data(), self._peers[slot].rid.size(), 1)
                self._send_parts(self._control, &self._in[1], n - 1)
            else:
                self._ev_begin(ev)
                self._ev_part(self._peers[slot].rid.data(), self._peers[slot].rid.size())
                self._ev_parts(&self._in[1], n - 1)
                self._ev_end()
        else:
            packed = self._packed(e.client)
            if packed and self._has_packed_in:
                self._pass_packed(e.client)  # the parts go on unchanged: so can the frame that packs them
            elif self._out_begin(e.client, packed) == 0:
                self._out_parts(&self._in[1], n - 1)
        if kind == K_REPLY or kind == K_STREAM_END or kind == K_ERROR:
            self._free_entry(<uint32_t>found)
            if self._queued:
                self._drain_for(slot)

    cdef void _on_client_signal(self, const string& rid, uint8_t kind, uint64_t corr, int base) noexcept nogil:
        """A CANCEL / CREDIT whose header is self._in[base], its route the next part."""
        cdef int64_t found = -1
        cdef size_t i, rn = self._size(&self._in[base + 1])
        cdef Entry* e
        cdef unsigned char token[OM_TOKEN_SIZE]
        if rn == OM_TOKEN_SIZE:
            found = self._lookup(&self._in[base + 1])
        elif rn == 0:
            for i in range(self._entries.size()):
                if self._entries[i].used and self._entries[i].corr == corr and self._entries[i].client == rid:
                    found = i
                    break
        if found < 0 or self._entries[found].client != rid:
            if kind == K_CANCEL and self._cancel_queued(rid, corr):
                return
            self._counters[C_STALE] += 1
            return
        e = &self._entries[found]
        om_write_token(token, <uint32_t>found, e.gen)
        if self._out_begin(self._peers[e.agent].rid, self._peers[e.agent].packed) == 0:
            self._out_msg(&self._in[base], False)
            self._out(<const char*>token, OM_TOKEN_SIZE, NULL, self._nin <= base + 2)
            if self._nin > base + 2:
                self._out_parts(&self._in[base + 2], self._nin - base - 2)

    # ---------------------------------------------------------------- queue

    cdef void _erase_queue(self, string key) noexcept nogil:
        cdef size_t i
        self._queues.erase(key)
        for i in range(self._queue_order.size()):
            if self._queue_order[i] == key:
                self._queue_order.erase(self._queue_order.begin() + i)
                break

    cdef cbool _cancel_queued(self, const string& rid, uint64_t corr) noexcept nogil:
        cdef size_t k, i
        cdef QItem item
        cdef deque[QItem]* dq
        for k in range(self._queue_order.size()):
            dq = &self._queues[self._queue_order[k]]
            for i in range(dq.size()):
                if deref(dq)[i].client == rid and om_hdr_corr(self._data(&deref(dq)[i].frames[0])) == corr:
                    item = deref(dq)[i]
                    dq.erase(dq.begin() + i)
                    self._queued -= 1
                    if dq.empty():
                        self._erase_queue(self._queue_order[k])
                    self._refuse(item.client, self._data(&item.frames[0]), E_CANCELLED,
                                 string(b"cancelled while queued"))
                    self._free_frames(item.frames, item.nframes)
                    return True
        return False

    cdef void _drain_for(self, uint32_t slot) noexcept nogil:
        """Dispatch queued requests ``slot`` could serve, oldest first, while an agent has credit."""
        cdef vector[string] cands
        cdef size_t k, best_k, j
        cdef uint64_t best_seq
        cdef unordered_map[string, deque[QItem]].iterator it
        cdef QItem item
        cdef uint16_t code
        cdef int64_t target
        cdef string key
        if self._queued == 0:
            return
        for k in range(self._peers[slot].keys.size()):
            if self._queues.count(self._peers[slot].keys[k]):
                cands.push_back(self._peers[slot].keys[k])
        while not cands.empty():
            # A dispatch may have failed whole queues meanwhile: keep the keys still queued.
            j = 0
            for k in range(cands.size()):
                if self._queues.count(cands[k]):
                    cands[j] = cands[k]
                    j += 1
            cands.resize(j)
            if j == 0:
                break
            best_k = 0
            best_seq = 0xFFFFFFFFFFFFFFFFULL
            for k in range(cands.size()):
                it = self._queues.find(cands[k])
                if deref(it).second.front().seq < best_seq:
                    best_seq = deref(it).second.front().seq
                    best_k = k
            key = cands[best_k]
            it = self._queues.find(key)
            item = deref(it).second.front()
            code = 0
            target = self._select(item.frames, item.nframes, &code)
            if target == -1:
                cands.erase(cands.begin() + best_k)  # nobody has credit for this route now
                continue
            deref(it).second.pop_front()
            self._queued -= 1
            if deref(it).second.empty():
                self._erase_queue(key)
                cands.erase(cands.begin() + best_k)
            if target == -2:
                self._refuse(item.client, self._data(&item.frames[0]), code, self._text)
            elif om_hdr_flags(self._data(&item.frames[0])) & F_TRACKED or self._by_rid.count(item.client):
                # (else the client is gone and nobody waits; a tracked job's control plane always does)
                self._dispatch(<uint32_t>target, item.client, item.frames, item.nframes)
            self._free_frames(item.frames, item.nframes)

    cdef void _fail_queue(self, const string& key, uint16_t code, const string& text) noexcept nogil:
        cdef unordered_map[string, deque[QItem]].iterator it = self._queues.find(key)
        cdef deque[QItem] items
        cdef QItem item
        if it == self._queues.end():
            return
        items.swap(deref(it).second)
        self._erase_queue(key)
        self._queued -= items.size()
        for item in items:
            self._refuse(item.client, self._data(&item.frames[0]), code, text)
            self._free_frames(item.frames, item.nframes)

    cdef void _expire_queue(self, int64_t wall_now) noexcept nogil:
        cdef uint64_t wall = <uint64_t>wall_now
        cdef vector[string] order = self._queue_order  # a copy: emptied queues are erased as we go
        cdef deque[QItem] keep
        cdef deque[QItem]* dq
        cdef QItem item
        cdef cbool any_expired
        cdef size_t k
        for k in range(order.size()):
            dq = &self._queues[order[k]]
            any_expired = False
            for item in deref(dq):
                if item.deadline <= wall:
                    any_expired = True
                    break
            if not any_expired:
                continue
            keep.clear()
            for item in deref(dq):
                if item.deadline <= wall:
                    self._counters[C_QUEUE_EXPIRED] += 1
                    self._queued -= 1
                    self._refuse(item.client, self._data(&item.frames[0]), E_DEADLINE_EXCEEDED,
                                 string(b"no agent had capacity before the deadline"))
                    self._free_frames(item.frames, item.nframes)
                else:
                    keep.push_back(item)
            if keep.empty():
                self._erase_queue(order[k])
            else:
                dq.swap(keep)

    # ----------------------------------------------------------- heartbeats

    cdef void _tick(self, int64_t now) noexcept nogil:
        cdef unsigned char hb[OM_HEADER_SIZE]
        cdef int64_t suspect_after = 2 * self._hb, lost_after = self._liveness * self._hb, silent
        cdef size_t slot
        cdef string load, rid
        cdef unsigned char rec[12]
        cdef char state, ev
        cdef Peer* p
        cdef vector[uint32_t] order = self._peer_order  # a copy: lost peers leave it as we go
        cdef size_t k
        om_write_header(hb, K_HEARTBEAT, 0, 0, 0, 0, 0, 0)
        for k in range(order.size()):
            slot = order[k]
            p = &self._peers[slot]
            if not p.used:
                continue
            silent = now - p.last_seen
            if silent > lost_after:
                rid = p.rid
                self._unregister(rid, True)
                continue
            if p.role == ROLE_AGENT:
                if silent > suspect_after and p.state == ST_ALIVE:
                    p.state = ST_SUSPECT
                    state = ST_SUSPECT
                    self._up_small(EV_STATE, p.rid, &state, 1, 2)
                load.push_back(<char>p.rid.size())
                load.append(p.rid)
                om_st32(rec, p.inflight)
                om_st32(rec + 4, p.capacity)
                om_st32(rec + 8, p.running)
                load.append(<const char*>rec, 12)
            if self._out_begin(p.rid, p.packed) == 0:
                self._out(<const char*>hb, OM_HEADER_SIZE, NULL, False)
                self._out(NULL, 0, NULL, True)
        self._ev_begin(EV_LOAD)
        self._ev_part(load.data(), load.size())
        self._ev_part(<const char*>self._counters, sizeof(uint64_t) * N_COUNTERS)
        self._ev_end()
