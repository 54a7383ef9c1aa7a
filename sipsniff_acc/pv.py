"""Kamailio pseudo-variables for ``*_extra``, ``multi_leg_info`` and rule values (acc-spec §8).

A spec is parsed once (``parse_pv``) and evaluated per record against a ``PvContext``: the
request being accounted, plus what the proxy knew and the wire does not show (the branch
URI it chose, the AVPs the rules set). A value is ``str`` or ``None`` (Kamailio's null),
because log, DB and RADIUS treat null differently (acc-spec §2.5). Pure: no I/O.

``$hdr(name)`` looks through at most ``PvContext.hdr_limit`` header lines with one regex over
the raw header block, without building the message's full header list (a 10,000-line
message's list is ~30x its bytes); a lookup that stopped at the limit is counted in
``PvContext.hdr_cut``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Final

from sipsniff_acc.sip import COMPACT_FORMS, SipMessage


class PvError(ValueError):
    """A pseudo-variable spec we cannot evaluate; the message says which and why."""


@dataclass(slots=True, init=False)
class PvContext:
    """What a pseudo-variable may read when a record is made. (``__init__`` written out:
    compiled, it stores the fields directly; the dataclass's generated one runs interpreted.)"""

    msg: SipMessage  #: the accounted request (or the ACK / the current request for script functions)
    new_uri: str | None = None  #: the branch's Request-URI (winning/picked branch), if the proxy forwarded it
    avps: dict[str, list[str]] = field(default_factory=dict)  #: name -> values, newest first (AVP lists are LIFO)
    now: float = 0.0  #: the record's time (packet clock)
    start: float = 0.0  #: first packet of the run: what Kamailio's $TS (startup time) becomes here
    hdr_limit: int = 512  #: header lines a $hdr() lookup looks through (Limits.max_hdr_scan)
    hdr_cut: int = 0  #: lookups that stopped at hdr_limit (the engine adds them to its counters)
    dlg_vars: dict[str, str] | None = None  #: the dialog's variables ($dlg_var), when a dialog is in context

    def __init__(self, msg: SipMessage, new_uri: str | None = None, avps: dict[str, list[str]] | None = None,
                 now: float = 0.0, start: float = 0.0, hdr_limit: int = 512, hdr_cut: int = 0,
                 dlg_vars: dict[str, str] | None = None) -> None:
        self.msg = msg
        self.new_uri = new_uri
        self.avps = {} if avps is None else avps
        self.now = now
        self.start = start
        self.hdr_limit = hdr_limit
        self.hdr_cut = hdr_cut
        self.dlg_vars = dlg_vars


@dataclass(frozen=True, slots=True)
class PvSpec:
    """One parsed ``$name``, ``$name(arg)`` or ``$(name(arg)[index])``."""

    text: str
    name: str
    arg: str = ""
    index: int | None = None  #: None = first (Kamailio's default), -1 last, ...
    all: bool = False  #: the ``[*]`` index


_PV = re.compile(r"\$(?:\((?P<xname>\w+)(?:\((?P<xarg>[^)]*)\))?(?:\[(?P<idx>\*|-?\d+)\])?\)|(?P<name>\w+)(?:\((?P<arg>[^)]*)\))?)")
_URI = re.compile(r"^(?:(?P<scheme>sips?|tel):)?(?:(?P<user>[^@;?]*)@)?(?P<host>\[[^\]]+\]|[^:;?>]*)(?::(?P<port>\d+))?")

#: The PVs we know; the value is True if it takes an argument.
KNOWN: Final[dict[str, bool]] = {
    "hdr": True, "avp": True, "dlg_var": True,
    "fu": False, "fU": False, "fd": False, "fn": False, "ft": False,
    "tu": False, "tU": False, "td": False, "tn": False, "tt": False,
    "ru": False, "rU": False, "rd": False, "rp": False, "ou": False, "oU": False,
    "ci": False, "cs": False, "rm": False, "rs": False, "rr": False,
    "si": False, "sp": False, "Ri": False, "Rp": False, "pr": False, "proto": False,
    "ua": False, "au": False, "ad": False, "ar": False, "TS": False, "Ts": False,
}


def parse_pv(text: str) -> PvSpec:
    """Parse one pseudo-variable; ``PvError`` says what is wrong with it."""
    text = text.strip()
    m = _PV.fullmatch(text)
    if m is None:
        raise PvError(f"{text!r} is not a pseudo-variable (expected $name, $name(arg) or $(name(arg)[index]))")
    name = m.group("xname") or m.group("name")
    arg = m.group("xarg") if m.group("xname") else m.group("arg")
    if name not in KNOWN:
        raise PvError(f"unknown pseudo-variable ${name} in {text!r} (known: {', '.join('$' + k for k in KNOWN)})")
    if KNOWN[name] and not arg:
        raise PvError(f"${name} needs an argument, e.g. ${name}(User-Agent)")
    if not KNOWN[name] and arg:
        raise PvError(f"${name} takes no argument")
    idx = m.group("idx")
    return PvSpec(text, name, (arg or "").strip(), None if idx in (None, "*") else int(idx), idx == "*")


def parse_extra(text: str) -> list[tuple[str, PvSpec]]:
    """``name=$pv;name2=$pv2`` (the *_extra and multi_leg_info syntax) → [(name, spec)]."""
    out: list[tuple[str, PvSpec]] = []
    for part in text.split(";"):
        part = part.strip()
        if not part:
            continue
        name, eq, spec = part.partition("=")
        if not eq or not name.strip():
            raise PvError(f"{part!r} is not name=$pseudo-variable")
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name.strip()):
            raise PvError(f"{name.strip()!r}: an extra's name is letters, digits, '_', '.' and '-' only")
        out.append((name.strip(), parse_pv(spec)))
    return out


