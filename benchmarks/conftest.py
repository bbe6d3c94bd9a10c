"""Fixtures for the pytest-benchmark suites: every hot path on the compiled core and on its
pure-Python twin, side by side. An unbuilt compiled core is an error here, never a skip."""

from __future__ import annotations

from collections.abc import Iterator
from types import ModuleType
from typing import Any

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


@pytest.fixture(params=["c", "py"], ids=["c", "py"])
def calls_impl(request: pytest.FixtureRequest) -> ModuleType:
    """The client's call table module: ``_calls_c`` or ``_calls_py``."""
    return load("_calls", request.param)


@pytest.fixture(params=["c", "py"], ids=["c", "py"])
def serve_impl(request: pytest.FixtureRequest) -> ModuleType:
    """The agent's request dispatcher module: ``_serve_c`` or ``_serve_py``."""
    return load("_serve", request.param)


@pytest.fixture(params=["c", "py"], ids=["c", "py"])
def record_impl(request: pytest.FixtureRequest) -> ModuleType:
    """The job record encoding module: ``_record_c`` or ``_record_py``."""
    return load("_record", request.param)


_IMPL_FIXTURES = ("core_impl", "dataplane_impl", "calls_impl", "serve_impl", "record_impl")
_MEANS: dict[str, dict[str, float]] = {}  # case (test id without the core) -> {"c": s, "py": s}


@pytest.fixture(autouse=True)
def _record_mean(request: pytest.FixtureRequest) -> Iterator[None]:
    """After a benchmark on one core, keep its mean time for the compiled / pure ratio."""
    yield
    callspec = getattr(request.node, "callspec", None)
    bench = request.node.funcargs.get("benchmark")
    if callspec is None or bench is None or bench.disabled or bench.stats is None:
        return
    impl = next((callspec.params[f] for f in _IMPL_FIXTURES if f in callspec.params), None)
    if impl not in ("c", "py"):
        return
    case = request.node.name.replace(f"[{impl}-", "[").replace(f"-{impl}]", "]").replace(f"[{impl}]", "")
    _MEANS.setdefault(case, {})[impl] = bench.stats.stats.mean


def compiled_ratios() -> list[tuple[str, float, float, float]]:
    """(case, compiled mean s, pure mean s, compiled / pure) for every case run on both cores."""
    return [(case, m["c"], m["py"], m["c"] / m["py"]) for case, m in sorted(_MEANS.items()) if {"c", "py"} <= set(m)]


def pytest_terminal_summary(terminalreporter: Any) -> None:
    rows = compiled_ratios()
    if not rows:
        return
    terminalreporter.section("compiled / pure-Python (mean time per round; < 1: the compiled core is faster)")
    width = max(len(case) for case, *_ in rows)
    for case, c, py, ratio in rows:
        terminalreporter.write_line(f"{case:<{width}}  c {c * 1e6:12.2f} us  py {py * 1e6:12.2f} us  {ratio:6.3f}x")
