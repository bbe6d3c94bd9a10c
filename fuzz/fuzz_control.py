"""Coverage-guided fuzzing of the broker's control plane: HELLO and QUERY bodies (atheris).

A broker runs in this process (memory job store, inproc endpoint, its event loop on a thread).
Each input becomes one HELLO or QUERY whose body is a msgpack value built from the input (maps
of the fields the broker reads, with values of every msgpack type and edge values), or raw
bytes. The harness fails (libFuzzer saves the input as ``crash-*``) unless the broker answers it
within a few seconds with WELCOME / REPLY, or with an ERROR whose code is a known ``ErrorCode``
(and is not INTERNAL), and the broker logged no error: a body the control plane chokes on leaves
its sender waiting forever, which is what this looks for.

Run for a fixed time with libFuzzer flags::

    python fuzz/fuzz_control.py -max_total_time=60 /tmp/om-control-corpus

Coverage feedback comes from the bytecode of ``orbitmesh.broker`` and ``orbitmesh.jobs``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import struct
import sys
import threading
from typing import Any

import atheris
import msgpack
import zmq

import orbitmesh as om
from orbitmesh import broker as broker_module
from orbitmesh import jobs as jobs_module
from orbitmesh._core._frame_py import unpack_parts
from orbitmesh.errors import ErrorCode

HDR = struct.Struct("<2sBBHHIIQQQ")
HELLO, WELCOME, REPLY, ERROR, QUERY = 1, 2, 7, 10, 16
ANSWER_S = 5.0
KNOWN = {int(c) for c in ErrorCode} - {int(ErrorCode.INTERNAL)}

OPS = ["agents", "subscribe", "unsubscribe", "job", "jobs", "cancel", "wait", "stats", "shutdown", "__init__", ""]
FIELDS = [
    "op", "id", "limit", "cursor", "since", "state", "agent", "command", "timeout_ms", "topics", "labels",
    "capability", "group", "role", "name", "capacity", "capabilities", "groups", "commands", "protocol",
]  # fmt: skip
WORDS = [
    "agent", "client", "queued", "running", "succeeded", "failed", "cancelled", "*", "job", "agent-0", "[", "\0",
    "x" * 201, "",
]  # fmt: skip
EDGE_INTS = [0, 1, -1, 2, 10_000, 10_001, 1_000_000, 1_000_001, 2**31, 2**32, 2**63 - 1, -(2**63), 2**64 - 1]


class Failure(AssertionError):
    """The broker mishandled one body: no answer, an unknown code, or a logged error."""


class _Logged(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(f"{record.name}: {record.getMessage()} {record.exc_info[1] if record.exc_info else ''}")


def value(fdp: atheris.FuzzedDataProvider, depth: int = 0) -> Any:
    """A msgpack-able value of any type, edge values likely."""
    kind = fdp.ConsumeIntInRange(0, 11 if depth < 3 else 8)
    if kind == 0:
        return None
    if kind == 1:
        return fdp.ConsumeBool()
    if kind == 2:
        return EDGE_INTS[fdp.ConsumeIntInRange(0, len(EDGE_INTS) - 1)]
    if kind == 3:
        return fdp.ConsumeIntInRange(-(2**63), 2**64 - 1)
    if kind == 4:
        return fdp.ConsumeFloat()  # nan, inf, -0.0, ... included
    if kind == 5:
        return WORDS[fdp.ConsumeIntInRange(0, len(WORDS) - 1)]
    if kind == 6:
        return fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 40))
    if kind == 7:
        return fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 40))
    if kind == 8:
        return OPS[fdp.ConsumeIntInRange(0, len(OPS) - 1)]
    if kind == 9:
        return [value(fdp, depth + 1) for _ in range(fdp.ConsumeIntInRange(0, 4))]
    if kind == 10:
        return {str(value(fdp, depth + 1)): value(fdp, depth + 1) for _ in range(fdp.ConsumeIntInRange(0, 3))}
    return body_map(fdp, depth + 1)


def body_map(fdp: atheris.FuzzedDataProvider, depth: int = 0) -> dict[Any, Any]:
    """A map of the fields the broker reads, with values of any type."""
    out: dict[Any, Any] = {}
    for _ in range(fdp.ConsumeIntInRange(0, 6)):
        out[FIELDS[fdp.ConsumeIntInRange(0, len(FIELDS) - 1)]] = value(fdp, depth + 1)
    return out


class Rig:
    """The broker on its own loop thread, and two raw peers: a registered client, a HELLO sender."""

    def __init__(self) -> None:
        self.ctx: zmq.Context[Any] = zmq.Context()
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, name="broker-loop", daemon=True).start()
        self.broker = om.Broker(
            f"inproc://fuzz-control-{os.getpid()}", context=self.ctx, store="memory://", heartbeat_interval=3600
        )
        asyncio.run_coroutine_threadsafe(self.broker.start(), self.loop).result(10)
        self.client = self._peer()
        self.hello = self._peer()
        self.corr = 1
        self.ask(self.client, HELLO, msgpack.packb({"role": "client", "name": "fuzz"}), expect_ok=True)

    def _peer(self) -> zmq.Socket[Any]:
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.broker.endpoints[0])
        return sock

    def ask(self, sock: zmq.Socket[Any], kind: int, body: bytes, expect_ok: bool = False) -> tuple[int, int]:
        """Send one HELLO / QUERY; return the answer's (kind, code)."""
        self.corr += 1
        corr = self.corr
        sock.send_multipart([HDR.pack(b"OM", 1, kind, 0, 0, 1, 0, corr, 0, 0), b"", body])
        while sock.poll(int(ANSWER_S * 1000)):
            frames = unpack_parts(sock.recv_multipart())  # a protocol-2 session answers packed
            _, _, got, _, code, _, _, got_corr, _, _ = HDR.unpack(frames[0])
            if got_corr == corr and got in (WELCOME, REPLY, ERROR):
                if expect_ok and got == ERROR:
                    raise Failure(f"setup refused: {frames[2]!r}")
                return got, code
        raise Failure(f"no answer within {ANSWER_S} s to {'HELLO' if kind == HELLO else 'QUERY'} {body!r}")


