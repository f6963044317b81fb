"""The eStargz and zstd:chunked layer formats: footer, TOC, chunk verification, and the shared names.

What belongs here: byte layouts (footers, constants), parsing the TOC into a compact index, decompressing
and verifying one chunk, digest helpers, the OCI media types and annotation keys, and the error hierarchy
of the whole project (this is the module every other one imports).  What never does: writing a layer
(layerwriter.py), I/O of its own (readers are callables handed in), FUSE, HTTP, caching, and any import of
another project module.
"""

from __future__ import annotations

import bisect
import errno
import hashlib
import io
import json
import re
import struct
import sys
import tarfile
import zlib
from array import array
from base64 import b64decode
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

from isal import isal_zlib


class LazymountError(Exception):
    """Base of every error lazymount reports to a user; `errno` is what a FUSE read answers."""

    errno = errno.EIO


class FormatError(LazymountError):
    """A layer blob is not what its format promises."""


class FooterError(FormatError):
    """The blob ends in no eStargz, legacy stargz or zstd:chunked footer."""


class TruncatedError(FormatError):
    """The blob, its TOC or a chunk ends early, or an offset points outside the blob."""


class TOCError(FormatError):
    """The TOC is not valid JSON or not a valid table of contents."""


class UnsafePathError(TOCError):
    """An entry name or hardlink target escapes the layer (`..`, absolute, NUL, empty component)."""


class DigestError(FormatError):
    """Content does not match the digest that was promised for it."""


TOC_TAR_NAME = "stargz.index.json"
PREFETCH_LANDMARK = ".prefetch.landmark"
NO_PREFETCH_LANDMARK = ".no.prefetch.landmark"
LANDMARK_CONTENT = b"\x0f"
DEFAULT_CHUNK_SIZE = 4 << 20
MAX_TOC_BYTES = 1 << 30  # uncompressed TOC JSON; ~3 KB per entry for a million entries

# eStargz footer, 51 bytes: gzip header with FEXTRA (10) + XLEN (2) + subfield 'S','G' + LEN (2+2)
# + "%016x" TOC offset + "STARGZ" (22) + empty stored deflate block (5) + CRC32 and ISIZE (8).
FOOTER_SIZE = 51
# Legacy stargz footer, 47 bytes: the same without the subfield header (XLEN = 22).
LEGACY_FOOTER_SIZE = 47
_GZIP_EXTRA_HEADER = b"\x1f\x8b\x08\x04\x00\x00\x00\x00\x00\xff"
_EMPTY_DEFLATE_TAIL = b"\x01\x00\x00\xff\xff" + b"\x00" * 8
# zstd:chunked (stargz-snapshotter flavour), the last 40 bytes: u64 LE TOC offset, compressed TOC length,
# uncompressed TOC length, manifest type (1), magic "GnUlInUx"; the whole footer sits in a skippable frame
# (magic 50 2a 4d 18 + u32 length = 8 bytes before it), as does the zstd-compressed TOC JSON.
ZSTD_FOOTER_SIZE = 40
ZSTD_CHUNKED_MAGIC = b"GnUlInUx"
ZSTD_SKIPPABLE_MAGIC = b"\x50\x2a\x4d\x18"
ZSTD_MANIFEST_TYPE = 1

GZIP = "estargz"
ZSTD = "zstd:chunked"

# OCI names: the one home of the media types and annotation keys every module (and the tests) use.
MEDIA_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MEDIA_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MEDIA_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
MEDIA_LAYER_GZIP = MEDIA_LAYER_TAR + "+gzip"
MEDIA_LAYER_ZSTD = MEDIA_LAYER_TAR + "+zstd"
INDEX_TYPES = (MEDIA_OCI_INDEX, MEDIA_DOCKER_LIST)
MANIFEST_TYPES = (MEDIA_OCI_MANIFEST, MEDIA_DOCKER_MANIFEST)
TOC_DIGEST_ANNOTATION = "containerd.io/snapshot/stargz/toc.digest"  # sha256 of the uncompressed TOC JSON
UNCOMPRESSED_SIZE_ANNOTATION = "io.containers.estargz.uncompressed-size"
REF_NAME_ANNOTATION = "org.opencontainers.image.ref.name"
CREATED_ANNOTATION = "org.opencontainers.image.created"  # RFC 3339 time a referrer artifact was made
# Referrer artifacts (OCI 1.1 `subject` + `artifactType`), attached to an image manifest without rewriting it:
MEDIA_OCI_EMPTY = "application/vnd.oci.empty.v1+json"  # the config of an artifact with none: the blob `{}`
ARTIFACT_PROFILE = "application/vnd.lazymount.profile.v1"  # a workload profile (the files to prefetch)
MEDIA_PROFILE = "application/vnd.lazymount.profile.v1+text"  # its one blob, in convert.read_profile's format
ARTIFACT_SEEK_INDEX = "application/vnd.lazymount.seekindex.v1"  # the seek index of one unconverted layer
MEDIA_SEEK_INDEX = "application/vnd.lazymount.seekindex.v1"  # its one blob (format: seekindex.py)
LAYER_ANNOTATION = "io.lazymount.layer.digest"  # on a per-layer artifact: the image layer it describes

