"""OCI registry client: the distribution protocol over HTTP, for manifests and blobs by digest.

What belongs here: `RegistryClient`, its transport (endpoints and mirrors, auth challenges and tokens with
credentials found through config.py, TLS, retries and backoff, redirects, status errors) and operations
(manifests, the referrers API, blob sizes, byte ranges by single and multi-range requests, whole-blob
downloads into a caller's sink, uploads and cross-repository mounts). What never does: images, platforms,
blob readers, spill files and OCI layouts (fetch.py), referrer artifacts (referrers.py), references, config
and auth files (config.py), TOCs (toc.py), chunks (cache.py), FUSE or gRPC.

Everything a registry sends is untrusted: digests are validated before they enter a URL, what is read
whole is size-limited before and digest-verified after, and every 206 must answer exactly the range asked.
Secrets (passwords, tokens, signed redirect URLs) never reach a log line or an error message, and
Authorization is never sent to a host other than the registry's (redirects are followed by hand).
"""

from __future__ import annotations

import base64
import bisect
import contextlib
import dataclasses
import errno
import hashlib
import ipaddress
import json
import logging
import os
import random
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar
from urllib.parse import parse_qsl, urlencode, urljoin, urlsplit, urlunsplit

import requests
import requests.adapters
import requests.utils

import transport
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
from toc import INDEX_TYPES, MANIFEST_TYPES, MEDIA_OCI_INDEX, LazymountError, sha256_digest

log = logging.getLogger(__name__)
T = TypeVar("T")

UPLOAD_CHUNK_SIZE = 16 << 20  # blobs up to this go in one PUT; larger ones in PATCH chunks of this size
MAX_RANGES_PER_REQUEST = 64  # keeps the Range header well under common 8 KiB header limits
MAX_REDIRECTS = 5
MIRROR_BACKOFF_SECONDS = 30.0  # a mirror that failed at the transport level is skipped this long
_READ_CHUNK = 256 << 10

_MEDIA_TYPE_RE = re.compile(r"[\w.+-]+/[\w.+-]+")


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


class BlobSink(Protocol):
    """Where `RegistryClient.download` streams a blob: `reset` before every attempt, `write` the bytes in
    order, then `finish`, which raises ValueError unless they were the whole, intact blob."""

    def reset(self) -> None: ...

    def write(self, data: bytes) -> None: ...

    def finish(self) -> None: ...


