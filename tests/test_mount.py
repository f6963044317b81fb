"""lazymount mount/umount/stats against the real stack: docker-registry on loopback, umoci-built images
converted by `lazymount convert`, pushed with skopeo, mounted with real FUSE.

Ground truth is `umoci unpack` of the source image, compared entry by entry with images.describe_tree.
Every daemon is stopped by its PID and every mount unmounted in finalizers, even when a test fails.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import cachetools
import pytest

from imagebuild import add_blob, describe_tree, make_layer_tar, make_oci_image, write_oci_layout
from tests.reference import Containerd, read_layout, ref_convert, ref_unpacked
from tests.registry import Fault, FaultProxy, Registry, push_layout
from toc import MEDIA_LAYER_TAR

REPO = Path(__file__).resolve().parent.parent
MIB = 1 << 20
NEEDED = ("fusermount3", "umoci", "skopeo", "docker-registry")

MISSING = [t for t in NEEDED if shutil.which(t) is None]
MISSING += [] if os.path.exists("/dev/fuse") else ["/dev/fuse"]
pytestmark = pytest.mark.skipif(bool(MISSING), reason=f"not installed: {', '.join(MISSING)}")


def lazymount(*args: str, check: bool = True, env: dict | None = None,
              user: str | None = None) -> subprocess.CompletedProcess:
    """Run the CLI (as `user` through runuser if given)."""
    prefix = ["runuser", "-u", user, "--"] if user else []
    return subprocess.run([*prefix, sys.executable, str(REPO / "lazymount.py"), *args], check=check,
                          capture_output=True, text=True, timeout=300, env=env)


def stats(mountpoint: Path, user: str | None = None) -> dict:
    return json.loads(lazymount("stats", "--json", str(mountpoint), user=user).stdout)


def force_unmount(mountpoint: Path, pid: int | None) -> None:
    """Finalizer: unmount (then lazily), then stop the daemon by its PID if it is still there."""
    unmounted = subprocess.run(["fusermount3", "-u", str(mountpoint)], capture_output=True).returncode == 0
    if not unmounted and os.path.ismount(mountpoint):
        subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], capture_output=True)
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, 9)


@contextlib.contextmanager
def mounted(ref: str, mountpoint: Path, *options: str, env: dict | None = None,
            user: str | None = None) -> Iterator[int]:
    """Mount with `lazymount mount` (background daemon); yield the daemon's PID; always clean up."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    pid = None
    try:
        lazymount("mount", ref, str(mountpoint), *options, env=env, user=user)
        pid = stats(mountpoint, user)["pid"]
        yield pid
    finally:
        force_unmount(mountpoint, pid)


def umoci_unpack(layout: Path, tag: str, bundle: Path) -> Path:
    subprocess.run(["umoci", "unpack", "--image", f"{layout}:{tag}", str(bundle)], check=True,
                   capture_output=True)
    return bundle / "rootfs"


def convert(src: Path, dst: Path, tag: str) -> None:
    lazymount("convert", "-q", f"oci:{src}:{tag}", f"oci:{dst}:{tag}")


def sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


# ------------------------------------------------------------------------------------------- fixtures


def _implied_dir_layer(work: Path) -> Path:
    """A layer holding only `real/added-by-upper` and `fresh/implied/leaf`: no entries for the dirs."""
    tree = work / "implied-tree"
    (tree / "real").mkdir(parents=True)
    (tree / "real" / "added-by-upper").write_bytes(b"implied parent keeps lower metadata\n")
    (tree / "fresh" / "implied").mkdir(parents=True)
    (tree / "fresh" / "implied" / "leaf").write_bytes(b"leaf\n")
    out = work / "implied.tar"
    subprocess.run(["tar", "--create", "--file", str(out), "--directory", str(tree), "--format=pax",
                    "--numeric-owner", "--no-recursion", "real/added-by-upper", "fresh/implied/leaf"],
                   check=True)
    return out


@pytest.fixture(scope="module")
def edge_image(tmp_path_factory: pytest.TempPathFactory, edge_tree: Path) -> tuple[Path, str]:
    """A 4-layer OCI layout: the edge tree; whiteouts of a file, a dir and one hardlink name plus new
    and changed files; an opaque `names/`; a hand-made layer implying existing and new directories."""
    work = tmp_path_factory.mktemp("edge-image")
    lower, upper = work / "t0", work / "t1"
    subprocess.run(["cp", "-a", str(edge_tree), str(lower)], check=True)
    subprocess.run(["cp", "-a", str(lower), str(upper)], check=True)
    (upper / "hello.txt").unlink()
    shutil.rmtree(upper / "times")
    (upper / "links" / "hard-b").unlink()
    (upper / "links" / "hard-b").write_bytes(b"no longer a hardlink\n")
    (upper / "data" / "4m-plus-1").write_bytes(os.urandom(MIB + 7))
    (upper / "newdir").mkdir()
    (upper / "newdir" / "file").write_bytes(b"new in the upper layer\n")
    shutil.rmtree(upper / "names" / "ünïcödé")
    (upper / "names" / "only-after-opaque").write_bytes(b"opaque\n")
    os.utime(upper / "names", (1_700_000_001, 1_700_000_001))
    staged = make_oci_image(work / "staged", "v1", [lower, upper], opaque_dirs={1: ["names"]})
    _, _, layers = read_layout(staged, "v1")
    layout = write_oci_layout(work / "src", "v1", [path for path, _ in layers] + [_implied_dir_layer(work)])
    return layout, "v1"


