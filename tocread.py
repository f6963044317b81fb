"""Reading a layer blob: its footer, its TOC streamed into a toc.Index within toc.Limits, and its chunks
inflated and verified.

What belongs here: the footer (parsed, and built for the writer), the TOC member read in pieces, inflated
(gzip or zstd) a piece at a time, taken out of its tar entry, hashed as it goes and parsed as a stream of
entries (the json module decodes one entry at a time, so memory grows with the entries and never with the
bytes of the TOC), and a chunk's bytes inflated no further than the chunk. What never does: what entries
mean and how they are checked (the index and its builder, toc.py), writing (layerwriter.py), I/O of its
own (readers are callables handed in), FUSE, HTTP, caching. It imports toc only.
"""

from __future__ import annotations

import codecs
import hashlib
import io
import itertools
import json
import re
import struct
import sys
import tarfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from isal import isal_zlib

from toc import (
    DEFAULT_LIMITS,
    EMPTY_DEFLATE_TAIL,
    FOOTER_SIZE,
    GZIP,
    GZIP_EXTRA_HEADER,
    LEGACY_FOOTER_SIZE,
    TOC_TAR_NAME,
    ZSTD,
    ZSTD_CHUNKED_MAGIC,
    ZSTD_FOOTER_SIZE,
    ZSTD_MANIFEST_TYPE,
    Chunk,
    DigestError,
    FooterError,
    FormatError,
    Index,
    LazymountError,
    Limits,
    TOCError,
    TruncatedError,
    check_digest,
    sha256_digest,
)

_PIECE = 1 << 20  # inflated bytes handed on at a time while a TOC streams through the parser
_MEMBER_PIECE = 8 << 20  # compressed TOC bytes read at a time
_TAR_HEAD = 64 << 10  # the TOC's tar headers (a PAX header included) must fit in this


def _gunzip_pieces(pieces: Iterable[bytes], what: str) -> Iterator[bytes]:
    """Inflate a chain of gzip members arriving in pieces, at most _PIECE bytes at a time."""
    d = zlib.decompressobj(wbits=31)
    started = False
    for data in pieces:
        while True:
            try:
                out = d.decompress(data, _PIECE)
            except zlib.error as e:
                raise FormatError(f"{what}: corrupt gzip data ({e})") from None
            started = started or bool(data)
            if out:
                yield out
            if d.eof:
                data, d, started = d.unused_data, zlib.decompressobj(wbits=31), False
                if not data:
                    break
            else:
                data = d.unconsumed_tail
                if not data and len(out) < _PIECE:
                    break
    if started:
        raise TruncatedError(f"{what}: gzip data ends early")



# ---------------------------------------------------------------------------------------------- footers


def footer_bytes(toc_offset: int) -> bytes:
    """The 51-byte eStargz footer pointing at the TOC's gzip member."""
    payload = b"%016xSTARGZ" % toc_offset
    return (GZIP_EXTRA_HEADER + struct.pack("<H", 4 + len(payload)) + b"SG"
            + struct.pack("<H", len(payload)) + payload + EMPTY_DEFLATE_TAIL)


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
    if blob_size < LEGACY_FOOTER_SIZE:  # e.g. gzip of an empty tar (Docker's 32-byte empty layer)
        raise FooterError(f"blob of {blob_size} bytes is too small for a footer (not an eStargz layer)")
    if len(tail) < min(blob_size, FOOTER_SIZE):
        raise TruncatedError(f"blob of {blob_size} bytes ends before its footer")
    footer = tail[-FOOTER_SIZE:]
    # gzip magic, deflate, FEXTRA; XLEN 26; subfield 'S','G' of LEN 22 (mtime, XFL and OS not checked)
    if len(footer) == FOOTER_SIZE and footer[:4] == GZIP_EXTRA_HEADER[:4] \
            and footer[10:16] == b"\x1a\x00SG\x16\x00":
        if footer[-13:] != EMPTY_DEFLATE_TAIL:
            raise FooterError("eStargz footer is not an empty gzip member")
        return _footer_in_range(GZIP, _parse_toc_offset(footer[16:38]), blob_size - FOOTER_SIZE, FOOTER_SIZE)
    legacy = tail[-LEGACY_FOOTER_SIZE:]
    if legacy[:4] == GZIP_EXTRA_HEADER[:4] and legacy[10:12] == b"\x16\x00":
        if legacy[-13:] != EMPTY_DEFLATE_TAIL:
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


