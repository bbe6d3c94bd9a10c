"""Broker data plane alone: forwarding throughput, compiled vs pure Python.

A DataPlane runs on its own thread over an inproc ROUTER; a raw DEALER "client" and a raw
DEALER "agent" (both driven from the test thread, registered with OP_REG) push N requests
through it with a window of requests in flight, the agent echoing each one back.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import pytest
import zmq

from orbitmesh.protocol import Kind, Role, Route, Strategy

pytestmark = pytest.mark.benchmark(group="forward")

N = 20_000
SMOKE_N = 500
WINDOW = 1000
ROUNDS = 3
BATCH = 256
AGENT = b"bench-agent"
CLIENT = b"bench-client"
PAYLOAD = b"\xc4\x40" + bytes(64)  # msgpack bin 8 of 64 bytes, as `orbitmesh bench` sends
_HDR = struct.Struct("<2sBBHHIIQQQ")


def _hdr(kind: int, corr: int = 0) -> bytes:
    return _HDR.pack(b"OM", 1, kind, 0x0100, 0, 0, 0, corr, 0, 0)


class Forwarder:
    """A running DataPlane with one registered agent and one registered client, all raw pyzmq."""

    def __init__(self, mod: ModuleType) -> None:
        self.mod = mod
        self.ctx: zmq.Context[Any] = zmq.Context()
        endpoint = f"inproc://bench-dataplane-{id(self)}"
        self.router = self._socket(zmq.ROUTER, 100_000)
        self.router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.router.bind(endpoint)
        self.control = self._socket(zmq.PAIR, 0)
        self.plane_end = self._socket(zmq.PAIR, 0)
        self.control.bind(f"{endpoint}-ctrl")
        self.plane_end.connect(f"{endpoint}-ctrl")
        self.plane = mod.DataPlane(self.router, self.plane_end, heartbeat_ms=60_000, liveness=10)
        self.thread = threading.Thread(target=self.plane.run, name="bench-dataplane", daemon=True)
        self.thread.start()
        self.agent = self._socket(zmq.DEALER, 0, identity=AGENT)
        self.client = self._socket(zmq.DEALER, 0, identity=CLIENT)
        self.agent.connect(endpoint)
        self.client.connect(endpoint)
        self.poller = zmq.Poller()
        self.poller.register(self.agent, zmq.POLLIN)
        self.poller.register(self.client, zmq.POLLIN)
        self.request = [_hdr(Kind.REQUEST), bytes((Route.NAME, Strategy.LEAST_LOADED)) + AGENT, b"noop", PAYLOAD]
        self.reply_hdr = _hdr(Kind.REPLY)
        self.corr = 0
        self.serving = [self.agent]  # the agent sockets forward() answers for
        self._register()

    def _socket(self, kind: int, hwm: int, identity: bytes = b"") -> zmq.Socket[Any]:
        sock = self.ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, hwm)
        sock.setsockopt(zmq.RCVHWM, hwm)
        if identity:
            sock.setsockopt(zmq.IDENTITY, identity)
        return sock

    def _register(self) -> None:
        op = self.mod.OP
        meta = self.mod.pack_reg_meta
        self.control.send_multipart([op["REG"], AGENT, meta(Role.AGENT, 1_000_000), AGENT, b"", b"", b"noop"])
        self.control.send_multipart([op["REG"], CLIENT, meta(Role.CLIENT, 0), CLIENT, b"", b"", b""])
        # Control ops run in order: once a peer gets our OP_SEND ping, the registrations are
        # done and the ROUTER knows that peer's identity.
        for rid, sock in ((AGENT, self.agent), (CLIENT, self.client)):
            for _ in range(50):
                self.control.send_multipart([op["SEND"], rid, b"ping"])
                if sock.poll(100):
                    assert sock.recv_multipart() == [b"ping"]
                    break
            else:
                raise RuntimeError(f"the data plane never reached {rid!r}")

    def forward(self, n: int) -> None:
        """Send ``n`` requests through the data plane (``WINDOW`` in flight) to the agents in
        ``self.serving``; wait for every reply."""
        client, request, reply_hdr, serving = self.client, self.request, self.reply_hdr, self.serving
        sent = done = 0
        while done < n:
            while sent < n and sent - done < WINDOW:
                self.corr += 1  # each request's corr must increase within the session (no replays)
                request[0] = _hdr(Kind.REQUEST, self.corr)
                client.send_multipart(request)
                sent += 1
            ready = dict(self.poller.poll(5000))
            if not ready:
                raise RuntimeError(f"data plane stalled after {done} of {n} replies")
            for agent in serving:
                if agent not in ready:
                    continue
                for _ in range(BATCH):
                    try:
                        _head, token, _command, body = agent.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    agent.send_multipart([reply_hdr, token, body])
            for _ in range(BATCH):
                try:
                    frames = client.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                if frames[0][3] != Kind.REPLY:
                    raise RuntimeError(f"client got kind {frames[0][3]}: {frames!r:.200}")
                done += 1

    def close(self) -> None:
        """Stop the plane (wait for EV_STOPPED), join its thread, close everything."""
        self.close_plane()
        self.close_sockets()

    def close_plane(self) -> None:
        """Stop the plane (wait for EV_STOPPED) and join its thread."""
        self.control.send_multipart([self.mod.OP["STOP"]])
        while self.control.poll(5000):
            if self.control.recv_multipart()[0] == self.mod.EV["STOPPED"]:
                break
        self.thread.join(5.0)
        if self.thread.is_alive():  # never close sockets the plane may still use
            raise RuntimeError("the data-plane thread did not stop")

    def close_sockets(self) -> None:
        """Close the sockets made here and the context (after close_plane)."""
        for sock in (self.agent, self.client, self.router, self.control, self.plane_end):
            sock.close()
        self.ctx.term()


@pytest.fixture
def forwarder(dataplane_impl: ModuleType) -> Iterator[Forwarder]:
    fw = Forwarder(dataplane_impl)
    try:
        fw.forward(2 * WINDOW)  # warm-up: the in-flight table and the sockets' pipes
        yield fw
    finally:
        fw.close()


def test_forward_round_trips(benchmark: Any, forwarder: Forwarder) -> None:
    # Given a data plane with one agent and one client registered
    n = SMOKE_N if benchmark.disabled else N
    # When N requests (and their replies) go through it, WINDOW in flight
    benchmark.pedantic(forwarder.forward, args=(n,), rounds=ROUNDS, iterations=1)
    # Expect every reply back (forward raises otherwise); record the rates
    if not benchmark.disabled:
        mean = benchmark.stats.stats.mean
        benchmark.extra_info["round_trips_per_s"] = round(n / mean)
        benchmark.extra_info["forwarded_msgs_per_s"] = round(2 * n / mean)
