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
"""

from __future__ import annotations

import os
import select
import socket
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml
from pyrad.dictionary import Dictionary
from pyrad.packet import AccountingRequest, AcctPacket, Packet, PacketError

from sipsniff_acc.emitters.spool import BackendDown, deliver_each
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


class RadiusConfigError(ValueError):
    pass


@dataclass
class RadiusConfig:
    servers: list[tuple[str, int, str]] = field(default_factory=list)  #: (host, port, secret), failover order
    timeout: float = 3.0
    retries: int = 2  #: retransmissions per server
    bind: str = ""
    nas_ip: str = ""
    nas_identifier: str = ""
    dictionaries: list[str] = field(default_factory=list)  #: extra dictionary files (radius_extra names)


def load_config(path: str | None) -> RadiusConfig:
    """radius_config: a YAML file, or a radiusclient.conf (acctserver, servers, radius_timeout, ...)."""
    if not path:
        raise RadiusConfigError("radius_flag is set but acc.radius_config names no file")
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise RadiusConfigError(f"{p}: cannot read: {e.strerror}") from None
    if p.suffix in (".yaml", ".yml"):
        return _from_yaml(text, p)
    return _from_radiusclient(text, p)


def _server(spec: str, default_secret: str, where: Path) -> tuple[str, int, str]:
    host, _, rest = spec.strip().partition(":")
    port_s, _, secret = rest.partition(":")
    if not host:
        raise RadiusConfigError(f"{where}: bad server {spec!r}")
    if port_s and not port_s.isdigit():
        raise RadiusConfigError(f"{where}: bad port in {spec!r}")
    return host, int(port_s or 1813), secret or default_secret


def _from_yaml(text: str, where: Path) -> RadiusConfig:
    data = yaml.safe_load(text) or {}
    if not isinstance(data, dict):
        raise RadiusConfigError(f"{where}: expected a mapping (servers, secret, timeout, retries, bind, nas_ip)")
    secret = str(data.get("secret") or os.environ.get("SIPSNIFF_RADIUS_SECRET", ""))
    servers = [_server(str(s), secret, where) for s in data.get("servers", [])]
    cfg = RadiusConfig(servers, float(data.get("timeout", 3.0)), int(data.get("retries", 2)), str(data.get("bind", "")),
                       str(data.get("nas_ip", "")), str(data.get("nas_identifier", "")),
                       [str(where.parent / d) for d in data.get("dictionaries", [])])
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
            for line in (where.parent / kv["servers"]).read_text().splitlines():
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
    cfg = RadiusConfig(servers, float(kv.get("radius_timeout", 3)), int(kv.get("radius_retries", 2)),
                       kv.get("bindaddr", "").replace("*", ""), kv.get("nas-ip", ""), kv.get("nas-identifier", ""))
    return _check(cfg, where)


def _check(cfg: RadiusConfig, where: Path) -> RadiusConfig:
    if not cfg.servers:
        raise RadiusConfigError(f"{where}: no accounting server (acctserver / servers:)")
    for host, _port, secret in cfg.servers:
        if not secret:
            raise RadiusConfigError(f"{where}: no shared secret for {host} (or set SIPSNIFF_RADIUS_SECRET)")
    return cfg


def dictionary(extra: list[str]) -> Dictionary:
    base = resources.files("sipsniff_acc") / "data" / "dictionary.sipsniff"
    with resources.as_file(base) as path:
        return Dictionary(str(path), *extra)


def status_type(r: AccRecord, openser: bool) -> int:
    """acc_radius rad_status() (5.6), or OpenSER 1.2's."""
    code = int(r.code) if r.code.isdigit() else 0
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
    name = "radius"

    def __init__(self, rules: RulesFile, config: RadiusConfig | None = None) -> None:
        self.rules = rules
        self.cfg = config or load_config(rules.acc.radius_config)
        self.dict = dictionary(self.cfg.dictionaries)
        self.openser = rules.profile == "openser-1.2"
        self.service_type = rules.acc.service_type if rules.acc.service_type is not None else SIP_SESSION
        for name, _spec in rules.acc.extras("radius") + rules.acc.legs:
            if name not in self.dict.attributes:
                raise RadiusConfigError(f"radius_extra/multi_leg_info: {name!r} is not in the RADIUS dictionary")
        self.where = ", ".join(f"{h}:{p}" for h, p, _s in self.cfg.servers)
        self.current = 0  #: index of the server that answered last (failover sticks)
        self.sent = 0
        self.retransmissions = 0
        self.skipped_values = 0
        self.sock: socket.socket | None = None

    def wants(self, r: AccRecord) -> bool:
        return "radius" in r.backends

    def packet(self, r: AccRecord, secret: str) -> AcctPacket:
        pkt = AcctPacket(code=AccountingRequest, secret=secret.encode(), dict=self.dict)
        code = int(r.code) if r.code.isdigit() else 0
        pkt.AddAttribute("Acct-Status-Type", status_type(r, self.openser))
        pkt.AddAttribute("Service-Type", self.service_type)
        pkt.AddAttribute("Sip-Response-Code", code)
        pkt.AddAttribute("Sip-Method", METHOD_BITS.get(r.method.upper(), METHOD_OTHER))
        pkt.AddAttribute("Event-Timestamp", int(r.ts))
        if r.from_tag:
            pkt.AddAttribute("Sip-From-Tag", r.from_tag)
        to_tag = r.to_tag
        if r.local and not r.in_dialog:  # the engines see the request's To: no tag (Kamailio capture)
            to_tag = None
        if to_tag:
            pkt.AddAttribute("Sip-To-Tag", to_tag)
        if r.call_id:
            pkt.AddAttribute("Acct-Session-Id", r.call_id)
        for name, value in r.extras.get("radius", []) + [p for leg in r.legs for p in leg]:
            self._add(pkt, name, value)
        pkt.AddAttribute("NAS-Port", SIP_PORT)
        delay = int(max(0.0, time.time() - r.queued_at)) if r.queued_at else 0
        pkt.AddAttribute("Acct-Delay-Time", delay)
        pkt.AddAttribute("NAS-IP-Address", self.cfg.nas_ip or self.cfg.bind or "127.0.0.1")
        if self.cfg.nas_identifier:
            pkt.AddAttribute("NAS-Identifier", self.cfg.nas_identifier)
        return pkt

    def _add(self, pkt: AcctPacket, name: str, value: str | None) -> None:
        if value is None or value == "":
            return  # a null value is omitted, as acc_radius does
        kind = self.dict.attributes[name].type
        if kind in ("integer", "date"):
            if not value.isdigit():
                self.skipped_values += 1
                return
            pkt.AddAttribute(name, int(value))
        else:
            pkt.AddAttribute(name, value)

    def deliver(self, records: list[AccRecord]) -> None:
        deliver_each(records, self.wants, self._send)

    def _socket(self) -> socket.socket:
        if self.sock is None:
            family = socket.AF_INET6 if ":" in (self.cfg.bind or self.cfg.servers[0][0]) else socket.AF_INET
            s = socket.socket(family, socket.SOCK_DGRAM)
            if self.cfg.bind:
                s.bind((self.cfg.bind, 0))
            self.sock = s
        return self.sock

    def _send(self, r: AccRecord) -> None:
        n = len(self.cfg.servers)
        errors = []
        for k in range(n):
            host, port, secret = self.cfg.servers[(self.current + k) % n]
            pkt = self.packet(r, secret)
            pkt.id = pkt.CreateID()
            raw = pkt.RequestPacket()
            sock = self._socket()
            for attempt in range(self.cfg.retries + 1):
                if attempt:
                    self.retransmissions += 1
                try:
                    sock.sendto(raw, (host, port))
                except OSError as e:
                    errors.append(f"{host}:{port}: {e.strerror}")
                    break
                if self._await_reply(sock, pkt, raw):
                    self.current = (self.current + k) % n
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
        if self.sock is not None:
            self.sock.close()
            self.sock = None

