"""MeshClient: the application's handle on the mesh (asyncio; see ``orbitmesh.sync`` for blocking use)."""

from __future__ import annotations

import asyncio
import builtins
import dataclasses
import logging
import random
import types
import typing
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from time import time_ns
from typing import Any, Generic, TypeVar, Union  # Union: matched in coerce()

import msgpack
import zmq

from ._core import frame
from ._core.calls import CallTable, Pending, decode_reply
from ._peer import PeerConnection
from ._wire import EMPTY, HDR, header, parse_error
from .errors import (
    ErrorCode,
    NotConnectedError,
    OrbitMeshError,
    ResultTypeError,
    RoutingError,
    TimeoutError,
    error_for_code,
)
from .middleware import Call, Middleware, build_chain
from .models import AgentInfo, Event, JobInfo, JobState
from .protocol import F_RAW_REPLY, F_STREAM, F_TRACKED, Kind, Role, Route, Strategy
from .security import PeerKeys
from .serializers import Serializer, SerializerSet

log = logging.getLogger("orbitmesh.client")

T = TypeVar("T")
_pack_hdr = HDR.pack
# The hot paths compare plain ints (an IntEnum attribute lookup costs ~150 ns).
_ACCEPTED, _REPLY, _REQUEST, _QUERY, _RAW = (
    int(k) for k in (Kind.ACCEPTED, Kind.REPLY, Kind.REQUEST, Kind.QUERY, Kind.RAW)
)
_STRATEGIES = {"least_loaded": Strategy.LEAST_LOADED, "round_robin": Strategy.ROUND_ROBIN, "random": Strategy.RANDOM}
_FOREVER = 10 * 365 * 86400.0  # pending entries that only their own protocol ends
_INF = float("inf")


@dataclass(frozen=True)
class Select:
    """Let the broker choose the agent: by ``capability``, ``group`` or ``labels``
    (all must match), or with none given, any agent serving the command.
    ``strategy``: "least_loaded" (default), "round_robin" or "random"."""

    capability: str | None = None
    group: str | None = None
    labels: dict[str, str] | None = None
    strategy: str = "least_loaded"

    def route(self) -> bytes:
        try:
            strategy = _STRATEGIES[self.strategy]
        except KeyError:
            raise ValueError(f"strategy must be one of {sorted(_STRATEGIES)}, not {self.strategy!r}") from None
        if self.labels or (self.capability and self.group):
            spec = {"labels": self.labels or {}, "capability": self.capability, "group": self.group}
            return frame.pack_route(Route.LABELS, strategy, msgpack.packb(spec))
        if self.capability:
            return frame.pack_route(Route.CAPABILITY, strategy, self.capability.encode())
        if self.group:
            return frame.pack_route(Route.GROUP, strategy, self.group.encode())
        return frame.pack_route(Route.COMMAND, strategy)


Target = str | AgentInfo | Select


@dataclass(frozen=True)
class Outcome(Generic[T]):
    """One agent's answer in ``execute_on_all``: ``value`` or ``error``."""

    agent: str
    value: T | None = None
    error: OrbitMeshError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def _job_options(
    max_attempts: int,
    retry_initial: float | None,
    retry_max: float | None,
    non_retryable: Sequence[str],
    job_timeout: float | None,
    delay: float | None,
    run_at: float | None,
    idempotency_key: str | None,
) -> bytes | None:
    """The REQUEST's options frame for a job (None: all defaults); the broker checks the values."""
    opts: dict[str, Any] = {}
    if max_attempts != 1:
        opts["max_attempts"] = max_attempts
    if retry_initial is not None:
        opts["retry_initial"] = retry_initial
    if retry_max is not None:
        opts["retry_max"] = retry_max
    if non_retryable:
        opts["non_retryable"] = list(non_retryable)
    if job_timeout is not None:
        opts["timeout"] = job_timeout
    if delay is not None:
        opts["delay"] = delay
    if run_at is not None:
        opts["run_at"] = run_at
    if idempotency_key is not None:
        opts["key"] = idempotency_key
    return msgpack.packb(opts) if opts else None


def coerce(value: Any, tp: Any) -> Any:
    """Fit a decoded result to type ``tp`` (dataclasses, primitives, list/dict/tuple/Optional
    of those); raises ResultTypeError with the path of the first mismatch."""
    return _coerce(value, tp, "result")


