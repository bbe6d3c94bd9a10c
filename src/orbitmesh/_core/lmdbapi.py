"""The LMDB binding the job store uses: ``_lmdb_c`` (the system's liblmdb, compiled) or its twin
``_lmdb_py`` (py-lmdb).

The compiled one is live with the compiled core, when it was built: ``setup.py`` builds it only
where liblmdb's headers are found (``ORBITMESH_REQUIRE_LIBLMDB=1`` makes their absence a build
error, as CI and the wheels do). Built without them, the job store runs on py-lmdb, the same
files and behaviour at a higher cost per write: ``BINDING`` says which, and the store logs it when it opens.
A compiled binding that was built but does not load (liblmdb missing at run time) is an error
that says so, never a silent switch. ``ORBITMESH_NO_EXTENSIONS=1`` selects py-lmdb.
"""

from __future__ import annotations

import importlib.util
from types import ModuleType
from typing import TYPE_CHECKING

from . import PURE, load
from ._lmdb_py import public_api


def _select() -> tuple[ModuleType, bool]:
    """(the binding, whether py-lmdb stands in for an unbuilt compiled one)."""
    if PURE:
        return load("_lmdb", "py"), False
    if importlib.util.find_spec(f"{__package__}._lmdb_c") is None:
        return load("_lmdb", "py"), True
    return load("_lmdb", "c"), False


if TYPE_CHECKING:
    from ._lmdb_py import *  # noqa: F403
    from ._lmdb_py import BINDING as BINDING

    STAND_IN: bool
else:
    _mod, STAND_IN = _select()
    globals().update({name: getattr(_mod, name) for name in _mod.public_api})

__all__ = [*public_api, "STAND_IN"]
