"""The DEALER side of a broker connection, shared by agents and clients.

It says HELLO and waits for WELCOME, sends heartbeats, watches the broker's,
and when the broker goes silent (or forgets us after a restart) opens a fresh
socket and says HELLO again, with capped exponential backoff and jitter.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from typing import Any

import msgpack
import zmq

from ._aio import AsyncSocket
from ._core import frame
from ._wire import HDR, header, parse_error
from .errors import ErrorCode, NotConnectedError, OrbitMeshError, ProtocolError
from .protocol import F_DRAIN, PROTOCOL, Kind

log = logging.getLogger("orbitmesh.peer")

# The broker's answer to HELLO carries these; until then we use them.
DEFAULT_HEARTBEAT_MS = 1000
DEFAULT_LIVENESS = 5
_HANDSHAKE = frozenset((int(Kind.WELCOME), int(Kind.HEARTBEAT)))
# The hot path compares plain ints (an enum attribute costs ~60 ns a compare).
_WELCOME, _ERROR = int(Kind.WELCOME), int(Kind.ERROR)


class PeerConnection:
    """One logical connection to a broker that survives broker restarts.

    ``on_message(frames, fields)`` gets every message other than WELCOME and
    HEARTBEAT, with the unpacked header ``fields`` (HDR layout). ``on_lost()``
    runs when the broker is declared gone (before reconnecting);
    ``on_ready()`` after every successful (re)registration. ``on_batch(batch, start)``, if given,
    handles the received messages it can, in order, before they are dispatched (see ``AsyncSocket``).
    """

    def __init__(
        self,
        endpoint: str,
        hello: dict[str, Any],
        role: int,
        *,
        on_message: Callable[[list[Any], tuple[Any, ...]], None],
        on_lost: Callable[[], None],
        on_ready: Callable[[], None] | None = None,
        on_batch: Callable[[list[list[Any]], int], int] | None = None,
        load: Callable[[], int] | None = None,
        context: zmq.Context[Any] | None = None,
        reconnect_initial: float = 0.05,
        reconnect_max: float = 5.0,
        socket_options: dict[int, Any] | None = None,
    ) -> None:
        self.endpoint = endpoint
        self._hello = {**hello, "protocol": PROTOCOL}  # the newest protocol version we speak
        self._role = role
        self._on_message = on_message
        self._on_lost = on_lost
        self._on_ready = on_ready
        self._on_batch = on_batch
        self._load = load or (lambda: 0)
        self._ctx = context or zmq.Context.instance()
        self._reconnect_initial = reconnect_initial
        self._reconnect_max = reconnect_max
        self._socket_options = socket_options or {}
        self.heartbeat_ms = DEFAULT_HEARTBEAT_MS
        self.liveness = DEFAULT_LIVENESS
        self.session = 0
        self.protocol = 1  # of the current session, as WELCOME said (2: packed framing)
        self.broker_id = ""
        self.ready = False
        self.closed = False
        self._sock: AsyncSocket | None = None
        # The open socket's AsyncSocket.send: for callers that have just checked ``ready`` (the
        # client's hot path), what ``send`` does after its own check.
        self.sock_send: Callable[..., None] = self._not_open
        self._loop: asyncio.AbstractEventLoop | None = None
        self._hello_corr = 0
        self._hello_sent = 0.0
        self._attempt = 0
        self._timer: asyncio.TimerHandle | None = None
        self._welcome: asyncio.Future[None] | None = None
        self._retry_refused = False

    # ------------------------------------------------------------ lifecycle

    async def connect(self, timeout: float, *, retry_refused: float = 0.0) -> None:
        """Open the socket and register; raises on refusal (e.g. NAME_TAKEN) or timeout.

        ``retry_refused`` seconds: keep retrying a refusal that may clear by
        itself (a name still held by a session the broker has not yet expired).
        """
        self._loop = asyncio.get_running_loop()
        loop = self._loop
        end = loop.time() + timeout
        refused_until = loop.time() + retry_refused
        while True:
            self._welcome = loop.create_future()
            if self._sock is None:
                self._open()
            self._say_hello()
            self._arm(self.heartbeat_ms / 1000)
            try:
                await asyncio.wait_for(asyncio.shield(self._welcome), max(0.001, end - loop.time()))
                return
            except TimeoutError:
                self.close()
                raise NotConnectedError(f"no WELCOME from broker at {self.endpoint} within {timeout:.3g} s") from None
            except OrbitMeshError as exc:
                if exc.code == ErrorCode.NAME_TAKEN and loop.time() < min(refused_until, end):
                    await asyncio.sleep(min(0.25, self.heartbeat_ms / 1000))
                    continue
                self.close()
                raise

    def _open(self) -> None:
        assert self._loop is not None
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
        for opt, value in self._socket_options.items():
            sock.setsockopt(opt, value)
        sock.connect(self.endpoint)
        self._sock = AsyncSocket(sock, self._dispatch, self._loop, self._on_batch)
        self.sock_send = self._sock.send

    def _say_hello(self) -> None:
        assert self._sock is not None and self._loop is not None
        self._hello_corr += 1
        self._hello_sent = self._loop.time()
        self._sock.packed = False  # HELLO in protocol 1 framing, which every broker reads
        self._sock.send([header(Kind.HELLO, aux=self._role, corr=self._hello_corr), b"", msgpack.packb(self._hello)])

    def close(self) -> None:
        """Close the socket now; no more messages in or out."""
        self.closed = True
        self.ready = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            self.sock_send = self._not_open
        if self._welcome is not None and not self._welcome.done():
            self._welcome.set_exception(NotConnectedError("connection closed"))
            self._welcome.exception()  # mark retrieved: close() may race connect()

    def _not_open(self, frames: list[Any], copy: bool = True) -> None:
        raise NotConnectedError(f"not connected to broker at {self.endpoint}")

    def send(self, frames: list[Any], copy: bool = True) -> None:
        """Send a message to the broker; raises NotConnectedError while not registered."""
        sock = self._sock
        if sock is None or not self.ready:
            raise NotConnectedError(f"not connected to broker at {self.endpoint}")
        sock.send(frames, copy)

    def bye(self, drain: bool = False) -> None:
        """Tell the broker we are leaving (``drain``: stop sending us work, we finish what we have)."""
        if self._sock is not None and self.ready:
            self._sock.send([header(Kind.BYE, flags=F_DRAIN if drain else 0), b""])

    # ---------------------------------------------------------- heartbeats

    def _arm(self, delay: float) -> None:
        assert self._loop is not None
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._loop.call_later(delay, self._tick)

    def _tick(self) -> None:
        self._timer = None
        if self.closed or self._loop is None:
            return
        now = self._loop.time()
        hb = self.heartbeat_ms / 1000
        if self.ready:
            assert self._sock is not None
            if now - self._sock.last_rx > hb * self.liveness:
                if int(self._sock.sock.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
                    # Our own loop was busy, not the broker silent: read first.
                    self._sock._drain()
                    self._arm(0.001)
                    return
                log.warning("broker at %s silent for %.1f s: reconnecting", self.endpoint, now - self._sock.last_rx)
                self._reconnect()
                return
            self._sock.send([header(Kind.HEARTBEAT, aux=min(self._load(), 0xFFFFFFFF)), b""])
        elif now - self._hello_sent > max(hb, self._backoff()):
            # HELLO unanswered: the broker may be down; retry on a fresh socket.
            self._reconnect()
            return
        self._arm(hb)

    def _backoff(self) -> float:
        top = min(self._reconnect_max, self._reconnect_initial * (2 ** min(self._attempt, 16)))
        return random.uniform(top / 2, top)

    def _reconnect(self) -> None:
        was_ready = self.ready
        self.ready = False
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            self.sock_send = self._not_open
        if was_ready:
            self._on_lost()
        self._attempt += 1
        assert self._loop is not None
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._loop.call_later(self._backoff(), self._restart)

    def _restart(self) -> None:
        self._timer = None
        if self.closed:
            return
        self._open()
        self._say_hello()
        self._arm(self.heartbeat_ms / 1000)

    # ------------------------------------------------------------- inbound

    def _dispatch(self, frames: list[Any]) -> None:
        hdr = frames[0]
        if frame.check_header(hdr):
            log.warning("dropping a message with a bad header from the broker: %r", bytes(hdr[:8]))
            return
        fields = HDR.unpack(hdr)
        kind = fields[2]
        if kind in _HANDSHAKE:
            if kind == _WELCOME and fields[7] == self._hello_corr:
                self._welcomed(frames)
            return
        if kind == _ERROR:
            code = fields[4]
            if fields[7] == self._hello_corr and not self.ready:
                err = parse_error(code, frames)
                if self._welcome is not None and not self._welcome.done():
                    self._welcome.set_exception(err)
                else:
                    log.warning("broker refused registration: %s", err)
                return
            if code in (ErrorCode.NOT_REGISTERED, ErrorCode.KEY_REVOKED) or (
                code == ErrorCode.FORBIDDEN and fields[7] == 0  # the broker closed the session
            ):
                # The broker restarted and forgot us: register again at once
                # (what was in flight is failed by on_lost).
                if self.ready:
                    self.ready = False
                    self._on_lost()
                assert self._loop is not None
                if self._loop.time() - self._hello_sent > 0.05:
                    self._say_hello()
                return
        if self.ready:
            self._on_message(frames, fields)

    def _welcomed(self, frames: list[Any]) -> None:
        try:
            body = msgpack.unpackb(bytes(frames[2]), raw=False) if len(frames) > 2 else {}
        except Exception as exc:
            raise ProtocolError(f"bad WELCOME body: {exc}", code=ErrorCode.BAD_PAYLOAD) from exc
        self.heartbeat_ms = int(body.get("heartbeat_ms", DEFAULT_HEARTBEAT_MS))
        self.liveness = int(body.get("liveness", DEFAULT_LIVENESS))
        self.session = int(body.get("session", 0))
        self.broker_id = str(body.get("broker", ""))
        self.protocol = int(body.get("protocol", 1))
        assert self._sock is not None
        self._sock.packed = self.protocol >= 2
        self.ready = True
        self._attempt = 0
        self._arm(self.heartbeat_ms / 1000)
        if self._welcome is not None and not self._welcome.done():
            self._welcome.set_result(None)
        if self._on_ready is not None:
            self._on_ready()
