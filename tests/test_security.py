"""CURVE + ZAP admission over real tcp sockets on 127.0.0.1: only accepted keys get in,
unknown keys wait as pending, the store is read at every handshake (no restart)."""

from __future__ import annotations

import asyncio
import time

import pytest

import orbitmesh as om
from orbitmesh.acl import Policy
from orbitmesh.security import Keypair, KeyStore, PeerKeys, is_loopback, key_id

from .mesh import FAST


def test_only_accepted_keys_get_in(arun, ctx, core_impl, tmp_path):
    keys_dir = tmp_path / "keys"

    async def main():
        broker = om.Broker("tcp://127.0.0.1:0", core=core_impl, context=ctx, keys_dir=keys_dir, **FAST)
        await broker.start()
        try:
            assert broker.security is not None
            server = broker.security.keys.public
            store = KeyStore(keys_dir / "peers")
            agent_keys, client_keys, stranger = Keypair.generate(), Keypair.generate(), Keypair.generate()
            store.accept(agent_keys.public)
            store.accept(client_keys.public, Policy("client"))
            agent = om.Agent("secure", broker.endpoints[0], context=ctx, keys=PeerKeys(agent_keys, server))

            @agent.handler
            async def hello(name: str) -> str:
                return f"hello {name}"

            await agent.start(timeout=5)
            try:
                # Given accepted keys, Expect the call to work end to end (encrypted)
                client = om.MeshClient(broker.endpoints[0], context=ctx, keys=PeerKeys(client_keys, server))
                await client.connect(timeout=5)
                assert await client.invoke("secure", "hello", ["you"]) == "hello you"
                await client.close()
                # An unknown key gets nothing: no WELCOME, and it waits in pending
                intruder = om.MeshClient(broker.endpoints[0], context=ctx, keys=PeerKeys(stranger, server))
                with pytest.raises(om.NotConnectedError):
                    await intruder.connect(timeout=0.6)
                assert store.state(stranger.public) == "pending"
                assert key_id(stranger.public) in [row[0] for row in store.list()["pending"]]
                # Without keys at all: nothing either
                bare = om.MeshClient(broker.endpoints[0], context=ctx)
                with pytest.raises(om.NotConnectedError):
                    await bare.connect(timeout=0.4)
                # A wrong idea of the server's key: nothing
                wrong = om.MeshClient(
                    broker.endpoints[0], context=ctx, keys=PeerKeys(client_keys, Keypair.generate().public)
                )
                with pytest.raises(om.NotConnectedError):
                    await wrong.connect(timeout=0.4)
                # When an operator accepts the pending key, Expect it in at once, no broker restart
                store.accept(key_id(stranger.public)[:12], Policy("client"))
                late = om.MeshClient(broker.endpoints[0], context=ctx, keys=PeerKeys(stranger, server))
                await late.connect(timeout=5)
                assert await late.invoke("secure", "hello", ["late"]) == "hello late"
                await late.close()
                # And a revoked or rejected key is refused again for new connections
                store.revoke(stranger.public)
                again = om.MeshClient(broker.endpoints[0], context=ctx, keys=PeerKeys(stranger, server))
                with pytest.raises(om.NotConnectedError):
                    await again.connect(timeout=0.6)
                # (no keys or a wrong server key fail the handshake itself, before ZAP is asked)
                assert store.state(stranger.public) == "revoked" and broker.security.refused == 2
            finally:
                await agent.stop()
        finally:
            await broker.stop()

    arun(main())


def test_keypair_files_round_trip(tmp_path):
    keys = Keypair.generate()
    public_file, secret_file = keys.save(tmp_path, "agent-1")
    assert Keypair.load(secret_file) == keys
    assert Keypair.load(public_file) == Keypair(keys.public)
    assert oct(secret_file.stat().st_mode & 0o777) == "0o600"
    with pytest.raises(om.OrbitMeshError, match="cannot read key file"):
        Keypair.load(tmp_path / "missing.key")


def test_plaintext_is_refused_off_loopback():
    # A broker that would listen beyond this machine without CURVE is refused before it binds
    with pytest.raises(ValueError, match="refusing plaintext"):
        om.Broker("tcp://0.0.0.0:5555")
    om.Broker("tcp://0.0.0.0:5555", allow_plaintext=True)  # an explicit opt-in (logged at start)
    om.Broker("tcp://127.0.0.1:5555", "ipc:///tmp/x.sock", "inproc://x")  # loopback needs none


