"""The lazymount command line and its FUSE adapter.

What belongs here: argument parsing, turning errors into one-line messages and exit codes, and the
adapters a user starts (commands): `convert`, `inspect`, `mount` (the FUSE operations over tree.py's
merged view, daemonized), `umount`, `run` (bubblewrap over a mount), `record` (a run that writes a
profile of the files the command opened), `optimize` (convert with a profile), `stats` and `layers` (the
snapshotter's one daemon for all its lazy layers; its file system is layerfs.py's).  What never does:
format, registry, cache or overlay logic — those live in toc.py, fetch.py, cache.py, tree.py and
convert.py.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import ctypes
import errno
import itertools
import json
import logging
import os
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import cachetools

import cache
import config
import convert
import fetch
import regclient
import toc
import tree

# Only libfuse3 lets a read exceed 128 KiB; mfusepy picks its library when imported.
os.environ.setdefault("FUSE_LIBRARY_NAME", "fuse3")
import mfusepy  # noqa: E402

log = logging.getLogger("lazymount")

OPAQUE_XATTR = "trusted.overlay.opaque" if os.geteuid() == 0 else "user.overlay.opaque"  # raw layer views
STATS_XATTR = "user.lazymount.stats"  # virtual, on the root directory, never listed
IMAGE_XATTR = "user.lazymount.image"  # the image's reference, digest and runtime config (Env, User...)
ATTR_TIMEOUT = 86400.0  # an image never changes: the kernel may cache names and attributes for a day
READ_AHEAD_KB = 1024
UMOUNT_WAIT = 10.0  # seconds `umount` waits for the daemon to exit after the kernel let go
RUNTIME_KEYS = ("Env", "WorkingDir", "User", "Entrypoint", "Cmd")  # what `run` needs of the image config
PROGRESS = "progress"  # the daemon's prefetch progress lines on its pipe: `progress DONE TOTAL`
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

_SIZE_SUFFIXES = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
# glibc mallopt parameters (malloc.h) and the daemon's values: buffers above a default 4 MiB chunk (TOC
# JSON, background fetch spans) are mmapped, so freeing them returns them to the OS.  Left to glibc, the
# mmap threshold rises to the largest such buffer freed (32 MiB at most) and the trim threshold to twice
# that, so after the TOC parse every later buffer comes from a heap that keeps what is freed.
# One malloc arena for all threads: libfuse's workers and the fetch threads would otherwise each get an
# arena of their own whose free memory no other thread reuses (~8 MB more RSS on the 100k-file image);
# Python code allocates under the GIL anyway.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8
MMAP_THRESHOLD = 5 << 20
TRIM_THRESHOLD = 8 << 20


def parse_size(text: str) -> int:
    """Parse `4194304`, `512k`, `4M`, `1G` (binary units) into bytes."""
    value = text.strip().lower().removesuffix("ib").removesuffix("b")
    suffix = value[-1:] if value[-1:] in _SIZE_SUFFIXES else ""
    try:
        number = int(value[: len(value) - len(suffix)])
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 4M") from None
    if number <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be positive")
    return number * _SIZE_SUFFIXES[suffix]


def _read_text(path: Path) -> str:
    """A UTF-8 text file given by the user (InvalidInputError if it is not text)."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise config.InvalidInputError(f"{path}: not UTF-8 text (byte {e.start})") from None


def _read_path_list(path: Path) -> list[str]:
    """A prioritized-files list: one path per line; blank lines and '#' comments ignored."""
    lines = _read_text(path).splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


PROFILE_LAYER = "# layer "


def read_profile(path: Path) -> dict[str, list[str]]:
    """A workload profile: `# layer DIGEST` lines, each followed by that layer's paths (relative, one a
    line, in the order first opened); blank lines and other '#' lines are ignored."""
    profile: dict[str, list[str]] = {}
    current: list[str] | None = None
    for number, line in enumerate(_read_text(path).splitlines(), 1):
        if line.startswith(PROFILE_LAYER):
            current = profile.setdefault(toc.check_digest(line[len(PROFILE_LAYER):].strip()), [])
        elif not line.strip() or line.startswith("#"):
            continue
        elif current is None:
            raise config.InvalidInputError(f"{path}:{number}: a path before any '{PROFILE_LAYER}DIGEST' line")
        else:
            current.append(line.lstrip("/"))
    return profile


def merge_profiles(profiles: list[dict[str, list[str]]]) -> dict[str, list[str]]:
    """Profiles merged: layers and, within a layer, paths in the order of their first appearance."""
    merged: dict[str, dict[str, None]] = {}
    for profile in profiles:
        for digest, paths in profile.items():
            merged.setdefault(digest, {}).update(dict.fromkeys(paths))
    return {digest: list(paths) for digest, paths in merged.items()}


def write_profile(path: Path, profile: dict[str, list[str]]) -> None:
    """Write a profile in the format read_profile reads."""
    lines = ["# lazymount profile: the files a workload opened, by the image layer that provides them"]
    for digest, paths in profile.items():
        lines += [f"{PROFILE_LAYER}{digest}", *paths]
    Path(path).write_text("\n".join(lines) + "\n", encoding="utf-8")


def _layout_options(args: argparse.Namespace) -> convert.ConvertOptions:
    return convert.ConvertOptions(chunk_size=args.chunk_size, fmt=toc.ZSTD if args.zstd else toc.GZIP,
                                  level=args.level, workers=args.jobs, progress=not args.quiet)


def _print_manifest_layers(manifest: dict) -> None:
    for layer in manifest["layers"]:
        print(f"{layer['digest']}  {layer['size']:>12}  "
              f"toc {layer['annotations'].get(convert.TOC_DIGEST_ANNOTATION, '-')}")


