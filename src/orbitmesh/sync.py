"""A blocking facade over MeshClient for programs without an event loop.

The client runs on its own event loop in a background thread; every method
blocks the caller until the result is back or the call's timeout passes.
"""

from __future__ import annotations

import asyncio
import builtins
import threading
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

from .client import MeshClient, Outcome, Target
from .errors import TimeoutError
from .models import AgentInfo, JobInfo
from .runtime import new_event_loop

T = TypeVar("T")


class BlockingClient:
    """Blocking twin of :class:`MeshClient`; takes the same arguments. Close it (or use ``with``)."""

    def __init__(self, broker: str, *, connect_timeout: float = 10.0, **kwargs: Any) -> None:
        self._loop = new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="orbitmesh-blocking-client", daemon=True)
        self._thread.start()
        self.timeout: float = kwargs.get("timeout", 30.0)
        try:
            self._client = self._run(self._make(broker, connect_timeout, kwargs), connect_timeout + 1.0)
        except BaseException:
            self._stop_loop()
            raise

    async def _make(self, broker: str, connect_timeout: float, kwargs: dict[str, Any]) -> MeshClient:
        return await MeshClient(broker, **kwargs).connect(connect_timeout)

    def _run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        fut = asyncio.run_coroutine_threadsafe(coro, self._loop)
        wait = (self.timeout if timeout is None else timeout) + 1.0
        try:
            return fut.result(wait)
        except builtins.TimeoutError:
            if fut.done():
                raise  # the call's own TimeoutError
            fut.cancel()
            raise TimeoutError(f"call did not finish within {wait:.3g} s") from None

    def invoke(self, agent: Target, command: str, params: Any = None, **kwargs: Any) -> Any:
        """Blocking ``MeshClient.invoke``."""
        return self._run(self._client.invoke(agent, command, params, **kwargs), kwargs.get("timeout"))

    def execute(self, agent: Target, command: str, params: Any = None, **kwargs: Any) -> int:
        """Submit a tracked job; returns its id (see ``wait_job`` / ``job_result``)."""
        job = self._run(self._client.execute(agent, command, params, **kwargs), kwargs.get("timeout"))
        return job.id

    def wait_job(self, job_id: int, timeout: float | None = None) -> JobInfo:
        """Wait until the job is terminal; returns its record."""
        to = self.timeout if timeout is None else timeout
        return self._run(self._client.wait_job(job_id, timeout=to), to + 1.0)

    def job_result(self, job_id: int, timeout: float | None = None) -> Any:
        """Wait for a job and return its decoded result, or raise its error."""
        return self._client.job_result(self.wait_job(job_id, timeout))

    def get_job(self, job_id: int) -> JobInfo:
        return self._run(self._client.get_job(job_id))

    def send_raw(self, agent: Target, data: Any, *, timeout: float | None = None) -> bytes:
        """Blocking ``MeshClient.send_raw``."""
        return self._run(self._client.send_raw(agent, data, timeout=timeout), timeout)

    def agents(self, **filters: Any) -> list[AgentInfo]:
        return self._run(self._client.agents(**filters))

    def select_agent(self, **kwargs: Any) -> AgentInfo:
        return self._run(self._client.select_agent(**kwargs))

    def execute_on_all(self, command: str, params: Any = None, **kwargs: Any) -> dict[str, Outcome[Any]]:
        return self._run(self._client.execute_on_all(command, params, **kwargs), kwargs.get("timeout"))

    def stream(self, agent: Target, command: str, params: Any = None, **kwargs: Any) -> Iterator[Any]:
        """Blocking iteration over a streaming handler's items."""
        it = self._client.stream(agent, command, params, **kwargs)
        try:
            while True:
                try:
                    yield self._run(it.__anext__(), kwargs.get("timeout"))
                except StopAsyncIteration:
                    return
        finally:
            self._run(it.aclose(), 5.0)

    def stats(self) -> dict[str, Any]:
        return self._run(self._client.stats())

    def close(self) -> None:
        """Close the client and stop its loop thread."""
        if self._loop.is_closed():
            return
        try:
            self._run(self._client.close(), 5.0)
        finally:
            self._stop_loop()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5.0)
        if not self._thread.is_alive():
            self._loop.close()

    def __enter__(self) -> BlockingClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
