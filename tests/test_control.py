"""The control plane and the API around calls: names, events, middleware, serializers,
the blocking client and handler classes. Real sockets, both cores, both loops."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import msgpack
import numpy as np
import pytest
import zmq

import orbitmesh as om
from orbitmesh import ErrorCode
from orbitmesh._wire import header
from orbitmesh.middleware import Call
from orbitmesh.protocol import Kind
from orbitmesh.runtime import new_event_loop, tune_gil_for_server

from .conftest import endpoint_for
from .mesh import FAST, mesh


async def next_event(events: Any, types: set[str], timeout: float) -> om.Event:
    """The next event of one of ``types`` (others are skipped)."""
    end = asyncio.get_running_loop().time() + timeout
    while True:
        ev: om.Event = await events.get(max(0.001, end - asyncio.get_running_loop().time()))
        if ev.type in types:
            return ev


def no_handlers(agent: om.Agent) -> None:
    pass


def whoami_handler(marker: str) -> Callable[[om.Agent], None]:
    def setup(agent: om.Agent) -> None:
        @agent.handler
        async def whoami() -> str:
            return marker

    return setup


# ------------------------------------------------------------------ names


def test_live_name_is_refused_until_released(arun, ctx, core_impl):
    async def main():
        async with mesh(ctx, core_impl, endpoint_for("tcp"), 0, setup=no_handlers) as (broker, _, client):
            ep = broker.endpoints[0]
            events = await client.subscribe(["agent"])
            first = om.Agent("dup", ep, context=ctx)
            whoami_handler("first")(first)
            await first.start()
            try:
                # When a second agent asks for a live name, Expect NAME_TAKEN at once
                second = om.Agent("dup", ep, context=ctx)
                whoami_handler("second")(second)
                t = asyncio.get_running_loop().time()
                with pytest.raises(om.RoutingError) as info:
                    await second.start(timeout=5.0)
                assert info.value.code == ErrorCode.NAME_TAKEN
                assert asyncio.get_running_loop().time() - t < 1.0
                assert not second.connected
                # Expect the first one to keep the name and keep serving
                assert await client.invoke("dup", "whoami") == "first"
                assert [a.name for a in await client.agents()] == ["dup"]
            finally:
                await first.stop()
            # When the first agent leaves, Expect the name to be free again
            ev = await next_event(events, {"agent_left", "agent_lost"}, 2.0)
            assert (ev.type, ev.data["name"]) == ("agent_left", "dup")
            third = om.Agent("dup", ep, context=ctx)
            whoami_handler("third")(third)
            await third.start(timeout=5.0)
            try:
                assert await client.invoke("dup", "whoami") == "third"
            finally:
                await third.stop()
            await events.aclose()

    arun(main())


def test_the_same_agent_on_a_fresh_connection_replaces_its_old_session(arun, ctx, core_impl):
    """A HELLO that is slow to be answered makes an agent reconnect on a fresh socket while its
    first HELLO may still register: the agent's own new session must replace that one, not be
    refused NAME_TAKEN until liveness expires it (jobs sent to it meanwhile were lost)."""
    from orbitmesh._wire import HDR, header
    from orbitmesh.protocol import Kind, Role

    async def main():
        async with mesh(ctx, core_impl, endpoint_for("tcp"), 0, setup=no_handlers) as (broker, _, client):
            events = await client.subscribe(["agent"])
            loop = asyncio.get_running_loop()
            socks = []

            def hello(instance: str, sock: zmq.Socket[Any] | None = None, name: str = "twin") -> tuple[Any, int, int]:
                if sock is None:
                    sock = ctx.socket(zmq.DEALER)
                    sock.setsockopt(zmq.LINGER, 0)
                    sock.setsockopt(zmq.RCVTIMEO, 3000)
                    sock.connect(broker.endpoints[0])
                    socks.append(sock)
                body = {"role": "agent", "name": name, "commands": ["x"], "instance": instance}
                sock.send_multipart([header(Kind.HELLO, aux=Role.AGENT, corr=1), b"", msgpack.packb(body)])
                fields = HDR.unpack(sock.recv_multipart()[0])
                return sock, fields[2], fields[4]

            def sessions() -> dict[str, int]:
                """The session by name the job path reads: always what the registry says."""
                held = {name: agent.info.session for name, agent in broker._by_name.items()}
                assert broker._session_of == held
                assert broker._capacity_of == {name: agent.info.capacity for name, agent in broker._by_name.items()}
                return held

            try:
                _, kind, _ = await loop.run_in_executor(None, hello, "instance-a")
                assert kind == Kind.WELCOME
                first_session = (await client.agents())[0].session
                assert sessions() == {"twin": first_session}
                # When the same instance says HELLO on a new connection, Expect it in at once
                sock, kind, _ = await loop.run_in_executor(None, hello, "instance-a")
                assert kind == Kind.WELCOME
                [agent] = await client.agents()
                assert agent.session > first_session
                assert sessions() == {"twin": agent.session}
                # The same connection registering under a new name gives up the old one
                _, kind, _ = await loop.run_in_executor(None, hello, "instance-a", sock, "renamed")
                assert kind == Kind.WELCOME
                assert sessions() == {"renamed": agent.session + 1}
                await loop.run_in_executor(None, hello, "instance-a", sock, "twin")
                ev = await next_event(events, {"agent_left"}, 2.0)
                assert ev.data["reason"] == "replaced by a new connection"
                # Another agent (another instance, or none) still gets NAME_TAKEN
                for other in ("instance-b", ""):
                    _, kind, code = await loop.run_in_executor(None, hello, other)
                    assert (kind, code) == (Kind.ERROR, ErrorCode.NAME_TAKEN)
            finally:
                for sock in socks:
                    sock.close(0)
                await events.aclose()

    arun(main())


# ----------------------------------------------------------------- events


@pytest.mark.parametrize("transport", ["inproc", "tcp"])
def test_agent_events(arun, ctx, core_impl, transport):
    async def main():
        async with mesh(ctx, core_impl, endpoint_for(transport), 0, setup=no_handlers) as (broker, _, client):
            events = await client.subscribe(["agent"])
            jobs = await client.subscribe(["job"])
            # When an agent joins, Expect agent_joined with what it registered
            agent = om.Agent("watched", broker.endpoints[0], context=ctx, capabilities=["x"], labels={"k": "v"})
            whoami_handler("w")(agent)
            await agent.start()
            ev = await next_event(events, {"agent_joined"}, 2.0)
            assert ev.data["name"] == "watched"
            assert ev.data["capabilities"] == ["x"] and ev.data["labels"] == {"k": "v"}
            assert ev.data["commands"] == ["whoami"]
            assert ev.time > 0
            # Expect topic filtering: the "job" subscription sees jobs, not agents
            job = await client.execute("watched", "whoami")
            assert await job.result(timeout=5) == "w"
            seen = {(await next_event(jobs, {"job_accepted", "job_finished"}, 2.0)).type for _ in range(2)}
            assert seen == {"job_accepted", "job_finished"}
            # When it stops, Expect agent_left (a clean goodbye, not a loss)
            await agent.stop()
            ev = await next_event(events, {"agent_left", "agent_lost"}, 2.0)
            assert (ev.type, ev.data["name"]) == ("agent_left", "watched")
            for it in (events, jobs):
                await it.aclose()

    arun(main())


# -------------------------------------------------------------- middleware


def recorder(log: list[str], tag: str, calls: list[Call] | None = None) -> om.Middleware:
    async def mw(call: Call, call_next: Any) -> Any:
        log.append(f"in-{tag}")
        if calls is not None:
            calls.append(call)
        try:
            return await call_next(call)
        finally:
            log.append(f"out-{tag}")

    return mw


class Forbidden(Exception):
    pass


async def forbid(call: Call, call_next: Any) -> Any:
    if call.command == "secret":
        raise Forbidden(f"{call.side} refuses {call.command}")
    return await call_next(call)


async def rewrite(call: Call, call_next: Any) -> Any:
    if call.command == "echo" and call.params == {"value": "in"}:
        call.params = {"value": f"rewritten on {call.side}"}
    result = await call_next(call)
    return result if not isinstance(result, str) else result + "!"


def recording_handlers(log: list[str]) -> Callable[[om.Agent], None]:
    def setup(agent: om.Agent) -> None:
        @agent.handler
        async def echo(value: Any = None) -> Any:
            log.append("handler")
            return value

        @agent.handler
        async def secret() -> str:
            log.append("handler")
            return "leaked"

        @agent.handler
        def add(a: int, b: int) -> int:
            log.append("handler")
            return a + b

        @agent.raw_handler
        def reverse(frames: list[bytes]) -> bytes:
            log.append("handler")
            return b"".join(bytes(f) for f in frames)[::-1]

    return setup


def test_client_middleware_order_and_errors(arun, ctx, core_impl):
    log: list[str] = []
    calls: list[Call] = []
    kw = {
        "setup": recording_handlers(log),
        "client_kw": {"middleware": [recorder(log, "a", calls), recorder(log, "b"), forbid, rewrite]},
    }

    async def main():
        async with mesh(ctx, core_impl, endpoint_for("inproc"), **kw) as (_, _, client):
            # When a call goes through [a, b], Expect in order on the way in, reversed on the way out
            assert await client.invoke("agent-0", "add", [1, 2]) == 3
            assert log == ["in-a", "in-b", "handler", "out-b", "out-a"]
            assert (calls[0].side, calls[0].kind, calls[0].command, calls[0].agent) == (
                "client",
                "invoke",
                "add",
                "agent-0",
            )
            assert calls[0].params == [1, 2]
            # Expect a middleware to be able to change params and the result
            assert await client.invoke("agent-0", "echo", {"value": "in"}) == "rewritten on client!"
            # Expect execute to pass through the chain too
            log.clear()
            job = await client.execute("agent-0", "add", [2, 3])
            assert await job.result(timeout=5) == 5
            # (the chain returns once the broker accepted the job: the handler may run before or after)
            assert calls[-1].kind == "execute" and sorted(log) == ["handler", "in-a", "in-b", "out-a", "out-b"]
            assert [e for e in log if e != "handler"] == ["in-a", "in-b", "out-b", "out-a"]
            # When a middleware raises, Expect the caller to get that very exception, and no call sent
            log.clear()
            with pytest.raises(Forbidden, match="client refuses secret"):
                await client.invoke("agent-0", "secret")
            assert log == ["in-a", "in-b", "out-b", "out-a"]

    arun(main())


def test_agent_middleware_order_and_errors(arun, ctx, core_impl):
    log: list[str] = []
    calls: list[Call] = []
    agents = [{"middleware": [recorder(log, "a", calls), recorder(log, "b"), forbid, rewrite]}]

    async def main():
        async with mesh(ctx, core_impl, endpoint_for("inproc"), agents, setup=recording_handlers(log)) as (
            _,
            _,
            client,
        ):
            # When a call reaches an agent with [a, b], Expect the same onion order there
            assert await client.invoke("agent-0", "add", {"a": 1, "b": 2}) == 3
            assert log == ["in-a", "in-b", "handler", "out-b", "out-a"]
            call = calls[0]
            assert (call.side, call.kind, call.command, call.agent) == ("agent", "invoke", "add", "agent-0")
            assert call.params == {"a": 1, "b": 2} and call.job_id == 0
            assert await client.invoke("agent-0", "echo", {"value": "in"}) == "rewritten on agent!"
            # Expect a tracked job to be seen as "execute" with its job id
            job = await client.execute("agent-0", "add", [2, 3])
            assert await job.result(timeout=5) == 5
            assert (calls[-1].kind, calls[-1].job_id) == ("execute", job.id)
            # When an agent middleware raises, Expect a RemoteError naming its type; the handler never runs
            log.clear()
            with pytest.raises(om.RemoteError) as info:
                await client.invoke("agent-0", "secret")
            err = info.value
            assert err.code == ErrorCode.HANDLER_ERROR
            assert err.remote_type.endswith(".Forbidden")
            assert err.message == "agent refuses secret" and err.agent == "agent-0"
            assert log == ["in-a", "in-b", "out-b", "out-a"]

    arun(main())


def test_client_middleware_wraps_send_raw(arun, ctx, core_impl):
    # MeshClient's docstring: "middleware wraps invoke / execute / send_raw".
    log: list[str] = []
    calls: list[Call] = []
    kw = {"setup": recording_handlers(log), "client_kw": {"middleware": [recorder(log, "a", calls)]}}

    async def main():
        async with mesh(ctx, core_impl, endpoint_for("inproc"), **kw) as (_, _, client):
            assert await client.send_raw("agent-0", b"abc") == b"cba"
            assert log == ["in-a", "handler", "out-a"]
            assert (calls[0].side, calls[0].kind, calls[0].agent) == ("client", "raw", "agent-0")

    arun(main())


def test_agent_middleware_wraps_the_raw_handler(arun, ctx, core_impl):
    # Agent's docstring: "middleware wraps every handler call"; Call.kind documents "raw".
    log: list[str] = []
    calls: list[Call] = []
    agents = [{"middleware": [recorder(log, "a", calls)]}]

    async def main():
        async with mesh(ctx, core_impl, endpoint_for("inproc"), agents, setup=recording_handlers(log)) as (
            _,
            _,
            client,
        ):
            assert await client.send_raw("agent-0", b"abc") == b"cba"
            assert log == ["in-a", "handler", "out-a"]
            assert (calls[0].side, calls[0].kind) == ("agent", "raw")

    arun(main())


# ------------------------------------------------------------- serializers


def serializer_handlers(agent: om.Agent) -> None:
    @agent.handler
    async def echo(value: Any = None) -> Any:
        return value

    @agent.handler
    def upper(data: bytes) -> bytes:
        assert isinstance(data, bytes)
        return data.upper()

    @agent.handler
    def length(data: bytes) -> int:
        return len(data)


def test_json_serializer_round_trip(arun, ctx, core_impl):
    async def main():
        async with mesh(ctx, core_impl, endpoint_for("inproc"), setup=serializer_handlers) as (_, _, client):
            value = {"a": [1, 2.5, None, True], "b": "ü", "c": {"d": []}}
            assert await client.invoke("agent-0", "echo", {"value": value}, serializer="json") == value
            # Expect JSON to really be on the wire both ways: int keys come back as strings
            assert await client.invoke("agent-0", "echo", {"value": {1: "x"}}, serializer="json") == {"1": "x"}
            assert await client.invoke("agent-0", "echo", {"value": {1: "x"}}) == {1: "x"}
            # Expect what JSON cannot encode to fail before anything is sent
            with pytest.raises(om.SerializationError) as info:
                await client.invoke("agent-0", "echo", {"value": b"\x00"}, serializer="json")
            assert info.value.code == ErrorCode.SERIALIZATION
            with pytest.raises(om.SerializationError):
                await client.invoke("agent-0", "echo", serializer="yaml")

    arun(main())


def test_raw_serializer_client(arun, ctx, core_impl):
    kw = {"setup": serializer_handlers, "client_kw": {"serializer": "raw"}}

    async def main():
        async with mesh(ctx, core_impl, endpoint_for("inproc"), **kw) as (_, _, client):
            # Given a client whose default serializer is raw, Expect bytes in and bytes out untouched
            assert await client.invoke("agent-0", "upper", b"abc\x00\xff") == b"ABC\x00\xff"
            assert await client.invoke("agent-0", "upper", memoryview(b"mv")) == b"MV"
            blob = bytes(range(256)) * 1000
            assert await client.invoke("agent-0", "upper", blob) == blob.upper()
            # Expect a result that is not bytes to fail on the agent with a clear error
            with pytest.raises(om.RemoteError, match="raw serializer"):
                await client.invoke("agent-0", "length", b"abcd")
            # Expect a non-bytes param to fail before sending, and msgpack to remain available per call
            with pytest.raises(om.SerializationError):
                await client.invoke("agent-0", "upper", {"data": b"x"})
            assert await client.invoke("agent-0", "length", {"data": b"abcd"}, serializer="msgpack") == 4

    arun(main())


def test_unencodable_payload_is_never_sent(arun, ctx, core_impl):
    seen: list[Any] = []

    def setup(agent: om.Agent) -> None:
        @agent.handler
        async def take(value: Any = None) -> str:
            seen.append(value)
            return "taken"

    async def main():
        async with mesh(ctx, core_impl, endpoint_for("inproc"), setup=setup) as (_, [agent], client):
            # When msgpack cannot encode the params, Expect SerializationError at once
            for bad in ({"value": object()}, {"value": 1 << 70}, {"value": {1, object()}}):
                with pytest.raises(om.SerializationError) as info:
                    await client.invoke("agent-0", "take", bad)
                assert info.value.code == ErrorCode.SERIALIZATION
            with pytest.raises(om.SerializationError):
                await client.execute("agent-0", "take", {"value": object()})
            with pytest.raises(om.SerializationError):
                client.submit("agent-0", "take", {"value": object()})
            # Expect nothing to have reached the agent, and the client to work on
            assert await client.invoke("agent-0", "take", {"value": 1}) == "taken"
            assert seen == [1] and agent.served == 1

    arun(main())


# ---------------------------------------------------------- blocking client


def blocking_handlers(agent: om.Agent) -> None:
    @agent.handler
    def add(a: int, b: int) -> int:
        return a + b

    @agent.handler
    async def nap(seconds: float) -> str:
        await asyncio.sleep(seconds)
        return "rested"

    @agent.handler
    async def count(n: int) -> AsyncIterator[int]:
        for i in range(n):
            yield i

    @agent.raw_handler
    def checksum(frames: list[Any]) -> bytes:
        arr = np.frombuffer(frames[0], dtype=np.int64)
        return np.array([arr.sum()], dtype=np.int64).tobytes()


@contextlib.contextmanager
def background_mesh(ctx: zmq.Context[Any], core: str, loop_kind: str, transport: str) -> Iterator[str]:
    """A broker and agent ``bg`` served by an event loop in another thread; yields the endpoint."""
    ready = threading.Event()
    state: dict[str, Any] = {}
    loop = new_event_loop(loop_kind)

    async def serve() -> None:
        state["stop"] = asyncio.Event()
        async with om.Broker(endpoint_for(transport), core=core, context=ctx, **FAST) as broker:
            agent = om.Agent("bg", broker.endpoints[0], context=ctx, capacity=4)
            blocking_handlers(agent)
            async with agent:
                state["endpoint"] = broker.endpoints[0]
                ready.set()
                await state["stop"].wait()

    def run() -> None:
        try:
            loop.run_until_complete(serve())
        except BaseException as exc:
            state["error"] = exc
        finally:
            ready.set()

    thread = threading.Thread(target=run, name="background-mesh", daemon=True)
    thread.start()
    try:
        assert ready.wait(10.0), "the background mesh did not start"
        assert "error" not in state, state.get("error")
        yield state["endpoint"]
    finally:
        if "stop" in state:
            loop.call_soon_threadsafe(state["stop"].set)
        thread.join(10.0)
        assert not thread.is_alive(), "the background mesh did not stop"
        loop.close()
        assert "error" not in state, state.get("error")


@pytest.mark.parametrize("transport", ["inproc", "tcp"])
def test_blocking_client(ctx, core_impl, loop_kind, transport):
    with background_mesh(ctx, core_impl, loop_kind, transport) as endpoint:
        client = om.BlockingClient(endpoint, context=ctx, timeout=5.0)
        try:
            # Given no event loop in this thread, Expect every call to block and return
            assert client.invoke("bg", "add", [2, 3]) == 5
            assert client.invoke(om.Select(), "add", {"a": 1, "b": 1}) == 2
            job_id = client.execute("bg", "add", [20, 22])
            assert isinstance(job_id, int) and job_id > 0
            assert client.job_result(job_id, timeout=5) == 42
            assert client.get_job(job_id).state == om.JobState.SUCCEEDED
            arr = np.arange(1000, dtype=np.int64)
            assert np.frombuffer(client.send_raw("bg", arr), dtype=np.int64)[0] == arr.sum()
            assert list(client.stream("bg", "count", [5], window=2)) == [0, 1, 2, 3, 4]
            first = []
            for i in client.stream("bg", "count", [1000], window=4):
                first.append(i)
                if i == 2:
                    break
            assert first == [0, 1, 2]
            [info] = client.agents()
            assert (info.name, info.capacity, "add" in info.commands) == ("bg", 4, True)
            assert client.execute_on_all("add", [1, 2])["bg"].value == 3
            # When a call outlives its timeout, Expect orbitmesh.TimeoutError (a builtin TimeoutError too)
            t = time.monotonic()
            with pytest.raises(om.TimeoutError) as err:
                client.invoke("bg", "nap", [5.0], timeout=0.2)
            assert isinstance(err.value, TimeoutError) and err.value.code == ErrorCode.TIMEOUT
            assert time.monotonic() - t < 1.5
            # Expect remote errors to cross the thread boundary typed
            with pytest.raises(om.RemoteError) as remote:
                client.invoke("bg", "add", [1])
            assert remote.value.remote_type == "builtins.TypeError"
            assert client.invoke("bg", "nap", [0.01]) == "rested"
        finally:
            client.close()
        # Expect close to be idempotent, and the context manager form to work
        client.close()
        with om.BlockingClient(endpoint, context=ctx, timeout=5.0) as again:
            assert again.invoke("bg", "add", [3, 4]) == 7


def test_blocking_client_connect_timeout(ctx):
    # Given nobody listening, Expect NotConnectedError after the connect timeout, and no thread left
    before = threading.active_count()
    t = time.monotonic()
    with pytest.raises(om.NotConnectedError):
        om.BlockingClient("inproc://orbitmesh-nobody-here", context=ctx, connect_timeout=0.3)
    assert time.monotonic() - t < 2.0
    assert threading.active_count() == before


# -------------------------------------------------------------- handler classes


class Inventory:
    def __init__(self) -> None:
        self.items: dict[str, int] = {}

    @om.command()
    def put(self, item: str, n: int = 1) -> int:
        self.items[item] = self.items.get(item, 0) + n
        return self.items[item]

    @om.command("stock")
    async def how_many(self, item: str) -> int:
        return self.items.get(item, 0)

    @om.command(inline=True)
    def names(self) -> list[str]:
        return sorted(self.items)

    def not_a_command(self) -> None:
        raise AssertionError("unmarked methods must not be served")


def test_handler_classes(arun, ctx, core_impl):
    inventory = Inventory()

    def setup(agent: om.Agent) -> None:
        agent.register(inventory)

        def plain(x: int) -> int:
            return -x

        agent.register(plain)

    async def main():
        async with mesh(ctx, core_impl, endpoint_for("inproc"), setup=setup) as (_, [agent], client):
            # Given an object with @command methods, Expect each served under its (new) name
            assert sorted(agent.commands) == ["names", "plain", "put", "stock"]
            assert await client.invoke("agent-0", "put", {"item": "bolt", "n": 3}) == 3
            assert await client.invoke("agent-0", "put", ["bolt"]) == 4
            assert await client.invoke("agent-0", "stock", ["bolt"]) == 4
            assert await client.invoke("agent-0", "names") == ["bolt"]
            assert await client.invoke("agent-0", "plain", [5]) == -5
            assert inventory.items == {"bolt": 4}
            # Expect the renamed method and unmarked methods not to be served
            for missing in ("how_many", "not_a_command"):
                with pytest.raises(om.RemoteError) as info:
                    await client.invoke("agent-0", missing, ["bolt"])
                assert info.value.code == ErrorCode.UNKNOWN_COMMAND
            [listed] = await client.agents()
            assert sorted(listed.commands) == ["names", "plain", "put", "stock"]

    arun(main())


def test_handler_registration_errors():
    agent = om.Agent("reg", "inproc://unused")
    # Expect an object without @command marks to be refused
    with pytest.raises(ValueError, match="no @command"):
        agent.register(object())
    # Expect duplicate names to be refused, whichever way they are registered
    agent.register(Inventory())
    with pytest.raises(ValueError, match="already registered"):
        agent.register(Inventory())

    @agent.handler
    def solo() -> None:
        pass

    with pytest.raises(ValueError, match="already registered"):
        agent.add_handler("solo", lambda: None)

    with pytest.raises(ValueError, match="already registered"):

        @agent.handler("stock")
        def other() -> None:
            pass

    class Twice:
        @om.command("same")
        def one(self) -> None:
            pass

        @om.command("same")
        def two(self) -> None:
            pass

    with pytest.raises(ValueError, match="already registered"):
        om.Agent("twice", "inproc://unused").register(Twice())
    with pytest.raises(ValueError):
        agent.add_handler("", lambda: None)
    with pytest.raises(ValueError):
        agent.add_handler("bad\0name", lambda: None)
    assert sorted(agent.commands) == ["names", "put", "solo", "stock"]


def test_a_silent_agent_is_suspect_then_lost(arun, ctx, core_impl):
    """An agent that stops sending heartbeats: suspect after 2 intervals (an ``agent_state``
    event), lost after ``liveness`` intervals (``agent_lost``)."""

    async def main():
        async with mesh(ctx, core_impl, endpoint_for("tcp"), 0, setup=no_handlers) as (broker, _, client):
            events = await client.subscribe(["agent"])
            # Given an agent that registers and then says nothing at all
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(broker.endpoints[0])
            try:
                body = {"role": "agent", "name": "mute", "capacity": 1, "capabilities": ["gpu"], "commands": ["x"]}
                sock.send_multipart([header(Kind.HELLO, aux=2, corr=1), b"", msgpack.packb(body)])
                seen: list[tuple[str, str]] = []
                loop = asyncio.get_running_loop()
                end = loop.time() + 5
                while ("agent_lost", "") not in seen:
                    assert loop.time() < end, f"no agent_lost within 5 s; saw {seen}"
                    ev = await asyncio.wait_for(events.__anext__(), end - loop.time())
                    if ev.data.get("name") == "mute":
                        seen.append((ev.type, str(ev.data.get("state", "")) if ev.type == "agent_state" else ""))
                        if seen[-1] == ("agent_state", "suspect"):
                            # Expect the registry to say so while it lasts
                            states = {a.name: a.state for a in await client.agents()}
                            assert states.get("mute") in ("suspect", None), states
                # Expect joined, then suspect, then lost, in that order
                assert seen[0] == ("agent_joined", "")
                assert seen.index(("agent_state", "suspect")) < seen.index(("agent_lost", ""))
            finally:
                sock.close(0)

    arun(main())


def test_agents_report_their_load_in_heartbeats(arun, ctx, core_impl):
    """The agent's heartbeat carries how many handlers it runs; the registry shows it (``running``)
    next to the broker's own count of requests out with it (``inflight``)."""
    release = asyncio.Event()

    def setup(agent):
        @agent.handler
        async def hold():
            await release.wait()
            return "done"

    async def main():
        async with mesh(ctx, core_impl, endpoint_for("tcp"), setup=setup) as (_, _, client):
            calls = [asyncio.ensure_future(client.invoke("agent-0", "hold")) for _ in range(3)]
            loop = asyncio.get_running_loop()
            end = loop.time() + 5
            info = (await client.agents())[0]
            while info.running != 3:
                assert loop.time() < end, f"the agent's heartbeats never reported 3 running: {info}"
                await asyncio.sleep(0.05)
                info = (await client.agents())[0]
            assert info.inflight == 3
            release.set()
            assert await asyncio.gather(*calls) == ["done"] * 3
            while info.running:
                assert loop.time() < end + 5, f"the report never fell back to 0: {info}"
                await asyncio.sleep(0.05)
                info = (await client.agents())[0]

    arun(main())


