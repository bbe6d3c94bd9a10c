"""``orbitmesh bench``: OrbitMesh throughput and latency next to a raw pyzmq baseline, in one run.

Both sides move the same bytes over tcp on 127.0.0.1 with the same process layout:

* OrbitMesh: broker process, agent process (``noop`` echoes its payload), client in this process.
* Baseline: ``zmq.proxy`` process (ROUTER frontend / DEALER backend), raw pyzmq echo worker
  process, raw pyzmq DEALER client in this process.

Workloads: pipelined round trips/s with ``window`` requests in flight, and sequential latency
(p50 / p99, one in flight). Around each pipelined turn every process reports its CPU time, which
gives the broker's (or the proxy's) CPU cost per forwarded message. All processes of both sides
(and of the raw peers, see ``measure_invoke``) run all along and the sides take turns of about
``CHUNK_S``, so a busy machine slows them alike and the ratios hold better than the absolute
figures. More workloads (stream, raw bytes, fan-out, scale, the broker's memory):
:mod:`orbitmesh.bench_workloads`; select with ``--workloads``.

Durable jobs: ``execute`` jobs/s end to end (a job counts when its result has arrived) with
``job_window`` jobs in flight, once per durability mode (``sync``, ``batch``, ``none``), each
with a fresh broker on a job store in a temporary directory (removed afterwards) and a fresh
agent; set against the pipelined invoke rate of the same run. The broker reports its CPU time
per thread too (control plane, job-log writer, data plane; the rest is libzmq's I/O thread).

Children are ``sys.executable`` subprocesses (no multiprocessing helper process is left behind):
each binds or connects, reports its endpoints as a JSON line on stdout, answers "cpu" (and its
role's own requests) on stdin, and exits on "stop" or when stdin closes (the bench process went
away); one that does not exit in time is terminated. POSIX only (``select`` on pipes).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import inspect
import itertools
import json
import math
import os
import platform
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from importlib import metadata
from pathlib import Path
from time import perf_counter, perf_counter_ns
from typing import TYPE_CHECKING, Any

import msgpack
import zmq

from ._core import core_impl, frame
from ._wire import header
from .agent import Agent
from .broker import Broker
from .client import MeshClient
from .protocol import Kind, Role, Route, Strategy
from .runtime import run, tune_gc_for_server, tune_gil_for_server

if TYPE_CHECKING:
    from .bench_workloads import Section

AGENT_NAME = "bench-agent"
RAW_AGENT_NAME = "bench-raw-agent"
_CORR = struct.Struct("<Q")  # a header's corr, at byte 16
COMMAND = "noop"
LOCALHOST = "tcp://127.0.0.1:0"
READY_TIMEOUT = 60.0
REPLY_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0
PROXY_HWM = 100_000  # as the broker's ROUTER
_BATCH = 256
DURABILITY_MODES = ("sync", "batch", "none")
STORES = ("lmdb", "sqlite", "memory")
JOBS_TARGET_RATE = 20_000.0  # issue 3's targets for durable jobs in sync mode: absolute
JOBS_TARGET_RATIO = 0.3  # ... and relative to pipelined invoke round trips/s
# Issue 5's targets (ratios to the baseline measured in the same run).
INVOKE_TARGET = 0.8  # pipelined invoke round trips/s >= 0.8x raw echo through zmq.proxy
P50_TARGET = 1.3  # invoke p50 <= 1.3x raw p50
P99_TARGET = 2.0  # invoke p99 <= 2x raw p99
BROKER_CPU_TARGET = 0.7  # broker CPU per forwarded message <= 0.7x zmq.proxy's
JOBS_SYNC_TARGET = 0.4  # durable execute in sync mode >= 0.4x pipelined invoke
WORKLOADS = ("invoke", "latency", "jobs", "stream", "raw", "fanout", "scale", "memory")
RAW_SIZES = (1024, 65536, 1048576)


# ------------------------------------------------------------------ settings and results


@dataclass(frozen=True)
class Settings:
    """What one run measures and for how long."""

    size: int = 64
    window: int = 1000
    duration: float = 3.0
    warmup: float = 0.3
    latency_samples: int = 20_000
    max_round_trips: int = 50_000_000
    core: str = field(default_factory=core_impl)  # the broker's core
    quick: bool = False
    job_window: int = 1000
    store: str = "lmdb"
    workloads: tuple[str, ...] = WORKLOADS
    agents: int = 5000  # scale: agents connected at once
    fanout_agents: int = 100
    raw_sizes: tuple[int, ...] = RAW_SIZES

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Settings:
        """Settings from the ``orbitmesh bench`` arguments (``--quick`` overrides ``--duration``)."""
        job_window = getattr(args, "job_window", 1000)
        store = getattr(args, "store", "lmdb")
        if args.size < 0 or args.window < 1 or job_window < 1 or args.duration <= 0:
            raise ValueError("--size must be >= 0, --window and --job-window >= 1 and --duration > 0")
        if store not in STORES:
            raise ValueError(f"--store must be one of {', '.join(STORES)}")
        quick = bool(args.quick)
        workloads = parse_workloads(getattr(args, "workloads", None))
        agents = getattr(args, "agents", None) or (500 if quick else 5000)
        fanout_agents = getattr(args, "fanout_agents", 100)
        raw_sizes = parse_sizes(getattr(args, "raw_sizes", None))
        if agents < 1 or fanout_agents < 1:
            raise ValueError("--agents and --fanout-agents must be >= 1")
        return cls(
            size=args.size,
            window=args.window,
            duration=min(0.5, args.duration) if quick else args.duration,
            warmup=0.2 if quick else 0.3,
            latency_samples=2_000 if quick else 20_000,
            core=args.core or core_impl(),
            quick=quick,
            job_window=job_window,
            store=store,
            workloads=workloads,
            agents=agents,
            fanout_agents=fanout_agents,
            raw_sizes=raw_sizes,
        )


def parse_workloads(text: str | None) -> tuple[str, ...]:
    """``"invoke,raw"`` -> the named workloads in report order (all if empty); ValueError if unknown.
    ``jobs`` brings ``invoke`` along: it is the jobs' baseline."""
    if not text:
        return WORKLOADS
    names = {w.strip() for w in text.split(",") if w.strip()}
    unknown = names - set(WORKLOADS)
    if unknown or not names:
        bad = ", ".join(sorted(unknown)) or "(none)"
        raise ValueError(f"--workloads: unknown {bad}; choose from {','.join(WORKLOADS)}")
    if "jobs" in names:
        names.add("invoke")
    return tuple(w for w in WORKLOADS if w in names)


def parse_sizes(text: str | None) -> tuple[int, ...]:
    """``"1k,64k,1m"`` or ``"1024,65536"`` -> byte sizes; ValueError on anything else."""
    if not text:
        return RAW_SIZES
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        scale = {"k": 1 << 10, "m": 1 << 20}.get(part[-1:], 1)
        digits = part[:-1] if scale > 1 else part
        if not digits.isdigit() or int(digits) * scale < 1:
            raise ValueError(f"--raw-sizes: {part!r} is not a size (e.g. 1024, 64k, 1m)")
        out.append(int(digits) * scale)
    return tuple(out)


