"""The HEP decoder, encoder and reorder buffer (sources/hep.py), and the listener on real
loopback sockets: every length checked against what arrived, HepError and nothing else on
any bytes, drops counted per reason, messages out in HEP-timestamp order."""

from __future__ import annotations

import socket
import struct
import threading
import time
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sipsniff_acc.events import CaptureGap, Datagram, Idle, Transport
from sipsniff_acc.sources import hep
from sipsniff_acc.sources.hep import HepError, HepListener, HepUsageError, ReorderBuffer, RequestFirst, decode, encode

A, B = socket.inet_aton("10.0.0.1"), socket.inet_aton("10.0.0.2")
SIP = (b"INVITE sip:bob@example.com SIP/2.0\r\nVia: SIP/2.0/UDP 10.0.0.1;branch=z9hG4bK1\r\n"
       b"From: <sip:a@x>;tag=1\r\nTo: <sip:bob@example.com>\r\nCall-ID: c1\r\nCSeq: 1 INVITE\r\n"
       b"Content-Length: 0\r\n\r\n")


def kamailio_like(ts: float = 1796192671.767055, password: bytes = b"secret", agent: int = 2001) -> bytes:
    """The 12 chunks in Kamailio 5.6 siptrace's order (hep-notes.md)."""
    return encode(ts, "UDP", A, 5060, B, 5070, SIP, agent, password)


def test_decodes_what_kamailio_sends() -> None:
    p = decode(kamailio_like())
    assert (p.version, p.family, p.proto, p.src, p.dst, p.sport, p.dport) == (3, 4, 17, A, B, 5060, 5070)
    assert (p.ts_sec, p.ts_usec, p.agent_id, p.auth_key, p.payload) == (1796192671, 767055, 2001, b"secret", SIP)
    assert p.correlation_id is None


def test_ipv6_tcp_correlation_compressed_and_vendor_chunks() -> None:
    six_a, six_b = socket.inet_pton(socket.AF_INET6, "2001:db8::1"), socket.inet_pton(socket.AF_INET6, "2001:db8::2")
    pkt = encode(12.000001, Transport.TCP, six_a, 5061, six_b, 5062, SIP, 7, None, b"corr-1", compress=True)
    vendor = struct.pack(">HHH", 0x0013, 99, 6 + 5) + b"hello"  # a vendor chunk: skipped whole
    pkt = b"HEP3" + struct.pack(">H", len(pkt) + len(vendor)) + vendor + pkt[6:]
    p = decode(pkt)
    assert (p.family, p.proto, p.src, p.dst, p.payload, p.correlation_id) == (6, 6, six_a, six_b, SIP, b"corr-1")
    assert p.ts_usec == 1


def _v2(version: int = 2, hlen: int = 16, fam: int = 2, tail: bytes = SIP) -> bytes:
    head = struct.pack(">BBBBHH", version, hlen, fam, 17, 5060, 5070) + A + B
    return head + (struct.pack("<IIH", 1700000000, 250000, 99) if version == 2 else b"") + tail


def test_hep_v2_and_v1() -> None:
    p = decode(_v2())
    assert (p.version, p.ts, p.agent_id, p.sport, p.dport, p.src, p.payload) == (2, 1700000000.25, 99, 5060, 5070, A, SIP)
    p1 = decode(_v2(version=1))
    assert p1.ts is None and p1.payload == SIP


@pytest.mark.parametrize("data, reason", [
    (b"", "truncated"), (b"HEP", "truncated"), (b"HEP3\x00", "truncated"),
    (b"HEP3\x00\x40" + b"\x00" * 10, "truncated"),  # claims 64 bytes, 16 arrived
    (b"HEP3\x00\x03", "bad_length"),
    (b"HEP4\x00\x06", "bad_version"), (b"\x03" + b"\x00" * 30, "bad_version"),
    (b"HEP3\x00\x0a\x00\x00\x00\x0f", "bad_chunk"),  # 4 bytes left for a 6-byte chunk header
    (b"HEP3\x00\x0c\x00\x00\x00\x0f\x00\x20", "bad_chunk"),  # chunk claims 32 bytes, 6 there
    (b"HEP3\x00\x0c\x00\x00\x00\x0f\x00\x05", "bad_chunk"),  # a chunk shorter than its own header
    (b"HEP3\x00\x0d\x00\x00\x00\x07\x00\x07\x01", "bad_chunk"),  # a 1-byte port
    (b"HEP3\x00\x0c" + struct.pack(">HHH", 0, 13, 8) + b"\x00", "bad_chunk"),
    (b"HEP3\x00\x0e" + struct.pack(">HHH", 0, 13, 8) + b"\x00\x05", "keepalive"),
    (b"HEP3\x00\x11" + struct.pack(">HHH", 0, 15, 11) + b"hello", "missing_chunk"),
    (_v2(fam=7), "bad_family"), (_v2(hlen=40), "bad_length"), (_v2()[:20], "truncated"), (_v2(tail=b""), "missing_chunk"),
])
def test_each_malformation_has_its_reason(data: bytes, reason: str) -> None:
    with pytest.raises(HepError) as e:
        decode(data)
    assert e.value.reason == reason
    assert reason in hep.REASONS


