"""Differential test: the compiled data plane and its pure-Python reference, fed the same
script, must send the same bytes to every peer and to the control plane.

Each run is a private context with a ROUTER (set up as the Broker does), a control PAIR
on which the test plays the control plane, raw DEALER peers, and ``DataPlane.run`` on a
thread. A script is a list of small integer tuples; the interpreter turns each into one
step (one sender), then waits on a barrier and records what every socket received, with
routing ids replaced by labels. The c and py transcripts are compared step by step.

Barrier: a peer step ends with the same peer sending a probe (kind WELCOME, which a peer
may not send) and waiting for its ERROR; a control step ends with an OP_SEND to the
``monitor`` peer. The data plane handles one message at a time and the pipes are inproc,
so once the barrier answer is in, everything the step caused has been sent.
"""

from __future__ import annotations

import random
import struct
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import zmq
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from orbitmesh import _core
from orbitmesh._core._dataplane_py import ACL_CHECKED, ACL_NO_REQUESTS
from orbitmesh._core._frame_py import pack_parts, packable, unpack_parts
from orbitmesh.protocol import Flag, Kind, Role, Route, Strategy

from .mesh import HDR, hdr

META = struct.Struct("<BIIB")  # role, capacity, acl, session protocol (2: packed framing)
TOKEN = struct.Struct("<II")
OP_SEND, OP_REG, OP_UNREG, OP_INJECT, OP_STOP = (bytes([i]) for i in range(1, 6))
EV_MSG, EV_LOST, EV_JOB, EV_DISPATCHED, EV_STATE, EV_LOAD, EV_STOPPED, EV_HELLO = range(1, 9)
EV_NAMES = {1: "MSG", 2: "LOST", 3: "JOB", 4: "DISPATCHED", 5: "STATE", 6: "LOAD", 7: "STOPPED", 8: "HELLO"}
EV_PACKED = bytes([9])

MAX_FRAME = 2048  # max_frame_bytes; the ROUTER's MAXMSGSIZE is this + 1024, as in broker.py
QUEUE_LIMIT = 6
FAR = 4_102_444_800_000  # a deadline in 2100 (unix ms): the same bytes in both runs
PROBE_CORR = 0xFFFF_FFFF_FFFF_0B0B
WAIT = 3.0  # seconds a barrier may take before the step is recorded as timed out

CLIENTS = ("client-0", "client-1", "client-2")
AGENTS = ("agent-0", "agent-1", "agent-2", "agent-3")
STRANGER = "stranger"  # never says HELLO
PEERS = (*CLIENTS, *AGENTS, STRANGER)

CAPS = (b"gpu", b"cpu")
GROUPS = (b"g1", b"g2")
COMMANDS = (b"echo", b"sum", b"slow")


PROBE = hdr(Kind.WELCOME, corr=PROBE_CORR)


def _events(frames: list[bytes]) -> list[list[bytes]]:
    """The events of a message from the data plane: those an EV_PACKED packs, or itself."""
    if frames[0] == EV_PACKED:
        return _core.load("_io", "py").unpack_messages(frames[1])
    return [frames]


def route(rtype: int, strategy: int, key: bytes) -> bytes:
    return bytes((rtype, strategy)) + key


def agent_config(i: int, bits: int) -> tuple[int, list[bytes], list[bytes], list[bytes]]:
    """capacity, capabilities, groups, commands of agent ``i`` for a HELLO variant ``bits``."""
    capacity = (1, 2, 2, 0, 3)[bits % 5]
    caps = [c for j, c in enumerate(CAPS) if bits >> (3 + j) & 1] + [b"solo-%d" % i]
    groups = [g for j, g in enumerate(GROUPS) if bits >> (5 + j) & 1]
    commands = [c for j, c in enumerate(COMMANDS) if bits >> (7 + j) & 1 or j == i % 3]
    return capacity, caps, groups, commands


# Route choices for REQUEST / RAW / OP_INJECT; the key of the multi-agent ones may be served by
# several agents, so RANDOM is only used where at most one agent can match (see
# test_random_strategy_same_choices).
MULTI = {"cap-gpu", "cap-cpu", "group-g1", "group-g2", "command"}
ROUTES: tuple[tuple[str, Callable[[int, int], bytes]], ...] = (
    *((f"name-{i}", lambda s, k, i=i: route(Route.NAME, s, AGENTS[i].encode())) for i in range(4)),
    ("name-ghost", lambda s, k: route(Route.NAME, s, b"ghost")),
    ("cap-gpu", lambda s, k: route(Route.CAPABILITY, s, b"gpu")),
    ("cap-cpu", lambda s, k: route(Route.CAPABILITY, s, b"cpu")),
    ("cap-solo", lambda s, k: route(Route.CAPABILITY, s, b"solo-%d" % (k % 4))),
    ("cap-unknown", lambda s, k: route(Route.CAPABILITY, s, b"tpu")),
    ("group-g1", lambda s, k: route(Route.GROUP, s, b"g1")),
    ("group-g2", lambda s, k: route(Route.GROUP, s, b"g2")),
    ("group-unknown", lambda s, k: route(Route.GROUP, s, b"gx")),
    ("command", lambda s, k: route(Route.COMMAND, s, b"")),
    ("cap-empty", lambda s, k: route(Route.CAPABILITY, s, b"")),
    ("empty", lambda s, k: b""),
    ("short", lambda s, k: b"\x02"),
    ("bad-type", lambda s, k: route(9, s, b"gpu")),
    ("bad-strategy", lambda s, k: route(Route.CAPABILITY, 7, b"gpu")),
    ("labels", lambda s, k: route(Route.LABELS, s, b"\x81\xa3zone\xa1a")),
)


