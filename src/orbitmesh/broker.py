"""The broker: a data-plane thread (compiled core) and a control plane on asyncio.

The data plane owns the ROUTER socket and forwards requests and replies without
decoding payloads (``orbitmesh._core.dataplane``). This module is the control
plane: registration (HELLO / WELCOME), the agent registry, queries, event
subscriptions, label selection and the table of tracked (``execute``) jobs.
See docs/architecture.md for the path of one message.
"""

from __future__ import annotations

import asyncio
import fnmatch
import logging
import os
import random
import struct
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack
import zmq

from . import _core
from ._aio import AsyncSocket
from ._wire import HDR, error_message, header
from .acl import ADMIN, RAW_COMMAND, Policy, in_reach
from .errors import ErrorCode, OrbitMeshError
from .jobs import JobManager
from .models import AgentInfo, JobState
from .protocol import F_DRAIN, F_TRACKED, PROTOCOL, VERSION, Kind, Role, Route, Strategy
from .security import CurveAdmission, is_loopback
from .storage import JobRecord, JobStore, check_durability, open_store

log = logging.getLogger("orbitmesh.broker")

_META = struct.Struct("<BIIB")  # OP_REG meta: role, capacity, ACL flags, session protocol
_LOAD = struct.Struct("<III")  # EV_LOAD record after the routing id: inflight, capacity, running


_REQUEST, _RAW, _QUERY, _BYE, _EVENT = (int(k) for k in (Kind.REQUEST, Kind.RAW, Kind.QUERY, Kind.BYE, Kind.EVENT))
_NAME_MAX = 200
_DIRECT = 16384  # bytes: a control message of more goes to the data plane unpacked (see _flush_ctl)
_LIST_MAX = 256
_STATE_NAMES = {0: "alive", 1: "suspect"}


@dataclass
class _Session:
    """A secured session: its CURVE key, the key's policy, and how it registered."""

    key: bytes
    policy: Policy
    role: str = ""  # "agent" / "client", once registered
    reg: list[bytes] = field(default_factory=list)  # its OP_REG frames, re-sent when the policy changes


class _Zeros(dict[str, int]):
    """A dict whose missing keys read as 0 (its ``__getitem__`` stays a C call for the others)."""

    def __missing__(self, key: str) -> int:
        return 0


@dataclass
class _Agent:
    rid: bytes
    info: AgentInfo
    state: str = "alive"
    inflight: int = 0
    running: int = 0  # its heartbeat's load
    joined: float = field(default_factory=time.time)
    instance: str = ""  # the agent process's own id (HELLO "instance"): its reconnects may replace it

    def public(self) -> dict[str, Any]:
        d = self.info.to_dict()
        d["state"] = self.state
        d["inflight"] = self.inflight
        d["running"] = self.running
        return d


def _strings(value: Any, what: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, (list, tuple)) or len(value) > _LIST_MAX:
        raise ValueError(f"{what} must be a list of at most {_LIST_MAX} strings")
    out = []
    for v in value:
        if not isinstance(v, str) or not v or "\0" in v or len(v) > _NAME_MAX:
            raise ValueError(f"{what} entries must be non-empty strings without NUL, at most {_NAME_MAX} chars")
        out.append(v)
    return out


def _labels(value: Any) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or len(value) > _LIST_MAX:
        raise ValueError("labels must be a map of strings")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise ValueError("labels must map strings to strings")
    return dict(value)


async def _bind(sock: zmq.Socket[Any], endpoint: str, patience: float = 2.0) -> None:
    """Bind, waiting out EADDRINUSE for a moment: a broker that just stopped on this port
    releases it asynchronously (libzmq's I/O thread closes the listener)."""
    end = time.monotonic() + patience
    while True:
        try:
            sock.bind(endpoint)
            return
        except zmq.ZMQError as exc:
            if exc.errno != zmq.EADDRINUSE or time.monotonic() >= end:
                raise
        await asyncio.sleep(0.02)


def job_public(rec: JobRecord) -> dict[str, Any]:
    """A job record as queries return it (``JobInfo.from_dict`` reads it)."""
    return {
        "id": rec.id,
        "command": rec.command,
        "state": rec.state.value,
        "agent": rec.agent,
        "created": rec.created,
        "updated": rec.updated,
        "attempts": rec.attempts,
        "max_attempts": rec.max_attempts,
        "idempotency_key": rec.idempotency_key,
        "error_code": rec.error_code,
        "error": rec.error,
        "error_type": rec.error_type,
        "result": rec.result,
        "serializer": (rec.result_flags >> 8) & 0xF,
        "transitions": [list(t) for t in rec.transitions],
    }


def labels_match(have: dict[str, str], want: dict[str, str]) -> bool:
    """True if every wanted label is present; a wanted value may be a glob pattern."""
    for key, pattern in want.items():
        value = have.get(key)
        if value is None or not (value == pattern or fnmatch.fnmatchcase(value, pattern)):
            return False
    return True


