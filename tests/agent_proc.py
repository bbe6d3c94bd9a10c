"""An agent in its own process, for crash tests: ``python -m tests.agent_proc ENDPOINT NAME``.

Run with cwd = the repository root and ``PYTHONPATH=src``. It serves ``echo``,
``slow`` (sleeps 30 s) and ``pid``, prints ``ready <name> <pid>`` once it is
registered, and exits by itself after ``--lifetime`` seconds so that a test
which forgets it never leaves an orphan behind.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from typing import Any

import orbitmesh as om


def build(name: str, endpoint: str, capacity: int) -> om.Agent:
    agent = om.Agent(name, endpoint, capacity=capacity)

    @agent.handler
    async def echo(value: Any = None) -> Any:
        return value

    @agent.handler
    async def slow(seconds: float = 30.0) -> str:
        print(f"started slow {name}", flush=True)
        await asyncio.sleep(seconds)
        return name

    @agent.handler
    async def pid() -> int:
        return os.getpid()

    return agent


async def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="agent_proc")
    parser.add_argument("endpoint")
    parser.add_argument("name")
    parser.add_argument("--capacity", type=int, default=4)
    parser.add_argument("--lifetime", type=float, default=60.0)
    args = parser.parse_args(argv)
    agent = build(args.name, args.endpoint, args.capacity)
    await agent.start(timeout=10.0)
    print(f"ready {args.name} {os.getpid()}", flush=True)
    try:
        await asyncio.sleep(args.lifetime)
    finally:
        await agent.stop(drain_timeout=0.5)


if __name__ == "__main__":
    om.run(main(sys.argv[1:]))
