"""Authorization per key (roles, command patterns, agent selectors), replay refusal and the
minimum protocol version: a CURVE broker over tcp on 127.0.0.1, real agents and clients."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq

import orbitmesh as om
from orbitmesh import acl
from orbitmesh._core.frame import pack_parts, unpack_parts
from orbitmesh._wire import HDR, header
from orbitmesh.acl import Policy
from orbitmesh.errors import ErrorCode
from orbitmesh.models import AgentInfo
from orbitmesh.protocol import Kind, Role, Route, Strategy
from orbitmesh.security import Keypair, KeyStore, PeerKeys, key_id

from .mesh import FAST

# ------------------------------------------------------------------ policy (no sockets)


def _info(name: str, groups: tuple[str, ...] = (), caps: tuple[str, ...] = (), **labels: str) -> AgentInfo:
    return AgentInfo(name, caps, groups, labels, (), 1, 0, "alive", 1)


def test_policy_validates_and_round_trips():
    p = Policy("client", ("math.*", "echo"), ("gpu-*", "group=edge", "label.zone=eu-*"))
    assert Policy.loads(p.dumps()) == p
    assert p.describe() == "client commands=math.*,echo agents=gpu-*,group=edge,label.zone=eu-*"
    for bad, why in [
        ({"role": "root"}, "role must be one of"),
        ({"role": "admin", "commands": ["x"]}, "admin key is unrestricted"),
        ({"agents": ["colour=red"]}, "use NAME-GLOB"),
        ({"agents": ["group="]}, "has no value"),
        ({"commands": [""]}, "non-empty"),
        ({"may_request": "yes"}, "true or false"),
        ({"role": "client", "extra": 1}, "unknown policy fields"),
    ]:
        with pytest.raises(ValueError, match=why):
            Policy.from_dict(bad)
    with pytest.raises(ValueError, match="not JSON"):
        Policy.loads("{")


def test_policy_decisions():
    agent, client, admin = Policy("agent"), Policy("client"), Policy("admin")
    helper = Policy("agent", may_request=True)
    assert agent.hello_refusal("agent") is None and agent.hello_refusal("client") is not None
    assert helper.hello_refusal("client") is None
    assert client.hello_refusal("agent") is not None and client.hello_refusal("client") is None
    assert admin.hello_refusal("agent") is None and admin.hello_refusal("client") is None
    assert agent.session_flags("agent") == acl.ACL_NO_REQUESTS
    assert helper.session_flags("agent") == 0 and client.session_flags("client") == 0
    assert Policy("client", ("a*",)).session_flags("client") == acl.ACL_CHECKED
    reach = Policy("client", agents=("gpu-*", "group=edge", "capability=cuda*", "label.zone=eu-*"))
    assert reach.agent_allowed(_info("gpu-7"))
    assert reach.agent_allowed(_info("x", groups=("edge",)))
    assert reach.agent_allowed(_info("x", caps=("cuda12",)))
    assert reach.agent_allowed(_info("x", zone="eu-west"))
    assert not reach.agent_allowed(_info("cpu-1", groups=("core",), zone="us-east"))
    assert reach.name_in_reach("gpu-3") and not reach.name_in_reach("edge-1")
    assert acl.in_reach([["gpu-*"], ["group=a"]], _info("gpu-1", groups=("a",)))
    assert not acl.in_reach([["gpu-*"], ["group=a"]], _info("gpu-1", groups=("b",)))


def test_key_store_snapshot_sees_every_change(tmp_path: Path):
    store = KeyStore(tmp_path)
    keys = [Keypair.generate() for _ in range(3)]
    snap = store.snapshot()
    assert snap.state(keys[0].public) is None
    # Changes in quick succession (within one file-system timestamp tick) are all seen
    for i, k in enumerate(keys):
        store.accept(k.public, Policy("client") if i else None)
        snap = store.snapshot()
        assert snap.state(k.public) == "accepted"
    assert snap.policy(keys[0].public) == Policy("agent") and snap.policy(keys[1].public) == Policy("client")
    store.set_policy(keys[1].public, Policy("client", ("a.*",)))
    assert store.snapshot().policy(keys[1].public).commands == ("a.*",)
    store.revoke(keys[2].public)
    assert store.snapshot().state(keys[2].public) == "revoked"
    # Once the store has been still for a while, the same snapshot is served without a re-read
    old = time.time() - 5
    for d in (*("accepted", "pending", "rejected", "revoked"), "policy"):
        os.utime(tmp_path / d, (old, old))
    first = store.snapshot()
    assert store.snapshot() is first
    store.reject(keys[0].public)  # ... until something changes
    assert store.snapshot().state(keys[0].public) == "rejected"
    # A damaged policy file grants the default (agent), never more
    (tmp_path / "policy" / key_id(keys[1].public)).write_text("{not json")
    os.utime(tmp_path / "policy", None)
    assert store.snapshot().policy(keys[1].public) == Policy("agent")


# ------------------------------------------------------------------ a secured mesh


class Mesh:
    """A CURVE broker with a key store, and helpers to make peers with a given policy."""

    def __init__(self, ctx: zmq.Context[Any], core: str, keys_dir: Path, **broker: Any) -> None:
        self.ctx = ctx
        self.broker = om.Broker("tcp://127.0.0.1:0", core=core, context=ctx, keys_dir=keys_dir, **FAST, **broker)
        self.store = KeyStore(keys_dir / "peers")
        self.closers: list[Any] = []
        self.sockets: list[zmq.Socket[Any]] = []

    async def __aenter__(self) -> Mesh:
        await self.broker.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def endpoint(self) -> str:
        return self.broker.endpoints[0]

    def keys(self, policy: Policy | None) -> PeerKeys:
        pair = Keypair.generate()
        if policy is not None:
            self.store.accept(pair.public, policy)
        assert self.broker.security is not None
        return PeerKeys(pair, self.broker.security.keys.public)

    async def agent(self, name: str, policy: Policy, **kw: Any) -> om.Agent:
        agent = om.Agent(name, self.endpoint, context=self.ctx, keys=self.keys(policy), **kw)

        @agent.handler(name="math.add")
        async def add(a: int, b: int) -> list[Any]:
            return [a + b, agent.name]

        @agent.handler(name="os.exec")
        async def exec_(cmd: str) -> str:
            return f"ran {cmd} on {agent.name}"

        @agent.raw_handler
        async def raw(frames: list[bytes]) -> bytes:
            return b"".join(frames)

        await agent.start(timeout=5)
        self.closers.append(agent.stop)
        return agent

    async def client(self, policy: Policy) -> om.MeshClient:
        client = om.MeshClient(self.endpoint, context=self.ctx, keys=self.keys(policy), timeout=5)
        await client.connect(timeout=5)
        self.closers.append(client.close)
        return client

    def dealer(self, policy: Policy | None) -> zmq.Socket[Any]:
        """A raw DEALER with a fresh key (accepted with ``policy``), to speak the protocol by hand."""
        sock = self.ctx.socket(zmq.DEALER)
        self.sockets.append(sock)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVTIMEO, 3000)
        for opt, value in self.keys(policy).socket_options().items():
            sock.setsockopt(opt, value)
        sock.connect(self.endpoint)
        return sock

    async def close(self) -> None:
        for sock in self.sockets:
            sock.close(0)
        for close in reversed(self.closers):
            await close()
        await self.broker.stop()


def test_roles_decide_who_may_connect_as_what(arun, ctx, core_impl, tmp_path):
    async def main():
        async with Mesh(ctx, core_impl, tmp_path / "keys") as mesh:
            await mesh.agent("gpu-1", Policy("agent"))
            # An agent key may not open a client session; a client key may not register an agent
            with pytest.raises(om.ForbiddenError, match="role 'agent' may not connect as 'client'"):
                await mesh.client(Policy("agent"))
            with pytest.raises(om.ForbiddenError, match="role 'client' may not connect as 'agent'"):
                await mesh.agent("rogue", Policy("client"))
            # ... unless allowed; and an admin key may be both
            helper = await mesh.client(Policy("agent", may_request=True))
            assert (await helper.invoke("gpu-1", "math.add", {"a": 1, "b": 2}))[0] == 3
            await mesh.agent("gpu-2", Policy("admin"))
            admin = await mesh.client(Policy("admin"))
            assert {a.name for a in await admin.agents()} == {"gpu-1", "gpu-2"}
            stats = await admin.stats()
            assert stats["forbidden"] == 2

    arun(main())


def _answer(sock: zmq.Socket[Any], corr: int) -> tuple[int, int, list[bytes]]:
    """(kind, code, frames) of the next message about ``corr`` (heartbeats skipped)."""
    while True:
        frames = unpack_parts(sock.recv_multipart())  # a protocol-2 session's answers are packed
        fields = HDR.unpack(frames[0])
        if fields[2] != Kind.HEARTBEAT and fields[7] == corr:
            return fields[2], fields[4], frames


def _hello(sock: zmq.Socket[Any], role: str, **extra: Any) -> tuple[int, int, list[bytes]]:
    body = {"role": role, "name": f"raw-{role}", "capacity": 1, "commands": ["x"], **extra}
    aux = Role.AGENT if role == "agent" else Role.CLIENT
    sock.send_multipart([header(Kind.HELLO, aux=aux, corr=1), b"", msgpack.packb(body)])
    return _answer(sock, 1)


def _request(sock: zmq.Socket[Any], corr: int, agent: str = "gpu-1", command: bytes = b"math.add") -> None:
    route = bytes((Route.NAME, Strategy.LEAST_LOADED)) + agent.encode()
    sock.send_multipart([header(Kind.REQUEST, corr=corr), route, command, msgpack.packb({"a": 1, "b": 1})])


def test_a_packed_hello_is_admitted_by_its_key(arun, ctx, core_impl, tmp_path):
    """The broker reads a HELLO's CURVE key from its connection's metadata; a HELLO in packed
    framing (unpacked into new parts) must still be admitted by its key, and refused without."""

    async def main():
        async with Mesh(ctx, core_impl, tmp_path / "keys") as mesh:
            loop = asyncio.get_running_loop()
            body = {"role": "client", "name": "packed", "protocol": 2}
            hello = pack_parts([header(Kind.HELLO, aux=Role.CLIENT, corr=1), b"", msgpack.packb(body)])
            assert len(hello) == 1  # one frame: the HELLO's parts inline
            sock = mesh.dealer(Policy("client"))
            sock.send_multipart(hello)
            kind, code, frames = await loop.run_in_executor(None, _answer, sock, 1)
            assert kind == Kind.WELCOME and msgpack.unpackb(frames[2])["protocol"] == 2, (kind, code)
            # ... and a session whose key lost its role is refused as ever
            agent_key = mesh.dealer(Policy("agent"))
            agent_key.send_multipart(hello)
            kind, code, _ = await loop.run_in_executor(None, _answer, agent_key, 1)
            assert (kind, code) == (Kind.ERROR, ErrorCode.FORBIDDEN)

    arun(main())


def test_agent_sessions_may_not_send_requests_and_replays_are_refused(arun, ctx, core_impl, tmp_path):
    async def main():
        async with Mesh(ctx, core_impl, tmp_path / "keys") as mesh:
            loop = asyncio.get_running_loop()
            await mesh.agent("gpu-1", Policy("agent"))
            # Given a raw session registered as an agent with an agent key
            rogue = mesh.dealer(Policy("agent"))
            good = mesh.dealer(Policy("client"))
            assert (await loop.run_in_executor(None, _hello, rogue, "agent"))[0] == Kind.WELCOME
            # When it sends a request, Expect FORBIDDEN from the data plane
            _request(rogue, 7)
            kind, code, frames = await loop.run_in_executor(None, _answer, rogue, 7)
            assert (kind, code) == (Kind.ERROR, ErrorCode.FORBIDDEN) and b"may not send" in frames[2]
            # Given a client session: requests work, a replayed corr (or an older one) is refused
            assert (await loop.run_in_executor(None, _hello, good, "client"))[0] == Kind.WELCOME
            _request(good, 10)
            kind, _, frames = await loop.run_in_executor(None, _answer, good, 10)
            assert kind == Kind.REPLY and msgpack.unpackb(frames[2])[0] == 2
            for corr in (10, 9, 0):
                _request(good, corr)
                kind, code, frames = await loop.run_in_executor(None, _answer, good, corr)
                assert (kind, code) == (Kind.ERROR, ErrorCode.REPLAYED), (corr, frames)
            _request(good, 11)  # the session goes on
            assert (await loop.run_in_executor(None, _answer, good, 11))[0] == Kind.REPLY
            admin = await mesh.client(Policy("admin"))
            await asyncio.sleep(FAST["heartbeat_interval"] * 2)  # counters come with the tick
            stats = await admin.stats()
            assert stats["forbidden"] >= 1 and stats["replayed"] == 3

    arun(main())


def test_command_patterns_and_agent_selectors(arun, ctx, core_impl, tmp_path):
    async def main():
        async with Mesh(ctx, core_impl, tmp_path / "keys") as mesh:
            await mesh.agent("gpu-1", Policy("agent"), groups=["gpu"], capabilities=["cuda"])
            await mesh.agent("gpu-2", Policy("agent"), groups=["gpu"], capabilities=["cuda"])
            await mesh.agent("cpu-1", Policy("agent"), groups=["cpu"], capabilities=["cuda"])
            narrow = await mesh.client(Policy("client", ("math.*",), ("group=gpu",)))
            # Commands outside the patterns are refused, whatever the route
            with pytest.raises(om.ForbiddenError, match="'os.exec' is not allowed"):
                await narrow.invoke("gpu-1", "os.exec", {"cmd": "rm -rf /"})
            with pytest.raises(om.ForbiddenError, match="'@raw' is not allowed"):
                await narrow.send_raw("gpu-1", b"bytes")
            with pytest.raises(om.ForbiddenError):
                await narrow.execute(om.Select(), "os.exec", {"cmd": "x"})
            # A named agent out of reach is refused; one in reach answers
            with pytest.raises(om.ForbiddenError, match="'cpu-1' is not within this key's reach"):
                await narrow.invoke("cpu-1", "math.add", {"a": 1, "b": 1})
            with pytest.raises(om.ForbiddenError, match="'nowhere' is not within"):
                await narrow.invoke("nowhere", "math.add", {"a": 1, "b": 1})
            assert await narrow.invoke("gpu-1", "math.add", {"a": 1, "b": 1}) == [2, "gpu-1"]
            # Selectors are narrowed to the agents in reach: cpu-1 serves cuda too, but never gets one
            for target in (om.Select(capability="cuda"), om.Select(), om.Select(labels={}, capability="cuda")):
                served = {(await narrow.invoke(target, "math.add", {"a": i, "b": 0}))[1] for i in range(12)}
                assert served <= {"gpu-1", "gpu-2"} and served, (target, served)
            with pytest.raises(om.RoutingError) as none:
                await narrow.invoke(om.Select(group="cpu"), "math.add", {"a": 1, "b": 1})
            assert none.value.code == ErrorCode.NO_AGENT_AVAILABLE and "within this key's reach" in none.value.message
            # Tracked jobs follow the same narrowing
            jobs = [await narrow.execute(om.Select(capability="cuda"), "math.add", {"a": i, "b": 1}) for i in range(6)]
            assert {(await j.result(timeout=5))[1] for j in jobs} <= {"gpu-1", "gpu-2"}
            # Queries: only the agents in reach, no stats, no jobs of other commands
            assert {a.name for a in await narrow.agents()} == {"gpu-1", "gpu-2"}
            with pytest.raises(om.ForbiddenError, match="admin"):
                await narrow.stats()
            admin = await mesh.client(Policy("admin"))
            other = await admin.execute("cpu-1", "os.exec", {"cmd": "ls"})
            assert await other.result(timeout=5) == "ran ls on cpu-1"
            with pytest.raises(om.ForbiddenError):
                await narrow.get_job(other.id)
            with pytest.raises(om.ForbiddenError):
                await narrow.cancel(other.id)
            listed = await narrow.list_jobs(limit=100)
            assert {j.command for j in listed} == {"math.add"} and len(listed) == 6
            with pytest.raises(om.ForbiddenError):
                await narrow.list_jobs(command="os.exec")
            assert len(await admin.list_jobs(limit=100)) == 7
            with pytest.raises(om.ForbiddenError, match="agent and custom events only"):
                await narrow.subscribe(["job"])
            assert narrow._subscriptions == []
            # Every refusal was counted
            assert (await admin.stats())["forbidden"] >= 10

    arun(main())


def test_policy_changes_apply_to_live_sessions(arun, ctx, core_impl, tmp_path):
    async def main():
        async with Mesh(ctx, core_impl, tmp_path / "keys") as mesh:
            loop = asyncio.get_running_loop()
            await mesh.agent("gpu-1", Policy("agent"))
            keys = mesh.keys(Policy("client"))
            client = om.MeshClient(mesh.endpoint, context=ctx, keys=keys, timeout=5)
            await client.connect(timeout=5)
            mesh.closers.append(client.close)
            assert (await client.invoke("gpu-1", "os.exec", {"cmd": "ls"})).startswith("ran ls")
            # When the operator narrows its commands, Expect the next requests refused within a tick
            mesh.store.set_policy(keys.keys.public, Policy("client", ("math.*",)))
            deadline = loop.time() + 3
            while True:
                try:
                    await client.invoke("gpu-1", "os.exec", {"cmd": "ls"})
                except om.ForbiddenError:
                    break
                assert loop.time() < deadline, "the narrowed policy never took effect"
                await asyncio.sleep(0.05)
            assert (await client.invoke("gpu-1", "math.add", {"a": 2, "b": 2}))[0] == 4
            # When it is widened again, Expect the fast path back (no policy check needed)
            mesh.store.set_policy(keys.keys.public, Policy("client"))
            deadline = loop.time() + 3
            while True:
                try:
                    await client.invoke("gpu-1", "os.exec", {"cmd": "ls"})
                    break
                except om.ForbiddenError:
                    assert loop.time() < deadline, "the widened policy never took effect"
                    await asyncio.sleep(0.05)
            # When its role no longer allows a client session, Expect the session closed
            mesh.store.set_policy(keys.keys.public, Policy("agent"))
            deadline = loop.time() + 3
            while client.connected:
                assert loop.time() < deadline, "the session outlived a role that forbids it"
                await asyncio.sleep(0.05)
            with pytest.raises((om.NotConnectedError, om.ForbiddenError, om.TimeoutError)):
                await client.invoke("gpu-1", "math.add", {"a": 1, "b": 1}, timeout=0.5)

    arun(main())


def test_an_older_protocol_is_refused(arun, ctx, core_impl, tmp_path):
    with pytest.raises(ValueError, match="min_protocol"):
        om.Broker("tcp://127.0.0.1:0", min_protocol=3)

    async def main():
        async with Mesh(ctx, core_impl, tmp_path / "keys") as mesh:
            loop = asyncio.get_running_loop()
            sock = mesh.dealer(Policy("client"))

            def hello(offered: Any) -> tuple[int, int, list[bytes]]:
                return _hello(sock, "client", protocol=offered)

            for offered, expect in [(0, ErrorCode.UNSUPPORTED_VERSION), ("1", ErrorCode.BAD_HELLO)]:
                kind, code, frames = await loop.run_in_executor(None, hello, offered)
                assert (kind, code) == (Kind.ERROR, expect), frames
            assert b"requires v1 or newer" in (await loop.run_in_executor(None, hello, 0))[2][2]
            kind, _, frames = await loop.run_in_executor(None, hello, 1)
            assert kind == Kind.WELCOME and msgpack.unpackb(frames[2])["protocol"] == 1
            # A newer offer gets the newest both speak: 2 (packed framing)
            kind, _, frames = await loop.run_in_executor(None, hello, 7)
            assert kind == Kind.WELCOME and msgpack.unpackb(frames[2])["protocol"] == 2

    arun(main())


def test_hostile_label_routes_from_a_restricted_key_get_bad_route(arun, ctx, core_impl, tmp_path):
    async def main():
        async with Mesh(ctx, core_impl, tmp_path / "keys") as mesh:
            loop = asyncio.get_running_loop()
            await mesh.agent("gpu-1", Policy("agent"))
            sock = mesh.dealer(Policy("client", agents=("gpu-*",)))
            assert (await loop.run_in_executor(None, _hello, sock, "client"))[0] == Kind.WELCOME
            specs: list[bytes] = [
                msgpack.packb({"acl": 5}),
                msgpack.packb({"acl": [[1]]}),
                msgpack.packb({"acl": "gpu-*"}),
                msgpack.packb([1, 2]),
                b"\xc1",
            ]
            for corr, spec in enumerate(specs, start=1):
                route = bytes((Route.LABELS, Strategy.LEAST_LOADED)) + spec
                sock.send_multipart([header(Kind.REQUEST, corr=corr), route, b"math.add", msgpack.packb({})])
                kind, code, frames = await loop.run_in_executor(None, _answer, sock, corr)
                assert (kind, code) == (Kind.ERROR, ErrorCode.BAD_ROUTE), (spec, frames)
            # A client's own acl only narrows further: no agent is in group "none"
            route = bytes((Route.LABELS, 0)) + msgpack.packb({"acl": [["group=none"]]})
            params = msgpack.packb({"a": 1, "b": 2})
            sock.send_multipart([header(Kind.REQUEST, corr=99), route, b"math.add", params])
            kind, code, _ = await loop.run_in_executor(None, _answer, sock, 99)
            assert (kind, code) == (Kind.ERROR, ErrorCode.NO_AGENT_AVAILABLE)

    arun(main())


def test_refused_hellos_leave_no_session_behind(arun, ctx, core_impl, tmp_path):
    async def main():
        async with Mesh(ctx, core_impl, tmp_path / "keys") as mesh:
            loop = asyncio.get_running_loop()
            await mesh.agent("gpu-1", Policy("agent"))
            socks = [mesh.dealer(Policy("admin")) for _ in range(6)]
            # Given HELLOs refused for their body, their name, or their role's policy
            for i, sock in enumerate(socks):
                extra: dict[str, Any] = [{"name": "gpu-1"}, {"capacity": 0}, {"name": ""}][i % 3]
                kind, code, _ = await loop.run_in_executor(None, lambda s=sock, e=extra: _hello(s, "agent", **e))
                assert (kind, code) in ((Kind.ERROR, ErrorCode.NAME_TAKEN), (Kind.ERROR, ErrorCode.BAD_HELLO))
            # Expect only the live agent's session kept (refused peers are never reported lost)
            assert len(mesh.broker._sessions) == 1
            # And a session that is refused on a second HELLO keeps what it had
            kind, _, _ = await loop.run_in_executor(None, _hello, socks[0], "client")
            assert kind == Kind.WELCOME and len(mesh.broker._sessions) == 2
            kind, code, _ = await loop.run_in_executor(None, lambda: _hello(socks[0], "agent", name="gpu-1"))
            assert (kind, code) == (Kind.ERROR, ErrorCode.NAME_TAKEN)
            assert len(mesh.broker._sessions) == 2

    arun(main())
