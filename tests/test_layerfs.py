"""layerfs.py, the snapshotter's layer daemon, as FUSE operations called directly (no mount): layers
loaded from spec files on first use, paths dispatched to each layer's raw tree, inode numbers kept apart,
file handles of several layers, a failed load reported and retried, a removed spec forgetting the layer.
The daemon mounted under a real snapshotter and containerd is tested in test_snapshotter.py."""

from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path

import pytest

import cache
import convert
import layerfs
import mountctl
from imagebuild import make_layer_tar


class LocalBlobs:
    """A registry client stand-in: its public range API (`read_spans`) over local blob files by digest."""

    def __init__(self) -> None:
        self.files: dict[str, Path] = {}

    def read_spans(self, reference: str, digest: str, size: int, spans: list[tuple[int, int]],
                   on_whole_blob: object, urgent: bool = False) -> list[bytes]:
        with open(self.files[digest], "rb") as f:
            return [os.pread(f.fileno(), end - start, start) for start, end in spans]


def _layer(work: Path, files: dict[str, bytes], blobs: LocalBlobs) -> tuple[str, int, str]:
    """An eStargz layer of `files` (relative path -> bytes): (digest, size, TOC digest)."""
    root = work / "tree"
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    tar = make_layer_tar(root, work / "layer.tar")
    info = convert.convert_layer_file(tar, work / "layer.esgz", convert.ConvertOptions(progress=False))
    blobs.files[info.digest] = work / "layer.esgz"
    return info.digest, info.size, info.toc_digest


@pytest.fixture()
def setup(tmp_path: Path) -> tuple[layerfs.LayersFS, Path, list[tuple[str, int, str]]]:
    blobs = LocalBlobs()
    layers = [_layer(tmp_path / "a", {"etc/os-release": b"ID=test\n", "bin/tool": b"x" * 10_000}, blobs),
              _layer(tmp_path / "b", {"etc/.wh.os-release": b"", "hello.txt": b"hello\n"}, blobs)]
    specs = tmp_path / "specs"
    ready = []
    fs = layerfs.LayersFS(specs, tmp_path / "mnt", blobs, cache.ChunkCache(None), tmp_path / "cache",
                          lambda: ready.append(True), prefetch=False, background=False)
    fs.init("/")
    assert ready == [True]
    return fs, specs, layers


def test_layers_are_top_level_directories(setup: tuple) -> None:
    fs, specs, layers = setup
    for name, (digest, size, toc_digest) in zip(("1", "2"), layers, strict=True):
        mountctl.write_spec(specs, name, "oci:/nowhere", digest, size, toc_digest)
    assert fs.sync("1")["digest"] == layers[0][0]
    with pytest.raises(OSError) as raised:
        fs.open("/1/etc/os-release", os.O_RDONLY)
    assert raised.value.errno == errno.ENOSYS  # success: the kernel opens files without asking again
    assert fs.read("/1/etc/os-release", 100, 0, 0) == b"ID=test\n"
    # the upper layer alone, raw: its whiteout is a 0:0 character device, as overlayfs wants it
    whiteout = fs.getattr("/2/etc/os-release")
    assert stat.S_ISCHR(whiteout["st_mode"]) and whiteout["st_rdev"] == 0
    assert [entry[0] for entry in fs.readdir("/", 0)] == [".", "..", "1", "2"]
    stats = json.loads(fs.getxattr("/", mountctl.STATS_XATTR))  # what `lazymount stats MOUNT` shows
    assert [layer["digest"] for layer in stats["layers"]] == [layers[0][0], layers[1][0]]

    inodes: dict[str, set[int]] = {"1": set(), "2": set()}
    for name in inodes:
        inodes[name] = {attrs["st_ino"] for _, attrs, _ in fs.readdir(f"/{name}", 0)}
        inodes[name] |= {attrs["st_ino"] for _, attrs, _ in fs.readdir(f"/{name}/etc", 0)}
        assert fs.getattr(f"/{name}")["st_ino"] in inodes[name]
    assert not inodes["1"] & inodes["2"] and fs.getattr("/")["st_ino"] not in inodes["1"] | inodes["2"]
    assert fs.read("/2/hello.txt", 100, 0, 0) == b"hello\n"
    assert fs.read("/1/bin/tool", 5, 9_998, 0) == b"xx"


def test_missing_invalid_and_failing_layers(setup: tuple) -> None:
    fs, specs, layers = setup
    for path in ("/3", "/3/etc", "/..x", "/a.b"):
        with pytest.raises(OSError) as raised:
            fs.getattr(path)
        assert raised.value.errno == errno.ENOENT, path
    digest, size, _ = layers[0]
    mountctl.write_spec(specs, "4", "oci:/nowhere", digest, size, "sha256:" + "0" * 64)
    assert fs.sync("4")["error"].startswith("TOC digest")
    with pytest.raises(OSError) as raised:
        fs.getattr("/4")
    assert raised.value.errno == errno.EIO, "an error, not a cached ENOENT"
    mountctl.write_spec(specs, "4", "oci:/nowhere", *layers[0])
    assert "error" not in fs.sync("4"), "a failed load is tried again"
    with pytest.raises(mountctl.MountError):
        mountctl.write_spec(specs, "../x", "oci:/nowhere", *layers[0])


def test_removed_spec_forgets_the_layer(setup: tuple) -> None:
    fs, specs, layers = setup
    mountctl.write_spec(specs, "1", "oci:/nowhere", *layers[0])
    assert fs.read("/1/etc/os-release", 100, 0, 0) == b"ID=test\n"
    mountctl.spec_path(specs, "1").unlink()
    with pytest.raises(OSError) as raised:
        fs.sync("1")
    assert raised.value.errno == layerfs.mfusepy.ENOATTR
    assert [entry[0] for entry in fs.readdir("/", 0)] == [".", ".."]
    with pytest.raises(OSError) as raised:
        fs.read("/1/etc/os-release", 100, 0, 0)
    assert raised.value.errno == errno.ENOENT
    fs.destroy("/")
