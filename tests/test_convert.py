"""Interoperability of toc.py/convert.py with the reference (stargz-snapshotter 0.12, Debian packages).

Both directions: what `ctr-remote image convert` writes is read by toc.py and equals the source layers;
what `lazymount convert` writes is verified by the reference's own estargz library (tests/interop/verify.go)
and `ctr-remote images get-toc-digest`.  Plus the CLI's behaviour on bad input.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import toc
import tocread
from imagebuild import describe_tar, make_layer_tar, make_oci_image, regular_file_digests, write_oci_layout
from tests.reference import (
    read_layout,
    ref_convert,
    ref_get_toc_digest,
    verify_with_reference,
)
from toc import TOC_DIGEST_ANNOTATION, UNCOMPRESSED_SIZE_ANNOTATION

LAZYMOUNT = [sys.executable, "-m", "lazymount"]
_KINDS = ("dir", "reg", "symlink", "hardlink", "char", "block", "fifo")


def describe_blob(blob: Path, toc_digest: str | None) -> dict[str, dict]:
    """describe_tar's view of an eStargz/zstd:chunked blob, read through toc.py alone."""
    data = blob.read_bytes()
    index = tocread.read_index(lambda off, n: data[off:off + n], len(data), toc_digest)
    paths = dict((i, p) for p, i in index.walk())
    out = {}
    for path, entry_id in index.walk():
        if index.is_implicit(entry_id):
            continue  # a directory the layer only implies; the tar has no entry for it either
        e = index.entry(entry_id)
        target = index.hardlink_target(entry_id)
        info = {"type": "hardlink" if target is not None else _KINDS[e.kind], "mode": e.mode, "uid": e.uid,
                "gid": e.gid, "size": e.size if e.kind == toc.KIND_REG and target is None else 0,
                "mtime": e.mtime, "linkname": paths[target] if target is not None else e.link_name,
                "xattrs": e.xattrs, "devmajor": e.dev_major, "devminor": e.dev_minor}
        if e.kind == toc.KIND_REG and target is None:
            content = b"".join(tocread.decompress_chunk(data[c.comp_offset:c.comp_end], c, index.format)
                               for c in index.chunks(entry_id))
            assert len(content) == e.size, path
            info["sha256"] = hashlib.sha256(content).hexdigest()
        out[path] = info
    return out


def assert_same_entries(got: dict[str, dict], want: dict[str, dict]) -> None:
    """Entry by entry equality; mtimes may differ by the reference's rounding to whole seconds."""
    assert sorted(got) == sorted(want)
    for name, expected in want.items():
        actual = dict(got[name])
        assert abs(actual.pop("mtime") - expected["mtime"]) <= 1, name
        assert actual == {k: v for k, v in expected.items() if k != "mtime"}, name