@pytest.mark.parametrize(
    ("endpoint", "loopback"),
    [
        ("inproc://a", True),
        ("ipc:///tmp/a", True),
        ("tcp://127.0.0.1:1", True),
        ("tcp://127.9.9.9:1", True),
        ("tcp://[::1]:1", True),
        ("tcp://localhost:1", True),
        ("tcp://0.0.0.0:1", False),
        ("tcp://*:1", False),
        ("tcp://10.1.2.3:1", False),
        ("tcp://eth0:1", False),
    ],
)
def test_is_loopback(endpoint, loopback):
    assert is_loopback(endpoint) is loopback


def test_revoked_key_loses_its_live_session_and_names_stay_with_their_keys(arun, ctx, core_impl, tmp_path):
    keys_dir = tmp_path / "keys"

    async def main():
        broker = om.Broker("tcp://127.0.0.1:0", core=core_impl, context=ctx, keys_dir=keys_dir, **FAST)
        await broker.start()
        try:
            assert broker.security is not None
            server = broker.security.keys.public
            store = KeyStore(keys_dir / "peers")
            first, second, client_keys = Keypair.generate(), Keypair.generate(), Keypair.generate()
            for k in (first, second):
                store.accept(k.public)
            store.accept(client_keys.public, Policy("client"))
            client = om.MeshClient(broker.endpoints[0], context=ctx, keys=PeerKeys(client_keys, server), timeout=5)
            await client.connect(timeout=5)
            agent = om.Agent("worker", broker.endpoints[0], context=ctx, keys=PeerKeys(first, server))

            @agent.handler
            async def ping() -> str:
                return "pong"

            await agent.start(timeout=5)
            try:
                assert await client.invoke("worker", "ping") == "pong"
                # When its key is revoked while it is connected,
                # Expect its session closed within a couple of heartbeats
                store.revoke(first.public)
                deadline = asyncio.get_running_loop().time() + 3
                while [a.name for a in await client.agents()] and asyncio.get_running_loop().time() < deadline:
                    await asyncio.sleep(0.05)
                assert await client.agents() == []
                with pytest.raises(om.RoutingError) as info:
                    await client.invoke("worker", "ping")
                assert info.value.code == om.ErrorCode.NO_SUCH_AGENT
            finally:
                await agent.stop(drain_timeout=0.5)
            # The name "worker" is bound to the first key: another accepted key cannot take it
            impostor = om.Agent("worker", broker.endpoints[0], context=ctx, keys=PeerKeys(second, server))
            with pytest.raises(om.RoutingError) as taken:
                await impostor.start(timeout=5)
            assert taken.value.code == om.ErrorCode.NAME_TAKEN and "another key" in taken.value.message
            await client.close()
        finally:
            await broker.stop()

    arun(main())


def test_stalled_handshakes_are_dropped_and_pending_keys_are_bounded(arun, ctx, core_impl, tmp_path):
    import socket

    async def main():
        broker = om.Broker(
            "tcp://127.0.0.1:0", core=core_impl, context=ctx, keys_dir=tmp_path / "keys", handshake_timeout=0.5, **FAST
        )
        await broker.start()
        loop = asyncio.get_running_loop()
        try:
            assert broker.security is not None
            # Given a connection that sends half a ZMTP greeting and stalls
            host, port = broker.endpoints[0].rsplit("/", 1)[1].rsplit(":", 1)

            def stall() -> float:
                t0 = time.monotonic()
                with socket.create_connection((host, int(port)), timeout=5) as s:
                    s.sendall(b"\xff\x00\x00\x00\x00")
                    while s.recv(4096):  # the broker's own greeting, then EOF when it drops us
                        pass
                return time.monotonic() - t0

            # Expect the broker to drop it after the handshake timeout, not libzmq's 30 s
            assert await loop.run_in_executor(None, stall) < 3.0
            # Given a flood of fresh unknown keys, Expect the pending list to stop growing at its cap
            store = broker.security.store
            store.max_pending = 3
            server = broker.security.keys.public
            for _ in range(6):
                stranger = om.MeshClient(
                    broker.endpoints[0], context=ctx, keys=PeerKeys(Keypair.generate(), server), timeout=1
                )
                with pytest.raises(om.NotConnectedError):
                    await stranger.connect(timeout=0.3)
            assert len(store.list()["pending"]) == 3 and broker.security.refused >= 6
        finally:
            await broker.stop()

    arun(main())