class Rig:
    """One data plane (impl "c" or "py") with its peers; plays one script and records it."""

    def __init__(self, impl: str, seed: int, heartbeat_ms: int = 60_000) -> None:
        self.impl = impl
        self.ctx = zmq.Context()
        self.sockets: dict[str, zmq.Socket[Any]] = {}
        self.closed: set[str] = set()
        self.packed: set[str] = set()  # peers whose session speaks protocol 2
        self.rid: dict[str, bytes] = {}
        self.label: dict[bytes, str] = {}
        self.inbox: dict[str, list[tuple[bytes, bytes]]] = {a: [] for a in AGENTS}  # live (token, hdr)
        self.retired: list[bytes] = []  # tokens answered with a terminal kind
        self.seen_tokens: list[bytes] = []  # every token a client saw in a route frame
        self.corrs: dict[str, list[int]] = {p: [] for p in (*PEERS, "monitor")}
        self.next_corr = 1
        self.next_job = 1000
        self.error: BaseException | None = None
        self.last_load = b""
        self.sender = ""  # the peer that sent the current step: the owner of a new routing id
        self.endpoint = f"inproc://parity-{impl}-{id(self)}"
        try:
            self._start(impl, seed, heartbeat_ms)
        except BaseException:
            for s in self.sockets.values():
                s.close(0)
            self.ctx.term()
            raise

    def _start(self, impl: str, seed: int, heartbeat_ms: int) -> None:
        router = self._socket("router", zmq.ROUTER)
        router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        router.setsockopt(zmq.SNDHWM, 100_000)
        router.setsockopt(zmq.RCVHWM, 100_000)
        router.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME + 1024)
        router.bind(self.endpoint)
        self.control = self._socket("control", zmq.PAIR)
        dp = self._socket("dp", zmq.PAIR)
        for s in (self.control, dp):
            s.setsockopt(zmq.SNDHWM, 0)
            s.setsockopt(zmq.RCVHWM, 0)
        self.control.bind(f"inproc://parity-ctrl-{impl}-{id(self)}")
        dp.connect(f"inproc://parity-ctrl-{impl}-{id(self)}")
        mod = _core.load("_dataplane", impl)
        self.counter_names = mod.COUNTERS
        self.plane = mod.DataPlane(
            router,
            dp,
            heartbeat_ms=heartbeat_ms,
            liveness=5,
            max_frame_bytes=MAX_FRAME,
            queue_limit=QUEUE_LIMIT,
            default_queue_ms=60_000,
            seed=seed,
            **PLANE_OPTIONS,
        )
        self.thread = threading.Thread(target=self._run, name=f"parity-{impl}", daemon=True)
        self.thread.start()
        for name in (*PEERS, "monitor"):
            s = self._socket(name, zmq.DEALER)
            s.connect(self.endpoint)
        # The monitor only says HELLO (never registered), so the control plane can reach it.
        self.send("monitor", [hdr(Kind.HELLO, corr=1), b"monitor"])
        self.rid["monitor"] = self._recv_control_hello()
        self.label[self.rid["monitor"]] = "monitor"

    def _socket(self, name: str, kind: int) -> zmq.Socket[Any]:
        s = self.ctx.socket(kind)
        s.setsockopt(zmq.LINGER, 0)
        self.sockets[name] = s
        return s

    def _run(self) -> None:
        try:
            self.plane.run()
        except BaseException as exc:  # reported by the test, not by the thread
            self.error = exc

    def _recv_control_hello(self) -> bytes:
        if not self.control.poll(int(WAIT * 1000)):
            raise AssertionError(f"{self.impl}: no EV_HELLO for the monitor's HELLO")
        [frames] = _events(self.control.recv_multipart())
        assert frames[0][0] == EV_HELLO and frames[3][3] == Kind.HELLO, frames
        return frames[2]

    def close(self) -> dict[str, int] | str:
        """Stop the data plane; its EV_STOPPED counters (or what went wrong)."""
        result: dict[str, int] | str = "no EV_STOPPED"
        try:
            self.control.send_multipart([OP_STOP])
            deadline = time.monotonic() + WAIT
            while time.monotonic() < deadline:
                if not self.control.poll(100):
                    continue
                frames = self.control.recv_multipart()
                if frames[0][0] == EV_STOPPED:
                    values = struct.unpack(f"<{len(frames[1]) // 8}Q", frames[1])
                    result = dict(zip(self.counter_names, values, strict=True))
                    break
            self.thread.join(WAIT)
            if self.thread.is_alive():
                result = "data plane thread did not stop"
        finally:
            for s in self.sockets.values():
                s.close(0)
            self.ctx.term()
        if self.error is not None:
            return f"data plane raised {self.error!r}"
        return result

    # ------------------------------------------------------------ sending

    def send(self, peer: str, frames: list[bytes]) -> None:
        self.sender = peer
        if peer in self.packed and packable(frames[0]):
            frames = pack_parts(frames)  # a protocol-2 session sends packed framing
        self.sockets[peer].send_multipart(frames)

    def corr(self, peer: str) -> int:
        c = self.next_corr
        self.next_corr += 1
        self.corrs[peer].append(c)
        return c

    # ---------------------------------------------------------- recording

    def _name(self, rid: bytes) -> str:
        if not rid:
            return ""
        return self.label.get(rid, f"?{rid.hex()}")

    def _note(self, who: str, frames: list[bytes], out: dict[str, list[Any]]) -> None:
        if who == "control":
            ev = frames[0][0]
            rec: tuple[Any, ...] = (EV_NAMES.get(ev, ev),)
            if ev == EV_HELLO and len(frames) > 2:
                # [ev, user id (empty: no CURVE here), rid, hdr, ...]
                if frames[2] not in self.label:
                    self.rid[self.sender], self.label[frames[2]] = frames[2], self.sender
                rec += (frames[1], self._name(frames[2]), *frames[3:])
            elif ev in (EV_MSG, EV_LOST, EV_JOB, EV_DISPATCHED, EV_STATE) and len(frames) > 1:
                rec += (self._name(frames[1]), *frames[2:])
            else:
                rec += tuple(frames[1:])
            out.setdefault(who, []).append(rec)
            return
        if who in AGENTS and len(frames) >= 2 and len(frames[0]) == 40:
            kind = frames[0][3]
            if kind in (Kind.REQUEST, Kind.RAW):
                self.inbox[who].append((frames[1], frames[0]))
        if who in CLIENTS and len(frames) >= 2 and len(frames[1]) == 8:
            self.seen_tokens.append(frames[1])
        out.setdefault(who, []).append(tuple(frames))

    def collect(self, barrier: str | None, done: Callable[[list[bytes]], bool] | None = None) -> dict[str, Any]:
        """Record what every socket receives until ``barrier`` gets a message ``done`` accepts
        (then take whatever else is already there)."""
        out: dict[str, list[Any]] = {}
        poller = zmq.Poller()
        names = [n for n in self.sockets if n not in ("router", "dp") and n not in self.closed]
        for n in names:
            poller.register(self.sockets[n], zmq.POLLIN)
        waiting = barrier is not None
        deadline = time.monotonic() + WAIT
        while True:
            timeout = max(0, int((deadline - time.monotonic()) * 1000)) if waiting else 0
            events = dict(poller.poll(timeout))
            if not events:
                if waiting:
                    out.setdefault("!", []).append(f"barrier on {barrier} timed out")
                break
            for n in names:
                s = self.sockets[n]
                if s not in events:
                    continue
                while True:
                    try:
                        got = s.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    for frames in _events(got) if n == "control" else [got]:
                        if n == barrier and waiting and done is not None and done(frames):
                            waiting = False
                            if n == "control" and frames[0][0] == EV_LOAD:
                                self.last_load = frames[1]
                            continue
                        self._note(n, frames, out)
        return out

    def peer_barrier(self, peer: str) -> dict[str, Any]:
        self.send(peer, [PROBE])
        got = self.collect(peer, lambda f: len(f) >= 1 and f[0][3] == Kind.ERROR and f[0][16:24] == PROBE[16:24])
        # The events of the turn that answered the probe go up at its end: a control barrier
        # (handled in later turns) makes sure they are here too.
        return _merge(got, self.control_barrier())

    def control_barrier(self) -> dict[str, Any]:
        # Two probes, one after the other: the data plane sends the events of a turn up at its
        # end, so those of the turn that forwarded the first are up by the time of the second.
        got = []
        for _ in range(2):
            self.control.send_multipart([OP_SEND, self.rid["monitor"], PROBE, b""])
            got.append(self.collect("monitor", lambda f: f[0] == PROBE))
        return _merge(*got)

    # -------------------------------------------------------------- steps

    def step(self, action: tuple[int, ...]) -> tuple[str, dict[str, Any]]:
        op = ACTIONS[action[0] % len(ACTIONS)]
        return op.__name__, op(self, *action[1:])


