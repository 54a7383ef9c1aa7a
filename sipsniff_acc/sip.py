"""SIP message detection and parsing (RFC 3261 §7, §20), tolerant and lazy.

Only what transaction tracking needs is parsed when a message arrives: the start line,
Call-ID, CSeq, the From and To tags, the top Via (its branch) and Content-Length. Every
other header is parsed on first access (``SipMessage.headers``), because header
extraction is the dominant per-message cost in CPython (perf-notes: 4.5–7 µs).

The eager fields come from one compiled regular expression run over the header block,
which finds only the lines we want, long or compact form (i, f, t, v, l, ...), any case.
Folded header lines (RFC 3261 §7.3.1) are rare: the same scan notices a line that starts
with whitespace, and only then is the block unfolded and scanned again.

The parser never raises past ``parse``: a message that does not parse raises
``SipError`` (named like an anomaly) inside, which the pipeline turns into an
``Anomaly``. Defects that still leave a usable message (no Call-ID, a bad
Content-Length, a truncated body) are listed in ``SipMessage.defects``.

Every number and every table is bounded by the bytes that arrived, never by a value the
message claims (issue 10): a CSeq number must be below 2**31 (RFC 3261 §8.1.1.5) and a
Content-Length at most ``MAX_DIGITS`` significant digits, so ``int()`` never sees a long
digit string; the lazy header table holds at most ``MAX_HEADERS`` lines and ``vias()`` at
most ``MAX_VIAS`` entries. A message over a bound is kept with a defect (counted), like
the other defects, so the well-formed fields of the same message still count.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Final

_scan: Callable[[bytes, int, int], Scan | None] | None = None
_param: Callable[[bytes, bytes, int, int, bool], bytes | None] | None = None
#: the C parse of a plain, well-formed message: its Fields, or None (the Python path)
_fill: Callable[[bytes], Fields | None] | None = None
try:  # the C scans (setup.py builds them when a compiler is there)
    from sipsniff_acc import _speedups

    _scan, _param, _fill = _speedups.scan, _speedups.param, _speedups.fields
except ImportError:  # not built: eager_headers(), tag_param() and branch_param() do the same in Python
    pass

#: RFC 3261 §7.3.3 compact forms, plus those registered later: r Refer-To (RFC 3515),
#: b Referred-By (RFC 3892), x Session-Expires (RFC 4028), y Identity (RFC 8224), o Event and
#: u Allow-Events (RFC 6665), a Accept-Contact, j Reject-Contact, d Request-Disposition (RFC 3841).
COMPACT_FORMS: Final[dict[str, str]] = {
    "i": "call-id", "f": "from", "t": "to", "v": "via", "m": "contact", "l": "content-length",
    "c": "content-type", "k": "supported", "s": "subject", "e": "content-encoding",
    "o": "event", "u": "allow-events", "r": "refer-to", "b": "referred-by", "x": "session-expires",
    "y": "identity", "a": "accept-contact", "j": "reject-contact", "d": "request-disposition",
}

#: Lines of the header block that the eager parse wants; group 1 the name, 2 the value.
#: Measured alternatives (split+partition loop, lower-cased copy, char classes, find per
#: header) all cost within 10 % of this findall on a 16-header INVITE (~2.6 µs).
#: A third alternative matches a line that starts with whitespace: a folded continuation
#: (RFC 3261 §7.3.1). Folding is rare; finding it in the same pass saves a second scan.
_EAGER = re.compile(
    rb"\n(?:(call-id|i|cseq|from|f|to|t|via|v|content-length|l)[ \t]*:[ \t]*([^\r\n]*)|([ \t]))", re.IGNORECASE
)
_EAGER_KEY: Final[dict[bytes, int]] = {}
for _names, _slot in (
    ((b"call-id", b"i"), 0), ((b"cseq",), 1), ((b"from", b"f"), 2), ((b"to", b"t"), 3),
    ((b"via", b"v"), 4), ((b"content-length", b"l"), 5),
):
    for _n in _names:
        _EAGER_KEY[_n] = _slot
_TAG = re.compile(rb";[ \t]*tag[ \t]*=[ \t]*([^;, \t>\r\n]+)", re.IGNORECASE)
_BRANCH = re.compile(rb";[ \t]*branch[ \t]*=[ \t]*([^;, \t\r\n]+)", re.IGNORECASE)
#: A line break followed by blanks: a folded continuation. Anchored on the line break, so
#: the search is linear; the blanks *before* the break are stripped by ``unfold``. (The
#: regex ``[ \t]*\r?\n[ \t]+`` restarted at every blank of a run: 60k blanks cost 100 s.)
_FOLD = re.compile(rb"\r?\n[ \t]+")
_VIA_LINE = re.compile(rb"(?:^|\n)(?:via|v)[ \t]*:([^\r\n]*)", re.IGNORECASE)
_TOKEN = re.compile(rb"[A-Za-z0-9.!%*_+`'~-]+\Z")  #: RFC 3261 token: what a method may be
MAX_START_LINE: Final = 8192  #: a request line longer than this is not SIP (Kamailio's BUF_SIZE is 64 KB per message)
MAX_CSEQ: Final = 2**31  #: RFC 3261 §8.1.1.5: the CSeq sequence number MUST be less than 2**31
MAX_DIGITS: Final = 10  #: significant digits of a Content-Length: 2**32 has 10, a SIP message is <= 64 KB
#: Header lines the lazy table holds. Real messages have 10-60 (a large IMS INVITE with its
#: Record-Route and P- headers); 512 is far above that, equals ``Limits.max_hdr_scan``, and keeps
#: one message's table under ~80 KB where 10k headers built ~600 KB (issue 10).
MAX_HEADERS: Final = 512
#: Via entries ``vias()`` returns. A request gains one per proxy and Max-Forwards starts at 70
#: (RFC 3261 §8.1.1.6), so a real one has at most ~70.
MAX_VIAS: Final = 128


class SipError(Exception):
    """The bytes are not a parseable SIP message; ``name`` is an anomaly name."""

    def __init__(self, name: str, detail: str = "") -> None:
        super().__init__(f"{name}: {detail}" if detail else name)
        self.name = name
        self.detail = detail


def unfold(block: bytes) -> bytes:
    """Undo header folding (RFC 3261 §7.3.1): a line break with the blanks around it becomes
    one space. Linear in the bytes."""
    parts = _FOLD.split(block)
    if len(parts) == 1:
        return block
    last = parts.pop()
    return b" ".join([p.rstrip(b" \t") for p in parts] + [last])


def looks_like_sip_py(payload: bytes) -> bool:
    """Cheap content check, any port: a status line, or a request line ending in SIP/2.0.

    ``looks_like_sip`` is this, or ``_capture.looks_like_sip`` (the same in C: 0.05 us against
    0.5 us, on every UDP payload of a capture) when it is built."""
    if payload[:8] == b"SIP/2.0 ":
        return True
    sp = payload.find(b" ", 0, 32)
    if sp < 3 or not payload[:sp].isupper():
        return False
    nl = payload.find(b"\n", sp, MAX_START_LINE)
    if nl < 0:
        return False
    # (never a negative start: compiled by mypyc, such a bytes slice raised SystemError; a line
    # shorter than 9 bytes cannot end in " SIP/2.0" after a method of 3 or more letters anyway)
    return payload[max(nl - 9, 0) : nl].rstrip(b"\r").endswith(b" SIP/2.0")


looks_like_sip: Callable[[bytes], bool] = looks_like_sip_py
try:
    from sipsniff_acc._capture import looks_like_sip
except ImportError:  # not built
    pass


def is_keepalive(payload: bytes) -> bool:
    """RFC 5626 CRLF keep-alives and the zero-byte pings some phones send."""
    return not payload.strip(b"\r\n\x00 ")


class SipMessage:
    """One SIP request or response, with the transport facts of where it was seen.

    A plain class whose defaults live on the class: the parser sets only what it found
    (half the cost of initialising ~27 slots per message on this hot path).
    """

    raw: bytes = b""
    is_request: bool = False
    method: str = ""  #: request method; "" for a response
    ruri: str = ""
    code: int = 0  #: status code; 0 for a request
    reason: str = ""
    call_id: str | None = None
    cseq_num: int | None = None
    cseq_method: str = ""
    from_tag: str | None = None
    to_tag: str | None = None
    branch: str | None = None  #: branch parameter of the top Via
    content_length: int | None = None
    body_start: int = 0
    _hdr_start: int = 0
    _hdr_end: int = 0
    _headers: list[tuple[str, str]] | None = None
    _vias: list[str] | None = None
    #: the second Via entry (None: only one), False until known; the C parse sets it when plain
    _via2: str | None | bool = False
    defects: tuple[str, ...] = ()
    # where it was seen (filled by the pipeline)
    ts: float = 0.0
    no: int = 0
    src: str = ""
    sport: int = 0
    dst: str = ""
    dport: int = 0
    transport: str = ""
    encap: tuple[str, ...] = ()
    source: str = ""

    def __init__(self, raw: bytes = b"") -> None:
        # (a default: compiled by mypyc, a class whose __init__ takes no argument is picklable,
        # and a state file holds the messages of open transactions)
        self.raw = raw

    @property
    def headers(self) -> list[tuple[str, str]]:
        """All headers in order as (lower-case long name, value), folding undone."""
        if self._headers is None:
            block = self.raw[self._hdr_start : self._hdr_end]
            if b"\n " in block or b"\n\t" in block:
                block = unfold(block)
            out: list[tuple[str, str]] = []
            # at most MAX_HEADERS lines are split off (a message of 10k headers is counted as
            # sip_too_many_headers by parse and never builds a 10k-entry table)
            for line in block.split(b"\n", MAX_HEADERS)[:MAX_HEADERS]:
                name, colon, value = line.partition(b":")
                if not colon:
                    continue
                key = _decode(name.strip()).lower()
                value = value.strip()
                if b"\r" in value:  # a bare CR ends the value, as in the eager scan and vias()
                    value = value[: value.index(b"\r")].rstrip()
                out.append((COMPACT_FORMS.get(key, key), _decode(value)))
            self._headers = out
        return self._headers

    def header(self, name: str) -> str | None:
        """First value of a header (long or compact name, any case)."""
        name = name.lower()
        name = COMPACT_FORMS.get(name, name)
        for key, value in self.headers:
            if key == name:
                return value
        return None

    def header_values(self, name: str) -> list[str]:
        """Every value of a header, comma-separated lists split (RFC 3261 §7.3.1)."""
        name = name.lower()
        name = COMPACT_FORMS.get(name, name)
        out = [v.strip() for key, value in self.headers if key == name for v in _split_commas(value, MAX_HEADERS)]
        return out[:MAX_HEADERS]

    def vias(self) -> list[str]:
        """Every Via entry, top first, at most ``MAX_VIAS``. A regex over the header block: the
        transaction tracker needs the second Via of every request, and a full header parse
        costs ~4x more."""
        if self._vias is not None:
            return self._vias
        if self._headers is not None:
            out = self.header_values("via")[:MAX_VIAS]
        else:
            block = self.raw[self._hdr_start : self._hdr_end]
            if b"\n " in block or b"\n\t" in block:
                block = unfold(block)
            out = []
            for m in _VIA_LINE.finditer(block):
                text = _decode(m.group(1).strip())
                if "," in text:
                    out.extend(v.strip() for v in _split_commas(text, MAX_VIAS))
                else:
                    out.append(text)
                if len(out) >= MAX_VIAS:
                    del out[MAX_VIAS:]
                    break
        self._vias = out
        return out

    def second_via(self) -> str | None:
        """``vias()[1]`` (None when there is one Via): what the tracker reads of every request
        to find a proxy's forward. The C parse sets it for the common message; else the list."""
        v = self._via2
        if v is False:
            vias = self.vias()
            v = self._via2 = vias[1] if len(vias) > 1 else None
        return v  # type: ignore[return-value]

    @property
    def body(self) -> bytes:
        end = len(self.raw) if self.content_length is None else self.body_start + self.content_length
        return self.raw[self.body_start : end]

    @property
    def first_line(self) -> str:
        return _decode(self.raw[: self.raw.find(b"\n")].rstrip(b"\r"))

    def __repr__(self) -> str:
        what = self.method if self.is_request else f"{self.code} {self.reason}"
        return f"<SipMessage {what} call_id={self.call_id!r} cseq={self.cseq_num} {self.cseq_method}>"


