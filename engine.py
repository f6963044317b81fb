"""The read engine of a mounted image: layers and their blobs, file bytes through the cache, and the
background work that fills it.

What belongs here: a layer's blob and index (eStargz read by range, a plain gzip layer with a seek index
read by span, or downloaded whole, verified and indexed or converted locally), reading file bytes chunk by
chunk through the cache (verified bytes or EIO), sequential read-ahead, fetching a miss's neighbours
along, the landmark prefetch (a few large requests over parallel connections, staged and then
decompressed; for `run` also copied to a local directory by localcopy.py; for a seek-indexed layer, the
spans holding its profiled files), the background fetch (the rest of every lazy layer streamed at full
speed into staged ranges that answer readers' misses, decompressed into the cache while reads pause; a
seek-indexed layer span by span at low priority, its digest checked once it has every byte), per-layer
stats, handing the files a workload opens to a profiles.AccessRecorder; ImageView ties these to the
merged tree of tree.py once every layer is indexed.
What never does: overlay rules, inode numbers or attributes (tree.py), FUSE or any kernel interface
(fusefs.py adapts this to FUSE), HTTP (a layer is handed a `fetch.BlobReader` as its
download.BlobSource), local blob files and downloads (download.py), TOC parsing (toc.py, tocread.py),
seek index formats and decompression (seekindex.py) or keeping chunks (cache.py).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import itertools
import logging
import os
import queue
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import cache
import download
import layerwriter
import localcopy
import seekindex
import toc
import tocread
import tree

if TYPE_CHECKING:
    from profiles import AccessRecorder

log = logging.getLogger(__name__)

PREFETCH_SPAN = 16 << 20  # compressed bytes fetched in one request by the landmark prefetch
BACKGROUND_SPAN = 4 << 20  # ... and by the background fetch
PREFETCH_CONNECTIONS = 4  # parallel requests fetching the landmark ranges at mount time
MIN_PREFETCH_REQUEST = 1 << 20  # the landmark range is cut into requests no smaller than this
READ_AHEAD_BYTES = 8 << 20  # how far ahead of a sequential reader chunks are loaded
READ_AHEAD_THREADS = 2
NEIGHBOUR_SPAN = 512 << 10  # on a miss, chunks stored after it within this many compressed bytes come along
NEIGHBOUR_AFTER_MISSES = 2  # ... once a layer has had this many misses
READY_TIMEOUT = 600.0  # how long a file system call waits for a layer still being downloaded
# Staged chunks (the prefetch's and the background fetch's) are decompressed and stored only once reads have
# paused this long: a workload's reads come in bursts, and background work done between two of them holds
# the GIL (and a core) when the next read arrives, which then waits for it.
BACKGROUND_QUIET = 0.1
IDLE_POLL = 0.05
STAGED_WAIT = 2.0  # how long a read waits for its bytes on their way in a background range
# Larger prefetched files are left to the mount: such a file is as a rule a library that the workload maps
# and touches in part (`import torch` reads ~150 MB of the 434 MB libtorch_cpu.so), which a copy would
# decompress and write whole before the command could start.
COPY_MAX_FILE = 64 << 20


class NotReadyError(toc.LazymountError):
    """A layer of the image is still being downloaded."""

    errno = errno.EAGAIN


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
    span_decodes: int = 0  # seek-indexed layers: decompressions from a checkpoint


@dataclass
class Layer:
    """One layer: its digest, blob and (once known) TOC index; `pending` until a plain layer is converted.
    A plain gzip layer with a seek index has `spans` to read it by, and its index's file table."""

    digest: str
    blob: download.BlobSource
    toc_digest: str | None = None
    index: toc.Index | None = None
    spans: seekindex.SpanReader | None = None
    stats: LayerStats = field(default_factory=LayerStats)
    limits: toc.Limits = toc.DEFAULT_LIMITS
    error: str | None = None  # why the last download (or conversion) attempt failed
    permanent: bool = False  # the error is in the layer's verified bytes: it is not tried again
    staged: download.StagedRanges | None = None
    last_miss: tuple[float, int] = (float("-inf"), 0)  # when and at what compressed offset a read missed
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def state(self) -> str:
        """`lazy` (eStargz read by range), `indexed` (plain gzip read by span through a seek index), `local`
        (downloaded, then indexed or converted), `pending` or `failed`."""
        if self.index is None or self.permanent:
            return "failed" if self.error else "pending"
        if isinstance(self.blob, download.FileBlob):
            return "local"
        return "indexed" if self.spans is not None else "lazy"

    def use_seek_index(self, index: seekindex.SeekIndex) -> None:
        """Serve the layer through a seek index (validated for this blob)."""
        self.spans = seekindex.SpanReader(index, self.fetch)
        self.index = index.index
        self.count("index_bytes", index.stored_size)

    def open_index(self) -> bool:
        """Read the TOC if the blob is eStargz with a TOC digest annotation; False if it is not eStargz."""
        if self.toc_digest is None:
            return False

        def read_at(offset: int, length: int) -> bytes:
            data = self.blob.read_at(offset, length)
            self.count("index_bytes", len(data))
            return data

        try:
            self.index = tocread.read_index(read_at, self.blob.size, self.toc_digest, self.limits)
        except toc.FooterError:
            return False
        return True

    def staged_chunk(self, c: toc.Chunk, wait: float = STAGED_WAIT) -> bytes | None:
        """The chunk decompressed from its staged (prefetched) bytes, not yet verified (the cache does
        that); None if they are not staged.  Bytes on their way are waited for (up to `wait` seconds: a
        stalled request then costs the reader one of its own)."""
        staged = self.staged
        compressed = staged.read(c.comp_offset, c.comp_end - c.comp_offset, wait) if staged else None
        if compressed is None:
            return None
        assert self.index is not None
        return tocread.decompress_chunk(compressed, c, self.index.format, verify=False)

    def fetch(self, offset: int, length: int, urgent: bool = False) -> bytes:
        """Raw compressed bytes of the blob, counted."""
        return self.fetch_ranges([(offset, length)], urgent)[0]

    def fetch_ranges(self, ranges: Sequence[tuple[int, int]], urgent: bool = False) -> list[bytes]:
        """Raw compressed bytes of each (offset, length) of the blob, in one multi-range request, counted."""
        data = self.blob.read_ranges(ranges) if len(ranges) > 1 else [self.blob.read_at(*ranges[0], urgent)]
        with self._lock:
            self.stats.requests += 1
            self.stats.bytes_fetched += sum(map(len, data))
        return data

    def oversized(self, c: toc.Chunk) -> str | None:
        """Why chunk `c` is not read (its bytes, or the compressed span they lie in, are over
        limits.chunk_size), or None: what a TOC says a chunk holds must not decide what a read allocates.
        Through a seek index a chunk's offsets are in the tar stream, and what lies between one chunk and
        the next (tar headers) is never held: only its size counts."""
        limit = self.limits.chunk_size
        if c.inner_offset + c.size > limit:
            return f"chunk of {c.size} bytes at inner offset {c.inner_offset} is over {limit} " \
                "(limits.chunk_size)"
        if self.spans is None and c.comp_end - c.comp_offset > limit + (limit >> 8) + (1 << 20):
            return f"chunk's {c.comp_end - c.comp_offset} compressed bytes are over limits.chunk_size"
        return None

    def count(self, name: str, n: int = 1) -> None:
        """Add `n` to the counter `name` of the layer's stats."""
        with self._lock:
            setattr(self.stats, name, getattr(self.stats, name) + n)

    def localize(self, work_dir: Path, cache_dir: Path | None = None) -> None:
        """Download the whole blob (verified) and index it: its TOC if it is eStargz, else a seek index if it
        is gzip (built while the bytes arrive, and kept in `cache_dir`, so the next mount reads it lazily),
        else convert it to eStargz."""
        hexdigest = toc.check_digest(self.digest)[7:]
        blob_path = work_dir / "blobs" / hexdigest
        converted = work_dir / "converted" / f"{hexdigest}.estargz"
        for directory in (blob_path.parent, converted.parent):
            directory.mkdir(parents=True, exist_ok=True)
        if not converted.exists():
            seek, indexed = None, False
            if not blob_path.exists():  # by concurrent range requests, indexed as the bytes arrive
                seek = download.whole_blob(self.blob, self.digest, blob_path, consume=lambda arriving: (
                    seekindex.build_and_keep(arriving.read_at, arriving.size, self.digest, cache_dir)))
                indexed = True
            local = download.FileBlob(blob_path)
            try:
                self.index = tocread.read_index(local.read_at, local.size, limits=self.limits)
                self.blob = local
                self.count("bytes_fetched", local.size)
                return
            except toc.FooterError:
                pass
            if not indexed:  # downloaded by an earlier mount
                seek = seekindex.build_and_keep(local.read_at, local.size, self.digest, cache_dir,
                                                local.fileno())
            if seek is not None:  # served from the local blob through its new index
                self.blob = local
                self.use_seek_index(seek)
                self.count("bytes_fetched", local.size)
                return
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
        local = download.FileBlob(converted)
        self.index = tocread.read_index(local.read_at, local.size, limits=self.limits)
        self.blob = local



