"""Fixtures for the pytest-benchmark suites: every hot path on the compiled core and on its
pure-Python twin, side by side. An unbuilt compiled core is an error here, never a skip."""

from __future__ import annotations

from types import ModuleType

import pytest

from orbitmesh._core import load


@pytest.fixture(params=["c", "py"], ids=["c", "py"])
def core_impl(request: pytest.FixtureRequest) -> ModuleType:
    """The frame codec module: ``_frame_c`` or ``_frame_py``."""
    return load("_frame", request.param)


@pytest.fixture(params=["c", "py"], ids=["c", "py"])
def dataplane_impl(request: pytest.FixtureRequest) -> ModuleType:
    """The broker data-plane module: ``_dataplane_c`` or ``_dataplane_py``."""
    return load("_dataplane", request.param)
