"""Writes eStargz / zstd:chunked layers from a tar stream (plain, gzip or zstd).

What belongs here: turning a tar stream into a layer blob (members, chunks, landmarks, prioritized files
first, the TOC and footer) and describing the result (LayerInfo).  What never does: reading or verifying a
layer (toc.py), anything about images, manifests or registries (convert.py), FUSE, HTTP, caching.  It
imports toc for the byte layouts and names; toc never imports it.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import io
import json
import os
import queue
import struct
import tarfile
import tempfile
import threading
import zlib
from base64 import b64encode
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import BinaryIO

from isal import igzip_threaded, isal_zlib

import tocread
from toc import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_LIMITS,
    GZIP,
    LANDMARK_CONTENT,
    NO_PREFETCH_LANDMARK,
    PREFETCH_LANDMARK,
    TOC_DIGEST_ANNOTATION,
    TOC_TAR_NAME,
    UNCOMPRESSED_SIZE_ANNOTATION,
    ZSTD,
    ZSTD_CHUNKED_MAGIC,
    ZSTD_MANIFEST_TYPE,
    ZSTD_SKIPPABLE_MAGIC,
    FormatError,
    Index,
    Limits,
    TruncatedError,
    normalize_name,
    sha256_digest,
)

_EMPTY_DIGEST = sha256_digest(b"")


@dataclass(frozen=True, slots=True)
class LayerInfo:
    """What a writer produced: blob digest/size, DiffID, TOC digest, uncompressed size."""

    digest: str
    size: int
    diff_id: str
    toc_digest: str
    uncompressed_size: int
    entries: int
    prefetched: int  # files placed before .prefetch.landmark
    annotations: dict[str, str]  # for the layer's descriptor in a manifest


class _RawReader(io.RawIOBase):
    """Adapts any object with read() to a raw stream, so it can be buffered and peeked."""

    def __init__(self, f: BinaryIO) -> None:
        self.f = f

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:
        data = self.f.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


def open_layer_source(src: BinaryIO, threads: int = 1) -> BinaryIO:
    """Wrap a layer stream (plain tar, gzip or zstd; detected by magic) as an uncompressed stream."""
    if not hasattr(src, "peek"):
        src = io.BufferedReader(_RawReader(src), 1 << 20)  # type: ignore[assignment]
    magic = src.peek(4)[:4]  # type: ignore[attr-defined]
    if magic[:2] == b"\x1f\x8b":
        return igzip_threaded.open(src, "rb", threads=min(threads, 1))  # type: ignore[return-value]
    if magic == b"\x28\xb5\x2f\xfd":
        import zstandard  # here, not at the top: see tocread._unzstd

        return zstandard.ZstdDecompressor().stream_reader(src, read_across_frames=True)  # type: ignore
    return src


def _tar_padding(size: int) -> bytes:
    return b"\0" * (-size % tarfile.BLOCKSIZE)


def _compress_member(data: bytes, chunk_len: int, fmt: str, level: int) -> tuple[bytes, str | None]:
    """Compress one member; return it and the digest of its first `chunk_len` bytes (the chunk)."""
    digest = sha256_digest(data[:chunk_len]) if chunk_len else None
    if fmt == ZSTD:
        import zstandard  # here, not at the top: see tocread._unzstd

        return zstandard.ZstdCompressor(level=level).compress(data), digest
    return isal_zlib.compress(data, level, wbits=31), digest


class _BlobWriter:
    """Compresses members on a thread pool and writes them in order from a writer thread.

    A member is open until the next chunk starts: the tar headers that follow a chunk go into the
    chunk's member, as in the reference writer.  The reading thread only parses and submits; hashing
    (DiffID, blob digest, whole-file digests of multi-chunk files) and writing happen on the writer
    thread, chunk digests and compression on the pool.  At most MAX_INFLIGHT uncompressed bytes wait.
    """

    MAX_INFLIGHT = 64 << 20

    def __init__(self, dst: BinaryIO, fmt: str, level: int, workers: int) -> None:
        self.dst, self.fmt, self.level = dst, fmt, level
        self.pool = concurrent.futures.ThreadPoolExecutor(max(1, workers), thread_name_prefix="compress")
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.space = threading.Condition()
        self.inflight = 0
        self.failure: BaseException | None = None
        self.blob_hash = hashlib.sha256()
        self.diff_hash = hashlib.sha256()
        self.offset = 0
        self.uncompressed = 0
        self.member_offsets: list[int] = []
        self.members = 0
        self.current = bytearray()
        self.current_chunk: tuple[int, dict | None, dict | None] = (0, None, None)
        self.file_hash: hashlib._Hash | None = None  # of the multi-chunk file being written (writer thread)
        self.thread = threading.Thread(target=self._write_loop, name="blob-writer", daemon=True)
        self.thread.start()

    def add(self, data: bytes) -> None:
        self.current += data

    def start_chunk(self, data: bytes, entry: dict, file_entry: dict | None) -> None:
        """Start a new member whose first bytes are a file chunk described by the TOC `entry`.

        `file_entry` is the file's reg entry when the file has several chunks (its whole-file digest is
        then hashed across them), else None (the chunk digest is the file digest).
        """
        self.close_member()
        entry["offset"] = self.members  # the member's index until `finish_members`
        self.current += data
        self.current_chunk = (len(data), entry, file_entry)

    def close_member(self) -> None:
        if not self.current:
            return
        data = bytes(self.current)
        self.current.clear()
        chunk_len, entry, file_entry = self.current_chunk
        self.current_chunk = (0, None, None)
        with self.space:
            while self.inflight > self.MAX_INFLIGHT and self.failure is None:
                self.space.wait()
            self.inflight += len(data)
        self._check()
        future = self.pool.submit(_compress_member, data, chunk_len, self.fmt, self.level)
        self.queue.put((future, data, chunk_len, entry, file_entry))
        self.members += 1

    def _write_loop(self) -> None:
        while (item := self.queue.get()) is not None:
            future, data, chunk_len, entry, file_entry = item
            try:
                if self.failure is None:
                    self._write_member(future.result(), data, chunk_len, entry, file_entry)
            except BaseException as e:  # reported to the reading thread by _check
                self.failure = e
            with self.space:
                self.inflight -= len(data)
                self.space.notify_all()

    def _write_member(self, result: tuple[bytes, str | None], data: bytes, chunk_len: int,
                      entry: dict | None, file_entry: dict | None) -> None:
        compressed, digest = result
        if entry is not None:
            entry["chunkDigest"] = digest
            if file_entry is None:
                entry["digest"] = digest
            else:
                if entry is file_entry:
                    self.file_hash = hashlib.sha256()
                self.file_hash.update(memoryview(data)[:chunk_len])
                if "chunkSize" not in entry:  # the file's last chunk
                    file_entry["digest"] = "sha256:" + self.file_hash.hexdigest()
        self.member_offsets.append(self.offset)
        self.diff_hash.update(data)
        self.uncompressed += len(data)
        self.write_compressed(compressed)

    def _check(self) -> None:
        if self.failure is not None:
            raise self.failure

    def finish_members(self) -> None:
        """Write every member still in flight; afterwards the reading thread may write directly."""
        self.close_member()
        self.queue.put(None)
        self.thread.join()
        self._check()

    def write_compressed(self, data: bytes, uncompressed: bytes = b"") -> None:
        self.dst.write(data)
        self.blob_hash.update(data)
        self.offset += len(data)
        if uncompressed:
            self.diff_hash.update(uncompressed)
            self.uncompressed += len(uncompressed)

    def shutdown(self) -> None:
        if self.thread.is_alive():
            self.failure = self.failure or RuntimeError("writer stopped")
            self.queue.put(None)
            self.thread.join()
        self.pool.shutdown(wait=True, cancel_futures=True)


_REG_TYPES = (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE, tarfile.GNUTYPE_SPARSE)
_TAR_KINDS = {tarfile.LNKTYPE: "hardlink", tarfile.SYMTYPE: "symlink", tarfile.DIRTYPE: "dir",
              tarfile.CHRTYPE: "char", tarfile.BLKTYPE: "block", tarfile.FIFOTYPE: "fifo"}
_XATTR_PREFIX = "SCHILY.xattr."


def _format_mtime(mtime: float) -> str:
    seconds = round(mtime)
    return "" if seconds == 0 else datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _toc_entry(info: tarfile.TarInfo, typ: str) -> dict:
    """The TOC entry of a tar member, with the reference's field order and omitempty rules."""
    entry: dict = {"name": info.name, "type": typ}
    if typ == "reg":
        entry["size"] = info.size
    link_name = info.linkname if typ in ("hardlink", "symlink") else ""
    fields = (("modtime", _format_mtime(info.mtime)), ("linkName", link_name), ("mode", info.mode),
              ("uid", info.uid), ("gid", info.gid), ("userName", info.uname), ("groupName", info.gname))
    entry.update((k, v) for k, v in fields if v)
    if typ in ("char", "block"):
        entry.update((k, v) for k, v in (("devMajor", info.devmajor), ("devMinor", info.devminor)) if v)
    xattrs = {k[len(_XATTR_PREFIX):]: b64encode(v.encode("utf-8", "surrogateescape")).decode()
              for k, v in info.pax_headers.items() if k.startswith(_XATTR_PREFIX)}
    if xattrs:
        entry["xattrs"] = xattrs
    return entry


