"""An agent's requests, pure-Python reference. ``_serve_c.pyx`` must behave identically.

Per request an agent reads the header, finds the handler, decodes the params, calls the
handler and, when it finishes without suspending (most do), encodes the result and sends
the reply. A ``Dispatcher`` does all of that straight from a received batch for a plain
request (no stream, no options) to a coroutine handler or an inline sync handler, and for a
tracked job's first delivery (the agent's job bookkeeping with it: the delivery is held in
``host._jobs_running`` while it runs, and its reply kept in ``host._jobs_done``).
Everything else goes to the agent, in order: the other kinds of message, a job's redelivery,
handlers on the thread pool, streams, middleware, params that do not decode, a handler that
suspends or raises, a result that does not encode.
"""

from __future__ import annotations

import asyncio
import struct
import types
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Protocol

from ..protocol import F_TRACKED, HEADER_SIZE, Kind
from ..serializers import SERIALIZER_MASK, RawSerializer, Serializer, SerializerSet
from ._frame_py import check_header

public_api = ["Dispatcher", "call_args"]

_REQUEST, _REPLY = int(Kind.REQUEST), int(Kind.REPLY)
_RAW_ID = RawSerializer.id
_Coroutine = types.CoroutineType
_pack_header = struct.Struct("<2sBBHHIIQQQ").pack
_is_str = str.__instancecheck__  # isinstance(k, str), for all(map(...)) at C speed


class Host(Protocol):
    """What a Dispatcher needs of its agent: the connection, the job bookkeeping and the slow paths."""

    _conn: Any  # a PeerConnection, or None
    _jobs_running: dict[int, list[Any]]  # tracked job -> [token, corr, lease] of its newest delivery
    _jobs_done: OrderedDict[int, list[Any]]  # tracked job -> its successful answer
    remember_jobs: int  # answers kept in _jobs_done

    def _reply(self, result: Any, token: bytes, corr: int, job: int, sflags: int, serializer: Serializer) -> None: ...

    def _reply_error(self, exc: BaseException, token: bytes, corr: int, job: int) -> None: ...

    def _run_eagerly(
        self, aw: Any, token: bytes, corr: int, job: int, sflags: int, serializer: Serializer, started: Any = ...
    ) -> None: ...


def call_args(params: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """A handler's arguments from its params: a map with string keys as keywords, a list as
    positional arguments, None as none, anything else as the one argument."""
    if params is None:
        return (), {}
    if isinstance(params, dict) and all(map(_is_str, params)):
        return (), params
    if isinstance(params, (list, tuple)):
        return tuple(params), {}
    return (params,), {}


class Dispatcher:
    """Serves ``host``'s plain requests from received batches (see the module), and counts the
    requests it has running (``inflight``; ``served`` once they end), for the agent's own
    paths too (``begin`` / ``end``). ``idle``: a future resolved when ``inflight`` falls to 0."""

    def __init__(self, host: Host, serializers: SerializerSet) -> None:
        self.host = host
        self.serializers = serializers
        self.default = serializers.get(0)  # id 0 is always msgpack: most requests name it
        self.handlers: dict[bytes, tuple[Callable[..., Any], bool]] = {}  # command -> (fn, sync)
        self.inflight = 0
        self.served = 0
        self.idle: asyncio.Future[None] | None = None

    def add(self, command: bytes, fn: Callable[..., Any], sync: bool) -> None:
        """Serve ``command`` here: ``fn`` a coroutine function, or (``sync``) an inline one."""
        self.handlers[command] = (fn, sync)

    def begin(self) -> None:
        """A request starts running."""
        self.inflight += 1

    def end(self) -> None:
        """A running request has ended."""
        self.inflight -= 1
        self.served += 1
        if not self.inflight and self.idle is not None and not self.idle.done():
            self.idle.set_result(None)  # stop() is draining: the last handler has finished

    def serve(self, batch: list[list[Any]], start: int = 0) -> int:
        """Serve the plain requests in ``batch`` from ``start`` on, up to the first message of
        another sort; return that one's index (``len(batch)`` if none), for the agent."""
        n = len(batch)
        conn = self.host._conn
        if conn is None or not conn.ready:
            return start  # the agent drops what comes while it is not registered
        handlers = self.handlers
        i = start
        while i < n:
            frames = batch[i]
            nf = len(frames)
            hdr = frames[0]
            if (
                nf < 3
                or nf > 4
                or type(hdr) is not bytes
                or len(hdr) != HEADER_SIZE
                or hdr[3] != _REQUEST
                or check_header(hdr)
            ):
                return i
            flags = hdr[4] | (hdr[5] << 8)
            job = int.from_bytes(hdr[24:32], "little")
            if flags & ~SERIALIZER_MASK:
                if flags & ~SERIALIZER_MASK != F_TRACKED or not job:  # a stream, raw, ...
                    return i
            elif job:
                return i
            entry = handlers.get(frames[2])
            if entry is None:
                return i
            sid = flags >> 8
            if not sid:
                serializer = self.default
            else:
                try:
                    serializer = self.serializers.from_flags(flags)
                except Exception:
                    return i  # the agent says why
            body = frames[3] if nf == 4 else b""
            try:
                # An empty body means "no params", except to the raw serializer: empty bytes.
                params = serializer.loads(body) if body or sid == _RAW_ID else None
            except Exception:
                return i  # the agent says why
            token = frames[1]
            corr = int.from_bytes(hdr[16:24], "little")
            lease = int.from_bytes(hdr[8:12], "little")
            if job:
                # A tracked job's first delivery (a redelivery is the agent's: it may have run).
                running = self.host._jobs_running
                if job in running or job in self.host._jobs_done:
                    return i
                running[job] = [token, corr, lease]
            self.inflight += 1
            self._run(entry, params, token, corr, sid << 8, serializer, job, lease)
            i += 1
        return n

    def _run(
        self,
        entry: tuple[Callable[..., Any], bool],
        params: Any,
        token: bytes,
        corr: int,
        sflags: int,
        s: Serializer,
        job: int,
        lease: int,
    ) -> None:
        fn, sync = entry
        args, kwargs = call_args(params)
        host = self.host
        suspended = other = False
        try:
            aw = fn(*args, **kwargs)
            if sync:  # an inline sync handler: that is its result
                value = aw
            elif type(aw) is _Coroutine:
                try:
                    value = aw.send(None)
                    suspended = True
                except StopIteration as stop:
                    value = stop.value
            else:
                other = True  # some other awaitable
        except BaseException as exc:
            host._reply_error(exc, token, corr, job)
            self.end()
            return
        if other:
            host._run_eagerly(aw, token, corr, job, sflags, s)
            return
        if suspended:  # on ``value``: a task ends it
            host._run_eagerly(aw, token, corr, job, sflags, s, value)
            return
        try:
            body = s.dumps(value)
        except Exception:
            host._reply(value, token, corr, job, sflags, s)  # says why
        else:
            frames = [_pack_header(b"OM", 1, _REPLY, sflags, 0, lease, 0, corr, job, 0), token, body]
            if job:  # the agent's _answer: this delivery is done, its answer kept for a redelivery
                host._jobs_running.pop(job, None)
                done = host._jobs_done
                done[job] = frames
                if len(done) > host.remember_jobs:
                    done.popitem(last=False)
            conn = host._conn
            if conn is not None and conn.ready:
                conn.sock_send(frames)
        self.end()
