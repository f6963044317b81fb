"""Seek indexes of unconverted gzip layers (seekindex.py): resuming deflate at any bit, building and
reading back every file, the loader's checks, and, against a real docker-registry, `lazymount index`
then `mount` reading plain gzip layers lazily (gzip -1, gzip -9, pigz members; whiteouts, opaque dirs)
with the tree equal to `umoci unpack`, one span per small read, and EIO, never wrong bytes, for a blob
that differs from its index or its manifest.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import gzip
import hashlib
import io
import json
import os
import random
import shutil
import struct
import subprocess
import tarfile
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import download
import fetch
import profiles
import referrers
import regclient
import seekindex
import toc
from imagebuild import describe_tree, make_layer_tar, write_oci_layout
from tests.reference import read_layout
from tests.registry import Fault, FaultProxy, Registry, TestImage, make_test_image, push_layout
from tests.test_mount import (  # noqa: F401 -- edge_image and edge_expected are fixtures used below
    MISSING,
    _assert_same_tree,
    edge_expected,
    edge_image,
    lazymount,
    mounted,
    stats,
    umoci_unpack,
)

MIB = 1 << 20


# ------------------------------------------------------------------------------------------ helpers


def _compress(tar: Path, out: Path, how: str) -> Path:
    """gzip `tar` into `out`: `gzip-1`, `gzip-9`, or `pigz-members` (pigz per 64 KiB piece, concatenated:
    a gzip stream of many members)."""
    raw = tar.read_bytes()
    if how == "pigz-members":
        members = [subprocess.run(["pigz", "-c", "-n", "-6"], input=raw[i:i + (64 << 10)], check=True,
                                  capture_output=True).stdout for i in range(0, len(raw), 64 << 10)]
        out.write_bytes(b"".join(members))
    else:
        out.write_bytes(subprocess.run(["gzip", "-c", "-n", f"-{how[-1]}"], input=raw, check=True,
                                       capture_output=True).stdout)
    return out


def _plain_tar(layer: Path, out: Path) -> Path:
    with open(layer, "rb") as f:
        gzipped = f.read(2) == b"\x1f\x8b"
    out.write_bytes(subprocess.run(["gzip", "-dc", str(layer)], check=True, capture_output=True).stdout
                    if gzipped else layer.read_bytes())
    return out


def _sample_tree(root: Path, seed: int, big: int = 9 * MIB) -> Path:
    """Small text-like files, a big random file in the middle, a sparse file, a symlink, a hardlink."""
    rng = random.Random(seed)
    (root / "a").mkdir(parents=True)
    (root / "z").mkdir()
    for i in range(120):
        text = bytes(rng.choice(b"abcdefgh \n") for _ in range(rng.randint(0, 30000)))
        (root / "a" / f"f{i:03}").write_bytes(text)
    (root / "m-big").write_bytes(rng.randbytes(big))
    for i in range(40):
        (root / "z" / f"small{i:02}").write_bytes(f"small file {i} {seed}\n".encode() * (i + 1))
    with open(root / "sparse", "wb") as f:
        f.truncate(12 * MIB)
        f.seek(5 * MIB)
        f.write(b"data in the middle of holes\n")
    (root / "link").symlink_to("a/f001")
    os.link(root / "a" / "f002", root / "hard")
    return root


def _index_of(data: bytes) -> seekindex.SeekIndex:
    return seekindex.build(lambda o, n: data[o:o + n], len(data), toc.sha256_digest(data), local=True).index


def _file_spans(index: seekindex.SeekIndex, path: str) -> set[int]:
    entry = index.index.lookup(path)
    assert entry is not None, path
    spans: set[int] = set()
    for c in index.index.chunks(entry):
        if c.comp_offset != seekindex.HOLE:
            first, last = index.spans_for(c.comp_offset, c.size)
            spans.update(range(first, last + 1))
    return spans


# ------------------------------------------------------------------------------------------ unit tests


@pytest.mark.parametrize("consumed", range(8))
def test_resume_at_any_bit(consumed: int) -> None:
    """A deflate stream that starts `consumed` bits into a byte, with back-references into a window,
    decompresses from there: the prefix of empty blocks makes up for zlib's lack of inflatePrime."""
    rng = random.Random(consumed)
    window = rng.randbytes(seekindex.WINDOW_SIZE)
    data = window[1000:9000] + rng.randbytes(3000) + window[20000:30000]
    compressor = zlib.compressobj(6, zlib.DEFLATED, -15, zdict=window)
    stream = compressor.compress(data) + compressor.flush() + b"\0" * 8  # the member's (dummy) trailer
    shifted = (int.from_bytes(stream, "little") << consumed) | rng.getrandbits(consumed)
    blob = shifted.to_bytes(len(stream) + 1, "little")
    assert b"".join(seekindex.inflate_from(blob, consumed, window)) == data


