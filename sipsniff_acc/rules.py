"""rules.yaml: the proxy script's accounting decisions, validated (pydantic) with file:line errors.

The file plays the part of a Kamailio config: ``acc`` holds the acc module's parameters
under their modparam names; ``route`` rules run when a request creates a transaction at
the proxy (like request_route before t_relay), ``failure_route`` rules when an INVITE's
branches have all failed. Pure: ``load_rules`` reads text; nothing here touches the network.

Hardened against the file itself (issue 10): its regexes run on RE2 (linear time, so no
pattern and R-URI can stall the pipeline), and it is read by a YAML loader that bounds the
file's size, nesting depth and what aliases expand to before anything is built; every
problem is one ``FILE:LINE: key: why`` line.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import re
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import re2  # type: ignore[import-untyped]
import yaml
from pydantic import (BaseModel, ConfigDict, Field, PlainSerializer, PlainValidator, PrivateAttr, ValidationError,
                      ValidationInfo, field_validator)

from sipsniff_acc.limits import Limits
from sipsniff_acc.pv import PvError, PvSpec, parse_extra, parse_pv
from sipsniff_acc.sip import SipMessage

IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")  #: what a table or column name may be (no SQL through config)
Flag = Annotated[int, Field(ge=0, le=31)]  #: Kamailio message flags are 0..31


class RulesError(ValueError):
    """rules.yaml is wrong; each entry of ``problems`` is 'FILE:LINE: key: why'."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


@dataclass(frozen=True, slots=True)
class Profile:
    """Where OpenSER 1.2 and Kamailio 5.6 differ (acc-spec §9.1)."""

    name: str
    early_media_183_only: bool  #: 1.2: exactly code 183, body or not; 5.6: any 1xx with a body
    method_from_request_line: bool  #: 1.2: request-line method; 5.6: CSeq method
    missed_uses_last_branch: bool  #: 1.2: $ru of a missed call is the last branch's
    faked_to_tag_empty: bool  #: 1.2 (and <=5.4): no local To-tag on records of local replies
    reply_relay_mode: int  #: tm: 1 = later 2xx of a forked INVITE are not accounted; 0 = one record per new To-tag
    log_prefix: str  #: what precedes "ACC: " in the syslog message


PROFILES: dict[str, Profile] = {
    "kamailio-5.6": Profile("kamailio-5.6", False, False, False, False, 1, "NOTICE: acc [acc.c:287]: acc_log_request(): "),
    "openser-1.2": Profile("openser-1.2", True, True, True, True, 0, ""),
}

LOG_LEVELS = {"alert": -5, "bug": -4, "crit2": -3, "crit": -2, "err": -1, "error": -1, "warn": 0, "warning": 0,
              "notice": 1, "info": 2, "dbg": 3, "debug": 3}


# --- user regexes on RE2 ------------------------------------------------------------------

def _re2_options() -> Any:
    o = re2.Options()
    o.log_errors = False  # RE2 would print every refused pattern on stderr; we report it as FILE:LINE
    o.never_capture = True  # rules only ask "does it match": no submatch tracking, the DFA does it all
    o.max_mem = RE2_MAX_MEM
    return o


RE2_MAX_MEM = 1 << 20  #: bytes per pattern (program + DFA cache): 100 patterns stay ~100 MB even on hostile text
_RE2_OPTIONS = _re2_options()
_UNANCHORED = getattr(re2, "_Anchor", None)


def _why_not_re2(pattern: str, engine_error: str) -> str:
    """RE2's refusal, told in terms of what to change."""
    if re.search(r"\\[1-9]|\(\?P=", pattern):
        return "backreferences (\\1, (?P=name)) are not supported: rule regexes run on RE2, in linear time"
    if re.search(r"\(\?<?[=!]", pattern):
        return "lookahead/lookbehind ((?=, (?!, (?<=, (?<!) is not supported: rule regexes run on RE2, in linear time"
    if "too large" in engine_error:
        return f"too large for RE2's {RE2_MAX_MEM >> 20} MB per pattern ({engine_error})"
    if "repetition size" in engine_error:
        return f"{engine_error}: RE2 counts repetitions up to 1000"
    return f"{engine_error} (rule regexes run on RE2: see its syntax page, github.com/google/re2/wiki/Syntax)"


def _python_to_re2(pattern: str) -> str:
    r"""Python's spelling of end-of-text, ``\Z``, is RE2's ``\z``; the rest is common syntax."""
    out: list[str] = []
    i = 0
    while i < len(pattern):
        ch = pattern[i]
        if ch == "\\" and i + 1 < len(pattern):
            pair = pattern[i : i + 2]
            out.append("\\z" if pair == "\\Z" else pair)
            i += 2
        else:
            out.append(ch)
            i += 1
    return "".join(out)


class UserRegex:
    r"""A regex from rules.yaml, searched like Kamailio's ``=~`` but on RE2.

    Python's ``re`` backtracks: ``^sip:(a+)+$`` against one crafted R-URI doubles its time
    every two characters and stalls every call behind it. RE2 is linear in the text for every
    pattern it accepts, and refuses (at check-rules time) the few constructs that cannot be
    linear (backreferences, lookaround). Where a pattern is valid in both, matches are the same
    (tested), except that ``$`` does not also match before a final newline (values have none)
    and ``\d``/``\w`` are ASCII, as in Kamailio's POSIX regexes.
    """

    __slots__ = ("pattern", "search")

    def __init__(self, pattern: str) -> None:
        """Compile; ``ValueError`` says why RE2 cannot take the pattern."""
        try:
            compiled = re2.compile(_python_to_re2(pattern), _RE2_OPTIONS)
        except re2.error as e:
            msg = e.args[0] if e.args else str(e)
            msg = msg.decode("utf-8", "replace") if isinstance(msg, bytes) else str(msg)
            raise ValueError(_why_not_re2(pattern, msg)) from None
        self.pattern = pattern
        self.search: Callable[[str], bool] = _fast_search(compiled)

    def __repr__(self) -> str:
        return f"UserRegex({self.pattern!r})"

    def __reduce__(self) -> tuple[type[UserRegex], tuple[str]]:
        """Pickled as its pattern (RE2 objects and the search closure are not picklable)."""
        return UserRegex, (self.pattern,)


