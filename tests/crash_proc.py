"""Helper processes for the crash tests (tests/test_crash.py). Run them with the environment of
``tests.conftest.subprocess_env()`` so they import the same orbitmesh as the test run; each
exits by itself after ``--lifetime`` seconds, so a test that forgets one leaves no orphan.

``python tests/crash_proc.py agent ENDPOINT NAME --effects FILE [--capability C] [--capacity N]``

An agent in its own process; it prints ``ready <name> <pid>`` once registered and serves

* ``effect(key)``: appends ``"<key>\\n"`` to the effects file (one ``write`` on an ``O_APPEND``
  descriptor, so lines from several agents never interleave) and returns ``key``. The file is
  the record of every time an effect was applied.
* ``slow_effect(key, seconds)``: appends ``"<key>\\n"`` as ``effect`` does, then sleeps.
* ``sleep(seconds)``: appends ``"sleep <name>\\n"``, sleeps, then returns the agent's name.

``python tests/crash_proc.py broker ENDPOINT --store DIR --hold-key KEY``

A broker on an LMDB job log whose write of the job with idempotency key ``KEY`` never
finishes (the writer thread blocks in the store): a job log that is slow to commit, made as
slow as needed. It prints ``ready <endpoint>`` once listening.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time

import orbitmesh as om


def build_agent(args: argparse.Namespace) -> tuple[om.Agent, int]:
    agent = om.Agent(args.name, args.endpoint, capabilities=args.capability, capacity=args.capacity)
    fd = os.open(args.effects, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    @agent.handler(inline=True)
    def effect(key: str) -> str:
        os.write(fd, f"{key}\n".encode())
        return key

    @agent.handler
    async def slow_effect(key: str, seconds: float) -> str:
        os.write(fd, f"{key}\n".encode())
        await asyncio.sleep(seconds)
        return key

    @agent.handler
    async def sleep(seconds: float) -> str:
        os.write(fd, f"sleep {args.name}\n".encode())
        await asyncio.sleep(seconds)
        return args.name

    return agent, fd


async def run_agent(args: argparse.Namespace) -> None:
    agent, fd = build_agent(args)
    try:
        await agent.start(timeout=30.0, name_wait=30.0)
        print(f"ready {args.name} {os.getpid()}", flush=True)
        try:
            await asyncio.sleep(args.lifetime)
        finally:
            await agent.stop(drain_timeout=0.5)
    finally:
        os.close(fd)


async def run_broker(args: argparse.Namespace) -> None:
    from orbitmesh.storage import LmdbStore

    class HeldStore(LmdbStore):
        """The job log's writer calls ``write_prepared`` with ``prepare`` output."""

        def write_prepared(self, items, delete=()):  # type: ignore[no-untyped-def]
            if any(key == args.hold_key for _, _, _, _, _, key, _, _ in items):
                time.sleep(args.lifetime)  # never returns while the test runs
            super().write_prepared(items, delete)

    store = HeldStore(args.store, "sync")
    broker = om.Broker(args.endpoint, store=store, heartbeat_interval=args.heartbeat, liveness=args.liveness)
    await broker.start()
    print(f"ready {broker.endpoints[0]}", flush=True)
    try:
        await asyncio.sleep(args.lifetime)
    finally:
        await broker.stop()


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="crash_proc")
    sub = parser.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("agent")
    a.add_argument("endpoint")
    a.add_argument("name")
    a.add_argument("--effects", required=True, help="file to append one line per applied effect to")
    a.add_argument("--capability", action="append", default=[])
    a.add_argument("--capacity", type=int, default=64)
    a.add_argument("--lifetime", type=float, default=300.0)
    b = sub.add_parser("broker")
    b.add_argument("endpoint")
    b.add_argument("--store", required=True, help="LMDB directory")
    b.add_argument("--hold-key", required=True, help="writes of the job with this idempotency key never finish")
    b.add_argument("--heartbeat", type=float, default=0.2)
    b.add_argument("--liveness", type=int, default=4)
    b.add_argument("--lifetime", type=float, default=60.0)
    args = parser.parse_args(argv)
    om.run(run_agent(args) if args.cmd == "agent" else run_broker(args))


if __name__ == "__main__":
    main(sys.argv[1:])