@pytest.fixture(scope="module")
def edge_expected(edge_image: tuple[Path, str], tmp_path_factory: pytest.TempPathFactory) -> dict:
    layout, tag = edge_image
    return describe_tree(umoci_unpack(layout, tag, tmp_path_factory.mktemp("unpack") / "bundle"))


@pytest.fixture(scope="module")
def edge_reference_pushed(edge_image: tuple[Path, str], registry: Registry, containerd: Containerd,
                          tmp_path_factory: pytest.TempPathFactory) -> str:
    """The edge image converted by the reference (`ctr-remote image convert --estargz`) and pushed."""
    layout, tag = edge_image
    converted = tmp_path_factory.mktemp("edge-ref") / "oci"
    ref_convert(containerd, layout, tag, converted)
    push_layout(converted, tag, registry, "edge-ref")
    return f"{registry.host}/edge-ref:{tag}"


@pytest.fixture(scope="module")
def edge_converted(edge_image: tuple[Path, str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    layout, tag = edge_image
    converted = tmp_path_factory.mktemp("edge-conv") / "oci"
    convert(layout, converted, tag)
    return converted


@pytest.fixture(scope="module")
def edge_zstd_pushed(edge_image: tuple[Path, str], registry: Registry,
                     tmp_path_factory: pytest.TempPathFactory) -> str:
    layout, tag = edge_image
    converted = tmp_path_factory.mktemp("edge-zstd") / "oci"
    lazymount("convert", "-q", "--zstd", f"oci:{layout}:{tag}", f"oci:{converted}:{tag}")
    push_layout(converted, tag, registry, "edge-zstd")
    return f"{registry.host}/edge-zstd:{tag}"


@pytest.fixture(scope="module")
def edge_pushed(edge_image: tuple[Path, str], edge_converted: Path, registry: Registry) -> str:
    layout, tag = edge_image
    push_layout(edge_converted, tag, registry, "edge")
    push_layout(layout, tag, registry, "edge-plain")
    return f"{registry.host}/edge:{tag}"


# Directories no layer has an entry for: umoci creates them at unpack time with the current mtime;
# lazymount shows mtime 0 (deterministic).  Everything else about them must match.
NEW_IMPLIED_DIRS = ("fresh", "fresh/implied")


def _assert_same_tree(actual: dict, expected: dict) -> None:
    """Entry by entry; eStargz TOCs hold whole seconds rounded (the writers' choice), describe_tree
    truncates: an mtime may be one second later than umoci's."""
    assert sorted(actual) == sorted(expected)
    for name, want in expected.items():
        if name in NEW_IMPLIED_DIRS:
            want = {**want, "mtime": 0}
        got = actual[name]
        assert got["mtime"] - want["mtime"] in (0, 1), name
        assert {**got, "mtime": 0} == {**want, "mtime": 0}, name


def _listings_to_list_again(mnt: Path, directory: str) -> int:
    """How many listings the daemon at `mnt` makes to list `directory` a second time."""
    os.listdir(mnt / directory)
    before = stats(mnt)["listings"]
    os.listdir(mnt / directory)
    return stats(mnt)["listings"] - before


# ----------------------------------------------------------------------------------------------- tests


def test_merged_tree_equals_umoci_unpack(edge_pushed: str, edge_expected: dict, tmp_path: Path) -> None:
    """Every entry of the mounted eStargz image equals `umoci unpack`: whiteouts, opaque and implied
    directories, hardlink groups (one inode, visible nlink), xattrs, devices, modes, owners, mtimes."""
    mnt = tmp_path / "mnt"
    with mounted(edge_pushed, mnt, "--cache-dir", str(tmp_path / "cache"), "--no-background-fetch"):
        _assert_same_tree(describe_tree(mnt), edge_expected)
        assert stats(mnt)["listings"] >= len({name.rpartition("/")[0] for name in edge_expected})
        # a second walk: the same tree, from the kernel's cache of listings (FOPEN_CACHE_DIR) ...
        _assert_same_tree(describe_tree(mnt), edge_expected)
        # ... which holds a listing once made (unless `drop_caches` on the shared host empties it meanwhile)
        assert any(_listings_to_list_again(mnt, "data") == 0 for _ in range(3))
        root = os.stat(mnt)
        assert root.st_ino == 1
        hard = [os.stat(mnt / p) for p in ("links/hard-a", "hard-c")]
        assert hard[0].st_ino == hard[1].st_ino and hard[0].st_nlink == 2
        assert os.stat(mnt / "data/big-9m").st_blocks == -(-os.stat(mnt / "data/big-9m").st_size // 512)
        assert not any(n.startswith(".wh.") or "landmark" in n for n in os.listdir(mnt / "names"))
        with pytest.raises(OSError) as e:
            (mnt / "newdir" / "x").write_bytes(b"")
        assert e.value.errno == errno.EROFS
        with pytest.raises(OSError) as e:
            open(mnt / "newdir" / "file", "r+b")  # noqa: SIM115
        assert e.value.errno == errno.EROFS
        fs = os.statvfs(mnt)
        assert fs.f_bsize == 4096 and fs.f_blocks > 0 and fs.f_namemax == 255
        mounts = Path("/proc/self/mountinfo").read_text()
        line = next(x for x in mounts.splitlines() if f" {mnt} " in x)
        assert "nosuid" in line and "nodev" in line and "ro" in line.split()[5].split(",")
        # coreutils cp uses SEEK_DATA/SEEK_HOLE: it must finish and copy the sparse file exactly
        copy = tmp_path / "sparse-copy"
        subprocess.run(["cp", str(mnt / "sparse/holes-10m"), str(copy)], check=True, timeout=60)
        assert sha256(copy) == edge_expected["sparse/holes-10m"]["sha256"]
        inodes = {name: os.lstat(mnt / name).st_ino for name in edge_expected}
    again = tmp_path / "again"
    with mounted(edge_pushed, again, "--cache-dir", str(tmp_path / "cache"), "--no-background-fetch"):
        # another mount, another lookup order: the same inode numbers
        assert {name: os.lstat(again / name).st_ino for name in reversed(edge_expected)} == inodes


@pytest.mark.parametrize("variant", ["ctr-remote", "zstd"])
def test_other_conversions_equal_umoci_unpack(variant: str, request: pytest.FixtureRequest,
                                              edge_expected: dict, tmp_path: Path) -> None:
    """The same image converted by ctr-remote (gzip level 9, its own TOC writer) and by our
    zstd:chunked writer mounts identically."""
    ref = request.getfixturevalue("edge_reference_pushed" if variant == "ctr-remote" else "edge_zstd_pushed")
    mnt = tmp_path / "mnt"
    with mounted(ref, mnt, "--cache-dir", str(tmp_path / "cache")):
        _assert_same_tree(describe_tree(mnt), edge_expected)
        layers = stats(mnt)["layers"]
        assert {layer["state"] for layer in layers} == {"lazy"}
        want = "estargz" if variant == "ctr-remote" else "zstd:chunked"
        assert {layer["format"] for layer in layers} == {want}


def test_empty_xattr_values_are_kept(registry: Registry, containerd: Containerd, tmp_path: Path) -> None:
    """An empty xattr value is a value: a GNU tar layer whose file carries `user.lazymount` = "v1" and
    `user.empty` = "" (umoci would drop the latter, so no umoci in between) mounts with both, through
    listxattr and getxattr, converted by lazymount and by ctr-remote, as containerd's own unpack has them."""
    tree = tmp_path / "tree"
    (tree / "d").mkdir(parents=True)
    (tree / "d" / "f").write_bytes(b"has xattrs\n")
    os.setxattr(tree / "d" / "f", "user.lazymount", b"v1")
    os.setxattr(tree / "d" / "f", "user.empty", b"")
    layout = write_oci_layout(tmp_path / "src", "v1", [make_layer_tar(tree, tmp_path / "layer.tar")])
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    convert(layout, ours, "v1")
    ref_convert(containerd, layout, "v1", theirs)
    toc_json = lazymount("inspect", "--toc", str(read_layout(ours, "v1")[2][0][0])).stdout
    entry = next(e for e in json.loads(toc_json)["entries"] if e["name"] == "d/f")
    assert entry["xattrs"] == {"user.lazymount": "djE=", "user.empty": ""}
    want = {"user.lazymount": b"v1", "user.empty": b""}
    with ref_unpacked(containerd, layout, "v1", tmp_path / "unpacked") as unpacked:
        expected = describe_tree(unpacked)
    assert expected["d/f"]["xattrs"] == want
    for name, converted in (("xattr-ours", ours), ("xattr-theirs", theirs)):
        push_layout(converted, "v1", registry, name)
        mnt = tmp_path / name
        with mounted(f"{registry.host}/{name}:v1", mnt, "--cache-dir", str(tmp_path / "cache")):
            assert sorted(os.listxattr(mnt / "d" / "f")) == sorted(want)
            assert {x: os.getxattr(mnt / "d" / "f", x) for x in want} == want
            _assert_same_tree(describe_tree(mnt), expected)


def test_plain_layers_downloaded_in_background(edge_pushed: str, edge_expected: dict, registry: Registry,
                                               tmp_path: Path) -> None:
    """An image of plain gzip layers mounts too: each layer is downloaded whole, verified, converted
    locally and served; the fact is logged once per layer."""
    mnt, log_file = tmp_path / "mnt", tmp_path / "daemon.log"
    with mounted(f"{registry.host}/edge-plain:v1", mnt, "--cache-dir", str(tmp_path / "cache"),
                 "--log-file", str(log_file)):
        _assert_same_tree(describe_tree(mnt), edge_expected)
        # the root's attributes, shown bare while the layers were downloading, are the image's now
        assert os.stat(mnt).st_nlink == 2 + sum(1 for e in os.scandir(mnt) if e.is_dir(follow_symlinks=False))
        layers = stats(mnt)["layers"]
        assert {layer["state"] for layer in layers} == {"local"}
    log = log_file.read_text()
    for layer in layers:
        assert log.count(f"layer {layer['digest']} ({MEDIA_LAYER_TAR}") == 1


def test_corrupt_plain_layer_fails_at_once(tmp_path: Path) -> None:
    """A plain layer whose verified bytes are no layer (a gzip stream cut short): the mount stays up, the
    layer is marked failed and not downloaded again, and every access fails with EIO at once instead of
    waiting for a download that cannot succeed."""
    import gzip
    import io
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        info = tarfile.TarInfo("data.bin")
        info.size = 300_000
        tar.addfile(info, io.BytesIO(os.urandom(info.size)))
    whole = tmp_path / "layer.tar.gz"
    whole.write_bytes(gzip.compress(raw.getvalue()))
    layout = write_oci_layout(tmp_path / "layout", "v1", [whole])
    index = json.loads((layout / "index.json").read_text())
    entry = index["manifests"][0]
    manifest = json.loads((layout / "blobs/sha256" / entry["digest"][7:]).read_bytes())
    layer = manifest["layers"][0]
    layer["digest"], layer["size"] = add_blob(layout, whole.read_bytes()[:-50_000])
    entry["digest"], entry["size"] = add_blob(layout, json.dumps(manifest).encode())
    (layout / "index.json").write_text(json.dumps(index))
    mnt, log_file = tmp_path / "mnt", tmp_path / "daemon.log"
    with mounted(f"oci:{layout}:v1", mnt, "--cache-dir", str(tmp_path / "cache"),
                 "--log-file", str(log_file)):
        listing = subprocess.run(["ls", str(mnt)], capture_output=True, text=True, timeout=120)
        assert listing.returncode != 0 and "Input/output error" in listing.stderr
        (layer,) = stats(mnt)["layers"]
        assert layer["state"] == "failed" and "corrupt or truncated" in layer["error"]
        time.sleep(3)  # a retry would come after 1 s, then 2 s
        assert log_file.read_text().count("its files cannot be served") == 1
    if shutil.which("bwrap"):
        run = lazymount("run", "--cache-dir", str(tmp_path / "cache"), f"oci:{layout}:v1", "--", "true",
                        check=False)
        assert run.returncode == 1 and run.stdout == ""
        assert run.stderr.startswith(f"lazymount: error: layer {manifest['layers'][0]['digest']}: source "
                                     "layer is corrupt or truncated") and run.stderr.count("\n") == 1


def test_relative_paths_and_read_ahead(tmp_path: Path) -> None:
    """`mount oci:DIR MNT --cache-dir D` with paths relative to the caller's directory (the daemon works
    from /), and the mount's read-ahead raised to 1 MiB (its device found in /proc/self/mountinfo, not
    by a stat of the mount point, which would be a call to the daemon's own file system)."""
    (tmp_path / "tree").mkdir()
    (tmp_path / "tree/hello").write_text("hi\n")
    tar = make_layer_tar(tmp_path / "tree", tmp_path / "layer.tar")
    write_oci_layout(tmp_path / "layout", "v1", [tar])
    (tmp_path / "mnt").mkdir()
    command = [sys.executable, str(REPO / "lazymount.py"), "mount", "oci:layout:v1", "mnt",
               "--cache-dir", "c"]
    try:
        subprocess.run(command, cwd=tmp_path, check=True, capture_output=True, timeout=120)
        assert (tmp_path / "mnt/hello").read_text() == "hi\n"
        device = os.stat(tmp_path / "mnt").st_dev
        read_ahead = Path(f"/sys/class/bdi/{os.major(device)}:{os.minor(device)}/read_ahead_kb")
        assert read_ahead.read_text().strip() == "1024"  # raised before `mount` returns
        assert (tmp_path / "c").is_dir()
    finally:
        force_unmount(tmp_path / "mnt", None)


def test_image_without_layers_is_one_line_error(tmp_path: Path) -> None:
    layout = write_oci_layout(tmp_path / "layout", "v1", [])
    (tmp_path / "mnt").mkdir()
    result = lazymount("mount", f"oci:{layout}:v1", str(tmp_path / "mnt"), check=False)
    assert (result.returncode, result.stderr) == (
        1, f"lazymount: error: oci:{layout}:v1 has no layers: there is nothing to mount\n")
    assert not os.path.ismount(tmp_path / "mnt")


def _random_tree(root: Path, files: dict[str, int], seed: int = 7) -> Path:
    import random
    rng = random.Random(seed)
    for name, size in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(rng.randbytes(size))
    return root


@pytest.fixture(scope="module")
def big_image(tmp_path_factory: pytest.TempPathFactory, registry: Registry) -> tuple[str, Path, dict]:
    """One eStargz layer of ~42 MiB random data in 4 MiB chunks plus small files; (ref, tree, digests)."""
    work = tmp_path_factory.mktemp("big")
    files = {"small.txt": 100, **{f"blob/part{i}.bin": 6 * MIB + i for i in range(6)},
             **{f"etc/conf{i}": 2000 + i for i in range(20)},
             **{f"many/entry-{i:04d}-{'x' * 80}": i % 50 for i in range(600)}}  # listed in many replies
    tree = _random_tree(work / "tree", files)
    src = make_oci_image(work / "src", "v1", [tree])
    converted = work / "conv"
    convert(src, converted, "v1")
    push_layout(converted, "v1", registry, "big")
    return f"{registry.host}/big:v1", tree, {name: sha256(tree / name) for name in files}


def test_one_small_file_fetches_only_its_chunk(big_image: tuple[str, Path, dict], tmp_path: Path) -> None:
    ref, tree, _ = big_image
    mnt = tmp_path / "mnt"
    with mounted(ref, mnt, "--cache-dir", str(tmp_path / "cache"), "--no-prefetch", "--no-background-fetch"):
        assert (mnt / "small.txt").read_bytes() == (tree / "small.txt").read_bytes()
        layer = stats(mnt)["layers"][0]
    assert layer["chunks_fetched"] == 1 and layer["requests"] == 1
    assert layer["bytes_served"] == 100
    assert 0 < layer["bytes_fetched"] < 1000  # one gzip member of 100 random bytes, not the 36 MiB


def test_files_stored_together_come_in_one_request(big_image: tuple[str, Path, dict], tmp_path: Path) -> None:
    """After a couple of misses, a miss brings the chunks stored after it along (up to 1 MiB)."""
    ref, _, digests = big_image
    names = sorted(name for name in digests if name.startswith("etc/"))
    mnt = tmp_path / "mnt"
    with mounted(ref, mnt, "--cache-dir", str(tmp_path / "cache"), "--no-prefetch", "--no-background-fetch"):
        assert {name: sha256(mnt / name) for name in names} == {name: digests[name] for name in names}
        layer = stats(mnt)["layers"][0]
    assert layer["chunks_fetched"] + layer["chunk_hits"] >= len(names)
    assert layer["requests"] <= 4, layer  # 20 files: two single misses, then their neighbours together
    assert layer["bytes_fetched"] < 100_000  # the 2 KB files and what follows them, not the 6 MiB blobs


def test_long_listing_continues_at_each_offset(big_image: tuple[str, Path, dict], tmp_path: Path) -> None:
    """A directory far longer than one READDIR(PLUS) reply lists every entry once, with its attributes."""
    ref, tree, _ = big_image
    mnt = tmp_path / "mnt"
    with mounted(ref, mnt, "--cache-dir", str(tmp_path / "cache"), "--no-prefetch", "--no-background-fetch"):
        listed = os.listdir(mnt / "many")
        attrs = {e.name: e.stat(follow_symlinks=False) for e in os.scandir(mnt / "many")}
    expected = {e.name: e.stat(follow_symlinks=False) for e in os.scandir(tree / "many")}
    assert len(listed) == len(set(listed)) == len(expected) == 600 and set(listed) == set(expected)
    assert {name: (st.st_mode, st.st_size) for name, st in attrs.items()} == {
        name: (st.st_mode, st.st_size) for name, st in expected.items()}
    assert len({st.st_ino for st in attrs.values()}) == 600


def _read_all(mnt: Path, names: list[str]) -> dict[str, str]:
    return {name: sha256(mnt / name) for name in names}


def test_two_mounts_share_a_bounded_cache(big_image: tuple[str, Path, dict], tmp_path: Path) -> None:
    """Two mounts on one cache dir, read concurrently from 8 threads: every byte right; the disk cache
    never grows past --cache-size."""
    ref, _, digests = big_image
    cache_dir, bound = tmp_path / "cache", 10 * MIB
    options = ("--cache-dir", str(cache_dir), "--cache-size", str(bound), "--no-prefetch",
               "--no-background-fetch")
    names = sorted(digests)
    with mounted(ref, tmp_path / "m1", *options), mounted(ref, tmp_path / "m2", *options):
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            jobs = [pool.submit(_read_all, tmp_path / m, names[k::2]) for m in ("m1", "m2") for k in (0, 1)]
            jobs += [pool.submit(_read_all, tmp_path / m, names[::-1]) for m in ("m1", "m2") for _ in (0, 1)]
            for job in jobs:
                for name, digest in job.result().items():
                    assert digest == digests[name], name
        for m in ("m1", "m2"):
            assert stats(tmp_path / m)["cache"]["bytes_on_disk"] <= bound
    on_disk = sum(p.stat().st_size for p in (cache_dir / "chunks").rglob("*") if p.is_file())
    assert 0 < on_disk <= bound


def _blob_file(registry: Registry, digest: str) -> Path:
    hexdigest = digest.split(":", 1)[1]
    return registry.workdir / "storage/docker/registry/v2/blobs/sha256" / hexdigest[:2] / hexdigest / "data"


def _restart_on_same_port(registry: Registry) -> None:
    with open(registry.workdir / "registry.log", "ab") as logfile:
        command = ["docker-registry", "serve", str(registry.workdir / "config.yml")]
        registry.process = subprocess.Popen(command, stdout=logfile, stderr=subprocess.STDOUT)
    assert registry._wait_ready()


@pytest.fixture()
def fast_fail_env(tmp_path: Path) -> dict:
    config = tmp_path / "config.yaml"
    config.write_text("registry_defaults: {retries: 1, retry_backoff: 0.05, connect_timeout: 2, "
                      "read_timeout: 5, operation_timeout: 10}\n")
    return dict(os.environ, LAZYMOUNT_CONFIG=str(config))


def test_registry_down_gives_eio_then_recovers(tmp_path: Path, fast_fail_env: dict,
                                                tmp_path_factory: pytest.TempPathFactory) -> None:
    """With the registry stopped a read fails with EIO after the retry budget, the mount stays up, and
    the same read succeeds once the registry is back."""
    reg = Registry(tmp_path_factory.mktemp("registry-down")).start()
    try:
        tree = _random_tree(tmp_path / "tree", {"a.bin": 300_000, "b.bin": 200_000})
        src = make_oci_image(tmp_path / "src", "v1", [tree])
        convert(src, tmp_path / "conv", "v1")
        push_layout(tmp_path / "conv", "v1", reg, "down")
        mnt = tmp_path / "mnt"
        with mounted(f"{reg.host}/down:v1", mnt, "--cache-dir", str(tmp_path / "cache"), "--no-prefetch",
                     "--no-background-fetch", env=fast_fail_env):
            reg.stop()
            with pytest.raises(OSError) as e:
                (mnt / "a.bin").read_bytes()
            assert e.value.errno == errno.EIO
            assert sorted(os.listdir(mnt)) == ["a.bin", "b.bin"]
            _restart_on_same_port(reg)
            assert (mnt / "a.bin").read_bytes() == (tree / "a.bin").read_bytes()
            assert (mnt / "b.bin").read_bytes() == (tree / "b.bin").read_bytes()
    finally:
        reg.close()


@pytest.mark.parametrize("background", [False, True], ids=["on-demand", "background-staged"])
def test_corrupt_blob_byte_gives_eio_never_wrong_data(tmp_path: Path,
                                                       tmp_path_factory: pytest.TempPathFactory,
                                                       background: bool) -> None:
    """One byte flipped inside a file's compressed bytes in registry storage: reading that file is EIO
    (logged with layer and path), the other file still reads right, and nothing wrong is cached; the
    same when the background fetch has staged the corrupt bytes (they are verified before being served)."""
    reg = Registry(tmp_path_factory.mktemp("registry-corrupt")).start()
    try:
        tree = _random_tree(tmp_path / "tree", {"victim.bin": 500_000, "other.bin": 1000})
        src = make_oci_image(tmp_path / "src", "v1", [tree])
        convert(src, tmp_path / "conv", "v1")
        _, _, layers = read_layout(tmp_path / "conv", "v1")
        push_layout(tmp_path / "conv", "v1", reg, "corrupt")
        blob = _blob_file(reg, layers[0][1]["digest"])
        offset = _member_offset(layers[0][0], "victim.bin") + 200_000
        data = bytearray(blob.read_bytes())
        data[offset] ^= 0xFF
        blob.write_bytes(bytes(data))
        mnt, log_file = tmp_path / "mnt", tmp_path / "daemon.log"
        options = () if background else ("--no-background-fetch",)
        with mounted(f"{reg.host}/corrupt:v1", mnt, "--cache-dir", str(tmp_path / "cache"), "--no-prefetch",
                     *options, "--log-file", str(log_file)):
            if background:
                assert wait_for(mnt, "done")["layers"][0]["background_bytes"] > 500_000
            for _ in range(2):
                with pytest.raises(OSError) as e:
                    (mnt / "victim.bin").read_bytes()
                assert e.value.errno == errno.EIO
            assert (mnt / "other.bin").read_bytes() == (tree / "other.bin").read_bytes()
        log = log_file.read_text()
        assert f"layer {layers[0][1]['digest']}: /victim.bin:" in log
    finally:
        reg.close()


def _toc_entries(blob: Path) -> list[dict]:
    """The TOC entries of an eStargz blob, read as the tar.gz it also is."""
    with tarfile.open(blob, "r:gz") as tar:
        return json.load(tar.extractfile("stargz.index.json"))["entries"]


def _member_offset(blob: Path, name: str) -> int:
    """Compressed offset of a file's first gzip member."""
    return next(e["offset"] for e in _toc_entries(blob) if e.get("name") == name)


def test_layer_mount_shows_whiteouts_as_overlayfs_expects(edge_converted: Path, edge_pushed: str,
                                                          tmp_path: Path) -> None:
    """`--layer DIGEST` mounts one layer as an overlayfs lower dir: a whiteout is a 0:0 char device,
    an opaque directory carries trusted.overlay.opaque=y."""
    _, _, layers = read_layout(edge_converted, "v1")
    names = {d["digest"]: {e.get("name") for e in _toc_entries(path)} for path, d in layers}
    whiteout = next(digest for digest, n in names.items() if ".wh.hello.txt" in n)
    opaque = next(digest for digest, n in names.items() if "names/.wh..wh..opq" in n)
    for digest, check in ((whiteout, "whiteout"), (opaque, "opaque")):
        mnt = tmp_path / check
        with mounted(edge_pushed, mnt, "--layer", digest, "--cache-dir", str(tmp_path / "cache")):
            if check == "whiteout":
                st = os.lstat(mnt / "hello.txt")
                assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
                assert not (mnt / ".wh.hello.txt").exists()
            else:
                assert os.getxattr(mnt / "names", "trusted.overlay.opaque") == b"y"
                assert ".wh..wh..opq" not in os.listdir(mnt / "names")


def wait_for(mountpoint: Path, state: str) -> dict:
    """Poll `lazymount stats` until fetch_state is `state` (a wait, not a timing assertion)."""
    deadline = time.monotonic() + 120
    while (current := stats(mountpoint))["fetch_state"] != state:
        assert time.monotonic() < deadline, f"fetch_state stayed {current['fetch_state']}"
        time.sleep(0.05)
    return current


def test_landmark_prefetch_then_background_fetch(registry: Registry, tmp_path: Path) -> None:
    """Files before .prefetch.landmark are in the cache right after mounting; the background fetch
    then brings in everything else, so later reads fetch nothing."""
    tree = _random_tree(tmp_path / "tree", {"hot/a.bin": 5 * MIB, "hot/b.txt": 300, "cold/c.bin": 6 * MIB})
    src = make_oci_image(tmp_path / "src", "v1", [tree])
    (tmp_path / "hot.list").write_text("hot/a.bin\nhot/b.txt\n")
    lazymount("convert", "-q", "--prioritize", str(tmp_path / "hot.list"), f"oci:{src}:v1",
              f"oci:{tmp_path}/conv:v1")
    push_layout(tmp_path / "conv", "v1", registry, "landmark")
    ref = f"{registry.host}/landmark:v1"
    mnt = tmp_path / "m1"
    with mounted(ref, mnt, "--cache-dir", str(tmp_path / "c1"), "--no-background-fetch"):
        layer = wait_for(mnt, "prefetched")["layers"][0]
        assert layer["prefetched_bytes"] > 5 * MIB and layer["background_bytes"] == 0
        for name in ("hot/a.bin", "hot/b.txt"):
            assert sha256(mnt / name) == sha256(tree / name)
        assert stats(mnt)["layers"][0]["chunks_fetched"] == 0
        assert sha256(mnt / "cold/c.bin") == sha256(tree / "cold/c.bin")
        assert stats(mnt)["layers"][0]["chunks_fetched"] == 2
    mnt = tmp_path / "m2"
    with mounted(ref, mnt, "--cache-dir", str(tmp_path / "c2")):
        layer = wait_for(mnt, "done")["layers"][0]
        assert layer["background_bytes"] > 6 * MIB
        for name in ("hot/a.bin", "hot/b.txt", "cold/c.bin"):
            assert sha256(mnt / name) == sha256(tree / name)
        assert stats(mnt)["layers"][0]["chunks_fetched"] == 0


def test_background_fetch_stages_the_layer_and_reads_wait_for_it(registry: Registry, tmp_path: Path) -> None:
    """The background fetch asks for the layer's bytes in a few large ranges, staged without being
    decompressed; a read whose bytes are in a range on its way waits for it instead of asking the registry,
    and once the fetch is done every file reads without a request; the staged bytes are gone by then."""
    files = {f"pkg/mod{i:02d}.bin": 40_000 + i for i in range(60)}
    tree = _random_tree(tmp_path / "tree", files)
    convert(make_oci_image(tmp_path / "src", "v1", [tree]), tmp_path / "conv", "v1")
    push_layout(tmp_path / "conv", "v1", registry, "staged")
    proxy = FaultProxy(registry.host).add(Fault("delay", seconds=1.0, times=-1))  # every blob request
    mnt, cache_dir = tmp_path / "mnt", tmp_path / "cache"

    def blob_requests() -> list[str]:
        with proxy.lock:
            return [headers.get("Range", "") for _, path, headers in proxy.seen if "/blobs/" in path]

    try:
        with mounted(f"{proxy.host}/staged:v1", mnt, "--cache-dir", str(cache_dir)) as pid:
            while not any(_range_length(r) > MIB for r in blob_requests()):  # the background range is asked
                time.sleep(0.05)
            asked = len(blob_requests())
            assert sha256(mnt / "pkg/mod30.bin") == sha256(tree / "pkg/mod30.bin")
            layer = wait_for(mnt, "done")["layers"][0]
            assert len(blob_requests()) == asked  # the read waited for the range on its way
            assert layer["chunks_fetched"] == 0 and layer["background_bytes"] > 60 * 40_000
            for name in files:
                assert sha256(mnt / name) == sha256(tree / name)
            after = stats(mnt)["layers"][0]
            assert after["requests"] == layer["requests"] and after["chunks_fetched"] == 0
            scratch = [os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir()]
            assert not [link for link in scratch if link.startswith(str(cache_dir / "layers"))], scratch
    finally:
        proxy.stop()


def _range_length(header: str) -> int:
    """The length of a single `bytes=a-b` Range header (0 for none or several)."""
    if not header.startswith("bytes=") or "," in header:
        return 0
    start, end = header[6:].split("-")
    return int(end) - int(start) + 1


def test_background_fetch_stays_within_the_cache_size(big_image: tuple[str, Path, dict],
                                                       tmp_path: Path) -> None:
    """With a cache smaller than the layer, the background fetch fetches no more than the cache can take,
    and reads beyond it are fetched on demand."""
    ref, _, digests = big_image
    mnt = tmp_path / "mnt"
    with mounted(ref, mnt, "--cache-dir", str(tmp_path / "cache"), "--cache-size", str(20 * MIB),
                 "--no-prefetch"):
        layer = wait_for(mnt, "done")["layers"][0]
        assert 0 < layer["background_bytes"] <= 10 * MIB  # compressed, and as much again decompressed
        assert _read_all(mnt, sorted(digests)) == digests


def test_umount_clears_a_mount_whose_daemon_was_killed(big_image: tuple[str, Path, dict],
                                                        tmp_path: Path) -> None:
    ref, _, _ = big_image
    mnt = tmp_path / "mnt"
    with mounted(ref, mnt, "--cache-dir", str(tmp_path / "cache"), "--no-background-fetch") as pid:
        os.kill(pid, 9)
        while Path(f"/proc/{pid}").exists():
            time.sleep(0.02)
        with pytest.raises(OSError) as e:
            os.listdir(mnt)
        assert e.value.errno in (errno.ENOTCONN, errno.ECONNABORTED)
        lazymount("umount", str(mnt))
        assert not os.path.ismount(mnt)


def test_basic_auth_credentials_never_shown(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    """A registry behind basic auth: $LAZYMOUNT_CREDS (or --creds) mounts it; a wrong password is a
    one-line error, and no password reaches an error, the daemon's log or its command line."""
    reg = Registry(tmp_path_factory.mktemp("registry-auth"), auth="basic").start()
    try:
        tree = _random_tree(tmp_path / "tree", {"secret.bin": 1000})
        src = make_oci_image(tmp_path / "src", "v1", [tree])
        convert(src, tmp_path / "conv", "v1")
        push_layout(tmp_path / "conv", "v1", reg, "private")
        ref, log_file = f"{reg.host}/private:v1", tmp_path / "daemon.log"
        env = dict(os.environ, LAZYMOUNT_CREDS=f"{reg.username}:{reg.password}")
        with mounted(ref, tmp_path / "mnt", "--cache-dir", str(tmp_path / "cache"), "--log-file",
                     str(log_file), env=env) as pid:
            assert (tmp_path / "mnt/secret.bin").read_bytes() == (tree / "secret.bin").read_bytes()
            assert reg.password.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes()
        wrong = lazymount("mount", ref, str(tmp_path / "mnt"), "--creds", f"{reg.username}:wrong-Pa55",
                          "--cache-dir", str(tmp_path / "cache"), check=False)
        assert wrong.returncode == 1 and len(wrong.stderr.splitlines()) == 1, wrong.stderr
        assert "wrong-Pa55" not in wrong.stderr
        assert reg.password not in log_file.read_text()
    finally:
        reg.close()


def test_long_listing_is_generated_once_across_replies() -> None:
    """READDIR replies that fill up resume the listing where it stopped instead of generating it again
    (which would make a directory of n entries cost n²/entries-per-reply attribute lookups)."""
    import fusefs

    class Operations:
        calls = 0

        def readdir(self, path: str, fh: int):
            Operations.calls += 1
            for i in range(1000):
                yield f"f{i}", {"st_mode": stat.S_IFREG | 0o644, "st_ino": i + 2, "st_size": i}, 0

    fuse = fusefs._FUSE.__new__(fusefs._FUSE)  # no mount: only the readdir callback is exercised
    fuse._unfinished, fuse._unfinished_lock = cachetools.LRUCache(64), threading.Lock()
    fuse.operations, fuse.encoding, fuse.errors = Operations(), "utf-8", "surrogateescape"
    received: list[tuple[str, int, int]] = []
    room = [0]  # entries that still fit in the current reply

    def filler(buf, name: bytes, st, off: int, flags: int) -> int:
        if not room[0]:
            return 1
        room[0] -= 1
        received.append((name.decode(), st.st_size, flags))
        return 0

    offset = 0
    while True:
        room[0] = 17
        before = len(received)
        fuse.readdir_fuse_3(b"/dir", None, filler, offset, None, fusefs.FUSE_READDIR_PLUS)
        if len(received) == before:
            break
        offset += len(received) - before  # the kernel asks again from the offset of the next entry
    assert [name for name, _, _ in received] == [f"f{i}" for i in range(1000)]
    assert [size for _, size, _ in received] == list(range(1000))
    assert {flags for _, _, flags in received} == {fusefs.FUSE_FILL_DIR_PLUS}
    assert Operations.calls == 1


def test_listing_stat_is_what_mfusepy_would_fill() -> None:
    """READDIRPLUS entries carry the same `struct stat` as mfusepy's generic filler, full or partial."""
    import mfusepy

    import fusefs

    full = {"st_ino": 7, "st_mode": stat.S_IFCHR | 0o600, "st_nlink": 3, "st_uid": 1000, "st_gid": 50,
            "st_size": 12345, "st_blocks": 25, "st_blksize": 4096, "st_rdev": os.makedev(1, 3),
            "st_mtime": 1_700_000_000_123_456_789, "st_atime": 1_600_000_000_000_000_001,
            "st_ctime": 5_000_000_000}
    for attrs in (full, {"st_mode": stat.S_IFDIR | 0o755, "st_ino": 1}):
        expected = mfusepy.c_stat()
        mfusepy.set_st_attrs(expected, attrs, use_ns=True)
        assert bytes(fusefs._c_stat(attrs)) == bytes(expected)


def test_image_paths_resolve_inside_the_image(tmp_path: Path) -> None:
    """`run` reads the image's /etc/passwd with the image's symlinks resolved inside the image (as the
    container will see them), never on the host."""
    import sandbox
    root = tmp_path / "root"
    (root / "usr/etc").mkdir(parents=True)
    (root / "usr/etc/passwd").write_text("tester:x:1000:1000::/:/bin/sh\n")
    os.symlink("/usr/etc", root / "etc")  # absolute: the host's /usr/etc on the host
    os.symlink("../../..", root / "up")  # cannot climb out of the image
    os.symlink("loop", root / "loop")
    assert sandbox.image_path(root, "etc/passwd") == root / "usr/etc/passwd"
    assert sandbox.image_path(root, "up/etc/passwd") == root / "usr/etc/passwd"
    assert sandbox.image_path(root, "loop/x") is None
    assert sandbox.image_path(root, "etc/shadow") is None  # missing in the image: not read on the host
    assert sandbox.read_image_file(root, "etc/shadow") == ""
    assert sandbox.image_ids(root, "tester") == (1000, 1000)


def test_user_mistakes_are_one_line_errors(tmp_path: Path) -> None:
    """A --cache-dir that is a file, a second mount on a mounted directory, a profile that is not text:
    one line, exit 1, and no second mount stacked on the first."""
    (tmp_path / "tree").mkdir()
    (tmp_path / "tree/hello").write_text("hi\n")
    tar = make_layer_tar(tmp_path / "tree", tmp_path / "l.tar")
    layout = write_oci_layout(tmp_path / "layout", "v1", [tar])
    image, mnt = f"oci:{layout}:v1", tmp_path / "mnt"
    (tmp_path / "a-file").touch()
    result = lazymount("mount", image, str(tmp_path), "--cache-dir", str(tmp_path / "a-file"), check=False)
    assert (result.returncode, result.stderr) == (
        1, f"lazymount: error: File exists: {tmp_path / 'a-file'}\n")
    with mounted(image, mnt, "--cache-dir", str(tmp_path / "cache")):
        result = lazymount("mount", image, str(mnt), "--cache-dir", str(tmp_path / "cache"), check=False)
        assert (result.returncode, result.stderr) == (
            1, f"lazymount: error: {mnt} is already a lazymount mount (lazymount umount it first)\n")
        assert Path("/proc/self/mountinfo").read_text().count(f" {mnt} ") == 1
    (tmp_path / "bad.profile").write_bytes(b"# layer \xff\n")
    result = lazymount("optimize", "--profile", str(tmp_path / "bad.profile"), image,
                       f"oci:{tmp_path}/out:v1", check=False)
    assert (result.returncode, result.stderr) == (
        1, f"lazymount: error: {tmp_path / 'bad.profile'}: not UTF-8 text (byte 8)\n")
