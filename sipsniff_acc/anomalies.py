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
    "link_too_many_tags": "more stacked 802.1Q/802.1ad tags than any network uses (a loop or garbage)",
    "ip_truncated": "IP header or payload shorter than its length fields say",
    "ip_bad_header": "IP version or header length field out of range, or an endless IPv6 extension header chain",
    "ip_frag_timeout": "fragments of a datagram never completed within the reassembly timeout",
    "ip_frag_evicted": "incomplete datagram dropped to keep reassembly memory bounded",
    "ip_frag_overlap": "fragment overlapping data already received (first copy kept)",
    "ip_frag_too_big": "fragments claim a datagram larger than 65535 bytes",
    "ip_frag_too_many_pieces": "more than 256 fragments for one datagram (the datagram is dropped)",
    "udp_truncated": "UDP header or payload shorter than its length field says",
    "udp_dedup_overflow": "more SIP datagrams within the duplicate window than the filter holds (a flood); it started over",
    "tunnel_truncated": "tunnel header (GRE, ERSPAN, VXLAN, MPLS) shorter than it should be",
    # TCP, WebSocket, SCTP
    "tcp_truncated": "TCP header shorter than its data offset says",
    "tcp_gap": "bytes of a TCP stream never seen (capture loss); the partial message is dropped and framing resyncs",
    "tcp_resync": "bytes that are not SIP skipped inside a SIP stream to reach the next start line",
    "tcp_incomplete_message": "a SIP message still incomplete when its stream closed, reset or went idle",
    "tcp_no_content_length": "a SIP message over TCP without Content-Length (assumed 0, RFC 3261 §18.3)",
    "tcp_message_too_long": "no SIP message end within limits.max_sip_message (default 1 MiB), or a Content-Length beyond it",
    "tcp_stream_evicted": "a stream dropped to keep reassembly memory bounded",
    "ws_bad_frame": "WebSocket frame with reserved bits set or longer than limits.max_sip_message",
    "ws_unfinished_message": "a new WebSocket message began before the fragmented one finished",
    "ws_orphan_continuation": "WebSocket continuation frame without a first frame (capture started mid-message)",
    "sctp_truncated": "SCTP common header or chunk shorter than its length says",
    "sctp_incomplete_message": "SCTP user message whose fragments never all arrived",
    "sctp_bad_fragments": "SCTP fragments of one user message whose E (end) TSN comes before the B (begin) TSN",
    "sctp_message_too_long": "SCTP fragments of one user message adding up to more than limits.max_sip_message (default 1 MiB)",
    "sctp_association_evicted": "an SCTP direction's recent TSNs forgotten to keep the retransmission filter bounded",
    # SIP
    "sip_bad_start_line": "looked like SIP but the request or status line does not parse",
    "sip_no_header_end": "no empty line ending the headers",
    "sip_missing_call_id": "SIP message without a Call-ID header",
    "sip_missing_cseq": "SIP message without a CSeq header",
    "sip_bad_cseq": "CSeq header that is not 'number method' with a number below 2**31 (RFC 3261 §8.1.1.5)",
    "sip_bad_content_length": "Content-Length that is not a number of at most 10 significant digits",
    "sip_truncated_body": "Content-Length larger than the bytes that follow the headers",
    "sip_missing_via": "SIP message without a Via header",
    "sip_too_many_headers": "more than 512 header lines; only the first 512 are looked at",
    "sip_too_many_vias": "more than 128 Via entries; only the first 128 are looked at",
    # HEP input (--hep-listen): the order of what a sender mirrored
    "hep_reorder_late": "a HEP message came after a later one had gone on (beyond --hep-reorder); accounted late",
    "hep_reorder_overflow": "the HEP reorder buffer was full; the oldest message went on early",
    "hep_reply_before_request": "a HEP reply stamped before its request (a sender's clock read order); put after it",
    "hep_reply_hold_expired": "a HEP reply whose request never came within --hep-reorder; let go without it",
    # NATS JetStream input (process --consume): the merge of sensors, the bus format
    "nats_reorder_late": "a message from the bus came after a later one had gone on (beyond --reorder-window); accounted late",
    "nats_reorder_full": "the bus reorder heap was full (a backlog past 100,000 messages or 256 MB); the oldest went on early",
    "nats_bad_message": "a bus message not in the sipsniff-acc format or beyond its bounds; acknowledged and dropped",
    "nats_future_time": "a bus message (or a sensor's clock) stamped more than 5 minutes ahead of the worker's clock; set aside",
}
