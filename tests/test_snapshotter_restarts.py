"""The snapshotter and its layer daemon dying under load, with a private containerd 1.6 + runc.

Socket activation (the test holds the listening socket, as systemd does) carries containerd's calls
over a snapshotter restart; a snapshotter killed during a pull and while a container reads its files
leaves the container reading and every committed snapshot listed; a killed layer daemon is started
again at once, the health service says NOT_SERVING meanwhile, and /metrics counts it.  The harness
(Snapshotter, snapshotter_stack, the shell image) is tests/test_snapshotter.py's.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import snapshot_grpc
import snapshots_pb2 as pb
from imagebuild import make_oci_image
from tests.reference import Containerd, read_layout
from tests.registry import Fault, FaultProxy, Registry, free_port, push_layout
from tests.test_snapshotter import (
    MISSING,
    REPO,
    Snapshotter,
    _ctr_run,
    _layer_labels,
    _shell_tree,
    _snapshot_names,
    build_shell_image,
    grpc_code,
    mounted,
    served_layers,
    snapshotter_stack,
)

pytestmark = [pytest.mark.skipif(os.geteuid() != 0, reason="mounts overlayfs and FUSE: needs root"),
              pytest.mark.skipif(bool(MISSING), reason=f"not installed: {', '.join(MISSING)}")]

FILES = 150  # files per data layer
WAIT = 120.0  # seconds a command may take on a loaded machine


def _data_image(work: Path, name: str) -> Path:
    """A 3-layer eStargz OCI layout (tag v1): /bin/sh, its libraries and /image holding `name`, then
    /data/a/0..FILES-1, then /data/b/0..FILES-1, each file one line naming itself.  Without /image the
    base layers of two images built in the same second are one layer (only the mtimes of their
    directories and symbolic links, in whole seconds, tell them apart): a pull of the second would not
    prepare it."""
    trees = [_shell_tree(work / "tree0")]
    (trees[0] / "image").write_text(f"{name}\n")
    for i, part in enumerate("ab", start=1):
        tree = work / f"tree{i}"
        subprocess.run(["cp", "-a", str(trees[-1]), str(tree)], check=True)
        (tree / "data" / part).mkdir(parents=True)
        for n in range(FILES):
            (tree / "data" / part / str(n)).write_text(f"{name} {part}/{n}\n")
        trees.append(tree)
    layout = make_oci_image(work / "plain", "v1", trees)
    converted = work / "estargz"
    subprocess.run([sys.executable, str(REPO / "lazymount.py"), "convert", "-q", f"oci:{layout}:v1",
                    f"oci:{converted}:v1"], check=True, capture_output=True)
    return converted


@pytest.fixture(scope="module")
def shell_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_shell_image(tmp_path_factory.mktemp("shell-image"), "hello from a lazymount snapshot\n")


@pytest.fixture(scope="module")
def data_images(tmp_path_factory: pytest.TempPathFactory, registry: Registry) -> dict[str, tuple[str, list]]:
    """Two 3-layer eStargz images that share no layer, pushed: {"first" | "second": (reference, layer
    digests)}."""
    images = {}
    for name in ("first", "second"):
        layout = _data_image(tmp_path_factory.mktemp(name), name)
        push_layout(layout, "v1", registry, f"data/{name}")
        digests = [descriptor["digest"] for _, descriptor in read_layout(layout, "v1")[2]]
        images[name] = (f"{registry.host}/data/{name}:v1", digests)
    assert not set(images["first"][1]) & set(images["second"][1]), "the images share a layer"
    return images


def _popen(containerd: Containerd, tool: str, *args: str) -> subprocess.Popen:
    """`tool` (ctr or ctr-remote) against containerd, started in the background, output captured."""
    command = [tool, "--address", containerd.address, "--namespace", containerd.namespace, *args]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen) -> tuple[int, str]:
    try:
        out, _ = proc.communicate(timeout=WAIT)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    return proc.returncode, out


def _wait_for(condition: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.1)


def _listener(path: Path) -> socket.socket:
    """A listening unix socket at `path`, as systemd's lazymount-snapshotter.socket makes it."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen(128)
    return sock


