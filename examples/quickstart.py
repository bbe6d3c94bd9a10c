"""Quick start: a broker, an agent and a client in one process, over inproc.

Run: ``python examples/quickstart.py``
"""

from __future__ import annotations

import asyncio

import orbitmesh as om


async def main() -> None:
    async with om.Broker("inproc://orbitmesh-quickstart") as broker:
        endpoint = broker.endpoints[0]
        agent = om.Agent("worker-1", endpoint, capabilities=["math"])

        @agent.handler
        async def square(x: int) -> int:
            return x * x

        @agent.handler
        def add(a: int, b: int) -> int:  # a sync handler runs on the agent's thread pool
            return a + b

        async with agent, om.MeshClient(endpoint, timeout=5.0) as client:
            # invoke: call a handler by agent name, or let the broker pick by capability
            print("square(12) =", await client.invoke("worker-1", "square", {"x": 12}))
            print("add(2, 3) =", await client.invoke(om.Select(capability="math"), "add", [2, 3]))

            # execute: a tracked job the broker keeps a record of
            job = await client.execute("worker-1", "square", [7])
            print(f"job {job.id} result =", await job.result(timeout=5))
            info = await job.info()
            print(f"job {job.id} state = {info.state.value} on {info.agent}")

            # submit_job: execute's pipelining form, two futures and no task per job
            sent = [client.submit_job("worker-1", "square", [n]) for n in range(1, 101)]
            results = await asyncio.gather(*(s.result for s in sent))
            print(f"100 pipelined jobs: sum of squares = {sum(results)}")

            # errors come back typed
            try:
                await client.invoke("worker-1", "cube", [3])
            except om.RemoteError as exc:
                print("unknown command ->", exc.code.name)
    print("quickstart done")


if __name__ == "__main__":
    om.run(main())