def _split_commas(value: str, limit: int = MAX_HEADERS) -> list[str]:
    """Split a header value on commas outside quotes and angle brackets; at most ``limit``
    parts are cut off (the rest of the value is the last one)."""
    if "," not in value:
        return [value]
    parts: list[str] = []
    depth = 0
    quoted = False
    start = 0
    for i, ch in enumerate(value):
        if ch == '"':
            quoted = not quoted
        elif not quoted and ch == "<":
            depth += 1
        elif not quoted and ch == ">":
            depth = max(0, depth - 1)
        elif ch == "," and not quoted and depth == 0:
            parts.append(value[start:i])
            start = i + 1
            if len(parts) >= limit:
                return parts
    parts.append(value[start:])
    return parts


def tag_param(value: bytes, start: int) -> bytes | None:
    m = _TAG.search(value, start)
    return m.group(1) if m else None


def branch_param(value: bytes, stop: int) -> bytes | None:
    m = _BRANCH.search(value, 0, stop)
    return m.group(1) if m else None


def _tag(value: bytes) -> str | None:
    """The tag parameter of a From/To value; URI parameters inside <...> do not count."""
    start = value.rfind(b">") + 1
    t = _param(value, b"tag", start, len(value), True) if _param is not None else tag_param(value, start)
    return None if t is None else _decode(t)


