"""Red team on --hep-listen: what a hostile or broken HEP sender does to the stream's time.

One packet stamped 2100 made the listener's clock (the reorder buffer's releases and the Idle
heartbeats) jump 74 years: every timer of every open call fired, and the Idles stayed there;
one stamped 0 (1970) held every earlier message in the reorder buffer until the next packet
came. The senders' clock is now the median offset of the recent packets; a packet off it by
more than MAX_CLOCK_JUMP waits as a suspect and is set aside (``hep_bad_time``) unless the
vote comes round to it: a sender whose clock really stepped, or a replayed capture, loses
nothing."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from sipsniff_acc.events import Datagram, Idle, Transport
from sipsniff_acc.sources.hep import CLOCK_SAMPLES, MAX_CLOCK_JUMP, HepListener, HepUsageError, RequestFirst, encode

HOST = "127.0.12.1"
A, B = socket.inet_aton("127.0.12.2"), socket.inet_aton("127.0.12.3")
SIP = b"OPTIONS sip:x@127.0.12.3 SIP/2.0\r\nCall-ID: rt-%d\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n"
YEAR_2100 = 4102444800.0


def _run(listener: HepListener, send: list[tuple[float, float]]) -> tuple[list[object], list[tuple[float, object]]]:
    """Iterate ``listener`` in a thread while ``send`` (wall delay, HEP time) goes to it; returns
    what it yielded and (wall time of the yield, item)."""
    port = int(listener.addresses()[0].rsplit(":", 1)[1])
    got: list[object] = []
    seen: list[tuple[float, object]] = []

    def consume() -> None:
        for x in listener:
            got.append(x)
            seen.append((time.monotonic(), x))

    t = threading.Thread(target=consume, daemon=True)
    t.start()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for i, (delay, ts) in enumerate(send):
            time.sleep(delay)
            s.sendto(encode(ts, "UDP", A, 5060, B, 5060, SIP % i, agent_id=i), (HOST, port))
    t.join(60)
    assert not t.is_alive()
    return got, seen


def test_a_packet_from_2100_or_1970_neither_moves_nor_holds_the_clock() -> None:
    listener = HepListener([f"udp://{HOST}:0"], reorder=0.2, duration=3.0)
    now = time.time()
    got, seen = _run(listener, [(0.0, now), (0.05, YEAR_2100), (0.05, 0.0), (0.6, now + 0.7)])
    msgs = [x for x in got if isinstance(x, Datagram)]
    assert [m.source for m in msgs] == ["hep:0", "hep:3"]  # the two that lie about the time: set aside
    assert listener.counters.skipped["hep_bad_time"] == 2
    times = [x.ts for x in got]  # type: ignore[attr-defined]
    assert times == sorted(times)  # the stream's time never goes back
    assert max(times) < now + 60  # nor jumps to 2100 (each timer of each open call would fire)
    # the first message is not held until the next packet (0.65 s later) by a 1970 clock
    first_out = next(w for w, x in seen if isinstance(x, Datagram))
    last_idle_before = [w for w, x in seen if isinstance(x, Idle) and w < first_out]
    assert len(last_idle_before) <= 3, "the first message waited for the next packet"


def test_a_sender_whose_clock_really_stepped_is_followed() -> None:
    listener = HepListener([f"udp://{HOST}:0"], reorder=0.0, duration=2.5)
    step = now = time.time()
    step += 2 * MAX_CLOCK_JUMP  # an NTP step of 10 minutes: the sender's clock was wrong before
    n = CLOCK_SAMPLES + 3
    got, _seen = _run(listener, [(0.0, now)] + [(0.01, step + i / 1000) for i in range(n)])
    msgs = [x for x in got if isinstance(x, Datagram)]
    assert listener.counters.skipped["hep_bad_time"] == 0  # the first few after the step waited, then went on
    assert len(msgs) == 1 + n
    times = [x.ts for x in got]  # type: ignore[attr-defined]
    assert times == sorted(times)


def test_an_old_replay_loses_nothing() -> None:
    """A sender replaying a capture of last year (heplify -rf): a consistent clock, far from ours."""
    listener = HepListener([f"udp://{HOST}:0"], reorder=0.0, duration=2.0)
    old = time.time() - 365 * 86400
    got, _seen = _run(listener, [(0.01, old + i / 100) for i in range(10)])
    msgs = [x for x in got if isinstance(x, Datagram)]
    assert listener.counters.skipped["hep_bad_time"] == 0
    assert [m.source for m in msgs] == [f"hep:{i}" for i in range(10)]


def test_half_packets_held_open_do_not_shut_real_senders_out() -> None:
    """Slowloris: every TCP slot taken by a connection that sent 6 bytes of a packet and waits.
    The newcomer used to be refused (forever: the idle ones were never closed); now the slot of
    one that never brought a packet goes to it, counted ``hep_tcp_evicted``."""
    listener = HepListener([f"tcp://{HOST}:0"], reorder=0.0, duration=3.0, max_connections=8)
    port = int(listener.addresses()[0].rsplit(":", 1)[1])
    got: list[object] = []
    t = threading.Thread(target=lambda: got.extend(listener), daemon=True)
    t.start()
    held = [socket.create_connection((HOST, port)) for _ in range(8)]
    try:
        for s in held:
            s.sendall(b"HEP3\x01\x00")  # a packet of 256 bytes begins, and no more comes
        time.sleep(0.5)
        real = []
        for i in range(3):  # real senders, one after the other, each keeping its connection
            c = socket.create_connection((HOST, port))
            c.sendall(encode(time.time(), "TCP", A, 5060, B, 5060, SIP % i, agent_id=40 + i))
            real.append(c)
            time.sleep(0.3)
        t.join(60)
        assert not t.is_alive()
    finally:
        for s in held + real:
            s.close()
    assert sorted(x.source for x in got if isinstance(x, Datagram)) == ["hep:40", "hep:41", "hep:42"]
    skipped = listener.counters.skipped
    assert skipped["hep_tcp_evicted"] == 3 and skipped["hep_truncated"] == 3  # the half packets, counted


def test_a_flood_of_replies_of_one_transaction_is_linear() -> None:
    """200,000 replies of one branch and no request in a burst (no password needed to send
    them): each held reply let go was taken out by a copy of all those of its key, 2*10^10
    steps (4 minutes of CPU with accounting stopped). A generous bound: linear work ends in seconds."""
    n = 200_000
    reply = b"SIP/2.0 180 Ringing\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK-same\r\nCSeq: 1 INVITE\r\n\r\n"
    first = RequestFirst(0.05, max_held=n)
    done: list[int] = []

    def flood() -> None:
        out = 0
        for i in range(0, n, 1000):  # a burst: all held (within the hold of the first)
            out += len(first.feed([Datagram(1000 + (i + k) / 1e7, i + k, Transport.UDP, b"\1\2\3\4", 1,
                                            b"\1\2\3\5", 2, reply, ("hep3",), "") for k in range(1000)]))
            first.oldest()
        out += len(first.due(1001.0))  # then all past their time at once
        done.append(out)

    t = threading.Thread(target=flood, daemon=True)
    t.start()
    t.join(120)
    assert done == [n], "the flood of replies took minutes (quadratic), or lost some"
    assert first.expired == n and first.held == 0


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    log = ["--log", "none"] if args[0] == "process" else []
    return subprocess.run([sys.executable, "-m", "sipsniff_acc", *args, *log], capture_output=True,
                          text=True, timeout=120, cwd=cwd)


SAMPLE = Path(__file__).resolve().parents[1] / "pcaps" / "sample.pcap"


@pytest.mark.parametrize(("args", "says"), [
    # 70,000 bytes: each --hep-out packet passed HEP's 16-bit length, a traceback per message
    (["process", str(SAMPLE), "--no-db", "--hep-out", f"udp://{HOST}:19070", "--hep-password", "x" * 70000],
     "--hep-password: 70000 bytes; at most 256"),
    # empty (an unset variable): every packet of a real sender dropped as auth_missing, silently
    (["process", "--hep-listen", f"udp://{HOST}:0", "--no-db", "--duration", "0.3", "--hep-password", ""],
     "--hep-password is empty"),
    (["process", str(SAMPLE), "--no-db", "--hep-out", f"udp://{HOST}:19070", "--hep-password", ""],
     "--hep-password is empty"),
    (["capture", "--hep-listen", f"udp://{HOST}:0", "--publish", "nats://127.0.13.1:14299", "--hep-password", ""],
     "--hep-password is empty"),
    (["process", "--hep-listen", f"udp://user:pw@{HOST}:0", "--no-db", "--duration", "0.3"],
     "give the password with --hep-password"),
])
def test_password_mistakes_are_one_line(args: list[str], says: str, tmp_path: Path) -> None:
    p = _cli(*args, cwd=tmp_path)
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 2 and len(lines) == 1 and says in lines[0], p.stderr


def test_a_udp_port_a_proxy_listens_on_is_refused_not_shared() -> None:
    """--hep-listen udp://…:5060 on the proxy's own box: with SO_REUSEADDR on our socket the
    bind succeeded beside the proxy's (Kamailio, heplify-server, another sipsniff-acc set it on
    theirs) and the kernel gave us the proxy's SIP, which we dropped as bad HEP: the proxy
    went deaf, nothing said. Now the port is taken: one line, before the work."""
    theirs = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    theirs.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    theirs.bind((HOST, 0))
    port = theirs.getsockname()[1]
    with theirs:
        with pytest.raises(HepUsageError, match="cannot listen: Address already in use"):
            HepListener([f"udp://{HOST}:{port}"])
        theirs.settimeout(5)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(b"OPTIONS sip:x SIP/2.0\r\n\r\n", (HOST, port))
        assert theirs.recv(100).startswith(b"OPTIONS")  # still theirs
    first = HepListener([f"udp://{HOST}:0"])  # and a second instance of ours on the same port
    try:
        with pytest.raises(HepUsageError, match="Address already in use"):
            HepListener([first.addresses()[0]])
    finally:
        first.close()