class Broker:
    """A broker bound to one or more endpoints (``tcp://``, ``ipc://``, ``inproc://``).

    ``heartbeat_interval`` (s) and ``liveness`` (missed intervals before an
    agent is lost) are handed to every peer in WELCOME. ``queue_limit`` bounds
    requests waiting for an agent with capacity, ``queue_timeout`` (s) is how
    long one without a deadline may wait. ``core`` picks "c" or "py" (default:
    the live core). Use as ``async with Broker("tcp://127.0.0.1:5555") as b``.

    Tracked jobs (``execute``) live in ``store``: a :class:`JobStore`, or a URL
    for ``open_store`` (``lmdb:///var/lib/orbitmesh``, ``sqlite:///jobs.db``,
    ``redis://127.0.0.1:6379/0``, ``memory://``); the default is an in-memory
    store, which does not survive a restart. ``durability`` ("sync", "batch",
    "none") applies to a store given as a URL. A delivery holds a lease of
    ``job_lease`` seconds (default: the agent liveness window), extended by the
    agent's progress; ``dispatch_window`` is how long a job waits for an agent
    that can take it. After a restart, a job waits ``job_recovery_wait`` seconds
    (default two leases) for the agent its record names before another agent
    may take it (that agent may have run it already: see docs/jobs.md). Terminal
    jobs are compacted after ``retention_age`` seconds or beyond the newest
    ``retention_count``. At most ``max_live_jobs``
    unfinished jobs are kept (each in memory, ~3 KiB plus its params): beyond,
    a new job is refused with QUEUE_FULL.

    Per-client limits (0 = none): ``client_max_inflight`` requests in flight or
    queued at once (TOO_MANY_REQUESTS beyond), and ``client_rate`` requests per
    second with bursts of ``client_burst`` (RATE_LIMITED beyond).

    Security: with ``keys_dir`` the broker is a CURVE server (its keypair and
    the peers' key store live there; see ``orbitmesh.security``) and admits
    only accepted keys. Binding a non-loopback endpoint without it is refused
    unless ``allow_plaintext=True``, which is logged. Each accepted key has a
    policy (role, command patterns, agent selectors: ``orbitmesh.acl``), read
    at HELLO and re-checked every heartbeat. A peer whose HELLO offers a
    protocol version below ``min_protocol`` is refused (no downgrade); a session
    speaks the newest version both sides do (2, packed framing, by default). A
    connection that has not finished its ZMTP / CURVE handshake within
    ``handshake_timeout`` seconds is dropped.
    """

    def __init__(
        self,
        *endpoints: str,
        heartbeat_interval: float = 1.0,
        liveness: int = 5,
        max_frame_bytes: int = 64 * 1024 * 1024,
        queue_limit: int = 10_000,
        queue_timeout: float = 30.0,
        core: str | None = None,
        context: zmq.Context[Any] | None = None,
        store: JobStore | str | None = None,
        durability: str = "sync",
        job_lease: float | None = None,
        dispatch_window: float = 60.0,
        job_recovery_wait: float | None = None,
        retention_age: float = 7 * 86400.0,
        retention_count: int = 1_000_000,
        max_live_jobs: int = 1_000_000,
        client_max_inflight: int = 0,
        client_rate: float = 0.0,
        client_burst: int = 0,
        keys_dir: str | os.PathLike[str] | None = None,
        allow_plaintext: bool = False,
        min_protocol: int = VERSION,
        handshake_timeout: float = 5.0,
    ) -> None:
        if not endpoints:
            raise ValueError("a broker needs at least one endpoint")
        if heartbeat_interval <= 0 or liveness < 2:
            raise ValueError("heartbeat_interval must be > 0 and liveness >= 2")
        self._requested = list(endpoints)
        exposed = [ep for ep in endpoints if not is_loopback(ep)]
        if exposed and keys_dir is None and not allow_plaintext:
            raise ValueError(
                f"refusing plaintext on non-loopback endpoints {exposed}: give keys_dir= for CURVE, "
                "or allow_plaintext=True to run unencrypted and unauthenticated"
            )
        self._exposed_plaintext = bool(exposed) and keys_dir is None
        if not 1 <= min_protocol <= PROTOCOL:
            raise ValueError(f"min_protocol must be from 1 to {PROTOCOL} (the newest this broker speaks)")
        self.min_protocol = min_protocol
        if handshake_timeout <= 0:
            raise ValueError("handshake_timeout must be > 0 seconds")
        self.handshake_ms = int(handshake_timeout * 1000)
        self.security = CurveAdmission(keys_dir) if keys_dir is not None else None
        self.endpoints: list[str] = []
        self.heartbeat_ms = max(1, int(heartbeat_interval * 1000))
        self.liveness = liveness
        self.max_frame_bytes = max_frame_bytes
        self.queue_limit = queue_limit
        self.queue_ms = int(queue_timeout * 1000)
        self.core = core or _core.core_impl()
        if client_max_inflight < 0 or client_rate < 0 or client_burst < 0:
            raise ValueError("client limits must be >= 0 (0 = no limit)")
        self._limits = {
            "client_max_inflight": client_max_inflight,
            "client_rate": client_rate,
            "client_burst": client_burst,
        }
        self.id = uuid.uuid4().hex[:12]
        self._ctx = context or zmq.Context.instance()
        self._dp_mod = _core.load("_dataplane", self.core)
        self._op_send = self._dp_mod.OP["SEND"]
        self._op_packed = self._dp_mod.OP["PACKED"]
        io = _core.load("_io", self.core)
        self._pack_runs, self._unpack = io.pack_runs, io.unpack_messages  # OP_PACKED, EV_PACKED
        self._agents: dict[bytes, _Agent] = {}
        self._by_name: dict[str, _Agent] = {}
        # Each registered name's session epoch (what _by_name's agent's info says): its ``get`` is
        # what the job path calls for an agent's session, a C call instead of a method's two hops.
        self._session_of: dict[str, int] = {}
        self._capacity_of: _Zeros = _Zeros()  # and its capacity (0 for a name nobody holds)
        self._clients: set[bytes] = set()
        self._subscribers: dict[bytes, set[str]] = {}
        check_durability(durability)
        self._store_spec: JobStore | str = "memory://" if store is None else store
        self._durability = durability
        self._job_lease = job_lease if job_lease is not None else self.heartbeat_ms * liveness / 1000
        self._dispatch_window = dispatch_window
        if job_recovery_wait is not None and job_recovery_wait < 0:
            raise ValueError("job_recovery_wait must be >= 0 seconds")
        self._job_recovery_wait = job_recovery_wait
        self._retention = (retention_age, retention_count)
        if max_live_jobs < 1:
            raise ValueError("max_live_jobs must be >= 1")
        self._max_live_jobs = max_live_jobs
        self.jobs: JobManager | None = None
        self._session = 0
        self._counters: dict[str, int] = {}
        self._ctrl: AsyncSocket | None = None
        self._thread: threading.Thread | None = None
        self._sockets: list[zmq.Socket[Any]] = []
        self._stopped: asyncio.Future[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timers: set[asyncio.TimerHandle] = set()
        self._labels_rr = -1  # round-robin cursor for label selection
        self._swept: object = None  # the key-store snapshot the last session sweep applied
        # Control messages queued in this turn of the loop (compiled: a C call each). Closed
        # while no data plane runs.
        self._outbox = io.Outbox(self._op_send, self._schedule_flush)
        self._ctl: Callable[[list[Any]], None] = self._outbox.ctl
        self._send: Callable[[bytes, list[Any]], None] = self._outbox.send
        # With security: each live session's policy, HELLO role and data-plane registration.
        self._sessions: dict[bytes, _Session] = {}
        self._forbidden = 0  # requests and queries the control plane refused (FORBIDDEN)
        self.running = False

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Bind the endpoints and start the data-plane thread; raises ZMQError if a bind fails."""
        if self.running:
            return
        loop = asyncio.get_running_loop()
        self._loop = loop
        if self._exposed_plaintext:
            log.warning("broker %s runs PLAINTEXT on a non-loopback endpoint (allow_plaintext=True)", self.id)
        router = self._ctx.socket(zmq.ROUTER)
        self._sockets.append(router)
        if self.security is not None:
            self.security.start(self._ctx)
            self.security.apply(router)
        try:
            router.setsockopt(zmq.ROUTER_MANDATORY, 1)
            router.setsockopt(zmq.LINGER, 0)
            router.setsockopt(zmq.SNDHWM, 100_000)
            router.setsockopt(zmq.RCVHWM, 100_000)
            router.setsockopt(zmq.MAXMSGSIZE, self.max_frame_bytes + 1024)
            # A connection that stalls in its handshake is dropped after this (libzmq's default,
            # 30 s, lets half-open connections pile up file descriptors).
            router.setsockopt(zmq.HANDSHAKE_IVL, self.handshake_ms)
            # Thousands of agents connect at once after a broker restart: libzmq's default listen
            # backlog (100) overflows and joins crawl through SYN retries (measured: 5,000 agents
            # joined in 28 s with 100, 3.7 s with 4096; the kernel caps it at somaxconn).
            router.setsockopt(zmq.BACKLOG, 4096)
            for ep in self._requested:
                await _bind(router, ep)
                self.endpoints.append(router.getsockopt_string(zmq.LAST_ENDPOINT))
        except zmq.ZMQError:
            self._close_sockets()
            if self.security is not None:
                self.security.stop()
            raise
        ctrl_ep = f"inproc://orbitmesh-ctrl-{self.id}-{os.getpid()}"
        cp = self._ctx.socket(zmq.PAIR)
        dp = self._ctx.socket(zmq.PAIR)
        self._sockets += [cp, dp]
        for s in (cp, dp):
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.SNDHWM, 0)
            s.setsockopt(zmq.RCVHWM, 0)
        cp.bind(ctrl_ep)
        dp.connect(ctrl_ep)
        plane = self._dp_mod.DataPlane(
            router,
            dp,
            heartbeat_ms=self.heartbeat_ms,
            liveness=self.liveness,
            max_frame_bytes=self.max_frame_bytes,
            queue_limit=self.queue_limit,
            default_queue_ms=self.queue_ms,
            **self._limits,
        )
        self._stopped = loop.create_future()
        self._ctrl = AsyncSocket(cp, self._on_event, loop)
        self._outbox.closed = False
        try:
            if isinstance(self._store_spec, str):
                store = open_store(self._store_spec, durability=self._durability)
            else:
                store = self._store_spec
                store.open()
        except BaseException:
            self._ctrl.close()
            self._ctrl = None
            self._outbox.closed = True
            self._close_sockets()
            raise
        self.jobs = JobManager(
            store,
            loop,
            op=self._dp_mod.OP,
            send=self._ctl,
            to_peer=self._send,
            publish=self._publish,
            choose=self._choose_agent,
            agent_session=self._session_of.get,
            agent_capacity=self._capacity_of.__getitem__,
            listening=self._subscribers.__len__,
            lease_s=self._job_lease,
            dispatch_window_s=self._dispatch_window,
            recovery_wait_s=self._job_recovery_wait,
            retention_age_s=self._retention[0],
            retention_count=self._retention[1],
            max_live=self._max_live_jobs,
        )
        try:
            self.jobs.start()
        except BaseException:
            self._ctrl.close()
            self._ctrl = None
            self._outbox.closed = True
            self._close_sockets()
            raise
        self._thread = threading.Thread(target=plane.run, name=f"orbitmesh-dataplane-{self.id}", daemon=True)
        self._thread.start()
        self.running = True
        log.info("broker %s (%s core) listening on %s", self.id, self.core, ", ".join(self.endpoints))

    async def stop(self, timeout: float = 5.0) -> None:
        """Stop the data plane and close every socket; waits at most ``timeout`` seconds."""
        if not self.running:
            return
        self.running = False
        for t in self._timers:
            t.cancel()
        self._timers.clear()
        assert self._ctrl is not None and self._stopped is not None and self._thread is not None
        self._flush_ctl()
        self._ctrl.send([self._dp_mod.OP["STOP"]])
        try:
            await asyncio.wait_for(asyncio.shield(self._stopped), timeout)
        except TimeoutError:
            log.error("data plane did not stop within %.1f s", timeout)
        await asyncio.get_running_loop().run_in_executor(None, self._thread.join, timeout)
        self._ctrl.close()
        self._ctrl = None
        self._outbox.closed = True
        if self.jobs is not None:
            self.jobs.stop()
            await asyncio.get_running_loop().run_in_executor(None, self.jobs.close)
        if self._thread.is_alive():
            # Never close sockets another thread may still be using.
            log.error("data-plane thread still running; leaving its sockets open")
            return
        self._close_sockets()

    def _close_sockets(self) -> None:
        for s in self._sockets:
            s.close(linger=0)
        self._sockets.clear()
        if self.security is not None:
            self.security.stop()

    async def __aenter__(self) -> Broker:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def serve_forever(self) -> None:
        """Run until cancelled (or until :meth:`stop`)."""
        assert self._stopped is not None
        await asyncio.shield(self._stopped)

    # --------------------------------------------------------------- views

    def agents(self) -> list[AgentInfo]:
        """The registered agents, as of the last heartbeat tick."""
        return [AgentInfo.from_dict(a.public()) for a in self._agents.values()]

    def stats(self) -> dict[str, int]:
        """Data-plane counters (as of the last heartbeat tick) plus registry sizes; with security,
        ``keys_refused``: CURVE handshakes the ZAP handler refused (unknown, rejected, revoked keys)."""
        out = dict(self._counters)
        out["forbidden"] = out.get("forbidden", 0) + self._forbidden
        out.update(agents=len(self._agents), clients=len(self._clients))
        if self.security is not None:
            out["keys_refused"] = self.security.refused
        if self.jobs is not None:
            out.update(self.jobs.stats())
        return out

    # ------------------------------------------------------------ sending

    # ``_ctl(frames)`` queues an op for the data plane, ``_send(rid, frames)`` a message to a peer
    # (``self._outbox``). What is queued in one turn of the loop goes down as one OP_PACKED: one
    # wake-up of the data-plane thread instead of one per message (a durable job makes three:
    # ACCEPTED, its dispatch, its answer).

    def _schedule_flush(self) -> None:
        assert self._loop is not None
        self._loop.call_soon(self._flush_ctl)

    def _flush_ctl(self) -> None:
        out = self._outbox.take()
        ctrl = self._ctrl
        if not out or ctrl is None:
            return
        if len(out) == 1:
            ctrl.send(out[0])  # the turn's one message: as it is
        else:
            # One frame for all of them (OP_PACKED): libzmq moves two parts, not ~5 per message.
            # A message of more than _DIRECT bytes goes as it is, its parts not copied once more.
            for run in self._pack_runs(out, _DIRECT):
                ctrl.send([self._op_packed, run] if run.__class__ is bytes else run)
        ctrl.flush()  # no reason to wait a turn more

    def _reply(self, rid: bytes, corr: int, body: Any) -> None:
        self._send(rid, [header(Kind.REPLY, corr=corr), b"", msgpack.packb(body, use_bin_type=True)])

    def _error(self, rid: bytes, code: int, corr: int, message: str, job: int = 0) -> None:
        self._send(rid, error_message(code, corr, message, job=job))

    def _publish(self, topic: str, data: dict[str, Any]) -> None:
        if not self._subscribers:
            return
        body = msgpack.packb({"type": topic, "data": data, "time": time.time()}, use_bin_type=True)
        group = topic.split("_", 1)[0]
        hdr = header(Kind.EVENT)
        for rid, topics in self._subscribers.items():
            if group in topics or topic in topics or "*" in topics:
                self._send(rid, [hdr, b"", body])

    # ------------------------------------------------------------- events

    def _on_event(self, frames: list[bytes]) -> None:
        ev = frames[0][0]
        if ev == 9:  # EV_PACKED: a turn's events
            events = self._unpack(frames[1])
            dispatch = self.jobs.dispatch_events if self.jobs is not None else None
            if dispatch is not None:  # the common job path's events handled there, the rest here
                dispatch(events, self._sessions, self._on_event)
                return
            for event in events:
                self._on_event(event)
            return
        try:
            if ev == 1:
                self._on_peer_message(frames[1], frames[2:])
            elif ev == 2:
                self._on_lost(frames[1])
            elif ev == 3:
                if self.jobs is not None:
                    self.jobs.on_event(frames[1], frames[2:])
            elif ev == 5:
                self._on_state(frames[1], frames[2][0])
            elif ev == 6:
                self._on_load(frames[1], frames[2] if len(frames) > 2 else b"")
            elif ev == 8:
                fields = HDR.unpack(frames[3])
                self._on_hello(frames[2], fields[7], frames[3:], user=frames[1])
            elif ev == 7:
                self._on_load(b"", frames[1])
                if self._stopped is not None and not self._stopped.done():
                    self._stopped.set_result(None)
        except Exception:
            # A bug here must not take the control plane down with it.
            log.exception("control plane failed on event %d", ev)

    def _on_load(self, blob: bytes, counters: bytes) -> None:
        i, n = 0, len(blob)
        while i < n:
            ln = blob[i]
            rid = blob[i + 1 : i + 1 + ln]
            inflight, _, running = _LOAD.unpack_from(blob, i + 1 + ln)
            i += 1 + ln + _LOAD.size
            agent = self._agents.get(rid)
            if agent is not None:
                agent.inflight = inflight
                agent.running = running
        if self.security is not None and self._sessions:
            self._sweep_sessions()
        if counters:
            values = struct.unpack(f"<{len(counters) // 8}Q", counters)
            self._counters = dict(zip(self._dp_mod.COUNTERS, values, strict=False))

    def _sweep_sessions(self) -> None:
        """Every heartbeat: apply key-store changes to live sessions. A key no longer accepted
        loses its session (KEY_REVOKED); a policy that no longer allows the session's role
        closes it (FORBIDDEN); a changed policy takes effect at once otherwise."""
        assert self.security is not None and self._ctrl is not None
        try:
            snap = self.security.store.snapshot()
        except OSError as exc:
            log.error("key store unreadable, sessions left as they are: %s", exc)
            return
        if snap is self._swept:
            return  # nothing changed since the last sweep
        self._swept = snap
        for rid, sess in list(self._sessions.items()):
            if snap.state(sess.key) != "accepted":
                self._close_session(rid, ErrorCode.KEY_REVOKED, "this session's key was revoked", "key revoked")
                continue
            policy = snap.policy(sess.key)
            if policy == sess.policy or not sess.role:
                continue
            refusal = policy.hello_refusal(sess.role)
            if refusal is not None:
                self._close_session(rid, ErrorCode.FORBIDDEN, f"policy changed: {refusal}", "policy changed")
                continue
            before = sess.policy.session_flags(sess.role)
            sess.policy = policy
            after = policy.session_flags(sess.role)
            if after != before and sess.reg:
                role, capacity, _, protocol = _META.unpack(sess.reg[2])
                sess.reg[2] = _META.pack(role, capacity, after, protocol)
                self._ctl(list(sess.reg))

    def _close_session(self, rid: bytes, code: int, message: str, reason: str) -> None:
        assert self._ctrl is not None
        self._error(rid, code, 0, message)
        self._ctl([self._dp_mod.OP["UNREG"], rid])
        agent = self._forget(rid)
        if agent is not None:
            log.warning("agent %s disconnected: %s", agent.info.name, reason)
            self._publish("agent_left", {**agent.public(), "reason": reason})

    def _on_state(self, rid: bytes, state: int) -> None:
        agent = self._agents.get(rid)
        if agent is not None and agent.state != "draining":
            agent.state = _STATE_NAMES.get(state, "alive")
            self._publish("agent_state", agent.public())

    def _forget(self, rid: bytes) -> _Agent | None:
        """Drop a peer from the registry; returns the agent it was, if one."""
        self._sessions.pop(rid, None)
        self._clients.discard(rid)
        self._subscribers.pop(rid, None)
        agent = self._agents.pop(rid, None)
        if agent is not None:
            self._unname(agent)
        return agent

    def _on_lost(self, rid: bytes) -> None:
        agent = self._forget(rid)
        if agent is not None:
            log.warning("agent %s lost", agent.info.name)
            self._publish("agent_lost", agent.public())

    # ------------------------------------------------------ peer messages

    def _on_peer_message(self, rid: bytes, frames: list[bytes]) -> None:
        fields = HDR.unpack(frames[0])
        kind, flags, corr = fields[2], fields[3], fields[7]
        if kind == _REQUEST or kind == _RAW:  # plain ints: an enum attribute costs 70-190 ns
            self._on_request(rid, fields, frames)
        elif kind == _QUERY:
            self._on_query(rid, corr, frames)
        elif kind == _BYE:
            self._on_bye(rid, bool(flags & F_DRAIN))
        elif kind == _EVENT:
            self._on_agent_event(rid, frames)

    def _on_hello(self, rid: bytes, corr: int, frames: list[bytes], user: bytes = b"") -> None:
        snap = None
        if self.security is not None:
            # ``user`` is the connection's CURVE key, as the ZAP handler admitted it.
            snap = self.security.store.snapshot()
            if not user or snap.state(user) != "accepted":
                self._error(rid, ErrorCode.KEY_REFUSED, corr, "this connection's key is not accepted")
                return
        try:
            body = msgpack.unpackb(frames[2], raw=False) if len(frames) > 2 else None
            if not isinstance(body, dict):
                raise ValueError("HELLO body must be a msgpack map")
            role = body.get("role")
            if role not in ("agent", "client"):
                raise ValueError(f"role must be 'agent' or 'client', not {role!r}")
            offered = body.get("protocol", VERSION)
            if not isinstance(offered, int) or isinstance(offered, bool):
                raise ValueError("protocol must be an integer version")
        except (ValueError, TypeError, msgpack.UnpackException) as exc:
            self._error(rid, ErrorCode.BAD_HELLO, corr, f"bad HELLO: {exc}")
            return
        if offered < self.min_protocol:
            self._error(
                rid,
                ErrorCode.UNSUPPORTED_VERSION,
                corr,
                f"peer speaks protocol up to v{offered}; this broker requires v{self.min_protocol} or newer",
            )
            return
        policy = ADMIN
        if snap is not None:
            policy = snap.policy(user)
            refusal = policy.hello_refusal(role)
            if refusal is not None:
                self._forbidden += 1
                self._error(rid, ErrorCode.FORBIDDEN, corr, refusal)
                return
            known = self._sessions.get(rid)
            if known is None or known.key != user:
                self._sessions[rid] = _Session(user, policy)
            else:
                known.policy = policy  # a HELLO again on the same connection
        flags = policy.session_flags(role)
        protocol = min(offered, PROTOCOL)
        registered = False
        try:
            if role == "agent":
                registered = self._register_agent(rid, corr, body, flags, protocol)
            else:
                self._clients.add(rid)
                meta = _META.pack(Role.CLIENT, 0, flags, protocol)
                self._send_reg(rid, meta, str(body.get("name", "")).encode()[:_NAME_MAX], [], [], [])
                self._welcome(rid, corr, protocol)
                registered = True
        except (ValueError, TypeError) as exc:
            self._error(rid, ErrorCode.BAD_HELLO, corr, f"bad HELLO: {exc}")
        sess = self._sessions.get(rid)
        if sess is None:
            return
        if registered:
            sess.role = role
        elif rid not in self._agents and rid not in self._clients:
            # Refused (BAD_HELLO, NAME_TAKEN) and never registered: the data plane does not know
            # this peer and will never report it lost, so its session must not stay behind.
            del self._sessions[rid]

    def _register_agent(self, rid: bytes, corr: int, body: dict[str, Any], flags: int = 0, protocol: int = 1) -> bool:
        """Register (or re-register) an agent session; False if refused (the peer was told)."""
        name = body.get("name")
        if not isinstance(name, str) or not name or "\0" in name or len(name) > _NAME_MAX:
            raise ValueError(f"agent name must be a non-empty string without NUL, at most {_NAME_MAX} chars")
        capacity = body.get("capacity", 1)
        if not isinstance(capacity, int) or not 1 <= capacity <= 1_000_000:
            raise ValueError("capacity must be an integer from 1 to 1000000")
        caps = _strings(body.get("capabilities"), "capabilities")
        groups = _strings(body.get("groups"), "groups")
        commands = _strings(body.get("commands"), "commands")
        labels = _labels(body.get("labels"))
        prior = self._agents.get(rid)
        if prior is not None and prior.info.name != name:
            self._unname(prior)  # the same session, registering under a new name
        sess = self._sessions.get(rid)
        if self.security is not None and sess is not None:
            bound = self.security.store.bind_name(name, sess.key)
            if bound is not None:
                self._error(rid, ErrorCode.NAME_TAKEN, corr, f"agent name {name!r} is bound to another key")
                return False
        instance = body.get("instance")
        instance = instance if isinstance(instance, str) and len(instance) <= 64 else ""
        held = self._by_name.get(name)
        if held is not None and held.rid != rid:
            if not (instance and held.instance == instance):
                self._error(rid, ErrorCode.NAME_TAKEN, corr, f"agent name {name!r} is held by a live session")
                return False
            # The same agent on a fresh connection (its old one is gone, or going: a HELLO that
            # was slow to be answered): the new session replaces the old one now, rather than
            # refusing the agent until liveness expires a session nobody will use again.
            assert self._ctrl is not None
            self._ctl([self._dp_mod.OP["UNREG"], held.rid])
            self._forget(held.rid)
            log.info("agent %s reconnected: its new session replaces the old one", name)
            self._publish("agent_left", {**held.public(), "reason": "replaced by a new connection"})
        self._session += 1
        info = AgentInfo(name, tuple(caps), tuple(groups), labels, tuple(commands), capacity, 0, "alive", self._session)
        agent = _Agent(rid, info, instance=instance)
        self._agents[rid] = agent
        self._by_name[name] = agent
        self._session_of[name] = info.session
        self._capacity_of[name] = capacity
        self._send_reg(rid, _META.pack(Role.AGENT, capacity, flags, protocol), name.encode(), caps, groups, commands)
        self._welcome(rid, corr, protocol)
        if self.jobs is not None:
            self.jobs.agent_joined(name)
        log.info("agent %s joined (capacity %d, commands %s)", name, capacity, ", ".join(commands) or "-")
        self._publish("agent_joined", agent.public())
        return True

    def _send_reg(
        self, rid: bytes, meta: bytes, name: bytes, caps: list[str], groups: list[str], commands: list[str]
    ) -> None:
        if self._ctrl is not None:
            join = b"\0".join
            frames = [
                self._dp_mod.OP["REG"],
                rid,
                meta,
                name,
                join(c.encode() for c in caps),
                join(g.encode() for g in groups),
                join(c.encode() for c in commands),
            ]
            self._ctl(frames)
            sess = self._sessions.get(rid)
            if sess is not None:
                sess.reg = frames

    def _welcome(self, rid: bytes, corr: int, protocol: int) -> None:
        body = {
            "session": self._session,
            "heartbeat_ms": self.heartbeat_ms,
            "liveness": self.liveness,
            "broker": self.id,
            "protocol": protocol,  # the version this session speaks (the newest both sides do)
        }
        self._send(rid, [header(Kind.WELCOME, corr=corr), b"", msgpack.packb(body)])

    def _on_bye(self, rid: bytes, drain: bool) -> None:
        if not drain:
            self._sessions.pop(rid, None)
        agent = self._agents.get(rid)
        if agent is None:
            self._clients.discard(rid)
            self._subscribers.pop(rid, None)
            return
        if drain:
            agent.state = "draining"
            self._publish("agent_state", agent.public())
            return
        del self._agents[rid]
        self._unname(agent)
        log.info("agent %s left", agent.info.name)
        self._publish("agent_left", agent.public())

    def _on_agent_event(self, rid: bytes, frames: list[bytes]) -> None:
        agent = self._agents.get(rid)
        if agent is None or len(frames) < 3:
            return
        try:
            data = msgpack.unpackb(frames[2], raw=False)
        except Exception:
            return
        self._publish("custom", {"agent": agent.info.name, "data": data})

    # ------------------------------------------------------------ requests

    def _on_request(self, rid: bytes, fields: tuple[Any, ...], frames: list[bytes]) -> None:
        flags, corr = fields[3], fields[7]
        sess = self._sessions.get(rid)
        if sess is not None and (sess.policy.restricted or not sess.policy.may_send(sess.role)):
            route = self._authorize(sess.policy, sess.role, fields[2], frames)
            if isinstance(route, OrbitMeshError):
                if route.code == ErrorCode.FORBIDDEN:
                    self._forbidden += 1
                self._error(rid, route.code, corr, route.message)
                return
            frames = [frames[0], route, *frames[2:]]
        if flags & F_TRACKED:
            assert self.jobs is not None
            self.jobs.submit(rid, fields, frames)
            return
        command = frames[2].decode("utf-8", "replace") if fields[2] == Kind.REQUEST and len(frames) > 2 else ""
        resolved = self._resolve_labels(frames[1], command)
        if isinstance(resolved, OrbitMeshError):
            self._error(rid, resolved.code, corr, resolved.message)
            return
        assert self._ctrl is not None
        self._ctl([self._dp_mod.OP["INJECT"], rid, frames[0], resolved, *frames[2:]])

    def _authorize(self, policy: Policy, role: str, kind: int, frames: list[bytes]) -> bytes | OrbitMeshError:
        """Check a request against its key's policy; returns the route to use (narrowed to
        the agents in reach), or the refusal."""
        if not policy.may_send(role):
            return OrbitMeshError("this key may not send requests", code=ErrorCode.FORBIDDEN)
        command = frames[2].decode("utf-8", "replace") if kind == Kind.REQUEST else RAW_COMMAND
        if not policy.command_allowed(command):
            return OrbitMeshError(f"command {command!r} is not allowed for this key", code=ErrorCode.FORBIDDEN)
        route = frames[1]
        if not policy.agents:
            return route
        if len(route) < 2:
            return OrbitMeshError("bad route frame", code=ErrorCode.BAD_ROUTE)
        if route[0] == Route.NAME:
            name = route[2:].decode("utf-8", "replace")
            agent = self._by_name.get(name)
            ok = policy.agent_allowed(agent.info) if agent is not None else policy.name_in_reach(name)
            if not ok:
                return OrbitMeshError(f"agent {name!r} is not within this key's reach", code=ErrorCode.FORBIDDEN)
            return route
        spec = self._route_spec(route)
        if isinstance(spec, OrbitMeshError):
            return spec
        prior = spec.get("acl") or []
        if not isinstance(prior, list):
            return OrbitMeshError("bad label selector: acl must be a list", code=ErrorCode.BAD_ROUTE)
        spec["acl"] = [*prior, list(policy.agents)]
        packed: bytes = msgpack.packb(spec)
        return bytes((Route.LABELS, route[1])) + packed

    @staticmethod
    def _route_spec(route: bytes) -> dict[str, Any] | OrbitMeshError:
        """A selector route (capability, group, command, labels) as a label-selector map."""
        rtype, key = route[0], route[2:]
        if rtype == Route.LABELS:
            try:
                spec = msgpack.unpackb(key, raw=False)
            except Exception as exc:
                return OrbitMeshError(f"bad label selector: {exc}", code=ErrorCode.BAD_ROUTE)
            if not isinstance(spec, dict):
                return OrbitMeshError("bad label selector: selector must be a map", code=ErrorCode.BAD_ROUTE)
            return dict(spec)
        if rtype == Route.CAPABILITY:
            return {"capability": key.decode("utf-8", "replace")}
        if rtype == Route.GROUP:
            return {"group": key.decode("utf-8", "replace")}
        if rtype == Route.COMMAND:
            return {"serving": True}
        return OrbitMeshError(f"unknown route type {rtype}", code=ErrorCode.BAD_ROUTE)

    def _by_strategy(self, strategy: int, matches: list[_Agent]) -> _Agent:
        if strategy == Strategy.RANDOM:
            return random.choice(matches)
        if strategy == Strategy.ROUND_ROBIN:
            self._labels_rr += 1
            return matches[self._labels_rr % len(matches)]
        return min(matches, key=lambda a: a.inflight / max(1, a.info.capacity))

    def _unname(self, agent: _Agent) -> None:
        """``agent`` no longer answers to its name (if it still held it)."""
        name = agent.info.name
        if self._by_name.get(name) is agent:
            del self._by_name[name]
            del self._session_of[name]
            del self._capacity_of[name]

    def _resolve_labels(self, route: bytes, command: str) -> bytes | OrbitMeshError:
        """A LABELS route becomes a NAME route to the agent chosen here; others pass as they are."""
        if not route or route[0] != Route.LABELS:
            return route
        chosen = self._choose_agent(route, command)
        if isinstance(chosen, OrbitMeshError):
            return chosen
        return bytes((Route.NAME, 0)) + chosen.encode()

    def _choose_agent(
        self, route: bytes, command: str, free: Callable[[str], int] | None = None
    ) -> str | OrbitMeshError:
        """Pick the agent a route means, here in the control plane (label routes, and tracked
        jobs, whose agent is written to the job log before the job is sent). ``free(name)``:
        the room an agent has for one more (tracked jobs: slots not taken); a selector passes
        over an agent with none when another matching agent has some."""
        if len(route) < 2:
            return OrbitMeshError("bad route frame", code=ErrorCode.BAD_ROUTE)
        rtype, strategy, key = route[0], route[1], route[2:]
        if rtype == Route.NAME:
            name = key.decode(errors="replace")
            agent = self._by_name.get(name)
            if agent is None:
                return OrbitMeshError(f"no agent named '{name}'", code=ErrorCode.NO_SUCH_AGENT)
            return name
        want: dict[str, str] = {}
        cap = group = None
        serving = rtype == Route.COMMAND
        acl: list[list[str]] = []
        if rtype == Route.LABELS:
            try:
                spec = msgpack.unpackb(key, raw=False)
                if not isinstance(spec, dict):
                    raise ValueError("selector must be a map")
                want = _labels(spec.get("labels"))
                cap, group = spec.get("capability"), spec.get("group")
                serving = bool(spec.get("serving", False))
                acl = spec.get("acl") or []
                if not isinstance(acl, list) or not all(
                    isinstance(g, list) and all(isinstance(x, str) for x in g) for g in acl
                ):
                    raise ValueError("acl must be a list of lists of agent selectors")
            except Exception as exc:
                return OrbitMeshError(f"bad label selector: {exc}", code=ErrorCode.BAD_ROUTE)
        elif rtype == Route.CAPABILITY:
            cap = key.decode(errors="replace")
        elif rtype == Route.GROUP:
            group = key.decode(errors="replace")
        elif rtype != Route.COMMAND:
            return OrbitMeshError(f"unknown route type {rtype}", code=ErrorCode.BAD_ROUTE)
        matches = [
            a
            for a in self._agents.values()
            if a.state == "alive"
            and labels_match(a.info.labels, want)
            and (cap is None or cap in a.info.capabilities)
            and (group is None or group in a.info.groups)
            and (not serving or command in a.info.commands)
            and (not acl or in_reach(acl, a.info))
        ]
        if not matches:
            parts = [f"labels {want}"] if want else []
            parts += [f"capability {cap!r}"] if cap is not None else []
            parts += [f"group {group!r}"] if group is not None else []
            parts += [f"command {command!r}"] if serving else []
            what = ", ".join(parts) or "the selector"
            reach = " within this key's reach" if acl else ""
            return OrbitMeshError(f"no agent matches {what}{reach}", code=ErrorCode.NO_AGENT_AVAILABLE)
        chosen = self._by_strategy(strategy, matches)
        if free is not None and free(chosen.info.name) <= 0 and len(matches) > 1:
            roomy = [a for a in matches if free(a.info.name) > 0]
            if roomy:
                chosen = self._by_strategy(strategy, roomy)
        # Count it now, so a burst spreads before the next load report.
        chosen.inflight += 1
        return chosen.info.name

    # ------------------------------------------------------------- queries

    def _on_query(self, rid: bytes, corr: int, frames: list[bytes]) -> None:
        try:
            q = msgpack.unpackb(frames[2], raw=False) if len(frames) > 2 else None
            if not isinstance(q, dict) or not isinstance(q.get("op"), str):
                raise ValueError("a query is a map with an 'op' string")
            op = q["op"]
            handler = getattr(self, f"_q_{op}", None)
            if handler is None:
                raise ValueError(f"unknown query op {op!r}")
            sess = self._sessions.get(rid)
            if sess is not None:
                self._check_query(sess, op, q)
            result = handler(rid, corr, q)
        except (ValueError, TypeError, KeyError, OverflowError, msgpack.UnpackException) as exc:
            self._error(rid, ErrorCode.BAD_QUERY, corr, f"bad query: {exc}")
            return
        except OrbitMeshError as exc:
            if exc.code == ErrorCode.FORBIDDEN:
                self._forbidden += 1
            self._error(rid, exc.code, corr, exc.message)
            return
        if result is not _DEFERRED:
            self._reply(rid, corr, result)

    @staticmethod
    def _check_query(sess: _Session, op: str, q: dict[str, Any]) -> None:
        """A secured session's query against its key's policy: stats are for admin keys; job
        queries for sessions that may send requests, and (with command patterns) only about
        jobs of the commands the key may run; job events only for unrestricted keys."""
        policy = sess.policy
        if op == "stats" and policy.role != "admin":
            raise OrbitMeshError("stats need an admin key", code=ErrorCode.FORBIDDEN)
        if op in ("job", "jobs", "wait", "cancel") and not policy.may_send(sess.role):
            raise OrbitMeshError(f"this key may not query jobs ({op})", code=ErrorCode.FORBIDDEN)
        if op == "jobs" and isinstance(q.get("command"), str) and not policy.command_allowed(q["command"]):
            raise OrbitMeshError(f"command {q['command']!r} is not allowed for this key", code=ErrorCode.FORBIDDEN)
        if op == "subscribe" and (policy.restricted or not policy.may_send(sess.role)):
            topics = q.get("topics") or ["agent"]
            if isinstance(topics, list) and any(t not in ("agent", "custom") for t in topics):
                raise OrbitMeshError("this key may subscribe to agent and custom events only", code=ErrorCode.FORBIDDEN)

    def _policy_of(self, rid: bytes) -> Policy | None:
        sess = self._sessions.get(rid)
        return sess.policy if sess is not None and sess.policy.restricted else None

    def _q_agents(self, rid: bytes, corr: int, q: dict[str, Any]) -> Any:
        cap, group = q.get("capability"), q.get("group")
        want = _labels(q.get("labels"))
        policy = self._policy_of(rid)
        return [
            a.public()
            for a in self._agents.values()
            if (cap is None or cap in a.info.capabilities)
            and (group is None or group in a.info.groups)
            and labels_match(a.info.labels, want)
            and (policy is None or policy.agent_allowed(a.info))
        ]

    def _q_subscribe(self, rid: bytes, corr: int, q: dict[str, Any]) -> Any:
        topics = set(_strings(q.get("topics") or ["agent"], "topics"))
        self._subscribers.setdefault(rid, set()).update(topics)
        return {"topics": sorted(self._subscribers[rid])}

    def _q_unsubscribe(self, rid: bytes, corr: int, q: dict[str, Any]) -> Any:
        self._subscribers.pop(rid, None)
        return {"topics": []}

    def _job_id(self, q: dict[str, Any]) -> int:
        job_id = q.get("id")
        if not isinstance(job_id, int) or isinstance(job_id, bool):
            raise ValueError("job id must be an integer")
        return job_id

    def _record(self, q: dict[str, Any], rid: bytes) -> JobRecord:
        """The job a query names, if the asking session's key may see it."""
        assert self.jobs is not None
        job_id = self._job_id(q)
        rec = self.jobs.get(job_id)
        if rec is None:
            raise OrbitMeshError(f"no job {job_id}", code=ErrorCode.NO_SUCH_JOB)
        policy = self._policy_of(rid)
        if policy is not None and not policy.command_allowed(rec.command):
            raise OrbitMeshError(f"job {job_id}'s command is not allowed for this key", code=ErrorCode.FORBIDDEN)
        return rec

    def _q_job(self, rid: bytes, corr: int, q: dict[str, Any]) -> Any:
        return job_public(self._record(q, rid))

    def _q_jobs(self, rid: bytes, corr: int, q: dict[str, Any]) -> Any:
        assert self.jobs is not None
        self._check_jobs_query(q)
        # Answer from the store once every change made before this query is in it.
        self.jobs.flush_changes()
        self.jobs.log.barrier(lambda err: self._answer_jobs(rid, corr, q, err))
        return _DEFERRED

    @staticmethod
    def _check_jobs_query(q: dict[str, Any]) -> None:
        state = q.get("state")
        if state is not None and state not in JobState._value2member_map_:
            raise ValueError(f"unknown job state {state!r}")
        for name in ("agent", "command"):
            if q.get(name) is not None and not isinstance(q[name], str):
                raise ValueError(f"{name} must be a string")
        limit, cursor, since = q.get("limit", 100), q.get("cursor"), q.get("since")
        if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= 10_000:
            raise ValueError("limit must be an integer from 1 to 10000")
        if cursor is not None and (not isinstance(cursor, int) or isinstance(cursor, bool)):
            raise ValueError("cursor must be a job id")
        if since is not None and not isinstance(since, (int, float)):
            raise ValueError("since must be a unix time")

    def _answer_jobs(self, rid: bytes, corr: int, q: dict[str, Any], err: BaseException | None) -> None:
        assert self.jobs is not None
        try:
            page, next_cursor = self._list_jobs(q)
            policy = self._policy_of(rid)
            if policy is not None:  # a page may come out short; the cursor still goes on
                page = [row for row in page if policy.command_allowed(row["command"])]
        except OrbitMeshError as exc:
            self._error(rid, exc.code, corr, exc.message)
            return
        self._reply(rid, corr, {"jobs": page, "cursor": next_cursor})

    def _list_jobs(self, q: dict[str, Any]) -> tuple[list[dict[str, Any]], int | None]:
        assert self.jobs is not None
        state = q.get("state")
        limit, cursor, since = q.get("limit", 100), q.get("cursor"), q.get("since")
        page, next_cursor = self.jobs.store.query(
            state=JobState(state) if state is not None else None,
            agent=q.get("agent"),
            command=q.get("command"),
            since=since,
            limit=limit,
            cursor=cursor,
        )
        rows = []
        for rec in page:
            fresh = self.jobs.get(rec.id) or rec  # the store may lag the live table by a batch
            row = job_public(fresh)
            row.pop("result", None)
            rows.append(row)
        return rows, next_cursor

    def _q_cancel(self, rid: bytes, corr: int, q: dict[str, Any]) -> Any:
        assert self.jobs is not None
        if self._policy_of(rid) is not None:
            self._record(q, rid)  # refuses a job this key may not see
        rec = self.jobs.cancel(self._job_id(q))
        if rec is None:
            raise OrbitMeshError(f"no job {q['id']}", code=ErrorCode.NO_SUCH_JOB)
        return job_public(rec)

    def _q_wait(self, rid: bytes, corr: int, q: dict[str, Any]) -> Any:
        assert self.jobs is not None and self._loop is not None
        rec = self._record(q, rid)
        timeout_ms = q.get("timeout_ms", 30_000)
        if not isinstance(timeout_ms, int) or not 0 <= timeout_ms <= 365 * 86400_000:
            raise ValueError("timeout_ms must be an integer of milliseconds")
        if not self.jobs.wait(rec.id, rid, corr, answer=self._answer_wait):
            return job_public(rec)

        def expire() -> None:
            self._timers.discard(handle)
            assert self.jobs is not None
            if self.jobs.forget_waiter(rec.id, rid, corr):
                self._error(rid, ErrorCode.TIMEOUT, corr, f"job {rec.id} still {rec.state.value}")

        handle = self._loop.call_later(timeout_ms / 1000, expire)
        self._timers.add(handle)
        return _DEFERRED

    def _answer_wait(self, rec: JobRecord, rid: bytes, corr: int) -> None:
        self._reply(rid, corr, job_public(rec))

    def _q_stats(self, rid: bytes, corr: int, q: dict[str, Any]) -> Any:
        return {"broker": self.id, "core": self.core, "endpoints": self.endpoints, **self.stats()}


_DEFERRED = object()

__all__ = ["Broker", "labels_match"]
