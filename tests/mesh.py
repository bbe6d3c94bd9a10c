"""A small embedded mesh for the integration tests: one broker, some agents, one client."""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import AsyncIterator, Callable
from typing import Any

import zmq

import orbitmesh as om
from orbitmesh import _core

FAST = {"heartbeat_interval": 0.1, "liveness": 4}

# The header layout, independent of the codec under test (docs/protocol.md).
HDR = struct.Struct("<2sBBHHIIQQQ")


def hdr(
    kind: int,
    *,
    flags: int = 0,
    code: int = 0,
    aux: int = 0,
    reserved: int = 0,
    corr: int = 0,
    job: int = 0,
    deadline: int = 0,
    magic: bytes = b"OM",
    version: int = 1,
) -> bytes:
    """A header built by hand, so that every field can be wrong on purpose."""
    return HDR.pack(magic, version, kind, flags, code, aux, reserved, corr, job, deadline)


def expected_refusal(frames: list[bytes], max_frame: int) -> tuple[int, int, bool]:
    """The ERROR a peer that never said HELLO must get for ``frames`` from a broker whose
    max_frame_bytes is ``max_frame``: (code, corr, counted as malformed). Written from
    docs/protocol.md, apart from the codec under test."""
    h = frames[0]
    if h[:2] == b"OM" and h[2:3] == b"\x02":  # packed framing (protocol 2)
        if len(h) < 40:
            return om.ErrorCode.BAD_HEADER, 0, True
        corr = struct.unpack_from("<Q", h, 16)[0]
        if h[13:16] != b"\0\0\0":
            return om.ErrorCode.BAD_HEADER_FIELD, corr, True
        parts, at = [], 40
        for _ in range(h[12] if h[12] <= 62 else 0):
            size = struct.unpack_from("<I", h, at)[0] if at + 4 <= len(h) else len(h)
            parts.append(h[at + 4 : at + 4 + size])
            at += 4 + size
        if h[12] > 62 or at != len(h):
            return om.ErrorCode.BAD_FRAMES, corr, True
        frames = [h[:2] + b"\x01" + h[3:12] + b"\0" + h[13:40], *parts, *frames[1:]]
        h = frames[0]
    if len(h) != 40:
        return om.ErrorCode.BAD_HEADER, 0, True
    corr = struct.unpack_from("<Q", h, 16)[0]
    if h[:2] != b"OM":
        return om.ErrorCode.BAD_MAGIC, corr, True
    if h[2] != 1:
        return om.ErrorCode.UNSUPPORTED_VERSION, corr, True
    if not 1 <= h[3] <= 16:
        return om.ErrorCode.UNKNOWN_KIND, corr, True
    if h[12:16] != b"\0\0\0\0":
        return om.ErrorCode.BAD_HEADER_FIELD, corr, True
    if len(frames) + 1 > 64:  # the routing-id frame counts
        return om.ErrorCode.BAD_FRAMES, corr, True
    if any(len(f) > max_frame for f in frames):
        return om.ErrorCode.FRAME_TOO_LARGE, corr, True
    if h[3] == 1:  # HELLO
        return om.ErrorCode.BAD_HELLO, corr, False
    return om.ErrorCode.NOT_REGISTERED, corr, False


def standard_handlers(agent: om.Agent) -> None:
    """Handlers most tests use: echo, add, sleep, boom, count, reverse (raw)."""

    @agent.handler
    async def echo(value: Any = None) -> Any:
        return value

    @agent.handler
    def add(a: int, b: int) -> int:
        return a + b

    @agent.handler
    async def whoami() -> str:
        return agent.name

    @agent.handler
    async def sleep(seconds: float) -> str:
        await asyncio.sleep(seconds)
        return agent.name

    @agent.handler
    async def boom(message: str = "boom") -> None:
        raise ValueError(message)

    @agent.handler
    async def count(n: int) -> AsyncIterator[int]:
        for i in range(n):
            yield i

    @agent.raw_handler
    def reverse(frames: list[bytes]) -> bytes:
        return b"".join(bytes(f) for f in frames)[::-1]


def use_calls_twin(client: om.MeshClient, core: str) -> None:
    """Give a client not yet connected the call table of ``core`` ("c" or "py"): the compiled
    core of clients and agents follows the broker's in these tests, so both twins serve every
    mesh test."""
    table = _core.load("_calls", core).CallTable()
    client._calls = table
    client._pending = table.pending


@contextlib.asynccontextmanager
async def mesh(
    ctx: zmq.Context[Any],
    core: str,
    endpoint: str,
    agents: int | list[dict[str, Any]] = 1,
    *,
    setup: Callable[[om.Agent], None] = standard_handlers,
    broker_kw: dict[str, Any] | None = None,
    client_kw: dict[str, Any] | None = None,
) -> AsyncIterator[tuple[om.Broker, list[om.Agent], om.MeshClient]]:
    """Start a broker on ``endpoint``, the agents (a count, or one kwargs dict each) and a client."""
    broker = om.Broker(endpoint, core=core, context=ctx, **{**FAST, **(broker_kw or {})})
    await broker.start()
    specs = [{} for _ in range(agents)] if isinstance(agents, int) else agents
    started: list[om.Agent] = []
    client = om.MeshClient(broker.endpoints[0], context=ctx, timeout=10.0, **(client_kw or {}))
    use_calls_twin(client, core)
    try:
        for i, spec in enumerate(specs):
            spec = dict(spec)
            name = spec.pop("name", f"agent-{i}")
            agent = om.Agent(name, broker.endpoints[0], context=ctx, **spec)
            agent._serve = _core.load("_serve", core).Dispatcher(agent, agent._serializers)  # as the client's
            setup(agent)
            await agent.start()
            started.append(agent)
        await client.connect()
        yield broker, started, client
    finally:
        await client.close()
        for agent in started:
            await agent.stop(drain_timeout=1.0)
        await broker.stop()