_TYPES = ("dir", "reg", "symlink", "hardlink", "char", "block", "fifo")
KIND_DIR, KIND_REG, KIND_SYMLINK, KIND_HARDLINK, KIND_CHAR, KIND_BLOCK, KIND_FIFO = range(len(_TYPES))
_DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")


def check_digest(digest: str) -> str:
    """Return `digest` if it is `sha256:` + 64 lowercase hex, else raise FormatError."""
    if not isinstance(digest, str) or not _DIGEST_RE.fullmatch(digest):
        raise FormatError(f"invalid digest {str(digest)[:80]!r}")
    return digest


def sha256_digest(data: bytes | memoryview) -> str:
    """The `sha256:<hex>` digest of `data`."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def verify_digest(data: bytes | memoryview, digest: str, what: str) -> None:
    """Raise DigestError unless `data` hashes to `digest`; `what` names the content in the message."""
    actual = sha256_digest(data)
    if actual != digest:
        raise DigestError(f"{what} does not match its digest {digest} ({len(data)} bytes, {actual})")


# ---------------------------------------------------------------------------------------------- footers


def footer_bytes(toc_offset: int) -> bytes:
    """The 51-byte eStargz footer pointing at the TOC's gzip member."""
    payload = b"%016xSTARGZ" % toc_offset
    return (_GZIP_EXTRA_HEADER + struct.pack("<H", 4 + len(payload)) + b"SG"
            + struct.pack("<H", len(payload)) + payload + _EMPTY_DEFLATE_TAIL)


def _parse_toc_offset(hex_and_magic: bytes) -> int:
    if hex_and_magic[16:] != b"STARGZ" or not re.fullmatch(rb"[0-9a-fA-F]{16}", hex_and_magic[:16]):
        raise FooterError("footer has no STARGZ magic and hex TOC offset")
    return int(hex_and_magic[:16], 16)


@dataclass(frozen=True, slots=True)
class Footer:
    """Where a blob's TOC lives: `format` is GZIP or ZSTD, the TOC spans [toc_offset, toc_end)."""

    format: str
    toc_offset: int
    toc_end: int
    footer_size: int


def parse_footer(tail: bytes, blob_size: int) -> Footer:
    """Parse the footer from `tail`, the last bytes (at least 51 if the blob has them) of a blob."""
    if blob_size < LEGACY_FOOTER_SIZE or len(tail) < min(blob_size, FOOTER_SIZE):
        raise TruncatedError(f"blob of {blob_size} bytes is too small for a footer")
    footer = tail[-FOOTER_SIZE:]
    # gzip magic, deflate, FEXTRA; XLEN 26; subfield 'S','G' of LEN 22 (mtime, XFL and OS not checked)
    if len(footer) == FOOTER_SIZE and footer[:4] == _GZIP_EXTRA_HEADER[:4] \
            and footer[10:16] == b"\x1a\x00SG\x16\x00":
        if footer[-13:] != _EMPTY_DEFLATE_TAIL:
            raise FooterError("eStargz footer is not an empty gzip member")
        return _footer_in_range(GZIP, _parse_toc_offset(footer[16:38]), blob_size - FOOTER_SIZE, FOOTER_SIZE)
    legacy = tail[-LEGACY_FOOTER_SIZE:]
    if legacy[:4] == _GZIP_EXTRA_HEADER[:4] and legacy[10:12] == b"\x16\x00":
        if legacy[-13:] != _EMPTY_DEFLATE_TAIL:
            raise FooterError("stargz footer is not an empty gzip member")
        return _footer_in_range(GZIP, _parse_toc_offset(legacy[12:34]), blob_size - LEGACY_FOOTER_SIZE,
                                LEGACY_FOOTER_SIZE)
    zfooter = tail[-ZSTD_FOOTER_SIZE:]
    if zfooter[32:] == ZSTD_CHUNKED_MAGIC:
        offset, length, _raw_length, kind = struct.unpack("<QQQQ", zfooter[:32])
        if kind != ZSTD_MANIFEST_TYPE:
            raise FooterError(f"zstd:chunked footer has manifest type {kind}, want {ZSTD_MANIFEST_TYPE}")
        end = offset + length
        if end > blob_size - ZSTD_FOOTER_SIZE - 8:
            raise TruncatedError(f"zstd:chunked TOC [{offset}, {end}) lies outside the blob")
        return _footer_in_range(ZSTD, offset, end, ZSTD_FOOTER_SIZE + 8)
    raise FooterError("blob ends in no eStargz, stargz or zstd:chunked footer (not an eStargz layer)")