def cmd_convert(args: argparse.Namespace) -> int:
    options = _layout_options(args)
    if args.prioritize:
        options.prioritize_all = _read_path_list(args.prioritize)
    if _is_local_file(args.src):
        info = convert.convert_layer_file(Path(args.src), Path(args.dst), options, options.prioritize_all)
        print(json.dumps({"digest": info.digest, "size": info.size, "diffID": info.diff_id,
                          "tocDigest": info.toc_digest, "uncompressedSize": info.uncompressed_size,
                          "entries": info.entries, "annotations": info.annotations}, indent=2))
        return 0
    refs = config.parse_reference(args.src), config.parse_reference(args.dst)
    manifest = convert.convert_image(args.src, args.dst, options, registry_client(args, *refs), args.platform)
    _print_manifest_layers(manifest)
    return 0


def _is_local_file(text: str) -> bool:
    """A layer file argument, as opposed to an image reference: an existing file or a path-like name."""
    return not text.startswith("oci:") and (text.startswith(("/", "./", "../")) or Path(text).is_file())


def cmd_inspect(args: argparse.Namespace) -> int:
    if _is_local_file(args.src):
        blobs = [(args.src, tree.FileBlob(Path(args.src)), None)]
    else:
        ref = config.parse_reference(args.src)
        image = fetch.open_image(ref, platform=args.platform, client=registry_client(args, ref))
        layers = [d for d in image.layers if args.layer in (None, d.digest)]
        if not layers:
            raise convert.ImageError(f"{args.src} has no layer {args.layer}" if args.layer
                                     else f"{args.src} has no layers")
        blobs = [(d.digest, image.blob(d.digest), d.annotations.get(convert.TOC_DIGEST_ANNOTATION))
                 for d in layers]
    reports = []
    for name, reader, toc_digest in blobs:
        with reader:
            if args.toc:
                _, toc_json = toc.read_toc_json(reader.read_at, reader.size, toc_digest)
                sys.stdout.write(toc_json.decode("utf-8", "replace") + "\n")
                continue
            reports.append({"layer": name, **convert.describe_layer(reader.read_at, reader.size, toc_digest)})
    if args.json:
        print(json.dumps(reports, indent=2))
    else:
        for report in reports:
            _print_layer_report(report)
    return 0


def _print_layer_report(report: dict) -> None:
    print(f"{report['layer']}\n  format: {report['format']}, {report['size']} bytes")
    if "entries" in report:
        counts = ", ".join(f"{v} {k}" for k, v in report["entries"].items() if v and k not in ("bytes",))
        print(f"  entries: {counts}\n  file bytes: {report['entries']['bytes']}, largest chunk: "
              f"{report['largest_chunk']}\n  landmark: {report['landmark']}\n  toc: {report['toc_digest']} "
              f"({report['toc_bytes']} bytes)")


# --------------------------------------------------------------------------------------------- mounting


class MountError(toc.LazymountError):
    """A mount, unmount or run could not be done."""


# libfuse 3 flags (fuse_common.h, fuse.h) that mfusepy does not name.
FUSE_CAP_CACHE_SYMLINKS = 1 << 23  # the kernel caches READLINK answers like page data
FUSE_READDIR_PLUS = 1 << 0  # readdir is asked for full attributes...
FUSE_FILL_DIR_PLUS = 1 << 1  # ...and an entry filled with them needs no LOOKUP afterwards
_TERMINATIONS = (signal.SIGTERM, signal.SIGHUP)
OPEN_FILES = 4096  # files whose sequential-read state the daemon remembers without OPEN


