"""OCI registry client: resolve images, read blobs by byte range, push blobs and manifests.

What belongs here: the OCI distribution protocol (manifests, blobs, uploads), platform selection, auth
(bearer tokens, basic), mirrors, retries, range fallbacks, and local OCI layouts (``oci:DIR[:TAG]``) behind
the same `BlobReader` interface. What never does: parsing references, the config file or auth files
(config.py), eStargz/TOC parsing (toc.py), keeping chunks (cache.py; this module hands back bytes and, at
most, one whole-blob spill file), FUSE or gRPC.

Everything a registry sends is untrusted: digests are validated before they enter a URL or a path,
whatever is downloaded whole (manifests, configs, whole blobs) is size-limited before it is read and
digest-verified after, and every 206 must answer exactly the range that was asked. Secrets (passwords,
tokens, signed redirect URLs) never reach a log line or an error message, and Authorization is never sent
to a host other than the registry's (redirects to object storage are followed by hand).
"""

from __future__ import annotations

import base64
import bisect
import contextlib
import dataclasses
import email.utils
import errno
import hashlib
import io
import ipaddress
import json
import logging
import os
import platform as platform_module
import random
import re
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, TypeVar
from urllib.parse import parse_qsl, urlencode, urljoin, urlsplit, urlunsplit

import requests
import requests.adapters
import requests.utils

from config import (
    COMPONENT_RE,
    TAG_RE,
    Config,
    Credentials,
    InvalidInputError,
    Reference,
    RegistryConfig,
    as_reference,
    load_config,
    lookup_credentials,
    valid_digest,
)
from toc import LazymountError, sha256_digest

log = logging.getLogger(__name__)
T = TypeVar("T")

MEDIA_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MEDIA_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
INDEX_TYPES = (MEDIA_OCI_INDEX, MEDIA_DOCKER_LIST)
MANIFEST_TYPES = (MEDIA_OCI_MANIFEST, MEDIA_DOCKER_MANIFEST)
MAX_MANIFEST_SIZE = 4 << 20  # the OCI distribution spec's limit
MAX_CONFIG_SIZE = 8 << 20
UPLOAD_CHUNK_SIZE = 16 << 20  # blobs up to this go in one PUT; larger ones in PATCH chunks of this size
MAX_RANGES_PER_REQUEST = 64  # keeps the Range header well under common 8 KiB header limits
MAX_REDIRECTS = 5
MIRROR_BACKOFF_SECONDS = 30.0  # a mirror that failed at the transport level is skipped this long
_READ_CHUNK = 256 << 10

_CHALLENGE_PARAM_RE = re.compile(r'([A-Za-z_][\w-]*)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]+))')
_MEDIA_TYPE_RE = re.compile(r"[\w.+-]+/[\w.+-]+")
_CONTENT_RANGE_RE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")


# ------------------------------------------------------------------------------------------------ errors


class RegistryError(LazymountError):
    """A registry operation failed; the message names the registry, the repository and what failed."""

    def __init__(self, registry: str, repository: str, what: str, detail: str) -> None:
        super().__init__(f"registry {registry}, repository {repository}: {what}: {detail}")
        self.registry, self.repository, self.what, self.detail = registry, repository, what, detail


class AuthError(RegistryError):
    """The registry or its token service refused us (401/403, or credentials are missing)."""

    errno = errno.EACCES


class NotFoundError(RegistryError):
    """The manifest, blob, tag or platform does not exist."""

    errno = errno.ENOENT


class _UnavailableError(RegistryError):
    """Transport-level failure (connection, timeout, 5xx, 429) that outlived its retries."""


class _Retry(Exception):  # noqa: N818 -- control flow inside the retry loop, never escapes this module
    def __init__(self, detail: str, retry_after: float | None = None) -> None:
        super().__init__(detail)
        self.detail, self.retry_after = detail, retry_after


def _parse_challenge(header: str) -> tuple[str, dict[str, str]] | None:
    """`Bearer realm="...",service="...",scope="..."` -> ("bearer", {...}); None if unusable."""
    scheme, _, rest = header.strip().partition(" ")
    scheme = scheme.lower()
    if scheme not in ("bearer", "basic"):
        return None
    params = {m.group(1).lower(): m.group(2) if m.group(2) is not None else m.group(3)
              for m in _CHALLENGE_PARAM_RE.finditer(rest)}
    if scheme == "bearer" and not params.get("realm", "").startswith(("http://", "https://")):
        return None
    return scheme, params


# --------------------------------------------------------------------------------------------- platform


_MACHINE_ARCH = {"x86_64": ("amd64", ""), "amd64": ("amd64", ""), "aarch64": ("arm64", "v8"),
                 "arm64": ("arm64", "v8"), "armv7l": ("arm", "v7"), "armv6l": ("arm", "v6"),
                 "i686": ("386", ""), "i386": ("386", ""), "ppc64le": ("ppc64le", ""),
                 "s390x": ("s390x", ""), "riscv64": ("riscv64", "")}


def default_platform() -> str:
    """This machine's platform as `os/arch[/variant]`, e.g. `linux/amd64` or `linux/arm64/v8`."""
    machine = platform_module.machine().lower()
    arch, variant = _MACHINE_ARCH.get(machine, (machine, ""))
    return f"linux/{arch}" + (f"/{variant}" if variant else "")


def _platform_key(os_name: str, arch: str, variant: str) -> tuple[str, str, str]:
    if arch == "arm64" and variant in ("", "v8"):
        variant = "v8"
    return os_name, arch, variant


def select_platform(index: Mapping[str, Any], wanted: str | None = None,
                    where: tuple[str, str] = ("-", "-")) -> Descriptor:
    """The manifest descriptor of `index` for platform `wanted` (`os/arch[/variant]`, default ours).

    `where` (registry, repository) goes into the NotFoundError raised when no entry matches.
    """
    wanted = wanted or default_platform()
    parts = wanted.split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise InvalidInputError(f"invalid platform {wanted[:60]!r}; expected os/arch[/variant]")
    want = _platform_key(parts[0], parts[1], parts[2] if len(parts) == 3 else "")
    available = []
    manifests = index.get("manifests")
    for raw in manifests if isinstance(manifests, list) else []:
        plat = raw.get("platform") if isinstance(raw, dict) and isinstance(raw.get("platform"), dict) else {}
        key = _platform_key(str(plat.get("os", "")), str(plat.get("architecture", "")),
                            str(plat.get("variant", "")))
        available.append("/".join(k for k in key if k))
        if key[:2] == want[:2] and (len(parts) == 2 or key[2] == want[2]):
            try:
                return Descriptor.from_json(raw)
            except InvalidInputError as e:
                raise RegistryError(*where, f"index entry for {wanted}", str(e)) from None
    raise NotFoundError(*where, "platform selection",
                        f"no manifest for {wanted}; the index has: {', '.join(available) or 'none'}")