def _footer_in_range(fmt: str, toc_offset: int, toc_end: int, size: int) -> Footer:
    if not 0 <= toc_offset < toc_end:
        raise TruncatedError(f"TOC offset {toc_offset} lies outside the blob")
    return Footer(fmt, toc_offset, toc_end, size)


# ---------------------------------------------------------------------------------------------- reading


def _gunzip_bounded(data: bytes, limit: int, what: str) -> bytes:
    """Decompress a chain of gzip members, never producing more than `limit` bytes."""
    out = bytearray()
    while data:
        d = zlib.decompressobj(wbits=31)
        try:
            piece = d.decompress(data, limit + 1 - len(out))
        except zlib.error as e:
            raise FormatError(f"{what}: corrupt gzip data ({e})") from None
        if len(out) + len(piece) > limit:
            raise FormatError(f"{what}: inflates past {limit} bytes")
        if not d.eof:
            raise TruncatedError(f"{what}: gzip data ends early")
        data = d.unused_data
        if not out and not data:
            return piece  # one member (a TOC's usual case): no copy of a 40 MB TOC
        out += piece
    return bytes(out)


def _unzstd(data: bytes, want: int, what: str) -> bytes:
    """Up to `want` bytes of zstd frames, read in pieces: python-zstandard's read(n) allocates n bytes."""
    import zstandard  # here, not at the top: gzip images never need it and it costs ~40 ms of start-up

    out = bytearray()
    try:
        reader = zstandard.ZstdDecompressor().stream_reader(data, read_across_frames=True)
        while len(out) < want and (piece := reader.read(min(want - len(out), 1 << 20))):
            out += piece
    except zstandard.ZstdError as e:
        raise FormatError(f"{what}: corrupt zstd data ({e})") from None
    return bytes(out)


def _unzstd_bounded(data: bytes, limit: int, what: str) -> bytes:
    out = _unzstd(data, limit + 1, what)
    if len(out) > limit:
        raise FormatError(f"{what}: inflates past {limit} bytes")
    return out


def toc_json_from_member(member: bytes, fmt: str, limit: int = MAX_TOC_BYTES) -> bytes:
    """Extract the TOC JSON from its compressed member(s) (a tar entry for gzip, bare JSON for zstd)."""
    return bytes(_toc_json_view(member, fmt, limit))


def _toc_json_view(member: bytes, fmt: str, limit: int) -> memoryview:
    """The TOC JSON as a view into the decompressed member(s): no copy of it is made."""
    if fmt == ZSTD:
        return memoryview(_unzstd_bounded(member, limit, "TOC"))
    raw = _gunzip_bounded(member, limit + 8192, "TOC")
    try:
        with tarfile.open(fileobj=io.BytesIO(raw), mode="r:") as tar:
            info = tar.next()
            if info is None or info.name != TOC_TAR_NAME or not info.isreg() or info.issparse():
                raise TOCError(f"TOC member holds no {TOC_TAR_NAME} tar entry")
            if info.size > limit:
                raise TOCError(f"TOC of {info.size} bytes is larger than {limit}")
    except tarfile.TarError as e:
        raise TOCError(f"TOC member is not a tar entry ({e})") from None
    if info.offset_data + info.size > len(raw):
        raise TOCError("TOC member is not a tar entry (its data ends early)")
    return memoryview(raw)[info.offset_data:info.offset_data + info.size]


ReadAt = Callable[[int, int], bytes]


def read_toc_json(read_at: ReadAt, blob_size: int, expected_digest: str | None = None,
                  limit: int = MAX_TOC_BYTES) -> tuple[Footer, bytes]:
    """Read the footer and the TOC JSON of a blob through `read_at(offset, length)`; verify the digest."""
    footer, view = _read_toc_view(read_at, blob_size, expected_digest, limit)
    return footer, bytes(view)


def _read_toc_view(read_at: ReadAt, blob_size: int, expected_digest: str | None,
                   limit: int) -> tuple[Footer, memoryview]:
    tail_len = min(blob_size, FOOTER_SIZE)
    footer = parse_footer(read_at(blob_size - tail_len, tail_len), blob_size)
    # Compressed data is at most slightly larger than its input: refuse to read a huge "TOC" whole.
    if footer.toc_end - footer.toc_offset > limit + (limit >> 8) + 65536:
        raise TOCError(f"compressed TOC of {footer.toc_end - footer.toc_offset} bytes exceeds the limit")
    member = read_at(footer.toc_offset, footer.toc_end - footer.toc_offset)
    if len(member) != footer.toc_end - footer.toc_offset:
        raise TruncatedError("TOC member ends early")
    data = _toc_json_view(member, footer.format, limit)
    if expected_digest is not None and sha256_digest(data) != check_digest(expected_digest):
        raise DigestError(f"TOC digest {sha256_digest(data)} does not match {expected_digest}")
    return footer, data


