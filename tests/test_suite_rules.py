"""Rules the suite keeps about itself: one hypothesis policy, declared tiers, no private paths."""

from __future__ import annotations

import ast
import os
import tomllib
from pathlib import Path

import pytest
from hypothesis import settings

from conftest import CI_ENV, started_qemu
from egpu.paths import CACHE_ENV
from egpu.vm.store import QEMU_LOG, QEMU_PID
from registry_server import engine_tool

TESTS = Path(__file__).resolve().parent
PYPROJECT = TESTS.parent / "pyproject.toml"
TIERS = ("qemu", "network", "download")


def test_mypy_strict_covers_the_tests_and_the_bench() -> None:
    mypy = tomllib.loads(PYPROJECT.read_text())["tool"]["mypy"]
    assert mypy["strict"] is True
    assert set(mypy["files"]) >= {"src/egpu", "tests", "bench"}
    assert not any(o.get("ignore_errors") for o in mypy.get("overrides", []))


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


def test_tiers_are_declared(pytestconfig: pytest.Config) -> None:
    declared = {line.split(":", 1)[0].strip() for line in pytestconfig.getini("markers")}
    assert declared >= set(TIERS)
    assert pytestconfig.getoption("strict_markers")  # a misspelt tier is an error, not a no-op


def test_registry_tests_are_network_tests(request: pytest.FixtureRequest) -> None:
    network = [i for i in request.session.items if "registry" in getattr(i, "fixturenames", ())]
    if not network:
        pytest.skip("no registry test selected in this run")
    assert all(i.get_closest_marker("network") is not None for i in network)


def test_engine_tools_come_only_from_a_provisioned_engine(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "empty-cache"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(pytest.fail.Exception, match="egpu setup"):
        engine_tool("qemu-img")


def test_a_started_vm_is_seen_under_its_home(tmp_path: Path) -> None:
    assert started_qemu(tmp_path) == []
    vm = tmp_path / "data" / "vms" / "vm1"
    vm.mkdir(parents=True)
    (vm / QEMU_PID).write_text("2\n")  # what a test faking a running VM writes
    assert started_qemu(tmp_path) == []
    (vm / QEMU_LOG).write_text("")  # the supervisor opens it for QEMU
    assert started_qemu(tmp_path) == [vm]
