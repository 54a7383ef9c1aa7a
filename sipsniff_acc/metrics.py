"""``--metrics HOST:PORT``: a Prometheus endpoint (prometheus-client's HTTP server, one thread).

Why a custom collector rather than prometheus-client's Counter objects: those are updated
by the code that counts, which would put a lock and a call on the per-packet path. The run
already keeps plain counters (``Counters``, ``RunResult``, the spooled outputs, the capture's
``stats()``); the collector reads them when Prometheus scrapes, so a run without scrapes
pays nothing and a scrape costs microseconds. Reads from the server thread are of ints and
of dicts copied in one C call under the GIL: a scrape may be a packet behind, never torn.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector

from sipsniff_acc import __version__
from sipsniff_acc.events import Counters
from sipsniff_acc.sipmethods import METHODS as _METHODS

PREFIX = "sipsniff"


#: The SIP methods (IANA registry) a label may name; any other is "other" (sipmethods.py:
#: a hostile peer could otherwise mint a new time series with every request it sends).
METHODS = _METHODS


def method_label(method: object) -> str:
    """The label value for a SIP method: itself if registered, else 'other' (bounded)."""
    m = str(method)
    return m if m in METHODS else "other"


def by_method(counts: Mapping[Any, float]) -> list[tuple[list[str], float]]:
    """Samples of a by-method counter with made-up methods summed under 'other'."""
    out: dict[str, float] = {}
    for k, n in counts.items():
        lbl = method_label(k)
        out[lbl] = out.get(lbl, 0) + n
    return [([k], n) for k, n in sorted(out.items())]


class MetricsAddressError(ValueError):
    """--metrics names no address we can listen on: one line, exit 2, before the capture."""


def parse_address(text: str) -> tuple[str, int]:
    """'HOST:PORT' or '[v6]:PORT' (port 1-65535), the host resolved to one address to bind."""
    form = "use HOST:PORT, e.g. 127.0.0.1:9466 or [::1]:9466"
    host, sep, port_text = text.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise MetricsAddressError(f"--metrics {text!r}: {form}")
    port = int(port_text)
    if not 0 < port < 65536:
        raise MetricsAddressError(f"--metrics {text!r}: the port must be 1 to 65535")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (OSError, UnicodeError) as e:
        raise MetricsAddressError(f"--metrics {text!r}: cannot resolve {host!r} ({getattr(e, 'strerror', None) or e})") from None
    return str(info[0][4][0]), port


@dataclass
class RunView:
    """What the collector reads at scrape time: the run's own objects, filled in place."""

    counters: Counters
    result: Any = None  #: processrun.RunResult (records, by_backend, tracker; ``gauges()`` if the run offers it)
    spooled: list[Any] = field(default_factory=list)  #: SpooledEmitter: delivered, pending, dead letters, up/down
    sources: list[Any] = field(default_factory=list)  #: frame sources; a live one has ``stats()``
    control: Any = None  #: service.ServiceControl: rule reloads
    gaps: Any = None  #: service.GapWatch: capture gaps and drops seen in the frame stream
    logs: list[Any] = field(default_factory=list)  #: LogEmitter: syslog lines that could not be sent
    started: float = field(default_factory=time.time)


def _copy(d: Mapping[Any, Any] | None) -> dict[Any, Any]:
    """A dict copied while the main thread may add keys: a C-level copy, retried if it raced."""
    for _ in range(3):
        try:
            return dict(d or {})
        except RuntimeError:
            continue
    return {}


def _kinds(by_kind: Mapping[Any, float]) -> list[tuple[list[str], float]]:
    """Method or status-class samples ("2xx"), made-up methods under 'other'."""
    out: dict[str, float] = {}
    for k, n in by_kind.items():
        s = str(k)
        lbl = s if len(s) == 3 and s[0] in "123456" and s[1:] == "xx" else method_label(s)
        out[lbl] = out.get(lbl, 0) + n
    return [([k], n) for k, n in sorted(out.items())]