class _PieceReader:
    """A read(n) file over byte pieces (what zstandard's stream_reader reads from)."""

    def __init__(self, pieces: Iterator[bytes]) -> None:
        self._pieces, self._buf = pieces, memoryview(b"")

    def read(self, n: int) -> bytes:
        while not self._buf:
            piece = next(self._pieces, None)
            if piece is None:
                return b""
            self._buf = memoryview(piece)
        out, self._buf = self._buf[:n], self._buf[n:]
        return bytes(out)


def _unzstd_pieces(pieces: Iterator[bytes], what: str) -> Iterator[bytes]:
    """Inflate zstd frames arriving in pieces, at most _PIECE bytes at a time."""
    import zstandard  # here, not at the top: gzip images never need it and it costs ~40 ms of start-up

    reader = zstandard.ZstdDecompressor().stream_reader(_PieceReader(pieces), read_across_frames=True)
    try:
        while piece := reader.read(_PIECE):
            yield piece
    except zstandard.ZstdError as e:
        raise FormatError(f"{what}: corrupt zstd data ({e})") from None


def _unzstd(data: bytes, want: int, what: str) -> bytes:
    """Up to `want` bytes of zstd frames, read in pieces: python-zstandard's read(n) allocates n bytes."""
    import zstandard

    out = bytearray()
    try:
        reader = zstandard.ZstdDecompressor().stream_reader(data, read_across_frames=True)
        while len(out) < want and (piece := reader.read(min(want - len(out), _PIECE))):
            out += piece
    except zstandard.ZstdError as e:
        raise FormatError(f"{what}: corrupt zstd data ({e})") from None
    return bytes(out)


def _toc_tar_entry(head: bytes, limit: int) -> tuple[int, int]:
    """(offset, size) of the TOC JSON in the tar entry whose headers start `head`."""
    try:
        with tarfile.open(fileobj=io.BytesIO(head), mode="r:") as tar:
            info = tar.next()
    except tarfile.TarError as e:
        raise TOCError(f"TOC member is not a tar entry ({e})") from None
    if info is None or info.name != TOC_TAR_NAME or not info.isreg() or info.issparse():
        raise TOCError(f"TOC member holds no {TOC_TAR_NAME} tar entry")
    if info.size > limit:
        raise TOCError(f"TOC of {info.size} bytes is larger than {limit} (limits.toc_json)")
    return info.offset_data, info.size


class _TOCStream:
    """A blob's TOC JSON as it inflates, in pieces: bounded by the limits, hashed as it goes, never whole.

    `failed` is set when the stream itself broke (a read, inflation or the tar entry), as opposed to its
    consumer giving up on what it said; `drain` reads what is left so that `digest` covers all of it.
    """

    def __init__(self, read_at: ReadAt, footer: Footer, limits: Limits) -> None:
        self.footer, self.hash, self.size, self.failed = footer, hashlib.sha256(), 0, False
        compressed = footer.toc_end - footer.toc_offset
        if compressed > limits.toc_compressed:
            raise TOCError(f"compressed TOC of {compressed} bytes exceeds {limits.toc_compressed} "
                           "(limits.toc_compressed)")
        self._pieces = self._json(read_at, limits.toc_json)

    def __iter__(self) -> Iterator[bytes]:
        return self._pieces

    def _json(self, read_at: ReadAt, limit: int) -> Iterator[bytes]:
        try:
            gzip = self.footer.format == GZIP
            inflated = (_gunzip_pieces if gzip else _unzstd_pieces)(self._member(read_at), "TOC")
            start, size, bound = 0, limit, limit
            if gzip:
                head = bytearray()
                for piece in inflated:
                    head += piece
                    if len(head) >= _TAR_HEAD:
                        break
                start, size = _toc_tar_entry(bytes(head[:_TAR_HEAD]), limit)
                bound = start + size + 8192  # the tar entry's padding and the end-of-archive blocks
                inflated = itertools.chain((bytes(head),), inflated)
            pos = 0
            for piece in inflated:
                if pos + len(piece) > bound:
                    raise FormatError(f"TOC: inflates past its {size}-byte tar entry" if gzip else
                                      f"TOC: inflates past {limit} bytes (limits.toc_json)")
                if start <= pos and pos + len(piece) <= start + size:
                    data = piece  # the usual case: no copy
                else:
                    data = piece[max(0, start - pos):max(0, start + size - pos)]
                pos += len(piece)
                if data:
                    self.hash.update(data)
                    self.size += len(data)
                    yield data
            if gzip and self.size < size:
                raise TOCError("TOC member is not a tar entry (its data ends early)")
        except LazymountError:
            self.failed = True
            raise

    def _member(self, read_at: ReadAt) -> Iterator[bytes]:
        end = self.footer.toc_end
        for offset in range(self.footer.toc_offset, end, _MEMBER_PIECE):
            want = min(_MEMBER_PIECE, end - offset)
            data = read_at(offset, want)
            if len(data) != want:
                raise TruncatedError("TOC member ends early")
            yield data

    def drain(self) -> None:
        for _ in self._pieces:
            pass

    def check(self, expected_digest: str | None) -> None:
        """Raise DigestError unless the JSON read so far (all of it, after `drain`) hashes to the digest."""
        if expected_digest is not None and "sha256:" + self.hash.hexdigest() != check_digest(expected_digest):
            raise DigestError(f"TOC digest sha256:{self.hash.hexdigest()} does not match {expected_digest}")


