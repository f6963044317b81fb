"""OCI images: resolve a reference to one platform's manifest and config, and read its blobs by byte range.

What belongs here: descriptors, platform selection, `open_image` and `Image` over a registry or a local OCI
layout (``oci:DIR[:TAG]``), and the `BlobReader`s behind one interface: `LayoutBlobReader` (pread on a
layout's blob file) and `RegistryBlobReader` (byte ranges through the public API of `RegistryClient`; a
registry that ignores Range gets the blob downloaded whole, once, into a verified spill file). What never
does: HTTP, auth, retries or any other part of the distribution protocol (regclient.py), parsing
references, the config file or auth files (config.py), eStargz/TOC parsing and the media types
(toc.py), keeping chunks (cache.py; this module hands back bytes and, at most, one whole-blob spill
file), FUSE or gRPC.

Whatever is read whole (manifests, configs, whole blobs) is size-limited before it is read and
digest-verified after; byte ranges are returned unverified (their chunks are checked against the TOC).
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import io
import json
import logging
import os
import platform as platform_module
import stat
import tempfile
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from config import Config, InvalidInputError, Reference, as_reference, valid_digest
from regclient import (
    NotFoundError,
    RegistryClient,
    RegistryError,
    WholeBlob,
    file_digest,
)
from toc import (
    DEFAULT_LIMITS,
    INDEX_TYPES,
    MANIFEST_TYPES,
    MEDIA_OCI_INDEX,
    MEDIA_OCI_MANIFEST,
    REF_NAME_ANNOTATION,
    Limits,
)

log = logging.getLogger(__name__)

_COPY_CHUNK = 256 << 10  # pread size when a layout blob is copied whole


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
    """An OCI content descriptor (the digest is validated, the size a non-negative int); `artifact_type`
    is set on the descriptors of referrer artifacts."""

    media_type: str
    digest: str
    size: int
    annotations: Mapping[str, str] = field(default_factory=dict)
    artifact_type: str = ""

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
        return cls(str(obj.get("mediaType", "")), valid_digest(obj.get("digest")), size, annotations,
                   str(obj.get("artifactType", "")))

    def to_json(self) -> dict[str, Any]:
        """The descriptor as a manifest JSON object."""
        obj: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.artifact_type:
            obj["artifactType"] = self.artifact_type
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
    _where: tuple[str, str]  # (registry or layout, repository) that errors name

    def __init__(self, digest: str, size: int) -> None:
        self.digest = valid_digest(digest)
        self.size = size

    def _clip(self, offset: int, length: int) -> tuple[int, int]:
        if offset < 0 or length < 0:
            raise InvalidInputError(f"negative offset or length ({offset}, {length})")
        offset = min(offset, self.size)
        return offset, min(length, self.size - offset)

    def read_at(self, offset: int, length: int, urgent: bool = False) -> bytes:
        """`length` bytes at `offset` (fewer at the end of the blob); `urgent`: someone waits on them (a
        registry read then ends within the range_timeout setting)."""
        return self.read_ranges([(offset, length)], urgent)[0]

    def read_ranges(self, ranges: Sequence[tuple[int, int]], urgent: bool = False) -> list[bytes]:
        """The bytes of each (offset, length), in the order given, fetched in as few requests as possible."""
        clipped = [self._clip(o, n) for o, n in ranges]
        spans = _merge_spans(clipped)
        return _slice_spans(dict(zip((s for s, _ in spans), self._read_spans(spans, urgent), strict=True)),
                            clipped)

    def _read_spans(self, spans: list[tuple[int, int]], urgent: bool) -> list[bytes]:
        raise NotImplementedError

    def _fill(self, sink: _Sink) -> None:
        """Stream the whole blob into `sink` and finish it (which checks size and digest)."""
        raise NotImplementedError

    def read_all(self, max_size: int | None = None) -> bytes:
        """The whole blob, digest-verified; refuses blobs over `max_size` before reading."""
        if max_size is not None and self.size > max_size:
            raise RegistryError(*self._where, f"blob {self.digest}",
                                f"{self.size} bytes, over the {max_size}-byte limit")
        sink = _Sink(self.digest, self.size)
        self._fill(sink)
        return sink.file.getvalue()  # type: ignore[attr-defined]

    def download(self, path: str | os.PathLike[str]) -> None:
        """Write the whole blob, digest-verified, to `path` (via a temp file renamed into place)."""
        _write_verified(path, self.digest, self.size, self._fill)

    def close(self) -> None:
        """Release files held by the reader."""

    def __enter__(self) -> BlobReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Sink:
    """A `regclient.BlobSink`: streams bytes into a file (memory by default) while hashing; `finish` checks
    size and digest."""

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


def open_regular(path: Path, where: str, what: str) -> BinaryIO:
    """`path` opened for reading, refused (RegistryError) unless it is a regular file: never blocks on a
    FIFO or reads a device (a layout's file that is a link to /dev/zero has no end)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError as e:
        raise NotFoundError(where, "-", what, e.strerror or "not in the layout") from None
    except OSError as e:
        raise RegistryError(where, "-", what, e.strerror or type(e).__name__) from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise RegistryError(where, "-", what, f"{path} is not a regular file")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


class LayoutBlobReader(BlobReader):
    """A blob of a local OCI image layout (`DIR/blobs/sha256/HEX`), read with pread."""

    def __init__(self, layout: str | os.PathLike[str], digest: str, size: int | None = None) -> None:
        self._where = (f"oci:{layout}", "-")
        path = Path(layout) / "blobs" / "sha256" / valid_digest(digest)[len("sha256:"):]
        self._file = open_regular(path, self._where[0], f"blob {digest}")
        actual = os.fstat(self._file.fileno()).st_size
        if size is not None and size != actual:
            self._file.close()
            raise RegistryError(*self._where, f"blob {digest}", f"{actual} bytes, expected {size}")
        super().__init__(digest, actual)

    def _read_spans(self, spans: list[tuple[int, int]], urgent: bool) -> list[bytes]:
        return [os.pread(self._file.fileno(), end - start, start) for start, end in spans]

    def _fill(self, sink: _Sink) -> None:
        for offset in range(0, self.size, _COPY_CHUNK):
            sink.write(os.pread(self._file.fileno(), _COPY_CHUNK, offset))
        try:
            sink.finish()
        except ValueError as e:
            raise RegistryError(*self._where, f"blob {self.digest}", str(e)) from None

    def fileno(self) -> int:
        """The open blob file (for a decoder that reads it without Python)."""
        return self._file.fileno()

    def close(self) -> None:
        """Close the blob file."""
        self._file.close()


class RegistryBlobReader(BlobReader):
    """A blob in a registry, read with HTTP Range requests through a `RegistryClient`.

    The size is the descriptor's, else asked of the registry (HEAD). If the registry ignores Range, the
    blob is downloaded whole once, to `spill_path` (kept, so a caller can reuse it) or to an anonymous temp
    file, and every read is served from there.
    """

    def __init__(self, client: RegistryClient, ref: Reference | str, digest: str, size: int | None = None,
                 spill_path: str | os.PathLike[str] | None = None) -> None:
        ref = as_reference(ref)
        super().__init__(digest, client.blob_size(ref, digest) if size is None else size)
        self._client, self._ref, self._spill_path = client, ref, spill_path
        self._where = (ref.registry, ref.repository)
        self._lock = threading.Lock()
        self._spill: BinaryIO | None = None
        self.ranges_supported = None

    def _read_spans(self, spans: list[tuple[int, int]], urgent: bool) -> list[bytes]:
        if self._spill is None and self.ranges_supported is not False:
            got = self._client.read_spans(self._ref, self.digest, self.size, spans, self._spilled, urgent)
            if got is not None:
                self.ranges_supported = True
                return got
        fd = self._spilled().fileno()
        return [os.pread(fd, end - start, start) for start, end in spans]

    def _fill(self, sink: _Sink) -> None:
        self._client.download(self._ref, self.digest, self.size, sink)

    def _spilled(self, whole: WholeBlob | None = None) -> BinaryIO:
        """The verified whole-blob copy, downloaded once (by `whole`, the registry's answer, if given)."""
        fill = whole or self._fill
        with self._lock:
            self.ranges_supported = False
            if self._spill is not None:
                return self._spill
            if self._spill_path is None:
                spill = tempfile.TemporaryFile()  # noqa: SIM115 -- kept open for the reader's lifetime
                try:
                    fill(_Sink(self.digest, self.size, spill))
                except BaseException:
                    spill.close()
                    raise
            else:
                path = self._spill_path
                if not (os.path.isfile(path) and os.path.getsize(path) == self.size
                        and file_digest(path) == self.digest):
                    _write_verified(path, self.digest, self.size, fill)
                spill = open(path, "rb")  # noqa: SIM115 -- kept open for the reader's lifetime
            self._spill = spill
            return spill

    def read_all(self, max_size: int | None = None) -> bytes:
        """The whole blob, digest-verified; from the spilled copy if there is one."""
        if self._spill is not None and (max_size is None or self.size <= max_size):
            return self._read_spans([(0, self.size)], False)[0]
        return super().read_all(max_size)

    def close(self) -> None:
        """Close the spill file (an anonymous temp file disappears with it)."""
        with self._lock:
            if self._spill is not None:
                self._spill.close()
                self._spill = None



# ---------------------------------------------------------------------------------------------- images


class _RegistrySource:
    def __init__(self, client: RegistryClient, ref: Reference) -> None:
        self.client, self.ref = client, ref

    def manifest(self, reference: str) -> tuple[bytes, str, str]:
        return self.client.get_manifest(self.ref, reference)

    def blob(self, digest: str, size: int | None, spill_path: str | os.PathLike[str] | None) -> BlobReader:
        return RegistryBlobReader(self.client, self.ref, digest, size, spill_path)


class _LayoutSource:
    def __init__(self, layout: str, limits: Limits) -> None:
        self.layout, self.limits = layout, limits

    def manifest(self, reference: str) -> tuple[bytes, str, str]:
        if not reference.startswith("sha256:"):
            reference = self._tagged(reference)
        with LayoutBlobReader(self.layout, reference) as reader:
            data = reader.read_all(self.limits.manifest_size)
        return data, "", reference

    def _tagged(self, tag: str) -> str:
        """The digest `index.json` gives for `tag` (its only manifest for `latest`)."""
        where = (f"oci:{self.layout}", "-")
        path = Path(self.layout) / "index.json"
        with open_regular(path, where[0], "index.json") as f:
            data = f.read(self.limits.manifest_size + 1)
        if len(data) > self.limits.manifest_size:
            raise RegistryError(*where, "index.json", f"{path} is over {self.limits.manifest_size} bytes "
                                "(limits.manifest_size)")
        manifests = _json_object(data, where, "index.json").get("manifests") or []
        if not isinstance(manifests, list) or not all(isinstance(e, dict) for e in manifests):
            raise RegistryError(*where, "index.json", "'manifests' is not a list of descriptors")
        named = []
        for entry in manifests:
            annotations = entry.get("annotations") or {}
            if not isinstance(annotations, dict):
                raise RegistryError(*where, "index.json", "a descriptor's 'annotations' is not an object")
            if annotations.get(REF_NAME_ANNOTATION) == tag:
                named.append(entry)
        if not named and tag == "latest" and len(manifests) == 1:
            named = manifests
        if not named:
            raise NotFoundError(*where, f"manifest {tag}", "no such tag")
        try:
            return Descriptor.from_json(named[0]).digest
        except InvalidInputError as e:
            raise RegistryError(*where, "index.json", str(e)) from None

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

    @property
    def client(self) -> RegistryClient | None:
        """The registry client the image is read through (None for an OCI layout)."""
        return self._source.client if isinstance(self._source, _RegistrySource) else None

    @property
    def descriptor(self) -> Descriptor:
        """The descriptor of this image's manifest (what a referrer artifact names as its subject)."""
        return Descriptor(self.media_type, self.digest, len(self.manifest_bytes))

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
        limits = client.config.limits if client is not None else config.limits if config else DEFAULT_LIMITS
        source, where = _LayoutSource(ref.layout, limits), (f"oci:{ref.layout}", "-")
    else:
        client = client or RegistryClient(config)
        source, where = _RegistrySource(client, ref), (ref.registry, ref.repository)
        limits = client.config.limits
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
    what = f"config {config_desc.digest}"
    if config_desc.size > limits.config_size:
        raise RegistryError(*where, what, f"{config_desc.size} bytes, over the {limits.config_size}-byte "
                            "limit (limits.config_size)")
    with source.blob(config_desc.digest, config_desc.size, None) as reader:
        image_config = _json_object(reader.read_all(limits.config_size), where, what)
    return Image(ref, digest, media_type, data, manifest, config_desc, image_config, layers, source)