@dataclass
class ReadState:
    """Per open file: where the next sequential read would start and how far read-ahead reaches."""

    next_offset: int = 0
    ahead_until: int = 0


class ReadActivity:
    """Reads in flight and when the last one ended, so that background fetches wait while anyone reads.
    One may be shared by several views (the snapshotter's layer daemon serves many layers in one
    process): then no layer's background fetch competes with another layer's readers.  A read only
    counts itself (it never wakes a waiter): the waiter looks again after the time it still has to wait."""

    def __init__(self) -> None:
        self._busy = 0
        self._ended = float("-inf")  # time.monotonic() when the last read finished
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def reading(self) -> Iterator[None]:
        """Count a read for the duration of the block."""
        with self._lock:
            self._busy += 1
        try:
            yield
        finally:
            with self._lock:
                self._busy -= 1
                self._ended = time.monotonic()

    def wait_idle(self, stop: threading.Event, quiet: float = 0.0) -> None:
        """Return once no read is in flight and none has finished for `quiet` seconds, or `stop` is set
        (while reads are in flight, it looks every IDLE_POLL seconds)."""
        while not stop.is_set():
            with self._lock:
                left = IDLE_POLL if self._busy else self._ended + quiet - time.monotonic()
            if left <= 0:
                return
            stop.wait(left)