# A container that reads /data/a/0..FILES-1 over and over (each file by name: a directory listing would
# be a call to the file system) until /ctl/stop exists, counting its passes in /ctl/passes; once
# /ctl/fresh exists it also reads /data/b/0..FILES-1, never read before, once, and reports how many of
# those reads failed.  A failed read of /data/a prints FAIL.
READER = f"""
n=0
while [ ! -e /ctl/stop ]; do
  i=0
  while [ $i -lt {FILES} ]; do read l < /data/a/$i || echo "FAIL a/$i"; i=$((i+1)); done
  if [ -e /ctl/fresh ] && [ ! -e /ctl/fresh-done ]; then
    i=0; f=0
    while [ $i -lt {FILES} ]; do read l < /data/b/$i || f=$((f+1)); i=$((i+1)); done
    echo "fresh failed $f"; : > /ctl/fresh-done
  fi
  n=$((n+1)); echo $n > /ctl/passes
done
echo stopped
"""


class Reader:
    """The READER container, run from `image` with the host directory `ctl` at /ctl; a context manager
    that stops it on exit."""

    def __init__(self, containerd: Containerd, image: str, ctl: Path) -> None:
        self.containerd, self.ctl, self.name = containerd, ctl, _unique("reader")
        ctl.mkdir()
        self.proc = _popen(containerd, "ctr", "run", "--rm", "--snapshotter", "lazymount", "--mount",
                           f"type=bind,src={ctl},dst=/ctl,options=rbind:rw", image, self.name,
                           "/bin/sh", "-c", READER)

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            (self.ctl / "stop").touch()
            if _finish(self.proc)[0] != 0:
                self.containerd.ctr("tasks", "kill", "-s", "KILL", self.name, check=False)

    def passes(self) -> int:
        try:
            return int((self.ctl / "passes").read_text() or 0)
        except (FileNotFoundError, ValueError):
            return 0

    def wait_passes(self, n: int) -> None:
        _wait_for(lambda: self.passes() >= n or self.proc.poll() is not None, f"{n} passes of the reader")
        assert self.proc.poll() is None, _finish(self.proc)

    def read_fresh(self) -> None:
        (self.ctl / "fresh").touch()
        _wait_for(lambda: (self.ctl / "fresh-done").exists() or self.proc.poll() is not None,
                  "the reader's fresh reads")

    def stop(self) -> str:
        (self.ctl / "stop").touch()
        status, out = _finish(self.proc)
        assert status == 0 and "stopped" in out, out
        return out


def _unique(name: str) -> str:
    """A container name no other test run uses (runc's state directory is shared by every containerd)."""
    return f"{name}-{uuid.uuid4().hex[:8]}"


def _collect_garbage(containerd: Containerd, image: str) -> None:
    """Run containerd's garbage collection and wait for it to end (ctr has no command for it: removing a
    second name of `image` with --sync runs it)."""
    containerd.ctr("images", "tag", image, f"{image}-copy")
    containerd.ctr("images", "rm", "--sync", f"{image}-copy")


def _labels(containerd: Containerd, names: list[str]) -> dict[str, dict]:
    """{name: labels} of containerd's snapshots (each stat reaches the snapshotter)."""
    infos = {}
    for name in names:
        info = containerd.ctr("snapshots", "--snapshotter", "lazymount", "info", name, text=True).stdout
        infos[name] = json.loads(info).get("Labels") or {}
    return infos


