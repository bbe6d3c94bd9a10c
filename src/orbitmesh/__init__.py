"""OrbitMesh: a fast, dependable foundation layer for distributed systems.

A ZeroMQ ROUTER/DEALER broker with a compiled forwarding core, agents that
serve handlers, and an asyncio client (plus a blocking facade).
"""

from __future__ import annotations

from ._core import core_impl
from .acl import Policy
from .agent import Agent, command
from .broker import Broker
from .client import Job, MeshClient, Outcome, Select, Stream, SubmittedJob, coerce
from .errors import (
    AgentLostError,
    CancelledError,
    ErrorCode,
    ForbiddenError,
    MiddlewareError,
    NotConnectedError,
    OrbitMeshError,
    ProtocolError,
    RemoteError,
    ResultTypeError,
    RoutingError,
    SerializationError,
    StorageError,
    TimeoutError,
)
from .middleware import Call, LoggingMiddleware, MetricsMiddleware, Middleware
from .models import AgentInfo, Event, JobInfo, JobState
from .runtime import new_event_loop, run
from .security import Keypair, KeyStore, PeerKeys
from .serializers import JsonSerializer, MsgpackSerializer, RawSerializer, Serializer
from .sync import BlockingClient

__version__ = "0.1.0"

__all__ = [
    # runtime
    "__version__",
    "core_impl",
    "new_event_loop",
    "run",
    # roles
    "Agent",
    "BlockingClient",
    "Broker",
    "MeshClient",
    "command",
    # calls and results
    "AgentInfo",
    "Event",
    "Job",
    "JobInfo",
    "JobState",
    "Outcome",
    "Select",
    "Stream",
    "SubmittedJob",
    "coerce",
    # middleware and serializers
    "Call",
    "JsonSerializer",
    "LoggingMiddleware",
    "MetricsMiddleware",
    "Middleware",
    "MsgpackSerializer",
    "RawSerializer",
    "Serializer",
    # security
    "Keypair",
    "KeyStore",
    "PeerKeys",
    "Policy",
    # errors
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
]