def _counter(name: str, doc: str, value: float | None = None, labels: Iterable[str] = (),
             samples: Iterable[tuple[list[str], float]] = ()) -> CounterMetricFamily:
    m = CounterMetricFamily(f"{PREFIX}_{name}", doc, value=value, labels=list(labels) or None)
    for lv, v in samples:
        m.add_metric(lv, v)
    return m


def _gauge(name: str, doc: str, value: float | None = None, labels: Iterable[str] = (),
           samples: Iterable[tuple[list[str], float]] = ()) -> GaugeMetricFamily:
    m = GaugeMetricFamily(f"{PREFIX}_{name}", doc, value=value, labels=list(labels) or None)
    for lv, v in samples:
        m.add_metric(lv, v)
    return m


class RunCollector(Collector):
    """The run's counters as Prometheus metrics, read when scraped."""

    def __init__(self, view: RunView) -> None:
        self.view = view

    def collect(self) -> Iterator[Any]:
        v = self.view
        c = v.counters
        yield InfoMetricFamily(f"{PREFIX}_build", "sipsniff-acc version", value={"version": __version__})
        yield _gauge("start_time_seconds", "when the run started (Unix time)", v.started)
        yield _counter("packets", "frames read from the capture", c.frames)
        yield _counter("bytes", "bytes of the frames read", c.bytes)
        yield _counter("sip_messages", "SIP messages found", c.sip_messages)
        by_kind = _copy(getattr(c, "sip_by_kind", None))  # method / status class, when the run counts them
        if by_kind:
            yield _counter("sip_messages_by_kind", "SIP messages by request method or status class (2xx...)",
                           labels=["kind"], samples=_kinds(by_kind))
        yield _counter("keepalives", "SIP keep-alives (CRLF) seen", c.keepalives)
        yield _counter("duplicates", "mirrored duplicate frames dropped", c.duplicates)
        yield _counter("skipped", "non-SIP payloads skipped, by reason", labels=["reason"],
                       samples=(([k], n) for k, n in sorted(_copy(c.skipped).items())))
        yield _counter("anomalies", "malformed input and anomalies, by name", labels=["name"],
                       samples=(([k], n) for k, n in sorted(_copy(c.anomalies).items())))
        yield from self._capture()
        yield from self._records()
        yield from self._outputs()
        if v.control is not None:
            reloads = _copy(v.control.reloads)
            yield _counter("rule_reloads", "SIGHUP rules reloads, by result", labels=["result"],
                           samples=(([r], reloads.get(r, 0)) for r in ("ok", "refused")))

    def _capture(self) -> Iterator[Any]:
        v = self.view
        per_if: dict[str, dict[str, Any]] = {}
        for s in v.sources:
            stats = getattr(s, "stats", None)
            if callable(stats):
                per_if.update(_copy(stats()))
        if per_if:
            def each(key: str) -> list[tuple[list[str], float]]:
                return [([i], float(st.get(key, 0))) for i, st in sorted(per_if.items())]
            yield _counter("capture_kernel_packets", "packets the kernel passed to the capture (drops included)",
                           labels=["interface"], samples=each("packets"))
            yield _counter("capture_dropped", "packets lost before we read them, by interface and where",
                           labels=["interface", "where"],
                           samples=[([i, "kernel"], float(st.get("dropped", 0))) for i, st in sorted(per_if.items())])
            yield _counter("capture_truncated", "frames cut short by the kernel (larger than a ring frame): "
                           "their SIP may be incomplete", labels=["interface"], samples=each("truncated"))
            yield _counter("capture_freezes", "times the kernel froze the capture queue",
                           labels=["interface"], samples=each("freezes"))
            yield _gauge("capture_ring_bytes", "size of the capture ring", labels=["interface"], samples=each("ring_bytes"))
            yield _gauge("capture_promiscuous", "1 if the interface was put in promiscuous mode",
                         labels=["interface"], samples=each("promisc"))
        if v.gaps is not None:
            gaps = _copy(v.gaps.gaps)
            dropped = _copy(v.gaps.dropped)
            yield _counter("capture_gaps", "drop reports in the capture stream (records made then may be incomplete)",
                           labels=["interface"], samples=(([i], n) for i, n in sorted(gaps.items())))
            yield _counter("capture_gap_dropped", "packets reported lost in the capture stream, by where",
                           labels=["interface", "where"],
                           samples=(([i, w], n) for (i, w), n in sorted(dropped.items())))

    def _records(self) -> Iterator[Any]:
        r = self.view.result
        if r is None:
            return
        yield _counter("records", "acc records made, by kind", labels=["kind"],
                       samples=(([k], n) for k, n in sorted(_copy(r.records).items())))
        yield _counter("records_flagged", "acc records flagged for each backend by the rules", labels=["backend"],
                       samples=(([k], n) for k, n in sorted(_copy(r.by_backend).items())))
        marked = getattr(r, "capture_gaps", None)
        if marked is not None:
            yield _counter("records_capture_gaps", "records made while packets were being dropped (may be incomplete)",
                           marked)
        t = r.tracker
        yield _counter("transactions", "transactions created, by role", labels=["role"],
                       samples=(([k], n) for k, n in sorted(_copy(t.transactions).items())))
        yield _counter("transactions_timed_out", "server transactions given up without a final reply",
                       labels=["method"], samples=by_method(_copy(t.timed_out)))
        yield _counter("retransmissions", "SIP retransmissions absorbed", t.retransmissions)
        yield _counter("evicted_transactions", "transactions let go early to stay inside the limits",
                       t.evicted_transactions)
        gauges: Callable[[], Mapping[str, float]] | None = getattr(r, "gauges", None)
        if callable(gauges):  # open transactions, dialogs...: what the run's own state holds now
            for name, value in sorted(_copy(gauges()).items()):
                yield _gauge(name, f"{name.replace('_', ' ')} held now", value)

    def _outputs(self) -> Iterator[Any]:
        v = self.view
        rows: list[tuple[str, Any]] = [(sp.label, sp) for sp in v.spooled]
        if rows:
            yield _counter("delivered", "records delivered to the backend", labels=["backend"],
                           samples=(([b], sp.delivered) for b, sp in rows))
            yield _gauge("spool_pending", "records waiting in the spool (and its buffer) for the backend",
                         labels=["backend"], samples=(([b], sp.pending) for b, sp in rows))
            yield _counter("dead_letters", "records set aside as dead letters this run", labels=["backend"],
                           samples=(([b], sp.dead_lettered) for b, sp in rows))
            yield _gauge("backend_up", "1 while the backend takes records, 0 during an outage", labels=["backend"],
                         samples=(([b], 0.0 if sp.down_since is not None else 1.0) for b, sp in rows))
            yield _counter("backend_outages", "backend outages this run", labels=["backend"],
                           samples=(([b], sp.outages) for b, sp in rows))
            yield _counter("records_lost", "records neither spooled nor delivered (the spool's disk was full)",
                           labels=["backend"], samples=(([b], sp.lost) for b, sp in rows))
        if v.logs:
            yield _counter("syslog_send_failures", "ACC lines a syslog target refused",
                           sum(getattr(em, "send_failures", 0) for em in v.logs))


class MetricsServer:
    """The endpoint, listening from construction (so a bad address fails before the capture)
    until ``close()``."""

    def __init__(self, address: str, view: RunView) -> None:
        host, port = parse_address(address)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(RunCollector(view))
        try:
            self.server, self.thread = start_http_server(port, host, registry=self.registry)
        except OSError as e:
            raise MetricsAddressError(f"--metrics {address}: cannot listen: {e.strerror or e}") from None
        self.address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)