def test_socket_activation_carries_calls_over_a_restart(tmp_path: Path, shell_image: Path,
                                                        registry: Registry, data_images: dict) -> None:
    """LISTEN_FDS: the snapshotter killed, a pull and a container started, the snapshotter started again
    3 s later on the same socket: both commands succeed (their calls waited at the front)."""
    base = tmp_path / "ctd"
    base.mkdir()
    listener = _listener(base / "sn.sock")
    try:
        with snapshotter_stack(base, listener=listener) as (containerd, daemon):
            assert "the socket systemd passed" in daemon.log()
            push_layout(shell_image, "v1", registry, "activation/shell")
            plain = f"{registry.host}/activation/shell:v1"
            lazy = data_images["first"][0]
            containerd.ctr_remote("images", "rpull", "--plain-http", "--snapshotter", "lazymount", lazy)
            daemon.stop(signal.SIGKILL)
            # The front ends containerd's connection to the dead snapshotter (its HTTP/2 state cannot move
            # to another process): a call sent in that instant fails, as with any restart.  Once containerd
            # has dialled again its calls wait at the front, so they are started after that.
            time.sleep(1.5)
            pull = _popen(containerd, "ctr-remote", "images", "rpull", "--plain-http", "--snapshotter",
                          "lazymount", plain)
            run = _popen(containerd, "ctr", "run", "--snapshotter", "lazymount", "--rm", lazy,
                         _unique("during-outage"), "/bin/sh", "-c", "read line < /data/b/7; echo $line")
            time.sleep(3)
            assert pull.poll() is None and run.poll() is None, (_finish(pull), _finish(run))
            daemon.start()
            status, out = _finish(pull)
            assert status == 0, out
            assert _finish(run) == (0, "first b/7\n")
            assert _ctr_run(containerd, plain, _unique("after"), "read line < /hello.txt; echo $line") == \
                "hello from a lazymount snapshot\n"
    finally:
        listener.close()


def test_snapshotter_killed_during_a_pull_and_reads(tmp_path: Path, registry: Registry,
                                                    data_images: dict) -> None:
    """kill -9 of the snapshotter while a 3-layer image is being pulled (its registry slowed down) and a
    container reads its files in a loop: every read succeeds, even of files first read after the restart;
    after the restart every snapshot containerd holds is listed with its labels (those only the failed
    pull's lease held are containerd's garbage), the cut-short pull leaves no half-prepared snapshot once
    containerd has collected garbage, and the pull done again works."""
    first, second = data_images["first"][0], data_images["second"][0]
    proxy = FaultProxy(registry.host)
    delay = Fault("delay", path="/blobs/", times=-1, seconds=2.0)
    proxy.add(delay)
    slow = second.replace(registry.host, proxy.host)
    try:
        with snapshotter_stack(tmp_path / "ctd") as (containerd, daemon):
            containerd.ctr_remote("images", "rpull", "--plain-http", "--snapshotter", "lazymount", first)
            with Reader(containerd, first, tmp_path / "ctl") as reader:
                reader.wait_passes(1)
                kept = _labels(containerd, _snapshot_names(containerd))  # the first image's, the reader's
                prepared = daemon.log().count("remote-snapshot-prepared: true")
                pull = _popen(containerd, "ctr-remote", "images", "rpull", "--plain-http", "--snapshotter",
                              "lazymount", slow)
                _wait_for(lambda: daemon.log().count("remote-snapshot-prepared: true") > prepared,
                          "a layer of the slow pull")
                before = _labels(containerd, _snapshot_names(containerd))
                assert pull.poll() is None, "the pull is still going on"
                daemon.stop(signal.SIGKILL)
                passes = reader.passes()
                _finish(pull)  # it fails: its Prepare was cut short
                daemon.start()
                # containerd collects what only the failed pull's lease held when its scheduler next runs:
                # while the snapshotter is down, or after the restart, in the middle of the listing below
                # (a snapshot listed, then gone) or of the pull done again (a parent it found, then gone).
                # So collect it now, once containerd has dialled the snapshotter again.
                _snapshot_names(containerd)
                _collect_garbage(containerd, first)
                after = _labels(containerd, _snapshot_names(containerd))
                assert set(before) - set(after) <= set(before) - set(kept)
                assert {name: before[name] for name in after if name in before} == \
                    {name: after[name] for name in after if name in before}, "every snapshot, its labels kept"
                assert {name: after.get(name) for name in kept} == kept

                delay.times = 0
                containerd.ctr_remote("images", "rpull", "--plain-http", "--snapshotter", "lazymount", slow)
                assert _ctr_run(containerd, slow, _unique("second"), "read l < /data/b/7; echo $l") == \
                    "second b/7\n"
                reader.wait_passes(passes + 2)
                reader.read_fresh()
                out = reader.stop()
            assert "FAIL" not in out and "fresh failed 0" in out, out

            _collect_garbage(containerd, first)
            active = [i.name for i in daemon.walk() if i.kind == pb.ACTIVE]
            assert not [name for name in active if "extract-" in name], active
            specs = {p.stem for p in (daemon.root / "layer-specs").glob("*.json")}
            assert set(served_layers(daemon)) == specs and len(specs) == 6, "3 layers of each image"
    finally:
        proxy.stop()