@dataclass
class Figures:
    """One side's measurements. CPU figures are ns per round trip, per process role."""

    rate: float = 0.0
    round_trips: int = 0
    elapsed: float = 0.0
    p50_us: float = 0.0
    p99_us: float = 0.0
    latency_samples: int = 0
    cpu_ns_per_round_trip: dict[str, float] = field(default_factory=dict)


@dataclass
class JobFigures:
    """Durable ``execute`` in one durability mode. CPU figures are ns per job, per process role;
    ``broker_threads`` splits the broker's: control plane (its event loop), job-log writer,
    data plane, and the rest (libzmq's I/O thread)."""

    durability: str = ""
    store: str = ""
    api: str = "submit_job"  # or "execute": one coroutine per window slot, execute() then Job.result()
    rate: float = 0.0
    jobs: int = 0
    elapsed: float = 0.0
    cpu_ns_per_job: dict[str, float] = field(default_factory=dict)
    broker_threads_ns_per_job: dict[str, float] = field(default_factory=dict)

    @property
    def key(self) -> str:
        """``sync``, ``batch``, ``none``; ``sync_execute`` for the coroutine API's run."""
        return self.durability if self.api == "submit_job" else f"{self.durability}_{self.api}"


@dataclass(frozen=True)
class Row:
    """One line of the report: a figure for both sides and, maybe, a target ratio."""

    key: str
    label: str
    orbitmesh: float
    baseline: float
    target: float | None = None
    higher_is_better: bool = True
    absolute: float | None = None  # a target for the OrbitMesh figure itself

    @property
    def ratio(self) -> float:
        """OrbitMesh / baseline; inf when there is no baseline (0)."""
        return self.orbitmesh / self.baseline if self.baseline else float("inf")

    @property
    def met_ratio(self) -> bool | None:
        if self.target is None or not self.baseline:
            return None
        return self.ratio >= self.target if self.higher_is_better else self.ratio <= self.target

    @property
    def met_absolute(self) -> bool | None:
        if self.absolute is None:
            return None
        return self.orbitmesh >= self.absolute if self.higher_is_better else self.orbitmesh <= self.absolute

    @property
    def met(self) -> bool | None:
        """Every target met (None: no target)."""
        verdicts = [m for m in (self.met_ratio, self.met_absolute) if m is not None]
        return all(verdicts) if verdicts else None

    def target_text(self) -> str:
        if self.target is None:
            return ""
        return f"{'>=' if self.higher_is_better else '<='} {self.target:.2f}x"

    def absolute_text(self) -> str:
        if self.absolute is None:
            return ""
        return f"{'>=' if self.higher_is_better else '<='} {_num(self.absolute)}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "orbitmesh": self.orbitmesh,
            "baseline": self.baseline or None,
            "ratio": self.ratio if math.isfinite(self.ratio) else None,
            "target": self.target_text() or None,
            "absolute_target": self.absolute_text() or None,
            "met_ratio": self.met_ratio,
            "met_absolute": self.met_absolute,
            "met": self.met,
        }


@dataclass
class Report:
    """Everything one run found."""

    settings: Settings
    machine: dict[str, Any]
    orbitmesh: Figures  # MeshClient.invoke -> broker -> Agent
    raw: Figures  # raw pyzmq peers speaking the OrbitMesh protocol -> broker: the broker alone
    baseline: Figures  # raw pyzmq -> zmq.proxy -> raw pyzmq
    broker_core: str
    jobs: list[JobFigures] = field(default_factory=list)  # durable execute, one per durability mode
    sections: list[Section] = field(default_factory=list)  # stream, raw, fanout, scale, memory

    def rows(self) -> list[Row]:
        """Invoke and latency side by side with the baseline, with issue 5's targets."""
        om, raw, base = self.orbitmesh, self.raw, self.baseline
        oc, rc, bc = om.cpu_ns_per_round_trip, raw.cpu_ns_per_round_trip, base.cpu_ns_per_round_trip
        lower = {"higher_is_better": False}
        window = self.settings.window
        rows = []
        if "invoke" in self.settings.workloads:
            rows += [
                Row(
                    "pipelined",
                    f"pipelined invoke, round trips/s (window {window})",
                    om.rate,
                    base.rate,
                    INVOKE_TARGET,
                ),
                Row(
                    "broker_cpu",
                    "broker CPU, ns / forwarded msg",
                    oc["broker"] / 2,
                    bc["broker"] / 2,
                    BROKER_CPU_TARGET,
                    **lower,
                ),
                Row("agent_cpu", "agent CPU, ns / round trip", oc["agent"], bc["agent"], **lower),
                Row("client_cpu", "client CPU, ns / round trip", oc["client"], bc["client"], **lower),
                Row("raw_pipelined", "raw peers: round trips/s through the broker", raw.rate, base.rate),
                Row(
                    "raw_broker_cpu",
                    "raw peers: broker CPU, ns / forwarded msg",
                    rc["broker"] / 2,
                    bc["broker"] / 2,
                    BROKER_CPU_TARGET,
                    **lower,
                ),
            ]
        if "latency" in self.settings.workloads:
            rows += [
                Row("latency_p50", "latency p50, us (one in flight)", om.p50_us, base.p50_us, P50_TARGET, **lower),
                Row("latency_p99", "latency p99, us (one in flight)", om.p99_us, base.p99_us, P99_TARGET, **lower),
                Row("raw_latency_p50", "raw peers: latency p50, us", raw.p50_us, base.p50_us, **lower),
            ]
        return rows

    def all_rows(self) -> list[Row]:
        """Every row of the report, in order."""
        return [*self.rows(), *self.job_rows(), *(row for sec in self.sections for row in sec.rows)]

    def job_rows(self) -> list[Row]:
        """Durable execute per mode against pipelined invoke of the same run (the "baseline"
        column): jobs/s vs round trips/s, and each process's CPU per job vs per round trip."""
        om = self.orbitmesh
        oc = om.cpu_ns_per_round_trip
        lower = {"higher_is_better": False}
        rows = []
        for j in self.jobs:
            mode, jc = j.durability, j.cpu_ns_per_job
            if j.api == "execute":
                rows += [
                    Row(f"jobs_{mode}_execute", f"execute() coroutines {mode}: jobs/s", j.rate, om.rate),
                    *(
                        Row(
                            f"jobs_{mode}_execute_{role}_cpu",
                            f"execute() coroutines {mode}: {role} CPU, ns / job",
                            jc[role],
                            oc[role],
                            **lower,
                        )
                        for role in ("broker", "client")
                    ),
                ]
                continue
            sync = mode == "sync"
            rows += [
                Row(
                    f"jobs_{mode}",
                    f"execute {mode}: jobs/s (window {self.settings.job_window})",
                    j.rate,
                    om.rate,
                    JOBS_SYNC_TARGET if sync else None,
                    absolute=JOBS_TARGET_RATE if sync else None,
                ),
                *(
                    [Row("jobs_sync_issue3", "execute sync: jobs/s, issue 3 ratio", j.rate, om.rate, JOBS_TARGET_RATIO)]
                    if sync
                    else []
                ),
                *(
                    Row(f"jobs_{mode}_{role}_cpu", f"execute {mode}: {role} CPU, ns / job", jc[role], oc[role], **lower)
                    for role in ("broker", "agent", "client")
                ),
            ]
        return rows

    def to_dict(self) -> dict[str, Any]:
        return {
            "machine": self.machine,
            "settings": asdict(self.settings),
            "broker_core": self.broker_core,
            "live_core": core_impl(),
            "orbitmesh": asdict(self.orbitmesh),
            "raw": asdict(self.raw),
            "baseline": asdict(self.baseline),
            "jobs": {j.key: asdict(j) for j in self.jobs},
            "details": {sec.name: sec.details for sec in self.sections},
            "workloads": {row.key: row.to_dict() for row in self.all_rows()},
            "targets": {row.key: row.met for row in self.all_rows() if row.met is not None},
        }