# ------------------------------------------------------------------------------------------ descriptors


@dataclass(frozen=True)
class Descriptor:
    """An OCI content descriptor (the digest is validated, the size a non-negative int)."""

    media_type: str
    digest: str
    size: int
    annotations: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_json(cls, obj: Any) -> Descriptor:
        """Parse one descriptor object from a manifest or index (untrusted)."""
        if not isinstance(obj, dict):
            raise InvalidInputError("descriptor is not a JSON object")
        size = obj.get("size")
        if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size < 1 << 62:
            raise InvalidInputError(f"descriptor has an invalid size {str(size)[:30]!r}")
        annotations = obj.get("annotations") or {}
        if not isinstance(annotations, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in annotations.items()):
            raise InvalidInputError("descriptor annotations must map strings to strings")
        return cls(str(obj.get("mediaType", "")), valid_digest(obj.get("digest")), size, annotations)

    def to_json(self) -> dict[str, Any]:
        """The descriptor as a manifest JSON object."""
        obj: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.annotations:
            obj["annotations"] = dict(self.annotations)
        return obj


def _media_type(data: dict, header_type: str) -> str:
    """The manifest's media type: its own `mediaType`, else the Content-Type, else guessed from keys."""
    declared = data.get("mediaType")
    if isinstance(declared, str) and declared:
        return declared
    if header_type in INDEX_TYPES + MANIFEST_TYPES:
        return header_type
    return MEDIA_OCI_INDEX if "manifests" in data else MEDIA_OCI_MANIFEST


# -------------------------------------------------------------------------------------------- blob reads


