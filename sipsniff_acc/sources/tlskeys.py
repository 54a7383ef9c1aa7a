"""SIP inside TLS, decrypted by tshark with an SSLKEYLOGFILE (the optional deep-dissection engine).

A passive sniffer cannot read TLS; with the session keys (the NSS key log format that
browsers, OpenSSL's keylog callback, Python's ``SSLContext.keylog_filename`` and most SBCs'
debug modes write) tshark can. We hand it the capture once, ask only for SIP carried in
TLS, and take the decrypted bytes of each message (``-x`` gives ``sip_raw``), so our own
parser reads them like any other message. tshark is called directly rather than through
pyshark: pyshark wraps the same JSON in per-packet objects and an event loop, and we need
one field per message.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
from typing import Final

from sipsniff_acc.events import Datagram, Transport

TSHARK_TIMEOUT: Final = 3600.0  #: seconds; tshark re-reads the whole capture


class TlsEngineError(Exception):
    """tshark is missing or failed; the message says which."""


class _Many(list):  # type: ignore[type-arg]
    """Values of a key that tshark's JSON repeated (several SIP messages in one frame)."""


def _repeats(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """Keep every value of a repeated key, in order, instead of the last one only."""
    out: dict[str, object] = {}
    for k, v in pairs:
        if k not in out:
            out[k] = v
        elif isinstance(out[k], _Many):
            out[k].append(v)  # type: ignore[attr-defined]
        else:
            out[k] = _Many([out[k], v])
    return out


def _pack(addr: str) -> bytes:
    return socket.inet_pton(socket.AF_INET6 if ":" in addr else socket.AF_INET, addr)


def decrypted_sip(path: str, keylog: str, tshark: str | None = None) -> list[Datagram]:
    """Every SIP message tshark decrypts in ``path`` with ``keylog``, in capture order."""
    tshark = tshark or shutil.which("tshark")
    if not tshark:
        raise TlsEngineError("--tls-keylog needs tshark (Debian package tshark), which is not installed")
    cmd = [tshark, "-n", "-r", path, "-o", f"tls.keylog_file:{keylog}", "-Y", "sip && tls",
           "-T", "json", "-x", "-J", "frame ip ipv6 tcp sip"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=TSHARK_TIMEOUT, check=False)
    if res.returncode != 0:
        raise TlsEngineError(f"tshark failed on {path}: {res.stderr.strip()[:300]}")
    out: list[Datagram] = []
    for pkt in json.loads(res.stdout or "[]", object_pairs_hook=_repeats):
        layers = pkt["_source"]["layers"]
        frame, tcp = layers["frame"], layers["tcp"]
        ip = layers.get("ip") or layers.get("ipv6")
        src = ip.get("ip.src") or ip.get("ipv6.src")
        dst = ip.get("ip.dst") or ip.get("ipv6.dst")
        raws = layers.get("sip_raw", [])
        for raw in raws if isinstance(raws, _Many) else [raws] if raws else []:
            out.append(Datagram(
                float(frame["frame.time_epoch"]), int(frame["frame.number"]), Transport.TLS,
                _pack(src), int(tcp["tcp.srcport"]), _pack(dst), int(tcp["tcp.dstport"]),
                bytes.fromhex(raw[0]), ("tls",), path,
            ))
    return out