def _health_watch(daemon: Snapshotter) -> tuple[list[tuple[float, int]], grpc.Channel]:
    """The statuses the health service streams for the Snapshots service, with their arrival times."""
    channel = grpc.insecure_channel(f"unix:{daemon.socket}")
    stream = health_pb2_grpc.HealthStub(channel).Watch(
        health_pb2.HealthCheckRequest(service=snapshot_grpc.SERVICE_NAME))
    seen: list[tuple[float, int]] = []

    def follow() -> None:
        with contextlib.suppress(grpc.RpcError):
            for answer in stream:
                seen.append((time.monotonic(), answer.status))

    threading.Thread(target=follow, daemon=True).start()
    _wait_for(lambda: bool(seen), "the first health status")
    return seen, channel


def _metric(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics") as answer:
        for line in answer.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise AssertionError(f"no metric {name}")


SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


def test_layer_daemon_killed_under_a_reading_container(tmp_path: Path, data_images: dict) -> None:
    """kill -9 of the layer daemon while a container reads its files in a loop: the snapshotter starts it
    again at once (health NOT_SERVING, then SERVING; /metrics counts the restart) and new containers
    read every file.  The limit (README "When the layer daemon dies"): the running container's overlay
    sits on the dead daemon's FUSE connection, so only what the kernel cached still reads: each file it
    first reads after the kill fails, and its /bin/sh may itself die of SIGBUS on an evicted page."""
    port = free_port()
    first = data_images["first"][0]
    with snapshotter_stack(tmp_path / "ctd", metrics_port=port) as (containerd, daemon):
        containerd.ctr_remote("images", "rpull", "--plain-http", "--snapshotter", "lazymount", first)
        with Reader(containerd, first, tmp_path / "ctl") as reader:
            reader.wait_passes(1)
            seen, channel = _health_watch(daemon)
            (pid,) = set(served_layers(daemon).values())
            killed = time.monotonic()
            os.kill(pid, signal.SIGKILL)
            _wait_for(lambda: [status for _, status in seen][-2:] == [NOT_SERVING, SERVING],
                      "the health service to report the daemon down, then up")
            recovered = seen[-1][0] - killed
            channel.close()
            reader.read_fresh()
            (reader.ctl / "stop").touch()
            status, out = _finish(reader.proc)
        died = status != 0
        assert died or f"fresh failed {FILES}" in out, out  # no first read after the kill succeeded
        assert _ctr_run(containerd, first, _unique("new"), "read l < /data/b/7; echo $l") == "first b/7\n"
        assert pid not in served_layers(daemon).values()
        assert _metric(port, "lazymount_snapshotter_layer_daemon_restarts_total") == 1.0
        assert _metric(port, "lazymount_snapshotter_layer_daemon_up") == 1.0
        fate = f"died (exit status {status})" if died else "lived on"
        print(f"\nlayer daemon killed: serving again after {recovered:.1f} s; the running container "
              f"{fate}: {out.count('FAIL')} failed reads of files it had read; none of its first reads "
              "after the kill succeeded")


def test_health_and_metrics_follow_the_layer_daemon(tmp_path: Path, data_images: dict) -> None:
    """Over gRPC alone: the health status goes NOT_SERVING when the layer daemon dies and SERVING once the
    snapshotter has started it again; /metrics counts the restart, the fallbacks by reason and the layers
    served lazily."""
    port = free_port()
    image, layers = data_images["first"]
    daemon = Snapshotter(tmp_path / "root", tmp_path / "sn.sock", metrics_port=port).start()
    try:
        target = "sha256:" + "5" * 64
        assert grpc_code(lambda: daemon.prepare("ns/1/extract-1 " + target, "",
                                                _layer_labels(image, layers[0], target))) == \
            grpc.StatusCode.ALREADY_EXISTS
        daemon.prepare("ns/1/extract-2", "", {snapshot_grpc.TARGET_LABEL: "sha256:" + "6" * 64})
        seen, channel = _health_watch(daemon)
        assert [status for _, status in seen] == [SERVING]
        (pid,) = set(served_layers(daemon).values())
        os.kill(pid, signal.SIGKILL)
        _wait_for(lambda: [status for _, status in seen][1:] == [NOT_SERVING, SERVING],
                  "the health service to report the daemon down, then up")
        channel.close()
        assert set(served_layers(daemon)) == {str(p.stem) for p in (daemon.root / "layer-specs").iterdir()}
        assert _metric(port, "lazymount_snapshotter_layer_daemon_restarts_total") == 1.0
        assert _metric(port, 'lazymount_snapshotter_fallbacks_total{reason="no_labels"}') == 1.0
        assert _metric(port, "lazymount_snapshotter_remote_layers") == 1.0
    finally:
        daemon.stop()
        daemon.unmount_layers()


def test_recovery_after_a_crash_and_from_an_older_version(tmp_path: Path, data_images: dict) -> None:
    """Started on a root an older version left (a `lazymount mount --layer` daemon per remote layer, at
    snapshots/ID/fs) after a crash (a layer handed to the layer daemon whose Prepare never answered, a
    directory no snapshot owns): the per-layer mount is unmounted (a process that has a file open on it
    reads on), the cut-short layer and the directory are gone, and the layer daemon serves the layer."""
    image, layers = data_images["first"]
    daemon = Snapshotter(tmp_path / "root", tmp_path / "sn.sock").start()
    legacy = None
    try:
        target = "sha256:" + "7" * 64
        assert grpc_code(lambda: daemon.prepare("ns/1/extract-1 " + target, "",
                                                _layer_labels(image, layers[1], target))) == \
            grpc.StatusCode.ALREADY_EXISTS
        (sid,) = served_layers(daemon)
        daemon.prepare("ns/1/extract-2", "", {snapshot_grpc.TARGET_LABEL: "sha256:" + "8" * 64})
        (cut_short,) = {p.name for p in (daemon.root / "snapshots").iterdir()} - {sid}
        daemon.stop(signal.SIGKILL)
        daemon.unmount_layers()
        specs = daemon.root / "layer-specs"
        (specs / f"{sid}.json").unlink()  # older versions wrote no spec
        (specs / f"{cut_short}.json").write_text("{}")  # handed over, its Prepare cut short by the crash
        (daemon.root / "snapshots" / "999" / "fs").mkdir(parents=True)
        legacy = daemon.root / "snapshots" / sid / "fs"
        subprocess.run([sys.executable, "-m", "lazymount", "mount", "--plain-http", "--layer", layers[1],
                        "-o", "allow_other", image, str(legacy)], check=True, capture_output=True)
        held = os.open(legacy / "data" / "a" / "3", os.O_RDONLY)
        try:
            daemon.start()
            assert str(legacy) not in _mount_points_below(daemon.root), "the per-layer mount is gone"
            assert os.read(held, 100) == b"first a/3\n", "a file open on it reads on"
        finally:
            os.close(held)
        assert "a layer mount of an older lazymount" in daemon.log()
        assert set(served_layers(daemon)) == {sid}
        assert not (daemon.root / "snapshots" / "999").exists()
        assert not (daemon.root / "snapshots" / cut_short).exists()
        assert [i.name for i in daemon.walk()] == [target]
        with mounted(daemon.view("v", target), tmp_path / "view") as view:
            assert (view / "data" / "a" / "3").read_text() == "first a/3\n"
    finally:
        daemon.stop()
        daemon.unmount_layers()
        if legacy is not None and str(legacy) in _mount_points_below(tmp_path):
            subprocess.run(["fusermount3", "-u", "-z", str(legacy)], check=False)


def _mount_points_below(directory: Path) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f if line.split()[4].startswith(str(directory))]
