"""The common-path job table: the compiled module, or its pure-Python twin (see ``orbitmesh._core``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import load

if TYPE_CHECKING:
    from ._jobfast_py import *  # noqa: F403
else:
    _mod = load("_jobfast")
    globals().update({name: getattr(_mod, name) for name in _mod.public_api})

from ._jobfast_py import public_api

__all__ = list(public_api)
