"""RADIUS accounting as Kamailio 5.6's acc_radius sends it (acc-spec §5), through pyrad.

One Accounting-Request per record, attributes in acc_radius's wire order (checked against a
capture of a real Kamailio + radcli): Acct-Status-Type, Service-Type, Sip-Response-Code,
Sip-Method (Kamailio's METHOD_* bit), Event-Timestamp, Sip-From-Tag, Sip-To-Tag,
Acct-Session-Id (Call-ID), radius_extra by dictionary name, leg sets; then what radcli adds:
NAS-Port 5060, Acct-Delay-Time (seconds the record waited in our spool), NAS-IP-Address,
NAS-Identifier if configured.

pyrad encodes and checks packets; the send loop is ours: a retransmission resends the very
same bytes (same Identifier and Authenticator), so a server that got the first copy sees a
duplicate, not a new record (pyrad's own loop bumps Acct-Delay-Time, which makes a new
packet). Servers are tried in order (failover); a record that no server answers stops the
batch with ``BackendDown`` and stays in the spool.

Values are fitted before they are sent, so one record can never block the ones after it:

* A string attribute holds at most 253 octets (RFC 2865 §5). Kamailio does not fit: radcli's
  ``rc_avpair_assign()`` (lib/avpair.c) returns -1 for a string longer than AUTH_STRING_LEN
  (253), ``rc_avpair_new()`` then gives NULL, and acc_radius's ADD_RAD_AVPAIR
  (src/modules/acc_radius/acc_radius_mod.c, ``acc_radius_send_request()``) logs
  "failed to add" and jumps to ``error``: the whole Accounting-Request is dropped. We keep
  the record instead: ``on_overlong: truncate`` (the default; set in the RADIUS config, else
  rules.yaml's ``acc.on_overlong`` applies, as for SQL) cuts the value to 253 octets
  on a UTF-8 character boundary and counts it per attribute (``fitted``); ``on_overlong:
  dead-letter`` does what Kamailio does to the request, but visibly: the record is refused
  (``RecordRejected``) and set aside in the spool's dead-letter table with the reason.
* NUL and text that is not valid Unicode (lone surrogates) become U+FFFD, counted per
  attribute (aaa_fit.py): RFC 8044 §3.4 text is UTF-8, and a NUL cuts the value short in
  every C consumer (radcli and Kamailio would send it raw: they copy ``len`` bytes).
* Integer attributes of radius_extra take only a decimal number below 2^32; any other value
  is omitted and counted (``skipped_values``), as before.
* A packet over 4096 octets (RFC 2865 §3: the server silently drops it, so it would time out
  for ever) and any other encoding error of pyrad for one record raise ``RecordRejected``
  with the reason; nothing else is raised out of ``deliver`` but ``BackendDown`` (no answer).
"""

from __future__ import annotations

import ipaddress
import os
import select
import socket
import struct
import time
from collections import Counter
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml
from pyrad.dictionary import Dictionary, ParseError
from pyrad.packet import AccountingRequest, AcctPacket, Packet, PacketError

from sipsniff_acc.emitters.aaa_fit import clean, fit_text
from sipsniff_acc.emitters.spool import BackendDown, RecordRejected
from sipsniff_acc.records import AccRecord
from sipsniff_acc.rules import RulesFile

#: Kamailio's METHOD_* values (core/parser/msg_parser.h): what acc_radius puts in Sip-Method.
METHOD_BITS = {
    "INVITE": 1, "CANCEL": 2, "ACK": 4, "BYE": 8, "INFO": 16, "REGISTER": 32, "SUBSCRIBE": 64, "NOTIFY": 128,
    "MESSAGE": 256, "OPTIONS": 512, "PRACK": 1024, "UPDATE": 2048, "REFER": 4096, "PUBLISH": 8192, "KDMQ": 16384,
    "GET": 32768, "POST": 65536, "PUT": 131072, "DELETE": 262144,
}
METHOD_OTHER = 524288
START, STOP, ALIVE, FAILED = 1, 2, 3, 15
SIP_SESSION = 15
SIP_PORT = 5060  #: radcli's rc_acct(rh, SIP_PORT, ...): NAS-Port is this constant, not the real port
MAX_STRING = 253  #: RFC 2865 §5; radcli's AUTH_STRING_LEN
MAX_PACKET = 4096  #: RFC 2865 §3
MAX_U32 = 0xFFFFFFFF
OVERLONG_POLICIES = ("truncate", "dead-letter")


class RadiusConfigError(ValueError):
    pass


