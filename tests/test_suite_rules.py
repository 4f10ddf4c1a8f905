"""Rules the suite keeps about itself: one hypothesis policy."""

from __future__ import annotations

import ast
import os
from pathlib import Path

from hypothesis import settings

from conftest import CI_ENV

TESTS = Path(__file__).resolve().parent


def test_one_hypothesis_profile_without_a_deadline() -> None:
    expected = "ci" if os.environ.get(CI_ENV) else "dev"
    assert settings.get_current_profile_name() == expected
    assert settings().deadline is None


def _settings_keywords(path: Path) -> set[str]:
    """Keyword arguments of every ``settings(...)`` call in a test module."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", "")
            if name == "settings":
                found.update(k.arg for k in node.keywords if k.arg is not None)
    return found


def test_no_test_overrides_the_profile_deadline() -> None:
    modules = sorted(TESTS.glob("test_*.py"))
    offenders = [p.name for p in modules if "deadline" in _settings_keywords(p)]
    assert offenders == []