def _merge(*parts: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, list[Any]] = {}
    for p in parts:
        for k, v in p.items():
            out.setdefault(k, []).extend(v)
    return out


def _open(rig: Rig, names: tuple[str, ...], i: int) -> str | None:
    name = names[i % len(names)]
    return None if name in rig.closed else name


def register(
    rig: Rig,
    peer: str,
    *,
    name: bytes | None = None,
    capacity: int = 0,
    caps: list[bytes] | None = None,
    groups: list[bytes] | None = None,
    commands: list[bytes] | None = None,
    acl: int = 0,
    protocol: int = 1,
) -> dict[str, Any]:
    """``peer`` says HELLO; the test, as the control plane, registers it (OP_REG, with ``acl``
    flags and session ``protocol``: 2 sends and receives packed framing) and welcomes it. An
    agent is any peer given a capacity or keys; ``name`` defaults to the peer's label."""
    corr = rig.corr(peer)
    rig.send(peer, [hdr(Kind.HELLO, corr=corr), peer.encode()])
    got = rig.peer_barrier(peer)  # the EV_MSG of the HELLO taught the rig the peer's routing id
    rid = rig.rid[peer]
    join = b"\0".join
    agent = peer in AGENTS or capacity or caps or groups or commands
    role = Role.AGENT if agent else Role.CLIENT
    keys = [join(caps or []), join(groups or []), join(commands or [])]
    reg = [META.pack(role, capacity, acl, protocol), peer.encode() if name is None else name, *keys]
    rig.control.send_multipart([OP_REG, rid, *reg])
    rig.control.send_multipart([OP_SEND, rid, hdr(Kind.WELCOME, corr=corr), b""])
    welcomed = rig.collect(peer, lambda f: unpack_parts(f)[0] == hdr(Kind.WELCOME, corr=corr))
    if protocol >= 2:
        rig.packed.add(peer)
    else:
        rig.packed.discard(peer)
    return _merge(got, welcomed, rig.control_barrier())


def hello(rig: Rig, who: int, bits: int, *_: int) -> dict[str, Any]:
    """A peer says HELLO and is registered (again, if it was), with a config drawn from ``bits``."""
    peer = _open(rig, (*CLIENTS, *AGENTS), who)
    if peer is None:
        return {}
    # Now and then a session whose key may send no requests, or whose requests go up for a check.
    acl = {7: ACL_NO_REQUESTS, 6: ACL_CHECKED}.get(bits >> 9 & 7, 0)
    protocol = 2 if bits % 7 >= 3 else 1  # most sessions packed, some not: both meet in one broker
    if peer in AGENTS:
        capacity, caps, groups, commands = agent_config(AGENTS.index(peer), bits)
        return register(
            rig, peer, capacity=capacity, caps=caps, groups=groups, commands=commands, acl=acl, protocol=protocol
        )
    return register(rig, peer, acl=acl, protocol=protocol)


def _request_frames(rig: Rig, peer: str, raw: bool, r: int, s: int, k: int, flags: int) -> list[bytes]:
    name, make = ROUTES[r % len(ROUTES)]
    strategy = s % 3
    if strategy == Strategy.RANDOM and name in MULTI:
        strategy = Strategy.ROUND_ROBIN
    deadline = (0, 0, FAR, 0, FAR, 1)[flags % 6]
    fl = (Flag.TRACKED if flags >> 2 & 1 else 0) | (Flag.STREAM if flags >> 3 & 1 else 0)
    corr = rig.corr(peer)
    h = hdr(Kind.RAW if raw else Kind.REQUEST, flags=fl, corr=corr, deadline=deadline)
    body = [b"p%d" % j for j in range(k % 3)]
    if raw:
        return [h, make(strategy, k), *body]
    return [h, make(strategy, k), (*COMMANDS, b"nope")[k % 4], *body]


