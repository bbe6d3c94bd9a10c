"""A job record's encoding (``_core/_record_*``): both twins against msgpack and each other."""

from __future__ import annotations

import math
import struct
import time
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orbitmesh import _core
from orbitmesh.models import JobState
from orbitmesh.storage.base import JobRecord


@pytest.fixture(params=["c", "py"])
def record(request: pytest.FixtureRequest) -> Any:
    return _core.load("_record", request.param)


def packb(values: tuple[Any, ...]) -> Any:
    """msgpack's own bytes for ``values``, or the type of the error it raises."""
    try:
        return msgpack.packb(values, use_bin_type=True)
    except Exception as exc:
        return type(exc)


def pack(record: Any, names: list[str], fields: dict[str, Any]) -> Any:
    try:
        return record.FieldPacker(names).pack(fields)
    except Exception as exc:
        return type(exc)


# Every boundary of msgpack's int, str, bin and array forms, and what msgpack packs itself.
EDGES: list[Any] = [
    *(0, 1, 127, 128, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**63 - 1, 2**63, 2**64 - 1, 2**64, 10**30),
    *(-1, -32, -33, -128, -129, -32768, -32769, -(2**31), -(2**31) - 1, -(2**63), -(2**63) - 1),
    *(0.0, -0.0, 1.5, math.inf, -math.inf, math.nan, 1e308),
    *("", "a" * 31, "a" * 32, "a" * 255, "a" * 256, "a" * 65535, "a" * 65536, "é€😀", "\udc80"),
    *(b"", b"x" * 255, b"x" * 256, b"x" * 65535, b"x" * 65536),
    *((), [], tuple(range(15)), list(range(16)), list(range(65536)), [[[[[[[[[[1]]]]]]]]]]),
    *(None, True, False, JobState.RUNNING, bytearray(b"ab"), memoryview(b"cd"), {"a": 1}, object()),
]


@pytest.mark.parametrize("value", EDGES, ids=lambda v: type(v).__name__ + ":" + repr(v)[:20])
def test_each_value_packs_as_msgpack_packs_it(record: Any, value: Any) -> None:
    got = pack(record, ["a", "b"], {"a": value, "b": 7})
    assert got == packb((value, 7))  # a NaN too: the same bits


values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False)
    | st.binary(max_size=40)
    | st.text(max_size=40)
    | st.sampled_from(list(JobState)),
    lambda inner: st.lists(inner, max_size=5) | st.lists(inner, max_size=5).map(tuple),
    max_leaves=12,
)


@settings(max_examples=200, deadline=None)
@given(st.lists(values, min_size=1, max_size=12))
def test_twins_pack_any_record_alike_and_as_msgpack(items: list[Any]) -> None:
    names = [f"f{i}" for i in range(len(items))]
    fields = dict(zip(names, items, strict=True))
    want = packb(tuple(items))
    for impl in ("c", "py"):
        assert pack(_core.load("_record", impl), names, fields) == want


def test_a_missing_field_is_none_and_extra_ones_are_ignored(record: Any) -> None:
    packer = record.FieldPacker(["a", "b"])
    assert packer.pack({"a": 1}) is None
    assert packer.pack({"b": 1, "a": 2, "c": 3}) == msgpack.packb((2, 1))
    assert record.FieldPacker(["only"]).pack({"only": "x"}) == msgpack.packb(("x",))
    with pytest.raises(ValueError):
        record.FieldPacker([])
    with pytest.raises(TypeError):
        record.FieldPacker(["a", 1])


def test_fields_in_any_order_or_with_extra_keys_pack_alike(record: Any) -> None:
    names = ["alpha", "beta", "gamma", "delta"]
    want = msgpack.packb((1, "b", [2.5], None), use_bin_type=True)
    packer = record.FieldPacker(names)
    assert packer.pack({"alpha": 1, "beta": "b", "gamma": [2.5], "delta": None}) == want  # field order
    assert packer.pack({"delta": None, "gamma": [2.5], "beta": "b", "alpha": 1}) == want  # reversed
    assert packer.pack({"alpha": 1, "extra": 0, "beta": "b", "gamma": [2.5], "delta": None}) == want
    rebuilt = {"".join(("al", "pha")): 1, "".join(("be", "ta")): "b", "gamma": [2.5], "delta": None}
    assert packer.pack(rebuilt) == want  # equal names that are other string objects
    assert packer.pack({"alpha": 1, "beta": "b", "gamma": [2.5]}) is None  # the last one missing


def test_a_large_record_leaves_the_stack_buffer(record: Any) -> None:
    big = [b"p" * 5000, "s" * 3000, [("RUNNING", 1.0, "a" * 100)] * 200]
    names = ["x", "y", "z"]
    assert pack(record, names, dict(zip(names, big, strict=True))) == packb(tuple(big))


def test_a_job_record_encodes_and_decodes(record: Any) -> None:
    now = time.time()
    rec = JobRecord(
        id=42,
        command="square",
        route=b"\x01\x00worker",
        params=b"\x91\x07",
        flags=0x100,
        state=JobState.SUCCEEDED,
        created=now,
        updated=now + 1,
        agent="worker",
        non_retryable=("ValueError",),
        result=b"\x31",
        transitions=[("PENDING", now, ""), ("SUCCEEDED", now + 1, "worker")],
    )
    names = [f.name for f in JobRecord.__dataclass_fields__.values()]
    data = record.FieldPacker(names).pack(rec.__dict__)
    assert data == rec.to_bytes()
    back = JobRecord.from_bytes(data)
    assert back == rec