def main(argv: list[str]) -> None:
    logged = _Logged()
    logging.getLogger("orbitmesh").addHandler(logged)
    for module in (broker_module, jobs_module):
        for obj in list(vars(module).values()):
            targets = vars(obj).values() if isinstance(obj, type) and obj.__module__ == module.__name__ else [obj]
            for fn in targets:
                fn = getattr(fn, "__func__", fn)
                if callable(fn) and hasattr(fn, "__code__") and getattr(fn, "__module__", None) == module.__name__:
                    atheris.instrument_func(fn)
    rig = Rig()

    def test_one_input(data: bytes) -> None:
        fdp = atheris.FuzzedDataProvider(data)
        which = fdp.ConsumeIntInRange(0, 3)
        if which == 3:
            kind, body = (HELLO, QUERY)[fdp.ConsumeIntInRange(0, 1)], fdp.ConsumeBytes(fdp.remaining_bytes())
        else:
            kind = HELLO if which == 2 else QUERY
            shape = body_map(fdp) if which != 1 else value(fdp)
            if kind == QUERY and which == 0 and fdp.ConsumeBool():
                shape["op"] = OPS[fdp.ConsumeIntInRange(0, len(OPS) - 1)]
            body = msgpack.packb(shape, use_bin_type=True)
        answer, code = rig.ask(rig.hello if kind == HELLO else rig.client, kind, body)
        if answer == ERROR and code not in KNOWN:
            raise Failure(f"ERROR code {code} for {body!r}")
        if logged.records:
            raise Failure(f"the broker logged {logged.records} for {body!r}")

    atheris.Setup(argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