def test_too_many_chunks_and_bombs_are_bounded() -> None:
    body = struct.pack(">HHH", 0, 99, 6) * (hep.MAX_CHUNKS + 1)
    with pytest.raises(HepError, match="too_many_chunks"):
        decode(b"HEP3" + struct.pack(">H", 6 + len(body)) + body)
    bomb = zlib.compress(b"A" * (8 << 20))  # 8 MiB of 'A' in ~8 KB
    pkt = kamailio_like()
    payload = struct.pack(">HHH", 0, 16, 6 + len(bomb)) + bomb
    at = pkt.index(struct.pack(">HH", 0, 15))
    forged = b"HEP3" + struct.pack(">H", at + len(payload)) + pkt[6:at] + payload
    with pytest.raises(HepError, match="too_big"):
        decode(forged, max_payload=1 << 20)
    with pytest.raises(HepError, match="decompress"):
        decode(b"HEP3" + struct.pack(">H", at + 6 + 4) + pkt[6:at] + struct.pack(">HHH", 0, 16, 10) + b"junk")


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300))
def test_arbitrary_bytes_raise_only_hep_errors(data: bytes) -> None:
    for candidate in (data, b"HEP3" + data, b"HEP3" + struct.pack(">H", len(data) + 6) + data, b"\x02" + data):
        try:
            decode(candidate, max_payload=4096)
        except HepError as e:
            assert e.reason in hep.REASONS


@settings(max_examples=300, deadline=None)
@given(ts=st.floats(min_value=0, max_value=2**32 - 1, allow_nan=False), six=st.booleans(),
       sport=st.integers(0, 65535), dport=st.integers(0, 65535), payload=st.binary(min_size=1, max_size=2000),
       agent=st.integers(0, 2**32 - 1), password=st.none() | st.binary(max_size=40), compress=st.booleans(),
       transport=st.sampled_from(["UDP", "TCP", "SCTP"]))
def test_round_trip(ts: float, six: bool, sport: int, dport: int, payload: bytes, agent: int,
                    password: bytes | None, compress: bool, transport: str) -> None:
    size = 16 if six else 4
    src, dst = bytes(range(size)), bytes(range(100, 100 + size))
    p = decode(encode(ts, transport, src, sport, dst, dport, payload, agent, password, compress=compress))
    assert (p.src, p.dst, p.sport, p.dport, p.payload, p.agent_id, p.auth_key) == (src, dst, sport, dport, payload,
                                                                                    agent, password)
    assert p.proto == {"UDP": 17, "TCP": 6, "SCTP": 132}[transport]
    assert abs(p.ts_sec + p.ts_usec / 1e6 - ts) <= 1e-6 + abs(ts) * 1e-15  # to the microsecond


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=1, max_size=200), st.integers(0, 400))
def test_a_cut_packet_is_truncated_never_misread(extra: bytes, cut: int) -> None:
    whole = encode(5.5, "UDP", A, 1, B, 2, SIP + extra, 3, b"k")
    part = whole[:min(cut, len(whole) - 1)]
    with pytest.raises(HepError):
        decode(part)


def _d(ts: float, n: int = 0) -> Datagram:
    return Datagram(ts, n, Transport.UDP, A, 1, B, 2, SIP, ("hep3",))


def test_reorder_buffer_orders_within_the_window_and_counts_the_rest() -> None:
    r = ReorderBuffer(window=0.05, max_held=3)
    assert r.push(_d(10.003, 1)) == [] and r.push(_d(10.001, 2)) == [] and r.push(_d(10.002, 3)) == []
    assert [d.no for d in r.due(10.04)] == []  # nothing 50 ms old yet
    assert [d.no for d in r.due(10.0525)] == [2, 3]
    assert [d.no for d in r.push(_d(10.0, 4))] == [] and r.late == 0  # older than released: comes out next
    assert [d.no for d in r.due(10.06)] == [4, 1]
    assert r.late == 1  # 10.000 went after 10.002
    for i in range(5):
        r.push(_d(20 + i, 10 + i))
    assert r.overflow == 2 and len(r) == 3
    assert [d.no for d in r.drain()] == [12, 13, 14]


# --- the listener on loopback -----------------------------------------------------------------

HOST = "127.0.12.1"


def _listen(urls: list[str], **kw: object) -> tuple[HepListener, list[object], threading.Thread]:
    listener = HepListener(urls, **kw)  # type: ignore[arg-type]
    got: list[object] = []
    t = threading.Thread(target=lambda: got.extend(listener), daemon=True)
    return listener, got, t