def interpolate(text: str, ctx: PvContext) -> str:
    """Replace every pseudo-variable in a string (rule values such as set_avp); null → ''."""
    def one(m: re.Match[str]) -> str:
        try:
            return evaluate(parse_pv(m.group(0)), ctx) or ""
        except PvError:
            return m.group(0)
    return _PV.sub(one, text)


# --- URI and address helpers -------------------------------------------------------------

def name_addr(value: str | None) -> tuple[str, str]:
    """(display name, URI) of a From/To/Contact value."""
    if value is None:
        return "", ""
    lt = value.find("<")
    if lt >= 0:
        gt = value.find(">", lt)
        display = value[:lt].strip()  # Kamailio's $fn keeps the quotes
        return display, value[lt + 1 : gt if gt >= 0 else len(value)].strip()
    return "", value.split(";", 1)[0].strip()


def uri_parts(uri: str) -> tuple[str | None, str, str | None]:
    """(user, host, port) of a SIP URI; user None when the URI has none."""
    m = _URI.match(uri)
    if m is None:
        return None, "", None
    return m.group("user"), m.group("host") or "", m.group("port")


def _param_of(value: str, name: str) -> str | None:
    for part in re.split(r"\s*,\s*", value):
        m = re.search(rf"(?:^|[\s,]){name}\s*=\s*\"?([^\",]*)\"?", part, re.IGNORECASE)
        if m:
            return m.group(1)
    return None


def _credentials(ctx: PvContext) -> str | None:
    return _header(ctx, "authorization") or _header(ctx, "proxy-authorization")


# --- evaluation --------------------------------------------------------------------------

def _uri_value(uri: str, part: str) -> str | None:
    user, host, port = uri_parts(uri)
    if part == "u":
        return uri or None
    if part == "U":
        return user or None
    if part == "d":
        return host or None
    if part == "p":
        return port or ("5061" if uri.startswith("sips:") else "5060")
    raise AssertionError(part)


def _from_to(ctx: PvContext, which: str, part: str) -> str | None:
    msg = ctx.msg
    value = _header(ctx, which)
    if value is None:
        return None
    if part == "t":
        tag = msg.from_tag if which == "from" else msg.to_tag
        return tag or None
    display, uri = name_addr(value)
    if part == "n":
        return display or None
    return _uri_value(uri, part)


def _many(values: Sequence[str], spec: PvSpec, joiner: str) -> str | None:
    if not values:
        return None
    if spec.all:
        return joiner.join(values)
    idx = 0 if spec.index is None else spec.index
    try:
        return values[idx]
    except IndexError:
        return None


_FOLDED = re.compile(rb"[ \t]*\r?\n[ \t]+")
_HDR_RE: dict[str, re.Pattern[bytes]] = {}


def _header_line(key: str) -> re.Pattern[bytes]:
    """A regex for the lines of one header (long name or compact form, any case); cached."""
    pat = _HDR_RE.get(key)
    if pat is None:
        names = [key, *(c for c, long in COMPACT_FORMS.items() if long == key)]
        alt = b"|".join(re.escape(n.encode("utf-8", "replace")) for n in names)
        pat = _HDR_RE[key] = re.compile(rb"\n(?:" + alt + rb")[ \t]*:[ \t]*([^\r\n]*)", re.IGNORECASE)
        if len(_HDR_RE) > 256:  # header names come from rules: a handful; never let it grow
            _HDR_RE.clear()
    return pat


def _decode(b: bytes) -> str:
    try:
        return b.decode()
    except UnicodeDecodeError:
        return b.decode("utf-8", "replace")


def _header(ctx: PvContext, name: str) -> str | None:
    """The first value of a header (as ``SipMessage.header``), by the same bounded scan."""
    values = _headers(ctx, name)
    return values[0] if values else None