class _FUSE(mfusepy.FUSE):
    """mfusepy.FUSE that lets the kernel cache symlinks and answers READDIRPLUS with full attributes, so
    that a walk of the tree needs no LOOKUP round trip per entry (mfusepy fills only mode and inode)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # listings cut short by a full reply buffer, by (path, offset): the kernel's next READDIR of that
        # directory resumes there, so a long directory costs one pass over its entries, not one per reply
        self._unfinished: cachetools.LRUCache[tuple[bytes, int], Iterator] = cachetools.LRUCache(64)
        self._unfinished_lock = threading.Lock()
        super().__init__(*args, **kwargs)  # mfusepy serves the file system from here until unmounted

    def _init(self, conn, config) -> None:
        if conn and conn.contents.capable & FUSE_CAP_CACHE_SYMLINKS:
            conn.contents.want |= FUSE_CAP_CACHE_SYMLINKS
        super()._init(conn, config)

    def readdir_fuse_3(self, path: bytes | None, buf, filler, offset: int, fip, flags: int) -> int:
        # Entries go out with their own offsets (1, 2, ...): only then does libfuse 3.14 pass the
        # attributes of a READDIRPLUS on to the kernel instead of buffering bare names.
        plus = FUSE_FILL_DIR_PLUS if flags & FUSE_READDIR_PLUS else 0
        path = path or b"/"
        with self._unfinished_lock:
            entries = self._unfinished.pop((path, offset), None)
        if entries is None:
            listing = self.operations.readdir(path.decode(self.encoding, self.errors), 0)
            entries = itertools.islice(listing, offset, None)
        position = offset
        for entry in entries:
            name, attrs, _ = entry
            st = mfusepy.c_stat()
            mfusepy.set_st_attrs(st, attrs, use_ns=True)
            fill = plus if name not in (".", "..") else 0  # the kernel skips these two in READDIRPLUS
            if filler(buf, name.encode(self.encoding, self.errors), st, position + 1, fill) != 0:
                entries = itertools.chain([entry], entries)  # did not fit: the next reply starts with it
                break
            position += 1
        if position > offset:  # the kernel asks again from here, if only to learn that the listing ended
            with self._unfinished_lock:
                self._unfinished[(path, position)] = entries
        return 0


class LazyFS(mfusepy.Operations):
    """The FUSE operations: a thin, read-only adapter over a tree.ImageView.

    The image never changes, so the kernel is asked to do all it can on its own: files are opened
    without a round trip (``open`` answers ENOSYS, the kernel's zero-message open, which also keeps the
    page cache), symlinks are cached, and directory listings carry full attributes.  Only while
    recording are opens seen, since the profile lists the files opened.
    """

    use_ns = True

    def __init__(self, view: tree.ImageView, info: dict, on_ready: Callable[[], None],
                 progress: Callable[[int, int], None] | None = None) -> None:
        self.view, self.info, self._on_ready, self._progress = view, info, on_ready, progress
        self._handles: dict[int, tuple[tree.Node, tree.ReadState]] = {}
        self._files: cachetools.LRUCache[str, tuple[tree.Node, tree.ReadState]]
        self._files = cachetools.LRUCache(OPEN_FILES)
        self._next_fh = 1
        self._lock = threading.Lock()
        self._fs_bytes: int | None = None
        self._fuse: int | None = None  # libfuse's `struct fuse *`, once serving
        self._bare_root_shown = False

    def _tree(self) -> tree.MergedTree:
        try:
            return self.view.tree()
        except toc.LazymountError as e:
            log.warning("%s", e)
            raise OSError(e.errno, str(e)) from None

    def _node(self, path: str) -> tuple[tree.MergedTree, tree.Node]:
        merged = self._tree()
        node = merged.lookup(path)
        if node is None:
            raise OSError(errno.ENOENT, path)
        return merged, node

    @mfusepy.overrides(mfusepy.Operations)
    def init(self, path: str) -> None:
        self._fuse = mfusepy._libfuse.fuse_get_context().contents.fuse  # for fuse_invalidate_path
        self.view.on_tree = self._tree_arrived
        self.view.start(self._on_ready, self._progress)

    def _tree_arrived(self) -> None:
        if self._bare_root_shown and self._fuse:  # the kernel caches attributes: make it ask again
            mfusepy._libfuse.fuse_invalidate_path(ctypes.c_void_p(self._fuse), b"/")

    @mfusepy.overrides(mfusepy.Operations)
    def destroy(self, path: str) -> None:
        self.view.close()

    @mfusepy.overrides(mfusepy.Operations)
    def getattr(self, path: str, fh: int | None = None) -> dict:
        if path == "/":
            # Without waiting for layers still downloading (or failed): `lazymount stats` and `umount`
            # read the root's xattrs, and the kernel asks for its attributes first.
            self._bare_root_shown = True  # before looking: a tree arriving meanwhile invalidates it
            try:
                merged = self.view.tree(timeout=0)
            except toc.LazymountError:
                return {"st_mode": stat.S_IFDIR | 0o755, "st_ino": 1, "st_nlink": 2}
            return merged.attrs(merged.root)
        merged, node = self._node(path)
        return merged.attrs(node)

    @mfusepy.overrides(mfusepy.Operations)
    def readdir(self, path: str, fh: int) -> Iterator[tuple[str, dict, int]]:
        merged, node = self._node(path)
        if not merged.is_dir(node):
            raise OSError(errno.ENOTDIR, path)
        own = {"st_mode": merged.mode(node), "st_ino": node.ino}
        yield ".", own, 0
        yield "..", own, 0
        for name, child in merged.children(node):
            yield name, merged.attrs(child), 0

    @mfusepy.overrides(mfusepy.Operations)
    def readlink(self, path: str) -> str:
        merged, node = self._node(path)
        if not stat.S_ISLNK(merged.mode(node)):
            raise OSError(errno.EINVAL, path)
        return merged.readlink(node)

    @mfusepy.overrides(mfusepy.Operations)
    def open(self, path: str, flags: int) -> int:
        if flags & os.O_ACCMODE != os.O_RDONLY:
            raise OSError(errno.EROFS, path)
        merged, node = self._node(path)
        if not stat.S_ISREG(merged.mode(node)):
            raise OSError(errno.EINVAL, path)
        if self.view.recorder is None:
            raise OSError(errno.ENOSYS, path)  # success, and no OPEN or RELEASE for any file from now on
        self.view.opened(node)
        with self._lock:
            fh = self._next_fh
            self._next_fh += 1
            self._handles[fh] = (node, tree.ReadState())
        return fh

    @mfusepy.overrides(mfusepy.Operations)
    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        if fh:
            node, state = self._handles[fh]
        else:  # opened without a round trip: the file by its path
            with self._lock:
                found = self._files.get(path)
            if found is None:
                found = self._node(path)[1], tree.ReadState()
                with self._lock:
                    self._files[path] = found
            node, state = found
        return self.view.read(node, offset, size, state)

    @mfusepy.overrides(mfusepy.Operations)
    def release(self, path: str, fh: int) -> int:
        with self._lock:
            self._handles.pop(fh, None)
        return 0

    @mfusepy.overrides(mfusepy.Operations)
    def getxattr(self, path: str, name: str, position: int = 0) -> bytes:
        if path == "/" and name == STATS_XATTR:  # answered even while a layer is missing
            return json.dumps({**self.info, **self.view.stats(), "pid": os.getpid()}).encode()
        merged, node = self._node(path)
        if node is merged.root and name == IMAGE_XATTR:
            return json.dumps(self.info).encode()
        value = merged.xattrs(node).get(name)
        if value is None:
            raise OSError(mfusepy.ENOATTR, name)
        return value

    @mfusepy.overrides(mfusepy.Operations)
    def listxattr(self, path: str) -> list[str]:
        merged, node = self._node(path)
        return list(merged.xattrs(node))

    @mfusepy.overrides(mfusepy.Operations)
    def statfs(self, path: str) -> dict[str, int]:
        merged = self._tree()
        if self._fs_bytes is None:
            self._fs_bytes = sum(layer.index.stats()["bytes"] for layer in self.view.layers if layer.index)
        return {"f_bsize": tree.BLOCK_SIZE, "f_frsize": tree.BLOCK_SIZE,
                "f_blocks": -(-self._fs_bytes // tree.BLOCK_SIZE), "f_bfree": 0, "f_bavail": 0,
                "f_files": merged.nodes, "f_ffree": 0, "f_favail": 0, "f_namemax": 255}


def _parse_fuse_options(text: str | None) -> dict[str, str | bool]:
    """`-o a,b=c` as mfusepy keywords; refuses options that would weaken a mount made without root."""
    options: dict[str, str | bool] = {}
    for item in filter(None, (text or "").split(",")):
        key, sep, value = item.partition("=")
        if key in ("suid", "dev", "rw"):
            raise MountError(f"-o {key} is not allowed: lazymount mounts are read-only, nosuid and nodev")
        options[key] = value if sep else True
    return options


def registry_client(args: argparse.Namespace, *refs: config.Reference) -> regclient.RegistryClient:
    """A registry client configured from the config file and the --creds/--plain-http flags."""
    settings = config.load_config(args.config, **({"plain_http": True} if args.plain_http else {}))
    credentials = None
    if args.creds:
        user, sep, password = args.creds.partition(":")
        if not sep:
            raise config.InvalidInputError("--creds takes USER:PASSWORD")
        credentials = {ref.domain: (user, password) for ref in refs if ref.layout is None}
    return regclient.RegistryClient(settings, credentials)


def open_chunk_cache(args: argparse.Namespace) -> tuple[Path, cache.ChunkCache]:
    """The chunk cache of the --cache-dir and --cache-size flags, and its directory."""
    cache_dir = Path(args.cache_dir) if args.cache_dir else cache.default_cache_dir()
    return cache_dir, cache.ChunkCache(cache_dir, disk_bytes=args.cache_size)


def _open_view(args: argparse.Namespace) -> tuple[tree.ImageView, dict]:
    """Resolve the image, read every eStargz layer's TOC, and set up the cache and the view."""
    ref = config.parse_reference(args.image)
    image = fetch.open_image(ref, platform=args.platform, client=registry_client(args, ref))
    descriptors = image.layers
    if not descriptors:
        raise MountError(f"{args.image} has no layers: there is nothing to mount")
    if args.layer:
        descriptors = [d for d in descriptors if d.digest == args.layer]
        if not descriptors:
            raise MountError(f"{args.image} has no layer {args.layer}")
    layers = [tree.Layer(d.digest, image.blob(d.digest), d.annotations.get(convert.TOC_DIGEST_ANNOTATION))
              for d in descriptors]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        lazy = list(pool.map(tree.Layer.open_index, layers))
    for layer, is_lazy, descriptor in zip(layers, lazy, descriptors, strict=True):
        if not is_lazy:
            log.warning("layer %s (%s) is not eStargz with a TOC digest: downloading it whole in the "
                        "background", layer.digest, descriptor.media_type or "no media type")
    cache_dir, chunk_cache = open_chunk_cache(args)
    recorder = tree.AccessRecorder(args.record_log) if getattr(args, "record_log", None) else None
    view = tree.ImageView(layers, chunk_cache, cache_dir / "layers", raw=bool(args.layer),
                          opaque_xattr=OPAQUE_XATTR, prefetch=args.prefetch, background=args.background_fetch,
                          recorder=recorder)
    runtime = image.config.get("config") if isinstance(image.config.get("config"), dict) else {}
    info = {"reference": str(ref), "digest": image.digest, "mountpoint": str(args.mountpoint),
            "config": {k: runtime[k] for k in RUNTIME_KEYS if k in runtime}}
    return view, info


