"""The one "run a tool, raise with its last error line" helper, and that nothing copies it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from egpu.errors import EgpuError, HostError
from egpu.process import last_line, run_tool

SRC = Path(__file__).resolve().parents[1] / "src" / "egpu"


def test_failure_raises_the_callers_error_with_the_last_stderr_line() -> None:
    script = ("import sys; print('noise', file=sys.stderr); "
              "print('the reason', file=sys.stderr); sys.exit(3)")
    with pytest.raises(HostError) as e:
        run_tool([sys.executable, "-c", script], lambda why: HostError(f"probe: {why}"), timeout=30)
    assert e.value.message == "probe: the reason"


def test_silent_failure_uses_the_fallback() -> None:
    with pytest.raises(EgpuError, match="probe: nothing said"):
        run_tool([sys.executable, "-c", "raise SystemExit(1)"],
                 lambda why: EgpuError(f"probe: {why}"), timeout=30, fallback="nothing said")


def test_missing_program_is_a_failure_to_start(tmp_path: Path) -> None:
    with pytest.raises(EgpuError, match=r"cannot run .*absent"):
        run_tool([str(tmp_path / "absent")], EgpuError, timeout=30)


def test_success_returns_stdout_and_sees_env_and_stdin() -> None:
    script = "import os, sys; print(os.environ['EGPU_T'] + sys.stdin.read())"
    out = run_tool([sys.executable, "-c", script], EgpuError, timeout=30, env={"EGPU_T": "a"},
                   stdin="b")
    assert out == "ab\n"


def test_last_line_skips_trailing_blank_lines() -> None:
    assert last_line("one\ntwo\n\n") == "two"
    assert last_line("  \n", "none") == "none"


def test_no_module_keeps_its_own_copy_of_the_last_line_idiom() -> None:
    copies = [p for p in SRC.rglob("*.py") if "splitlines() or [" in p.read_text()]
    assert copies == [SRC / "process.py"]