def _headers(ctx: PvContext, name: str) -> list[str]:
    """Values of every line of a header among the first ctx.hdr_limit header lines."""
    msg = ctx.msg
    key = name.lower()
    key = COMPACT_FORMS.get(key, key)
    limit = ctx.hdr_limit
    parsed = msg._headers  # already parsed (a rule looked at a header): cheaper to read
    if parsed is not None:
        if len(parsed) > limit:
            ctx.hdr_cut += 1
            parsed = parsed[:limit]
        return [v for k, v in parsed if k == key]
    raw = msg.raw
    start, end = msg._hdr_start, msg._hdr_end
    if start <= 0:
        return [v for k, v in msg.headers[:limit] if k == key]
    block = raw[start - 1 : end]  # from the start line's "\n": every header line starts with one
    if b"\n " in block or b"\n\t" in block:  # folded lines (rare): unfold first
        block = _FOLDED.sub(b" ", block)
    if block.count(b"\n") > limit:
        stop = -1
        for _ in range(limit + 1):
            stop = block.find(b"\n", stop + 1)
        block = block[:stop]
        ctx.hdr_cut += 1
    return [_decode(v.strip()) for v in _header_line(key).findall(block)]


def _ruri(ctx: PvContext, part: str) -> str | None:
    """$ru/$rU/$rd/$rp: the branch's URI, else the request line's; null on a reply (Kamailio's
    pv_get_ruri), which a failed dialog's CDR extras are evaluated on."""
    if not ctx.msg.is_request:
        return None
    return _uri_value(ctx.new_uri or ctx.msg.ruri, part)


_SIMPLE: Final[dict[str, Callable[[PvContext], str | None]]] = {
    "fu": lambda c: _from_to(c, "from", "u"), "fU": lambda c: _from_to(c, "from", "U"),
    "fd": lambda c: _from_to(c, "from", "d"), "fn": lambda c: _from_to(c, "from", "n"),
    "ft": lambda c: _from_to(c, "from", "t"),
    "tu": lambda c: _from_to(c, "to", "u"), "tU": lambda c: _from_to(c, "to", "U"),
    "td": lambda c: _from_to(c, "to", "d"), "tn": lambda c: _from_to(c, "to", "n"),
    "tt": lambda c: _from_to(c, "to", "t"),
    "ru": lambda c: _ruri(c, "u"), "rU": lambda c: _ruri(c, "U"), "rd": lambda c: _ruri(c, "d"),
    "rp": lambda c: _ruri(c, "p"),
    "ou": lambda c: c.msg.ruri or None, "oU": lambda c: _uri_value(c.msg.ruri, "U"),
    "ci": lambda c: c.msg.call_id, "cs": lambda c: None if c.msg.cseq_num is None else str(c.msg.cseq_num),
    "rm": lambda c: c.msg.method or c.msg.cseq_method or None,
    "rs": lambda c: None if c.msg.is_request else str(c.msg.code),
    "rr": lambda c: None if c.msg.is_request else c.msg.reason,
    "si": lambda c: c.msg.src or None, "sp": lambda c: str(c.msg.sport),
    "Ri": lambda c: c.msg.dst or None, "Rp": lambda c: str(c.msg.dport),
    "pr": lambda c: (c.msg.transport or "udp").lower(), "proto": lambda c: (c.msg.transport or "udp").lower(),
    "ua": lambda c: _header(c, "user-agent"),
    "TS": lambda c: str(int(c.start)), "Ts": lambda c: str(int(c.now)),
}


def _auth(ctx: PvContext, what: str) -> str | None:
    cred = _credentials(ctx)
    if cred is None:
        return None
    username = _param_of(cred, "username")
    realm = _param_of(cred, "realm")
    if what == "au":  # the user part of the username
        return username.split("@", 1)[0] if username else None
    if what == "ad":  # the domain: from user@domain, else the realm
        if username and "@" in username:
            return username.split("@", 1)[1]
        return realm
    return realm  # $ar


def evaluate(spec: PvSpec, ctx: PvContext) -> str | None:
    """The value of one pseudo-variable in this context; None is Kamailio's null."""
    name = spec.name
    if name == "hdr":
        return _many(_headers(ctx, spec.arg), spec, ",")
    if name == "avp":
        return _many(ctx.avps.get(spec.arg, []), spec, ", ")
    if name == "dlg_var":  # one value per name; null outside a dialog or when never set
        return None if ctx.dlg_vars is None else ctx.dlg_vars.get(spec.arg)
    if name in ("au", "ad", "ar"):
        return _auth(ctx, name)
    return _SIMPLE[name](ctx)


def evaluate_extras(extras: Sequence[tuple[str, PvSpec]], ctx: PvContext) -> list[tuple[str, str | None]]:
    return [(name, evaluate(spec, ctx)) for name, spec in extras]


def evaluate_legs(legs: Sequence[tuple[str, PvSpec]], ctx: PvContext) -> list[list[tuple[str, str | None]]]:
    """multi_leg_info sets (acc-spec §3.3): always one set; more while any leg AVP has a next value."""
    if not legs:
        return []
    lists = [ctx.avps.get(spec.arg, []) if spec.name == "avp" else [] for _n, spec in legs]
    count = max(1, *(len(v) for v in lists))
    return [[(name, vals[i] if i < len(vals) else None) for (name, _s), vals in zip(legs, lists, strict=True)]
            for i in range(count)]
