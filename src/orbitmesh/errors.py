"""Error codes and the exception tree.

Every error that can cross the wire has a stable numeric code (``ErrorCode``),
carried in the header's ``code`` field of an ERROR message. Every exception
OrbitMesh raises descends from :class:`OrbitMeshError` and carries its code.
"""

from __future__ import annotations

import builtins
from enum import IntEnum


class ErrorCode(IntEnum):
    """Stable wire error codes. Never renumber; only append."""

    # 1xx: the message itself is malformed
    BAD_HEADER = 100  # header frame missing or not exactly 40 bytes
    BAD_MAGIC = 101
    UNSUPPORTED_VERSION = 102
    UNKNOWN_KIND = 103
    BAD_FRAMES = 104  # wrong number of frames for the kind
    FRAME_TOO_LARGE = 105
    BAD_ROUTE = 106
    BAD_PAYLOAD = 107  # payload could not be decoded
    BAD_HEADER_FIELD = 108  # a reserved field is not zero
    UNEXPECTED_KIND = 109  # a valid kind that this sender may not send
    # 2xx: registry and routing
    NOT_REGISTERED = 200  # a peer sent a message before HELLO / WELCOME
    NAME_TAKEN = 201
    BAD_HELLO = 202
    NO_SUCH_AGENT = 203
    NO_AGENT_AVAILABLE = 204  # no registered agent matches the selector
    QUEUE_FULL = 205
    DEADLINE_EXCEEDED = 206  # waited in the broker's queue past the deadline
    AGENT_LOST = 207
    UNKNOWN_TOKEN = 208  # reply / credit for a request the broker does not know
    BAD_QUERY = 209
    NO_SUCH_JOB = 210
    SHUTTING_DOWN = 211
    TOO_MANY_REQUESTS = 212  # the client has its limit of requests in flight / queued
    RATE_LIMITED = 213  # the client sends requests faster than its rate limit
    KEY_REFUSED = 214  # HELLO on a connection whose CURVE key is not (or no longer) accepted
    KEY_REVOKED = 215  # the session's key was revoked or rejected: the session is closed
    FORBIDDEN = 216  # the session's key may not do this (role, command patterns, agent selectors)
    REPLAYED = 217  # a REQUEST / RAW whose corr does not increase within the session: a replay
    # 3xx: execution on the agent
    UNKNOWN_COMMAND = 300
    HANDLER_ERROR = 301
    CANCELLED = 302
    NO_RAW_HANDLER = 303
    AGENT_BUSY = 304
    # 4xx: raised locally by the client or agent
    TIMEOUT = 400
    NOT_CONNECTED = 401
    RESULT_TYPE = 402
    SERIALIZATION = 403
    MIDDLEWARE = 404
    # 5xx: the broker's own failure
    INTERNAL = 500
    STORAGE_ERROR = 510  # the job store failed (I/O, server gone)
    STORAGE_CORRUPT = 511  # the data directory is damaged, truncated, or not a job log
    STORAGE_FULL = 512  # no space left for the job log
    STORAGE_VERSION = 513  # the job log was written by an incompatible format version


