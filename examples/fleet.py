"""A fleet: several agents with capabilities and labels, broker-side selection,
``execute_on_all`` and event subscription.

Run: ``python examples/fleet.py``
"""

from __future__ import annotations

import asyncio

import orbitmesh as om

FLEET = [
    ("gpu-eu-1", ["gpu"], {"zone": "eu-west", "tier": "large"}),
    ("gpu-us-1", ["gpu"], {"zone": "us-east", "tier": "large"}),
    ("cpu-eu-1", ["cpu"], {"zone": "eu-west", "tier": "small"}),
    ("cpu-us-1", ["cpu"], {"zone": "us-east", "tier": "small"}),
]


def make_agent(name: str, endpoint: str, capabilities: list[str], labels: dict[str, str]) -> om.Agent:
    agent = om.Agent(name, endpoint, capabilities=capabilities, groups=["fleet"], labels=labels, capacity=4)

    @agent.handler
    async def whoami() -> str:
        return name

    @agent.handler
    async def busy(seconds: float) -> str:
        await asyncio.sleep(seconds)
        return name

    @agent.handler
    async def health() -> dict[str, object]:
        if name == "cpu-us-1":
            raise RuntimeError("disk almost full")
        return {"served": agent.served, "zone": labels["zone"]}

    return agent


async def main() -> None:
    async with om.Broker("inproc://orbitmesh-fleet") as broker:
        endpoint = broker.endpoints[0]
        async with om.MeshClient(endpoint, timeout=5.0) as client:
            events = await client.subscribe(["agent"])
            agents = [make_agent(name, endpoint, caps, labels) for name, caps, labels in FLEET]
            for agent in agents:
                await agent.start()
            for _ in agents:
                event = await events.get(timeout=2.0)
                print(f"event {event.type}: {event.data['name']} {event.data['labels']}")

            # Broker-side selection by capability, with each strategy
            rr = [await client.invoke(om.Select(capability="gpu", strategy="round_robin"), "whoami") for _ in range(4)]
            print("round_robin over gpu:", ", ".join(rr))
            picked = {await client.invoke(om.Select(group="fleet", strategy="random"), "whoami") for _ in range(40)}
            print("random over the fleet reached", len(picked), "agents")
            hold = client.submit("gpu-eu-1", "busy", [0.3])
            await asyncio.sleep(0.05)
            idle = await client.invoke(om.Select(capability="gpu"), "whoami")
            print("least_loaded gpu while gpu-eu-1 is busy:", idle)
            await hold

            # Labels may be globs, and combine with a capability
            us_cpu = await client.invoke(om.Select(labels={"zone": "us-*"}, capability="cpu"), "whoami")
            print("labels zone=us-*:", us_cpu)
            small = await client.agents(labels={"tier": "small"})
            print("small tier:", ", ".join(sorted(a.name for a in small)))

            # The same command on every agent of a group, each answer or error reported
            outcomes = await client.execute_on_all("health", group="fleet")
            for name in sorted(outcomes):
                outcome = outcomes[name]
                print(f"health {name}: {outcome.value if outcome.ok else outcome.error}")
            ok = sum(o.ok for o in outcomes.values())
            print(f"execute_on_all: {ok} ok, {len(outcomes) - ok} failed")

            # Agents leaving are events too
            for agent in agents:
                await agent.stop()
            left = [(await events.get(timeout=2.0)).type for _ in agents]
            print("events on shutdown:", ", ".join(sorted(set(left))), f"x{len(left)}")
            await events.aclose()
    print("fleet done")


if __name__ == "__main__":
    om.run(main())