def machine_info() -> dict[str, Any]:
    """The machine and library versions the figures come from."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count() or 0
    try:
        loop = f"uvloop {metadata.version('uvloop')}"
    except metadata.PackageNotFoundError:
        loop = "asyncio"
    return {
        "cpus": os.cpu_count() or 0,
        "usable_cpus": usable,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "pyzmq": zmq.pyzmq_version(),
        "libzmq": zmq.zmq_version(),
        "loop": loop,
        "tmpdir": _filesystem(tempfile.gettempdir()),
        "load_average": _loadavg(),  # 1/5/15-minute run-queue lengths: is the machine shared and busy?
        "cpu_model": _cpu_model(),
    }


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or "?"


def _loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # not available here
        return []


def _filesystem(path: str) -> str:
    """``path`` and the type of the file system it is on (Linux /proc/mounts; where job stores go)."""
    best, kind = "", "?"
    with contextlib.suppress(OSError):
        with open("/proc/mounts", encoding="utf-8") as fh:
            for line in fh:
                parts = line.split()
                if len(parts) > 2 and (path == parts[1] or path.startswith(parts[1].rstrip("/") + "/")):
                    if len(parts[1]) >= len(best):
                        best, kind = parts[1], parts[2]
    return f"{path} ({kind})"


def percentile_us(sorted_ns: list[int], q: float) -> float:
    """The ``q`` quantile (0..1, nearest rank) of sorted ns samples, in microseconds."""
    if not sorted_ns:
        return 0.0
    index = min(len(sorted_ns) - 1, max(0, int(q * len(sorted_ns) + 0.5) - 1))
    return sorted_ns[index] / 1000.0


# ------------------------------------------------------------------ child processes (child side)


class _Parent:
    """A child's link to the bench process: commands come as lines on stdin ("cpu", "stop", or
    one of ``commands``), answers go out as JSON lines on the original stdout (stray prints go to
    stderr)."""

    def __init__(self) -> None:
        self.fd = sys.stdin.fileno()
        self._out = os.fdopen(os.dup(sys.stdout.fileno()), "w", encoding="utf-8")
        os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
        self._buf = b""
        self.commands: dict[str, Callable[[], dict[str, Any]]] = {}  # a role's own requests -> its answer

    def send(self, **msg: Any) -> None:
        self._out.write(json.dumps(msg) + "\n")
        self._out.flush()

    def serve(self) -> bool:
        """Read stdin once (blocks if nothing is there) and answer; False on "stop" or EOF."""
        data = os.read(self.fd, 4096)
        if not data:
            return False
        self._buf += data
        while b"\n" in self._buf:
            line, _, self._buf = self._buf.partition(b"\n")
            command = line.strip().decode(errors="replace")
            if command == "cpu":
                self.send(cpu=time.process_time_ns(), threads=_thread_cpu_ns())
            elif command in self.commands:
                self.send(**self.commands[command]())
            else:
                return False
        return True

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._out.close()


def _thread_role(name: str) -> str:
    if name == "MainThread":
        return "control"  # in the broker: the control plane's event loop
    if name.startswith("orbitmesh-dataplane"):
        return "dataplane"
    if name.startswith("orbitmesh-joblog"):
        return "joblog"
    return "other_python"


def _thread_cpu_ns() -> dict[str, int]:
    """CPU time so far of this process's Python threads, by role (libzmq's threads are not here)."""
    out: dict[str, int] = {}
    for thread in threading.enumerate():
        if thread.ident is None:
            continue
        try:
            ns = time.clock_gettime_ns(time.pthread_getcpuclockid(thread.ident))
        except (OSError, AttributeError):  # the thread just ended, or no per-thread clocks here
            continue
        role = _thread_role(thread.name)
        out[role] = out.get(role, 0) + ns
    return out


async def _serve_parent(parent: _Parent) -> None:
    """Answer the parent from the running loop until it says stop (or goes away)."""
    loop = asyncio.get_running_loop()
    stopped: asyncio.Future[None] = loop.create_future()

    def readable() -> None:
        if not stopped.done() and not parent.serve():
            loop.remove_reader(parent.fd)
            stopped.set_result(None)

    loop.add_reader(parent.fd, readable)
    await stopped


async def noop(payload: Any) -> Any:
    """The benchmark handler: echo the payload."""
    return payload


async def _broker_main(parent: _Parent, core: str, store: str | None = None, durability: str = "sync") -> None:
    broker = Broker(LOCALHOST, core=core, store=store, durability=durability)
    await broker.start()
    tune_gc_for_server()  # as `orbitmesh broker` does
    tune_gil_for_server()
    try:
        parent.send(ready={"endpoint": broker.endpoints[0], "core": broker.core})
        await _serve_parent(parent)
    finally:
        await broker.stop()


async def _agent_main(parent: _Parent, endpoint: str, capacity: int) -> None:
    from .bench_workloads import STREAM_COMMAND, ack, items

    agent = Agent(AGENT_NAME, endpoint, capacity=capacity)
    agent.add_handler(COMMAND, noop)
    agent.add_handler(STREAM_COMMAND, items)  # the stream workload
    agent.raw_handler(ack)  # the raw workload
    await agent.start(timeout=READY_TIMEOUT)
    try:
        parent.send(ready={})
        await _serve_parent(parent)
    finally:
        await agent.stop(drain_timeout=2.0)


def _proxy_main(parent: _Parent) -> None:
    ctx = zmq.Context()
    front, back = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    control, steer = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    sockets = [front, back, control, steer]
    for s in sockets:
        s.setsockopt(zmq.LINGER, 0)
    for s in (front, back):
        s.setsockopt(zmq.SNDHWM, PROXY_HWM)
        s.setsockopt(zmq.RCVHWM, PROXY_HWM)
    front.bind(LOCALHOST)
    back.bind(LOCALHOST)
    control.bind(f"inproc://bench-proxy-{os.getpid()}")
    steer.connect(f"inproc://bench-proxy-{os.getpid()}")
    thread = threading.Thread(target=zmq.proxy_steerable, args=(front, back, None, control), daemon=True)
    thread.start()
    try:
        endpoints = {"frontend": front.getsockopt_string(zmq.LAST_ENDPOINT)}
        endpoints["backend"] = back.getsockopt_string(zmq.LAST_ENDPOINT)
        parent.send(ready=endpoints)
        while parent.serve():
            pass
    finally:
        steer.send(b"TERMINATE")
        thread.join(STOP_TIMEOUT)
        if not thread.is_alive():  # never close sockets the proxy thread may still use
            for s in sockets:
                s.close()
            ctx.term()


def _echo_main(parent: _Parent, endpoint: str) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    poller.register(parent.fd, zmq.POLLIN)
    try:
        parent.send(ready={})
        while True:
            events = dict(poller.poll())
            if sock in events:
                for _ in range(_BATCH):
                    try:
                        frames = sock.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    sock.send_multipart(frames)
            if parent.fd in events and not parent.serve():
                return
    finally:
        sock.close()
        ctx.term()


def _serve_raw(parent: _Parent, sock: zmq.Socket[Any], handle: Callable[[list[bytes]], None]) -> None:
    """Until the parent says stop: hand each message ``sock`` receives to ``handle`` (up to
    _BATCH per wake-up) and answer the parent's requests. For the raw peers that speak OrbitMesh's
    protocol; the baselines' own workers (echo, sink, fan-out) keep their loops inline, one
    Python call per message less."""
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    poller.register(parent.fd, zmq.POLLIN)
    while True:
        events = dict(poller.poll())
        if sock in events:
            for _ in range(_BATCH):
                try:
                    frames = sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                handle(frames)
        if parent.fd in events and not parent.serve():
            return


def _raw_agent_main(parent: _Parent, endpoint: str, capacity: int) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    for opt, value in ((zmq.LINGER, 0), (zmq.SNDHWM, 0), (zmq.RCVHWM, 0), (zmq.RCVTIMEO, int(READY_TIMEOUT * 1000))):
        sock.setsockopt(opt, value)
    sock.connect(endpoint)
    reply, heartbeat = header(Kind.REPLY), [header(Kind.HEARTBEAT), b""]
    pack, unpack, send = frame.pack_parts, frame.unpack_parts, sock.send

    def handle(frames: list[bytes]) -> None:
        kind = frames[0][3]
        if kind == Kind.REQUEST:
            parts = unpack(frames)  # [header, token, command, params]
            send(pack([reply, parts[1], parts[3]])[0])  # one frame: all inline
        elif kind == Kind.HEARTBEAT:
            sock.send_multipart(heartbeat)

    try:
        # Protocol 2 (packed framing): a request or a reply is one frame, as the baseline's are.
        hello = {"role": "agent", "name": RAW_AGENT_NAME, "capacity": capacity, "commands": [COMMAND], "protocol": 2}
        _raw_hello(sock, Role.AGENT, hello)
        parent.send(ready={})
        _serve_raw(parent, sock, handle)
    finally:
        sock.close()
        ctx.term()


_ROLES: dict[str, Callable[..., None]] = {
    # broker / agent: OrbitMesh on uvloop. rawagent: a raw pyzmq echo agent speaking the OrbitMesh
    # protocol. proxy: zmq.proxy (steerable, to stop it cleanly) from a ROUTER to a DEALER.
    # echo: a raw pyzmq DEALER worker that sends back every message it gets.
    "broker": lambda parent, core, **job_store: run(_broker_main(parent, core, **job_store)),
    "agent": lambda parent, endpoint, capacity: run(_agent_main(parent, endpoint, capacity)),
    "proxy": _proxy_main,
    "echo": _echo_main,
    "rawagent": _raw_agent_main,
}


def child_main(argv: list[str]) -> int:
    """Entry point of a child process: ``argv`` = [role, JSON keyword arguments]."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when children stop
    parent = _Parent()
    try:
        role = _ROLES.get(argv[0])
        if role is None:
            from .bench_workloads import ROLES

            role = ROLES[argv[0]]
        role(parent, **json.loads(argv[1]))
    except BaseException:
        with contextlib.suppress(OSError):
            parent.send(error=traceback.format_exc())
        return 1
    finally:
        parent.close()
    return 0


