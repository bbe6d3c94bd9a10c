"""Broker data plane, pure-Python reference. ``_dataplane_c.pyx`` must behave identically.

The data plane owns the broker's ROUTER socket on one thread. It validates each
message's header, forwards requests to agents and replies back to clients,
keeps the routing table, the agents' credits, the in-flight table, the queue of
requests waiting for credit, and the heartbeats. It never decodes a payload.
Everything else (HELLO, queries, tracked jobs, label selection) goes up to the
control plane over an inproc PAIR socket, and comes back as ``OP_*`` commands.

Control protocol (first frame: one op byte):

control -> data plane
    OP_SEND     [op, rid, frames...]          send frames to a peer
    OP_REG      [op, rid, meta, name, caps, groups, commands]
                meta = <BIIB: role, capacity, acl flags, session protocol (absent: 1)>;
                lists are NUL-joined. A protocol-2 peer is sent packed framing
                acl flags: 1 = refuse this peer's REQUEST / RAW (FORBIDDEN),
                2 = send them to the control plane (EV_MSG) for a policy check
    OP_UNREG    [op, rid]                     forget a peer; its in-flight fail AGENT_LOST
    OP_INJECT   [op, rid, hdr, route, ...]    route a request as if ``rid`` sent it
    OP_STOP     [op]
    OP_SIGNAL   [op, rid, hdr, route, ...]    a CANCEL / CREDIT as if ``rid`` sent it
    OP_BATCH    [op, layout, msg1..., msg2...] several of the above in one message (one wake-up of
                the loop instead of one each); layout = u16 LE frame count of each; at most
                CTRL_MAX_FRAMES frames in all; nested batches are ignored
    OP_PACKED   [op, packed]                  the same, the messages packed in one frame (``io.
                pack_messages``: per message its part count, u16 LE, 1 .. CTRL_MAX_FRAMES - 1,
                then each part as u32 LE length and bytes); stops at the first message that does
                not add up; nested batches are ignored. What the control plane sends per turn
                with more than one message

data plane -> control
    EV_MSG      [ev, rid, hdr, frames...]     a message for the control plane
    EV_LOST     [ev, rid]                     a peer went silent (or said BYE)
    EV_JOB      [ev, agent_rid, hdr, ...]     a tracked job's progress / answer (never sent to a client)
    EV_DISPATCHED (4) reserved: no longer sent (the control plane marks a job dispatched itself)
    EV_STATE    [ev, rid, state]              an agent's liveness state changed
    EV_LOAD     [ev, (rid_len u8, rid, inflight u32, capacity u32, running u32)*, counters]  every
                heartbeat; running = the agent's own count, from its last HEARTBEAT's aux
    EV_STOPPED  [ev, counters]                the loop ended; counters as <Q*N>
    EV_HELLO    [ev, user_id, rid, hdr, ...]  a HELLO, with its connection's ZAP User-Id (or empty)
    EV_PACKED   [ev, packed]                  the events of one turn of the loop, packed as OP_PACKED's
                messages; an event of more than EV_DIRECT bytes goes up as it is (after them)
"""

from __future__ import annotations

import struct
import time
from collections import deque
from typing import Any

import zmq

from ..errors import ErrorCode, ProtocolError
from ..protocol import HEADER_SIZE, MAX_FRAMES, PACKED_VERSION, TOKEN_SIZE, Flag, Kind, Role, Route, Strategy
from ._frame_py import check_header, header_error_message, is_packed, pack_parts, packable, unpack_parts
from ._io_py import pack_messages, unpack_messages

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

OP_SEND, OP_REG, OP_UNREG, OP_INJECT, OP_STOP, OP_SIGNAL, OP_BATCH, OP_PACKED = (bytes([i]) for i in range(1, 9))
OP = {
    "SEND": OP_SEND,
    "REG": OP_REG,
    "UNREG": OP_UNREG,
    "INJECT": OP_INJECT,
    "STOP": OP_STOP,
    "SIGNAL": OP_SIGNAL,
    "BATCH": OP_BATCH,
    "PACKED": OP_PACKED,
}
CTRL_MAX_FRAMES = 4096  # frames in one control message (an OP_BATCH): the control plane splits above
EV_MSG, EV_LOST, EV_JOB, EV_DISPATCHED, EV_STATE, EV_LOAD, EV_STOPPED, EV_HELLO, EV_PACKED = (
    bytes([i]) for i in range(1, 10)
)
EV = {
    "MSG": EV_MSG,
    "LOST": EV_LOST,
    "JOB": EV_JOB,
    "DISPATCHED": EV_DISPATCHED,
    "STATE": EV_STATE,
    "LOAD": EV_LOAD,
    "STOPPED": EV_STOPPED,
    "HELLO": EV_HELLO,
    "PACKED": EV_PACKED,
}
EV_DIRECT = 16384  # bytes: an event carrying more goes up as it is, not packed
STATE_ALIVE, STATE_SUSPECT, STATE_LOST = 0, 1, 2

