"""Log lines can't be forged: control characters from a packet are escaped in ACC lines
(log file, stdout, syslog datagrams), in `messages` output and in the summaries.

Issue 10: a bare CR in a reason phrase or a header used by log_extra was written raw, so a
reader splitting on universal newlines saw a forged `ACC: transaction answered` line, and
terminal escape sequences (ESC [ ...) reached the operator's terminal.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

from tests.builders import ether, ip4_udp, pcap_bytes, sip_request, sip_response

FORGED = "\rACC: transaction answered: timestamp=1;method=INVITE;from_tag=x;to_tag=y;call_id=forged;code=200;reason=OK"
UA = "evil\x1b[2J\x1b]0;pwned\x07UA\x85\u2028x\x9b31m"
RULES = ('acc: {log_flag: 1, log_missed_flag: 2, log_extra: "ua=$hdr(User-Agent);ct=$hdr(X-Note)"}\n'
         "route:\n  - if: {method: INVITE}\n    setflag: [1, 2]\n")


def _capture(tmp_path: Path) -> Path:
    """One call whose 200's reason carries a bare CR + a forged ACC line, a User-Agent full of
    terminal escapes, and a header with a NUL and DEL; plus a request whose method carries an
    ESC (not SIP: skipped, never printed)."""
    call = {"call_id": "evil-call@test"}
    inv = sip_request(extra_headers=(f"User-Agent: {UA}", "X-Note: a\x00b\x7fc\td"), **call)
    ok = sip_response(200, "OK" + FORGED, to_tag="tt1", **call)
    odd = sip_request("FOO\x1b[5m", call_id="odd@test", branch="z9hG4bK-odd")
    frames = [(1000.0, ether(ip4_udp(inv))), (1000.5, ether(ip4_udp(ok, src="192.0.2.2", dst="192.0.2.1"))),
              (1001.0, ether(ip4_udp(odd)))]
    path = tmp_path / "evil.pcap"
    path.write_bytes(pcap_bytes(frames))
    return path


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "sipsniff_acc", *args], capture_output=True, timeout=120, cwd=cwd)


def _no_raw_controls(data: bytes) -> None:
    """Nothing but LF line ends: no CR, ESC, BEL, NUL, DEL, C1 or U+2028 anywhere."""
    text = data.decode("utf-8")
    bad = [c for c in text if c != "\n" and (ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F or c in "\u2028\u2029")]
    assert not bad, f"raw control characters written: {bad!r}"


def test_acc_line_cannot_be_forged_in_log_stdout_and_syslog(tmp_path: Path) -> None:
    cap = _capture(tmp_path)
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    udp.settimeout(10)
    try:
        res = _run("process", str(cap), "--rules", str(rules), "--no-db", "--log", str(tmp_path / "acc.log"),
                   "--syslog", f"udp://127.0.0.1:{udp.getsockname()[1]}", "--open-as-408", cwd=tmp_path)
        assert res.returncode == 0, res.stderr
        datagram = udp.recv(65536)
    finally:
        udp.close()
    raw = (tmp_path / "acc.log").read_bytes()
    with open(tmp_path / "acc.log", encoding="utf-8") as f:  # universal newlines, as a log reader does
        lines = f.read().splitlines()
    answered = [ln for ln in lines if "ACC: transaction answered" in ln]
    assert len(answered) == 1, lines  # the forged line is part of the real one, not a line of its own
    assert "call_id=forged" in answered[0] and "reason=OK\\rACC: transaction answered: " in answered[0]
    assert "ua=evil\\x1b[2J\\x1b]0;pwned\\x07UA\\x85\\u2028x\\x9b31m;ct=a\\x00b\\x7fc\\td" in answered[0]
    _no_raw_controls(raw)
    assert datagram.endswith(b"\n") and datagram.count(b"\n") == 1 and b"\r" not in datagram
    _no_raw_controls(datagram)
    res = _run("process", str(cap), "--rules", str(rules), "--no-db", cwd=tmp_path)  # --log - (stdout)
    assert res.returncode == 0
    _no_raw_controls(res.stdout)
    assert [ln for ln in res.stdout.decode().splitlines() if "ACC:" in ln] == [
        ln for ln in lines if "ACC:" in ln and "missed" not in ln and "408" not in ln]


def test_summary_never_prints_a_captured_escape(tmp_path: Path) -> None:
    """A damaged capture named by whoever filled the directory: its name is quoted in the
    summary's error line (and in the -q error line), escaped."""
    folder = tmp_path / "uploads"
    folder.mkdir()
    (folder / "a.pcap").write_bytes(_capture(tmp_path).read_bytes())
    (folder / "evil\x1b[2J\rACC: forged.pcap").write_bytes(b"\xd4\xc3\xb2\xa1 truncated header")
    for quiet in ((), ("-q",)):
        res = _run("process", str(folder), "--no-db", "--log", "none", *quiet, cwd=tmp_path)
        assert res.returncode == 1, res.stderr
        _no_raw_controls(res.stderr)
        assert "evil\\x1b[2J\\rACC: forged.pcap" in res.stderr.decode()