def test_defaults_heartbeat_1s_liveness_5_and_capped_jittered_backoff(arun, ctx):
    """Heartbeats are on by default, every second, with a liveness of 5, and a peer that lost
    its broker retries with exponential backoff, jittered (half to all of each step), capped."""
    broker = om.Broker("tcp://127.0.0.1:0", context=ctx)
    assert (broker.heartbeat_ms, broker.liveness) == (1000, 5)

    async def main():
        await broker.start()
        client = om.MeshClient(broker.endpoints[0], context=ctx)
        try:
            await client.connect()
            conn = client._conn
            assert conn is not None and (conn.heartbeat_ms, conn.liveness) == (1000, 5)  # as WELCOME said
            conn._reconnect_initial, conn._reconnect_max = 0.05, 2.0
            for attempt, top in [(0, 0.05), (1, 0.1), (3, 0.4), (5, 1.6), (6, 2.0), (40, 2.0)]:
                conn._attempt = attempt
                waits = [conn._backoff() for _ in range(200)]
                assert all(top / 2 <= w <= top for w in waits), (attempt, min(waits), max(waits))
                assert max(waits) - min(waits) > top / 4  # jittered, not one fixed step
        finally:
            await client.close()
            await broker.stop()

    arun(main())


class _MarkedJson:
    """A serializer plugin: JSON with its keys sorted and a marker, so its bytes are its own."""

    id = 7
    name = "marked-json"

    def dumps(self, obj: Any) -> bytes:
        import json

        return b"MJ" + json.dumps(obj, sort_keys=True).encode()

    def loads(self, data: bytes) -> Any:
        import json

        if not data.startswith(b"MJ"):
            raise om.SerializationError("not marked-json")
        return json.loads(data[2:])


