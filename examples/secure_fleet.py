"""A secured fleet: CURVE encryption, key admission, roles and policies, revocation.

The broker keeps its keypair and the peers' key store in a directory. An agent with an unknown
key waits as *pending* until an operator accepts it; each accepted key has a policy: an agent
key serves, a client key may be limited to command patterns and to agents in reach, an admin
key may do everything. Revoking a key closes its live session.

Run: ``python examples/secure_fleet.py``
"""

from __future__ import annotations

import asyncio
import logging
import sys
import tempfile

import orbitmesh as om


def edge_agent(name: str, endpoint: str, keys: om.PeerKeys) -> om.Agent:
    agent = om.Agent(name, endpoint, groups=["edge"], keys=keys)

    @agent.handler(name="status.disk")
    async def disk() -> str:
        return f"{name}: 42% used"

    @agent.handler(name="admin.reboot")
    async def reboot() -> str:
        return f"{name}: rebooting"

    return agent


async def main(keys_dir: str) -> None:
    async with om.Broker("tcp://127.0.0.1:0", keys_dir=keys_dir, heartbeat_interval=0.2) as broker:
        endpoint = broker.endpoints[0]
        assert broker.security is not None
        server_key = broker.security.keys.public  # peers pin this
        store = om.KeyStore(f"{keys_dir}/peers")

        # An agent with a key nobody has accepted yet: refused, and its key waits as pending
        agent_keys = om.Keypair.generate()
        agent = edge_agent("edge-1", endpoint, om.PeerKeys(agent_keys, server_key))
        try:
            await agent.start(timeout=0.5)
        except om.NotConnectedError:
            print(f"edge-1 refused; pending keys: {len(store.list()['pending'])}")
        store.accept(agent_keys.public, om.Policy("agent"))  # what `orbitmesh keys accept` does
        await agent.start(timeout=5)
        print("edge-1 accepted and connected")

        # An operator key that may read status on edge agents, and nothing else
        operator_keys, admin_keys = om.Keypair.generate(), om.Keypair.generate()
        store.accept(operator_keys.public, om.Policy("client", commands=("status.*",), agents=("group=edge",)))
        store.accept(admin_keys.public, om.Policy("admin"))
        operator = om.MeshClient(endpoint, keys=om.PeerKeys(operator_keys, server_key), timeout=5)
        admin = om.MeshClient(endpoint, keys=om.PeerKeys(admin_keys, server_key), timeout=5)
        async with operator, admin:
            print("operator:", await operator.invoke(om.Select(group="edge"), "status.disk"))
            try:
                await operator.invoke("edge-1", "admin.reboot")
            except om.ForbiddenError as exc:
                print(f"operator reboot -> {exc.code.name}: {exc.message}")
            print("admin:", await admin.invoke("edge-1", "admin.reboot"))

            # Revoking the agent's key closes its session within a heartbeat or two
            store.revoke(agent_keys.public)
            for _ in range(50):
                if not await admin.agents():
                    break
                await asyncio.sleep(0.1)
            print(
                f"after revoke: {len(await admin.agents())} agents; forbidden so far: "
                f"{(await admin.stats())['forbidden']}"
            )
        await agent.stop()


if __name__ == "__main__":
    # Warnings (a refused key, a revoked session) go to stdout here, to show them.
    logging.basicConfig(stream=sys.stdout, level=logging.WARNING, format="log: %(name)s: %(message)s")
    with tempfile.TemporaryDirectory() as keys:
        om.run(main(keys))
    print("secure_fleet done")