ReadAt = Callable[[int, int], bytes]


def _open_toc(read_at: ReadAt, blob_size: int, limits: Limits) -> _TOCStream:
    tail_len = min(blob_size, FOOTER_SIZE)
    return _TOCStream(read_at, parse_footer(read_at(blob_size - tail_len, tail_len), blob_size), limits)


def read_toc_json(read_at: ReadAt, blob_size: int, expected_digest: str | None = None,
                  limits: Limits = DEFAULT_LIMITS) -> tuple[Footer, bytes]:
    """Read the footer and the whole TOC JSON of a blob through `read_at(offset, length)`; verify it."""
    stream = _open_toc(read_at, blob_size, limits)
    data = b"".join(stream)
    stream.check(expected_digest)
    return stream.footer, data


def read_index(read_at: ReadAt, blob_size: int, expected_digest: str | None = None,
               limits: Limits = DEFAULT_LIMITS) -> Index:
    """Read, verify and index the TOC of an eStargz or zstd:chunked blob.

    The JSON streams through the parser entry by entry, so memory grows with the entries, never with the
    bytes of the TOC.  If the TOC does not hash to `expected_digest`, that is the error, whatever the
    parser thought of it.
    """
    stream = _open_toc(read_at, blob_size, limits)
    try:
        index = Index.from_entries(_entries(_text_pieces(stream), limits), stream.footer.format,
                                   stream.footer.toc_offset, limits)
        stream.drain()
    except LazymountError:
        if not stream.failed:
            stream.drain()
            stream.check(expected_digest)
        raise
    stream.check(expected_digest)
    index.toc_digest, index.toc_size = "sha256:" + stream.hash.hexdigest(), stream.size
    return index


def index_from_json(data: bytes | str, footer: Footer, limits: Limits = DEFAULT_LIMITS) -> Index:
    """Index TOC JSON in hand, entry by entry (as read_index does, without its digest check)."""
    pieces = _text_pieces((data,)) if isinstance(data, bytes) else iter((data,))
    return Index.from_entries(_entries(pieces, limits), footer.format, footer.toc_offset, limits)


def _text_pieces(pieces: Iterable[bytes]) -> Iterator[str]:
    """Decode JSON bytes arriving in pieces (UTF-8, or the UTF-16/32 that JSON allows)."""
    pieces = iter(pieces)
    first = b""
    while len(first) < 4 and (piece := next(pieces, None)) is not None:
        first += piece
    decoder = codecs.getincrementaldecoder(json.detect_encoding(first[:4]))("surrogatepass")
    try:
        yield decoder.decode(first)
        for piece in pieces:
            yield decoder.decode(piece)
        yield decoder.decode(b"", final=True)
    except UnicodeDecodeError as e:
        raise TOCError(f"TOC is not valid JSON ({str(e)[:200]})") from None


