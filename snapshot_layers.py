"""The snapshotter's lazy layers: probing a layer, handing it to the one `lazymount layers` daemon, and
keeping that daemon alive.

What belongs here: the LayerMounter interface the snapshotter uses, the registry probe that decides
whether a layer can be served lazily (eStargz, or a plain gzip layer with a seek index; DeclinedError and
its reason otherwise), starting and adopting the layer daemon (layerfs.py, mounted at ROOT/layers),
watching it so that a daemon that dies is started again at once (its state reported to a callback: the
health service, and to /metrics), and unmounting the per-layer mounts older versions left under
ROOT/snapshots.  What never does: snapshots and their metadata
(snapshot_grpc.py, snapshot_store.py), gRPC, FUSE operations (layerfs.py, over a mount this module only
starts, asks and unmounts through mountctl.py).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import select
import subprocess
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import prometheus_client

import config
import fetch
import mountctl
import referrers
import regclient
import toc
import tocread

log = logging.getLogger(__name__)

MOUNT_TIMEOUT = 300.0  # seconds starting the `lazymount layers` daemon may take
IMAGE_CACHE_SIZE = 32  # resolved images kept to find the descriptors of their layers
WATCH_INTERVAL = 0.5  # seconds between checks, while watching the daemon, that the snapshotter still runs
RETRY_DELAYS = (1.0, 2.0, 5.0, 10.0, 30.0)  # between attempts to start a dead daemon again (then the last)

# Why a layer is not served lazily (the `reason` label of the fallback counter; the log line says more).
NO_LABELS = "no_labels"  # no image reference / layer digest labels, or an invalid digest
CLIENT_UNPACKS = "client_unpacks"  # an unpack without a layer target: the client downloads it
NOT_ESTARGZ = "not_estargz"
REGISTRY = "registry"  # unreachable, refused, or the layer is not in the image
NO_RANGE = "no_range"  # the registry ignores Range requests
FUSE_UNAVAILABLE = "fuse_unavailable"
MOUNT_FAILED = "mount_failed"  # the daemon could not be started or could not load the layer
COMMIT_FAILED = "commit_failed"

DAEMON_RESTARTS = prometheus_client.Counter("lazymount_snapshotter_layer_daemon_restarts",
                                            "Layer daemons found dead and started again")
DAEMON_UP = prometheus_client.Gauge("lazymount_snapshotter_layer_daemon_up",
                                    "1 while the layer daemon serves, 0 from its death until it serves again")


class DeclinedError(toc.LazymountError):
    """A layer cannot be mounted lazily: the message is the reason logged, `reason` its class (one of the
    constants above)."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


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

    def names(self) -> list[str]:
        """The layers handed over (served, or to be served once their server runs)."""


def mount_state(mountpoint: Path) -> str:
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
        raise DeclinedError("lazy mount unavailable: no /dev/fuse", FUSE_UNAVAILABLE)
    try:
        import fusefs  # noqa: F401 -- loads libfuse, at call time: ordinary layers never need it
    except (ImportError, OSError) as e:  # mfusepy raises OSError without libfuse
        raise DeclinedError(f"lazy mount unavailable: {type(e).__name__}: {e}", FUSE_UNAVAILABLE) from None


def unmount_legacy(snapshots_dir: Path) -> list[Path]:
    """Unmount the per-layer lazymount mounts older versions made at SNAPSHOTS/ID/fs (one daemon per
    layer), lazily: containers that use one keep it, and its daemon exits after the last; the layers are
    served by the layer daemon from now on.  The mount points unmounted."""
    found = [point for point, fstype in mountctl.mounts_below(snapshots_dir)
             if fstype.startswith("fuse.lazymount") and point.name == "fs"]
    for point in found:
        log.warning("%s is a layer mount of an older lazymount (a daemon per layer): unmounting it, "
                    "the layer daemon serves its layer from now on", point)
        try:
            mountctl.unmount(point, wait=False)
        except mountctl.MountError as e:
            log.error("%s", e)
    return found