def test_messages_table_and_jsonl_are_terminal_safe(tmp_path: Path) -> None:
    cap = _capture(tmp_path)
    table = _run("messages", "-T", "table", "-q", "-j", "0", str(cap), cwd=tmp_path)
    assert table.returncode == 0, table.stderr
    _no_raw_controls(table.stdout)
    rows = table.stdout.decode().splitlines()
    assert len(rows) == 3 and "200 OK\\rACC: transactio" in rows[2]
    js = _run("messages", "-q", "-j", "0", str(cap), cwd=tmp_path)
    assert js.returncode == 0
    _no_raw_controls(js.stdout)
    docs = [json.loads(ln) for ln in js.stdout.decode().splitlines()]
    assert len(docs) == 2 and docs[1]["reason"] == "OK" + FORGED  # the JSON value itself is unchanged


def test_jsonl_records_are_one_line_each(tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    res = _run("process", str(_capture(tmp_path)), "--rules", str(rules), "--no-db", "--log", "none",
               "--jsonl", str(tmp_path / "r.jsonl"), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    raw = (tmp_path / "r.jsonl").read_bytes()
    _no_raw_controls(raw)
    docs = [json.loads(ln) for ln in raw.decode().splitlines()]
    assert [d["reason"] for d in docs if d["method"] == "INVITE"] == ["OK" + FORGED]


def test_escape_leaves_clean_text_identical_and_is_documented() -> None:
    from sipsniff_acc.sysloglines import escape, json_safe
    clean = "ACC: transaction answered: timestamp=1;method=INVITE;reason=Ça va;ua=a\\b=c;é€"
    assert escape(clean) is clean  # byte-identical to Kamailio's line when there is nothing to escape
    assert escape("a\rb\nc\td\x00e\x1bf\x7fg\x85h\u2028i") == "a\\rb\\nc\\td\\x00e\\x1bf\\x7fg\\x85h\\u2028i"
    line = b'{"a":"x\\r\xc2\x85\x7f\xe2\x80\xa9"}'
    assert json.loads(json_safe(line)) == json.loads(line) and json_safe(line) == b'{"a":"x\\r\\u0085\\u007f\\u2029"}'


def test_jsonl_emitter_line_is_safe_and_takes_any_integer() -> None:
    """A CSeq beyond 64 bits (orjson refuses it) still gives the record's line, not a crash."""
    import io

    from sipsniff_acc.emitters.jsonl import JsonlEmitter
    from sipsniff_acc.records import AccRecord
    rec = AccRecord("answered", 1000.0, "INVITE", "f", "t", "c\u2028x", "200", "OK\r\x85", ("log",), cseq=2**70)
    out = io.BytesIO()
    em = JsonlEmitter(out)
    em.emit([rec])
    em.close()
    raw = out.getvalue()
    _no_raw_controls(raw)
    assert raw.count(b"\n") == 1
    doc = json.loads(raw)
    assert doc["cseq"] == 2**70 and doc["reason"] == "OK\r\x85" and doc["call_id"] == "c\u2028x"


BIDI = "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"


def test_bidi_controls_are_escaped_in_lines_table_and_json(tmp_path: Path) -> None:
    """Red team: U+202E (right-to-left override) in a Call-ID or reason was printed raw in ACC
    lines and `-T table`, so the terminal showed the rest of the line reversed (spoofing);
    JSON output carried it raw too. Every bidi control is now a ``\\uXXXX`` escape."""
    from sipsniff_acc.sysloglines import escape, json_safe
    assert not any(c.isprintable() for c in BIDI)  # so the isprintable() fast path lets the regex look
    assert escape(f"a{BIDI}b") == "a" + "".join(f"\\u{ord(c):04x}" for c in BIDI) + "b"
    line = json.dumps({"a": f"x{BIDI}"}, ensure_ascii=False).encode()
    assert json.loads(json_safe(line)) == json.loads(line)
    assert json_safe(line).isascii() and b"\\u202e" in json_safe(line)
    assert escape("A\u2020\u2030\u202f\u2065\u2070é") == "A\u2020\u2030\u202f\u2065\u2070é"  # neighbours untouched

    call = {"call_id": "spoof\u202egnp.exe@test"}
    inv = sip_request(**call)
    ok = sip_response(200, "OK\u2066x\u2069", to_tag="tt1", **call)
    cap = tmp_path / "bidi.pcap"
    cap.write_bytes(pcap_bytes([(1000.0, ether(ip4_udp(inv))),
                                (1000.5, ether(ip4_udp(ok, src="192.0.2.2", dst="192.0.2.1")))]))
    outputs = [
        _run("process", str(cap), "--no-db", "-q", cwd=tmp_path).stdout,
        _run("messages", "-T", "table", "-q", "-j", "0", str(cap), cwd=tmp_path).stdout,
        _run("messages", "-q", "-j", "0", str(cap), cwd=tmp_path).stdout,
    ]
    for out in outputs:
        text = out.decode()
        assert text and not set(text) & set(BIDI), text
        assert "spoof\\u202egnp.exe@test" in text
    assert "OK\\u2066x\\u2069" in outputs[0].decode()
    assert json.loads(outputs[2].decode().splitlines()[0])["call_id"] == call["call_id"]