_WHITESPACE = re.compile(r"[ \t\n\r]*")
_SCAN = json.JSONDecoder().scan_once  # (text, index) -> (value, end); what json.loads runs, in C


class _JSONScanner:
    """The values of one JSON document arriving as text in pieces, decoded one at a time: the document
    never sits in memory whole, and no single value may be longer than `max_value` characters."""

    def __init__(self, pieces: Iterator[str], max_value: int) -> None:
        self._pieces, self._max = pieces, max_value
        self._buf, self._pos, self._eof = "", 0, False

    def _more(self) -> bool:
        piece = next(self._pieces, None)
        if piece is None:
            self._eof = True
            return False
        self._buf = self._buf[self._pos:] + piece
        self._pos = 0
        return True

    def peek(self) -> str:
        """The next character that is not whitespace ('' at the end of the document)."""
        while True:
            self._pos = _WHITESPACE.match(self._buf, self._pos).end()
            if self._pos < len(self._buf):
                return self._buf[self._pos]
            if not self._more():
                return ""

    def take(self, char: str) -> None:
        if self.peek() != char:
            found = self._buf[self._pos:self._pos + 20] or "the end"
            raise TOCError(f"TOC is not valid JSON (expected {char!r} at {found!r})")
        self._pos += 1

    def value(self) -> object:
        """The next value, decoded by the json module (so it means what json.loads would make of it)."""
        pos = self._pos = _WHITESPACE.match(self._buf, self._pos).end()
        try:
            obj, end = _SCAN(self._buf, pos)
        except (StopIteration, ValueError, RecursionError):
            return self._slow_value()
        # a value that ends the buffer may go on in the next piece (a number, or just be cut short)
        if end == len(self._buf) and not self._eof or end - pos > self._max:
            return self._slow_value()
        self._pos = end
        return obj

    def _slow_value(self) -> object:
        while True:
            self.peek()
            try:
                obj, end = _SCAN(self._buf, self._pos)
            except (StopIteration, ValueError, RecursionError) as e:
                if self._eof or len(self._buf) - self._pos > self._max:
                    detail = "expecting a value" if isinstance(e, StopIteration) else str(e)[:200]
                    raise TOCError(f"TOC is not valid JSON ({detail})") from None
                self._more()
                continue
            if end - self._pos > self._max:
                raise TOCError(f"a TOC entry is over {self._max} bytes (limits.entry_json)")
            if end < len(self._buf) or not self._more():
                self._pos = end
                return obj

    def items(self) -> Iterator[object]:
        """The values of the array whose '[' comes next."""
        self.take("[")
        if self.peek() == "]":
            self._pos += 1
            return
        while True:
            yield self.value()
            if self._pos < len(self._buf) and self._buf[self._pos] == ",":  # the usual case: no whitespace
                self._pos += 1
                continue
            char = self.peek()
            self._pos += 1
            if char == "]":
                return
            if char != ",":
                found = self._buf[self._pos - 1:self._pos + 19]
                raise TOCError(f"TOC is not valid JSON (expected ',' or ']' at {found!r})")


def _entries(pieces: Iterator[str], limits: Limits) -> Iterator[object]:
    """The entries of TOC JSON text, one at a time; the document around them is checked as it goes."""
    scan = _JSONScanner(pieces, limits.entry_json)
    version: object = 1
    seen = False
    scan.take("{")
    while scan.peek() != "}":
        key = scan.value()
        scan.take(":")
        if key == "entries" and not seen and scan.peek() == "[":
            seen = True
            yield from scan.items()
        elif key == "entries" or not isinstance(key, str):
            raise TOCError("TOC is not an object with an 'entries' list of entries")
        elif key == "version":
            version = scan.value()
        else:
            scan.value()
        if scan.peek() != "}":
            scan.take(",")
    scan.take("}")
    if scan.peek():
        raise TOCError("TOC is not valid JSON (extra data after the object)")
    if not seen:
        raise TOCError("TOC is not an object with an 'entries' list of entries")
    if version not in (1, 2):
        raise TOCError(f"unsupported TOC version {version!r}")


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