def _mount_at(mountpoint: Path) -> tuple[str, str] | None:
    """(`major:minor`, file system type) of the mount on top at `mountpoint`, from /proc/self/mountinfo:
    a stat of the mount point would be a call to the file system, and our own waits for layers still
    being downloaded (a daemon asking itself would be left unkillable if killed meanwhile)."""
    target = os.fsencode(os.path.join(os.path.realpath(mountpoint.parent), mountpoint.name))
    found = None
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            fields = line.split()
            # mountinfo escapes space, tab, newline and backslash as octal (\040 ...)
            point = re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m[1], 8)]), fields[4])
            if point == target:
                found = fields[2].decode(), fields[fields.index(b"-") + 1].decode()
    return found


def _raise_read_ahead(mountpoint: Path) -> None:
    """Let the kernel read ahead 1 MiB on this mount (the bdi file is writable by root only)."""
    try:
        mounted = _mount_at(mountpoint)
        path = Path(f"/sys/class/bdi/{mounted[0]}/read_ahead_kb") if mounted else None
        if path is not None and os.access(path, os.W_OK):
            path.write_text(str(READ_AHEAD_KB))
    except OSError as e:
        log.debug("read_ahead_kb not raised: %s", e)


def announce(mountpoint: Path, what: str, notify: Callable[[], None]) -> Callable[[], None]:
    """The callback to run once the mount at `mountpoint` answers: raise its read-ahead, log, `notify`."""
    def ready() -> None:
        threading.Thread(target=_raise_read_ahead, args=(mountpoint,), daemon=True).start()
        log.info("mounted %s at %s", what, mountpoint)
        notify()
    return ready


def serve_fuse(operations: mfusepy.Operations, mountpoint: Path, extra_options: str | None) -> None:
    """Serve `operations` read-only at `mountpoint` in this process until unmounted."""
    options = {"fsname": "lazymount", "subtype": "lazymount", "ro": True, "nosuid": True, "nodev": True,
               "default_permissions": True, "kernel_cache": True, "use_ino": True,
               "attr_timeout": ATTR_TIMEOUT, "entry_timeout": ATTR_TIMEOUT, "negative_timeout": ATTR_TIMEOUT,
               **_parse_fuse_options(extra_options)}
    try:
        _FUSE(operations, str(mountpoint), foreground=True, **options)
    except RuntimeError as e:
        raise MountError(f"mounting {mountpoint} failed (libfuse: {e})") from None


def _libc() -> ctypes.CDLL | None:
    """The C library if it is glibc (malloc tuning below is glibc's), else None."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None


def tune_malloc() -> None:
    """Fix glibc's mmap and trim thresholds and its arena count for the daemon (before any thread)."""
    libc = _libc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
        libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
        libc.mallopt(_M_ARENA_MAX, 1)