class OrbitMeshError(Exception):
    """Root of every OrbitMesh exception; ``code`` is the stable error code."""

    code: ErrorCode = ErrorCode.INTERNAL

    def __init__(self, message: str = "", *, code: ErrorCode | int | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = ErrorCode(code)

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""

    def __str__(self) -> str:
        return f"[{self.code.name}] {self.message}"


class ProtocolError(OrbitMeshError):
    """A message broke the wire protocol (the 1xx codes)."""

    code = ErrorCode.BAD_HEADER


class RoutingError(OrbitMeshError):
    """The broker could not route or queue a request (the 2xx codes)."""

    code = ErrorCode.NO_AGENT_AVAILABLE


class AgentLostError(RoutingError):
    """The agent serving a request stopped answering or disconnected."""

    code = ErrorCode.AGENT_LOST


class RemoteError(OrbitMeshError):
    """A handler raised: ``remote_type``, ``message`` and ``traceback`` say what and where."""

    code = ErrorCode.HANDLER_ERROR

    def __init__(
        self,
        message: str = "",
        *,
        code: ErrorCode | int | None = None,
        remote_type: str = "",
        traceback: str = "",
        agent: str = "",
    ) -> None:
        super().__init__(message, code=code)
        self.remote_type = remote_type
        self.traceback = traceback
        self.agent = agent

    def __str__(self) -> str:
        where = f" on {self.agent}" if self.agent else ""
        kind = f"{self.remote_type}: " if self.remote_type else ""
        return f"[{self.code.name}] {kind}{self.message}{where}"


class CancelledError(OrbitMeshError):
    """The request was cancelled."""

    code = ErrorCode.CANCELLED


class TimeoutError(OrbitMeshError, builtins.TimeoutError):  # noqa: A001 - the name users expect
    """A call did not complete within its timeout (also a builtin ``TimeoutError``)."""

    code = ErrorCode.TIMEOUT


class NotConnectedError(OrbitMeshError):
    """The client or agent is not connected (not started, closed, or the broker is gone)."""

    code = ErrorCode.NOT_CONNECTED


class ResultTypeError(OrbitMeshError):
    """A result did not fit the type asked for with ``returns=``."""

    code = ErrorCode.RESULT_TYPE


class SerializationError(OrbitMeshError):
    """A payload could not be encoded or decoded; ``data`` holds the start of the bytes."""

    code = ErrorCode.SERIALIZATION

    def __init__(self, message: str = "", *, code: ErrorCode | int | None = None, data: bytes = b"") -> None:
        super().__init__(message, code=code)
        self.data = data[:64]


class StorageError(OrbitMeshError):
    """The job store failed; ``code`` says how (STORAGE_*), ``path`` where, if it has one."""

    code = ErrorCode.STORAGE_ERROR

    def __init__(self, message: str = "", *, code: ErrorCode | int | None = None, path: str = "") -> None:
        super().__init__(message, code=code)
        self.path = path


class ForbiddenError(RoutingError):
    """The broker refused: this key's role or policy does not allow the request."""

    code = ErrorCode.FORBIDDEN


class MiddlewareError(OrbitMeshError):
    """A middleware hook failed; the original exception is ``__cause__``."""

    code = ErrorCode.MIDDLEWARE


_BY_CODE: dict[int, type[OrbitMeshError]] = {}
for _c in ErrorCode:
    if 100 <= _c < 200:
        _BY_CODE[_c] = ProtocolError
    elif 200 <= _c < 300:
        _BY_CODE[_c] = RoutingError
    else:
        _BY_CODE[_c] = OrbitMeshError
_BY_CODE[ErrorCode.AGENT_LOST] = AgentLostError
_BY_CODE[ErrorCode.FORBIDDEN] = ForbiddenError
_BY_CODE[ErrorCode.HANDLER_ERROR] = RemoteError
_BY_CODE[ErrorCode.UNKNOWN_COMMAND] = RemoteError
_BY_CODE[ErrorCode.NO_RAW_HANDLER] = RemoteError
_BY_CODE[ErrorCode.CANCELLED] = CancelledError
_BY_CODE[ErrorCode.TIMEOUT] = TimeoutError
for _c in (ErrorCode.STORAGE_ERROR, ErrorCode.STORAGE_CORRUPT, ErrorCode.STORAGE_FULL, ErrorCode.STORAGE_VERSION):
    _BY_CODE[_c] = StorageError


def error_for_code(code: int, message: str, **extra: str) -> OrbitMeshError:
    """Build the exception that matches a wire error code (unknown codes keep their number)."""
    try:
        ec = ErrorCode(code)
    except ValueError:
        return OrbitMeshError(f"unknown error code {code}: {message}")
    cls = _BY_CODE.get(ec, OrbitMeshError)
    if cls is RemoteError:
        return RemoteError(message, code=ec, **extra)
    return cls(message, code=ec)


__all__ = [
    "AgentLostError",
    "CancelledError",
    "ErrorCode",
    "ForbiddenError",
    "MiddlewareError",
    "NotConnectedError",
    "OrbitMeshError",
    "ProtocolError",
    "RemoteError",
    "ResultTypeError",
    "RoutingError",
    "SerializationError",
    "StorageError",
    "TimeoutError",
    "error_for_code",
]