#: what the C parse (``_speedups.fields``) returns, in the order parse() unpacks it
Fields = tuple[bool, str, str, int, str, str, int, str, str | None, str | None, str | None, str | None | bool,
               int | None, int, int, int]
Eager = tuple[bytes | None, bytes | None, bytes | None, bytes | None, bytes | None, bytes | None]
#: the six eager values, then the number of header lines and of Via entries (1 + commas per Via line)
Scan = tuple[bytes | None, bytes | None, bytes | None, bytes | None, bytes | None, bytes | None, int, int]


def eager_headers(data: bytes, start: int, end: int) -> Scan:
    """First value of Call-ID, CSeq, From, To, Via, Content-Length in data[start:end], and
    the counts of header lines and Via entries (what the bounds of issue 10 check).

    The pure-Python path; ``_speedups.scan`` does the same in C (a property test checks
    they agree), except that it hands folded blocks back here.
    """
    stop = min(end, len(data)) - 1
    nlines = data.count(b"\n", max(start, 0), stop) if stop > start else 0
    pairs = _EAGER.findall(data, start, end)
    for _name, _value, fold in pairs:
        if fold:  # rare: unfold the whole block, then look again
            pairs = _EAGER.findall(unfold(data[start:end]))
            break
    found: list[bytes | None] = [None, None, None, None, None, None]
    nvias = 0
    for name, value, _fold in pairs:
        if not name:
            continue
        slot = _EAGER_KEY.get(name)
        if slot is None:
            slot = _EAGER_KEY[name.lower()]
        if slot == 4:
            nvias += 1 + value.count(b",")
        if found[slot] is None:
            found[slot] = value
    return found[0], found[1], found[2], found[3], found[4], found[5], nlines, nvias