def _trim_malloc() -> None:
    """Hand the heap's free pages back to the OS (after the TOC parse, whose garbage leaves holes)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def _serve(args: argparse.Namespace, notify: Callable[[], None],
           progress: Callable[[int, int], None] | None = None) -> None:
    """Open the image and serve it at args.mountpoint until unmounted; `notify` runs once it answers and
    the landmark ranges are prefetched, `progress(done, total)` reports the prefetch meanwhile."""
    tune_malloc()
    view, info = _open_view(args)
    _trim_malloc()
    mountpoint = Path(args.mountpoint)
    try:
        serve_fuse(LazyFS(view, info, announce(mountpoint, info["reference"], notify), progress), mountpoint,
                   args.options)
    finally:
        view.close()
        view.cache.close()


Server = Callable[[argparse.Namespace, Callable[[], None], Callable[[int, int], None]], None]


def _mount_in_background(args: argparse.Namespace, serve: Server = _serve, own_session: bool = True) -> None:
    """Fork the daemon (before any thread exists) that runs `serve` (default: `_serve`), wait until its
    mount answers and the landmark ranges are prefetched (a progress bar on a terminal), or it fails.

    The daemon gets a session of its own, or with `own_session=False` (a mount that lives only as long
    as the command using it) just a process group of its own: the terminal's signals still miss it, and
    it stays in the caller's scheduler autogroup, where its nice-19 threads yield to the command
    instead of taking half a core from it as a separate group would."""
    for name in ("cache_dir", "config"):  # the daemon works from /
        if getattr(args, name, None):
            setattr(args, name, os.path.abspath(getattr(args, name)))
    if getattr(args, "image", None):
        args.image = config.absolute_reference(args.image)
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        code = 1
        # Until the mount answers, stderr (libfuse's and fusermount3's complaints) goes to a temp file
        # whose fuse lines explain a failure; afterwards to /dev/null.
        captured = tempfile.TemporaryFile()  # noqa: SIM115 -- lives as long as the daemon
        for sig in _TERMINATIONS:  # not the caller's handlers (see _exit_on_termination)
            signal.signal(sig, signal.SIG_DFL)
        try:
            if own_session:
                os.setsid()
            else:
                os.setpgid(0, 0)
            if os.fork():
                os._exit(0)
            os.chdir("/")  # pin no directory of the caller's
            _redirect_to_null(0, 1)
            os.dup2(captured.fileno(), 2)

            def ready() -> None:
                try:
                    os.write(write_fd, b"ok\n")
                except BrokenPipeError:  # the caller was stopped: no one will use or unmount this mount
                    log.warning("the mount command is gone: unmounting %s", args.mountpoint)
                    subprocess.run(["fusermount3", "-u", "-z", str(args.mountpoint)], check=False)
                os.close(write_fd)
                _redirect_to_null(2)

            def progress(done: int, total: int) -> None:
                with contextlib.suppress(OSError):
                    os.write(write_fd, f"{PROGRESS} {done} {total}\n".encode())

            serve(args, ready, progress)
            code = 0
        except toc.LazymountError as e:
            with contextlib.suppress(OSError):
                os.write(write_fd, f"{e}{_fuse_complaints(captured)}\n".encode())
        except OSError as e:  # e.g. a --cache-dir that is a file or not writable
            with contextlib.suppress(OSError):
                os.write(write_fd, f"{_os_error_text(e)}\n".encode())
        except BaseException as e:  # noqa: BLE001 -- the daemon must report and exit, never return
            log.debug("daemon failed", exc_info=True)
            with contextlib.suppress(OSError):
                os.write(write_fd, f"internal error: {type(e).__name__}: {e}\n".encode())
        finally:
            logging.shutdown()
            os._exit(code)
    os.close(write_fd)
    os.waitpid(pid, 0)
    lines = []
    with os.fdopen(read_fd, "rb") as pipe, convert.progress_bar("prefetch") as bar:
        for raw in pipe:
            line = raw.decode(errors="replace").strip()
            if line.startswith(PROGRESS + " "):
                done, total = (int(n) for n in line.split()[1:3])
                bar.total = total
                bar.update(done - bar.n)
            else:
                lines.append(line)
    message = "; ".join(filter(None, lines))
    if message != "ok":
        raise MountError(message or "the mount daemon exited before mounting (try --foreground -v)")


def _fuse_complaints(captured: BinaryIO) -> str:
    """The lines libfuse or fusermount3 wrote to stderr, as a suffix for an error message."""
    captured.seek(0)
    lines = captured.read(1 << 16).decode(errors="replace").splitlines()
    lines = [line.strip() for line in lines if line.startswith(("fuse", "fusermount"))]
    return f" ({'; '.join(lines)})" if lines else ""


def _redirect_to_null(*fds: int) -> None:
    null = os.open(os.devnull, os.O_RDWR)
    for fd in fds:
        os.dup2(null, fd)
    os.close(null)


def cmd_mount(args: argparse.Namespace) -> int:
    args.mountpoint = Path(args.mountpoint).absolute()
    mounted = _mount_at(args.mountpoint)
    if mounted and mounted[1].startswith("fuse.lazymount"):
        raise MountError(f"{args.mountpoint} is already a lazymount mount (lazymount umount it first)")
    if not args.mountpoint.is_dir():
        raise MountError(f"mount point {args.mountpoint} is not a directory")
    if args.foreground:
        _serve(args, lambda: None)
    else:
        _mount_in_background(args)
    return 0


def cmd_layers(args: argparse.Namespace) -> int:
    import layerfs  # the snapshotter's daemon only

    args.mountpoint = Path(args.mountpoint).absolute()
    args.specs = os.path.abspath(args.specs)
    if not args.mountpoint.is_dir():
        raise MountError(f"mount point {args.mountpoint} is not a directory")
    if args.foreground:
        layerfs.serve_layers(args, lambda: None)
    else:
        _mount_in_background(args, layerfs.serve_layers)
    return 0


def _daemon_pid(mountpoint: Path) -> int | None:
    try:
        return int(json.loads(os.getxattr(mountpoint, STATS_XATTR))["pid"])
    except (OSError, ValueError, KeyError):
        return None


def unmount(mountpoint: Path) -> None:
    """Unmount (lazily if busy or if the daemon died) and wait a little for the daemon to exit."""
    pid = _daemon_pid(mountpoint)
    result = None
    for command in (["fusermount3", "-u", str(mountpoint)], ["fusermount3", "-u", "-z", str(mountpoint)]):
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode == 0:
            break
    else:
        raise MountError(f"cannot unmount {mountpoint}: {result.stderr.strip() if result else ''}")
    deadline = time.monotonic() + UMOUNT_WAIT
    while pid is not None and _running(pid) and time.monotonic() < deadline:
        time.sleep(0.05)


def _running(pid: int) -> bool:
    """Whether process `pid` still runs; an exited daemon stays a zombie until init reaps it, which
    may take seconds."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rpartition(b")")[2].split()[0]
    except (OSError, IndexError):
        return False
    return state not in (b"Z", b"X")


