"""The merged, read-only view of an image: layers, the overlay tree with its inode table, and file data.

What belongs here: applying OCI overlay rules to the layers' TOC indexes (upper wins, `.wh.NAME`
whiteouts, `.wh..wh..opq` opaque directories, implied directories keeping a lower layer's metadata),
stable inode numbers (root = 1, one per hardlink group), `stat`-like attributes, and reading file bytes
chunk by chunk through the cache with read-ahead, landmark prefetch (a few large requests over parallel
connections) and a low-priority background fetch, and recording which files a workload opens.
Layers that are not eStargz are downloaded whole (verified) in the background and converted locally.
What never does: FUSE or any kernel interface (lazymount.py adapts this to FUSE), HTTP (a layer is
handed a `fetch.BlobReader`), TOC parsing (toc.py) or keeping chunks (cache.py).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import itertools
import logging
import os
import stat
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import cache
import layerwriter
import toc

log = logging.getLogger(__name__)

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
ROOT_INO = 1
BLOCK_SIZE = 4096  # st_blksize and statfs block size
PREFETCH_SPAN = 16 << 20  # compressed bytes fetched in one request by the landmark prefetch
# The background fetch's requests are smaller: it holds a span's bytes and its chunks' Chunk objects
# (~300 bytes each: ~10 MB for a 16 MiB span of 1 KB files) while it stores them.
BACKGROUND_SPAN = 2 << 20
PREFETCH_CONNECTIONS = 4  # parallel requests fetching the landmark ranges at mount time
MIN_PREFETCH_REQUEST = 1 << 20  # the landmark range is cut into requests no smaller than this
READ_AHEAD_BYTES = 8 << 20  # how far ahead of a sequential reader chunks are loaded
READ_AHEAD_THREADS = 2
NEIGHBOUR_SPAN = 512 << 10  # on a miss, chunks stored after it within this many compressed bytes come along
NEIGHBOUR_AFTER_MISSES = 2  # ... once a layer has had this many misses
READY_TIMEOUT = 600.0  # how long a file system call waits for a layer still being downloaded
_KIND_MODE = {toc.KIND_DIR: stat.S_IFDIR, toc.KIND_REG: stat.S_IFREG, toc.KIND_SYMLINK: stat.S_IFLNK,
              toc.KIND_CHAR: stat.S_IFCHR, toc.KIND_BLOCK: stat.S_IFBLK, toc.KIND_FIFO: stat.S_IFIFO}


class NotReadyError(toc.LazymountError):
    """A layer of the image is still being downloaded."""

    errno = errno.EAGAIN


class BlobSource(Protocol):
    """What a layer needs of its blob: random reads (`fetch.BlobReader` or a local file)."""

    size: int

    def read_at(self, offset: int, length: int) -> bytes: ...

    def download(self, path: str | os.PathLike[str]) -> None: ...


class FileBlob:
    """A local blob file read with pread: a layer downloaded and verified here, or one given to inspect."""

    def __init__(self, path: Path) -> None:
        self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self.size = os.fstat(self._fd).st_size

    def read_at(self, offset: int, length: int) -> bytes:
        return os.pread(self._fd, length, offset)

    def download(self, path: str | os.PathLike[str]) -> None:
        raise NotImplementedError("a local blob is never downloaded")

    def close(self) -> None:
        os.close(self._fd)

    def __enter__(self) -> FileBlob:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class StagedRanges:
    """Compressed bytes of a blob fetched ahead of use (the landmark prefetch), kept in an unlinked
    scratch file until their chunks are decompressed into the cache: the mount is ready once the bytes are
    here, and decompressing them does not hold up the command that reads them."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self._file = tempfile.TemporaryFile(dir=directory)  # noqa: SIM115 -- closed by close()
        self._ranges: list[tuple[int, int]] = []
        self._lock = threading.Lock()
        self.chunks: list[toc.Chunk] = []  # the chunks whose bytes are staged, in blob order

    def put(self, start: int, data: bytes, chunks: list[toc.Chunk]) -> None:
        os.pwrite(self._file.fileno(), data, start)
        with self._lock:
            self._ranges.append((start, start + len(data)))
            self.chunks.extend(chunks)

    def read(self, offset: int, length: int) -> bytes | None:
        """The staged bytes [offset, offset + length), or None if they are not (or no longer) here."""
        with self._lock:
            if self._file.closed or not any(a <= offset and offset + length <= b for a, b in self._ranges):
                return None
            return os.pread(self._file.fileno(), length, offset)

    def close(self) -> None:
        with self._lock:
            self._file.close()


@dataclass
class LayerStats:
    """Counters of one layer, as `lazymount stats` shows them."""

    index_bytes: int = 0  # footer and TOC bytes read at mount time
    bytes_fetched: int = 0  # compressed chunk bytes read from the blob (registry or local copy)
    requests: int = 0
    chunks_fetched: int = 0
    chunk_hits: int = 0  # chunk reads answered by the cache
    bytes_served: int = 0  # file bytes returned to readers
    prefetched_bytes: int = 0
    background_bytes: int = 0
    errors: int = 0


