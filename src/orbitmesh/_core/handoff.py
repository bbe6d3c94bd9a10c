"""The job log's hand-off to its writer thread: the compiled module, or its pure-Python twin (see
``orbitmesh._core``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import load

if TYPE_CHECKING:
    from ._handoff_py import *  # noqa: F403
else:
    _mod = load("_handoff")
    globals().update({name: getattr(_mod, name) for name in _mod.public_api})

from ._handoff_py import public_api

__all__ = list(public_api)
