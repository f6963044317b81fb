"""Bounded, verified, content-addressed chunk cache: an LRU in memory over an optional LRU on disk.

Belongs here: keeping chunk bytes by their ``sha256:`` digest, both tiers' byte bounds and eviction,
verifying every chunk before it is stored or returned, and singleflight (concurrent misses of one chunk
call its loader once). Never here: where bytes come from (``get`` is handed a loader, so this module never
imports fetch.py), TOC parsing, decompression, FUSE or gRPC.

On-disk layout, self-describing and shared by any number of processes::

    <cache_dir>/lock                            flock'd around every change; header: shared byte total
    <cache_dir>/chunks/sha256/<hex[:2]>/<hex>   one chunk, named by the sha256 of its bytes

Every change to the directory (write, eviction, removal of a corrupt file) happens under the flock and
updates the total in the lock file, so all processes see one exact total; it is re-derived from a scan
every ``RESCAN_EVERY`` writes (or as many writes as there were files) and whenever eviction runs out of
candidates, which repairs drift left by a crashed process or a file removed by hand. Room is made before
a chunk is written, so the bound holds even counting the temp file. Recency is the file's mtime, set on a
disk hit (at most every ``TOUCH_EVERY_NS``; atime is unreliable under relatime/noatime). Files are not
fsync'd: a torn file fails verification on read and is reloaded.

A chunk file is hashed when a process first reads it; after that (and after writing one from verified
bytes) the process serves ranges of it by ``pread`` for as long as the file keeps its (inode, size,
ctime): any write to it, or a replacement, changes them and sends the next read through verification
again.  Chunk files are opened without following symlinks and without blocking, and only a regular file
owned by the cache's user (this process's) is read: anything else in its place (a FIFO, a device, a link,
another user's file) is removed and the chunk loaded again.
"""

import contextlib
import errno
import fcntl
import heapq
import logging
import os
import queue
import re
import stat
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path

import cachetools

from toc import check_digest, sha256_digest, verify_digest

log = logging.getLogger(__name__)

DEFAULT_MEMORY_BYTES = 32 << 20  # holds the chunks being read and read ahead; the page cache does the rest
DEFAULT_DISK_BYTES = 10 << 30
# With write-behind, chunks a reader loaded go to disk on a thread of their own so that the read is
# answered first; at most this many bytes wait for it (beyond that a chunk is not written: a reader never
# waits for the disk, and the background fetch stores what is missing).
WRITE_BEHIND_BYTES = 32 << 20
VERIFIED_FILES = 8192  # chunk files whose identity a process remembers as verified
TOUCH_EVERY_NS = 10 * 10**9  # a disk hit refreshes a file's recency at most this often

