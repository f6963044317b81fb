"""The FUSE adapter: fusepy operations over one merged tree, and serving them at a mount point.

What belongs here: `LazyFS` (the read-only file system operations over an engine.ImageView), the libfuse 3
details mfusepy leaves out (symlink caching, READDIRPLUS with attributes, listings the kernel keeps),
mount options, the mount's read-ahead, the daemon's malloc tuning, and `serve_image` (open an image and
serve it until unmounted).
Both the command line and the snapshotter's layers daemon (layerfs.py) serve through here.  What never
does: argument parsing and messages (lazymount.py), daemonizing and unmounting (mountctl.py), the tree and
its reads (tree.py, engine.py), gRPC.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import ctypes
import errno
import itertools
import json
import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import cachetools

import cache
import config
import engine
import fetch
import profiles
import referrers
import regclient
import seekindex
import toc
import tree
from mountctl import IMAGE_XATTR, STATS_XATTR, MountError, mount_at

# Only libfuse3 lets a read exceed 128 KiB; mfusepy picks its library when imported.
os.environ.setdefault("FUSE_LIBRARY_NAME", "fuse3")
import mfusepy  # noqa: E402

_T = TypeVar("_T")

log = logging.getLogger("lazymount")

OPAQUE_XATTR = "trusted.overlay.opaque" if os.geteuid() == 0 else "user.overlay.opaque"  # raw layer views
ATTR_TIMEOUT = 86400.0  # an image never changes: the kernel may cache names and attributes for a day
READ_AHEAD_KB = 1024
RUNTIME_KEYS = ("Env", "WorkingDir", "User", "Entrypoint", "Cmd")  # what `run` needs of the image config
OPEN_FILES = 4096  # files whose sequential-read state the daemon remembers without OPEN
# libfuse 3 flags (fuse_common.h, fuse.h) that mfusepy does not name.
FUSE_CAP_CACHE_SYMLINKS = 1 << 23  # the kernel caches READLINK answers like page data
FUSE_CAP_READDIRPLUS_AUTO = 1 << 14  # the kernel asks for attributes in a listing only when it sees fit
FUSE_READDIR_PLUS = 1 << 0  # readdir is asked for full attributes...
FUSE_FILL_DIR_PLUS = 1 << 1  # ...and an entry filled with them needs no LOOKUP afterwards
# libfuse 3.13-3.15 on 64 bits (lib/fuse_i.h): `struct fuse_session` holds its /dev/fuse fd at byte 12
# and its `struct fuse_lowlevel_ops` at byte 40, whose 21st member (index 20) is opendir.
_SESSION_FD_OFFSET = 12
_SESSION_OPENDIR_OFFSET = 40 + 20 * 8
_LowLevelOpendir = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_void_p)
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


class _FUSE(mfusepy.FUSE):
    """mfusepy.FUSE that lets the kernel cache symlinks and directory listings, and answers READDIRPLUS
    with full attributes, so that a walk of the tree needs no LOOKUP round trip per entry (mfusepy fills
    only mode and inode) and a second walk no READDIR."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # listings cut short by a full reply buffer, by (path, offset): the kernel's next READDIR of that
        # directory resumes there, so a long directory costs one pass over its entries, not one per reply
        self._unfinished: cachetools.LRUCache[tuple[bytes, int], Iterator] = cachetools.LRUCache(64)
        self._unfinished_lock = threading.Lock()
        self._opendir: Callable | None = None  # the low-level opendir put in libfuse's, kept alive
        super().__init__(*args, **kwargs)  # mfusepy serves the file system from here until unmounted

    def _init(self, conn, config) -> None:
        if conn and conn.contents.capable & FUSE_CAP_CACHE_SYMLINKS:
            conn.contents.want |= FUSE_CAP_CACHE_SYMLINKS
        if conn:
            # READDIRPLUS for every part of a listing: with the default "auto", the kernel asks with
            # attributes only for a listing's first reply (~25 entries of one page), then a walk pays a
            # LOOKUP round trip for each of the directory's further entries
            conn.contents.want &= ~FUSE_CAP_READDIRPLUS_AUTO
        self._cache_listings()
        super()._init(conn, config)

    def _cache_listings(self) -> None:
        """Have the kernel keep directory listings (FOPEN_CACHE_DIR and FOPEN_KEEP_CACHE on OPENDIR).

        libfuse before 3.16.1 does not pass what the high-level opendir sets on to the kernel: its
        low-level opendir replies with a `fuse_file_info` of its own.  So in libfuse 3.13-3.15 that
        low-level op, in the session's table, is wrapped in one that sets the two flags first.  The
        table's place is checked (the session's fd where libfuse says, opendir inside libfuse) before
        anything is written; elsewhere listings are not cached, which is only slower.
        """
        if (not (3, 13) <= (mfusepy.fuse_version_major, mfusepy.fuse_version_minor) < (3, 16)
                or ctypes.sizeof(ctypes.c_void_p) != 8):
            log.debug("directory listings not cached: libfuse %d.%d", mfusepy.fuse_version_major,
                      mfusepy.fuse_version_minor)
            return
        lib = mfusepy._libfuse
        lib.fuse_get_session.restype = ctypes.c_void_p
        lib.fuse_get_session.argtypes = [ctypes.c_void_p]
        lib.fuse_session_fd.argtypes = [ctypes.c_void_p]
        session = lib.fuse_get_session(lib.fuse_get_context().contents.fuse)
        slot = ctypes.c_void_p.from_address(session + _SESSION_OPENDIR_OFFSET) if session else None
        libfuse = _library_of(lib.fuse_get_session)
        if (slot is None or libfuse is None or _library_of(slot.value) != libfuse
                or ctypes.c_int.from_address(session + _SESSION_FD_OFFSET).value
                != lib.fuse_session_fd(session)):
            log.warning("directory listings not cached: libfuse's session is not laid out as expected")
            return
        original = _LowLevelOpendir(slot.value)
        # the two flags are bits of the unsigned int after `flags`: set both in one write
        flags = mfusepy.fuse_file_info(cache_readdir=1, keep_cache=1)
        offset = ctypes.sizeof(ctypes.c_int)
        bits = ctypes.c_uint.from_buffer(flags, offset).value

        def opendir(req: int, ino: int, llfi: int) -> None:
            word = ctypes.c_uint.from_address(llfi + offset)
            word.value |= bits
            original(req, ino, llfi)
        self._opendir = _LowLevelOpendir(opendir)
        slot.value = ctypes.cast(self._opendir, ctypes.c_void_p).value

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
            st = _c_stat(attrs)
            fill = plus if name not in (".", "..") else 0  # the kernel skips these two in READDIRPLUS
            if filler(buf, name.encode(self.encoding, self.errors), st, position + 1, fill) != 0:
                entries = itertools.chain([entry], entries)  # did not fit: the next reply starts with it
                break
            position += 1
        if position > offset:  # the kernel asks again from here, if only to learn that the listing ended
            with self._unfinished_lock:
                self._unfinished[(path, position)] = entries
        return 0