@pytest.mark.parametrize("how", ["gzip-1", "gzip-9", "pigz-members"])
def test_every_file_reads_back(how: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every regular file (sparse holes, a file larger than a chunk) read through the index, chunk by
    chunk from its spans, equals tarfile's view; every span is a checkpoint of rapidgzip's."""
    monkeypatch.setattr(seekindex, "SPAN_BYTES", 1)
    tar = make_layer_tar(_sample_tree(tmp_path / "tree", seed=len(how)), tmp_path / "layer.tar")
    blob = _compress(tar, tmp_path / "layer.tar.gz", how).read_bytes()
    index = _index_of(blob)
    assert index.span_count >= 3
    reader = seekindex.SpanReader(index, lambda o, n: blob[o:o + n])
    checked = 0
    with tarfile.open(tar) as source:
        for member in source:
            entry = index.index.lookup(member.name)
            assert entry is not None, member.name
            if member.isreg():
                chunks = index.index.chunks(entry)
                got = b"".join(reader.chunk(c)[0] for c in chunks)
                assert got == source.extractfile(member).read(), member.name
                assert all(toc.sha256_digest(reader.chunk(c)[0]) == c.digest for c in chunks)
                checked += 1
    assert checked == 120 + 40 + 2


def test_loader_rejects_truncated_foreign_and_corrupt(tmp_path: Path) -> None:
    """A truncated index, one for another layer (digest or size), trailing bytes, a flipped byte in the
    TOC: one-line SeekIndexError each, never an index."""
    tar = make_layer_tar(_sample_tree(tmp_path / "tree", seed=3, big=MIB), tmp_path / "layer.tar")
    blob = _compress(tar, tmp_path / "layer.tar.gz", "gzip-1").read_bytes()
    digest = toc.sha256_digest(blob)
    data = seekindex.build(lambda o, n: blob[o:o + n], len(blob), digest, local=True).data
    assert seekindex.load(data, digest, len(blob)).span_count >= 1
    other = "sha256:" + "ab" * 32
    cases = [data[:n] for n in (0, 5, 12, 40, len(data) // 2, len(data) - 1)]
    cases += [data + b"\0", data[:-10] + bytes(b ^ 0xFF for b in data[-10:])]
    for bad in cases:
        with pytest.raises(toc.FormatError) as e:
            seekindex.load(bad, digest, len(blob))
        assert "\n" not in str(e.value)
    for wrong_digest, wrong_size in ((other, len(blob)), (digest, len(blob) + 1)):
        with pytest.raises(seekindex.SeekIndexError, match="seek index is for layer sha256:"):
            seekindex.load(data, wrong_digest, wrong_size)


def _with_header(data: bytes, **changes: object) -> bytes:
    """The serialized index `data` with fields of its JSON header changed."""
    start = len(seekindex.MAGIC) + 4
    (length,) = struct.unpack_from("<I", data, len(seekindex.MAGIC))
    header = json.dumps({**json.loads(data[start:start + length]), **changes}).encode()
    return seekindex.MAGIC + struct.pack("<I", len(header)) + header + data[start + length:]


def test_loader_bounds_what_a_span_decompresses_to(tmp_path: Path) -> None:
    """An index whose uncompressed size is more than its layer's compressed bytes can hold (deflate makes
    at most 1032 bytes of one) is refused when loaded, rather than failing reads later; the index of
    60 MiB of zeros (about 1030:1 under gzip -9) is not."""
    (tmp_path / "tree").mkdir()
    (tmp_path / "tree" / "zeros").write_bytes(bytes(60 * MIB))
    tar = make_layer_tar(tmp_path / "tree", tmp_path / "layer.tar")
    blob = _compress(tar, tmp_path / "layer.tar.gz", "gzip-9").read_bytes()
    digest = toc.sha256_digest(blob)
    data = seekindex.build(lambda o, n: blob[o:o + n], len(blob), digest, local=True).data
    index = seekindex.load(data, digest, len(blob))
    assert index.uncompressed_size > 1000 * len(blob)
    assert seekindex.load(_with_header(data), digest, len(blob)).uncompressed_size == index.uncompressed_size
    for total in (1 << 50, seekindex.MAX_DEFLATE_RATIO * len(blob) + 1):
        with pytest.raises(seekindex.SeekIndexError, match="more than its compressed bytes can hold"):
            seekindex.load(_with_header(data, uncompressedSize=total), digest, len(blob))


def test_loader_bounds_the_bytes_of_a_span(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A read fetches and holds its spans whole: an index whose spans are over MAX_SPAN_BYTES (one
    checkpoint for a huge layer, say) is refused when loaded, rather than exhausting memory in reads."""
    tar = make_layer_tar(_sample_tree(tmp_path / "tree", seed=8, big=3 * MIB), tmp_path / "layer.tar")
    blob = _compress(tar, tmp_path / "layer.tar.gz", "gzip-6").read_bytes()
    digest = toc.sha256_digest(blob)
    data = seekindex.build(lambda o, n: blob[o:o + n], len(blob), digest, local=True).data
    index = seekindex.load(data, digest, len(blob))
    largest = max(b - a for a, b in map(index.span_range, range(index.span_count)))
    monkeypatch.setattr(seekindex, "MAX_SPAN_BYTES", largest - 1)
    with pytest.raises(seekindex.SeekIndexError, match=f"compressed bytes, over {largest - 1}"):
        seekindex.load(data, digest, len(blob))