def _raw_anchor() -> Any:
    """RE2's UNANCHORED constant if the pybind ``RE2.Match`` behaves as ``_fast_search`` expects, else None."""
    try:
        anchor = re2._Anchor.UNANCHORED
        probe = re2.compile("b", _RE2_OPTIONS)._regexp.Match
        if probe(anchor, b"abc", 0, 3)[0][0] == 1 and probe(anchor, b"xyz", 0, 3)[0][0] == -1:
            return anchor
    except (AttributeError, TypeError, IndexError, re2.error):
        pass
    return None


_RAW_ANCHOR = _raw_anchor()


def _fast_search(compiled: Any) -> Callable[[str], bool]:
    """``text -> bool`` straight on RE2's pybind object when it has the shape we know.

    Why: the wrapper's ``search`` builds a generator and a match object with str offsets
    (1.5-4 us per call); calling ``RE2.Match`` on the UTF-8 bytes takes 0.5-0.9 us (Python's
    ``re``: 0.1 us). ``_raw_anchor`` checked that shape at import; otherwise the public API.
    """
    anchor = _RAW_ANCHOR
    if anchor is None:
        public = compiled.search
        return lambda text: public(text) is not None
    match = compiled._regexp.Match

    def search(text: str) -> bool:
        b = text.encode("utf-8", "surrogatepass")
        return bool(match(anchor, b, 0, len(b))[0][0] >= 0)
    return search


def compile_regex(pattern: str, what: str = "") -> UserRegex:
    """A rules regex, or ``ValueError('bad regular expression ...: why')``."""
    try:
        return UserRegex(pattern)
    except ValueError as e:
        raise ValueError(f"{what}bad regular expression {_clip(repr(pattern), 80)}: {e}") from None