def _c_stat(attrs: dict[str, int]) -> mfusepy.c_stat:
    """The `struct stat` of LazyFS attributes (times in ns): what mfusepy.set_st_attrs makes, built in one
    call instead of a lookup per key (a listing builds one per entry)."""
    get = attrs.get
    return mfusepy.c_stat(
        st_ino=get("st_ino", 0), st_mode=get("st_mode", 0), st_nlink=get("st_nlink", 0),
        st_uid=get("st_uid", 0), st_gid=get("st_gid", 0), st_size=get("st_size", 0),
        st_blocks=get("st_blocks", 0), st_blksize=get("st_blksize", 0), st_rdev=get("st_rdev", 0),
        st_atimespec=mfusepy.c_timespec(*divmod(get("st_atime", 0), 1_000_000_000)),
        st_mtimespec=mfusepy.c_timespec(*divmod(get("st_mtime", 0), 1_000_000_000)),
        st_ctimespec=mfusepy.c_timespec(*divmod(get("st_ctime", 0), 1_000_000_000)))


class _DlInfo(ctypes.Structure):
    _fields_ = [("dli_fname", ctypes.c_char_p), ("dli_fbase", ctypes.c_void_p),
                ("dli_sname", ctypes.c_char_p), ("dli_saddr", ctypes.c_void_p)]