def test_flipped_byte_fails_its_span_only(tmp_path: Path) -> None:
    """A blob byte flipped inside one span: every chunk needing that span is refused before it is
    decompressed (DigestError); chunks of the other spans are served."""
    tar = make_layer_tar(_sample_tree(tmp_path / "tree", seed=4), tmp_path / "layer.tar")
    blob = bytearray(_compress(tar, tmp_path / "layer.tar.gz", "gzip-9").read_bytes())
    index = _index_of(bytes(blob))
    bad_span = index.span_count // 2
    start, end = index.span_range(bad_span)
    blob[(start + end) // 2] ^= 0x40
    reader = seekindex.SpanReader(index, lambda o, n: bytes(blob[o:o + n]))
    refused = served = 0
    for _, entry in index.index.walk():
        for c in index.index.chunks(entry):
            first, last = index.spans_for(c.comp_offset, c.size)
            if c.comp_offset != seekindex.HOLE and first <= bad_span <= last:
                with pytest.raises(toc.DigestError):
                    reader.chunk(c)
                refused += 1
            else:
                assert toc.sha256_digest(reader.chunk(c)[0]) == c.digest
                served += 1
    assert refused and served


def test_pieces_and_prefetched_spans(tmp_path: Path) -> None:
    """`pieces` puts every span the chunks need in exactly one piece of consecutive spans, about
    `target` bytes, each chunk with the piece it starts in, pieces in the order of the chunks given.  A
    reader needing an announced span waits for the prefetch's bytes rather than fetching them; a span
    that does not match the index is handed to nobody, its waiter gets the DigestError."""
    tar = make_layer_tar(_sample_tree(tmp_path / "tree", seed=6, big=12 * MIB), tmp_path / "layer.tar")
    blob = bytearray(_compress(tar, tmp_path / "layer.tar.gz", "gzip-6").read_bytes())
    index = _index_of(bytes(blob))
    chunks = [c for path in ("z/small03", "m-big", "a/f007", "sparse")
              for c in index.index.chunks(index.index.lookup(path))]
    pieces = index.pieces(chunks, 2 * MIB)
    spans = [k for first, last, _ in pieces for k in range(first, last + 1)]
    assert sorted(spans) == sorted(set().union(*(_file_spans(index, p) for p in ("z/small03", "m-big",
                                                                               "a/f007", "sparse"))))
    assert index.span_of(chunks[0].comp_offset) in range(pieces[0][0], pieces[0][1] + 1)
    for first, last, starting in pieces:
        assert first == last or index.span_range(last)[1] - index.span_range(first)[0] <= 2 * MIB
        assert all(first <= index.span_of(c.comp_offset) <= last for c in starting)
    assert sorted(c.digest for _, _, cs in pieces for c in cs) == sorted(
        c.digest for c in chunks if c.comp_offset != seekindex.HOLE)

    fetched: list[tuple[int, int]] = []
    reader = seekindex.SpanReader(index, lambda o, n: fetched.append((o, n)) or bytes(blob[o:o + n]))
    good, bad = pieces[0][:2], pieces[-1][:2]
    reader.expect(range(good[0], good[1] + 1))
    reader.expect(range(bad[0], bad[1] + 1))
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        waiting = [pool.submit(reader.spans, *good), pool.submit(reader.spans, *bad)]
        time.sleep(0.2)  # not an assertion on time: gives the waiters the chance to fetch wrongly
        start, end = index.span_range(bad[0])
        blob[(start + end) // 2] ^= 1
        reader.stage = download.StagedRanges(tmp_path / "stage")
        failed = reader.fetch_pieces([good, bad], lambda ranges: [bytes(blob[o:o + n]) for o, n in ranges])
        assert failed == [bad[0]] and reader.stage.read(index.span_range(bad[0])[0], 1) is None
        assert waiting[0].result() == bytes(blob[index.span_range(good[0])[0]:index.span_range(good[1])[1]])
        with pytest.raises(toc.DigestError):
            waiting[1].result()
    assert fetched == []
    assert reader.spans(*good) == waiting[0].result() and fetched == []  # from the stage


def test_not_gzip_or_cut_short(tmp_path: Path) -> None:
    """A plain tar is no gzip; a gzip stream cut short (its digest that of the cut bytes) is refused
    as corrupt or truncated."""
    tree = _sample_tree(tmp_path / "tree", seed=5, big=MIB)
    tar = make_layer_tar(tree, tmp_path / "layer.tar").read_bytes()
    with pytest.raises(toc.FormatError, match="not gzip"):
        seekindex.build(lambda o, n: tar[o:o + n], len(tar), toc.sha256_digest(tar), local=True)
    cut = _compress(tmp_path / "layer.tar", tmp_path / "layer.tar.gz", "gzip-6").read_bytes()[:-30_000]
    with pytest.raises(toc.FormatError, match="corrupt or truncated"):
        seekindex.build(lambda o, n: cut[o:o + n], len(cut), toc.sha256_digest(cut), local=True)


# ------------------------------------------------------------------------- mounts from a real registry


needs_stack = pytest.mark.skipif(bool(MISSING) or shutil.which("pigz") is None,
                                 reason=f"not installed: {', '.join(MISSING) or 'pigz'}")


@pytest.fixture(scope="module")
def plain_edge_layout(edge_image: tuple[Path, str],  # noqa: F811 -- a fixture
                      tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The edge image (whiteouts, an opaque dir, implied dirs, hardlinks, xattrs, devices, sparse files)
    with its layers recompressed unconverted: gzip -1, gzip -9, pigz members, in turn (an OCI layout)."""
    layout, tag = edge_image
    work = tmp_path_factory.mktemp("plain-edge")
    _, _, layers = read_layout(layout, tag)
    ways = ["gzip-1", "gzip-9", "pigz-members"]
    blobs = [_compress(_plain_tar(path, work / f"{i}.tar"), work / f"{i}.tar.gz", ways[i % 3])
             for i, (path, _) in enumerate(layers)]
    return write_oci_layout(work / "oci", tag, blobs), tag


@pytest.fixture(scope="module")
def plain_edge(plain_edge_layout: tuple[Path, str], registry: Registry) -> str:
    """The plain edge image, pushed (no index attached)."""
    layout, tag = plain_edge_layout
    push_layout(layout, tag, registry, "plain-edge")
    return f"{registry.host}/plain-edge:{tag}"


@needs_stack
def test_indexed_mount_equals_umoci_unpack(plain_edge: str, edge_expected: dict,  # noqa: F811
                                           tmp_path: Path) -> None:
    """`lazymount index` on one cache dir, then `mount` with it: every layer is read through its seek
    index (`indexed`, nothing downloaded whole) and the tree equals `umoci unpack` entry by entry; the
    background fetch then passes every span and the blobs' digests check out.  A mount without an index
    downloads the layers whole, indexes them and keeps the indexes: the next mount is lazy."""
    cache = tmp_path / "cache"
    out = lazymount("index", plain_edge, "--cache-dir", str(cache)).stdout.splitlines()
    assert len(out) >= 4 and all(" indexed: seek index, " in line for line in out), out
    again = lazymount("index", plain_edge, "--cache-dir", str(cache)).stdout
    assert again.count("already indexed") == len(out)
    mnt, log_file = tmp_path / "mnt", tmp_path / "daemon.log"
    with mounted(plain_edge, mnt, "--cache-dir", str(cache), "--log-file", str(log_file)):
        assert {layer["state"] for layer in stats(mnt)["layers"]} == {"indexed"}
        _assert_same_tree(describe_tree(mnt), edge_expected)
        for _ in range(600):
            if stats(mnt)["fetch_state"] == "done":
                break
            time.sleep(0.1)
        final = stats(mnt)
        assert final["fetch_state"] == "done"
        assert {layer["state"] for layer in final["layers"]} == {"indexed"}
        assert all(layer["format"] == seekindex.FORMAT for layer in final["layers"])
    assert "downloading it whole" not in log_file.read_text()

    fresh = tmp_path / "fresh"
    with mounted(plain_edge, tmp_path / "mnt2", "--cache-dir", str(fresh), "--no-background-fetch"):
        _assert_same_tree(describe_tree(tmp_path / "mnt2"), edge_expected)
        assert {layer["state"] for layer in stats(tmp_path / "mnt2")["layers"]} == {"local"}
    assert len(list((fresh / "indexes").iterdir())) == len(out)
    with mounted(plain_edge, tmp_path / "mnt3", "--cache-dir", str(fresh), "--no-background-fetch"):
        assert {layer["state"] for layer in stats(tmp_path / "mnt3")["layers"]} == {"indexed"}
    inspected = lazymount("inspect", plain_edge, "--cache-dir", str(fresh)).stdout
    assert inspected.count("lazy: indexed (seek index, ") == len(out)


@needs_stack
def test_tiny_and_empty_layers(registry: Registry, tmp_path: Path) -> None:
    """gzip of an empty tar (1024 zero bytes: Docker's 32-byte empty layer), and gzip of no bytes at all:
    empty layers for `umoci unpack` (and containerd).  `index --push` indexes both, and a mount reads them
    through their indexes, or, without any, downloads and indexes them: the tree equals umoci's (a blob
    too small for an eStargz footer was refused as truncated, and an empty stream as corrupt: the whole
    image was EIO)."""
    tree = tmp_path / "tree"
    (tree / "dir").mkdir(parents=True)
    (tree / "dir" / "file").write_bytes(b"below empty layers\n")
    _compress(make_layer_tar(tree, tmp_path / "0.tar"), tmp_path / "0.tar.gz", "gzip-6")
    (tmp_path / "1.tar.gz").write_bytes(gzip.compress(bytes(1024), mtime=0))
    (tmp_path / "2.tar.gz").write_bytes(gzip.compress(b"", mtime=0))
    layout = write_oci_layout(tmp_path / "oci", "v1", [tmp_path / f"{i}.tar.gz" for i in range(3)])
    expected = describe_tree(umoci_unpack(layout, "v1", tmp_path / "bundle"))
    push_layout(layout, "v1", registry, "tiny-layers-unindexed")
    ref = _push_indexes(layout, "v1", registry, "tiny-layers", tmp_path / "a")
    for image, state in ((ref, "indexed"), (f"{registry.host}/tiny-layers-unindexed:v1", "local")):
        mnt = tmp_path / f"mnt-{state}"
        with mounted(image, mnt, "--cache-dir", str(tmp_path / f"fresh-{state}")):
            _assert_same_tree(describe_tree(mnt), expected)
            assert [layer["state"] for layer in stats(mnt)["layers"]] == [state] * 3


@dataclass
class BigPlain:
    """A one-layer plain gzip image of ~25 MB, small files after a big one, indexed in `cache`."""

    ref: str
    cache: Path
    digest: str
    tree: Path
    index: seekindex.SeekIndex
    layout: Path


@needs_stack
def test_index_says_what_it_did(edge_image: tuple[Path, str], tmp_path: Path) -> None:  # noqa: F811
    """`lazymount index oci:DIR` indexes the gzip layers and says why it leaves the plain tar one; an
    eStargz image needs none; `inspect` then tells the three kinds apart."""
    layout, tag = edge_image
    cache = tmp_path / "cache"
    lines = lazymount("index", f"oci:{layout}:{tag}", "--cache-dir", str(cache)).stdout.splitlines()
    assert sum(" indexed: " in line for line in lines) == len(lines) - 1
    assert sum(f"not gzip ({toc.MEDIA_LAYER_TAR}): not indexed" in line for line in lines) == 1
    inspected = lazymount("inspect", f"oci:{layout}:{tag}", "--cache-dir", str(cache)).stdout
    assert inspected.count("lazy: indexed (seek index,") == len(lines) - 1
    assert inspected.count("lazy: neither") == 1
    converted = tmp_path / "esgz"
    lazymount("convert", "-q", f"oci:{layout}:{tag}", f"oci:{converted}:{tag}")
    lines = lazymount("index", f"oci:{converted}:{tag}", "--cache-dir", str(cache)).stdout.splitlines()
    assert lines and all(line.endswith("eStargz: needs no index") for line in lines)
    assert lazymount("inspect", f"oci:{converted}:{tag}").stdout.count("lazy: eStargz") == len(lines)


@pytest.fixture(scope="module")
def big_plain(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> BigPlain:
    work = tmp_path_factory.mktemp("big-plain")
    tree = _sample_tree(work / "tree", seed=7, big=24 * MIB)
    blob = _compress(make_layer_tar(tree, work / "layer.tar"), work / "layer.tar.gz", "gzip-6").read_bytes()
    push_layout(write_oci_layout(work / "oci", "v1", [work / "layer.tar.gz"]), "v1", registry, "big-plain")
    ref, cache, digest = f"{registry.host}/big-plain:v1", work / "cache", toc.sha256_digest(blob)
    lazymount("index", ref, "--cache-dir", str(cache))
    index = seekindex.load(seekindex.index_path(cache, digest).read_bytes(), digest, len(blob))
    return BigPlain(ref, cache, digest, tree, index, work / "oci")


def _cache_with_index(tmp_path: Path, image: BigPlain) -> Path:
    """A fresh cache dir holding only the layer's index (another node that got the index)."""
    fresh = tmp_path / "cache"
    (fresh / "indexes").mkdir(parents=True)
    shutil.copy(seekindex.index_path(image.cache, image.digest), seekindex.index_path(fresh, image.digest))
    return fresh


@needs_stack
def test_small_read_fetches_one_span(big_plain: BigPlain, tmp_path: Path) -> None:
    """Reading one small file of a large indexed layer fetches one span (one request) plus the index."""
    mnt = tmp_path / "mnt"
    with mounted(big_plain.ref, mnt, "--cache-dir", str(_cache_with_index(tmp_path, big_plain)),
                 "--no-background-fetch"):
        _assert_small_read_fetches_one_span(mnt, big_plain.index)


def _assert_small_read_fetches_one_span(mnt: Path, index: seekindex.SeekIndex) -> None:
    """The big plain layer mounted at `mnt` through `index`: nothing is fetched before a read, and reading
    one small file fetches one span (one request)."""
    (layer,) = stats(mnt)["layers"]
    assert layer["state"] == "indexed" and layer["index_bytes"] == index.stored_size
    assert layer["bytes_fetched"] == 0
    assert (mnt / "z" / "small07").read_bytes() == b"small file 7 7\n" * 8
    (layer,) = stats(mnt)["layers"]
    biggest = max(b - a for a, b in (index.span_range(k) for k in range(index.span_count)))
    assert layer["requests"] == 1 and 0 < layer["bytes_fetched"] <= biggest, layer
    assert layer["bytes_fetched"] < index.layer_size / 4


def _registry_blob(registry: Registry, digest: str) -> Path:
    hexdigest = digest[7:]
    return registry.workdir / "storage/docker/registry/v2/blobs/sha256" / hexdigest[:2] / hexdigest / "data"


@needs_stack
def test_flipped_byte_in_registry(big_plain: BigPlain, registry: Registry, tmp_path: Path) -> None:
    """One byte flipped in the registry's copy of the blob: the files of that span fail with EIO, the
    others are served right, nothing is ever wrong.  A byte flipped before the first checkpoint (the
    gzip header's mtime) passes every span check, but once the background fetch has every byte the
    blob's digest does not match the manifest: the layer fails (EIO) and the log names image and layer."""
    ref, digest, index = big_plain.ref, big_plain.digest, big_plain.index
    path = _registry_blob(registry, digest)
    original = path.read_bytes()
    expected = describe_tree(big_plain.tree)
    bad_span = index.span_of(index.index.chunks(index.index.lookup("z/small05"))[0].comp_offset)
    start, end = index.span_range(bad_span)
    try:
        path.write_bytes(original[:(start + end) // 2] + bytes([original[(start + end) // 2] ^ 1])
                         + original[(start + end) // 2 + 1:])
        mnt = tmp_path / "mnt"
        with mounted(ref, mnt, "--cache-dir", str(_cache_with_index(tmp_path / "a", big_plain)),
                     "--no-background-fetch"):
            for name, info in expected.items():
                if info["type"] != "reg":
                    continue
                if bad_span in _file_spans(index, name):
                    with pytest.raises(OSError) as e:
                        (mnt / name).read_bytes()
                    assert e.value.errno == errno.EIO, name
                else:
                    assert hashlib.sha256((mnt / name).read_bytes()).hexdigest() == info["sha256"], name
            assert stats(mnt)["layers"][0]["errors"] > 0

        path.write_bytes(original[:4] + bytes([original[4] ^ 1]) + original[5:])
        log_file = tmp_path / "daemon.log"
        with mounted(ref, mnt, "--cache-dir", str(_cache_with_index(tmp_path / "b", big_plain)),
                     "--log-file", str(log_file)):
            for _ in range(600):
                if stats(mnt)["fetch_state"] == "done":
                    break
                time.sleep(0.1)
            (layer,) = stats(mnt)["layers"]
            assert layer["state"] == "failed" and "not its digest" in layer["error"]
            with pytest.raises(OSError) as e:
                (mnt / "z" / "small09").read_bytes()
            assert e.value.errno == errno.EIO
        lines = [line for line in log_file.read_text().splitlines() if "not its digest" in line]
        assert len(lines) == 1 and ref in lines[0] and digest in lines[0]
    finally:
        path.write_bytes(original)


@needs_stack
def test_rejected_index_is_one_line(big_plain: BigPlain, tmp_path: Path) -> None:
    """A truncated index, or the index of another layer, in the cache dir: `inspect` says so in one line
    and shows the layer as one that is downloaded whole (as `mount` then does)."""
    ref, digest = big_plain.ref, big_plain.digest
    good = seekindex.index_path(big_plain.cache, digest).read_bytes()
    fresh = _cache_with_index(tmp_path, big_plain)
    foreign = good.replace(digest[7:].encode(), b"0" * 64, 1)
    for bad, reason in ((good[:len(good) // 2], "truncated"), (foreign, "is for layer sha256:0000")):
        seekindex.index_path(fresh, digest).write_bytes(bad)
        result = lazymount("inspect", ref, "--cache-dir", str(fresh))
        assert "lazy: neither" in result.stdout
        (line,) = result.stderr.splitlines()
        assert "seek index rejected" in line and reason in line and digest in line


@needs_stack
def test_files_far_apart_in_the_tar_stream(registry: Registry, tmp_path: Path) -> None:
    """A file followed by more tar headers than limits.chunk_size (entries without data, here with large
    PAX records), and another one at the end of such a run: both read through the seek index, neither
    refused as an oversized chunk (a chunk's offsets in an indexed layer are in the tar stream, and the
    headers between two files are never held)."""
    filler = {"comment": "x" * (64 << 10)}
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data, empty in (("a", b"first\n", "b"), ("c", b"last\n", "d")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
            for i in range(1100):  # 1100 x 65 KiB: over the default limit of 64 MiB (and its slack)
                info = tarfile.TarInfo(f"{empty}/{i:04}")
                info.pax_headers = filler
                tar.addfile(info)
    (tmp_path / "layer.tar.gz").write_bytes(gzip.compress(raw.getvalue(), 1, mtime=0))
    push_layout(write_oci_layout(tmp_path / "oci", "v1", [tmp_path / "layer.tar.gz"]), "v1", registry,
                "far-apart")
    ref, cache, mnt = f"{registry.host}/far-apart:v1", tmp_path / "cache", tmp_path / "mnt"
    lazymount("index", ref, "--cache-dir", str(cache))
    with mounted(ref, mnt, "--cache-dir", str(cache), "--no-background-fetch"):
        assert (mnt / "a").read_bytes() == b"first\n"
        assert (mnt / "c").read_bytes() == b"last\n"
        assert len(os.listdir(mnt / "d")) == 1100
        (layer,) = stats(mnt)["layers"]
        assert layer["state"] == "indexed" and layer["errors"] == 0


# ------------------------------------------------------------------------------- indexes as referrers


def _push_indexes(layout: Path, tag: str, registry: Registry, repository: str, cache: Path) -> str:
    """Push the layout as REPOSITORY:TAG and `lazymount index --push` it with `cache`; its reference."""
    push_layout(layout, tag, registry, repository)
    ref = f"{registry.host}/{repository}:{tag}"
    out = lazymount("index", ref, "--push", "--cache-dir", str(cache)).stdout.splitlines()
    assert out and all(" indexed: seek index, " in line and "; attached to the image as sha256:" in line
                       for line in out), out
    return ref


@needs_stack
def test_pushed_indexes_found_through_the_referrers_tag(plain_edge_layout: tuple[Path, str],
                                                        registry: Registry, tmp_path: Path,
                                                        edge_expected: dict) -> None:  # noqa: F811
    """`lazymount index --push` on one node; `mount` with a fresh cache dir (another node) finds every
    layer's index among the image's referrers (the referrers tag on docker-registry 2.8), serves every
    layer through it without downloading one whole, keeps the indexes, and the tree equals `umoci unpack`
    entry by entry.  `index --push` of an OCI layout says in one line that it has no referrers."""
    layout, tag = plain_edge_layout
    ref = _push_indexes(layout, tag, registry, "plain-edge-referred", tmp_path / "a")
    fresh, mnt, log_file = tmp_path / "b", tmp_path / "mnt", tmp_path / "daemon.log"
    with mounted(ref, mnt, "--cache-dir", str(fresh), "--no-background-fetch", "--log-file", str(log_file)):
        layers = stats(mnt)["layers"]
        assert {layer["state"] for layer in layers} == {"indexed"}
        assert all(layer["format"] == seekindex.FORMAT for layer in layers)
        _assert_same_tree(describe_tree(mnt), edge_expected)
    assert "downloading it whole" not in log_file.read_text()
    assert len(list((fresh / "indexes").iterdir())) == len(layers)

    result = lazymount("index", f"oci:{layout}:{tag}", "--push", "--cache-dir", str(tmp_path / "c"),
                       check=False)
    assert result.returncode != 0 and not result.stdout
    (line,) = result.stderr.splitlines()
    assert "an OCI layout has no referrers" in line


@needs_stack
def test_pushed_index_reads_lazily_and_a_bad_one_is_rejected(big_plain: BigPlain, registry: Registry,
                                                             tmp_path: Path) -> None:
    """Through an index found among the referrers, reading one small file of a large layer fetches one
    span.  A newer index attached for the layer that is truncated, or another layer's, is rejected in
    one line, and the layer is one that is downloaded whole."""
    ref = _push_indexes(big_plain.layout, "v1", registry, "big-plain-referred", tmp_path / "a")
    mnt = tmp_path / "mnt"
    with mounted(ref, mnt, "--cache-dir", str(tmp_path / "b"), "--no-background-fetch"):
        _assert_small_read_fetches_one_span(mnt, big_plain.index)

    good = seekindex.index_path(tmp_path / "a", big_plain.digest).read_bytes()
    image = fetch.open_image(ref, client=regclient.RegistryClient())
    foreign = good.replace(big_plain.digest[7:].encode(), b"0" * 64, 1)
    for k, (bad, reason) in enumerate(((good[:len(good) // 2], "truncated"),
                                       (foreign, "is for layer sha256:0000"))):
        referrers.push_seek_index(image, big_plain.digest, bad)
        result = lazymount("inspect", ref, "--cache-dir", str(tmp_path / f"fresh{k}"))
        assert "lazy: neither" in result.stdout
        (line,) = result.stderr.splitlines()
        assert "seek index rejected" in line and reason in line and big_plain.digest in line


@needs_stack
def test_index_pushed_again_attaches_nothing_new(big_plain: BigPlain, registry: Registry,
                                                 tmp_path: Path) -> None:
    """`index --push` again, on this node or another (its own build), finds the same index attached and
    pushes no second artifact: the referrers every mount lists do not grow with each run."""
    ref = _push_indexes(big_plain.layout, "v1", registry, "big-plain-again", tmp_path / "a")
    for cache in ("a", "b"):
        out = lazymount("index", ref, "--push", "--cache-dir", str(tmp_path / cache)).stdout.splitlines()
        assert len(out) == 1 and out[0].endswith("; already attached to the image"), out
    image = fetch.open_image(ref, client=regclient.RegistryClient())
    assert image.client is not None
    assert len(referrers.referrers(image.client, image.reference, image.digest, toc.ARTIFACT_SEEK_INDEX)) == 1


@contextlib.contextmanager
def _mounted_behind(registry: Registry, tmp_path: Path, repository: str, settings: str,
                    fault: Fault) -> Iterator[tuple[TestImage, str, dict, list[str]]]:
    """A plain test image with its seek index pushed, mounted (fresh cache dir, registry `settings` as a
    YAML flow mapping) through a proxy that misbehaves with `fault` on the referrers tag: its file is
    right and its layer downloaded whole.  Yields, once unmounted and while the proxy still runs, the
    image, its name through the proxy, the environment and the daemon's log lines."""
    image = make_test_image(tmp_path / "image")
    push_layout(image.layout, image.tag, registry, repository)
    lazymount("index", f"{registry.host}/{repository}:{image.tag}", "--push", "--cache-dir",
              str(tmp_path / "a"))
    config = tmp_path / "config.yaml"
    config.write_text(f"registry_defaults: {settings}\n")
    env = dict(os.environ, LAZYMOUNT_CONFIG=str(config))
    proxy = FaultProxy(registry.host).add(fault)
    try:
        ref = f"{proxy.host}/{repository}:{image.tag}"
        mnt, log_file = tmp_path / "mnt", tmp_path / "daemon.log"
        with mounted(ref, mnt, "--cache-dir", str(tmp_path / "b"), "--log-file", str(log_file), env=env):
            assert (mnt / "hello.txt").read_bytes() == b"hello from lazymount\n"
            assert stats(mnt)["layers"][0]["state"] == "local"
        yield image, ref, env, log_file.read_text().splitlines()
    finally:
        proxy.stop()


@needs_stack
def test_referrers_tag_failing_with_500(registry: Registry, tmp_path: Path) -> None:
    """A registry answering 500 for the referrers tag: `mount` says so in one line and downloads the layer
    whole (its files right); `inspect` shows it as one downloaded whole; `index --push` fails in one line
    with a non-zero exit, no traceback."""
    fault = Fault("status", path="/manifests/sha256-", status=500, times=-1)
    with _mounted_behind(registry, tmp_path, "plain-500", "{retries: 1, retry_backoff: 0.05}", fault) as (
            image, ref, env, log_lines):
        (line,) = [line for line in log_lines if "seek index rejected" in line]
        assert "HTTP 500" in line and image.layer_digest in line
        result = lazymount("inspect", ref, "--cache-dir", str(tmp_path / "c"), env=env)
        assert "lazy: neither" in result.stdout and "HTTP 500" in result.stderr
        result = lazymount("index", ref, "--push", "--cache-dir", str(tmp_path / "d"), check=False, env=env)
        assert result.returncode != 0 and not result.stdout
        (line,) = result.stderr.splitlines()
        assert line.startswith("lazymount: error: ") and "HTTP 500" in line


@needs_stack
def test_referrers_tag_that_never_answers(registry: Registry, tmp_path: Path) -> None:
    """A registry that never answers for the referrers tag: `mount` waits for the optional seek index and
    profiles no longer than the registry's range_timeout, says so in one line each, and downloads the
    layer whole (its files right)."""
    fault = Fault("stall", path="/manifests/sha256-", seconds=900, times=-1)
    settings = "{range_timeout: 2, read_timeout: 900, retries: 0}"
    with _mounted_behind(registry, tmp_path, "plain-stall", settings, fault) as (image, _, _, log_lines):
        gave_up = [line for line in log_lines if "no answer from the registry" in line]
        assert len(gave_up) == 2 and any(image.layer_digest in line for line in gave_up), gave_up


# -------------------------------------------------------------------- profiles of plain images prefetched


@dataclass
class ProfiledPlain:
    """A plain gzip image (busybox and the sample tree) with a pushed seek index and a profile pushed by
    `record --push` of `busybox cat` over PROFILED."""

    ref: str
    tree: Path
    index: seekindex.SeekIndex
    profile: dict[str, list[str]]


PROFILED = ("a/f010", "a/f090", "z/small05")
needs_busybox = pytest.mark.skipif(not Path("/bin/busybox").exists(), reason="needs busybox-static")


@pytest.fixture(scope="module")
def profiled_plain(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> ProfiledPlain:
    work = tmp_path_factory.mktemp("profiled-plain")
    tree = _sample_tree(work / "tree", seed=11, big=6 * MIB)
    (tree / "bin").mkdir()
    shutil.copy2("/bin/busybox", tree / "bin" / "busybox")
    _compress(make_layer_tar(tree, work / "layer.tar"), work / "layer.tar.gz", "gzip-6")
    write_oci_layout(work / "oci", "v1", [work / "layer.tar.gz"])
    ref = _push_indexes(work / "oci", "v1", registry, "profiled-plain", work / "c1")
    lazymount("record", ref, "--cache-dir", str(work / "c2"), "--contain", "-o", str(work / "profile"),
              "--push", "--", "/bin/busybox", "cat", *(f"/{path}" for path in PROFILED))
    profile = profiles.read_profile(work / "profile")
    (digest,) = profile
    index = seekindex.load(seekindex.index_path(work / "c1", digest).read_bytes(), digest,
                           fetch.open_image(ref, client=regclient.RegistryClient()).layers[0].size)
    return ProfiledPlain(ref, tree, index, profile)


def _spans_bytes(index: seekindex.SeekIndex, spans: set[int]) -> int:
    return sum(b - a for a, b in map(index.span_range, spans))


@needs_stack
@needs_busybox
def test_pushed_profile_prefetches_the_spans_of_a_plain_image(profiled_plain: ProfiledPlain,
                                                              tmp_path: Path) -> None:
    """A later mount (fresh cache dir: another node) fetches the spans holding the profiled files before
    it answers, in a few requests; reading those files, and the other files of those spans, then sends
    no request and gives the original bytes.  `--no-prefetch` fetches nothing before a read."""
    image, mnt = profiled_plain, tmp_path / "mnt"
    (paths,) = image.profile.values()
    assert {"bin/busybox", *PROFILED} <= set(paths)
    profiled = set().union(*(_file_spans(image.index, path) for path in paths))
    with mounted(image.ref, mnt, "--cache-dir", str(tmp_path / "c"), "--no-background-fetch"):
        (before,) = stats(mnt)["layers"]
        assert before["state"] == "indexed" and before["bytes_served"] == 0
        assert before["prefetched_bytes"] == before["bytes_fetched"]
        assert before["prefetched_bytes"] >= _spans_bytes(image.index, profiled) - len(profiled)
        assert 0 < before["requests"] <= len(profiled)
        neighbours = [f"a/f{i:03}" for i in range(120)
                      if (image.tree / "a" / f"f{i:03}").stat().st_size
                      and _file_spans(image.index, f"a/f{i:03}") <= profiled]
        assert len(neighbours) > len(PROFILED)
        for path in [*paths, *neighbours]:
            assert (mnt / path).read_bytes() == (image.tree / path).read_bytes(), path
        (after,) = stats(mnt)["layers"]
        assert (after["requests"], after["bytes_fetched"]) == (before["requests"], before["bytes_fetched"])
        assert after["errors"] == 0
    with mounted(image.ref, mnt, "--cache-dir", str(tmp_path / "c2"), "--no-background-fetch",
                 "--no-prefetch"):
        (layer,) = stats(mnt)["layers"]
        assert layer["prefetched_bytes"] == layer["bytes_fetched"] == 0


@needs_stack
@needs_busybox
def test_run_copies_the_profiled_files_of_an_indexed_layer(profiled_plain: ProfiledPlain,
                                                           tmp_path: Path) -> None:
    """`run` of the plain image with its pushed profile copies the profiled regular files to local disk
    and runs on an overlay of them: every file shows the original bytes, as with --no-overlay."""
    image = profiled_plain
    (paths,) = image.profile.values()
    profiled_files = [p for p in paths if (image.tree / p).is_file() and not (image.tree / p).is_symlink()]
    assert {"bin/busybox", *PROFILED} <= set(profiled_files)
    listing = ("cd / && /bin/busybox find a z bin -type f | /bin/busybox sort | /bin/busybox xargs "
               "/bin/busybox sha256sum; /bin/busybox grep -c ' - overlay ' /proc/self/mountinfo; true")
    outputs = {}
    for how in ("--overlay", "--no-overlay"):
        stats_file = tmp_path / f"stats{how}.json"
        result = lazymount("run", "--cache-dir", str(tmp_path / how), "--contain", "--stats-file",
                           str(stats_file), how, image.ref, "--", "/bin/busybox", "sh", "-c", listing)
        *sums, overlays = result.stdout.splitlines()
        outputs[how] = sums
        copied = json.loads(stats_file.read_text()).get("local_copy")
        if how == "--overlay":
            size = sum((image.tree / p).stat().st_size for p in profiled_files)
            assert int(overlays) > 0 and copied == {"files": len(profiled_files), "bytes": size}
        else:
            assert int(overlays) == 0 and copied is None
    expected = sorted(f"{hashlib.sha256(f.read_bytes()).hexdigest()}  {f.relative_to(image.tree)}"
                      for top in ("a", "z", "bin") for f in (image.tree / top).rglob("*")
                      if f.is_file() and not f.is_symlink())
    assert sorted(outputs["--overlay"]) == sorted(outputs["--no-overlay"]) == expected


@needs_stack
@needs_busybox
def test_flipped_byte_in_a_prefetched_span(profiled_plain: ProfiledPlain, registry: Registry,
                                           tmp_path: Path) -> None:
    """One byte flipped in the registry's copy of a span the profile covers: the mount still comes up,
    that span is not served (EIO for its files, once more fetched and refused), the other profiled files
    are served right."""
    image, mnt = profiled_plain, tmp_path / "mnt"
    (digest,) = image.profile
    (paths,) = image.profile.values()
    (bad_span,) = _file_spans(image.index, "z/small05")
    fine = [path for path in paths if bad_span not in _file_spans(image.index, path)]
    assert "a/f010" in fine and "bin/busybox" in fine
    path = _registry_blob(registry, digest)
    original = path.read_bytes()
    start, end = image.index.span_range(bad_span)
    try:
        path.write_bytes(original[:(start + end) // 2] + bytes([original[(start + end) // 2] ^ 1])
                         + original[(start + end) // 2 + 1:])
        with mounted(image.ref, mnt, "--cache-dir", str(tmp_path / "c"), "--no-background-fetch"):
            (layer,) = stats(mnt)["layers"]
            assert layer["prefetched_bytes"] > 0 and layer["errors"] == 1
            with pytest.raises(OSError) as e:
                (mnt / "z" / "small05").read_bytes()
            assert e.value.errno == errno.EIO
            for name in fine:
                assert (mnt / name).read_bytes() == (image.tree / name).read_bytes(), name
    finally:
        path.write_bytes(original)