WholeBlob = Callable[[BlobSink], None]  # streams a whole blob into a sink


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
        adapter = transport.Adapter(pool_connections=16, pool_maxsize=pool_size, max_retries=0)
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
                             transport.retry_after(resp.headers.get("Retry-After")))
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
                challenge = transport.parse_challenge(resp.headers.get("WWW-Authenticate", ""))
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
              idempotent: bool = True, timeout: float | None = None) -> T:
        """Run one operation: mirrors (reads only) then the origin, each with retries, auth, redirects.

        `consume` is called with a response whose status is in `ok`; transport failures while it reads
        are retried like failed requests. Requests that are not `idempotent` are sent once. The whole
        operation ends within `timeout` (default: the registry's operation_timeout).
        """
        settings = self.config.for_host(ref.domain)
        op = op or _Op(ref.registry, ref.repository, what,
                       time.monotonic() + (timeout or settings.operation_timeout))
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
                with transport.until(op.deadline) as watch:
                    resp = self._send(ep, method, url, repository, scopes, headers, data, op)
                    with resp:
                        if resp.status_code in ok:
                            return consume(resp, op)
                        if resp.status_code == 429 or resp.status_code >= 500:
                            retry_after = transport.retry_after(resp.headers.get("Retry-After"))
                            raise _Retry(f"HTTP {resp.status_code}", retry_after)
                        raise self._status_error(resp, op)
            except requests.exceptions.SSLError:
                if watch.expired:
                    raise op.error("timed out", _UnavailableError) from None
                raise op.error("TLS handshake or certificate verification failed",
                               _UnavailableError) from None
            except requests.RequestException as e:
                # Never str(e): requests puts URLs (signed ones too) into its messages.
                failure = _Retry("timed out" if watch.expired else type(e).__name__)
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
            body = self._read_body(resp, self.config.limits.manifest_size, op)
            digest = sha256_digest(body)
            announced = resp.headers.get("Docker-Content-Digest")
            if reference.startswith("sha256:") and digest != reference or (
                    announced and announced.startswith("sha256:") and announced != digest):
                raise op.error(f"manifest bytes hash to {digest}, not the digest asked or announced")
            return body, resp.headers.get("Content-Type", "").split(";")[0].strip(), digest

        accept = ", ".join(INDEX_TYPES + MANIFEST_TYPES)
        return self._call(ref, "GET", f"manifests/{reference}", f"manifest {reference}", consume,
                          headers={"Accept": accept})

    def get_referrers(self, ref: Reference | str, digest: str,
                      artifact_type: str | None = None) -> bytes | None:
        """The OCI 1.1 referrers API's index of the manifests whose subject is `digest` (unverified JSON,
        size-limited; the registry may ignore the `artifact_type` filter); None if the registry has no
        referrers API (HTTP 404, which the API itself never answers)."""
        ref = as_reference(ref)
        tail = f"referrers/{valid_digest(digest)}"
        if artifact_type:
            if not _MEDIA_TYPE_RE.fullmatch(artifact_type):
                raise InvalidInputError(f"invalid artifact type {artifact_type[:100]!r}")
            tail += "?" + urlencode({"artifactType": artifact_type})
        try:
            return self._call(ref, "GET", tail, f"referrers of {digest}",
                              lambda resp, op: self._read_body(resp, self.config.limits.manifest_size, op),
                              headers={"Accept": MEDIA_OCI_INDEX})
        except NotFoundError:
            return None

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

    def download(self, ref: Reference | str, digest: str, size: int, sink: BlobSink) -> None:
        """Stream the whole blob (`size` bytes) into `sink` and have it verified (`sink.finish`)."""
        self._download(as_reference(ref), valid_digest(digest), size, sink)

    def _download(self, ref: Reference, digest: str, size: int, sink: BlobSink,
                  response: requests.Response | None = None, op: _Op | None = None) -> None:
        """`download`; `response`, if given, is a 200 whose body is the blob, used first."""
        what = f"blob {digest}"

        def consume(resp: requests.Response, op: _Op) -> None:
            sink.reset()
            try:
                self._read_body(resp, size, op, sink.write)
                sink.finish()
            except ValueError as e:
                raise op.error(str(e)) from None

        if response is not None and op is not None:
            with response:
                try:
                    return consume(response, op)
                except (requests.RequestException, _UnavailableError):
                    log.info("%s: whole-blob answer broke off; downloading again", what)
        self._call(ref, "GET", f"blobs/{digest}", what, consume)

    def read_spans(self, ref: Reference | str, digest: str, size: int, spans: Sequence[tuple[int, int]],
                   on_whole_blob: Callable[[WholeBlob], object], urgent: bool = False) -> list[bytes] | None:
        """The bytes of each (start, end) span (sorted, disjoint, within the blob's `size`) by Range requests.

        None if the registry ignores Range: it answered with the whole blob, and `on_whole_blob` was called
        with a function that streams that blob into a sink (starting with the answer already received; a
        caller that has the blob already need not call it).  An `urgent` read (someone waits on it) ends
        within the registry's range_timeout, else within its operation_timeout.
        """
        ref, digest = as_reference(ref), valid_digest(digest)
        settings = self.config.for_host(ref.domain)
        timeout = min(settings.range_timeout, settings.operation_timeout) if urgent else None
        out: dict[int, bytes] = {}
        todo = list(spans)
        while todo:
            batch, todo = todo[:MAX_RANGES_PER_REQUEST], todo[MAX_RANGES_PER_REQUEST:]
            if len(batch) > 1 and ref.registry not in self._no_multirange:
                got = self._multi_range(ref, digest, size, batch, timeout)
                if got is not None:
                    out.update(got)
                    continue
            for start, end in batch:
                data = self._single_range(ref, digest, size, start, end, on_whole_blob, timeout)
                if data is None:
                    return None
                out[start] = data
        return [out[start] for start, _ in spans]

    def _single_range(self, ref: Reference, digest: str, size: int, start: int, end: int,
                      on_whole_blob: Callable[[WholeBlob], object], timeout: float | None) -> bytes | None:
        def consume(resp: requests.Response, op: _Op) -> bytes | None:
            if resp.status_code == 200:
                # Range ignored: this answer is the whole blob; keep it instead of asking again.
                self._note_once(op.registry, "no-range", "registry %s ignores Range requests (HTTP 200 "
                                "to a ranged GET of %s): downloading whole blobs once instead",
                                op.registry, op.repository)
                on_whole_blob(lambda sink: self._download(ref, digest, size, sink, resp, op))
                return None
            got = transport.parse_content_range(resp.headers.get("Content-Range"))
            if got is None or got[:2] != (start, end) or got[2] not in (None, size):
                raise op.error(f"206 answer's Content-Range {resp.headers.get('Content-Range', '')[:60]!r} "
                               f"does not match the requested bytes {start}-{end - 1}/{size}")
            body = self._read_body(resp, end - start, op)
            if len(body) != end - start:
                raise _Retry(f"short 206 body ({len(body)} of {end - start} bytes)")
            return body

        return self._call(ref, "GET", f"blobs/{digest}", f"blob {digest} bytes {start}-{end - 1}", consume,
                          ok=(200, 206), headers={"Range": f"bytes={start}-{end - 1}"}, timeout=timeout)

    def _multi_range(self, ref: Reference, digest: str, size: int, spans: list[tuple[int, int]],
                     timeout: float | None) -> dict[int, bytes] | None:
        """One multi-range request; None (and single ranges from now on) if the registry can't."""
        limit = sum(end - start for start, end in spans) + 512 * len(spans) + 4096

        def consume(resp: requests.Response, op: _Op) -> dict[int, bytes] | None:
            # 200 (the whole blob) or 400/416: no multi-range here; don't read the body.
            declared = resp.headers.get("Content-Length", "")
            if resp.status_code != 206 or declared.isdigit() and int(declared) > limit:
                return None
            body = self._read_body(resp, limit, op)
            boundary = transport.multipart_boundary(resp.headers.get("Content-Type", ""))
            try:
                if boundary is not None:
                    parts = transport.parse_multipart(body, boundary)
                else:  # a single part: the server merged the ranges
                    got = transport.parse_content_range(resp.headers.get("Content-Range"))
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
                         headers={"Range": "bytes=" + ",".join(f"{s}-{e - 1}" for s, e in spans)},
                         timeout=timeout)
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
        local = sha256_digest(bytes(data)) if path is None else file_digest(path)
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
        limit = self.config.limits.manifest_size
        if len(data) > limit:
            raise InvalidInputError(f"manifest of {len(data)} bytes is over {limit} (limits.manifest_size)")
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


def file_digest(path: str | os.PathLike[str]) -> str:
    """The `sha256:<hex>` digest of a file's contents, read as a stream."""
    with open(path, "rb") as f:
        return "sha256:" + hashlib.file_digest(f, "sha256").hexdigest()


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
