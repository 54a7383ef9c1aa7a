"""Offline == live: a generated capture replayed by tcpreplay into a veth pair of our own gives,
captured live, the very records `process FILE` gives (times aside), with 0 drops reported.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.live.netns import ROOT, Sniffer, VethPair, comparable, generate, load_records, replay, stats_drops

CALLS = 300  #: ~4,400 frames: a few seconds at the test rate
PPS = 1500  #: modest: well under what `-j 0` sustains on a loaded 2-core machine (the benchmark finds the limit)
RULES = """\
profile: kamailio-5.6
acc:
  log_flag: 1
  log_missed_flag: 2
  db_flag: 1
  db_missed_flag: 2
  failed_transaction_flag: 3
  log_extra: "src_user=$fU;src_ip=$si;dst_ip=$Ri;ua=$hdr(User-Agent);srv=$hdr(Server)"
  db_extra: "src_user=$fU;dst_user=$rU"
route:
  - if: {method: INVITE, in_dialog: false}
    setflag: [1, 2, 3]
  - if: {method: BYE, in_dialog: true}
    setflag: [1]
"""


def test_live_capture_of_a_replay_gives_the_offline_records(veth: VethPair, tmp_path: Path) -> None:
    pcap = tmp_path / "w.pcap"
    meta = generate(pcap, CALLS, seed=611)
    frames = int(meta["frames"])  # type: ignore[call-overload]
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    common = ["--rules", str(rules), "--no-db", "--log", "none", "-j", "0"]

    offline = subprocess.run([sys.executable, "-m", "sipsniff_acc", "process", str(pcap), *common,
                              "--jsonl", str(tmp_path / "offline.jsonl"), "--spool", str(tmp_path / "o.spool")],
                             capture_output=True, text=True, timeout=300, cwd=tmp_path,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert offline.returncode == 0, offline.stderr
    want = load_records(tmp_path / "offline.jsonl")
    assert len(want) > CALLS  # the comparison has something to compare: answered, missed, BYEs

    stats = tmp_path / "live.json"
    live = Sniffer(["process", "-i", veth.rx_dev, "--count", str(frames), "--duration", str(frames / PPS + 60),
                    *common, "--jsonl", str(tmp_path / "live.jsonl"), "--stats", str(stats),
                    "--spool", str(tmp_path / "l.spool")], netns=veth.rx_ns, cwd=tmp_path)
    try:
        live.wait_listening()
        sent = replay(veth, pcap, pps=PPS)
        rc = live.finish(timeout=frames / PPS + 120)  # --count ends it once every frame is in
    finally:
        live.kill()
    assert sent.sent == frames and sent.failed == 0, sent.output
    assert rc == 0, live.stderr
    delivered = veth.link_stats()["rx_packets"]
    assert delivered == frames  # the kernel put every frame on the capturing link

    st = json.loads(stats.read_text())
    assert st["frames"] == frames, f"seen {st['frames']} of {frames} frames: {live.stderr}"
    drops = stats_drops(st)
    assert drops in (None, 0), f"drops reported: {drops}"
    got = load_records(tmp_path / "live.jsonl")
    assert comparable(got) == comparable(want)
    assert _per_call(got) == _per_call(want)  # and each call's records come out in the same order


def _per_call(records: list[dict[str, object]]) -> dict[object, list[tuple[object, ...]]]:
    """Each call's records in output order (times shift with the replay rate; order must not)."""
    calls: dict[object, list[tuple[object, ...]]] = {}
    for r in records:
        calls.setdefault(r["call_id"], []).append((r["kind"], r["method"], r["code"], r["cseq"]))
    return calls