def read_index(read_at: ReadAt, blob_size: int, expected_digest: str | None = None) -> Index:
    """Read, verify and index the TOC of an eStargz or zstd:chunked blob.

    The JSON is decoded to text straight from the decompressed member, which is freed before parsing:
    at most two copies of a TOC (40 MB for 100k files) are alive at once, never three.
    """
    footer, view = _read_toc_view(read_at, blob_size, expected_digest, MAX_TOC_BYTES)
    try:
        text = str(view, json.detect_encoding(bytes(view[:4])), "surrogatepass")
    except UnicodeDecodeError as e:
        raise TOCError(f"TOC is not valid JSON ({str(e)[:200]})") from None
    del view  # the last reference to the decompressed member
    return Index.from_json(text, footer)


_BAD_COMPONENTS = frozenset(("", ".", ".."))


def normalize_name(name: object) -> str:
    """Return a TOC/tar name as a clean relative path ('' for the root) or raise UnsafePathError."""
    if not isinstance(name, str):
        raise TOCError(f"entry name {name!r} is not a string")
    if "\0" in name:
        raise UnsafePathError(f"entry name {name!r} contains NUL")
    if name.startswith("/"):
        raise UnsafePathError(f"entry name {name!r} is absolute")
    while name.startswith("./"):
        name = name[2:]
    name = name.rstrip("/")
    if name in ("", "."):
        return ""
    if not _BAD_COMPONENTS.isdisjoint(name.split("/")):
        raise UnsafePathError(f"entry name {name!r} has an empty, '.' or '..' component")
    return name


@dataclass(frozen=True, slots=True)
class Chunk:
    """One verified unit of a file: bytes [file_offset, +size) live decompressed at inner_offset of the
    member(s) spanning compressed [comp_offset, comp_end)."""

    file_offset: int
    size: int
    comp_offset: int
    comp_end: int
    inner_offset: int
    digest: str


@dataclass(frozen=True, slots=True)
class Entry:
    """An entry's metadata, made on demand from the index columns."""

    id: int
    name: str
    kind: int
    mode: int
    uid: int
    gid: int
    size: int
    mtime: int
    link_name: str
    dev_major: int
    dev_minor: int
    nlink: int
    xattrs: dict[str, bytes]

    @property
    def type(self) -> str:
        return _TYPES[self.kind]


