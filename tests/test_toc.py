"""Tests for toc.py and layerwriter.py: round trips through GNU tar layers, prefetch order, footers,
hostile input, fuzzing, and the index's memory size.

Ground truth for a converted layer is what Python's tarfile reads from the source tarball; hostile blobs
are built here by hand (a gzip member holding a `stargz.index.json` tar entry, then a footer).
"""

from __future__ import annotations

import contextlib
import gc
import gzip
import hashlib
import io
import json
import os
import random
import struct
import subprocess
import sys
import tarfile
import tracemalloc
import zlib
from pathlib import Path

import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import layerwriter
import toc
import tocread
from imagebuild import make_edge_tree, make_layer_tar
from toc import (
    GZIP,
    NO_PREFETCH_LANDMARK,
    PREFETCH_LANDMARK,
    TOC_TAR_NAME,
    ZSTD,
    DigestError,
    FooterError,
    FormatError,
    LazymountError,
    TOCError,
    TruncatedError,
    UnsafePathError,
)

MIB = 1 << 20
FUZZ = settings(max_examples=int(os.environ.get("TOC_FUZZ_EXAMPLES", "150")), deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
TAR_KINDS = {tarfile.DIRTYPE: "dir", tarfile.SYMTYPE: "symlink", tarfile.LNKTYPE: "hardlink",
             tarfile.CHRTYPE: "char", tarfile.BLKTYPE: "block", tarfile.FIFOTYPE: "fifo"}


# ---------------------------------------------------------------------------------------------- helpers


def reader(blob: bytes):
    """A `read_at(offset, length)` over bytes."""
    return lambda offset, length: blob[offset:offset + length]


def index_of(blob: bytes, expected_digest: str | None = None) -> toc.Index:
    return tocread.read_index(reader(blob), len(blob), expected_digest)


def read_file(index: toc.Index, blob: bytes, entry_id: int) -> bytes:
    """A regular file's content, every chunk decompressed and verified by toc.decompress_chunk."""
    out = b"".join(tocread.decompress_chunk(blob[c.comp_offset:c.comp_end], c, index.format)
                   for c in index.chunks(entry_id))
    assert len(out) == index.entry(entry_id).size
    return out


def tar_bytes(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def reg(name: str, data: bytes, **attrs) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, 1_700_000_000
    for key, value in attrs.items():
        setattr(info, key, value)
    return info, data


def special(name: str, kind: bytes, **attrs) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.mtime = kind, 0o755, 1_700_000_000
    for key, value in attrs.items():
        setattr(info, key, value)
    return info, None


SMALL_FILES = {"a/one": b"x", "a/hello": b"hello, world\n" * 40, "b/big": random.Random(7).randbytes(9000),
               "empty": b""}


def small_tar() -> bytes:
    return tar_bytes([special("a", tarfile.DIRTYPE), *(reg(n, d) for n, d in SMALL_FILES.items()),
                      special("a/link", tarfile.LNKTYPE, linkname="a/hello"),
                      special("a/sym", tarfile.SYMTYPE, linkname="../b/big")])


def convert(tar: bytes, **kwargs) -> tuple[bytes, layerwriter.LayerInfo]:
    out = io.BytesIO()
    info = layerwriter.write_layer(io.BytesIO(tar), out, workers=2, **kwargs)
    return out.getvalue(), info


@pytest.fixture(scope="module")
def small_blob() -> tuple[bytes, layerwriter.LayerInfo]:
    return convert(small_tar(), chunk_size=4096)


def toc_member(toc_json: bytes, name: str = TOC_TAR_NAME) -> bytes:
    """The gzip member an eStargz writer puts before the footer: a tar entry holding the TOC JSON."""
    info = tarfile.TarInfo(name)
    info.size = len(toc_json)
    raw = info.tobuf(tarfile.USTAR_FORMAT) + toc_json + b"\0" * (-len(toc_json) % 512) + b"\0" * 1024
    return gzip.compress(raw, mtime=0)


def hostile_blob(doc: object, payload: bytes = b"", fmt: str = GZIP) -> bytes:
    """`payload` (compressed members), then a TOC built from `doc` (JSON-encoded unless bytes), then a
    footer: the blob a hostile registry could serve."""
    data = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    if fmt == ZSTD:
        frame = zstandard.ZstdCompressor().compress(data)
        offset = len(payload) + 8
        footer = struct.pack("<QQQQ", offset, len(frame), len(data), 1) + toc.ZSTD_CHUNKED_MAGIC
        return (payload + layerwriter._skippable_frame(frame) + layerwriter._skippable_frame(footer))
    return payload + toc_member(data) + tocread.footer_bytes(len(payload))


def replace_toc(blob: bytes, doc: object) -> bytes:
    """`blob` with its TOC replaced by `doc` (the chunks stay where they are)."""
    footer = tocread.parse_footer(blob[-toc.FOOTER_SIZE:], len(blob))
    payload = blob[:footer.toc_offset - (8 if footer.format == ZSTD else 0)]
    return hostile_blob(doc, payload, footer.format)


def toc_doc(blob: bytes) -> dict:
    return json.loads(tocread.read_toc_json(reader(blob), len(blob))[1])


def legacy_footer(toc_offset: int) -> bytes:
    """The 47-byte footer of the original stargz: FEXTRA holding just '%016xSTARGZ', no subfield header."""
    payload = b"%016xSTARGZ" % toc_offset
    return (b"\x1f\x8b\x08\x04\x00\x00\x00\x00\x00\xff" + struct.pack("<H", len(payload)) + payload
            + b"\x01\x00\x00\xff\xff" + b"\0" * 8)


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def reg_entry(name: str, data: bytes, offset: int, **extra) -> dict:
    return {"name": name, "type": "reg", "size": len(data), "offset": offset, "digest": digest_of(data),
            "chunkDigest": digest_of(data), **extra}


# ---------------------------------------------------------------------------------------------- round trip


def describe_source(path: Path) -> dict[str, dict]:
    """What Python's tarfile reads from a layer tarball: normalized name -> metadata (mtime rounded, as
    eStargz writers round it), sha256 of regular files, and the hardlink target of hardlinks."""
    entries: dict[str, dict] = {}
    with tarfile.open(path, "r:*") as tar:
        for m in tar:
            name = toc.normalize_name(m.name)
            if not name:
                continue
            kind = TAR_KINDS.get(m.type, "reg")
            info = {"type": kind, "mode": m.mode & 0o7777, "uid": m.uid, "gid": m.gid,
                    "size": m.size if kind == "reg" else 0, "mtime": round(m.mtime),
                    "link": m.linkname if kind == "symlink" else "",
                    "target": toc.normalize_name(m.linkname) if kind == "hardlink" else name,
                    "dev": (m.devmajor, m.devminor) if kind in ("char", "block") else (0, 0),
                    "xattrs": {k.removeprefix("SCHILY.xattr."): v.encode("utf-8", "surrogateescape")
                               for k, v in m.pax_headers.items() if k.startswith("SCHILY.xattr.")}}
            if kind == "reg":
                info["sha256"] = hashlib.file_digest(tar.extractfile(m), "sha256").hexdigest()
            entries[name] = info
    for info in entries.values():  # a hardlink has its target's metadata and content
        if info["type"] == "hardlink":
            target = entries[info["target"]]
            info.update({k: v for k, v in target.items() if k != "target"})
    return entries


def check_blob_matches(blob: bytes, info: layerwriter.LayerInfo, source: dict[str, dict], fmt: str,
                       chunk_size: int) -> toc.Index:
    """Every assertion of a round trip: digests, TOC, index metadata and content against `source`."""
    assert info.digest == digest_of(blob) and info.size == len(blob)
    footer, toc_json = tocread.read_toc_json(reader(blob), len(blob), info.toc_digest)
    assert footer.format == fmt
    assert info.toc_digest == digest_of(toc_json)
    assert info.annotations["containerd.io/snapshot/stargz/toc.digest"] == info.toc_digest
    if fmt == ZSTD:
        plain = zstandard.ZstdDecompressor().stream_reader(blob, read_across_frames=True).read()
    else:
        with gzip.open(io.BytesIO(blob)) as members:  # gzip.decompress is quadratic in members
            plain = members.read()
    assert info.diff_id == digest_of(plain)
    with tarfile.open(fileobj=io.BytesIO(plain)) as tar:  # the blob's tar stream holds the same files
        for member in tar:
            name = toc.normalize_name(member.name)
            if member.isreg() and name in source:
                content = hashlib.file_digest(tar.extractfile(member), "sha256").hexdigest()
                assert content == source[name]["sha256"], name
            elif member.islnk():
                assert toc.normalize_name(member.linkname) == source[name]["target"], name
    assert info.uncompressed_size == len(plain)
    assert info.annotations["io.containers.estargz.uncompressed-size"] == str(len(plain))

    index = tocread.index_from_json(toc_json, footer)
    walked = dict(index.walk())
    assert set(walked) == set(source), "the index holds exactly the source's entries"
    groups: dict[str, int] = {}
    for src in source.values():
        groups[src["target"]] = groups.get(src["target"], 0) + 1
    subdirs: dict[str, int] = {}
    for name, src in source.items():
        if src["type"] == "dir" and "/" in name:
            parent = name.rpartition("/")[0]
            subdirs[parent] = subdirs.get(parent, 0) + 1
    for name, src in source.items():
        entry_id = index.lookup(name)
        assert entry_id == walked[name]
        entry = index.entry(entry_id)
        got = {"type": entry.type, "mode": entry.mode, "uid": entry.uid, "gid": entry.gid, "size": entry.size,
               "mtime": entry.mtime, "link": entry.link_name, "dev": (entry.dev_major, entry.dev_minor),
               "xattrs": entry.xattrs}
        want = {k: src[k] for k in got}
        assert got == want, name
        assert entry.name == name.rpartition("/")[2]
        if src["type"] == "dir":
            assert entry.nlink == 2 + subdirs.get(name, 0), name
            assert not index.is_implicit(entry_id)
        else:
            assert entry.nlink == groups[src["target"]], name
            link = index.hardlink_target(entry_id)
            assert link == (index.lookup(src["target"]) if src["target"] != name else None), name
        if src["type"] == "reg":
            chunks = index.chunks(entry_id)
            assert [c.file_offset for c in chunks] == list(range(0, src["size"], chunk_size)), name
            assert all(0 < c.size <= chunk_size for c in chunks)
            assert hashlib.sha256(read_file(index, blob, entry_id)).hexdigest() == src["sha256"], name
        else:
            assert index.chunks(entry_id) == []
    for landmark in (PREFETCH_LANDMARK, NO_PREFETCH_LANDMARK):
        assert index.lookup(landmark) is None
    return index


def blob_listing(blob: bytes, fmt: str) -> list[str]:
    """Names GNU tar lists in the blob (it must read it as a plain compressed tarball)."""
    option = "--zstd" if fmt == ZSTD else "--gzip"
    done = subprocess.run(["tar", "-t", "--quoting-style=literal", option, "-f", "-"], input=blob,
                          capture_output=True, check=False)
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    return [toc.normalize_name(n) for n in done.stdout.decode("utf-8", "surrogateescape").splitlines()]


@pytest.fixture(scope="module")
def layer_tars(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The edge tree (plus whiteouts and a 1-byte file) packed by GNU tar as pax/gnu, plain/gzip."""
    base = tmp_path_factory.mktemp("layers")
    tree = make_edge_tree(base / "tree")
    (tree / "one-byte").write_bytes(b"1")
    (tree / ".wh.deleted").write_bytes(b"")
    (tree / "modes" / "sticky-dir" / ".wh..wh..opq").write_bytes(b"")
    return {f"{fmt}{ext}": make_layer_tar(tree, base / f"layer-{fmt}{ext}", fmt=fmt, gzip=ext == ".tar.gz")
            for fmt in ("pax", "gnu") for ext in (".tar", ".tar.gz")}


ROUND_TRIPS = [  # (source, output format, chunk size, prioritized)
    ("pax.tar", GZIP, toc.DEFAULT_CHUNK_SIZE, None),
    ("pax.tar.gz", GZIP, 4096, None),
    ("gnu.tar", GZIP, MIB, ["data/big-9m", "names/ünïcödé/日本語.txt", "links/hard-b"]),
    ("gnu.tar.gz", ZSTD, toc.DEFAULT_CHUNK_SIZE, None),
    ("pax.tar", ZSTD, 65536, ["hello.txt"]),
]


@pytest.mark.parametrize(("source", "fmt", "chunk_size", "prioritized"), ROUND_TRIPS)
def test_round_trip_gnu_tar_layers(layer_tars, source, fmt, chunk_size, prioritized):
    path = layer_tars[source]
    described = describe_source(path)
    assert {"special/null", "special/blk", "special/fifo", ".wh.deleted", "sparse/holes-10m",
            "modes/sticky-dir/.wh..wh..opq", "names/" + "m" * 255} <= set(described)
    if source.startswith("pax"):
        assert described["xattrs/file"]["xattrs"]["user.binary"] == bytes([0, 1, 2, 0xFF, 0xFE])
    with open(path, "rb") as src:
        out = io.BytesIO()
        info = layerwriter.write_layer(src, out, chunk_size=chunk_size, prioritized=prioritized, fmt=fmt,
                                       workers=2)
    blob = out.getvalue()
    index = check_blob_matches(blob, info, described, fmt, chunk_size)
    assert index.no_prefetch == (prioritized is None)
    assert (index.prefetch_end is None) == (prioritized is None)
    assert info.entries == len(toc_doc(blob)["entries"])
    listed = blob_listing(blob, fmt)
    landmark = NO_PREFETCH_LANDMARK if prioritized is None else PREFETCH_LANDMARK
    extra = [landmark] if fmt == ZSTD else [landmark, TOC_TAR_NAME]
    assert sorted(listed) == sorted([*described, *extra])
    if fmt == GZIP:
        assert listed[-1] == TOC_TAR_NAME


def test_chunk_range_selects_covering_chunks(layer_tars):
    with open(layer_tars["pax.tar"], "rb") as src:
        out = io.BytesIO()
        layerwriter.write_layer(src, out, chunk_size=4096, workers=2)
    blob = out.getvalue()
    index = index_of(blob)
    entry_id = index.lookup("data/4m-plus-1")
    size = index.entry(entry_id).size
    chunks = index.chunks(entry_id)
    rng = random.Random(5)
    cases = [(0, 1), (0, size), (size - 1, 1), (4095, 2), (4096, 4096), (size, 1), (size + 9, 3), (5, 0)]
    cases += [(rng.randrange(size), rng.randrange(1, 3 * 4096)) for _ in range(200)]
    for offset, length in cases:
        got = index.chunk_range(entry_id, offset, length)
        want = [c for c in chunks if c.file_offset < offset + length and offset < c.file_offset + c.size]
        assert got == (want if length > 0 else []), (offset, length)
    assert index.chunk_range(entry_id, -1, 10) == chunks[:1], "no chunk of another file"


def test_reconverting_an_estargz_blob_replaces_its_toc_and_landmarks(small_blob):
    blob, _ = small_blob
    again, info = convert(blob, prioritized=["b/big"])
    index = check_digests_and_files(again, info)
    assert sorted(p for p, _ in index.walk()) == ["a", "a/hello", "a/link", "a/one", "a/sym", "b", "b/big",
                                                   "empty"]
    names = [e["name"] for e in toc_doc(again)["entries"] if e["type"] != "chunk"]
    assert names.count(TOC_TAR_NAME) == 0 and NO_PREFETCH_LANDMARK not in names
    assert names.count(PREFETCH_LANDMARK) == 1


def check_digests_and_files(blob: bytes, info: layerwriter.LayerInfo) -> toc.Index:
    index = index_of(blob, info.toc_digest)
    for name, data in SMALL_FILES.items():
        assert read_file(index, blob, index.lookup(name)) == data
    assert read_file(index, blob, index.lookup("a/link")) == SMALL_FILES["a/hello"]
    return index


def test_small_blob_metadata(small_blob):
    blob, info = small_blob
    index = check_digests_and_files(blob, info)
    hello, link = index.lookup("a/hello"), index.lookup("a/link")
    assert index.entry(hello).nlink == index.entry(link).nlink == 2
    assert index.entry(link).type == "reg"
    assert index.entry(index.lookup("a/sym")).link_name == "../b/big"
    assert [n for n, _ in index.children(index.ROOT)] == ["a", "b", "empty"]
    assert [n for n, _ in index.children(index.lookup("a"))] == ["hello", "link", "one", "sym"]
    assert index.lookup("a/one/x") is None and index.lookup("nope") is None and index.lookup("") == 0
    assert index.entry(index.ROOT).type == "dir" and index.is_implicit(index.ROOT)
    assert index.is_implicit(index.lookup("b")) and not index.is_implicit(index.lookup("a"))
    assert len(index.chunks(index.lookup("b/big"))) == 3


def test_writer_rejects_source_cut_inside_a_header():
    with pytest.raises(FormatError):
        convert(small_tar()[:3584 - 100])  # inside the header of b/big


def test_writer_rejects_corrupt_sources():
    good = small_tar()
    for cut in (1024 + 1, 3584 + 100, 3584 + 8999):  # inside the content of a/one, of b/big
        with pytest.raises(FormatError):
            convert(good[:cut])
    with pytest.raises(FormatError):
        convert(gzip.compress(good)[:-100])
    with pytest.raises(FormatError):
        convert(b"\x1f\x8b" + b"garbage" * 100)
    with pytest.raises(ValueError):
        convert(good, chunk_size=0)


# ---------------------------------------------------------------------------------------------- prefetch


def test_prioritized_files_come_first(layer_tars):
    prioritized = ["names/ünïcödé/日本語.txt", "links/hard-b", "hello.txt", "does/not/exist"]
    with open(layer_tars["pax.tar"], "rb") as src:
        out = io.BytesIO()
        info = layerwriter.write_layer(src, out, prioritized=prioritized, workers=2)
    blob = out.getvalue()
    entries = toc_doc(blob)["entries"]
    names = [toc.normalize_name(e["name"]) for e in entries if e["type"] != "chunk"]
    landmark_at = names.index(PREFETCH_LANDMARK)
    first = names[:landmark_at]
    # links/hard-b is a hardlink to hard-c (the name GNU tar met first): the target comes before it.
    assert first == ["names", "names/ünïcödé", "names/ünïcödé/日本語.txt", "links", "hard-c", "links/hard-b",
                     "hello.txt"]
    assert NO_PREFETCH_LANDMARK not in names and names.count(PREFETCH_LANDMARK) == 1
    assert sorted(names[landmark_at + 1:]) == sorted(set(describe_source(layer_tars["pax.tar"])) - set(first))
    assert len(names) == len(set(names)), "every entry once"
    assert info.prefetched == 3
    index = index_of(blob, info.toc_digest)
    landmark = entries[[e["name"] for e in entries].index(PREFETCH_LANDMARK)]
    assert index.prefetch_end == landmark["offset"] > 0
    assert not index.no_prefetch
    source = describe_source(layer_tars["pax.tar"])
    for path, entry_id in index.walk():
        for chunk in index.chunks(entry_id):  # a hardlink's chunks are its target's
            assert (chunk.comp_offset < index.prefetch_end) == (source[path]["target"] in first), path
    assert PREFETCH_LANDMARK not in dict(index.children(index.ROOT))
    assert all(not p.endswith(".landmark") for p, _ in index.walk())


def test_no_prioritized_list_starts_with_no_prefetch_landmark(small_blob):
    blob, info = small_blob
    entries = toc_doc(blob)["entries"]
    assert entries[0]["name"] == NO_PREFETCH_LANDMARK and entries[0]["size"] == 1
    index = index_of(blob)
    assert index.no_prefetch and index.prefetch_end is None and info.prefetched == 0
    assert NO_PREFETCH_LANDMARK not in dict(index.children(index.ROOT))


def test_prioritized_absolute_paths_are_accepted(small_blob):
    """Recorded workloads list paths as the container sees them ('/a/hello'); the reference cleans them."""
    _, info = convert(small_tar(), prioritized=["/a/hello", "./b/big"])
    assert info.prefetched == 2


# ---------------------------------------------------------------------------------------------- footers


def test_footer_layouts():
    footer = tocread.footer_bytes(0x1234)
    assert len(footer) == toc.FOOTER_SIZE == 51
    assert gzip.decompress(footer) == b"", "the footer is an empty gzip member"
    assert tocread.parse_footer(footer, 0x1234 + 100 + 51) == tocread.Footer(GZIP, 0x1234, 0x1234 + 100, 51)
    legacy = legacy_footer(0x1234)
    assert len(legacy) == toc.LEGACY_FOOTER_SIZE == 47
    assert gzip.decompress(legacy) == b""
    expected = tocread.Footer(GZIP, 0x1234, 0x1234 + 100, 47)
    assert tocread.parse_footer(b"junk" + legacy, 0x1234 + 100 + 47) == expected
    upper = footer.replace(b"0000000000001234", b"000000000000ABCD")
    assert tocread.parse_footer(upper, 1 << 20).toc_offset == 0xABCD


def test_legacy_footer_blob_reads(small_blob):
    blob, info = small_blob
    footer = tocread.parse_footer(blob[-51:], len(blob))
    legacy = blob[:-51] + legacy_footer(footer.toc_offset)
    index = tocread.read_index(reader(legacy), len(legacy), info.toc_digest)
    assert read_file(index, legacy, index.lookup("b/big")) == SMALL_FILES["b/big"]


@pytest.mark.parametrize("tail", [
    b"\0" * 51, b"x" * 51, b"\x1f\x8b" + b"\0" * 49, tocread.footer_bytes(5)[:-1] + b"\x01",
    tocread.footer_bytes(5).replace(b"STARGZ", b"STARGX"),
    tocread.footer_bytes(5).replace(b"0000000000000005", b"000000000000000g"),
    b"\0" * 4 + legacy_footer(5).replace(b"STARGZ", b"stargz"), b"\0" * 4 + legacy_footer(5)[:-2] + b"\1\1",
    b"\0" * 11 + struct.pack("<QQQQ", 0, 1, 1, 2) + toc.ZSTD_CHUNKED_MAGIC,
])
def test_garbage_footers(tail):
    with pytest.raises(FooterError):
        tocread.parse_footer(tail, 1000)


@pytest.mark.parametrize("size", [0, 29, 32, 40, 46])
def test_blob_too_small_for_a_footer_is_not_estargz(size):
    """A blob shorter than any footer (gzip of an empty tar: Docker's 32-byte empty layer) is no eStargz
    layer, not a truncated one: mount and convert treat it as a plain layer."""
    with pytest.raises(FooterError, match="too small for a footer"):
        tocread.parse_footer(tocread.footer_bytes(5)[-size:] if size else b"", size)


@pytest.mark.parametrize(("tail", "size"), [
    (tocread.footer_bytes(1000 - 51), 1000), (tocread.footer_bytes(5000), 1000),
    (tocread.footer_bytes(0), 51),
    (legacy_footer(1000 - 47), 1000), (tocread.footer_bytes(5)[-20:], 100),
    (b"\0" * 11 + struct.pack("<QQQQ", 900, 100, 1, 1) + toc.ZSTD_CHUNKED_MAGIC, 1000),
    (b"\0" * 11 + struct.pack("<QQQQ", 1 << 63, 1 << 63, 1, 1) + toc.ZSTD_CHUNKED_MAGIC, 1000),
    (b"\0" * 11 + struct.pack("<QQQQ", 10, 0, 1, 1) + toc.ZSTD_CHUNKED_MAGIC, 1000),
])
def test_footer_offsets_out_of_range(tail, size):
    with pytest.raises(TruncatedError):
        tocread.parse_footer(tail, size)


@FUZZ
@given(st.one_of(st.binary(min_size=51, max_size=51), st.binary(min_size=47, max_size=47),
                 st.tuples(st.sampled_from([tocread.footer_bytes(77), b"\0" * 4 + legacy_footer(77)]),
                           st.lists(st.tuples(st.integers(0, 50), st.integers(0, 255)), min_size=1,
                                    max_size=4)).map(lambda t: bytes(_mutate(t[0], t[1])))),
       st.integers(0, 1 << 40))
def test_fuzz_footer(tail, blob_size):
    try:
        footer = tocread.parse_footer(tail, blob_size)
    except LazymountError:
        return
    assert 0 <= footer.toc_offset < footer.toc_end <= blob_size - footer.footer_size


def _mutate(data: bytes, edits: list[tuple[int, int]]) -> bytearray:
    out = bytearray(data)
    for pos, value in edits:
        out[pos % len(out)] = value
    return out


# ---------------------------------------------------------------------------------------------- bad input


def test_truncated_blob_at_every_cut(small_blob):
    blob, info = small_blob
    for cut in range(len(blob)):
        with pytest.raises(LazymountError):
            index_of(blob[:cut])
    with pytest.raises(TruncatedError):  # the reader returns less than the blob size promises
        tocread.read_index(lambda o, n: blob[o:o + n][:n // 2] if o < len(blob) - 51 else blob[o:o + n],
                       len(blob))


def test_toc_digest_mismatch(small_blob):
    blob, info = small_blob
    with pytest.raises(DigestError):
        index_of(blob, "sha256:" + "0" * 64)
    with pytest.raises(FormatError):
        index_of(blob, "sha256:" + "A" * 64)
    with pytest.raises(FormatError):
        index_of(blob, "md5:abc")
    assert len(index_of(blob, info.toc_digest)) > 0


BAD_TOCS = [  # (TOC JSON document or raw bytes, expected exception)
    (b"{", TOCError), (b"\xff\xfe", TOCError), (b"[]", TOCError), (b"null", TOCError), (b"", TOCError),
    (b"[" * 100000 + b"]" * 100000, TOCError), (b'{"version": 1, "entries": [' + b"[" * 5000, TOCError),
    ({"version": 1}, TOCError), ({"version": 1, "entries": {}}, TOCError),
    ({"version": 1, "entries": [1, 2]}, TOCError), ({"version": 3, "entries": []}, TOCError),
    ({"entries": [{"name": "x", "type": "socket"}]}, TOCError),
    ({"entries": [{"name": "x", "type": None}]}, TOCError),
    ({"entries": [{"name": "x", "type": ["reg"]}]}, TOCError),
    ({"entries": [{"name": "x", "type": "reg", "size": -1}]}, TOCError),
    ({"entries": [{"name": "x", "type": "reg", "size": "10"}]}, TOCError),
    ({"entries": [{"name": "x", "type": "reg", "size": 1.5}]}, TOCError),
    ({"entries": [{"name": "x", "type": "reg", "size": True}]}, TOCError),
    ({"entries": [{"name": "x", "type": "reg", "size": 1 << 64}]}, TOCError),
    ({"entries": [{"name": "x", "type": "dir", "uid": 1 << 32}]}, TOCError),
    ({"entries": [{"name": "x", "type": "dir", "mode": -1}]}, TOCError),
    ({"entries": [{"name": "x", "type": "dir", "modtime": "yesterday"}]}, TOCError),
    ({"entries": [{"name": "x", "type": "dir", "modtime": 12}]}, TOCError),
    ({"entries": [{"name": "x", "type": "reg", "size": 5}]}, TOCError),  # content but no digest
    ({"entries": [{"name": "x", "type": "reg", "size": 5, "chunkDigest": "sha256:00"}]}, FormatError),
    ({"entries": [{"name": "x", "type": "chunk", "chunkOffset": 5}]}, TOCError),
    ({"entries": [{"name": "d", "type": "dir"}, {"name": "d", "type": "chunk", "chunkOffset": 5}]}, TOCError),
    ({"entries": [{"name": "x", "type": "reg"}, {"name": "x", "type": "chunk", "chunkOffset": 1}]}, TOCError),
    ({"entries": [{"name": "x", "type": "hardlink", "linkName": "missing"}]}, TOCError),
    ({"entries": [{"name": "x", "type": "hardlink", "linkName": "y"}, {"name": "y", "type": "reg"}]},
     TOCError),
    ({"entries": [{"name": "x", "type": "hardlink", "linkName": "x"}]}, TOCError),
    ({"entries": [{"name": "d", "type": "dir"}, {"name": "x", "type": "hardlink", "linkName": "d"}]},
     TOCError),
    ({"entries": [{"name": "x", "type": "hardlink", "linkName": ""}]}, TOCError),
    ({"entries": [{"name": "x", "type": "hardlink", "linkName": 5}]}, TOCError),
    ({"entries": [{"name": "x", "type": "symlink", "linkName": ["a"]}]}, TOCError),
    ({"entries": [{"name": "x", "type": "reg", "xattrs": {"user.a": "!!notbase64"}}]}, TOCError),
    ({"entries": [{"name": "x", "type": "reg", "xattrs": {"user.a": 5}}]}, TOCError),
    ({"entries": [{"name": "x", "type": "reg", "xattrs": ["user.a"]}]}, TOCError),
    ({"entries": [{"name": "", "type": "reg"}]}, TOCError),  # the root is a directory
    ({"entries": [{"name": "f", "type": "reg"}, {"name": "f/x", "type": "reg"}]}, TOCError),
    ({"entries": [{"name": 5, "type": "reg"}]}, TOCError),
    ({"entries": [{"name": "x", "type": "reg", "size": 1, "offset": 10 ** 9, "digest": digest_of(b"x")}]},
     TruncatedError),
]


@pytest.mark.parametrize(("doc", "error"), BAD_TOCS)
def test_bad_toc(doc, error):
    for fmt in (GZIP, ZSTD):
        payload = zstandard.ZstdCompressor().compress(b"x" * 5) if fmt == ZSTD else gzip.compress(b"x" * 5)
        with pytest.raises(error):
            index_of(hostile_blob(doc, payload, fmt=fmt))


@pytest.mark.parametrize("name", ["../x", "a/../../x", "a/..", "/etc/passwd", "a\0b", "a//b", "a/./b", "..",
                                  "./../x"])
@pytest.mark.parametrize("field", ["name", "linkName"])
def test_unsafe_names(name, field):
    entries = [{"name": "ok", "type": "reg"}]
    if field == "name":
        entries.append({"name": name, "type": "reg"})
    else:
        entries.append({"name": "link", "type": "hardlink", "linkName": name})
    with pytest.raises(UnsafePathError):
        index_of(hostile_blob({"version": 1, "entries": entries}))
    with pytest.raises(UnsafePathError):
        toc.normalize_name(name)


def test_normalize_name():
    assert toc.normalize_name("./a/b/") == "a/b"
    assert toc.normalize_name("./") == toc.normalize_name(".") == toc.normalize_name("") == ""
    assert toc.normalize_name("a/.wh..wh..opq") == "a/.wh..wh..opq"
    assert toc.normalize_name("...") == "..."
    with pytest.raises(TOCError):
        toc.normalize_name(None)


def test_toc_member_problems(small_blob):
    blob, _ = small_blob
    doc = toc_doc(blob)
    data = json.dumps(doc).encode()
    footer = tocread.parse_footer(blob[-51:], len(blob))
    payload = blob[:footer.toc_offset]
    cases = [
        (payload + toc_member(data, name="other.json") + tocread.footer_bytes(len(payload)), TOCError),
        (payload + gzip.compress(b"not a tar" * 100) + tocread.footer_bytes(len(payload)), TOCError),
        (payload + b"not gzip at all" + tocread.footer_bytes(len(payload)), FormatError),
        (payload + toc_member(data)[:-30] + tocread.footer_bytes(len(payload)), TruncatedError),
        (payload + zlib.compress(data) + tocread.footer_bytes(len(payload)), FormatError),
    ]
    dir_info = tarfile.TarInfo(TOC_TAR_NAME)
    dir_info.type = tarfile.DIRTYPE
    dir_blob = payload + gzip.compress(dir_info.tobuf() + b"\0" * 1024) + tocread.footer_bytes(len(payload))
    cases.append((dir_blob, TOCError))
    short = toc_member(data)
    raw = bytearray(gzip.decompress(short))
    raw[512 + len(data) - 10:] = b""  # the tar entry promises more JSON than there is
    cases.append((payload + gzip.compress(bytes(raw)) + tocread.footer_bytes(len(payload)), TOCError))
    for bad, error in cases:
        with pytest.raises(error):
            index_of(bad)
    with pytest.raises(FormatError, match="larger than 100|inflates past"):
        tocread.read_toc_json(reader(blob), len(blob), limits=toc.Limits(toc_json=100))
    assert replace_toc(blob, doc) == payload + toc_member(data) + tocread.footer_bytes(footer.toc_offset)
    index_of(replace_toc(blob, doc))


def test_zstd_toc_bounded(small_blob):
    data = json.dumps({"version": 1, "entries": []}).encode() + b" " * 5000
    blob = hostile_blob(data, fmt=ZSTD)
    with pytest.raises(FormatError, match="inflates past"):
        tocread.read_toc_json(reader(blob), len(blob), limits=toc.Limits(toc_json=1000))
    assert tocread.read_toc_json(reader(blob), len(blob))[1] == data


def test_flipped_chunk_bytes_never_yield_wrong_data(small_blob):
    for fmt in (GZIP, ZSTD):
        blob, _ = convert(small_tar(), chunk_size=4096, fmt=fmt)
        index = index_of(blob)
        for name in ("a/hello", "b/big"):
            entry_id = index.lookup(name)
            for chunk in index.chunks(entry_id):
                data = blob[chunk.comp_offset:chunk.comp_end]
                want = SMALL_FILES[name][chunk.file_offset:chunk.file_offset + chunk.size]
                assert tocread.decompress_chunk(data, chunk, fmt) == want
                for pos in range(len(data)):
                    for flip in (0x01, 0x80):
                        bad = bytearray(data)
                        bad[pos] ^= flip
                        try:
                            got = tocread.decompress_chunk(bytes(bad), chunk, fmt)
                        except (DigestError, FormatError):
                            continue
                        assert got == want, (fmt, name, pos)
                for cut in range(0, len(data), 7):  # the member may go on past the chunk's bytes
                    with contextlib.suppress(FormatError):
                        assert tocread.decompress_chunk(data[:cut], chunk, fmt) == want
                with pytest.raises(FormatError):
                    tocread.decompress_chunk(data[:len(data) // 4], chunk, fmt)


@pytest.mark.parametrize("fmt", [GZIP, ZSTD])
def test_decompression_is_bounded(fmt):
    bomb = b"\0" * (64 * MIB)
    data = zstandard.ZstdCompressor().compress(bomb) if fmt == ZSTD else gzip.compress(bomb, 9)
    chunk = toc.Chunk(0, 10, 0, len(data), 0, digest_of(b"\0" * 10))
    tracemalloc.start()
    try:
        assert tocread.decompress_chunk(data, chunk, fmt) == b"\0" * 10
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * MIB, f"inflating a 10-byte chunk used {peak} bytes"
    with pytest.raises(DigestError):
        tocread.decompress_chunk(data, toc.Chunk(0, 10, 0, len(data), 0, digest_of(b"\1" * 10)), fmt)


@pytest.mark.parametrize("fmt", [GZIP, ZSTD])
@pytest.mark.parametrize(("size", "inner"), [(1 << 40, 0), (5, 1 << 62), ((1 << 63) - 1, (1 << 63) - 1)])
def test_hostile_chunk_sizes(fmt, size, inner):
    """A TOC may promise any size: reading fails with FormatError, without allocating what it promises."""
    data = zstandard.ZstdCompressor().compress(b"hello") if fmt == ZSTD else gzip.compress(b"hello")
    doc = {"version": 1, "entries": [{"name": "x", "type": "reg", "size": size, "offset": 0,
                                      "innerOffset": inner, "chunkDigest": digest_of(b"hello")}]}
    blob = hostile_blob(doc, data, fmt)
    index = index_of(blob)
    with pytest.raises(FormatError):
        read_file(index, blob, index.lookup("x"))


def test_zstd_toc_read_allocates_what_it_reads():
    blob = hostile_blob({"version": 1, "entries": []}, fmt=ZSTD)
    tracemalloc.start()
    try:
        tocread.read_toc_json(reader(blob), len(blob))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * MIB, f"reading a 30-byte TOC allocated {peak} bytes"


def test_deep_tree():
    depth = 1500  # PATH_MAX allows ~2000 levels; a walk must not recurse per level
    entries = [{"name": "/".join(["d"] * k), "type": "dir"} for k in range(1, depth + 1)]
    index = index_of(hostile_blob({"version": 1, "entries": entries}))
    paths = [p for p, _ in index.walk()]
    assert len(paths) == depth and paths[-1] == "/".join(["d"] * depth)
    assert index.lookup(paths[-1]) == len(index) - 1


def test_toc_member_size_is_checked_before_reading():
    """A footer that points the TOC at the start of a huge blob must not make us read the blob whole."""
    size = 1 << 40
    tail = tocread.footer_bytes(0)
    asked = []

    def read_at(offset: int, length: int) -> bytes:
        asked.append(length)
        if offset == size - len(tail):
            return tail
        raise AssertionError(f"asked for {length} bytes at {offset}")

    with pytest.raises(FormatError):
        tocread.read_toc_json(read_at, size, limits=toc.Limits(toc_compressed=1 << 20))
    assert max(asked) <= 51


# ---------------------------------------------------------------------------------------------- odd but valid


def test_implicit_directories_and_duplicates():
    doc = {"version": 1, "entries": [
        {"name": "a/b/c", "type": "symlink", "linkName": "/x"},
        {"name": "./a/", "type": "dir", "mode": 0o40700, "uid": 3},
        {"name": "f", "type": "reg"},
        {"name": "f", "type": "dir", "mode": 0o711},  # a later duplicate replaces the earlier entry
        {"name": "dev", "type": "char", "devMajor": 1, "devMinor": 3, "unknownField": {"x": [1]}},
        {"name": "", "type": "dir", "mode": 0o700},
    ]}
    index = index_of(hostile_blob(doc))
    assert [p for p, _ in index.walk()] == ["a", "a/b", "a/b/c", "dev", "f"]
    a, ab = index.lookup("a"), index.lookup("a/b")
    assert not index.is_implicit(a) and index.is_implicit(ab)
    assert index.entry(a).mode == 0o700 and index.entry(a).uid == 3 and index.entry(ab).mode == 0o755
    assert index.entry(index.lookup("f")).type == "dir" and index.entry(index.lookup("f")).mode == 0o711
    assert index.entry(index.lookup("dev")).dev_major == 1
    assert index.entry(index.ROOT).mode == 0o700 and not index.is_implicit(index.ROOT)
    assert index.entry(index.ROOT).nlink == 4 and index.entry(a).nlink == 3


def test_chained_hardlinks_share_one_link_count():
    """A hardlink to a hardlink (other tar writers than GNU tar make them) is one inode of three names."""
    doc = {"version": 1, "entries": [
        {"name": "a", "type": "reg", "mode": 0o600},
        {"name": "b", "type": "hardlink", "linkName": "a"},
        {"name": "c", "type": "hardlink", "linkName": "b"},
    ]}
    index = index_of(hostile_blob(doc))
    assert [index.entry(index.lookup(n)).nlink for n in "abc"] == [3, 3, 3]
    assert index.entry(index.lookup("c")).mode == 0o600
    a = index.lookup("a")
    assert index.hardlink_target(a) is None
    assert index.hardlink_target(index.lookup("b")) == index.hardlink_target(index.lookup("c")) == a


def test_chunks_of_a_hand_made_blob():
    """Chunk boundaries come from the next member's offset, even with out-of-order offsets."""
    one, two = b"first file " * 50, b"second" * 70
    m1, m2 = gzip.compress(one), gzip.compress(two)
    # `two` is stored before `one` in the blob but listed after it in the TOC.
    doc = {"version": 1, "entries": [reg_entry("one", one, len(m2)), reg_entry("two", two, 0)]}
    blob = hostile_blob(doc, m2 + m1)
    index = index_of(blob)
    assert read_file(index, blob, index.lookup("one")) == one
    assert read_file(index, blob, index.lookup("two")) == two
    assert index.chunks(index.lookup("two"))[0].comp_end == len(m2)
    # The same TOC but the digests swapped: verification fails instead of serving the wrong file.
    doc["entries"][0]["chunkDigest"], doc["entries"][1]["chunkDigest"] = digest_of(two), digest_of(one)
    bad = hostile_blob(doc, m2 + m1)
    index = index_of(bad)
    with pytest.raises(FormatError):
        read_file(index, bad, index.lookup("one"))


# ---------------------------------------------------------------------------------------------- fuzzing


NAMES = st.text(alphabet="ab/.\0é", min_size=0, max_size=8)
VALUES = st.one_of(st.none(), st.booleans(), st.integers(-3, 1 << 65),
                   st.sampled_from([0, 1, 5, 100, 4096, 1 << 40, (1 << 63) - 1]),
                   st.floats(allow_nan=False), NAMES, st.lists(st.integers(), max_size=2),
                   st.dictionaries(NAMES, st.text(max_size=5), max_size=2),
                   st.sampled_from(["sha256:" + "ab" * 32, "2024-01-02T03:04:05Z", "0001-01-01T00:00:00Z",
                                    "9999-12-31T23:59:59-14:00", "2020-01-01", "QUJD", "a", "b", "a/b", ""]))
FIELDS = ["name", "type", "size", "modtime", "linkName", "mode", "uid", "gid", "offset", "innerOffset",
          "chunkOffset", "chunkSize", "chunkDigest", "digest", "devMajor", "devMinor", "xattrs", "extra"]
ENTRY = st.fixed_dictionaries(
    {"name": st.one_of(NAMES, st.sampled_from(["a", "a/b", "b", PREFETCH_LANDMARK, NO_PREFETCH_LANDMARK])),
     "type": st.sampled_from([*toc._TYPES, "chunk", "chunk", "reg", "bogus"])},
    optional={f: VALUES for f in FIELDS[2:]})


def exercise(index: toc.Index, blob: bytes | None = None) -> None:
    """Call every query of an index; only LazymountError may come out of reading content."""
    for path, entry_id in index.walk():
        assert index.lookup(path) == entry_id
        entry = index.entry(entry_id)
        assert 0 <= entry.mode <= 0o7777 and entry.nlink >= 1
        list(index.children(entry_id))
        chunks = index.chunks(entry_id)
        assert index.chunk_range(entry_id, 0, max(entry.size, 1)) == (chunks if entry.size else [])
        for chunk in chunks:
            assert chunk.size >= 0 and chunk.comp_offset <= chunk.comp_end
            if blob is not None:
                with contextlib.suppress(LazymountError):
                    tocread.decompress_chunk(blob[chunk.comp_offset:chunk.comp_end], chunk, index.format)
    index.stats()


@FUZZ
@given(st.lists(ENTRY, max_size=12), st.sampled_from([GZIP, ZSTD]), st.binary(max_size=64))
def test_fuzz_toc_entries(entries, fmt, payload):
    blob = hostile_blob({"version": 1, "entries": entries}, payload, fmt)
    try:
        index = index_of(blob)
    except LazymountError:
        return
    exercise(index, blob)


@FUZZ
@given(st.recursive(st.one_of(st.none(), st.integers(), st.text(max_size=5), st.floats()),
                    lambda inner: st.one_of(st.lists(inner, max_size=4),
                                            st.dictionaries(st.sampled_from(FIELDS + ["entries", "version"]),
                                                            inner, max_size=4)),
                    max_leaves=30))
def test_fuzz_toc_any_json(doc):
    try:
        index = index_of(hostile_blob(doc))
    except LazymountError:
        return
    exercise(index)


@FUZZ
@given(st.data())
def test_fuzz_toc_member_bytes(small_blob, data):
    """Mutate the TOC's JSON text, its tar header (checksum fixed up) or its compressed bytes."""
    blob, _ = small_blob
    footer = tocread.parse_footer(blob[-51:], len(blob))
    payload = blob[:footer.toc_offset]
    raw = bytearray(gzip.decompress(blob[footer.toc_offset:]))
    where = data.draw(st.sampled_from(["json", "header", "compressed"]))
    edits = data.draw(st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 255)), min_size=1,
                               max_size=6))
    if where == "json":
        size = tarfile.TarInfo.frombuf(bytes(raw[:512]), "utf-8", "strict").size
        raw[512:512 + size] = _mutate(raw[512:512 + size], edits)
        member = gzip.compress(bytes(raw))
    elif where == "header":
        header = _mutate(raw[:512], edits)
        header[148:156] = b" " * 8
        header[148:156] = b"%06o\0 " % sum(header)
        raw[:512] = header
        member = gzip.compress(bytes(raw))
    else:
        member = bytes(_mutate(blob[footer.toc_offset:-51], edits))
    mutated = payload + member + tocread.footer_bytes(len(payload))
    try:
        index = index_of(mutated)
    except LazymountError:
        return
    exercise(index, mutated)


@FUZZ
@given(st.sampled_from([GZIP, ZSTD]),
       st.lists(st.tuples(st.integers(0, 1 << 30), st.integers(1, 255)), min_size=1, max_size=3))
def test_fuzz_whole_blob(blob_by_fmt, fmt, edits):
    """Flip bytes anywhere in a small blob: each file reads back exactly or raises LazymountError."""
    blob, info = blob_by_fmt[fmt]
    bad = bytearray(blob)
    for pos, xor in edits:
        bad[pos % len(bad)] ^= xor
    bad = bytes(bad)
    try:
        index = index_of(bad, info.toc_digest)
    except LazymountError:
        return
    for name, want in [*SMALL_FILES.items(), ("a/link", SMALL_FILES["a/hello"])]:
        entry_id = index.lookup(name)
        assert entry_id is not None, "a verified TOC lists every file"
        try:
            got = read_file(index, bad, entry_id)
        except LazymountError:
            continue
        assert got == want, name


@pytest.fixture(scope="module")
def blob_by_fmt() -> dict[str, tuple[bytes, layerwriter.LayerInfo]]:
    return {fmt: convert(small_tar(), chunk_size=4096, fmt=fmt) for fmt in (GZIP, ZSTD)}


# ---------------------------------------------------------------------------------------------- memory


def test_index_memory_per_entry():
    """100k entries (1k directories, 99k one-chunk files): the index's own columns stay compact."""
    entries, offset = [], 0
    mtime = "2024-01-02T03:04:05Z"
    for d in range(1000):
        entries.append({"name": f"dir{d:04d}/", "type": "dir", "mode": 0o755, "modtime": mtime})
        for f in range(99):
            digest = f"sha256:{offset:064x}"
            entries.append({"name": f"dir{d:04d}/file-{f:02d}.py", "type": "reg", "size": 1000 + f,
                            "mode": 0o644, "modtime": mtime, "uid": 1000, "gid": 1000, "offset": offset,
                            "digest": digest, "chunkDigest": digest})
            offset += 600
    data = json.dumps({"version": 1, "entries": entries}).encode()
    del entries
    footer = tocread.Footer(GZIP, offset, offset + 1000, 51)
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        index = tocread.index_from_json(data, footer)
        gc.collect()
        retained = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(index) == 100_001 and index.chunk_count == 99_000
    names = sum(sys.getsizeof(n) for n in index.names)
    # Columns: ~43 bytes of entry fields + 8 for the name pointer; 48 per chunk; arrays over-allocate.
    bound = 64 * len(index) + 56 * index.chunk_count
    assert retained - names < bound, f"{(retained - names) / len(index):.0f} bytes per entry besides names"
    assert index.entry(index.lookup("dir0999/file-98.py")).size == 1098


def test_landmark_is_ignored_in_lookup_but_bounds_chunks():
    landmark, one = toc.LANDMARK_CONTENT, b"payload" * 20
    m0, m1 = gzip.compress(landmark), gzip.compress(one)
    doc = {"version": 1, "entries": [reg_entry("x", one, 0), reg_entry(PREFETCH_LANDMARK, landmark, len(m1))]}
    blob = hostile_blob(doc, m1 + m0)
    index = index_of(blob)
    assert index.prefetch_end == len(m1)
    assert index.chunks(index.lookup("x"))[0].comp_end == len(m1)
    assert [p for p, _ in index.walk()] == ["x"]


@pytest.mark.parametrize("blob_order_differs", [False, True])
def test_chunks_between_are_the_blob_chunks_in_a_range(blob_order_differs: bool) -> None:
    """Index.chunks_between (the background fetch stores a fetched range's chunks by it) gives exactly the
    chunks that blob_chunks gives lying within the range, also where chunk ids are not in blob order."""
    rng = random.Random(7)
    tar = io.BytesIO()
    with tarfile.open(fileobj=tar, mode="w") as tf:
        for i in range(120):
            data = rng.randbytes(rng.randint(0, 200_000))
            info = tarfile.TarInfo(f"d{i % 7}/f{i}")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    out = io.BytesIO()
    written = layerwriter.write_layer(io.BytesIO(tar.getvalue()), out, chunk_size=64 << 10, workers=1)
    blob = out.getvalue()
    index = tocread.read_index(lambda offset, n: blob[offset:offset + n], len(blob), written.toc_digest)
    if blob_order_differs:  # the path taken for a TOC whose chunk ids are out of blob order
        index._sorted_offsets = index._chunk_comp
    every = list(index.blob_chunks())
    assert len(every) > 100
    for _ in range(100):
        start = rng.randint(0, len(blob))
        stop = rng.randint(start, len(blob))
        assert list(index.chunks_between(start, stop)) == \
            [c for c in every if start <= c.comp_offset and c.comp_end <= stop]
