"""Build the compiled core: every ``src/orbitmesh/_core/*.pyx`` becomes an extension.

Nothing links libzmq: the data plane resolves the libzmq symbols pyzmq already
loaded at import time (see docs/architecture.md), so no zmq headers are needed.
Set ORBITMESH_CYTHON_TRACE=1 for line tracing, ORBITMESH_CYTHON_ANNOTATE=1 for
the annotated HTML.
"""

from __future__ import annotations

import os
import sys
from glob import glob

from setuptools import Extension, setup


def _liblmdb() -> tuple[list[str], list[str]] | None:
    """(include dirs, library dirs) where liblmdb's header is, or None: then ``_lmdb_c`` is not
    built and the job store runs on py-lmdb. ``ORBITMESH_REQUIRE_LIBLMDB=1``: not found is an error."""
    include = os.environ.get("LMDB_INCLUDE_DIR")
    lib = os.environ.get("LMDB_LIB_DIR")
    candidates = [include] if include else ["/usr/include", "/usr/local/include", "/opt/homebrew/include"]
    for directory in candidates:
        if directory and os.path.exists(os.path.join(directory, "lmdb.h")):
            return [directory], [lib] if lib else []
    if os.environ.get("ORBITMESH_REQUIRE_LIBLMDB") == "1":
        sys.exit(
            "setup.py: ORBITMESH_REQUIRE_LIBLMDB=1 but lmdb.h was not found (looked in "
            f"{', '.join(c for c in candidates if c)}): install liblmdb-dev (Debian, Ubuntu), "
            "lmdb-devel (Fedora, RHEL with EPEL) or lmdb (Homebrew), or set LMDB_INCLUDE_DIR / LMDB_LIB_DIR"
        )
    return None


def extensions() -> list[Extension]:
    from Cython.Build import cythonize

    trace = os.environ.get("ORBITMESH_CYTHON_TRACE") == "1"
    macros = [("CYTHON_TRACE_NOGIL", "1")] if trace else []
    libraries = ["dl"] if sys.platform.startswith("linux") else []
    exts = [
        Extension(
            "orbitmesh._core." + os.path.splitext(os.path.basename(path))[0],
            [path],
            define_macros=macros,
            libraries=libraries,
            extra_compile_args=["-O3"] if sys.platform != "win32" else [],
        )
        for path in sorted(glob("src/orbitmesh/_core/*.pyx"))
        if not path.endswith("_lmdb_c.pyx")
    ]
    found = _liblmdb()
    if found is not None:
        exts.append(
            Extension(
                "orbitmesh._core._lmdb_c",
                ["src/orbitmesh/_core/_lmdb_c.pyx"],
                include_dirs=found[0],
                library_dirs=found[1],
                libraries=["lmdb"],
                extra_compile_args=["-O3"] if sys.platform != "win32" else [],
            )
        )
    directives = {"language_level": "3", "embedsignature": True, "boundscheck": False, "wraparound": False}
    if trace:
        directives.update(linetrace=True, profile=True)
    return cythonize(
        exts,
        compiler_directives=directives,
        include_path=["src"],  # resolve `cimport orbitmesh._core.*` .pxd files from the src layout
        annotate=os.environ.get("ORBITMESH_CYTHON_ANNOTATE") == "1",
    )


setup(ext_modules=extensions())