class ImageView:
    """An image's layers, their merged tree once every layer is indexed, and file data through the cache.

    `start()` launches the threads (call it after daemonizing): the download of layers that are not
    eStargz, then the landmark prefetch and, if enabled, the background fetch of every chunk.
    """

    def __init__(self, layers: Sequence[Layer], chunk_cache: cache.ChunkCache, work_dir: Path, *,
                 raw: bool = False, opaque_xattr: str = "trusted.overlay.opaque", prefetch: bool = True,
                 background: bool = True, recorder: AccessRecorder | None = None,
                 activity: ReadActivity | None = None, profile: Mapping[str, Sequence[str]] | None = None,
                 cache_dir: Path | None = None, name: str = "", local_copy: Path | None = None) -> None:
        self.layers = list(layers)
        # where the prefetched files are written (see _copy_prefetched), and how that went
        self.local_copy, self.local_copy_state = local_copy, {}
        self.profile = profile or {}  # layer digest -> paths whose chunks the prefetch fetches, in order
        self.cache_dir, self.name = cache_dir, name  # where seek indexes are kept; the image, for logs
        self.recorder = recorder
        self.cache, self.work_dir = chunk_cache, Path(work_dir)
        self.prefetch, self.background = prefetch, background
        self._tree_args = (raw, opaque_xattr)
        # starting -> prefetched -> background -> done, or off
        self.fetch_state = "starting" if prefetch or background else "off"
        self._tree: tree.MergedTree | None = None
        self._layers_changed = threading.Condition()  # notified when the tree is built or a download fails
        self.on_tree: Callable[[], None] | None = None  # called once the tree is built after start()
        self._stop = threading.Event()
        self.activity = activity if activity is not None else ReadActivity()
        self._ahead = concurrent.futures.ThreadPoolExecutor(READ_AHEAD_THREADS, "readahead")
        self._neighbour_lock = threading.Lock()
        self._neighbour_bytes: dict[str, bytes] = {}  # digest -> compressed chunk fetched with a neighbour
        self._decoded: dict[str, bytes] = {}  # digest -> chunk of an indexed layer decompressed with another
        # the local copy's chunks of indexed layers: those not yet taken, those decompressed with another
        # and waiting to be taken, a lock per first span decompressed
        self._copy_wanted: set[str] = set()
        self._copy_held: dict[str, bytes] = {}
        self._copy_span_locks: dict[tuple[str, int], threading.Lock] = {}
        if all(layer.index is not None for layer in self.layers):
            self._build_tree()

    def _build_tree(self) -> None:
        indexes = [layer.index for layer in self.layers if layer.index is not None]
        assert len(indexes) == len(self.layers), "the tree is built once every layer is indexed"
        merged = tree.MergedTree(indexes, *self._tree_args)
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
        for layer in self.layers:
            if layer.spans is not None and layer.staged is not None:
                layer.staged.close()  # prefetched spans
        if self.recorder is not None:
            self.recorder.close()

    def tree(self, timeout: float = READY_TIMEOUT) -> tree.MergedTree:
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
                    layer.localize(self.work_dir, self.cache_dir)
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
        indexed = [layer for layer in self.layers if layer.state == "indexed"]
        pieces: list[tuple[Layer, _SpanPiece]] = []
        try:
            if self.prefetch:
                copy = None if self.local_copy is None else lambda: self._copy_prefetched(lazy + indexed)
                pieces = self._prefetch_landmarks(lazy, indexed, progress, copy)
                self.fetch_state = "prefetched"
        finally:
            if on_prefetched is not None:
                on_prefetched()
        self._unstage(lazy, pieces)
        if not self.background:
            return
        self.fetch_state = "background"
        self._background_lazy(lazy)
        _lowest_priority()
        for layer in self.layers:
            if layer.state == "indexed":
                self._background_indexed(layer)
        self.fetch_state = "done"
        log.info("background fetch complete")

    def _background_indexed(self, layer: Layer) -> None:
        """Fetch a seek-indexed layer span by span, storing the chunks not yet cached, and check the blob's
        digest once all of it has passed: a layer that does not match its manifest is failed (EIO from
        then on) however well its spans matched.  Once a cache directory has seen the digest match, spans
        whose chunks are all cached are skipped."""
        assert layer.spans is not None
        index = layer.spans.index
        checked = self.cache_dir is not None and seekindex.digest_checked(self.cache_dir, layer.digest)
        whole = seekindex.BlobDigest(index, layer.fetch(0, index.span_range(0)[0]))  # the gzip header first
        for k in range(index.span_count):
            if self._stop.is_set():
                return
            self.activity.wait_idle(self._stop)
            start, end = index.out_range(k)
            ending = [c for c in index.chunks_within(max(start - seekindex.CHUNK_SIZE, 0), end)
                      if c.comp_end > start and not self.cache.contains(c.digest)]
            data = None
            try:
                if ending or not checked:
                    data = layer.spans.spans(k, k)
                    layer.count("background_bytes", len(data))
                for c in ending:
                    self.cache.store(c.digest, lambda c=c: self._indexed_chunk(layer, c, later=False))
            except (toc.LazymountError, OSError) as e:
                layer.count("errors")
                log.warning("layer %s: fetching span %d failed: %s", layer.digest, k, e)
            whole.add(k, data)
        if whole.result() not in (None, layer.digest):
            layer.error, layer.permanent = f"blob is {whole.result()}, not its digest {layer.digest}", True
            log.error("image %s: layer %s: %s; its files fail with EIO from now on", self.name, layer.digest,
                      layer.error)
        elif whole.result() and self.cache_dir is not None:
            seekindex.digest_checked(self.cache_dir, layer.digest, mark=True)

    def _indexed_chunk(self, layer: Layer, c: toc.Chunk, later: bool = True) -> bytes:
        """A chunk of a seek-indexed layer.  The chunks decompressed along with it are held where a reader
        finds them at once and go into the cache (from a read-ahead thread if `later`)."""
        with self._neighbour_lock:
            data = self._decoded.pop(c.digest, None)
        if data is not None:
            return data
        assert layer.spans is not None
        data, others = layer.spans.chunk(c, lambda other: not self.cache.contains(other.digest))
        layer.count("span_decodes")
        if others:
            self._hold(layer, self._decoded, others, lambda _, piece: piece, later)
        return data

    def _prefetch_landmarks(self, layers: list[Layer], indexed: list[Layer],
                            progress: Callable[[int, int], None] | None,
                            meanwhile: Callable[[], None] | None = None) -> list[tuple[Layer, _SpanPiece]]:
        """Fetch every eStargz layer's landmark range [0, prefetch_end) and the chunks of the files its
        profile lists (`profile`: scattered runs of chunks, several to a multi-range request, in profile
        order), and the spans holding the profiled files of the seek-indexed layers (verified as they
        arrive), in a few large requests spread over PREFETCH_CONNECTIONS parallel connections, and stage
        the bytes (see `_unstage`); requests whose chunks are all cached are skipped.  The pieces of spans
        staged, in profile order: the staged spans stay for the mount's life (the files in them that
        `_unstage` does not decompress, and the background fetch, read them from there).  `meanwhile` runs
        (then, if nothing is fetched) while the requests are on their way: a reader of staged bytes
        waits for them."""
        ends = {id(layer): layer.index.prefetch_end or 0 for layer in layers if layer.index is not None}
        profiled = {id(layer): self._profiled_chunks(layer, ends.get(id(layer), 0))
                    for layer in [*layers, *indexed]}
        wanted = sum(ends.values()) + sum(c.comp_end - c.comp_offset for layer in layers
                                          for c in profiled[id(layer)])
        for layer in indexed:
            assert layer.spans is not None
            index = layer.spans.index
            wanted += sum(index.span_range(last)[1] - index.span_range(first)[0]
                          for first, last, _ in index.pieces(profiled[id(layer)], PREFETCH_SPAN))
        target = min(max(wanted // PREFETCH_CONNECTIONS, MIN_PREFETCH_REQUEST), PREFETCH_SPAN)
        requests: list[tuple[Layer, list[_Run]]] = []
        for layer in layers:
            assert layer.index is not None
            end = ends[id(layer)]
            # up to the landmark, or to a chunk too large to read (whose bytes are not fetched either)
            chunks = list(itertools.takewhile(lambda c, end=end, layer=layer: c.comp_end <= end
                                              and not layer.oversized(c), layer.index.blob_chunks()))
            end = chunks[-1].comp_end if chunks and end > chunks[-1].comp_end else end
            requests += [(layer, [piece]) for piece in _cut_range(chunks, end, target)
                         if not all(self.cache.contains(c.digest) for c in piece[2])]
        for layer in layers:  # then the profiled files' runs of chunks, in profile order
            wanted = [c for c in profiled[id(layer)] if not layer.oversized(c)]
            rank = {c.digest: i for i, c in enumerate(wanted)}
            spans = _spans(sorted(wanted, key=lambda c: (c.comp_offset, c.inner_offset)), target)
            runs = sorted(((run[0].comp_offset, run[-1].comp_end, run) for run in spans),
                          key=lambda run, rank=rank: min(rank[c.digest] for c in run[2]))
            requests += [(layer, batch) for batch in _batches(runs, target)]
        span_requests: list[tuple[Layer, list[_SpanRun]]] = []
        for layer in indexed:
            assert layer.spans is not None
            index = layer.spans.index
            span_requests += [(layer, batch) for batch in _batches(
                [(index.span_range(piece[0])[0], index.span_range(piece[1])[1], piece)
                 for piece in index.pieces(profiled[id(layer)], target)], target)]
        total = sum(stop - start for _, runs in [*requests, *span_requests] for start, stop, _ in runs)
        if not requests and not span_requests:
            if meanwhile is not None:
                meanwhile()
            return []
        log.info("prefetching %d bytes of landmark ranges and profiled files in %d requests", total,
                 len(requests) + len(span_requests))
        done = 0
        if progress is not None:
            progress(done, total)
        try:
            for layer in {id(layer): layer for layer, _ in [*requests, *span_requests]}.values():
                layer.staged = download.StagedRanges(self.work_dir)
                if layer.spans is not None:
                    layer.spans.stage = layer.staged
        except OSError as e:  # e.g. a read-only cache directory: reads fetch on demand instead
            log.warning("landmark prefetch skipped: cannot stage %d bytes in %s: %s", total, self.work_dir, e)
            if meanwhile is not None:
                meanwhile()
            return []
        for layer, runs in requests:
            assert layer.staged is not None
            for start, stop, _ in runs:
                layer.staged.fetching(start, stop)
        for layer, runs in span_requests:  # a reader needing one of these spans meanwhile waits for it
            assert layer.spans is not None
            layer.spans.expect(k for _, _, (first, last, _) in runs for k in range(first, last + 1))
        with concurrent.futures.ThreadPoolExecutor(PREFETCH_CONNECTIONS, "prefetch") as pool:
            futures = {pool.submit(self._stage_runs, layer, runs): sum(b - a for a, b, _ in runs)
                       for layer, runs in requests}
            futures.update({pool.submit(self._fetch_pieces, layer, runs): sum(b - a for a, b, _ in runs)
                            for layer, runs in span_requests})
            if meanwhile is not None:
                meanwhile()
            for future in concurrent.futures.as_completed(futures):
                done += futures[future]
                if progress is not None:
                    progress(done, total)
        return [(layer, piece) for layer, runs in span_requests for _, _, piece in runs]

    def _copy_prefetched(self, layers: list[Layer]) -> None:
        """Write the regular files the prefetch fetches (the landmark ranges' and the profiled files of
        the eStargz and seek-indexed `layers` that the merged view shows from that layer; none over
        COPY_MAX_FILE) into the directory `local_copy`, verified, with the image's modes and mtimes (owners
        too as root), and the directories leading to them, in stream order (the order their bytes arrive);
        `local_copy_state` says how many, or why not.  Any failure makes the copy unusable (an error in the
        state): it is all or nothing, since an overlay over it must not hide a file."""
        assert self.local_copy is not None
        started = time.monotonic()
        try:
            merged = self.tree(timeout=0)
            # path -> (layer, stream offset, node, chunks): sorted on the first two, the order bytes arrive
            files: dict[str, tuple[int, int, tree.Node, list[toc.Chunk]]] = {}
            for layer in layers:
                index = layer.index
                assert index is not None
                paths = [tree.entry_path(index, e) for e in index.files_before(index.prefetch_end or 0)]
                for path in itertools.chain(filter(None, paths), self.profile.get(layer.digest, ())):
                    node = merged.lookup(path)
                    if node is not None and self.layers[node.layer] is layer and \
                            stat.S_ISREG(merged.mode(node)) and merged.entry(node).size <= COPY_MAX_FILE:
                        chunks = index.chunk_range(node.entry, 0, merged.entry(node).size)
                        files.setdefault(node.path.lstrip("/"), (node.layer, chunks[0].comp_offset if chunks
                                                                 else 0, node, chunks))
                        if layer.spans is not None:
                            self._copy_wanted.update(c.digest for c in chunks)
            ordered = [(path, node, chunks) for path, (*_, node, chunks)
                       in sorted(files.items(), key=lambda f: f[1][:2])]
            size = localcopy.write(merged, self.local_copy, ordered, self._copy_chunk,
                                   (os.cpu_count() or 1) + PREFETCH_CONNECTIONS)
        except (toc.LazymountError, OSError) as e:
            self.local_copy_state = {"error": str(e)}
            log.warning("the prefetched files were not copied to %s: %s", self.local_copy, e)
            return
        finally:
            with self._neighbour_lock:
                self._copy_wanted.clear()
                self._copy_held.clear()
                self._copy_span_locks.clear()
        self.local_copy_state = {"files": len(files), "bytes": size}
        log.info("copied %d prefetched files (%d bytes) to %s in %.2f s", len(files), size, self.local_copy,
                 time.monotonic() - started)

    def _copy_chunk(self, node: tree.Node, c: toc.Chunk) -> bytes:
        """A chunk for the local copy: from its staged bytes if it is not cached (waiting for them while
        they are on their way: the copy runs during the prefetch), verified here but not stored (the
        unstaging does that once the command runs: writing it twice, to the cache and here, would delay
        the command), else through the cache like any read."""
        layer = self.layers[node.layer]
        if layer.spans is not None and c.digest in self._copy_wanted:
            return self._copy_indexed_chunk(layer, c, node)
        if not layer.oversized(c) and not self.cache.contains(c.digest):
            data = layer.staged_chunk(c, READY_TIMEOUT)
            if data is not None:
                toc.verify_digest(data, c.digest, f"chunk of {node.path} at file offset {c.file_offset}")
                return data
        return self._chunk(layer, c, node, 0, c.size)

    def _copy_indexed_chunk(self, layer: Layer, c: toc.Chunk, node: tree.Node) -> bytes:
        """A chunk of a seek-indexed layer for the local copy, verified: the spans holding it (on their way
        or staged by the prefetch) are decompressed once for every chunk of the copy in them, which wait
        in memory until the copy takes them (it asks in stream order); none goes to the cache here."""
        assert layer.spans is not None
        first = layer.spans.index.spans_for(c.comp_offset, c.size)[0]
        with self._neighbour_lock:
            span_lock = self._copy_span_locks.setdefault((layer.digest, first), threading.Lock())
        with span_lock:  # one decompression of these spans, however many copy threads want them
            with self._neighbour_lock:
                data = self._copy_held.pop(c.digest, None)
                self._copy_wanted.discard(c.digest)
            if data is None:
                data, others = layer.spans.chunk(c, lambda other: other.digest in self._copy_wanted)
                layer.count("span_decodes")
                with self._neighbour_lock:
                    self._copy_held.update((other.digest, part) for other, part in others)
        toc.verify_digest(data, c.digest, f"chunk of {node.path} at file offset {c.file_offset}")
        return data

    def _profiled_chunks(self, layer: Layer, landmark_end: int) -> list[toc.Chunk]:
        """The chunks of the files `profile` lists for the layer, in profile order, each once, leaving out
        those in the landmark range [0, landmark_end) and those cached."""
        index = layer.index
        assert index is not None
        chunks: dict[str, toc.Chunk] = {}
        for path in self.profile.get(layer.digest, ()):
            entry = index.lookup(path)
            if entry is None:
                continue
            target = index.hardlink_target(entry)
            for c in index.chunks(entry if target is None else target):
                if c.comp_offset >= landmark_end and not self.cache.contains(c.digest):
                    chunks.setdefault(c.digest, c)
        return list(chunks.values())

    def _stage_runs(self, layer: Layer, runs: list[_Run]) -> None:
        """Fetch the compressed bytes of each run [start, stop) in one (multi-range) request into the
        layer's staged ranges."""
        assert layer.staged is not None
        try:
            if self._stop.is_set():
                raise OSError(errno.ECANCELED, "unmounting")
            data = layer.fetch_ranges([(start, stop - start) for start, stop, _ in runs])
            for (start, _, chunks), part in zip(runs, data, strict=True):
                layer.staged.put(start, part, chunks)
            layer.count("prefetched_bytes", sum(map(len, data)))
        except (toc.LazymountError, OSError) as e:
            for start, _, _ in runs:  # whoever waits for them fetches on their own
                layer.staged.abandon(start)
            layer.count("errors")
            log.warning("layer %s: prefetching %d range(s) from %d failed: %s", layer.digest, len(runs),
                        runs[0][0], e)

    def _fetch_pieces(self, layer: Layer, runs: list[_SpanRun]) -> None:
        """Fetch the spans of pieces of an indexed layer in one (multi-range) request and stage those that
        match the seek index (the others are fetched again, and fail, when read)."""
        assert layer.spans is not None

        def fetch_ranges(ranges: Sequence[tuple[int, int]]) -> list[bytes]:
            if self._stop.is_set():  # the spans' waiters learn it too
                raise OSError(errno.ECANCELED, "unmounting")
            return layer.fetch_ranges(ranges)

        try:
            bad = layer.spans.fetch_pieces([piece[:2] for _, _, piece in runs], fetch_ranges)
            layer.count("prefetched_bytes", sum(stop - start for start, stop, _ in runs))
            if bad:
                layer.count("errors", len(bad))
                log.error("layer %s: prefetched span(s) %s do not match the seek index; their files fail "
                          "with EIO", layer.digest, ", ".join(map(str, bad)))
        except (toc.LazymountError, OSError) as e:  # their readers fetch the spans again
            if not self._stop.is_set():
                layer.count("errors")
                log.warning("layer %s: prefetching %d span range(s) from %d failed: %s", layer.digest,
                            len(runs), runs[0][0], e)

    def _decode_piece(self, layer: Layer, piece: _SpanPiece) -> None:
        """Decompress the profiled chunks of a staged piece into the cache (those not cached, nor being
        stored by a reader that decompressed them along with its own), each once reads have paused: a
        reader decompresses what it needs from the staged spans at once, and a span decompresses to
        megabytes, most of which the workload may never read."""
        assert layer.spans is not None
        first, _, chunks = piece
        index = layer.spans.index
        self.activity.wait_idle(self._stop, BACKGROUND_QUIET)
        with self._neighbour_lock:
            chunks = [c for c in chunks if c.digest not in self._decoded]
        chunks = [c for c in chunks if not layer.oversized(c) and not self.cache.contains(c.digest)]
        if not chunks or self._stop.is_set():
            return
        last = max(index.spans_for(c.comp_offset, c.size)[1] for c in chunks)
        try:
            for c, data in layer.spans.decode(first, last, chunks):
                self.activity.wait_idle(self._stop, BACKGROUND_QUIET)
                if self._stop.is_set():
                    return
                self.cache.store(c.digest, lambda data=data: data)  # the cache verifies it
            layer.count("span_decodes")
        except (toc.LazymountError, OSError) as e:  # read again, and reported, when a reader asks for it
            log.debug("layer %s: prefetched spans from %d not decompressed: %s", layer.digest, first, e)

    def _unstage(self, layers: list[Layer], pieces: list[tuple[Layer, _SpanPiece]]) -> None:
        """Decompress the staged chunks into the cache on every core, while reads pause, in the order they
        arrived (landmark ranges in blob order, the order a profiled workload reads an optimized layer;
        then profiled files, about in profile order; its reads of chunks not yet done decompress them
        themselves), layers taking turns, then the profiled chunks of the staged `pieces` of indexed
        layers, in profile order; then drop the staged bytes of `layers`."""
        staged = [(layer, layer.staged) for layer in layers if layer.staged is not None]
        order = itertools.chain.from_iterable(itertools.zip_longest(
            *([(layer, c) for c in ranges.chunks] for layer, ranges in staged)))
        with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1, "unstage",
                                                   initializer=_lowest_priority) as pool:
            for layer, c in filter(None, order):
                pool.submit(self._unstage_chunk, layer, c)
            for layer, piece in pieces:
                pool.submit(self._decode_piece, layer, piece)
        for layer, ranges in staged:
            layer.staged = None  # a reader still holding it finds it closed and fetches instead
            ranges.close()

    def _unstage_chunk(self, layer: Layer, c: toc.Chunk) -> None:
        """Store a staged chunk in the cache once reads have paused (see BACKGROUND_QUIET)."""
        self.activity.wait_idle(self._stop, BACKGROUND_QUIET)
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

    def _background_lazy(self, layers: list[Layer]) -> None:
        """Fetch every chunk of the lazy layers not yet cached, at full speed: ranges of about
        BACKGROUND_SPAN over PREFETCH_CONNECTIONS connections, the layer a reader missed in last first, from
        where it missed, into staged ranges (a reader's miss there waits for the range instead of asking the
        registry); meanwhile decompress each staged chunk into the cache once reads pause (the cores are
        the workload's) and drop the range once its chunks are stored.  Fetches no more than the cache has
        room for, compressed and decompressed."""
        room, present = self.cache.room(), self.cache.present()  # one listing, not a stat per chunk
        plans: dict[int, list[tuple[int, int]]] = {}  # compressed ranges only: a plan of chunk objects
        for layer in layers:  # would hold every chunk of the layer in memory while the fetch runs
            assert layer.index is not None
            missing = (c for c in layer.index.blob_chunks()
                       if not layer.oversized(c) and c.digest not in present)
            plan = []
            for span in _spans(missing, BACKGROUND_SPAN):
                room -= span[-1].comp_end - span[0].comp_offset + sum(c.size for c in span)
                if room < 0:
                    break
                plan.append((span[0].comp_offset, span[-1].comp_end))
            if plan:
                plans[id(layer)] = plan
        active = [layer for layer in layers if id(layer) in plans]
        try:
            for layer in active:
                layer.staged = download.StagedRanges(self.work_dir)
        except OSError as e:
            log.warning("background fetch skipped: cannot stage in %s: %s", self.work_dir, e)
            return
        fetched: queue.SimpleQueue[tuple[Layer, tuple[int, int]] | None] = queue.SimpleQueue()
        lock = threading.Lock()

        def next_run() -> tuple[Layer, tuple[int, int]] | None:
            with lock:
                waiting = [layer for layer in active if plans[id(layer)]]
                if not waiting or self._stop.is_set():
                    return None
                layer = max(waiting, key=lambda layer: layer.last_miss[0])  # stable: image order first
                plan, at = plans[id(layer)], layer.last_miss[1]
                k = next((k for k, run in enumerate(plan) if run[1] > at), 0)
                run = plan.pop(k)
                assert layer.staged is not None
                layer.staged.fetching(run[0], run[1])
                return layer, run

        def worker() -> None:
            while (job := next_run()) is not None:
                layer, (start, stop) = job
                assert layer.staged is not None
                try:
                    data = layer.fetch(start, stop - start)
                    layer.staged.put(start, data, [])  # its chunks are stored from `fetched` below
                    layer.count("background_bytes", len(data))
                    fetched.put(job)
                except (toc.LazymountError, OSError) as e:  # its chunks are fetched on demand
                    layer.staged.abandon(start)
                    layer.count("errors")
                    log.warning("layer %s: fetching [%d, %d) failed: %s", layer.digest, start, stop, e)
            fetched.put(None)
            log.debug("background fetch: a connection is done")

        workers = [threading.Thread(target=worker, name="background", daemon=True)
                   for _ in range(PREFETCH_CONNECTIONS)]
        for thread in workers:  # at normal priority: they wait on the network, and readers wait on them
            thread.start()
        _lowest_priority()
        running = len(workers)
        while running:
            job = fetched.get()
            if job is None:
                running -= 1
                continue
            layer, (start, stop) = job
            assert layer.index is not None
            for c in layer.index.chunks_between(start, stop):
                if not layer.oversized(c):
                    self._unstage_chunk(layer, c)
            if layer.staged is not None:
                layer.staged.drop(start)
        for layer in active:
            staged, layer.staged = layer.staged, None
            if staged is not None:
                staged.close()

    # -- reads --------------------------------------------------------------------------------------

    def opened(self, node: tree.Node) -> None:
        """A regular file was opened: log its first access if recording (its path in the layer that
        provides it in the merged view)."""
        if self.recorder is not None:
            layer = self.layers[node.layer]
            assert layer.index is not None
            self.recorder.record(layer.digest, tree.entry_path(layer.index, node.entry))

    def read(self, node: tree.Node, offset: int, size: int, state: ReadState | None = None) -> bytes:
        """Up to `size` bytes of a regular file at `offset`; verified bytes or OSError(EIO)."""
        layer = self.layers[node.layer]
        index = layer.index
        assert index is not None
        if layer.permanent:
            raise OSError(errno.EIO, f"layer {layer.digest} failed: {layer.error}")
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

    def _chunk(self, layer: Layer, c: toc.Chunk, node: tree.Node, start: int, stop: int,
               quiet: bool = False) -> bytes:
        """Bytes [start, stop) of the chunk, loaded into the cache first if need be."""
        assert layer.index is not None
        fmt = layer.index.format
        loaded = []
        refused = layer.oversized(c)
        if refused:
            layer.count("errors")
            log.error("layer %s: %s: %s", layer.digest, node.path, refused)
            raise OSError(errno.EIO, refused)

        def load() -> bytes:
            if layer.spans is not None:
                loaded.append(True)
                return self._indexed_chunk(layer, c)
            data = layer.staged_chunk(c)
            if data is not None:  # prefetched: a hit
                return data
            loaded.append(True)
            layer.last_miss = (time.monotonic(), c.comp_offset)
            with self._neighbour_lock:
                compressed = self._neighbour_bytes.pop(c.digest, None)
            if compressed is None:
                neighbours = self._uncached_neighbours(layer, node, c)
                end = neighbours[-1].comp_end if neighbours else c.comp_end
                compressed = layer.fetch(c.comp_offset, end - c.comp_offset, urgent=True)
                if neighbours:
                    at = c.comp_offset
                    self._hold(layer, self._neighbour_bytes,
                               [(n, compressed[n.comp_offset - at:n.comp_end - at]) for n in neighbours],
                               lambda n, part: tocread.decompress_chunk(part, n, fmt, verify=False))
                compressed = compressed[:c.comp_end - c.comp_offset]
            # the cache verifies the digest before it stores or returns anything
            return tocread.decompress_chunk(compressed, c, fmt, verify=False)

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

    def _uncached_neighbours(self, layer: Layer, node: tree.Node, c: toc.Chunk) -> list[toc.Chunk]:
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

    def _hold(self, layer: Layer, held: dict[str, bytes], pieces: list[tuple[toc.Chunk, bytes]],
              decode: Callable[[toc.Chunk, bytes], bytes], later: bool = True) -> None:
        """Hold chunks' bytes (compressed neighbours, or chunks of an indexed layer decompressed along)
        in `held`, where a reader finds them at once, and store them in the cache through `decode` (from a
        read-ahead thread if `later`)."""
        with self._neighbour_lock:
            held.update((c.digest, part) for c, part in pieces)
        if not later:
            self._store_held(layer, held, [c for c, _ in pieces], decode)
            return
        with contextlib.suppress(RuntimeError):  # shut down while unmounting
            self._ahead.submit(self._store_held, layer, held, [c for c, _ in pieces], decode)

    def _store_held(self, layer: Layer, held: dict[str, bytes], chunks: list[toc.Chunk],
                    decode: Callable[[toc.Chunk, bytes], bytes]) -> None:
        for c in chunks:
            with self._neighbour_lock:
                part = held.pop(c.digest, None)
            if part is None:
                continue  # a reader took it first
            try:
                self.cache.store(c.digest, lambda c=c, part=part: decode(c, part))  # verified by the cache
            except (toc.LazymountError, OSError) as e:  # read again, and reported, when a reader asks for it
                log.debug("layer %s: neighbour chunk at %d not stored: %s", layer.digest, c.comp_offset, e)

    def _read_ahead(self, layer: Layer, node: tree.Node, last: toc.Chunk, offset: int, length: int,
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

    def _quiet_chunk(self, layer: Layer, c: toc.Chunk, node: tree.Node) -> None:
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
                "fetch_state": self.fetch_state, "nodes": self._tree.nodes if self._tree else 0,
                **({"local_copy": self.local_copy_state} if self.local_copy is not None else {})}


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


_Run = tuple[int, int, list[toc.Chunk]]  # compressed bytes [start, stop) and the chunks staged from them
_SpanPiece = tuple[int, int, list[toc.Chunk]]  # spans first..last fetched together, the chunks starting there
_SpanRun = tuple[int, int, _SpanPiece]  # ... and the blob bytes [start, stop) they are fetched from
_R = TypeVar("_R", _Run, _SpanRun)
MAX_PREFETCH_RANGES = 32  # ranges in one multi-range prefetch request


def _batches(runs: list[_R], target: int) -> Iterator[list[_R]]:
    """Consecutive runs grouped into requests of at most MAX_PREFETCH_RANGES ranges and about `target`
    bytes."""
    batch: list[_R] = []
    for run in runs:
        if batch and (len(batch) == MAX_PREFETCH_RANGES or
                      sum(stop - start for start, stop, _ in batch) + run[1] - run[0] > target):
            yield batch
            batch = []
        batch.append(run)
    if batch:
        yield batch


def _cut_range(chunks: list[toc.Chunk], end: int, target: int) -> list[_Run]:
    """Cut [0, end) at chunk boundaries into pieces of about `target` bytes: (start, stop, chunks)."""
    pieces: list[_Run] = []
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