# ------------------------------------------------------------------ child processes (parent side)


_ENTRY = "import sys; from orbitmesh.bench import child_main; sys.exit(child_main(sys.argv[1:]))"


class Child:
    """A child process (``sys.executable``, this orbitmesh importable) playing ``role``."""

    def __init__(self, role: str, **kwargs: Any) -> None:
        self.role = role
        env = dict(os.environ)
        here = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH", "")) if p)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _ENTRY, role, json.dumps(kwargs)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
        )
        self._buf = b""

    def _send(self, command: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command.encode() + b"\n")
        self.proc.stdin.flush()

    def _recv(self, timeout: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        end = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = end - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"bench {self.role} process did not answer within {timeout:.0f} s")
            if select.select([fd], [], [], left)[0]:
                data = os.read(fd, 65536)
                if not data:
                    raise RuntimeError(f"bench {self.role} process exited (status {self.proc.wait(STOP_TIMEOUT)})")
                self._buf += data
        line, _, self._buf = self._buf.partition(b"\n")
        msg: dict[str, Any] = json.loads(line)
        if "error" in msg:
            raise RuntimeError(f"bench {self.role} process failed:\n{msg['error']}")
        return msg

    def ready(self) -> dict[str, Any]:
        """Wait for the child to be serving; return what it says about itself (endpoints...)."""
        info: dict[str, Any] = self._recv(READY_TIMEOUT)["ready"]
        return info

    def cpu_ns(self) -> int:
        """The child's CPU time so far (all its threads), in ns."""
        return self.cpu()[0]

    def cpu(self) -> tuple[int, dict[str, int]]:
        """The child's CPU time so far: all its threads, and its Python threads by role, in ns."""
        self._send("cpu")
        msg = self._recv(REPLY_TIMEOUT)
        return int(msg["cpu"]), {k: int(v) for k, v in msg.get("threads", {}).items()}

    def ask(self, command: str, timeout: float = REPLY_TIMEOUT) -> dict[str, Any]:
        """Send one of the role's own requests (``_Parent.commands``) and return its answer."""
        self._send(command)
        return self._recv(timeout)

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Ask the child to exit; terminate (then kill) it if it has not within ``timeout`` s."""
        with contextlib.suppress(OSError):
            self._send("stop")
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.terminate()
            try:
                self.proc.wait(2.0)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()


def _start(stack: contextlib.ExitStack[Any], role: str, **kwargs: Any) -> tuple[Child, dict[str, Any]]:
    child = Child(role, **kwargs)
    stack.callback(child.stop)
    return child, child.ready()


class _CpuWindow:
    """CPU time of this process and of some children across a measured window."""

    def __init__(self, children: dict[str, Child]) -> None:
        self._children = children
        self._start, self._start_threads = self._read()
        self.threads: dict[str, dict[str, float]] = {}  # after per(): role -> thread role -> ns / count

    def _read(self) -> tuple[dict[str, int], dict[str, dict[str, int]]]:
        now: dict[str, int] = {}
        threads: dict[str, dict[str, int]] = {}
        for role, child in self._children.items():
            now[role], threads[role] = child.cpu()
        now["client"] = time.process_time_ns()
        return now, threads

    def per(self, count: int) -> dict[str, float]:
        """CPU ns per unit of ``count`` for every role, since the window opened."""
        end, end_threads = self._read()
        n = max(1, count)
        for role, by_thread in end_threads.items():
            start = self._start_threads[role]
            split = {name: (ns - start.get(name, 0)) / n for name, ns in by_thread.items()}
            split["libzmq_other"] = (end[role] - self._start[role]) / n - sum(split.values())
            self.threads[role] = split
        return {role: (end[role] - self._start[role]) / n for role in end}


# ------------------------------------------------------------------ OrbitMesh client side


class _Pipeline:
    """Keep ``window`` calls in flight with done-callbacks (no task per call): ``call()`` sends
    one and returns the future of its outcome (``submit`` for invoke, ``submit_job`` for jobs).
    Each counts when its outcome has arrived; the clock stops when the last one has."""

    def __init__(
        self, call: Callable[[], asyncio.Future[Any]], window: int, duration: float, max_count: int, what: str
    ) -> None:
        self._call = call
        self._window = max(1, min(window, max_count))
        self._max = max_count
        self._duration = duration
        self._what = what
        self._end = 0.0
        self.sent = 0
        self.completed = 0
        self._finished: asyncio.Future[None] | None = None

    def _send(self) -> None:
        self.sent += 1
        self._call().add_done_callback(self._done)

    def _done(self, fut: asyncio.Future[Any]) -> None:
        self.completed += 1
        finished = self._finished
        assert finished is not None
        if finished.done():
            return
        exc = RuntimeError(f"{self._what} was cancelled") if fut.cancelled() else fut.exception()
        if exc is not None:
            finished.set_exception(exc)
        elif self.sent < self._max and perf_counter() < self._end:
            self._send()
        elif self.completed == self.sent:
            finished.set_result(None)

    async def run(self) -> tuple[int, float]:
        """Run for ``duration`` s (or ``max_count`` calls); return (calls completed, seconds)."""
        self._finished = asyncio.get_running_loop().create_future()
        t0 = perf_counter()
        self._end = t0 + self._duration
        for _ in range(self._window):
            self._send()
        try:
            await asyncio.wait_for(self._finished, self._duration + 2 * REPLY_TIMEOUT)
        except TimeoutError:
            raise RuntimeError(f"{self._what}s did not finish within {REPLY_TIMEOUT:.0f} s of the run") from None
        return self.completed, perf_counter() - t0


def _invokes(client: MeshClient, payload: bytes) -> Callable[[], asyncio.Future[Any]]:
    return functools.partial(client.submit, AGENT_NAME, COMMAND, payload, timeout=REPLY_TIMEOUT)


def _jobs(client: MeshClient, payload: bytes) -> Callable[[], asyncio.Future[Any]]:
    submit_job = client.submit_job
    return lambda: submit_job(AGENT_NAME, COMMAND, payload, timeout=REPLY_TIMEOUT).result


async def _om_latency(client: MeshClient, payload: bytes, duration: float, samples: int) -> list[int]:
    out: list[int] = []
    end = perf_counter() + duration
    invoke = client.invoke
    while len(out) < samples and perf_counter() < end:
        t = perf_counter_ns()
        await invoke(AGENT_NAME, COMMAND, payload, timeout=REPLY_TIMEOUT)
        out.append(perf_counter_ns() - t)
    return out


CHUNK_S = 0.5  # OrbitMesh and its baselines take turns, this long each, so all see the same load


def chunks(duration: float) -> list[float]:
    """``duration`` split into turns of about CHUNK_S (at least 2)."""
    k = max(2, round(duration / CHUNK_S))
    return [duration / k] * k


class _Meter:
    """Counts, seconds and CPU per process role, summed over one side's turns."""

    def __init__(self, children: dict[str, Child]) -> None:
        self.children = children
        self.count = 0
        self.elapsed = 0.0
        self.cpu_ns: dict[str, int] = {}
        self.thread_ns: dict[str, dict[str, int]] = {}  # role -> Python thread role -> ns
        self._start: tuple[dict[str, int], dict[str, dict[str, int]]] = ({}, {})

    def _read(self) -> tuple[dict[str, int], dict[str, dict[str, int]]]:
        now: dict[str, int] = {}
        threads: dict[str, dict[str, int]] = {}
        for role, child in self.children.items():
            now[role], threads[role] = child.cpu()
        now["client"] = time.process_time_ns()
        return now, threads

    def start(self) -> None:
        self._start = self._read()

    def stop(self, count: int, elapsed: float) -> None:
        (end, end_threads), (start, start_threads) = self._read(), self._start
        for role, ns in end.items():
            self.cpu_ns[role] = self.cpu_ns.get(role, 0) + ns - start[role]
        for role, by_thread in end_threads.items():
            acc = self.thread_ns.setdefault(role, {})
            for name, ns in by_thread.items():
                acc[name] = acc.get(name, 0) + ns - start_threads[role].get(name, 0)
        self.count += count
        self.elapsed += elapsed

    def per_unit(self) -> dict[str, float]:
        """CPU ns per counted unit, by role."""
        n = max(1, self.count)
        return {role: ns / n for role, ns in self.cpu_ns.items()}

    def threads_per_unit(self, role: str) -> dict[str, float]:
        """CPU ns per counted unit of ``role``'s Python threads; "libzmq_other": the rest."""
        n = max(1, self.count)
        split = {name: ns / n for name, ns in self.thread_ns.get(role, {}).items()}
        split["libzmq_other"] = self.cpu_ns.get(role, 0) / n - sum(split.values())
        return split


