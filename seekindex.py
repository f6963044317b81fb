"""Seek indexes: random access into unconverted gzip layers, so that a plain image is mounted lazily.

A seek index describes one gzip layer blob without changing it: decompressor checkpoints (the bit offset
in the blob, the uncompressed offset, the 32 KiB window before it, stored compressed), the sha256 of the
compressed span between each checkpoint and the next, and the file table the merged tree needs, written
as an eStargz-style TOC whose chunk offsets are offsets into the *uncompressed* tar stream.  Chunks whose
offset is HOLE (sparse holes: offset 0 of a tar stream is always a header) are zeros, never fetched.

What belongs here: building an index in one streaming pass (rapidgzip finds the checkpoints, see
BENCHMARKS.md for why; tarfile reads the file table), the versioned file format (MEDIA_SEEK_INDEX) and
its validating loader, resuming deflate at a checkpoint's bit offset (Python's zlib has no inflatePrime:
see `_resume_stream`), and keeping built indexes in the cache directory (`find_index`, `store_index`).
What never does: fetching or caching chunks (engine.py reads spans through a layer, cache.py keeps the
decompressed chunks), HTTP or registries (callers hand in `read_at`), FUSE or gRPC.
"""

from __future__ import annotations

import bisect
import concurrent.futures
import contextlib
import functools
import hashlib
import io
import json
import logging
import os
import queue
import struct
import tarfile
import tempfile
import threading
import zlib
from array import array
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from isal import isal_zlib

import layerwriter
import toc
import tocread

log = logging.getLogger(__name__)

VERSION = 1
MAGIC = b"LMSEEKIX"
FORMAT = "gzip+seekindex"  # the `format` of a toc.Index made from a seek index
SPAN_BYTES = 1 << 20  # compressed bytes between checkpoints, at least (unless the output grows too large)
MAX_SPAN_OUTPUT = 24 << 20  # uncompressed bytes between checkpoints, at most where the blob allows it
WINDOW_SIZE = 32768
CHUNK_SIZE = toc.DEFAULT_CHUNK_SIZE  # file bytes per chunk of the file table (and per cache entry)
MAX_HEADER_BYTES = 64 << 10
MAX_CHECKPOINTS = 1 << 22
MAX_DEFLATE_RATIO = 1032  # uncompressed bytes per compressed byte, at most (258-byte matches in 2 bits)
MAX_SPAN_BYTES = 64 << 20  # compressed bytes of a span, at most: reads hold spans whole (built: ~4 MiB)
SPAN_MEMORY = 32 << 20  # verified compressed spans a layer keeps in memory
_READ_PIECE = 4 << 20  # compressed bytes read at once while building, decompressed bytes decoded at once
_PIECES_AHEAD = 4  # decompressed pieces the decoder thread may be ahead of the file table
_INFLATE_PIECE = 1 << 20  # uncompressed bytes produced at once while reading
_POINT = struct.Struct("<QQI32s")  # bit offset, uncompressed offset, compressed window length, span sha256
_GZIDX_HEADER = struct.Struct("<5sBBQQIII")
_GZIDX_POINT = struct.Struct("<QQBB")
_EMPTY_DIGEST = toc.sha256_digest(b"")
HOLE = 0  # the stream offset of a chunk that is a sparse file's hole (offset 0 holds a tar header)


class SeekIndexError(toc.FormatError):
    """A seek index is malformed, truncated, or describes another layer."""


class NotGzipError(toc.FormatError):
    """The layer blob is not gzip (a plain tar, zstd): there is nothing to index."""


class ReadAt(Protocol):
    def __call__(self, offset: int, length: int) -> bytes: ...


class Stage(Protocol):
    """Where a SpanReader keeps the verified spans a prefetch brought (e.g. download.StagedRanges)."""

    def put(self, start: int, data: bytes) -> None: ...

    def read(self, offset: int, length: int) -> bytes | None: ...


# ------------------------------------------------------------------------------------ deflate resumption


def _bits(fields: Iterable[tuple[int, int]]) -> tuple[int, int]:
    """Pack (value, width) fields LSB first, as deflate does: (the bits as an int, their count)."""
    value = count = 0
    for field, width in fields:
        value |= field << count
        count += width
    return value, count


# An empty fixed-Huffman block: BFINAL 0, BTYPE 01, end-of-block (seven 0 bits): 10 bits.
_FIXED_EMPTY = ((0, 1), (1, 2), (0, 7))
# An empty dynamic-Huffman block of 331 bits (odd): 258 literal/length codes of which only end-of-block
# has a length (1), one distance code of length 0; the code-length code gives symbols 0 and 1 one bit each.
_CODE_LENGTH_ORDER = (16, 17, 18, 0, 8, 7, 9, 6, 10, 5, 11, 4, 12, 3, 13, 2, 14, 1)
_DYNAMIC_EMPTY = ((0, 1), (2, 2), (1, 5), (0, 5), (len(_CODE_LENGTH_ORDER) - 4, 4),
                  *((int(symbol in (0, 1)), 3) for symbol in _CODE_LENGTH_ORDER),
                  *((0, 1),) * 256, (1, 1), (0, 1), (0, 1), (0, 1))