@pytest.fixture(scope="module")
def edge_image(edge_tree: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A two-layer umoci image: the edge tree, then a layer that deletes and changes files."""
    work = tmp_path_factory.mktemp("edge-image")
    upper = work / "upper"
    subprocess.run(["cp", "-a", f"{edge_tree}/.", str(upper)], check=True)
    shutil.rmtree(upper / "special")
    (upper / "hello.txt").write_text("changed in layer 2\n")
    (upper / "new-dir").mkdir()
    (upper / "new-dir" / "file").write_bytes(b"x" * 100_000)
    return make_oci_image(work / "oci", "edge", [edge_tree, upper])


@pytest.fixture(scope="module")
def tar_image(edge_tree: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An image whose layers are GNU tar's own output: PAX and GNU headers, sparse entries, './' names."""
    work = tmp_path_factory.mktemp("tar-image")
    layers = [make_layer_tar(edge_tree, work / "pax.tar.gz", "pax", gzip=True),
              make_layer_tar(edge_tree, work / "gnu.tar", "gnu", dot_prefix=True)]
    return write_oci_layout(work / "oci", "tars", layers)


def _layer_pairs(src_layout: Path, src_tag: str, out_layout: Path, out_tag: str):
    _, _, src_layers = read_layout(src_layout, src_tag)
    _, config, out_layers = read_layout(out_layout, out_tag)
    assert len(src_layers) == len(out_layers) == len(config["rootfs"]["diff_ids"])
    return zip(src_layers, out_layers, config["rootfs"]["diff_ids"], strict=True)


@pytest.mark.parametrize("zstd", [False, True], ids=["estargz", "zstdchunked"])
def test_toc_reads_reference_output(containerd, edge_image: Path, tmp_path: Path, zstd: bool) -> None:
    out = tmp_path / "ref"
    ref_convert(containerd, edge_image, "edge", out, zstd=zstd)
    for (src_blob, _), (blob, desc), _ in _layer_pairs(edge_image, "edge", out, "edge"):
        want = describe_tar(src_blob)
        got = describe_blob(blob, desc["annotations"][TOC_DIGEST_ANNOTATION])
        assert_same_entries(got, want)


@pytest.mark.parametrize("zstd", [False, True], ids=["estargz", "zstdchunked"])
@pytest.mark.parametrize("image,tag", [("edge_image", "edge"), ("tar_image", "tars")])
def test_reference_verifies_our_output(containerd, estargz_verifier: Path, request: pytest.FixtureRequest,
                                       tmp_path: Path, image: str, tag: str, zstd: bool) -> None:
    src = request.getfixturevalue(image)
    out = tmp_path / "ours"
    cmd = [*LAZYMOUNT, "convert", "-q", "--chunk-size", "1M", f"oci:{src}:{tag}", f"oci:{out}:{tag}"]
    subprocess.run(cmd + (["--zstd"] if zstd else []), check=True)
    for (src_blob, _), (blob, desc), diff_id in _layer_pairs(src, tag, out, tag):
        toc_digest = desc["annotations"][TOC_DIGEST_ANNOTATION]
        want = describe_tar(src_blob)
        assert_same_entries(describe_blob(blob, toc_digest), want)
        seen = verify_with_reference(estargz_verifier, blob, toc_digest, zstd=zstd)
        landmarks = (toc.NO_PREFETCH_LANDMARK, toc.PREFETCH_LANDMARK)
        files = {n: r["sha256"] for n, r in seen.items() if r["type"] == "reg" and n not in landmarks}
        assert files == regular_file_digests(want)  # the reference resolves hardlinks to their content
        assert ref_get_toc_digest(containerd, blob, zstd=zstd) == toc_digest
        raw = _decompress(blob, zstd)
        assert diff_id == "sha256:" + hashlib.sha256(raw).hexdigest()
        assert desc["annotations"][UNCOMPRESSED_SIZE_ANNOTATION] == str(len(raw))
        assert desc["digest"] == "sha256:" + hashlib.sha256(blob.read_bytes()).hexdigest()
        listed = subprocess.run(["tar", "-t", "--zstd" if zstd else "-z", "-f", str(blob)], check=True,
                                capture_output=True, text=True).stdout.split("\n")
        assert toc.NO_PREFETCH_LANDMARK in listed
        assert (toc.TOC_TAR_NAME in listed) != zstd


def _decompress(blob: Path, zstd: bool) -> bytes:
    if zstd:
        import zstandard
        return zstandard.ZstdDecompressor().stream_reader(blob.read_bytes(), read_across_frames=True).read()
    return gzip.decompress(blob.read_bytes())


def test_estargz_layers_are_kept_byte_for_byte(containerd, edge_image: Path, tmp_path: Path) -> None:
    ref = tmp_path / "ref"
    ref_convert(containerd, edge_image, "edge", ref)
    again = tmp_path / "again"
    subprocess.run([*LAZYMOUNT, "convert", "-q", f"oci:{ref}:edge", f"oci:{again}:edge"], check=True)
    for (_, before), (_, after), _ in _layer_pairs(ref, "edge", again, "edge"):
        assert after["digest"] == before["digest"]
        assert after["annotations"][TOC_DIGEST_ANNOTATION] == before["annotations"][TOC_DIGEST_ANNOTATION]


def test_prioritized_files_come_first(edge_tree: Path, tmp_path: Path) -> None:
    layer = make_layer_tar(edge_tree, tmp_path / "layer.tar", "pax")
    wanted = ["links/hard-b", "data/big-9m", "names/ünïcödé/日本語.txt", "no/such/file"]
    (tmp_path / "list").write_text("\n".join(wanted) + "\n")
    blob = tmp_path / "layer.esgz"
    cmd = [*LAZYMOUNT, "convert", "-q", "--prioritize", str(tmp_path / "list"), str(layer), str(blob)]
    subprocess.run(cmd, check=True)
    data = blob.read_bytes()
    _, toc_json = tocread.read_toc_json(lambda off, n: data[off:off + n], len(data))
    names = [toc.normalize_name(e["name"]) for e in json.loads(toc_json)["entries"] if e["type"] != "chunk"]
    landmark = names.index(toc.PREFETCH_LANDMARK)
    before = names[:landmark]
    source = describe_tar(layer)
    target = source["links/hard-b"]["linkname"]  # the first name of the group in tar order
    assert "/" not in target
    # every parent directory, and a hardlink's target, come before the file
    assert before == ["links", target, "links/hard-b", "data", "data/big-9m", "names",
                      "names/ünïcödé", "names/ünïcödé/日本語.txt"]
    assert toc.NO_PREFETCH_LANDMARK not in names
    assert sorted(names[landmark + 1:] + before) == sorted(source)
    index = tocread.read_index(lambda off, n: data[off:off + n], len(data))
    assert index.prefetch_end is not None and 0 < index.prefetch_end < len(data)


@pytest.fixture(scope="module")
def bad_inputs(edge_tree: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Damaged sources and blobs, derived from a real layer."""
    work = tmp_path_factory.mktemp("bad")
    layer = make_layer_tar(edge_tree, work / "layer.tar.gz", "pax", gzip=True)
    data = layer.read_bytes()
    subprocess.run([*LAZYMOUNT, "convert", "-q", str(layer), str(work / "good.esgz")], check=True)
    blob = (work / "good.esgz").read_bytes()
    files = {
        "empty": b"",
        "garbage": b"not a tar at all" * 100,
        "gzip-garbage": b"\x1f\x8b" + b"\0" * 100,
        "cut.tar.gz": data[: len(data) // 2],
        "cut.esgz": blob[:-10],
        "badtoc.esgz": blob[:-60] + b"\xff" * 9 + blob[-51:],
    }
    for name, content in files.items():
        (work / name).write_bytes(content)
    return work


@pytest.mark.parametrize("args,status,message", [
    (["inspect", "{d}/empty"], 0, "not eStargz"),
    (["inspect", "--toc", "{d}/gzip-garbage"], 1, "no eStargz, stargz or zstd:chunked footer"),
    (["inspect", "{d}/garbage"], 0, "not eStargz"),
    (["inspect", "{d}/cut.esgz"], 0, "not eStargz"),
    (["inspect", "--toc", "{d}/badtoc.esgz"], 1, "TOC"),
    (["inspect", "/no/such/file"], 1, "No such file"),
    (["convert", "-q", "{d}/garbage", "{d}/out"], 1, "not a valid tar"),
    (["convert", "-q", "{d}/empty", "{d}/out"], 1, "not a valid tar"),
    (["convert", "-q", "{d}/gzip-garbage", "{d}/out"], 1, "corrupt or truncated"),
    (["convert", "-q", "{d}/cut.tar.gz", "{d}/out"], 1, "truncated"),
    (["convert", "-q", "oci:{d}/no-layout:x", "oci:{d}/out2:x"], 1, "index.json: No such file"),
])
def test_cli_bad_input(bad_inputs: Path, args: list[str], status: int, message: str) -> None:
    """Bad input: a one-line message, the right exit status, never a traceback or a partial output."""
    result = subprocess.run([*LAZYMOUNT, *(a.format(d=bad_inputs) for a in args)], capture_output=True,
                            text=True)
    assert result.returncode == status, result
    assert "Traceback" not in result.stderr
    if status:
        assert result.stderr.startswith("lazymount: error:") and result.stderr.count("\n") == 1, result.stderr
        assert message in result.stderr
    else:
        assert message in result.stdout
    assert not (bad_inputs / "out").exists()