def _output_header(info: tarfile.TarInfo) -> bytes:
    """The tar header to write for `info`; sparse files become regular files holding their holes."""
    if info.sparse is not None or info.type == tarfile.GNUTYPE_SPARSE:
        info = _copy_info(info)
        info.type = tarfile.REGTYPE
        info.pax_headers = {k: v for k, v in info.pax_headers.items() if not k.startswith("GNU.sparse.")}
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def _copy_info(info: tarfile.TarInfo) -> tarfile.TarInfo:
    copy = tarfile.TarInfo(info.name)
    for attr in ("mode", "uid", "gid", "size", "mtime", "type", "linkname", "uname", "gname", "devmajor",
                 "devminor", "pax_headers"):
        setattr(copy, attr, getattr(info, attr))
    return copy


def _prioritized_order(members: list[tarfile.TarInfo], prioritized: Iterable[str]) -> tuple[list, list]:
    """Split members into (prioritized files with their parent dirs and hardlink targets, the rest)."""
    by_name = {normalize_name(m.name): m for m in members}
    first: list[tarfile.TarInfo] = []
    taken: set[str] = set()

    def take(name: str) -> None:
        if name in taken or name not in by_name:
            return
        taken.add(name)
        if "/" in name:
            take(name.rpartition("/")[0])
        member = by_name[name]
        if member.type == tarfile.LNKTYPE:
            take(normalize_name(member.linkname))
        first.append(member)

    for path in prioritized:
        take(normalize_name(path.lstrip("/")))  # as recorded in a container: absolute, like the reference
    return first, [m for m in members if normalize_name(m.name) not in taken]