def _coerce(value: Any, tp: Any, path: str) -> Any:
    if tp is Any or tp is object:
        return value
    origin = typing.get_origin(tp)
    if origin is Union or origin is types.UnionType:
        for arm in typing.get_args(tp):
            try:
                return _coerce(value, arm, path)
            except ResultTypeError:
                continue
        raise ResultTypeError(f"{path}: {value!r} fits none of {tp}")
    if tp is None or tp is type(None):
        if value is None:
            return None
        raise ResultTypeError(f"{path}: expected None, got {type(value).__name__}")
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ResultTypeError(f"{path}: expected a map for {tp.__name__}, got {type(value).__name__}")
        hints = typing.get_type_hints(tp)
        names = {f.name for f in dataclasses.fields(tp) if f.init}
        unknown = set(value) - names
        if unknown:
            raise ResultTypeError(f"{path}: unexpected fields {sorted(unknown)} for {tp.__name__}")
        kwargs = {k: _coerce(v, hints.get(k, Any), f"{path}.{k}") for k, v in value.items()}
        try:
            return tp(**kwargs)
        except TypeError as exc:
            raise ResultTypeError(f"{path}: cannot build {tp.__name__}: {exc}") from None
    if origin in (list, Sequence):
        (arg,) = typing.get_args(tp) or (Any,)
        if not isinstance(value, (list, tuple)):
            raise ResultTypeError(f"{path}: expected a list, got {type(value).__name__}")
        return [_coerce(v, arg, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ResultTypeError(f"{path}: expected a tuple, got {type(value).__name__}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{path}[{i}]") for i, v in enumerate(value))
        if args and len(args) != len(value):
            raise ResultTypeError(f"{path}: expected {len(args)} items, got {len(value)}")
        return tuple(_coerce(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(args, value, strict=True)))
    if origin is dict:
        kt, vt = typing.get_args(tp) or (Any, Any)
        if not isinstance(value, dict):
            raise ResultTypeError(f"{path}: expected a map, got {type(value).__name__}")
        return {_coerce(k, kt, path): _coerce(v, vt, f"{path}[{k!r}]") for k, v in value.items()}
    if isinstance(tp, type):
        if tp is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if tp is bytes and isinstance(value, (bytearray, memoryview)):
            return bytes(value)
        if isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
            return value
        raise ResultTypeError(f"{path}: expected {tp.__name__}, got {type(value).__name__}")
    return value


class SubmittedJob:
    """A job sent by ``MeshClient.submit_job``: two futures, no task.

    ``accepted``: the job id, once the broker has durably recorded the job.
    ``result``: the job's decoded result, or its error (a failure before ACCEPTED too).
    """

    __slots__ = ("accepted", "result")

    def __init__(self, accepted: asyncio.Future[int], result: asyncio.Future[Any]) -> None:
        self.accepted = accepted
        self.result = result

    def __repr__(self) -> str:
        acc = self.accepted
        job = acc.result() if acc.done() and not acc.cancelled() and acc.exception() is None else "?"
        return f"<SubmittedJob {job} {'done' if self.result.done() else 'pending'}>"


class Job:
    """A tracked job (from ``execute``): its ``id`` and a way to its result."""

    def __init__(
        self, client: MeshClient, job_id: int, fut: asyncio.Future[Any], returns: Any, pending: Pending | None = None
    ) -> None:
        self.client = client
        self.id = job_id
        self._fut = fut
        self._returns = returns
        self._pending = pending  # its outcome also wakes ``pending.waiter``

    async def result(self, timeout: float | None = None) -> Any:
        """Wait for the job's result; raises its error, or TimeoutError."""
        fut = self._fut
        try:
            if not fut.done():
                p = self._pending
                if timeout is None and p is not None and p.waiter is None:
                    # The reply handler wakes this waiter itself: one hop, and a cancelled wait
                    # cancels only the waiter, never the result a later call may still read.
                    p.waiter = waiter = fut.get_loop().create_future()
                    try:
                        await waiter
                    finally:
                        if p.waiter is waiter:
                            p.waiter = None
                elif timeout is None:
                    await asyncio.shield(fut)
                else:
                    await _wait_done(fut, timeout)
            value = fut.result()
        except _NotYet:
            raise TimeoutError(f"job {self.id} did not finish within {timeout} s") from None
        except NotConnectedError:
            # The connection dropped while we waited: ask the broker instead.
            info = await self.client.wait_job(self.id, timeout=timeout)
            value = self.client.job_result(info)
        return coerce(value, self._returns) if self._returns is not None else value

    async def info(self) -> JobInfo:
        """The broker's record of this job."""
        return await self.client.get_job(self.id)

    async def cancel(self) -> JobInfo:
        """Cancel this job (see ``MeshClient.cancel``)."""
        return await self.client.cancel(self.id)

    def done(self) -> bool:
        return self._fut.done()

    def __repr__(self) -> str:
        return f"<Job {self.id} {'done' if self._fut.done() else 'pending'}>"


class Stream(AsyncIterator[Any]):
    """Items from a streaming handler, with credit-based back-pressure.

    Iterate with ``async for``. The handler on the agent is cancelled when the stream ends
    early: by ``aclose()``, on leaving ``async with client.stream(...) as items``, when the
    task consuming it is cancelled, and when a stream left unfinished is dropped (CPython
    frees it as its last reference goes: ``break`` out of ``async for client.stream(...)``).
    """

    def __init__(
        self,
        client: MeshClient,
        target: Target,
        command: str,
        params: Any,
        window: int,
        timeout: float | None,
        returns: Any,
    ) -> None:
        self._client = client
        self._target = target
        self._command = command
        self._params = params
        self._window = max(1, window)
        self._timeout = timeout
        self._returns = returns
        self._p: Pending | None = None
        self._corr = 0
        self._consumed = 0
        self._done = False

    def __aiter__(self) -> Stream:
        return self

    async def __aenter__(self) -> Stream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __del__(self) -> None:
        # Dropped unfinished (a ``break`` out of the loop): the handler must not run on for
        # nobody. The loop's thread sends the CANCEL (garbage may be collected anywhere).
        p = getattr(self, "_p", None)  # None too if __init__ did not finish
        if p is not None and not self._done and not p.fut.done():
            loop = self._client._loop
            if loop is not None and not loop.is_closed():
                try:
                    loop.call_soon_threadsafe(self._client._cancel_stream, self._corr, p)
                except RuntimeError:
                    pass  # the loop closed meanwhile: the connection is gone with it

    async def __anext__(self) -> Any:
        if self._done:
            raise StopAsyncIteration
        c = self._client
        if self._p is None:
            self._corr, self._p = c._start_stream(self._target, self._command, self._params, self._window)
        p = self._p
        assert p.items is not None
        loop = asyncio.get_running_loop()
        while not p.items:
            if p.fut.done():
                break
            p.waiter = loop.create_future()
            try:
                await _wait_done(p.waiter, self._timeout)
            except _NotYet:
                await self.aclose()
                raise TimeoutError(f"stream {self._command!r}: no item within {self._timeout} s") from None
            except asyncio.CancelledError:
                await self.aclose()  # the consumer was cancelled: so is the handler
                raise
            finally:
                p.waiter = None
        if p.items:
            data = p.items.popleft()
            self._consumed += 1
            if self._consumed * 2 >= self._window and not p.fut.done():
                c._send_credit(self._corr, p, self._consumed)
                self._consumed = 0
            value = p.serializer.loads(data)
            return coerce(value, self._returns) if self._returns is not None else value
        self._done = True
        c._pending.pop(self._corr, None)
        exc = p.fut.exception()
        if exc is not None:
            raise exc
        raise StopAsyncIteration

    async def aclose(self) -> None:
        """Stop the stream; the agent's handler is cancelled if it is still running."""
        if self._done:
            return
        self._done = True
        if self._p is not None:
            self._client._cancel_stream(self._corr, self._p)


class MeshClient:
    """A client of the broker at ``broker`` (an endpoint such as ``tcp://127.0.0.1:5555``).

    ``timeout`` (s) is the default for every call; ``serializer`` names the
    default payload serializer ("msgpack", "json", "raw" or a plugin);
    ``middleware`` wraps invoke / execute / send_raw, first one outermost.
    ``keys`` (a :class:`~orbitmesh.security.PeerKeys`) for a broker that requires CURVE.
    """

    def __init__(
        self,
        broker: str,
        *,
        name: str = "",
        timeout: float = 30.0,
        serializer: str | Serializer = "msgpack",
        serializers: Sequence[Serializer] = (),
        middleware: Sequence[Middleware] = (),
        context: zmq.Context[Any] | None = None,
        keys: PeerKeys | None = None,
    ) -> None:
        self.broker = broker
        self._keys = keys
        self.name = name
        self.timeout = timeout
        self._serializers = SerializerSet(list(serializers))
        self._serializer = self._serializers.get(serializer)
        self._middleware = list(middleware)
        self._context = context
        self._conn: PeerConnection | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # Calls in flight (corr, entry, deadline); ``_pending`` is its dict, the same object for good.
        self._calls = CallTable()
        self._pending: dict[int, Pending] = self._calls.pending
        self._routes: dict[str, bytes] = {}
        self._commands: dict[str, bytes] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._ready: asyncio.Event | None = None
        self._subscriptions: list[tuple[set[str], asyncio.Queue[Event]]] = []
        self._rr = -1  # select_agent(strategy="round_robin") cursor

    # ----------------------------------------------------------- lifecycle

    async def connect(self, timeout: float = 10.0) -> MeshClient:
        """Register with the broker; raises NotConnectedError if it does not answer in time."""
        self._loop = asyncio.get_running_loop()
        self._ready = asyncio.Event()
        self._conn = PeerConnection(
            self.broker,
            {"role": "client", "name": self.name},
            Role.CLIENT,
            on_message=self._on_message,
            on_batch=self._calls.settle,
            on_lost=self._on_lost,
            on_ready=self._on_ready,
            load=lambda: len(self._pending),
            context=self._context,
            socket_options=self._keys.socket_options() if self._keys else None,
        )
        await self._conn.connect(timeout)
        return self

    async def close(self) -> None:
        """Fail what is still pending with NotConnectedError and close the connection."""
        if self._conn is None:
            return
        self._conn.bye()
        await asyncio.sleep(0)
        self._conn.close()
        self._conn = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._fail_all(NotConnectedError("client closed"))

    async def __aenter__(self) -> MeshClient:
        return await self.connect()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def connected(self) -> bool:
        return self._conn is not None and self._conn.ready

    def _on_ready(self) -> None:
        assert self._ready is not None
        self._ready.set()
        if self._subscriptions:
            topics = sorted(set().union(*(t for t, _ in self._subscriptions)))
            fut = self._send_query({"op": "subscribe", "topics": topics}, self.timeout)
            fut.add_done_callback(lambda f: f.cancelled() or f.exception())

    def _on_lost(self) -> None:
        if self._ready is not None:
            self._ready.clear()
        self._fail_all(NotConnectedError(f"connection to broker at {self.broker} lost"))

    def _fail_all(self, exc: OrbitMeshError) -> None:
        for p in self._calls.take_all():
            self._settle_error(p, exc)

    async def _wait_ready(self, timeout: float) -> PeerConnection:
        conn = self._conn
        if conn is None:
            raise NotConnectedError("client is not connected: call connect() first")
        if not conn.ready:
            assert self._ready is not None
            try:
                await asyncio.wait_for(self._ready.wait(), timeout)
            except builtins.TimeoutError:
                raise NotConnectedError(f"broker at {self.broker} unreachable for {timeout} s") from None
        return conn

    # ------------------------------------------------------------ timeouts

    def _arm_timer(self, at: float) -> None:
        assert self._loop is not None
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = at
        self._timer = self._loop.call_at(at, self._expire)

    def _expire(self) -> None:
        assert self._loop is not None
        self._timer = None
        pending = self._pending
        for corr in self._calls.due(self._loop.time()):
            p = pending.get(corr)
            if p is None:
                continue  # ended meanwhile
            if p.accepted is not None:
                # A job: its deadline is for ACCEPTED only; once accepted, the outcome decides.
                if not p.accepted.done():
                    del pending[corr]
                    self._settle_error(p, TimeoutError(f"job not accepted within the call's timeout (corr {corr})"))
                continue
            del pending[corr]
            self._send_cancel(corr, p)
            self._settle_error(p, TimeoutError(f"no reply within the call's timeout (corr {corr})"))
        at = self._calls.next_deadline()
        if at != _INF:
            self._timer_at = at
            self._timer = self._loop.call_at(at, self._expire)

    # ------------------------------------------------------------- sending

    def _open(self, serializer: Serializer, kind: int, timeout: float) -> tuple[PeerConnection, Pending]:
        """The connection and a new call's entry, its deadline armed, for a call sent now."""
        conn = self._conn
        if conn is None or not conn.ready:
            raise NotConnectedError(f"not connected to broker at {self.broker}")
        loop = self._loop
        assert loop is not None
        if timeout >= _FOREVER:  # ended by its own protocol (a job's outcome, a stream's end)
            return conn, self._calls.open(loop.create_future(), serializer, kind)
        at = loop.time() + timeout
        p = self._calls.open(loop.create_future(), serializer, kind, at)
        if self._timer is None or at < self._timer_at:
            self._arm_timer(at)
        return conn, p

    def _send_call(self, conn: PeerConnection, p: Pending, frames: list[Any], copy: bool = True) -> None:
        """Send a call opened by ``_open``; if that fails, it was never made."""
        try:
            conn.send(frames, copy)
        except BaseException:
            self._pending.pop(p.corr, None)
            raise

    def _route(self, target: Target) -> bytes:
        if isinstance(target, str):
            route = self._routes.get(target)
            if route is None:
                if not target or "\0" in target:
                    raise ValueError("agent name must be a non-empty string without NUL")
                route = frame.pack_route(Route.NAME, 0, target.encode())
                if len(self._routes) < 4096:
                    self._routes[target] = route
            return route
        if isinstance(target, AgentInfo):
            return self._route(target.name)
        if isinstance(target, Select):
            return target.route()
        raise TypeError(f"target must be an agent name, AgentInfo or Select, not {type(target).__name__}")

    def _command(self, command: str) -> bytes:
        cmd = self._commands.get(command)
        if cmd is None:
            if not command or "\0" in command:
                raise ValueError("command must be a non-empty string without NUL")
            cmd = command.encode()
            if len(self._commands) < 4096:
                self._commands[command] = cmd
        return cmd

    def submit(
        self,
        agent: Target,
        command: str,
        params: Any = None,
        *,
        timeout: float | None = None,
        serializer: str | Serializer | None = None,
        _flags: int = 0,
        _aux: int = 0,
        _options: bytes | None = None,
    ) -> asyncio.Future[Any]:
        """Send an invoke now and return a future for its (decoded) result.

        The pipelining primitive: no task per call. Raises NotConnectedError
        at once if not connected; the future fails with the call's error.
        """
        # The hot path of every call: _open and the route / command caches inlined.
        conn = self._conn
        if conn is None or not conn.ready:
            raise NotConnectedError(f"not connected to broker at {self.broker}")
        s = self._serializer if serializer is None else self._serializers.get(serializer)
        body = EMPTY if params is None else s.dumps(params)  # empty: no params
        route = self._routes.get(agent) if type(agent) is str else None
        if route is None:
            route = self._route(agent)
        cmd = self._commands.get(command)
        if cmd is None:
            cmd = self._command(command)
        to = self.timeout if timeout is None else timeout
        loop = self._loop
        assert loop is not None
        at = _INF if to >= _FOREVER else loop.time() + to  # _FOREVER: ended by its own protocol (NaN: refused)
        # Sent with conn.sock_send: conn.send, after the readiness check above.
        p = self._calls.request(
            conn.sock_send, loop.create_future(), s, _REQUEST, _flags, _aux, at, to, route, cmd, body, _options
        )
        if at < self._timer_at or (self._timer is None and at != _INF):
            self._arm_timer(at)
        if _flags & F_TRACKED:
            p.accepted = loop.create_future()
        return p.fut

    async def invoke(
        self,
        agent: Target,
        command: str,
        params: Any = None,
        *,
        timeout: float | None = None,
        returns: type[T] | Any = None,
        serializer: str | Serializer | None = None,
    ) -> Any:
        """Call ``command`` on ``agent`` and return its result (fitted to ``returns`` if given).

        ``agent`` is a name, an AgentInfo or a ``Select``. Raises RemoteError
        (the handler raised), RoutingError / AgentLostError, TimeoutError,
        ResultTypeError.
        """
        to = self.timeout if timeout is None else timeout
        if self._middleware:
            call = Call("client", "invoke", command, params, _target_name(agent))

            async def endpoint(c: Call) -> Any:
                await self._wait_ready(to)
                return await self.submit(agent, c.command, c.params, timeout=to, serializer=serializer)

            value = await build_chain(self._middleware, endpoint)(call)
        else:
            conn = self._conn
            if conn is None or not conn.ready:
                await self._wait_ready(to)
            value = await self.submit(agent, command, params, timeout=to, serializer=serializer)
        return coerce(value, returns) if returns is not None else value

    async def execute(
        self,
        agent: Target,
        command: str,
        params: Any = None,
        *,
        timeout: float | None = None,
        returns: Any = None,
        serializer: str | Serializer | None = None,
        max_attempts: int = 1,
        retry_initial: float | None = None,
        retry_max: float | None = None,
        non_retryable: Sequence[str] = (),
        job_timeout: float | None = None,
        delay: float | None = None,
        run_at: float | None = None,
        idempotency_key: str | None = None,
    ) -> Job:
        """Submit a tracked job; returns a ``Job`` once the broker has durably recorded it.

        ``timeout``: how long to wait for that. The job itself: up to
        ``max_attempts`` deliveries, retried after a backoff from ``retry_initial``
        doubling to ``retry_max`` seconds (with jitter) unless the handler's error
        type is in ``non_retryable``; each attempt may run ``job_timeout`` seconds
        (then TIMED_OUT); it starts after ``delay`` seconds or at unix time
        ``run_at``. With ``idempotency_key``, submitting the same key again gives
        the same job, and its effect runs at most once.
        """
        to = self.timeout if timeout is None else timeout
        options = _job_options(
            max_attempts, retry_initial, retry_max, non_retryable, job_timeout, delay, run_at, idempotency_key
        )
        if not self._middleware:
            # The pipelining fast path: no Call, no closure, no coroutine besides this one.
            conn = self._conn
            if conn is None or not conn.ready:
                await self._wait_ready(to)
            p = self._submit_job(agent, command, params, to, serializer, options)
            assert p.accepted is not None
            return Job(self, await p.accepted, p.fut, returns, p)

        async def endpoint(c: Call) -> Job:
            await self._wait_ready(to)
            # ``to`` bounds the wait for ACCEPTED (the shared deadline heap, no timer per call);
            # the result may come long after: the job's own policy decides when.
            p = self._submit_job(agent, c.command, c.params, to, serializer, options)
            assert p.accepted is not None
            job_id = await p.accepted  # an error or the timeout before ACCEPTED fails it too
            return Job(self, job_id, p.fut, returns)

        call = Call("client", "execute", command, params, _target_name(agent))
        job: Job = await build_chain(self._middleware, endpoint)(call)
        return job

    def submit_job(
        self,
        agent: Target,
        command: str,
        params: Any = None,
        *,
        timeout: float | None = None,
        serializer: str | Serializer | None = None,
        max_attempts: int = 1,
        retry_initial: float | None = None,
        retry_max: float | None = None,
        non_retryable: Sequence[str] = (),
        job_timeout: float | None = None,
        delay: float | None = None,
        run_at: float | None = None,
        idempotency_key: str | None = None,
    ) -> SubmittedJob:
        """Send a tracked job now, as ``execute`` does, without a task or a wait: the
        pipelining primitive for jobs, as ``submit`` is for invoke (no middleware runs).

        Returns a ``SubmittedJob``: ``accepted`` resolves to the job id once the broker has
        durably recorded it, or fails (not recorded, no ACCEPTED within ``timeout``);
        ``result`` resolves to the job's decoded result or fails with its error (also with
        the error that failed ``accepted``). Raises NotConnectedError at once if not connected.
        """
        to = self.timeout if timeout is None else timeout
        options = _job_options(
            max_attempts, retry_initial, retry_max, non_retryable, job_timeout, delay, run_at, idempotency_key
        )
        p = self._submit_job(agent, command, params, to, serializer, options)
        assert p.accepted is not None
        return SubmittedJob(p.accepted, p.fut)

    def _submit_job(
        self,
        agent: Target,
        command: str,
        params: Any,
        timeout: float,
        serializer: str | Serializer | None,
        options: bytes | None,
    ) -> Pending:
        self.submit(agent, command, params, timeout=timeout, serializer=serializer, _flags=F_TRACKED, _options=options)
        return self._pending[self._calls.corr]

    def stream(
        self,
        agent: Target,
        command: str,
        params: Any = None,
        *,
        window: int = 64,
        timeout: float | None = None,
        returns: Any = None,
    ) -> Stream:
        """Iterate a streaming handler's items. ``window``: items the agent may send ahead;
        ``timeout``: the longest wait for any one item (ValueError for a window past 2**32 - 1)."""
        if window > 0xFFFFFFFF:
            raise ValueError(f"window must be at most {0xFFFFFFFF}, not {window}")
        return Stream(self, agent, command, params, window, self.timeout if timeout is None else timeout, returns)

    def _start_stream(self, target: Target, command: str, params: Any, window: int) -> tuple[int, Pending]:
        # No call timeout: a stream lives as long as its consumer; each item has its own.
        self.submit(target, command, params, timeout=_FOREVER, _flags=F_STREAM, _aux=window)
        p = self._pending[self._calls.corr]
        p.items = deque()
        return p.corr, p

    def _send_credit(self, corr: int, p: Pending, n: int) -> None:
        if self._conn is not None and self._conn.ready and p.token:
            self._conn.send([header(Kind.CREDIT, aux=n, corr=corr), p.token])

    def _cancel_stream(self, corr: int, p: Pending) -> None:
        """End a stream the consumer left: CANCEL to its handler, and forget it."""
        if not p.fut.done():
            self._send_cancel(corr, p)
            p.fut.cancel()
        self._pending.pop(corr, None)

    def _send_cancel(self, corr: int, p: Pending) -> None:
        if self._conn is not None and self._conn.ready:
            self._conn.send([header(Kind.CANCEL, corr=corr), p.token])

    async def send_raw(self, agent: Target, data: Any, *, timeout: float | None = None) -> bytes:
        """Send bytes-like ``data`` (bytes, memoryview, numpy array, or a list of them as
        frames) to the agent's raw handler; returns its reply's bytes. From 64 KiB in all the buffers
        go to libzmq without a copy (keep them unchanged until the call ends); smaller ones are
        copied, which costs less than handing a buffer over (measured: docs/benchmarks.md)."""
        parts = await self.send_raw_parts(agent, data, timeout=timeout)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def send_raw_parts(self, agent: Target, data: Any, *, timeout: float | None = None) -> list[bytes]:
        """Like ``send_raw``, returning the reply's frames as a list."""
        to = self.timeout if timeout is None else timeout
        parts = list(data) if isinstance(data, (list, tuple)) else [data]
        size = 0
        for i, part in enumerate(parts):
            if not isinstance(part, bytes):
                try:
                    view = memoryview(part)
                except TypeError:
                    raise TypeError(f"raw frame {i} is not bytes-like: {type(part).__name__}") from None
                if not view.c_contiguous:
                    raise ValueError(f"raw frame {i} is not C-contiguous")
                parts[i] = part = view
                size += view.nbytes
            else:
                size += len(part)

        if not self._middleware:
            conn = self._conn
            if conn is None or not conn.ready:
                await self._wait_ready(to)
            fast: list[bytes] = await self._submit_raw(agent, parts, size, to)
            return fast

        async def endpoint(c: Call) -> list[bytes]:
            await self._wait_ready(to)
            result: list[bytes] = await self._submit_raw(agent, c.params, size, to)
            return result

        call = Call("client", "raw", "", parts, _target_name(agent))
        out: list[bytes] = await build_chain(self._middleware, endpoint)(call)
        return out

    def _submit_raw(self, agent: Target, parts: list[Any], size: int, to: float) -> asyncio.Future[Any]:
        """Send a RAW request now; the future gets the reply's frames."""
        route = self._route(agent)
        conn, p = self._open(self._serializer, _RAW, to)
        hdr = _pack_hdr(b"OM", 1, _RAW, 0, 0, 0, 0, p.corr, 0, time_ns() // 1_000_000 + int(to * 1000))
        self._send_call(conn, p, [hdr, route, *parts], copy=size < 65536)
        return p.fut

    async def execute_on_all(
        self,
        command: str,
        params: Any = None,
        *,
        capability: str | None = None,
        group: str | None = None,
        labels: dict[str, str] | None = None,
        timeout: float | None = None,
    ) -> dict[str, Outcome[Any]]:
        """Invoke ``command`` on every matching agent that serves it, concurrently;
        returns each agent's Outcome (value or error) by agent name."""
        to = self.timeout if timeout is None else timeout
        agents = [
            a for a in await self.agents(capability=capability, group=group, labels=labels) if command in a.commands
        ]
        futs = {a.name: self.submit(a.name, command, params, timeout=to) for a in agents if a.state != "draining"}
        out: dict[str, Outcome[Any]] = {}
        for name, fut in futs.items():
            try:
                out[name] = Outcome(name, value=await fut)
            except OrbitMeshError as exc:
                out[name] = Outcome(name, error=exc)
        return out

    # ------------------------------------------------------------- queries

    def _send_query(self, q: dict[str, Any], timeout: float) -> asyncio.Future[Any]:
        body = msgpack.packb(q, use_bin_type=True)
        conn, p = self._open(self._serializers.get("msgpack"), _QUERY, timeout)
        self._send_call(conn, p, [header(Kind.QUERY, corr=p.corr), EMPTY, body])
        return p.fut

    async def _query(self, q: dict[str, Any], timeout: float | None = None) -> Any:
        # Every query is idempotent: one cut short by a lost connection is asked again once
        # the client has reconnected, within the same timeout.
        to = self.timeout if timeout is None else timeout
        assert self._loop is not None
        end = self._loop.time() + to
        while True:
            left = end - self._loop.time()
            await self._wait_ready(max(0.0, left))
            try:
                return await self._send_query(q, max(0.001, end - self._loop.time()))
            except NotConnectedError:
                if self._conn is None or self._loop.time() >= end:
                    raise

    async def agents(
        self, *, capability: str | None = None, group: str | None = None, labels: dict[str, str] | None = None
    ) -> list[AgentInfo]:
        """The registered agents matching all the filters given (label values may be globs)."""
        rows = await self._query({"op": "agents", "capability": capability, "group": group, "labels": labels})
        return [AgentInfo.from_dict(r) for r in rows]

    async def select_agent(
        self,
        *,
        capability: str | None = None,
        group: str | None = None,
        labels: dict[str, str] | None = None,
        selector: Callable[[AgentInfo], bool] | None = None,
        strategy: str = "least_loaded",
    ) -> AgentInfo:
        """Choose one live agent that matches; raises RoutingError(NO_AGENT_AVAILABLE) if none does."""
        found = [
            a
            for a in await self.agents(capability=capability, group=group, labels=labels)
            if a.state == "alive" and (selector is None or selector(a))
        ]
        if not found:
            raise RoutingError("no agent matches the selection", code=ErrorCode.NO_AGENT_AVAILABLE)
        if strategy == "random":
            return random.choice(found)
        if strategy == "round_robin":
            self._rr += 1
            return sorted(found, key=lambda a: a.name)[self._rr % len(found)]
        if strategy != "least_loaded":
            raise ValueError(f"strategy must be one of {sorted(_STRATEGIES)}, not {strategy!r}")
        return min(found, key=lambda a: (a.load, a.inflight))

    async def get_job(self, job_id: int) -> JobInfo:
        """The broker's record of a tracked job; raises RoutingError(NO_SUCH_JOB)."""
        return JobInfo.from_dict(await self._query({"op": "job", "id": job_id}))

    async def list_jobs(
        self,
        *,
        state: JobState | str | None = None,
        agent: str | None = None,
        command: str | None = None,
        since: float | None = None,
        limit: int = 100,
        cursor: int | None = None,
    ) -> list[JobInfo]:
        """Tracked jobs matching every filter, newest first, at most ``limit``; ``since``:
        created at or after (unix time); ``cursor``: only jobs older than that id (pass the
        last id of a page to get the next)."""
        st = state.value if isinstance(state, JobState) else state
        q = {"op": "jobs", "state": st, "agent": agent, "command": command, "since": since, "limit": limit}
        if cursor is not None:
            q["cursor"] = cursor
        page = await self._query(q)
        return [JobInfo.from_dict(r) for r in page["jobs"]]

    async def wait(self, job_id: int, timeout: float | None = None) -> JobInfo:
        """Wait until a tracked job is terminal and return its record (TimeoutError if it is not
        within ``timeout``); works for any job id, long after it was submitted."""
        to = self.timeout if timeout is None else timeout
        q = {"op": "wait", "id": job_id, "timeout_ms": int(to * 1000)}
        return JobInfo.from_dict(await self._query(q, timeout=to + 1.0))

    wait_job = wait

    async def cancel(self, job_id: int) -> JobInfo:
        """Cancel a tracked job durably (a running handler is cancelled); returns its record.
        A job that already ended keeps its state."""
        return JobInfo.from_dict(await self._query({"op": "cancel", "id": job_id}))

    def job_result(self, info: JobInfo) -> Any:
        """Decode a finished job's result, or raise its error."""
        if info.state == JobState.SUCCEEDED:
            return None if not info.result else self._serializers.get(info.serializer).loads(info.result)
        if not info.state.terminal:
            raise OrbitMeshError(f"job {info.id} is still {info.state.value}", code=ErrorCode.TIMEOUT)
        raise error_for_code(info.error_code or ErrorCode.HANDLER_ERROR, info.error)

    async def stats(self) -> dict[str, Any]:
        """The broker's counters and registry sizes."""
        result: dict[str, Any] = await self._query({"op": "stats"})
        return result

    async def subscribe(self, topics: Sequence[str] = ("agent",), maxsize: int = 10_000) -> AsyncIterator[Event]:
        """Events from the broker: topics "agent" (joined/left/lost/state), "job", or "*".

        Returns an async iterator; events past ``maxsize`` unread are dropped
        (oldest kept) and logged.
        """
        queue: asyncio.Queue[Event] = asyncio.Queue(maxsize)
        entry = (set(topics), queue)
        self._subscriptions.append(entry)
        try:
            await self._query({"op": "subscribe", "topics": list(topics)})
        except BaseException:
            self._subscriptions.remove(entry)  # refused (or cancelled): nothing to deliver to
            raise
        return _EventIter(self, entry)

    # ------------------------------------------------------------- inbound

    def _on_message(self, frames: list[Any], fields: tuple[Any, ...]) -> None:
        kind = fields[2]
        corr = fields[7]
        if kind == _REPLY:  # first: every call ends with one
            p = self._pending.pop(corr, None)
            if p is None:
                return
            fut = p.fut
            if fut.done():
                return
            waiter = p.waiter
            if waiter is not None and p.items is None and not waiter.done():  # a Job.result() waiting
                waiter.set_result(None)
            pkind = p.kind
            if pkind == _QUERY:
                fut.set_result(msgpack.unpackb(frames[2], raw=False) if len(frames) > 2 else None)
            elif pkind == _RAW or fields[3] & F_RAW_REPLY:
                fut.set_result(frames[2:])
            else:
                s: Serializer | None = p.serializer
                if (fields[3] >> 8) & 0xF != p.serializer.id:
                    try:
                        s = self._serializers.from_flags(fields[3])
                    except OrbitMeshError as exc:
                        fut.set_exception(exc)
                        s = None
                if s is not None:
                    decode_reply(fut, s, frames[2] if len(frames) > 2 else EMPTY)
                if p.accepted is not None and fut.done() and not fut.cancelled():
                    fut.exception()  # a job's outcome may never be asked for (see _settle_error)
            return
        p = self._pending.get(corr)
        if p is None:
            if kind == Kind.EVENT:
                self._on_event(frames)
            return
        if kind == _ACCEPTED:  # a job's second message, every execute has one
            if p.accepted is not None and not p.accepted.done():
                p.accepted.set_result(fields[8])
            return
        if kind == Kind.ERROR:
            del self._pending[corr]
            self._settle_error(p, parse_error(fields[4], frames))
        elif kind == Kind.STREAM_ITEM:
            if p.items is not None:
                p.token = frames[1]
                p.items.append(frames[2] if len(frames) > 2 else b"")
                if p.waiter is not None and not p.waiter.done():
                    p.waiter.set_result(None)
        elif kind == Kind.STREAM_END:
            if not p.fut.done():
                p.fut.set_result(None)
            if p.waiter is not None and not p.waiter.done():
                p.waiter.set_result(None)
        elif kind == Kind.RUNNING:
            p.token = frames[1]

    def _settle_error(self, p: Pending, exc: OrbitMeshError) -> None:
        fut = p.fut
        if not fut.done():
            fut.set_exception(exc)
            if p.items is not None or p.accepted is not None:
                # A stream reads it itself; a job's outcome may never be asked for (a job is
                # often fire and forget): neither is "an exception nobody retrieved".
                fut.exception()
        if p.waiter is not None and not p.waiter.done():
            p.waiter.set_result(None)
        if p.accepted is not None and not p.accepted.done():
            # The same error is on both futures: whichever one the caller reads reports it.
            p.accepted.set_exception(exc)
            p.accepted.exception()

    def _on_event(self, frames: list[Any]) -> None:
        try:
            body = msgpack.unpackb(frames[2], raw=False)
            event = Event(str(body["type"]), dict(body.get("data") or {}), float(body.get("time", 0.0)))
        except Exception:
            log.warning("dropping a malformed event from the broker")
            return
        group = event.type.split("_", 1)[0]
        for topics, queue in self._subscriptions:
            if group in topics or event.type in topics or "*" in topics:
                if queue.full():
                    log.warning("event queue full: dropping %s", event.type)
                    continue
                queue.put_nowait(event)


class _EventIter(AsyncIterator[Event]):
    def __init__(self, client: MeshClient, entry: tuple[set[str], asyncio.Queue[Event]]) -> None:
        self._client = client
        self._entry = entry

    def __aiter__(self) -> _EventIter:
        return self

    async def __anext__(self) -> Event:
        return await self._entry[1].get()

    async def get(self, timeout: float) -> Event:
        """The next event, or TimeoutError after ``timeout`` seconds."""
        try:
            return await asyncio.wait_for(self._entry[1].get(), timeout)
        except builtins.TimeoutError:
            raise TimeoutError(f"no event within {timeout} s") from None

    async def aclose(self) -> None:
        if self._entry in self._client._subscriptions:
            self._client._subscriptions.remove(self._entry)


class _NotYet(Exception):
    """Internal: _wait_done's time ran out."""


async def _wait_done(fut: asyncio.Future[Any], timeout: float | None) -> None:
    """Wait until ``fut`` is done, at most ``timeout`` seconds (``_NotYet`` then), without
    cancelling it and without the Task that ``asyncio.wait_for`` would create per call."""
    if fut.done():
        return
    if timeout is None:
        await asyncio.shield(fut)
        return
    loop = fut.get_loop()
    waiter: asyncio.Future[None] = loop.create_future()

    def wake(_: object = None) -> None:
        if not waiter.done():
            waiter.set_result(None)

    fut.add_done_callback(wake)
    handle = loop.call_later(timeout, wake)
    try:
        await waiter
    finally:
        handle.cancel()
        fut.remove_done_callback(wake)
    if not fut.done():
        raise _NotYet


def _target_name(target: Target) -> str:
    if isinstance(target, str):
        return target
    if isinstance(target, AgentInfo):
        return target.name
    return ""


__all__ = ["Job", "MeshClient", "Outcome", "Select", "Stream", "SubmittedJob", "coerce"]