def _inject_tracked(rig: Rig, got: dict[str, Any]) -> dict[str, Any]:
    """Play the control plane for tracked requests that went up: OP_INJECT them with a job id."""
    injected = False
    for rec in got.get("control", []):
        if rec[0] != "MSG" or len(rec) < 4:
            continue
        h = rec[2]
        if h[3] in (Kind.REQUEST, Kind.RAW) and HDR.unpack(h)[3] & Flag.TRACKED and rec[3][:1] != b"\x05":
            fields = list(HDR.unpack(h))
            fields[8] = rig.next_job
            rig.next_job += 1
            rig.control.send_multipart([OP_INJECT, rig.rid[rec[1]], HDR.pack(*fields), *rec[3:]])
            injected = True
    return _merge(got, rig.control_barrier()) if injected else got


def request(rig: Rig, who: int, r: int, s: int, k: int, flags: int, *_: int) -> dict[str, Any]:
    """A client (or an agent, or the stranger) sends a REQUEST."""
    peer = _open(rig, (*CLIENTS, *CLIENTS, *AGENTS[:1], STRANGER), who)
    if peer is None:
        return {}
    rig.send(peer, _request_frames(rig, peer, False, r, s, k, flags))
    return _inject_tracked(rig, rig.peer_barrier(peer))


def raw(rig: Rig, who: int, r: int, s: int, k: int, flags: int, *_: int) -> dict[str, Any]:
    """A client sends a RAW request."""
    peer = _open(rig, CLIENTS, who)
    if peer is None:
        return {}
    rig.send(peer, _request_frames(rig, peer, True, r, s, k, flags))
    return _inject_tracked(rig, rig.peer_barrier(peer))


def burst(rig: Rig, who: int, r: int, s: int, k: int, flags: int, n: int = 3, *_: int) -> dict[str, Any]:
    """One client sends several requests on one route at once (so they queue)."""
    peer = _open(rig, CLIENTS, who)
    if peer is None:
        return {}
    for j in range(2 + n % 4):
        rig.send(peer, _request_frames(rig, peer, False, r, s, k + j, flags & ~4))
    return rig.peer_barrier(peer)


def reply(rig: Rig, who: int, pick: int, kind: int, mode: int, *_: int) -> dict[str, Any]:
    """An agent answers one of its dispatched requests (or sends a stale / bogus token)."""
    busy = [a for a in AGENTS if rig.inbox[a] and a not in rig.closed]
    peer = busy[who % len(busy)] if busy and mode % 8 < 5 else _open(rig, (*AGENTS, CLIENTS[0]), who)
    if peer is None:
        return {}
    kinds = (Kind.REPLY, Kind.ERROR, Kind.STREAM_ITEM, Kind.RUNNING, Kind.STREAM_END, Kind.REPLY)
    k = kinds[kind % len(kinds)]
    live = rig.inbox.get(peer, [])
    mode %= 8
    if live and mode < 5:
        token, h = live[pick % len(live)]
        _, _, _, _, _, _, _, corr, job, _ = HDR.unpack(h)
    else:
        corr, job = 0, 0
        others = [t for a in AGENTS if a != peer for t, _ in rig.inbox[a]]
        if mode == 5 and rig.retired:
            token = rig.retired[pick % len(rig.retired)]
        elif mode == 6 and others:
            token = others[pick % len(others)]
        else:
            token = (TOKEN.pack(pick % 5, 1 + pick % 3), b"abc", b"")[pick % 3]
    frames = [hdr(k, code=301 if k == Kind.ERROR else 0, aux=pick % 7, corr=corr, job=job), token]
    if k in (Kind.REPLY, Kind.STREAM_ITEM, Kind.ERROR):
        frames.append(b"result-%d" % pick)
    rig.send(peer, frames)
    if k in (Kind.REPLY, Kind.ERROR, Kind.STREAM_END):
        for item in rig.inbox.get(peer, []):
            if item[0] == token:
                rig.inbox[peer].remove(item)
                rig.retired.append(token)
                break
    return rig.peer_barrier(peer)


def signal(rig: Rig, who: int, kind: int, mode: int, pick: int, *_: int) -> dict[str, Any]:
    """A client sends CANCEL or CREDIT, by token, by corr (empty route), or with junk."""
    peer = _open(rig, (*CLIENTS, STRANGER), who)
    if peer is None:
        return {}
    k = (Kind.CANCEL, Kind.CREDIT)[kind % 2]
    mode %= 5
    corr = 0
    if mode == 0 and rig.seen_tokens:
        rt = rig.seen_tokens[pick % len(rig.seen_tokens)]
    elif mode == 1:
        live = [t for a in AGENTS for t, _ in rig.inbox[a]]
        rt = live[pick % len(live)] if live else TOKEN.pack(0, 1)
    elif mode == 2 and rig.corrs[peer]:
        rt, corr = b"", rig.corrs[peer][-(1 + pick % min(4, len(rig.corrs[peer])))]
    elif mode == 3:
        rt, corr = b"", 999_999
    else:
        rt = (b"\x00" * 3, TOKEN.pack(pick % 9, 7))[pick % 2]
    rig.send(peer, [hdr(k, aux=pick % 5, corr=corr), rt, *([b"why"] if pick % 2 else [])])
    return rig.peer_barrier(peer)