class _CheckedTarInfo(tarfile.TarInfo):
    """tarfile ends an archive quietly at a truncated or corrupt header; a layer must not lose files."""

    @classmethod
    def fromtarfile(cls, tar: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tar)
        except (tarfile.TruncatedHeaderError, tarfile.InvalidHeaderError) as e:
            if tar.offset == 0:
                raise  # not a tar at all: tarfile says so
            raise TruncatedError(f"source layer is truncated or corrupt at a tar header ({e})") from None


# How every reader of a source layer opens its tar stream (seekindex.py too).
TAR_OPTIONS = {"encoding": "utf-8", "errors": "surrogateescape", "tarinfo": _CheckedTarInfo}


class _Landmark(tarfile.TarInfo):
    """A landmark file the writer adds; its content is LANDMARK_CONTENT."""


def _landmark_info(name: str) -> tarfile.TarInfo:
    info = _Landmark(name)
    info.size, info.mode, info.mtime = len(LANDMARK_CONTENT), 0o644, 0
    return info


def write_layer(src: BinaryIO, dst: BinaryIO, *, chunk_size: int = DEFAULT_CHUNK_SIZE,
                prioritized: list[str] | None = None, fmt: str = GZIP, level: int = 3,
                workers: int | None = None, progress: Callable[[int], None] | None = None,
                limits: Limits = DEFAULT_LIMITS) -> LayerInfo:
    """Convert a layer (tar, tar.gz or tar.zst stream) into an eStargz (or zstd:chunked) blob on `dst`.

    Files in `prioritized` come first, followed by `.prefetch.landmark`; without a list the layer starts
    with `.no.prefetch.landmark`.  Members are compressed on `workers` threads (default: all cores).
    The entries pass the reader's checks (toc.Index.from_entries, within `limits`) before the TOC is
    written: a layer a reader would refuse fails here, with the reader's reason.
    """
    if not 0 < chunk_size <= limits.chunk_size:
        raise ValueError(f"chunk size must be positive and at most {limits.chunk_size} (limits.chunk_size)")
    workers = workers or os.cpu_count() or 1
    writer = _BlobWriter(dst, fmt, level, workers)
    try:
        with tempfile.TemporaryFile() as spool:
            source = open_layer_source(src, workers)
            if prioritized is None:
                tar = tarfile.open(fileobj=source, mode="r|", **TAR_OPTIONS)  # noqa: SIM115
                ordered: Iterable = [_landmark_info(NO_PREFETCH_LANDMARK)]
                ordered = _chain(ordered, tar)
                prefetched = 0
            else:
                # Reordering needs random access: spool the uncompressed tar to disk first.
                _copy_stream(source, spool)
                spool.seek(0)
                tar = tarfile.open(fileobj=spool, mode="r:", **TAR_OPTIONS)  # noqa: SIM115
                first, rest = _prioritized_order(tar.getmembers(), prioritized)
                prefetched = sum(1 for m in first if m.isreg() and m.size)
                ordered = [*first, _landmark_info(PREFETCH_LANDMARK), *rest]
            entries = _write_members(tar, ordered, writer, chunk_size, progress)
        return _write_toc(writer, entries, fmt, level, prefetched, limits)
    except tarfile.TarError as e:
        raise FormatError(f"source layer is not a valid tar archive ({e})") from None
    except (EOFError, zlib.error, OSError) as e:
        if isinstance(e, OSError) and e.errno is not None:
            raise
        raise FormatError(f"source layer is corrupt or truncated ({e})") from None
    finally:
        writer.shutdown()


