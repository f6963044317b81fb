"""Tests of the test harness itself against the real tools (GNU tar, umoci, containerd, ctr-remote, the
reference's estargz Go package), plus the reference behaviours the format code must match, each pinned
by a test so that a change in the reference shows up here first.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from imagebuild import (
    CHUNK,
    FRACTIONAL_MTIME_NS,
    ODD_GID,
    ODD_UID,
    SPARSE_SIZE,
    describe_tar,
    describe_tree,
    make_layer_tar,
    make_oci_image,
    regular_file_digests,
    write_oci_layout,
)
from tests.reference import (
    ToolError,
    read_layout,
    ref_convert,
    ref_dump_toc,
    ref_get_toc_digest,
    verify_with_reference,
)
from toc import MEDIA_LAYER_GZIP, MEDIA_LAYER_ZSTD, TOC_DIGEST_ANNOTATION, UNCOMPRESSED_SIZE_ANNOTATION

LANDMARKS = {".prefetch.landmark", ".no.prefetch.landmark"}


def _without_xattrs(entries: dict[str, dict]) -> dict[str, dict]:
    return {name: {**info, "xattrs": {}} for name, info in entries.items()}


def test_edge_tree_has_every_edge_case(edge_tree: Path) -> None:
    entries = describe_tree(edge_tree)
    assert {e["type"] for e in entries.values()} == {
        "reg", "dir", "symlink", "hardlink", "char", "block", "fifo"}
    sizes = {e["size"] for e in entries.values()}
    assert {0, CHUNK - 1, CHUNK, CHUNK + 1, SPARSE_SIZE} <= sizes
    assert any(e["size"] > 2 * CHUNK and e["size"] % CHUNK for e in entries.values())
    assert max(len(name.encode()) for name in entries) > 255
    assert max(len(part.encode()) for name in entries for part in name.split("/")) == 255
    assert any(not name.isascii() for name in entries)
    assert [e["type"] for e in entries.values() if e["type"] == "hardlink"] == ["hardlink"] * 2
    assert {e["linkname"] for e in entries.values() if e["type"] == "symlink"} >= {"/etc/hostname", "../data"}
    assert {e["mode"] for e in entries.values()} >= {0o4755, 0o2755, 0o1777, 0}
    assert any(e["uid"] == ODD_UID and e["gid"] == ODD_GID for e in entries.values())
    assert entries["xattrs/file"]["xattrs"]["user.binary"] == b"\x00\x01\x02\xff\xfe"
    assert "trusted.lazymount" in entries["xattrs/file"]["xattrs"]
    assert entries["special/blk"]["devmajor"] == 7 and entries["special/blk"]["devminor"] == 200
    assert {entries[f"times/{n}"]["mtime"] for n in ("epoch", "old", "future")} == {0, 315532800, 4102444800}
    sparse = os.stat(edge_tree / "sparse" / "holes-10m")
    assert sparse.st_blocks * 512 < sparse.st_size // 10  # really sparse on disk
    assert sum(name.startswith("real/") for name in entries) > 20


@pytest.mark.parametrize(("fmt", "dot_prefix", "compress"), [
    ("pax", False, False), ("pax", True, True), ("gnu", False, True), ("gnu", True, False)])
def test_layer_tar_round_trips(edge_tree: Path, tmp_path: Path, fmt: str, dot_prefix: bool,
                               compress: bool) -> None:
    layer = make_layer_tar(edge_tree, tmp_path / "layer.tar", fmt=fmt, gzip=compress, dot_prefix=dot_prefix)
    with open(layer, "rb") as f:
        assert (f.read(2) == b"\x1f\x8b") == compress
    with tarfile.open(layer) as tar:
        members = tar.getmembers()
    assert all(m.name.startswith("./") or m.name == "." for m in members) == dot_prefix
    assert any(m.name == "." for m in members) == dot_prefix
    sparse = next(m for m in members if m.name.endswith("sparse/holes-10m"))
    if fmt == "pax":  # PAX 1.0 sparse map, PAX xattr and mtime records
        assert sparse.pax_headers["GNU.sparse.major"] == "1"
        assert any("SCHILY.xattr.user.binary" in m.pax_headers for m in members)
    else:  # old GNU sparse entry; GNU format cannot carry xattrs
        assert sparse.type == tarfile.GNUTYPE_SPARSE
        assert not any(m.pax_headers for m in members)
    expected = describe_tree(edge_tree)
    if fmt == "gnu":
        expected = _without_xattrs(expected)
    assert describe_tar(layer) == expected

    extracted = tmp_path / "extracted"
    extracted.mkdir()
    subprocess.run(["tar", "-x", "-f", str(layer), "-C", str(extracted), "--xattrs", "--xattrs-include=*",
                    "--numeric-owner", "--same-permissions", "--warning=no-timestamp"], check=True)
    assert describe_tree(extracted) == expected


@pytest.fixture(scope="module")
def edge_image(tmp_path_factory: pytest.TempPathFactory, edge_tree: Path) -> Path:
    """Three layers: the edge tree; `real/` made opaque; whiteouts for special/ and links/hard-b."""
    base = tmp_path_factory.mktemp("edge-image")
    upper = base / "upper"
    subprocess.run(["cp", "-a", str(edge_tree), str(upper)], check=True)
    shutil.rmtree(upper / "special")
    (upper / "links" / "hard-b").unlink()
    (upper / "hello.txt").write_bytes(b"changed in the upper layer\n")
    shutil.rmtree(upper / "real")
    (upper / "real").mkdir()
    (upper / "real" / "only").write_bytes(b"the only file left in an opaque directory\n")
    return make_oci_image(base / "oci", "v1", [edge_tree, upper], opaque_dirs={1: ["real"]})


@pytest.fixture(scope="module")
def converted(containerd, edge_image: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("converted") / "oci"
    ref_convert(containerd, edge_image, "v1", out)
    return out


def _layer_pairs(source: Path, converted_layout: Path) -> list[tuple[Path, Path, dict]]:
    """(source layer blob, converted layer blob, converted descriptor) for each layer."""
    _, _, src_layers = read_layout(source, "v1")
    _, _, out_layers = read_layout(converted_layout, "v1")
    assert len(src_layers) == len(out_layers) == 3
    return [(s, o, desc) for (s, _), (o, desc) in zip(src_layers, out_layers, strict=True)]


def _content_digests(records: dict[str, dict]) -> dict[str, str]:
    return {n: r["sha256"] for n, r in records.items() if r["type"] == "reg" and n not in LANDMARKS}


def test_reference_reader_sees_the_source_layers(converted: Path, edge_image: Path,
                                                 estargz_verifier: Path) -> None:
    for src_blob, blob, desc in _layer_pairs(edge_image, converted):
        assert desc["mediaType"] == MEDIA_LAYER_GZIP
        records = verify_with_reference(estargz_verifier, blob, desc["annotations"][TOC_DIGEST_ANNOTATION])
        truth = describe_tar(src_blob)
        assert _content_digests(records) == regular_file_digests(truth)
        assert LANDMARKS & records.keys() == {".no.prefetch.landmark"}
        for name, want in truth.items():
            got = records[name]
            if want["type"] == "hardlink":
                assert got["type"] == "reg" and got["source"] == want["linkname"], name
            else:
                assert got["type"] == want["type"], name
            assert (got["mode"] & 0o7777, got["uid"], got["gid"]) == (want["mode"], want["uid"], want["gid"])
            assert (got.get("devMajor", 0), got.get("devMinor", 0)) == (want["devmajor"], want["devminor"])
            if want["type"] == "symlink":
                assert got["linkName"] == want["linkname"]
            xattrs = {k: base64.b64decode(v) for k, v in got.get("xattrs", {}).items()}
            assert xattrs == want["xattrs"], name
            # The reference rounds to the nearest second; describe_tar truncates (see the names test).
            assert got["mtime"] - want["mtime"] in (0, 1), name
        for name in records.keys() - truth.keys() - LANDMARKS:
            # Directories an upper layer only implies: 0755 and no mtime (year 1) in the reference.
            assert records[name]["type"] == "dir" and records[name]["mode"] == 0o755, name
            assert records[name]["mtime"] == 0, name


def test_whiteouts_stay_plain_files_in_the_toc(converted: Path, estargz_verifier: Path) -> None:
    _, _, layers = read_layout(converted, "v1")
    seen = []
    for blob, desc in layers[1:]:
        records = verify_with_reference(estargz_verifier, blob, desc["annotations"][TOC_DIGEST_ANNOTATION])
        seen.append({n: (r["type"], r["size"]) for n, r in records.items() if ".wh." in n})
    assert seen == [
        {"real/.wh..wh..opq": ("reg", 0)},
        {".wh.special": ("reg", 0), "links/.wh.hard-b": ("reg", 0)},
    ]


def test_toc_digest_and_image_metadata(containerd, converted: Path) -> None:
    _, config, layers = read_layout(converted, "v1")
    diff_ids = []
    for blob, desc in layers:
        assert ref_get_toc_digest(containerd, blob) == desc["annotations"][TOC_DIGEST_ANNOTATION]
        plain = gzip.decompress(blob.read_bytes())
        assert int(desc["annotations"][UNCOMPRESSED_SIZE_ANNOTATION]) == len(plain)
        diff_ids.append("sha256:" + hashlib.sha256(plain).hexdigest())
    assert config["rootfs"]["diff_ids"] == diff_ids


def test_verifier_rejects_wrong_digest_and_tampered_data(converted: Path, estargz_verifier: Path,
                                                         tmp_path: Path) -> None:
    _, _, layers = read_layout(converted, "v1")
    blob, desc = layers[0]
    toc_digest = desc["annotations"][TOC_DIGEST_ANNOTATION]
    with pytest.raises(ToolError, match="invalid TOC JSON"):
        verify_with_reference(estargz_verifier, blob, "sha256:" + "0" * 64)
    tampered = bytearray(blob.read_bytes())
    tampered[1 << 20] ^= 0xFF  # inside data/4m-minus-1, the first large file of the layer
    bad = tmp_path / "tampered"
    bad.write_bytes(tampered)
    with pytest.raises(ToolError, match="data/4m-minus-1"):
        verify_with_reference(estargz_verifier, bad, toc_digest)


def test_zstd_chunked_conversion(containerd, edge_image: Path, estargz_verifier: Path,
                                 tmp_path: Path) -> None:
    out = tmp_path / "zstd"
    ref_convert(containerd, edge_image, "v1", out, zstd=True)
    for src_blob, blob, desc in _layer_pairs(edge_image, out):
        assert desc["mediaType"] == MEDIA_LAYER_ZSTD
        toc_digest = desc["annotations"][TOC_DIGEST_ANNOTATION]
        assert ref_get_toc_digest(containerd, blob, zstd=True) == toc_digest
        records = verify_with_reference(estargz_verifier, blob, toc_digest, zstd=True)
        assert _content_digests(records) == regular_file_digests(describe_tar(src_blob))
        with pytest.raises(ToolError):  # not a gzip eStargz blob
            verify_with_reference(estargz_verifier, blob, toc_digest)


def _small_tree(root: Path) -> Path:
    (root / "dir").mkdir(parents=True)
    (root / "dir" / "file").write_bytes(b"payload\n")
    os.link(root / "dir" / "file", root / "dir" / "link")
    os.utime(root / "dir" / "file", ns=(FRACTIONAL_MTIME_NS, FRACTIONAL_MTIME_NS))  # x.75 s
    quarter = FRACTIONAL_MTIME_NS - 500_000_000  # x.25 s
    (root / "dir" / "quarter").write_bytes(b"")
    os.utime(root / "dir" / "quarter", ns=(quarter, quarter))
    with open(root / "sparse", "wb") as f:
        f.seek(1 << 20)
        f.write(b"after a hole")
    os.utime(root / "sparse", (0, 0))
    return root


def test_reference_keeps_tar_names_verbatim(containerd, estargz_verifier: Path, tmp_path: Path) -> None:
    tree = _small_tree(tmp_path / "tree")
    layer = make_layer_tar(tree, tmp_path / "layer.tar.gz", gzip=True, dot_prefix=True, sparse=False)
    write_oci_layout(tmp_path / "oci", "v1", [layer])
    ref_convert(containerd, tmp_path / "oci", "v1", tmp_path / "out")
    _, _, [(blob, desc)] = read_layout(tmp_path / "out", "v1")
    toc = ref_dump_toc(containerd, blob)
    names = [e["name"] for e in toc["entries"]]
    assert names == [".no.prefetch.landmark", "./", "./dir/", "./dir/file", "./dir/link", "./dir/quarter",
                     "./sparse"]
    assert [e["linkName"] for e in toc["entries"] if e["type"] == "hardlink"] == ["./dir/file"]
    modtimes = {e["name"]: e.get("modtime") for e in toc["entries"]}
    # The tar's PAX mtimes keep the fraction; the reference rounds to the nearest second.
    assert modtimes["./dir/file"] == "2020-09-13T12:26:41Z"  # x.75 s
    assert modtimes["./dir/quarter"] == "2020-09-13T12:26:40Z"  # x.25 s
    assert modtimes["./sparse"] is None  # mtime 0 (the epoch) is left out
    records = verify_with_reference(estargz_verifier, blob, desc["annotations"][TOC_DIGEST_ANNOTATION])
    assert records.keys() - LANDMARKS == describe_tar(layer).keys()  # the reader normalizes names
    assert _content_digests(records) == regular_file_digests(describe_tar(layer))


@pytest.mark.parametrize(("fmt", "message"), [("gnu", "unsupported input tar entry 'S'"),
                                              ("pax", 'error copying "sparse"')])
def test_reference_rejects_sparse_tar_entries(containerd, tmp_path: Path, fmt: str, message: str) -> None:
    tree = _small_tree(tmp_path / "tree")
    layer = make_layer_tar(tree, tmp_path / "layer.tar.gz", fmt=fmt, gzip=True)
    with tarfile.open(layer) as tar:
        assert tar.getmember("sparse").sparse  # GNU tar really wrote a sparse entry
    write_oci_layout(tmp_path / "oci", "v1", [layer])
    with pytest.raises(ToolError, match=message):
        ref_convert(containerd, tmp_path / "oci", "v1", tmp_path / "out")
