"""Every client call, end to end over real sockets, on both cores and both loops."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import numpy as np
import pytest

import orbitmesh as om
from orbitmesh import ErrorCode

from .conftest import endpoint_for
from .mesh import mesh


@dataclass
class Point:
    x: int
    y: float


@pytest.mark.parametrize("transport", ["inproc", "ipc", "tcp"])
def test_invoke_round_trip_on_every_transport(arun, ctx, core_impl, transport):
    async def main():
        async with mesh(ctx, core_impl, endpoint_for(transport)) as (_, _, client):
            # Given an agent with echo/add, When invoked with kwargs, positional and no params
            assert await client.invoke("agent-0", "echo", {"value": {"k": [1, 2.5, "x", b"\x00"]}}) == {
                "k": [1, 2.5, "x", b"\x00"]
            }
            assert await client.invoke("agent-0", "add", [2, 3]) == 5
            assert await client.invoke("agent-0", "echo") is None
            # Expect sync handlers (thread pool) and async ones to answer alike
            assert await client.invoke("agent-0", "add", {"a": 40, "b": 2}) == 42

    arun(main())


def test_typed_results(arun, ctx, core_impl):
    async def main():
        async with mesh(ctx, core_impl, endpoint_for("inproc")) as (_, _, client):
            # Given a handler returning a map, When asked for a dataclass, Expect one back
            p = await client.invoke("agent-0", "echo", {"value": {"x": 1, "y": 2}}, returns=Point)
            assert p == Point(1, 2.0) and isinstance(p.y, float)
            assert await client.invoke("agent-0", "echo", {"value": [1, 2]}, returns=list[int]) == [1, 2]
            # Expect a result that does not fit to be a clear ResultTypeError naming the field
            with pytest.raises(om.ResultTypeError, match=r"result\.x"):
                await client.invoke("agent-0", "echo", {"value": {"x": "no", "y": 1}}, returns=Point)
            with pytest.raises(om.ResultTypeError, match="unexpected fields"):
                await client.invoke("agent-0", "echo", {"value": {"x": 1, "y": 1, "z": 0}}, returns=Point)

    arun(main())


def test_handler_error_comes_back_typed(arun, ctx, core_impl):
    async def main():
        async with mesh(ctx, core_impl, endpoint_for("inproc")) as (_, _, client):
            # When a handler raises, Expect a RemoteError with type, message and traceback text
            with pytest.raises(om.RemoteError) as info:
                await client.invoke("agent-0", "boom", {"message": "bad input 7"})
            err = info.value
            assert err.code == ErrorCode.HANDLER_ERROR
            assert err.remote_type == "builtins.ValueError"
            assert err.message == "bad input 7"
            assert "raise ValueError(message)" in err.traceback
            assert err.agent == "agent-0"
            # Expect an unknown command to be UNKNOWN_COMMAND, not a hang
            with pytest.raises(om.RemoteError) as info:
                await client.invoke("agent-0", "nope")
            assert info.value.code == ErrorCode.UNKNOWN_COMMAND
            # Expect bad params (wrong arguments) to come back as a handler error
            with pytest.raises(om.RemoteError, match="TypeError"):
                await client.invoke("agent-0", "add", {"a": 1})

    arun(main())


def test_routing_errors(arun, ctx, core_impl):
    async def main():
        async with mesh(ctx, core_impl, endpoint_for("inproc")) as (_, _, client):
            with pytest.raises(om.RoutingError) as info:
                await client.invoke("ghost", "echo")
            assert info.value.code == ErrorCode.NO_SUCH_AGENT
            with pytest.raises(om.RoutingError) as info:
                await client.invoke(om.Select(capability="quantum"), "echo")
            assert info.value.code == ErrorCode.NO_AGENT_AVAILABLE
            with pytest.raises(om.RoutingError) as info:
                await client.invoke(om.Select(labels={"zone": "mars"}), "echo")
            assert info.value.code == ErrorCode.NO_AGENT_AVAILABLE
            with pytest.raises(om.RoutingError) as info:
                await client.invoke(om.Select(), "not-served-anywhere")
            assert info.value.code == ErrorCode.NO_AGENT_AVAILABLE
            # Calls the client refuses before sending anything, and the session still works
            with pytest.raises(ValueError, match="NaN"):
                await client.invoke("agent-0", "echo", 1, timeout=float("nan"))
            with pytest.raises(ValueError, match="window"):
                client.stream("agent-0", "count", window=2**32)
            assert await client.invoke("agent-0", "echo", {"value": 7}) == 7
            assert await client.invoke("agent-0", "echo", {"value": 8}, timeout=float("inf")) == 8  # no deadline

    arun(main())


def test_timeout_cancels_the_handler(arun, ctx, core_impl):
    cancelled = asyncio.Event()

    def setup(agent):
        @agent.handler
        async def hang():
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                cancelled.set()
                raise

        @agent.handler
        async def echo(value=None):
            return value

    async def main():
        async with mesh(ctx, core_impl, endpoint_for("inproc"), setup=setup) as (_, [agent], client):
            # When a call outlives its timeout, Expect TimeoutError promptly
            loop = asyncio.get_running_loop()
            t = loop.time()
            with pytest.raises(om.TimeoutError):
                await client.invoke("agent-0", "hang", timeout=0.2)
            assert loop.time() - t < 1.0
            # Expect the cancel to reach the handler, and the agent to stay usable
            await asyncio.wait_for(cancelled.wait(), 2.0)
            assert await client.invoke("agent-0", "echo", {"value": 1}) == 1
            for _ in range(50):
                if agent.inflight == 0:
                    break
                await asyncio.sleep(0.02)
            assert agent.inflight == 0

    arun(main())


def test_execute_tracks_the_job(arun, ctx, core_impl):
    async def main():
        async with mesh(ctx, core_impl, endpoint_for("inproc")) as (_, _, client):
            # When a job is executed, Expect an id at once and the result later
            job = await client.execute("agent-0", "add", [20, 22])
            assert job.id > 0
            assert await job.result(timeout=5) == 42
            info = await client.get_job(job.id)
            assert info.state == om.JobState.SUCCEEDED and info.agent == "agent-0"
            assert client.job_result(info) == 42
            # Expect a failing job to be FAILED with its error kept
            bad = await client.execute(om.Select(), "boom", {"message": "kaput"})
            with pytest.raises(om.RemoteError, match="kaput"):
                await bad.result(timeout=5)
            info = await client.wait_job(bad.id, timeout=5)
            assert info.state == om.JobState.FAILED and "kaput" in info.error
            states = {j.id: j.state for j in await client.list_jobs()}
            assert states == {job.id: om.JobState.SUCCEEDED, bad.id: om.JobState.FAILED}
            with pytest.raises(om.RoutingError) as exc:
                await client.get_job(10_000)
            assert exc.value.code == ErrorCode.NO_SUCH_JOB

    arun(main())


def test_a_stream_left_early_cancels_its_handler(arun, ctx, core_impl):
    """Without aclose(): a ``break`` out of the loop, the consumer's task cancelled, and
    leaving ``async with`` each cancel the handler on the agent."""
    closed: list[str] = []

    def setup(agent):
        @agent.handler
        async def ticks(tag):
            try:
                while True:
                    yield tag
                    await asyncio.sleep(0.01)
            finally:
                closed.append(tag)

    async def until_closed(tag: str) -> None:
        for _ in range(200):
            if tag in closed:
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"the handler of stream {tag!r} ran on after its consumer left")

    async def main():
        async with mesh(ctx, core_impl, endpoint_for("tcp"), setup=setup) as (_, agents, client):
            # When the consumer breaks out of the loop and drops the stream
            async for _ in client.stream("agent-0", "ticks", ["break"]):
                break
            await until_closed("break")

            # When the task consuming a stream is cancelled
            started = asyncio.Event()

            async def consume() -> None:
                async for _ in client.stream("agent-0", "ticks", ["task"]):
                    started.set()

            task = asyncio.ensure_future(consume())
            await asyncio.wait_for(started.wait(), 5)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await until_closed("task")

            # When a stream is read in ``async with`` and left early
            async with client.stream("agent-0", "ticks", ["with"]) as items:
                async for _ in items:
                    break
            await until_closed("with")
            # Expect nothing left running on the agent
            for _ in range(200):
                if not agents[0]._running:
                    break
                await asyncio.sleep(0.01)
            assert not agents[0]._running, agents[0]._running

    arun(main())


def test_stream_back_pressure_and_cancel(arun, ctx, core_impl):
    produced = []
    closed = asyncio.Event()

    def setup(agent):
        @agent.handler
        async def numbers(n):
            try:
                for i in range(n):
                    produced.append(i)
                    yield i
            finally:
                closed.set()

        @agent.handler
        async def broken():
            yield 1
            raise RuntimeError("stream broke")

    async def main():
        async with mesh(ctx, core_impl, endpoint_for("tcp"), setup=setup) as (_, _, client):
            # Given a window of 4, When the consumer is slow, Expect the producer never far ahead
            stream = client.stream("agent-0", "numbers", {"n": 1000}, window=4)
            got = []
            async for item in stream:
                got.append(item)
                await asyncio.sleep(0.005)
                # sent - consumed <= window; the generator holds at most one more
                assert len(produced) - len(got) <= 4 + 1
                if len(got) == 20:
                    break
            await stream.aclose()
            assert got == list(range(20))
            # Expect leaving early to cancel the generator on the agent
            await asyncio.wait_for(closed.wait(), 2.0)
            assert len(produced) < 40
            # Expect a whole stream to arrive in order, and an error mid-stream to raise
            assert [i async for i in client.stream("agent-0", "numbers", [50], window=8)] == list(range(50))
            items = []
            with pytest.raises(om.RemoteError, match="stream broke"):
                async for i in client.stream("agent-0", "broken"):
                    items.append(i)
            assert items == [1]

    arun(main())


def test_send_raw_buffers(arun, ctx, core_impl):
    async def main():
        async with mesh(ctx, core_impl, endpoint_for("tcp")) as (_, _, client):
            # bytes, memoryview, numpy array (zero-copy send), multi-frame, and 1 MiB
            assert await client.send_raw("agent-0", b"abc") == b"cba"
            assert await client.send_raw("agent-0", memoryview(b"xyz")) == b"zyx"
            arr = np.arange(1000, dtype=np.int32)
            assert await client.send_raw("agent-0", arr) == arr.tobytes()[::-1]
            assert await client.send_raw("agent-0", [b"ab", b"cd"]) == b"dcba"
            big = np.random.default_rng(1).integers(0, 255, 1 << 20, dtype=np.uint8)
            assert await client.send_raw("agent-0", big) == big.tobytes()[::-1]
            with pytest.raises(ValueError, match="contiguous"):
                await client.send_raw("agent-0", np.arange(10)[::2])
            with pytest.raises(TypeError, match="bytes-like"):
                await client.send_raw("agent-0", 12)

    arun(main())


def test_send_raw_hands_large_buffers_to_libzmq_without_a_copy(arun, ctx):
    """From 64 KiB in all, send_raw's buffers go to libzmq as they are (the caller must not
    change them until the call ends); smaller ones are copied. Shown over inproc through the
    compiled data plane, where nothing copies the payload on its way to the agent (the pure
    twin copies each frame into bytes, at a moment this test cannot pin): a buffer changed after
    the client handed it to libzmq, and before the agent read it, reaches the agent changed only
    if it was not copied."""

    async def sent_then_changed(client, size):
        buf = bytearray(b"a" * size)
        call = asyncio.ensure_future(client.send_raw("agent-0", buf))
        await asyncio.sleep(0)  # the call runs up to its wait: the message is queued
        client._conn._sock.flush()  # handed to libzmq now; the agent (same loop) has not run
        buf[0] = ord("Z")
        reply = await asyncio.wait_for(call, 5)
        return bytes(reply[-1:])  # the agent's raw handler answers the bytes reversed

    async def main():
        async with mesh(ctx, "c", endpoint_for("inproc")) as (_, _, client):
            assert await sent_then_changed(client, 65536) == b"Z"  # not copied
            assert await sent_then_changed(client, 1 << 20) == b"Z"
            assert await sent_then_changed(client, 65535) == b"a"  # copied when it was sent

    arun(main())


def test_send_raw_without_raw_handler(arun, ctx, core_impl):
    def setup(agent):
        @agent.handler
        async def echo(value=None):
            return value

    async def main():
        async with mesh(ctx, core_impl, endpoint_for("inproc"), setup=setup) as (_, _, client):
            with pytest.raises(om.RemoteError) as info:
                await client.send_raw("agent-0", b"x")
            assert info.value.code == ErrorCode.NO_RAW_HANDLER

    arun(main())


def test_async_raw_handler_that_returns_suspends_raises_or_returns_junk(arun, ctx, core_impl):
    agents: list[om.Agent] = []

    def setup(agent):
        agents.append(agent)

        @agent.raw_handler
        async def raw(frames: list[bytes]) -> object:
            mode = bytes(frames[0])
            if mode == b"sleep":
                await asyncio.sleep(0.01)
                return [b"slept", *frames[1:]]
            if mode == b"boom":
                raise ValueError("raw boom")
            if mode == b"junk":
                return 42
            return b"now"

    async def main():
        async with mesh(ctx, core_impl, endpoint_for("inproc"), setup=setup) as (_, _, client):
            # Expect a handler that finishes at once, one that suspends, one that raises and one
            # that returns something not bytes-like each to get its answer, concurrently too
            assert await client.send_raw("agent-0", b"now") == b"now"
            assert await client.send_raw_parts("agent-0", [b"sleep", b"a", b"b"]) == [b"slept", b"a", b"b"]
            with pytest.raises(om.RemoteError, match="raw boom") as boom:
                await client.send_raw("agent-0", b"boom")
            assert boom.value.code == ErrorCode.HANDLER_ERROR and boom.value.remote_type.endswith("ValueError")
            with pytest.raises(om.RemoteError, match="bytes-like"):
                await client.send_raw("agent-0", b"junk")
            many = await asyncio.gather(*(client.send_raw("agent-0", b"sleep" if i % 2 else b"now") for i in range(50)))
            assert many == [b"slept" if i % 2 else b"now" for i in range(50)]
            assert agents[0].inflight == 0

    arun(main())


def test_execute_on_all_reports_each_agent(arun, ctx, core_impl):
    def setup(agent):
        @agent.handler
        async def name_or_fail():
            if agent.name == "agent-1":
                raise RuntimeError("agent-1 fails")
            return agent.name

    agents = [
        {"groups": ["g"], "capabilities": ["gpu"]},
        {"groups": ["g"], "capabilities": ["gpu"]},
        {"groups": ["g", "h"], "capabilities": ["cpu"]},
    ]

    async def main():
        async with mesh(ctx, core_impl, endpoint_for("inproc"), agents, setup=setup) as (_, _, client):
            out = await client.execute_on_all("name_or_fail", group="g")
            assert sorted(out) == ["agent-0", "agent-1", "agent-2"]
            assert out["agent-0"].value == "agent-0" and out["agent-0"].ok
            assert not out["agent-1"].ok and "agent-1 fails" in str(out["agent-1"].error)
            only_h = await client.execute_on_all("name_or_fail", group="h")
            assert list(only_h) == ["agent-2"]
            # By capability: each agent that has it, its result or its error
            gpu = await client.execute_on_all("name_or_fail", capability="gpu")
            assert sorted(gpu) == ["agent-0", "agent-1"]
            assert gpu["agent-0"].value == "agent-0" and not gpu["agent-1"].ok
            cpu = await client.execute_on_all("name_or_fail", capability="cpu")
            assert list(cpu) == ["agent-2"] and cpu["agent-2"].value == "agent-2"

    arun(main())


def test_selection(arun, ctx, core_impl):
    agents = [
        {"capabilities": ["gpu"], "groups": ["a"], "labels": {"zone": "eu-1", "tier": "x"}},
        {"capabilities": ["gpu"], "groups": ["b"], "labels": {"zone": "eu-2"}},
        {"capabilities": ["cpu"], "groups": ["b"], "labels": {"zone": "us-1"}},
    ]

    async def main():
        async with mesh(ctx, core_impl, endpoint_for("inproc"), agents) as (_, _, client):
            # Broker-side selection: capability and group, round robin spreads the calls
            rr = om.Select(capability="gpu", strategy="round_robin")
            names = [await client.invoke(rr, "whoami") for _ in range(4)]
            assert sorted(set(names)) == ["agent-0", "agent-1"] and names[0] != names[1]
            assert {await client.invoke(om.Select(group="b", strategy="random"), "whoami") for _ in range(30)} == {
                "agent-1",
                "agent-2",
            }
            # labels (glob values) and capability together go through the control plane
            assert await client.invoke(om.Select(labels={"zone": "us-*"}), "whoami") == "agent-2"
            assert await client.invoke(om.Select(capability="gpu", labels={"zone": "eu-*"}, group="b"), "whoami") == (
                "agent-1"
            )
            # least-loaded picks the idle agent while another is busy
            busy = client.submit("agent-0", "sleep", {"seconds": 0.5})
            await asyncio.sleep(0.05)
            assert await client.invoke(om.Select(capability="gpu"), "whoami") == "agent-1"
            assert await busy == "agent-0"
            # Client-side selection with a callable
            chosen = await client.select_agent(selector=lambda a: a.labels.get("tier") == "x")
            assert chosen.name == "agent-0"
            assert (await client.select_agent(group="b", labels={"zone": "eu-*"})).name == "agent-1"
            with pytest.raises(om.RoutingError):
                await client.select_agent(capability="tpu")
            listed = await client.agents(capability="gpu")
            assert {a.name for a in listed} == {"agent-0", "agent-1"}
            assert all(a.capacity == 64 and a.state == "alive" for a in listed)

    arun(main())


def test_one_broker_on_several_endpoints(arun, ctx, core_impl):
    async def main():
        # Given a broker bound to inproc, ipc and tcp at once
        eps = [endpoint_for("inproc"), endpoint_for("ipc"), endpoint_for("tcp")]
        async with om.Broker(*eps, core=core_impl, context=ctx, heartbeat_interval=0.1, liveness=4) as broker:
            assert [e.split(":")[0] for e in broker.endpoints] == ["inproc", "ipc", "tcp"]
            assert not broker.endpoints[2].endswith(":0")  # the port chosen at bind is reported
            agent = om.Agent("multi", broker.endpoints[2], context=ctx)

            @agent.handler
            async def where() -> str:
                return "tcp-agent"

            await agent.start()
            try:
                # When clients on the other two transports call it, Expect both to reach it
                for ep in broker.endpoints[:2]:
                    async with om.MeshClient(ep, context=ctx, timeout=5) as client:
                        assert await client.invoke("multi", "where") == "tcp-agent"
            finally:
                await agent.stop()

    arun(main())


def test_finished_calls_do_not_pile_up_in_the_timeout_heap(arun, ctx, core_impl):
    """A call's deadline stays queued after it finishes; the client drops those as it goes, so
    a long run of calls with a long timeout keeps the heap near the calls in flight (it once
    held every call made in the timeout's span: millions, hundreds of MB), and a call still
    in flight keeps its timeout."""

    async def main():
        async with mesh(ctx, core_impl, endpoint_for("inproc")) as (_, _, client):
            # Given a slow call with a short timeout, then 6,000 quick calls with the default (10 s)
            slow = client.submit("agent-0", "sleep", {"seconds": 5}, timeout=1.5)
            for _ in range(6):
                calls = [client.submit("agent-0", "echo", {"value": i}) for i in range(1000)]
                assert await asyncio.gather(*calls) == list(range(1000))
            # Expect the heap bounded by the calls in flight (1,000 at most) plus the slack
            assert client._calls.deadlines <= 2 * 1000 + 1024 + 1, client._calls.deadlines
            # ... and the slow call to time out all the same
            with pytest.raises(om.TimeoutError):
                await slow

    arun(main())
