"""The eStargz and zstd:chunked layer formats: byte layouts, the TOC index, limits, and the shared names.

What belongs here: byte layouts (footer and format constants; footers are parsed and built in tocread.py),
the compact index of a TOC and the one validation of its entries (a reader's and a writer's:
`Index.from_entries`), the limits on what an image may make us hold (`Limits`), digest helpers, the OCI
media types and annotation keys, and the error hierarchy of the whole project (this is the module every
other one imports). What never does: reading a blob (its TOC footer, TOC stream and chunks: tocread.py),
writing a layer (layerwriter.py), I/O of its own, FUSE, HTTP, caching, and any import of another project
module.
"""

from __future__ import annotations

import bisect
import errno
import hashlib
import re
from array import array
from base64 import b64decode
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime


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

# eStargz footer, 51 bytes: gzip header with FEXTRA (10) + XLEN (2) + subfield 'S','G' + LEN (2+2)
# + "%016x" TOC offset + "STARGZ" (22) + empty stored deflate block (5) + CRC32 and ISIZE (8).
FOOTER_SIZE = 51
# Legacy stargz footer, 47 bytes: the same without the subfield header (XLEN = 22).
LEGACY_FOOTER_SIZE = 47
GZIP_EXTRA_HEADER = b"\x1f\x8b\x08\x04\x00\x00\x00\x00\x00\xff"
EMPTY_DEFLATE_TAIL = b"\x01\x00\x00\xff\xff" + b"\x00" * 8
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
MEDIA_PROFILE = "application/vnd.lazymount.profile.v1+text"  # its one blob, in profiles.read_profile's format
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