def _chain(*iterables: Iterable) -> Iterator:
    for it in iterables:
        yield from it


def _copy_stream(src: BinaryIO, dst: BinaryIO) -> None:
    while block := src.read(1 << 20):
        dst.write(block)


def member_entry(info: tarfile.TarInfo) -> dict | None:
    """The TOC entry (without chunks) of a source tar member; None for the TOC or a landmark of a layer
    converted before, which a conversion replaces (as the reference does) and a seek index leaves out."""
    if normalize_name(info.name) in (TOC_TAR_NAME, PREFETCH_LANDMARK, NO_PREFETCH_LANDMARK):
        return None
    if info.type in _REG_TYPES:
        typ = "reg"
    elif info.type in _TAR_KINDS:
        typ = _TAR_KINDS[info.type]
        if typ == "hardlink":
            normalize_name(info.linkname)
    else:
        raise FormatError(f"unsupported tar entry type {info.type!r} for {info.name!r}")
    return _toc_entry(info, typ)


def _write_members(tar: tarfile.TarFile, members: Iterable[tarfile.TarInfo], writer: _BlobWriter,
                   chunk_size: int, progress: Callable[[int], None] | None) -> list[dict]:
    entries: list[dict] = []
    for info in members:
        landmark = isinstance(info, _Landmark)
        entry = _toc_entry(info, "reg") if landmark else member_entry(info)
        if entry is None:
            continue
        typ = entry["type"]
        writer.add(_output_header(info))
        if typ == "reg":
            _write_payload(tar, info, entry, entries, writer, chunk_size, landmark)
        else:
            entries.append(entry)
        if progress is not None:
            progress(info.size if typ == "reg" else 0)
    return entries


