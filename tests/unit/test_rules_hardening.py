"""rules.yaml can't stall the pipeline or crash the checker (issue 10, rules slice).

Each measured case of the issue is reproduced: a backtracking regex against a crafted R-URI,
billion-laughs aliases, deep nesting, a Latin-1 file; plus the other ways a file could give a
traceback instead of one ``FILE:LINE: why`` line, and the ``limits:`` section.
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from sipsniff_acc.limits import Limits
from sipsniff_acc.rules import MAX_YAML_DEPTH, RulesError, UserRegex, compile_rule, load_rules, parse_rules
from tests.flows import PROXY, UAC, C, Call

ROOT = Path(__file__).resolve().parents[2]


def problems(text: str) -> list[str]:
    with pytest.raises(RulesError) as e:
        parse_rules(text, "r.yaml")
    return e.value.problems


def one_problem(text: str) -> str:
    p = problems(text)
    assert len(p) == 1 and "\n" not in p[0], p
    return p[0]


# --- regexes: RE2, linear time ---------------------------------------------------------------

def test_catastrophic_regex_against_crafted_ruri_is_linear() -> None:
    """`^sip:(a+)+$` and sip:aaaa...a! : Python's re doubles its time every two characters.

    Run in a subprocess bounded by a timeout, so the old engine fails the test instead of hanging it.
    """
    code = textwrap.dedent("""
        import time
        from sipsniff_acc.rules import compile_rule, parse_rules
        from tests.flows import PROXY, UAC, C, Call
        rules = parse_rules("route:\\n  - if: {ruri: '^sip:(a+)+$'}\\n    setflag: [1]\\n")
        rule = compile_rule(rules.route[0])
        t0 = time.perf_counter()
        for n in (30, 40, 1000, 4000):
            msg = Call(ruri="sip:" + "a" * n + "!").request("INVITE", 1.0, UAC, PROXY, [C])
            assert not rule.matches(msg, 0, 0)
        ok = Call(ruri="sip:" + "a" * 40).request("INVITE", 1.0, UAC, PROXY, [C])
        assert rule.matches(ok, 0, 0)
        print(time.perf_counter() - t0)
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    assert float(res.stdout) < 2.0  # RE2: microseconds per R-URI; re: hours for the 40-character one


@pytest.mark.parametrize("pattern", [
    r"^sip:\+40", r"^sip:bob@", r"@example\.com$", r"(?i)^SIP:ALICE", r"^sips?:[a-z0-9._-]+@",
    r"user=phone", r"^sip:\+?[0-9]{6,15}@", r"^sip:(00|\+)40[0-9]+", r"\.invalid(:[0-9]+)?$",
    r"^[^@]*@10\.0\.0\.[0-9]+", r"^(sip|tel):", r"transport=(tcp|tls)", r"^sip:bob@example\.com\Z",
    r"\bbob\b", r"phone/1\.[0-9]", r"^sip:[^;]*;user=phone$", r".*", r"", r"a|", r"(?s)x.y",
])
def test_re2_matches_as_python_re(pattern: str) -> None:
    """Patterns of the README and tests (and common ones) match the same texts under RE2 as under re."""
    texts = ["sip:+40721234567@10.0.0.10:5060;user=phone", "sip:bob@example.com", "SIP:alice@EXAMPLE.COM",
             "sip:004072@gw.invalid:5070", "tel:+40721", "sips:carol@x.example;transport=tls", "phone/1.0",
             "sip:bob@example.com;user=phone", "", "x\ny", "sip:b\u00f6b@example.com", "sip:bobby@example.com"]
    ours, python = UserRegex(pattern), re.compile(pattern)
    assert [ours.search(t) for t in texts] == [python.search(t) is not None for t in texts]


