"""A client's calls in flight: the compiled module, or its pure-Python twin (see ``orbitmesh._core``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import load

if TYPE_CHECKING:
    from ._calls_py import *  # noqa: F403
else:
    _mod = load("_calls")
    globals().update({name: getattr(_mod, name) for name in _mod.public_api})

from ._calls_py import public_api

__all__ = list(public_api)
