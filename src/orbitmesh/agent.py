"""The agent: serves handlers by command name for the broker it connects to.

Handlers are plain functions or coroutine functions (``@agent.handler``),
methods of an object (``agent.register(obj)`` with ``@command`` marks), async
generators for streams, and one raw handler for untouched bytes. Sync handlers
run on a thread pool so a blocking handler never stalls heartbeats.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import inspect
import logging
import os
import socket
import types
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import zmq

from ._core.serve import Dispatcher, call_args
from ._peer import PeerConnection
from ._wire import HDR, error_message, header
from .errors import CancelledError, ErrorCode, OrbitMeshError, SerializationError
from .middleware import Call, Middleware, build_chain
from .protocol import F_RAW_REPLY, F_STREAM, F_TRACKED, Kind, Role
from .security import PeerKeys
from .serializers import SERIALIZER_MASK, RawSerializer, Serializer, SerializerSet

log = logging.getLogger("orbitmesh.agent")
# The hot path compares plain ints (an enum attribute costs ~60 ns a compare).
_REQUEST, _RAW, _REPLY = int(Kind.REQUEST), int(Kind.RAW), int(Kind.REPLY)
_Coroutine = types.CoroutineType
_pack_header = HDR.pack  # header(), without its keyword call on the reply path

F = TypeVar("F", bound=Callable[..., Any])
_COMMAND_ATTR = "__orbitmesh_command__"


def command(name: str | None = None, *, inline: bool = False) -> Callable[[F], F]:
    """Mark a method as a handler for ``Agent.register(obj)``; ``name`` defaults to the method's."""

    def mark(fn: F) -> F:
        setattr(fn, _COMMAND_ATTR, (name or fn.__name__, inline))
        return fn

    return mark


@dataclass
class _Handler:
    name: str
    fn: Callable[..., Any]
    kind: str  # "async" | "sync" | "stream"
    inline: bool


_UNSTARTED: Any = object()  # _run_eagerly: the coroutine has not been started yet


class _Resume:
    """Await a coroutine that has already run up to its first suspension.

    The agent starts every async handler eagerly (``coro.send(None)``): most
    finish without suspending, and those need no Task at all. One that does
    suspend is finished by a Task awaiting this object, which hands on the
    future the coroutine is waiting for and resumes it, as ``await`` would.
    """

    __slots__ = ("coro", "pending")

    def __init__(self, coro: Any, pending: Any) -> None:
        self.coro = coro
        self.pending = pending

    def __await__(self) -> Generator[Any, Any, Any]:
        coro, pending = self.coro, self.pending
        while True:
            try:
                value = yield pending
            except BaseException as exc:  # cancellation and friends go into the handler
                try:
                    pending = coro.throw(exc)
                except StopIteration as stop:
                    return stop.value
            else:
                try:
                    pending = coro.send(value)
                except StopIteration as stop:
                    return stop.value


class _Stream:
    """Credit state of one stream being produced."""

    __slots__ = ("credit", "wake")

    def __init__(self, credit: int) -> None:
        self.credit = credit
        self.wake: asyncio.Event | None = None


