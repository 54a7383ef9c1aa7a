"""Readers for the recorded Kamailio cases (shared by the conformance tests)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def kamailio_records(folder: Path) -> list[tuple[str, dict[str, object]]]:
    """(table, row) for every acc and missed_calls row, in the order Kamailio wrote them."""
    rows = [("acc", r) for r in json.loads((folder / "acc.json").read_text())]
    rows += [("missed_calls", r) for r in json.loads((folder / "missed_calls.json").read_text())]
    return sorted(rows, key=lambda tr: float(tr[1]["time"]))  # type: ignore[arg-type]


def shape(rows: list[tuple[str, dict[str, object]]]) -> list[tuple[object, ...]]:
    """What must not change between recordings: table, method, code, reason (tags and ids do)."""
    return sorted((t, r["method"], r["sip_code"], r["sip_reason"]) for t, r in rows)


def our_messages_of(pcap: Path) -> list[dict[str, object]]:
    res = subprocess.run([sys.executable, "-m", "sipsniff_acc", "messages", "-q", str(pcap)],
                         capture_output=True, text=True, timeout=120, check=True)
    return [json.loads(line) for line in res.stdout.splitlines()]


def rules_for(case: str, proxy_addresses: bool = True) -> str:
    """The rules.yaml equivalent of kamailio.cfg.in filled in for one case."""
    from tests.conformance.record_kamailio import CASES, PROXY

    c = CASES[case]
    params = {"log_flag": 1, "log_missed_flag": 2, "db_flag": 1, "db_missed_flag": 2, "failed_transaction_flag": 3,
              "log_level": 1}
    params.update(dict(c.modparams))
    for key, value in (("log_extra", c.extras), ("db_extra", c.extras), ("multi_leg_info", c.legs)):
        if value:
            params[key] = value
    acc = "".join(f"  {k}: {json.dumps(v)}\n" for k, v in params.items())
    methods = json.dumps(c.flag_methods.split("|"))
    addresses = f'["{PROXY}:5060"]' if proxy_addresses else "[]"
    return (
        f"profile: kamailio-5.6\nproxy:\n  addresses: {addresses}\ntm:\n  fr_inv_timer: {c.fr_inv_timer / 1000}\n"
        f"acc:\n{acc}"
        "route:\n"
        "  - if: {in_dialog: true, method: BYE}\n    setflag: [1, 3]\n"
        + (f"  - if: {{in_dialog: true, method: INVITE}}\n    setflag: {json.dumps(list(c.reinvite_flags))}\n"
           if c.reinvite_flags else "")
        + "  - if: {in_dialog: true}\n    stop: true\n"
        f"  - if: {{method: {methods}}}\n    setflag: {json.dumps(list(c.invite_flags))}\n"
        + "".join(f"  - if: {{method: {methods}}}\n    set_avp: {{{k}: {json.dumps(v)}}}\n" for k, v in c.avps)
    )
