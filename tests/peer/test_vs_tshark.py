"""Our `messages` against tshark on the real captures in ../shared/pcaps/public (PROVENANCE.md there).

The acceptance: for every capture, the set of (Call-ID, CSeq, method-or-status) we report
equals what `tshark -Y sip` dissects (with `-d tcp.port==6060,sip` for the one capture on a
non-standard port, which tshark would otherwise not look at).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.conftest import our_keys, our_messages, require_program, require_shared, tshark_sip_keys

CAPTURES: dict[str, tuple[str, ...]] = {
    "eim_sip.pcap": (),
    "isa_sip.pcap": (),
    "sngrep_aaa.pcap": (),  # INVITE retransmissions, CANCEL storm, 408, 407
    "sngrep_ipv6frag.pcap": (),  # fragmented IPv6 UDP, forking, PRACK
    "sngrep_ipip.pcap": (),  # SIP over TCP inside IP-in-IP
    "heplify_sip_ipv6_udp.pcap": (),
    "heplify_rtp_rtcp_sip_ipv4_udp.pcap": (),  # RTP/RTCP noise must not be taken for SIP
    "heplify_FAX-Call-t38-CA-TDM-SIP-FB-1.pcap": (),  # lots of UDPTL, mirrored duplicates
    "heplify_erspan_sip_ipv4_udp.pcapng": (),  # SIP inside GRE (transparent Ethernet bridging)
    "heplify_sip_ipv4_tcp.pcap": (),
    "heplify_sip_ipv4_tcp_fragmented.pcap": ("-d", "tcp.port==6060,sip"),  # split messages, port 6060
    "heplify_sip_ipv4_tcp_retrans.pcap": (),  # TCP retransmissions, TLS and HTTP streams beside SIP
    "heplify_sip_sctp.pcap": (),
    "heplify_sip_tcp_websocket.pcap": (),  # WebSocket and UDP through a proxy and a B2BUA
}


@pytest.mark.parametrize("name", sorted(CAPTURES))
def test_same_sip_messages_as_tshark(name: str) -> None:
    path = require_shared() / name
    rows, res = our_messages(path)
    assert res.returncode == 0, res.stderr
    theirs = tshark_sip_keys(path, CAPTURES[name])
    ours = our_keys(rows)
    assert theirs, "tshark found no SIP: the comparison would be empty"
    assert ours == theirs, f"only ours: {sorted(ours - theirs)[:5]}, only tshark: {sorted(theirs - ours)[:5]}"


def test_every_public_capture_is_covered() -> None:
    names = {p.name for p in require_shared().iterdir() if ".pcap" in p.name}
    assert names == set(CAPTURES) | {"heplify_ipv6_udp_fragmented.pcap"}


def test_ndn_fragments_are_not_sip() -> None:
    """NDN over UDP 6363 in IPv6 fragments: reassembled, recognised as not SIP, no error."""
    path = require_shared() / "heplify_ipv6_udp_fragmented.pcap"
    rows, res = our_messages(path)
    assert res.returncode == 0, res.stderr
    assert rows == []
    assert "datagrams reassembled" in res.stderr and "0 SIP messages" in res.stderr
    assert tshark_sip_keys(path) == set()


def test_sip_on_port_6060_found_by_content() -> None:
    """We find more than tshark's defaults: it only looks at 6060 when told, we look at content."""
    path = require_shared() / "heplify_sip_ipv4_tcp_fragmented.pcap"
    rows, _ = our_messages(path)
    assert len(rows) == 406
    assert len(tshark_sip_keys(path)) < len(our_keys(rows))


def test_mirrored_duplicates_are_dropped_exactly(tmp_path: Path) -> None:
    """The fax capture holds SIP datagrams seen twice (same IP ID, ~1 ms apart): a mirror.

    We drop the copies (counted), tshark lists both; the messages are the same set.
    """
    path = require_shared() / "heplify_FAX-Call-t38-CA-TDM-SIP-FB-1.pcap"
    stats = tmp_path / "s.json"
    rows, _ = our_messages(path, args=("--stats", str(stats)))
    tshark = require_program("tshark")
    out = subprocess.run([tshark, "-n", "-r", str(path), "-Y", "sip", "-T", "fields", "-e", "ip.src", "-e", "ip.id",
                          "-e", "udp.length", "-e", "sip.Call-ID", "-e", "sip.CSeq"],
                         capture_output=True, text=True, timeout=120, check=True).stdout.splitlines()
    twins = len(out) - len(set(out))  # frames whose source, IP ID, length and SIP identity repeat exactly
    counters = json.loads(stats.read_text())
    assert counters["duplicates"] == twins > 0
    assert len(rows) + twins == len(out)


def test_gre_path_is_reported() -> None:
    """Despite its name the capture is GRE with transparent Ethernet bridging (tshark agrees)."""
    rows, _ = our_messages(require_shared() / "heplify_erspan_sip_ipv4_udp.pcapng")
    assert rows and {r["encap"] for r in rows} == {"eth/ip4/gre/eth/ip4"}


def test_websocket_and_ipip_transports() -> None:
    rows, _ = our_messages(require_shared() / "heplify_sip_tcp_websocket.pcap")
    assert {r["transport"] for r in rows} == {"WS", "UDP"}
    rows, _ = our_messages(require_shared() / "sngrep_ipip.pcap")
    # tshark agrees: frames 2 and 3 are IP-in-IP, 1 and 4 plain IPv4
    assert [r["encap"] for r in rows] == ["eth/ip4", "eth/ip4/ip4", "eth/ip4/ip4", "eth/ip4"]


def test_ipv6_fragments_reassembled_like_tshark() -> None:
    """sngrep's capture: the big INVITEs only exist after IPv6 reassembly."""
    rows, _ = our_messages(require_shared() / "sngrep_ipv6frag.pcap")
    assert any("frag" in str(r["encap"]) for r in rows)