async def _maybe_await(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


async def _invoke_turns(
    s: Settings, sides: dict[str, tuple[Any, Any, _Meter]], between: Callable[[], None]
) -> dict[str, Figures]:
    """Each side: (pipelined(seconds) -> (count, seconds), sequential(seconds, samples) -> [ns]
    or None, meter). Warm up every side, then the sides take turns (their order rotating):
    pipelined for ``s.duration`` s each if ``invoke`` is chosen, then sequential if ``latency``
    is. ``between()`` runs after every turn (keeps idle raw peers alive)."""
    names = list(sides)
    figures = {name: Figures() for name in names}

    def order(i: int) -> list[str]:
        return names[i % len(names) :] + names[: i % len(names)]

    if "invoke" in s.workloads:
        for name in names:
            await _maybe_await(sides[name][0](s.warmup))
            between()
        for i, chunk in enumerate(chunks(s.duration)):
            for name in order(i):
                pipelined, _, meter = sides[name]
                meter.start()
                count, elapsed = await _maybe_await(pipelined(chunk))
                meter.stop(count, elapsed)
                between()
        for name in names:
            meter = sides[name][2]
            f = figures[name]
            f.round_trips, f.elapsed = meter.count, meter.elapsed
            f.rate = meter.count / meter.elapsed if meter.elapsed else 0.0
            f.cpu_ns_per_round_trip = meter.per_unit()
    timed = [name for name in names if sides[name][1] is not None]  # the durable-job sides have no latency run
    if s.latency_samples > 0:
        samples: dict[str, list[int]] = {name: [] for name in timed}
        for name in timed:
            await _maybe_await(sides[name][1](s.warmup, s.latency_samples))
            between()
        for i, chunk in enumerate(chunks(s.duration)):
            for name in order(i):
                left = s.latency_samples - len(samples.get(name, ()))
                if name in samples and left > 0:
                    samples[name] += await _maybe_await(sides[name][1](chunk, left))
                    between()
        for name in timed:
            _set_latency(figures[name], samples[name])
    return figures


def measure_invoke(s: Settings, payload: bytes) -> tuple[Figures, Figures, Figures, str, list[JobFigures]]:
    """Invoke throughput and latency, three ways at once: a MeshClient here -> broker -> Agent;
    raw pyzmq peers speaking the OrbitMesh protocol (client here -> the same broker -> raw agent);
    the baseline (raw DEALER here -> zmq.proxy -> raw echo worker). If ``jobs`` is chosen, also
    durable ``execute`` per durability mode, each on its own broker with a fresh job store in a
    temporary directory (removed afterwards) and its own agent. Every process runs all along and
    the sides take turns of about CHUNK_S, so they share the machine's load alike.

    Returns the invoke, raw-peer and baseline figures, the broker's core and the job figures.
    """
    with contextlib.ExitStack() as stack:
        job_stacks = _start_job_stacks(stack, s) if "jobs" in s.workloads else {}
        broker, info = _start(stack, "broker", core=s.core)
        proxy, pinfo = _start(stack, "proxy")
        endpoint, capacity = info["endpoint"], max(64, s.window)
        agent = Child("agent", endpoint=endpoint, capacity=capacity)
        stack.callback(agent.stop)
        raw_agent = Child("rawagent", endpoint=endpoint, capacity=capacity)
        stack.callback(raw_agent.stop)
        echo = Child("echo", endpoint=pinfo["backend"])
        stack.callback(echo.stop)
        for child in (agent, raw_agent, echo):
            child.ready()
        base_sock = stack.enter_context(_dealer(pinfo["frontend"]))
        base_sock.send(payload)
        if base_sock.recv() != payload:
            raise RuntimeError("the echo worker did not send the payload back")
        base_send, base_recv = functools.partial(base_sock.send, payload), base_sock.recv
        raw_sock = stack.enter_context(_dealer(endpoint))
        route = frame.pack_route(Route.NAME, Strategy.LEAST_LOADED, RAW_AGENT_NAME.encode())
        # Protocol 2 (packed framing): a request is one frame, as the baseline's; only its corr
        # changes, written in place (each request's corr must increase within the session).
        packed = frame.pack_parts([header(Kind.REQUEST), route, COMMAND.encode(), msgpack.packb(payload)])
        if len(packed) != 1:
            raise RuntimeError(f"a {len(payload)}-byte request does not pack into one frame")
        request = bytearray(packed[0])
        corrs = itertools.count(1)
        set_corr = functools.partial(_CORR.pack_into, request, 16)

        def raw_send() -> None:
            set_corr(next(corrs))
            raw_sock.send(request)

        raw_recv = _raw_reply_receiver(raw_sock)
        top = s.max_round_trips

        async def session() -> dict[str, Figures]:
            ctx: zmq.Context[Any] = zmq.Context()
            client = MeshClient(endpoint, context=ctx, timeout=REPLY_TIMEOUT)
            job_clients = {
                mode: MeshClient(e, context=ctx, timeout=REPLY_TIMEOUT) for mode, (e, _, _) in job_stacks.items()
            }
            try:
                await client.connect(READY_TIMEOUT)
                for job_client in job_clients.values():
                    await job_client.connect(READY_TIMEOUT)
                    job = await job_client.execute(AGENT_NAME, COMMAND, payload)
                    echoed = await job.result(REPLY_TIMEOUT)
                    if echoed != payload:
                        raise RuntimeError(f"the agent's job result is {echoed!r:.60}, not the payload")
                echoed = await client.invoke(AGENT_NAME, COMMAND, payload)
                if echoed != payload:
                    raise RuntimeError(f"the agent echoed {echoed!r:.60}, not the payload")
                _raw_hello(raw_sock, Role.CLIENT, {"role": "client", "name": "bench-raw-client", "protocol": 2})
                sides: dict[str, tuple[Any, Any, _Meter]] = {
                    "orbitmesh": (
                        lambda t: _Pipeline(_invokes(client, payload), s.window, t, top, "an invoke").run(),
                        lambda t, n: _om_latency(client, payload, t, n),
                        _Meter({"broker": broker, "agent": agent}),
                    ),
                    "raw": (
                        lambda t: _pipelined(raw_send, raw_recv, s.window, t, top),
                        lambda t, n: _sequential(raw_send, raw_recv, t, n),
                        _Meter({"broker": broker, "agent": raw_agent}),
                    ),
                    "baseline": (
                        lambda t: _pipelined(base_send, base_recv, s.window, t, top),
                        lambda t, n: _sequential(base_send, base_recv, t, n),
                        _Meter({"broker": proxy, "agent": echo}),
                    ),
                }
                job_sides: list[tuple[str, str, str]] = []  # (side, mode, api)
                for mode, job_client in job_clients.items():
                    _, job_broker, job_agent = job_stacks[mode]
                    sides[f"jobs_{mode}"] = (
                        lambda t, c=job_client: _Pipeline(_jobs(c, payload), s.job_window, t, 1 << 62, "a job").run(),
                        None,
                        _Meter({"broker": job_broker, "agent": job_agent}),
                    )
                    job_sides.append((f"jobs_{mode}", mode, "submit_job"))
                    if mode == "sync":  # what the coroutine API costs, on the same stack
                        sides["jobs_sync_execute"] = (
                            functools.partial(_job_pipeline, job_client, payload, s.job_window),
                            None,
                            _Meter({"broker": job_broker, "agent": job_agent}),
                        )
                        job_sides.append(("jobs_sync_execute", mode, "execute"))
                figures = await _invoke_turns(s, sides, functools.partial(_raw_keepalive, raw_sock))
                for side, mode, api in job_sides:
                    meter = sides[side][2]
                    rate = meter.count / meter.elapsed if meter.elapsed else 0.0
                    jf = JobFigures(mode, s.store, api, rate, meter.count, meter.elapsed, meter.per_unit())
                    jf.broker_threads_ns_per_job = meter.threads_per_unit("broker")
                    jobs.append(jf)
                return figures
            finally:
                for job_client in job_clients.values():
                    await job_client.close()
                await client.close()
                ctx.term()

        jobs: list[JobFigures] = []
        figures = run(session())
        return figures["orbitmesh"], figures["raw"], figures["baseline"], str(info["core"]), jobs


# ------------------------------------------------------------------ durable jobs (execute)


async def _job_pipeline(client: MeshClient, payload: bytes, window: int, duration: float) -> tuple[int, float]:
    """Keep ``window`` jobs in flight for ``duration`` s; return (jobs completed, seconds).

    ``window`` worker coroutines (tasks made once, none per job), each looping ``execute`` (until
    ACCEPTED) then ``Job.result()``: what the coroutine API costs a pipelining caller.
    A job counts when its result has arrived; the clock stops when the last one has.
    """
    execute = client.execute
    completed = 0
    end = 0.0

    async def worker() -> None:
        nonlocal completed
        while perf_counter() < end:
            job = await execute(AGENT_NAME, COMMAND, payload, timeout=REPLY_TIMEOUT)
            await job.result()
            completed += 1

    t0 = perf_counter()
    end = t0 + duration
    tasks = [asyncio.ensure_future(worker()) for _ in range(window)]
    try:
        await asyncio.wait_for(asyncio.gather(*tasks), duration + 2 * REPLY_TIMEOUT)
    except TimeoutError:
        raise RuntimeError(f"durable jobs did not finish within {REPLY_TIMEOUT:.0f} s of the run") from None
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return completed, perf_counter() - t0


def _store_url(store: str, directory: str) -> str:
    if store == "memory":
        return "memory://"
    if store == "sqlite":
        return f"sqlite://{os.path.join(directory, 'jobs.db')}"
    return f"lmdb://{os.path.join(directory, 'jobs')}"


def _start_job_stacks(stack: contextlib.ExitStack[Any], s: Settings) -> dict[str, tuple[str, Child, Child]]:
    """Per durability mode: a broker process on a fresh job store in a temporary directory
    (removed once every child has stopped) and an agent process (capacity >= the job window).
    Returns mode -> (endpoint, broker, agent)."""
    top = tempfile.mkdtemp(prefix="orbitmesh-bench-")
    stack.callback(shutil.rmtree, top, ignore_errors=True)  # callbacks run last-in first-out: after the stops
    brokers: dict[str, Child] = {}
    for mode in DURABILITY_MODES:
        directory = os.path.join(top, mode)
        os.mkdir(directory)
        brokers[mode] = broker = Child("broker", core=s.core, store=_store_url(s.store, directory), durability=mode)
        stack.callback(broker.stop)
    endpoints = {mode: broker.ready()["endpoint"] for mode, broker in brokers.items()}
    agents: dict[str, Child] = {}
    for mode, endpoint in endpoints.items():
        agents[mode] = agent = Child("agent", endpoint=endpoint, capacity=max(64, s.job_window))
        stack.callback(agent.stop)
    for agent in agents.values():
        agent.ready()
    return {mode: (endpoints[mode], brokers[mode], agents[mode]) for mode in DURABILITY_MODES}


# ------------------------------------------------------------------ raw pyzmq client side


def _pipelined(
    send: Callable[[], Any], recv: Callable[[], Any], window: int, duration: float, max_count: int
) -> tuple[int, float]:
    """Keep ``window`` requests in flight for ``duration`` s (or ``max_count``); (round trips, s)."""
    t0 = perf_counter()
    end = t0 + duration
    sent = max(1, min(window, max_count))
    for _ in range(sent):
        send()
    done = 0
    while done < sent:
        recv()
        done += 1
        if sent < max_count and perf_counter() < end:
            send()
            sent += 1
    return done, perf_counter() - t0


def _sequential(send: Callable[[], Any], recv: Callable[[], Any], duration: float, samples: int) -> list[int]:
    """Round-trip times (ns), one in flight, for ``duration`` s or ``samples`` samples."""
    out: list[int] = []
    end = perf_counter() + duration
    while len(out) < samples and perf_counter() < end:
        t = perf_counter_ns()
        send()
        recv()
        out.append(perf_counter_ns() - t)
    return out


@contextlib.contextmanager
def _dealer(endpoint: str) -> Iterator[zmq.Socket[Any]]:
    """A DEALER connected to ``endpoint`` on a private context; receives time out."""
    ctx: zmq.Context[Any] = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    try:
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVTIMEO, int(REPLY_TIMEOUT * 1000))
        sock.setsockopt(zmq.SNDTIMEO, int(REPLY_TIMEOUT * 1000))
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
        sock.connect(endpoint)
        yield sock
    except zmq.Again:
        raise RuntimeError(f"no reply from {endpoint} within {REPLY_TIMEOUT:.0f} s") from None
    finally:
        sock.close()
        ctx.term()