@dataclass
class Layer:
    """One layer: its digest, blob and (once known) TOC index; `pending` until a plain layer is converted."""

    digest: str
    blob: BlobSource
    toc_digest: str | None = None
    index: toc.Index | None = None
    stats: LayerStats = field(default_factory=LayerStats)
    error: str | None = None  # why the last download (or conversion) attempt failed
    permanent: bool = False  # the error is in the layer's verified bytes: it is not tried again
    staged: StagedRanges | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def state(self) -> str:
        """`lazy` (eStargz read by range), `local` (downloaded and converted), `pending` or `failed`."""
        if self.index is None:
            return "failed" if self.error else "pending"
        return "local" if isinstance(self.blob, FileBlob) else "lazy"

    def open_index(self) -> bool:
        """Read the TOC if the blob is eStargz with a TOC digest annotation; False if it is not eStargz."""
        if self.toc_digest is None:
            return False

        def read_at(offset: int, length: int) -> bytes:
            data = self.blob.read_at(offset, length)
            self.count("index_bytes", len(data))
            return data

        try:
            self.index = toc.read_index(read_at, self.blob.size, self.toc_digest)
        except toc.FooterError:
            return False
        return True

    def staged_chunk(self, c: toc.Chunk) -> bytes | None:
        """The chunk decompressed from its staged (prefetched) bytes, not yet verified (the cache does
        that); None if they are not staged."""
        staged = self.staged
        compressed = staged.read(c.comp_offset, c.comp_end - c.comp_offset) if staged else None
        if compressed is None:
            return None
        assert self.index is not None
        return toc.decompress_chunk(compressed, c, self.index.format, verify=False)

    def fetch(self, offset: int, length: int) -> bytes:
        """Raw compressed bytes of the blob, counted."""
        data = self.blob.read_at(offset, length)
        with self._lock:
            self.stats.requests += 1
            self.stats.bytes_fetched += len(data)
        return data

    def count(self, name: str, n: int = 1) -> None:
        """Add `n` to the counter `name` of the layer's stats."""
        with self._lock:
            setattr(self.stats, name, getattr(self.stats, name) + n)

    def localize(self, work_dir: Path) -> None:
        """Download the whole blob (verified), convert it to eStargz unless it already is, and index it."""
        hexdigest = toc.check_digest(self.digest)[7:]
        blob_path = work_dir / "blobs" / hexdigest
        converted = work_dir / "converted" / f"{hexdigest}.estargz"
        for directory in (blob_path.parent, converted.parent):
            directory.mkdir(parents=True, exist_ok=True)
        if not converted.exists():
            if not blob_path.exists():
                self.blob.download(blob_path)
            local = FileBlob(blob_path)
            try:
                self.index = toc.read_index(local.read_at, local.size)
                self.blob = local
                self.count("bytes_fetched", local.size)
                return
            except toc.FooterError:
                local.close()
            fd, tmp = tempfile.mkstemp(dir=converted.parent, prefix=".convert-")
            try:
                with open(blob_path, "rb") as src, os.fdopen(fd, "wb") as dst:
                    layerwriter.write_layer(src, dst, level=1)
                os.replace(tmp, converted)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
            self.count("bytes_fetched", blob_path.stat().st_size)
            blob_path.unlink(missing_ok=True)
        local = FileBlob(converted)
        self.index = toc.read_index(local.read_at, local.size)
        self.blob = local


class Node:
    """One name in the merged tree.  A directory has `sources`, the (layer, entry) pairs it merges from
    top to bottom; any other node has exactly one source.

    Directories are kept in the tree once merged.  Other names are kept in their directory's `children`
    as one int, `layer << 32 | entry`, and get a Node, made afresh, whenever they are looked up: a find
    over 100k files kept ~310 bytes per name as Nodes, ~60 as ints (the dict slot included).
    """

    __slots__ = ("ino", "parent", "name", "layer", "entry", "sources", "children", "closed")

    def __init__(self, ino: int, parent: Node | None, name: str, layer: int, entry: int) -> None:
        self.ino, self.parent, self.name = ino, parent, name
        self.layer, self.entry = layer, entry
        self.sources: list[tuple[int, int]] | None = [(layer, entry)]  # None once merged if only one
        self.children: dict[str, Node | int] | None = None  # a directory's, once merged
        self.closed = False  # no lower layer merges into this directory (opaque, or a non-dir below)

    @property
    def path(self) -> str:
        parts = []
        node: Node | None = self
        while node is not None and node.parent is not None:
            parts.append(node.name)
            node = node.parent
        return "/" + "/".join(reversed(parts))