# Counter slots, reported in EV_STOPPED and by stats(); same order in the C twin.
COUNTERS = (
    "received",
    "forwarded_requests",
    "forwarded_replies",
    "to_control",
    "malformed",
    "errors_sent",
    "queued",
    "queue_expired",
    "stale_replies",
    "unroutable",
    "agents_lost",
    "limited",
    "forbidden",
    "replayed",
)
ACL_NO_REQUESTS = 0x1
ACL_CHECKED = 0x2

_META = struct.Struct("<BIIB")
_HDR_ERR = struct.Struct("<2sBBHHIIQQQ")
_LOAD = struct.Struct("<III")
_Q = struct.Struct("<Q")
_AUX = struct.Struct("<I")
_TOKEN = struct.Struct("<II")
_CONTROL_KINDS = frozenset((Kind.QUERY, Kind.EVENT))  # HELLO goes up as EV_HELLO
_AGENT_REPLY_KINDS = frozenset((Kind.RUNNING, Kind.REPLY, Kind.STREAM_ITEM, Kind.STREAM_END, Kind.ERROR))
_TERMINAL = frozenset((Kind.REPLY, Kind.STREAM_END, Kind.ERROR))
_BATCH = 256


_U64 = 0xFFFFFFFFFFFFFFFF


def _seed_rng(seed: int) -> int:
    x = (seed * 6364136223846793005 + 1442695040888963407) & _U64
    return x or 88172645463325252


def pack_reg_meta(role: int, capacity: int, acl: int = 0, protocol: int = 1) -> bytes:
    """The ``meta`` frame of OP_REG."""
    return _META.pack(role, capacity, acl, protocol)


def _now_ms() -> int:
    return time.monotonic_ns() // 1_000_000


def _wall_ms() -> int:
    return time.time_ns() // 1_000_000


def _error_frames(code: int, corr: int, job: int, route: bytes, message: str | bytes, aux: int = 0) -> list[bytes]:
    hdr = _HDR_ERR.pack(b"OM", 1, Kind.ERROR, 0, code, aux, 0, corr, job, 0)
    # Names and keys go into messages as the bytes they arrived as (the reader decodes).
    return [hdr, route, message if isinstance(message, bytes) else message.encode()]


class _Peer:
    __slots__ = (
        "acl",
        "caps",
        "capacity",
        "commands",
        "draining",
        "groups",
        "inflight",
        "last_corr",
        "last_seen",
        "name",
        "packed",
        "pending",
        "refill",
        "rid",
        "role",
        "running",
        "state",
        "tokens",
    )

    def __init__(self, rid: bytes, role: int, capacity: int, name: bytes, now: int) -> None:
        self.acl = 0  # ACL_* flags from the control plane
        self.running = 0  # what its last HEARTBEAT reported running (aux)
        self.packed = False  # its session speaks protocol 2: what is sent to it is packed
        self.last_corr = 0  # the corr of its last REQUEST / RAW: each must be greater
        self.rid = rid
        self.role = role
        self.capacity = capacity
        self.name = name
        self.inflight = 0
        self.last_seen = now
        self.state = STATE_ALIVE
        self.draining = False
        self.caps: list[bytes] = []
        self.groups: list[bytes] = []
        self.commands: list[bytes] = []
        self.pending = 0  # its own untracked requests in flight or queued (as a client)
        self.tokens = 0.0  # rate-limit bucket
        self.refill = now

    def has_credit(self) -> bool:
        return self.state == STATE_ALIVE and not self.draining and self.inflight < self.capacity


class _Entry:
    __slots__ = ("agent", "aux", "client", "corr", "job", "tracked")

    def __init__(self, client: bytes, corr: int, agent: bytes, job: int, tracked: bool, aux: int = 0) -> None:
        self.aux = aux  # the request's aux: a tracked job's lease, echoed on errors about it
        self.client = client
        self.corr = corr
        self.agent = agent
        self.job = job
        self.tracked = tracked


class _Queued:
    __slots__ = ("client", "deadline", "frames", "key", "seq", "tracked")

    def __init__(
        self, client: bytes, frames: list[bytes], deadline: int, tracked: bool, key: tuple[int, bytes], seq: int
    ) -> None:
        self.client = client
        self.frames = frames
        self.deadline = deadline
        self.tracked = tracked
        self.key = key
        self.seq = seq


