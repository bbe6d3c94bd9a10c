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
    ]
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
