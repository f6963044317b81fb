"""lazymount's containerd remote snapshotter: the Snapshots gRPC service (a containerd proxy plugin).

What belongs here: the `containerd.services.snapshots.v1.Snapshots` service over an overlayfs backend laid
out like containerd's built-in overlayfs snapshotter (`ROOT/snapshots/ID/fs` and `work`, the mounts it
answers, usage), the remote-layer flow (a layer is mounted lazily, committed under its chain ID and
answered ALREADY_EXISTS, or declined so containerd downloads it), restoring remote layers, the health
service, Prometheus metrics and the daemon's command line.  What never does: the metadata and its
queries (snapshot_store.py), FUSE, registry HTTP or the eStargz format — every lazy layer is served by
one `lazymount layers` daemon (layerfs.py) and probed through fetch.py and toc.py.

Containerd registers it with ``[proxy_plugins.lazymount] type = "snapshot" address = "SOCKET"``
(contrib/containerd-config.toml).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import wsgiref.simple_server
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent import futures
from pathlib import Path
from typing import Protocol, TypeVar

import grpc
import prometheus_client
from google.protobuf import empty_pb2, timestamp_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

import config
import fetch
import mount_pb2
import mountctl
import regclient
import snapshots_pb2
import snapshots_pb2_grpc
import toc
from snapshot_store import (
    ACTIVE,
    COMMITTED,
    REMOTE_LABEL,
    VIEW,
    AlreadyExistsError,
    FailedPreconditionError,
    Info,
    MetaStore,
    NotFoundError,
    Snapshot,
    SnapshotError,
    UnavailableError,
    check_labels,
    parse_filters,
)

log = logging.getLogger(__name__)
_T = TypeVar("_T")

SERVICE_NAME = "containerd.services.snapshots.v1.Snapshots"
DEFAULT_ADDRESS = "/run/lazymount/snapshotter.sock"
DEFAULT_ROOT = "/var/lib/lazymount-snapshotter"
LIST_BATCH = 100  # Info messages per ListSnapshotsResponse
MOUNT_TIMEOUT = 300.0  # seconds starting the `lazymount layers` daemon may take
IMAGE_CACHE_SIZE = 32  # resolved images kept to find the descriptors of their layers
GRACE_SECONDS = 10.0  # in-flight calls may finish this long after SIGTERM

# Labels containerd and its clients set on Prepare (see DESIGN.md "containerd remote snapshotter").
TARGET_LABEL = "containerd.io/snapshot.ref"  # the chain ID the layer would be committed as
REFERENCE_LABELS = ("containerd.io/snapshot/remote/stargz.reference", "containerd.io/snapshot/cri.image-ref")
DIGEST_LABELS = ("containerd.io/snapshot/remote/stargz.digest", "containerd.io/snapshot/cri.layer-digest")
LOG_KEY = "remote-snapshot-prepared"  # stable: integration tests grep for it
# containerd's snapshots.UnpackKeyPrefix: the key of an active snapshot a layer is unpacked into is
# "NAMESPACE/N/extract-NONCE CHAINID" (`ctr images pull` unpacks without a TARGET_LABEL).
UNPACK_KEY_PREFIX = "extract-"

REQUESTS = prometheus_client.Counter("lazymount_snapshotter_requests", "Snapshots service calls",
                                     ["method", "code"])
LATENCY = prometheus_client.Histogram("lazymount_snapshotter_request_seconds",
                                      "Snapshots service call duration", ["method"])
REMOTE_PREPARES = prometheus_client.Counter("lazymount_snapshotter_remote_prepares",
                                            "Prepare calls with a layer target, by outcome", ["prepared"])
REMOTE_RESTORES = prometheus_client.Counter("lazymount_snapshotter_remote_restores",
                                            "Remote layer mounts found dead and mounted again", ["result"])
REMOTE_MOUNTED = prometheus_client.Gauge("lazymount_snapshotter_remote_layers",
                                         "Remote layers committed in the metadata")


class DeclinedError(toc.LazymountError):
    """A layer cannot be mounted lazily; the message is the reason logged under LOG_KEY."""


def disk_usage(root: Path) -> tuple[int, int]:
    """(bytes, inodes) under root like containerd's fs.DiskUsage: st_blocks are 512-byte units, and a
    hardlinked inode counts once."""
    seen: set[tuple[int, int]] = set()
    size = 0
    stack = [str(root)]
    first = os.lstat(root)
    seen.add((first.st_dev, first.st_ino))
    size += first.st_blocks * 512
    while stack:
        with os.scandir(stack.pop()) as entries:
            for entry in entries:
                st = entry.stat(follow_symlinks=False)
                if (st.st_dev, st.st_ino) not in seen:
                    seen.add((st.st_dev, st.st_ino))
                    size += st.st_blocks * 512
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
    return size, len(seen)


# --------------------------------------------------------------------------------------- remote layers


class LayerMounter(Protocol):
    """What the snapshotter needs of a lazy file system: one read-only directory per layer, shaped as an
    overlayfs lower directory (whiteouts as 0:0 character devices, `trusted.overlay.opaque=y`), named by
    the snapshotter (`name`: the snapshot's ID)."""

    def mount(self, name: str, reference: str, layer_digest: str) -> None:
        """Serve the layer as `name` or raise DeclinedError with the reason."""

    def directory(self, name: str) -> Path:
        """Where the layer `name` is served."""

    def alive(self, name: str) -> bool:
        """Whether the layer `name` is served (loading it if its server just started)."""

    def unmount(self, name: str) -> None:
        """Stop serving the layer `name`; no error if it is not served."""


def _mount_state(mountpoint: Path) -> str:
    """`alive`, `dead` (a mount whose server is gone: ENOTCONN) or `absent` (a plain directory)."""
    try:
        if os.stat(mountpoint).st_dev == os.stat(mountpoint.parent).st_dev:
            return "absent"
        # stat may be answered from the kernel's attribute cache even after the FUSE server died;
        # statfs is never cached, so it reaches the server.
        os.statvfs(mountpoint)
    except FileNotFoundError:
        return "absent"
    except OSError:
        return "dead"
    return "alive"


def _check_fuse() -> None:
    """DeclinedError unless this machine can serve FUSE: /dev/fuse exists and libfuse loads."""
    if not os.path.exists("/dev/fuse"):
        raise DeclinedError("lazy mount unavailable: no /dev/fuse")
    try:
        import fusefs  # noqa: F401 -- loads libfuse, at call time: ordinary layers never need it
    except (ImportError, OSError) as e:  # mfusepy raises OSError without libfuse
        raise DeclinedError(f"lazy mount unavailable: {type(e).__name__}: {e}") from None


class LayerDaemon:
    """Serves every layer from one `lazymount layers` daemon (layerfs.py) mounted at ROOT/layers, which
    survives a restart of the snapshotter and is started again when found dead.  A layer is handed over
    as a spec file in ROOT/layer-specs after probing the registry: the layer must be eStargz (a TOC digest
    annotation and an eStargz footer) and its registry must answer Range requests."""

    def __init__(self, root: Path, config_path: str | None) -> None:
        self.root, self.config_path = root, config_path
        self.mountpoint, self.spec_dir = root / "layers", root / "layer-specs"
        self._config: config.Config | None = None
        self._images: OrderedDict[str, fetch.Image] = OrderedDict()
        self._lock = threading.Lock()
        self._daemon_lock = threading.Lock()

    def _image(self, reference: str) -> fetch.Image:
        with self._lock:
            image = self._images.get(reference)
            if image is not None:
                self._images.move_to_end(reference)
                return image
            if self._config is None:
                self._config = config.load_config(self.config_path)
            settings = self._config
        image = fetch.open_image(reference, settings)
        with self._lock:
            self._images[reference] = image
            while len(self._images) > IMAGE_CACHE_SIZE:
                self._images.popitem(last=False)
        return image

    def probe(self, reference: str, layer_digest: str) -> fetch.Descriptor:
        """The layer's descriptor; DeclinedError unless it is eStargz in a registry that answers Range
        requests."""
        try:
            image = self._image(reference)
            descriptor = next((d for d in image.layers if d.digest == layer_digest), None)
            if descriptor is None:
                raise DeclinedError(f"layer {layer_digest} is not in {reference}")
            if toc.TOC_DIGEST_ANNOTATION not in descriptor.annotations:
                raise DeclinedError("layer is not eStargz (no TOC digest annotation)")
            with image.blob(layer_digest) as blob:
                tail = blob.read_at(max(0, blob.size - toc.FOOTER_SIZE), toc.FOOTER_SIZE)
                if blob.ranges_supported is False:
                    raise DeclinedError("registry ignores Range requests")
            toc.parse_footer(tail, descriptor.size)
        except toc.FooterError as e:
            raise DeclinedError(f"layer is not eStargz ({e})") from None
        except (regclient.RegistryError, config.InvalidInputError, OSError) as e:
            raise DeclinedError(f"registry unreachable or refused: {e}") from None
        return descriptor

    def _ensure_daemon(self) -> None:
        """Start the daemon unless its mount answers (a dead one is unmounted first)."""
        _check_fuse()
        with self._daemon_lock:
            state = _mount_state(self.mountpoint)
            if state == "alive":
                return
            if state == "dead":
                log.warning("the layer daemon at %s died: starting it again", self.mountpoint)
                try:
                    mountctl.unmount(self.mountpoint)
                except toc.LazymountError as e:
                    raise DeclinedError(f"cannot unmount the dead layer daemon: {e}") from None
            self.mountpoint.mkdir(exist_ok=True)
            logs = self.root / "logs"
            logs.mkdir(exist_ok=True)
            command = [sys.executable, "-m", "lazymount", "-v", "layers", "--cache-dir",
                       str(self.root / "cache"), "-o", "allow_other", "--log-file", str(logs / "layers.log"),
                       str(self.spec_dir), str(self.mountpoint)]
            env = dict(os.environ)
            if self.config_path:
                env["LAZYMOUNT_CONFIG"] = str(Path(self.config_path).absolute())
            try:
                result = subprocess.run(command, capture_output=True, text=True, env=env,
                                        timeout=MOUNT_TIMEOUT, check=False)
            except subprocess.TimeoutExpired:
                raise DeclinedError(f"starting the layer daemon took over {MOUNT_TIMEOUT:.0f} s") from None
            if result.returncode != 0:
                message = result.stderr.strip().splitlines()[-1:] or [f"exit status {result.returncode}"]
                raise DeclinedError(f"mount failed: {message[0].removeprefix('lazymount: error: ')}")
            log.info("layer daemon serving %s", self.mountpoint)

    def _sync(self, name: str) -> dict:
        """Ask the daemon to load the layer `name` (or forget it, its spec gone): its JSON answer."""
        try:
            return json.loads(os.getxattr(self.mountpoint, mountctl.LAYER_XATTR + name))
        except OSError as e:
            return {"error": e.strerror or str(e)}

    def mount(self, name: str, reference: str, layer_digest: str) -> None:
        _check_fuse()
        descriptor = self.probe(reference, layer_digest)
        mountctl.write_spec(self.spec_dir, name, reference, layer_digest, descriptor.size,
                           descriptor.annotations[toc.TOC_DIGEST_ANNOTATION])
        try:
            self._ensure_daemon()
            error = self._sync(name).get("error")
            if error:
                raise DeclinedError(f"mount failed: {error}")
        except DeclinedError:
            self.unmount(name)
            raise

    def directory(self, name: str) -> Path:
        return self.mountpoint / name

    def alive(self, name: str) -> bool:
        return _mount_state(self.mountpoint) == "alive" and "error" not in self._sync(name)

    def unmount(self, name: str) -> None:
        if not self.spec_dir.is_dir():
            return  # no layer was ever handed over
        try:
            spec = mountctl.spec_path(self.spec_dir, name)
            if not spec.exists():
                return
            spec.unlink()
        except (toc.LazymountError, OSError) as e:
            log.warning("removing the spec of layer %s: %s", name, e)
            return
        if _mount_state(self.mountpoint) == "alive":
            self._sync(name)  # the daemon forgets the layer


def _remote_source(labels: Mapping[str, str]) -> tuple[str, str]:
    """(image reference, layer digest) from the labels ctr-remote or the CRI plugin set."""
    reference = next((labels[k] for k in REFERENCE_LABELS if labels.get(k)), "")
    digest = next((labels[k] for k in DIGEST_LABELS if labels.get(k)), "")
    if not reference or not digest:
        raise DeclinedError("no remote image labels (image reference and layer digest)")
    try:
        toc.check_digest(digest)
    except toc.LazymountError:
        raise DeclinedError(f"invalid layer digest {digest[:80]!r}") from None
    return reference, digest


# ------------------------------------------------------------------------------------------ snapshotter


class Snapshotter:
    """The overlayfs snapshotter with remote layers; the gRPC service is a thin adapter over this."""

    def __init__(self, root: Path, mounter: LayerMounter) -> None:
        self.root, self.mounter = root, mounter
        self.snapshots_dir = root / "snapshots"
        self.snapshots_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.store = MetaStore(root / "metadata.db")
        self._index_off = os.path.exists("/sys/module/overlay/parameters/index")
        self._restore_locks: dict[int, threading.Lock] = {}
        self._restore_guard = threading.Lock()

    def close(self) -> None:
        self.store.close()

    def _fs(self, sid: int) -> Path:
        return self.snapshots_dir / str(sid) / "fs"

    def _work(self, sid: int) -> Path:
        return self.snapshots_dir / str(sid) / "work"

    # -- creating ----------------------------------------------------------------------------------

    def _create(self, kind: int, key: str, parent: str, labels: Mapping[str, str]) -> Snapshot:
        labels = check_labels(labels)
        with self.store.transaction() as db:
            snapshot = self.store.create(db, kind, key, parent, labels)
            directory = self.snapshots_dir / str(snapshot.id)
            try:
                directory.mkdir(mode=0o700)
                self._fs(snapshot.id).mkdir(mode=0o755)
                if kind == ACTIVE:
                    self._work(snapshot.id).mkdir(mode=0o711)
                if snapshot.parent_ids:
                    st = os.stat(self._fs(snapshot.parent_ids[0]))
                    os.lchown(self._fs(snapshot.id), st.st_uid, st.st_gid)
            except BaseException:
                shutil.rmtree(directory, ignore_errors=True)
                raise
        return snapshot

    def prepare(self, key: str, parent: str, labels: Mapping[str, str]) -> list[mount_pb2.Mount]:
        """An active snapshot; with a layer target, first try to mount the layer lazily (then raise
        AlreadyExistsError: containerd skips the download)."""
        target = labels.get(TARGET_LABEL)
        if target and self._committed_target(target, parent):
            raise AlreadyExistsError(f"target snapshot {target!r}: already exists")
        snapshot = self._create(ACTIVE, key, parent, labels)
        if target:
            self._try_remote(snapshot, key, target, labels)
        elif key.rpartition("/")[2].startswith(UNPACK_KEY_PREFIX):
            self._log_prepared(False, f"no {TARGET_LABEL} label: the client unpacks the layer itself",
                               "-", key)
        return self._mounts(snapshot)

    def _committed_target(self, target: str, parent: str) -> bool:
        with self.store.transaction() as db:
            try:
                _, info, _ = self.store.get(db, target)
            except NotFoundError:
                return False
        return info.kind == COMMITTED and info.parent == parent and REMOTE_LABEL in info.labels

    def _try_remote(self, snapshot: Snapshot, key: str, target: str, labels: Mapping[str, str]) -> None:
        try:
            reference, digest = _remote_source(labels)
        except DeclinedError as e:
            self._log_prepared(False, str(e), "-", key)
            return
        try:
            self.mounter.mount(str(snapshot.id), reference, digest)
        except DeclinedError as e:
            self._log_prepared(False, str(e), digest, key)
            return
        try:
            with self.store.transaction() as db:
                self.store.commit(db, key, target, (0, 0), {**labels, REMOTE_LABEL: "remote snapshot"})
        except AlreadyExistsError:
            # A concurrent Prepare (another namespace) committed the same layer first: drop this copy.
            self.remove(key)
            self._log_prepared(True, "committed meanwhile by a concurrent prepare", digest, key)
            raise
        except SnapshotError as e:
            # The layer is served under this active snapshot's ID: keep the key unusable rather than hand
            # out a snapshot the lazy file system stands for (as stargz-snapshotter does).
            self._log_prepared(False, f"commit failed: {e}", digest, key)
            raise
        REMOTE_MOUNTED.inc()
        self._log_prepared(True, "mounted lazily", digest, key)
        raise AlreadyExistsError(f"target snapshot {target!r}: already exists")

    @staticmethod
    def _log_prepared(prepared: bool, reason: str, digest: str, key: str) -> None:
        REMOTE_PREPARES.labels(prepared=str(prepared).lower()).inc()
        log.log(logging.INFO if prepared else logging.WARNING, '%s: %s reason="%s" layer=%s key=%s',
                LOG_KEY, str(prepared).lower(), reason, digest, key)

    def view(self, key: str, parent: str, labels: Mapping[str, str]) -> list[mount_pb2.Mount]:
        return self._mounts(self._create(VIEW, key, parent, labels))

    def mounts(self, key: str) -> list[mount_pb2.Mount]:
        with self.store.transaction() as db:
            snapshot = self.store.snapshot(db, key)
        return self._mounts(snapshot)

    def _mounts(self, snapshot: Snapshot) -> list[mount_pb2.Mount]:
        """The mounts of containerd's overlayfs snapshotter, after checking the remote layers below (their
        directories are the lazy file system's)."""
        remote = self._ensure_remote_layers(snapshot.parent_ids)

        def layer(sid: int) -> str:
            return str(self.mounter.directory(str(sid)) if sid in remote else self._fs(sid))

        if not snapshot.parent_ids:
            flag = "ro" if snapshot.kind == VIEW else "rw"
            return [mount_pb2.Mount(type="bind", source=str(self._fs(snapshot.id)), options=[flag, "rbind"])]
        if snapshot.kind != ACTIVE and len(snapshot.parent_ids) == 1:
            return [mount_pb2.Mount(type="bind", source=layer(snapshot.parent_ids[0]),
                                    options=["ro", "rbind"])]
        options = ["index=off"] if self._index_off else []
        if snapshot.kind == ACTIVE:
            options += [f"workdir={self._work(snapshot.id)}", f"upperdir={self._fs(snapshot.id)}"]
        options.append("lowerdir=" + ":".join(layer(p) for p in snapshot.parent_ids))
        return [mount_pb2.Mount(type="overlay", source="overlay", options=options)]

    # -- remote layer health -----------------------------------------------------------------------

    def _ensure_remote_layers(self, ids: Sequence[int]) -> set[int]:
        """The remote layers among `ids`, each mounted again if its mount died; UnavailableError if one
        cannot be."""
        if not ids:
            return set()
        with self.store.transaction() as db:
            remote = self.store.remote_layers(db, ids)
        for sid, info in remote:
            if not self.mounter.alive(str(sid)):
                self._restore(sid, info)
        return {sid for sid, _ in remote}

    def _restore(self, sid: int, info: Info) -> None:
        with self._restore_guard:
            lock = self._restore_locks.setdefault(sid, threading.Lock())
        with lock:
            name = str(sid)
            if self.mounter.alive(name):
                return
            log.warning("remote layer %s (%s) is not mounted: mounting it again", info.name,
                        self.mounter.directory(name))
            self.mounter.unmount(name)
            try:
                self.mounter.mount(name, *_remote_source(info.labels))
            except DeclinedError as e:
                REMOTE_RESTORES.labels(result="failed").inc()
                log.error("remote layer %s unavailable: %s", info.name, e)
                raise UnavailableError(f"layer {info.name!r} unavailable: {e}") from None
            REMOTE_RESTORES.labels(result="restored").inc()

    def restore_remote_layers(self) -> None:
        """Before serving: mount again every recorded remote layer that is not mounted (failures are
        logged; Mounts reports them as UNAVAILABLE until a later attempt succeeds)."""
        with self.store.transaction() as db:
            remote = self.store.remote_layers(db)
        REMOTE_MOUNTED.set(len(remote))
        for sid, info in remote:
            if self.mounter.alive(str(sid)):
                log.info("remote layer %s still mounted", info.name)
                continue
            with contextlib.suppress(UnavailableError):
                self._restore(sid, info)

    # -- the rest of the API -----------------------------------------------------------------------

    def commit(self, name: str, key: str, labels: Mapping[str, str]) -> None:
        labels = check_labels(labels)
        with self.store.transaction() as db:
            sid, info, _ = self.store.get(db, key)
        if info.kind != ACTIVE:
            raise FailedPreconditionError(f"snapshot {key!r} is not active")
        usage = disk_usage(self._fs(sid))  # outside the transaction: a big layer takes a while
        with self.store.transaction() as db:
            self.store.commit(db, key, name, usage, labels)

    def remove(self, key: str) -> None:
        with self.store.transaction() as db:
            sid, info = self.store.remove(db, key)
        if REMOTE_LABEL in info.labels:
            REMOTE_MOUNTED.dec()
        self._remove_directory(self.snapshots_dir / str(sid))

    def _remove_directory(self, directory: Path) -> None:
        fs = directory / "fs"
        self.mounter.unmount(directory.name)
        if _mount_state(fs) != "absent":
            log.error("%s is still mounted: not removing %s", fs, directory)
            return
        try:
            shutil.rmtree(directory)
        except FileNotFoundError:
            pass
        except OSError as e:
            log.warning("removing %s: %s", directory, e)

    def stat(self, key: str) -> Info:
        with self.store.transaction() as db:
            return self.store.get(db, key)[1]

    def update(self, info: Info, paths: Sequence[str]) -> Info:
        check_labels(info.labels)
        with self.store.transaction() as db:
            return self.store.update(db, info, paths)

    def walk(self, filters: Sequence[str]) -> list[Info]:
        match = parse_filters(filters)
        with self.store.transaction() as db:
            return [info for info in self.store.walk(db) if match(info)]

    def usage(self, key: str) -> tuple[int, int]:
        with self.store.transaction() as db:
            sid, info, usage = self.store.get(db, key)
        return disk_usage(self._fs(sid)) if info.kind == ACTIVE else usage

    def cleanup(self) -> None:
        """Remove the directories no snapshot owns (left by a crash between mkdir and commit)."""
        with self.store.transaction() as db:
            ids = self.store.ids(db)
        for directory in self.snapshots_dir.iterdir():
            if not (directory.name.isdigit() and int(directory.name) in ids):
                log.info("cleanup: removing %s", directory)
                self._remove_directory(directory)


# ------------------------------------------------------------------------------------------ gRPC layer


def _info_proto(info: Info) -> snapshots_pb2.Info:
    def stamp(ns: int) -> timestamp_pb2.Timestamp:
        return timestamp_pb2.Timestamp(seconds=ns // 1_000_000_000, nanos=ns % 1_000_000_000)

    return snapshots_pb2.Info(name=info.name, parent=info.parent, kind=info.kind,
                              created_at=stamp(info.created), updated_at=stamp(info.updated),
                              labels=info.labels)


class SnapshotsService(snapshots_pb2_grpc.SnapshotsServicer):
    """containerd.services.snapshots.v1.Snapshots over a Snapshotter: errors become gRPC status codes
    (containerd maps them back to errdefs), every call is counted and timed."""

    def __init__(self, snapshotter: Snapshotter) -> None:
        self.sn = snapshotter

    def _call(self, method: str, context: grpc.ServicerContext, fn: Callable[[], _T]) -> _T:
        code = grpc.StatusCode.OK
        start = time.perf_counter()
        try:
            return fn()
        except SnapshotError as e:
            code = grpc.StatusCode[e.status]
            log.debug("%s: %s: %s", method, code.name, e)
            context.abort(code, str(e))
        except toc.LazymountError as e:
            code = grpc.StatusCode.UNKNOWN
            log.warning("%s: %s", method, e)
            context.abort(code, str(e))
        except OSError as e:
            code = grpc.StatusCode.UNKNOWN
            log.warning("%s: %s", method, e, exc_info=log.isEnabledFor(logging.DEBUG))
            context.abort(code, f"{method}: {e}")
        finally:
            REQUESTS.labels(method=method, code=code.name).inc()
            LATENCY.labels(method=method).observe(time.perf_counter() - start)

    def Prepare(self, request: snapshots_pb2.PrepareSnapshotRequest,  # noqa: N802 -- gRPC method names
                context: grpc.ServicerContext) -> snapshots_pb2.PrepareSnapshotResponse:
        return self._call("Prepare", context, lambda: snapshots_pb2.PrepareSnapshotResponse(
            mounts=self.sn.prepare(request.key, request.parent, request.labels)))

    def View(self, request: snapshots_pb2.ViewSnapshotRequest,  # noqa: N802
             context: grpc.ServicerContext) -> snapshots_pb2.ViewSnapshotResponse:
        return self._call("View", context, lambda: snapshots_pb2.ViewSnapshotResponse(
            mounts=self.sn.view(request.key, request.parent, request.labels)))

    def Mounts(self, request: snapshots_pb2.MountsRequest,  # noqa: N802
               context: grpc.ServicerContext) -> snapshots_pb2.MountsResponse:
        return self._call("Mounts", context, lambda: snapshots_pb2.MountsResponse(
            mounts=self.sn.mounts(request.key)))

    def Commit(self, request: snapshots_pb2.CommitSnapshotRequest,  # noqa: N802
               context: grpc.ServicerContext) -> empty_pb2.Empty:
        def commit() -> empty_pb2.Empty:
            self.sn.commit(request.name, request.key, request.labels)
            return empty_pb2.Empty()
        return self._call("Commit", context, commit)

    def Remove(self, request: snapshots_pb2.RemoveSnapshotRequest,  # noqa: N802
               context: grpc.ServicerContext) -> empty_pb2.Empty:
        def remove() -> empty_pb2.Empty:
            self.sn.remove(request.key)
            return empty_pb2.Empty()
        return self._call("Remove", context, remove)

    def Stat(self, request: snapshots_pb2.StatSnapshotRequest,  # noqa: N802
             context: grpc.ServicerContext) -> snapshots_pb2.StatSnapshotResponse:
        return self._call("Stat", context, lambda: snapshots_pb2.StatSnapshotResponse(
            info=_info_proto(self.sn.stat(request.key))))

    def Update(self, request: snapshots_pb2.UpdateSnapshotRequest,  # noqa: N802
               context: grpc.ServicerContext) -> snapshots_pb2.UpdateSnapshotResponse:
        sent = request.info
        info = Info(sent.name, sent.parent, sent.kind, 0, 0, dict(sent.labels))
        return self._call("Update", context, lambda: snapshots_pb2.UpdateSnapshotResponse(
            info=_info_proto(self.sn.update(info, list(request.update_mask.paths)))))

    def List(self, request: snapshots_pb2.ListSnapshotsRequest,  # noqa: N802
             context: grpc.ServicerContext) -> Iterator[snapshots_pb2.ListSnapshotsResponse]:
        infos = self._call("List", context, lambda: self.sn.walk(list(request.filters)))
        for start in range(0, len(infos), LIST_BATCH):
            batch = infos[start:start + LIST_BATCH]
            yield snapshots_pb2.ListSnapshotsResponse(info=[_info_proto(i) for i in batch])

    def Usage(self, request: snapshots_pb2.UsageRequest,  # noqa: N802
              context: grpc.ServicerContext) -> snapshots_pb2.UsageResponse:
        def usage() -> snapshots_pb2.UsageResponse:
            size, inodes = self.sn.usage(request.key)
            return snapshots_pb2.UsageResponse(size=size, inodes=inodes)
        return self._call("Usage", context, usage)

    def Cleanup(self, request: snapshots_pb2.CleanupRequest,  # noqa: N802
                context: grpc.ServicerContext) -> empty_pb2.Empty:
        def cleanup() -> empty_pb2.Empty:
            self.sn.cleanup()
            return empty_pb2.Empty()
        return self._call("Cleanup", context, cleanup)


# ------------------------------------------------------------------------------------------ the daemon


def _listen_address(address: str) -> str:
    """A gRPC address: a path is a unix socket (a stale socket file is removed)."""
    if address.startswith(("unix:", "dns:", "ipv4:", "ipv6:")) or (":" in address and "/" not in address):
        return address
    path = Path(address).absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    return f"unix:{path}"


def _start_metrics(address: str) -> wsgiref.simple_server.WSGIServer:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise SnapshotError(f"--metrics-address {address!r} is not HOST:PORT")
    server, _thread = prometheus_client.start_http_server(int(port), addr=host.strip("[]") or "0.0.0.0")
    log.info("metrics on http://%s/metrics", address)
    return server


def serve(args: argparse.Namespace) -> None:
    """Restore remote layers, serve until SIGTERM or SIGINT, then stop gracefully."""
    root = Path(args.root).absolute()
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    snapshotter = Snapshotter(root, LayerDaemon(root, args.config))
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    metrics = _start_metrics(args.metrics_address) if args.metrics_address else None
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16, thread_name_prefix="snapshots"))
    health_servicer = health.HealthServicer()
    try:
        snapshotter.restore_remote_layers()
        snapshots_pb2_grpc.add_SnapshotsServicer_to_server(SnapshotsService(snapshotter), server)
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        address = _listen_address(args.address)
        if not server.add_insecure_port(address):
            raise SnapshotError(f"cannot listen on {address}")
        server.start()
        for name in ("", SERVICE_NAME):
            health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("lazymount snapshotter serving %s on %s (root %s)", SERVICE_NAME, address, root)
        stop.wait()
        log.info("stopping: letting in-flight calls finish (up to %.0f s)", GRACE_SECONDS)
        health_servicer.enter_graceful_shutdown()
        server.stop(GRACE_SECONDS).wait()
    finally:
        server.stop(None)
        if metrics is not None:
            metrics.shutdown()
        snapshotter.close()
    log.info("stopped")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lazymount snapshotter", description=__doc__.splitlines()[0])
    parser.add_argument("--address", default=DEFAULT_ADDRESS,
                        help=f"unix socket to serve (default {DEFAULT_ADDRESS})")
    parser.add_argument("--root", default=DEFAULT_ROOT,
                        help=f"snapshots and metadata (default {DEFAULT_ROOT})")
    parser.add_argument("--config", metavar="FILE", help="registry config YAML (see config.load_config)")
    parser.add_argument("--metrics-address", metavar="HOST:PORT", help="serve Prometheus /metrics here")
    parser.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the snapshotter daemon in the foreground; return the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s lazymount-snapshotter %(levelname)s: %(message)s")
    try:
        serve(args)
    except (toc.LazymountError, OSError) as e:
        log.error("%s", e, exc_info=log.isEnabledFor(logging.DEBUG))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
