"""Processes for the hostile-peer soak test (tests/test_hostile.py). Run them with the environment
of ``tests.conftest.subprocess_env()``; each exits by itself after ``--lifetime`` seconds, so a
test that forgets one leaves no orphan.

``python tests/hostile_proc.py broker KEYS_DIR --max-frame-bytes N [--core c|py]``

A CURVE broker on tcp://127.0.0.1 (a free port) with its keys in KEYS_DIR and an in-memory job
store; it prints ``ready <endpoint> <pid>`` once listening and stops cleanly (exit 0) on SIGTERM.

``python tests/hostile_proc.py agent ENDPOINT NAME KEY_FILE SERVER_KEY_FILE``

An agent with CURVE keys serving ``echo(value)``; it prints ``ready <name> <pid>`` once registered.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from typing import Any

import orbitmesh as om
from orbitmesh.security import Keypair, PeerKeys


async def run_broker(args: argparse.Namespace) -> None:
    broker = om.Broker(
        "tcp://127.0.0.1:0",
        keys_dir=args.keys_dir,
        max_frame_bytes=args.max_frame_bytes,
        heartbeat_interval=args.heartbeat,
        liveness=args.liveness,
        core=args.core,
        store="memory://",
    )
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await broker.start()
    try:
        print(f"ready {broker.endpoints[0]} {os.getpid()}", flush=True)
        try:
            await asyncio.wait_for(stop.wait(), args.lifetime)
        except TimeoutError:
            pass
    finally:
        await broker.stop()
    print("stopped", flush=True)


async def run_agent(args: argparse.Namespace) -> None:
    keys = PeerKeys(Keypair.load(args.key_file), Keypair.load(args.server_key_file).public)
    agent = om.Agent(args.name, args.endpoint, keys=keys, capacity=args.capacity)

    @agent.handler
    async def echo(value: Any = None) -> Any:
        return value

    await agent.start(timeout=10.0)
    print(f"ready {args.name} {os.getpid()}", flush=True)
    try:
        await asyncio.sleep(args.lifetime)
    finally:
        await agent.stop(drain_timeout=0.5)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="hostile_proc")
    sub = parser.add_subparsers(dest="what", required=True)
    b = sub.add_parser("broker")
    b.add_argument("keys_dir")
    b.add_argument("--max-frame-bytes", type=int, default=1 << 20)
    b.add_argument("--heartbeat", type=float, default=0.5)
    b.add_argument("--liveness", type=int, default=6)
    b.add_argument("--core", choices=["c", "py"], default=None)
    b.add_argument("--lifetime", type=float, default=300.0)
    a = sub.add_parser("agent")
    a.add_argument("endpoint")
    a.add_argument("name")
    a.add_argument("key_file")
    a.add_argument("server_key_file")
    a.add_argument("--capacity", type=int, default=16)
    a.add_argument("--lifetime", type=float, default=300.0)
    args = parser.parse_args(argv)
    om.run(run_broker(args) if args.what == "broker" else run_agent(args))


if __name__ == "__main__":
    main(sys.argv[1:])