def _clip(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


def _ident(value: str, what: str) -> str:
    if not IDENT.fullmatch(value):
        raise ValueError(f"{value!r} is not a valid {what} (letters, digits, _; at most 64)")
    return value


class ProxyConfig(_Strict):
    addresses: list[str] = []  #: "ip", "ip:port", "[v6]:port"; empty: infer proxies from Via hops

    @field_validator("addresses")
    @classmethod
    def _addresses(cls, v: list[str]) -> list[str]:
        for a in v:
            parse_address(a)
        return v


def parse_address(text: str) -> tuple[str, int | None]:
    """'10.0.0.1:5060' / '10.0.0.1' / '[::1]:5060' / '::1' → (ip, port or None)."""
    text = text.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
    else:
        host, port = text, ""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{text!r}: {host!r} is not an IP address") from None
    if port and not (port.isdigit() and 0 < int(port) < 65536):
        raise ValueError(f"{text!r}: bad port {port!r}")
    return str(ip), int(port) if port else None


class TmParams(_Strict):
    reply_relay_mode: Literal[0, 1] | None = None  #: None: the profile's
    wait_timer: float = Field(5.0, gt=0)  #: seconds an INVITE transaction lives after its final reply (ACK window)
    fr_timer: float = Field(30.0, gt=0)  #: seconds before a transaction without a final reply is given up
    fr_inv_timer: float = Field(120.0, gt=0)


class AccParams(_Strict):
    early_media: bool = False
    failed_transaction_flag: Flag | None = None
    failed_filter: str = ""
    report_ack: bool = False
    report_cancels: bool = False
    detect_direction: bool = False
    multi_leg_info: str = ""
    reason_from_hf: bool = False
    local_reason: Literal["error_text", "wire"] = "error_text"  #: 5.5.0-5.6.0 used the wire phrase (acc-spec §2.3)
    time_mode: Literal[0, 1, 2, 3, 4] = 0
    time_attr: str = "time_attr"
    time_exten: str = "time_exten"
    time_format: str = "%Y-%m-%d %H:%M:%S"
    log_flag: Flag | None = None
    log_missed_flag: Flag | None = None
    log_level: int | str = 1
    log_facility: str = "LOG_DAEMON"
    log_extra: str = ""
    db_flag: Flag | None = None
    db_missed_flag: Flag | None = None
    db_url: str | None = None
    db_table_acc: str = "acc"
    db_table_missed_calls: str = "missed_calls"
    db_extra: str = ""
    acc_extra_nullable: bool = False
    acc_method_column: str = "method"
    acc_from_tag_column: str = "from_tag"
    acc_to_tag_column: str = "to_tag"
    acc_callid_column: str = "callid"
    acc_sip_code_column: str = "sip_code"
    acc_sip_reason_column: str = "sip_reason"
    acc_time_column: str = "time"
    radius_flag: Flag | None = None
    radius_missed_flag: Flag | None = None
    radius_config: str | None = None
    service_type: int | None = None
    radius_extra: str = ""
    rad_time_mode: Literal[0, 1] = 0
    diameter_flag: Flag | None = None
    diameter_missed_flag: Flag | None = None
    diameter_client_host: str = "localhost"
    diameter_client_port: int = Field(3000, gt=0, lt=65536)
    diameter_extra: str = ""
    #: RFC 6733 identity of the sniffer and the peer's realm (acc_diameter's DISC protocol has none)
    diameter_origin_host: str = "sipsniff.localdomain"
    diameter_origin_realm: str = "localdomain"
    diameter_destination_realm: str = ""  #: default: the origin realm
    diameter_bind: str = ""  #: source address of the connection to the peer
    diameter_timeout: float = Field(5.0, gt=0)
    diameter_mode: Literal["rfc6733", "disc"] = "rfc6733"  #: disc: acc_diameter's legacy DISC wire format
    #: a value longer than its SQL column: cut to fit (and counted), or the record set aside in the spool's dead letters
    on_overlong: Literal["truncate", "dead-letter"] = "truncate"
    # dialog CDRs (acc_cdr.c, acc-spec §7): written when a dialog the rules manage ends
    cdr_enable: bool = False
    cdr_on_failed: bool = True  #: a CDR for a dialog that failed (negative final reply, timer 408 included)
    cdr_log_enable: bool = True  #: the log_write_cdr() line
    cdrs_table: str = ""  #: "" = no CDR rows (Kamailio's default); usually acc_cdrs
    cdr_extra: str = ""  #: name=$pv;... evaluated on the BYE, on the failed reply, or (FAKED) the INVITE
    cdr_extra_nullable: bool = False
    cdr_start_id: str = "start_time"
    cdr_end_id: str = "end_time"
    cdr_duration_id: str = "duration"
    cdr_expired_dlg_enable: bool = False  #: a CDR for a dialog whose lifetime ran out (dialog.default_timeout)
    cdr_start_on_confirmed: bool = False  #: start at the ACK of the 2xx, not at the INVITE
    cdr_facility: str = "LOG_DAEMON"
    cdr_skip: str = ""  #: no CDR for a dialog that has this $dlg_var set

    _log_extra: list[tuple[str, PvSpec]] = PrivateAttr(default_factory=list)
    _db_extra: list[tuple[str, PvSpec]] = PrivateAttr(default_factory=list)
    _radius_extra: list[tuple[str, PvSpec]] = PrivateAttr(default_factory=list)
    _diameter_extra: list[tuple[str, PvSpec]] = PrivateAttr(default_factory=list)
    _legs: list[tuple[str, PvSpec]] = PrivateAttr(default_factory=list)
    _cdr_extra: list[tuple[str, PvSpec]] = PrivateAttr(default_factory=list)
    _failed_filter: frozenset[int] = PrivateAttr(default=frozenset())

    @field_validator("log_extra", "db_extra", "radius_extra", "diameter_extra", "multi_leg_info", "cdr_extra")
    @classmethod
    def _extras(cls, v: str) -> str:
        try:
            parse_extra(v)
        except PvError as e:
            raise ValueError(str(e)) from None
        return v

    @field_validator("multi_leg_info")
    @classmethod
    def _legs_are_avps(cls, v: str) -> str:
        legs = parse_extra(v)
        if any(spec.name != "avp" for _n, spec in legs):
            raise ValueError("multi_leg_info accepts only $avp(...) specs (as Kamailio's parse_acc_leg)")
        if len(legs) > 16:
            raise ValueError("multi_leg_info: at most 16 leg items")
        return v

    @field_validator("diameter_extra")
    @classmethod
    def _diameter_codes(cls, v: str) -> str:
        for name, _spec in parse_extra(v):
            if not name.isdigit():
                raise ValueError(f"diameter_extra names are AVP codes (integers), not {name!r}")
        return v

    @field_validator("failed_filter")
    @classmethod
    def _filter(cls, v: str) -> str:
        codes = [c.strip() for c in v.split(",") if c.strip()]
        if len(codes) > 15 or any(not (c.isdigit() and len(c) == 3 and int(c) >= 300) for c in codes):
            raise ValueError("failed_filter is a comma list of at most 15 three-digit codes >= 300")
        return v

    @field_validator("log_level")
    @classmethod
    def _level(cls, v: int | str) -> int | str:
        if isinstance(v, str) and v.lower() not in LOG_LEVELS:
            raise ValueError(f"log_level {v!r}: use an integer (-5..3) or one of {', '.join(LOG_LEVELS)}")
        return v

    @field_validator("log_facility", "cdr_facility")
    @classmethod
    def _facility(cls, v: str) -> str:
        from sipsniff_acc.sysloglines import FACILITIES
        if v.upper() not in FACILITIES:
            raise ValueError(f"{v!r}: one of {', '.join(sorted(FACILITIES))}")
        return v.upper()

    @field_validator("cdrs_table")
    @classmethod
    def _cdrs_table(cls, v: str) -> str:
        return v if v == "" else _ident(v, "table name")

    @field_validator("cdr_start_id", "cdr_end_id", "cdr_duration_id")
    @classmethod
    def _cdr_id(cls, v: str) -> str:
        return _ident(v, "dialog variable / column name")

    @field_validator("db_table_acc", "db_table_missed_calls", "acc_method_column", "acc_from_tag_column",
                     "acc_to_tag_column", "acc_callid_column", "acc_sip_code_column", "acc_sip_reason_column",
                     "acc_time_column", "time_attr", "time_exten")
    @classmethod
    def _identifier(cls, v: str) -> str:
        return _ident(v, "table/column name")

    def model_post_init(self, _context: Any) -> None:
        self._log_extra = parse_extra(self.log_extra)
        self._db_extra = parse_extra(self.db_extra)
        self._radius_extra = parse_extra(self.radius_extra)
        self._diameter_extra = parse_extra(self.diameter_extra)
        self._legs = parse_extra(self.multi_leg_info)
        self._cdr_extra = parse_extra(self.cdr_extra)
        for name, _s in self._db_extra + self._legs:
            _ident(name, "db_extra/multi_leg_info column name")
        self._failed_filter = frozenset(int(c) for c in self.failed_filter.split(",") if c.strip())

    @property
    def log_level_number(self) -> int:
        return LOG_LEVELS[self.log_level.lower()] if isinstance(self.log_level, str) else self.log_level

    def extras(self, backend: str) -> list[tuple[str, PvSpec]]:
        return {"log": self._log_extra, "db": self._db_extra, "radius": self._radius_extra,
                "diameter": self._diameter_extra}[backend]

    @property
    def cdr_extras(self) -> list[tuple[str, PvSpec]]:
        return self._cdr_extra

    @property
    def cdr_backends(self) -> tuple[str, ...]:
        """Where a CDR goes: the log line (cdr_log_enable) and/or rows in cdrs_table."""
        if not self.cdr_enable:
            return ()
        return (("log",) if self.cdr_log_enable else ()) + (("db",) if self.cdrs_table else ())

    @property
    def legs(self) -> list[tuple[str, PvSpec]]:
        return self._legs

    @property
    def failed_filtered(self) -> frozenset[int]:
        return self._failed_filter

    def flags(self, missed: bool) -> dict[str, int]:
        """backend -> its flag (the acc flag, or the missed-call flag)."""
        pairs = (("log", self.log_missed_flag if missed else self.log_flag),
                 ("db", self.db_missed_flag if missed else self.db_flag),
                 ("radius", self.radius_missed_flag if missed else self.radius_flag),
                 ("diameter", self.diameter_missed_flag if missed else self.diameter_flag))
        return {b: f for b, f in pairs if f is not None}


class Condition(_Strict):
    """Every given key must hold (AND). Regexes are searched (Kamailio's =~)."""

    method: str | list[str] | None = None
    in_dialog: bool | None = None
    ruri: str | None = None
    from_: str | None = Field(None, alias="from")
    to: str | None = None
    src: str | None = None  #: CIDR or address, optional :port
    dst: str | None = None
    src_port: int | None = None
    dst_port: int | None = None
    transport: str | list[str] | None = None
    header: dict[str, str | bool] = {}  #: name -> regex on any value, true = present, false = absent
    code: int | str | list[int | str] | None = None  #: failure_route: 486, "4xx", [404, 480]
    flag: Flag | list[Flag] | None = None  #: isflagset

    _re: dict[str, UserRegex] = PrivateAttr(default_factory=dict)
    _nets: dict[str, tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, int | None]] = PrivateAttr(default_factory=dict)

    @field_validator("ruri", "from_", "to")
    @classmethod
    def _regex(cls, v: str | None) -> str | None:
        if v is not None:
            compile_regex(v)
        return v

    @field_validator("header")
    @classmethod
    def _header_regex(cls, v: dict[str, str | bool]) -> dict[str, str | bool]:
        for name, pat in v.items():
            if isinstance(pat, str):
                compile_regex(pat, f"header {name}: ")
        return v

    @field_validator("src", "dst")
    @classmethod
    def _net(cls, v: str | None) -> str | None:
        if v is not None:
            _network(v)
        return v

    @field_validator("code")
    @classmethod
    def _code(cls, v: int | str | list[int | str] | None) -> int | str | list[int | str] | None:
        for c in ([] if v is None else v if isinstance(v, list) else [v]):
            if not re.fullmatch(r"[1-6](\d\d|xx)", str(c)):
                raise ValueError(f"code {c!r}: a status code (486) or a class (4xx)")
        return v

    def model_post_init(self, _context: Any) -> None:
        for key in ("ruri", "from_", "to"):
            pat = getattr(self, key)
            if pat is not None:
                self._re[key] = UserRegex(pat)
        for name, pat in self.header.items():
            if isinstance(pat, str):
                self._re["hdr:" + name] = UserRegex(pat)
        for key in ("src", "dst"):
            v = getattr(self, key)
            if v is not None:
                self._nets[key] = _network(v)

    def matches(self, msg: SipMessage, flags: int = 0, code: int = 0) -> bool:
        if self.method is not None:
            method = msg.method or msg.cseq_method
            wanted = [self.method] if isinstance(self.method, str) else self.method
            if method.upper() not in (m.upper() for m in wanted):
                return False
        if self.in_dialog is not None and self.in_dialog != bool(msg.to_tag):
            return False
        for key, text in (("ruri", msg.ruri), ("from_", msg.header("from")), ("to", msg.header("to"))):
            pat = self._re.get(key)
            if pat is not None and (text is None or not pat.search(text)):
                return False
        for key, (ip, port) in (("src", (msg.src, msg.sport)), ("dst", (msg.dst, msg.dport))):
            net = self._nets.get(key)
            if net is not None:
                try:
                    if ipaddress.ip_address(ip) not in net[0] or (net[1] is not None and port != net[1]):
                        return False
                except ValueError:
                    return False
        if self.src_port is not None and msg.sport != self.src_port:
            return False
        if self.dst_port is not None and msg.dport != self.dst_port:
            return False
        if self.transport is not None:
            wanted = [self.transport] if isinstance(self.transport, str) else self.transport
            if (msg.transport or "UDP").upper() not in (t.upper() for t in wanted):
                return False
        for name, want in self.header.items():
            values = [v for k, v in msg.headers if k == name.lower()]
            if want is True and not values or want is False and values:
                return False
            if isinstance(want, str) and not any(self._re["hdr:" + name].search(v) for v in values):
                return False
        if self.code is not None:
            codes = self.code if isinstance(self.code, list) else [self.code]
            if not any(str(c) == str(code) or (str(c).endswith("xx") and str(c)[0] == str(code)[0]) for c in codes):
                return False
        if self.flag is not None:
            for f in [self.flag] if isinstance(self.flag, int) else self.flag:
                if not flags & (1 << f):
                    return False
        return True


    def compiled(self) -> Callable[[SipMessage, int, int], bool]:
        """``matches`` as a closure over plain locals, with only the checks this condition has.

        Why: ``matches`` reads pydantic private attributes and looks up From/To on every call
        (~4 us before any regex runs); RE2's call costs more than ``re``'s on short R-URIs
        (~0.7 vs ~0.1 us), and this more than pays for it. Same result as ``matches`` (tested).
        """
        Check = Callable[[SipMessage, int, int], bool]
        checks: list[Check] = []
        if self.method is not None:
            methods = frozenset(m.upper() for m in ([self.method] if isinstance(self.method, str) else self.method))
            checks.append(lambda msg, _f, _c: (msg.method or msg.cseq_method).upper() in methods)
        if self.in_dialog is not None:
            in_dialog = self.in_dialog
            checks.append(lambda msg, _f, _c: in_dialog == bool(msg.to_tag))
        rx = self._re
        if "ruri" in rx:
            ruri = rx["ruri"].search
            checks.append(lambda msg, _f, _c: msg.ruri is not None and ruri(msg.ruri))
        for key, header in (("from_", "from"), ("to", "to")):
            if key in rx:
                def check(msg: SipMessage, _f: int, _c: int, search: Callable[[str], bool] = rx[key].search,
                          header: str = header) -> bool:
                    text = msg.header(header)
                    return text is not None and search(text)
                checks.append(check)
        for key, net in self._nets.items():
            def in_net(msg: SipMessage, _f: int, _c: int, dst: bool = key == "dst",
                       net: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, int | None] = net) -> bool:
                ip, port = (msg.dst, msg.dport) if dst else (msg.src, msg.sport)
                try:
                    return ipaddress.ip_address(ip) in net[0] and (net[1] is None or port == net[1])
                except ValueError:
                    return False
            checks.append(in_net)
        if self.src_port is not None:
            sport = self.src_port
            checks.append(lambda msg, _f, _c: msg.sport == sport)
        if self.dst_port is not None:
            dport = self.dst_port
            checks.append(lambda msg, _f, _c: msg.dport == dport)
        if self.transport is not None:
            transports = frozenset(t.upper() for t in ([self.transport] if isinstance(self.transport, str)
                                                        else self.transport))
            checks.append(lambda msg, _f, _c: (msg.transport or "UDP").upper() in transports)
        for name, want in self.header.items():
            def has_header(msg: SipMessage, _f: int, _c: int, lname: str = name.lower(), want: str | bool = want,
                           search: Callable[[str], bool] | None = rx["hdr:" + name].search if isinstance(want, str)
                           else None) -> bool:
                values = [v for k, v in msg.headers if k == lname]
                if search is None:
                    return bool(values) == want
                return any(search(v) for v in values)
            checks.append(has_header)
        if self.code is not None:
            codes = [str(c) for c in (self.code if isinstance(self.code, list) else [self.code])]
            exact = frozenset(c for c in codes if not c.endswith("xx"))
            classes = frozenset(c[0] for c in codes if c.endswith("xx"))
            checks.append(lambda _m, _f, code: str(code) in exact or str(code)[0] in classes)
        if self.flag is not None:
            mask = sum(1 << f for f in ([self.flag] if isinstance(self.flag, int) else self.flag))
            checks.append(lambda _m, flags, _c: flags & mask == mask)
        all_checks = tuple(checks)

        def matches(msg: SipMessage, flags: int = 0, code: int = 0) -> bool:
            for check in all_checks:
                if not check(msg, flags, code):
                    return False
            return True
        return matches


