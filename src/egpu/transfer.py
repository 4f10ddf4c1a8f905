"""Bounded HTTP transfers, shared by OCI pulls and Debian package downloads.

Every response body is read as a stream with a cap (never whole first), every stream is watched
for stalls, and redirects are followed here, one hop at a time, so a redirect's body is never
read and a loop or a bad ``Location`` is a clear error. The exceptions below are internal: each
caller turns them into its own layer's EgpuError with the context a user needs.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from egpu.errors import UsageError

if TYPE_CHECKING:
    # httpx is imported where a transfer starts: the policy and constants here are also read
    # by commands that never download (their options, their help)
    import httpx

STALL_TIMEOUT_ENV = "EGPU_STALL_TIMEOUT"
MIN_RATE_ENV = "EGPU_MIN_RATE"
# A transfer slower than this for this long has stopped making progress.
DEFAULT_MIN_RATE = 1024  # bytes per second
DEFAULT_STALL_WINDOW = 60.0  # seconds
MAX_REDIRECTS = 10
REDIRECT_STATUS = frozenset({301, 302, 303, 307, 308})
# Sent on every request: what arrives is then what the digest covers, and a body's size on the
# wire is its size in memory (no decompression to bound).
IDENTITY_HEADERS = {"Accept-Encoding": "identity"}

_DECIMAL_RE = re.compile(r"[0-9]{1,20}")
_KIB = 1024


class TransferError(Exception):
    """A bounded transfer gave up; ``message`` is one line, without the caller's context."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class Stalled(TransferError):
    """The stream delivered less than the policy's rate over a whole window."""


class TooLarge(TransferError):
    """A body went over its cap."""


class BadRedirect(TransferError):
    """A redirect loop, or a ``Location`` that is not an http(s) URL."""


@dataclass(frozen=True)
class StallPolicy:
    """When a stream counts as stalled: under ``min_rate`` bytes/s over ``window`` seconds."""

    min_rate: int = DEFAULT_MIN_RATE
    window: float = DEFAULT_STALL_WINDOW

    def __post_init__(self) -> None:
        if self.min_rate < 0 or not (math.isfinite(self.window) and self.window > 0):
            raise UsageError(
                f"bad stall limits: {self.min_rate} B/s over {self.window} s",
                hint="the window must be positive and the rate not negative",
            )

    def describe(self) -> str:
        rate = (
            f"{self.min_rate // _KIB} KiB/s"
            if self.min_rate % _KIB == 0 and self.min_rate
            else f"{self.min_rate} B/s"
        )
        return f"under {rate} for {self.window:g} s"

    def read_timeout(self, default: float) -> float:
        """A socket read timeout no longer than the window, so silence is noticed in time."""
        return min(default, self.window)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> StallPolicy:
        """The policy from ``EGPU_STALL_TIMEOUT`` (seconds) and ``EGPU_MIN_RATE`` (bytes/s)."""
        window = _env_number(env, STALL_TIMEOUT_ENV, DEFAULT_STALL_WINDOW)
        rate = _env_number(env, MIN_RATE_ENV, DEFAULT_MIN_RATE)
        if rate != int(rate):
            raise UsageError(f"{MIN_RATE_ENV} must be a whole number of bytes per second")
        return cls(int(rate), window)


def _env_number(env: Mapping[str, str], name: str, default: float) -> float:
    text = env.get(name)
    if text is None or text == "":
        return default
    try:
        value = float(text)
    except ValueError:
        raise UsageError(f"{name} must be a number, not {text[:40]!r}") from None
    if not math.isfinite(value) or value < 0:
        raise UsageError(f"{name} must be a positive number, not {text[:40]!r}")
    return value


