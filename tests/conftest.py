"""Shared fixtures: both cores (compiled and pure Python), both event loops, and
teardown checks that fail a test which leaves a socket, a context or a task behind."""

from __future__ import annotations

import asyncio
import importlib
import itertools
import os
import tempfile
import threading
import warnings
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
import zmq

from orbitmesh.runtime import new_event_loop

try:  # a failing hypothesis example imports this; its libcst import warns, an error under filterwarnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import hypothesis.extra._patching  # noqa: F401
except ImportError:
    pass

_ids = itertools.count()


@pytest.fixture(params=["c", "py"])
def core_impl(request: pytest.FixtureRequest) -> str:
    """Each broker test runs on the compiled data plane and on its pure-Python twin."""
    impl: str = request.param
    if impl == "c":
        # No silent fallback: an unbuilt core is an error, not a skip.
        importlib.import_module("orbitmesh._core._dataplane_c")
    return impl


@pytest.fixture(params=["uvloop", "asyncio"])
def loop_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def ctx() -> Any:
    """A private zmq context; teardown fails if any socket on it is still open."""
    context = zmq.Context()
    yield context
    t = threading.Thread(target=context.term, daemon=True)
    t.start()
    t.join(5.0)
    if t.is_alive():
        pytest.fail("the test left zmq sockets open (context.term() did not return)")


@pytest.fixture
def arun(loop_kind: str) -> Callable[..., Any]:
    """Run a coroutine on a fresh loop of the parametrised kind, with a hard timeout;
    fails if tasks are left running afterwards."""

    def run(coro: Coroutine[Any, Any, Any], timeout: float = 30.0) -> Any:
        loop = new_event_loop(loop_kind)
        try:
            result = loop.run_until_complete(asyncio.wait_for(coro, timeout))
            leftover = [t for t in asyncio.all_tasks(loop) if not t.done()]
            for t in leftover:
                t.cancel()
            if leftover:
                loop.run_until_complete(asyncio.gather(*leftover, return_exceptions=True))
                pytest.fail(f"tasks left running: {leftover}")
            return result
        finally:
            loop.close()

    return run


def subprocess_env(**extra: str) -> dict[str, str]:
    """Environment for a child Python that must import the same orbitmesh as this test run
    (the installed package in CI, ``src`` with in-place builds in development)."""
    import orbitmesh

    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(orbitmesh.__file__)))
    env = dict(os.environ, PYTHONPATH=package_parent, **extra)
    return env


def endpoint_for(transport: str) -> str:
    """A fresh endpoint on ``transport`` (tcp on 127.0.0.1 with a free port chosen at bind)."""
    n = next(_ids)
    if transport == "inproc":
        return f"inproc://orbitmesh-test-{os.getpid()}-{n}"
    if transport == "ipc":
        return f"ipc://{tempfile.gettempdir()}/orbitmesh-test-{os.getpid()}-{n}.sock"
    if transport == "tcp":
        return "tcp://127.0.0.1:0"
    raise ValueError(transport)