@pytest.mark.parametrize(("pattern", "why"), [
    (r"^sip:(\w+)@\1", "backreferences"),
    (r"(?P<u>a)(?P=u)", "backreferences"),
    (r"^sip:(?!bob)", "lookahead/lookbehind"),
    (r"(?<=@)example", "lookahead/lookbehind"),
    (r"x{2000}", "repetitions up to 1000"),
    (r"(", "missing )"),
])
def test_pattern_re2_refuses_is_named_with_its_line(pattern: str, why: str) -> None:
    text = f"route:\n  - if: {{method: INVITE}}\n    setflag: [1]\n  - if: {{ruri: '{pattern}'}}\n    setflag: [2]\n"
    p = one_problem(text)
    assert p.startswith("r.yaml:4: route.1.if.ruri: bad regular expression ") and why in p, p


def test_header_from_to_regexes_are_re2_too() -> None:
    p = problems("route:\n  - if: {from: '(a)\\1'}\n    setflag: 1\n"
                 "  - if: {to: '(?=x)'}\n    setflag: 1\n"
                 "  - if: {header: {X-Id: '(?<!a)b'}}\n    setflag: 1\n")
    assert [x.split(": bad")[0] for x in p] == ["r.yaml:2: route.0.if.from", "r.yaml:4: route.1.if.to",
                                                "r.yaml:6: route.2.if.header: header X-Id"], p


def test_rules_with_regexes_still_decide() -> None:
    rules = parse_rules("route:\n  - if: {ruri: '^sip:\\+40', header: {User-Agent: '(?i)^PHONE/'}}\n    setflag: [1]\n")
    rule = compile_rule(rules.route[0])
    hit = Call(ruri="sip:+40721@gw", headers="User-Agent: phone/1.0\n").request("INVITE", 1.0, UAC, PROXY, [C])
    miss_ua = Call(ruri="sip:+40721@gw").request("INVITE", 1.0, UAC, PROXY, [C])
    miss_ruri = Call(ruri="sip:+41721@gw", headers="User-Agent: phone/1.0\n").request("INVITE", 1.0, UAC, PROXY, [C])
    assert (rule.matches(hit, 0, 0), rule.matches(miss_ua, 0, 0), rule.matches(miss_ruri, 0, 0)) == (True, False, False)


# --- YAML: bounded loading --------------------------------------------------------------------

def test_alias_expansion_under_the_bound_still_works() -> None:
    rules = parse_rules("route:\n  - if: &inv {method: INVITE, in_dialog: false}\n    setflag: [1]\n"
                        "  - if: *inv\n    setflag: [2]\n")
    assert [r.if_.method for r in rules.route] == ["INVITE", "INVITE"]


def test_alias_bomb_is_refused_before_it_is_built() -> None:
    """4^9 = 262k values from 300 bytes: refused at the alias that passes the bound (the old loader walked them all).

    The 570-byte billion laughs itself (9^9) runs in tests/cli/test_check_rules_hardening.py, in a subprocess
    under a 512 MB address-space limit: in-process, the old loader took this test process past 18 GB.
    """
    text = "".join([f"a0: &a0 [x, x, x, x]\n"] + [f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}]\n"
                                                 for i in range(1, 9)])
    assert len(text) < 300
    assert re.fullmatch(r"r\.yaml:[5-9]: more than 100000 values \(an alias counts as all it stands for\)",
                        one_problem(text)), one_problem(text)


@pytest.mark.parametrize("text", [
    "acc: " + "[" * 10000 + "]" * 10000 + "\n",  # flow style: deeper than libyaml (and Python's stack) takes
    "route:\n" + "".join(" " * (2 * i) + "- \n" for i in range(1, 60)) + " " * 120 + "- 1\n",  # block style
    "a: &a " + "[" * 30 + "]" * 30 + "\nb: " + "[" * 30 + "*a" + "]" * 30 + "\n",  # two halves joined by an alias
])
def test_deep_nesting_is_one_line(text: str) -> None:
    p = one_problem(text)
    assert f"nested deeper than {MAX_YAML_DEPTH} levels" in p or "exceeded maximum nesting depth" in p, p


def test_alias_inside_its_own_anchor_is_refused() -> None:
    """A cycle: PyYAML builds a recursive list, and anything walking it recursed until RecursionError."""
    assert one_problem("route: &r [*r]\n") == "r.yaml:1: alias *r is inside its own anchor (a cycle)"
    assert "a cycle" in one_problem("acc: &a {log_extra: [x, *a]}\n")