@dataclass(frozen=True, slots=True)
class CompiledRule:
    """A rule as plain data for the per-transaction walk (pydantic attribute access is slow)."""

    matches: Callable[[SipMessage, int, int], bool]
    set_mask: int
    reset_mask: int
    avps: tuple[tuple[str, str], ...]
    calls: tuple[tuple[tuple[str, ...], str, str | None], ...]  #: (backends, comment, table)
    drop: bool
    stop: bool
    dlg_manage: bool = False
    dlg_vars: tuple[tuple[str, str], ...] = ()  #: set_dlg_var (cdr.py runs them; the acc engine does not)
    t_on_failure: bool = False  #: failure_route: armed again for the transaction's next failure round
    #: the condition reads only the method (request's, else CSeq's) and whether there is a To-tag
    simple: bool = False


def compile_rule(rule: Rule) -> CompiledRule:
    cond = rule.if_
    simple = cond.model_dump(exclude_defaults=True, by_alias=True).keys() <= {"method", "in_dialog"}
    matches: Callable[[SipMessage, int, int], bool]
    if simple:  # the common case, inlined: method and in-dialog only
        methods = None if cond.method is None else frozenset(
            m.upper() for m in ([cond.method] if isinstance(cond.method, str) else cond.method))
        in_dialog = cond.in_dialog

        def matches_simple(msg: SipMessage, flags: int, code: int) -> bool:
            if methods is not None and (msg.method or msg.cseq_method).upper() not in methods:
                return False
            return in_dialog is None or in_dialog == bool(msg.to_tag)
        matches = matches_simple
    else:
        matches = cond.compiled()
    set_mask = sum(1 << f for f in set(rule.flags_set))
    reset_mask = sum(1 << f for f in set(rule.flags_reset))
    calls = tuple((tuple(b.split("+")), c.comment, c.table) for b, c in rule.acc_calls())
    return CompiledRule(matches, set_mask, reset_mask, tuple(rule.set_avp.items()), calls, rule.drop, rule.stop,
                        rule.dlg_manage, tuple(rule.set_dlg_var.items()), rule.t_on_failure, simple)


