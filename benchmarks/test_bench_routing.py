"""Broker routing table and agent selection, compiled vs pure Python.

The data plane of ``test_bench_dataplane`` with AGENTS raw DEALER agents registered (each with
a capability, a group and the command), and requests routed by name (a table lookup among
AGENTS) or by capability under each selection strategy (a scan of AGENTS candidates with their
credits). Every agent echoes what it gets; a run is N requests with WINDOW in flight. The
compiled / pure-Python ratio of each case is printed at the end of the run (conftest).
"""

from __future__ import annotations

from collections.abc import Iterator
from types import ModuleType
from typing import Any

import pytest
import zmq

from orbitmesh.protocol import Role, Route, Strategy

from .test_bench_dataplane import PAYLOAD, ROUNDS, SMOKE_N, WINDOW, Forwarder

pytestmark = pytest.mark.benchmark(group="routing")

N = 10_000
AGENTS = 64
CAPACITY = WINDOW  # per agent: any one of them could take the whole window (no queueing)
CASES = {
    "name": (Route.NAME, Strategy.LEAST_LOADED, b"agent-031"),
    "capability-least-loaded": (Route.CAPABILITY, Strategy.LEAST_LOADED, b"gpu"),
    "capability-round-robin": (Route.CAPABILITY, Strategy.ROUND_ROBIN, b"gpu"),
    "capability-random": (Route.CAPABILITY, Strategy.RANDOM, b"gpu"),
}


class Router(Forwarder):
    """A running DataPlane with AGENTS agents (all raw DEALERs) and one client registered."""

    def __init__(self, mod: ModuleType, route: bytes) -> None:
        self.route = route
        self.agents: list[zmq.Socket[Any]] = []
        super().__init__(mod)

    def _register(self) -> None:
        super()._register()  # the base agent ("bench-agent") and the client
        op, meta = self.mod.OP, self.mod.pack_reg_meta
        endpoint = self.router.getsockopt_string(zmq.LAST_ENDPOINT)
        for i in range(AGENTS):
            rid = b"agent-%03d" % i
            sock = self._socket(zmq.DEALER, 0, identity=rid)
            sock.connect(endpoint)
            reg = [op["REG"], rid, meta(Role.AGENT, CAPACITY), rid, b"gpu\0cpu", b"g1", b"noop"]
            self.control.send_multipart(reg)
            for _ in range(50):  # control ops run in order: the ping arrives after the registration
                self.control.send_multipart([op["SEND"], rid, b"ping"])
                if sock.poll(100):
                    assert sock.recv_multipart() == [b"ping"]
                    break
            else:
                raise RuntimeError(f"the data plane never reached {rid!r}")
            self.agents.append(sock)
            self.poller.register(sock, zmq.POLLIN)
        self.request = [self.request[0], self.route, b"noop", PAYLOAD]
        self.serving = self.agents

    def close(self) -> None:
        self.close_plane()
        for sock in self.agents:
            sock.close()
        self.close_sockets()


@pytest.fixture(params=list(CASES), ids=list(CASES))
def router(request: pytest.FixtureRequest, dataplane_impl: ModuleType) -> Iterator[Router]:
    rtype, strategy, key = CASES[request.param]
    fw = Router(dataplane_impl, bytes((rtype, strategy)) + key)
    try:
        fw.forward(2 * WINDOW)  # warm-up
        yield fw
    finally:
        fw.close()


def test_route_and_select(benchmark: Any, router: Router) -> None:
    # Given AGENTS agents registered, When N requests are routed (by name or by capability
    # under a strategy) and answered, Expect every reply back (forward raises otherwise)
    n = SMOKE_N if benchmark.disabled else N
    benchmark.pedantic(router.forward, args=(n,), rounds=ROUNDS, iterations=1)
    if not benchmark.disabled:
        benchmark.extra_info["round_trips_per_s"] = round(n / benchmark.stats.stats.mean)