def _write_payload(tar: tarfile.TarFile, info: tarfile.TarInfo, entry: dict, entries: list[dict],
                   writer: _BlobWriter, chunk_size: int, landmark: bool) -> None:
    """Write a regular file's content as chunks, each opening a member; fill the TOC entries."""
    if not info.size:
        entry["digest"] = _EMPTY_DIGEST
        entries.append(entry)
        return
    stream = io.BytesIO(LANDMARK_CONTENT) if landmark else tar.extractfile(info)
    file_entry = entry if info.size > chunk_size else None
    written = 0
    chunk_entry = entry
    while written < info.size:
        data = stream.read(min(chunk_size, info.size - written))
        if not data:
            raise TruncatedError(f"source layer ends inside {info.name!r}")
        if len(data) < info.size - written:
            chunk_entry["chunkSize"] = len(data)
        if written:
            chunk_entry["chunkOffset"] = written
        writer.start_chunk(data, chunk_entry, file_entry)
        entries.append(chunk_entry)
        written += len(data)
        chunk_entry = {"name": info.name, "type": "chunk"}
    writer.add(_tar_padding(info.size))


def _write_toc(writer: _BlobWriter, entries: list[dict], fmt: str, level: int, prefetched: int,
               limits: Limits) -> LayerInfo:
    writer.finish_members()
    for entry in entries:
        if "offset" in entry:
            entry["offset"] = writer.member_offsets[entry["offset"]]
    Index.from_entries(entries, fmt, writer.offset, limits)  # the reader's checks: fails as a reader would
    toc_json = json.dumps({"version": 1, "entries": entries}, separators=(",", ":")).encode()
    toc_digest = sha256_digest(toc_json)
    end_of_archive = b"\0" * (2 * tarfile.BLOCKSIZE)
    annotations = {}
    if fmt == ZSTD:
        import zstandard  # here, not at the top: see tocread._unzstd

        compressor = zstandard.ZstdCompressor(level=level)
        writer.write_compressed(compressor.compress(end_of_archive), end_of_archive)
        compressed_toc = compressor.compress(toc_json)
        toc_offset = writer.offset + 8
        writer.write_compressed(_skippable_frame(compressed_toc))
        footer = struct.pack("<QQQQ", toc_offset, len(compressed_toc), len(toc_json), ZSTD_MANIFEST_TYPE)
        writer.write_compressed(_skippable_frame(footer + ZSTD_CHUNKED_MAGIC))
        annotations = {
            "io.containers.zstd-chunked.manifest-checksum": sha256_digest(compressed_toc),
            "io.containers.zstd-chunked.manifest-position":
                f"{toc_offset}:{len(compressed_toc)}:{len(toc_json)}:{ZSTD_MANIFEST_TYPE}",
        }
    else:
        header = tarfile.TarInfo(TOC_TAR_NAME)
        header.size, header.mode, header.mtime = len(toc_json), 0o644, 0
        member = header.tobuf(tarfile.USTAR_FORMAT) + toc_json + _tar_padding(len(toc_json)) + end_of_archive
        toc_offset = writer.offset
        writer.write_compressed(isal_zlib.compress(member, level, wbits=31), member)
        writer.write_compressed(tocread.footer_bytes(toc_offset))
    annotations.update({
        TOC_DIGEST_ANNOTATION: toc_digest,
        UNCOMPRESSED_SIZE_ANNOTATION: str(writer.uncompressed),
    })
    return LayerInfo("sha256:" + writer.blob_hash.hexdigest(), writer.offset,
                     "sha256:" + writer.diff_hash.hexdigest(), toc_digest, writer.uncompressed,
                     len(entries), prefetched, annotations)


def _skippable_frame(payload: bytes) -> bytes:
    return ZSTD_SKIPPABLE_MAGIC + struct.pack("<I", len(payload)) + payload