def _raw_hello(sock: zmq.Socket[Any], role: Role, hello: dict[str, Any]) -> None:
    """Register a raw pyzmq peer with an OrbitMesh broker (HELLO, wait for WELCOME)."""
    sock.send_multipart([header(Kind.HELLO, aux=role, corr=1), b"", msgpack.packb(hello)])
    while True:
        frames = sock.recv_multipart()
        if frames[0][3] == Kind.WELCOME:
            return
        if frames[0][3] == Kind.ERROR:
            raise RuntimeError(f"broker refused HELLO: {frames[2].decode(errors='replace')}")


def _raw_keepalive(sock: zmq.Socket[Any]) -> None:
    """Between turns: answer the broker's heartbeats waiting on an idle raw client's socket, so
    a long turn of another side never makes the broker drop it."""
    while sock.poll(0):
        frames = sock.recv_multipart()
        if frames[0][3] == Kind.HEARTBEAT:
            sock.send_multipart([header(Kind.HEARTBEAT), b""])
        else:
            raise RuntimeError(f"idle raw client got message kind {frames[0][3]}")


def _raw_reply_receiver(sock: zmq.Socket[Any]) -> Callable[[], None]:
    """Receive one REPLY from the broker; answer its heartbeats on the way."""
    recv, send = sock.recv_multipart, sock.send_multipart
    heartbeat = [header(Kind.HEARTBEAT), b""]

    def recv_reply() -> None:
        while True:
            frames = recv()
            kind = frames[0][3]
            if kind == Kind.REPLY:
                return
            if kind == Kind.HEARTBEAT:
                send(heartbeat)
            else:
                what = frames[-1].decode(errors="replace") if kind == Kind.ERROR else ""
                raise RuntimeError(f"raw client got message kind {kind} instead of a reply {what}".rstrip())

    return recv_reply