_HEX_RE = re.compile(r"[0-9a-f]{64}")
# Lock file header: magic, bytes of committed chunk files, writes since the last scan (4+8+8 bytes).
_HEADER = struct.Struct("<4sQQ")
_MAGIC = b"LMC1"
_TMP_PREFIX = ".tmp-"


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/lazymount``, or ``~/.cache/lazymount`` when that is unset or relative."""
    base = os.environ.get("XDG_CACHE_HOME", "")
    if not os.path.isabs(base):
        base = os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lazymount"


def _hex(digest: str) -> str:
    """The hex part of a digest, validated (toc.FormatError otherwise) before it names a file."""
    return check_digest(digest)[len("sha256:"):]


class _ByteLRU(cachetools.LRUCache):
    """An LRU bounded by the total length of its values; counts what it evicts."""

    def __init__(self, maxsize: int) -> None:
        super().__init__(maxsize, getsizeof=len)
        self.evictions = 0

    def popitem(self) -> tuple[str, bytes]:
        item = super().popitem()
        self.evictions += 1
        return item


class _Flight:
    """One load in progress: its leader fills ``data`` or ``error``, then sets ``done``."""

    __slots__ = ("done", "data", "error")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.data: bytes = b""
        self.error: BaseException | None = None


class _DiskTier:
    """Chunk files under one directory, bounded in bytes with LRU eviction, safe across processes."""

    RESCAN_EVERY = 256  # writes; at least as many as there were files, so scans stay amortized
    # The oldest files a scan remembers for eviction; more are found by scanning again.  Remembering
    # every file (~200 bytes of path and tuple each) held 14 MB after the background fetch of a
    # 100k-file image.
    EVICTION_CANDIDATES = 4096

    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self.chunks = root / "chunks" / "sha256"
        os.makedirs(root, mode=0o700, exist_ok=True)
        os.makedirs(self.chunks, exist_ok=True)
        self.evictions = 0
        self.corrupt = 0
        self._lock = threading.Lock()
        self._fd = -1
        self._pid = 0
        # (mtime_ns, path) of chunk files, oldest first, as of this process's last scan.
        self._candidates: deque[tuple[int, str]] = deque()
        self._scanned_files = 0
        self._verified: cachetools.LRUCache[str, tuple[int, int, int]] = cachetools.LRUCache(VERIFIED_FILES)
        self._verified_lock = threading.Lock()

    def path(self, hexdigest: str) -> str:
        return os.path.join(self.chunks, hexdigest[:2], hexdigest)

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0 and self._pid == os.getpid():
                os.close(self._fd)
            self._fd = -1

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with self._lock:
            if self._fd < 0 or self._pid != os.getpid():
                # flock belongs to the open file description: a forked child must open its own.
                self._fd = os.open(self.root / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                self._pid = os.getpid()
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)

    def _state(self) -> tuple[int, int]:
        """(total bytes, writes since the last scan); under the lock; scans when missing or due."""
        raw = os.pread(self._fd, _HEADER.size, 0)
        if len(raw) == _HEADER.size:
            magic, total, writes = _HEADER.unpack(raw)
            if magic == _MAGIC and writes < max(self.RESCAN_EVERY, self._scanned_files):
                return total, writes
        return self._scan(), 0

    def _set_state(self, total: int, writes: int) -> None:
        os.pwrite(self._fd, _HEADER.pack(_MAGIC, max(total, 0), writes), 0)

    def _scan(self) -> int:
        """Re-derive the total from the files, refill the eviction candidates; under the lock."""
        total = files = 0

        def chunk_files() -> Iterator[tuple[int, str]]:
            nonlocal total, files
            for fan in os.scandir(self.chunks):
                if not fan.is_dir(follow_symlinks=False):
                    continue
                for entry in os.scandir(fan.path):
                    try:
                        st = entry.stat(follow_symlinks=False)
                        if entry.name.startswith(_TMP_PREFIX):
                            # Writes happen under the lock we hold, so this is a crashed writer's leftover.
                            os.unlink(entry.path)
                            continue
                    except FileNotFoundError:
                        continue
                    if stat.S_ISREG(st.st_mode) and _HEX_RE.fullmatch(entry.name):
                        total += st.st_size
                        files += 1
                        yield st.st_mtime_ns, entry.path

        self._candidates = deque(heapq.nsmallest(self.EVICTION_CANDIDATES, chunk_files()))
        self._scanned_files = files
        self._set_state(total, 0)
        log.debug("chunk cache %s: scanned %d files, %d bytes", self.root, files, total)
        return total

    def _evict(self, total: int, target: int) -> int:
        """Remove least recently used chunk files until ``total <= target``; return the new total."""
        scanned = False  # and nothing evicted since: scanning again would find nothing new
        while total > target:
            if not self._candidates:
                if scanned:
                    break
                total, scanned = self._scan(), True
                continue
            mtime_ns, path = self._candidates.popleft()
            try:
                st = os.stat(path)
                if st.st_mtime_ns != mtime_ns:
                    continue  # used (or rewritten) since the scan: not among the oldest any more
                os.unlink(path)
            except FileNotFoundError:
                continue  # removed under the lock by a process that accounted for it
            total -= st.st_size
            self.evictions += 1
            scanned = False
            log.debug("chunk cache: evicted %s (%d bytes)", path, st.st_size)
        return total

    def contains(self, hexdigest: str) -> bool:
        return os.path.exists(self.path(hexdigest))

    def names(self) -> set[str]:
        """The hex digests of the chunk files there now (one listing of each fan-out directory)."""
        found: set[str] = set()
        with contextlib.suppress(FileNotFoundError):
            for fan in os.scandir(self.chunks):
                if fan.is_dir(follow_symlinks=False):
                    found.update(name for name in os.listdir(fan.path) if _HEX_RE.fullmatch(name))
        return found

    def _open(self, hexdigest: str) -> int | None:
        """A read-only fd of the chunk file, or None if there is none; what is there but no regular file
        of ours is removed (never opened if lstat tells, never blocked on, never followed)."""
        path = self.path(hexdigest)
        try:
            st = os.lstat(path)
            if stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid():
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
                st = os.fstat(fd)  # what was opened (the file may have been replaced since lstat)
                if stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid():
                    return fd
                os.close(fd)
        except FileNotFoundError:
            return None
        except OSError as e:
            if e.errno != errno.ELOOP:  # a symlink put there since lstat: removed below
                raise
            st = os.lstat(path)
        self._discard(path, st, f"not a regular file owned by uid {os.geteuid()} (mode {st.st_mode:o}, "
                                f"uid {st.st_uid})")
        return None

    def _discard(self, path: str, st: os.stat_result, why: str) -> None:
        """Remove the chunk file `path` (unless it was replaced since `st`) and rescan the total."""
        log.warning("chunk cache: %s is %s: removed, reloading", path, why)
        self.corrupt += 1
        with self._locked():
            with contextlib.suppress(FileNotFoundError, PermissionError):
                now = os.lstat(path)
                if (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino):  # not replaced meanwhile
                    os.unlink(path)
            self._scan()  # a file changed in place no longer has the size the total counted

    def read(self, hexdigest: str) -> bytes | None:
        """The verified chunk, marked recently used; None if absent or corrupt (then removed)."""
        fd = self._open(hexdigest)
        if fd is None:
            return None
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(fd)
            data = f.read(st.st_size + 1)
            if sha256_digest(data) == "sha256:" + hexdigest:
                with contextlib.suppress(OSError):  # a read-only shared cache still serves
                    os.utime(fd)
                self._remember_verified(hexdigest, fd)
                return data
        self._discard(self.path(hexdigest), st, f"corrupt ({len(data)} bytes, digest mismatch)")
        return None

    def write(self, hexdigest: str, data: bytes) -> None:
        """Store a verified chunk, evicting first so the bound holds; no-op if larger than the bound."""
        if len(data) > self.max_bytes:
            return
        path = self.path(hexdigest)
        with self._locked():
            total, writes = self._state()
            try:
                os.utime(path)  # already there (another process stored it): mark it recently used
                return
            except FileNotFoundError:
                pass
            total = self._evict(total, self.max_bytes - len(data))
            self._set_state(total, writes)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = os.path.join(os.path.dirname(path), f"{_TMP_PREFIX}{hexdigest}-{os.getpid()}")
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)  # a crashed writer's (or anyone's) leftover: never written through
            try:
                flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
                with os.fdopen(os.open(tmp, flags, 0o644), "wb") as f:
                    f.write(data)
                os.replace(tmp, path)
                # its ctime as of after the rename
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
                try:
                    self._remember_verified(hexdigest, fd)
                finally:
                    os.close(fd)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
            self._set_state(total + len(data), writes + 1)

    def read_range(self, hexdigest: str, start: int, stop: int) -> bytes | None:
        """Bytes [start, stop) of a chunk file this process verified and nobody has written since; None
        when there is no such file (the caller then reads and verifies it whole)."""
        with self._verified_lock:
            known = self._verified.get(hexdigest)
        if known is None:
            return None
        fd = self._open(hexdigest)
        if fd is None:
            return None
        try:
            st = os.fstat(fd)
            if (st.st_ino, st.st_size, st.st_ctime_ns) != known or stop > st.st_size:
                return None
            if time.time_ns() - st.st_mtime_ns > TOUCH_EVERY_NS:
                with contextlib.suppress(OSError):
                    os.utime(fd)
                    self._remember_verified(hexdigest, fd)
            return os.pread(fd, stop - start, start)
        finally:
            os.close(fd)

    def _remember_verified(self, hexdigest: str, fd: int) -> None:
        st = os.fstat(fd)
        with self._verified_lock:
            self._verified[hexdigest] = (st.st_ino, st.st_size, st.st_ctime_ns)

    def total(self) -> int:
        with self._locked():
            return self._state()[0]


class ChunkCache:
    """Chunks by digest in a memory LRU over an optional disk LRU, each bounded in bytes; thread-safe.

    ``cache_dir=None`` or ``disk_bytes=0`` disables the disk tier. Disk errors are logged and the
    chunk is served from the loader or memory instead.  ``write_behind``: a chunk loaded by ``get`` or
    ``read`` is written to disk by a thread of the cache's after the caller has it (a mount's reader
    should not wait for the page cache, nor for the disk tier's lock: writing a fresh 4 MiB file costs
    more than decompressing the chunk did), or not at all once WRITE_BEHIND_BYTES wait; ``close`` writes
    what still waits.
    """

    def __init__(self, cache_dir: Path | str | None, memory_bytes: int = DEFAULT_MEMORY_BYTES,
                 disk_bytes: int = DEFAULT_DISK_BYTES, write_behind: bool = False) -> None:
        if memory_bytes < 0 or disk_bytes < 0:
            raise ValueError("cache bounds must be non-negative")
        self._memory = _ByteLRU(memory_bytes)
        self._disk = _DiskTier(Path(cache_dir), disk_bytes) if cache_dir is not None and disk_bytes else None
        self._lock = threading.Lock()
        self._write_behind = write_behind and self._disk is not None
        self._unwritten: dict[str, bytes] = {}  # hexdigest -> verified bytes waiting for the writer thread
        self._unwritten_bytes = 0
        self._writes: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self._flights: dict[str, _Flight] = {}
        self._counts = dict.fromkeys(("hits_memory", "hits_disk", "waits", "misses", "bytes_loaded",
                                      "disk_writes_dropped"), 0)

    def __enter__(self) -> "ChunkCache":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Write the chunks still waiting for the disk, then release the disk tier's lock file; the cache
        contents stay."""
        with self._lock:
            writer, self._writer, self._write_behind = self._writer, None, False
        if writer is not None:
            self._writes.put(None)
            writer.join()
        if self._disk is not None:
            self._disk.close()

    def get(self, digest: str, loader: Callable[[], bytes]) -> bytes:
        """The chunk's verified bytes, from memory, disk, or (once, however many callers) ``loader``.

        Raises toc.FormatError for a malformed digest, toc.DigestError if the loaded bytes do not
        match it; concurrent callers waiting on the same load get the loader's exception too.
        """
        hexdigest = _hex(digest)
        with self._lock:
            data = self._in_memory(hexdigest)
            if data is not None:
                return data
            flight = self._flights.get(hexdigest)
            leader = flight is None
            if leader:
                flight = self._flights[hexdigest] = _Flight()
            else:
                self._counts["waits"] += 1
        if not leader:
            flight.done.wait()
            if flight.error is not None:
                raise flight.error
            return flight.data
        return self._lead(hexdigest, flight, lambda: self._fill(digest, hexdigest, loader))

    def read(self, digest: str, start: int, stop: int, loader: Callable[[], bytes]) -> bytes:
        """Bytes [start, stop) of the chunk, as ``get`` would give them; a chunk file this process has
        verified (or written) before is read in part, not whole."""
        hexdigest = _hex(digest)
        with self._lock:
            data = self._in_memory(hexdigest)
            if data is not None:
                return data[start:stop]
        if self._disk is not None:
            part = self._disk.read_range(hexdigest, start, stop)
            if part is not None:
                self._count("hits_disk")
                return part
        return self.get(digest, loader)[start:stop]

    def store(self, digest: str, loader: Callable[[], bytes]) -> None:
        """Load the chunk into the disk tier (into memory only without one), unless it is cached: for
        prefetching, whose chunks should not push the chunks being read out of memory."""
        if self.contains(digest):
            return
        if self._disk is None:
            self.get(digest, loader)
            return
        hexdigest = _hex(digest)
        with self._lock:
            if hexdigest in self._flights:
                return  # someone is loading it already
            flight = self._flights[hexdigest] = _Flight()
        self._lead(hexdigest, flight, lambda: self._load(digest, hexdigest, loader))

    def put(self, digest: str, data: bytes) -> None:
        """Store bytes already in hand (e.g. from a prefetch); raises toc.DigestError if they do not match."""
        hexdigest = _hex(digest)
        data = bytes(data)
        verify_digest(data, digest, "chunk")
        self._disk_write(hexdigest, data)
        self._remember(hexdigest, data)

    def contains(self, digest: str) -> bool:
        """Whether the chunk is in memory or on disk (not verified, not counted, recency unchanged)."""
        hexdigest = _hex(digest)
        with self._lock:
            if hexdigest in self._memory or hexdigest in self._unwritten:
                return True
        return self._disk is not None and self._disk.contains(hexdigest)

    def present(self) -> set[str]:
        """The digests of the chunks in memory or on disk now, in one pass over the disk tier: for planning
        work over every chunk of a layer, where a chunk stored or evicted meanwhile only costs a fetch
        made twice or a later miss (a `contains` per chunk is a file system call each)."""
        with self._lock:
            hexdigests = set(self._memory.keys()) | set(self._unwritten)
        if self._disk is not None:
            try:
                hexdigests |= self._disk.names()
            except OSError as exc:
                log.warning("chunk cache: listing the disk tier failed: %s", exc)
        return {"sha256:" + h for h in hexdigests}

    def room(self) -> int:
        """Bytes the cache can still take before it evicts: on disk if it has a disk tier, else in memory."""
        if self._disk is None:
            with self._lock:
                return self._memory.maxsize - self._memory.currsize
        try:
            return max(self._disk.max_bytes - self._disk.total(), 0)
        except OSError as exc:
            log.warning("chunk cache: reading the disk total failed: %s", exc)
            return 0

    def stats(self) -> dict[str, int]:
        """Counters of this process, plus the bytes now held in memory and (by all processes) on disk."""
        with self._lock:
            counts = dict(self._counts)
            counts["bytes_in_memory"] = self._memory.currsize
            counts["evictions_memory"] = self._memory.evictions
        counts["evictions_disk"] = self._disk.evictions if self._disk else 0
        counts["evictions"] = counts["evictions_memory"] + counts["evictions_disk"]
        counts["corrupt"] = self._disk.corrupt if self._disk else 0
        counts["bytes_on_disk"] = 0
        if self._disk is not None:
            try:
                counts["bytes_on_disk"] = self._disk.total()
            except OSError as exc:
                log.warning("chunk cache: reading the disk total failed: %s", exc)
        return counts

    def _lead(self, hexdigest: str, flight: _Flight, fill: Callable[[], bytes]) -> bytes:
        """Run `fill` as the leader of `flight`: whoever waits on it gets its bytes or its exception."""
        try:
            flight.data = fill()
        except BaseException as exc:
            flight.error = exc
            raise
        finally:
            with self._lock:
                del self._flights[hexdigest]
            flight.done.set()
        return flight.data

    def _fill(self, digest: str, hexdigest: str, loader: Callable[[], bytes]) -> bytes:
        data = self._disk_read(hexdigest)
        if data is not None:
            self._count("hits_disk")
        else:
            data = self._load(digest, hexdigest, loader, behind=True)
        self._remember(hexdigest, data)
        return data

    def _load(self, digest: str, hexdigest: str, loader: Callable[[], bytes], behind: bool = False) -> bytes:
        """Call the loader, verify its bytes and write them to disk (`behind`: by the writer thread, if
        write-behind is on and has room)."""
        self._count("misses")
        data = bytes(loader())
        verify_digest(data, digest, "chunk")
        self._count("bytes_loaded", len(data))
        if not (behind and self._hand_to_writer(hexdigest, data)):
            self._disk_write(hexdigest, data)
        return data

    def _in_memory(self, hexdigest: str) -> bytes | None:
        """The chunk from memory or the bytes waiting for the writer, counted as a memory hit; under the
        lock."""
        data = self._memory.get(hexdigest)
        if data is None:
            data = self._unwritten.get(hexdigest)
        if data is not None:
            self._counts["hits_memory"] += 1
        return data

    def _hand_to_writer(self, hexdigest: str, data: bytes) -> bool:
        """Queue verified bytes for the writer thread (started on first use), or drop them if
        WRITE_BEHIND_BYTES already wait; False if write-behind is off."""
        with self._lock:
            if not self._write_behind:
                return False
            if self._unwritten_bytes + len(data) > WRITE_BEHIND_BYTES:
                self._counts["disk_writes_dropped"] += 1
                return True
            if hexdigest not in self._unwritten:
                self._unwritten[hexdigest] = data
                self._unwritten_bytes += len(data)
                self._writes.put(hexdigest)
            if self._writer is None:
                self._writer = threading.Thread(target=self._write_queued, name="cache-writer", daemon=True)
                self._writer.start()
        return True

    def _write_queued(self) -> None:
        """The writer thread: write queued chunks until told to stop (None), at the lowest CPU priority."""
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        while (hexdigest := self._writes.get()) is not None:
            self._disk_write(hexdigest, self._unwritten[hexdigest])
            with self._lock:
                self._unwritten_bytes -= len(self._unwritten.pop(hexdigest))

    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self._counts[key] += n

    def _remember(self, hexdigest: str, data: bytes) -> None:
        if len(data) <= self._memory.maxsize:
            with self._lock:
                self._memory[hexdigest] = data

    def _disk_read(self, hexdigest: str) -> bytes | None:
        if self._disk is None:
            return None
        try:
            return self._disk.read(hexdigest)
        except OSError as exc:
            log.warning("chunk cache: reading sha256:%s from disk failed: %s", hexdigest, exc)
            return None

    def _disk_write(self, hexdigest: str, data: bytes) -> None:
        if self._disk is None:
            return
        try:
            self._disk.write(hexdigest, data)
        except OSError as exc:
            log.warning("chunk cache: writing sha256:%s to disk failed: %s", hexdigest, exc)
