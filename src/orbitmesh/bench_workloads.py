"""``orbitmesh bench`` workloads beyond invoke / latency / jobs: stream, raw, fanout, scale, memory.

Each workload starts its own children (see :mod:`orbitmesh.bench`), OrbitMesh's and its
baseline's at once; the two sides take turns of about 0.5 s (``bench.chunks``), so both see the
same machine load. It returns a :class:`Section`: rows for the report table and the details for
the JSON file.

* stream: ``MeshClient.stream`` from an async-generator handler, items/s. Baseline: a raw pyzmq
  worker behind ``zmq.proxy`` sending the same number of bytes per item to a raw DEALER, paced by
  the same credit scheme (the consumer grants what it has consumed once that is half the window).
* raw: ``MeshClient.send_raw`` to the agent's raw handler, which acknowledges with an empty
  reply (bytes flow one way), MB/s per size. Baseline: the same through ``zmq.proxy`` to a raw
  worker that acknowledges with an empty frame; same window, zero-copy sends from 64 KiB.
* fanout: ``execute_on_all`` over N agents (N Agent objects in one process, each on its own
  DEALER), time until every result is in. Baseline: N raw requests through ``zmq.proxy``, whose
  DEALER backend deals them to N raw echo workers (one each), time until every reply is in.
* scale: N raw-pyzmq agents (HELLO, then a HEARTBEAT back for each of the broker's) over a few
  processes: join rate, the broker's CPU while idle, invoke p50 to one real Agent under that
  population against the same with that one agent alone (same broker, same run).
* memory: the broker's private memory (``RssAnon`` in /proc/<pid>/status; LMDB's map is page
  cache, not in it) before and after N raw agents join, M requests are held by an agent that
  never answers, and J durable jobs wait for an agent that is not there: bytes per agent, per
  in-flight request, per unfinished job. No baseline; the notes give the bounds the broker sets.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import math
import os
import resource
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from time import perf_counter, perf_counter_ns
from typing import Any

import msgpack
import zmq

from . import bench as b
from ._wire import HDR, error_message, header
from .agent import Agent
from .broker import Broker
from .client import MeshClient, SubmittedJob
from .errors import ErrorCode
from .models import JobState
from .protocol import Kind, Role
from .runtime import run

STREAM_COMMAND = "items"
MAX_STREAM_ITEMS = 1 << 40  # the handler's bound; a run stops by time and cancels the stream
RAW_BYTES_IN_FLIGHT = 8 << 20  # the raw window: at most this many payload bytes in flight
SWARM_PER_PROCESS = 1250  # raw agents per swarm process (2 fds each: its socket and its tcp link)
SWARM_BATCH_S = 0.02  # a swarm process sleeps this long between polls (batches the heartbeats)
FANOUT_MAX_ROUNDS = 100_000
RAW_TARGET_SIZE = 1 << 20  # the raw-bandwidth target applies at 1 MiB
RAW_TARGET = 0.8
SCALE_IDLE_CPU_TARGET = 20.0  # % of one core
SCALE_P50_TARGET = 1.2
HOLD_AGENT_NAME = "bench-hold-agent"
HOLD_COMMAND = "hold"
ABSENT_AGENT_NAME = "bench-absent-agent"  # the jobs of the memory workload wait for it: it never comes
MEMORY_AGENTS = (2000, 200)  # memory: at most this many of --agents join (full run, --quick)
MEMORY_REQUESTS = (5000, 1000)  # requests held in flight
MEMORY_JOBS = (20_000, 2000)  # unfinished durable jobs
MEMORY_BATCH = 250  # requests sent at once, the next batch once the agent holds them
MEMORY_SETTLE_S = 1.2  # one broker heartbeat tick (1 s) and a little more
MEMORY_GROWTH_S = (5.0, 1.0)  # then the waiting jobs' growth over this long
MEMORY_WAIT_S = 30.0  # every wait of the memory workload gives up after this long
MEMORY_FIELDS = ("RssAnon", "RssFile", "RssShmem", "VmRSS", "VmHWM")


@dataclass
class Section:
    """One workload's rows for the report and its details for the JSON file."""

    name: str
    title: str
    rows: list[b.Row]
    details: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def size_text(size: int) -> str:
    """1024 -> "1 KiB", 1048576 -> "1 MiB", 64 -> "64 B"."""
    for unit, shift in (("MiB", 20), ("KiB", 10)):
        if size >= 1 << shift and size % (1 << shift) == 0:
            return f"{size >> shift} {unit}"
    return f"{size} B"