class Index:
    """A compact, read-only index of one layer's TOC.

    Entries live in parallel typed arrays (about 45 bytes each plus the base name), chunks in three more
    (48 bytes each); rare fields (symlink targets, xattrs, device numbers, inner offsets) in small dicts.
    Entry 0 is the root.  Hardlinks are resolved to their target entry; landmarks are not in the tree.
    """

    ROOT = 0

    def __init__(self, fmt: str = GZIP, toc_end: int = 0) -> None:
        self.format = fmt
        self.toc_offset = toc_end  # compressed end of the last chunk
        self.prefetch_end: int | None = None  # offset of .prefetch.landmark
        self.no_prefetch = False
        self.names: list[str] = [""]
        self._kind = bytearray([KIND_DIR])
        self._mode = array("H", [0o755])
        self._uid = array("I", [0])
        self._gid = array("I", [0])
        self._size = array("Q", [0])
        self._mtime = array("q", [0])
        self._parent = array("I", [0])
        self._first_chunk = array("i", [-1])
        self._nchunks = array("I", [0])
        self._implicit = {0}  # directories only implied by a descendant
        self._symlink: dict[int, str] = {}
        self._xattrs: dict[int, dict[str, bytes]] = {}
        self._dev: dict[int, tuple[int, int]] = {}
        self._nlink: dict[int, int] = {}
        self._hardlink_of: dict[int, int] = {}
        self._chunk_comp = array("Q")
        self._chunk_file = array("Q")
        self._chunk_digest = bytearray()
        self._inner: dict[int, int] = {}
        self._order = array("I")
        self._sorted_offsets: array | None = None
        self._owner: array | None = None  # chunk id -> entry id, built on the first chunks_after

    # -- building -----------------------------------------------------------------------------------

    @classmethod
    def from_json(cls, data: bytes | str, footer: Footer) -> Index:
        """Parse TOC JSON into an index.  Entries are indexed as the parser meets them, so no list of
        dicts for the whole TOC is ever held."""
        builder = _IndexBuilder(cls(footer.format, footer.toc_offset))
        try:
            doc = json.loads(data, object_hook=builder.hook)
        except (ValueError, RecursionError) as e:
            raise TOCError(f"TOC is not valid JSON ({str(e)[:200]})") from None
        entries = doc.get("entries") if isinstance(doc, dict) else None
        if (not isinstance(entries, list) or len(entries) != builder.count
                or any(e is not _ENTRY for e in entries)):
            raise TOCError("TOC is not an object with an 'entries' list of entries")
        if doc.get("version", 1) not in (1, 2):
            raise TOCError(f"unsupported TOC version {doc.get('version')!r}")
        del doc, entries  # all parse garbage is gone before finish() makes the long-lived name strings
        return builder.finish()

    # -- queries ------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._kind)

    @property
    def chunk_count(self) -> int:
        return len(self._chunk_comp)

    def kind(self, entry_id: int) -> int:
        return self._kind[entry_id]

    def parent(self, entry_id: int) -> int:
        return self._parent[entry_id]

    def is_implicit(self, entry_id: int) -> bool:
        """True for a directory the TOC only implies (no entry of its own)."""
        return entry_id in self._implicit

    def hardlink_target(self, entry_id: int) -> int | None:
        """For a hardlink, the entry it links to (whose data and inode it shares); else None."""
        return self._hardlink_of.get(entry_id)

    def entry(self, entry_id: int) -> Entry:
        """The metadata of one entry."""
        kind = self._kind[entry_id]
        dev = self._dev.get(entry_id, (0, 0))
        return Entry(entry_id, self.names[entry_id], kind, self._mode[entry_id], self._uid[entry_id],
                     self._gid[entry_id], self._size[entry_id], self._mtime[entry_id],
                     self._symlink.get(entry_id, ""), dev[0], dev[1], self.nlink(entry_id),
                     dict(self._xattrs.get(entry_id, {})))

    def nlink(self, entry_id: int) -> int:
        """Link count: names of a hardlink group; 2 + subdirectories for a directory (derived, not stored)."""
        if self._kind[entry_id] == KIND_DIR:
            return 2 + sum(1 for _, child in self.children(entry_id) if self._kind[child] == KIND_DIR)
        return self._nlink.get(entry_id, 1)

    def _child_key(self, i: int) -> tuple[int, str]:
        return self._parent[self._order[i]], self.names[self._order[i]]

    def lookup_child(self, dir_id: int, name: str) -> int | None:
        """The entry named `name` in directory `dir_id`, or None."""
        key = (dir_id, name)
        lo = bisect.bisect_left(range(len(self._order)), key, key=self._child_key)
        if lo < len(self._order) and self._child_key(lo) == key:
            return self._order[lo]
        return None

    def lookup(self, path: str) -> int | None:
        """The entry at `path` (relative, '' for the root), or None."""
        entry_id: int | None = self.ROOT
        for part in (p for p in path.strip("/").split("/") if p):
            if self._kind[entry_id] != KIND_DIR:
                return None
            entry_id = self.lookup_child(entry_id, part)
            if entry_id is None:
                return None
        return entry_id

    def children(self, dir_id: int) -> Iterator[tuple[str, int]]:
        """(name, entry id) of a directory's entries, sorted by name."""
        order = self._order
        i = bisect.bisect_left(range(len(order)), dir_id, key=lambda k: self._parent[order[k]])
        while i < len(order) and self._parent[order[i]] == dir_id:
            yield self.names[order[i]], order[i]
            i += 1

    def walk(self, dir_id: int = ROOT, prefix: str = "") -> Iterator[tuple[str, int]]:
        """(path, entry id) of every entry below `dir_id`, depth first, parents before children."""
        stack = [(prefix, self.children(dir_id))]  # not recursive: a hostile TOC may nest 2000 deep
        while stack:
            prefix, children = stack[-1]
            for name, child in children:
                yield prefix + name, child
                if self._kind[child] == KIND_DIR:
                    stack.append((prefix + name + "/", self.children(child)))
                    break
            else:
                stack.pop()

    def chunks(self, entry_id: int) -> list[Chunk]:
        """The chunks of a regular file, in file order."""
        first = self._first_chunk[entry_id]
        return [self.chunk(first + k, entry_id) for k in range(self._nchunks[entry_id])] if first >= 0 else []

    def chunk(self, chunk_id: int, entry_id: int) -> Chunk:
        """Chunk `chunk_id` of file `entry_id`."""
        start = self._chunk_file[chunk_id]
        last = self._first_chunk[entry_id] + self._nchunks[entry_id] - 1
        end = self._size[entry_id] if chunk_id == last else self._chunk_file[chunk_id + 1]
        comp = self._chunk_comp[chunk_id]
        offsets = self._sorted_offsets if self._sorted_offsets is not None else self._chunk_comp
        k = bisect.bisect_right(offsets, comp)
        comp_end = offsets[k] if k < len(offsets) else self.toc_offset
        digest = "sha256:" + self._chunk_digest[chunk_id * 32:chunk_id * 32 + 32].hex()
        return Chunk(start, end - start, comp, comp_end, self._inner.get(chunk_id, 0), digest)

    def chunks_after(self, entry_id: int, chunk: Chunk, span: int) -> list[tuple[int, Chunk]]:
        """(entry id, chunk) of the chunks stored right after `chunk` of `entry_id` in the blob, of any
        file, that end within `span` compressed bytes of its start: neighbours worth one request."""
        if self._sorted_offsets is not None:
            return []  # offsets out of blob order: chunk ids say nothing about neighbours
        owners = self._owners()
        first = self._first_chunk[entry_id]
        k = bisect.bisect_right(self._chunk_file, chunk.file_offset, first, first + self._nchunks[entry_id])
        out: list[tuple[int, Chunk]] = []
        while k < len(self._chunk_comp) and self._chunk_comp[k] < chunk.comp_offset + span:
            owner = owners[k]
            if owner >= 0:  # landmarks own no entry
                following = self.chunk(k, owner)
                if following.comp_end > chunk.comp_offset + span:
                    break
                out.append((owner, following))
            k += 1
        return out

    def _owners(self) -> array:
        """Chunk id -> the entry whose data it holds (-1 for landmarks); built on first use."""
        if self._owner is None:
            self._owner = array("i", [-1]) * len(self._chunk_comp)
            for owner, first in enumerate(self._first_chunk):
                if first >= 0 and owner not in self._hardlink_of:
                    count = self._nchunks[owner]
                    self._owner[first:first + count] = array("i", [owner]) * count
        return self._owner

    def blob_chunks(self) -> Iterator[Chunk]:
        """Every file chunk once (hardlinks share theirs), in blob order, made one at a time."""
        owners = self._owners()
        ids: Iterable[int] = range(len(owners))
        if self._sorted_offsets is not None:
            ids = sorted(ids, key=lambda k: (self._chunk_comp[k], self._inner.get(k, 0)))
        for k in ids:
            if owners[k] >= 0:
                yield self.chunk(k, owners[k])

    def chunk_range(self, entry_id: int, offset: int, length: int) -> list[Chunk]:
        """The chunks of a file that hold bytes [offset, offset+length)."""
        first, count = self._first_chunk[entry_id], self._nchunks[entry_id]
        if first < 0 or length <= 0 or offset >= self._size[entry_id]:
            return []
        files = self._chunk_file
        lo = max(bisect.bisect_right(files, offset, first, first + count) - 1, first)
        hi = bisect.bisect_left(files, offset + length, first, first + count)
        return [self.chunk(k, entry_id) for k in range(lo, hi)]

    def stats(self) -> dict[str, int]:
        """Entry counts by type, chunks, and the uncompressed size of regular files."""
        counts = {t: 0 for t in _TYPES}
        for k in self._kind:
            counts[_TYPES[k]] += 1
        counts["chunks"] = self.chunk_count
        counts["bytes"] = sum(self._size[i] for i, k in enumerate(self._kind) if k == KIND_REG)
        return counts


