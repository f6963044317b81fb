"""The snapshotter's layer daemon: one FUSE file system whose top-level directories are image layers.

What belongs here: reading the spec files through which snapshot_grpc.py hands a layer over (mountctl.py
writes them; one per layer, read when the layer is first used, so they outlive both processes), loading a
layer (eStargz, or plain gzip through its seek index) into a raw engine.ImageView that shares the daemon's
one registry client and one chunk cache, keeping the layers' inode numbers apart,
and the FUSE operations that hand each path to its layer's fusefs.LazyFS.  What never does: the file
system of one layer (fusefs.LazyFS over engine.py), snapshots (snapshot_grpc.py), HTTP (regclient.py).

Layout of the mount: `/NAME` is the layer of `SPECS/NAME.json` exactly as `lazymount mount --layer` shows
it (an overlayfs lower directory).  The root's virtual xattr `user.lazymount.layer.NAME` loads the layer
and answers JSON (`{"error": ...}` if it cannot be served), or forgets the layer when its spec is gone.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import cache
import engine
import fetch
import fusefs
import referrers
import regclient
import seekindex
import toc
import tree
from mountctl import LAYER_NAME, LAYER_XATTR, STATS_XATTR, MountError, spec_path

mfusepy = fusefs.mfusepy  # as fusefs imported it: after choosing libfuse3
log = logging.getLogger(__name__)

@dataclass
class _Served:
    """A loaded layer: its file system and the offset added to its inode numbers."""

    fs: fusefs.LazyFS
    ino_offset: int


class LayersFS(mfusepy.Operations):
    """The FUSE operations: `/NAME/...` goes to layer NAME's LazyFS, loaded on first use from its spec."""

    use_ns = True

    def __init__(self, spec_dir: Path, mountpoint: Path, client: regclient.RegistryClient,
                 chunk_cache: cache.ChunkCache, cache_dir: Path, on_ready: Callable[[], None], *,
                 prefetch: bool = True, background: bool = True) -> None:
        self.spec_dir, self.mountpoint, self.client, self.cache = spec_dir, mountpoint, client, chunk_cache
        self.cache_dir, self._on_ready = cache_dir, on_ready
        self.prefetch, self.background = prefetch, background
        self._layers: dict[str, _Served] = {}
        self._loading: dict[str, threading.Lock] = {}
        self._next_ino = tree.ROOT_INO + 1  # the root of the mount is ROOT_INO; layers follow
        self._lock = threading.Lock()
        self._started = time.time_ns()
        self.activity = engine.ReadActivity()  # one for all layers: background fetches wait for any reader

    # -- the layer table ----------------------------------------------------------------------------

    def layer(self, name: str) -> _Served:
        """The layer `name`, loaded from its spec on first use; OSError ENOENT without a spec, EIO if it
        cannot be loaded (an error is not cached: the next use tries again)."""
        served = self._layers.get(name)
        if served is not None:
            return served
        with self._lock:
            lock = self._loading.setdefault(name, threading.Lock())
        with lock:
            served = self._layers.get(name)
            if served is None:
                try:
                    served = self._load(name)
                except FileNotFoundError:
                    raise OSError(errno.ENOENT, name) from None
                except (toc.LazymountError, OSError, ValueError, KeyError, TypeError) as e:
                    log.warning("layer %s: %s", name, e)
                    raise OSError(errno.EIO, f"layer {name}: {e}") from None
        return served

    def _load(self, name: str) -> _Served:
        spec = json.loads(spec_path(self.spec_dir, name).read_text())
        digest, size = toc.check_digest(spec["digest"]), int(spec["size"])
        toc_digest = spec.get("toc_digest") and toc.check_digest(spec["toc_digest"])
        blob = fetch.RegistryBlobReader(self.client, spec["reference"], digest, size)
        layer = engine.Layer(digest, blob, toc_digest)
        if not layer.open_index():
            layer.use_seek_index(self._seek_index(spec["reference"], fetch.Descriptor("", digest, size)))
        assert layer.index is not None
        view = engine.ImageView([layer], self.cache, self.cache_dir / "layers", raw=True,
                              opaque_xattr=fusefs.OPAQUE_XATTR, prefetch=self.prefetch,
                              background=self.background, activity=self.activity, cache_dir=self.cache_dir)
        prefetched = threading.Event()
        view.start(prefetched.set)
        prefetched.wait()  # like `lazymount mount`: the landmark range is in the cache before first use
        info = {"reference": spec["reference"], "digest": digest, "mountpoint": str(self.mountpoint / name),
                "config": {}}
        with self._lock:
            if not spec_path(self.spec_dir, name).exists():  # removed while it loaded (see `sync`)
                view.close()
                raise OSError(errno.ENOENT, f"layer {name}: its spec was removed while it loaded")
            # MergedTree numbers its inodes ROOT_INO .. ROOT_INO + entries: give each layer its own range
            served = _Served(fusefs.LazyFS(view, info, lambda: None), self._next_ino - tree.ROOT_INO)
            self._next_ino += len(layer.index) + 1
            self._layers[name] = served
        log.info("layer %s: serving %s of %s (%d entries)", name, digest, spec["reference"], len(layer.index))
        return served

    def _seek_index(self, reference: str, layer: fetch.Descriptor) -> seekindex.SeekIndex:
        """The seek index of a layer that is not eStargz: the one kept in the cache directory (where the
        snapshotter's probe put it), else the one attached to the image; MountError if it has none."""
        found = seekindex.find_index(layer, self.cache_dir)
        if found is None:
            image = fetch.open_image(reference, client=self.client)
            found = referrers.find_seek_index(image, layer, self.cache_dir)
        if found is None:
            raise MountError(f"layer {layer.digest} is neither eStargz nor indexed")
        return found

    def sync(self, name: str) -> dict:
        """Load layer `name` (answer `{"error": ...}` if it cannot be), or forget it if its spec is gone
        (OSError ENOATTR)."""
        if not spec_path(self.spec_dir, name).exists():
            with self._lock:
                served = self._layers.pop(name, None)
                self._loading.pop(name, None)
            if served is not None:
                served.fs.view.close()
                log.info("layer %s: spec removed, forgotten", name)
            raise OSError(mfusepy.ENOATTR, name)
        try:
            served = self.layer(name)
        except OSError as e:
            return {"error": e.strerror.removeprefix(f"layer {name}: ") if e.strerror else str(e)}
        return {"pid": os.getpid(), "digest": served.fs.info["digest"],
                "mountpoint": served.fs.info["mountpoint"]}

    def close(self) -> None:
        """Stop every layer's background work."""
        with self._lock:
            layers = list(self._layers.values())
        for served in layers:
            served.fs.view.close()

    # -- FUSE operations ----------------------------------------------------------------------------

    def _split(self, path: str) -> tuple[_Served | None, str]:
        """(the layer, the path inside it) of a path; (None, '/') for the root."""
        name, _, rest = path.lstrip("/").partition("/")
        if not name:
            return None, "/"
        if not LAYER_NAME.fullmatch(name):
            raise OSError(errno.ENOENT, path)
        return self.layer(name), "/" + rest

    @staticmethod
    def _shifted(served: _Served, attrs: dict) -> dict:
        return {**attrs, "st_ino": attrs["st_ino"] + served.ino_offset}

    @mfusepy.overrides(mfusepy.Operations)
    def init(self, path: str) -> None:
        self._on_ready()

    @mfusepy.overrides(mfusepy.Operations)
    def destroy(self, path: str) -> None:
        self.close()

    @mfusepy.overrides(mfusepy.Operations)
    def getattr(self, path: str, fh: int | None = None) -> dict:
        served, rest = self._split(path)
        if served is None:
            return {"st_ino": tree.ROOT_INO, "st_mode": stat.S_IFDIR | 0o755, "st_nlink": 2,
                    "st_mtime": self._started, "st_atime": self._started, "st_ctime": self._started,
                    "st_blksize": tree.BLOCK_SIZE}
        return self._shifted(served, served.fs.getattr(rest))

    @mfusepy.overrides(mfusepy.Operations)
    def readdir(self, path: str, fh: int) -> Iterator[tuple[str, dict, int]]:
        served, rest = self._split(path)
        if served is not None:
            for name, attrs, offset in served.fs.readdir(rest, fh):
                yield name, self._shifted(served, attrs), offset
            return
        own = {"st_mode": stat.S_IFDIR | 0o755, "st_ino": tree.ROOT_INO}
        yield ".", own, 0
        yield "..", own, 0
        with self._lock:
            layers = list(self._layers.items())
        for name, layer in layers:
            yield name, self._shifted(layer, layer.fs.getattr("/")), 0

    @mfusepy.overrides(mfusepy.Operations)
    def readlink(self, path: str) -> str:
        served, rest = self._split(path)
        if served is None:
            raise OSError(errno.EINVAL, path)
        return served.fs.readlink(rest)

    @mfusepy.overrides(mfusepy.Operations)
    def open(self, path: str, flags: int) -> int:
        served, rest = self._split(path)
        if served is None:
            raise OSError(errno.EISDIR, path)
        return served.fs.open(rest, flags)  # ENOSYS: files are opened without a round trip (see LazyFS)

    @mfusepy.overrides(mfusepy.Operations)
    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        served, rest = self._split(path)
        if served is None:
            raise OSError(errno.EISDIR, path)
        return served.fs.read(rest, size, offset, 0)

    @mfusepy.overrides(mfusepy.Operations)
    def getxattr(self, path: str, name: str, position: int = 0) -> bytes:
        served, rest = self._split(path)
        if served is not None:
            return served.fs.getxattr(rest, name, position)
        if name.startswith(LAYER_XATTR):
            try:
                return json.dumps(self.sync(name[len(LAYER_XATTR):])).encode()
            except MountError:
                raise OSError(mfusepy.ENOATTR, name) from None
        if name == STATS_XATTR:
            with self._lock:
                layers = list(self._layers.values())
            stats = [s for layer in layers for s in layer.fs.view.stats()["layers"]]
            return json.dumps({"reference": f"layers of {self.spec_dir}", "mountpoint": str(self.mountpoint),
                               "pid": os.getpid(), "layers": stats, "cache": self.cache.stats()}).encode()
        raise OSError(mfusepy.ENOATTR, name)

    @mfusepy.overrides(mfusepy.Operations)
    def listxattr(self, path: str) -> list[str]:
        served, rest = self._split(path)
        return served.fs.listxattr(rest) if served is not None else []

    @mfusepy.overrides(mfusepy.Operations)
    def statfs(self, path: str) -> dict[str, int]:
        served, rest = self._split(path)
        if served is not None:
            return served.fs.statfs(rest)
        return {"f_bsize": tree.BLOCK_SIZE, "f_frsize": tree.BLOCK_SIZE, "f_blocks": 0, "f_bfree": 0,
                "f_bavail": 0, "f_files": len(self._layers) + 1, "f_ffree": 0, "f_favail": 0,
                "f_namemax": 255}


def serve_layers(args: argparse.Namespace, notify: Callable[[], None],
                 progress: Callable[[int, int], None] | None = None) -> None:
    """Serve the layers of the spec directory args.specs at args.mountpoint until unmounted; `notify` runs
    once the mount answers (`progress` is unused: layers are prefetched when each is loaded)."""
    fusefs.tune_malloc()
    mountpoint = Path(args.mountpoint)
    cache_dir, chunk_cache = fusefs.open_chunk_cache(args)
    client = fusefs.registry_client(args)
    fs = LayersFS(Path(args.specs), mountpoint, client, chunk_cache, cache_dir,
                  fusefs.announce(mountpoint, f"the layers of {args.specs}", notify),
                  prefetch=args.prefetch, background=args.background_fetch)
    try:
        fusefs.serve_fuse(fs, mountpoint, args.options)
    finally:
        fs.close()
        chunk_cache.close()
        client.close()