def test_latin1_file_names_the_byte(tmp_path: Path) -> None:
    f = tmp_path / "rules.yaml"
    f.write_bytes("acc:\n  log_flag: 1\n  log_extra: \"caf\u00e9=$fU\"\n".encode("latin-1"))
    with pytest.raises(RulesError) as e:
        load_rules(f)
    assert e.value.problems == [f"{f}:3: byte 0xE9 at offset 36 is not UTF-8: the file must be UTF-8 "
                                "(iconv -f latin1 -t utf-8 converts a Latin-1 file)"]


def test_utf8_with_bom_loads(tmp_path: Path) -> None:
    f = tmp_path / "rules.yaml"
    f.write_bytes(b"\xef\xbb\xbfacc:\n  log_flag: 1\n")
    assert load_rules(f).acc.log_flag == 1


def test_a_capture_given_as_rules_says_so(tmp_path: Path) -> None:
    f = tmp_path / "x.yaml"
    f.write_bytes((ROOT / "tests" / "pcaps" / "sample.pcap").read_bytes())
    with pytest.raises(RulesError) as e:
        load_rules(f)
    assert e.value.problems == [f"{f}:1: this is a pcap capture, not a rules file (YAML)"]


def test_file_over_1_mib_is_refused_without_reading_it_all(tmp_path: Path) -> None:
    f = tmp_path / "rules.yaml"
    f.write_text("acc:\n  log_flag: 1\n" + "# padding\n" * 200_000)
    with pytest.raises(RulesError) as e:
        load_rules(f)
    assert len(e.value.problems) == 1 and "past 1 MiB" in e.value.problems[0]


@pytest.mark.parametrize(("text", "expected"), [
    ("", "r.yaml:1: the file is empty"),
    ("# only a comment\n", "r.yaml:1: the file is empty"),
    ("- 1\n", "r.yaml:1: the file must be a mapping"),
    ("just text\n", "r.yaml:1: the file must be a mapping"),
    ("acc:\n  log_flag: " + "1" * 5000 + "\n", "r.yaml:2: not valid YAML: cannot read this value: Exceeds the limit"),
    ("acc:\n  log_flag: 2001-13-45\n", "r.yaml:2: not valid YAML: cannot read this value: month must be in 1..12"),
    ("acc:\n  log_flag: !!timestamp x\n", "r.yaml:2: not valid YAML: cannot read this value: "),
    ("acc:\n  log_extra: \x1b[31m\n", "r.yaml:2: not valid YAML: character '\\x1b' is not allowed"),
    ("? [a]\n: 1\n", "r.yaml:1: not valid YAML: found unhashable key"),
    ("a: 1\n---\nb: 2\n", "r.yaml:2: not valid YAML: but found another document"),
    ("acc: *nowhere\n", "r.yaml:1: not valid YAML: found undefined alias"),
    ("acc: \ud800\n", "r.yaml:1: not valid text"),
])
def test_every_other_malformed_file_is_one_line(text: str, expected: str) -> None:
    assert one_problem(text).startswith(expected)


# --- limits: and acc.on_overlong ---------------------------------------------------------------

def test_limits_section_sets_limits() -> None:
    assert parse_rules("acc: {log_flag: 1}\n").limits == Limits()
    first, second = Limits.names()[0], Limits.names()[-1]
    low = 7 if second != "max_sip_message" else 4096  # a message bound has a floor of 1 KiB
    rules = parse_rules(f"limits:\n  {first}: 1234\n  {second}: {low}\n")
    assert getattr(rules.limits, first) == 1234 and getattr(rules.limits, second) == low
    assert all(getattr(rules.limits, n) == getattr(Limits(), n) for n in Limits.names()[1:-1])