# ----------------------------------------------------------------------------------------------- limits


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds on every size an image decides, each checked before the bytes it covers are read or inflated.

    The one list of them (README, "Limits"); the config file's `limits:` section changes any of them.
    """

    toc_compressed: int = 256 << 20  # bytes of a layer's compressed TOC
    toc_json: int = 1 << 30  # bytes of TOC JSON once inflated (streamed: memory grows with entries only)
    toc_entries: int = 4_000_000  # entries of one TOC, chunk entries included (~100-200 bytes of memory each)
    entry_json: int = 1 << 20  # bytes of one entry's JSON (its xattrs included)
    path_length: int = 4096  # characters of an entry's name or link target (PATH_MAX)
    path_depth: int = 2048  # components of an entry's name (PATH_MAX allows ~2048)
    chunk_size: int = 64 << 20  # bytes of one chunk once inflated (writers use 4 MiB); larger ones are EIO
    manifest_size: int = 4 << 20  # a manifest, an index or a layout's index.json (the OCI spec's 4 MiB)
    config_size: int = 8 << 20  # an image's config blob


DEFAULT_LIMITS = Limits()


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
        self._blob_order: array | None = None  # chunk ids in blob order, if that is not id order
        self.toc_digest = ""  # of the TOC JSON, and its size, when read from a blob
        self.toc_size = 0

    # -- building -----------------------------------------------------------------------------------

    @classmethod
    def from_entries(cls, entries: Iterable[object], fmt: str, toc_offset: int,
                     limits: Limits = DEFAULT_LIMITS) -> Index:
        """Index TOC entries (dicts, as JSON has them; the reader streams them in, a writer hands over
        what it wrote): the one validation of entries, so that a writer fails with the reason a reader
        would give, or writes what a reader accepts.  `toc_offset` is where the TOC starts (chunks end)."""
        builder = _IndexBuilder(cls(fmt, toc_offset), limits)
        for entry in entries:
            builder.add(entry)
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

    def replaced(self, entry_id: int) -> bool:
        """True for an entry that a later entry of the same name replaced (a hardlink may still share its
        data and inode)."""
        return self._parent[entry_id] == _ORPHAN

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
        for k in self._ids_in_blob_order():
            if owners[k] >= 0:
                yield self.chunk(k, owners[k])

    def _ids_in_blob_order(self) -> Sequence[int]:
        if self._sorted_offsets is None:
            return range(len(self._chunk_comp))
        if self._blob_order is None:
            self._blob_order = array("i", sorted(range(len(self._chunk_comp)),
                                                 key=lambda k: (self._chunk_comp[k], self._inner.get(k, 0))))
        return self._blob_order

    def chunks_between(self, start: int, stop: int) -> Iterator[Chunk]:
        """The file chunks stored within compressed bytes [start, stop), in blob order, made one at a time."""
        owners = self._owners()
        ids, comp = self._ids_in_blob_order(), self._chunk_comp
        first = bisect.bisect_left(ids, start, key=comp.__getitem__)
        for k in ids[first:bisect.bisect_left(ids, stop, first, key=comp.__getitem__)]:
            if owners[k] >= 0:
                c = self.chunk(k, owners[k])
                if c.comp_end <= stop:
                    yield c

    def files_before(self, end: int) -> list[int]:
        """The files with data stored before compressed offset `end` (a landmark's range), each once, in
        chunk order; a hardlink group by its target entry."""
        owners = self._owners()
        comp = self._chunk_comp
        return list(dict.fromkeys(owners[k] for k in range(len(owners)) if comp[k] < end and owners[k] >= 0))

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


_EMPTY, _GONE = 0xFFFFFFFF, 0xFFFFFFFE  # a free slot of _Files, a removed path (probing goes on past it)


class _Files:
    """path -> entry id of the entries that are no directory, while an index is built.

    The first SMALL paths go into a dict (fast, ~140 bytes a path); the rest, in a TOC of millions of
    entries, into ~30 bytes a path: open addressing on the paths' hashes in typed arrays, a matching hash
    confirmed exactly and in O(1) (the entry's parent is the path's directory, its base name the path's).
    """

    SMALL = 1 << 17

    def __init__(self, builder: _IndexBuilder) -> None:
        self.builder = builder
        self.small: dict[str, int] = {}
        self.spilled = False  # once the dict is full, new paths go to the arrays
        self.hashes, self.ids, self.used = array("q", bytes(8 * 64)), array("I", [_EMPTY]) * 64, 0

    def _slot(self, key: int, parent: int, base: str) -> int:
        """The slot of the path hashing to `key` (in directory `parent`, named `base`), or the free slot it
        would take."""
        ids, hashes = self.ids, self.hashes
        mask = len(ids) - 1
        slot = key & mask
        while (found := ids[slot]) != _EMPTY:
            if found != _GONE and hashes[slot] == key and self.builder.named(found, parent, base):
                return slot
            slot = (slot + 1) & mask
        return slot

    def get(self, path: str, parent: int) -> int | None:
        """The entry at `path` (in directory `parent`), or None."""
        found = self.small.get(path)
        if found is not None or not self.spilled:
            return found
        found = self.ids[self._slot(hash(path), parent, path.rpartition("/")[2])]
        return None if found == _EMPTY else found

    def put(self, path: str, parent: int, base: str, entry_id: int) -> int | None:
        """Map `path` to `entry_id`; return the entry it mapped to before, if any."""
        small = self.small
        if not self.spilled or path in small:
            old = small.get(path)
            small[path] = entry_id
            self.spilled = self.spilled or len(small) >= self.SMALL
            return old
        if 2 * (self.used + 1) > len(self.ids):  # linear probing stays short below half full
            self._grow()
        key = hash(path)
        ids = self.ids
        slot = key & (len(ids) - 1)
        if ids[slot] != _EMPTY:  # else the usual case: a new path, and its first slot free
            slot = self._slot(key, parent, base)
        old = ids[slot]
        self.used += old == _EMPTY
        self.hashes[slot], ids[slot] = key, entry_id
        return None if old == _EMPTY else old

    def pop(self, path: str, parent: int, base: str) -> int | None:
        """Forget `path`; return the entry it mapped to, if any."""
        if path in self.small or not self.spilled:
            return self.small.pop(path, None)
        slot = self._slot(hash(path), parent, base)
        old = self.ids[slot]
        if old == _EMPTY:
            return None
        self.ids[slot] = _GONE
        return old

    def _grow(self) -> None:
        old = zip(self.hashes, self.ids, strict=True)
        size = 2 * len(self.ids)
        self.hashes, self.ids = array("q", bytes(8 * size)), array("I", [_EMPTY]) * size
        self.used, mask = 0, size - 1
        for key, entry_id in old:
            if entry_id < _GONE:
                slot = key & mask
                while self.ids[slot] != _EMPTY:
                    slot = (slot + 1) & mask
                self.hashes[slot], self.ids[slot] = key, entry_id
                self.used += 1


class _IndexBuilder:
    """Feeds TOC entries (as the JSON parser produces them) into an Index; checks them as it goes.

    Base names are kept as UTF-8 in one buffer while parsing and become str objects only in `finish`,
    so that they fill arenas of their own instead of pinning the parser's; paths map to entries through
    a dict for directories and the compact `_Files` for the rest.
    """

    def __init__(self, index: Index, limits: Limits) -> None:
        self.index, self.limits = index, limits
        self.count = 0
        self.dirs: dict[str, int] = {"": 0}  # path -> entry id of directories, while building only
        self.files = _Files(self)
        self.name_at = array("Q", [0])  # where each entry's base name starts in `names`
        self.last_reg: int | None = None
        self.last_reg_name = ""
        self.last_chunk_end = 0
        self.mtimes: dict[str, int] = {}
        self.names = bytearray()  # base names after the root's "", each preceded by NUL (never in a name)

    def _dir(self, path: str) -> int:
        """The id of directory `path`, creating implied directories (without recursion: a name may be
        thousands of levels deep)."""
        missing = []
        while (entry_id := self.dirs.get(path)) is None:
            if self._file(path) is not None:
                raise TOCError(f"{path[:200]!r} is used as a directory but is not one")
            missing.append(path)
            path = path.rpartition("/")[0]
        for path in reversed(missing):
            entry_id = self._new(path.rpartition("/")[2], entry_id)
            self.dirs[path] = entry_id
            self.index._implicit.add(entry_id)
        return entry_id

    def _file(self, path: str) -> int | None:
        """The entry at `path` if it is no directory (and its directory is one)."""
        parent = self.dirs.get(path.rpartition("/")[0])
        return None if parent is None else self.files.get(path, parent)

    def named(self, entry_id: int, parent: int, base: str) -> bool:
        """Whether entry `entry_id` is `base` in directory `parent`."""
        if self.index._parent[entry_id] != parent:
            return False
        start = self.name_at[entry_id]
        end = self.name_at[entry_id + 1] - 1 if entry_id + 1 < len(self.name_at) else len(self.names)
        return self.names[start:end] == base.encode("utf-8", "surrogatepass")

    def _name(self, obj: dict, key: str) -> str:
        """Field `key` (an entry name or a link target) as a clean path within the limits."""
        name = normalize_name(obj.get(key)) if key == "name" else _str(obj, key)
        limits = self.limits
        if len(name) > limits.path_length:
            raise TOCError(f"{key} {name[:80]!r}... is {len(name)} characters long, over "
                           f"{limits.path_length} "
                           "(limits.path_length)")
        if key == "name" and name.count("/") >= limits.path_depth:
            raise TOCError(f"entry name {name[:80]!r}... is {name.count('/') + 1} levels deep, over "
                           f"{limits.path_depth} (limits.path_depth)")
        return name

    def _new(self, base: str, parent: int) -> int:
        ix = self.index
        self.names += b"\0"
        self.name_at.append(len(self.names))
        self.names += base.encode("utf-8", "surrogatepass")
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
        """Index one entry of the TOC (a dict as JSON has it), checking it."""
        if not isinstance(obj, dict):
            raise TOCError("TOC is not an object with an 'entries' list of entries")
        self.count += 1
        if self.count > self.limits.toc_entries:
            raise TOCError(f"TOC has more than {self.limits.toc_entries} entries (limits.toc_entries)")
        typ = obj.get("type")
        if typ == "chunk":
            self._add_chunk(obj)
            return
        if typ not in _TYPES:
            raise TOCError(f"entry {str(obj.get('name'))[:80]!r} has unknown type {typ!r}")
        name = self._name(obj, "name")
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
            entry_id = self.dirs.get(name) if kind == KIND_DIR else None  # a directory again: its entry
            if entry_id is None:
                entry_id = self._new(base, parent)  # a later duplicate replaces the earlier entry
                if kind == KIND_DIR:  # (no directory has this name: it would have been found above)
                    old = self.files.pop(name, parent, base)
                    self.dirs[name] = entry_id
                else:
                    old = self.dirs.pop(name, None)
                    replaced = self.files.put(name, parent, base, entry_id)
                    old = replaced if old is None else old
                if old is not None:
                    ix._parent[old] = _ORPHAN
        ix._implicit.discard(entry_id)
        ix._kind[entry_id] = kind
        ix._mode[entry_id] = _int(obj, "mode") & 0o7777
        ix._uid[entry_id] = _int(obj, "uid", 0xFFFFFFFF)
        ix._gid[entry_id] = _int(obj, "gid", 0xFFFFFFFF)
        ix._mtime[entry_id] = self._mtime(obj.get("modtime"))
        self.last_reg = None
        if kind == KIND_SYMLINK:
            ix._symlink[entry_id] = self._name(obj, "linkName")
        elif kind == KIND_HARDLINK:
            self._add_hardlink(entry_id, self._name(obj, "linkName"))
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
        path = normalize_name(link_name)
        target = self.dirs.get(path)
        target = target if target is not None else self._file(path)
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
        self.dirs, self.files, self.name_at, self.mtimes = {}, _Files(self), array("Q"), {}
        distinct: dict[str, str] = {}  # one str per distinct base name (__init__.py, README, ...), mostly
        names = self.names.decode("utf-8", "surrogatepass").split("\0")
        self.names = bytearray()
        ix.names = [distinct.setdefault(n, n) if len(distinct) < 65536 else n for n in names]
        del distinct, names
        ix._order = _children_order(ix)
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


def _children_order(ix: Index) -> array:
    """Every live entry but the root, sorted by (parent, name): counted into place by parent, then each
    directory's slice sorted by name, so that no key is made for all entries at once."""
    parent, count = ix._parent, len(ix._parent)
    starts = array("I", bytes(4 * (count + 1)))
    for i in range(1, count):
        if parent[i] != _ORPHAN:
            starts[parent[i] + 1] += 1
    for i in range(count):
        starts[i + 1] += starts[i]
    order, fill = array("I", bytes(4 * starts[count])), array("I", starts)
    for i in range(1, count):
        if parent[i] != _ORPHAN:
            order[fill[parent[i]]] = i
            fill[parent[i]] += 1
    del fill
    by_name = ix.names.__getitem__
    for i in range(count):
        if starts[i + 1] - starts[i] > 1:
            order[starts[i]:starts[i + 1]] = array("I", sorted(order[starts[i]:starts[i + 1]], key=by_name))
    return order


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