def malformed(rig: Rig, who: int, variant: int, *_: int) -> dict[str, Any]:
    """A peer (registered or not) sends a broken message."""
    peer = _open(rig, PEERS, who)
    if peer is None:
        return {}
    corr = rig.corr(peer)
    good = hdr(Kind.REQUEST, corr=corr)
    rt = route(Route.CAPABILITY, 0, b"gpu")
    variants: list[list[bytes]] = [
        [good[:39]],
        [good + b"x", rt, b"echo"],
        [b""],
        [hdr(Kind.REQUEST, corr=corr, magic=b"MO"), rt, b"echo"],
        [hdr(Kind.REQUEST, corr=corr, version=2), rt, b"echo"],
        [hdr(0, corr=corr)],
        [hdr(17, corr=corr)],
        [hdr(255, corr=corr), rt],
        [hdr(Kind.REQUEST, corr=corr, reserved=1), rt, b"echo"],
        [hdr(Kind.REQUEST, corr=corr, reserved=1 << 31)],
        [good, rt],
        [hdr(Kind.RAW, corr=corr)],
        [hdr(Kind.CANCEL, corr=corr)],
        [hdr(Kind.CREDIT, corr=corr)],
        [hdr(Kind.REPLY, corr=corr)],
        [hdr(Kind.STREAM_ITEM, corr=corr)],
        [good, rt, b"echo", *([b"x"] * 60)],  # 63 frames (64 with the routing id): the most allowed
        [good, rt, b"echo", *([b"x"] * 61)],  # 64 frames: one too many
        [good, rt, b"echo", *([b"y"] * 120)],
        [good, rt, b"echo", b"z" * (MAX_FRAME + 1)],  # over max_frame_bytes, under MAXMSGSIZE
        [good, rt, b"echo", b"z" * MAX_FRAME],  # exactly the limit: fine
        [good, b"r" * (MAX_FRAME + 1), b"echo"],
        [hdr(Kind.WELCOME, corr=corr)],
        [hdr(Kind.ACCEPTED, corr=corr), b""],
        [hdr(Kind.HEARTBEAT), b""],
        [hdr(Kind.QUERY, corr=corr), b"", b"\x80"],
        [hdr(Kind.EVENT, corr=corr), b"", b"ev"],
        [hdr(Kind.HELLO, corr=corr, flags=3)],
    ]
    rig.send(peer, variants[variant % len(variants)])
    return rig.peer_barrier(peer)


def bye(rig: Rig, who: int, drain: int, *_: int) -> dict[str, Any]:
    """A peer says BYE, with or without DRAIN."""
    peer = _open(rig, (*AGENTS, *CLIENTS), who)
    if peer is None:
        return {}
    rig.send(peer, [hdr(Kind.BYE, flags=Flag.DRAIN if drain % 3 == 0 else 0, corr=rig.corr(peer))])
    return rig.peer_barrier(peer)


def unreg(rig: Rig, who: int, *_: int) -> dict[str, Any]:
    """The control plane forgets a peer (OP_UNREG): its in-flight requests fail AGENT_LOST."""
    peer = (*AGENTS, *CLIENTS, "monitor")[who % 8]
    if peer not in rig.rid:
        return {}
    rig.control.send_multipart([OP_UNREG, rig.rid[peer]])
    return rig.control_barrier()


def inject(rig: Rig, who: int, r: int, s: int, k: int, flags: int, *_: int) -> dict[str, Any]:
    """The control plane routes a request as if a client sent it (OP_INJECT), tracked or not."""
    peer = (*CLIENTS, "monitor")[who % 4]
    if peer not in rig.rid:
        return {}
    frames = _request_frames(rig, peer, bool(k & 8), r, s, k, flags)
    if flags >> 2 & 1:
        fields = list(HDR.unpack(frames[0]))
        fields[8] = rig.next_job
        rig.next_job += 1
        frames[0] = HDR.pack(*fields)
    if len(frames) < 3:
        frames.append(b"")
    rig.control.send_multipart([OP_INJECT, rig.rid[peer], *frames])
    return rig.control_barrier()


def replay(rig: Rig, who: int, r: int, s: int, k: int, pick: int, *_: int) -> dict[str, Any]:
    """A client sends a REQUEST again with a corr it used before (or 0): a replay."""
    peer = _open(rig, CLIENTS, who)
    if peer is None:
        return {}
    frames = _request_frames(rig, peer, False, r, s, k, 0)
    used = rig.corrs[peer]
    corr = used[-(1 + pick % min(3, len(used)))] if used and pick % 4 else 0
    fields = list(HDR.unpack(frames[0]))
    fields[7] = corr
    rig.send(peer, [HDR.pack(*fields), *frames[1:]])
    return rig.peer_barrier(peer)


def crash(rig: Rig, who: int, *_: int) -> dict[str, Any]:
    """A peer's connection drops without BYE: its routing id becomes unreachable."""
    peer = (*AGENTS, *CLIENTS)[who % 7]
    if peer in rig.closed:
        return {}
    rig.closed.add(peer)
    # An inproc disconnect queues the pipe's termination for the ROUTER before it returns, so
    # the data plane sees the peer gone before it handles the next message (a bare close()
    # leaves that to the reaper thread, a race).
    rig.sockets[peer].disconnect(rig.endpoint)
    rig.sockets[peer].close(0)
    return rig.control_barrier()


ACTIONS = (hello, request, raw, burst, reply, signal, malformed, bye, unreg, inject, crash, replay)
WEIGHTS = (4, 14, 3, 4, 18, 5, 6, 2, 2, 4, 1, 2)


GOOD = ("name-0", "name-1", "name-2", "name-3", "cap-gpu", "cap-cpu", "cap-solo", "group-g1", "group-g2", "command")
GOOD_ROUTES = [i for i, (name, _) in enumerate(ROUTES) if name in GOOD]  # routes some agent may serve


def seeded_script(seed: int, n: int = 200) -> list[tuple[int, ...]]:
    """Every peer says HELLO, then ``n`` weighted actions; most requests use a route some agent serves."""
    rng = random.Random(seed)
    script: list[tuple[int, ...]] = [(0, i, rng.randrange(1 << 12)) for i in range(7)]
    for _ in range(n):
        op = rng.choices(range(len(ACTIONS)), WEIGHTS)[0]
        args = [rng.randrange(1 << 12) for _ in range(6)]
        if ACTIONS[op] in (request, raw, burst, inject) and rng.random() < 0.75:
            args[1] = rng.choice(GOOD_ROUTES)
        script.append((op, *args))
    return script


Step = tuple[str, dict[str, Any]]


