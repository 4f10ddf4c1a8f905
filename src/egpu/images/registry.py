"""A small OCI distribution client over httpx: manifests and resumable, verified blob downloads.

HTTPS always, plain HTTP only for loopback registries (and no redirect may leave HTTPS for a
remote host). Anonymous or credentialed bearer-token auth as public GHCR needs, Basic when a
registry asks for it. Transient failures (connection errors, 408/429/5xx) are retried with
backoff; a broken blob download continues with an HTTP Range request from the bytes already on
disk, and the partial file is kept across processes so a later pull resumes it too.
Every body is read through ``egpu.transfer``: capped while streaming, watched for stalls, and
redirects are followed one hop at a time without reading their bodies.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import httpx

from egpu.errors import ImageError
from egpu.images.auth import Credentials, bearer_challenge, parse_challenges
from egpu.images.manifest import MANIFEST_ACCEPT, MAX_MANIFEST_BYTES
from egpu.images.reference import Digest, OciReference, is_loopback_host
from egpu.progress import Progress
from egpu.transfer import (
    BadRedirect,
    Stalled,
    StallPolicy,
    StallWatch,
    TooLarge,
    TransferError,
    make_client,
    parse_decimal,
    raw_chunks,
    read_capped,
    send,
)

# Backoff between attempts after a transient failure; its length is the number of retries.
RETRY_DELAYS: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0, 8.0)
TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
CHUNK_BYTES = 1024 * 1024
MAX_TOKEN_RESPONSE = 64 * 1024
MAX_ERROR_BODY = 64 * 1024
CONNECT_TIMEOUT = 15.0
READ_TIMEOUT = 60.0
HTTP_OK, HTTP_PARTIAL, HTTP_UNAUTHORIZED, HTTP_FORBIDDEN, HTTP_NOT_FOUND = 200, 206, 401, 403, 404
HTTP_RANGE_NOT_SATISFIABLE = 416
# Token scope actions (distribution's token spec): pulls ask for "pull", pushes for both.
PULL = "pull"
PULL_PUSH = "pull,push"


def _check_scheme(request: httpx.Request) -> None:
    # Runs before every request, redirects included: nothing goes to a remote host in clear.
    if request.url.scheme != "https" and not is_loopback_host(request.url.host):
        raise ImageError(f"refusing plain-HTTP request to {request.url.host} (HTTPS is required)")


class RegistryClient:
    """Talks to one repository of one registry."""

    def __init__(
        self,
        ref: OciReference,
        *,
        credentials: Credentials | None = None,
        retry_delays: Sequence[float] = RETRY_DELAYS,
        sleep: Callable[[float], None] = time.sleep,
        timeout: httpx.Timeout | None = None,
        stall: StallPolicy | None = None,
        actions: str = PULL,
    ) -> None:
        self.ref = ref
        self.actions = actions
        scheme = "http" if ref.is_loopback else "https"
        self.base = f"{scheme}://{ref.api_host}/v2/{ref.repository}"
        self._origin = httpx.URL(self.base)
        self.credentials = credentials
        self.retry_delays = tuple(retry_delays)
        self._sleep = sleep
        self.stall = stall or StallPolicy()
        self._auth: str | None = None
        self._client = make_client(
            timeout=timeout
            or httpx.Timeout(self.stall.read_timeout(READ_TIMEOUT), connect=CONNECT_TIMEOUT),
            headers={"User-Agent": "egpu"},
            request_hooks=[_check_scheme],
        )

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- requests ---------------------------------------------------------------------------

    def unreachable(self, error: Exception) -> ImageError:
        """The error for a registry that could not be reached."""
        return ImageError(f"cannot reach registry {self.ref.api_host}: {_reason(error)}")

    def _bad_transfer(self, error: TransferError) -> ImageError:
        return ImageError(f"registry {self.ref.api_host}: {error.message}")

    def _send(self, request: httpx.Request) -> httpx.Response:
        """One request and its redirects; transport errors are left to the caller."""
        try:
            return send(self._client, request)
        except BadRedirect as e:
            raise self._bad_transfer(e) from None

    @contextlib.contextmanager
    def _open(self, url: str, headers: Mapping[str, str]) -> Iterator[httpx.Response]:
        """GET with auth and retries of transient failures; yields a streaming response."""
        with self.request("GET", url, headers) as response:
            yield response

    @contextlib.contextmanager
    def request(
        self,
        method: str,
        url: str | httpx.URL,
        headers: Mapping[str, str],
        *,
        content: bytes | None = None,
        retry: bool = True,
    ) -> Iterator[httpx.Response]:
        """One API request with auth and (when ``retry``) retries of transient failures.

        Yields the streaming response. A GET follows redirects one hop at a time; other methods
        follow none (an upload answered with a redirect is an error the caller reports). The
        Authorization header goes only to this registry's own origin (an upload Location may
        point elsewhere).
        """
        authenticated = False
        attempt = 0
        retries = len(self.retry_delays) if retry else 0
        target = httpx.URL(url)
        while True:
            request_headers = dict(headers)
            if self._auth and _same_origin(target, self._origin):
                request_headers["Authorization"] = self._auth
            try:
                request = self._client.build_request(
                    method, target, headers=request_headers, content=content
                )
                if method == "GET":
                    response = self._send(request)
                else:
                    response = self._client.send(request, stream=True)
            except httpx.TransportError as e:
                if attempt >= retries:
                    raise self.unreachable(e) from None
                self._sleep(self.retry_delays[attempt])
                attempt += 1
                continue
            if response.status_code == HTTP_UNAUTHORIZED and not authenticated:
                challenge = response.headers.get("www-authenticate", "")
                response.close()
                self._authenticate(challenge)
                authenticated = True
                continue
            if response.status_code in TRANSIENT_STATUS and attempt < retries:
                response.close()
                self._sleep(self.retry_delays[attempt])
                attempt += 1
                continue
            try:
                yield response
            finally:
                response.close()
            return

    def _authenticate(self, header: str) -> None:
        """Answer a 401 challenge: fetch a bearer token, or use Basic credentials."""
        challenge = bearer_challenge(header)
        if challenge is None:
            if any(c.scheme == "basic" for c in parse_challenges(header)) and self.credentials:
                self._auth = self._basic()
                return
            raise self.denied()
        try:
            realm: httpx.URL | None = httpx.URL(challenge.params["realm"])
        except httpx.InvalidURL:
            realm = None
        if realm is None or realm.scheme not in ("http", "https") or not realm.host:
            raise ImageError(f"registry {self.ref.api_host} sent a bad token realm URL")
        wanted = f"repository:{self.ref.repository}:{self.actions}"
        # The challenge's scope is what this request needs; a push also asks for its own,
        # since a challenge to a read (HEAD, GET) names only pull.
        scopes = [challenge.params.get("scope", wanted)]
        if self.actions != PULL and wanted not in scopes:
            scopes.append(wanted)
        pairs = [("scope", scope) for scope in scopes]
        if "service" in challenge.params:
            pairs.insert(0, ("service", challenge.params["service"]))
        params = tuple(pairs)  # a tuple: repeated scope keys, and covariant for httpx's type
        headers = {"Authorization": self._basic()} if self.credentials else {}
        request = self._client.build_request("GET", realm, params=params, headers=headers)
        try:
            with contextlib.closing(self._send(request)) as response:
                status = response.status_code
                if status in (HTTP_UNAUTHORIZED, HTTP_FORBIDDEN):
                    raise self.denied()
                if status != HTTP_OK:
                    raise ImageError(
                        f"registry {self.ref.api_host}: token request failed (HTTP {status})"
                    )
                body = read_capped(response, MAX_TOKEN_RESPONSE, StallWatch(self.stall))
        except httpx.HTTPError as e:
            raise self.unreachable(e) from None
        except TooLarge as e:
            raise ImageError(f"registry {self.ref.api_host}: token response {e.message}") from None
        except TransferError as e:
            raise self._bad_transfer(e) from None
        try:
            doc: Any = json.loads(body)
        except ValueError:
            doc = None
        token = (doc.get("token") or doc.get("access_token")) if isinstance(doc, dict) else None
        if not isinstance(token, str) or not token or not token.isprintable():
            raise ImageError(f"registry {self.ref.api_host}: token response has no token")
        self._auth = f"Bearer {token}"

    def _basic(self) -> str:
        """The Basic Authorization value for the stored credentials."""
        assert self.credentials is not None
        pair = httpx.BasicAuth(self.credentials.username, self.credentials.password)
        return next(pair.auth_flow(httpx.Request("GET", self.base))).headers["Authorization"]

    def denied(self) -> ImageError:
        """The error for a 401/403 answer (with a login hint when egpu had no credentials)."""
        hint = "log in with 'podman login' or 'docker login'" if not self.credentials else None
        return ImageError(
            f"access to {self.ref.name} denied (it may not exist or may be private)", hint=hint
        )

    def registry_error(self, response: httpx.Response) -> tuple[str, str]:
        """The first error code and message of a registry error body, if it has one."""
        try:
            body = read_capped(response, MAX_ERROR_BODY, StallWatch(self.stall))
            doc: Any = json.loads(body)
            first = doc["errors"][0]
            return str(first.get("code", "")), str(first.get("message", ""))[:200]
        except (ValueError, KeyError, IndexError, TypeError, AttributeError, httpx.HTTPError):
            return "", ""
        except TransferError:
            return "", ""  # too large or too slow to be worth reading: the status says enough

    # -- manifests --------------------------------------------------------------------------

    def get_manifest(self, reference: str) -> tuple[bytes, str | None]:
        """Fetch a manifest by tag or digest: its exact bytes and Content-Type."""
        url = f"{self.base}/manifests/{reference}"
        with self._open(url, {"Accept": MANIFEST_ACCEPT}) as response:
            status = response.status_code
            if status == HTTP_NOT_FOUND:
                code, _ = self.registry_error(response)
                if code == "NAME_UNKNOWN":
                    raise ImageError(f"no repository {self.ref.name} in the registry")
                if reference.startswith("sha256:"):
                    raise ImageError(f"no manifest {reference} in {self.ref.name}")
                raise ImageError(f"unknown tag {reference!r} in {self.ref.name}")
            if status in (HTTP_UNAUTHORIZED, HTTP_FORBIDDEN):
                raise self.denied()
            if status != HTTP_OK:
                raise ImageError(
                    f"registry {self.ref.api_host} answered HTTP {status} for {reference}"
                )
            try:
                body = read_capped(response, MAX_MANIFEST_BYTES, StallWatch(self.stall))
            except httpx.HTTPError as e:
                raise self.unreachable(e) from None
            except TooLarge as e:
                raise ImageError(f"manifest of {self.ref.name} is too large: {e.message}") from None
            except TransferError as e:
                raise ImageError(f"manifest of {self.ref.name}: {e.message}") from None
            return body, response.headers.get("content-type")

    # -- blobs ------------------------------------------------------------------------------

    def download_blob(
        self, digest: Digest, size: int, partial: Path, progress: Progress, label: str
    ) -> None:
        """Make ``partial`` hold the blob's ``size`` bytes whose sha256 is ``digest``.

        Bytes already in ``partial`` are kept and only the rest is asked for (Range); a server
        that ignores Range makes it start over. ImageError on a digest mismatch (the partial
        file is then removed) or when the download keeps failing or stalls (then it is kept,
        unless it is empty: a failure before the first byte leaves no file).
        """
        resumed = partial.exists() and partial.stat().st_size > 0
        try:
            try:
                self._download(digest, size, partial, progress, label)
            except _DigestMismatch as e:
                if not resumed:
                    raise ImageError(e.message) from None
                # The kept bytes may be what was bad (a partial from an older, broken run):
                # one fresh download decides.
                self._download(digest, size, partial, progress, label)
        except BaseException:
            with contextlib.suppress(OSError):
                if partial.stat().st_size == 0:
                    partial.unlink()
            raise

    def _download(
        self, digest: Digest, size: int, partial: Path, progress: Progress, label: str
    ) -> None:
        url = f"{self.base}/blobs/{digest}"
        partial.parent.mkdir(parents=True, exist_ok=True)
        state = _Download(size=size)
        state.have = _hash_existing(partial, size, state.hasher)
        _check_free_space(partial.parent, size - state.have)
        progress.start(label, size)
        progress.advance(state.have)
        failures = 0
        # One watch for the whole download, reconnects included: a server that drops every
        # connection after a few bytes has stalled as surely as one that trickles them.
        watch = StallWatch(self.stall)
        try:
            with open(partial, "ab") as out:
                while state.have < size:
                    before = state.have
                    try:
                        self._fetch_range(url, digest, state, out, progress, watch)
                    except httpx.TransportError as e:
                        error: Exception = e
                    else:
                        if state.have >= size:
                            break
                        error = ConnectionError("connection closed before the blob was complete")
                    watch.check()  # the time a failed attempt took counts against the window
                    # Progress resets the count: only failures in a row with nothing gained add up.
                    failures = 1 if state.have > before else failures + 1
                    if failures > len(self.retry_delays):
                        raise ImageError(
                            f"download of {label} broke off at {state.have} of {size} bytes "
                            f"({_reason(error)}); run the pull again to resume",
                        ) from None
                    self._sleep(self.retry_delays[failures - 1])
                out.flush()
                os.fsync(out.fileno())
        except Stalled:
            raise ImageError(
                f"download of {label} stalled ({self.stall.describe()}) at {state.have} of "
                f"{size} bytes; run the pull again to resume"
            ) from None
        except OSError as e:
            raise _disk_error(e, partial) from None
        finally:
            progress.finish()
        if state.hasher.hexdigest() != digest.hex:
            partial.unlink(missing_ok=True)
            raise _DigestMismatch(
                f"corrupted blob: {label} has sha256:{state.hasher.hexdigest()}, "
                f"expected {digest}; the bad download was removed"
            )

    def _fetch_range(
        self,
        url: str,
        digest: Digest,
        state: _Download,
        out: BinaryIO,
        progress: Progress,
        watch: StallWatch,
    ) -> None:
        """One GET of the blob from byte ``state.have``, appending to ``out`` as bytes arrive.

        ``state`` is updated chunk by chunk, so it is right even when the connection breaks.
        """
        headers = {"Range": f"bytes={state.have}-"} if state.have else {}
        with self._open(url, headers) as response:
            status = response.status_code
            if status == HTTP_PARTIAL:
                start = _content_range_start(response.headers.get("content-range", ""))
                if start != state.have:
                    raise ImageError(
                        f"registry {self.ref.api_host} answered a Range request with another range"
                    )
            elif status in (HTTP_OK, HTTP_RANGE_NOT_SATISFIABLE):
                # The server ignored (or refused) the Range: the only safe thing is to start over.
                progress.advance(-state.have)
                state.restart(out)
                if status == HTTP_RANGE_NOT_SATISFIABLE:
                    return
            elif status == HTTP_NOT_FOUND:
                raise ImageError(f"registry has no blob {digest} for {self.ref.name}")
            elif status in (HTTP_UNAUTHORIZED, HTTP_FORBIDDEN):
                raise self.denied()
            else:
                raise ImageError(f"registry {self.ref.api_host} answered HTTP {status} for a blob")
            # Unbuffered: every byte that arrived is kept, even when the connection then breaks.
            for chunk in raw_chunks(response, watch):
                if state.have + len(chunk) > state.size:
                    state.restart(out)
                    raise ImageError(
                        f"corrupted blob: registry sent over {state.size} bytes for {digest}"
                    )
                out.write(chunk)
                state.hasher.update(chunk)
                state.have += len(chunk)
                progress.advance(len(chunk))
            out.flush()


class _DigestMismatch(ImageError):
    """A finished download whose bytes do not hash to the digest asked for."""


@dataclass
class _Download:
    """Where a blob download stands: bytes on disk and the hash of exactly those bytes."""

    size: int
    have: int = 0
    hasher: Any = field(default_factory=hashlib.sha256)

    def restart(self, out: BinaryIO) -> None:
        out.truncate(0)
        self.have = 0
        self.hasher = hashlib.sha256()


def _hash_existing(partial: Path, size: int, hasher: Any) -> int:
    """Feed the bytes already downloaded into ``hasher``; returns how many there are."""
    try:
        have = partial.stat().st_size
    except FileNotFoundError:
        return 0
    if have > size:
        partial.unlink()
        return 0
    with open(partial, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            hasher.update(chunk)
    return have


def _check_free_space(directory: Path, needed: int) -> None:
    free = shutil.disk_usage(directory).free
    if free < needed:
        raise ImageError(
            f"disk full: {needed} more bytes needed in {directory}, {free} free",
            hint="free some space and run the pull again; it resumes",
        )


def _disk_error(error: OSError, partial: Path) -> ImageError:
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return ImageError(
            f"disk full while writing {partial.parent}",
            hint="free some space and run the pull again; it resumes",
        )
    return ImageError(f"cannot write {partial}: {error.strerror or error}")


def _content_range_start(header: str) -> int | None:
    """The first byte of ``Content-Range: bytes START-END/TOTAL``."""
    unit, _, spec = header.strip().partition(" ")
    start, _, _ = spec.partition("-")
    return parse_decimal(start) if unit == "bytes" else None


def _same_origin(a: httpx.URL, b: httpx.URL) -> bool:
    return (a.scheme, a.host, a.port) == (b.scheme, b.host, b.port)


def _reason(error: Exception) -> str:
    text = str(error) or type(error).__name__
    return text.splitlines()[0][:200]