def raw_window(size: int, window: int) -> int:
    """Requests in flight for the raw workload: ``window``, capped at RAW_BYTES_IN_FLIGHT bytes."""
    return max(2, min(window, RAW_BYTES_IN_FLIGHT // max(1, size)))


# ------------------------------------------------------------------ child processes (child side)


async def items(count: int, size: int) -> AsyncIterator[bytes]:
    """The benchmark stream handler: ``count`` items of ``size`` bytes."""
    item = bytes(size)
    for _ in range(count):
        yield item


def ack(parts: list[Any]) -> bytes:
    """The benchmark raw handler: acknowledge with an empty reply."""
    return b""


def raise_nofile(need: int) -> None:
    """Raise this process's open-files soft limit to at least ``need`` (up to the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        top = need if hard == resource.RLIM_INFINITY else min(need, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (top, hard))


def _raw_socket(ctx: zmq.Context[Any], endpoint: str) -> zmq.Socket[Any]:
    sock: zmq.Socket[Any] = ctx.socket(zmq.DEALER)
    for opt, value in ((zmq.LINGER, 0), (zmq.SNDHWM, 0), (zmq.RCVHWM, 0)):
        sock.setsockopt(opt, value)
    sock.connect(endpoint)
    return sock


def _sink_main(parent: b._Parent, endpoint: str, size: int) -> None:
    """Raw baseline worker behind the proxy: [op "A", data] -> empty ack; [op "C", n] -> n items."""
    ctx = zmq.Context()
    sock = _raw_socket(ctx, endpoint)
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    poller.register(parent.fd, zmq.POLLIN)
    item = bytes(size)
    try:
        parent.send(ready={})
        while True:
            events = dict(poller.poll())
            if sock in events:
                for _ in range(b._BATCH):
                    try:
                        frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    ident, op = frames[0].bytes, frames[1].bytes
                    if op == b"A":
                        sock.send_multipart([ident, b""])
                    elif op == b"C":
                        for _ in range(int(frames[2].bytes)):
                            sock.send_multipart([ident, item])
            if parent.fd in events and not parent.serve():
                return
    finally:
        sock.close()
        ctx.term()


def _fanworkers_main(parent: b._Parent, endpoint: str, count: int) -> None:
    """``count`` raw echo workers on DEALERs behind the proxy; each appends its index."""
    raise_nofile(2 * count + 256)
    ctx = zmq.Context()
    ctx.set(zmq.MAX_SOCKETS, count + 64)
    socks = [_raw_socket(ctx, endpoint) for _ in range(count)]
    index = {s: str(i).encode() for i, s in enumerate(socks)}
    poller = zmq.Poller()
    for s in socks:
        poller.register(s, zmq.POLLIN)
    poller.register(parent.fd, zmq.POLLIN)
    try:
        parent.send(ready={})
        while True:
            events = dict(poller.poll())
            for sock in socks:
                if sock in events:
                    for _ in range(b._BATCH):
                        try:
                            frames = sock.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        sock.send_multipart([*frames, index[sock]])
            if parent.fd in events and not parent.serve():
                return
    finally:
        for s in socks:
            s.close()
        ctx.term()


async def _fanagents_main(parent: b._Parent, endpoint: str, count: int) -> None:
    """``count`` Agent objects (fan-000...) on this loop, one DEALER each, sharing a context."""
    raise_nofile(2 * count + 256)
    ctx: zmq.Context[Any] = zmq.Context()
    ctx.set(zmq.MAX_SOCKETS, count + 64)
    agents = [Agent(f"fan-{i:04d}", endpoint, capacity=4, context=ctx) for i in range(count)]
    for agent in agents:
        agent.add_handler(b.COMMAND, b.noop)
    try:
        await asyncio.gather(*(a.start(timeout=b.READY_TIMEOUT) for a in agents))
        parent.send(ready={})
        await b._serve_parent(parent)
    finally:
        await asyncio.gather(*(a.stop(drain_timeout=1.0) for a in agents), return_exceptions=True)
        ctx.term()


def _swarm_main(parent: b._Parent, endpoint: str, count: int, prefix: str) -> None:
    """``count`` raw agents: each a DEALER that says HELLO, then answers every HEARTBEAT from the
    broker with one (a real peer sends one per interval on its own: the same rate) and echoes
    any REQUEST. Reports when all are welcome: the monotonic times of the first HELLO and the
    last WELCOME. Sleeps SWARM_BATCH_S between polls, so its own CPU stays small."""
    raise_nofile(2 * count + 256)
    ctx = zmq.Context()
    ctx.set(zmq.MAX_SOCKETS, count + 64)
    socks = [_raw_socket(ctx, endpoint) for _ in range(count)]
    poller = zmq.Poller()
    for s in socks:
        poller.register(s, zmq.POLLIN)
    heartbeat, reply = [header(Kind.HEARTBEAT), b""], header(Kind.REPLY)
    waiting = set(socks)

    def drain(sock: zmq.Socket[Any]) -> None:
        for _ in range(64):
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            kind = frames[0][3]
            if kind == Kind.HEARTBEAT:
                sock.send_multipart(heartbeat)
            elif kind == Kind.WELCOME:
                waiting.discard(sock)
            elif kind == Kind.REQUEST:
                sock.send_multipart([reply, frames[1], frames[3]])
            elif kind == Kind.ERROR:
                raise RuntimeError(f"broker refused a swarm agent: {frames[2].decode(errors='replace')}")

    try:
        t0 = time.monotonic()
        for i, sock in enumerate(socks):
            hello = {"role": "agent", "name": f"{prefix}-{i:05d}", "capacity": 1, "commands": [b.COMMAND]}
            sock.send_multipart([header(Kind.HELLO, aux=Role.AGENT, corr=1), b"", msgpack.packb(hello)])
        end = t0 + b.READY_TIMEOUT
        while waiting:
            if time.monotonic() > end:
                raise RuntimeError(f"{len(waiting)} of {count} swarm agents not welcome in {b.READY_TIMEOUT:.0f} s")
            for sock, _ in poller.poll(100):
                drain(sock)
        t1 = time.monotonic()
        parent.send(ready={"joined": count, "t0": t0, "t1": t1})
        poller.register(parent.fd, zmq.POLLIN)
        while True:
            events = poller.poll(1000)
            for sock, _ in events:
                if sock == parent.fd:
                    if not parent.serve():
                        return
                else:
                    drain(sock)
            time.sleep(SWARM_BATCH_S)
    finally:
        for s in socks:
            s.close()
        ctx.term()


def _hold_main(parent: b._Parent, endpoint: str, capacity: int, name: str) -> None:
    """A raw agent of ``capacity`` that holds every REQUEST unanswered (what a slow agent makes
    the broker keep) and answers the broker's HEARTBEATs. Parent requests: "held" -> its counts;
    "release" -> an empty REPLY to every held request. A CANCEL (its client went away) is
    answered CANCELLED, as an Agent does, and that request is no longer held."""
    ctx = zmq.Context()
    sock = _raw_socket(ctx, endpoint)
    sock.setsockopt(zmq.RCVTIMEO, int(b.READY_TIMEOUT * 1000))
    held: dict[bytes, tuple[int, int]] = {}  # token -> (corr, serializer flags) of the request
    counts = {"requests": 0, "cancelled": 0, "released": 0}
    heartbeat = [header(Kind.HEARTBEAT), b""]
    nil = msgpack.packb(None)

    def release() -> dict[str, Any]:
        for token, (corr, flags) in held.items():
            sock.send_multipart([header(Kind.REPLY, flags=flags, corr=corr), token, nil])
        counts["released"] += len(held)
        held.clear()
        return {"held": 0, **counts}

    parent.commands["held"] = lambda: {"held": len(held), **counts}
    parent.commands["release"] = release

    def handle(frames: list[bytes]) -> None:
        fields = HDR.unpack(frames[0])
        kind = fields[2]
        if kind == Kind.REQUEST:
            held[frames[1]] = (fields[7], fields[3] & 0x0F00)  # the serializer id bits
            counts["requests"] += 1
        elif kind == Kind.CANCEL:
            if held.pop(frames[1], None) is not None:
                counts["cancelled"] += 1
                sock.send_multipart(error_message(ErrorCode.CANCELLED, fields[7], "cancelled", route=frames[1]))
        elif kind == Kind.HEARTBEAT:
            sock.send_multipart(heartbeat)

    try:
        hello = {"role": "agent", "name": name, "capacity": capacity, "commands": [HOLD_COMMAND]}
        b._raw_hello(sock, Role.AGENT, hello)
        parent.send(ready={})
        b._serve_raw(parent, sock, handle)
    finally:
        sock.close()
        ctx.term()


def _welcome_main(parent: b._Parent, count: int) -> None:
    """The per-agent memory baseline: a raw pyzmq ROUTER (the broker's socket options) that
    answers HELLO with WELCOME and HEARTBEAT with HEARTBEAT and keeps nothing per peer: what a
    connection costs in libzmq alone."""
    raise_nofile(count + 256)
    ctx = zmq.Context()
    sock: zmq.Socket[Any] = ctx.socket(zmq.ROUTER)
    for opt, value in ((zmq.ROUTER_MANDATORY, 1), (zmq.LINGER, 0), (zmq.SNDHWM, 100_000), (zmq.RCVHWM, 100_000)):
        sock.setsockopt(opt, value)
    sock.setsockopt(zmq.BACKLOG, 4096)
    sock.bind(b.LOCALHOST)
    welcome, heartbeat = header(Kind.WELCOME), header(Kind.HEARTBEAT)

    def handle(frames: list[bytes]) -> None:
        kind = frames[1][3]
        if kind in (Kind.HELLO, Kind.HEARTBEAT):
            with contextlib.suppress(zmq.ZMQError):  # the peer went away meanwhile
                sock.send_multipart([frames[0], welcome if kind == Kind.HELLO else heartbeat, b""])

    try:
        parent.send(ready={"endpoint": sock.getsockopt_string(zmq.LAST_ENDPOINT)})
        b._serve_raw(parent, sock, handle)
    finally:
        sock.close()
        ctx.term()


ROLES: dict[str, Callable[..., None]] = {
    "sink": _sink_main,
    "fanworkers": _fanworkers_main,
    "fanagents": lambda parent, endpoint, count: run(_fanagents_main(parent, endpoint, count)),
    "swarm": _swarm_main,
    "hold": _hold_main,
    "welcome": _welcome_main,
}


# ------------------------------------------------------------------ stream


async def _om_stream_run(client: MeshClient, size: int, window: int, duration: float) -> tuple[int, float]:
    """Consume one stream for ``duration`` s; (items, seconds). Leaving cancels the handler."""
    stream = client.stream(
        b.AGENT_NAME, STREAM_COMMAND, [MAX_STREAM_ITEMS, size], window=window, timeout=b.REPLY_TIMEOUT
    )
    count = 0
    t0 = perf_counter()
    end = t0 + duration
    try:
        async for item in stream:
            if count == 0 and len(item) != size:
                raise RuntimeError(f"stream item of {len(item)} bytes, not {size}")
            count += 1
            if not count & 63 and perf_counter() >= end:
                break
    finally:
        await stream.aclose()
    return count, perf_counter() - t0


def _raw_stream_run(sock: zmq.Socket[Any], window: int, duration: float) -> tuple[int, float]:
    """The baseline consumer: same credit scheme as MeshClient.stream; (items, seconds)."""
    send, recv = sock.send_multipart, sock.recv
    send([b"C", str(window).encode()])
    outstanding, consumed, count = window, 0, 0
    t0 = perf_counter()
    end = t0 + duration
    granting = True
    while outstanding:
        recv()
        count += 1
        outstanding -= 1
        consumed += 1
        if not count & 63 and granting and perf_counter() >= end:
            granting = False
        if granting and consumed * 2 >= window:
            send([b"C", str(consumed).encode()])
            outstanding += consumed
            consumed = 0
    return count, perf_counter() - t0


@dataclass
class _Rate:
    count: int
    elapsed: float
    cpu: dict[str, float]

    @property
    def rate(self) -> float:
        return self.count / self.elapsed if self.elapsed > 0 else 0.0


def _rate(meter: b._Meter) -> _Rate:
    return _Rate(meter.count, meter.elapsed, meter.per_unit())


async def _turns(
    duration: float,
    om: Callable[[float], Any],
    base: Callable[[float], tuple[int, float]],
    om_meter: b._Meter,
    base_meter: b._Meter,
) -> None:
    """Alternate ``await om(seconds)`` and ``base(seconds)`` (each returns (count, seconds))."""
    for i, chunk in enumerate(b.chunks(duration)):
        for side in (0, 1) if i % 2 == 0 else (1, 0):  # who goes first alternates too
            meter = om_meter if side == 0 else base_meter
            meter.start()
            count, elapsed = await om(chunk) if side == 0 else base(chunk)
            meter.stop(count, elapsed)


def _om_session(s: b.Settings, endpoint: str, body: Callable[[MeshClient], Any]) -> Any:
    async def session() -> Any:
        ctx: zmq.Context[Any] = zmq.Context()
        client = MeshClient(endpoint, context=ctx, timeout=b.REPLY_TIMEOUT)
        try:
            await client.connect(b.READY_TIMEOUT)
            return await body(client)
        finally:
            await client.close()
            ctx.term()

    return run(session())


def measure_stream_raw(s: b.Settings, want_stream: bool, want_raw: bool) -> list[Section]:
    """Stream and raw bytes: an OrbitMesh broker + agent and zmq.proxy + a raw worker, all
    running at once; OrbitMesh and the baseline take turns of about CHUNK_S (0.5 s)."""
    sizes = list(s.raw_sizes) if want_raw else []
    window = s.window
    stream_meters: tuple[b._Meter, b._Meter] | None = None
    raw_meters: dict[int, tuple[b._Meter, b._Meter]] = {}
    with contextlib.ExitStack() as stack:
        broker, info = b._start(stack, "broker", core=s.core)
        agent, _ = b._start(stack, "agent", endpoint=info["endpoint"], capacity=max(64, window))
        proxy, pinfo = b._start(stack, "proxy")
        sink, _ = b._start(stack, "sink", endpoint=pinfo["backend"], size=s.size)
        om_children = {"broker": broker, "agent": agent}
        base_children = {"broker": proxy, "agent": sink}
        sock = stack.enter_context(b._dealer(pinfo["frontend"]))

        async def body(client: MeshClient) -> None:
            nonlocal stream_meters
            if want_stream:
                await _om_stream_run(client, s.size, window, s.warmup)
                _raw_stream_run(sock, window, s.warmup)
                stream_meters = (b._Meter(om_children), b._Meter(base_children))
                await _turns(
                    s.duration,
                    lambda t: _om_stream_run(client, s.size, window, t),
                    lambda t: _raw_stream_run(sock, window, t),
                    *stream_meters,
                )
            for size in sizes:
                payload = bytes(size)
                if await client.send_raw(b.AGENT_NAME, payload) != b"":
                    raise RuntimeError("the raw handler did not acknowledge with an empty reply")
                om_send = functools.partial(client.send_raw, b.AGENT_NAME, payload, timeout=b.REPLY_TIMEOUT)
                base_send = functools.partial(sock.send_multipart, [b"A", payload], copy=size < 65536)
                w = raw_window(size, window)
                await _async_pipeline(om_send, w, s.warmup)
                b._pipelined(base_send, sock.recv, w, s.warmup, s.max_round_trips)
                meters = raw_meters[size] = (b._Meter(om_children), b._Meter(base_children))
                await _turns(
                    s.duration,
                    lambda t: _async_pipeline(om_send, w, t),  # noqa: B023 (awaited in this iteration)
                    lambda t: b._pipelined(base_send, sock.recv, w, t, s.max_round_trips),  # noqa: B023
                    *meters,
                )

        _om_session(s, info["endpoint"], body)

    sections = []
    if stream_meters is not None:
        om, base = _rate(stream_meters[0]), _rate(stream_meters[1])
        sections.append(
            Section(
                "stream",
                "stream",
                [
                    b.Row("stream", f"stream items/s ({s.size} B, window {window})", om.rate, base.rate),
                    b.Row(
                        "stream_broker_cpu",
                        "stream: broker CPU, ns / item",
                        om.cpu["broker"],
                        base.cpu["broker"],
                        higher_is_better=False,
                    ),
                ],
                {"orbitmesh": _rate_dict(om), "baseline": _rate_dict(base), "size": s.size, "window": window},
            )
        )
    if sizes:
        rows = []
        details = {}
        for size in sizes:
            om, base = _rate(raw_meters[size][0]), _rate(raw_meters[size][1])
            target = RAW_TARGET if size == RAW_TARGET_SIZE else None
            label = f"raw {size_text(size)}: MB/s (window {raw_window(size, window)})"
            rows.append(b.Row(f"raw_{size}", label, om.rate * size / 1e6, base.rate * size / 1e6, target))
            details[str(size)] = {"orbitmesh": _rate_dict(om), "baseline": _rate_dict(base)}
        sections.append(Section("raw", "raw bytes", rows, details))
    return sections


async def _async_pipeline(send: Callable[[], Any], window: int, duration: float) -> tuple[int, float]:
    """``window`` coroutines each looping ``await send()`` for ``duration`` s; (calls, seconds)."""
    done = 0
    end = 0.0

    async def worker() -> None:
        nonlocal done
        while perf_counter() < end:
            await send()
            done += 1

    t0 = perf_counter()
    end = t0 + duration
    tasks = [asyncio.ensure_future(worker()) for _ in range(window)]
    try:
        await asyncio.wait_for(asyncio.gather(*tasks), duration + 2 * b.REPLY_TIMEOUT)
    except TimeoutError:
        raise RuntimeError(f"calls did not finish within {b.REPLY_TIMEOUT:.0f} s of the run") from None
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return done, perf_counter() - t0


def _rate_dict(r: _Rate) -> dict[str, Any]:
    return {"count": r.count, "elapsed": r.elapsed, "rate": r.rate, "cpu_ns_per_unit": r.cpu}


# ------------------------------------------------------------------ fan-out


def _timed_rounds(one: Callable[[], Any], duration: float) -> list[int]:
    out: list[int] = []
    end = perf_counter() + duration
    while len(out) < FANOUT_MAX_ROUNDS and (not out or perf_counter() < end):
        t = perf_counter_ns()
        one()
        out.append(perf_counter_ns() - t)
    return out


def measure_fanout(s: b.Settings, payload: bytes) -> Section:
    """execute_on_all over ``s.fanout_agents`` agents vs the same fan-out through zmq.proxy; both
    stacks run at once and take turns of about CHUNK_S (0.5 s)."""
    n = s.fanout_agents
    om_ns: list[int] = []
    known_ns: list[int] = []
    query_ns: list[int] = []
    base_ns: list[int] = []
    with contextlib.ExitStack() as stack:
        broker, info = b._start(stack, "broker", core=s.core)
        proxy, pinfo = b._start(stack, "proxy")
        agents = b.Child("fanagents", endpoint=info["endpoint"], count=n)
        stack.callback(agents.stop)
        workers = b.Child("fanworkers", endpoint=pinfo["backend"], count=n)
        stack.callback(workers.stop)
        agents.ready()
        workers.ready()
        sock = stack.enter_context(b._dealer(pinfo["frontend"]))
        seen: set[bytes] = set()

        def raw_one() -> None:
            for _ in range(n):
                sock.send(payload)
            for _ in range(n):
                echoed, index = sock.recv_multipart()
                seen.add(index)

        deadline = time.monotonic() + b.READY_TIMEOUT
        while len(seen) < n:  # every raw worker has connected and answers: a real fan-out
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {len(seen)} of {n} raw fan-out workers answered")
            seen.clear()
            raw_one()

        async def body(client: MeshClient) -> None:
            async def one() -> None:
                out = await client.execute_on_all(b.COMMAND, payload, timeout=b.REPLY_TIMEOUT)
                if len(out) != n or not all(o.ok and o.value == payload for o in out.values()):
                    raise RuntimeError(f"execute_on_all: {sum(o.ok for o in out.values())} of {n} agents answered")

            names = [a.name for a in await client.agents()]
            submit = client.submit

            async def query() -> None:
                await client.agents()

            async def known() -> None:  # the same fan-out with the agent list already known
                await asyncio.gather(*(submit(name, b.COMMAND, payload, timeout=b.REPLY_TIMEOUT) for name in names))

            await _async_rounds(one, s.warmup)
            _timed_rounds(raw_one, s.warmup)
            for i, chunk in enumerate(b.chunks(s.duration)):
                if i % 2:
                    om_ns.extend(await _async_rounds(one, chunk))
                    base_ns.extend(_timed_rounds(raw_one, chunk))
                else:
                    base_ns.extend(_timed_rounds(raw_one, chunk))
                    om_ns.extend(await _async_rounds(one, chunk))
                known_ns.extend(await _async_rounds(known, chunk / 4))
                query_ns.extend(await _async_rounds(query, chunk / 8))

        _om_session(s, info["endpoint"], body)

    for samples in (om_ns, base_ns, known_ns, query_ns):
        samples.sort()
    known_p50 = b.percentile_us(known_ns, 0.5) / 1000
    om_p50, base_p50 = b.percentile_us(om_ns, 0.5) / 1000, b.percentile_us(base_ns, 0.5) / 1000
    om_p99, base_p99 = b.percentile_us(om_ns, 0.99) / 1000, b.percentile_us(base_ns, 0.99) / 1000
    lower = {"higher_is_better": False}
    rows = [
        b.Row("fanout_p50", f"fan-out to {n} agents: all results, p50 ms", om_p50, base_p50, **lower),
        b.Row("fanout_p99", f"fan-out to {n} agents: all results, p99 ms", om_p99, base_p99, **lower),
        b.Row("fanout_per_agent", "fan-out: p50 per agent, us", om_p50 * 1000 / n, base_p50 * 1000 / n, **lower),
        b.Row("fanout_known_p50", f"fan-out, {n} submits (agents known): p50 ms", known_p50, base_p50, **lower),
    ]
    details = {
        "agents": n,
        "orbitmesh": {"rounds": len(om_ns), "p50_ms": om_p50, "p99_ms": om_p99},
        "orbitmesh_known_agents": {"rounds": len(known_ns), "p50_ms": known_p50},
        "agents_query": {"rounds": len(query_ns), "p50_ms": b.percentile_us(query_ns, 0.5) / 1000},
        "baseline": {"rounds": len(base_ns), "p50_ms": base_p50, "p99_ms": base_p99},
    }
    return Section("fanout", "fan-out", rows, details)


async def _async_rounds(one: Callable[[], Any], duration: float) -> list[int]:
    out: list[int] = []
    end = perf_counter() + duration
    while len(out) < FANOUT_MAX_ROUNDS and (not out or perf_counter() < end):
        t = perf_counter_ns()
        await asyncio.wait_for(one(), b.REPLY_TIMEOUT * 2)
        out.append(perf_counter_ns() - t)
    return out


# ------------------------------------------------------------------ scale


def _idle_cpu_percent(children: dict[str, list[b.Child]], seconds: float) -> dict[str, dict[str, float]]:
    """CPU of each group of children over the same ``seconds`` of wall time, in % of one core:
    ``{"total": ...}``, and by thread for a group of one child (broker: "control", "dataplane",
    ...; the rest of its total is libzmq's I/O thread)."""
    start = {name: [c.cpu() for c in group] for name, group in children.items()}
    t0 = time.monotonic()
    time.sleep(seconds)
    end = {name: [c.cpu() for c in group] for name, group in children.items()}
    wall = time.monotonic() - t0
    out: dict[str, dict[str, float]] = {}
    for name in children:
        pairs = list(zip(start[name], end[name], strict=True))
        out[name] = {"total": 100.0 * sum(e[0] - s[0] for s, e in pairs) / 1e9 / wall}
        if len(pairs) == 1:
            (_, t_start), (_, t_end) = pairs[0]
            for thread, ns in t_end.items():
                out[name][thread] = 100.0 * (ns - t_start.get(thread, 0)) / 1e9 / wall
    return out


LATENCY_BURST_S = 0.05


def _interleaved_latency(s: b.Settings, endpoints: list[str], payload: bytes) -> tuple[list[list[int]], list[int]]:
    """Sequential invoke round trips (ns, sorted) to the bench agent of each broker, in
    alternating bursts of LATENCY_BURST_S (so both see the same machine load); ``s.duration`` s
    each in all. Also the number of agents registered with each broker."""

    async def main() -> tuple[list[list[int]], list[int]]:
        ctx: zmq.Context[Any] = zmq.Context()
        clients = [MeshClient(e, context=ctx, timeout=b.REPLY_TIMEOUT) for e in endpoints]
        try:
            for client in clients:
                await client.connect(b.READY_TIMEOUT)
                await b._om_latency(client, payload, s.warmup, s.latency_samples)
            samples: list[list[int]] = [[] for _ in clients]
            end = perf_counter() + len(clients) * s.duration
            while perf_counter() < end and all(len(x) < s.latency_samples for x in samples):
                for client, out in zip(clients, samples, strict=True):
                    out += await b._om_latency(client, payload, LATENCY_BURST_S, s.latency_samples - len(out))
            for out in samples:
                out.sort()
            return samples, [len(await client.agents()) for client in clients]
        finally:
            for client in clients:
                await client.close()
            ctx.term()

    result: tuple[list[list[int]], list[int]] = run(main())
    return result


def measure_scale(s: b.Settings, payload: bytes) -> Section:
    """``s.agents`` raw agents on one broker, next to an identical broker with one Agent only,
    both running at once: idle CPU over the same seconds, latency in alternating bursts."""
    n = s.agents
    procs = max(1, math.ceil(n / SWARM_PER_PROCESS))
    idle_s = max(2.0, s.duration)
    raise_nofile(n + 1024)
    with contextlib.ExitStack() as stack:
        brokers, endpoints = [], []
        for _ in range(2):  # [0]: the population's, [1]: one agent only
            broker, info = b._start(stack, "broker", core=s.core)
            brokers.append(broker)
            endpoints.append(info["endpoint"])
        for endpoint in endpoints:
            b._start(stack, "agent", endpoint=endpoint, capacity=64)
        swarm = []
        for p in range(procs):
            count = n // procs + (1 if p < n % procs else 0)
            child = b.Child("swarm", endpoint=endpoints[0], count=count, prefix=f"swarm-{p}")
            stack.callback(child.stop)
            swarm.append(child)
        joined = [child.ready() for child in swarm]
        t0 = min(j["t0"] for j in joined)
        t1 = max(j["t1"] for j in joined)
        join_rate = n / max(t1 - t0, 1e-9)
        time.sleep(1.2)  # one heartbeat tick with everyone in
        cpu = _idle_cpu_percent({"population": [brokers[0]], "one_agent": [brokers[1]], "swarm": swarm}, idle_s)
        (many, one), (registered_many, registered_one) = _interleaved_latency(s, endpoints, payload)
        if (registered_many, registered_one) != (n + 1, 1):
            raise RuntimeError(f"{registered_many} and {registered_one} agents registered, expected {n + 1} and 1")

    idle_many, idle_one = cpu["population"]["total"], cpu["one_agent"]["total"]
    p50_one, p50_many = b.percentile_us(one, 0.5), b.percentile_us(many, 0.5)
    p99_one, p99_many = b.percentile_us(one, 0.99), b.percentile_us(many, 0.99)
    lower = {"higher_is_better": False}
    rows = [
        b.Row(
            "scale_idle_cpu",
            f"{n:,} agents: broker idle CPU, % of a core",
            idle_many,
            idle_one,
            absolute=SCALE_IDLE_CPU_TARGET,
            **lower,
        ),
        b.Row("scale_join_rate", f"{n:,} agents: joined / s", join_rate, 0.0),
        b.Row("scale_p50", f"{n:,} agents: invoke p50, us (vs 1 agent)", p50_many, p50_one, SCALE_P50_TARGET, **lower),
        b.Row("scale_p99", f"{n:,} agents: invoke p99, us (vs 1 agent)", p99_many, p99_one, **lower),
    ]
    details = {
        "agents": n,
        "processes": procs,
        "raw_agents": True,
        "join_seconds": t1 - t0,
        "join_rate": join_rate,
        "idle_seconds": idle_s,
        "idle_cpu_percent": cpu,
        "registered": {"one_agent": registered_one, "population": registered_many},
        "latency_samples": {"one_agent": len(one), "population": len(many)},
        "nofile_soft_limit": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
    }
    return Section("scale", "scale", rows, details)


# ------------------------------------------------------------------ memory


def proc_memory(pid: int) -> dict[str, int]:
    """``RssAnon`` (private heap), ``RssFile``, ``RssShmem``, ``VmRSS``, ``VmHWM`` of process
    ``pid`` in bytes, from /proc/<pid>/status (Linux); {} where there is none."""
    out: dict[str, int] = {}
    with contextlib.suppress(OSError):
        with open(f"/proc/{pid}/status", encoding="ascii") as fh:
            for line in fh:
                name, _, rest = line.partition(":")
                if name in MEMORY_FIELDS:
                    value, unit = rest.split()
                    out[name] = int(value) * (1024 if unit == "kB" else 1)
    return out


def _delta(before: dict[str, int], after: dict[str, int], count: int) -> float:
    """Private-memory growth per unit: RssAnon after - before, over ``count``."""
    return (after["RssAnon"] - before["RssAnon"]) / max(1, count)


async def _until(what: str, done: Callable[[], bool]) -> float:
    """Poll ``done()`` every 5 ms until it is true; the seconds it took. RuntimeError after
    MEMORY_WAIT_S."""
    t0 = time.monotonic()
    while not done():
        if time.monotonic() - t0 > MEMORY_WAIT_S:
            raise RuntimeError(f"memory: {what} not done within {MEMORY_WAIT_S:.0f} s")
        await asyncio.sleep(0.005)
    return time.monotonic() - t0


async def _memory_per_agent(
    stack: contextlib.ExitStack[Any], routers: dict[str, tuple[b.Child, str]], n: int
) -> dict[str, Any]:
    """RssAnon of each router (name -> (process, endpoint): the broker with one client
    connected, its baseline), settled, before and one heartbeat tick after ``n`` raw agents (the
    scale workload's swarm) have joined each."""
    procs = max(1, math.ceil(n / SWARM_PER_PROCESS))
    before = {name: proc_memory(child.proc.pid) for name, (child, _) in routers.items()}
    swarm = []
    for _, endpoint in routers.values():
        for p in range(procs):
            child = b.Child("swarm", endpoint=endpoint, count=n // procs + (p < n % procs), prefix=f"mem-{p}")
            stack.callback(child.stop)
            swarm.append(child)
    for child in swarm:
        await asyncio.to_thread(child.ready)  # the loop keeps the client's heartbeats going
    await asyncio.sleep(MEMORY_SETTLE_S)
    after = {name: proc_memory(child.proc.pid) for name, (child, _) in routers.items()}
    out: dict[str, Any] = {"agents": n, "processes": procs}
    for name in routers:
        per_agent = _delta(before[name], after[name], n)
        out[name] = {"before": before[name], "after": after[name], "bytes_per_agent": per_agent}
    return out


async def _memory_per_request(
    stack: contextlib.ExitStack[Any], client: MeshClient, broker: b.Child, endpoint: str, n: int
) -> dict[str, Any]:
    """RssAnon of the broker before and after ``n`` requests are in flight to an agent that
    holds them; then the agent answers them all (nothing is left in flight)."""
    warm = max(10, n // 100)  # the first requests to an agent allocate once (routes, the entry table)
    hold = b.Child("hold", endpoint=endpoint, capacity=warm + n, name=HOLD_AGENT_NAME)
    stack.callback(hold.stop)
    await asyncio.to_thread(hold.ready)
    submit = functools.partial(client.submit, HOLD_AGENT_NAME, HOLD_COMMAND, timeout=4 * MEMORY_WAIT_S)
    futures = [submit() for _ in range(warm)]
    await _until("warm-up requests held", lambda: hold.ask("held")["requests"] >= warm)
    pid = broker.proc.pid
    before = proc_memory(pid)
    t0 = time.monotonic()
    for start in range(0, n, MEMORY_BATCH):  # in batches: no burst piles up in the broker's buffers
        futures += [submit() for _ in range(min(MEMORY_BATCH, n - start))]
        sent = len(futures)
        await _until(f"{sent - warm:,} of {n:,} requests held", lambda: hold.ask("held")["requests"] >= sent)  # noqa: B023
    took = time.monotonic() - t0
    after = proc_memory(pid)
    held = hold.ask("held")
    hold.ask("release")
    done, pending = await asyncio.wait(futures, timeout=MEMORY_WAIT_S)
    if pending:
        raise RuntimeError(f"memory: {len(pending)} of {len(futures)} held requests not answered once released")
    failed = [f.exception() for f in done if f.exception() is not None]
    if failed:
        raise RuntimeError(f"memory: {len(failed)} held requests failed, first: {failed[0]!r}")
    return {
        "requests": n,
        "warm_up": warm,
        "seconds_to_hold": took,
        "held": held["held"],
        "before": before,
        "after": after,
        "after_release": proc_memory(pid),
        "bytes_per_request": _delta(before, after, n),
    }


async def _memory_per_job(client: MeshClient, broker: b.Child, n: int, growth_s: float) -> dict[str, Any]:
    """RssAnon of the broker (LMDB store, sync) before and after ``n`` durable jobs for an agent
    that is not connected have been accepted (each stays PENDING, parked until its agent joins),
    and again ``growth_s`` later (a waiting job should not grow)."""

    async def accepted(jobs: list[SubmittedJob]) -> list[int]:
        done, pending = await asyncio.wait([j.accepted for j in jobs], timeout=MEMORY_WAIT_S)
        if pending:
            raise RuntimeError(f"memory: {len(pending)} of {len(jobs)} jobs not accepted in {MEMORY_WAIT_S:.0f} s")
        failed = [f.exception() for f in done if f.exception() is not None]
        if failed:
            raise RuntimeError(f"memory: {len(failed)} jobs refused, first: {failed[0]!r}")
        return [f.result() for f in done]

    submit_job = functools.partial(client.submit_job, ABSENT_AGENT_NAME, HOLD_COMMAND, timeout=MEMORY_WAIT_S)
    warm = max(20, n // 100)
    await accepted([submit_job() for _ in range(warm)])
    pid = broker.proc.pid
    before = proc_memory(pid)
    t0 = time.monotonic()
    ids = await accepted([submit_job() for _ in range(n)])
    took = time.monotonic() - t0
    after = proc_memory(pid)
    await asyncio.sleep(growth_s)
    later = proc_memory(pid)
    stats = await client.stats()
    oldest = await client.get_job(min(ids))
    if oldest.state is not JobState.PENDING or stats.get("jobs_live") != warm + n:
        raise RuntimeError(f"memory: job {oldest.id} is {oldest.state.value}, {stats.get('jobs_live')} jobs live")
    return {
        "jobs": n,
        "warm_up": warm,
        "seconds_to_accept": took,
        "growth_seconds": growth_s,
        "before": before,
        "after": after,
        "later": later,
        "bytes_per_job": _delta(before, after, n),
        "growth_bytes_per_job_per_s": _delta(after, later, n) / growth_s,
        "transitions_of_first_job": len(oldest.transitions),
        "jobs_live": stats.get("jobs_live"),
    }


def measure_memory(s: b.Settings) -> Section:
    """The broker's private memory (RssAnon) per connected agent, per in-flight request and per
    unfinished durable job: one broker for the first two, one on an LMDB job store (sync) in a
    temporary directory for the jobs; each figure is a difference of readings of the same
    broker, over the count that made it."""
    quick = int(s.quick)
    n_agents = min(s.agents, MEMORY_AGENTS[quick])
    n_requests, n_jobs = MEMORY_REQUESTS[quick], MEMORY_JOBS[quick]
    if "RssAnon" not in proc_memory(os.getpid()):
        note = "memory: not measured here (needs Linux /proc/<pid>/status with RssAnon)."
        return Section("memory", "memory", [], {"measured": False}, [note])
    raise_nofile(n_agents + 1024)
    with contextlib.ExitStack() as stack:
        broker, info = b._start(stack, "broker", core=s.core)
        top = tempfile.mkdtemp(prefix="orbitmesh-bench-")
        stack.callback(shutil.rmtree, top, ignore_errors=True)  # after the broker has stopped
        job_broker, job_info = b._start(stack, "broker", core=s.core, store=b._store_url("lmdb", top))
        router, router_info = b._start(stack, "welcome", count=n_agents)
        routers = {"orbitmesh": (broker, info["endpoint"]), "baseline": (router, router_info["endpoint"])}

        async def session() -> dict[str, Any]:
            ctx: zmq.Context[Any] = zmq.Context()
            client = MeshClient(info["endpoint"], context=ctx, timeout=b.REPLY_TIMEOUT)
            job_client = MeshClient(job_info["endpoint"], context=ctx, timeout=b.REPLY_TIMEOUT)
            try:
                await client.connect(b.READY_TIMEOUT)
                await job_client.connect(b.READY_TIMEOUT)
                await asyncio.sleep(MEMORY_SETTLE_S)
                idle = proc_memory(broker.proc.pid)
                agents = await _memory_per_agent(stack, routers, n_agents)
                requests = await _memory_per_request(stack, client, broker, info["endpoint"], n_requests)
                jobs = await _memory_per_job(job_client, job_broker, n_jobs, MEMORY_GROWTH_S[quick])
                registered = len(await client.agents())  # last: a query of N agents allocates too
                if registered != n_agents + 1:
                    raise RuntimeError(f"memory: {registered} agents registered, expected {n_agents + 1}")
                stats = await client.stats()
                return {"idle": idle, "agents": agents, "requests": requests, "jobs": jobs, "stats": stats}
            finally:
                await job_client.close()
                await client.close()
                ctx.term()

        details: dict[str, Any] = run(session())

    limits = broker_limits()
    per_agent = details["agents"]["orbitmesh"]["bytes_per_agent"]
    base_agent = details["agents"]["baseline"]["bytes_per_agent"]
    per_request = details["requests"]["bytes_per_request"]
    per_job = details["jobs"]["bytes_per_job"]
    details |= {"measured": True, "figure": "RssAnon", "limits": limits}
    details["max_live_jobs_bytes"] = per_job * limits["max_live_jobs"]
    rows = [
        b.Row("memory_idle", "broker RssAnon at idle (1 client), MiB", details["idle"]["RssAnon"] / (1 << 20), 0.0),
        b.Row(
            "memory_per_agent",
            f"broker memory per connected agent, bytes ({n_agents:,})",
            per_agent,
            base_agent,
            higher_is_better=False,
        ),
        b.Row("memory_per_request", f"broker memory per in-flight request, bytes ({n_requests:,})", per_request, 0.0),
        b.Row("memory_per_job", f"broker memory per unfinished job, bytes ({n_jobs:,}, lmdb)", per_job, 0.0),
    ]
    return Section("memory", "memory", rows, details, _memory_notes(details))


def broker_limits() -> dict[str, Any]:
    """The Broker's default bounds on what it holds in memory (from its signature)."""
    params = inspect.signature(Broker.__init__).parameters
    names = ("queue_limit", "client_max_inflight", "max_live_jobs", "dispatch_window")
    return {k: params[k].default for k in names}


def _memory_notes(d: dict[str, Any]) -> list[str]:
    """What the memory rows measure, and the bounds the broker sets on each."""
    lim = d["limits"]
    a, r, j = d["agents"], d["requests"], d["jobs"]
    mib = 1 << 20
    return [
        f"memory: the broker's RssAnon (private heap, libzmq buffers included; LMDB's map is page cache, not"
        f" in it), read from /proc; VmRSS and RssFile in the JSON. Idle {d['idle']['RssAnon'] / mib:.1f} MiB"
        f" (VmRSS {d['idle']['VmRSS'] / mib:.1f} MiB), 1 client.",
        f"  per agent: {a['agents']:,} raw agents (HELLO, heartbeats) joined, one heartbeat tick later; baseline:"
        " the same swarm on a raw pyzmq ROUTER (the broker's options) that answers HELLO and keeps nothing:"
        " libzmq's own cost of a connection. Bound: none in the broker; each holds one fd there, its TCP"
        " connection (RLIMIT_NOFILE, OS limits).",
        f"  per request: {r['requests']:,} invokes in flight to one agent that holds them (capacity"
        f" {r['requests'] + r['warm_up']:,}). Bound: the agents' advertised capacities (1..1,000,000 each) plus"
        f" queue_limit={lim['queue_limit']:,} queued broker-wide (each with its payload);"
        f" client_max_inflight={lim['client_max_inflight']} per client (0 = none).",
        f"  per job: {j['jobs']:,} durable jobs (lmdb, sync) for an agent that is not there, all PENDING. Bound:"
        f" max_live_jobs={lim['max_live_jobs']:,} (QUEUE_FULL beyond): ~{d['max_live_jobs_bytes'] / (1 << 30):.1f}"
        f" GiB at this size. A job waiting for its agent is parked (no retries, one transition): it grew"
        f" {j['growth_bytes_per_job_per_s']:+,.0f} B per job per s over the next {j['growth_seconds']:g} s"
        f" (it waits up to dispatch_window={lim['dispatch_window']:g} s).",
    ]


__all__ = [
    "ROLES",
    "Section",
    "measure_fanout",
    "measure_memory",
    "measure_scale",
    "measure_stream_raw",
    "proc_memory",
    "raw_window",
    "size_text",
]