def _network(text: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, int | None]:
    port: int | None = None
    base = text
    if text.startswith("["):
        base, _, rest = text[1:].partition("]")
        port = int(rest[1:]) if rest.startswith(":") and rest[1:].isdigit() else None
    elif text.count(":") == 1:
        base, _, p = text.partition(":")
        if not p.isdigit():
            raise ValueError(f"{text!r}: bad port")
        port = int(p)
    try:
        return ipaddress.ip_network(base, strict=False), port
    except ValueError:
        raise ValueError(f"{text!r} is not an address or CIDR network") from None


class AccCall(_Strict):
    comment: str = ""
    table: str | None = None

    @field_validator("table")
    @classmethod
    def _table(cls, v: str | None) -> str | None:
        return None if v is None else _ident(v, "table name")


AccArg = str | AccCall


MAX_AVP_VALUE = 1024  #: characters of a set_avp value: 80 KB of "$fU(" took 1.6 s per interpolation


class Rule(_Strict):
    if_: Condition = Field(default_factory=Condition, alias="if")
    setflag: Flag | list[Flag] = []
    resetflag: Flag | list[Flag] = []
    set_avp: dict[str, str] = {}  #: name -> value (pseudo-variables allowed); AVPs are lists, newest first
    acc_log_request: AccArg | None = None
    acc_db_request: AccArg | None = None
    acc_request: AccArg | None = None
    acc_rad_request: AccArg | None = None
    acc_diam_request: AccArg | None = None
    drop: bool = False  #: no accounting at all for this transaction
    stop: bool = False  #: like exit: later rules do not run
    dlg_manage: bool = False  #: the script's dlg_manage(): the dialog module tracks the call (CDRs)
    set_dlg_var: dict[str, str] = {}  #: $dlg_var(name) = value (pseudo-variables allowed), on the request's dialog
    #: failure_route: the script's t_on_failure() there, arming it for the next failure round of a
    #: serial fork; without it the round after the last relay runs no failure_route (tm disarms it)
    t_on_failure: bool = False

    @field_validator("set_avp", "set_dlg_var")
    @classmethod
    def _avps(cls, v: dict[str, str], info: ValidationInfo) -> dict[str, str]:
        what = info.field_name
        for name, value in v.items():
            _ident(name, "AVP name" if what == "set_avp" else "dialog variable name")
            if len(str(value)) > MAX_AVP_VALUE:  # pseudo-variable scans of a value are quadratic in its length
                raise ValueError(f"{what} {name}: at most {MAX_AVP_VALUE} characters, not {len(str(value))}")
            for m in re.finditer(r"\$\(?\w+(?:\([^)]*\))?(?:\[[^\]]*\])?\)?", str(value)):
                try:
                    parse_pv(m.group(0))
                except PvError as e:
                    raise ValueError(f"{what} {name}: {e}") from None
        return v

    @property
    def flags_set(self) -> list[int]:
        return [self.setflag] if isinstance(self.setflag, int) else self.setflag

    @property
    def flags_reset(self) -> list[int]:
        return [self.resetflag] if isinstance(self.resetflag, int) else self.resetflag

    def acc_calls(self) -> list[tuple[str, AccCall]]:
        """(backends, call) for each acc_*_request of the rule: 'log', 'db', 'log+db', 'radius', 'diameter'."""
        out: list[tuple[str, AccCall]] = []
        for key, backends in (("acc_log_request", "log"), ("acc_db_request", "db"), ("acc_request", "log+db"),
                              ("acc_rad_request", "radius"), ("acc_diam_request", "diameter")):
            v = getattr(self, key)
            if v is not None:
                out.append((backends, AccCall(comment=v) if isinstance(v, str) else v))
        return out