def _prefix(consumed: int) -> tuple[int, int]:
    """Empty deflate blocks whose bit count is `consumed` modulo 8 (none for 0)."""
    blocks: tuple[tuple[int, int], ...] = ()
    if consumed % 2:
        blocks, consumed = _DYNAMIC_EMPTY, consumed - 3
    return _bits(blocks + _FIXED_EMPTY * ((consumed // 2) % 4))


_PREFIXES = [_prefix(consumed) for consumed in range(8)]


def _resume_stream(data: bytes | memoryview, bit: int) -> bytes:
    """A raw deflate stream that continues at bit `bit % 8` of `data[0]`: Python's zlib cannot start
    mid-byte (no inflatePrime), so empty blocks that end exactly there replace the bits already used."""
    consumed = bit % 8
    value, count = _PREFIXES[consumed]
    whole = count // 8
    head = value.to_bytes(whole + 1, "little")
    mask = (1 << consumed) - 1
    return head[:whole] + bytes([(head[whole] & mask) | (data[0] & ~mask & 0xFF)]) + bytes(data[1:])


def inflate_from(data: bytes | memoryview, bit: int, window: bytes) -> Iterator[bytes]:
    """The uncompressed bytes of a gzip stream from a checkpoint on, in pieces, until `data` runs out.

    `data` starts with the blob byte holding bit `bit` (counted from the blob's start); `window` is the
    uncompressed data before the checkpoint.  Later gzip members (pigz, concatenated) are followed.
    """
    if not data:
        return
    inflater = isal_zlib.decompressobj(wbits=-15, zdict=window) if window else isal_zlib.decompressobj(-15)
    pending: bytes = _resume_stream(data, bit)
    raw = True  # the first member is raw deflate from the checkpoint; its trailer comes next
    while True:
        try:
            piece = inflater.decompress(pending, _INFLATE_PIECE)
        except isal_zlib.error as e:
            raise toc.FormatError(f"corrupt deflate data after bit {bit} ({e})") from None
        pending = inflater.unconsumed_tail
        if piece:
            yield piece
            continue
        if not inflater.eof:
            return  # the data given ends here
        pending = inflater.unused_data[8:] if raw else inflater.unused_data  # the member's CRC and size
        pending = pending.lstrip(b"\0")  # zero padding between members, as gzip -d allows
        if not pending:
            return
        inflater, raw = isal_zlib.decompressobj(wbits=31), False


def extract(pieces: Iterable[bytes], start: int,
            wanted: list[tuple[int, int]]) -> Iterator[tuple[int, bytes]]:
    """(i, bytes) of each range `wanted[i]` = (offset, size), sorted by offset and starting at or after
    `start`, as the stream `pieces` (uncompressed data from offset `start`) passes it; stops at the last.
    Holds no more than the pending ranges need."""
    buf = bytearray()
    buf_start, i = start, 0
    for piece in pieces:
        if i == len(wanted):
            return
        buf += piece
        while i < len(wanted) and wanted[i][0] + wanted[i][1] <= buf_start + len(buf):
            offset, size = wanted[i]
            yield i, bytes(buf[offset - buf_start:offset - buf_start + size])
            i += 1
        keep = wanted[i][0] if i < len(wanted) else buf_start + len(buf)
        drop = min(keep - buf_start, len(buf))
        if drop > 0:
            del buf[:drop]
            buf_start += drop


# ------------------------------------------------------------------------------------------- the index


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """Where decompression can start: blob bit offset, uncompressed offset, compressed window."""

    bit: int
    offset: int
    window: bytes


class SeekIndex:
    """A loaded seek index: checkpoints and span digests of one layer blob, and its file table as a
    toc.Index (format FORMAT) whose chunk `comp_offset` is the chunk's offset in the uncompressed tar
    stream.  Span k is the blob bytes [span_range(k)): the checkpoint's byte up to the byte holding the
    next checkpoint's first bit (neighbours may share that byte); it decompresses to [out_range(k))."""

    def __init__(self, layer_digest: str, layer_size: int, uncompressed_size: int,
                 points: list[Checkpoint], span_digests: bytes, index: toc.Index, stored_size: int) -> None:
        self.layer_digest, self.layer_size = layer_digest, layer_size
        self.uncompressed_size = uncompressed_size
        self.index = index
        self.stored_size = stored_size  # bytes of the serialized index
        self._bits = array("Q", (p.bit for p in points))
        self._offsets = array("Q", (p.offset for p in points))
        self._windows = [p.window for p in points]
        self._span_digests = span_digests
        starts, sizes, digests = array("Q"), array("Q"), bytearray()
        for chunk in sorted(index.blob_chunks(), key=lambda c: c.comp_offset):
            starts.append(chunk.comp_offset)
            sizes.append(chunk.size)
            digests += bytes.fromhex(chunk.digest[7:])
        self._chunk_starts, self._chunk_sizes, self._chunk_digests = starts, sizes, bytes(digests)

    @property
    def span_count(self) -> int:
        return len(self._bits)

    def span_range(self, k: int) -> tuple[int, int]:
        """Blob bytes [start, end) of span k."""
        end = -(-self._bits[k + 1] // 8) if k + 1 < len(self._bits) else self.layer_size
        return self._bits[k] // 8, end

    def out_range(self, k: int) -> tuple[int, int]:
        """Uncompressed bytes [start, end) that span k decompresses to."""
        end = self._offsets[k + 1] if k + 1 < len(self._offsets) else self.uncompressed_size
        return self._offsets[k], end

    def span_of(self, offset: int) -> int:
        """The span whose output holds uncompressed byte `offset`."""
        return max(bisect.bisect_right(self._offsets, offset) - 1, 0)

    def spans_for(self, offset: int, size: int) -> tuple[int, int]:
        """The first and last span needed for uncompressed bytes [offset, offset + size)."""
        return self.span_of(offset), self.span_of(offset + max(size, 1) - 1)

    def verify_span(self, k: int, data: bytes | memoryview) -> None:
        """Raise toc.DigestError unless `data` is span k as indexed (checked before it is decompressed)."""
        want = "sha256:" + self._span_digests[k * 32:k * 32 + 32].hex()
        toc.verify_digest(data, want, f"compressed span {k} of layer {self.layer_digest}")

    def window(self, k: int) -> bytes:
        return _inflate_window(self._windows[k])

    def inflate(self, k: int, data: bytes | memoryview) -> Iterator[bytes]:
        """Decompress blob bytes `data` that start at span k (and may run on through later spans)."""
        return inflate_from(data, self._bits[k], self.window(k))

    def chunks_within(self, start: int, end: int) -> list[toc.Chunk]:
        """The file table's chunks (holes aside) lying wholly in uncompressed [start, end), in stream
        order (`comp_offset` is the stream offset, `comp_end` its end)."""
        first = bisect.bisect_left(self._chunk_starts, max(start, HOLE + 1))
        out = []
        for i in range(first, bisect.bisect_left(self._chunk_starts, end, lo=first)):
            offset, size = self._chunk_starts[i], self._chunk_sizes[i]
            if offset + size <= end:
                digest = "sha256:" + self._chunk_digests[i * 32:i * 32 + 32].hex()
                out.append(toc.Chunk(0, size, offset, offset + size, 0, digest))
        return out

    def pieces(self, chunks: Iterable[toc.Chunk], target: int) -> list[tuple[int, int, list[toc.Chunk]]]:
        """How to fetch the spans holding `chunks` (holes aside): pieces (first, last, the chunks starting
        in spans first..last, in stream order), each of consecutive spans of about `target` compressed
        bytes (unless one span is larger), every span a chunk needs in exactly one piece (a chunk may run on
        into the next piece's spans), ordered by the earliest of `chunks` that needs them."""
        rank: dict[int, int] = {}
        starting: dict[int, list[toc.Chunk]] = {}
        for i, c in enumerate(chunks):
            if c.comp_offset == HOLE:
                continue
            first, last = self.spans_for(c.comp_offset, c.size)
            starting.setdefault(first, []).append(c)
            for k in range(first, last + 1):
                rank.setdefault(k, i)
        runs: list[list[int]] = []
        for k in sorted(rank):
            if (runs and k == runs[-1][-1] + 1
                    and self.span_range(k)[1] - self.span_range(runs[-1][0])[0] <= target):
                runs[-1].append(k)
            else:
                runs.append([k])
        runs.sort(key=lambda run: min(rank[k] for k in run))
        return [(run[0], run[-1], sorted((c for k in run for c in starting.get(k, ())),
                                         key=lambda c: c.comp_offset)) for run in runs]

    def describe(self) -> str:
        """One line for `inspect` and the logs."""
        return (f"seek index, {self.span_count} checkpoints, {self.stored_size} bytes "
                f"({100 * self.stored_size / max(self.layer_size, 1):.2f}% of the layer)")


class SpanReader:
    """Chunks of an indexed layer: the spans holding a chunk are fetched (through `fetch(offset, length)`)
    and verified before anything is decompressed; the last few stay in memory, so the chunks a span
    shares with its neighbours cost no second request.  Spans a prefetch has announced (`expect`) are
    awaited, not fetched twice, and once verified kept in `stage` (if set), whence they are read again."""

    def __init__(self, index: SeekIndex, fetch: ReadAt, memory: int = SPAN_MEMORY) -> None:
        self.index, self._fetch, self._memory = index, fetch, memory
        self._spans: OrderedDict[int, bytes] = OrderedDict()
        self._held = 0
        self._flights: dict[int, concurrent.futures.Future[bytes]] = {}  # span -> its prefetched bytes
        self.stage: Stage | None = None
        self._lock = threading.Lock()

    def expect(self, spans: Iterable[int]) -> None:
        """Announce spans that `fetch_pieces` will bring: whoever needs one meanwhile waits for it."""
        with self._lock:
            for k in spans:
                self._flights.setdefault(k, concurrent.futures.Future())

    def fetch_pieces(self, pieces: Sequence[tuple[int, int]],
                     fetch_ranges: Callable[[list[tuple[int, int]]], list[bytes]]) -> list[int]:
        """Fetch the spans first..last of each piece in one (multi-range) request, verify each span, put
        it in the stage, and hand it to whoever waits for it (see `expect`); the spans that failed
        verification (their waiters get the toc.DigestError).  Raises what the fetch raises (so do the
        waiters, which then fetch on their own)."""
        ranges = [(self.index.span_range(first)[0], self.index.span_range(last)[1]) for first, last in pieces]
        every = [k for first, last in pieces for k in range(first, last + 1)]
        outcomes: dict[int, bytes | BaseException] = {}
        try:
            data = fetch_ranges([(start, end - start) for start, end in ranges])
            for (first, last), (start, _), part in zip(pieces, ranges, data, strict=True):
                for k in range(first, last + 1):
                    a, b = self.index.span_range(k)
                    span = part[a - start:b - start]
                    try:
                        self.index.verify_span(k, span)  # before a single byte of it is decompressed
                    except toc.DigestError as e:
                        outcomes[k] = e
                        continue
                    if self.stage is not None:
                        self.stage.put(a, span)
                    outcomes[k] = span
        except BaseException as e:
            outcomes.update((k, e) for k in every if k not in outcomes)
            raise
        finally:
            with self._lock:
                flights = [(self._flights.pop(k, None), outcome) for k, outcome in outcomes.items()]
            for flight, outcome in flights:
                if flight is None or flight.done():
                    continue
                if isinstance(outcome, BaseException):
                    flight.set_exception(outcome)
                else:
                    flight.set_result(outcome)
        return [k for k, outcome in outcomes.items() if isinstance(outcome, BaseException)]

    def spans(self, first: int, last: int) -> bytes:
        """The blob bytes of spans first..last, each verified (toc.DigestError if one is not as indexed)."""
        with self._lock:
            have = {k: self._spans.get(k) for k in range(first, last + 1)}
            for k in have:
                if have[k] is not None:
                    self._spans.move_to_end(k)
            awaited = {k: self._flights[k] for k, data in have.items() if data is None and k in self._flights}
        for k, flight in awaited.items():
            try:
                have[k] = flight.result()
            except toc.DigestError:
                raise
            except (toc.LazymountError, OSError):
                pass  # the prefetch's request failed: fetched here instead
        stage = self.stage
        for k, data in have.items():
            if data is None and stage is not None:  # verified before it was staged
                a, b = self.index.span_range(k)
                have[k] = stage.read(a, b - a)
        missing = [k for k, data in have.items() if data is None]
        if missing:
            start, end = self.index.span_range(missing[0])[0], self.index.span_range(missing[-1])[1]
            data = self._fetch(start, end - start)
            for k in missing:
                a, b = self.index.span_range(k)
                have[k] = data[a - start:b - start]
                self.index.verify_span(k, have[k])  # before a single byte of it is decompressed
            self._remember({k: have[k] for k in missing})
        base = self.index.span_range(first)[0]
        out = bytearray()
        for k in range(first, last + 1):  # neighbouring spans share at most one byte
            out += memoryview(have[k] or b"")[base + len(out) - self.index.span_range(k)[0]:]
        return bytes(out)

    def _remember(self, spans: dict[int, bytes]) -> None:
        with self._lock:
            for k, data in spans.items():
                if k not in self._spans and len(data) <= self._memory:
                    self._spans[k] = data
                    self._held += len(data)
            while self._held > self._memory:
                self._held -= len(self._spans.popitem(last=False)[1])

    def decode(self, first: int, last: int, chunks: Sequence[toc.Chunk]) -> Iterator[tuple[toc.Chunk, bytes]]:
        """(chunk, bytes) of each of `chunks` (in stream order, each lying wholly in the output of spans
        first..last), decompressed from those spans once they are fetched and verified; the bytes are not
        verified (the cache does that)."""
        data = self.spans(first, last)
        for i, piece in extract(self.index.inflate(first, data), self.index.out_range(first)[0],
                                [(c.comp_offset, c.size) for c in chunks]):
            yield chunks[i], piece

    def chunk(self, chunk: toc.Chunk, wanted: Callable[[toc.Chunk], bool] = lambda c: True
              ) -> tuple[bytes, list[tuple[toc.Chunk, bytes]]]:
        """A chunk's bytes (not verified: the cache does that), and (chunk, bytes) of the other chunks
        that lie wholly in the spans decompressed for it and that `wanted` accepts."""
        if chunk.comp_offset == HOLE:
            return bytes(chunk.size), []
        first, last = self.index.spans_for(chunk.comp_offset, chunk.size)
        start, end = self.index.out_range(first)[0], self.index.out_range(last)[1]
        chunks = [c for c in self.index.chunks_within(start, end)
                  if c.comp_offset == chunk.comp_offset or wanted(c)]
        found, others = None, []
        for c, piece in self.decode(first, last, chunks):
            if c.comp_offset == chunk.comp_offset:
                found = piece
            else:
                others.append((c, piece))
        if found is None:
            raise toc.TruncatedError(f"spans {first}-{last} end before the chunk at stream offset "
                                     f"{chunk.comp_offset}")
        return found, others


class BlobDigest:
    """The sha256 of a blob read span by span, in order, after the bytes before the first checkpoint
    (neighbouring spans share a byte); unknown (None) once a span is skipped."""

    def __init__(self, index: SeekIndex, head: bytes) -> None:
        self._index, self._hash, self._end = index, hashlib.sha256(head), len(head)

    def add(self, k: int, data: bytes | None) -> None:
        """Span k's bytes, or None for a span that was skipped."""
        if data is None or self._end < 0:
            self._end = -1
            return
        start = self._index.span_range(k)[0]
        self._hash.update(memoryview(data)[self._end - start:])
        self._end = start + len(data)

    def result(self) -> str | None:
        """The blob's digest if every byte of it went in, else None."""
        return "sha256:" + self._hash.hexdigest() if self._end == self._index.layer_size else None


def _inflate_window(stored: bytes) -> bytes:
    if not stored:
        return b""
    inflater = zlib.decompressobj(-15)
    try:
        window = inflater.decompress(stored, WINDOW_SIZE + 1)
    except zlib.error as e:
        raise SeekIndexError(f"seek index has a corrupt window ({e})") from None
    if len(window) > WINDOW_SIZE or not inflater.eof:
        raise SeekIndexError("seek index has a window larger than 32 KiB")
    return window


# ----------------------------------------------------------------------------------- the stored format


def serialize(layer_digest: str, layer_size: int, uncompressed_size: int, points: list[Checkpoint],
              span_digests: bytes, toc_json: bytes) -> bytes:
    """The seek index file: MAGIC, u32 header length, JSON header, checkpoint table, windows, TOC."""
    toc_stored = zlib.compress(toc_json, 9)
    header = json.dumps({
        "version": VERSION, "mediaType": toc.MEDIA_SEEK_INDEX,
        "layer": {"digest": layer_digest, "size": layer_size}, "uncompressedSize": uncompressed_size,
        "checkpoints": len(points), "windowBytes": sum(len(p.window) for p in points),
        "tocBytes": len(toc_stored), "tocSize": len(toc_json), "tocDigest": toc.sha256_digest(toc_json),
    }, sort_keys=True).encode()
    table = b"".join(_POINT.pack(p.bit, p.offset, len(p.window), span_digests[k * 32:k * 32 + 32])
                     for k, p in enumerate(points))
    return b"".join([MAGIC, struct.pack("<I", len(header)), header, table,
                     *(p.window for p in points), toc_stored])


def load(data: bytes, layer_digest: str, layer_size: int) -> SeekIndex:
    """Parse and validate a seek index for the layer blob `layer_digest` of `layer_size` bytes.

    Everything is bounded before it is read; raises SeekIndexError (one line) if the index is truncated,
    malformed, or made for another layer.
    """
    if data[:len(MAGIC)] != MAGIC:
        raise SeekIndexError("not a lazymount seek index (bad magic)")
    pos = len(MAGIC) + 4
    if len(data) < pos:
        raise SeekIndexError("seek index is truncated (no header)")
    (header_len,) = struct.unpack_from("<I", data, len(MAGIC))
    if header_len > MAX_HEADER_BYTES or len(data) < pos + header_len:
        raise SeekIndexError("seek index is truncated or has an oversized header")
    try:
        header = json.loads(data[pos:pos + header_len])
    except ValueError:
        raise SeekIndexError("seek index header is not JSON") from None
    pos += header_len
    if not isinstance(header, dict) or header.get("version") != VERSION:
        raise SeekIndexError("seek index has no header of version 1")
    layer = header.get("layer") if isinstance(header.get("layer"), dict) else {}
    if layer.get("digest") != layer_digest or layer.get("size") != layer_size:
        found = f"{str(layer.get('digest'))[:80]} ({str(layer.get('size'))[:20]} bytes)"
        raise SeekIndexError(f"seek index is for layer {found}, not {layer_digest} ({layer_size} bytes)")
    count, window_bytes, toc_bytes, toc_size, total = (_field(header, key) for key in (
        "checkpoints", "windowBytes", "tocBytes", "tocSize", "uncompressedSize"))
    if not 1 <= count <= MAX_CHECKPOINTS or toc_size > toc.DEFAULT_LIMITS.toc_json:
        raise SeekIndexError(f"seek index has {count} checkpoints and a {toc_size}-byte TOC: out of bounds")
    expected = pos + count * _POINT.size + window_bytes + toc_bytes
    if len(data) != expected:
        raise SeekIndexError(f"seek index is truncated or has trailing bytes ({len(data)} bytes, "
                             f"{expected} expected)")
    points, digests = _load_points(data, pos, count, layer_size, total)
    toc_start = expected - toc_bytes
    toc_json = _inflate_toc(data[toc_start:], toc_size)
    toc.verify_digest(toc_json, str(header.get("tocDigest")), "seek index TOC")
    index = tocread.index_from_json(toc_json, tocread.Footer(FORMAT, total, total, 0))
    for chunk in index.blob_chunks():  # a reader holds a chunk whole: a huge one would exhaust memory
        if chunk.size > CHUNK_SIZE or (chunk.comp_offset != HOLE and chunk.comp_offset + chunk.size > total):
            raise SeekIndexError(f"seek index chunk at {chunk.comp_offset} ({chunk.size} bytes) is larger "
                                 f"than {CHUNK_SIZE} bytes or ends past the stream ({total})")
    return SeekIndex(layer_digest, layer_size, total, points, digests, index, len(data))


def _field(header: dict, key: str) -> int:
    value = header.get(key)
    if type(value) is not int or not 0 <= value < 1 << 62:
        raise SeekIndexError(f"seek index header field {key!r} is not a valid number")
    return value


def _load_points(data: bytes, pos: int, count: int, layer_size: int,
                 total: int) -> tuple[list[Checkpoint], bytes]:
    """The checkpoint table and the windows after it, checked: offsets increase and stay in range."""
    points, digests = [], bytearray()
    window_pos = pos + count * _POINT.size
    last_bit, last_offset = -1, -1
    for k in range(count):
        bit, offset, window_len, digest = _POINT.unpack_from(data, pos + k * _POINT.size)
        if (bit <= last_bit or offset < last_offset or bit >= layer_size * 8 or offset >= max(total, 1)
                or (k == 0 and offset != 0) or window_len > 2 * WINDOW_SIZE):
            raise SeekIndexError(f"seek index checkpoint {k} is out of order or out of range")
        points.append(Checkpoint(bit, offset, data[window_pos:window_pos + window_len]))
        digests += digest
        window_pos += window_len
        last_bit, last_offset = bit, offset
    for k, point in enumerate(points):  # no span decompresses to more than deflate can make of it
        end_bit, end = (points[k + 1].bit, points[k + 1].offset) if k + 1 < count else (layer_size * 8, total)
        span = -(-end_bit // 8) - point.bit // 8
        if span > MAX_SPAN_BYTES:
            raise SeekIndexError(f"seek index span {k} has {span} compressed bytes, over {MAX_SPAN_BYTES}")
        if end - point.offset > MAX_DEFLATE_RATIO * span:
            raise SeekIndexError(f"seek index span {k} claims {end - point.offset} uncompressed bytes: more "
                                 "than its compressed bytes can hold")
    return points, bytes(digests)


def _inflate_toc(stored: bytes, size: int) -> bytes:
    inflater = zlib.decompressobj()
    try:
        toc_json = inflater.decompress(stored, size + 1)
    except zlib.error as e:
        raise SeekIndexError(f"seek index TOC is corrupt ({e})") from None
    if len(toc_json) != size or not inflater.eof or inflater.unused_data:
        raise SeekIndexError("seek index TOC does not have its declared size")
    return toc_json


# ------------------------------------------------------------------------------------------- building


class _Source(io.RawIOBase):
    """The blob as a file for rapidgzip: bytes are fetched once, in order (hashed as they pass, kept in
    `spool` unless the blob is local), and served from there however the decoder seeks."""

    def __init__(self, read_at: ReadAt, size: int, spool: io.BufferedRandom | None) -> None:
        super().__init__()
        self._read_at, self.size, self._spool = read_at, size, spool
        self._pos = self._fetched = 0
        self.hash = hashlib.sha256()

    def _fetch_to(self, end: int) -> None:
        while self._fetched < min(end, self.size):
            piece = self._read_at(self._fetched, min(_READ_PIECE, self.size - self._fetched))
            if not piece:
                raise toc.TruncatedError(f"layer blob ends at {self._fetched} of {self.size} bytes")
            self.hash.update(piece)
            if self._spool is not None:
                os.pwrite(self._spool.fileno(), piece, self._fetched)
            self._fetched += len(piece)

    def pread(self, offset: int, length: int) -> bytes:
        """Bytes of the blob, fetched first if need be."""
        self._fetch_to(offset + length)
        if self._spool is not None:
            return os.pread(self._spool.fileno(), length, offset)
        return self._read_at(offset, length)

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        data = self.pread(self._pos, min(len(buffer), max(self.size - self._pos, 0)))
        buffer[:len(data)] = data
        self._pos += len(data)
        return len(data)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self._pos = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.size}[whence] + offset
        return self._pos

    def tell(self) -> int:
        return self._pos

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def digest(self) -> str:
        """The sha256 of the whole blob (the rest is fetched if the decoder stopped early)."""
        self._fetch_to(self.size)
        return "sha256:" + self.hash.hexdigest()


class _Unpacked(io.RawIOBase):
    """The decompressed stream of `gz` as a forward-only file: a thread decodes it `_READ_PIECE` at a
    time, up to `_PIECES_AHEAD` pieces ahead of the reader (rapidgzip inflates without the GIL), so
    decoding runs beside the parsing and hashing.  Seeking back is allowed within the piece at hand."""

    def __init__(self, gz: io.RawIOBase) -> None:
        super().__init__()
        self._gz = gz
        self._queue: queue.Queue[memoryview | BaseException] = queue.Queue(_PIECES_AHEAD)
        self._stop = threading.Event()
        self._piece, self._start, self._pos, self._ended = memoryview(b""), 0, 0, False
        self._thread = threading.Thread(target=self._decode, name="seekindex-decode", daemon=True)
        self._thread.start()

    def _decode(self) -> None:
        try:
            while not self._stop.is_set():
                piece = bytearray(_READ_PIECE)
                got = self._gz.readinto(piece)
                self._put(memoryview(piece)[:got])
                if not got:
                    return
        except BaseException as e:  # noqa: BLE001 -- handed to the reader, who raises it
            self._put(e)

    def _put(self, item: memoryview | BaseException) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(queue.Full):
                self._queue.put(item, timeout=0.1)
                return

    def _advance(self) -> bool:
        """Move on to the next piece; False at the end of the stream."""
        if self._ended:
            return False
        item = self._queue.get()
        if isinstance(item, BaseException) or not item:
            self._ended = True
            if item:
                raise item
            return False
        self._start += len(self._piece)
        self._piece = item
        return True

    def views(self, size: int) -> Iterator[memoryview]:
        """The next `size` bytes (fewer at the end of the stream), as views of the pieces: not copied."""
        while size > 0:
            at = self._pos - self._start
            if at >= len(self._piece):
                if not self._advance():
                    return
                continue
            view = self._piece[at:at + size]
            self._pos += len(view)
            size -= len(view)
            yield view

    def read(self, size: int = -1) -> bytes:
        return b"".join(self.views(size if size >= 0 else 1 << 62))

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        pos = offset + (self._pos if whence == io.SEEK_CUR else 0)
        if whence not in (io.SEEK_SET, io.SEEK_CUR) or pos < self._start:
            raise ValueError(f"cannot seek back to {pos} in a stream read up to {self._pos}")
        self._pos = pos
        return pos

    def tell(self) -> int:
        return self._pos

    def drain(self) -> int:
        """Read to the end of the stream; its size."""
        for _ in self.views(1 << 62):
            pass
        self._thread.join()
        return self._gz.tell()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        super().close()


@dataclass
class BuildResult:
    """A built index and what `lazymount index` reports of it."""

    data: bytes
    index: SeekIndex
    uncompressed_size: int
    entries: int


def build(read_at: ReadAt, size: int, layer_digest: str, *, local: bool = False,
          spool_dir: Path | None = None, fileno: int | None = None) -> BuildResult:
    """Build the seek index of a gzip layer blob in one pass over it.

    `read_at(offset, length)` reads the blob; a `local` blob is read twice (the span digests), any
    other is spooled to a temporary file in `spool_dir` as it streams past.  `fileno`, an open file of a
    local blob, is decoded without calling back into Python.  The blob's sha256 must be `layer_digest`.
    Raises NotGzipError, toc.FormatError if the blob is no valid gzip tar, toc.DigestError if its digest
    does not match.
    """
    import rapidgzip  # here: only building needs it

    if read_at(0, 2) != b"\x1f\x8b":
        raise NotGzipError("layer is not gzip")
    with contextlib.ExitStack() as stack:
        spool = None if local else stack.enter_context(tempfile.TemporaryFile(dir=spool_dir))
        source = _Source(read_at, size, spool)
        pool = stack.enter_context(concurrent.futures.ThreadPoolExecutor(1, "seekindex"))
        # The blob's digest: hashed beside the decoding if the decoder reads the file itself, else as
        # the decoder's reads pass.
        blob_digest = pool.submit(source.digest) if fileno is not None else None
        # One decoder thread: rapidgzip's sequential ISA-L inflate costs ~2/3 of the CPU of its parallel
        # mode, and the file table's parsing and hashing run beside it on the other core.
        gz = stack.enter_context(rapidgzip.RapidgzipFile(source if fileno is None else fileno,
                                                         parallelization=1))
        try:
            stream = stack.enter_context(_Unpacked(gz))
            entries = _file_table(stream)
            total = stream.drain()  # past the tar's end: the stream's size, every checkpoint
            points = _thin(_gzidx_points(gz), total)
        except (RuntimeError, ValueError, EOFError, tarfile.TarError) as e:
            raise toc.FormatError(f"source layer is corrupt or truncated ({e})") from None
        actual = source.digest() if blob_digest is None else blob_digest.result()
        if actual != layer_digest:
            raise toc.DigestError(f"layer blob is {actual}, not {layer_digest}: not indexed")
        windows = pool.map(_deflate_window, [p.window for p in points])  # beside the span digests
        spans = [(p.bit // 8, -(-points[k + 1].bit // 8) if k + 1 < len(points) else size)
                 for k, p in enumerate(points)]
        span_digests = b"".join(hashlib.sha256(source.pread(a, b - a)).digest() for a, b in spans)
        points = [Checkpoint(p.bit, p.offset, window) for p, window in zip(points, windows, strict=True)]
        toc_json = json.dumps({"version": 1, "entries": entries}, separators=(",", ":")).encode()
        data = serialize(layer_digest, size, total, points, span_digests, toc_json)
        index = load(data, layer_digest, size)
        last = index.span_count - 1
        _check_end(index, source.pread(*index.span_range(last)), last)
    return BuildResult(data, index, total, len(entries))


def build_and_keep(read_at: ReadAt, size: int, layer_digest: str, cache_dir: Path | None,
                   fileno: int | None = None) -> SeekIndex | None:
    """Index a layer blob on local disk (downloaded and open as `fileno`, if given; or still arriving:
    `read_at` waits for its bytes) and keep the index in `cache_dir`; None (with the reason logged) if the
    blob is not a gzip layer that can be indexed."""
    try:
        built = build(read_at, size, layer_digest, local=True, fileno=fileno)
    except toc.FormatError as e:
        log.info("layer %s: no seek index (%s)", layer_digest, e)
        return None
    if cache_dir is not None:
        try:
            store_index(cache_dir, layer_digest, built.data)
        except OSError as e:
            log.warning("layer %s: seek index not kept in %s: %s", layer_digest, cache_dir, e)
    log.info("layer %s: %s built", layer_digest, built.index.describe())
    return built.index


def _check_end(index: SeekIndex, data: bytes, k: int) -> None:
    """Decompress the last span to the end: it must produce exactly the rest of the stream (a blob cut
    short inside its last member ends early; a wrong checkpoint fails here rather than in a read)."""
    start, end = index.out_range(k)
    produced = sum(len(piece) for piece in index.inflate(k, data))
    if produced != end - start:
        raise toc.FormatError(f"source layer is corrupt or truncated (its last span holds {produced} bytes, "
                              f"{end - start} expected)")


def _file_table(stream: _Unpacked) -> list[dict]:
    """TOC entries of every tar member, regular files chunked with offsets into the tar stream."""
    entries: list[dict] = []
    if not stream.read(1):
        return entries  # an empty archive, as GNU tar and Go's archive/tar (umoci, containerd) read it
    stream.seek(0)
    # Random-access mode (it only seeks forward): tarfile's stream mode copies its buffer per header.
    with tarfile.open(fileobj=stream, mode="r:", **layerwriter.TAR_OPTIONS) as tar:
        while (info := tar.next()) is not None:
            tar.members.clear()  # one member at a time: a layer may have millions
            entry = layerwriter.member_entry(info)
            if entry is None:
                continue
            if entry["type"] != "reg" or not info.size:
                if entry["type"] == "reg":
                    entry["digest"] = _EMPTY_DIGEST
                entries.append(entry)
                continue
            entries += _chunk_entries(stream, info, entry)
    return entries


def _regions(info: tarfile.TarInfo) -> Iterator[tuple[int, int, int | None]]:
    """(file offset, length, stream offset or None for a hole) of a regular file, at most CHUNK_SIZE
    each; a sparse file's data segments lie one after the other in the stream."""
    segments = info.sparse if info.sparse is not None else [(0, info.size)]
    pos, stream = 0, info.offset_data
    pieces: list[tuple[int, int, int | None]] = []
    for offset, length in segments:
        if offset > pos:
            pieces.append((pos, offset - pos, None))
        if length:
            pieces.append((offset, length, stream))
        stream += length
        pos = max(pos, offset + length)
    if pos < info.size:
        pieces.append((pos, info.size - pos, None))
    for offset, length, where in pieces:
        for cut in range(0, length, CHUNK_SIZE):
            yield offset + cut, min(CHUNK_SIZE, length - cut), None if where is None else where + cut


def _chunk_entries(stream: _Unpacked, info: tarfile.TarInfo, entry: dict) -> list[dict]:
    """The entry and its chunk entries, hashing the file's content as it passes in the stream."""
    regions = list(_regions(info))
    whole = hashlib.sha256() if len(regions) > 1 else None
    out: list[dict] = []
    for offset, length, where in regions:
        chunk_hash = hashlib.sha256()
        if where is None:
            pieces: Iterable[bytes | memoryview] = (bytes(length),)
        else:
            stream.seek(where)
            pieces = stream.views(length)
        got = 0
        for piece in pieces:
            chunk_hash.update(piece)
            if whole is not None:
                whole.update(piece)
            got += len(piece)
        if got != length:
            raise toc.TruncatedError(f"source layer is corrupt or truncated (it ends inside {info.name!r})")
        digest = "sha256:" + chunk_hash.hexdigest()
        chunk = entry if not out else {"name": info.name, "type": "chunk", "chunkOffset": offset}
        chunk["offset"] = HOLE if where is None else where
        if len(regions) > 1:
            chunk.update(chunkSize=length, chunkDigest=digest)
        else:
            chunk["digest"] = digest
        out.append(chunk)
    if whole is not None:
        entry["digest"] = "sha256:" + whole.hexdigest()
    return out


def _gzidx_points(gz: io.BufferedIOBase) -> list[Checkpoint]:
    """Every checkpoint rapidgzip found, its window not yet compressed, from its export in indexed_gzip's
    GZIDX format (native byte order; offsets rounded up to bytes with `bits` bits before them; 32 KiB
    windows, unused bytes 0)."""
    import rapidgzip

    with tempfile.TemporaryFile() as f:
        gz.export_index(f, index_format=rapidgzip.IndexFormat.INDEXED_GZIP)
        f.seek(0)
        magic, version, _, _, _, _, window_size, count = _GZIDX_HEADER.unpack(f.read(_GZIDX_HEADER.size))
        if magic != b"GZIDX" or version != 1 or window_size != WINDOW_SIZE:
            raise SeekIndexError(f"unexpected rapidgzip index ({magic!r} v{version}, window {window_size})")
        table = [_GZIDX_POINT.unpack(f.read(_GZIDX_POINT.size)) for _ in range(count)]
        return [Checkpoint(offset * 8 - bits, uncompressed, f.read(WINDOW_SIZE) if has_window else b"")
                for offset, uncompressed, bits, has_window in table]


def _deflate_window(window: bytes) -> bytes:
    """A window as stored: raw deflate, zlib level 9."""
    if not window:
        return b""
    compressor = zlib.compressobj(9, wbits=-15)
    return compressor.compress(window) + compressor.flush()


def _thin(points: list[Checkpoint], total: int) -> list[Checkpoint]:
    """Keep a checkpoint every SPAN_BYTES of compressed input, and wherever skipping one would make a
    span's output exceed MAX_SPAN_OUTPUT; drop one at the very end of the stream."""
    points = [p for p in points if p.offset < max(total, 1)]
    if not points or points[0].offset != 0:
        raise SeekIndexError("rapidgzip found no checkpoint at the start of the stream")
    kept = [points[0]]
    for k in range(1, len(points)):
        following = points[k + 1].offset if k + 1 < len(points) else total
        if (points[k].bit - kept[-1].bit >= SPAN_BYTES * 8
                or following - kept[-1].offset > MAX_SPAN_OUTPUT):
            kept.append(points[k])
    return kept


# --------------------------------------------------------------------------------- the cache directory


def index_path(cache_dir: Path, layer_digest: str) -> Path:
    """Where the seek index of a layer is kept: CACHE/indexes/<hex digest>."""
    return Path(cache_dir) / "indexes" / toc.check_digest(layer_digest)[7:]


def store_index(cache_dir: Path, layer_digest: str, data: bytes) -> Path:
    """Keep a built (or fetched and validated) index in the cache directory, atomically."""
    path = index_path(cache_dir, layer_digest)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".index-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def digest_checked(cache_dir: Path, layer_digest: str, mark: bool = False) -> bool:
    """Whether a mount with this cache directory has read the whole blob and found its digest right
    (`mark` records that it has)."""
    path = index_path(cache_dir, layer_digest).with_suffix(".checked")
    if mark:
        with contextlib.suppress(OSError):
            path.touch()
    return path.exists()


class Layer(Protocol):
    """What find_index needs of a layer: a descriptor (fetch.Descriptor) will do."""

    digest: str
    size: int


# Where an index may come from besides the cache directory: (layer) -> serialized index or None, e.g. the
# image's referrers in its registry (referrers.find_seek_index).
IndexSource = Callable[[Layer], bytes | None]


def _from_cache_dir(layer: Layer, cache_dir: Path) -> bytes | None:
    path = index_path(cache_dir, layer.digest)
    try:
        if path.stat().st_size > layer.size // 8 + (64 << 20):
            raise SeekIndexError(f"{path} is larger than any index of this layer")
        return path.read_bytes()
    except FileNotFoundError:
        return None


def find_index(layer: Layer, cache_dir: Path, elsewhere: Sequence[IndexSource] = ()) -> SeekIndex | None:
    """The seek index of a layer: the one kept in the cache directory, else the first valid one of
    `elsewhere` (then kept in the cache directory, so the next mount on this node needs no lookup); None
    if there is none.  An index that fails validation (or cannot be had) is logged in one line and skipped.
    """
    cache_dir = Path(cache_dir)
    sources = [functools.partial(_from_cache_dir, cache_dir=cache_dir), *elsewhere]
    for k, source in enumerate(sources):
        try:
            data = source(layer)
            if data is None:
                continue
            index = load(data, layer.digest, layer.size)
        except (toc.LazymountError, OSError) as e:
            log.warning("layer %s: seek index rejected: %s", layer.digest, e)
            continue
        if k:
            with contextlib.suppress(OSError):
                store_index(cache_dir, layer.digest, data)
        return index
    return None
