"""Stub for the compiled ``_libzmq`` (the libzmq binding the data plane cimports)."""

from typing import Any

import zmq

def libzmq_version() -> tuple[int, int, int]: ...
def _selftest_roundtrip(sender: zmq.Socket[Any], receiver: zmq.Socket[Any], frames: list[bytes]) -> list[bytes]: ...