def run_both(scenario: Callable[[Rig], Iterator[Step]], seed: int = 0, **rig: Any) -> dict[str, list[Step]]:
    """Play ``scenario`` on a fresh c rig and a fresh py rig; their transcripts."""
    out: dict[str, list[Step]] = {}
    for impl in ("c", "py"):
        r = Rig(impl, seed, **rig)
        steps: list[Step] = []
        try:
            for step in scenario(r):
                steps.append(step)
                if "!" in step[1]:
                    break
        finally:
            steps.append(("stop", {"EV_STOPPED": [r.close()]}))
        out[impl] = steps
    return out


def assert_same(runs: dict[str, list[Step]], context: Callable[[int], str] = lambda i: "") -> None:
    """The c and py transcripts are equal, step by step (the first differing step is shown)."""
    c, py = runs["c"], runs["py"]
    for i, (sc, sp) in enumerate(zip(c, py, strict=False)):
        if sc != sp:
            pytest.fail(f"c and py differ at step {i} ({sc[0]}){context(i)}\nc : {sc[1]}\npy: {sp[1]}", pytrace=False)
    assert len(c) == len(py), (len(c), len(py))


def check_script(script: list[tuple[int, ...]], seed: int) -> None:
    def scenario(rig: Rig) -> Iterator[Step]:
        for action in script:
            name, got = rig.step(action)
            yield f"{name} {action}", got

    assert_same(run_both(scenario, seed), lambda i: f"; seed {seed}, script up to it: {script[: i + 1]}")


@pytest.mark.parametrize("seed", range(8))
def test_parity_seeded(seed: int) -> None:
    check_script(seeded_script(seed), seed)


# Extra DataPlane options for every rig (the per-client limits test sets them).
PLANE_OPTIONS: dict[str, int] = {}


