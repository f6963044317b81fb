"""Builders of the test, demo and benchmark images, with real tools: edge-case directory trees, GNU tar
layers, umoci OCI layouts, a Debian + Python root filesystem from the host's own files.

What belongs here: building inputs (trees, layer tarballs, OCI image layouts) with GNU tar and umoci,
and `describe_tar`, the ground truth a layer's content is compared against; tests/, bench/ and demo.py
share it.  What never does: anything that reads or writes eStargz (toc.py, layerwriter.py), driving
containerd (tests/reference.py), or being imported by a product module.  Creating device nodes, foreign
owners and `trusted.*` xattrs needs root; callers that are not root get a tree without those entries.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import random
import re
import shutil
import stat
import subprocess
import sysconfig
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import toc

log = logging.getLogger(__name__)

MIB = 1 << 20
CHUNK = 4 * MIB  # the reference's default eStargz chunk size

# Sizes around the chunk boundary, plus a multi-chunk file that does not end on a boundary.
EDGE_FILE_SIZES = {
    "data/exactly-4m": CHUNK,
    "data/4m-minus-1": CHUNK - 1,
    "data/4m-plus-1": CHUNK + 1,
    "data/big-9m": 2 * CHUNK + 12345,
}
SPARSE_SIZE = 10 * MIB
ODD_UID, ODD_GID = 1234, 5678
OLD_MTIME = 315532800  # 1980-01-01, the DOS epoch
NEW_MTIME = 4102444800  # 2100-01-01: past 2038, needs a PAX mtime record
FRACTIONAL_MTIME_NS = 1_600_000_000_750_000_000  # .75 s: the reference rounds modtime to whole seconds
# Parts of the host's Python left out of debian_python_rootfs: tests, GUI, build files, site packages.
STDLIB_SKIP = ("test", "idlelib", "tkinter", "turtledemo", "ensurepip", "lib2to3", "pydoc_data",
               "__pycache__", "config-3.*", "distutils", "unittest", "site-packages", "dist-packages",
               "_test*.so", "_xxtestfuzz*.so")
REAL_TREE_CANDIDATES = (
    Path("/usr/share/zoneinfo/America"),  # tzdata (priority: required): ~170 files, 29 symlinks
    Path(sysconfig.get_paths()["stdlib"]) / "email",  # always there with the running Python
)


def _is_root() -> bool:
    return os.geteuid() == 0


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _set_xattr(path: Path, name: str, value: bytes) -> bool:
    """Set an xattr on path itself (not following symlinks); False if the filesystem refuses it."""
    try:
        os.setxattr(path, name, value, follow_symlinks=False)
    except OSError as exc:
        log.info("xattr %s not supported on %s: %s", name, path, exc)
        return False
    return True


def make_edge_tree(root: Path, seed: int = 1234) -> Path:
    """Fill root with the edge cases a layer format must carry; return root.

    Contents: empty file; random files of 4 MiB - 1, 4 MiB, 4 MiB + 1 and ~9 MiB; a hardlink group of
    three; relative, absolute and dangling symlinks; char/block devices and a fifo; `user.*` (and, if the
    filesystem allows, `trusted.*`) xattrs on files and directories; a >100-char name, a 255-char name
    and a >255-char deep path; UTF-8 names; setuid/setgid/sticky modes; uid:gid 1234:5678; old, far-future
    and fractional mtimes; a 10 MiB sparse file with a little data; a small real tree copied from the
    system. Directory and file mtimes are set last, so they are deterministic.
    """
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    _write(root / "empty", b"")
    _write(root / "hello.txt", b"hello, world\n")
    for name, size in EDGE_FILE_SIZES.items():
        _write(root / name, rng.randbytes(size))

    links = root / "links"
    _write(links / "hard-a", b"one inode, three names\n")
    os.link(links / "hard-a", links / "hard-b")
    os.link(links / "hard-a", root / "hard-c")
    os.symlink("hard-a", links / "sym-relative")
    os.symlink("../hello.txt", links / "sym-up")
    os.symlink("/etc/hostname", links / "sym-absolute")
    os.symlink("does/not/exist", links / "sym-dangling")
    os.symlink("../data", links / "sym-dir")

    special = root / "special"
    special.mkdir()
    os.mkfifo(special / "fifo")
    if _is_root():
        os.mknod(special / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        os.mknod(special / "blk", 0o660 | stat.S_IFBLK, os.makedev(7, 200))

    xa = _write(root / "xattrs" / "file", b"has xattrs\n")
    _set_xattr(xa, "user.comment", b"plain text")
    _set_xattr(xa, "user.binary", bytes([0, 1, 2, 0xFF, 0xFE]))
    _set_xattr(xa, "user.empty", b"")
    _set_xattr(xa.parent, "user.dir-attr", "ünïcode".encode())
    if _is_root():
        _set_xattr(xa, "trusted.lazymount", b"t")
        _set_xattr(xa.parent, "trusted.overlay.opaque", b"y")

    names = root / "names"
    _write(names / ("n" * 120), b"longer than the 100-byte ustar name field\n")
    _write(names / ("m" * 255), b"NAME_MAX\n")
    deep = names.joinpath(*[f"level{i:02d}-" + "d" * 30 for i in range(10)])
    _write(deep / "leaf.txt", b"deep path over 255 bytes\n")
    _write(names / "ünïcödé" / "日本語.txt", "non-ASCII: ü\n".encode())
    _write(names / "space and 'quote'" / "tab\there", b"odd characters\n")
    _write(names / ".hidden", b"dotfile\n")
    _write(names / ".wh-lookalike", b"not a whiteout: no second dot\n")

    modes = root / "modes"
    for name, mode in (("setuid", 0o4755), ("setgid", 0o2755), ("readonly", 0o444), ("none", 0o000)):
        _write(modes / name, name.encode()).chmod(mode)
    (modes / "sticky-dir").mkdir()
    (modes / "sticky-dir").chmod(0o1777)
    (modes / "setgid-dir").mkdir()
    (modes / "setgid-dir").chmod(0o2775)

    owned = _write(root / "owners" / "odd-owner", b"1234:5678\n")
    if _is_root():
        os.chown(owned, ODD_UID, ODD_GID)
        os.chown(owned.parent, ODD_UID, ODD_GID)
        os.lchown(links / "sym-relative", ODD_UID, ODD_GID)

    sparse = root / "sparse" / "holes-10m"
    sparse.parent.mkdir()
    with open(sparse, "wb") as f:
        f.seek(MIB)
        f.write(b"data after a 1 MiB hole")
        f.seek(6 * MIB + 4096)
        f.write(rng.randbytes(10000))
        f.truncate(SPARSE_SIZE)

    _copy_real_tree(root / "real")

    times = root / "times"
    os.utime(_write(times / "old", b"1980\n"), (OLD_MTIME, OLD_MTIME))
    os.utime(_write(times / "future", b"2100\n"), (NEW_MTIME, NEW_MTIME))
    os.utime(_write(times / "epoch", b"1970\n"), (0, 0))
    os.utime(_write(times / "fraction", b".75\n"), ns=(FRACTIONAL_MTIME_NS, FRACTIONAL_MTIME_NS))
    _fix_dir_mtimes(root)
    return root


def _copy_real_tree(dest: Path) -> None:
    src = next(p for p in REAL_TREE_CANDIDATES if p.is_dir())
    shutil.copytree(src, dest, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))


def _fix_dir_mtimes(root: Path, mtime: int = 1_700_000_000) -> None:
    """Give every directory a fixed mtime, deepest first (changing a child touches its parent)."""
    dirs = [Path(d) for d, _, _ in os.walk(root)]
    for d in sorted(dirs, key=lambda p: len(p.parts), reverse=True):
        os.utime(d, (mtime, mtime))


def _copy_with_libraries(binary: Path, rootfs: Path) -> None:
    """Copy a host binary and every library ldd names to the same paths in rootfs (usrmerge layout)."""
    out = subprocess.run(["ldd", str(binary)], check=True, capture_output=True, text=True).stdout
    paths = [binary, *(Path(p) for p in re.findall(r"(/\S+) \(0x", out))]
    for path in paths:
        real = Path(os.path.realpath(path))
        target = rootfs / real.relative_to("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            shutil.copy2(real, target)
        alias = target.parent / path.name  # the soname link, e.g. libz.so.1 -> libz.so.1.2.13
        if alias != target and not alias.exists():
            os.symlink(real.name, alias)


def debian_python_rootfs(rootfs: Path) -> Path:
    """A small Debian root filesystem from the host's own files, so no network is needed: dash as
    /bin/sh, python3.11 with its standard library (extension modules with the libraries they link),
    /etc/passwd and /etc/group with root and a user `tester` (1000:1000), /tmp, /work. Return rootfs."""
    python = "python3.11"
    for link in ("bin", "lib", "lib64", "sbin"):
        target = f"usr/{link}"
        (rootfs / target).mkdir(parents=True, exist_ok=True)
        os.symlink(target, rootfs / link)
    _copy_with_libraries(Path("/usr/bin/dash"), rootfs)
    _copy_with_libraries(Path(f"/usr/bin/{python}"), rootfs)
    os.symlink("dash", rootfs / "usr/bin/sh")
    os.symlink(python, rootfs / "usr/bin/python3")
    loader = rootfs / "usr/lib64/ld-linux-x86-64.so.2"
    if not loader.exists() and Path("/lib64/ld-linux-x86-64.so.2").exists():
        os.symlink("/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2", loader)
    shutil.copytree(f"/usr/lib/{python}", rootfs / f"usr/lib/{python}", symlinks=True,
                    ignore=shutil.ignore_patterns(*STDLIB_SKIP))
    for module in sorted((rootfs / f"usr/lib/{python}/lib-dynload").glob("*.so")):
        _copy_with_libraries(Path("/") / module.relative_to(rootfs), rootfs)
    for directory in ("proc", "dev", "tmp", "etc", "work", "home/tester"):
        (rootfs / directory).mkdir(parents=True, exist_ok=True)
    os.chmod(rootfs / "tmp", 0o1777)
    (rootfs / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n"
                                       "tester:x:1000:1000::/home/tester:/bin/sh\n")
    (rootfs / "etc/group").write_text("root:x:0:\ntester:x:1000:\n")
    (rootfs / "etc/debian_version").write_text(Path("/etc/debian_version").read_text())
    return rootfs


def make_layer_tar(tree: Path, out: Path, fmt: str = "pax", gzip: bool = False,
                   dot_prefix: bool = False, sparse: bool = True) -> Path:
    """Pack tree into a layer tarball at out with GNU tar; return out.

    fmt "pax" writes PAX headers (long names, xattrs, big/fractional mtimes) and PAX 1.0 sparse maps;
    fmt "gnu" writes GNU long-name entries and old GNU sparse ('S') entries and cannot carry xattrs.
    Members are sorted by name. Names are relative without a leading './' unless dot_prefix, which adds
    './' to every name and a './' entry for the root directory itself. sparse=False stores sparse
    files with their holes written out as zeros (the reference converter rejects sparse entries).
    """
    if fmt not in ("pax", "gnu"):
        raise ValueError(f"unknown tar format {fmt!r}")
    cmd = ["tar", "--create", "--file", str(out), "--directory", str(tree), f"--format={fmt}",
           "--numeric-owner", "--sort=name", *(["--sparse"] if sparse else [])]
    if fmt == "pax":
        cmd += ["--xattrs", "--xattrs-include=*"]
    if gzip:
        cmd.append("--use-compress-program=gzip -n")
    members = ["."] if dot_prefix else sorted(os.listdir(tree))
    subprocess.run(cmd + ["--", *members], check=True)
    return out


def sha256_file(path: Path, opener: Callable[..., BinaryIO] = open) -> str:
    """The sha256 hex digest of a file's content; `opener=gzip.open` hashes a gzip file uncompressed."""
    with opener(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _make_bundle_match(rootfs: Path, tree: Path) -> None:
    """Make rootfs hold exactly tree's content (cp -a keeps owners, modes, times, xattrs, devices)."""
    for child in rootfs.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()
    subprocess.run(["cp", "-a", "--", f"{tree}/.", str(rootfs)], check=True)


def make_oci_image(layout_dir: Path, tag: str, layer_trees: list[Path],
                   opaque_dirs: dict[int, list[str]] | None = None) -> Path:
    """Build a multi-layer OCI image layout at layout_dir (tag `tag`) with umoci; return layout_dir.

    Each tree in layer_trees is the complete root filesystem after its layer: layer i is the difference
    between tree i-1 and tree i. It is made by `umoci unpack`, replacing the bundle's rootfs with tree i
    and `umoci repack`; umoci's diff writes a `.wh.NAME` whiteout for every path present in tree i-1
    and absent from tree i (a removed directory gets one whiteout, not one per child).
    umoci repack never writes opaque markers, and umoci 0.4.7's `insert --opaque` writes a truncated tar
    (no padding, no end blocks). So for each directory D in opaque_dirs[i] an extra GNU tar layer
    precedes layer i: `D/.wh..wh..opq` plus tree i's D (and D's parent directories).
    umoci's own layers drop empty-valued xattrs and round mtimes to whole seconds.
    """
    layout_dir.parent.mkdir(parents=True, exist_ok=True)
    image = f"{layout_dir}:{tag}"
    work = layout_dir.parent / f".{layout_dir.name}-work"
    subprocess.run(["umoci", "init", "--layout", str(layout_dir)], check=True)
    subprocess.run(["umoci", "new", "--image", image], check=True)
    for i, tree in enumerate(layer_trees):
        for d in (opaque_dirs or {}).get(i, []):
            shutil.rmtree(work, ignore_errors=True)
            _write(work / "stage" / d.strip("/") / ".wh..wh..opq", b"")
            subprocess.run(["cp", "-a", "--parents", "--", d.strip("/"), str(work / "stage")], cwd=tree,
                           check=True)
            layer = make_layer_tar(work / "stage", work / "opaque.tar.gz", gzip=True)
            append_layers(layout_dir, tag, [layer])
        shutil.rmtree(work, ignore_errors=True)
        subprocess.run(["umoci", "unpack", "--image", image, str(work)], check=True,
                       stdout=subprocess.DEVNULL)
        _make_bundle_match(work / "rootfs", tree)
        subprocess.run(["umoci", "repack", "--image", image, str(work)], check=True)
    shutil.rmtree(work, ignore_errors=True)
    subprocess.run(["umoci", "gc", "--layout", str(layout_dir)], check=True)
    return layout_dir


def add_blob(layout_dir: Path, data: bytes | Path) -> tuple[str, int]:
    """Store bytes or a file's content as a blob of the layout; return (digest, size)."""
    blobs = layout_dir / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    if isinstance(data, Path):
        hex_digest, size = sha256_file(data), data.stat().st_size
        shutil.copyfile(data, blobs / hex_digest)
    else:
        hex_digest, size = hashlib.sha256(data).hexdigest(), len(data)
        (blobs / hex_digest).write_bytes(data)
    return f"sha256:{hex_digest}", size


def _read_blob(layout_dir: Path, digest: str) -> dict:
    return json.loads((layout_dir / "blobs" / "sha256" / digest.removeprefix("sha256:")).read_bytes())


def append_layers(layout_dir: Path, tag: str, layer_tars: list[Path]) -> None:
    """Append layer tarballs (.tar or .tar.gz, used byte for byte) to the image tagged `tag`.

    The manifest, the config (`rootfs.diff_ids`, a history entry per layer) and the index entry are
    rewritten; the old manifest and config blobs stay until `umoci gc`.
    """
    index = json.loads((layout_dir / "index.json").read_text())
    entry = next(m for m in index["manifests"]
                 if m.get("annotations", {}).get(toc.REF_NAME_ANNOTATION) == tag)
    manifest = _read_blob(layout_dir, entry["digest"])
    config = _read_blob(layout_dir, manifest["config"]["digest"])
    for tar_path in layer_tars:
        with open(tar_path, "rb") as f:
            gzipped = f.read(2) == b"\x1f\x8b"
        digest, size = add_blob(layout_dir, tar_path)
        diff_id = f"sha256:{sha256_file(tar_path, gzip.open)}" if gzipped else digest
        config["rootfs"]["diff_ids"].append(diff_id)
        config.setdefault("history", []).append({"created_by": f"lazymount tests: {tar_path.name}"})
        media = toc.MEDIA_LAYER_GZIP if gzipped else toc.MEDIA_LAYER_TAR
        manifest["layers"].append({"mediaType": media, "digest": digest, "size": size})
    config_ref = manifest["config"]
    config_ref["digest"], config_ref["size"] = add_blob(layout_dir, json.dumps(config).encode())
    entry["digest"], entry["size"] = add_blob(layout_dir, json.dumps(manifest).encode())
    (layout_dir / "index.json").write_text(json.dumps(index))


def write_oci_layout(layout_dir: Path, tag: str, layer_tars: list[Path]) -> Path:
    """Write an OCI image layout whose layers are exactly the given tarballs (.tar or .tar.gz).

    Unlike make_oci_image, nothing re-packs the layers, so GNU tar's own headers (GNU sparse entries,
    './' prefixes, PAX records) reach whoever reads the image. Return layout_dir.
    """
    config = {"architecture": _go_arch(), "os": "linux", "config": {},
              "rootfs": {"type": "layers", "diff_ids": []}}
    cfg_digest, cfg_size = add_blob(layout_dir, json.dumps(config).encode())
    manifest = {"schemaVersion": 2, "mediaType": toc.MEDIA_OCI_MANIFEST,
                "config": {"mediaType": toc.MEDIA_OCI_CONFIG,
                           "digest": cfg_digest, "size": cfg_size},
                "layers": []}
    man_digest, man_size = add_blob(layout_dir, json.dumps(manifest).encode())
    index = {"schemaVersion": 2, "manifests": [{"mediaType": manifest["mediaType"], "digest": man_digest,
                                                 "size": man_size,
                                                 "annotations": {toc.REF_NAME_ANNOTATION: tag}}]}
    (layout_dir / "index.json").write_text(json.dumps(index))
    (layout_dir / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    append_layers(layout_dir, tag, layer_tars)
    return layout_dir


def _go_arch() -> str:
    machine = os.uname().machine
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(machine, machine)


_TAR_TYPES = {
    tarfile.REGTYPE: "reg", tarfile.AREGTYPE: "reg", tarfile.CONTTYPE: "reg", tarfile.GNUTYPE_SPARSE: "reg",
    tarfile.DIRTYPE: "dir", tarfile.SYMTYPE: "symlink", tarfile.LNKTYPE: "hardlink",
    tarfile.CHRTYPE: "char", tarfile.BLKTYPE: "block", tarfile.FIFOTYPE: "fifo",
}


def normalize_name(name: str) -> str:
    """Tar member name as a layer path: no leading './' or '/', no trailing '/'."""
    while name.startswith("./"):
        name = name[2:]
    return name.strip("/") if name != "." else ""


def describe_tar(path: Path) -> dict[str, dict]:
    """Read a layer tarball (.tar or .tar.gz) with Python's tarfile: normalized path -> metadata.

    Each value has type (reg dir symlink hardlink char block fifo), mode (& 0o7777), uid, gid, size,
    mtime (int seconds, truncated), linkname (normalized for hardlinks, verbatim for symlinks), xattrs
    (name -> bytes, from PAX SCHILY.xattr records), devmajor, devminor, and for regular files the
    sha256 hex of the content with sparse holes expanded. The root directory entry ('./') is left out;
    a later member of the same name replaces an earlier one, as on extraction.
    """
    entries: dict[str, dict] = {}
    with tarfile.open(path, "r:*") as tar:
        for member in tar:
            name = normalize_name(member.name)
            if not name:
                continue
            kind = _TAR_TYPES.get(member.type)
            if kind is None:
                raise ValueError(f"{path}: {member.name!r} has unsupported tar type {member.type!r}")
            info = {
                "type": kind, "mode": member.mode & 0o7777, "uid": member.uid, "gid": member.gid,
                "size": member.size if kind == "reg" else 0, "mtime": int(member.mtime),
                "linkname": normalize_name(member.linkname) if kind == "hardlink" else member.linkname,
                "xattrs": {k.removeprefix("SCHILY.xattr."): v.encode("utf-8", "surrogateescape")
                           for k, v in member.pax_headers.items() if k.startswith("SCHILY.xattr.")},
                "devmajor": member.devmajor if kind in ("char", "block") else 0,
                "devminor": member.devminor if kind in ("char", "block") else 0,
            }
            if kind == "reg":
                info["sha256"] = hashlib.file_digest(tar.extractfile(member), "sha256").hexdigest()
            entries[name] = info
    return entries


def describe_tree(root: Path) -> dict[str, dict]:
    """describe_tar's view of a directory tree on disk (root itself left out).

    Entries are visited in GNU tar's `--sort=name` order, so the first name of a hardlink group is
    "reg" and the others are "hardlink" entries pointing at it, exactly as in make_layer_tar's output.
    """
    entries: dict[str, dict] = {}
    first_names: dict[tuple[int, int], str] = {}

    def visit(directory: Path, prefix: str) -> None:
        for base in sorted(os.listdir(directory)):
            path, name = directory / base, prefix + base
            st = os.lstat(path)
            kind = _STAT_TYPES[stat.S_IFMT(st.st_mode)]
            key = (st.st_dev, st.st_ino)
            linkname = os.readlink(path) if kind == "symlink" else ""
            if kind not in ("dir", "symlink") and st.st_nlink > 1:
                if key in first_names:
                    kind, linkname = "hardlink", first_names[key]
                else:
                    first_names[key] = name
            info = {
                "type": kind, "mode": stat.S_IMODE(st.st_mode), "uid": st.st_uid, "gid": st.st_gid,
                "size": st.st_size if kind == "reg" else 0, "mtime": int(st.st_mtime), "linkname": linkname,
                "xattrs": {x: os.getxattr(path, x, follow_symlinks=False)
                           for x in os.listxattr(path, follow_symlinks=False)},
                "devmajor": os.major(st.st_rdev) if kind in ("char", "block") else 0,
                "devminor": os.minor(st.st_rdev) if kind in ("char", "block") else 0,
            }
            if kind == "reg":
                info["sha256"] = sha256_file(path)
            entries[name] = info
            if kind == "dir":
                visit(path, name + "/")

    visit(root, "")
    return entries


_STAT_TYPES = {
    stat.S_IFREG: "reg", stat.S_IFDIR: "dir", stat.S_IFLNK: "symlink", stat.S_IFCHR: "char",
    stat.S_IFBLK: "block", stat.S_IFIFO: "fifo",
}


def regular_file_digests(entries: dict[str, dict]) -> dict[str, str]:
    """name -> sha256 of every regular file in a describe_tar result, hardlinks resolved to content."""
    out = {n: e["sha256"] for n, e in entries.items() if e["type"] == "reg"}
    out.update({n: out[e["linkname"]] for n, e in entries.items()
                if e["type"] == "hardlink" and e["linkname"] in out})
    return out