# --- limits: ------------------------------------------------------------------------------

def limit_problems(raw: Any) -> list[tuple[str | None, str]]:
    """(key or None, why) for each thing wrong in a ``limits:`` mapping.

    Checked against the fields of ``Limits`` as they are at run time (names and types), so a
    limit added there is accepted here with no change: int fields take integers, float
    fields integers or decimals; every limit is a positive number.
    """
    if raw is None:
        return []
    if not isinstance(raw, dict):
        return [(None, f"a mapping, name: value (known limits: {', '.join(Limits.names())})")]
    hints = typing.get_type_hints(Limits)
    out: list[tuple[str | None, str]] = []
    for key, value in raw.items():
        name = str(key)
        if name not in hints or name not in Limits.names():
            out.append((name, f"unknown limit (known: {', '.join(Limits.names())})"))
            continue
        kind = hints[name]
        if kind is bool:
            if not isinstance(value, bool):
                out.append((name, "true or false"))
            continue
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if kind is int and not (number and isinstance(value, int) and value > 0):
            out.append((name, f"a positive integer, not {_clip(repr(value), 40)}"))
        elif kind is float and not (number and math.isfinite(value) and value > 0):
            out.append((name, f"a positive number, not {_clip(repr(value), 40)}"))
    return out


def limits_from(raw: Any) -> Limits:
    """A ``limits:`` mapping as ``Limits`` (unset fields keep their defaults); ``ValueError`` if wrong."""
    problems = limit_problems(raw)
    if problems:
        key, why = problems[0]
        raise ValueError(f"{key}: {why}" if key else why)
    if not raw:
        return Limits()
    kinds = typing.get_type_hints(Limits)
    values: dict[str, Any] = {str(k): float(v) if kinds[str(k)] is float else v for k, v in raw.items()}
    return Limits(**values)


class DialogParams(_Strict):
    """The dialog module's parameters that change CDRs."""

    default_timeout: float = Field(43200.0, gt=0)  #: seconds a confirmed dialog lives without in-dialog traffic
    dlg_flag: Flag | None = None  #: a flag set on the initial INVITE makes the dialog tracked (as dlg_manage)


class RulesFile(_Strict):
    profile: Literal["kamailio-5.6", "openser-1.2"] = "kamailio-5.6"
    proxy: ProxyConfig = Field(default_factory=ProxyConfig)
    tm: TmParams = Field(default_factory=TmParams)
    acc: AccParams = Field(default_factory=AccParams)
    dialog: DialogParams = Field(default_factory=DialogParams)
    route: list[Rule] = []
    failure_route: list[Rule] = []
    limits: Annotated[Limits, PlainValidator(lambda v: v if isinstance(v, Limits) else limits_from(v)),
                      PlainSerializer(dataclasses.asdict)] = Field(default_factory=Limits)

    def semantic_problems(self) -> list[tuple[tuple[Any, ...], str]]:
        """What is well-typed but means nothing, with where it is."""
        out: list[tuple[tuple[Any, ...], str]] = []
        for i, r in enumerate(self.failure_route):
            if r.drop:
                out.append((("failure_route", i, "drop"), "drop is for route rules (the transaction exists already)"))
        for i, r in enumerate(self.route):
            if r.if_.code is not None:
                out.append((("route", i, "if", "code"), "'code' is a failure_route condition (a request has no status code)"))
            if r.t_on_failure:
                out.append((("route", i, "t_on_failure"), "t_on_failure is a failure_route action (failure_route rules "
                            "run at a transaction's first failure without it)"))
        out += self._cdr_problems()
        return out

    def _cdr_problems(self) -> list[tuple[tuple[Any, ...], str]]:
        """Dialog CDR settings that are well-typed but cannot work."""
        out: list[tuple[tuple[Any, ...], str]] = []
        a = self.acc
        for i, r in enumerate(self.failure_route):
            for key in ("dlg_manage", "set_dlg_var"):
                if getattr(r, key):
                    out.append((("failure_route", i, key), f"{key} is a route (request_route) action here"))
        for key in ("log_extra", "db_extra", "radius_extra", "diameter_extra"):
            if any(spec.name == "dlg_var" for _n, spec in a.extras(key.split("_")[0])):
                out.append((("acc", key), "$dlg_var() is read in cdr_extra only (acc records have no dialog here)"))
        if not a.cdr_enable:
            return out
        if self.profile == "openser-1.2":
            out.append((("acc", "cdr_enable"), "OpenSER 1.2 has no dialog CDRs (use profile: kamailio-5.6)"))
        if not any(r.dlg_manage for r in self.route) and self.dialog.dlg_flag is None:
            out.append((("acc", "cdr_enable"), "no route rule has dlg_manage: true and dialog.dlg_flag is not set: "
                        "no dialog would be tracked, so no CDR written"))
        names = [a.cdr_start_id, a.cdr_end_id, a.cdr_duration_id, *(n for n, _s in a.cdr_extras)]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            out.append((("acc", "cdr_extra"), f"{', '.join(twice)}: a CDR name given twice (start/end/duration ids "
                        "and cdr_extra names are the line's keys and the table's columns)"))
        if a.cdrs_table:
            for name, _spec in a.cdr_extras:
                if not IDENT.fullmatch(name):
                    out.append((("acc", "cdr_extra"), f"{name!r} is not a valid column name for {a.cdrs_table} "
                                "(letters, digits, _; at most 64)"))
        return out

    @property
    def profile_info(self) -> Profile:
        return PROFILES[self.profile]

    @property
    def reply_relay_mode(self) -> int:
        return self.tm.reply_relay_mode if self.tm.reply_relay_mode is not None else self.profile_info.reply_relay_mode


