"""``orbitmesh demo``: an embedded broker, three agents and a client in one process.

It shows invoke, execute, stream, raw bytes and execute-on-all over inproc (or
tcp with ``--tcp``), and prints a readable summary with timings.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, TextIO

from .agent import Agent
from .broker import Broker
from .client import MeshClient, Select
from .errors import RemoteError


@dataclass
class Stats:
    """What the demo's ``stats`` handler returns (and the client asks for by type)."""

    agent: str
    served: int
    inflight: int


def _make_agent(name: str, endpoint: str, index: int, ctx: Any) -> Agent:
    agent = Agent(
        name,
        endpoint,
        capabilities=["compute"] + (["gpu"] if index == 0 else []),
        groups=["demo"],
        labels={"zone": "eu" if index < 2 else "us", "index": str(index)},
        capacity=16,
        context=ctx,
    )

    @agent.handler
    async def square(x: int) -> int:
        return x * x

    @agent.handler
    def checksum(data: bytes) -> int:  # sync: runs on the agent's thread pool
        return sum(data) % 65521

    @agent.handler
    async def stats() -> Stats:
        return Stats(name, agent.served, agent.inflight)

    @agent.handler
    async def count(n: int, delay: float = 0.0) -> AsyncIterator[int]:
        for i in range(n):
            if delay:
                await asyncio.sleep(delay)
            yield i

    @agent.handler
    async def fail() -> None:
        raise ValueError(f"{name} refuses")

    @agent.raw_handler
    def reverse(frames: list[bytes]) -> bytes:
        return b"".join(bytes(f) for f in frames)[::-1]

    return agent


async def run_demo(out: TextIO, *, tcp: bool = False, requests: int = 2000) -> dict[str, Any]:
    """Run the demo, write the summary to ``out``, and return the figures it printed."""
    import zmq

    ctx = zmq.Context()
    endpoint = "tcp://127.0.0.1:0" if tcp else f"inproc://orbitmesh-demo-{id(ctx)}"
    summary: dict[str, Any] = {}

    def say(line: str) -> None:
        out.write(line + "\n")
        out.flush()

    broker = Broker(endpoint, context=ctx)
    await broker.start()
    agents = [_make_agent(f"agent-{i}", broker.endpoints[0], i, ctx) for i in range(3)]
    try:
        for a in agents:
            await a.start()
        async with MeshClient(broker.endpoints[0], context=ctx, timeout=10.0) as client:
            say(f"OrbitMesh demo — broker on {broker.endpoints[0]} ({broker.core} core)")
            found = await client.agents()
            names = ", ".join(f"{a.name} [zone {a.labels.get('zone')}]" for a in found)
            say(f"agents: {names}")

            t = time.perf_counter()
            value = await client.invoke("agent-0", "square", {"x": 12})
            say(f"invoke   square(12) on agent-0            -> {value}   ({(time.perf_counter() - t) * 1e3:.2f} ms)")
            summary["invoke"] = value

            st = await client.invoke(Select(capability="gpu"), "stats", returns=Stats)
            say(f"invoke   stats on the gpu agent (typed)     -> {st}")

            job = await client.execute(Select(group="demo"), "checksum", {"data": bytes(range(256)) * 4})
            result = await job.result(timeout=10)
            info = await job.info()
            say(f"execute  checksum as job {job.id:<6}             -> {result} ({info.state.value} on {info.agent})")
            summary["execute"] = result

            items = [i async for i in client.stream("agent-1", "count", {"n": 5, "delay": 0.01}, window=2)]
            say(f"stream   count(5) from agent-1, window 2    -> {items}")
            summary["stream"] = items

            payload = memoryview(b"OrbitMesh raw bytes")
            raw = await client.send_raw("agent-2", payload)
            say(f"raw      {payload.nbytes} bytes to agent-2, reversed      -> {raw.decode()}")
            summary["raw"] = raw

            outcomes = await client.execute_on_all("square", {"x": 7}, group="demo")
            say(
                "all      square(7) on every demo agent      -> "
                + ", ".join(f"{n}={o.value}" for n, o in sorted(outcomes.items()))
            )
            summary["all"] = {n: o.value for n, o in outcomes.items()}

            try:
                await client.invoke(Select(labels={"zone": "us"}), "fail")
            except RemoteError as exc:
                say(f"error    fail on a us agent                 -> {exc.remote_type}: {exc.message}")
                summary["error"] = exc.code.name

            t = time.perf_counter()
            window: list[asyncio.Future[Any]] = []
            for i in range(requests):
                window.append(client.submit(Select(), "square", {"x": i}))
                if len(window) >= 256:
                    for f in window:
                        await f
                    window.clear()
            for f in window:
                await f
            took = time.perf_counter() - t
            say(f"load     {requests} pipelined invokes over 3 agents: {requests / took:,.0f} calls/s")
            summary["rate"] = requests / took
    finally:
        for a in agents:
            await a.stop(drain_timeout=2.0)
        await broker.stop()
        ctx.term()
    say("done.")
    return summary
