"""egpu.transfer's pure parts: the stall watch (on a fake clock), its policy from the
environment, strict decimals. The HTTP parts are tested against real servers in
test_images_bounded.py and test_debpkg_download.py."""

from __future__ import annotations

import pytest

from egpu.errors import UsageError
from egpu.transfer import (
    DEFAULT_MIN_RATE,
    DEFAULT_STALL_WINDOW,
    MIN_RATE_ENV,
    STALL_TIMEOUT_ENV,
    Stalled,
    StallPolicy,
    StallWatch,
    parse_decimal,
)


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_steady_transfer_never_stalls() -> None:
    clock = FakeClock()
    watch = StallWatch(StallPolicy(min_rate=1024, window=60), clock)
    for _ in range(600):  # ten minutes at 2 KiB/s
        clock.now += 1
        watch.add(2048)


def test_trickle_stalls_once_a_whole_window_is_slow() -> None:
    clock = FakeClock()
    watch = StallWatch(StallPolicy(min_rate=1024, window=60), clock)
    watch.add(1 << 20)  # a fast start fills the first window
    for _ in range(59):
        clock.now += 1
        watch.add(1)
    clock.now += 1
    watch.add(1)  # the first window (fast) closes here and passes
    for _ in range(59):
        clock.now += 1
        watch.add(1)  # 1 byte per second: the second window is not over yet
    clock.now += 1
    with pytest.raises(Stalled, match=r"under 1 KiB/s for 60 s"):
        watch.add(1)


def test_silence_is_a_stall_when_checked() -> None:
    clock = FakeClock()
    watch = StallWatch(StallPolicy(min_rate=1, window=5), clock)
    clock.now = 4.9
    watch.check()
    clock.now = 5.0
    with pytest.raises(Stalled):
        watch.check()


def test_zero_rate_never_stalls() -> None:
    clock = FakeClock()
    watch = StallWatch(StallPolicy(min_rate=0, window=1), clock)
    clock.now = 1000
    watch.check()


def test_policy_from_env() -> None:
    assert StallPolicy.from_env({}) == StallPolicy(DEFAULT_MIN_RATE, DEFAULT_STALL_WINDOW)
    policy = StallPolicy.from_env({STALL_TIMEOUT_ENV: "2.5", MIN_RATE_ENV: "100"})
    assert policy == StallPolicy(100, 2.5)
    assert policy.describe() == "under 100 B/s for 2.5 s"
    assert policy.read_timeout(60) == 2.5 and StallPolicy().read_timeout(60) == 60


@pytest.mark.parametrize(
    "env",
    [
        {STALL_TIMEOUT_ENV: "soon"},
        {STALL_TIMEOUT_ENV: "0"},
        {STALL_TIMEOUT_ENV: "-1"},
        {STALL_TIMEOUT_ENV: "inf"},
        {STALL_TIMEOUT_ENV: "nan"},
        {MIN_RATE_ENV: "1.5"},
        {MIN_RATE_ENV: "-5"},
    ],
)
def test_bad_policy_env_is_a_usage_error(env: dict[str, str]) -> None:
    with pytest.raises(UsageError):
        StallPolicy.from_env(env)


@pytest.mark.parametrize(
    ("text", "value"),
    [("0", 0), ("1234", 1234), ("²", None), ("12\n", None), ("", None), ("-1", None)],
)
def test_parse_decimal(text: str, value: int | None) -> None:
    assert parse_decimal(text) == value