DEFAULT_RULES = """\
profile: kamailio-5.6
acc:
  log_flag: 1
  log_missed_flag: 2
  db_flag: 1
  db_missed_flag: 2
route:
  - if: {method: INVITE, in_dialog: false}
    setflag: [1, 2]
  - if: {method: BYE, in_dialog: true}
    setflag: [1]
"""


# --- loading: bounded YAML, with line numbers ----------------------------------------------

MAX_RULES_BYTES = 1 << 20  #: a rules file is a few KB; past 1 MiB it is the wrong file (or an attack)
MAX_YAML_DEPTH = 50  #: nesting of mappings/lists; rules.yaml needs 5
MAX_YAML_NODES = 100_000  #: nodes once aliases are expanded (billion laughs: ~10^9 from 570 bytes)
MAX_YAML_CHARS = 4 << 20  #: characters of scalars once aliases are expanded

#: first bytes of what is not a rules file but is often passed as one (-r capture.pcap, tshark's habit)
_CAPTURE_MAGIC = {b"\xd4\xc3\xb2\xa1": "a pcap capture", b"\xa1\xb2\xc3\xd4": "a pcap capture",
                  b"\x4d\x3c\xb2\xa1": "a pcap capture", b"\xa1\xb2\x3c\x4d": "a pcap capture",
                  b"\x0a\x0d\x0d\x0a": "a pcapng capture", b"\x1f\x8b": "a gzip file"}


class _Refused(yaml.composer.ComposerError):
    """Valid YAML past one of the loader's bounds."""


_FastSafeLoader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when built in


class _Loader(_FastSafeLoader):  # type: ignore[valid-type,misc]
    """Safe loader (libyaml when present) where a value Python refuses is a YAML error at its node."""

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        """An int of 5000 digits or a date 2001-13-45 raises ValueError in PyYAML: say where instead."""
        try:
            return super().construct_object(node, deep)
        except yaml.YAMLError:
            raise
        except Exception as e:  # PyYAML's constructors raise what they meet (!!timestamp x: AttributeError)
            why = str(e).split(";")[0].split(": value has")[0]
            raise yaml.constructor.ConstructorError(None, None, f"cannot read this value: {_clip(why, 100)}",
                                                    node.start_mark) from None


def _measure(text: str) -> None:
    """Refuse (``_Refused``) a document too deep or too big once aliases are expanded, from its events alone.

    PyYAML shares an aliased node instead of copying it, but everything that walks the result
    (line map, pydantic) sees it expanded: a 570-byte billion-laughs file became 2.4 GB. One pass
    over the parser's events notes each anchored node's expanded size and height when it ends,
    and an alias adds them: the expanded count at O(1) per alias, before any node exists. An
    alias inside its own anchor (a cycle) is refused too. Why a pass of its own rather than a
    Python composer: the events cost ~0.1 s per MB from libyaml, a composer in Python 5x libyaml's.
    """
    loader: Any = _FastSafeLoader(text)  # libyaml's or PyYAML's parser: the same event API, untyped
    depth = deepest = nodes = chars = 0
    expanded: dict[str, tuple[int, int, int]] = {}  #: anchor -> (nodes, chars, height)
    stack: list[tuple[str | None, int, int, int]] = []  #: open collections: anchor, nodes, chars, deepest before

    def grow(n: int, c: int, level: int, mark: Any) -> None:
        nonlocal nodes, chars, deepest
        nodes += n
        chars += c
        deepest = max(deepest, level)
        if level > MAX_YAML_DEPTH:
            raise _Refused(None, None, f"nested deeper than {MAX_YAML_DEPTH} levels", mark)
        if nodes > MAX_YAML_NODES:
            raise _Refused(None, None, f"more than {MAX_YAML_NODES} values (an alias counts as all it stands for)",
                           mark)
        if chars > MAX_YAML_CHARS:
            raise _Refused(None, None, f"more than {MAX_YAML_CHARS >> 20} MiB of text "
                           "(an alias counts as all it stands for)", mark)

    try:
        while loader.check_event():
            event: Any = loader.get_event()
            if isinstance(event, yaml.AliasEvent):
                alias: str = event.anchor or ""
                if any(f[0] == alias for f in stack):
                    raise _Refused(None, None, f"alias *{alias} is inside its own anchor (a cycle)",
                                   event.start_mark)  # type: ignore[arg-type]  # libyaml's Mark has the same fields
                n, c, h = expanded.get(alias, (1, 0, 1))  # undefined: the composer says so
                grow(n, c, depth + h, event.start_mark)
            elif isinstance(event, yaml.ScalarEvent):
                grow(1, len(event.value), depth + 1, event.start_mark)
                if event.anchor is not None:
                    expanded[event.anchor] = (1, len(event.value), 1)
            elif isinstance(event, yaml.CollectionStartEvent):
                stack.append((event.anchor, nodes, chars, deepest))
                depth += 1
                deepest = depth
                grow(1, 0, depth, event.start_mark)
            elif isinstance(event, yaml.CollectionEndEvent):
                opened, n0, c0, deepest0 = stack.pop()
                if opened is not None:
                    expanded[opened] = (nodes - n0, chars - c0, deepest - depth + 1)
                deepest = max(deepest0, deepest)
                depth -= 1
            elif isinstance(event, yaml.DocumentEndEvent):
                expanded.clear()  # anchors are per document
    finally:
        loader.dispose()