class LayerDaemon:
    """Serves every layer from one `lazymount layers` daemon (layerfs.py) mounted at ROOT/layers, which
    survives a restart of the snapshotter.  A layer is handed over as a spec file in ROOT/layer-specs after
    probing the registry: the layer must be eStargz (a TOC digest annotation and an eStargz footer) and its
    registry must answer Range requests.

    The daemon is watched (a pidfd): if it dies and leaves its mount behind, `on_state(False)` is called
    and it is started again at once (retried with growing delays), then `on_state(True)`.  Containers
    started before keep what the kernel cached of their lower layers; their reads that reach the dead
    daemon fail (see README "When the snapshotter or its layer daemon dies")."""

    def __init__(self, root: Path, config_path: str | None,
                 on_state: Callable[[bool], None] = lambda up: None) -> None:
        self.root, self.config_path, self.on_state = root, config_path, on_state
        self.mountpoint, self.spec_dir = root / "layers", root / "layer-specs"
        self.cache_dir = root / "cache"  # the layer daemon's: chunks, and the seek indexes probes find
        self._config: config.Config | None = None
        self._images: OrderedDict[str, fetch.Image] = OrderedDict()
        self._lock = threading.Lock()
        self._daemon_lock = threading.Lock()
        self._watched: int | None = None  # the PID of the daemon being watched
        self._up: bool | None = None
        self._closed = threading.Event()

    def close(self) -> None:
        """Stop watching (the daemon keeps running: containers use it)."""
        self._closed.set()

    # -- probing -----------------------------------------------------------------------------------

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
        """The layer's descriptor; DeclinedError unless it is eStargz, or has a seek index (kept in the
        daemon's cache directory, else attached to the image: then kept there), in a registry that
        answers Range requests."""
        try:
            image = self._image(reference)
            descriptor = next((d for d in image.layers if d.digest == layer_digest), None)
            if descriptor is None:
                raise DeclinedError(f"layer {layer_digest} is not in {reference}", REGISTRY)
            estargz = toc.TOC_DIGEST_ANNOTATION in descriptor.annotations
            if not estargz and referrers.find_seek_index(image, descriptor, self.cache_dir) is None:
                raise DeclinedError("layer is not eStargz (no TOC digest annotation) and has no seek index",
                                    NOT_ESTARGZ)
            with image.blob(layer_digest) as blob:
                tail = blob.read_at(max(0, blob.size - toc.FOOTER_SIZE), toc.FOOTER_SIZE)
                if blob.ranges_supported is False:
                    raise DeclinedError("registry ignores Range requests", NO_RANGE)
            if estargz:
                tocread.parse_footer(tail, descriptor.size)
        except toc.FooterError as e:
            raise DeclinedError(f"layer is not eStargz ({e})", NOT_ESTARGZ) from None
        except (regclient.RegistryError, config.InvalidInputError, OSError) as e:
            raise DeclinedError(f"registry unreachable or refused: {e}", REGISTRY) from None
        return descriptor

    # -- the daemon --------------------------------------------------------------------------------

    def _ensure_daemon(self) -> None:
        """Start the daemon unless its mount answers (a dead one is unmounted first)."""
        _check_fuse()
        with self._daemon_lock:
            state = mount_state(self.mountpoint)
            if state == "alive":
                return
            if state == "dead":
                log.warning("the layer daemon at %s died: starting it again", self.mountpoint)
                self._set_up(False)
                try:
                    mountctl.unmount(self.mountpoint)
                except toc.LazymountError as e:
                    raise DeclinedError(f"cannot unmount the dead layer daemon: {e}", MOUNT_FAILED) from None
            self._start()
            if state == "dead":
                DAEMON_RESTARTS.inc()
            self._set_up(True)
            self.watch()

    def _start(self) -> None:
        self.mountpoint.mkdir(exist_ok=True)
        logs = self.root / "logs"
        logs.mkdir(exist_ok=True)
        command = [sys.executable, "-m", "lazymount", "-v", "layers", "--cache-dir",
                   str(self.cache_dir), "-o", "allow_other", "--log-file", str(logs / "layers.log"),
                   str(self.spec_dir), str(self.mountpoint)]
        env = dict(os.environ)
        if self.config_path:
            env["LAZYMOUNT_CONFIG"] = str(Path(self.config_path).absolute())
        try:
            result = subprocess.run(command, capture_output=True, text=True, env=env,
                                    timeout=MOUNT_TIMEOUT, check=False)
        except subprocess.TimeoutExpired:
            raise DeclinedError(f"starting the layer daemon took over {MOUNT_TIMEOUT:.0f} s",
                                MOUNT_FAILED) from None
        if result.returncode != 0:
            message = result.stderr.strip().splitlines()[-1:] or [f"exit status {result.returncode}"]
            message[0] = message[0].removeprefix("lazymount: error: ")
            raise DeclinedError(f"mount failed: {message[0]}", MOUNT_FAILED)
        log.info("layer daemon serving %s", self.mountpoint)

    def _set_up(self, up: bool) -> None:
        """Report the daemon up or down (once per change)."""
        with self._lock:
            if self._up != up:
                self._up = up
                DAEMON_UP.set(int(up))
                self.on_state(up)

    def watch(self) -> None:
        """Watch the daemon now serving the mount (adopted, or just started), unless already watched."""
        if mount_state(self.mountpoint) != "alive":
            return
        pid = mountctl.daemon_pid(self.mountpoint)
        with self._lock:
            if pid is None or pid == self._watched:
                return
            try:
                pidfd = os.pidfd_open(pid)
            except OSError as e:  # gone meanwhile, or a kernel without pidfds: found dead on next use
                log.warning("cannot watch the layer daemon (PID %d): %s", pid, e)
                return
            self._watched = pid
        self._set_up(True)
        threading.Thread(target=self._watch, args=(pid, pidfd), name="layer-daemon", daemon=True).start()

    def _watch(self, pid: int, pidfd: int) -> None:
        """Wait for daemon `pid` to exit; then, if it left a dead mount (not unmounted on purpose), start
        it again, retrying until it serves or the snapshotter stops."""
        try:
            poller = select.poll()
            poller.register(pidfd, select.POLLIN)
            while not poller.poll(WATCH_INTERVAL * 1000):
                if self._closed.is_set():
                    return
        finally:
            os.close(pidfd)
        state = mount_state(self.mountpoint)
        if self._closed.is_set() or state != "dead":
            log.info("the layer daemon (PID %d) exited; its mount is %s", pid, state)
            return
        log.warning("the layer daemon (PID %d) died", pid)
        self._set_up(False)
        for attempt in itertools.count():
            try:
                self._ensure_daemon()
                return
            except DeclinedError as e:
                delay = RETRY_DELAYS[min(attempt, len(RETRY_DELAYS) - 1)]
                log.error("the layer daemon cannot be started again: %s (next attempt in %.0f s)", e, delay)
            if self._closed.wait(delay):
                return

    def _sync(self, name: str) -> dict:
        """Ask the daemon to load the layer `name` (or forget it, its spec gone): its JSON answer."""
        try:
            return json.loads(os.getxattr(self.mountpoint, mountctl.LAYER_XATTR + name))
        except OSError as e:
            return {"error": e.strerror or str(e)}

    # -- LayerMounter ------------------------------------------------------------------------------

    def mount(self, name: str, reference: str, layer_digest: str) -> None:
        _check_fuse()
        descriptor = self.probe(reference, layer_digest)
        mountctl.write_spec(self.spec_dir, name, reference, layer_digest, descriptor.size,
                            descriptor.annotations.get(toc.TOC_DIGEST_ANNOTATION))
        try:
            self._ensure_daemon()
            error = self._sync(name).get("error")
            if error:
                raise DeclinedError(f"mount failed: {error}", MOUNT_FAILED)
        except DeclinedError:
            self.unmount(name)
            raise

    def directory(self, name: str) -> Path:
        return self.mountpoint / name

    def alive(self, name: str) -> bool:
        return mount_state(self.mountpoint) == "alive" and "error" not in self._sync(name)

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
        if mount_state(self.mountpoint) == "alive":
            self._sync(name)  # the daemon forgets the layer

    def names(self) -> list[str]:
        if not self.spec_dir.is_dir():
            return []
        return sorted(p.name.removesuffix(mountctl.SPEC_SUFFIX) for p in self.spec_dir.iterdir()
                      if p.name.endswith(mountctl.SPEC_SUFFIX))