class _IndexBuilder:
    """Feeds TOC entries (as the JSON parser produces them) into an Index; checks them as it goes.

    Base names are kept as UTF-8 in one buffer while parsing and become str objects only in `finish`,
    after the parser's garbage is freed: made during the parse, the ~116k long-lived strings of a
    100k-file TOC would sit between its short-lived objects and pin most of pymalloc's arenas (RSS
    stayed ~35 MB above the live heap); made afterwards they fill a few arenas of their own.
    """

    def __init__(self, index: Index) -> None:
        self.index = index
        self.count = 0
        self.ids: dict[str, int] = {"": 0}  # path -> entry id, while building only
        self.last_reg: int | None = None
        self.last_reg_name = ""
        self.last_chunk_end = 0
        self.mtimes: dict[str, int] = {}
        self.names = bytearray()  # base names after the root's "", each preceded by NUL (never in a name)

    def hook(self, obj: dict) -> object:
        if "name" not in obj and "type" not in obj:
            return obj  # the top level or an xattrs map
        self.add(obj)
        self.count += 1
        return _ENTRY

    def _dir(self, path: str) -> int:
        """The id of directory `path`, creating implied directories."""
        entry_id = self.ids.get(path)
        if entry_id is None:
            parent, _, base = path.rpartition("/")
            entry_id = self._new(base, self._dir(parent))
            self.ids[path] = entry_id
            self.index._implicit.add(entry_id)
        elif self.index._kind[entry_id] != KIND_DIR:
            raise TOCError(f"{path!r} is used as a directory but is not one")
        return entry_id

    def _new(self, base: str, parent: int) -> int:
        ix = self.index
        self.names += b"\0" + base.encode("utf-8", "surrogatepass")
        ix._kind.append(KIND_DIR)
        ix._mode.append(0o755)
        ix._uid.append(0)
        ix._gid.append(0)
        ix._size.append(0)
        ix._mtime.append(0)
        ix._parent.append(parent)
        ix._first_chunk.append(-1)
        ix._nchunks.append(0)
        return len(ix._kind) - 1

    def _mtime(self, value: object) -> int:
        if not value:
            return 0
        if not isinstance(value, str):
            raise TOCError(f"modtime {value!r} is not a string")
        seconds = self.mtimes.get(value)
        if seconds is None:
            try:
                parsed = datetime.fromisoformat(value)
                seconds = int((parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).timestamp())
            except ValueError:
                raise TOCError(f"modtime {value[:40]!r} is not RFC 3339") from None
            if len(self.mtimes) < 4096:
                self.mtimes[value] = seconds
        return seconds

    def add(self, obj: dict) -> None:
        typ = obj.get("type")
        if typ == "chunk":
            self._add_chunk(obj)
            return
        if typ not in _TYPES:
            raise TOCError(f"entry {str(obj.get('name'))[:80]!r} has unknown type {typ!r}")
        name = normalize_name(obj.get("name"))
        ix = self.index
        kind = _TYPES.index(typ)
        if name in (PREFETCH_LANDMARK, NO_PREFETCH_LANDMARK):
            self.last_reg = None
            if name == PREFETCH_LANDMARK:
                ix.prefetch_end = _int(obj, "offset")
            else:
                ix.no_prefetch = True
            self._add_payload(obj, None)
            return
        if name == "":
            entry_id = 0
            if kind != KIND_DIR:
                raise TOCError("the root entry is not a directory")
        else:
            parent_path, _, base = name.rpartition("/")
            parent = self._dir(parent_path)
            entry_id = self.ids.get(name)
            if entry_id is None or (kind != KIND_DIR or ix._kind[entry_id] != KIND_DIR):
                entry_id = self._new(base, parent)  # a later duplicate replaces the earlier entry
                if name in self.ids:
                    ix._parent[self.ids[name]] = _ORPHAN
                self.ids[name] = entry_id
        ix._implicit.discard(entry_id)
        ix._kind[entry_id] = kind
        ix._mode[entry_id] = _int(obj, "mode") & 0o7777
        ix._uid[entry_id] = _int(obj, "uid", 0xFFFFFFFF)
        ix._gid[entry_id] = _int(obj, "gid", 0xFFFFFFFF)
        ix._mtime[entry_id] = self._mtime(obj.get("modtime"))
        self.last_reg = None
        if kind == KIND_SYMLINK:
            ix._symlink[entry_id] = _str(obj, "linkName")
        elif kind == KIND_HARDLINK:
            self._add_hardlink(entry_id, _str(obj, "linkName"))
        elif kind in (KIND_CHAR, KIND_BLOCK):
            ix._dev[entry_id] = (_int(obj, "devMajor"), _int(obj, "devMinor"))
        elif kind == KIND_REG:
            ix._size[entry_id] = _int(obj, "size")
            self.last_reg, self.last_reg_name = entry_id, name
            self._add_payload(obj, entry_id)
        xattrs = obj.get("xattrs")
        if xattrs:
            if not isinstance(xattrs, dict):
                raise TOCError(f"xattrs of {name!r} are not a map")
            try:
                ix._xattrs[entry_id] = {str(k): b64decode(v, validate=True) for k, v in xattrs.items()}
            except (ValueError, TypeError):
                raise TOCError(f"xattrs of {name!r} are not base64") from None

    def _add_hardlink(self, entry_id: int, link_name: str) -> None:
        target = self.ids.get(normalize_name(link_name))
        if target is None or target == entry_id:
            raise TOCError(f"hardlink target {link_name[:80]!r} is not an earlier entry")
        ix = self.index
        target = ix._hardlink_of.get(target, target)  # a link to a link shares the first one's inode
        ix._kind[entry_id] = ix._kind[target]
        if ix._kind[target] == KIND_DIR:
            raise TOCError(f"hardlink target {link_name[:80]!r} is a directory")
        # A hardlink shares the target's data and metadata: copy the columns, keep one nlink count.
        for col in (ix._mode, ix._uid, ix._gid, ix._size, ix._mtime, ix._first_chunk, ix._nchunks):
            col[entry_id] = col[target]
        for extra in (ix._symlink, ix._dev, ix._xattrs):
            if target in extra:
                extra[entry_id] = extra[target]
        group = ix._nlink.get(target, 1) + 1
        ix._nlink[target] = group
        ix._hardlink_of[entry_id] = target

    def _add_payload(self, obj: dict, entry_id: int | None) -> None:
        """Record the first chunk of a regular file (or of a landmark, which only bounds chunks)."""
        size = _int(obj, "size")
        if size == 0 and not obj.get("offset"):
            return
        chunk_id = self._append_chunk(obj, 0, size)
        if entry_id is not None:
            self.index._first_chunk[entry_id] = chunk_id
            self.index._nchunks[entry_id] = 1

    def _add_chunk(self, obj: dict) -> None:
        entry_id = self.last_reg
        ix = self.index
        if entry_id is None or ix._first_chunk[entry_id] < 0:
            raise TOCError("a chunk entry does not follow a regular file")
        file_offset = _int(obj, "chunkOffset")
        if file_offset <= ix._chunk_file[-1] or file_offset >= ix._size[entry_id]:
            raise TOCError(f"chunk offset {file_offset} of {self.last_reg_name!r} is out of order or range")
        self._append_chunk(obj, file_offset, ix._size[entry_id])
        ix._nchunks[entry_id] += 1

    def _append_chunk(self, obj: dict, file_offset: int, file_size: int) -> int:
        ix = self.index
        offset = _int(obj, "offset")
        if offset >= ix.toc_offset:
            raise TruncatedError(f"chunk offset {offset} lies beyond the TOC at {ix.toc_offset}")
        digest = obj.get("chunkDigest") or (obj.get("digest") if not obj.get("chunkSize") else None)
        if digest is None:
            raise TOCError(f"a chunk at offset {offset} has no chunkDigest")
        ix._chunk_comp.append(offset)
        ix._chunk_file.append(file_offset)
        ix._chunk_digest += bytes.fromhex(check_digest(digest)[7:])
        inner = _int(obj, "innerOffset")
        if inner:
            ix._inner[len(ix._chunk_comp) - 1] = inner
        return len(ix._chunk_comp) - 1

    def finish(self) -> Index:
        ix = self.index
        self.ids, self.mtimes = {}, {}
        # Sort with throw-away name strings, then make the kept ones: the sort's garbage is freed first.
        names = self.names.decode("utf-8", "surrogatepass").split("\0")
        live = [i for i in range(len(ix._kind)) if i != 0 and ix._parent[i] != _ORPHAN]
        live.sort(key=lambda i, names=names: (ix._parent[i], names[i]))
        ix._order = array("I", live)
        del live, names
        distinct: dict[str, str] = {}  # one str per distinct base name (__init__.py, README, ...)
        names = self.names.decode("utf-8", "surrogatepass").split("\0")
        ix.names = [distinct.setdefault(n, n) for n in names]
        self.names = bytearray()
        del distinct, names
        for entry_id, target in ix._hardlink_of.items():
            ix._nlink[entry_id] = ix._nlink[target]
        # arrays grow by over-allocating; copies are exact
        for name in ("_mode", "_uid", "_gid", "_size", "_mtime", "_parent", "_first_chunk", "_nchunks",
                     "_chunk_comp", "_chunk_file"):
            column = getattr(ix, name)
            setattr(ix, name, array(column.typecode, column))
        ix._kind, ix._chunk_digest = bytearray(ix._kind), bytearray(ix._chunk_digest)
        comp = ix._chunk_comp
        if any(comp[k] > comp[k + 1] for k in range(len(comp) - 1)):
            ix._sorted_offsets = array("Q", sorted(set(comp)))
        else:
            ix._sorted_offsets = None
        return ix


