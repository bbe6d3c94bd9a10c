"""Streaming with back-pressure, and raw bytes of a numpy array.

A streaming handler is an async generator; the client's ``window`` bounds how
far the producer may run ahead of a slow consumer. ``send_raw`` hands a numpy
array's buffer to the agent's raw handler without serialising it.

Run: ``python examples/streaming.py``
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from typing import Any

import numpy as np

import orbitmesh as om


async def main() -> None:
    async with om.Broker("inproc://orbitmesh-streaming") as broker:
        endpoint = broker.endpoints[0]
        agent = om.Agent("sensor", endpoint)
        produced = 0

        @agent.handler
        async def readings(n: int) -> AsyncIterator[dict[str, Any]]:
            nonlocal produced
            for i in range(n):
                produced += 1
                yield {"seq": i, "value": math.sin(i / 10)}

        @agent.raw_handler
        def normalise(frames: list[Any]) -> np.ndarray:
            data = np.frombuffer(frames[0], dtype=np.float64)
            return (data - data.mean()) / data.std()  # any bytes-like result goes back as is

        async with agent, om.MeshClient(endpoint, timeout=5.0) as client:
            # A slow consumer: the producer is held back to the window
            window = 8
            ahead = 0
            total = 0.0
            async for reading in client.stream("sensor", "readings", {"n": 100}, window=window):
                await asyncio.sleep(0.002)
                total += reading["value"]
                ahead = max(ahead, produced - (reading["seq"] + 1))
            print(f"consumed 100 readings (sum {total:.3f}); producer at most {ahead} ahead, window {window}")

            # Leaving the loop early cancels the generator on the agent
            produced = 0
            stream = client.stream("sensor", "readings", {"n": 1_000_000}, window=16)
            async for reading in stream:
                if reading["seq"] == 9:
                    break
            await stream.aclose()
            print(f"stopped after 10 of 1000000 readings; the agent produced {produced}")

            # Raw bytes: a numpy array goes out zero-copy and comes back as bytes
            samples = np.random.default_rng(0).normal(5.0, 2.0, 100_000)
            reply = await client.send_raw("sensor", samples)
            out = np.frombuffer(reply, dtype=np.float64)
            print(f"normalised {out.size} float64 values: mean {out.mean():.3f}, std {out.std():.3f}")
    print("streaming done")


if __name__ == "__main__":
    om.run(main())
