"""Drops under overload are counted exactly: what we report lost equals what reached the
capturing link minus what we read, and the records made meanwhile are marked.

The kernel's own link counters (``ip -s link``, veth: a frame is counted on the receiving
end once it is handed to the stack, where the capture taps it) say how many frames reached
the interface; tcpreplay says how many it sent. Overload is made two ways: the reader is
stopped (SIGSTOP) while a replay fills a 1 MB ring (deterministic: drops are certain), and a
replay at tcpreplay's top speed into a 1 MB ring (the machine decides how many are lost;
exactness must hold either way).
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest

from tests.live.netns import Sniffer, VethPair, cli_options, generate, load_records, replay, split_pcap, stats_drops

CALLS = 600  #: ~8,800 frames, ~4.4 MB: four times a 1 MB ring
STALLED = 2500  #: frames sent while the reader is stopped: ~700 more than a 1 MB ring holds


def _live(veth: VethPair, tmp_path: Path) -> Sniffer:
    if "--ring-size" not in cli_options("process"):
        pytest.fail("process has no --ring-size: the overload test needs a small capture ring")
    return Sniffer(["process", "-i", veth.rx_dev, "--ring-size", "1", "--duration", "300", "--no-db", "--log", "none",
                    "-j", "0", "--jsonl", str(tmp_path / "live.jsonl"), "--stats", str(tmp_path / "live.json"),
                    "--spool", str(tmp_path / "spool")], netns=veth.rx_ns, cwd=tmp_path)


def _check_exact(veth: VethPair, tmp_path: Path, live: Sniffer, sent: int, frames: int) -> tuple[int, int]:
    """Our reported drops == frames that reached the link − frames we read. (drops, seen)."""
    assert sent == frames
    tx, rx = veth.link_stats(rx=False), veth.link_stats()
    assert tx["tx_dropped"] == 0, f"the veth itself dropped frames ({tx}): the premise of the test fails"
    delivered = rx["rx_packets"]
    assert delivered == sent, (rx, sent)
    st = json.loads((tmp_path / "live.json").read_text())
    seen = st["frames"]
    drops = stats_drops(st)
    assert drops is not None, f"the run's stats carry no drop counter: {sorted(st)}"
    assert drops == delivered - seen, f"reported {drops} dropped, but {delivered} reached the link and {seen} were read"
    return drops, seen


def test_a_stalled_reader_loses_frames_and_says_exactly_how_many(veth: VethPair, tmp_path: Path) -> None:
    """The first STALLED frames are replayed while the reader is stopped (a 1 MB ring holds
    ~1,800 of them: the rest are dropped by the kernel), then the reader goes on and the rest
    of the capture follows at a modest rate: calls whose INVITE came before the gap and whose
    answer came after it are accounted, marked capture_gaps."""
    pcap = tmp_path / "w.pcap"
    frames = int(generate(pcap, CALLS, seed=612)["frames"])  # type: ignore[call-overload]
    first, rest = tmp_path / "first.pcap", tmp_path / "rest.pcap"
    n1, n2 = split_pcap(pcap, first, rest, STALLED)
    live = _live(veth, tmp_path)
    try:
        live.wait_listening()
        live.signal(signal.SIGSTOP)  # the reader stops; the kernel keeps filling the ring, then drops
        try:
            sent1 = replay(veth, first, pps=20000)
        finally:
            live.signal(signal.SIGCONT)
        time.sleep(2)  # the ring is read in milliseconds and the drops reported (at least every second)
        sent2 = replay(veth, rest, pps=2000)
        time.sleep(3)  # a loaded machine's margin
        rc = live.finish(timeout=120, sig=signal.SIGINT)
    finally:
        live.kill()
    assert rc in (0, 130), live.stderr
    drops, seen = _check_exact(veth, tmp_path, live, sent1.sent + sent2.sent, n1 + n2)
    assert n1 + n2 == frames and 0 < drops < n1, (drops, seen, n1)
    assert "DROPPED" in live.stderr, f"the summary does not shout the drops: {live.stderr}"
    marked = [r for r in load_records(tmp_path / "live.jsonl") if r.get("capture_gaps")]
    assert marked, "no record is marked capture_gaps although calls were open across the gap"


def test_a_replay_at_top_speed_is_accounted_exactly(veth: VethPair, tmp_path: Path) -> None:
    pcap = tmp_path / "w.pcap"
    frames = int(generate(pcap, CALLS, seed=613)["frames"])  # type: ignore[call-overload]
    live = _live(veth, tmp_path)
    try:
        live.wait_listening()
        sent = replay(veth, pcap, topspeed=True)
        time.sleep(3)
        rc = live.finish(timeout=120, sig=signal.SIGINT)
    finally:
        live.kill()
    assert rc in (0, 130), live.stderr
    drops, seen = _check_exact(veth, tmp_path, live, sent.sent, frames)
    print(f"top speed {sent.pps:.0f} packets/s: {seen} read, {drops} dropped")
