"""``orbitmesh bench`` workloads beyond invoke / latency / jobs: stream, raw, fanout, scale.

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
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
import resource
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from time import perf_counter, perf_counter_ns
from typing import Any

import msgpack
import zmq

from . import bench as b
from ._wire import header
from .agent import Agent
from .client import MeshClient
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


ROLES: dict[str, Callable[..., None]] = {
    "sink": _sink_main,
    "fanworkers": _fanworkers_main,
    "fanagents": lambda parent, endpoint, count: run(_fanagents_main(parent, endpoint, count)),
    "swarm": _swarm_main,
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


__all__ = ["ROLES", "Section", "measure_fanout", "measure_scale", "measure_stream_raw", "raw_window", "size_text"]