def _library_of(address: int | ctypes._CFuncPtr | None) -> str | None:
    """The path of the shared object that holds code `address` (dladdr), None if none or unknown."""
    if not address:
        return None
    info = _DlInfo()
    found = ctypes.CDLL(None).dladdr(ctypes.cast(address, ctypes.c_void_p), ctypes.byref(info))
    return info.dli_fname.decode() if found and info.dli_fname else None


class LazyFS(mfusepy.Operations):
    """The FUSE operations: a thin, read-only adapter over an engine.ImageView.

    The image never changes, so the kernel is asked to do all it can on its own: files are opened
    without a round trip (``open`` answers ENOSYS, the kernel's zero-message open, which also keeps the
    page cache), symlinks are cached, and directory listings carry full attributes.  Only while
    recording are opens seen, since the profile lists the files opened.
    """

    use_ns = True

    def __init__(self, view: engine.ImageView, info: dict, on_ready: Callable[[], None],
                 progress: Callable[[int, int], None] | None = None) -> None:
        self.view, self.info, self._on_ready, self._progress = view, info, on_ready, progress
        self._handles: dict[int, tuple[tree.Node, engine.ReadState]] = {}
        self._files: cachetools.LRUCache[str, tuple[tree.Node, engine.ReadState]]
        self._files = cachetools.LRUCache(OPEN_FILES)
        self._next_fh = 1
        self._lock = threading.Lock()
        self._fs_bytes: int | None = None
        self._fuse: int | None = None  # libfuse's `struct fuse *`, once serving
        self._bare_root_shown = False
        self._listings = 0  # directory listings generated: those the kernel has cached are not

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
        with self._lock:
            self._listings += 1
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
            self._handles[fh] = (node, engine.ReadState())
        return fh

    @mfusepy.overrides(mfusepy.Operations)
    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        if fh:
            node, state = self._handles[fh]
        else:  # opened without a round trip: the file by its path
            with self._lock:
                found = self._files.get(path)
            if found is None:
                found = self._node(path)[1], engine.ReadState()
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
            return json.dumps({**self.info, **self.view.stats(), "listings": self._listings,
                               "pid": os.getpid()}).encode()
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
    return cache_dir, cache.ChunkCache(cache_dir, disk_bytes=args.cache_size, write_behind=True)