_CALL_ID_LINE = re.compile(rb"\n(?:call-id|i)[ \t]*:[ \t]*([^\r\n]*)", re.IGNORECASE)


def _call_id_line_py(data: bytes) -> bytes | None:
    """The value of the first Call-ID line anywhere in data (up to the end of its line), or None."""
    m = _CALL_ID_LINE.search(data)
    return m.group(1) if m else None


#: the Call-ID line's value without a parse (what -j N shards by): the C one when built
call_id_line: Callable[[bytes], bytes | None] = _call_id_line_py
if _fill is not None:
    call_id_line = _speedups.call_id


def _number(digits: bytes) -> int | None:
    """An unsigned decimal of at most MAX_DIGITS significant digits, else None.

    Bounded by the bytes: ``int()`` is never handed more than MAX_DIGITS digits (a longer
    string raised ValueError past 4300 digits and ended the run, issue 10).
    """
    if not digits.isdigit():
        return None
    if len(digits) > MAX_DIGITS:
        digits = digits.lstrip(b"0") or b"0"
        if len(digits) > MAX_DIGITS:
            return None
    return int(digits)


def _decode(b: bytes) -> str:
    try:
        return b.decode()
    except UnicodeDecodeError:
        return b.decode("utf-8", "replace")


def parse(data: bytes) -> SipMessage:
    """Parse one SIP message. Raises ``SipError`` when the start line is not SIP.

    A well-formed message is parsed by the C ``fields`` in one call (~1 µs); anything unusual
    (folding, a defect, an odd start line, no extension built) takes the Python path below,
    which is the reference: a property test holds both to the same fields."""
    if _fill is not None:
        f = _fill(data)
        if f is not None:  # unpacked here: compiled, the stores are direct (setattr from C was ~0.5 us)
            msg = SipMessage(data)
            (msg.is_request, msg.method, msg.ruri, msg.code, msg.reason, msg.call_id, msg.cseq_num,
             msg.cseq_method, msg.from_tag, msg.to_tag, msg.branch, msg._via2, msg.content_length,
             msg.body_start, msg._hdr_start, msg._hdr_end) = f
            return msg
    return _parse_py(data)