def test_listener_udp_reorders_counts_and_checks_the_password() -> None:
    # a window of 1 s: the earlier message comes 0.1 s after the later one (a generous margin on a busy machine)
    listener, got, t = _listen([f"udp://{HOST}:0"], password="secret", reorder=1.0, duration=3.0)
    port = int(listener.addresses()[0].rsplit(":", 1)[1])
    t.start()
    now = time.time()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto(kamailio_like(now + 0.003, agent=1), (HOST, port))
        time.sleep(0.1)
        for pkt in (kamailio_like(now + 0.001, agent=2),  # swapped on the way
                    kamailio_like(now, password=b"wrong"), encode(now, "UDP", A, 1, B, 2, SIP),  # no auth key
                    b"HEP3\x00\x20garbage", _v2()):
            s.sendto(pkt, (HOST, port))
    t.join(20)
    assert not t.is_alive()
    msgs = [x for x in got if isinstance(x, Datagram)]
    assert [m.source for m in msgs] == ["hep:2", "hep:1"]  # HEP-timestamp order, not arrival order
    assert [m.encap for m in msgs] == [("hep3",), ("hep3",)]
    assert any(isinstance(x, Idle) for x in got)  # silence is time: heartbeats
    times = [x.ts for x in got]  # type: ignore[attr-defined]
    assert times == sorted(times)  # the stream's time (messages, heartbeats) never goes back
    c = listener.counters
    assert {k: v for k, v in c.skipped.items()} == {"hep_auth_wrong": 1, "hep_auth_missing": 2, "hep_truncated": 1}
    assert c.frames == 6 and listener.packets == 6 and listener.reorder.late == 0


def test_listener_tcp_frames_split_and_coalesced_packets_and_resyncs() -> None:
    listener, got, t = _listen([f"tcp://{HOST}:0"], reorder=0.0, duration=1.5)
    port = int(listener.addresses()[0].rsplit(":", 1)[1])
    t.start()
    now = time.time()
    one, two, three = (encode(now + i / 1000, "TCP", A, 5060, B, 5061, SIP, 9) for i in range(3))
    with socket.create_connection((HOST, port)) as s:
        s.sendall(one[:5])
        time.sleep(0.05)
        s.sendall(one[5:] + two + b"noise!" + three[:20])
        time.sleep(0.05)
        s.sendall(three[20:] + three[:10])  # a packet cut by the close: truncated
    t.join(20)
    msgs = [x for x in got if isinstance(x, Datagram)]
    assert [m.transport for m in msgs] == [Transport.TCP] * 3
    assert [m.payload for m in msgs] == [SIP] * 3
    assert listener.counters.skipped["hep_bad_version"] == 1 and listener.counters.skipped["hep_truncated"] == 1


def test_listener_count_and_usage_errors() -> None:
    listener, got, t = _listen([f"udp://{HOST}:0"], count=2, reorder=0.01)
    port = int(listener.addresses()[0].rsplit(":", 1)[1])
    t.start()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for i in range(2):
            s.sendto(kamailio_like(time.time() + i / 1000, password=b""), (HOST, port))
    t.join(20)
    assert not t.is_alive() and len([x for x in got if isinstance(x, Datagram)]) == 2
    for bad in ("http://1.2.3.4:5", "udp://1.2.3.4", "udp://:5", "udp://1.2.3.4:65536", "tcp://1.2.3.4:5/x", "udp:/x"):
        with pytest.raises(HepUsageError):
            HepListener([bad])
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind((HOST, 0))
        with pytest.raises(HepUsageError, match="cannot listen"):
            HepListener([f"udp://{HOST}:{taken.getsockname()[1]}"])
    with pytest.raises(HepUsageError, match="twice"):
        HepListener([f"udp://{HOST}:19099", f"udp://{HOST}:19099"])


def test_datagrams_the_kernel_dropped_are_a_capture_gap_and_counted() -> None:
    """A burst larger than the socket's buffer while we do not read: every packet sent is
    either yielded or counted as dropped by the kernel (a CaptureGap, as -i reports its own)."""
    listener = HepListener([f"udp://{HOST}:0"], reorder=0.0, duration=2.0)
    listener.udp[0].setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)  # whatever rmem_max allows here
    port = int(listener.addresses()[0].rsplit(":", 1)[1])
    sent = 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        pkt = encode(time.time(), "UDP", A, 1, B, 2, SIP + b"x" * 1200, 5)
        for _ in range(2000):  # ~2.6 MB into a 128 KiB buffer nobody reads yet
            try:
                s.sendto(pkt, (HOST, port))
                sent += 1
            except OSError:
                pass
    items = list(listener)
    got = sum(isinstance(x, Datagram) for x in items)
    gaps = [x for x in items if isinstance(x, CaptureGap)]
    assert gaps and sum(g.dropped for g in gaps) == sent - got
    assert listener.counters.skipped["hep_kernel_drops"] == sent - got > 0