def cmd_umount(args: argparse.Namespace) -> int:
    unmount(Path(args.mountpoint).absolute())
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    try:
        stats = json.loads(os.getxattr(args.mountpoint, STATS_XATTR))
    except OSError as e:
        raise MountError(f"{args.mountpoint} is not a lazymount mount ({e.strerror})") from None
    if args.json:
        print(json.dumps(stats, indent=2))
        return 0
    print(f"{stats['reference']} at {stats['mountpoint']} (pid {stats['pid']})")
    for layer in stats["layers"]:
        print(f"  {layer['digest'][:19]}  {layer['state']:7}  fetched {layer['bytes_fetched']:>12} B in "
              f"{layer['requests']} requests, served {layer['bytes_served']:>12} B, chunk hits "
              f"{layer['chunk_hits']}, fetched chunks {layer['chunks_fetched']}")
    c = stats["cache"]
    print(f"  cache: {c['hits_memory']} memory hits, {c['hits_disk']} disk hits, {c['misses']} misses, "
          f"{c['bytes_on_disk']} B on disk")
    return 0


# ------------------------------------------------------------------------------------------------ run


def _image_path(root: Path, relative: str) -> Path | None:
    """Where `relative` leads in the image mounted at `root`, its symlinks (absolute ones too) resolved
    inside the image as they will be in the container; None if it does not exist there."""
    parts, resolved, links = relative.strip("/").split("/"), root, 0
    while parts:
        name = parts.pop(0)
        if name in ("", "."):
            continue
        if name == "..":
            resolved = resolved.parent if resolved != root else root
            continue
        candidate = resolved / name
        try:
            if not stat.S_ISLNK(os.lstat(candidate).st_mode):
                resolved = candidate
                continue
            target = os.readlink(candidate)
        except OSError:
            return None
        links += 1
        if links > 40:
            return None
        parts = target.split("/") + parts
        if target.startswith("/"):
            resolved = root
    return resolved


def _read_image_file(root: Path, relative: str) -> str:
    """A small text file of the mounted image (symlinks resolved inside the image), or ''."""
    path = _image_path(root, relative)
    if path is None:
        return ""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return ""
    with os.fdopen(fd, encoding="utf-8", errors="replace") as f:
        return f.read(1 << 20)


def _image_ids(root: Path, user_spec: str) -> tuple[int, int]:
    """The uid and gid of the image's `User` (`name`, `uid`, `name:group`, `uid:gid`), from its files."""
    user, _, group = (user_spec or "0").partition(":")
    passwd = [line.split(":") for line in _read_image_file(root, "etc/passwd").splitlines()]
    passwd = [p for p in passwd if len(p) >= 4]
    match = [p for p in passwd if p[0] == user or p[2] == user]
    if user.isdigit():
        uid = int(user)
    elif match:
        uid = int(match[0][2])
    else:
        raise MountError(f"the image's user {user!r} is not in its /etc/passwd")
    gid = int(match[0][3]) if match and match[0][3].isdigit() else 0
    if group:
        groups = [line.split(":") for line in _read_image_file(root, "etc/group").splitlines()]
        named = [g for g in groups if len(g) >= 3 and g[0] == group]
        if group.isdigit():
            gid = int(group)
        elif named and named[0][2].isdigit():
            gid = int(named[0][2])
        else:
            raise MountError(f"the image's group {group!r} is not in its /etc/group")
    return uid, gid


def bwrap_command(root: Path, config: dict, command: list[str], binds: list[str]) -> list[str]:
    """The bubblewrap command line running `command` in the image mounted at `root`."""
    uid, gid = _image_ids(root, str(config.get("User") or ""))
    argv = ["bwrap", "--unshare-user", "--unshare-pid", "--die-with-parent", "--uid", str(uid),
            "--gid", str(gid), "--bind", str(root), "/", "--proc", "/proc", "--dev", "/dev",
            "--tmpfs", "/tmp"]
    for name in ("etc/resolv.conf", "etc/hosts"):  # the host's, over a plain file of the image's
        if os.path.isfile(f"/{name}") and _image_path(root, name) == root / name and (root / name).is_file():
            argv += ["--ro-bind", f"/{name}", f"/{name}"]
    for bind in binds:
        src, sep, dst = bind.partition(":")
        if not sep or not src or not dst.startswith("/"):
            raise MountError(f"--bind {bind!r}: expected SRC:/DST")
        argv += ["--bind", os.path.abspath(src), dst]
    argv.append("--clearenv")
    env = dict(item.partition("=")[::2] for item in config.get("Env") or [] if "=" in item)
    env.setdefault("PATH", DEFAULT_PATH)
    for key, value in env.items():
        argv += ["--setenv", key, value]
    argv += ["--chdir", config.get("WorkingDir") or "/"]
    if not command:
        command = list(config.get("Entrypoint") or []) + list(config.get("Cmd") or [])
    if not command:
        raise MountError("no command given and the image has no Entrypoint or Cmd")
    return [*argv, "--", *command]


def _command(args: argparse.Namespace) -> list[str]:
    """The command after IMAGE; options between IMAGE and `--` are the subcommand's, as before IMAGE."""
    command = args.command
    if "--" not in command:
        return command
    split = command.index("--")
    if split:
        args.subparser.parse_args([*command[:split], args.image], namespace=args)
    return command[split + 1:]


