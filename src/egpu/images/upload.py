"""The push side of the OCI distribution API over a ``RegistryClient``: blobs and manifests.

Distribution spec, "Pushing blobs" and "Pushing manifests": ``HEAD`` a blob to skip one the
registry has; small blobs go up monolithically (``POST`` then ``PUT ?digest=``), large ones in
chunks (``POST``, ``PATCH`` with ``Content-Range`` per chunk, ``PUT ?digest=``), each step to the
``Location`` the previous answer gave (relative or absolute, http(s) only, resolved here). Every
answer is untrusted: success bodies are never read, error bodies are read with a cap, and the
``Range`` and ``Docker-Content-Digest`` a registry reports must be what was sent.
"""

from __future__ import annotations

from pathlib import Path

import httpx

from egpu.errors import ImageError
from egpu.images.reference import Digest
from egpu.images.registry import (
    HTTP_FORBIDDEN,
    HTTP_NOT_FOUND,
    HTTP_OK,
    HTTP_UNAUTHORIZED,
    RegistryClient,
)
from egpu.progress import Progress
from egpu.transfer import BadRedirect, parse_decimal, resolve_location

HTTP_CREATED, HTTP_ACCEPTED = 201, 202
OCTET_STREAM = "application/octet-stream"
# How much of the qcow2 one PATCH carries: large enough that request overhead is noise, small
# enough to hold in memory (the chunk is read whole so a retried request could resend it).
DEFAULT_CHUNK_BYTES = 16 * 1024 * 1024
DIGEST_HEADER = "docker-content-digest"


class Uploader:
    """Uploads blobs and manifests to the repository of one ``RegistryClient``."""

    def __init__(self, client: RegistryClient) -> None:
        self.client = client
        self.host = client.ref.api_host

    # -- answers ------------------------------------------------------------------------------

    def _refused(self, response: httpx.Response, what: str) -> ImageError:
        status = response.status_code
        if status in (HTTP_UNAUTHORIZED, HTTP_FORBIDDEN):
            return self.client.denied()
        code, message = self.client.registry_error(response)
        detail = f": {code} {message}".rstrip() if code else ""
        return ImageError(f"registry {self.host} refused {what} (HTTP {status}{detail})"[:300])

    def _location(self, response: httpx.Response, what: str) -> httpx.URL:
        """Where the next step of an upload goes, from an answer's ``Location``."""
        location = response.headers.get("location")
        if not location:
            raise ImageError(f"registry {self.host} gave no upload location for {what}")
        try:
            return resolve_location(response.request.url, location)
        except BadRedirect:
            raise ImageError(
                f"registry {self.host} gave a bad upload location {location[:80]!r} for {what}"
            ) from None

    def _check_digest(self, response: httpx.Response, digest: Digest, what: str) -> None:
        reported = response.headers.get(DIGEST_HEADER)
        if reported is not None and reported != str(digest):
            raise ImageError(
                f"registry {self.host} stored {what} as {reported[:80]!r}, not {digest}"
            )

    # -- blobs --------------------------------------------------------------------------------

    def has_blob(self, digest: Digest, size: int) -> bool:
        """Whether the repository already holds this blob (digest and size both match)."""
        url = f"{self.client.base}/blobs/{digest}"
        with self.client.request("HEAD", url, {}) as response:
            status = response.status_code
            if status == HTTP_NOT_FOUND:
                return False
            if status != HTTP_OK:
                raise self._refused(response, f"a check for blob {digest}")
            # A blob of another size under this digest is not this blob: upload it.
            return parse_decimal(response.headers.get("content-length", "")) == size

    def _start(self, what: str) -> httpx.URL:
        with self.client.request(
            "POST", f"{self.client.base}/blobs/uploads/", {"Content-Length": "0"}
        ) as response:
            if response.status_code != HTTP_ACCEPTED:
                raise self._refused(response, f"the upload of {what}")
            return self._location(response, what)

    def _finish(
        self, location: httpx.URL, digest: Digest, what: str, data: bytes = b""
    ) -> None:
        url = location.copy_merge_params({"digest": str(digest)})
        headers = {"Content-Type": OCTET_STREAM, "Content-Length": str(len(data))}
        with self.client.request("PUT", url, headers, content=data) as response:
            if response.status_code != HTTP_CREATED:
                raise self._refused(response, f"the upload of {what}")
            self._check_digest(response, digest, what)

    def put_blob(self, data: bytes, digest: Digest, what: str) -> None:
        """Upload a small blob in one request (POST, then PUT with the bytes)."""
        self._finish(self._start(what), digest, what, data)

    def put_blob_chunked(
        self,
        path: Path,
        size: int,
        digest: Digest,
        progress: Progress,
        what: str,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    ) -> None:
        """Upload a file in PATCH chunks of ``chunk_bytes``, reporting progress as they go."""
        location = self._start(what)
        sent = 0
        progress.start(what, size)
        try:
            with open(path, "rb") as f:
                while sent < size:
                    chunk = f.read(min(chunk_bytes, size - sent))
                    if not chunk:
                        raise ImageError(f"{path} shrank while it was being pushed")
                    location = self._patch(location, chunk, sent, what)
                    sent += len(chunk)
                    progress.advance(len(chunk))
        except OSError as e:
            raise ImageError(f"cannot read {path}: {e.strerror or e}") from None
        finally:
            progress.finish()
        self._finish(location, digest, what)

    def _patch(self, location: httpx.URL, chunk: bytes, start: int, what: str) -> httpx.URL:
        """Send one chunk; returns the location of the next step."""
        end = start + len(chunk) - 1
        headers = {
            "Content-Type": OCTET_STREAM,
            "Content-Length": str(len(chunk)),
            "Content-Range": f"{start}-{end}",
        }
        # Not retried: a chunk the registry took before the connection broke would be sent twice.
        with self.client.request(
            "PATCH", location, headers, content=chunk, retry=False
        ) as response:
            if response.status_code != HTTP_ACCEPTED:
                raise self._refused(response, f"a chunk of {what}")
            if _range_end(response.headers.get("range", "")) != end:
                raise ImageError(
                    f"registry {self.host} reports another range than the {start}-{end} sent "
                    f"of {what}"
                )
            return self._location(response, what)

    # -- manifests ----------------------------------------------------------------------------

    def put_manifest(self, tag: str, body: bytes, media_type: str, digest: Digest) -> None:
        """PUT a manifest's exact bytes under a tag."""
        url = f"{self.client.base}/manifests/{tag}"
        headers = {"Content-Type": media_type, "Content-Length": str(len(body))}
        with self.client.request("PUT", url, headers, content=body) as response:
            if response.status_code != HTTP_CREATED:
                raise self._refused(response, f"the manifest for tag {tag!r}")
            self._check_digest(response, digest, f"the manifest for tag {tag!r}")


def _range_end(header: str) -> int | None:
    """The last byte of an upload's ``Range: 0-END`` (distribution's form, no unit)."""
    first, sep, last = header.strip().removeprefix("bytes=").partition("-")
    if not sep or parse_decimal(first) != 0:
        return None
    return parse_decimal(last)
