"""Which image, from where, as whom: image references, the registry part of the YAML config, and
credentials from docker/containers auth files.

What belongs here: parsing and validating what a user gives lazymount to name an image (references,
digests), per-registry settings (mirrors, plain HTTP, TLS, timeouts, retries) and where credentials are
found.  What never does: speaking to a registry (regclient.py), or anything about layer formats (toc.py).
Passwords never reach a log line, an error message or a repr.
"""

from __future__ import annotations

import base64
import dataclasses
import errno
import json
import logging
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from toc import DEFAULT_LIMITS, LazymountError, Limits, check_digest

log = logging.getLogger(__name__)

DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"
_DOCKER_HUB_AUTH_KEYS = ("docker.io", "index.docker.io", "registry-1.docker.io", "https://index.docker.io/v1/")

TAG_RE = re.compile(r"[\w][\w.-]{0,127}")
COMPONENT_RE = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_DOMAIN_RE = re.compile(r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9-]+)*|\[[0-9A-Fa-f:.]+\])"
                        r"(?::[0-9]{1,5})?")


class InvalidInputError(LazymountError):
    """A reference, digest, platform, credential or config value given to lazymount is malformed."""

    errno = errno.EINVAL


# ------------------------------------------------------------------------------------------- references


@dataclass(frozen=True)
class Reference:
    """An image reference: `domain/repository[:tag][@digest]`, or a local layout (`layout` set)."""

    domain: str
    repository: str
    tag: str | None = None
    digest: str | None = None
    layout: str | None = None

    @property
    def registry(self) -> str:
        """The host[:port] the API is spoken to (Docker Hub's API lives at registry-1.docker.io)."""
        return DOCKER_HUB_API if self.domain == DOCKER_HUB else self.domain

    @property
    def ref(self) -> str:
        """What goes after `/manifests/`: the digest if there is one, else the tag, else `latest`."""
        return self.digest or self.tag or "latest"

    def with_ref(self, tag: str | None = None, digest: str | None = None) -> Reference:
        """The same repository with another tag/digest."""
        return dataclasses.replace(self, tag=tag, digest=digest)

    def __str__(self) -> str:
        base = f"oci:{self.layout}" if self.layout is not None else f"{self.domain}/{self.repository}"
        return base + (f":{self.tag}" if self.tag else "") + (f"@{self.digest}" if self.digest else "")


def valid_digest(digest: str) -> str:
    """`digest` if it is a well-formed sha256 digest; InvalidInputError otherwise."""
    try:
        return check_digest(digest)
    except LazymountError:
        raise InvalidInputError(f"invalid digest {str(digest)[:80]!r}") from None


def absolute_reference(text: str) -> str:
    """`text` with an `oci:` layout directory made absolute (for a daemon that works from /)."""
    return "oci:" + os.path.abspath(text[4:]) if text.startswith("oci:") and text[4:] else text


