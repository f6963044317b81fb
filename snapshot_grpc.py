"""lazymount's containerd remote snapshotter: the Snapshots gRPC service (a containerd proxy plugin).

What belongs here: the `containerd.services.snapshots.v1.Snapshots` service over an overlayfs backend laid
out like containerd's built-in overlayfs snapshotter (`ROOT/snapshots/ID/fs` and `work`, the mounts it
answers, usage), the remote-layer flow (a layer is mounted lazily, committed under its chain ID and
answered ALREADY_EXISTS, or declined so containerd downloads it), recovering after a crash or an upgrade
and restoring remote layers, the health service (NOT_SERVING while the layer daemon is down),
Prometheus metrics and the daemon's command line (a socket systemd passes is served through the front,
socketfront.py).  What never does: the metadata and its queries (snapshot_store.py), probing layers and
running the layer daemon (snapshot_layers.py), FUSE, registry HTTP or the eStargz format.

Containerd registers it with ``[proxy_plugins.lazymount] type = "snapshot" address = "SOCKET"``
(contrib/containerd-config.toml).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import signal
import sys
import threading
import time
import wsgiref.simple_server
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent import futures
from pathlib import Path
from typing import TypeVar

import grpc
import prometheus_client
from google.protobuf import empty_pb2, timestamp_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

import mount_pb2
import snapshots_pb2
import snapshots_pb2_grpc
import socketfront
import toc
from snapshot_layers import (
    CLIENT_UNPACKS,
    COMMIT_FAILED,
    NO_LABELS,
    DeclinedError,
    LayerDaemon,
    LayerMounter,
    mount_state,
    unmount_legacy,
)
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
GRACE_SECONDS = 10.0  # in-flight calls may finish this long after SIGTERM
UNIX_PATH_MAX = 108  # sun_path, with its terminating NUL

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
                                         "Remote layers committed in the metadata (served lazily)")
FALLBACKS = prometheus_client.Counter("lazymount_snapshotter_fallbacks",
                                      "Layers the client downloads instead of mounting lazily, by reason",
                                      ["reason"])


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


def _remote_source(labels: Mapping[str, str]) -> tuple[str, str]:
    """(image reference, layer digest) from the labels ctr-remote or the CRI plugin set."""
    reference = next((labels[k] for k in REFERENCE_LABELS if labels.get(k)), "")
    digest = next((labels[k] for k in DIGEST_LABELS if labels.get(k)), "")
    if not reference or not digest:
        raise DeclinedError("no remote image labels (image reference and layer digest)", NO_LABELS)
    try:
        toc.check_digest(digest)
    except toc.LazymountError:
        raise DeclinedError(f"invalid layer digest {digest[:80]!r}", NO_LABELS) from None
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
                               "-", key, CLIENT_UNPACKS)
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
            self._log_prepared(False, str(e), "-", key, e.reason)
            return
        try:
            self.mounter.mount(str(snapshot.id), reference, digest)
        except DeclinedError as e:
            self._log_prepared(False, str(e), digest, key, e.reason)
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
            self._log_prepared(False, f"commit failed: {e}", digest, key, COMMIT_FAILED)
            raise
        REMOTE_MOUNTED.inc()
        self._log_prepared(True, "mounted lazily", digest, key)
        raise AlreadyExistsError(f"target snapshot {target!r}: already exists")

    @staticmethod
    def _log_prepared(prepared: bool, reason: str, digest: str, key: str, fallback: str = "") -> None:
        """Log and count the outcome of a layer's Prepare; `fallback` classes the reason of a decline."""
        REMOTE_PREPARES.labels(prepared=str(prepared).lower()).inc()
        if not prepared:
            FALLBACKS.labels(reason=fallback).inc()
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

    def recover(self) -> None:
        """Before serving, after a crash or an upgrade: unmount the per-layer mounts older versions left,
        drop the layers whose remote Prepare never answered (handed to the layer daemon, but not committed:
        containerd rolled its side back), remove the directories no snapshot owns, then mount every
        recorded remote layer again."""
        unmount_legacy(self.snapshots_dir)
        with self.store.transaction() as db:
            snapshots = self.store.kinds(db)
        for name in self.mounter.names():
            key, kind = snapshots.get(int(name) if name.isdigit() else -1, ("", 0))
            if kind == COMMITTED:
                continue
            log.warning("recovery: dropping layer %s, whose remote prepare (%s) was cut short", name,
                        key or "no snapshot")
            if key:
                with contextlib.suppress(SnapshotError):
                    self.remove(key)
            self.mounter.unmount(name)
        self.cleanup()
        self.restore_remote_layers()

    def restore_remote_layers(self) -> None:
        """Mount again every recorded remote layer that is not mounted (failures are logged; Mounts
        reports them as UNAVAILABLE until a later attempt succeeds)."""
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
        if mount_state(fs) != "absent":
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
        """Remove the directories no snapshot owns (left by a crash between mkdir and commit).  They are
        listed before the snapshots are read: a Prepare may run meanwhile (containerd calls Cleanup
        outside its own lock), and a directory it makes is then either not listed or already owned."""
        directories = list(self.snapshots_dir.iterdir())
        with self.store.transaction() as db:
            ids = self.store.kinds(db)
        for directory in directories:
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