def _merge_spans(ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, non-overlapping (start, end) spans covering every non-empty (offset, length) range."""
    spans: list[tuple[int, int]] = []
    for start, end in sorted((o, o + n) for o, n in ranges if n > 0):
        if spans and start <= spans[-1][1]:
            spans[-1] = (spans[-1][0], max(spans[-1][1], end))
        else:
            spans.append((start, end))
    return spans


def _slice_spans(spans: dict[int, bytes], ranges: Sequence[tuple[int, int]]) -> list[bytes]:
    starts = sorted(spans)
    out = []
    for offset, length in ranges:
        if length <= 0:
            out.append(b"")
            continue
        start = starts[bisect.bisect_right(starts, offset) - 1]
        out.append(spans[start][offset - start:offset - start + length])
    return out


class BlobReader:
    """Random access to one blob by digest; safe to share between threads.

    `read_at` and `read_ranges` return raw, unverified bytes (the caller verifies chunks against the
    TOC); `read_all` and `download` verify the whole blob's digest. Reads past the end are clipped.
    `ranges_supported` is False once the source was found to ignore Range (the blob is then downloaded
    whole, once, and served from that copy), None until known.
    """

    ranges_supported: bool | None = True

    def __init__(self, digest: str, size: int) -> None:
        self.digest = valid_digest(digest)
        self.size = size

    def _clip(self, offset: int, length: int) -> tuple[int, int]:
        if offset < 0 or length < 0:
            raise InvalidInputError(f"negative offset or length ({offset}, {length})")
        offset = min(offset, self.size)
        return offset, min(length, self.size - offset)

    def read_at(self, offset: int, length: int) -> bytes:
        """`length` bytes at `offset` (fewer at the end of the blob)."""
        return self.read_ranges([(offset, length)])[0]

    def read_ranges(self, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        """The bytes of each (offset, length), in the order given, fetched in as few requests as possible."""
        clipped = [self._clip(o, n) for o, n in ranges]
        spans = _merge_spans(clipped)
        return _slice_spans(dict(zip((s for s, _ in spans), self._read_spans(spans), strict=True)), clipped)

    def _read_spans(self, spans: list[tuple[int, int]]) -> list[bytes]:
        raise NotImplementedError

    def read_all(self, max_size: int | None = None) -> bytes:
        """The whole blob, digest-verified; refuses blobs over `max_size` before reading."""
        raise NotImplementedError

    def download(self, path: str | os.PathLike[str]) -> None:
        """Write the whole blob, digest-verified, to `path` (via a temp file renamed into place)."""
        raise NotImplementedError

    def close(self) -> None:
        """Release files held by the reader."""

    def __enter__(self) -> BlobReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Sink:
    """Streams bytes into a file (memory by default) while hashing; `finish` checks size and digest."""

    def __init__(self, digest: str, size: int, fileobj: BinaryIO | None = None) -> None:
        self.digest, self.size = digest, size
        self.file: BinaryIO = fileobj if fileobj is not None else io.BytesIO()
        self.reset()

    def reset(self) -> None:
        self.hash, self.written = hashlib.sha256(), 0
        self.file.seek(0)
        self.file.truncate()

    def write(self, data: bytes) -> None:
        self.written += len(data)
        if self.written > self.size:
            raise ValueError(f"more than the declared {self.size} bytes")
        self.hash.update(data)
        self.file.write(data)

    def finish(self) -> None:
        if self.written != self.size:
            raise ValueError(f"{self.written} bytes, expected {self.size}")
        if "sha256:" + self.hash.hexdigest() != self.digest:
            raise ValueError(f"digest mismatch (got sha256:{self.hash.hexdigest()})")


def _write_verified(path: str | os.PathLike[str], digest: str, size: int,
                    fill: Callable[[_Sink], None]) -> None:
    """Run `fill` into a temp file beside `path`, verify it, rename it to `path`."""
    target = Path(path)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            sink = _Sink(digest, size, f)
            fill(sink)
            sink.finish()
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class LayoutBlobReader(BlobReader):
    """A blob of a local OCI image layout (`DIR/blobs/sha256/HEX`), read with pread."""

    def __init__(self, layout: str | os.PathLike[str], digest: str, size: int | None = None) -> None:
        self._where = f"oci:{layout}"
        path = Path(layout) / "blobs" / "sha256" / valid_digest(digest)[len("sha256:"):]
        try:
            self._file = open(path, "rb")  # noqa: SIM115 -- kept open for the reader's lifetime
        except FileNotFoundError:
            raise NotFoundError(self._where, "-", f"blob {digest}", "not in the layout") from None
        actual = os.fstat(self._file.fileno()).st_size
        if size is not None and size != actual:
            self._file.close()
            raise RegistryError(self._where, "-", f"blob {digest}", f"{actual} bytes, expected {size}")
        super().__init__(digest, actual)

    def _read_spans(self, spans: list[tuple[int, int]]) -> list[bytes]:
        return [os.pread(self._file.fileno(), end - start, start) for start, end in spans]

    def _copy(self, sink: _Sink) -> None:
        for offset in range(0, self.size, _READ_CHUNK):
            sink.write(os.pread(self._file.fileno(), _READ_CHUNK, offset))
        try:
            sink.finish()
        except ValueError as e:
            raise RegistryError(self._where, "-", f"blob {self.digest}", str(e)) from None

    def read_all(self, max_size: int | None = None) -> bytes:
        """The whole blob, digest-verified; refuses blobs over `max_size` before reading."""
        if max_size is not None and self.size > max_size:
            raise RegistryError(self._where, "-", f"blob {self.digest}",
                                f"{self.size} bytes, over the {max_size}-byte limit")
        sink = _Sink(self.digest, self.size)
        self._copy(sink)
        return sink.file.getvalue()  # type: ignore[attr-defined]

    def download(self, path: str | os.PathLike[str]) -> None:
        """Copy the whole blob, digest-verified, to `path`."""
        _write_verified(path, self.digest, self.size, self._copy)

    def close(self) -> None:
        """Close the blob file."""
        self._file.close()


class RegistryBlobReader(BlobReader):
    """A blob in a registry, read with HTTP Range requests through a `RegistryClient`.

    If the registry ignores Range, the blob is downloaded whole once, to `spill_path` (kept, so a caller
    can reuse it) or to an anonymous temp file, and every read is served from there.
    """

    def __init__(self, client: RegistryClient, ref: Reference, digest: str, size: int,
                 spill_path: str | os.PathLike[str] | None = None) -> None:
        super().__init__(digest, size)
        self._client, self._ref, self._spill_path = client, ref, spill_path
        self._lock = threading.Lock()
        self._spill: BinaryIO | None = None
        self.ranges_supported = None

    def _read_spans(self, spans: list[tuple[int, int]]) -> list[bytes]:
        if self._spill is None and self.ranges_supported is not False:
            got = self._client._read_spans(self._ref, self.digest, self.size, spans, self)
            if got is not None:
                self.ranges_supported = True
                return got
        fd = self._spilled().fileno()
        return [os.pread(fd, end - start, start) for start, end in spans]

    def _spilled(self, response: requests.Response | None = None, op: _Op | None = None) -> BinaryIO:
        """The verified whole-blob copy, downloaded once (taking `response`'s body if it is a 200)."""
        with self._lock:
            self.ranges_supported = False
            if self._spill is not None:
                return self._spill
            if self._spill_path is None:
                spill = tempfile.TemporaryFile()  # noqa: SIM115 -- kept open for the reader's lifetime
                try:
                    self._client._download(self._ref, _Sink(self.digest, self.size, spill), response, op)
                except BaseException:
                    spill.close()
                    raise
            else:
                path = self._spill_path
                if not (os.path.isfile(path) and os.path.getsize(path) == self.size
                        and _file_digest(Path(path)) == self.digest):
                    _write_verified(path, self.digest, self.size,
                                    lambda sink: self._client._download(self._ref, sink, response, op))
                spill = open(path, "rb")  # noqa: SIM115 -- kept open for the reader's lifetime
            self._spill = spill
            return spill

    def read_all(self, max_size: int | None = None) -> bytes:
        """The whole blob, digest-verified; refuses blobs over `max_size` before reading."""
        if max_size is not None and self.size > max_size:
            raise RegistryError(self._ref.registry, self._ref.repository, f"blob {self.digest}",
                                f"{self.size} bytes, over the {max_size}-byte limit")
        if self._spill is not None:
            return self._read_spans([(0, self.size)])[0]
        sink = _Sink(self.digest, self.size)
        self._client._download(self._ref, sink)
        return sink.file.getvalue()  # type: ignore[attr-defined]

    def download(self, path: str | os.PathLike[str]) -> None:
        """Download the whole blob, digest-verified, to `path`."""
        _write_verified(path, self.digest, self.size, lambda sink: self._client._download(self._ref, sink))

    def close(self) -> None:
        """Close the spill file (an anonymous temp file disappears with it)."""
        with self._lock:
            if self._spill is not None:
                self._spill.close()
                self._spill = None


# ------------------------------------------------------------------------------------- registry client


@dataclass(frozen=True)
class _Endpoint:
    """One place to send a repository's requests: the origin registry or one of its mirrors."""

    base: str  # scheme://host[:port]
    host: str  # host[:port], also the key for auth state and capability notes
    prefix: str  # put before the repository name (mirrors only)
    verify: bool | str
    credentials_host: str  # what credentials are looked up by (`docker.io` for Docker Hub's API host)

    def name(self, repository: str) -> str:
        return f"{self.prefix}/{repository}" if self.prefix else repository

    def url(self, repository: str, tail: str) -> str:
        return f"{self.base}/v2/{self.name(repository)}/{tail}"


@dataclass
class _Op:
    """One logical operation: names what failed, and bounds its total time."""

    registry: str
    repository: str
    what: str
    deadline: float

    def error(self, detail: str, cls: type[RegistryError] = RegistryError) -> RegistryError:
        return cls(self.registry, self.repository, self.what, detail)

    def remaining(self) -> float:
        return self.deadline - time.monotonic()


def _backoff(settings: RegistryConfig, attempt: int, at_least: float | None = None) -> float:
    """Exponential backoff with jitter for the `attempt`-th retry (1-based), capped at 10 s."""
    delay = min(settings.retry_backoff * 2 ** (attempt - 1), 10.0) * random.uniform(0.5, 1.0)
    return max(delay, at_least or 0.0)


def _is_loopback(host: str) -> bool:
    name = urlsplit(f"//{host}").hostname or ""
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    if value.strip().isdigit():
        return float(value.strip())
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def _parse_content_range(value: str | None) -> tuple[int, int, int | None] | None:
    """`bytes a-b/total` -> (a, b + 1, total or None)."""
    match = _CONTENT_RANGE_RE.fullmatch((value or "").strip())
    if match is None or int(match.group(2)) < int(match.group(1)):
        return None
    total = None if match.group(3) == "*" else int(match.group(3))
    return int(match.group(1)), int(match.group(2)) + 1, total


def _parse_multipart(body: bytes, boundary: bytes) -> dict[int, bytes]:
    """The parts of a `multipart/byteranges` body as {start: bytes}; ValueError if malformed."""
    delimiter = b"--" + boundary
    parts: dict[int, bytes] = {}
    pos = body.find(delimiter)
    while pos >= 0:
        pos += len(delimiter)
        if body.startswith(b"--", pos):
            return parts
        head_end = body.find(b"\r\n\r\n", pos)
        if head_end < 0:
            raise ValueError("part without a header end")
        content_range = None
        for line in body[pos:head_end].decode("latin-1").split("\r\n"):
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-range":
                content_range = _parse_content_range(value)
        if content_range is None:
            raise ValueError("part without a valid Content-Range")
        start, end, _ = content_range
        data = body[head_end + 4:head_end + 4 + end - start]
        if len(data) != end - start:
            raise ValueError("truncated part")
        parts[start] = data
        pos = body.find(delimiter, head_end + 4 + len(data))
    raise ValueError("no closing boundary")


def _boundary(content_type: str) -> bytes | None:
    kind, _, params = content_type.partition(";")
    if kind.strip().lower() != "multipart/byteranges":
        return None
    for param in params.split(";"):
        key, _, value = param.strip().partition("=")
        if key.lower() == "boundary" and value:
            return value.strip('"').encode("latin-1")
    return None


class RegistryClient:
    """Speaks the OCI distribution API to any number of registries; one per process, thread-safe.

    `credentials` maps a host[:port] (`docker.io` for Docker Hub) to (username, password); hosts not
    listed use the auth files (`auth_file_paths()`), or anonymous access.
    """

    def __init__(self, config: Config | None = None,
                 credentials: Mapping[str, tuple[str, str]] | None = None,
                 auth_files: Sequence[str | os.PathLike[str]] | None = None, pool_size: int = 32) -> None:
        self.config = config if config is not None else load_config()
        self._explicit = {h: Credentials(*c) for h, c in (credentials or {}).items()}
        self._auth_files = None if auth_files is None else [Path(p) for p in auth_files]
        self._session = requests.Session()
        # No ~/.netrc credentials added to requests or redirects; proxies come from `_request`.
        self._session.trust_env = False
        adapter = requests.adapters.HTTPAdapter(pool_connections=16, pool_maxsize=pool_size, max_retries=0)
        self._session.mount("http://", adapter)
        self._session.mount("https://", adapter)
        self._lock = threading.Lock()
        self._challenges: dict[str, tuple[str, dict[str, str]]] = {}
        self._tokens: dict[tuple[str, tuple[str, ...]], tuple[str, float]] = {}
        self._no_multirange: set[str] = set()
        self._noted: set[tuple[str, str]] = set()
        self._mirror_down: dict[str, float] = {}
        self._found_credentials: dict[tuple[str, str], Credentials | None] = {}

    def close(self) -> None:
        """Close pooled connections."""
        self._session.close()

    # ---------------------------------------------------------------------------------- endpoints

    def _endpoint(self, url_or_host: str, credentials_host: str | None = None) -> _Endpoint:
        """An endpoint for `[scheme://]host[:port][/prefix]`; no scheme means https, or http where
        `plain_http` says so (by default: loopback hosts)."""
        parts = urlsplit(url_or_host if "://" in url_or_host else f"//{url_or_host}")
        host = parts.netloc
        scheme = parts.scheme
        if not scheme:
            plain = self.config.for_host(host).plain_http
            scheme = "http" if plain or plain is None and _is_loopback(host) else "https"
        return _Endpoint(f"{scheme}://{host}", host, parts.path.strip("/"), self._verify(host),
                         credentials_host or host)

    def _verify(self, host: str) -> bool | str:
        """requests' `verify` for a host: its CA file, or False when configured `insecure`."""
        settings = self.config.for_host(host)
        return settings.ca_file or not settings.insecure

    def _request(self, method: str, url: str, **kwargs: Any) -> requests.Response:
        """session.request with the environment's proxy settings (never for loopback hosts)."""
        netloc = urlsplit(url).netloc
        proxies = {} if _is_loopback(netloc) else requests.utils.get_environ_proxies(url)
        return self._session.request(method, url, proxies=proxies, **kwargs)

    def _endpoints(self, ref: Reference, with_mirrors: bool) -> list[_Endpoint]:
        origin = self._endpoint(ref.registry, credentials_host=ref.domain)
        if not with_mirrors:
            return [origin]
        now = time.monotonic()
        mirrors = [self._endpoint(m) for m in self.config.for_host(ref.domain).mirrors]
        with self._lock:
            live = [m for m in mirrors if self._mirror_down.get(m.host, 0) <= now]
        return live + [origin]

    def _note_once(self, host: str, kind: str, message: str, *args: Any) -> None:
        with self._lock:
            if (host, kind) in self._noted:
                return
            self._noted.add((host, kind))
        log.warning(message, *args)

    # --------------------------------------------------------------------------------------- auth

    def _credentials(self, ep: _Endpoint, repository: str) -> Credentials | None:
        explicit = self._explicit.get(ep.credentials_host) or self._explicit.get(ep.host)
        if explicit is not None:
            return explicit
        key = (ep.credentials_host, repository)
        with self._lock:
            if key in self._found_credentials:
                return self._found_credentials[key]
        found = lookup_credentials(ep.credentials_host, repository, self._auth_files)
        with self._lock:
            self._found_credentials[key] = found
        return found

    def _authorization(self, ep: _Endpoint, repository: str, scopes: tuple[str, ...], op: _Op,
                       refresh: bool, extra_scopes: tuple[str, ...] = ()) -> str | None:
        """The Authorization header for `scopes` at `ep`, fetching a token if needed; None if anonymous.

        Tokens are cached by (host, scopes); `extra_scopes` (from a challenge) are asked for as well.
        """
        with self._lock:
            challenge = self._challenges.get(ep.host)
            cached = self._tokens.get((ep.host, scopes))
        if challenge is None:
            return None
        scheme, params = challenge
        if scheme == "basic":
            creds = self._credentials(ep, repository)
            if creds is None:
                raise op.error(f"{ep.host} requires credentials and none are configured", AuthError)
            raw = f"{creds.username}:{creds.password}".encode()
            return "Basic " + base64.b64encode(raw).decode("ascii")
        if cached is not None and not refresh and cached[1] > time.monotonic():
            return cached[0]
        wanted = tuple(dict.fromkeys(scopes + extra_scopes))
        token, lifetime = self._fetch_token(ep, params, wanted, repository, op)
        header = f"Bearer {token}"
        with self._lock:
            # Refresh a little early so a token never expires between header and request.
            self._tokens[(ep.host, scopes)] = (header, time.monotonic() + max(lifetime - 10, lifetime / 2))
        return header

    def _fetch_token(self, ep: _Endpoint, params: dict[str, str], scopes: tuple[str, ...],
                     repository: str, op: _Op) -> tuple[str, float]:
        realm = params["realm"]
        realm_parts = urlsplit(realm)
        creds = self._credentials(ep, repository)
        if creds is not None and realm_parts.scheme != "https" and not (
                _is_loopback(realm_parts.netloc) or self.config.for_host(realm_parts.netloc).plain_http):
            raise op.error(f"refusing to send credentials to the plain-HTTP token service at "
                           f"{realm_parts.netloc}", AuthError)
        query = ([("service", params["service"])] if params.get("service") else []) + [
            ("scope", s) for s in scopes]
        try:
            # requests drops the Authorization header itself if the token service redirects elsewhere.
            resp = self._request("GET", realm, params=query,
                                 auth=(creds.username, creds.password) if creds else None,
                                 timeout=self._timeout(op), verify=self._verify(realm_parts.netloc),
                                 allow_redirects=True, stream=True)
        except requests.exceptions.SSLError:
            raise  # not worth retrying: reported by _attempts
        except requests.RequestException as e:
            raise _Retry(f"token service {realm_parts.netloc}: {type(e).__name__}") from None
        with resp:
            if resp.status_code in (401, 403):
                who = "credentials rejected" if creds else "anonymous access refused"
                raise op.error(f"token service {realm_parts.netloc}: {who} (HTTP {resp.status_code})",
                               AuthError)
            if resp.status_code == 429 or resp.status_code >= 500:
                raise _Retry(f"token service {realm_parts.netloc}: HTTP {resp.status_code}",
                             _retry_after(resp.headers.get("Retry-After")))
            if resp.status_code != 200:
                raise op.error(f"token service {realm_parts.netloc}: HTTP {resp.status_code}", AuthError)
            try:
                body = json.loads(self._read_body(resp, 1 << 20, op))
                token = body.get("token") or body.get("access_token")
                lifetime = float(body.get("expires_in") or 60)
            except (ValueError, AttributeError, TypeError):
                token = None
        if not isinstance(token, str) or not token or any(c in token for c in "\r\n"):
            raise op.error(f"token service {realm_parts.netloc}: answer holds no usable token", AuthError)
        log.debug("got a token for %s scopes %s", ep.host, " ".join(scopes))
        return token, max(lifetime, 1.0)

    # ----------------------------------------------------------------------------------- requests

    def _timeout(self, op: _Op) -> tuple[float, float]:
        settings = self.config.for_host(op.registry)
        remaining = max(0.1, op.remaining())
        return min(settings.connect_timeout, remaining), min(settings.read_timeout, remaining)

    def _send(self, ep: _Endpoint, method: str, url: str, repository: str, scopes: tuple[str, ...],
              headers: Mapping[str, str], data: bytes | None, op: _Op) -> requests.Response:
        """One request with auth (refreshed once on 401) and redirects followed by hand."""
        refresh = refreshed = reresolved = False
        extra_scopes: tuple[str, ...] = ()
        while True:
            auth = self._authorization(ep, repository, scopes, op, refresh, extra_scopes)
            refresh = False
            sent = dict(headers, Authorization=auth) if auth else dict(headers)
            resp = self._request(method, url, headers=sent, data=data, stream=True, allow_redirects=False,
                                 timeout=self._timeout(op), verify=ep.verify)
            if resp.status_code == 401 and not refreshed:
                challenge = _parse_challenge(resp.headers.get("WWW-Authenticate", ""))
                resp.close()
                if challenge is None:
                    raise op.error("HTTP 401 without a usable WWW-Authenticate challenge", AuthError)
                if challenge[0] == "bearer":
                    extra_scopes = tuple(challenge[1].get("scope", "").split())
                with self._lock:
                    self._challenges[ep.host] = challenge
                refresh = refreshed = True
                continue
            if resp.is_redirect and method in ("GET", "HEAD"):  # uploads are never redirected here
                resp = self._follow(ep, resp, method, headers, auth, op)
                # Signed object-storage URLs expire: a 403 there means "ask the registry again".
                if resp.status_code == 403 and not reresolved:
                    resp.close()
                    log.info("redirect target refused %s of %s; resolving again", op.what, op.repository)
                    reresolved = True
                    continue
            return resp

    def _follow(self, ep: _Endpoint, resp: requests.Response, method: str, headers: Mapping[str, str],
                auth: str | None, op: _Op) -> requests.Response:
        for _ in range(MAX_REDIRECTS):
            location = urljoin(resp.url, resp.headers.get("Location", ""))
            resp.close()
            target = urlsplit(location)
            if target.scheme not in ("http", "https") or not target.netloc:
                raise op.error("redirect to an unusable location")
            same_host = target.netloc == ep.host and location.startswith(ep.base)
            sent = dict(headers, Authorization=auth) if auth and same_host else dict(headers)
            resp = self._request(method, location, headers=sent, stream=True, allow_redirects=False,
                                 timeout=self._timeout(op), verify=self._verify(target.netloc))
            if not resp.is_redirect:
                return resp
        resp.close()
        raise op.error(f"more than {MAX_REDIRECTS} redirects")

    def _read_body(self, resp: requests.Response, limit: int, op: _Op,
                   sink: Callable[[bytes], None] | None = None) -> bytes:
        """The body (or, with `sink`, feed it there), at most `limit` bytes, within the op's deadline."""
        declared = resp.headers.get("Content-Length", "")
        if declared.isdigit() and int(declared) > limit:
            raise op.error(f"answer of {declared} bytes is over the {limit}-byte limit")
        parts, total = [], 0
        for chunk in resp.iter_content(_READ_CHUNK):
            total += len(chunk)
            if total > limit:
                raise op.error(f"answer is over the {limit}-byte limit")
            if op.remaining() < 0:
                raise op.error("timed out while reading the answer", _UnavailableError)
            if sink is None:
                parts.append(chunk)
            else:
                sink(chunk)
        return b"".join(parts)

    def _call(self, ref: Reference, method: str, tail: str, what: str,
              consume: Callable[[requests.Response, _Op], T], *, ok: Iterable[int] = (200,),
              headers: Mapping[str, str] | None = None, data: bytes | None = None, push: bool = False,
              scopes: tuple[str, ...] = (), url: str | None = None, op: _Op | None = None,
              idempotent: bool = True) -> T:
        """Run one operation: mirrors (reads only) then the origin, each with retries, auth, redirects.

        `consume` is called with a response whose status is in `ok`; transport failures while it reads
        are retried like failed requests. Requests that are not `idempotent` are sent once.
        """
        settings = self.config.for_host(ref.domain)
        op = op or _Op(ref.registry, ref.repository, what, time.monotonic() + settings.operation_timeout)
        endpoints = self._endpoints(ref, with_mirrors=not push and url is None)
        for ep in endpoints[:-1]:
            try:
                return self._attempts(ep, method, ep.url(ref.repository, tail), ref.repository,
                                      (f"repository:{ep.name(ref.repository)}:pull",), headers or {}, data,
                                      set(ok), consume, op, 0)
            except _UnavailableError as e:
                with self._lock:
                    self._mirror_down[ep.host] = time.monotonic() + MIRROR_BACKOFF_SECONDS
                log.warning("mirror %s failed (%s); skipping it for %.0fs", ep.host, e.detail,
                            MIRROR_BACKOFF_SECONDS)
            except RegistryError as e:
                self._note_once(ep.host, f"mirror-{e.detail}", "mirror %s answered %s to %s; using the next "
                                "source (logged once)", ep.host, e.detail, e.what)
        origin = endpoints[-1]
        scopes = scopes or (f"repository:{ref.repository}:{'pull,push' if push else 'pull'}",)
        return self._attempts(origin, method, url or origin.url(ref.repository, tail), ref.repository,
                              scopes, headers or {}, data, set(ok), consume, op,
                              settings.retries if idempotent else 0)

    def _attempts(self, ep: _Endpoint, method: str, url: str, repository: str, scopes: tuple[str, ...],
                  headers: Mapping[str, str], data: bytes | None, ok: set[int],
                  consume: Callable[[requests.Response, _Op], T], op: _Op, retries: int) -> T:
        settings = self.config.for_host(op.registry)
        op = dataclasses.replace(op, registry=ep.host)
        attempt = 0
        while True:
            try:
                resp = self._send(ep, method, url, repository, scopes, headers, data, op)
                with resp:
                    if resp.status_code in ok:
                        return consume(resp, op)
                    if resp.status_code == 429 or resp.status_code >= 500:
                        retry_after = _retry_after(resp.headers.get("Retry-After"))
                        raise _Retry(f"HTTP {resp.status_code}", retry_after)
                    raise self._status_error(resp, op)
            except requests.exceptions.SSLError:
                raise op.error("TLS handshake or certificate verification failed",
                               _UnavailableError) from None
            except requests.RequestException as e:
                # Never str(e): requests puts URLs (signed ones too) into its messages.
                failure = _Retry(type(e).__name__)
            except _Retry as e:
                failure = e
            attempt += 1
            delay = _backoff(settings, attempt, failure.retry_after)
            if attempt > retries or delay >= op.remaining():
                bound = "" if attempt > retries else ", time bound reached"
                raise op.error(f"{failure.detail} (after {attempt} attempt(s){bound})", _UnavailableError)
            log.info("%s from %s: %s; retrying in %.2fs (%d/%d)", op.what, ep.host, failure.detail, delay,
                     attempt, retries)
            time.sleep(delay)

    @staticmethod
    def _status_error(resp: requests.Response, op: _Op) -> RegistryError:
        code = ""
        with contextlib.suppress(Exception):
            code = str(json.loads(resp.raw.read(8192, decode_content=True))["errors"][0]["code"])[:60]
        detail = f"HTTP {resp.status_code}" + (f" {code}" if code else "")
        if resp.status_code == 404:
            return op.error(detail, NotFoundError)
        if resp.status_code in (401, 403):
            return op.error(detail, AuthError)
        return op.error(detail)

    # -------------------------------------------------------------------------------------- reads

    def get_manifest(self, ref: Reference | str, reference: str | None = None) -> tuple[bytes, str, str]:
        """Fetch a manifest or index by tag or digest: (bytes, media type, verified digest)."""
        ref = as_reference(ref)
        reference = reference or ref.ref
        if reference.startswith("sha256:"):
            valid_digest(reference)
        elif not TAG_RE.fullmatch(reference):
            raise InvalidInputError(f"invalid tag {reference[:100]!r}")

        def consume(resp: requests.Response, op: _Op) -> tuple[bytes, str, str]:
            body = self._read_body(resp, MAX_MANIFEST_SIZE, op)
            digest = sha256_digest(body)
            announced = resp.headers.get("Docker-Content-Digest")
            if reference.startswith("sha256:") and digest != reference or (
                    announced and announced.startswith("sha256:") and announced != digest):
                raise op.error(f"manifest bytes hash to {digest}, not the digest asked or announced")
            return body, resp.headers.get("Content-Type", "").split(";")[0].strip(), digest

        accept = ", ".join(INDEX_TYPES + MANIFEST_TYPES)
        return self._call(ref, "GET", f"manifests/{reference}", f"manifest {reference}", consume,
                          headers={"Accept": accept})

    def blob_size(self, ref: Reference | str, digest: str) -> int:
        """The size of a blob (HEAD)."""
        ref = as_reference(ref)
        digest = valid_digest(digest)

        def consume(resp: requests.Response, op: _Op) -> int:
            size = resp.headers.get("Content-Length", "")
            if not size.isdigit():
                raise op.error("HEAD answer without Content-Length")
            return int(size)

        return self._call(ref, "HEAD", f"blobs/{digest}", f"blob {digest}", consume)

    def blob(self, ref: Reference | str, digest: str, size: int | None = None,
             spill_path: str | os.PathLike[str] | None = None) -> RegistryBlobReader:
        """A reader for one blob of `ref`'s repository (size from the descriptor, else asked by HEAD)."""
        ref = as_reference(ref)
        digest = valid_digest(digest)
        return RegistryBlobReader(self, ref, digest, self.blob_size(ref, digest) if size is None else size,
                                  spill_path)

    def _download(self, ref: Reference, sink: _Sink, response: requests.Response | None = None,
                  op: _Op | None = None) -> None:
        """Stream the whole blob into `sink` and verify it; `response`, if given, is a 200 to use first."""
        what = f"blob {sink.digest}"

        def consume(resp: requests.Response, op: _Op) -> None:
            sink.reset()
            try:
                self._read_body(resp, sink.size, op, sink.write)
                sink.finish()
            except ValueError as e:
                raise op.error(str(e)) from None

        if response is not None and op is not None:
            with response:
                try:
                    return consume(response, op)
                except (requests.RequestException, _UnavailableError):
                    log.info("%s: whole-blob answer broke off; downloading again", what)
        self._call(ref, "GET", f"blobs/{sink.digest}", what, consume)

    def _read_spans(self, ref: Reference, digest: str, size: int, spans: list[tuple[int, int]],
                    reader: RegistryBlobReader) -> list[bytes] | None:
        """Fetch (start, end) spans with Range requests; None if the registry ignores Range."""
        out: dict[int, bytes] = {}
        todo = list(spans)
        while todo:
            batch, todo = todo[:MAX_RANGES_PER_REQUEST], todo[MAX_RANGES_PER_REQUEST:]
            if len(batch) > 1 and ref.registry not in self._no_multirange:
                got = self._multi_range(ref, digest, size, batch)
                if got is not None:
                    out.update(got)
                    continue
            for start, end in batch:
                data = self._single_range(ref, digest, size, start, end, reader)
                if data is None:
                    return None
                out[start] = data
        return [out[start] for start, _ in spans]

    def _single_range(self, ref: Reference, digest: str, size: int, start: int, end: int,
                      reader: RegistryBlobReader) -> bytes | None:
        def consume(resp: requests.Response, op: _Op) -> bytes | None:
            if resp.status_code == 200:
                # Range ignored: this answer is the whole blob; keep it instead of asking again.
                self._note_once(op.registry, "no-range", "registry %s ignores Range requests (HTTP 200 "
                                "to a ranged GET of %s): downloading whole blobs once instead",
                                op.registry, op.repository)
                reader._spilled(resp, op)
                return None
            got = _parse_content_range(resp.headers.get("Content-Range"))
            if got is None or got[:2] != (start, end) or got[2] not in (None, size):
                raise op.error(f"206 answer's Content-Range {resp.headers.get('Content-Range', '')[:60]!r} "
                               f"does not match the requested bytes {start}-{end - 1}/{size}")
            body = self._read_body(resp, end - start, op)
            if len(body) != end - start:
                raise _Retry(f"short 206 body ({len(body)} of {end - start} bytes)")
            return body

        return self._call(ref, "GET", f"blobs/{digest}", f"blob {digest} bytes {start}-{end - 1}", consume,
                          ok=(200, 206), headers={"Range": f"bytes={start}-{end - 1}"})

    def _multi_range(self, ref: Reference, digest: str, size: int,
                     spans: list[tuple[int, int]]) -> dict[int, bytes] | None:
        """One multi-range request; None (and single ranges from now on) if the registry can't."""
        limit = sum(end - start for start, end in spans) + 512 * len(spans) + 4096

        def consume(resp: requests.Response, op: _Op) -> dict[int, bytes] | None:
            # 200 (the whole blob) or 400/416: no multi-range here; don't read the body.
            declared = resp.headers.get("Content-Length", "")
            if resp.status_code != 206 or declared.isdigit() and int(declared) > limit:
                return None
            body = self._read_body(resp, limit, op)
            boundary = _boundary(resp.headers.get("Content-Type", ""))
            try:
                if boundary is not None:
                    parts = _parse_multipart(body, boundary)
                else:  # a single part: the server merged the ranges
                    got = _parse_content_range(resp.headers.get("Content-Range"))
                    parts = {got[0]: body} if got and len(body) == got[1] - got[0] else {}
            except ValueError:
                return None
            starts = sorted(parts)
            out = {}
            for start, end in spans:
                i = bisect.bisect_right(starts, start) - 1
                part_start = starts[i] if i >= 0 else -1
                if part_start < 0 or part_start + len(parts[part_start]) < end:
                    return None
                out[start] = parts[part_start][start - part_start:end - part_start]
            return out

        got = self._call(ref, "GET", f"blobs/{digest}", f"blob {digest} ({len(spans)} ranges)", consume,
                         ok=(200, 206, 400, 416),
                         headers={"Range": "bytes=" + ",".join(f"{s}-{e - 1}" for s, e in spans)})
        if got is not None:
            return got
        self._note_once(ref.registry, "no-multirange", "registry %s does not answer multi-range requests "
                        "as multipart/byteranges: using one request per range", ref.registry)
        with self._lock:
            self._no_multirange.add(ref.registry)
        return None

    # -------------------------------------------------------------------------------------- push

    def push_blob(self, ref: Reference | str, digest: str, data: bytes | str | os.PathLike[str], *,
                  mount_from: str | None = None, chunk_size: int = UPLOAD_CHUNK_SIZE) -> str:
        """Upload a blob (bytes or a file path) unless present: 'exists', 'mounted' or 'uploaded'.

        `mount_from` names another repository of the same registry holding the blob (cross-repository
        mount). Blobs up to `chunk_size` go in one PUT, larger ones in PATCH chunks.
        """
        ref = as_reference(ref)
        digest = valid_digest(digest)
        path = None if isinstance(data, bytes | bytearray) else Path(data)
        size = len(data) if path is None else path.stat().st_size
        local = sha256_digest(bytes(data)) if path is None else _file_digest(path)
        if local != digest:
            raise InvalidInputError(f"data to push hashes to {local}, not {digest}")
        settings = self.config.for_host(ref.domain)
        op = _Op(ref.registry, ref.repository, f"push blob {digest}",
                 time.monotonic() + settings.operation_timeout)
        attempt = 0
        while True:
            try:
                return self._push_blob_once(ref, digest, data if path is None else path, size, mount_from,
                                            chunk_size, op)
            except _UnavailableError:
                attempt += 1
                delay = _backoff(settings, attempt)
                if attempt > settings.retries or op.remaining() < delay:
                    raise
                log.info("push of %s to %s/%s failed; starting the upload again in %.2fs", digest,
                         ref.registry, ref.repository, delay)
                time.sleep(delay)

    def _push_blob_once(self, ref: Reference, digest: str, data: bytes | Path, size: int,
                        mount_from: str | None, chunk_size: int, op: _Op) -> str:
        if self._has_blob(ref, digest, op):
            return "exists"
        status, request_url, location = self._start_upload(ref, digest, mount_from, op)
        if status == 201:
            return "mounted"

        def next_location(resp: requests.Response, op: _Op) -> str:
            if not resp.headers.get("Location"):
                raise op.error(f"HTTP {resp.status_code} without an upload Location")
            return urljoin(resp.url, resp.headers["Location"])

        upload = urljoin(request_url, location or "")
        if not location:
            raise op.error("upload started without a Location")
        octets = {"Content-Type": "application/octet-stream"}
        if size > chunk_size:
            for offset in range(0, size, chunk_size):
                chunk = _read_part(data, offset, chunk_size)
                upload = self._call(ref, "PATCH", "", op.what, next_location, ok=(202,), push=True, op=op,
                                    url=upload, data=chunk, idempotent=False, headers=dict(
                                        octets, **{"Content-Range": f"{offset}-{offset + len(chunk) - 1}"}))
            body = b""
        else:
            body = _read_part(data, 0, size)
        self._call(ref, "PUT", "", op.what, lambda resp, op: None, ok=(201,), push=True, op=op,
                   url=_add_query(upload, digest=digest), data=body, headers=octets, idempotent=False)
        return "uploaded"

    def mount_blob(self, ref: Reference | str, digest: str, from_repository: str) -> bool:
        """Make a blob of another repository of the same registry available in `ref`'s repository
        without uploading it (or find it there already); False if the registry would need the data."""
        ref = as_reference(ref)
        digest = valid_digest(digest)
        settings = self.config.for_host(ref.domain)
        op = _Op(ref.registry, ref.repository, f"mount blob {digest}",
                 time.monotonic() + settings.operation_timeout)
        if self._has_blob(ref, digest, op):
            return True
        return self._start_upload(ref, digest, from_repository, op)[0] == 201

    def _has_blob(self, ref: Reference, digest: str, op: _Op) -> bool:
        try:
            self._call(ref, "HEAD", f"blobs/{digest}", op.what, lambda resp, op: None, push=True, op=op)
        except NotFoundError:
            return False
        return True

    def _start_upload(self, ref: Reference, digest: str, mount_from: str | None,
                      op: _Op) -> tuple[int, str, str | None]:
        """POST an upload (a cross-repository mount when `mount_from` is given): status, URL, Location."""
        tail, scopes = "blobs/uploads/", (f"repository:{ref.repository}:pull,push",)
        if mount_from and mount_from != ref.repository:
            if not all(COMPONENT_RE.fullmatch(c) for c in mount_from.split("/")):
                raise InvalidInputError(f"invalid repository name {mount_from[:100]!r}")
            tail += "?" + urlencode({"mount": digest, "from": mount_from})
            scopes += (f"repository:{mount_from}:pull",)
        return self._call(ref, "POST", tail, op.what, lambda resp, op: (resp.status_code, resp.url,
                                                                         resp.headers.get("Location")),
                          ok=(201, 202), push=True, scopes=scopes, op=op, headers={"Content-Length": "0"})

    def push_manifest(self, ref: Reference | str, reference: str, data: bytes, media_type: str) -> str:
        """PUT a manifest or index under a tag or its digest; return its digest."""
        ref = as_reference(ref)
        digest = sha256_digest(data)
        if len(data) > MAX_MANIFEST_SIZE:
            raise InvalidInputError(f"manifest of {len(data)} bytes is over {MAX_MANIFEST_SIZE}")
        if reference.startswith("sha256:") and reference != digest:
            raise InvalidInputError(f"manifest hashes to {digest}, not {reference[:80]}")
        if not reference.startswith("sha256:") and not TAG_RE.fullmatch(reference):
            raise InvalidInputError(f"invalid tag {reference[:100]!r}")
        if not _MEDIA_TYPE_RE.fullmatch(media_type):
            raise InvalidInputError(f"invalid media type {media_type[:100]!r}")

        def consume(resp: requests.Response, op: _Op) -> str:
            announced = resp.headers.get("Docker-Content-Digest")
            if announced and announced != digest:
                raise op.error(f"registry stored the manifest as {announced[:80]}, expected {digest}")
            return digest

        return self._call(ref, "PUT", f"manifests/{reference}", f"push manifest {reference}", consume,
                          ok=(201,), push=True, data=data, headers={"Content-Type": media_type})


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def _read_part(data: bytes | Path, offset: int, length: int) -> bytes:
    if isinstance(data, Path):
        with open(data, "rb") as f:
            f.seek(offset)
            return f.read(length)
    return bytes(data[offset:offset + length])


def _add_query(url: str, **params: str) -> str:
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True) + list(params.items())
    return urlunsplit(parts._replace(query=urlencode(query)))


# ---------------------------------------------------------------------------------------------- images


class _RegistrySource:
    def __init__(self, client: RegistryClient, ref: Reference) -> None:
        self.client, self.ref = client, ref

    def manifest(self, reference: str) -> tuple[bytes, str, str]:
        return self.client.get_manifest(self.ref, reference)

    def blob(self, digest: str, size: int | None, spill_path: str | os.PathLike[str] | None) -> BlobReader:
        return self.client.blob(self.ref, digest, size, spill_path)


class _LayoutSource:
    def __init__(self, layout: str) -> None:
        self.layout = layout

    def manifest(self, reference: str) -> tuple[bytes, str, str]:
        if not reference.startswith("sha256:"):
            index = json.loads(self._read(Path(self.layout) / "index.json"))
            entries = [e for e in index.get("manifests") or [] if isinstance(e, dict)]
            named = [e for e in entries
                     if (e.get("annotations") or {}).get("org.opencontainers.image.ref.name") == reference]
            if not named and reference == "latest" and len(entries) == 1:
                named = entries
            if not named:
                raise NotFoundError(f"oci:{self.layout}", "-", f"manifest {reference}", "no such tag")
            reference = Descriptor.from_json(named[0]).digest
        with LayoutBlobReader(self.layout, reference) as reader:
            data = reader.read_all(MAX_MANIFEST_SIZE)
        return data, "", reference

    def _read(self, path: Path) -> bytes:
        try:
            if path.stat().st_size > MAX_MANIFEST_SIZE:
                raise InvalidInputError(f"{path} is over {MAX_MANIFEST_SIZE} bytes")
            return path.read_bytes()
        except OSError as e:
            reason = e.strerror or type(e).__name__
            raise NotFoundError(f"oci:{self.layout}", "-", "index.json", reason) from None

    def blob(self, digest: str, size: int | None, spill_path: str | os.PathLike[str] | None) -> BlobReader:
        return LayoutBlobReader(self.layout, digest, size)


@dataclass
class Image:
    """A resolved single-platform image: its manifest, parsed config and layer descriptors."""

    reference: Reference
    digest: str
    media_type: str
    manifest_bytes: bytes
    manifest: dict[str, Any]
    config_descriptor: Descriptor
    config: dict[str, Any]
    layers: list[Descriptor]
    _source: _RegistrySource | _LayoutSource = field(repr=False)

    def blob(self, digest: str, spill_path: str | os.PathLike[str] | None = None) -> BlobReader:
        """A reader for a blob of this image (a layer or the config), sized from its descriptor."""
        digest = valid_digest(digest)
        sizes = {d.digest: d.size for d in [*self.layers, self.config_descriptor]}
        return self._source.blob(digest, sizes.get(digest), spill_path)


def _json_object(data: bytes, where: tuple[str, str], what: str) -> dict[str, Any]:
    try:
        obj = json.loads(data)
    except ValueError:
        raise RegistryError(*where, what, "not valid JSON") from None
    if not isinstance(obj, dict):
        raise RegistryError(*where, what, "not a JSON object")
    return obj


def open_image(ref: Reference | str, config: Config | None = None, *, platform: str | None = None,
               client: RegistryClient | None = None) -> Image:
    """Resolve `ref` (registry or `oci:` layout) to one platform's manifest and config."""
    ref = as_reference(ref)
    source: _RegistrySource | _LayoutSource
    if ref.layout is not None:
        source, where = _LayoutSource(ref.layout), (f"oci:{ref.layout}", "-")
    else:
        source, where = _RegistrySource(client or RegistryClient(config), ref), (ref.registry, ref.repository)
    data, header_type, digest = source.manifest(ref.ref)
    manifest = _json_object(data, where, f"manifest {digest}")
    media_type = _media_type(manifest, header_type)
    if media_type in INDEX_TYPES:
        chosen = select_platform(manifest, platform, where)
        log.debug("%s: platform %s is %s", ref, platform or default_platform(), chosen.digest)
        data, header_type, digest = source.manifest(chosen.digest)
        manifest = _json_object(data, where, f"manifest {digest}")
        media_type = _media_type(manifest, header_type)
    if media_type not in MANIFEST_TYPES:
        raise RegistryError(*where, f"manifest {digest}", f"unsupported media type {media_type[:100]!r}")
    try:
        config_desc = Descriptor.from_json(manifest.get("config"))
        layers = [Descriptor.from_json(d) for d in manifest.get("layers") or []]
    except InvalidInputError as e:
        raise RegistryError(*where, f"manifest {digest}", str(e)) from None
    if config_desc.size > MAX_CONFIG_SIZE:
        raise RegistryError(*where, f"config {config_desc.digest}",
                            f"{config_desc.size} bytes, over the {MAX_CONFIG_SIZE}-byte limit")
    with source.blob(config_desc.digest, config_desc.size, None) as reader:
        image_config = _json_object(reader.read_all(MAX_CONFIG_SIZE), where, f"config {config_desc.digest}")
    return Image(ref, digest, media_type, data, manifest, config_desc, image_config, layers, source)
