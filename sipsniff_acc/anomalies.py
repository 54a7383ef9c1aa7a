"""The registry of anomaly names (Zeek's weird.log idea): stable snake_case, layer prefix.

Anything a stage finds odd is returned as an ``Anomaly`` with one of these names and
counted; the run goes on. Skipped traffic (not SIP, ARP, ...) is *not* an anomaly: it is
counted in ``Counters.skipped``.
"""

from __future__ import annotations

from typing import Final

ANOMALIES: Final[dict[str, str]] = {
    # link and network layers
    "link_truncated": "frame shorter than its link-layer header",
    "link_unknown": "link type this build does not decode",
    "ip_truncated": "IP header or payload shorter than its length fields say",
    "ip_bad_header": "IP version or header length field out of range",
    "ip_frag_timeout": "fragments of a datagram never completed within the reassembly timeout",
    "ip_frag_evicted": "incomplete datagram dropped to keep reassembly memory bounded",
    "ip_frag_overlap": "fragment overlapping data already received (first copy kept)",
    "ip_frag_too_big": "fragments claim a datagram larger than 65535 bytes",
    "udp_truncated": "UDP header or payload shorter than its length field says",
    "tunnel_truncated": "tunnel header (GRE, ERSPAN, VXLAN, MPLS) shorter than it should be",
    # SIP
    "sip_bad_start_line": "looked like SIP but the request or status line does not parse",
    "sip_no_header_end": "no empty line ending the headers",
    "sip_missing_call_id": "SIP message without a Call-ID header",
    "sip_missing_cseq": "SIP message without a CSeq header",
    "sip_bad_cseq": "CSeq header that is not 'number method'",
    "sip_bad_content_length": "Content-Length that is not a number",
    "sip_truncated_body": "Content-Length larger than the bytes that follow the headers",
    "sip_missing_via": "SIP message without a Via header",
}
