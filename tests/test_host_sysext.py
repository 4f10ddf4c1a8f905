"""systemextensionsctl listings: the DriverKit extension's state."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from egpu.errors import HostError
from egpu.host.device import DEFAULT_DEXT_BUNDLE_ID
from egpu.host.sysext import DextState, classify, parse_systemextensions

FIXTURES = Path(__file__).parent / "fixtures" / "host"


def state(name: str, bundle: str = DEFAULT_DEXT_BUNDLE_ID) -> DextState:
    return parse_systemextensions((FIXTURES / name).read_text(), bundle, origin=name)


def test_enabled() -> None:
    s = state("sysext-enabled.txt")
    assert s.state == "enabled" and s.detail == "activated enabled"
    assert s.bundle_id == DEFAULT_DEXT_BUNDLE_ID and s.version == "1.0/1"


def test_waiting_for_user() -> None:
    assert state("sysext-waiting.txt").state == "waiting"


def test_upgrade_prefers_the_enabled_copy() -> None:
    s = state("sysext-upgrade.txt")
    assert s.state == "enabled" and s.version == "1.0/2"


@pytest.mark.parametrize("name", ["sysext-none.txt", "sysext-other-only.txt"])
def test_not_installed(name: str) -> None:
    assert state(name).state == "not-installed"


def test_a_renamed_host_app_still_matches_by_name() -> None:
    assert state("sysext-enabled.txt", "com.fork.App.VFIOUserPCIDriver").state == "enabled"


@pytest.mark.parametrize("text", ["", "Usage: some-other-tool\n", "hello\n1 extension(s)\n"])
def test_foreign_output_is_a_host_error(text: str) -> None:
    with pytest.raises(HostError, match="not `systemextensionsctl list` output"):
        parse_systemextensions(text, DEFAULT_DEXT_BUNDLE_ID)


def test_garbage_fixture() -> None:
    with pytest.raises(HostError):
        state("sysext-garbage.txt")


@pytest.mark.parametrize(
    ("bracket", "want"),
    [("activated enabled", "enabled"), ("activated waiting for user", "waiting"),
     ("terminated waiting to uninstall on reboot", "uninstalling"),
     ("activated disabled", "inactive")],
)
def test_classify(bracket: str, want: str) -> None:
    assert classify(bracket) == want


@given(st.lists(st.text(alphabet=st.sampled_from(list("ab *\t[]().-/1 extension(s)---")),
                        max_size=40), max_size=8))
def test_hostile_listings_give_a_state_or_a_host_error(lines: list[str]) -> None:
    try:
        s = parse_systemextensions("\n".join(lines), DEFAULT_DEXT_BUNDLE_ID)
    except HostError:
        return
    assert s.state in ("enabled", "waiting", "uninstalling", "inactive", "not-installed")