_ORPHAN = 0xFFFFFFFF
_ENTRY = object()  # what the JSON hook leaves in the entries list for each entry it indexed


def _int(obj: dict, key: str, maximum: int = (1 << 63) - 1) -> int:
    value = obj.get(key, 0)
    if type(value) is int and 0 <= value <= maximum:  # noqa: E721 -- exactly int: bool is not a number here
        return value
    if value is None:
        return 0
    raise TOCError(f"field {key!r} of {str(obj.get('name'))[:80]!r} is not a valid number: {value!r}")


def _str(obj: dict, key: str) -> str:
    value = obj.get(key, "")
    if not isinstance(value, str):
        raise TOCError(f"field {key!r} of {str(obj.get('name'))[:80]!r} is not a string")
    return value


def decompress_chunk(data: bytes, chunk: Chunk, fmt: str = GZIP, verify: bool = True) -> bytes:
    """Decompress a chunk's compressed bytes [comp_offset, comp_end) and verify its digest.

    Never inflates past the chunk's end; raises DigestError or FormatError instead of returning data
    that does not match the TOC.  `verify=False` is for a caller that verifies the digest itself (the
    chunk cache does, before it stores or returns anything).
    """
    want = chunk.inner_offset + chunk.size
    what = f"chunk at {chunk.comp_offset}"
    if want > sys.maxsize:  # a hostile TOC's size or innerOffset; zlib would raise OverflowError
        raise FormatError(f"{what}: size {chunk.size} at inner offset {chunk.inner_offset} is impossible")
    if fmt == ZSTD:
        out = _unzstd(data, want, what)
    else:
        parts: list[bytes] = []  # one gzip member per chunk, as a rule: then no copy is made
        got = 0
        while got < want and data:
            d = isal_zlib.decompressobj(wbits=31)
            try:
                parts.append(d.decompress(data, want - got))
            except isal_zlib.error as e:
                raise FormatError(f"{what}: corrupt gzip data ({e})") from None
            got += len(parts[-1])
            data = d.unused_data if d.eof else b""
        out = parts[0] if len(parts) == 1 else b"".join(parts)
    if chunk.inner_offset or len(out) > want:
        out = out[chunk.inner_offset:want]
    if len(out) != chunk.size:
        raise TruncatedError(f"{what}: {len(out)} bytes where {chunk.size} were promised")
    if verify and sha256_digest(out) != chunk.digest:
        raise DigestError(f"{what}: content does not match {chunk.digest}")
    return out
