"""Pseudo-variables (acc-spec §8) and rules.yaml validation (errors name file, line and key)."""

from __future__ import annotations

import pytest

from sipsniff_acc.pv import PvContext, PvError, evaluate, evaluate_legs, parse_extra, parse_pv
from sipsniff_acc.rules import RulesError, load_rules, parse_rules
from tests.conftest import ROOT
from tests.flows import PROXY, UAC, C, Call


def _msg():  # type: ignore[no-untyped-def]
    c = Call(headers="User-Agent: phone/1.0\nX-A: a\nX-A: b, c\n"
             "Proxy-Authorization: Digest username=\"alice@corp.example\", realm=\"example.com\", nonce=\"n\"\n")
    return c.request("INVITE", 1000.5, UAC, PROXY, [C], ruri="sip:bob@example.com:5070;user=phone")


def value(spec: str, **kw: object) -> str | None:
    return evaluate(parse_pv(spec), PvContext(_msg(), **kw))  # type: ignore[arg-type]


@pytest.mark.parametrize(("spec", "expected"), [
    ("$fu", "sip:alice@example.com"), ("$fU", "alice"), ("$fd", "example.com"), ("$fn", '"Alice"'),
    ("$ft", "alice-tag"), ("$tu", "sip:bob@example.com"), ("$tU", "bob"), ("$tt", None), ("$tn", None),
    ("$ru", "sip:bob@example.com:5070;user=phone"), ("$rU", "bob"), ("$rd", "example.com"), ("$rp", "5070"),
    ("$ou", "sip:bob@example.com:5070;user=phone"), ("$ci", "call-1"), ("$cs", "1"), ("$rm", "INVITE"),
    ("$rs", None), ("$rr", None), ("$si", UAC), ("$sp", "5060"), ("$Ri", PROXY), ("$Rp", "5060"), ("$pr", "udp"),
    ("$ua", "phone/1.0"), ("$au", "alice"), ("$ad", "corp.example"),
    ("$hdr(User-Agent)", "phone/1.0"), ("$hdr(x-a)", "a"), ("$(hdr(X-A)[-1])", "b, c"), ("$(hdr(X-A)[*])", "a,b, c"),
    ("$(hdr(X-A)[5])", None), ("$hdr(X-None)", None), ("$hdr(v)", "SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bK-uac1"),
])
def test_pseudo_variables(spec: str, expected: str | None) -> None:
    assert value(spec) == expected


def test_branch_uri_avps_and_times() -> None:
    assert value("$ru", new_uri="sip:carol@10.0.0.3") == "sip:carol@10.0.0.3"
    assert value("$ou", new_uri="sip:carol@10.0.0.3") == "sip:bob@example.com:5070;user=phone"
    avps = {"x": ["second", "first"]}
    assert value("$avp(x)", avps=avps) == "second"
    assert value("$(avp(x)[*])", avps=avps) == "second, first"
    assert value("$Ts", now=1234.9) == "1234" and value("$TS", start=1000.2) == "1000"


def test_legs_are_lifo_sets_and_always_one() -> None:
    legs = parse_extra("leg_src=$avp(src);leg_dst=$avp(dst)")
    ctx = PvContext(_msg(), avps={"src": ["B", "A"], "dst": ["C", "B"]})
    assert evaluate_legs(legs, ctx) == [[("leg_src", "B"), ("leg_dst", "C")], [("leg_src", "A"), ("leg_dst", "B")]]
    assert evaluate_legs(legs, PvContext(_msg())) == [[("leg_src", None), ("leg_dst", None)]]


@pytest.mark.parametrize("bad", ["fU", "$nope", "$hdr", "$ci(x)", "$(hdr(a)[x])"])
def test_bad_pseudo_variables(bad: str) -> None:
    with pytest.raises(PvError):
        parse_pv(bad)


def problems(text: str) -> list[str]:
    with pytest.raises(RulesError) as e:
        parse_rules(text, "r.yaml")
    return e.value.problems


def test_errors_name_file_line_and_key() -> None:
    text = "profile: kamailio-5.6\nacc:\n  log_flag: 40\n  log_extra: \"ua=$nope\"\nroute:\n  - if: {method: INVITE, ruri: '('}\n    setflag: [1]\n"
    p = problems(text)
    assert any(x.startswith("r.yaml:3: acc.log_flag:") and "31" in x for x in p)
    assert any(x.startswith("r.yaml:4: acc.log_extra:") and "$nope" in x for x in p)
    assert any(x.startswith("r.yaml:6: route.0.if.ruri:") and "regular expression" in x for x in p)


@pytest.mark.parametrize(("text", "where"), [
    ("acc:\n  log_flg: 1\n", "r.yaml:2: acc.log_flg: Extra inputs are not permitted"),
    ("profile: opensips\n", "r.yaml:1: profile:"),
    ("acc:\n  multi_leg_info: \"a=$fU\"\n", "r.yaml:2: acc.multi_leg_info: "),
    ("proxy:\n  addresses: [\"10.0.0.300:5060\"]\n", "r.yaml:2: proxy.addresses:"),
    ("route:\n  - if: {code: 486}\n    setflag: 1\n", "r.yaml:2: route.0.if.code:"),
    ("acc:\n  db_table_acc: \"acc; drop table x\"\n", "r.yaml:2: acc.db_table_acc:"),
    ("acc:\n  diameter_extra: \"ua=$ua\"\n", "r.yaml:2: acc.diameter_extra:"),
    ("acc: [1, 2\n", "r.yaml:2: not valid YAML"),
    ("- 1\n", "r.yaml:1: the file must be a mapping"),
    ("failure_route:\n  - if: {code: 4xx}\n    drop: true\n", "r.yaml:3: failure_route.0.drop:"),
])
def test_each_kind_of_mistake_is_located(text: str, where: str) -> None:
    assert any(p.startswith(where) for p in problems(text)), problems(text)


def test_defaults_and_repo_rules_file_load() -> None:
    d = load_rules(None)
    assert d.acc.log_flag == 1 and d.route[0].flags_set == [1, 2]
    repo = load_rules(ROOT / "rules.yaml")
    assert repo.profile == "kamailio-5.6"
    with pytest.raises(RulesError, match="cannot read"):
        load_rules("/nonexistent/rules.yaml")