def template_pack(record: Any, names: list[str], defaults: dict[str, Any], values: dict[str, Any]) -> Any:
    try:
        return record.RecordTemplate(names, defaults, list(values)).pack(tuple(values.values()))
    except Exception as exc:
        return type(exc)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(values, values, st.booleans()), min_size=1, max_size=12))
def test_a_template_packs_what_field_packer_packs_of_its_defaults_and_values(items: list[Any]) -> None:
    # Given a record's fields, each with a default and, for some, a value of its own
    names = [f"f{i}" for i in range(len(items))]
    defaults = {name: default for name, (default, _, _) in zip(names, items, strict=True)}
    own = {name: value for name, (_, value, mine) in zip(names, items, strict=True) if mine}
    # When the template packs the values, Expect msgpack's bytes (or its error) for the whole record
    want = packb(tuple(own.get(name, defaults[name]) for name in names))
    for impl in ("c", "py"):
        assert template_pack(_core.load("_record", impl), names, defaults, own) == want


@pytest.mark.parametrize("value", EDGES, ids=lambda v: type(v).__name__ + ":" + repr(v)[:20])
def test_a_template_packs_each_value_as_msgpack_packs_it(record: Any, value: Any) -> None:
    names = [f"f{i}" for i in range(17)]  # an array of 16+ fields: its 3-byte header
    defaults = {name: i for i, name in enumerate(names)}
    assert template_pack(record, names, defaults, {"f3": value}) == packb((0, 1, 2, value, *range(4, 17)))
    assert template_pack(record, names, defaults, {"f0": value, "f16": "x" * 3000}) == packb(
        (value, *range(1, 16), "x" * 3000)
    )


def test_a_template_refuses_fields_it_cannot_place(record: Any) -> None:
    defaults = {"a": 1, "b": 2, "c": 3}
    template = record.RecordTemplate(["a", "b", "c"], defaults, ["a", "c"])
    assert template.pack((9, 8)) == msgpack.packb((9, 2, 8))
    with pytest.raises(ValueError, match="expected 2 values, got 1"):
        template.pack((9,))
    for variable in (["c", "a"], ["a", "a"], ["d"]):  # out of field order, twice, not a field
        with pytest.raises(ValueError, match="in field order"):
            record.RecordTemplate(["a", "b", "c"], defaults, variable)
    with pytest.raises(ValueError, match="with defaults"):
        record.RecordTemplate(["a", "b", "z"], defaults, ["a"])  # a field with no default


TIMES = [0.0, -0.0, 5e-324, -5e-324, 1.0, -1.0, 1700000000.25, -1e300, 1e300, math.inf, -math.inf, 3]


def test_time_keys_sort_as_the_times_do(record: Any) -> None:
    keys = [record.time_key(t) for t in TIMES]
    assert all(len(k) == 8 for k in keys)
    assert sorted(TIMES) == [t for _, t in sorted(zip(keys, TIMES, strict=True))]
    assert record.time_key(-0.0) == record.time_key(0.0)  # one key for zero
    with pytest.raises(TypeError):
        record.time_key("1")


@settings(max_examples=300, deadline=None)
@given(st.floats(allow_nan=False), st.floats(allow_nan=False))
def test_time_key_twins_agree_and_keep_order(a: float, b: float) -> None:
    c, py = _core.load("_record", "c"), _core.load("_record", "py")
    assert c.time_key(a) == py.time_key(a)
    assert (c.time_key(a) < c.time_key(b)) == (a < b)
    assert struct.unpack(">Q", c.time_key(a))[0] >> 63 == (0 if a < 0 else 1)


@settings(max_examples=200, deadline=None)
@given(
    st.integers(1, 2**64 - 1),
    st.sampled_from(list(JobState)),
    st.floats(allow_nan=False),
    st.floats(allow_nan=False),
)
def test_prepared_rows_twins_build_the_lmdb_row_from_a_records_parts(
    job_id: int, state: JobState, created: float, updated: float
) -> None:
    """``PreparedRows`` (``LmdbStore.prepare_encoded``): the state's code, and a terminal state's
    ``by_done`` key, its update time's key then the id (8 bytes, big-endian); none otherwise."""
    codes = {s: bytes([i]) for i, s in enumerate(JobState)}
    terminal = {s for s in JobState if s.terminal}
    rows = [_core.load("_record", impl).PreparedRows(codes, terminal) for impl in ("c", "py")]
    done = _core.load("_record", "py").time_key(updated) + struct.pack(">Q", job_id) if state.terminal else b""
    expect = (job_id, codes[state], "agent", "cmd", created, "", done, b"data")
    assert [row(job_id, state, "agent", "cmd", created, updated, b"data") for row in rows] == [expect, expect]


@pytest.mark.parametrize("impl", ["c", "py"])
def test_prepared_rows_refuse_an_unknown_state_and_an_id_past_64_bits(impl: str) -> None:
    rows = _core.load("_record", impl).PreparedRows({JobState.SUCCEEDED: b"\x05"}, {JobState.SUCCEEDED})
    with pytest.raises(KeyError):
        rows(1, JobState.PENDING, "a", "c", 1.0, 2.0, b"")
    with pytest.raises((OverflowError, struct.error)):
        rows(2**64, JobState.SUCCEEDED, "a", "c", 1.0, 2.0, b"")