def _sip(first_line: str, branch: str, cseq: str = "1 INVITE") -> bytes:
    return (f"{first_line}\r\nVia: SIP/2.0/TCP 10.0.0.1;branch={branch}\r\nCall-ID: c\r\nCSeq: {cseq}\r\n"
            "Content-Length: 0\r\n\r\n").encode()


def _m(ts: float, payload: bytes, n: int) -> Datagram:
    return Datagram(ts, n, Transport.TCP, A, 1, B, 2, payload, ("hep3",))


def test_a_reply_stamped_before_its_request_goes_after_it() -> None:
    """hep-notes: the callee's 180 carried an earlier HEP time than the INVITE the proxy
    forwarded; it waits (bounded) for that INVITE and goes right after it."""
    f = RequestFirst(hold=0.05)
    ringing = _m(10.0005, _sip("SIP/2.0 180 Ringing", "z9hG4bKfwd"), 1)
    invite = _m(10.0010, _sip("INVITE sip:b@x SIP/2.0", "z9hG4bKfwd"), 2)
    other = _m(10.0007, _sip("SIP/2.0 200 OK", "z9hG4bKnever", "5 OPTIONS"), 3)
    cancel_ok = _m(10.002, _sip("SIP/2.0 200 OK", "z9hG4bKfwd", "1 CANCEL"), 4)
    assert f.feed([ringing, other, invite]) == [invite, ringing]
    assert f.matched == 1 and f.held == 1 and f.oldest() == 10.0007
    assert f.feed([cancel_ok]) == []  # the CANCEL (same branch, other method) was not seen: held
    assert f.due(10.04) == [] and f.due(10.051) == [other]  # held 50 ms, then let go without its request
    assert f.expired == 1 and f.drain() == [cancel_ok] and f.held == 0
    retrans = _m(10.5, _sip("SIP/2.0 180 Ringing", "z9hG4bKfwd"), 5)
    assert f.feed([retrans]) == [retrans]  # its request was seen: no wait
    assert RequestFirst(hold=0).feed([ringing, invite]) == [ringing, invite]  # --hep-reorder 0: off


@settings(max_examples=400, deadline=None)
@given(st.lists(st.one_of(st.binary(max_size=40), st.sampled_from([b"H", b"HE", b"HEP", b"HEP3", b"HEP3\x00\x02"]),
                          st.just(b"@PKT@")), max_size=12),
       st.lists(st.integers(1, 64), min_size=1, max_size=8))
def test_a_tcp_stream_of_anything_is_split_without_looping_and_keeps_every_packet(
        parts: list[bytes], cuts: list[int]) -> None:
    """Garbage and packets in any mix, delivered in reads of any size: every whole packet
    not overlapped by garbage comes out, the rest is skipped with a reason; never a hang."""
    from sipsniff_acc.sources.hep import split_stream

    pkt = encode(1.0, "TCP", A, 1, B, 2, SIP, 4)
    stream = b"".join(pkt if p == b"@PKT@" else p for p in parts)
    buf = bytearray()
    out: list[bytes] = []
    at = i = 0
    while at < len(stream):
        step = cuts[i % len(cuts)]
        i += 1
        buf += stream[at:at + step]
        at += step
        got, bad = split_stream(buf)
        out += got
        assert len(buf) <= max(len(stream), 6)
        assert all(r in hep.REASONS for r in bad)
    for p in out:  # whatever came out decodes or is refused with a reason, never crashes
        try:
            decode(p)
        except HepError as e:
            assert e.reason in hep.REASONS
    if all(p == b"@PKT@" for p in parts):  # a clean stream: every packet, in order
        assert out == [pkt] * len(parts) and not buf


def test_listener_on_ipv6_loopback_takes_ipv6_packets() -> None:
    try:
        listener = HepListener(["udp://[::1]:0"], reorder=0.0, count=1)
    except HepUsageError as e:
        pytest.skip(f"no IPv6 loopback here: {e}")
    url = listener.addresses()[0]
    assert url.startswith("udp://[::1]:")
    six = socket.inet_pton(socket.AF_INET6, "2001:db8::5")
    got: list[object] = []
    t = threading.Thread(target=lambda: got.extend(listener), daemon=True)
    t.start()
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
        s.sendto(encode(time.time(), "UDP", six, 5060, six, 5062, SIP, 8), ("::1", int(url.rsplit(":", 1)[1])))
    t.join(20)
    msgs = [x for x in got if isinstance(x, Datagram)]
    assert [(m.src, m.dport, m.source) for m in msgs] == [(six, 5062, "hep:8")]