def test_every_limit_is_accepted_by_its_type() -> None:
    """Checked against the dataclass as it is (names and types), not a copy of it."""
    kinds = {n: type(getattr(Limits(), n)) for n in Limits.names()}
    small = {n: 3 if n != "max_sip_message" else 2048 for n in kinds}  # a message bound has a floor of 1 KiB
    text = "limits:\n" + "".join(f"  {n}: {'2.5' if k is float else 'true' if k is bool else small[n]}\n"
                                 for n, k in kinds.items())
    rules = parse_rules(text)
    for n, k in kinds.items():
        assert getattr(rules.limits, n) == (2.5 if k is float else True if k is bool else small[n])


def test_bad_limits_say_which_and_where() -> None:
    ints = [n for n in Limits.names() if type(getattr(Limits(), n)) is int]
    floats = [n for n in Limits.names() if type(getattr(Limits(), n)) is float]
    text = "route: []\nlimits:\n  max_nonsense: 3\n"
    text += "".join(f"  {n}: {v}\n" for n, v in zip(ints, ["-1", "0", "1.5", "yes", "lots"]))
    text += "".join(f"  {n}: {v}\n" for n, v in zip(floats, ["-0.5", ".inf", "'10'"]))
    p = problems(text)
    assert p[0] == f"r.yaml:3: limits.max_nonsense: unknown limit (known: {', '.join(Limits.names())})"
    assert len(p) == 1 + min(len(ints), 5) + min(len(floats), 3), p
    for i, line in enumerate(p[1:], start=4):
        assert line.startswith(f"r.yaml:{i}: limits.") and ": a positive " in line, line
    assert one_problem("limits: 5\n").startswith("r.yaml:1: limits: a mapping")


def test_on_overlong_is_validated() -> None:
    assert parse_rules("acc: {log_flag: 1}\n").acc.on_overlong == "truncate"
    assert parse_rules("acc: {on_overlong: dead-letter}\n").acc.on_overlong == "dead-letter"
    assert one_problem("acc:\n  on_overlong: drop\n").startswith("r.yaml:2: acc.on_overlong: Input should be")


def test_bundled_rules_yaml_loads_and_its_limits_example_too() -> None:
    """The sample's commented-out limits: block stays valid (names and values) when uncommented."""
    rules = load_rules(ROOT / "rules.yaml")
    assert rules.limits == Limits() and rules.acc.on_overlong == "truncate"
    head, sep, example = (ROOT / "rules.yaml").read_text().partition("\n#limits:\n")
    assert sep and example.startswith("#  max_transactions:")
    uncommented = head + "\nlimits:\n" + "".join(line[1:] + "\n" for line in example.splitlines())
    limits = parse_rules(uncommented, "rules.yaml").limits
    assert limits.max_transactions == 50_000


CONDITIONS = [
    "{method: INVITE}", "{method: [bye, Invite], in_dialog: true}", "{in_dialog: false, ruri: '^sip:\\+40'}",
    "{from: '@example\\.com', to: '^<sip:bob'}", "{to: 'nobody'}", "{src: '10.0.0.0/24', dst: '10.0.0.10:5060'}",
    "{src: '10.0.0.1:5061'}", "{dst: '::1'}", "{src_port: 5060, dst_port: 5060}", "{dst_port: 5080}",
    "{transport: [udp, TCP]}", "{transport: TLS}", "{header: {User-Agent: '(?i)^PHONE/', X-A: true}}",
    "{header: {X-A: false}}", "{header: {X-Missing: false, x-a: 'b'}}", "{code: [486, 4xx]}", "{code: 5xx}",
    "{flag: [1, 3]}", "{flag: 2}", "{ruri: '^sip:(a+)+$'}",
]