def run_in_image(args: argparse.Namespace, command: list[str]) -> int:
    """Mount args.image on a temp dir, run `command` (default: the image's) in it with bubblewrap, write
    the mount's stats to args.stats_file if set, unmount; return the command's exit status.  SIGTERM and
    SIGHUP end it like Ctrl-C does: the command is killed and the mount cleaned up."""
    if shutil.which("bwrap") is None:
        raise MountError("bubblewrap (bwrap) is not installed")
    args.mountpoint = Path(tempfile.mkdtemp(prefix="lazymount-run-"))
    args.layer, args.options = None, None
    try:
        with _exit_on_termination():
            _mount_in_background(args, own_session=False)
            try:
                try:  # waits for layers still downloading
                    info = json.loads(os.getxattr(args.mountpoint, IMAGE_XATTR))
                except OSError as e:
                    raise MountError(_unusable(args.mountpoint, e)) from None
                argv = bwrap_command(args.mountpoint, info["config"], command, args.bind)
                log.debug("running %s", argv)
                code = subprocess.run(argv, check=False).returncode
                if args.stats_file:
                    Path(args.stats_file).write_bytes(os.getxattr(args.mountpoint, STATS_XATTR))
            finally:
                unmount(args.mountpoint)
    finally:
        with contextlib.suppress(OSError):
            args.mountpoint.rmdir()
    return code if code >= 0 else 128 - code