def _open_view(args: argparse.Namespace) -> tuple[engine.ImageView, dict]:
    """Resolve the image, read every eStargz layer's TOC, fetch the profiles attached to the image (unless
    --no-prefetch), and set up the cache and the view."""
    ref = config.parse_reference(args.image)
    client = registry_client(args, ref)
    image = fetch.open_image(ref, platform=args.platform, client=client)
    descriptors = image.layers
    if not descriptors:
        raise MountError(f"{args.image} has no layers: there is nothing to mount")
    if args.layer:
        descriptors = [d for d in descriptors if d.digest == args.layer]
        if not descriptors:
            raise MountError(f"{args.image} has no layer {args.layer}")
    layers = [engine.Layer(d.digest, image.blob(d.digest), d.annotations.get(toc.TOC_DIGEST_ANNOTATION),
                           limits=client.config.limits) for d in descriptors]
    cache_dir, chunk_cache = open_chunk_cache(args)

    def seek_index(is_lazy: bool, descriptor: fetch.Descriptor) -> seekindex.SeekIndex | None:
        return None if is_lazy else referrers.find_seek_index(image, descriptor, cache_dir)

    # Seek indexes and profiles are optional: a registry that does not answer for them within its
    # range_timeout costs the mount no more than that (the lookups left behind end on their own).
    pool = concurrent.futures.ThreadPoolExecutor(8)
    try:
        profile = pool.submit(_attached_profile, image) if args.prefetch else None
        lazy = list(pool.map(engine.Layer.open_index, layers))
        wait = client.config.for_host(ref.domain).range_timeout
        deadline = time.monotonic() + wait
        lookups = [pool.submit(seek_index, is_lazy, d) for is_lazy, d in zip(lazy, descriptors, strict=True)]
        seeks = [_within(lookup, deadline, wait, f"the seek index of layer {d.digest}")
                 for lookup, d in zip(lookups, descriptors, strict=True)]
        attached = _within(profile, deadline, wait, "the attached profiles") if profile else None
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    for layer, is_lazy, descriptor, seek in zip(layers, lazy, descriptors, seeks, strict=True):
        if seek is not None:
            layer.use_seek_index(seek)
            log.info("layer %s: reading it through its %s", layer.digest, seek.describe())
        elif not is_lazy:
            log.warning("layer %s (%s) is not eStargz with a TOC digest: downloading it whole in the "
                        "background", layer.digest, descriptor.media_type or "no media type")
    recorder = profiles.AccessRecorder(args.record_log) if getattr(args, "record_log", None) else None
    view = engine.ImageView(layers, chunk_cache, cache_dir / "layers", raw=bool(args.layer),
                          opaque_xattr=OPAQUE_XATTR, prefetch=args.prefetch, background=args.background_fetch,
                          recorder=recorder, profile=attached,
                          cache_dir=cache_dir, name=str(ref), local_copy=getattr(args, "local_copy", None))
    runtime = image.config.get("config") if isinstance(image.config.get("config"), dict) else {}
    info = {"reference": str(ref), "digest": image.digest, "mountpoint": str(args.mountpoint),
            "config": {k: runtime[k] for k in RUNTIME_KEYS if k in runtime}}
    return view, info


def _within(future: concurrent.futures.Future[_T], deadline: float, wait: float, what: str) -> _T | None:
    """The future's result, or None (logged in one line) if it is not there by `deadline`."""
    try:
        return future.result(timeout=max(deadline - time.monotonic(), 0))
    except concurrent.futures.TimeoutError:
        log.warning("%s: no answer from the registry within %.0f s; going on without it", what, wait)
        return None


def _attached_profile(image: fetch.Image) -> dict[str, list[str]]:
    """The profiles attached to the image (`record --push`), merged; {} if there are none or they cannot
    be had (the mount goes on without them)."""
    try:
        profile = profiles.attached_profile(image)
    except toc.LazymountError as e:
        log.warning("%s: the profiles attached to the image are not used: %s", image.reference, e)
        return {}
    if profile:
        log.info("%s: prefetching the %d files of its attached profiles", image.reference,
                 sum(map(len, profile.values())))
    return profile


def _raise_read_ahead(mountpoint: Path) -> None:
    """Let the kernel read ahead 1 MiB on this mount (the bdi file is writable by root only)."""
    try:
        mounted = mount_at(mountpoint)
        path = Path(f"/sys/class/bdi/{mounted[0]}/read_ahead_kb") if mounted else None
        if path is not None and os.access(path, os.W_OK):
            path.write_text(str(READ_AHEAD_KB))
    except OSError as e:
        log.debug("read_ahead_kb not raised: %s", e)


def announce(mountpoint: Path, what: str, notify: Callable[[], None]) -> Callable[[], None]:
    """The callback to run once the mount at `mountpoint` answers: raise its read-ahead, log, `notify`.
    All three run in a thread of their own (the callback may come from libfuse's init), and in this
    order, so that the mount command returns with the read-ahead already raised."""
    def announced() -> None:
        _raise_read_ahead(mountpoint)
        log.info("mounted %s at %s", what, mountpoint)
        notify()

    def ready() -> None:
        threading.Thread(target=announced, daemon=True).start()
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


def serve_image(args: argparse.Namespace, notify: Callable[[], None],
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
