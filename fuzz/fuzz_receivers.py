"""Coverage-guided differential fuzzing of what clients and agents do with received batches
(atheris / libFuzzer): the client's call table (``CallTable.settle``) and the agent's request
dispatcher (``Dispatcher.serve``), compiled and pure-Python twins side by side.

Each input becomes a batch of messages (frames of fuzzed bytes; a first frame is often a header
with fuzzed fields, so that the inputs reach past the header check). Both twins get the same
batch, a table holding the same calls (plain, JSON, raw, a job, a query) and a dispatcher with
the same handlers; the harness fails (an uncaught exception: libFuzzer saves the input as
``crash-*``) unless, for that input:

* neither twin raises (a batch from the wire is never an exception in the loop);
* both hand the same messages back, in the same order, resolve the same futures the same way,
  send the same frames and leave the same slow paths to their host.

Run for a fixed time::

    python fuzz/fuzz_receivers.py -max_total_time=60 /tmp/om-recv-corpus

Coverage feedback comes from the pure twins' bytecode, instrumented here.
``ORBITMESH_FUZZ_PLANT=1`` plants a bug in the pure dispatcher (it reads the TRACKED flag as a
serializer bit: a job's first delivery goes to the agent, a TRACKED request without a job id is
served as a plain one), which a working harness finds within seconds.
"""

from __future__ import annotations

import asyncio
import os
import struct
import sys
from collections import OrderedDict
from typing import Any

import atheris

from orbitmesh._core import _calls_c, _calls_py, _serve_c, _serve_py
from orbitmesh.protocol import Kind
from orbitmesh.serializers import JsonSerializer, MsgpackSerializer, RawSerializer, SerializerSet

_HDR = struct.Struct("<2sBBHHIIQQQ")
_SERIALIZERS = [MsgpackSerializer(), JsonSerializer(), RawSerializer()]
_LOOP = asyncio.new_event_loop()


class Disagreement(AssertionError):
    """The twins disagree on one input: a bug."""


class _Conn:
    def __init__(self) -> None:
        self.ready = True
        self.sent: list[list[bytes]] = []

    def sock_send(self, frames: list[bytes]) -> None:
        self.sent.append(frames)


class _Host:
    def __init__(self) -> None:
        self._conn = _Conn()
        self.calls: list[tuple[Any, ...]] = []
        self._jobs_running: dict[int, list[Any]] = {}  # the agent's job bookkeeping
        self._jobs_done: OrderedDict[int, list[Any]] = OrderedDict()
        self.remember_jobs = 2

    def _reply(self, result: Any, token: bytes, corr: int, job: int, sflags: int, serializer: Any) -> None:
        self.calls.append(("reply", type(result).__name__, token, corr, job, sflags, serializer.name))

    def _reply_error(self, exc: BaseException, token: bytes, corr: int, job: int) -> None:
        self.calls.append(("error", type(exc).__name__, token, corr, job))

    def _run_eagerly(self, aw: Any, token: bytes, corr: int, job: int, sflags: int, s: Any, *started: Any) -> None:
        self.calls.append(("later", type(aw).__name__, token, corr, job, sflags, s.name, len(started)))
        if asyncio.iscoroutine(aw):
            aw.close()


async def _echo(*args: Any, **kwargs: Any) -> Any:
    return [list(args), sorted(kwargs)]


async def _fail(*_: Any, **__: Any) -> None:
    raise ValueError("no")


async def _wait(*_: Any, **__: Any) -> None:
    await asyncio.sleep(0)


def _sync(*args: Any) -> Any:
    return len(args)


def _outcome(fut: asyncio.Future[Any]) -> Any:
    if not fut.done():
        return "pending"
    exc = fut.exception()
    return ("error", type(exc).__name__, getattr(exc, "code", None)) if exc else ("ok", repr(fut.result()))


def _batch(fdp: atheris.FuzzedDataProvider) -> list[list[bytes]]:
    batch = []
    for _ in range(fdp.ConsumeIntInRange(0, 8)):
        frames = []
        if fdp.ConsumeBool():  # a header with fuzzed fields
            kind = fdp.ConsumeIntInRange(0, 17)
            flags = fdp.ConsumeIntInRange(0, 0xFFFF)
            corr = fdp.ConsumeIntInRange(0, 9)
            job = fdp.ConsumeIntInRange(0, 2)
            lease = fdp.ConsumeIntInRange(0, 3)
            reserved = 0 if fdp.ConsumeProbability() < 0.9 else fdp.ConsumeIntInRange(0, 0xFFFFFFFF)
            frames.append(_HDR.pack(b"OM", 1, kind, flags, 0, lease, reserved, corr, job, 0))
        for _ in range(fdp.ConsumeIntInRange(0 if frames else 1, 4)):
            frames.append(fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 24)))
        batch.append(frames)
    return batch


def _drive(fn: Any, batch: list[list[bytes]]) -> list[int]:
    left, i = [], 0
    while i < len(batch):
        j = fn(batch, i)
        if not i <= j <= len(batch):
            raise Disagreement(f"returned index {j} outside {i}..{len(batch)}")
        i = j
        if i < len(batch):
            left.append(i)
            i += 1
    return left


def _client(mod: Any, batch: list[list[bytes]]) -> tuple[Any, ...]:
    t = mod.CallTable()
    futs = []
    for i in range(8):
        kind = Kind.QUERY if i == 6 else Kind.REQUEST
        p = t.open(_LOOP.create_future(), _SERIALIZERS[i % 3], kind, float(i))
        if i == 5:
            p.accepted = _LOOP.create_future()
            futs.append(p.accepted)
        futs.append(p.fut)
    left = _drive(t.settle, batch)
    return left, sorted(t.pending), [_outcome(f) for f in futs]


def _agent(mod: Any, batch: list[list[bytes]]) -> tuple[Any, ...]:
    host = _Host()
    d = mod.Dispatcher(host, SerializerSet())
    for name, fn, sync in (
        (b"echo", _echo, False),
        (b"fail", _fail, False),
        (b"wait", _wait, False),
        (b"", _sync, True),
    ):
        d.add(name, fn, sync)
    left = _drive(d.serve, batch)
    jobs = (dict(host._jobs_running), list(host._jobs_done.items()))
    return left, host._conn.sent, host.calls, d.inflight, d.served, jobs


def test_one_input(data: bytes) -> None:
    """One libFuzzer input: a batch for both twins of both receivers."""
    fdp = atheris.FuzzedDataProvider(data)
    batch = _batch(fdp)
    for what, run in (("client", _client), ("agent", _agent)):
        c = run(_calls_c if what == "client" else _serve_c, [list(m) for m in batch])
        py = run(_calls_py if what == "client" else _serve_py, [list(m) for m in batch])
        if c != py:
            raise Disagreement(f"{what}: compiled {c!r} != pure {py!r} for {batch!r}")


def main(argv: list[str]) -> None:
    for module in (_calls_py, _serve_py):
        for value in list(vars(module).values()):
            if callable(value) and getattr(value, "__module__", None) == module.__name__:
                if hasattr(value, "__code__"):
                    atheris.instrument_func(value)
                for attr in vars(value).values() if isinstance(value, type) else ():
                    if hasattr(attr, "__code__"):
                        atheris.instrument_func(attr)
    if os.environ.get("ORBITMESH_FUZZ_PLANT") == "1":
        _serve_py.SERIALIZER_MASK |= 1  # type: ignore[attr-defined]  # the TRACKED bit passes as a serializer bit
    atheris.Setup(argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