def _bind(server: grpc.Server, address: str, root: Path) -> str:
    """Bind `server` to the socket systemd passed, through the front (socketfront.py) that holds it and
    relays to ROOT/grpc.sock, or else to `address`; what clients connect to, for the log."""
    fds = socketfront.listen_fds()
    if fds:
        if len(fds) > 1:
            log.warning("systemd passed %d sockets: serving the first", len(fds))
        backend = root / "grpc.sock"
        if len(os.fsencode(backend)) >= UNIX_PATH_MAX:
            raise SnapshotError(f"{backend}: too long for a unix socket path (use a shorter --root)")
        (root / "logs").mkdir(exist_ok=True)
        pid = socketfront.ensure_front(fds[0], str(backend), root / "front.pid", root / "logs" / "front.log")
        where, address = f"the socket systemd passed (held by the front, PID {pid})", f"unix:{backend}"
        with contextlib.suppress(FileNotFoundError):
            backend.unlink()
    else:
        where = address = _listen_address(address)
    if not server.add_insecure_port(address):
        raise SnapshotError(f"cannot listen on {address}")
    return where


def serve(args: argparse.Namespace) -> None:
    """Recover (snapshot_grpc.Snapshotter.recover), serve until SIGTERM or SIGINT, then stop gracefully.
    The health service answers NOT_SERVING while the layer daemon is down."""
    root = Path(args.root).absolute()
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    health_servicer = health.HealthServicer()

    def layer_daemon_state(up: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if up else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE_NAME):
            health_servicer.set(name, status)

    layer_daemon_state(True)
    layers = LayerDaemon(root, args.config, on_state=layer_daemon_state)
    snapshotter = Snapshotter(root, layers)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    metrics = _start_metrics(args.metrics_address) if args.metrics_address else None
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16, thread_name_prefix="snapshots"))
    try:
        layers.watch()  # a daemon that outlived the previous snapshotter
        snapshotter.recover()
        snapshots_pb2_grpc.add_SnapshotsServicer_to_server(SnapshotsService(snapshotter), server)
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        where = _bind(server, args.address, root)
        server.start()
        log.info("lazymount snapshotter serving %s on %s (root %s)", SERVICE_NAME, where, root)
        stop.wait()
        log.info("stopping: letting in-flight calls finish (up to %.0f s)", GRACE_SECONDS)
        health_servicer.enter_graceful_shutdown()
        server.stop(GRACE_SECONDS).wait()
    finally:
        server.stop(None)
        if metrics is not None:
            metrics.shutdown()
        layers.close()
        snapshotter.close()
    log.info("stopped")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lazymount snapshotter", description=__doc__.splitlines()[0])
    parser.add_argument("--address", default=DEFAULT_ADDRESS,
                        help=f"unix socket to serve (default {DEFAULT_ADDRESS}); unused when systemd passes "
                             "a socket (LISTEN_FDS): then ROOT/grpc.sock, behind a front that holds it")
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
