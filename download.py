"""Whole-blob downloads by concurrent range requests, with the bytes handed on in order as they arrive.

What belongs here: the local sources of a layer's bytes (`BlobSource`, the interface a layer reads its blob
through; `FileBlob`, a blob file on this node; `StagedRanges`, fetched ranges kept until used), and
`RangedDownload` (a blob fetched as parts over several connections into a temp file
beside its destination, hashed in blob order as the contiguous prefix grows, renamed into place once its
size and sha256 match), reading it while it downloads (an in-order stream, or `read_at` waiting for the
bytes asked), and `whole_blob` (a download, with a consumer — converting or indexing the layer — reading
it from another thread meanwhile, so that its work overlaps the transfer).  A far registry on a fast link
fills the pipe only with several requests in flight.  What never does: HTTP
(the source is anything with `size` and `read_at`, e.g. a fetch.BlobReader, whose registry client retries
each range), layer formats (toc.py, layerwriter.py), the cache, FUSE or gRPC.

Bytes read during the download are not verified until `run` returns: a consumer's result must not be
used before (whole_blob returns it only then).
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import errno
import hashlib
import io
import logging
import os
import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol, TypeVar

import toc

log = logging.getLogger(__name__)
T = TypeVar("T")

DOWNLOAD_CONNECTIONS = 4  # range requests in flight for one blob
MIN_PART, MAX_PART = 1 << 20, 16 << 20  # bytes of one range request
_HASH_READ = 1 << 20


class RangeSource(Protocol):
    """What a blob is read from: its size and random reads (a fetch.BlobReader, a FileBlob)."""

    size: int

    def read_at(self, offset: int, length: int) -> bytes: ...


class RangedDownload:
    """One blob downloaded to `path` by `connections` concurrent range requests (call `run`, once);
    `stream()` reads it in order meanwhile.  Use as a context manager: leaving it removes the temp file
    of a download that did not complete and closes the streams' file."""

    def __init__(self, source: RangeSource, digest: str, path: str | os.PathLike[str], *,
                 connections: int = DOWNLOAD_CONNECTIONS,
                 on_bytes: Callable[[int], None] | None = None) -> None:
        self.source, self.digest, self.path = source, toc.check_digest(digest), Path(path)
        self.size = source.size
        self.connections = max(1, connections)
        self.part = min(max(self.size // (self.connections * 4), MIN_PART), MAX_PART)
        self._on_bytes = on_bytes
        fd, self._tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".part")
        self._fd: int | None = fd
        self._changed = threading.Condition()
        self._hashed = 0  # bytes [0, _hashed) are in the file, in order
        self._error: str | None = None
        self._stop = threading.Event()

    def __enter__(self) -> RangedDownload:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop, close the file, remove the temp file unless the blob was renamed into place."""
        self._fail("download closed")
        with self._changed:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
        Path(self._tmp).unlink(missing_ok=True)

    def _fail(self, reason: str) -> None:
        self._stop.set()
        with self._changed:
            if self._error is None and self._hashed < self.size:
                self._error = reason
            self._changed.notify_all()

    def run(self) -> None:
        """Download every part, hash them in order, and rename the file to `path` once the sha256 is the
        digest; raise the source's error, or toc.DigestError, otherwise (streams then fail too)."""
        hasher = hashlib.sha256()
        written: dict[int, int] = {}  # offset -> length of parts in the file, not hashed yet
        try:
            with concurrent.futures.ThreadPoolExecutor(self.connections, "download") as pool:
                futures = [pool.submit(self._fetch, offset, min(self.part, self.size - offset))
                           for offset in range(0, self.size, self.part)]
                try:
                    for future in concurrent.futures.as_completed(futures):
                        offset, length = future.result()
                        written[offset] = length
                        while self._hashed in written:
                            self._hash(hasher, self._hashed, written.pop(self._hashed))
                except BaseException:
                    self._stop.set()
                    pool.shutdown(wait=True, cancel_futures=True)
                    raise
            got = "sha256:" + hasher.hexdigest()
            if got != self.digest:
                raise toc.DigestError(f"blob {self.digest}: the downloaded bytes hash to {got}")
            os.replace(self._tmp, self.path)
        except BaseException as e:
            self._fail(str(e) or type(e).__name__)
            raise

    def _fetch(self, offset: int, length: int) -> tuple[int, int]:
        if self._stop.is_set():
            raise OSError(errno.ECANCELED, "download stopped")
        data = self.source.read_at(offset, length)
        if len(data) != length:
            raise toc.TruncatedError(f"blob {self.digest}: {len(data)} bytes at {offset}, expected {length}")
        assert self._fd is not None
        os.pwrite(self._fd, data, offset)
        if self._on_bytes is not None:
            self._on_bytes(length)
        return offset, length

    def _hash(self, hasher: hashlib._Hash, offset: int, length: int) -> None:
        assert self._fd is not None
        for start in range(offset, offset + length, _HASH_READ):
            hasher.update(os.pread(self._fd, min(_HASH_READ, offset + length - start), start))
        with self._changed:
            self._hashed = offset + length
            self._changed.notify_all()

    def stream(self) -> io.BufferedReader:
        """The blob's bytes in order, each read waiting until they have arrived; OSError(EIO) once the
        download failed.  Valid until the download is closed."""
        return io.BufferedReader(_Stream(self), MIN_PART)

    def read_arrived(self, offset: int, length: int) -> bytes:
        """Up to `length` bytes at `offset`, as soon as some are here (b"" at the end of the blob)."""
        return self._read(offset, length, offset + 1)

    def read_at(self, offset: int, length: int) -> bytes:
        """`length` bytes at `offset` (fewer at the end of the blob) once all of them are here: a
        RangeSource over the blob being downloaded, for a consumer that reads it as a file."""
        return self._read(offset, length, offset + length)

    def _read(self, offset: int, length: int, until: int) -> bytes:
        with self._changed:
            until = min(until, self.size)
            self._changed.wait_for(lambda: self._hashed >= until or self._error)
            if self._hashed < until or self._fd is None:
                raise OSError(errno.EIO, f"download of {self.digest} failed: {self._error}")
            return os.pread(self._fd, max(0, min(length, self._hashed - offset)), offset)


class _Stream(io.RawIOBase):
    def __init__(self, download: RangedDownload) -> None:
        self._download, self._pos = download, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        data = self._download.read_arrived(self._pos, len(buffer))
        buffer[:len(data)] = data
        self._pos += len(data)
        return len(data)


def whole_blob(source: RangeSource, digest: str, path: str | os.PathLike[str],
               consume: Callable[[RangedDownload], T] | None = None, *,
               on_bytes: Callable[[int], None] | None = None,
               connections: int = DOWNLOAD_CONNECTIONS) -> T | None:
    """Download the blob to `path` (verified) by concurrent range requests while `consume` reads it
    (`stream()` or `read_at`) from another thread; return what `consume` returned, once both are done and
    the blob is verified.  A failed download raises its error (whatever `consume` did); a failed `consume`
    raises its own once the blob is verified."""
    result: list[T] = []
    failure: list[BaseException] = []
    with RangedDownload(source, digest, path, connections=connections, on_bytes=on_bytes) as download:
        def work() -> None:
            try:
                result.append(consume(download))  # type: ignore[misc]
            except BaseException as e:  # noqa: BLE001 -- handed to the caller below
                failure.append(e)

        worker = threading.Thread(target=work, name="download-consumer", daemon=True)
        if consume is not None:
            worker.start()
        try:
            download.run()
        finally:
            if consume is not None:
                worker.join()
    if failure:
        raise failure[0]
    return result[0] if result else None


class BlobSource(Protocol):
    """What a layer needs of its blob: random reads (`fetch.BlobReader` or a local file); `urgent` ones
    are waited on by a reader and end sooner (fetch.BlobReader.read_at)."""

    size: int

    def read_at(self, offset: int, length: int, urgent: bool = False) -> bytes: ...

    def read_ranges(self, ranges: Sequence[tuple[int, int]]) -> list[bytes]: ...

    def download(self, path: str | os.PathLike[str]) -> None: ...


class FileBlob:
    """A local blob file read with pread: a layer downloaded and verified here, or one given to inspect."""

    def __init__(self, path: Path) -> None:
        self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self.size = os.fstat(self._fd).st_size

    def read_at(self, offset: int, length: int, urgent: bool = False) -> bytes:
        return os.pread(self._fd, length, offset)

    def read_ranges(self, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        return [self.read_at(offset, length) for offset, length in ranges]

    def download(self, path: str | os.PathLike[str]) -> None:
        raise NotImplementedError("a local blob is never downloaded")

    def fileno(self) -> int:
        """The open blob file (for a decoder that reads it without Python)."""
        return self._fd

    def close(self) -> None:
        os.close(self._fd)

    def __enter__(self) -> FileBlob:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class StagedRanges:
    """Compressed bytes of a blob fetched ahead of use (the landmark prefetch, the background fetch), kept
    in an unlinked scratch file until their chunks are decompressed into the cache: the mount is ready once
    the bytes are here, and decompressing them does not hold up the command that reads them.  A range
    announced as `fetching` is waited for by `read` until it is `put` or `abandon`ed; a range
    whose chunks are stored is `drop`ped (its disk blocks freed)."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self._file = tempfile.TemporaryFile(dir=directory)  # noqa: SIM115 -- closed by close()
        self._staged: dict[int, int] = {}  # start -> stop of the ranges here
        self._fetching: dict[int, int] = {}  # start -> stop of the ranges on their way
        self._changed = threading.Condition()
        self.chunks: list[toc.Chunk] = []  # the chunks whose bytes are staged, in the order they arrived

    def fetching(self, start: int, stop: int) -> None:
        """Announce that the bytes [start, stop) are being fetched."""
        with self._changed:
            self._fetching[start] = stop

    def abandon(self, start: int) -> None:
        """The fetch of the range announced at `start` failed: its readers stop waiting."""
        with self._changed:
            self._fetching.pop(start, None)
            self._changed.notify_all()

    def put(self, start: int, data: bytes, chunks: Sequence[toc.Chunk] = ()) -> None:
        with self._changed:
            if self._file.closed:
                return
            os.pwrite(self._file.fileno(), data, start)
            self._staged[start] = start + len(data)
            self._fetching.pop(start, None)
            self.chunks.extend(chunks)
            self._changed.notify_all()

    def read(self, offset: int, length: int, wait: float = 0.0) -> bytes | None:
        """The staged bytes [offset, offset + length), or None if they are not (or no longer) here; if they
        are being fetched, wait up to `wait` seconds for them first."""
        def within(ranges: dict[int, int]) -> bool:  # ranges that touch cover what spans them
            reached = offset
            for a, b in sorted(ranges.items()):
                if a <= reached < b:
                    reached = b
            return reached >= offset + length

        with self._changed:
            if wait > 0:
                self._changed.wait_for(lambda: self._file.closed or not within(self._fetching), wait)
            if self._file.closed or not within(self._staged):
                return None
            return os.pread(self._file.fileno(), length, offset)

    def drop(self, start: int) -> int:
        """Forget the range staged at `start` and free its disk blocks; the number of bytes it held."""
        with self._changed:
            stop = self._staged.pop(start, start)
            if stop > start and not self._file.closed:
                _punch_hole(self._file.fileno(), start, stop - start)
        return stop - start

    def close(self) -> None:
        with self._changed:
            self._file.close()
            self._changed.notify_all()


_FALLOC_FL_KEEP_SIZE, _FALLOC_FL_PUNCH_HOLE = 0x01, 0x02
_libc = ctypes.CDLL(None, use_errno=True)


def _punch_hole(fd: int, offset: int, length: int) -> None:
    """Free a file's blocks [offset, offset + length) (Linux fallocate); a file system that cannot keeps
    them until the file is closed."""
    _libc.fallocate(fd, _FALLOC_FL_KEEP_SIZE | _FALLOC_FL_PUNCH_HOLE, ctypes.c_int64(offset),
                    ctypes.c_int64(length))
