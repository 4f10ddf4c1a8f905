"""Host side of the guest console protocol: command line, ready marker, self-test results."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from egpu.guest import protocol as p


def line(doc: Any) -> str:
    return f"{p.SELFTEST_MARKER} {json.dumps(doc)}\r\n"


GOOD = {"ok": True, "checks": [{"name": "pci", "ok": True, "detail": "2 devices"},
                               {"name": "cpus", "ok": True, "detail": "2 CPUs online"}]}


def test_kernel_cmdline_per_arch_and_mode() -> None:
    arm = p.kernel_cmdline("aarch64", selftest=True, cpus=2, memory_mib=512)
    args = arm.split()
    assert "console=ttyAMA0" in args and "panic=-1" in args
    assert "egpu.cpus=2" in args and "egpu.mem_mib=512" in args and "egpu.selftest=1" in args
    x86 = p.kernel_cmdline("x86_64", selftest=False, cpus=4, memory_mib=1024, extra=["foo=bar"])
    assert "console=ttyS0" in x86.split() and "egpu.selftest=1" not in x86
    assert x86.endswith(" foo=bar")


def test_kernel_cmdline_accepts_anything_with_an_arch() -> None:
    class Assets:
        arch = "x86_64"
    assert "console=ttyS0" in p.kernel_cmdline(Assets(), selftest=False, cpus=1, memory_mib=64)


@pytest.mark.parametrize("kw", [{"cpus": 0}, {"memory_mib": 0}, {"extra": ["a b"]},
                                {"extra": ["x\ny"]}, {"extra": ['q="1"']}, {"extra": [""]}])
def test_kernel_cmdline_rejects_bad_values(kw: dict[str, Any]) -> None:
    args: dict[str, Any] = {"selftest": False, "cpus": 1, "memory_mib": 64, **kw}
    with pytest.raises(ValueError):
        p.kernel_cmdline("aarch64", **args)


def test_unknown_arch() -> None:
    with pytest.raises(ValueError, match="riscv64"):
        p.kernel_cmdline("riscv64", selftest=False, cpus=1, memory_mib=64)


def test_find_ready() -> None:
    assert not p.find_ready("")
    assert not p.find_ready("booting...\r\n")
    assert p.find_ready(f"booting\r\n{p.READY_MARKER}\r\n/ # ")
    # terminal resets from firmware on the same line do not hide it
    assert p.find_ready(f"x\r\n\x1bc\x1b[?7l\x1b[2J{p.READY_MARKER}\r\n")
    # a shell echoing a command that mentions it is not the marker
    assert not p.find_ready(f"/ # echo {p.READY_MARKER}\r\n")


def test_parse_selftest_none_until_a_result() -> None:
    assert p.parse_selftest("") is None
    assert p.parse_selftest(f"{p.READY_MARKER}\nCHECK pci ok 1\n") is None


def test_parse_selftest_good_result() -> None:
    r = p.parse_selftest(f"noise\r\n{p.READY_MARKER}\r\n\r\n{line(GOOD)}\r\n[ 1.0] reboot\r\n")
    assert r is not None and r.ok and r.error is None
    assert [c.name for c in r.checks] == ["pci", "cpus"]
    assert r.as_dict() == GOOD


def test_parse_selftest_a_failed_check_fails_the_result() -> None:
    doc = {"ok": False, "checks": [{"name": "pci", "ok": True, "detail": ""},
                                   {"name": "memory", "ok": False, "detail": "256 MiB"}]}
    r = p.parse_selftest(line(doc))
    assert r is not None and not r.ok and r.error is None
    assert [c.name for c in r.checks if not c.ok] == ["memory"]


@pytest.mark.parametrize("payload, why", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "lacks"),
    ('{"ok": "yes", "checks": []}', "lacks"),
    ('{"ok": true}', "lacks"),
    ('{"ok": true, "checks": [1]}', "not an object"),
    ('{"ok": true, "checks": [{"name": "bad name", "ok": true}]}', "bad name"),
    ('{"ok": true, "checks": [{"name": "", "ok": true}]}', "bad name"),
    ('{"ok": true, "checks": [{"name": "x", "ok": 1}]}', "bad 'ok'"),
    ('{"ok": true, "checks": [{"name": "x", "ok": true, "detail": 5}]}', "bad 'ok'"),
    ('{"ok": true, "checks": [{"name": "x", "ok": false}]}', "disagrees"),
    ('{"ok": false, "checks": [{"name": "x", "ok": true}]}', "disagrees"),
    ('{"ok": true, "checks": []}', "disagrees"),
    ('{"ok": false, "checks": []}', "no checks"),
    ("[" * 100000, "longer than"),
    ("[" * 30000, "not valid JSON"),
])
def test_parse_selftest_hostile_lines_give_an_error_result(payload: str, why: str) -> None:
    r = p.parse_selftest(f"{p.SELFTEST_MARKER} {payload}\n")
    assert r is not None and not r.ok and r.error is not None and why in r.error


def test_parse_selftest_caps_counts_and_sizes_and_strips_control_characters() -> None:
    many = {"ok": True, "checks": [{"name": f"c{i}", "ok": True} for i in range(p.MAX_CHECKS + 1)]}
    r = p.parse_selftest(line(many))
    assert r is not None and r.error is not None and "more than" in r.error
    long = {"ok": True, "checks": [{"name": "x", "ok": True, "detail": "\x07\x00" + "d" * 5000}]}
    r = p.parse_selftest(line(long))
    assert r is not None and r.ok
    assert len(r.checks[0].detail) == p.MAX_DETAIL and r.checks[0].detail.startswith("??d")


def test_a_line_still_arriving_is_not_a_result_yet() -> None:
    full = line(GOOD).rstrip()
    assert p.parse_selftest("boot\r\n" + full[:len(full) // 2]) is None
    assert p.parse_selftest("boot\r\n" + full) is None
    r = p.parse_selftest("boot\r\n" + full + "\r")
    assert r is not None and r.ok


def test_the_last_result_line_wins() -> None:
    bad = {"ok": False, "checks": [{"name": "x", "ok": False}]}
    r = p.parse_selftest(line(bad) + line(GOOD))
    assert r is not None and r.ok


@given(st.text(max_size=2000))
def test_any_text_never_raises(text: str) -> None:
    p.find_ready(text)
    r = p.parse_selftest(text)
    assert r is None or isinstance(r, p.SelfTestResult)
    r = p.parse_selftest(f"{p.SELFTEST_MARKER} {text}")
    # a verdict is either fully consistent or carries the reason it is not
    assert r is None or r.ok == (r.error is None and bool(r.checks) and all(c.ok for c in r.checks))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=20)


@given(json_values)
def test_any_json_never_raises(doc: Any) -> None:
    r = p.parse_selftest(line(doc))
    assert r is not None and not r.ok


@given(st.dictionaries(st.sampled_from(["ok", "checks", "x"]), json_values, max_size=3))
def test_json_with_the_right_keys_never_raises(doc: dict[str, Any]) -> None:
    r = p.parse_selftest(line(doc))
    assert r is not None


names = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,20}", fullmatch=True)


@given(st.lists(st.tuples(names, st.booleans(), st.text(max_size=50)), min_size=1, max_size=20))
def test_well_formed_results_round_trip(checks: list[tuple[str, bool, str]]) -> None:
    doc = {"ok": all(ok for _, ok, _ in checks),
           "checks": [{"name": n, "ok": ok, "detail": d} for n, ok, d in checks]}
    r = p.parse_selftest(f"console noise\r\n{line(doc)}\r\n")
    assert r is not None and r.error is None
    assert r.ok == doc["ok"]
    assert [(c.name, c.ok) for c in r.checks] == [(n, ok) for n, ok, _ in checks]


def test_kernel_cmdline_names_the_checks_to_run() -> None:
    cmd = p.kernel_cmdline("aarch64", selftest=True, cpus=1, memory_mib=64, checks=p.BASE_CHECKS)
    assert "egpu.checks=pci,memory,cpus" in cmd.split()
    assert "egpu.checks" not in p.kernel_cmdline("aarch64", selftest=True, cpus=1, memory_mib=64)
    for bad in ([], ["a,b"], ["a b"], ["-x"]):
        with pytest.raises(ValueError):
            p.kernel_cmdline("aarch64", selftest=True, cpus=1, memory_mib=64, checks=bad)