class _Refused(Exception):
    """One record cannot be sent as it is (the reason is safe to print)."""


@dataclass
class RadiusConfig:
    servers: list[tuple[str, int, str]] = field(default_factory=list)  #: (host, port, secret), failover order
    timeout: float = 3.0
    retries: int = 2  #: retransmissions per server
    bind: str = ""
    nas_ip: str = ""
    nas_identifier: str = ""
    dictionaries: list[str] = field(default_factory=list)  #: extra dictionary files (radius_extra names)
    on_overlong: str = ""  #: over 253 octets: "truncate" (counted) or "dead-letter"; "": rules' acc.on_overlong


def load_config(path: str | None) -> RadiusConfig:
    """radius_config: a YAML file, or a radiusclient.conf (acctserver, servers, radius_timeout, ...).

    Every mistake is a one-line ``RadiusConfigError`` that never quotes a secret: a server
    entry is shown as host[:port] only, and a YAML error by its line and column, not its text."""
    if not path:
        raise RadiusConfigError("radius_flag is set but acc.radius_config names no file")
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise RadiusConfigError(f"{p}: cannot read: {e.strerror}") from None
    except UnicodeDecodeError:
        raise RadiusConfigError(f"{p}: not UTF-8 text") from None
    if p.suffix in (".yaml", ".yml"):
        return _from_yaml(text, p)
    return _from_radiusclient(text, p)


