"""Per-client limits in the broker: requests in flight or queued, and a request rate.
A client over its limit gets a clear error at once; other clients are not slowed."""

from __future__ import annotations

import asyncio

import pytest

import orbitmesh as om
from orbitmesh import ErrorCode

from .conftest import endpoint_for
from .mesh import mesh


def test_inflight_limit_refuses_the_excess_and_recovers(arun, ctx, core_impl):
    async def main():
        kw = {"client_max_inflight": 3}
        agents = [{"capacity": 1}]
        async with mesh(ctx, core_impl, endpoint_for("inproc"), agents, broker_kw=kw) as (broker, _, client):
            # Given a client allowed 3 requests at once and a slow agent that runs one at a time
            futs = [client.submit("agent-0", "sleep", {"seconds": 0.2}) for _ in range(8)]
            results = await asyncio.gather(*futs, return_exceptions=True)
            # Expect 3 to run (one, then two queued) and 5 refused at once with TOO_MANY_REQUESTS
            ok = [r for r in results if r == "agent-0"]
            refused = [r for r in results if isinstance(r, om.RoutingError)]
            assert len(ok) == 3 and len(refused) == 5
            assert {r.code for r in refused} == {ErrorCode.TOO_MANY_REQUESTS}
            # And once they are done, the client may send again: the count came back down
            assert await client.invoke("agent-0", "echo", {"value": 7}) == 7
            # Another client has its own allowance
            other = om.MeshClient(broker.endpoints[0], context=ctx, timeout=5)
            await other.connect()
            try:
                busy = [client.submit("agent-0", "sleep", {"seconds": 0.2}) for _ in range(3)]
                assert await other.invoke("agent-0", "echo", {"value": 1}) == 1
                await asyncio.gather(*busy)
            finally:
                await other.close()
            await asyncio.sleep(0.25)  # a heartbeat tick brings the counters up
            assert (await client.stats())["limited"] >= 5

    arun(main())


def test_rate_limit_refuses_a_flood_not_a_neighbour(arun, ctx, core_impl):
    async def main():
        kw = {"client_rate": 20.0, "client_burst": 5}
        async with mesh(ctx, core_impl, endpoint_for("tcp"), broker_kw=kw) as (broker, _, client):
            # Given 20 requests/s with bursts of 5, When a client sends 30 at once
            futs = [client.submit("agent-0", "echo", {"value": i}) for i in range(30)]
            results = await asyncio.gather(*futs, return_exceptions=True)
            passed = [r for r in results if not isinstance(r, Exception)]
            limited = [r for r in results if isinstance(r, om.RoutingError)]
            # Expect the burst through and the rest refused with RATE_LIMITED, nothing lost or hung
            assert 5 <= len(passed) <= 7 and len(passed) + len(limited) == 30
            assert {r.code for r in limited} == {ErrorCode.RATE_LIMITED}
            # Expect a neighbour untouched, and the flooder served again once its bucket refills
            neighbour = om.MeshClient(broker.endpoints[0], context=ctx, timeout=5)
            await neighbour.connect()
            try:
                assert [await neighbour.invoke("agent-0", "echo", {"value": i}) for i in range(3)] == [0, 1, 2]
            finally:
                await neighbour.close()
            await asyncio.sleep(0.3)
            assert await client.invoke("agent-0", "echo", {"value": "again"}) == "again"

    arun(main())


def test_bad_limits_are_refused():
    with pytest.raises(ValueError, match="client limits"):
        om.Broker("inproc://x", client_rate=-1)