class Agent:
    """An agent named ``name`` serving handlers for the broker at ``broker``.

    ``capacity`` is how many requests it runs at once (the broker never sends
    more); ``capabilities``, ``groups`` and ``labels`` are what selectors match.
    ``middleware`` wraps every handler call, first one outermost. ``keys``
    (a :class:`~orbitmesh.security.PeerKeys`) for a broker that requires CURVE.
    Start with ``await agent.start()`` (or ``async with``); it reconnects by itself.
    """

    def __init__(
        self,
        name: str,
        broker: str,
        *,
        capabilities: Sequence[str] = (),
        groups: Sequence[str] = (),
        labels: dict[str, str] | None = None,
        capacity: int = 64,
        middleware: Sequence[Middleware] = (),
        serializers: Sequence[Serializer] = (),
        executor: concurrent.futures.Executor | None = None,
        context: zmq.Context[Any] | None = None,
        reconnect_max: float = 5.0,
        keys: PeerKeys | None = None,
    ) -> None:
        if not name or "\0" in name:
            raise ValueError("agent name must be a non-empty string without NUL")
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.name = name
        self.broker = broker
        self.capabilities = list(capabilities)
        self.groups = list(groups)
        self.labels = dict(labels or {})
        self.capacity = capacity
        self._middleware = list(middleware)
        self._serializers = SerializerSet(list(serializers))
        self._msgpack = self._serializers.get(0)  # id 0 is always msgpack: most requests name it
        self._own_executor = executor is None
        self._executor = executor
        self._context = context
        self._reconnect_max = reconnect_max
        self._keys = keys
        self._handlers: dict[bytes, _Handler] = {}
        self._raw: Callable[..., Any] | None = None
        self._running: dict[bytes, asyncio.Task[Any]] = {}
        self._streams: dict[bytes, _Stream] = {}
        self._instance = os.urandom(16).hex()  # this agent object: its reconnects may replace its session
        self._jobs_running: dict[int, list[Any]] = {}  # tracked job -> [token, corr, lease] of its newest delivery
        self._jobs_done: OrderedDict[int, list[Any]] = OrderedDict()  # tracked job -> its successful answer
        self._progress_timer: asyncio.TimerHandle | None = None
        self.remember_jobs = 100_000
        self._conn: PeerConnection | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # Plain requests and tracked jobs' first deliveries to coroutine and inline handlers are
        # served by the compiled core straight from each received batch (a job's with the
        # bookkeeping above); it also counts what runs (inflight, served).
        self._serve = Dispatcher(self, self._serializers)

    @property
    def inflight(self) -> int:
        """Requests running now (handlers, streams, raw)."""
        return int(self._serve.inflight)

    @property
    def served(self) -> int:
        """Requests that have ended since the agent was made."""
        return int(self._serve.served)

    # ------------------------------------------------------------ handlers

    def handler(self, name: str | Callable[..., Any] | None = None, *, inline: bool = False) -> Any:
        """Decorator: register a function as the handler for ``name`` (default: its own name).

        ``inline=True`` runs a sync handler on the event loop instead of the
        thread pool: faster, for handlers that never block.
        """
        if callable(name):
            self.add_handler(name.__name__, name)
            return name

        def deco(fn: F) -> F:
            self.add_handler(name or fn.__name__, fn, inline=inline)
            return fn

        return deco

    def add_handler(self, name: str, fn: Callable[..., Any], *, inline: bool = False) -> None:
        """Register ``fn`` for command ``name``; raises ValueError if the name is taken."""
        if not name or "\0" in name:
            raise ValueError("command name must be a non-empty string without NUL")
        key = name.encode()
        if key in self._handlers:
            raise ValueError(f"a handler for {name!r} is already registered")
        target = inspect.unwrap(fn)
        if inspect.isasyncgenfunction(target):
            kind = "stream"
        elif inspect.iscoroutinefunction(target) or inspect.iscoroutinefunction(getattr(fn, "__call__", None)):  # noqa: B004
            kind = "async"
        else:
            kind = "sync"
        self._handlers[key] = _Handler(name, fn, kind, inline)
        if not self._middleware and (kind == "async" or (kind == "sync" and inline)):
            self._serve.add(key, fn, kind == "sync")

    def register(self, obj: Any) -> None:
        """Register a function, or every ``@command``-marked method of an object."""
        if inspect.isfunction(obj) or inspect.ismethod(obj):
            self.add_handler(obj.__name__, obj)
            return
        found = False
        for attr in dir(obj):
            member = getattr(obj, attr, None)
            mark = getattr(member, _COMMAND_ATTR, None)
            if mark is not None and callable(member):
                self.add_handler(mark[0], member, inline=mark[1])
                found = True
        if not found:
            raise ValueError(f"{type(obj).__name__} has no @command methods")

    def raw_handler(self, fn: F) -> F:
        """Decorator: the handler for ``send_raw``; gets a list of frames, returns bytes-like."""
        self._raw = fn
        return fn

    @property
    def commands(self) -> list[str]:
        return [h.name for h in self._handlers.values()]

    # ----------------------------------------------------------- lifecycle

    async def start(self, timeout: float = 10.0, *, name_wait: float = 0.0) -> None:
        """Connect and register; raises RoutingError(NAME_TAKEN) if the name is held.

        ``name_wait`` seconds: keep retrying while the name is held (by a
        previous run of this agent that the broker has not yet expired).
        """
        self._loop = asyncio.get_running_loop()
        self._serve.idle = None
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(
                max_workers=min(self.capacity, 32), thread_name_prefix=f"orbitmesh-{self.name}"
            )
        hello = {
            "role": "agent",
            "name": self.name,
            "capacity": self.capacity,
            "capabilities": self.capabilities,
            "groups": self.groups,
            "labels": self.labels,
            "commands": self.commands,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "instance": self._instance,
        }
        self._conn = PeerConnection(
            self.broker,
            hello,
            Role.AGENT,
            on_message=self._on_message,
            on_batch=self._serve.serve,
            on_lost=self._on_broker_lost,
            load=lambda: self.inflight,
            context=self._context,
            reconnect_max=self._reconnect_max,
            socket_options=self._keys.socket_options() if self._keys else None,
        )
        try:
            await self._conn.connect(timeout, retry_refused=name_wait)
        except BaseException:
            self._shutdown_executor()
            raise
        self._progress_timer = self._loop.call_later(self._conn.heartbeat_ms / 1000, self._progress)
        log.info("agent %s registered with %s", self.name, self.broker)

    async def stop(self, drain_timeout: float = 10.0) -> None:
        """Stop taking work, wait up to ``drain_timeout`` s for running handlers, then leave."""
        conn = self._conn
        if conn is None:
            return
        if conn.ready and self.inflight:
            conn.bye(drain=True)
            assert self._loop is not None
            self._serve.idle = idle = self._loop.create_future()
            try:
                await asyncio.wait_for(idle, drain_timeout)
            except TimeoutError:
                log.warning("agent %s: %d handlers still running after drain; cancelling", self.name, self.inflight)
        for task in list(self._running.values()):
            task.cancel()
        if self._running:
            await asyncio.wait(list(self._running.values()), timeout=1.0)
        if self._progress_timer is not None:
            self._progress_timer.cancel()
            self._progress_timer = None
        conn.bye()
        await asyncio.sleep(0)  # let the BYE leave before the socket closes
        conn.close()
        self._conn = None
        self._shutdown_executor()

    def _shutdown_executor(self) -> None:
        if self._own_executor and self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    async def __aenter__(self) -> Agent:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def connected(self) -> bool:
        return self._conn is not None and self._conn.ready

    def _on_broker_lost(self) -> None:
        # Answers for untracked work cannot reach anyone now: stop it. Tracked jobs run on;
        # the broker delivers them again when it is back, and gets the remembered answer.
        # By task, not by token: a job delivered again while it runs is held under both.
        tracked = {self._running.get(bytes(d[0])) for d in self._jobs_running.values()}
        for task in list(self._running.values()):
            if task not in tracked:
                task.cancel()

    # ------------------------------------------------------------- inbound

    def _on_message(self, frames: list[Any], fields: tuple[Any, ...]) -> None:
        kind = fields[2]
        if kind == _REQUEST:
            self._on_request(frames, fields)
        elif kind == _RAW:
            self._on_raw(frames, fields)
        elif kind == Kind.CANCEL:
            task = self._running.get(bytes(frames[1]))
            if task is not None:
                task.cancel()
        elif kind == Kind.CREDIT:
            stream = self._streams.get(bytes(frames[1]))
            if stream is not None:
                stream.credit += fields[5]
                if stream.wake is not None:
                    stream.wake.set()
        elif kind == Kind.ERROR:
            log.warning("agent %s got error %d from broker", self.name, fields[4])

    def _send(self, frames: list[Any], copy: bool = True) -> None:
        conn = self._conn
        if conn is not None and conn.ready:
            conn.sock_send(frames, copy)  # (conn.send, after the same check)

    def _fail(self, token: bytes, corr: int, job: int, code: int, message: str, exc: BaseException | None) -> None:
        self._answer(error_message(code, corr, message, job=job, route=token, exc=exc, agent=self.name), job)

    def _answer(self, frames: list[Any], job: int) -> None:
        """Send a final answer. A tracked job's goes to its newest delivery, and a success is
        remembered, so a redelivery of the same job (after a broker restart or a lost answer)
        gets it again instead of running the handler twice."""
        if job:
            delivery = self._jobs_running.pop(job, None)
            if delivery is not None:
                token, corr, aux = delivery
                frames[0] = _redirect(frames[0], corr, aux)
                frames[1] = token
            if frames[0][3] == _REPLY:
                self._jobs_done[job] = frames
                if len(self._jobs_done) > self.remember_jobs:
                    self._jobs_done.popitem(last=False)
        self._send(frames)

    def _tracked(self, frames: list[Any], job: int, corr: int, aux: int) -> bool:
        """Register a tracked delivery; True if it is a redelivery this agent answered already."""
        token = frames[1]
        done = self._jobs_done.get(job)
        if done is not None:
            self._send([_redirect(done[0], corr, aux), token, *done[2:]])
            return True
        running = self._jobs_running.get(job)
        if running is not None:
            # Still running from an earlier delivery: the answer goes to this one instead.
            task = self._running.get(bytes(running[0]))
            if task is not None:
                key = bytes(token)
                self._running[key] = task
                task.add_done_callback(functools.partial(self._forget, key))
            running[:] = [token, corr, aux]
            self._send([header(Kind.RUNNING, aux=aux, corr=corr, job=job), token])
            return True
        # RUNNING is sent only if the handler does not finish at once (see _run_eagerly).
        self._jobs_running[job] = [token, corr, aux]
        return False

    def _progress(self) -> None:
        """Every heartbeat: RUNNING for each tracked job still running, which extends its lease."""
        conn = self._conn
        if conn is None or self._loop is None:
            return
        if conn.ready:
            for job, (token, corr, aux) in self._jobs_running.items():
                conn.send([header(Kind.RUNNING, aux=aux, corr=corr, job=job), token])
        self._progress_timer = self._loop.call_later(conn.heartbeat_ms / 1000, self._progress)

    def _on_request(self, frames: list[Any], fields: tuple[Any, ...]) -> None:
        flags, corr, job = fields[3], fields[7], fields[8]
        token = frames[1]
        if flags & F_TRACKED and job and self._tracked(frames, job, corr, fields[5]):
            return
        handler = self._handlers.get(frames[2])
        if handler is None:
            name = bytes(frames[2]).decode(errors="replace")
            self._fail(token, corr, job, ErrorCode.UNKNOWN_COMMAND, f"agent {self.name} has no command {name!r}", None)
            return
        try:
            serializer = self._serializers.from_flags(flags) if flags & SERIALIZER_MASK else self._msgpack
            body = frames[3] if len(frames) > 3 else b""
            # An empty body means "no params", except to the raw serializer: empty bytes.
            params = serializer.loads(body) if body or serializer.id == RawSerializer.id else None
        except SerializationError as exc:
            self._fail(token, corr, job, ErrorCode.BAD_PAYLOAD, exc.message, None)
            return
        except Exception as exc:  # a plugin's own error type
            message = f"serializer {serializer.name!r} cannot decode the params: {exc!r}"
            self._fail(token, corr, job, ErrorCode.BAD_PAYLOAD, message, None)
            return
        if handler.kind == "stream" or flags & F_STREAM:
            self._start_task(token, self._run_stream(handler, params, token, corr, job, fields[5], serializer))
            return
        self._serve.begin()
        if self._middleware:
            call = Call("agent", "execute" if job else "invoke", handler.name, params, self.name, job)
            coro = build_chain(self._middleware, functools.partial(self._endpoint, handler))(call)
        else:
            coro = self._invoke(handler, params)
        self._run_eagerly(coro, token, corr, job, flags & SERIALIZER_MASK, serializer)

    @staticmethod
    def _stream_endpoint(handler: _Handler) -> Callable[[Call], Awaitable[Any]]:
        async def start(call: Call) -> Any:
            args, kwargs = call_args(call.params)
            return handler.fn(*args, **kwargs)

        return start

    async def _endpoint(self, handler: _Handler, call: Call) -> Any:
        return await self._invoke(handler, call.params)

    def _invoke(self, handler: _Handler, params: Any) -> Awaitable[Any]:
        args, kwargs = call_args(params)
        if handler.kind == "async":
            return handler.fn(*args, **kwargs)  # type: ignore[no-any-return]
        if handler.inline:
            return _ready(handler.fn, args, kwargs)
        assert self._loop is not None
        return self._loop.run_in_executor(self._executor, functools.partial(handler.fn, *args, **kwargs))

    def _run_eagerly(
        self,
        aw: Awaitable[Any],
        token: bytes,
        corr: int,
        job: int,
        sflags: int,
        serializer: Serializer,
        started: Any = _UNSTARTED,
    ) -> None:
        """Run a request's awaitable to its end: a coroutine first up to its first suspension
        (``started``: it has been, and that is what it waits for), then in a task if need be."""
        if started is not _UNSTARTED:
            aw = _Resume(aw, started)
        elif type(aw) is _Coroutine:  # (inspect.iscoroutine, without its call)
            try:
                pending = aw.send(None)
            except StopIteration as stop:
                self._reply(stop.value, token, corr, job, sflags, serializer)
                self._serve.end()
                return
            except BaseException as exc:
                self._reply_error(exc, token, corr, job)
                self._serve.end()
                return
            aw = _Resume(aw, pending)
        if job:
            delivery = self._jobs_running.get(job)
            if delivery is not None:  # a tracked job that takes time: say it runs
                self._send([header(Kind.RUNNING, aux=delivery[2], corr=delivery[1], job=job), delivery[0]])
        self._start_task(token, self._finish(aw, token, corr, job, sflags, serializer))

    def _start_task(self, token: bytes, coro: Any) -> None:
        assert self._loop is not None
        task = self._loop.create_task(coro)
        key = bytes(token)
        self._running[key] = task
        task.add_done_callback(functools.partial(self._forget, key))

    def _forget(self, key: bytes, task: asyncio.Task[Any]) -> None:
        if self._running.get(key) is task:
            del self._running[key]

    async def _finish(
        self, aw: Awaitable[Any], token: bytes, corr: int, job: int, sflags: int, serializer: Serializer
    ) -> None:
        try:
            result = await aw
        except BaseException as exc:
            self._reply_error(exc, token, corr, job)
            if not isinstance(exc, (Exception, asyncio.CancelledError)):
                raise
        else:
            self._reply(result, token, corr, job, sflags, serializer)
        finally:
            self._serve.end()

    def _reply(self, result: Any, token: bytes, corr: int, job: int, sflags: int, serializer: Serializer) -> None:
        try:
            body = serializer.dumps(result)
        except SerializationError as exc:
            self._fail(token, corr, job, ErrorCode.HANDLER_ERROR, f"result not serialisable: {exc.message}", exc)
            return
        frames = [_pack_header(b"OM", 1, _REPLY, sflags, 0, 0, 0, corr, job, 0), token, body]
        if job:
            self._answer(frames, job)
            return
        conn = self._conn  # _send, inlined (_answer's work is for tracked jobs only)
        if conn is not None and conn.ready:
            conn.sock_send(frames)

    def _reply_error(self, exc: BaseException, token: bytes, corr: int, job: int) -> None:
        if isinstance(exc, (asyncio.CancelledError, CancelledError)):
            self._fail(token, corr, job, ErrorCode.CANCELLED, "handler was cancelled", None)
        elif isinstance(exc, OrbitMeshError) and exc.code != ErrorCode.HANDLER_ERROR:
            self._fail(token, corr, job, ErrorCode.HANDLER_ERROR, str(exc), exc)
        else:
            self._fail(token, corr, job, ErrorCode.HANDLER_ERROR, str(exc) or type(exc).__name__, exc)

    # -------------------------------------------------------------- streams

    async def _run_stream(
        self,
        handler: _Handler,
        params: Any,
        token: bytes,
        corr: int,
        job: int,
        window: int,
        serializer: Serializer,
    ) -> None:
        self._serve.begin()
        key = bytes(token)
        stream = _Stream(max(1, window))
        self._streams[key] = stream
        sflags = serializer.id << 8
        seq = 0
        try:
            if handler.kind != "stream":
                raise TypeError(f"command {handler.name!r} is not a streaming handler")
            if self._middleware:
                # Middleware sees the call; what call_next returns is the item iterator.
                call = Call("agent", "stream", handler.name, params, self.name, job)
                gen: AsyncIterator[Any] = await build_chain(self._middleware, self._stream_endpoint(handler))(call)
            else:
                args, kwargs = call_args(params)
                gen = handler.fn(*args, **kwargs)
            try:
                async for item in gen:
                    while stream.credit <= 0:
                        stream.wake = asyncio.Event()
                        await stream.wake.wait()
                        stream.wake = None
                    stream.credit -= 1
                    seq += 1
                    body = serializer.dumps(item)
                    self._send(
                        [header(Kind.STREAM_ITEM, flags=sflags, aux=seq & 0xFFFFFFFF, corr=corr, job=job), token, body]
                    )
            finally:
                aclose = getattr(gen, "aclose", None)
                if aclose is not None:
                    await aclose()
        except BaseException as exc:
            self._reply_error(exc, token, corr, job)
            if not isinstance(exc, (Exception, asyncio.CancelledError)):
                raise
        else:
            self._send([header(Kind.STREAM_END, aux=seq & 0xFFFFFFFF, corr=corr, job=job), token])
        finally:
            self._streams.pop(key, None)
            self._serve.end()

    # ------------------------------------------------------------------ raw

    def _on_raw(self, frames: list[Any], fields: tuple[Any, ...]) -> None:
        corr, job = fields[7], fields[8]
        token = frames[1]
        if self._raw is None:
            self._fail(token, corr, job, ErrorCode.NO_RAW_HANDLER, f"agent {self.name} has no raw handler", None)
            return
        self._serve.begin()
        parts = frames[2:]
        if self._middleware:
            call = Call("agent", "raw", "", parts, self.name, job)
            coro = build_chain(self._middleware, self._raw_endpoint)(call)
        else:
            coro = self._call_raw(parts)
        self._run_raw(coro, token, corr, job)

    def _call_raw(self, parts: list[Any]) -> Awaitable[Any]:
        fn = self._raw
        assert fn is not None
        if inspect.iscoroutinefunction(fn):
            return fn(parts)  # type: ignore[no-any-return]
        return _ready(fn, (parts,), {})

    async def _raw_endpoint(self, call: Call) -> Any:
        return await self._call_raw(call.params)

    def _run_raw(self, coro: Any, token: bytes, corr: int, job: int) -> None:
        if inspect.iscoroutine(coro):
            # Eagerly, as for commands: a raw handler that does not suspend needs no Task.
            try:
                pending = coro.send(None)
            except StopIteration as stop:
                self._serve.end()
                self._send_raw_reply(stop.value, token, corr, job)
                return
            except BaseException as exc:  # as _run_eagerly: the caller learns, the loop goes on
                self._serve.end()
                self._reply_error(exc, token, corr, job)
                return
            coro = _Resume(coro, pending)

        async def finish() -> None:
            try:
                out = await coro
            except BaseException as exc:
                self._reply_error(exc, token, corr, job)
                if not isinstance(exc, (Exception, asyncio.CancelledError)):
                    raise
                return
            finally:
                self._serve.end()
            self._send_raw_reply(out, token, corr, job)

        self._start_task(token, finish())

    def _send_raw_reply(self, out: Any, token: bytes, corr: int, job: int) -> None:
        if out is None:
            out = b""
        parts = list(out) if isinstance(out, (list, tuple)) else [out]
        try:
            views = [p if isinstance(p, (bytes, zmq.Frame)) else memoryview(p) for p in parts]
        except TypeError as exc:
            self._fail(token, corr, job, ErrorCode.HANDLER_ERROR, f"raw handler must return bytes-like: {exc}", exc)
            return
        size = sum(len(v) if isinstance(v, bytes) else getattr(v, "nbytes", 0) for v in views)
        self._send([header(Kind.REPLY, flags=F_RAW_REPLY, corr=corr, job=job), token, *views], copy=size < 65536)


def _redirect(hdr: bytes, corr: int, aux: int) -> bytes:
    """The same header, for another delivery (its correlation id and lease)."""
    f = HDR.unpack(hdr)
    return header(f[2], f[3], f[4], aux, corr, f[8], f[9])


async def _ready(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    return fn(*args, **kwargs)


__all__ = ["Agent", "command"]