class MergedTree:
    """The overlay of `layers` (bottom first).  Directories are merged when first looked into.

    `raw=True` shows one layer as an overlayfs lower directory instead: whiteouts become 0:0 character
    devices and opaque directories carry the `opaque_xattr` xattr.
    """

    def __init__(self, layers: Sequence[Layer], raw: bool = False,
                 opaque_xattr: str = "trusted.overlay.opaque") -> None:
        self.layers = list(layers)
        self.raw, self.opaque_xattr = raw, opaque_xattr
        self._lock = threading.RLock()
        self._group_nlink: dict[tuple[int, int], int] = {}
        self._members: dict[int, dict[int, list[int]]] = {}
        self._ino_base = []
        base = ROOT_INO + 1
        for layer in range(len(self.layers)):
            self._ino_base.append(base)
            base += len(self._index(layer))
        top = len(self.layers) - 1
        self.root = Node(ROOT_INO, None, "", top, toc.Index.ROOT)
        self.root.sources = []
        for layer in range(top, -1, -1):
            self.root.sources.append((layer, toc.Index.ROOT))
            if self._index(layer).lookup_child(toc.Index.ROOT, OPAQUE_MARKER) is not None:
                break
        self.root.layer, self.root.entry = self._metadata_source(self.root)
        self.nodes = 1

    def _index(self, layer: int) -> toc.Index:
        index = self.layers[layer].index
        assert index is not None, "a MergedTree is built from indexed layers only"
        return index

    # -- lookups ------------------------------------------------------------------------------------

    def lookup(self, path: str) -> Node | None:
        """The node at `path` ('/' or '' for the root), or None."""
        node = self.root
        for part in path.split("/"):
            if not part:
                continue
            if not self.is_dir(node):
                return None
            child = self._merged(node).get(part)
            if child is None:
                return None
            node = child if isinstance(child, Node) else self._leaf(node, part, child)
        return node

    def is_dir(self, node: Node) -> bool:
        """Whether the node is a directory (a raw whiteout never is)."""
        return self._index(node.layer).kind(node.entry) == toc.KIND_DIR and not self._is_raw_whiteout(node)

    def children(self, node: Node) -> Iterator[tuple[str, Node]]:
        """A directory's merged children, (name, node) sorted by name (merged on first call)."""
        for name, child in self._merged(node).items():
            yield name, child if isinstance(child, Node) else self._leaf(node, name, child)

    def _merged(self, node: Node) -> dict[str, Node | int]:
        """A directory's children by name: Nodes for directories, packed ints for the rest."""
        children = node.children
        if children is None:
            with self._lock:
                if node.children is None:
                    node.children = self._merge(node)
                children = node.children
        return children

    def _leaf(self, parent: Node, name: str, packed: int) -> Node:
        layer, entry = packed >> 32, packed & 0xFFFFFFFF
        return Node(self._ino(layer, entry), parent, name, layer, entry)

    def _new_node(self, parent: Node, name: str, layer: int, entry: int) -> Node:
        """A node; its inode number is set once its metadata source is known (end of `_merge`)."""
        node = Node(0, parent, name, layer, entry)
        self.nodes += 1
        index = self._index(layer)
        if index.kind(entry) == toc.KIND_DIR and index.lookup_child(entry, OPAQUE_MARKER) is not None:
            node.closed = True
        return node

    def _ino(self, layer: int, entry: int) -> int:
        """Inode number from the (layer, entry) a node takes its metadata from: the same in every mount
        of the image, unique (one path per entry), shared by a hardlink group (its target entry), and
        small (entries of the layers below, plus the entry), so 32-bit programs can stat it too."""
        target = self._index(layer).hardlink_target(entry)
        return self._ino_base[layer] + (target if target is not None else entry)

    def _merge(self, node: Node) -> dict[str, Node | int]:
        """Apply the overlay rules to the directory's sources, top layer first."""
        merged: dict[str, Node] = {}
        hidden: set[str] = set()
        for layer, entry in node.sources or [(node.layer, node.entry)]:
            index = self._index(layer)
            whiteouts = set()
            for name, child in index.children(entry):
                if name.startswith(WHITEOUT_PREFIX):
                    if self.raw and name != OPAQUE_MARKER:
                        shown = name[len(WHITEOUT_PREFIX):]
                        merged[shown] = self._new_node(node, shown, layer, child)
                    elif name != OPAQUE_MARKER:
                        whiteouts.add(name[len(WHITEOUT_PREFIX):])
                    continue
                if name in hidden or (self.raw and name in merged):
                    continue
                upper = merged.get(name)
                if upper is None:
                    merged[name] = self._new_node(node, name, layer, child)
                elif not upper.closed and self.is_dir(upper):
                    if index.kind(child) == toc.KIND_DIR:
                        upper.sources.append((layer, child))
                        upper.closed = index.lookup_child(child, OPAQUE_MARKER) is not None
                    else:
                        upper.closed = True  # a lower non-directory ends the merge below it
            hidden |= whiteouts
        children: dict[str, Node | int] = {}
        for name, child in sorted(merged.items()):
            if self.is_dir(child):
                child.layer, child.entry = self._metadata_source(child)
                child.ino = self._ino(child.layer, child.entry)
                if len(child.sources) == 1:
                    child.sources = None  # its one source is (layer, entry)
                children[name] = child
            else:
                children[name] = child.layer << 32 | child.entry
        return children

    def _metadata_source(self, node: Node) -> tuple[int, int]:
        """The topmost source with an entry of its own: an implied directory keeps lower metadata."""
        sources = node.sources or [(node.layer, node.entry)]
        for layer, entry in sources:
            if not self._index(layer).is_implicit(entry):
                return layer, entry
        return sources[0]

    def _is_raw_whiteout(self, node: Node) -> bool:
        return self.raw and self._index(node.layer).names[node.entry].startswith(WHITEOUT_PREFIX)

    # -- attributes ---------------------------------------------------------------------------------

    def entry(self, node: Node) -> toc.Entry:
        """The TOC entry the node takes its metadata from."""
        return self._index(node.layer).entry(node.entry)

    def mode(self, node: Node) -> int:
        """st_mode: type bits and permissions."""
        if self._is_raw_whiteout(node):
            return stat.S_IFCHR
        e = self.entry(node)
        return _KIND_MODE[e.kind] | e.mode

    def attrs(self, node: Node) -> dict[str, int]:
        """The `stat` of a node (times in nanoseconds, st_blocks in the kernel's 512-byte units)."""
        e = self.entry(node)
        size = e.size if e.kind == toc.KIND_REG else 0
        if e.kind == toc.KIND_SYMLINK:
            size = len(os.fsencode(e.link_name))
        if self._is_raw_whiteout(node):
            rdev = 0
        else:
            rdev = os.makedev(e.dev_major, e.dev_minor) if e.kind in (toc.KIND_CHAR, toc.KIND_BLOCK) else 0
        mtime = e.mtime * 1_000_000_000
        return {"st_ino": node.ino, "st_mode": self.mode(node), "st_nlink": self.nlink(node),
                "st_uid": e.uid, "st_gid": e.gid, "st_size": size, "st_blocks": (size + 511) // 512,
                "st_blksize": BLOCK_SIZE, "st_rdev": rdev, "st_mtime": mtime, "st_atime": mtime,
                "st_ctime": mtime}

    def nlink(self, node: Node) -> int:
        """2 + subdirectories for a directory; the visible names of a hardlink group; else 1."""
        if self.is_dir(node):
            return 2 + sum(1 for child in self._merged(node).values() if isinstance(child, Node))
        index = self._index(node.layer)
        target = index.hardlink_target(node.entry)
        key = (node.layer, target if target is not None else node.entry)
        if target is None and not self._members_of(node.layer).get(node.entry):
            return 1
        if key not in self._group_nlink:
            names = [key[1], *self._members_of(node.layer)[key[1]]]
            visible = sum(1 for entry in names if self._resolves_to(key, _entry_path(index, entry)))
            self._group_nlink[key] = max(visible, 1)
        return self._group_nlink[key]

    def _members_of(self, layer: int) -> dict[int, list[int]]:
        """Hardlink groups of a layer: target entry -> the entries linking to it (built once)."""
        members = self._members.get(layer)
        if members is None:
            index, members = self._index(layer), {}
            for entry in range(len(index)):
                target = index.hardlink_target(entry)
                if target is not None:
                    members.setdefault(target, []).append(entry)
            self._members[layer] = members
        return members

    def _resolves_to(self, key: tuple[int, int], path: str) -> bool:
        node = self.lookup(path)
        if node is None or node.layer != key[0]:
            return False
        target = self._index(node.layer).hardlink_target(node.entry)
        return (target if target is not None else node.entry) == key[1]

    def xattrs(self, node: Node) -> dict[str, bytes]:
        """The node's extended attributes (plus the opaque marker in a raw layer view)."""
        xattrs = self.entry(node).xattrs
        if self.raw and node.closed and self.is_dir(node):
            xattrs = {**xattrs, self.opaque_xattr: b"y"}
        return xattrs

    def readlink(self, node: Node) -> str:
        """A symlink's target, verbatim (never followed here)."""
        return self.entry(node).link_name


