"""The hot-path core: compiled Cython modules and their pure-Python twins.

Selection rule (one for every module): ``ORBITMESH_NO_EXTENSIONS=1`` or a
non-CPython interpreter selects the pure-Python twins; otherwise the compiled
modules are imported, and a missing build is an error that says how to fix it,
never a silent fallback.
"""

from __future__ import annotations

import importlib
import os
import platform
from types import ModuleType

MODULES = ("_frame", "_dataplane", "_io", "_calls", "_serve", "_record", "_jobfast", "_handoff")


def _wants_pure() -> bool:
    return bool(os.environ.get("ORBITMESH_NO_EXTENSIONS")) or platform.python_implementation() != "CPython"


PURE = _wants_pure()


def load(name: str, impl: str | None = None) -> ModuleType:
    """Import core module ``name`` ("_frame", ...) as ``impl`` "c" or "py" (default: the live one)."""
    impl = impl or ("py" if PURE else "c")
    if impl not in ("c", "py"):
        raise ValueError(f"impl must be 'c' or 'py', not {impl!r}")
    try:
        return importlib.import_module(f"{__name__}.{name}_{impl}")
    except ImportError as exc:
        if impl == "py":
            raise
        raise ImportError(
            f"the compiled OrbitMesh core ({name}_c) is not built: {exc}. "
            "Install the package with `pip install .` (or build in place with "
            "`python setup.py build_ext --inplace`), or set ORBITMESH_NO_EXTENSIONS=1 "
            "to run the pure-Python core."
        ) from exc


def core_impl() -> str:
    """Which core is live: "c" (compiled) or "py" (pure Python)."""
    return "py" if PURE else "c"