class DataPlane:
    """The broker's forwarding loop over one ROUTER socket.

    ``router`` and ``control`` are pyzmq sockets made by the caller; after
    :meth:`run` starts they belong to the thread that runs it, until it returns.
    Times are in milliseconds. ``queue_limit`` bounds the requests waiting for
    credit; ``default_queue_ms`` is how long one without a deadline may wait.
    """

    def __init__(
        self,
        router: zmq.Socket[Any],
        control: zmq.Socket[Any],
        *,
        heartbeat_ms: int = 1000,
        liveness: int = 5,
        max_frame_bytes: int = 64 * 1024 * 1024,
        queue_limit: int = 10_000,
        default_queue_ms: int = 30_000,
        seed: int | None = None,
        client_max_inflight: int = 0,
        client_rate: float = 0.0,
        client_burst: int = 0,
    ) -> None:
        if heartbeat_ms <= 0 or liveness < 2:
            raise ValueError("heartbeat_ms must be > 0 and liveness >= 2")
        self._router = router
        self._control = control
        self._events: list[list[bytes]] = []  # events of this turn, not sent up yet (_flush_up)
        self._hb = heartbeat_ms
        self._woke = _now_ms()  # monotonic ms of the loop's last wake-up
        self._liveness = liveness
        self._max_frame = max_frame_bytes
        self._queue_limit = queue_limit
        self._default_queue_ms = default_queue_ms
        self._rng = _seed_rng(seed if seed is not None else time.monotonic_ns() // 1_000_000)
        self._peers: dict[bytes, _Peer] = {}
        self._by_name: dict[bytes, _Peer] = {}
        self._index: dict[tuple[int, bytes], list[_Peer]] = {}
        self._rr: dict[tuple[int, bytes], int] = {}
        self._entries: list[_Entry | None] = []
        self._gens: list[int] = []
        self._free: list[int] = []
        # Requests waiting for credit, one FIFO per route key: (route type, key).
        self._queues: dict[tuple[int, bytes], deque[_Queued]] = {}
        self._queued = 0
        self._seq = 0
        self._counters = [0] * len(COUNTERS)
        self._running = False
        self._hello_user: zmq.Frame | None = None  # header part of the message being handled
        self._packed_in: list[bytes] | None = None  # its frames after the routing id, if it came packed
        # Per-client limits (0 = none): requests in flight or queued, and a token bucket.
        self._max_pending = client_max_inflight
        self._rate = client_rate
        self._burst = float(client_burst or max(1, int(client_rate)))

    # ------------------------------------------------------------------ loop

    def run(self) -> None:
        """Serve until OP_STOP arrives on the control socket; then send EV_STOPPED."""
        poller = zmq.Poller()
        poller.register(self._router, zmq.POLLIN)
        poller.register(self._control, zmq.POLLIN)
        self._running = True
        next_tick = _now_ms() + self._hb
        while self._running:
            now = _now_ms()
            timeout = max(0, min(next_tick - now, 50 if self._queued else self._hb))
            events = dict(poller.poll(timeout))
            self._woke = _now_ms()  # a peer's last sign of life: this wake-up (one clock read a batch)
            if self._control in events:
                for _ in range(_BATCH):
                    try:
                        frames = self._control.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self._on_control(frames)
                    if not self._running:
                        break
            if self._running and self._router in events:
                for _ in range(_BATCH):
                    try:
                        raw = self._router.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    self._hello_user = raw[1] if len(raw) > 1 else None
                    self._on_router([f.bytes for f in raw])
            now = _now_ms()
            if self._queued:
                self._expire_queue(_wall_ms())
            if now >= next_tick:
                self._tick(now)
                next_tick = now + self._hb
            self._flush_up()
        self._flush_up()
        self._control.send_multipart([EV_STOPPED, b"".join(_Q.pack(c) for c in self._counters)])

    # --------------------------------------------------------------- sending

    def _is_packed_peer(self, rid: bytes) -> bool:
        peer = self._peers.get(rid)
        return peer is not None and peer.packed

    def _send(self, rid: bytes, frames: list[bytes]) -> int:
        """Send without blocking (packed to a protocol-2 peer when ``frames`` start with a
        header); 0, or the errno (EHOSTUNREACH: peer gone, EAGAIN: its pipe is full)."""
        if self._is_packed_peer(rid) and packable(frames[0]):
            frames = pack_parts(frames)
        return self._send_as_is(rid, frames)

    def _send_as_is(self, rid: bytes, frames: list[bytes]) -> int:
        """``_send`` without packing: ``frames`` are already as ``rid`` reads them."""
        try:
            self._router.send_multipart([rid, *frames], zmq.NOBLOCK)
            return 0
        except zmq.ZMQError as exc:
            if exc.errno in (zmq.EHOSTUNREACH, zmq.EAGAIN):
                self._counters[9] += 1
                return exc.errno
            raise

    def _send_error(self, rid: bytes, code: int, corr: int, job: int, route: bytes, message: str | bytes) -> None:
        self._counters[5] += 1
        self._send(rid, _error_frames(code, corr, job, route, message))

    def _refuse(self, rid: bytes, hdr: bytes, code: int, message: str | bytes) -> None:
        """Answer a request (header ``hdr``) from ``rid`` with an error. A tracked job's
        answers go to the control plane only: it decides on retries and tells the client."""
        corr, job = struct.unpack_from("<QQ", hdr, 16)
        if hdr[4] & Flag.TRACKED:
            self._up([EV_JOB, b"", *_error_frames(code, corr, job, b"", message, _AUX.unpack_from(hdr, 8)[0])])
        else:
            if self._max_pending:
                self._count(rid, -1)
            self._send_error(rid, code, corr, job, b"", message)

    def _count(self, rid: bytes, delta: int) -> None:
        peer = self._peers.get(rid)
        if peer is not None and peer.pending + delta >= 0:
            peer.pending += delta

    def _up(self, frames: list[bytes]) -> None:
        """An event for the control plane, packed with the turn's others (_flush_up)."""
        self._counters[3] += 1
        self._events.append(frames)

    def _up_payload(self, frames: list[bytes]) -> None:
        """``_up`` for a peer's message (EV_MSG, an agent's EV_JOB answer): one of more than
        EV_DIRECT bytes after the event byte goes now, as it is, after what is packed."""
        if sum(map(len, frames)) - 1 > EV_DIRECT:
            self._counters[3] += 1
            self._flush_up()
            self._control.send_multipart(frames)
        else:
            self._up(frames)

    def _flush_up(self) -> None:
        if self._events:
            self._control.send_multipart([EV_PACKED, pack_messages(self._events)])
            self._events = []

    # -------------------------------------------------------------- control

    def _on_control(self, frames: list[bytes]) -> None:
        op = frames[0]
        if op == OP_SEND:
            self._send(frames[1], frames[2:])
        elif op == OP_REG:
            self._register(frames)
        elif op == OP_UNREG:
            self._unregister(frames[1], lost=False)
        elif op == OP_INJECT:
            self._route_request(frames[1], frames[2:], injected=True)
        elif op == OP_SIGNAL:
            kind = frames[2][3]
            self._on_client_signal(frames[1], kind, _Q.unpack_from(frames[2], 16)[0], frames[1:])
        elif op == OP_STOP:
            self._running = False
        elif op == OP_BATCH and len(frames) >= 2:
            layout, off, n = frames[1], 2, len(frames)
            for k in range(0, len(layout) - 1, 2):
                count = layout[k] | layout[k + 1] << 8
                if count < 1 or off + count > n:
                    break
                if frames[off] != OP_BATCH and frames[off] != OP_PACKED:
                    self._on_control(frames[off : off + count])
                off += count
        elif op == OP_PACKED and len(frames) == 2:
            for message in unpack_messages(frames[1]):
                if len(message) >= CTRL_MAX_FRAMES:
                    break  # as the compiled twin, which has room for no more
                if message[0] != OP_BATCH and message[0] != OP_PACKED:
                    self._on_control(message)

    def _register(self, frames: list[bytes]) -> None:
        rid = frames[1]
        meta = frames[2]
        role, capacity, acl = struct.unpack_from("<BII", meta)
        old = self._peers.get(rid)
        if old is not None:
            self._unindex(old, fail_queued=False)
        peer = _Peer(rid, role, capacity, frames[3], _now_ms())
        peer.tokens = self._burst
        peer.acl = acl
        peer.packed = len(meta) >= 10 and meta[9] >= PACKED_VERSION
        if old is not None:
            peer.inflight = old.inflight
            peer.pending = old.pending
            peer.last_corr = old.last_corr
        self._peers[rid] = peer
        if role == Role.AGENT:
            peer.caps = [c for c in frames[4].split(b"\0") if c]
            peer.groups = [g for g in frames[5].split(b"\0") if g]
            peer.commands = [c for c in frames[6].split(b"\0") if c]
            self._by_name[peer.name] = peer
            for rtype, keys in (
                (Route.CAPABILITY, peer.caps),
                (Route.GROUP, peer.groups),
                (Route.COMMAND, peer.commands),
            ):
                for key in keys:
                    self._index.setdefault((rtype, key), []).append(peer)
            self._drain_for(peer)

    def _unindex(self, peer: _Peer, *, fail_queued: bool = True) -> None:
        if peer.role != Role.AGENT:
            return
        if self._by_name.get(peer.name) is peer:
            del self._by_name[peer.name]
            if fail_queued:
                self._fail_queue((Route.NAME, peer.name), ErrorCode.AGENT_LOST, "agent left before it could serve")
        for rtype, keys in ((Route.CAPABILITY, peer.caps), (Route.GROUP, peer.groups), (Route.COMMAND, peer.commands)):
            for key in keys:
                lst = self._index.get((rtype, key))
                if lst is not None and peer in lst:
                    lst.remove(peer)
                    if not lst:
                        del self._index[(rtype, key)]
                        if fail_queued:
                            self._fail_queue(
                                (rtype, key), ErrorCode.NO_AGENT_AVAILABLE, "no agent left for the selector"
                            )

    @staticmethod
    def _agent_keys(peer: _Peer) -> list[tuple[int, bytes]]:
        keys = [(int(Route.NAME), peer.name)]
        keys += [(int(Route.CAPABILITY), k) for k in peer.caps]
        keys += [(int(Route.GROUP), k) for k in peer.groups]
        keys += [(int(Route.COMMAND), k) for k in peer.commands]
        return keys

    def _unregister(self, rid: bytes, *, lost: bool) -> None:
        peer = self._peers.pop(rid, None)
        if peer is None:
            return
        self._unindex(peer)
        if peer.role == Role.AGENT and lost:
            self._counters[10] += 1
        cancel = _HDR_ERR.pack(b"OM", 1, Kind.CANCEL, 0, 0, 0, 0, 0, 0, 0)
        for index, entry in enumerate(self._entries):
            if entry is None:
                continue
            if entry.agent == rid:
                self._fail_entry(index, entry, ErrorCode.AGENT_LOST, b"agent " + peer.name + b" was lost")
            elif entry.client == rid and not entry.tracked:
                # Nobody waits for this answer any more: stop the work (a tracked job goes on).
                hdr = cancel[:16] + struct.pack("<QQ", entry.corr, entry.job) + cancel[32:]
                self._send(entry.agent, [hdr, _TOKEN.pack(index, self._gens[index])])
        if lost:
            self._up([EV_LOST, rid])

    def _fail_entry(self, index: int, entry: _Entry, code: int, message: str | bytes) -> None:
        token = _TOKEN.pack(index, self._gens[index])
        err = _error_frames(code, entry.corr, entry.job, token, message, entry.aux if entry.tracked else 0)
        if entry.tracked:
            self._up([EV_JOB, entry.agent, *err])
        else:
            self._counters[5] += 1
            self._send(entry.client, err)
        self._free_entry(index)

    # --------------------------------------------------------------- router

    def _on_router(self, frames: list[bytes]) -> None:
        self._counters[0] += 1
        rid = frames[0]
        n = len(frames)
        if n < 2:
            self._malformed(rid, ErrorCode.BAD_FRAMES, 0, "message has no header frame")
            return
        hdr = frames[1]
        self._packed_in = None
        if is_packed(hdr):
            try:
                self._packed_in = frames[1:]
                frames = [rid, *unpack_parts(frames[1:])]
            except ProtocolError as exc:
                corr = _Q.unpack_from(hdr, 16)[0] if len(hdr) >= HEADER_SIZE else 0
                self._malformed(rid, exc.code, corr, exc.message)
                return
            n = len(frames)
            hdr = frames[1]
        code = check_header(hdr)
        if code:
            corr = _Q.unpack_from(hdr, 16)[0] if len(hdr) == HEADER_SIZE else 0
            self._malformed(rid, code, corr, header_error_message(code, hdr))
            return
        kind = hdr[3]
        corr = _Q.unpack_from(hdr, 16)[0]
        if n > MAX_FRAMES:
            self._malformed(rid, ErrorCode.BAD_FRAMES, corr, f"message has {n - 1} frames, at most {MAX_FRAMES - 1}")
            return
        for f in frames:
            if len(f) > self._max_frame:
                self._malformed(
                    rid, ErrorCode.FRAME_TOO_LARGE, corr, f"frame of {len(f)} bytes, at most {self._max_frame}"
                )
                return
        peer = self._peers.get(rid)
        if peer is None:
            if kind == Kind.HELLO:
                self._up_hello(frames)
            else:
                self._send_error(rid, ErrorCode.NOT_REGISTERED, corr, 0, b"", "say HELLO first")
            return
        peer.last_seen = self._woke
        if peer.state == STATE_SUSPECT:
            peer.state = STATE_ALIVE
            self._up([EV_STATE, rid, bytes([STATE_ALIVE])])
        if kind == Kind.HEARTBEAT:
            peer.running = _AUX.unpack_from(hdr, 8)[0]  # the agent's own load
            return
        if kind == Kind.REQUEST or kind == Kind.RAW:
            if n < (4 if kind == Kind.REQUEST else 3):
                self._malformed(rid, ErrorCode.BAD_FRAMES, corr, "request needs route and command frames")
                return
            if peer.acl & ACL_NO_REQUESTS:
                self._counters[12] += 1
                self._send_error(rid, ErrorCode.FORBIDDEN, corr, 0, b"", "this key may not send requests")
                return
            if corr <= peer.last_corr:
                self._counters[13] += 1
                self._send_error(
                    rid,
                    ErrorCode.REPLAYED,
                    corr,
                    0,
                    b"",
                    f"request corr {corr} is not above the session's last ({peer.last_corr}): a replay",
                )
                return
            peer.last_corr = corr
            if self._rate > 0:
                now = _now_ms()
                peer.tokens = min(self._burst, peer.tokens + (now - peer.refill) * self._rate / 1000)
                peer.refill = now
                if peer.tokens < 1:
                    self._counters[11] += 1
                    self._send_error(rid, ErrorCode.RATE_LIMITED, corr, 0, b"", "request rate limit reached")
                    return
                peer.tokens -= 1
            if self._max_pending and not hdr[4] & Flag.TRACKED and peer.pending >= self._max_pending:
                self._counters[11] += 1
                self._send_error(rid, ErrorCode.TOO_MANY_REQUESTS, corr, 0, b"", "too many requests in flight")
                return
            route = frames[2]
            if hdr[4] & Flag.TRACKED or (len(route) >= 1 and route[0] == Route.LABELS) or peer.acl & ACL_CHECKED:
                self._up_payload([EV_MSG, *frames])
            else:
                self._route_request(rid, frames[1:], injected=False)
            return
        if kind in _AGENT_REPLY_KINDS:
            if n < 3:
                self._malformed(rid, ErrorCode.BAD_FRAMES, corr, "reply needs a route (token) frame")
                return
            self._on_agent_reply(peer, kind, frames)
            return
        if kind == Kind.CANCEL or kind == Kind.CREDIT:
            if n < 3:
                self._malformed(rid, ErrorCode.BAD_FRAMES, corr, "cancel / credit needs a route frame")
                return
            self._on_client_signal(rid, kind, corr, frames)
            return
        if kind == Kind.BYE:
            if hdr[4] & Flag.DRAIN:
                peer.draining = True
            else:
                self._unregister(rid, lost=False)
            self._up_payload([EV_MSG, *frames])
            return
        if kind == Kind.HELLO:
            self._up_hello(frames)
            return
        if kind in _CONTROL_KINDS:
            self._up_payload([EV_MSG, *frames])
            return
        self._malformed(rid, ErrorCode.UNEXPECTED_KIND, corr, f"a peer may not send kind {kind}")

    def _up_hello(self, frames: list[bytes]) -> None:
        """EV_HELLO: the HELLO with the User-Id the ZAP handler gave its connection (the CURVE
        key; empty without security), which no peer can forge."""
        user = b""
        if self._hello_user is not None:
            try:
                user = str(self._hello_user.get("User-Id")).encode()
            except zmq.ZMQError:
                user = b""  # no such property: a connection without a security mechanism
        self._up([EV_HELLO, user, *frames])

    def _malformed(self, rid: bytes, code: int, corr: int, message: str | bytes) -> None:
        self._counters[4] += 1
        self._send_error(rid, code, corr, 0, b"", message)

    # -------------------------------------------------------------- routing

    def _route_request(self, rid: bytes, frames: list[bytes], *, injected: bool) -> None:
        """``frames`` = [hdr, route, (command,) body...] from client ``rid``."""
        hdr = frames[0]
        corr, job, deadline = struct.unpack_from("<QQQ", hdr, 16)
        tracked = bool(hdr[4] & Flag.TRACKED)
        if self._max_pending and not tracked:
            self._count(rid, 1)  # every path that ends this request counts it back
        route = frames[1]
        target = self._select(route, frames)
        if isinstance(target, tuple):
            self._refuse(rid, hdr, *target)
            return
        if target is not None:
            self._dispatch(target, rid, frames, corr, job, tracked)
            return
        if self._queued >= self._queue_limit:
            self._refuse(rid, hdr, ErrorCode.QUEUE_FULL, "broker queue is full")
            return
        wall = _wall_ms()
        if deadline == 0:
            deadline = wall + self._default_queue_ms
        if deadline <= wall:
            self._refuse(rid, hdr, ErrorCode.DEADLINE_EXCEEDED, "deadline passed before dispatch")
            return
        self._counters[6] += 1
        self._seq += 1
        key = (route[0], frames[2] if route[0] == Route.COMMAND else route[2:])
        self._queues.setdefault(key, deque()).append(_Queued(rid, frames, deadline, tracked, key, self._seq))
        self._queued += 1

    def _select(self, route: bytes, frames: list[bytes]) -> _Peer | None | tuple[int, str | bytes]:
        """Pick an agent with credit: a peer, None (matching agents exist but all are busy),
        or (code, message) when nothing can ever match."""
        if len(route) < 2 or route[0] < Route.NAME or route[0] > Route.COMMAND or route[1] > Strategy.RANDOM:
            return (ErrorCode.BAD_ROUTE, "bad route frame")
        rtype, strategy = route[0], route[1]
        if rtype == Route.NAME:
            peer = self._by_name.get(route[2:])
            if peer is None:
                return (ErrorCode.NO_SUCH_AGENT, b"no agent named '" + route[2:] + b"'")
            return peer if peer.has_credit() else None
        if rtype == Route.COMMAND and (len(frames) < 3 or frames[0][3] != Kind.REQUEST):
            return (ErrorCode.BAD_ROUTE, "a raw request needs an agent, capability or group route")
        key = frames[2] if rtype == Route.COMMAND else route[2:]
        if rtype != Route.COMMAND and not key:
            return (ErrorCode.BAD_ROUTE, "route key is empty")
        candidates = self._index.get((rtype, key))
        if not candidates:
            what = {Route.CAPABILITY: b"capability", Route.GROUP: b"group", Route.COMMAND: b"command"}[Route(rtype)]
            return (ErrorCode.NO_AGENT_AVAILABLE, b"no agent has " + what + b" '" + key + b"'")
        n = len(candidates)
        if strategy == Strategy.LEAST_LOADED:
            best: _Peer | None = None
            best_load = 2.0
            start = self._rr.get((rtype, key), 0)
            for i in range(n):
                p = candidates[(start + i) % n]
                if p.has_credit():
                    load = p.inflight / p.capacity
                    if load < best_load:
                        best, best_load = p, load
            self._rr[(rtype, key)] = (start + 1) % n
            return best
        if strategy == Strategy.ROUND_ROBIN:
            start = self._rr.get((rtype, key), 0)
            for i in range(n):
                p = candidates[(start + i) % n]
                if p.has_credit():
                    self._rr[(rtype, key)] = (start + i + 1) % n
                    return p
            return None
        ready = [p for p in candidates if p.has_credit()]
        return ready[self._random() % len(ready)] if ready else None

    def _random(self) -> int:
        # xorshift64*, as the compiled twin: selection needs spread, not secrecy
        x = self._rng
        x ^= x >> 12
        x ^= (x << 25) & _U64
        x ^= x >> 27
        self._rng = x
        return (x * 2685821657736338717) & _U64

    def _dispatch(self, agent: _Peer, client: bytes, frames: list[bytes], corr: int, job: int, tracked: bool) -> None:
        if self._free:
            index = self._free.pop()
            self._entries[index] = _Entry(client, corr, agent.rid, job, tracked, _AUX.unpack_from(frames[0], 8)[0])
        else:
            index = len(self._entries)
            self._entries.append(_Entry(client, corr, agent.rid, job, tracked, _AUX.unpack_from(frames[0], 8)[0]))
            self._gens.append(1)
        token = _TOKEN.pack(index, self._gens[index])
        err = self._send(agent.rid, [frames[0], token, *frames[2:]])
        if err:
            self._entries[index] = None
            self._free_entry(index)
            if err == zmq.EHOSTUNREACH:
                self._unregister(agent.rid, lost=True)
                self._refuse(client, frames[0], ErrorCode.AGENT_LOST, "agent is gone")
            else:
                self._refuse(client, frames[0], ErrorCode.AGENT_BUSY, "agent's pipe is full")
            return
        agent.inflight += 1
        self._counters[1] += 1

    def _free_entry(self, index: int) -> None:
        entry = self._entries[index]
        self._entries[index] = None
        self._gens[index] = (self._gens[index] + 1) & 0xFFFFFFFF or 1
        self._free.append(index)
        if entry is not None:
            agent = self._peers.get(entry.agent)
            if agent is not None and agent.inflight > 0:
                agent.inflight -= 1
            if self._max_pending and not entry.tracked:
                self._count(entry.client, -1)

    def _lookup(self, token: bytes) -> tuple[int, _Entry] | None:
        if len(token) != TOKEN_SIZE:
            return None
        index, gen = _TOKEN.unpack(token)
        if index >= len(self._entries) or self._gens[index] != gen:
            return None
        entry = self._entries[index]
        return None if entry is None else (index, entry)

    def _on_agent_reply(self, peer: _Peer, kind: int, frames: list[bytes]) -> None:
        found = self._lookup(frames[2])
        if found is None or found[1].agent != peer.rid:
            self._counters[8] += 1
            return
        index, entry = found
        self._counters[2] += 1
        if entry.tracked:
            self._up_payload([EV_JOB, peer.rid, *frames[1:]])
        elif self._packed_in is not None and self._is_packed_peer(entry.client):
            self._send_as_is(entry.client, self._packed_in)  # the parts go on unchanged: so can their framing
        else:
            self._send(entry.client, frames[1:])
        if kind in _TERMINAL:
            self._free_entry(index)
            if self._queued:
                self._drain_for(peer)

    def _on_client_signal(self, rid: bytes, kind: int, corr: int, frames: list[bytes]) -> None:
        route = frames[2]
        found: tuple[int, _Entry] | None = None
        if len(route) == TOKEN_SIZE:
            found = self._lookup(route)
        elif not route:
            for index, entry in enumerate(self._entries):
                if entry is not None and entry.client == rid and entry.corr == corr:
                    found = (index, entry)
                    break
        if found is None or found[1].client != rid:
            if kind == Kind.CANCEL:
                for dq in self._queues.values():
                    for q in dq:
                        if q.client == rid and _Q.unpack_from(q.frames[0], 16)[0] == corr:
                            dq.remove(q)
                            self._queued -= 1
                            if not dq:
                                del self._queues[q.key]
                            self._reject(q, ErrorCode.CANCELLED, "cancelled while queued")
                            return
            self._counters[8] += 1
            return
        index, entry = found
        token = _TOKEN.pack(index, self._gens[index])
        self._send(entry.agent, [frames[1], token, *frames[3:]])

    # ---------------------------------------------------------------- queue

    def _reject(self, item: _Queued, code: int, message: str | bytes) -> None:
        self._refuse(item.client, item.frames[0], code, message)

    def _drain_for(self, peer: _Peer) -> None:
        """Dispatch queued requests ``peer`` could serve, oldest first, while an agent has credit."""
        cands = [k for k in self._agent_keys(peer) if k in self._queues]
        while cands:
            # A dispatch may have failed whole queues meanwhile: keep the keys still queued.
            cands = [k for k in cands if k in self._queues]
            if not cands:
                break
            key = min(cands, key=lambda k: self._queues[k][0].seq)
            dq = self._queues[key]
            item = dq[0]
            target = self._select(item.frames[1], item.frames)
            if target is None:
                cands.remove(key)  # nobody has credit for this route now
                continue
            dq.popleft()
            self._queued -= 1
            if not dq:
                del self._queues[key]
                cands.remove(key)
            if isinstance(target, tuple):
                self._reject(item, *target)
            elif item.tracked or item.client in self._peers:  # else the client is gone; nobody waits
                corr, job = struct.unpack_from("<QQ", item.frames[0], 16)
                self._dispatch(target, item.client, item.frames, corr, job, item.tracked)

    def _fail_queue(self, key: tuple[int, bytes], code: int, message: str | bytes) -> None:
        dq = self._queues.pop(key, None)
        if dq:
            self._queued -= len(dq)
            for item in dq:
                self._reject(item, code, message)

    def _expire_queue(self, wall: int) -> None:
        for key in list(self._queues):
            dq = self._queues[key]
            if all(q.deadline > wall for q in dq):
                continue
            keep: deque[_Queued] = deque()
            for q in dq:
                if q.deadline <= wall:
                    self._counters[7] += 1
                    self._queued -= 1
                    self._reject(q, ErrorCode.DEADLINE_EXCEEDED, "no agent had capacity before the deadline")
                else:
                    keep.append(q)
            if keep:
                self._queues[key] = keep
            else:
                del self._queues[key]

    # ----------------------------------------------------------- heartbeats

    def _tick(self, now: int) -> None:
        hb = _HDR_ERR.pack(b"OM", 1, Kind.HEARTBEAT, 0, 0, 0, 0, 0, 0, 0)
        suspect_after = 2 * self._hb
        lost_after = self._liveness * self._hb
        load = []
        for rid, peer in list(self._peers.items()):
            silent = now - peer.last_seen
            if silent > lost_after:
                self._unregister(rid, lost=True)
                continue
            if peer.role == Role.AGENT:
                if silent > suspect_after and peer.state == STATE_ALIVE:
                    peer.state = STATE_SUSPECT
                    self._up([EV_STATE, rid, bytes([STATE_SUSPECT])])
                load.append(bytes([len(rid)]) + rid + _LOAD.pack(peer.inflight, peer.capacity, peer.running))
            self._send(rid, [hb, b""])
        self._up([EV_LOAD, b"".join(load), b"".join(_Q.pack(c) for c in self._counters)])