def _entry_path(index: toc.Index, entry: int) -> str:
    parts = []
    while entry != toc.Index.ROOT:
        parts.append(index.names[entry])
        entry = index.parent(entry)
    return "/".join(reversed(parts))


class AccessRecorder:
    """Logs the first open of every regular file, in order, as `LAYER-DIGEST<TAB>PATH` lines appended and
    flushed to a file one by one, so the log is complete however the mount ends (see read_access_log)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 -- open as long as the mount
        self._seen: set[tuple[str, str]] = set()
        self._lock = threading.Lock()

    def record(self, digest: str, path: str) -> None:
        """Log `path` of layer `digest` unless it was logged before."""
        if "\n" in path or "\t" in path:
            log.debug("not recorded (a tab or newline in the name): %r", path)
            return
        with self._lock:
            if (digest, path) in self._seen:
                return
            self._seen.add((digest, path))
            try:
                self._file.write(f"{digest}\t{path}\n")
                self._file.flush()
            except UnicodeEncodeError:
                log.debug("not recorded (not UTF-8): %r", path)

    def close(self) -> None:
        """Close the log file."""
        with self._lock:
            self._file.close()


def read_access_log(path: str | os.PathLike[str]) -> dict[str, list[str]]:
    """An AccessRecorder's log as {layer digest: paths in the order first opened}."""
    by_layer: dict[str, list[str]] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            digest, sep, name = line.rstrip("\n").partition("\t")
            if sep:
                by_layer.setdefault(digest, []).append(name)
    return by_layer