def _set_latency(figures: Figures, samples: list[int]) -> None:
    samples.sort()
    figures.latency_samples = len(samples)
    figures.p50_us = percentile_us(samples, 0.50)
    figures.p99_us = percentile_us(samples, 0.99)


# ------------------------------------------------------------------ report


def run_bench(s: Settings) -> Report:
    """Measure the chosen workloads, each next to its baseline, with the same payload and settings.

    Raises ImportError if the broker's core is not built, RuntimeError if a process fails.
    """
    from . import _core, bench_workloads

    _core.load("_dataplane", s.core)  # fail here, with the fix in the message, not in a child
    payload = bytes(i & 0xFF for i in range(s.size))
    chosen = set(s.workloads)
    machine = machine_info()
    om, raw, base = Figures(), Figures(), Figures()
    jobs: list[JobFigures] = []
    broker_core = s.core
    if chosen & {"invoke", "latency", "jobs"}:
        t = s if "latency" in chosen else replace(s, latency_samples=0)
        om, raw, base, broker_core, jobs = measure_invoke(t, payload)
    sections = []
    if chosen & {"stream", "raw"}:
        sections += bench_workloads.measure_stream_raw(s, "stream" in chosen, "raw" in chosen)
    if "fanout" in chosen:
        sections.append(bench_workloads.measure_fanout(s, payload))
    if "scale" in chosen:
        sections.append(bench_workloads.measure_scale(s, payload))
    if "memory" in chosen:
        sections.append(bench_workloads.measure_memory(s))
    machine["load_average_end"] = _loadavg()
    return Report(s, machine, om, raw, base, broker_core, jobs, sections)


def _num(value: float) -> str:
    if value >= 1000:
        return f"{value:,.0f}"
    return f"{value:,.1f}"