def test_serializer_plugin_on_both_sides(arun, ctx, core_impl):
    """A plugin registered on client and agent carries params and results (its id travels in
    the header); an agent without it answers a clear error, not a crash."""
    seen: list[Any] = []

    def setup(agent):
        @agent.handler
        async def mirror(value):
            seen.append(value)
            return {"got": value}

    plugin = _MarkedJson()
    agents = [{"name": "agent-0", "serializers": [plugin]}, {"name": "plain"}]

    async def main():
        kw = {"serializers": [plugin]}
        async with mesh(ctx, core_impl, endpoint_for("tcp"), agents, setup=setup, client_kw=kw) as (_, _, client):
            out = await client.invoke("agent-0", "mirror", {"value": [1, "two"]}, serializer="marked-json")
            assert out == {"got": [1, "two"]} and seen == [[1, "two"]]
            with pytest.raises(om.OrbitMeshError) as err:
                await client.invoke("plain", "mirror", {"value": 1}, serializer="marked-json", timeout=5)
            assert "serializer" in str(err.value).lower(), err.value

    arun(main())


def test_stream_items_and_raw_calls_have_timeouts(arun, ctx, core_impl):
    """Every call has a timeout: a stream's wait for its next item, and send_raw."""
    closed = asyncio.Event()

    def setup(agent):
        @agent.handler
        async def one_then_stall():
            try:
                yield 1
                await asyncio.sleep(30)
                yield 2
            finally:
                closed.set()

        @agent.raw_handler
        async def slow(frames: list[bytes]) -> bytes:
            await asyncio.sleep(30)
            return b""

    async def main():
        async with mesh(ctx, core_impl, endpoint_for("tcp"), setup=setup) as (_, _, client):
            loop = asyncio.get_running_loop()
            items = []
            t = loop.time()
            with pytest.raises(om.TimeoutError):
                async for item in client.stream("agent-0", "one_then_stall", timeout=0.3):
                    items.append(item)
            assert items == [1] and loop.time() - t < 3
            await asyncio.wait_for(closed.wait(), 3)  # the stalled handler was cancelled
            t = loop.time()
            with pytest.raises(om.TimeoutError):
                await client.send_raw("agent-0", b"payload", timeout=0.3)
            assert loop.time() - t < 3

    arun(main())


def test_the_gil_tuning_sets_the_switch_interval_and_refuses_what_is_not_one() -> None:
    before = sys.getswitchinterval()
    try:
        # Given a broker process's tuning, Expect the interval the CLI's broker runs with
        tune_gil_for_server()
        assert sys.getswitchinterval() == pytest.approx(0.0001)
        tune_gil_for_server(0.002)
        assert sys.getswitchinterval() == pytest.approx(0.002)
        # ... and a clear error, the interval unchanged, for one that is not in (0, 1] seconds
        for bad in (0.0, -1.0, 2.0, float("nan")):
            with pytest.raises(ValueError, match="switch interval must be in"):
                tune_gil_for_server(bad)
        assert sys.getswitchinterval() == pytest.approx(0.002)
    finally:
        sys.setswitchinterval(before)