@dataclass
class ReadState:
    """Per open file: where the next sequential read would start and how far read-ahead reaches."""

    next_offset: int = 0
    ahead_until: int = 0


class ReadActivity:
    """Reads in flight, so that background fetches wait while anyone reads.  One may be shared by several
    views (the snapshotter's layer daemon serves many layers in one process): then no layer's background
    fetch competes with another layer's readers."""

    def __init__(self) -> None:
        self._busy = 0
        self._idle = threading.Condition()

    @contextlib.contextmanager
    def reading(self) -> Iterator[None]:
        """Count a read for the duration of the block."""
        with self._idle:
            self._busy += 1
        try:
            yield
        finally:
            with self._idle:
                self._busy -= 1
                self._idle.notify_all()

    def wait_idle(self, stop: threading.Event) -> None:
        """Return once no read is in flight, or `stop` is set."""
        with self._idle:
            while self._busy and not stop.is_set():
                self._idle.wait(1.0)


class ImageView:
    """An image's layers, their merged tree once every layer is indexed, and file data through the cache.

    `start()` launches the threads (call it after daemonizing): the download of layers that are not
    eStargz, then the landmark prefetch and, if enabled, a low-priority background fetch of every chunk.
    """

    def __init__(self, layers: Sequence[Layer], chunk_cache: cache.ChunkCache, work_dir: Path, *,
                 raw: bool = False, opaque_xattr: str = "trusted.overlay.opaque", prefetch: bool = True,
                 background: bool = True, recorder: AccessRecorder | None = None,
                 activity: ReadActivity | None = None) -> None:
        self.layers = list(layers)
        self.recorder = recorder
        self.cache, self.work_dir = chunk_cache, Path(work_dir)
        self.prefetch, self.background = prefetch, background
        self._tree_args = (raw, opaque_xattr)
        # starting -> prefetched -> background -> done, or off
        self.fetch_state = "starting" if prefetch or background else "off"
        self._tree: MergedTree | None = None
        self._layers_changed = threading.Condition()  # notified when the tree is built or a download fails
        self.on_tree: Callable[[], None] | None = None  # called once the tree is built after start()
        self._stop = threading.Event()
        self.activity = activity if activity is not None else ReadActivity()
        self._ahead = concurrent.futures.ThreadPoolExecutor(READ_AHEAD_THREADS, "readahead")
        self._neighbour_lock = threading.Lock()
        self._neighbour_bytes: dict[str, bytes] = {}  # digest -> compressed chunk fetched with a neighbour
        if all(layer.index is not None for layer in self.layers):
            self._build_tree()

    def _build_tree(self) -> None:
        merged = MergedTree(self.layers, *self._tree_args)
        with self._layers_changed:
            self._tree = merged
            self._layers_changed.notify_all()
        if self.on_tree is not None:
            self.on_tree()

    def start(self, on_prefetched: Callable[[], None] | None = None,
              progress: Callable[[int, int], None] | None = None) -> None:
        """Start the background threads; `on_prefetched` runs once the landmark ranges are in the cache
        (or their fetch failed), `progress(done, total)` reports prefetched compressed bytes meanwhile."""
        self._spawn("layer-download", self._download_pending)
        if self.prefetch or self.background:
            self._spawn("prefetch", lambda: self._prefetch_all(on_prefetched, progress))
        elif on_prefetched is not None:
            on_prefetched()

    def _spawn(self, name: str, target: Callable[[], None]) -> None:
        threading.Thread(target=target, name=name, daemon=True).start()

    def close(self) -> None:
        """Stop the background work (threads are daemons: a download in flight is abandoned)."""
        self._stop.set()
        self._ahead.shutdown(wait=False, cancel_futures=True)
        if self.recorder is not None:
            self.recorder.close()

    def tree(self, timeout: float = READY_TIMEOUT) -> MergedTree:
        """The merged tree; waits up to `timeout` for layers still being downloaded, but raises at once
        while a layer's last download attempt has failed (a later attempt may still succeed)."""
        def failed() -> list[str]:
            return [f"{layer.digest}: {layer.error}" for layer in self.layers if layer.state == "failed"]

        with self._layers_changed:
            self._layers_changed.wait_for(lambda: self._tree is not None or failed(), timeout)
            if self._tree is not None:
                return self._tree
        errors = failed()
        if errors:
            raise toc.LazymountError(f"layer download failed ({'; '.join(errors)})")  # EIO
        raise NotReadyError("layers still downloading")

    # -- background work ----------------------------------------------------------------------------

    def _download_pending(self) -> None:
        delay = 1.0
        while not self._stop.is_set():
            pending = [layer for layer in self.layers if layer.index is None]
            if not pending:
                break
            for layer in pending:
                try:
                    layer.localize(self.work_dir)
                    layer.error = None
                    log.info("layer %s downloaded and indexed; serving it", layer.digest)
                except toc.FormatError as e:  # verified bytes that are no layer: no retry can help
                    layer.error, layer.permanent = str(e), True
                    log.error("layer %s: %s; its files cannot be served", layer.digest, e)
                except (toc.LazymountError, OSError) as e:
                    layer.error = str(e)
                    log.warning("layer %s: download failed, retrying in %.0f s: %s", layer.digest, delay, e)
                with self._layers_changed:
                    self._layers_changed.notify_all()
            if any(layer.permanent for layer in self.layers):
                break
            if any(layer.index is None for layer in self.layers):
                self._stop.wait(delay)
                delay = min(delay * 2, 60.0)
        if not self._stop.is_set() and self._tree is None and all(layer.index is not None
                                                                   for layer in self.layers):
            self._build_tree()

    def _prefetch_all(self, on_prefetched: Callable[[], None] | None,
                      progress: Callable[[int, int], None] | None) -> None:
        lazy = [layer for layer in self.layers if layer.state == "lazy"]
        try:
            if self.prefetch:
                self._prefetch_landmarks(lazy, progress)
                self.fetch_state = "prefetched"
        finally:
            if on_prefetched is not None:
                on_prefetched()
        self._unstage(lazy)
        if not self.background:
            return
        self.fetch_state = "background"
        _lowest_priority()
        for layer in lazy:
            assert layer.index is not None
            missing = (c for c in layer.index.blob_chunks() if not self.cache.contains(c.digest))
            for span in _spans(missing, BACKGROUND_SPAN):
                if self._stop.is_set():
                    return
                self.activity.wait_idle(self._stop)
                self._fetch_span(layer, span[0].comp_offset, span[-1].comp_end, span, "background_bytes")
        self.fetch_state = "done"
        log.info("background fetch complete")

    def _prefetch_landmarks(self, layers: list[Layer], progress: Callable[[int, int], None] | None) -> None:
        """Fetch every layer's landmark range [0, prefetch_end) in a few large requests spread over
        PREFETCH_CONNECTIONS parallel connections and stage the bytes (see `_unstage`); requests whose
        chunks are all cached are skipped."""
        ends = {id(layer): layer.index.prefetch_end or 0 for layer in layers if layer.index is not None}
        target = sum(ends.values()) // PREFETCH_CONNECTIONS
        target = min(max(target, MIN_PREFETCH_REQUEST), PREFETCH_SPAN)
        requests = []
        for layer in layers:
            assert layer.index is not None
            end = ends[id(layer)]
            chunks = list(itertools.takewhile(lambda c, end=end: c.comp_end <= end,
                                              layer.index.blob_chunks())) if end else []
            for start, stop, part in _cut_range(chunks, end, target):
                if not all(self.cache.contains(c.digest) for c in part):
                    requests.append((layer, start, stop, part))
        total = sum(stop - start for _, start, stop, _ in requests)
        if not requests:
            return
        log.info("prefetching %d bytes of landmark ranges in %d requests", total, len(requests))
        done = 0
        if progress is not None:
            progress(done, total)
        try:
            for layer in {id(layer): layer for layer, *_ in requests}.values():
                layer.staged = StagedRanges(self.work_dir)
        except OSError as e:  # e.g. a read-only cache directory: reads fetch on demand instead
            log.warning("landmark prefetch skipped: cannot stage %d bytes in %s: %s", total, self.work_dir, e)
            return
        with concurrent.futures.ThreadPoolExecutor(PREFETCH_CONNECTIONS, "prefetch") as pool:
            futures = {pool.submit(self._stage_span, layer, start, stop, part):
                       stop - start for layer, start, stop, part in requests}
            for future in concurrent.futures.as_completed(futures):
                done += futures[future]
                if progress is not None:
                    progress(done, total)

    def _stage_span(self, layer: Layer, start: int, end: int, chunks: list[toc.Chunk]) -> None:
        """Fetch the compressed bytes [start, end) in one request into the layer's staged ranges."""
        assert layer.staged is not None
        if self._stop.is_set():
            return
        try:
            layer.staged.put(start, layer.fetch(start, end - start), chunks)
            layer.count("prefetched_bytes", end - start)
        except (toc.LazymountError, OSError) as e:
            layer.count("errors")
            log.warning("layer %s: prefetching [%d, %d) failed: %s", layer.digest, start, end, e)

    def _unstage(self, layers: list[Layer]) -> None:
        """Decompress the staged chunks into the cache on every core, in blob order (the order a profiled
        workload reads them; its reads of chunks not yet done decompress them themselves), layers taking
        turns; then drop the staged bytes."""
        staged = [(layer, layer.staged) for layer in layers if layer.staged is not None]
        order = itertools.chain.from_iterable(itertools.zip_longest(
            *([(layer, c) for c in ranges.chunks] for layer, ranges in staged)))
        with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1, "unstage",
                                                   initializer=_lowest_priority) as pool:
            for layer, c in filter(None, order):
                pool.submit(self._unstage_chunk, layer, c)
        for layer, ranges in staged:
            layer.staged = None  # a reader still holding it finds it closed and fetches instead
            ranges.close()

    def _unstage_chunk(self, layer: Layer, c: toc.Chunk) -> None:
        if self._stop.is_set():
            return

        def load() -> bytes:
            data = layer.staged_chunk(c)
            if data is None:
                raise OSError(errno.EIO, "staged bytes gone")
            return data

        try:
            self.cache.store(c.digest, load)
        except (toc.LazymountError, OSError) as e:  # read again, and reported, when a reader asks for it
            log.debug("layer %s: prefetched chunk at %d not stored: %s", layer.digest, c.comp_offset, e)

    def _fetch_span(self, layer: Layer, start: int, end: int, chunks: list[toc.Chunk], counter: str) -> None:
        """Fetch the compressed bytes [start, end) in one request and put the chunks in it in the cache."""
        assert layer.index is not None
        fmt = layer.index.format
        if self._stop.is_set():
            return
        try:
            data = layer.fetch(start, end - start)
            for c in chunks:
                part = data[c.comp_offset - start:c.comp_end - start]
                # the cache verifies the digest before it stores anything
                self.cache.store(c.digest, lambda c=c, part=part: toc.decompress_chunk(part, c, fmt,
                                                                                        verify=False))
            layer.count(counter, end - start)
        except (toc.LazymountError, OSError) as e:
            layer.count("errors")
            log.warning("layer %s: fetching [%d, %d) failed: %s", layer.digest, start, end, e)

    # -- reads --------------------------------------------------------------------------------------

    def opened(self, node: Node) -> None:
        """A regular file was opened: log its first access if recording (its path in the layer that
        provides it in the merged view)."""
        if self.recorder is not None:
            layer = self.layers[node.layer]
            assert layer.index is not None
            self.recorder.record(layer.digest, _entry_path(layer.index, node.entry))

    def read(self, node: Node, offset: int, size: int, state: ReadState | None = None) -> bytes:
        """Up to `size` bytes of a regular file at `offset`; verified bytes or OSError(EIO)."""
        layer = self.layers[node.layer]
        index = layer.index
        assert index is not None
        chunks = index.chunk_range(node.entry, offset, size)
        out = bytearray()
        with self.activity.reading():
            for c in chunks:
                out += self._chunk(layer, c, node, max(offset, c.file_offset) - c.file_offset,
                                   min(offset + size, c.file_offset + c.size) - c.file_offset)
        layer.count("bytes_served", len(out))
        if state is not None and chunks:
            self._read_ahead(layer, node, chunks[-1], offset, len(out), state)
        return bytes(out)

    def _chunk(self, layer: Layer, c: toc.Chunk, node: Node, start: int, stop: int,
               quiet: bool = False) -> bytes:
        """Bytes [start, stop) of the chunk, loaded into the cache first if need be."""
        assert layer.index is not None
        fmt = layer.index.format
        loaded = []

        def load() -> bytes:
            data = layer.staged_chunk(c)
            if data is not None:  # prefetched: a hit
                return data
            loaded.append(True)
            with self._neighbour_lock:
                compressed = self._neighbour_bytes.pop(c.digest, None)
            if compressed is None:
                neighbours = self._uncached_neighbours(layer, node, c)
                end = neighbours[-1].comp_end if neighbours else c.comp_end
                compressed = layer.fetch(c.comp_offset, end - c.comp_offset)
                if neighbours:
                    self._keep_neighbours(layer, neighbours, compressed, c.comp_offset)
                compressed = compressed[:c.comp_end - c.comp_offset]
            # the cache verifies the digest before it stores or returns anything
            return toc.decompress_chunk(compressed, c, fmt, verify=False)

        try:
            data = self.cache.read(c.digest, start, stop, load)
        except toc.FormatError as e:
            layer.count("errors")
            log.error("layer %s: %s: chunk at file offset %d failed verification: %s",
                      layer.digest, node.path, c.file_offset, e)
            raise OSError(errno.EIO, "verification failed") from None
        except (toc.LazymountError, OSError) as e:
            layer.count("errors")
            (log.debug if quiet else log.warning)("layer %s: %s: reading chunk at file offset %d failed: %s",
                                                   layer.digest, node.path, c.file_offset, e)
            raise OSError(errno.EIO, "read failed") from None
        layer.count("chunks_fetched" if loaded else "chunk_hits")
        return data

    def _uncached_neighbours(self, layer: Layer, node: Node, c: toc.Chunk) -> list[toc.Chunk]:
        """The chunks after `c` in the blob, up to the first cached one, within NEIGHBOUR_SPAN: a
        package's files sit next to each other in a layer and are read together, so one request for
        them saves the round trips that would follow.  Only chunks of files in the missed file's directory
        (or below it) come along.  Like sequential read-ahead, this starts only once
        the layer has seen NEIGHBOUR_AFTER_MISSES misses: a single file read fetches that file alone."""
        assert layer.index is not None
        index = layer.index
        if layer.stats.chunks_fetched < NEIGHBOUR_AFTER_MISSES:
            return []
        directory = index.parent(node.entry)
        neighbours = []
        for owner, following in index.chunks_after(node.entry, c, NEIGHBOUR_SPAN):
            if self.cache.contains(following.digest) or not _inside(index, owner, directory):
                break  # stay in the missed file's directory (its package), fetch nothing twice
            neighbours.append(following)
        return neighbours

    def _keep_neighbours(self, layer: Layer, chunks: list[toc.Chunk], compressed: bytes, start: int) -> None:
        """Hold the neighbours' compressed bytes where a reader finds them at once, and store them in the
        cache from a read-ahead thread."""
        with self._neighbour_lock:
            for c in chunks:
                self._neighbour_bytes[c.digest] = compressed[c.comp_offset - start:c.comp_end - start]
        with contextlib.suppress(RuntimeError):  # shut down while unmounting
            self._ahead.submit(self._store_neighbours, layer, chunks)

    def _store_neighbours(self, layer: Layer, chunks: list[toc.Chunk]) -> None:
        assert layer.index is not None
        fmt = layer.index.format
        for c in chunks:
            with self._neighbour_lock:
                part = self._neighbour_bytes.pop(c.digest, None)
            if part is None:
                continue  # a reader took it first
            try:
                self.cache.store(c.digest, lambda c=c, part=part: toc.decompress_chunk(part, c, fmt,
                                                                                        verify=False))
            except (toc.LazymountError, OSError) as e:  # read again, and reported, when a reader asks for it
                log.debug("layer %s: neighbour chunk at %d not stored: %s", layer.digest, c.comp_offset, e)

    def _read_ahead(self, layer: Layer, node: Node, last: toc.Chunk, offset: int, length: int,
                    state: ReadState) -> None:
        """On sequential access, load the chunks of the next READ_AHEAD_BYTES in the background, so
        fetching one overlaps decompressing another."""
        sequential = offset == state.next_offset
        state.next_offset = offset + length
        following = last.file_offset + last.size
        start, end = max(following, state.ahead_until), following + READ_AHEAD_BYTES
        if not sequential or start >= end:
            return
        assert layer.index is not None
        for c in layer.index.chunk_range(node.entry, start, end - start):
            state.ahead_until = c.file_offset + c.size
            if not self.cache.contains(c.digest):
                with contextlib.suppress(RuntimeError):  # shut down while unmounting
                    self._ahead.submit(self._quiet_chunk, layer, c, node)

    def _quiet_chunk(self, layer: Layer, c: toc.Chunk, node: Node) -> None:
        with contextlib.suppress(OSError):
            self._chunk(layer, c, node, 0, 0, quiet=True)  # into the cache, nothing returned

    # -- reporting ----------------------------------------------------------------------------------

    def stats(self) -> dict:
        """Per-layer counters, their totals and the cache's counters."""
        layers = []
        for layer in self.layers:
            entry = {"digest": layer.digest, "state": layer.state, **vars(layer.stats)}
            if layer.index is not None:
                entry.update(format=layer.index.format, entries=len(layer.index))
            if layer.error:
                entry["error"] = layer.error
            layers.append(entry)
        totals = {key: sum(layer[key] for layer in layers) for key in vars(LayerStats())}
        return {"layers": layers, "totals": totals, "cache": self.cache.stats(),
                "fetch_state": self.fetch_state, "nodes": self._tree.nodes if self._tree else 0}