def _server(spec: str, default_secret: str, where: Path) -> tuple[str, int, str]:
    """host[:port[:secret]]; IPv6 as [addr]:port[:secret]. Errors name the host, never the secret."""
    spec = spec.strip()
    if spec.startswith("["):
        host, sep, rest = spec[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise RadiusConfigError(f"{where}: bad server [{host}...: expected [address]:port")
        rest = rest[1:]
    else:
        host, _, rest = spec.partition(":")
    port_s, _, secret = rest.partition(":")
    if not host:
        raise RadiusConfigError(f"{where}: a server entry has no host (expected host[:port[:secret]])")
    if port_s and not (port_s.isascii() and port_s.isdigit() and 0 < int(port_s) < 65536):
        raise RadiusConfigError(f"{where}: bad port for server {host} (expected host[:port[:secret]], port 1-65535)")
    return host, int(port_s or 1813), secret or default_secret


def _number(value: object, what: str, where: Path, kind: type[float] | type[int]) -> float:
    try:
        n = kind(str(value).strip())
    except ValueError:
        raise RadiusConfigError(f"{where}: {what} must be a number") from None
    if n < 0 or n != n:
        raise RadiusConfigError(f"{where}: {what} must not be negative")
    return n


def _from_yaml(text: str, where: Path) -> RadiusConfig:
    try:
        data = yaml.safe_load(text) or {}
    except yaml.MarkedYAMLError as e:  # its str() quotes the line, which may hold the secret
        mark = e.problem_mark
        at = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        raise RadiusConfigError(f"{where}: not valid YAML: {at}{e.problem or 'syntax error'}") from None
    except yaml.YAMLError:
        raise RadiusConfigError(f"{where}: not valid YAML") from None
    if not isinstance(data, dict):
        raise RadiusConfigError(f"{where}: expected a mapping (servers, secret, timeout, retries, bind, nas_ip)")
    secret = str(data.get("secret") or os.environ.get("SIPSNIFF_RADIUS_SECRET", ""))
    servers_in = data.get("servers", [])
    if isinstance(servers_in, str):
        servers_in = [servers_in]
    if not isinstance(servers_in, list):
        raise RadiusConfigError(f"{where}: servers: expected a list of host[:port[:secret]]")
    dicts = data.get("dictionaries", [])
    if not isinstance(dicts, list):
        raise RadiusConfigError(f"{where}: dictionaries: expected a list of files")
    servers = [_server(str(s), secret, where) for s in servers_in]
    cfg = RadiusConfig(servers, _number(data.get("timeout", 3.0), "timeout", where, float),
                       int(_number(data.get("retries", 2), "retries", where, int)), str(data.get("bind", "") or ""),
                       str(data.get("nas_ip", "") or ""), str(data.get("nas_identifier", "") or ""),
                       [str(where.parent / d) for d in dicts], str(data.get("on_overlong", "") or ""))
    return _check(cfg, where)


def _from_radiusclient(text: str, where: Path) -> RadiusConfig:
    kv: dict[str, str] = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            key, _, value = line.partition(" ")
            kv[key.strip()] = value.strip()
    secrets: dict[str, str] = {}
    if "servers" in kv:  # radiusclient-ng: "host secret" lines
        try:
            for line in (where.parent / kv["servers"]).read_text(encoding="utf-8", errors="replace").splitlines():
                parts = line.split("#", 1)[0].split()
                if len(parts) >= 2:
                    secrets[parts[0]] = parts[1]
        except OSError:
            pass
    servers = []
    for spec in kv.get("acctserver", "").split(","):
        if spec.strip():
            host, port, secret = _server(spec, "", where)
            servers.append((host, port, secret or secrets.get(host, os.environ.get("SIPSNIFF_RADIUS_SECRET", ""))))
    cfg = RadiusConfig(servers, _number(kv.get("radius_timeout", 3), "radius_timeout", where, float),
                       int(_number(kv.get("radius_retries", 2), "radius_retries", where, int)),
                       kv.get("bindaddr", "").replace("*", ""), kv.get("nas-ip", ""), kv.get("nas-identifier", ""),
                       on_overlong=kv.get("on_overlong", ""))
    return _check(cfg, where)


def _check(cfg: RadiusConfig, where: Path) -> RadiusConfig:
    """What would otherwise fail on every record (and dead-letter them all) fails here, once."""
    if not cfg.servers:
        raise RadiusConfigError(f"{where}: no accounting server (acctserver / servers:)")
    for host, _port, secret in cfg.servers:
        if not secret:
            raise RadiusConfigError(f"{where}: no shared secret for {host} (or set SIPSNIFF_RADIUS_SECRET)")
    for what, value in (("bind", cfg.bind), ("nas_ip", cfg.nas_ip)):
        if value:
            try:
                ipaddress.ip_address(value)
            except ValueError:
                raise RadiusConfigError(f"{where}: {what} {value!r} is not an IP address") from None
    if cfg.nas_ip and ":" in cfg.nas_ip:
        raise RadiusConfigError(f"{where}: nas_ip must be an IPv4 address (NAS-IP-Address)")
    if len(cfg.nas_identifier.encode("utf-8", "replace")) > MAX_STRING:
        raise RadiusConfigError(f"{where}: nas_identifier is longer than {MAX_STRING} bytes")
    if cfg.on_overlong and cfg.on_overlong not in OVERLONG_POLICIES:
        raise RadiusConfigError(f"{where}: on_overlong must be one of {', '.join(OVERLONG_POLICIES)}")
    return cfg


def dictionary(extra: list[str]) -> Dictionary:
    base = resources.files("sipsniff_acc") / "data" / "dictionary.sipsniff"
    with resources.as_file(base) as path:
        return Dictionary(str(path), *extra)


def reply_code(r: AccRecord) -> int:
    """The record's status code as a number (0 when it is none: a SIP code has 3 digits)."""
    return int(r.code) if r.code.isascii() and r.code.isdigit() and len(r.code) < 10 else 0


def status_type(r: AccRecord, openser: bool) -> int:
    """acc_radius rad_status() (5.6), or OpenSER 1.2's."""
    code = reply_code(r)
    method = r.method.upper()
    if openser:
        if code == 0:
            return FAILED
        if method in ("INVITE", "ACK") and 200 <= code < 300:
            return START
        return STOP if method in ("BYE", "CANCEL") else FAILED
    if method == "INVITE" and not r.in_dialog and 200 <= code < 300:
        return START
    if method in ("BYE", "CANCEL"):
        return STOP
    if r.in_dialog:
        return ALIVE
    return FAILED


class RadiusEmitter:
    """The "radius" backend. ``name`` is the spool's queue key: the destination,
    ``radius:<servers in failover order>`` (no secret), so records queued for one set of
    servers are never sent to another by a later run with another config."""

    kind = "radius"

    def __init__(self, rules: RulesFile, config: RadiusConfig | None = None, on_overlong: str | None = None) -> None:
        """on_overlong: "truncate" or "dead-letter"; None: the RADIUS config's on_overlong, else
        rules.yaml's acc.on_overlong (the one policy of every backend), else truncate."""
        self.rules = rules
        self.cfg = config or load_config(rules.acc.radius_config)
        self.on_overlong = on_overlong or self.cfg.on_overlong or str(getattr(rules.acc, "on_overlong", "truncate"))
        if self.on_overlong not in OVERLONG_POLICIES:
            raise RadiusConfigError(f"on_overlong: {self.on_overlong!r} is not one of {', '.join(OVERLONG_POLICIES)}")
        try:
            self.dict = dictionary(self.cfg.dictionaries)
        except (OSError, ParseError, ValueError, KeyError) as e:
            raise RadiusConfigError(f"RADIUS dictionary: {e}") from None
        self.openser = rules.profile == "openser-1.2"
        self.service_type = rules.acc.service_type if rules.acc.service_type is not None else SIP_SESSION
        for name, _spec in rules.acc.extras("radius") + rules.acc.legs:
            if name not in self.dict.attributes:
                raise RadiusConfigError(f"radius_extra/multi_leg_info: {name!r} is not in the RADIUS dictionary")
        self.where = ", ".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p, _s in self.cfg.servers)
        self.name = f"radius:{self.where}"
        self.nas_ip = self.cfg.nas_ip or (self.cfg.bind if self.cfg.bind and ":" not in self.cfg.bind else "127.0.0.1")
        self.current = 0  #: index of the server that answered last (failover sticks)
        self.sent = 0
        self.retransmissions = 0
        self.skipped_values = 0  #: radius_extra values an integer attribute cannot hold, omitted
        self.fitted: Counter[str] = Counter()  #: "attribute: what" -> values changed to fit (the spool reports it)
        self.rejected = 0  #: records refused here (RecordRejected)
        self.sock: socket.socket | None = None
        try:  # a config that breaks every packet (a service_type out of range, ...) fails here, once
            probe = AccRecord("answered", 0.0, "INVITE", "f", "t", "c", "200", "OK", ("radius",))
            self.packet(probe, self.cfg.servers[0][2]).RequestPacket()
        except (ValueError, TypeError, KeyError, struct.error, UnicodeError, OverflowError, _Refused) as e:
            raise RadiusConfigError(f"RADIUS: this configuration cannot build a packet: {e}") from None

    def wants(self, r: AccRecord) -> bool:
        return "radius" in r.backends

    def attributes(self, r: AccRecord) -> list[tuple[str, int | str | bytes]]:
        """The record's attributes in acc_radius's order, values fitted (once per record, however
        many servers are tried); ``_Refused`` when the record cannot be sent (on_overlong)."""
        code = reply_code(r)
        out: list[tuple[str, int | str | bytes]] = [
            ("Acct-Status-Type", status_type(r, self.openser)), ("Service-Type", self.service_type),
            ("Sip-Response-Code", code), ("Sip-Method", METHOD_BITS.get(r.method.upper(), METHOD_OTHER)),
            ("Event-Timestamp", min(max(0, int(r.ts)), MAX_U32))]
        if r.from_tag:
            self._add(out, "Sip-From-Tag", r.from_tag)
        to_tag = r.to_tag
        if r.local and not r.in_dialog:  # the engines see the request's To: no tag (Kamailio capture)
            to_tag = None
        if to_tag:
            self._add(out, "Sip-To-Tag", to_tag)
        if r.call_id:
            self._add(out, "Acct-Session-Id", r.call_id)
        for name, value in r.extras.get("radius", []) + [p for leg in r.legs for p in leg]:
            self._add(out, name, value)
        out.append(("NAS-Port", SIP_PORT))
        delay = int(max(0.0, time.time() - r.queued_at)) if r.queued_at else 0
        out.append(("Acct-Delay-Time", min(delay, MAX_U32)))
        out.append(("NAS-IP-Address", self.nas_ip))
        if self.cfg.nas_identifier:
            self._add(out, "NAS-Identifier", self.cfg.nas_identifier)
        return out

    def packet(self, r: AccRecord, secret: str) -> AcctPacket:
        return self._packet(self.attributes(r), secret)

    def _packet(self, attrs: list[tuple[str, int | str | bytes]], secret: str) -> AcctPacket:
        pkt = AcctPacket(code=AccountingRequest, secret=secret.encode(), dict=self.dict)
        for name, value in attrs:
            pkt.AddAttribute(name, value)
        return pkt

    def _add(self, out: list[tuple[str, int | str | bytes]], name: str, value: str | None) -> None:
        if value is None or value == "":
            return  # a null value is omitted, as acc_radius does
        kind = self.dict.attributes[name].type
        if kind in ("integer", "date"):
            if not (value.isascii() and value.isdigit() and len(value) <= 10 and int(value) <= MAX_U32):
                self.skipped_values += 1
                self.fitted[f"{name}: not a 32-bit number, omitted"] += 1
                return
            out.append((name, int(value)))
        elif kind in ("string", "octets"):
            data = clean(value, MAX_STRING)
            if data is not None:
                out.append((name, data))
                return
            data, cut = fit_text(value, MAX_STRING, self.fitted, name)
            if cut:
                if self.on_overlong == "dead-letter":
                    raise _Refused(f"{name} is {len(value.encode('utf-8', 'replace'))} bytes, over RADIUS's "
                                   f"{MAX_STRING} (on_overlong: dead-letter; Kamailio drops such a request)")
                self.fitted[f"{name}: truncated to {MAX_STRING} bytes"] += 1
            out.append((name, data))
        else:
            out.append((name, value))

    def deliver(self, records: list[AccRecord]) -> None:
        """Record by record: no answer from any server → ``BackendDown`` (records before it were
        delivered); a record that cannot be encoded → ``RecordRejected`` with its index."""
        for i, r in enumerate(records):
            if not self.wants(r):
                continue
            try:
                try:
                    attrs = self.attributes(r)
                except (ValueError, TypeError, KeyError, OverflowError) as e:  # a NaN time, an unknown name...
                    raise _Refused(f"cannot be encoded: {e}") from None
                first = self._encode(attrs, self.current)
            except _Refused as e:
                self.rejected += 1
                raise RecordRejected(f"RADIUS: {e}", index=i) from None  # the spool names the record
            try:
                self._send(attrs, first)
            except BackendDown as e:
                raise BackendDown(str(e), delivered=i) from None

    def _encode(self, attrs: list[tuple[str, int | str | bytes]], server: int) -> tuple[AcctPacket, bytes]:
        """The packet for one server (each has its own secret), or ``_Refused`` with the reason."""
        try:
            pkt = self._packet(attrs, self.cfg.servers[server][2])
            pkt.id = pkt.CreateID()
            raw = pkt.RequestPacket()
        except (ValueError, TypeError, KeyError, struct.error, UnicodeError, OverflowError) as e:
            raise _Refused(f"cannot be encoded: {e}") from None
        if len(raw) > MAX_PACKET:
            raise _Refused(f"the Accounting-Request would be {len(raw)} bytes, over RADIUS's {MAX_PACKET} "
                           "(RFC 2865 §3; too many or too long radius_extra values)")
        return pkt, raw

    def _socket(self) -> socket.socket:
        if self.sock is None:
            family = socket.AF_INET6 if ":" in (self.cfg.bind or self.cfg.servers[0][0]) else socket.AF_INET
            s = socket.socket(family, socket.SOCK_DGRAM)
            if self.cfg.bind:
                s.bind((self.cfg.bind, 0))
            self.sock = s
        return self.sock

    def _send(self, attrs: list[tuple[str, int | str | bytes]], first: tuple[AcctPacket, bytes]) -> None:
        """Try the servers in failover order from the one that answered last."""
        n = len(self.cfg.servers)
        errors = []
        for k in range(n):
            index = (self.current + k) % n
            host, port, _secret = self.cfg.servers[index]
            try:
                pkt, raw = first if k == 0 else self._encode(attrs, index)
            except _Refused as e:  # only a packet size can differ by server (none in practice)
                errors.append(f"{host}:{port}: {e}")
                continue
            try:
                sock = self._socket()
            except OSError as e:  # the bind address is gone (an interface down): transient
                raise BackendDown(f"RADIUS: cannot open a socket from {self.cfg.bind or 'any'}: {e.strerror}") from None
            for attempt in range(self.cfg.retries + 1):
                if attempt:
                    self.retransmissions += 1
                try:
                    sock.sendto(raw, (host, port))
                except OSError as e:
                    errors.append(f"{host}:{port}: {e.strerror}")
                    break
                if self._await_reply(sock, pkt, raw):
                    self.current = index
                    self.sent += 1
                    return
            else:
                errors.append(f"{host}:{port}: no answer after {self.cfg.retries + 1} tries x {self.cfg.timeout:g} s")
        raise BackendDown("RADIUS: " + "; ".join(errors))

    def _await_reply(self, sock: socket.socket, pkt: AcctPacket, raw: bytes) -> bool:
        deadline = time.monotonic() + self.cfg.timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            ready, _, _ = select.select([sock], [], [], left)
            if not ready:
                return False
            try:
                data = sock.recv(4096)
                reply = Packet(packet=data, dict=self.dict, secret=pkt.secret)
            except (OSError, PacketError):
                continue
            if reply.id == pkt.id and pkt.VerifyReply(reply, data):
                return True  # a late answer to an earlier record has another id: ignored

    def close(self) -> None:
        """Close the socket. (What was fitted is in ``fitted``: the spool says it at close.)"""
        if self.sock is not None:
            self.sock.close()
            self.sock = None