@pytest.mark.parametrize("seed", range(3))
def test_parity_with_a_per_client_inflight_limit(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    # Given a limit of 2 requests in flight or queued per client, Expect both planes to refuse
    # and count alike (the rate limit depends on the clock, so it is tested end to end instead)
    monkeypatch.setitem(PLANE_OPTIONS, "client_max_inflight", 2)
    check_script(seeded_script(seed + 100), seed)


action = st.tuples(st.integers(0, len(ACTIONS) - 1), *(st.integers(0, (1 << 12) - 1) for _ in range(6)))


@settings(
    max_examples=10,
    deadline=None,
    phases=(Phase.explicit, Phase.generate),  # no shrinking: it would replay hundreds of scripts
    suppress_health_check=[HealthCheck.too_slow],
    database=None,
)
@given(seed=st.integers(0, 2**32 - 1), script=st.lists(action, min_size=10, max_size=100))
def test_parity_hypothesis(seed: int, script: list[tuple[int, ...]]) -> None:
    opening = [(0, i, seed >> (3 * i) & 0xFFF) for i in range(7)]
    check_script(opening + script, seed)


# ------------------------------------------------------------------ targeted scenarios


def send_step(rig: Rig, peer: str, *messages: list[bytes]) -> dict[str, Any]:
    for frames in messages:
        rig.send(peer, frames)
    return rig.peer_barrier(peer)


def control_step(rig: Rig, *messages: list[bytes]) -> dict[str, Any]:
    for frames in messages:
        rig.control.send_multipart(frames)
    return rig.control_barrier()


def request_frames(
    corr: int, rt: bytes, command: bytes = b"echo", *, flags: int = 0, job: int = 0, deadline: int = 0
) -> list[bytes]:
    return [hdr(Kind.REQUEST, flags=flags, corr=corr, job=job, deadline=deadline), rt, command, b"params"]


@pytest.mark.parametrize("how", ["op-unreg", "bye", "dispatch-to-gone-agent"])
def test_tracked_job_failed_by_lost_agent(how: str) -> None:
    """An in-flight tracked job whose agent goes away: the client's ERROR and the control
    plane's EV_JOB copy (py: [EV_JOB, agent rid, hdr, token, message])."""

    def scenario(rig: Rig) -> Iterator[Step]:
        yield "register", _merge(register(rig, "client-0"), register(rig, "agent-0", capacity=3, caps=[b"gpu"]))
        rt = route(Route.NAME, 0, b"agent-0")
        frames = request_frames(7, rt, flags=Flag.TRACKED, job=70)
        yield "inject tracked", control_step(rig, [OP_INJECT, rig.rid["client-0"], *frames])
        yield "untracked", send_step(rig, "client-0", request_frames(8, route(Route.CAPABILITY, 0, b"gpu")))
        if how == "op-unreg":
            yield how, control_step(rig, [OP_UNREG, rig.rid["agent-0"]])
        elif how == "bye":
            yield how, send_step(rig, "agent-0", [hdr(Kind.BYE, corr=9)])
        else:
            yield "crash", crash(rig, 0)
            yield how, send_step(rig, "client-0", request_frames(10, rt))

    assert_same(run_both(scenario))


def test_random_strategy_same_choices() -> None:
    """RANDOM among several ready agents, same seed: the same agents chosen (py: random.Random(seed))."""

    def scenario(rig: Rig) -> Iterator[Step]:
        yield (
            "register",
            _merge(*(register(rig, a, capacity=50, caps=[b"gpu"]) for a in AGENTS[:3]), register(rig, "client-0")),
        )
        for corr in range(1, 13):
            yield (
                f"random #{corr}",
                send_step(rig, "client-0", request_frames(corr, route(Route.CAPABILITY, 2, b"gpu"))),
            )

    assert_same(run_both(scenario, seed=1234))


ODD_ROUTES = {
    "name-not-utf8": (route(Route.NAME, 0, b"\xff\xfeq"), b"echo"),
    "name-with-nul": (route(Route.NAME, 0, b"nul\x00key"), b"echo"),
    "name-600-bytes": (route(Route.NAME, 0, b"k" * 600), b"echo"),
    "capability-not-utf8": (route(Route.CAPABILITY, 0, b"\xc3("), b"echo"),
    "group-600-bytes-utf8": (route(Route.GROUP, 1, "\u00e9".encode() * 300), b"echo"),
    "command-not-utf8": (route(Route.COMMAND, 0, b""), b"\xffcmd"),
}


@pytest.mark.parametrize("case", sorted(ODD_ROUTES))
def test_error_text_for_unusual_route_keys(case: str) -> None:
    """The text of NO_SUCH_AGENT / NO_AGENT_AVAILABLE for keys that are not short ASCII
    (py: the key decoded with errors="replace", in full)."""
    rt, command = ODD_ROUTES[case]

    def scenario(rig: Rig) -> Iterator[Step]:
        yield "register", _merge(register(rig, "client-0"), register(rig, "agent-0", capacity=1, caps=[b"gpu"]))
        yield case, send_step(rig, "client-0", request_frames(5, rt, command))

    assert_same(run_both(scenario))


def test_agent_lost_text_for_a_long_agent_name() -> None:
    """AGENT_LOST for an agent whose name is 200 characters (the most the control plane
    accepts) of 3-byte UTF-8: py says "agent <whole name> was lost"."""
    name = ("\u540d" * 200).encode()

    def scenario(rig: Rig) -> Iterator[Step]:
        yield "register", _merge(register(rig, "client-0"), register(rig, "agent-0", name=name, capacity=1))
        yield "request", send_step(rig, "client-0", request_frames(5, route(Route.NAME, 0, name)))
        yield "unreg", control_step(rig, [OP_UNREG, rig.rid["agent-0"]])

    assert_same(run_both(scenario))


@pytest.mark.parametrize("deadline", [2**63 - 1, 2**63, 2**64 - 1])
def test_far_deadline_waits_in_the_queue(deadline: int) -> None:
    """A deadline past the int64 range (u64 on the wire) is far in the future: py queues it."""

    def scenario(rig: Rig) -> Iterator[Step]:
        yield "register", _merge(register(rig, "client-0"), register(rig, "agent-0", capacity=1, caps=[b"gpu"]))
        rt = route(Route.CAPABILITY, 0, b"gpu")
        yield "busy", send_step(rig, "client-0", request_frames(1, rt))
        yield "far deadline", send_step(rig, "client-0", request_frames(2, rt, deadline=deadline))
        token, h = rig.inbox["agent-0"][0]
        yield "reply", send_step(rig, "agent-0", [hdr(Kind.REPLY, corr=1), token, b"done"])

    assert_same(run_both(scenario))


KEYS = [b"k%d" % i for i in range(6)]


def test_expired_requests_fail_in_queue_order() -> None:
    """Requests waiting on several routes expire together: py fails the queues in the order
    they were created."""

    def scenario(rig: Rig) -> Iterator[Step]:
        yield "register", _merge(register(rig, "client-0"), register(rig, "agent-0", capacity=0, caps=KEYS))
        deadline = time.time_ns() // 1_000_000 + 300
        reqs = [request_frames(i + 1, route(Route.CAPABILITY, 0, k), deadline=deadline) for i, k in enumerate(KEYS)]
        yield "queue", send_step(rig, "client-0", *reqs)
        time.sleep(max(0.0, deadline / 1000 - time.time()) + 0.15)
        yield "expire", _merge(rig.control_barrier(), rig.control_barrier())

    assert_same(run_both(scenario))


def test_cancel_by_corr_picks_queued_request_in_queue_order() -> None:
    """CANCEL by corr (empty route) when several queued requests share it: py cancels the one
    in the oldest queue first."""

    def scenario(rig: Rig) -> Iterator[Step]:
        yield "register", _merge(register(rig, "client-0"), register(rig, "agent-0", capacity=0, caps=KEYS))
        reqs = [request_frames(77, route(Route.CAPABILITY, 0, k), job=i + 1) for i, k in enumerate(KEYS)]
        yield "queue", send_step(rig, "client-0", *reqs)
        for i in range(len(KEYS)):
            yield f"cancel #{i}", send_step(rig, "client-0", [hdr(Kind.CANCEL, corr=77), b""])

    assert_same(run_both(scenario))


def test_load_report_lists_agents_in_registration_order() -> None:
    """EV_LOAD after an agent left and another joined: py lists agents in the order they
    registered (its registry is an insertion-ordered dict)."""
    orders: dict[str, list[tuple[str, int, int, int]]] = {}
    for impl in ("c", "py"):
        rig = Rig(impl, 0, heartbeat_ms=300)
        try:
            for a in AGENTS[:3]:
                register(rig, a, capacity=2)
            control_step(rig, [OP_UNREG, rig.rid["agent-0"]])
            register(rig, "agent-3", capacity=3)
            rig.send("agent-2", [hdr(Kind.HEARTBEAT, aux=5), b""])  # its own load: 5 running
            rig.collect(None)
            got = rig.collect("control", lambda f: f[0][0] == EV_LOAD and bool(f[1]))
            assert "!" not in got, got
            blob = rig.last_load
            order = []
            i = 0
            while i < len(blob):
                n = blob[i]
                inflight, capacity, running = struct.unpack_from("<III", blob, i + 1 + n)
                order.append((rig.label.get(blob[i + 1 : i + 1 + n], "?"), inflight, capacity, running))
                i += 1 + n + 12
            orders[impl] = order
        finally:
            rig.close()
    assert orders["c"] == orders["py"]
    assert [(a, r) for a, _, _, r in orders["py"]] == [("agent-1", 0), ("agent-2", 5), ("agent-3", 0)]


OP_BATCH = bytes([7])


def _batch(*messages: list[bytes], layout: bytes | None = None) -> list[bytes]:
    counts = b"".join(len(m).to_bytes(2, "little") for m in messages)
    return [OP_BATCH, counts if layout is None else layout, *(f for m in messages for f in m)]


OP_PACKED = bytes([8])


def test_packed_control_messages_run_in_order() -> None:
    """OP_PACKED (what the control plane sends per turn): each message in turn, as if sent one by
    one, its parts alive past the message where the data plane keeps them (a request queued for
    credit, a reply sent to a packed peer); a nested batch is ignored; a message that does not
    add up stops the rest. Same on both twins; both ``pack_messages`` make the same bytes."""
    pack_c, pack_py = (_core.load("_io", impl).pack_messages for impl in ("c", "py"))

    def pack(*messages: list[bytes]) -> list[bytes]:
        blob = pack_c(messages)
        assert blob == pack_py(messages) == pack_c([[bytearray(p) for p in m] for m in messages])
        return [OP_PACKED, blob]

    def scenario(rig: Rig) -> Iterator[Step]:
        yield "register", _merge(register(rig, "client-0"), register(rig, "client-1"), register(rig, "agent-1"))
        c0, c1 = rig.rid["client-0"], rig.rid["client-1"]
        queued = [hdr(Kind.REQUEST, corr=7), route(Route.NAME, 0, b"agent-1"), b"q", b"kept past the message"]
        yield (
            "packed",
            control_step(
                rig,
                pack(
                    [OP_SEND, c0, hdr(Kind.EVENT), b"", b"one"],
                    [OP_SEND, c1, hdr(Kind.EVENT), b"", b"two"],
                    _batch([OP_SEND, c0, hdr(Kind.EVENT), b"", b"nested batch"]),
                    [OP_PACKED, pack([OP_SEND, c0, hdr(Kind.EVENT), b"", b"nested packed"])[1]],
                    [OP_INJECT, c0, *queued],
                    [OP_UNREG, c1],
                    [OP_SEND, c0, hdr(Kind.EVENT), b"", b"three" * 40],
                ),
            ),
        )
        agent = [OP_REG, rig.rid["agent-1"], META.pack(Role.AGENT, 1, 0, 1), b"agent-1", b"", b"", b""]
        yield "room", control_step(rig, agent)  # agent-1 now has room: the queued request goes
        yield "after", send_step(rig, "client-1", request_frames(1, route(Route.CAPABILITY, 0, b"gpu")))
        good = pack([OP_SEND, c0, hdr(Kind.EVENT), b"", b"four"])[1]
        torn = pack([OP_SEND, c0, hdr(Kind.EVENT), b"", b"five"])[1][:-1]
        yield "torn", control_step(rig, [OP_PACKED, good + torn])
        yield "zero parts", control_step(rig, [OP_PACKED, b"\x00\x00" + good])

    runs = run_both(scenario)
    assert_same(runs)
    seen = repr(runs["c"])
    for word in (b"one", b"two", b"three" * 40, b"four", b"kept past the message"):
        assert repr(word) in seen, word
    for word in (b"nested batch", b"nested packed", b"five"):
        assert repr(word) not in seen, word
    assert "say HELLO first" in repr(dict(runs["c"])["after"])


def test_events_go_up_in_order_packed_or_as_they_are() -> None:
    """The data plane packs a turn's events into one EV_PACKED message; a peer's message of more
    than 16 KiB goes up as it is, after what was packed before it. Expect the control plane to
    get them in the order the peer sent them, the big ones whole, on both twins."""
    big = [b"B%d" % i + b"b" * 1998 for i in range(10)]  # 20 KB in parts under MAX_FRAME

    def scenario(rig: Rig) -> Iterator[Step]:
        yield "register", register(rig, "client-0")
        # Keep the data plane busy (~1 ms of ops) so the five queries wait and share one turn
        busy = [[OP_SEND, rig.rid["monitor"], hdr(Kind.EVENT), b"", b"busy"]] * 1000
        rig.control.send_multipart([OP_PACKED, _core.load("_io", "py").pack_messages(busy)])
        for i, body in enumerate(([b"small-1"], big, [b"small-2"], big, [b"small-3"])):
            rig.send("client-0", [hdr(Kind.QUERY, corr=100 + i), b"", *body])
        yield "queries", rig.peer_barrier("client-0")

    runs = run_both(scenario)
    assert_same(runs)
    queries = [e for e in dict(runs["c"])["queries"]["control"] if e[0] == "MSG"]
    assert [e[4][:7] for e in queries] == [b"small-1", b"B0bbbbb", b"small-2", b"B0bbbbb", b"small-3"]
    assert list(queries[1][4:]) == big and list(queries[3][4:]) == big


def test_batched_control_messages_run_in_order() -> None:
    """OP_BATCH: each message in turn, as if sent one by one; a nested batch is ignored, and a
    layout that does not fit the frames stops at the first message that does not fit."""

    def scenario(rig: Rig) -> Iterator[Step]:
        yield "register", _merge(register(rig, "client-0"), register(rig, "client-1"))
        c0, c1 = rig.rid["client-0"], rig.rid["client-1"]
        yield (
            "batch",
            control_step(
                rig,
                _batch(
                    [OP_SEND, c0, hdr(Kind.EVENT), b"", b"one"],
                    [OP_SEND, c1, hdr(Kind.EVENT), b"", b"two"],
                    _batch([OP_SEND, c0, hdr(Kind.EVENT), b"", b"nested"]),
                    [OP_REG, b"agent-x", META.pack(Role.AGENT, 1, 0, 1), b"agent-x", b"gpu", b"", b""],
                    [OP_UNREG, c1],
                    [OP_SEND, c0, hdr(Kind.EVENT), b"", b"three"],
                ),
            ),
        )
        yield "after", send_step(rig, "client-1", request_frames(1, route(Route.CAPABILITY, 0, b"gpu")))
        short = _batch([OP_SEND, c0, hdr(Kind.EVENT), b"", b"four"], [OP_SEND, c0, hdr(Kind.EVENT), b"", b"five"])
        yield "bad layout", control_step(rig, [OP_BATCH, b"\x05\x00\x09\x00\x01", *short[2:]])
        yield "empty layout", control_step(rig, [OP_BATCH, b"", b"x"])

    runs = run_both(scenario)
    assert_same(runs)
    seen = repr(runs["c"])
    for word in (b"one", b"two", b"three", b"four"):
        assert repr(word) in seen, word
    assert repr(b"nested") not in seen and repr(b"five") not in seen
    # client-1 was unregistered by the batch: its request after it is NOT_REGISTERED
    assert "say HELLO first" in repr(dict(runs["c"])["after"])