@pytest.mark.parametrize("cond", CONDITIONS)
def test_compiled_condition_decides_as_matches(cond: str) -> None:
    """compile_rule's closure (the per-transaction path) gives the same answer as Condition.matches."""
    rule = parse_rules(f"failure_route:\n  - if: {cond}\n    setflag: [1]\n").failure_route[0]
    compiled = compile_rule(rule).matches
    msgs = [Call(ruri=u, headers=h).request(m, 1.0, UAC, PROXY, [C], to_tag=t)
            for u in ("sip:+40721@gw", "sip:" + "a" * 30, "sip:bob@example.com")
            for h in ("", "User-Agent: phone/1.0\nX-A: a\nX-A: b\n")
            for m, t in (("INVITE", None), ("BYE", "tt"))]
    other = Call().request("INVITE", 1.0, "10.0.0.1", PROXY, [C])
    other.sport, other.transport = 5061, "TCP"
    msgs.append(other)
    for msg in msgs:
        for flags in (0, 0b1010, 0b0100):
            for code in (0, 404, 486, 503):
                assert compiled(msg, flags, code) == rule.if_.matches(msg, flags, code), (cond, msg.ruri, flags, code)


def test_set_avp_value_is_bounded() -> None:
    """A value's pseudo-variable scan is quadratic in its length: 80 KB of '$fU(' took 1.6 s, per transaction."""
    ok = parse_rules("route:\n  - set_avp: {x: \"" + "$fU(" * 256 + "\"}\n")
    assert len(ok.route[0].set_avp["x"]) == 1024
    p = one_problem("route:\n  - set_avp: {x: \"" + "$fU(" * 20000 + "\"}\n")
    assert p == "r.yaml:2: route.0.set_avp: set_avp x: at most 1024 characters, not 80000"


def test_rules_pickle_and_dump_with_regexes_and_limits() -> None:
    """A RulesFile crosses a process boundary (pickle) and serialises (model_dump) as before RE2 and limits:."""
    import pickle
    rules = parse_rules("limits: {max_dialogs: 7}\nroute:\n  - if: {ruri: '^sip:x'}\n    setflag: 1\n")
    again = pickle.loads(pickle.dumps(rules))
    msg = Call(ruri="sip:x@y").request("INVITE", 1.0, UAC, PROXY, [C])
    assert compile_rule(again.route[0]).matches(msg, 0, 0) and again.limits.max_dialogs == 7
    assert rules.model_dump()["limits"]["max_dialogs"] == 7


def test_mutated_rules_files_give_rules_or_one_line_errors() -> None:
    """Seeded byte mutations of the README's rules (flips, inserts of YAML syntax, cuts): a RulesFile or a
    RulesError of one-line problems, never another exception."""
    import random

    from sipsniff_acc.rules import decode_rules
    readme = (ROOT / "README.md").read_text()
    base = readme.split("### rules.yaml", 1)[1].split("```yaml\n", 1)[1].split("```", 1)[0].encode()
    tokens = [b"&a ", b"*a", b"[", b"]", b"{", b"}", b": ", b"- ", b"\n  ", b"\t", b"'", b'"', b"\\", b"!!int ",
              b"<<: *a", b"\xe9", b"\x00", b"? ", b"---\n", b"9" * 50, b"(a)\\1", b"%TAG ! x\n", b"|\n", b"$"]
    rnd = random.Random(10)
    outcomes = {"ok": 0, "error": 0}
    for _ in range(600):
        data = bytearray(base)
        for _ in range(rnd.randint(1, 4)):
            pos = rnd.randrange(len(data) + 1)
            op = rnd.random()
            if op < 0.4:
                data[pos:pos] = rnd.choice(tokens)
            elif op < 0.7 and pos < len(data):
                data[pos] = rnd.randrange(256)
            else:
                del data[pos : pos + rnd.randint(1, 20)]
        try:
            parse_rules(decode_rules(bytes(data), "r.yaml"), "r.yaml")
            outcomes["ok"] += 1
        except RulesError as e:
            assert e.problems and all(p.startswith("r.yaml") and "\n" not in p for p in e.problems), e.problems
            outcomes["error"] += 1
    assert outcomes["ok"] > 10 and outcomes["error"] > 300, outcomes


def test_text_multiplied_by_aliases_is_bounded() -> None:
    """Few values but long ones: 200 KB of text named once and aliased 30 times is 6 MB to validate."""
    text = "s: &s '" + "x" * 200_000 + "'\nroute: [" + ", ".join(["*s"] * 30) + "]\n"
    assert one_problem(text) == "r.yaml:2: more than 4 MiB of text (an alias counts as all it stands for)"