@contextlib.contextmanager
def _exit_on_termination() -> Iterator[None]:
    """Within the block, SIGTERM and SIGHUP raise SystemExit(128 + signal number), so that cleanups run
    (subprocess.run kills its child on the way out)."""
    def leave(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = {sig: signal.signal(sig, leave) for sig in _TERMINATIONS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _unusable(mountpoint: Path, error: OSError) -> str:
    """Why the image mounted at `mountpoint` cannot be used: its failed layers, from its stats."""
    failed = []
    with contextlib.suppress(OSError):
        failed = [f"layer {layer['digest']}: {layer.get('error')}"
                  for layer in json.loads(os.getxattr(mountpoint, STATS_XATTR))["layers"]
                  if layer["state"] == "failed"]
    return "; ".join(failed) or f"the mount at {mountpoint} does not answer ({error.strerror})"


def cmd_run(args: argparse.Namespace) -> int:
    return run_in_image(args, _command(args))


def record_workload(args: argparse.Namespace, command: list[str]) -> tuple[int, dict[str, list[str]]]:
    """Run `command` in args.image while the mount logs the files it opens; return its exit status and
    the profile {layer digest: paths in the order first opened}."""
    with tempfile.TemporaryDirectory(prefix="lazymount-record-") as tmp:
        args.record_log = os.path.join(tmp, "access.log")
        Path(args.record_log).touch()
        code = run_in_image(args, command)
        return code, tree.read_access_log(args.record_log)


def cmd_record(args: argparse.Namespace) -> int:
    code, recorded = record_workload(args, _command(args))
    profile = recorded
    if args.append and args.output.exists():
        profile = merge_profiles([read_profile(args.output), recorded])
    write_profile(args.output, profile)
    print(f"lazymount: recorded {sum(map(len, recorded.values()))} files of {len(recorded)} layers in "
          f"{args.output}" + (f" (the command exited with status {code})" if code else ""), file=sys.stderr)
    return code


def cmd_optimize(args: argparse.Namespace) -> int:
    if bool(args.profile) == bool(args.workload):
        raise config.InvalidInputError("give either --profile FILE (repeatable) or --workload CMD")
    refs = config.parse_reference(args.src), config.parse_reference(args.dst)
    if args.workload:
        args.image, args.bind, args.stats_file = args.src, [], None
        code, profile = record_workload(args, shlex.split(args.workload))
        if code:
            raise MountError(f"the workload exited with status {code}; {args.src} was not optimized")
    else:
        profile = merge_profiles([read_profile(path) for path in args.profile])
    options = _layout_options(args)
    options.prioritized, options.optimize = profile, True
    manifest = convert.convert_image(args.src, args.dst, options, registry_client(args, *refs), args.platform)
    _print_manifest_layers(manifest)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lazymount", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv: debug)")
    sub = parser.add_subparsers(dest="command", required=True)

    registry = argparse.ArgumentParser(add_help=False)
    registry.add_argument("--platform", metavar="P", help="os/arch[/variant] to pick from an index")
    registry.add_argument("--creds", metavar="U:P", default=os.environ.get("LAZYMOUNT_CREDS"),
                          help="registry credentials (default: $LAZYMOUNT_CREDS, which other users cannot "
                               "read as they can a command line; else the auth files)")
    registry.add_argument("--plain-http", action="store_true", help="talk HTTP, not HTTPS, to registries")
    registry.add_argument("--config", metavar="FILE", help="YAML config (default: $LAZYMOUNT_CONFIG, "
                          "~/.config/lazymount/config.yaml, /etc/lazymount/config.yaml)")

    layout = argparse.ArgumentParser(add_help=False)
    layout.add_argument("--chunk-size", type=parse_size, default=toc.DEFAULT_CHUNK_SIZE, metavar="N")
    layout.add_argument("--zstd", action="store_true", help="write zstd:chunked instead of gzip eStargz")
    layout.add_argument("--level", type=int, default=3,
                        help="compression level (gzip: 0-3 isa-l; zstd: 1-22)")
    layout.add_argument("-j", "--jobs", type=int, default=None, metavar="N",
                        help="threads (default: all cores)")
    layout.add_argument("-q", "--quiet", action="store_true", help="no progress bar")

    p = sub.add_parser("convert", parents=[registry, layout], help="convert a layer or an image to eStargz")
    p.add_argument("src", help="layer file (.tar, .tar.gz, .tar.zst), REGISTRY/NAME[:TAG] or oci:DIR[:TAG]")
    p.add_argument("dst", help="output blob file, REGISTRY/NAME[:TAG] or oci:DIR[:TAG]")
    p.add_argument("--prioritize", type=Path, metavar="FILE",
                   help="paths (one a line) to place first, before .prefetch.landmark")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("inspect", parents=[registry], help="show the layers of an eStargz blob or image")
    p.add_argument("src", help="layer blob file, REGISTRY/NAME[:TAG] or oci:DIR[:TAG]")
    p.add_argument("--toc", action="store_true", help="print the TOC JSON")
    p.add_argument("--layer", metavar="DIGEST", help="only this layer of an image")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_inspect)

    mounting = argparse.ArgumentParser(add_help=False)
    mounting.add_argument("--cache-dir", metavar="D",
                          help="chunk cache directory (default ~/.cache/lazymount)")
    mounting.add_argument("--cache-size", type=parse_size, default=cache.DEFAULT_DISK_BYTES, metavar="N",
                          help="bound of the on-disk chunk cache (default 10G)")
    mounting.add_argument("--prefetch", action=argparse.BooleanOptionalAction, default=True,
                          help="fetch the landmark range [0, prefetch_end) of every layer before the mount "
                               "is ready")
    mounting.add_argument("--background-fetch", action=argparse.BooleanOptionalAction, default=True,
                          help="then fetch the rest of every layer at low priority")
    mounting.add_argument("--log-file", metavar="FILE", help="the daemon's log (default: discarded)")
    image = argparse.ArgumentParser(add_help=False, parents=[registry, mounting])
    image.add_argument("image", help="REGISTRY/NAME[:TAG|@DIGEST] or oci:DIR[:TAG]")
    running = argparse.ArgumentParser(add_help=False)
    running.add_argument("--bind", action="append", default=[], metavar="SRC:DST", help="bind a host path")
    running.add_argument("--stats-file", metavar="FILE",
                         help="write the mount's stats (as `stats --json`) here after the command")
    running.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD... (default: Entrypoint + Cmd)")

    daemon = argparse.ArgumentParser(add_help=False)
    daemon.add_argument("mountpoint")
    daemon.add_argument("--foreground", action="store_true", help="serve in this process until unmounted")
    daemon.add_argument("-o", dest="options", metavar="FUSE_OPTS",
                        help="extra FUSE options, e.g. allow_other")

    p = sub.add_parser("mount", parents=[image, daemon], help="mount an image read-only (FUSE)")
    p.add_argument("--layer", metavar="DIGEST", help="mount one layer as an overlayfs lower directory")
    p.set_defaults(func=cmd_mount)

    specs = argparse.ArgumentParser(add_help=False)
    specs.add_argument("specs", help="directory of layer spec files NAME.json")
    p = sub.add_parser("layers", parents=[registry, mounting, specs, daemon],
                       help="serve many layers from one daemon, each a top-level directory named after its "
                            "spec file in SPECS (what the snapshotter runs; see layerfs.py)")
    p.set_defaults(func=cmd_layers)

    p = sub.add_parser("umount", help="unmount (also a mount whose daemon died)")
    p.add_argument("mountpoint")
    p.set_defaults(func=cmd_umount)

    p = sub.add_parser("run", parents=[image, running], help="run a command in an image with bubblewrap")
    p.set_defaults(func=cmd_run, subparser=p)

    p = sub.add_parser("record", parents=[image, running],
                       help="run a command like `run` and write the files it opened as a profile")
    p.add_argument("-o", "--output", type=Path, default=Path("lazymount.profile"), metavar="PROFILE",
                   help="profile to write (default: lazymount.profile)")
    p.add_argument("--append", action="store_true", help="merge into PROFILE instead of replacing it")
    p.set_defaults(func=cmd_record, subparser=p)

    p = sub.add_parser("optimize", parents=[registry, layout, mounting],
                       help="convert an image with each layer's profiled files first (prefetched at mount)")
    p.add_argument("src", help="REGISTRY/NAME[:TAG] or oci:DIR[:TAG] (gzip or eStargz layers)")
    p.add_argument("dst", help="REGISTRY/NAME[:TAG] or oci:DIR[:TAG]")
    p.add_argument("--profile", type=Path, action="append", default=[], metavar="FILE",
                   help="a profile from `record` (repeatable: merged in order of first appearance)")
    p.add_argument("--workload", metavar="CMD", help="record this command in SRC first (shell-style words)")
    p.set_defaults(func=cmd_optimize)

    # `lazymount snapshotter ARGS` is handed whole to snapshot_grpc.main (see main); listed for --help
    sub.add_parser("snapshotter", help="serve containerd's Snapshots API with lazy eStargz layers")

    p = sub.add_parser("stats", help="bytes fetched and served, cache hits, per layer, of a mount")
    p.add_argument("mountpoint")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_stats)
    return parser


def _os_error_text(e: OSError) -> str:
    return f"{e.strerror or e}{': ' + str(e.filename) if e.filename else ''}"


def main(argv: list[str] | None = None) -> int:
    """Run the lazymount command line; return the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["snapshotter"]:
        import snapshot_grpc  # grpc is loaded for this command only

        return snapshot_grpc.main(argv[1:])
    args = build_parser().parse_args(argv)
    level = (logging.WARNING, logging.INFO, logging.DEBUG)[min(args.verbose, 2)]
    log_file = getattr(args, "log_file", None)
    prefix = "%(asctime)s %(process)d " if log_file else ""
    logging.basicConfig(level=level, filename=log_file,
                        format=prefix + "lazymount: %(levelname)s: %(message)s")
    try:
        return args.func(args)
    except toc.LazymountError as e:
        log.debug("failed", exc_info=True)
        print(f"lazymount: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        log.debug("failed", exc_info=True)
        print(f"lazymount: error: {_os_error_text(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # a bug, but the user still gets one line; -vv shows the traceback
        log.debug("internal error", exc_info=True)
        print(f"lazymount: internal error: {type(e).__name__}: {e} (-vv shows details)", file=sys.stderr)
        return 70


if __name__ == "__main__":
    sys.modules.setdefault("lazymount", sys.modules[__name__])  # `python -m lazymount`: layerfs imports us
    sys.exit(main())