def _load_yaml(text: str, filename: str) -> tuple[Any, yaml.Node | None]:
    """(data, node) of one YAML document, bounded; ``RulesError`` (one line) if it is not."""
    loader: yaml.SafeLoader | None = None
    try:
        _measure(text)
        loader = _Loader(text)
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.reader.ReaderError as e:  # a character YAML does not allow (control characters, ...)
        line = text.count("\n", 0, e.position) + 1
        raise RulesError([f"{filename}:{line}: not valid YAML: character {chr(e.character)!r} is not allowed "
                          f"(offset {e.position})" if isinstance(e.character, int) else
                          f"{filename}:{line}: not valid YAML: {_clip(e.reason, 100)}"]) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = mark.line + 1 if mark is not None else 1
        why = _clip(" ".join(str(getattr(e, "problem", None) or e).split()), 200)
        raise RulesError([f"{filename}:{line}: {why}" if isinstance(e, _Refused) else
                          f"{filename}:{line}: not valid YAML: {why}"]) from None
    except UnicodeError as e:  # a str with a lone surrogate (a file is decoded strictly before this)
        raise RulesError([f"{filename}:{text.count(chr(10), 0, getattr(e, 'start', 0)) + 1}: not valid text: {getattr(e, 'reason', e)}"]) from None
    except RecursionError:  # not reachable within MAX_YAML_DEPTH; kept so no input can give a traceback
        raise RulesError([f"{filename}:1: nested too deeply"]) from None
    finally:
        if loader is not None:
            loader.dispose()
    return data, node


def _lines(node: yaml.Node, path: tuple[Any, ...], out: dict[tuple[Any, ...], int]) -> None:
    out[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            key = k.value if isinstance(k, yaml.ScalarNode) else repr(k.value)
            out[(*path, key)] = k.start_mark.line + 1
            _lines(v, (*path, key), out)
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            _lines(v, (*path, i), out)


def _line_of(loc: tuple[Any, ...], lines: dict[tuple[Any, ...], int]) -> int:
    loc = tuple("from" if p == "from_" else "if" if p == "if_" else p for p in loc)
    while loc:
        if loc in lines:
            return lines[loc]
        loc = loc[:-1]
    return lines.get((), 1)


def parse_rules(text: str, filename: str = "rules.yaml") -> RulesFile:
    """Validate rules text; ``RulesError`` lists every problem as FILE:LINE: key: why."""
    data, node = _load_yaml(text.removeprefix("\ufeff"), filename)
    if data is None:
        raise RulesError([f"{filename}:1: the file is empty (expected profile:, acc:, route:, ...); "
                          "without --rules the built-in rules are used"])
    if not isinstance(data, dict):
        raise RulesError([f"{filename}:1: the file must be a mapping (profile:, proxy:, acc:, route:, ...)"])
    lines: dict[tuple[Any, ...], int] = {}
    if node is not None:
        _lines(node, (), lines)
    problems = [f"{filename}:{_line_of(('limits', k) if k else ('limits',), lines)}: limits{'.' + k if k else ''}: {why}"
                for k, why in limit_problems(data.get("limits"))]
    try:
        rules = RulesFile.model_validate(data)
    except ValidationError as e:
        for err in e.errors():
            loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and ("[" in p or p in (
                "str", "int", "bool", "list[int]", "AccCall", "function-after"))))
            if problems and loc[:1] == ("limits",):
                continue  # said above, key by key
            key = ".".join(str(p) for p in loc) or "(top)"
            key = key.replace("from_", "from").replace("if_", "if")
            msg = err["msg"].removeprefix("Value error, ")
            problems.append(f"{filename}:{_line_of(loc, lines)}: {key}: {msg}")
    else:
        if not problems:
            semantic = rules.semantic_problems()
            if semantic:
                raise RulesError([_clip(f"{filename}:{_line_of(loc, lines)}: {'.'.join(map(str, loc))}: {msg}", 400)
                                  for loc, msg in semantic])
            return rules
    problems = [_clip(p, 400) for p in problems]
    raise RulesError(sorted(set(problems), key=lambda p: int(p[len(filename) + 1 :].split(":")[0])))


def decode_rules(data: bytes, filename: str) -> str:
    """The file's bytes as text, or ``RulesError`` with one line: too big, not UTF-8, or a capture."""
    if len(data) > MAX_RULES_BYTES:
        line = data.count(b"\n", 0, MAX_RULES_BYTES) + 1
        raise RulesError([f"{filename}:{line}: the file goes on past {MAX_RULES_BYTES >> 20} MiB here; "
                          "a rules file is a few KB (is it the right file?)"])
    for magic, what in _CAPTURE_MAGIC.items():
        if data.startswith(magic):
            raise RulesError([f"{filename}:1: this is {what}, not a rules file (YAML)"])
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise RulesError([f"{filename}:{line}: byte 0x{data[e.start]:02X} at offset {e.start} is not UTF-8: "
                          "the file must be UTF-8 (iconv -f latin1 -t utf-8 converts a Latin-1 file)"]) from None


def load_rules(path: str | Path | None) -> RulesFile:
    """rules.yaml from a file, or the embedded defaults (None)."""
    if path is None:
        return parse_rules(DEFAULT_RULES, "<default rules>")
    p = Path(path)
    try:
        with p.open("rb") as f:
            data = f.read(MAX_RULES_BYTES + 1)  # never more: the size bound holds for a FIFO or /dev/zero too
    except OSError as e:
        raise RulesError([f"{p}: cannot read: {e.strerror}"]) from None
    return parse_rules(decode_rules(data, str(p)), str(p))