def format_report(r: Report) -> str:
    """The report as a readable table."""
    m, s = r.machine, r.settings
    lines = [
        f"orbitmesh bench: broker core {r.broker_core}, client/agent codec core {core_impl()} (live)",
        f"machine: {m['cpus']} CPUs ({m['usable_cpus']} usable), {m['implementation']} {m['python']}, "
        f"pyzmq {m['pyzmq']} / libzmq {m['libzmq']}, {m['loop']}; load average {_load_text(m)}",
        f"tcp 127.0.0.1, {s.size}-byte payloads, {s.duration:g} s per workload after {s.warmup:g} s warm-up"
        + (" (quick)" if s.quick else ""),
        "baseline: raw pyzmq DEALER -> zmq.proxy (ROUTER/DEALER) -> raw pyzmq worker; 3 processes each side",
        f"workloads: {','.join(s.workloads)}",
    ]
    main_rows = r.rows() + [row for sec in r.sections for row in sec.rows]
    if main_rows:
        lines += [""] + _table(("workload", "OrbitMesh", "baseline", "ratio", "target", "absolute", ""), main_rows)
    if r.rows():
        lines += [
            "",
            "CPU: each process's CPU time (all threads, libzmq I/O included) over the pipelined run; a broker",
            "forwards 2 messages per round trip. Per-message CPU falls as the rate rises (fewer wake-ups, more",
            "batching), so compare brokers at similar rates: the raw-peer rows drive the OrbitMesh broker with",
            "raw pyzmq peers (speaking its protocol), as the baseline drives zmq.proxy.",
            f"Latency samples: {r.orbitmesh.latency_samples} invoke, {r.raw.latency_samples} raw peers,"
            f" {r.baseline.latency_samples} baseline.",
        ]
    lines += _section_notes(r)
    if r.jobs:
        where = "the broker's memory" if s.store == "memory" else r.machine.get("tmpdir", "a temporary directory")
        lines += [
            "",
            f"durable execute: {s.store} job store in {where}, 1 client / 1 agent, {s.job_window} jobs in flight,",
            "each counted when its result has arrived. The invoke column is pipelined invoke above (same run):",
            "round trips/s, and CPU ns per round trip.",
            "",
        ]
        lines += _table(("workload", "OrbitMesh", "invoke", "ratio", "target", "absolute", ""), r.job_rows())
        lines += ["", "broker CPU by thread, us / job (control plane / job-log writer / data plane / libzmq + rest):"]
        for j in r.jobs:
            if j.api != "submit_job":
                continue
            t = j.broker_threads_ns_per_job
            parts = [t.get(k, 0.0) / 1000 for k in ("control", "joblog", "dataplane")]
            rest = (t.get("libzmq_other", 0.0) + t.get("other_python", 0.0)) / 1000
            lines.append(
                f"  {j.durability:5}  {parts[0]:6.1f} / {parts[1]:6.1f} / {parts[2]:6.1f} / {rest:6.1f}"
                f"   ({j.jobs:,} jobs in {j.elapsed:.2f} s)"
            )
        lines += [
            "Jobs go out with submit_job (execute's pipelining primitive: done-callbacks, no task per job),",
            "as invoke does with submit. The execute() coroutine rows keep the window with one coroutine per",
            "slot, looping execute() then Job.result() on the sync stack: what that API adds.",
        ]
    return "\n".join(lines)


def _load_text(m: dict[str, Any]) -> str:
    start, end = m.get("load_average") or [], m.get("load_average_end") or []
    if not start:
        return "n/a"
    return f"{start[0]:.1f} at start" + (f", {end[0]:.1f} at end" if end else "") + " (1 min)"


def _section_notes(r: Report) -> list[str]:
    """What the stream / raw / fanout / scale rows compare against."""
    s = r.settings
    names = {sec.name: sec for sec in r.sections}
    out = []
    if "stream" in names:
        out.append(
            f"stream: client.stream over an async-generator handler; baseline: a raw worker behind zmq.proxy sends"
            f" {s.size} B items, paced by the same credit window."
        )
    if "raw" in names:
        out.append(
            "raw: send_raw to a raw handler that acks with an empty reply (one way); baseline: the same through"
            " zmq.proxy to a raw worker."
        )
    if "fanout" in names:
        query = names["fanout"].details["agents_query"]["p50_ms"]
        out.append(
            f"fan-out: execute_on_all over {s.fanout_agents} Agent objects in one process (agents() query, p50"
            f" {query:.2f} ms alone, + N invokes); baseline: N raw requests dealt by zmq.proxy to N raw workers."
        )
    if "scale" in names:
        d = names["scale"].details
        out.append(
            f"scale: {d['agents']:,} raw-pyzmq agents (HELLO, heartbeats) in {d['processes']} processes joined in"
            f" {d['join_seconds']:.2f} s; baseline column: an identical broker with 1 agent, run alongside (idle CPU"
            f" over the same {d['idle_seconds']:g} s, latency in alternating bursts); swarm CPU"
            f" {d['idle_cpu_percent']['swarm']['total']:.1f} % of a core."
        )
    for sec in r.sections:
        out += sec.notes
    return [""] + out if out else []


def _table(header: tuple[str, ...], table: list[Row]) -> list[str]:
    rows: list[tuple[str, ...]] = [
        (
            row.label,
            _num(row.orbitmesh),
            _num(row.baseline) if row.baseline else "-",
            f"{row.ratio:.2f}x" if row.baseline else "-",
            row.target_text(),
            row.absolute_text(),
            {None: "", True: "ok", False: "MISSED"}[row.met],
        )
        for row in table
    ]
    if all(not line[5] for line in rows):  # no absolute targets: no column for them
        header = header[:5] + header[6:]
        rows = [line[:5] + line[6:] for line in rows]
    last = len(header) - 1
    widths = [max(len(line[i]) for line in [header, *rows]) for i in range(len(header))]
    out = []
    for i, line in enumerate([header, *rows]):
        cells = [line[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(line[1:last], widths[1:last], strict=True)]
        out.append("  ".join([*cells, line[last]]).rstrip())
        if i == 0:
            out.append("  ".join("-" * w for w in widths[:last]))
    return out


def main(args: argparse.Namespace) -> int:
    """``orbitmesh bench``: print the report (and write it as JSON); 0 even if a target is missed."""
    try:
        settings = Settings.from_args(args)
    except ValueError as exc:
        print(f"orbitmesh bench: {exc}", file=sys.stderr)
        return 2
    try:
        report = run_bench(settings)
    except (ImportError, RuntimeError) as exc:
        print(f"orbitmesh bench: error: {exc}", file=sys.stderr)
        return 1
    print(format_report(report), flush=True)
    if getattr(args, "json", None):
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(report.to_dict(), fh, indent=2)
            fh.write("\n")
    if getattr(args, "plot", None):
        from .bench_plot import write_png

        try:
            write_png(report.to_dict(), args.plot)
        except ImportError as exc:
            print(f"orbitmesh bench: no plot: {exc}", file=sys.stderr)
            return 1
    return 0


__all__ = ["Figures", "JobFigures", "Report", "Row", "Settings", "format_report", "machine_info", "main", "run_bench"]