def _lowest_priority() -> None:
    """Run the calling thread at the lowest CPU priority: work that can wait yields the cores to the
    threads answering the workload's reads (the daemon's own session shares a scheduler group with them
    and would otherwise compete on equal terms)."""
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)


def _inside(index: toc.Index, entry: int, directory: int) -> bool:
    """Whether `entry` lies in `directory` or below it."""
    while entry != toc.Index.ROOT:
        entry = index.parent(entry)
        if entry == directory:
            return True
    return directory == toc.Index.ROOT


def _cut_range(chunks: list[toc.Chunk], end: int, target: int) -> list[tuple[int, int, list[toc.Chunk]]]:
    """Cut [0, end) at chunk boundaries into pieces of about `target` bytes: (start, stop, chunks)."""
    pieces: list[tuple[int, int, list[toc.Chunk]]] = []
    start, part = 0, []
    for c in chunks:
        part.append(c)
        if c.comp_end - start >= target:
            pieces.append((start, c.comp_end, part))
            start, part = c.comp_end, []
    if part:
        pieces.append((start, end, part))
    elif pieces:
        pieces[-1] = (pieces[-1][0], end, pieces[-1][2])
    return pieces


def _spans(chunks: Iterable[toc.Chunk], limit: int,
           gap: int = 64 << 10) -> Iterator[list[toc.Chunk]]:
    """Group chunks (in blob order) into runs one range request can fetch, at most `limit` bytes long
    unless a single chunk is longer."""
    span: list[toc.Chunk] = []
    for c in chunks:
        far = c.comp_offset - span[-1].comp_end > gap if span else False
        if span and (far or c.comp_end - span[0].comp_offset > limit):
            yield span
            span = []
        span.append(c)
    if span:
        yield span
