"""Our `messages` against tshark on the real captures in ../shared/pcaps/public (PROVENANCE.md there).

The acceptance of the foundation: for every UDP capture, the set of (Call-ID, CSeq,
method-or-status) we report equals what `tshark -Y sip` dissects.
"""

from __future__ import annotations

import pytest

from tests.conftest import our_keys, our_messages, require_shared, tshark_sip_keys

UDP_CAPTURES = [
    "eim_sip.pcap",
    "isa_sip.pcap",
    "sngrep_aaa.pcap",  # INVITE retransmissions, CANCEL storm, 408, 407
    "sngrep_ipv6frag.pcap",  # fragmented IPv6 UDP, forking, PRACK
    "heplify_sip_ipv6_udp.pcap",
    "heplify_rtp_rtcp_sip_ipv4_udp.pcap",  # RTP/RTCP noise must not be taken for SIP
    "heplify_FAX-Call-t38-CA-TDM-SIP-FB-1.pcap",  # lots of UDPTL
    "heplify_erspan_sip_ipv4_udp.pcapng",  # SIP inside GRE/ERSPAN
]


@pytest.mark.parametrize("name", UDP_CAPTURES)
def test_same_sip_messages_as_tshark(name: str) -> None:
    path = require_shared() / name
    rows, res = our_messages(path)
    assert res.returncode == 0, res.stderr
    theirs = tshark_sip_keys(path)
    ours = our_keys(rows)
    assert theirs, "tshark found no SIP: the comparison would be empty"
    assert ours == theirs, f"only ours: {sorted(ours - theirs)[:5]}, only tshark: {sorted(theirs - ours)[:5]}"


def test_ndn_fragments_are_not_sip() -> None:
    """NDN over UDP 6363 in IPv6 fragments: reassembled, recognised as not SIP, no error."""
    path = require_shared() / "heplify_ipv6_udp_fragmented.pcap"
    rows, res = our_messages(path)
    assert res.returncode == 0, res.stderr
    assert rows == []
    assert "datagrams reassembled" in res.stderr
    assert tshark_sip_keys(path) == set()


def test_gre_path_is_reported() -> None:
    """Despite its name the capture is GRE with transparent Ethernet bridging (tshark agrees)."""
    rows, _ = our_messages(require_shared() / "heplify_erspan_sip_ipv4_udp.pcapng")
    assert rows and {r["encap"] for r in rows} == {"eth/ip4/gre/eth/ip4"}


def test_ipv6_fragments_reassembled_like_tshark() -> None:
    """sngrep's capture: the big INVITEs only exist after IPv6 reassembly."""
    rows, res = our_messages(require_shared() / "sngrep_ipv6frag.pcap")
    assert any("frag" in str(r["encap"]) for r in rows)
