"""The ``orbitmesh`` command: broker, agent, agents, jobs, demo, bench."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import importlib
import json
import logging
import signal
import sys
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from . import __version__
from .acl import ROLES, Policy
from .agent import Agent
from .broker import Broker
from .client import MeshClient
from .errors import OrbitMeshError
from .models import JobInfo, JobState
from .runtime import run, tune_gc_for_server, tune_gil_for_server
from .security import DEFAULT_POLICY, Keypair, KeyStore, PeerKeys, key_id


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="orbitmesh", description="OrbitMesh broker, agents and tools.")
    p.add_argument("--version", action="version", version=f"orbitmesh {__version__}")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    sub = p.add_subparsers(dest="cmd", required=True)

    b = sub.add_parser("broker", help="run a broker")
    b.add_argument("endpoints", nargs="*", default=["tcp://127.0.0.1:5555"], help="endpoints to bind")
    b.add_argument("--heartbeat", type=float, default=1.0, help="heartbeat interval in seconds")
    b.add_argument("--liveness", type=int, default=5, help="missed heartbeats before a peer is lost")
    b.add_argument("--queue-limit", type=int, default=10_000)
    b.add_argument(
        "--max-live-jobs", type=int, default=1_000_000, help="unfinished jobs held at once; beyond, QUEUE_FULL"
    )
    b.add_argument("--queue-timeout", type=float, default=30.0)
    b.add_argument(
        "--store",
        default="lmdb://orbitmesh-data",
        help="job store URL: lmdb://DIR (default ./orbitmesh-data), sqlite://FILE, redis://..., memory://",
    )
    b.add_argument("--durability", choices=["sync", "batch", "none"], default="sync")
    b.add_argument("--keys", metavar="DIR", help="CURVE: the broker's keypair and the peers' key store")
    b.add_argument("--allow-plaintext", action="store_true", help="permit a non-loopback endpoint without --keys")
    b.add_argument("--client-max-inflight", type=int, default=0, help="per-client requests in flight (0: no limit)")
    b.add_argument("--client-rate", type=float, default=0.0, help="per-client requests/s (0: no limit)")
    b.add_argument("--client-burst", type=int, default=0, help="per-client burst above the rate (0: the rate)")
    b.add_argument(
        "--handshake-timeout", type=float, default=5.0, help="seconds a connection may take to finish its handshake"
    )
    b.add_argument("--max-frame-bytes", type=int, default=64 * 1024 * 1024, help="largest frame accepted")

    a = sub.add_parser("agent", help="run an agent serving handlers")
    a.add_argument("--broker", default="tcp://127.0.0.1:5555")
    a.add_argument("--name", required=True)
    a.add_argument(
        "--handlers",
        action="append",
        default=[],
        metavar="MODULE:OBJ",
        help="a function, or an object with @command methods, or a module-level list of them",
    )
    a.add_argument("--capability", action="append", default=[])
    a.add_argument("--group", action="append", default=[])
    a.add_argument("--label", action="append", default=[], metavar="KEY=VALUE")
    a.add_argument("--capacity", type=int, default=64)
    _key_options(a)

    q = sub.add_parser("agents", help="list the agents registered with a broker")
    q.add_argument("--broker", default="tcp://127.0.0.1:5555")
    q.add_argument("--capability")
    q.add_argument("--group")
    q.add_argument("--json", action="store_true")
    q.add_argument("--timeout", type=float, default=5.0)
    _key_options(q)

    j = sub.add_parser("jobs", help="list, show, cancel or wait for tracked jobs")
    j.add_argument("action", choices=["list", "show", "cancel", "wait"])
    j.add_argument("job_id", nargs="?", type=int, help="the job (show, cancel, wait)")
    j.add_argument("--broker", default="tcp://127.0.0.1:5555")
    j.add_argument("--state", choices=[s.value for s in JobState])
    j.add_argument("--agent")
    j.add_argument("--command")
    j.add_argument("--limit", type=int, default=50)
    j.add_argument("--cursor", type=int, help="list jobs older than this id")
    j.add_argument("--timeout", type=float, default=30.0, help="seconds (wait; and every query)")
    j.add_argument("--json", action="store_true")
    _key_options(j)

    k = sub.add_parser(
        "keys", help="CURVE keys: generate a keypair; list, accept, reject, revoke peers' keys; set a key's policy"
    )
    k.add_argument("action", choices=["generate", "list", "accept", "reject", "revoke", "policy"])
    k.add_argument("name", nargs="?", help="generate: the file name; the others: key id (a unique prefix) or Z85 key")
    k.add_argument("--keys", metavar="DIR", default="orbitmesh-keys", help="the broker's keys directory")
    k.add_argument("--out", metavar="DIR", default=".", help="generate: where to write NAME.key / NAME.key_secret")
    k.add_argument("--role", choices=list(ROLES), default="agent", help="accept / policy: the key's role")
    k.add_argument(
        "--commands", metavar="GLOB,...", default="", help="accept / policy: commands the key may request (any)"
    )
    k.add_argument(
        "--agents",
        metavar="SEL,...",
        default="",
        help="accept / policy: agents in reach: NAME-GLOB, group=G, capability=C, label.K=GLOB (any)",
    )
    k.add_argument("--may-request", action="store_true", help="accept / policy: an agent key may also send requests")

    d = sub.add_parser("demo", help="embedded broker, three agents and a client, with a summary")
    d.add_argument("--tcp", action="store_true", help="use tcp on 127.0.0.1 instead of inproc")
    d.add_argument("--requests", type=int, default=2000)

    bench = sub.add_parser("bench", help="throughput and latency against a raw pyzmq baseline")
    bench.add_argument("--quick", action="store_true", help="short runs (for smoke tests)")
    bench.add_argument("--duration", type=float, default=3.0, help="seconds per workload")
    bench.add_argument("--window", type=int, default=1000, help="requests in flight when pipelining")
    bench.add_argument("--size", type=int, default=64, help="payload bytes")
    bench.add_argument("--core", choices=["c", "py"], default=None)
    bench.add_argument("--job-window", type=int, default=1000, help="durable execute jobs in flight")
    bench.add_argument(
        "--store", choices=["lmdb", "sqlite", "memory"], default="lmdb", help="job store for the execute runs"
    )
    bench.add_argument(
        "--workloads",
        metavar="LIST",
        help="comma-separated: invoke,latency,jobs,stream,raw,fanout,scale,memory (default: all)",
    )
    bench.add_argument("--agents", type=int, default=None, help="scale: agents connected (default 5000, quick 500)")
    bench.add_argument("--fanout-agents", type=int, default=100, help="fanout: agents answering execute_on_all")
    bench.add_argument("--raw-sizes", metavar="LIST", help="raw: payload sizes (default 1k,64k,1m)")
    bench.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    bench.add_argument("--plot", metavar="FILE", help="also draw ratio vs target per workload as PNG (matplotlib)")
    return p


@contextlib.asynccontextmanager
async def _connect(args: argparse.Namespace) -> AsyncIterator[MeshClient]:
    """A client for the query commands; connecting is bounded by ``--timeout`` too."""
    client = MeshClient(args.broker, timeout=args.timeout, keys=_peer_keys(args))
    await client.connect(args.timeout)
    try:
        yield client
    finally:
        await client.close()


def _key_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--key", metavar="FILE", help="CURVE: this peer's NAME.key_secret")
    parser.add_argument("--server-key", metavar="FILE", help="CURVE: the broker's broker.key")


def _peer_keys(args: argparse.Namespace) -> PeerKeys | None:
    if not args.key and not args.server_key:
        return None
    if not (args.key and args.server_key):
        raise SystemExit("--key and --server-key go together")
    return PeerKeys(Keypair.load(args.key), Keypair.load(args.server_key).public)


def _keys(args: argparse.Namespace) -> int:
    if args.action == "generate":
        if not args.name:
            raise SystemExit("orbitmesh keys generate needs a NAME")
        keys = Keypair.generate()
        public_file, secret_file = keys.save(args.out, args.name)
        print(f"{key_id(keys.public)}  {keys.public.decode()}\nwrote {public_file} and {secret_file}")
        return 0
    store = KeyStore(Path(args.keys) / "peers")
    if args.action == "list":
        snap = store.snapshot()
        for state, rows in store.list().items():
            for kid, public, note in rows:
                shown = f"  [{snap.policies.get(kid, DEFAULT_POLICY).describe()}]" if state == "accepted" else ""
                print(f"{state:9} {kid[:16]}  {public}  {note}{shown}")
        return 0
    if not args.name:
        raise SystemExit(f"orbitmesh keys {args.action} needs a key id (a unique prefix will do)")
    if args.action in ("accept", "policy"):
        try:
            policy = Policy(
                args.role,
                tuple(c for c in args.commands.split(",") if c),
                tuple(a for a in args.agents.split(",") if a),
                args.may_request,
            )
        except ValueError as exc:
            raise SystemExit(f"orbitmesh keys {args.action}: {exc}") from None
        if args.action == "accept":
            store.accept(args.name, policy)
            print(f"accepted {args.name} [{policy.describe()}]")
        else:
            store.set_policy(args.name, policy)
            print(f"policy of {args.name} is now [{policy.describe()}]")
        return 0
    getattr(store, args.action)(args.name)
    print(f"{args.action}ed {args.name}")
    return 0


def _load_handlers(agent: Agent, specs: Sequence[str]) -> None:
    for spec in specs:
        module_name, _, attr = spec.partition(":")
        if not module_name or not attr:
            raise SystemExit(f"--handlers wants MODULE:OBJ, got {spec!r}")
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
        for item in obj if isinstance(obj, (list, tuple)) else [obj]:
            agent.register(item)


async def _serve(coro_start: Any, stop: Any) -> None:
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, done.set)
    await coro_start()
    try:
        await done.wait()
    finally:
        await stop()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    args = _parser().parse_args(argv)
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.cmd == "broker":
            broker = Broker(
                *args.endpoints,
                heartbeat_interval=args.heartbeat,
                liveness=args.liveness,
                queue_limit=args.queue_limit,
                max_live_jobs=args.max_live_jobs,
                queue_timeout=args.queue_timeout,
                store=args.store,
                durability=args.durability,
                keys_dir=args.keys,
                allow_plaintext=args.allow_plaintext,
                client_max_inflight=args.client_max_inflight,
                client_rate=args.client_rate,
                client_burst=args.client_burst,
                handshake_timeout=args.handshake_timeout,
                max_frame_bytes=args.max_frame_bytes,
            )

            async def start_broker() -> None:
                await broker.start()
                tune_gc_for_server()
                tune_gil_for_server()
                print(f"orbitmesh broker {broker.id} ({broker.core} core) on {', '.join(broker.endpoints)}", flush=True)

            run(_serve(start_broker, broker.stop))
        elif args.cmd == "agent":
            labels = dict(kv.split("=", 1) for kv in args.label)
            agent = Agent(
                args.name,
                args.broker,
                capabilities=args.capability,
                groups=args.group,
                labels=labels,
                capacity=args.capacity,
                keys=_peer_keys(args),
            )
            _load_handlers(agent, args.handlers)

            async def start_agent() -> None:
                await agent.start(timeout=30.0, name_wait=30.0)
                print(f"orbitmesh agent {agent.name} serving {', '.join(agent.commands) or 'nothing'}", flush=True)

            run(_serve(start_agent, agent.stop))
        elif args.cmd == "agents":
            return run(_agents(args))
        elif args.cmd == "jobs":
            return run(_jobs(args))
        elif args.cmd == "keys":
            return _keys(args)
        elif args.cmd == "demo":
            from .demo import run_demo

            run(run_demo(sys.stdout, tcp=args.tcp, requests=args.requests))
        elif args.cmd == "bench":
            from .bench import main as bench_main

            return bench_main(args)
    except OrbitMeshError as exc:
        print(f"orbitmesh: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


def _job_row(info: JobInfo) -> str:
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.created))
    error = f"  [{info.error_code}] {info.error}" if info.error_code else ""
    agent, tries = info.agent or "-", f"{info.attempts}/{info.max_attempts}"
    return f"{info.id:>8} {info.state.value:10} {info.command:20} {agent:16} {when} {tries}{error}"


def _job_json(info: JobInfo) -> dict[str, Any]:
    d = dataclasses.asdict(info)
    d["state"] = info.state.value
    d["result"] = info.result.hex() if isinstance(info.result, bytes) else info.result
    return d


async def _jobs(args: argparse.Namespace) -> int:
    if args.action != "list" and args.job_id is None:
        raise SystemExit(f"orbitmesh jobs {args.action} needs a job id")
    async with _connect(args) as client:
        if args.action == "list":
            rows = await client.list_jobs(
                state=args.state, agent=args.agent, command=args.command, limit=args.limit, cursor=args.cursor
            )
            if args.json:
                print(json.dumps([_job_json(r) for r in rows], indent=2))
            else:
                print(f"{'ID':>8} {'STATE':10} {'COMMAND':20} {'AGENT':16} {'CREATED':19} TRIES")
                for r in rows:
                    print(_job_row(r))
            return 0
        if args.action == "show":
            info = await client.get_job(args.job_id)
        elif args.action == "cancel":
            info = await client.cancel(args.job_id)
        else:
            info = await client.wait(args.job_id, timeout=args.timeout)
    if args.json:
        print(json.dumps(_job_json(info), indent=2))
    else:
        print(_job_row(info))
        for state, at, note in info.transitions:
            stamp = time.strftime("%H:%M:%S", time.localtime(at))
            print(f"    {stamp}.{int(at % 1 * 1000):03d} {state} {note}")
    return 0 if args.action != "wait" or info.state == JobState.SUCCEEDED else 1


async def _agents(args: argparse.Namespace) -> int:
    async with _connect(args) as client:
        rows = await client.agents(capability=args.capability, group=args.group)
    if args.json:
        print(json.dumps([r.to_dict() for r in rows], indent=2))
        return 0
    if not rows:
        print("no agents")
        return 0
    print(f"{'NAME':20} {'STATE':9} {'LOAD':>9} CAPABILITIES / GROUPS / LABELS")
    for r in rows:
        labels = ",".join(f"{k}={v}" for k, v in r.labels.items())
        print(
            f"{r.name:20} {r.state:9} {r.inflight:>4}/{r.capacity:<4} "
            f"{','.join(r.capabilities) or '-'} / {','.join(r.groups) or '-'} / {labels or '-'}"
        )
    return 0