def parse_reference(text: str) -> Reference:
    """Parse `[host[:port]/]name[:tag][@digest]` (Docker Hub normalized) or `oci:DIR[:TAG|@DIGEST]`."""
    if not isinstance(text, str) or not text or len(text) > 4096 or "\0" in text:
        raise InvalidInputError(f"invalid image reference {str(text)[:100]!r}")
    if text.startswith("oci:"):
        rest, tag, digest = text[4:], None, None
        if "@" in rest:
            rest, digest = rest.rsplit("@", 1)
            digest = valid_digest(digest)
        else:
            head, sep, tail = rest.rpartition(":")
            if sep and head and TAG_RE.fullmatch(tail):
                rest, tag = head, tail
        if not rest:
            raise InvalidInputError(f"image reference {text[:100]!r} names no layout directory")
        return Reference("", "", tag, digest, layout=rest)
    name, _, digest = text.partition("@")
    digest = valid_digest(digest) if digest else None
    tag = None
    if name.rfind(":") > name.rfind("/"):
        name, tag = name.rsplit(":", 1)
        if not TAG_RE.fullmatch(tag):
            raise InvalidInputError(f"invalid tag in image reference {text[:100]!r}")
    first, sep, remainder = name.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost" or first.startswith("[")):
        domain, path = first, remainder
        if not _DOMAIN_RE.fullmatch(domain):
            raise InvalidInputError(f"invalid registry host in image reference {text[:100]!r}")
    else:
        domain, path = DOCKER_HUB, name
    if domain == "index.docker.io":
        domain = DOCKER_HUB
    if domain == DOCKER_HUB and "/" not in path:
        path = "library/" + path
    if len(path) > 255 or not all(COMPONENT_RE.fullmatch(c) for c in path.split("/")):
        raise InvalidInputError(f"invalid repository name in image reference {text[:100]!r}")
    return Reference(domain, path, tag, digest)


def as_reference(ref: Reference | str) -> Reference:
    """`ref`, parsed if it is a string."""
    return ref if isinstance(ref, Reference) else parse_reference(ref)


# ----------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class RegistryConfig:
    """How to talk to one registry host (or, as `Config.defaults`, to any host not listed).

    `mirrors` are `[scheme://]host[:port][/prefix]`, tried in order before the origin for reads; the
    prefix is put before the repository name (a Harbor proxy-cache project, say). `plain_http`: None
    means plain HTTP for loopback hosts only. `insecure` skips TLS certificate verification.
    `operation_timeout` bounds each operation (all its retries, and the whole body of a whole-blob
    download: raise it for huge layers on slow links); `read_timeout` bounds each wait for bytes;
    `range_timeout` bounds a byte-range read that a program waits on through a mount (all its attempts:
    such a read returns EIO by then, and the kernel may ask twice before it gives up).
    """

    mirrors: tuple[str, ...] = ()
    plain_http: bool | None = None
    insecure: bool = False
    ca_file: str | None = None
    connect_timeout: float = 10.0
    read_timeout: float = 30.0
    retries: int = 4
    retry_backoff: float = 0.25
    operation_timeout: float = 300.0
    range_timeout: float = 25.0


@dataclass(frozen=True)
class Config:
    """Per-registry settings by host[:port] (Docker Hub as `docker.io`), the defaults for others, and the
    limits on sizes that images decide (toc.Limits)."""

    registries: Mapping[str, RegistryConfig] = field(default_factory=dict)
    defaults: RegistryConfig = RegistryConfig()
    limits: Limits = DEFAULT_LIMITS

    def for_host(self, host: str) -> RegistryConfig:
        """The settings for `host`."""
        if host == DOCKER_HUB_API and host not in self.registries:
            host = DOCKER_HUB
        return self.registries.get(host, self.defaults)


def config_search_path() -> list[Path]:
    """Where `load_config` looks when given no path: $LAZYMOUNT_CONFIG, the user's, then the system's."""
    paths = [Path(os.environ["LAZYMOUNT_CONFIG"])] if os.environ.get("LAZYMOUNT_CONFIG") else []
    xdg = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return paths + [Path(xdg) / "lazymount" / "config.yaml", Path("/etc/lazymount/config.yaml")]


def _registry_config(values: Mapping[str, Any], base: RegistryConfig, where: str) -> RegistryConfig:
    kinds = {f.name: f.type for f in dataclasses.fields(RegistryConfig)}
    out: dict[str, Any] = {}
    for key, value in values.items():
        if key not in kinds:
            raise InvalidInputError(f"{where}: unknown setting {key!r} (known: {', '.join(kinds)})")
        kind = kinds[key]
        if key == "mirrors":
            if not isinstance(value, list) or not all(isinstance(m, str) and m for m in value):
                raise InvalidInputError(f"{where}: mirrors must be a list of URLs")
            value = tuple(value)
        elif value is None and "None" in kind:
            pass
        elif "bool" in kind and not isinstance(value, bool):
            raise InvalidInputError(f"{where}: {key} must be true or false")
        elif kind in ("float", "int") and (isinstance(value, bool) or not isinstance(value, int | float)
                                           or value < 0):
            raise InvalidInputError(f"{where}: {key} must be a non-negative number")
        elif kind == "int":
            value = int(value)
        elif "str" in kind and not isinstance(value, str):
            raise InvalidInputError(f"{where}: {key} must be a string")
        out[key] = value
    return dataclasses.replace(base, **out)


def _limits(values: Any, where: str) -> Limits:
    if not isinstance(values, dict):
        raise InvalidInputError(f"{where} must be a mapping")
    known = [f.name for f in dataclasses.fields(Limits)]
    for key, value in values.items():
        if key not in known:
            raise InvalidInputError(f"{where}: unknown limit {key!r} (known: {', '.join(known)})")
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise InvalidInputError(f"{where}: {key} must be a positive whole number")
    return dataclasses.replace(DEFAULT_LIMITS, **values)


def load_config(path: str | os.PathLike[str] | None = None, **overrides: Any) -> Config:
    """Load the YAML config (`path`, else the first file of `config_search_path()` that exists).

    This module reads three top-level keys, ``registry_defaults: {SETTING: VALUE}`` and
    ``registries: {HOST: {SETTING: VALUE}}``, settings being the fields of `RegistryConfig`, and
    ``limits: {LIMIT: VALUE}``, the fields of `toc.Limits`; other top-level keys belong to other modules.
    Keyword `overrides` (explicit arguments, e.g. ``retries=2``) win over the file for every registry.
    """
    candidates = [Path(path)] if path is not None else config_search_path()
    data: Any = {}
    source = "built-in defaults"
    for candidate in candidates:
        if path is None and not candidate.is_file():
            continue
        import yaml  # only when there is a file to read: it costs ~10 ms of start-up

        try:
            with open(candidate, encoding="utf-8") as f:
                data = yaml.safe_load(f) or {}
        except (OSError, yaml.YAMLError) as e:
            raise InvalidInputError(f"cannot read config {candidate}: {type(e).__name__}") from None
        source = str(candidate)
        break
    if not isinstance(data, dict) or not isinstance(data.get("registry_defaults") or {}, dict) \
            or not isinstance(data.get("registries") or {}, dict):
        raise InvalidInputError(f"{source}: top level, registry_defaults and registries must be mappings")
    defaults = _registry_config(data.get("registry_defaults") or {}, RegistryConfig(),
                                f"{source}: registry_defaults")
    registries = {}
    for host, values in (data.get("registries") or {}).items():
        if not isinstance(values, dict):
            raise InvalidInputError(f"{source}: registries.{host} must be a mapping")
        registries[str(host)] = _registry_config(values, defaults, f"{source}: registries.{host}")
    if overrides:
        defaults = _registry_config(overrides, defaults, "explicit settings")
        registries = {h: _registry_config(overrides, c, "explicit settings") for h, c in registries.items()}
    log.debug("registry config from %s: %d registries", source, len(registries))
    return Config(registries, defaults, _limits(data.get("limits") or {}, f"{source}: limits"))


# ------------------------------------------------------------------------------------------ credentials


@dataclass(frozen=True, repr=False)
class Credentials:
    """A username and password (or token); repr never shows the password."""

    username: str
    password: str

    def __repr__(self) -> str:
        return f"Credentials(username={self.username!r}, password=<hidden>)"


def auth_file_paths() -> list[Path]:
    """Auth files searched, in order: $REGISTRY_AUTH_FILE, containers' auth.json, docker's config.json."""
    paths = []
    if os.environ.get("REGISTRY_AUTH_FILE"):
        paths.append(Path(os.environ["REGISTRY_AUTH_FILE"]))
    if os.environ.get("XDG_RUNTIME_DIR"):
        paths.append(Path(os.environ["XDG_RUNTIME_DIR"]) / "containers" / "auth.json")
    docker_dir = os.environ.get("DOCKER_CONFIG") or os.path.join(os.path.expanduser("~"), ".docker")
    return paths + [Path(docker_dir) / "config.json"]


def _auth_key(key: str) -> str:
    """An `auths` key as host[/path]: docker writes URLs (`https://host/v1/`), podman host[/namespace]."""
    if "://" in key:
        return urlsplit(key).netloc
    return key.rstrip("/")


def _decode_auth(entry: Any, where: str) -> Credentials | None:
    if not isinstance(entry, dict) or not isinstance(entry.get("auth"), str) or not entry["auth"]:
        return None
    try:
        user, sep, password = base64.b64decode(entry["auth"], validate=True).decode("utf-8").partition(":")
    except (ValueError, UnicodeDecodeError):
        sep = ""
    if not sep:
        log.warning("ignoring a malformed 'auth' value in %s", where)
        return None
    return Credentials(user, password)


def lookup_credentials(host: str, repository: str = "",
                       paths: Iterable[Path] | None = None) -> Credentials | None:
    """Credentials for `host` (most specific `host/namespace` key first) from the auth files."""
    hosts = _DOCKER_HUB_AUTH_KEYS if host in (DOCKER_HUB, DOCKER_HUB_API) else (host,)
    parts = repository.split("/") if repository else []
    wanted = [f"{h}/{'/'.join(parts[:n])}" if n else h for n in range(len(parts), -1, -1) for h in hosts]
    for path in auth_file_paths() if paths is None else paths:
        try:
            with open(path, encoding="utf-8") as f:
                auths = json.load(f).get("auths") or {}
        except FileNotFoundError:
            continue
        except (OSError, ValueError, AttributeError) as e:
            log.warning("ignoring unreadable auth file %s (%s)", path, type(e).__name__)
            continue
        if not isinstance(auths, dict):
            continue
        by_key = {_auth_key(k): v for k, v in auths.items() if isinstance(k, str)}
        for key in wanted:
            creds = _decode_auth(by_key.get(_auth_key(key)), str(path))
            if creds is not None:
                log.debug("credentials for %s from %s", key, path)
                return creds
        if any(k in by_key for k in wanted):
            log.info("%s has an entry for %s without an inline 'auth' (credential helpers are not "
                     "supported)", path, host)
    return None