class StallWatch:
    """Counts a stream's bytes in consecutive windows; ``check`` raises Stalled on a slow one."""

    def __init__(
        self, policy: StallPolicy, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.policy = policy
        self._clock = clock
        self._start = clock()
        self._got = 0

    def add(self, n: int) -> None:
        self._got += n
        self.check()

    def check(self) -> None:
        """Close the window if it is over: Stalled if it carried too few bytes."""
        now = self._clock()
        elapsed = now - self._start
        if elapsed < self.policy.window:
            return
        if self._got < self.policy.min_rate * elapsed:
            raise Stalled(f"stalled ({self.policy.describe()})")
        self._start, self._got = now, 0


def make_client(
    *,
    timeout: httpx.Timeout,
    headers: Mapping[str, str] | None = None,
    request_hooks: Sequence[Callable[[httpx.Request], None]] = (),
) -> httpx.Client:
    """An httpx client for ``send``: it never follows redirects itself (it would read each
    redirect's body whole) and refuses a bad ``Location`` before httpx parses it."""
    import httpx

    return httpx.Client(
        timeout=timeout,
        follow_redirects=False,
        headers={**IDENTITY_HEADERS, **(headers or {})},
        event_hooks={"request": list(request_hooks), "response": [_check_location]},
    )


def _check_location(response: httpx.Response) -> None:
    # Runs before httpx looks at Location (it raises a transport-looking error on a bad one,
    # which would be retried as if the network had failed).
    if response.status_code in REDIRECT_STATUS and "location" in response.headers:
        resolve_location(response.request.url, response.headers["location"])


def resolve_location(base: httpx.URL, location: str) -> httpx.URL:
    """A ``Location`` header as an absolute http(s) URL, relative to ``base``; else BadRedirect."""
    import httpx

    try:
        url = base.join(location)
    except httpx.InvalidURL:
        raise BadRedirect(f"redirect to a bad URL {location[:80]!r}") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise BadRedirect(f"redirect to a bad URL {location[:80]!r}")
    return url


def send(
    client: httpx.Client, request: httpx.Request, *, max_redirects: int = MAX_REDIRECTS
) -> httpx.Response:
    """Send a GET and follow its redirects; returns the final response, still streaming.

    ``client`` comes from ``make_client``. Authorization is dropped when a redirect leaves the
    origin, as browsers and httpx do.
    """
    for _ in range(max_redirects + 1):
        response = client.send(request, stream=True)
        if response.status_code not in REDIRECT_STATUS or "location" not in response.headers:
            return response
        location = response.headers["location"]
        response.close()
        request = _redirected(client, request, location)
    raise BadRedirect(f"more than {max_redirects} redirects (a redirect loop?)")


def _redirected(client: httpx.Client, request: httpx.Request, location: str) -> httpx.Request:
    import httpx

    url = resolve_location(request.url, location)
    headers = httpx.Headers(request.headers)
    same_origin = (url.scheme, url.host, url.port) == (
        request.url.scheme,
        request.url.host,
        request.url.port,
    )
    if not same_origin:
        headers.pop("Authorization", None)
        headers.pop("Host", None)
    return client.build_request("GET", url, headers=headers)


def raw_chunks(response: httpx.Response, watch: StallWatch) -> Iterator[bytes]:
    """The body's bytes as they arrive (undecoded), each counted by ``watch``."""
    for chunk in response.iter_raw():
        watch.add(len(chunk))
        yield chunk


def read_capped(response: httpx.Response, cap: int, watch: StallWatch) -> bytes:
    """The whole body if it is at most ``cap`` bytes; TooLarge as soon as it is more."""
    length = response.headers.get("content-length")
    if length is not None and _DECIMAL_RE.fullmatch(length) and int(length) > cap:
        raise TooLarge(f"{length} bytes is over the {cap}-byte limit")
    body = bytearray()
    for chunk in response.iter_bytes():
        watch.add(len(chunk))
        body += chunk
        if len(body) > cap:
            raise TooLarge(f"over the {cap}-byte limit")
    return bytes(body)


def parse_decimal(text: str) -> int | None:
    """A plain ASCII decimal (as HTTP headers carry), else None: ``str.isdigit`` takes '²'."""
    return int(text) if _DECIMAL_RE.fullmatch(text) else None