def _parse_py(data: bytes) -> SipMessage:
    """The pure-Python parse (every case, defects included)."""
    nl = data.find(b"\n", 0, MAX_START_LINE)
    if nl < 0:
        raise SipError("sip_bad_start_line", "no end of line")
    line = data[:nl]
    if line[-1:] == b"\r":
        line = line[:-1]
    msg = SipMessage(data)
    if line[:8] == b"SIP/2.0 ":
        code = line[8:11]
        if len(code) != 3 or not code.isdigit() or (len(line) > 11 and line[11] != 0x20):
            raise SipError("sip_bad_start_line", f"status code {code!r}")
        msg.code = int(code)
        msg.reason = _decode(line[12:])
    else:
        parts = line.split(b" ")
        if (
            len(parts) != 3 or not parts[1]
            or (parts[2] != b"SIP/2.0" and parts[2].upper() != b"SIP/2.0")
            or not (parts[0].isalpha() or _TOKEN.match(parts[0]))
        ):
            raise SipError("sip_bad_start_line", _decode(line[:80]))
        msg.is_request = True
        msg.method = _decode(parts[0])
        msg.ruri = _decode(parts[1])

    end = data.find(b"\r\n\r\n", nl)
    if end >= 0:
        msg.body_start = end + 4
    else:
        end = data.find(b"\n\n", nl)
        if end >= 0:
            msg.body_start = end + 2
        else:
            end = len(data)
            msg.body_start = end
            msg.defects = ("sip_no_header_end",)
    msg._hdr_start = nl + 1
    msg._hdr_end = end
    found = _scan(data, nl, end) if _scan is not None else None
    if found is None:  # no C scan built, or folded lines
        found = eager_headers(data, nl, end)
    call_id, cseq, from_, to, via, clen, nlines, nvias = found

    defects = msg.defects
    if call_id is not None:
        call_id = call_id.rstrip()
    if call_id:
        msg.call_id = _decode(call_id)
    else:
        defects += ("sip_missing_call_id",)
    if cseq is not None:
        num, _, method = cseq.partition(b" ")
        n = int(num) if len(num) <= 9 and num.isdigit() else _number(num)  # 9 digits: < 2**31 for sure
        if n is not None and n < MAX_CSEQ:
            msg.cseq_num = n
            msg.cseq_method = _decode(method.strip())
        else:
            defects += ("sip_bad_cseq",)
    else:
        defects += ("sip_missing_cseq",)
    if from_ is not None:
        msg.from_tag = _tag(from_)
    if to is not None and b"tag" in to.lower():
        msg.to_tag = _tag(to)
    if via is not None:
        comma = via.find(b",")  # only the top Via of a comma-separated list
        stop = comma if comma >= 0 else len(via)
        b = _param(via, b"branch", 0, stop, False) if _param is not None else branch_param(via, stop)
        if b is not None:
            msg.branch = _decode(b)
    else:
        defects += ("sip_missing_via",)
    if clen is not None:
        clen = clen.strip()
        n = int(clen) if len(clen) <= MAX_DIGITS and clen.isdigit() else _number(clen)  # inline: the common case
        if n is not None:
            msg.content_length = n
            if msg.body_start + n > len(data):
                defects += ("sip_truncated_body",)
        else:
            defects += ("sip_bad_content_length",)
    if nlines > MAX_HEADERS:
        defects += ("sip_too_many_headers",)
    if nvias > MAX_VIAS:
        defects += ("sip_too_many_vias",)
    if defects:
        msg.defects = defects
    return msg
