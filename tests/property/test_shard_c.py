"""``_capture.shard`` (the Call-ID shard every -j N worker computes for every SIP datagram of
the capture, fileworker.py) against ``processrun.shard_of`` with the Python Call-ID regex: the
same shard on Call-ID lines of any case, compact or long, with odd spacing, several or none,
and on random bytes. A worker that disagreed would drop or double another worker's calls."""

from __future__ import annotations

import zlib

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from sipsniff_acc import fileworker, pipeline, sip

speedups = pytest.importorskip("sipsniff_acc._capture")


def reference(payload: bytes, shards: int) -> int:
    """processrun.shard_of over sip's regex (the reference of the C call_id too)."""
    cid = sip._call_id_line_py(payload)
    return zlib.crc32(cid.strip() if cid is not None else b"") % shards


NAMES = st.sampled_from([b"Call-ID", b"call-id", b"CALL-ID", b"Call-Id", b"i", b"I", b"call_id", b"Call-IDx",
                         b"Call-", b"x", b"c", b""])
SPACE = st.text(alphabet=" \t\x0b\x0c\r", max_size=3).map(str.encode)
VALUE = st.one_of(st.binary(max_size=30), st.text(alphabet="abc@1.- \t\x0b\x0c", max_size=20).map(str.encode))
LINE = st.tuples(NAMES, SPACE, st.sampled_from([b":", b"", b";"]), SPACE, VALUE,
                 st.sampled_from([b"\r\n", b"\n", b"\r", b""])).map(b"".join)
PAYLOADS = st.lists(st.one_of(LINE, st.binary(max_size=20)), max_size=6).map(b"\n".join)


@settings(max_examples=3000, deadline=None)
@given(PAYLOADS, st.integers(1, 9))
@example(b"INVITE sip:a SIP/2.0\r\nCall-ID: abc\r\n\r\n", 2)
@example(b"INVITE sip:a SIP/2.0\r\ni:\t abc \x0b\r\n", 2)
@example(b"INVITE sip:a SIP/2.0\r\nCall-ID:\r\nCall-ID: b\r\n", 3)
@example(b"no call-id here\ncall-id", 2)
def test_shard_of_call_id_lines(payload: bytes, shards: int) -> None:
    assert speedups.shard(payload, shards) == reference(payload, shards)


@settings(max_examples=1000, deadline=None)
@given(st.binary(max_size=300), st.integers(1, 64))
def test_shard_of_random_bytes(payload: bytes, shards: int) -> None:
    assert speedups.shard(payload, shards) == reference(payload, shards)
    assert speedups.shard(bytearray(payload), shards) == reference(payload, shards)


def test_fileworker_uses_it_and_refuses_no_shards() -> None:
    assert fileworker.shard_of is speedups.shard
    assert pipeline.shard_of is speedups.shard
    assert pipeline._shard_py(b"x\r\nCall-ID: q\r\n", 5) == reference(b"x\r\nCall-ID: q\r\n", 5)
    with pytest.raises(ValueError):
        speedups.shard(b"", 0)
