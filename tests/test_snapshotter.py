"""snapshot_grpc.py, the containerd remote snapshotter, as a real process on a unix socket.

The first part mirrors containerd's own snapshotter test suite (snapshots/testsuite/testsuite.go, 1.6):
each test starts a fresh snapshotter, talks to it with the generated stubs, really mounts the mounts it
answers (bind and overlayfs) and compares the tree with a plain directory the same changes were applied
to.  The second part runs a private containerd 1.6 + runc with the snapshotter as its proxy plugin:
images pulled from docker-registry on loopback, containers run, the snapshotter killed and restarted.
Every process is stopped by its PID and every mount undone in finalizers.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import field_mask_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

import fetch
import referrers
import regclient
import seekindex
import snapshot_grpc
import snapshots_pb2 as pb
import snapshots_pb2_grpc
import socketfront
from imagebuild import make_oci_image
from tests.reference import Containerd, read_layout
from tests.registry import Fault, FaultProxy, Registry, free_port, push_layout
from toc import TOC_DIGEST_ANNOTATION

REPO = Path(__file__).resolve().parent.parent
STARTUP_TIMEOUT = 30.0
GC_ROOT = "containerd.io/gc.root"
OPT = {GC_ROOT: "lazymount-test"}  # the testsuite passes this label on every call

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounts bind and overlayfs: needs root")


# --------------------------------------------------------------------------------------------- helpers


# Started with a listening socket, the snapshotter gets it as systemd passes one: as descriptor 3, with
# LISTEN_FDS=1 and LISTEN_PID set to its own PID (this launcher execs it, keeping its PID).
ACTIVATE = ("import os, sys; fd = int(sys.argv[1]); os.dup2(fd, 3); fd == 3 or os.close(fd); "
            "os.environ.update(LISTEN_FDS='1', LISTEN_PID=str(os.getpid())); "
            "os.execv(sys.argv[2], sys.argv[2:])")
Listener = socket.socket  # a listening socket (the parameter `socket` of Snapshotter is its path)


class Snapshotter:
    """A `python -m snapshot_grpc` process and a client for it; with `listener` (a listening unix socket
    bound at `socket`, held by the test as systemd would hold it), socket-activated."""

    def __init__(self, root: Path, socket: Path, metrics_port: int | None = None,
                 env: dict[str, str] | None = None, listener: Listener | None = None) -> None:
        self.root, self.socket, self.metrics_port, self.env = root, socket, metrics_port, env
        self.listener = listener
        self.log_path = root.parent / f"{root.name}.log"
        self.proc: subprocess.Popen | None = None
        self.channel: grpc.Channel | None = None

    def start(self) -> Snapshotter:
        args = [sys.executable, "-m", "snapshot_grpc", "--address", str(self.socket),
                "--root", str(self.root)]
        if self.metrics_port:
            args += ["--metrics-address", f"127.0.0.1:{self.metrics_port}"]
        passed: tuple[int, ...] = ()
        if self.listener is not None:
            passed = (self.listener.fileno(),)
            args = [sys.executable, "-c", ACTIVATE, str(passed[0]), *args]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(args, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                         pass_fds=passed)
        self.channel = grpc.insecure_channel(f"unix:{self.socket}")
        health = health_pb2_grpc.HealthStub(self.channel)
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"snapshotter exited {self.proc.returncode}: {self.log()[-3000:]}")
            with contextlib.suppress(grpc.RpcError):
                answer = health.Check(health_pb2.HealthCheckRequest(service=snapshot_grpc.SERVICE_NAME),
                                      timeout=5)
                if answer.status == health_pb2.HealthCheckResponse.SERVING:
                    return self
            if time.monotonic() > deadline:
                raise RuntimeError(f"snapshotter did not serve within {STARTUP_TIMEOUT} s: {self.log()}")
            time.sleep(0.05)

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        """Stop the process by its PID; return its exit status."""
        if self.channel is not None:
            self.channel.close()
            self.channel = None
        if self.proc is None:
            return None
        proc, self.proc = self.proc, None
        if proc.poll() is None:
            os.kill(proc.pid, sig)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
        return proc.returncode

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop_front(self) -> None:
        """Stop the front a socket-activated snapshotter started (it outlives the snapshotter by design)."""
        pid = socketfront.front_pid(self.root / "front.pid", str(self.root / "grpc.sock"))
        if pid is not None:
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + STARTUP_TIMEOUT
            while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
                time.sleep(0.05)

    def unmount_layers(self) -> None:
        """Unmount the layer daemon's file system (the daemon then exits), if it is mounted."""
        layers = self.root / "layers"
        if str(layers) in _mount_points():
            subprocess.run(["fusermount3", "-u", "-z", str(layers)], check=False)

    @property
    def stub(self) -> snapshots_pb2_grpc.SnapshotsStub:
        assert self.channel is not None
        return snapshots_pb2_grpc.SnapshotsStub(self.channel)

    # -- the Snapshotter interface, as containerd's proxy calls it ------------------------------------

    def prepare(self, key: str, parent: str = "", labels: dict | None = None) -> list:
        req = pb.PrepareSnapshotRequest(key=key, parent=parent, labels=OPT if labels is None else labels)
        return list(self.stub.Prepare(req).mounts)

    def view(self, key: str, parent: str = "", labels: dict | None = None) -> list:
        req = pb.ViewSnapshotRequest(key=key, parent=parent, labels=OPT if labels is None else labels)
        return list(self.stub.View(req).mounts)

    def commit(self, name: str, key: str, labels: dict | None = None) -> None:
        labels = OPT if labels is None else labels
        self.stub.Commit(pb.CommitSnapshotRequest(name=name, key=key, labels=labels))

    def remove(self, key: str) -> None:
        self.stub.Remove(pb.RemoveSnapshotRequest(key=key))

    def stat(self, key: str) -> pb.Info:
        return self.stub.Stat(pb.StatSnapshotRequest(key=key)).info

    def update(self, info: pb.Info, *paths: str) -> pb.Info:
        mask = field_mask_pb2.FieldMask(paths=list(paths))
        return self.stub.Update(pb.UpdateSnapshotRequest(info=info, update_mask=mask)).info

    def walk(self, *filters: str) -> list[pb.Info]:
        return [i for r in self.stub.List(pb.ListSnapshotsRequest(filters=list(filters))) for i in r.info]

    def usage(self, key: str) -> tuple[int, int]:
        answer = self.stub.Usage(pb.UsageRequest(key=key))
        return answer.size, answer.inodes


def grpc_code(call: Callable[[], object]) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as raised:
        call()
    return raised.value.code()


def mount_all(mounts: list, target: Path) -> None:
    """Mount what a snapshotter answered, as containerd's mount.All does."""
    target.mkdir(parents=True, exist_ok=True)
    for m in mounts:
        kind = [] if m.type == "bind" else ["-t", m.type]
        subprocess.run(["mount", *kind, "-o", ",".join(m.options), m.source, str(target)], check=True,
                       capture_output=True)


@contextlib.contextmanager
def mounted(mounts: list, target: Path) -> Iterator[Path]:
    mount_all(mounts, target)
    try:
        yield target
    finally:
        subprocess.run(["umount", str(target)], check=True)


def tree_of(root: Path) -> dict[str, tuple]:
    """path -> (kind, permission bits, content or link target) for everything under root."""
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st = path.lstat()
            rel = str(path.relative_to(root))
            if stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", stat.S_IMODE(st.st_mode))
            elif stat.S_ISLNK(st.st_mode):
                out[rel] = ("symlink", os.readlink(path))
            else:
                out[rel] = ("file", stat.S_IMODE(st.st_mode), path.read_bytes(), st.st_nlink)
            out[rel] += (st.st_uid, st.st_gid)
    return out


def create_file(root: Path, rel: str, data: bytes, mode: int = 0o777) -> None:
    path = root / rel
    path.write_bytes(data)
    os.chmod(path, mode)


def create_dir(root: Path, rel: str, mode: int = 0o755) -> None:
    (root / rel).mkdir()
    os.chmod(root / rel, mode)


def remove_all(root: Path, rel: str) -> None:
    path = root / rel
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def _mount_points() -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f]


@pytest.fixture()
def sn(tmp_path: Path) -> Iterator[Snapshotter]:
    daemon = Snapshotter(tmp_path / "root", tmp_path / "sn.sock").start()
    try:
        yield daemon
    finally:
        daemon.stop()
        daemon.unmount_layers()


def test_generated_stubs_are_current() -> None:
    """The committed *_pb2*.py are what protos/generate.sh makes from the vendored protos."""
    result = subprocess.run(["sh", str(REPO / "protos" / "generate.sh"), "--check", sys.executable],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr


# ------------------------------------------------------- containerd's snapshotter test suite, mirrored


def check_snapshots(sn: Snapshotter, work: Path, *appliers: Callable[[Path], None]) -> None:
    """testsuite.checkSnapshots: each applier is a layer; the view of the top equals a flat directory."""
    flat = work / "flat"
    flat.mkdir()
    parent = ""
    for i, apply in enumerate(appliers):
        with mounted(sn.prepare(f"preparing-{i}", parent), work / f"preparing-{i}") as target:
            assert tree_of(target) == tree_of(flat), f"layer {i} before applying"
            apply(target)
            apply(flat)
        parent = f"committed-{i}"
        sn.commit(parent, f"preparing-{i}")
    with mounted(sn.view("view", parent), work / "view") as view:
        assert tree_of(view) == tree_of(flat)


def test_basic(sn: Snapshotter, tmp_path: Path) -> None:
    """testsuite.checkSnapshotterBasic: prepare/commit chains, stat, walk, view, remove order."""
    def initial(d: Path) -> None:
        create_file(d, "foo", b"foo\n")
        for rel in ("a", "a/b", "a/b/c"):
            create_dir(d, rel)

    def diff(d: Path) -> None:
        create_file(d, "bar", b"bar\n")
        create_file(d, "foo", b"bar\n")
        remove_all(d, "a/b")

    flat = tmp_path / "flat"
    flat.mkdir()
    mounts = sn.prepare("preparing")
    assert [(m.type, list(m.options)) for m in mounts] == [("bind", ["rw", "rbind"])]
    with mounted(mounts, tmp_path / "preparing") as target:
        initial(target)
        initial(flat)
    sn.commit("committed", "preparing")
    si = sn.stat("committed")
    assert (si.name, si.parent, si.kind) == ("committed", "", pb.COMMITTED)
    assert grpc_code(lambda: sn.stat("preparing")) == grpc.StatusCode.NOT_FOUND

    mounts = sn.prepare("nextlayer", "committed")
    assert mounts[0].type == "overlay"
    with mounted(mounts, tmp_path / "nextlayer") as target:
        assert tree_of(target) == tree_of(flat)
        diff(target)
        diff(flat)
    ni = sn.stat("nextlayer")
    assert (ni.parent, ni.kind) == ("committed", pb.ACTIVE)
    sn.commit("committed-next", "nextlayer")
    si2 = sn.stat("committed-next")
    assert (si2.parent, si2.kind) == ("committed", pb.COMMITTED)
    assert grpc_code(lambda: sn.stat("nextlayer")) == grpc.StatusCode.NOT_FOUND
    walked = {i.name: i for i in sn.walk()}
    assert walked == {"committed": si, "committed-next": si2}

    with mounted(sn.view("nextnextlayer", "committed-next"), tmp_path / "nextnext") as view:
        assert tree_of(view) == tree_of(flat)
    sn.remove("nextnextlayer")
    assert grpc_code(lambda: sn.remove("committed")) == grpc.StatusCode.FAILED_PRECONDITION
    sn.remove("committed-next")
    sn.remove("committed")
    assert sn.walk() == []
    assert not any((sn.root / "snapshots").iterdir()), "remove frees the directories"


def test_stat_active_and_committed(sn: Snapshotter, tmp_path: Path) -> None:
    """testsuite.checkSnapshotterStatActive and checkSnapshotterStatCommitted."""
    with mounted(sn.prepare("preparing"), tmp_path / "preparing") as target:
        create_file(target, "foo", b"foo\n")
        si = sn.stat("preparing")
        assert (si.name, si.kind, si.parent) == ("preparing", pb.ACTIVE, "")
    sn.commit("committed", "preparing")
    si = sn.stat("committed")
    assert (si.name, si.kind, si.parent) == ("committed", pb.COMMITTED, "")


def test_transitivity(sn: Snapshotter, tmp_path: Path) -> None:
    """testsuite.checkSnapshotterTransitivity: A <- B, B's parent's parent is empty."""
    with mounted(sn.prepare("preparing"), tmp_path / "preparing") as target:
        create_file(target, "foo", b"foo\n")
    sn.commit("snapA", "preparing")
    with mounted(sn.prepare("next", "snapA"), tmp_path / "next") as target:
        create_file(target, "foo", b"foo bar\n")
    sn.commit("snapB", "next")
    assert sn.stat("snapA").parent == ""
    assert sn.stat("snapB").parent == "snapA"
    assert sn.stat(sn.stat("snapB").parent).parent == ""


def test_prepare_view_same_key_fails(sn: Snapshotter) -> None:
    """testsuite.checkSnapshotterPrepareView: a key is taken by Prepare or View only once."""
    sn.prepare("preparing")
    sn.commit("snapA", "preparing")
    sn.prepare("newlayer", "snapA")
    assert grpc_code(lambda: sn.view("newlayer", "snapA")) == grpc.StatusCode.ALREADY_EXISTS
    sn.prepare("prepLayer", "snapA")
    assert grpc_code(lambda: sn.prepare("prepLayer", "snapA")) == grpc.StatusCode.ALREADY_EXISTS
    sn.view("viewLayer", "snapA")
    assert grpc_code(lambda: sn.view("viewLayer", "snapA")) == grpc.StatusCode.ALREADY_EXISTS
    assert grpc_code(lambda: sn.prepare("x", "newlayer")) == grpc.StatusCode.INVALID_ARGUMENT
    assert grpc_code(lambda: sn.prepare("x", "missing")) == grpc.StatusCode.NOT_FOUND
    assert grpc_code(lambda: sn.commit("snapA", "newlayer")) == grpc.StatusCode.ALREADY_EXISTS
    assert grpc_code(lambda: sn.commit("c", "viewLayer")) == grpc.StatusCode.FAILED_PRECONDITION
    assert grpc_code(lambda: sn.stub.Mounts(pb.MountsRequest(key="snapA"))) == \
        grpc.StatusCode.FAILED_PRECONDITION


def base_test_snapshots(sn: Snapshotter) -> None:
    """testsuite.baseTestSnapshots: c1 <- c2 committed, a1 (on c2) and a2 active, v1 (on c2), v2 views."""
    sn.prepare("c1-a")
    sn.commit("c1", "c1-a")
    sn.prepare("c2-a", "c1")
    sn.commit("c2", "c2-a")
    sn.prepare("a1", "c2")
    sn.prepare("a2")
    sn.view("v1", "c2")
    sn.view("v2")


def test_update(sn: Snapshotter) -> None:
    """testsuite.checkUpdate: labels replaced, merged by field path; created kept; immutable paths refused."""
    t1 = time.time_ns()
    base_test_snapshots(sn)
    t2 = time.time_ns()
    cases = [("c1", pb.COMMITTED, ""), ("c2", pb.COMMITTED, "c1"), ("a1", pb.ACTIVE, "c2"),
             ("a2", pb.ACTIVE, ""), ("v1", pb.VIEW, "c2"), ("v2", pb.VIEW, "")]
    for name, kind, parent in cases:
        st = sn.stat(name)
        assert t1 <= st.created_at.ToNanoseconds() <= t2
        assert st.created_at == st.updated_at
        assert (st.kind, st.parent, st.name) == (kind, parent, name)
        created = st.created_at
        root_time = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        expected = {"l1": "v1", "l2": "v2", "l3": "v3", GC_ROOT: root_time}
        st.parent = "doesnotexist"
        st.labels.clear()
        st.labels.update(expected)
        u1 = time.time_ns()
        st = sn.update(st)
        u2 = time.time_ns()
        assert st.created_at == created
        assert u1 <= st.updated_at.ToNanoseconds() <= u2
        assert (st.kind, st.parent, st.name) == (kind, parent, name)
        assert dict(st.labels) == expected

        st.labels.clear()
        st.labels.update({"l1": "updated", "l4": "v4"})
        st = sn.update(st, "labels.l1", "labels.l2")
        assert dict(st.labels) == {"l1": "updated", "l3": "v3", GC_ROOT: root_time}

        expected = {"l4": "v4", GC_ROOT: root_time}
        st.labels.clear()
        st.labels.update(expected)
        st = sn.update(st, "labels")
        assert dict(st.labels) == expected
        assert dict(sn.stat(name).labels) == expected

        st.parent = "doesnotexist"
        assert grpc_code(lambda st=st: sn.update(st, "parent")) == grpc.StatusCode.INVALID_ARGUMENT


def test_remove(sn: Snapshotter) -> None:
    """testsuite.checkRemove: keys and names can be reused after Remove."""
    sn.prepare("committed-a")
    sn.commit("committed-1", "committed-a")
    sn.prepare("reuse-1", "committed-1")
    sn.remove("reuse-1")
    sn.view("reuse-1", "committed-1")
    sn.remove("reuse-1")
    sn.prepare("reuse-1")
    sn.remove("committed-1")
    sn.commit("committed-1", "reuse-1")
    assert grpc_code(lambda: sn.remove("reuse-1")) == grpc.StatusCode.NOT_FOUND


def test_remove_intermediate_snapshot(sn: Snapshotter) -> None:
    """testsuite.checkRemoveIntermediateSnapshot: a parent goes only after its children."""
    sn.prepare("base")
    sn.commit("committed-base", "base")
    sn.prepare("intermediate", "committed-base")
    sn.commit("committed-inter", "intermediate")
    sn.prepare("toplayer", "committed-inter")
    assert grpc_code(lambda: sn.remove("committed-inter")) == grpc.StatusCode.FAILED_PRECONDITION
    sn.remove("toplayer")
    sn.remove("committed-inter")
    sn.remove("committed-base")


def test_walk(sn: Snapshotter) -> None:
    """testsuite.checkWalk: List with containerd filters (kind, name, parent, labels, !=, presence)."""
    opt = {GC_ROOT: "check-walk"}
    sn.prepare("a-np", "", opt)
    sn.prepare("p-tmp", "", opt)
    sn.commit("p", "p-tmp", opt)
    sn.prepare("a", "p", opt)
    sn.view("v", "p", opt)
    sn.prepare("p-wl-tmp", "", opt)
    sn.commit("p-wl", "p-wl-tmp", {"l": "1", **opt})
    sn.prepare("a-wl", "p-wl", {"l": "2", **opt})
    sn.view("v-wl", "p-wl", {"l": "3", **opt})
    sn.prepare("a-np-wl", "", {"l": "2", **opt})
    cases = [
        (["a-np", "p", "a", "v", "p-wl", "a-wl", "v-wl", "a-np-wl"],
         ['labels."containerd.io/gc.root"==check-walk']),
        (["a-np", "a", "a-wl", "a-np-wl"], ['kind==active,labels."containerd.io/gc.root"==check-walk']),
        (["v", "v-wl"], ['kind==view,labels."containerd.io/gc.root"==check-walk']),
        (["p", "p-wl"], ['kind==committed,labels."containerd.io/gc.root"==check-walk']),
        (["p", "a-np-wl"], ["name==p", "name==a-np-wl"]),
        (["a-wl"], ["name==a-wl,labels.l"]),
        (["a", "v"], ["parent==p"]),
        (["a", "v", "a-wl", "v-wl"], ['parent!="",labels."containerd.io/gc.root"==check-walk']),
        (["p-wl", "a-wl", "v-wl", "a-np-wl"], ["labels.l"]),
        (["a-wl", "a-np-wl"], ["labels.l==2"]),
        (["a-np", "a-np-wl"], ["name~=/^a-np/"]),
    ]
    for matches, filters in cases:
        assert sorted(i.name for i in sn.walk(*filters)) == sorted(matches), filters
    assert grpc_code(lambda: sn.walk("name==/p/")) == grpc.StatusCode.INVALID_ARGUMENT


def test_view_readonly(sn: Snapshotter, tmp_path: Path) -> None:
    """testsuite.checkSnapshotterViewReadonly: a view of a single committed layer is a read-only bind."""
    sn.prepare("preparing")
    sn.commit("committed", "preparing")
    mounts = sn.view("view", "committed")
    assert [(m.type, list(m.options)) for m in mounts] == [("bind", ["ro", "rbind"])]
    with mounted(mounts, tmp_path / "view-mount") as view, pytest.raises(OSError):
        (view / "testfile").write_bytes(b"testcontent")
    sn.remove("view")
    sn.remove("committed")


def test_deleted_and_moved_files(sn: Snapshotter, tmp_path: Path) -> None:
    """testsuite.checkDeletedFilesInChildSnapshot and checkFileFromLowerLayer through overlay chains."""
    def l1(d: Path) -> None:
        create_file(d, "foo", b"foo\n")
        create_file(d, "foobar", b"foobar\n")
        create_dir(d, "dir1", 0o700)
        create_file(d, "dir1/f1", b"Hello", 0o644)
        create_dir(d, "dir2", 0o700)
        create_file(d, "dir2/f2", b"...", 0o644)

    def l2(d: Path) -> None:
        remove_all(d, "foobar")
        create_dir(d, "dir3", 0o700)
        create_file(d, "dir3/f1", b"Hello", 0o644)
        remove_all(d, "dir1")
        os.link(d / "dir2/f2", d / "dir3/f2")
        remove_all(d, "dir2/f2")

    check_snapshots(sn, tmp_path, l1, l2, lambda d: None)


def _layer_file_update() -> list[Callable[[Path], None]]:
    def l1(d: Path) -> None:
        create_dir(d, "etc", 0o700)
        create_file(d, "etc/hosts", b"mydomain 10.0.0.1", 0o644)
        create_file(d, "etc/profile", b"PATH=/usr/bin", 0o644)

    def l2(d: Path) -> None:
        create_file(d, "etc/hosts", b"mydomain 10.0.0.2", 0o644)
        create_file(d, "etc/profile", b"PATH=/usr/bin", 0o666)
        create_dir(d, "root", 0o700)
        create_file(d, "root/.bashrc", b"PATH=/usr/sbin:/usr/bin", 0o644)
    return [l1, l2]


def _remove_directory_in_lower_layer() -> list[Callable[[Path], None]]:
    def l1(d: Path) -> None:
        create_dir(d, "lib", 0o700)
        create_file(d, "lib/hidden", b"", 0o644)

    def l2(d: Path) -> None:
        remove_all(d, "lib")
        create_dir(d, "lib", 0o700)
        create_file(d, "lib/not-hidden", b"", 0o644)
    return [l1, l2, lambda d: create_file(d, "lib/newfile", b"", 0o644)]


def _chown() -> list[Callable[[Path], None]]:
    def l1(d: Path) -> None:
        for rel in ("opt", "opt/a", "opt/a/b"):
            create_dir(d, rel, 0o700)
        create_file(d, "opt/a/b/file.txt", b"hello", 0o644)

    def l2(d: Path) -> None:
        for rel in ("opt", "opt/a", "opt/a/b", "opt/a/b/file.txt"):
            os.lchown(d / rel, 1, 1)
    return [l1, l2]


def _directory_permission_on_commit() -> list[Callable[[Path], None]]:
    def l1(d: Path) -> None:
        for n in range(1, 6):
            create_dir(d, f"dir{n}", 0o700)
        create_file(d, "dir4/f1", b"...", 0o644)
        create_file(d, "dir5/f1", b"...", 0o644)
        for rel in ("dir1", "dir2", "dir3", "dir5", "dir5/f1"):
            os.lchown(d / rel, 1, 1)

    def l2(d: Path) -> None:
        os.lchown(d / "dir2", 0, 0)
        remove_all(d, "dir3")
        os.lchown(d / "dir4", 1, 1)
        os.lchown(d / "dir4/f1", 1, 1)

    def l3(d: Path) -> None:
        create_dir(d, "dir3", 0o700)
        os.lchown(d / "dir3", 1, 1)
        remove_all(d, "dir5")
        create_dir(d, "dir5", 0o700)
        os.lchown(d / "dir5", 1, 1)
    return [l1, l2, l3]


@pytest.mark.parametrize("layers", [_layer_file_update, _remove_directory_in_lower_layer, _chown,
                                    _directory_permission_on_commit])
def test_layer_issues(sn: Snapshotter, tmp_path: Path, layers: Callable) -> None:
    """testsuite issues.go: checkLayerFileUpdate, checkRemoveDirectoryInLowerLayer, checkChown,
    checkDirectoryPermissionOnCommit (checkRename is skipped upstream too)."""
    check_snapshots(sn, tmp_path, *layers())


def test_many_layers_mount(sn: Snapshotter, tmp_path: Path) -> None:
    """testsuite.check128LayersMount with 40 layers (containerd shortens a longer lowerdir= option
    itself; a plain `mount` here cannot): lower layers stack in order."""
    def lowest(d: Path) -> None:
        create_file(d, "bottom", b"way at the bottom\n")
        create_file(d, "overwriteme", b"FIRST!\n")
        create_dir(d, "ADDHERE")
        create_dir(d, "ONLYME")
        create_file(d, "ONLYME/bottom", b"bye!\n")

    def layer(i: int) -> Callable[[Path], None]:
        def apply(d: Path) -> None:
            create_file(d, "overwriteme", f"{i} WAS HERE!\n".encode())
            create_file(d, f"ADDHERE/file-{i}", b"same\n", 0o755)
            remove_all(d, "ONLYME")
            create_dir(d, "ONLYME")
            create_file(d, f"ONLYME/file-{i}", b"only me!\n")
        return apply

    check_snapshots(sn, tmp_path, lowest, *(layer(i) for i in range(1, 40)))


def test_stat_in_walk(sn: Snapshotter) -> None:
    """testsuite.checkStatInWalk: what List answers is what Stat answers."""
    base_test_snapshots(sn)
    walked = sn.walk()
    assert len(walked) == 6
    for info in walked:
        assert sn.stat(info.name) == info


def test_root_permission_and_usage(sn: Snapshotter, tmp_path: Path) -> None:
    """testsuite.checkRootPermission; Usage like containerd's fs.DiskUsage (512-byte blocks, inodes)."""
    with mounted(sn.prepare("preparing"), tmp_path / "preparing") as target:
        assert stat.S_IMODE(target.stat().st_mode) == 0o755
        assert sn.usage("preparing")[1] == 1
        create_file(target, "data", os.urandom(100_000))
        os.link(target / "data", target / "hardlink")
        create_dir(target, "sub")
        os.sync()
        size, inodes = sn.usage("preparing")
        assert inodes == 3
        expected = sum(p.lstat().st_blocks * 512 for p in (target, target / "data", target / "sub"))
        assert size == expected
    sn.commit("committed", "preparing")
    assert sn.usage("committed") == (size, inodes), "recorded at commit"
    sn.view("view", "committed")
    assert sn.usage("view") == (0, 0)


def test_cleanup_and_restart_keep_metadata(sn: Snapshotter) -> None:
    """Cleanup removes directories no snapshot owns; metadata survives a restart."""
    sn.prepare("a")
    sn.commit("c", "a", {"l": "1"})
    sn.view("v", "c")
    orphan = sn.root / "snapshots" / "999"
    (orphan / "fs").mkdir(parents=True)
    sn.stub.Cleanup(pb.CleanupRequest())
    assert not orphan.exists()
    before = sn.walk()
    assert sn.stop() == 0
    sn.start()
    assert sn.walk() == before


def test_remote_target_without_image_labels_falls_back(sn: Snapshotter) -> None:
    """A layer target without remote labels gets ordinary mounts and the stable log line."""
    target = "sha256:" + "ab" * 32
    mounts = sn.prepare("extract-1", "", {snapshot_grpc.TARGET_LABEL: target})
    assert mounts[0].type == "bind"
    assert sn.stat("extract-1").kind == pb.ACTIVE
    assert 'remote-snapshot-prepared: false reason="no remote image labels' in sn.log()


def test_health_metrics_and_sigterm(tmp_path: Path) -> None:
    port = free_port()
    daemon = Snapshotter(tmp_path / "root", tmp_path / "sn.sock", metrics_port=port).start()
    try:
        daemon.prepare("a")
        assert grpc_code(lambda: daemon.stat("nope")) == grpc.StatusCode.NOT_FOUND
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics") as answer:
            text = answer.read().decode()
        assert 'lazymount_snapshotter_requests_total{code="OK",method="Prepare"} 1.0' in text
        assert 'lazymount_snapshotter_requests_total{code="NOT_FOUND",method="Stat"} 1.0' in text
    finally:
        status = daemon.stop(signal.SIGTERM)
    assert status == 0
    assert "stopped" in daemon.log()


# ------------------------------------------------------------------------------ with a real containerd


NEEDED = ("containerd", "ctr", "runc", "umoci", "skopeo", "docker-registry")
MISSING = [tool for tool in NEEDED if shutil.which(tool) is None]
needs_containerd = pytest.mark.skipif(bool(MISSING), reason=f"not installed: {', '.join(MISSING)}")


def _shell_tree(root: Path) -> Path:
    """A root filesystem with only /bin/sh and the libraries it loads."""
    ldd = subprocess.run(["ldd", "/bin/sh"], capture_output=True, text=True, check=True).stdout
    libraries = [part for part in ldd.split() if part.startswith("/")]
    for source in ["/bin/sh", *libraries]:
        dest = root / Path(source).resolve().relative_to("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(Path(source).resolve(), dest)
        if Path(source).resolve() != Path(source):
            link = root / source.lstrip("/")
            link.parent.mkdir(parents=True, exist_ok=True)
            if not link.exists():
                link.symlink_to(Path(source).resolve())
    return root


def build_shell_image(work: Path, text: str, marker: str = "") -> Path:
    """A 2-layer OCI layout tagged v1: /bin/sh and its libraries (and /marker holding `marker`, which
    makes the base layer unlike other images' if given), then /hello.txt holding `text`."""
    base = _shell_tree(work / "tree0")
    if marker:
        (base / "marker").write_text(marker)
    top = work / "tree1"
    shutil.copytree(base, top, symlinks=True)
    (top / "hello.txt").write_text(text)
    return make_oci_image(work / "layout", "v1", [base, top])


@pytest.fixture(scope="module")
def shell_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_shell_image(tmp_path_factory.mktemp("shell-image"), "hello from a lazymount snapshot\n")


@contextlib.contextmanager
def snapshotter_stack(base: Path, listener: Listener | None = None,
                      metrics_port: int | None = None) -> Iterator[tuple[Containerd, Snapshotter]]:
    """A private containerd whose proxy plugin `lazymount` (contrib/containerd-config.toml) is a
    snapshotter process under `base` (socket-activated on `listener`, bound at BASE/sn.sock, if given);
    both stopped on exit."""
    base.mkdir(parents=True, exist_ok=True)
    daemon = Snapshotter(base / "sn-root", base / "sn.sock", metrics_port=metrics_port, listener=listener)
    config = (Path(REPO / "contrib" / "containerd-config.toml").read_text()
              .replace("/run/lazymount/snapshotter.sock", str(daemon.socket)))
    containerd = Containerd(base, extra_config=config)
    daemon.start()
    try:
        containerd.start()
        yield containerd, daemon
    finally:
        containerd.stop()  # also unmounts everything under base, the snapshotter's layers included
        daemon.stop()
        daemon.stop_front()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Containerd, Snapshotter]]:
    """A private containerd whose proxy plugin `lazymount` is a snapshotter under its base directory."""
    if MISSING:
        pytest.skip(f"not installed: {', '.join(MISSING)}")
    with snapshotter_stack(tmp_path_factory.mktemp("ctd")) as pair:
        yield pair


def _ctr_run(containerd: Containerd, image: str, name: str, command: str) -> str:
    return containerd.ctr("run", "--snapshotter", "lazymount", "--rm", image, name, "/bin/sh", "-c",
                          command, text=True).stdout


def _snapshot_names(containerd: Containerd) -> list[str]:
    """`ctr snapshots ls` names; waits while containerd's gRPC client redials a restarted snapshotter
    (its connection backs off after a refused dial: the first calls fail with `unavailable`)."""
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while True:
        proc = containerd.ctr("snapshots", "--snapshotter", "lazymount", "ls", text=True, check=False)
        if proc.returncode == 0 or "unavailable" not in proc.stderr or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert proc.returncode == 0, proc.stderr
    return sorted(line.split()[0] for line in proc.stdout.splitlines()[1:] if line.strip())


@needs_containerd
def test_containerd_pull_and_run_plain_image(stack: tuple[Containerd, Snapshotter], shell_image: Path,
                                             registry: Registry, tmp_path: Path) -> None:
    """gzip images through the proxy plugin: every layer is declined (logged) and unpacked as usual,
    whether the client asks for remote layers (`ctr-remote images rpull`) or not (`ctr images pull`)."""
    containerd, daemon = stack
    push_layout(shell_image, "v1", registry, "plain/shell")
    image = f"{registry.host}/plain/shell:v1"
    containerd.ctr("images", "pull", "--plain-http", "--snapshotter", "lazymount", image)
    assert _ctr_run(containerd, image, "plain-run", 'read line < /hello.txt; echo "$line"; echo ok') == \
        "hello from a lazymount snapshot\nok\n"
    assert daemon.log().count('remote-snapshot-prepared: false reason="no containerd.io/snapshot.ref') == 2

    other = build_shell_image(tmp_path, "another top layer\n")
    push_layout(other, "v1", registry, "plain/other")
    image = f"{registry.host}/plain/other:v1"
    containerd.ctr_remote("images", "rpull", "--plain-http", "--snapshotter", "lazymount", image)
    assert _ctr_run(containerd, image, "rpull-run", 'read line < /hello.txt; echo "$line"') == \
        "another top layer\n"
    # containerd prepares only the layers it lacks: a base layer built in the same second as the first
    # image's is the same layer
    new_layers = ({d["digest"] for _, d in read_layout(other, "v1")[2]}
                  - {d["digest"] for _, d in read_layout(shell_image, "v1")[2]})
    assert new_layers
    declined = daemon.log().count('remote-snapshot-prepared: false reason="layer is not eStargz')
    assert declined == len(new_layers)
    assert "remote-snapshot-prepared: true" not in daemon.log()


@needs_containerd
def test_containerd_snapshotter_restart(stack: tuple[Containerd, Snapshotter], shell_image: Path,
                                        registry: Registry) -> None:
    """Killed (SIGKILL) while a container exists, restarted: same snapshots, new containers run."""
    containerd, daemon = stack
    push_layout(shell_image, "v1", registry, "restart/shell")
    image = f"{registry.host}/restart/shell:v1"
    containerd.ctr("images", "pull", "--plain-http", "--snapshotter", "lazymount", image)
    containerd.ctr("containers", "create", "--snapshotter", "lazymount", image, "kept", "/bin/sh")
    try:
        before = _snapshot_names(containerd)
        assert "kept" in before
        daemon.stop(signal.SIGKILL)
        daemon.start()
        assert _snapshot_names(containerd) == before
        assert _ctr_run(containerd, image, "after-restart", "echo ok") == "ok\n"
    finally:
        containerd.ctr("containers", "rm", "kept", check=False)


@pytest.fixture(scope="module")
def estargz_layout(shell_image: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shell image converted to eStargz by `lazymount convert` (tag v1)."""
    converted = tmp_path_factory.mktemp("estargz") / "layout"
    subprocess.run([sys.executable, str(REPO / "lazymount.py"), "convert", "-q", f"oci:{shell_image}:v1",
                    f"oci:{converted}:v1"], check=True, capture_output=True)
    return converted


@pytest.fixture(scope="module")
def lazy_image(estargz_layout: Path, registry: Registry) -> tuple[str, list]:
    """The eStargz shell image pushed: (reference, layer digests)."""
    push_layout(estargz_layout, "v1", registry, "lazy/shell")
    _, _, layers = read_layout(estargz_layout, "v1")
    return f"{registry.host}/lazy/shell:v1", [descriptor["digest"] for _, descriptor in layers]


def _remote_snapshots(containerd: Containerd) -> list[str]:
    """Names of the snapshots containerd knows as remote (it copies the label from the snapshotter)."""
    infos = [json.loads(containerd.ctr("snapshots", "--snapshotter", "lazymount", "info", name,
                                       text=True).stdout) for name in _snapshot_names(containerd)]
    return [i["Name"] for i in infos if snapshot_grpc.REMOTE_LABEL in (i.get("Labels") or {})]


def served_layers(daemon: Snapshotter) -> dict[str, int]:
    """Layer name (its spec file's) -> PID of the `lazymount layers` daemon serving it, for the layers the
    snapshotter handed over and that are served now."""
    out = {}
    for spec in (daemon.root / "layer-specs").glob("*.json"):
        with contextlib.suppress(OSError, ValueError, KeyError):
            stats = json.loads(os.getxattr(daemon.root / "layers" / spec.stem, "user.lazymount.stats"))
            out[spec.stem] = stats["pid"]
    return out


def layer_daemons(daemon: Snapshotter) -> list[int]:
    """PIDs of the `lazymount layers` processes serving under the snapshotter's root."""
    pids = []
    for proc in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            if proc.name.isdigit():
                argv = (proc / "cmdline").read_bytes().split(b"\0")
                if b"layers" in argv and str(daemon.root / "layers").encode() in argv:
                    pids.append(int(proc.name))
    return pids


def _fuse_mounts(daemon: Snapshotter) -> list[str]:
    """The FUSE mounts under the snapshotter's root."""
    with open("/proc/self/mountinfo") as f:
        fields = [line.split() for line in f]
    return [f[4] for f in fields if f[4].startswith(str(daemon.root)) and "fuse.lazymount" in f]


@needs_containerd
def test_containerd_rpull_estargz_is_lazy(stack: tuple[Containerd, Snapshotter],
                                          lazy_image: tuple[str, list]) -> None:
    """`ctr-remote images rpull` of an eStargz image: every layer is mounted remotely, no layer blob enters
    containerd's content store, and containers run from the lazy layers."""
    containerd, daemon = stack
    image, layers = lazy_image
    containerd.ctr_remote("images", "rpull", "--plain-http", "--snapshotter", "lazymount", image)
    assert daemon.log().count("remote-snapshot-prepared: true") == len(layers) == 2
    content = containerd.ctr("content", "ls", "-q", text=True).stdout.split()
    assert not set(layers) & set(content)
    served = served_layers(daemon)
    assert len(served) == 2
    assert layer_daemons(daemon) == sorted(set(served.values())), "one daemon serves every layer"
    assert len(_fuse_mounts(daemon)) == 1
    assert len(_remote_snapshots(containerd)) == 2
    assert _ctr_run(containerd, image, "lazy-run", 'read line < /hello.txt; echo "$line"') == \
        "hello from a lazymount snapshot\n"


@needs_containerd
def test_containerd_rpull_indexed_plain_image(stack: tuple[Containerd, Snapshotter], registry: Registry,
                                              tmp_path: Path) -> None:
    """A plain gzip image whose top layer has a seek index attached (built by `lazymount index` on another
    node, pushed as a referrer): `ctr-remote images rpull` prepares that layer as a lazy remote snapshot
    the layer daemon serves through the index, and the base layer, which has none, as a normal snapshot;
    a container runs from both.  (containerd then downloads the top layer too: it fetches every layer above
    one it unpacks.)"""
    containerd, daemon = stack
    layout = build_shell_image(tmp_path, "hello from an indexed layer\n", marker="indexed")
    push_layout(layout, "v1", registry, "indexed/shell")
    image = f"{registry.host}/indexed/shell:v1"
    top = read_layout(layout, "v1")[2][-1][1]["digest"]
    subprocess.run([sys.executable, str(REPO / "lazymount.py"), "index", image, "--cache-dir",
                    str(tmp_path / "cache")], check=True, capture_output=True)
    referrers.push_seek_index(fetch.open_image(image, client=regclient.RegistryClient()), top,
                              seekindex.index_path(tmp_path / "cache", top).read_bytes())
    seen = len(daemon.log())
    containerd.ctr_remote("images", "rpull", "--plain-http", "--snapshotter", "lazymount", image)
    try:
        log = daemon.log()[seen:]
        assert log.count("remote-snapshot-prepared: true") == 1
        assert log.count('remote-snapshot-prepared: false reason="layer is not eStargz (no TOC digest '
                         'annotation) and has no seek index') == 1
        assert f"remote-snapshot-prepared: true reason=\"mounted lazily\" layer={top}" in log
        specs = {spec.stem: json.loads(spec.read_text())
                 for spec in (daemon.root / "layer-specs").glob("*.json")}
        (name,) = [name for name, spec in specs.items() if spec["digest"] == top]
        assert specs[name]["toc_digest"] is None and name in served_layers(daemon)
        stats = json.loads(os.getxattr(daemon.root / "layers" / name, "user.lazymount.stats"))
        assert [layer["state"] for layer in stats["layers"]] == ["indexed"], stats
        assert _ctr_run(containerd, image, "indexed-run", 'read line < /hello.txt; echo "$line"') == \
            "hello from an indexed layer\n"
    finally:
        containerd.ctr("images", "rm", "--sync", image)  # the other tests count the served layers
    assert name not in served_layers(daemon)


@needs_containerd
def test_containerd_dead_layer_mount_is_restored(stack: tuple[Containerd, Snapshotter],
                                                 lazy_image: tuple[str, list]) -> None:
    """The layer daemon killed: it is started again (by the snapshotter watching it, or at the latest by
    the next container start) and serves every layer; a snapshotter killed and restarted adopts the live
    daemon; started with none mounted, it mounts the layers before serving."""
    containerd, daemon = stack
    image, _ = lazy_image
    containerd.ctr_remote("images", "rpull", "--plain-http", "--snapshotter", "lazymount", image)
    before = served_layers(daemon)
    (pid,) = set(before.values())
    os.kill(pid, signal.SIGKILL)
    assert _ctr_run(containerd, image, "restored-run", "echo ok") == "ok\n"
    after = served_layers(daemon)
    assert set(after) == set(before) and len(set(after.values())) == 1 and pid not in after.values()
    assert "died: starting it again" in daemon.log()  # by its watcher, or by the next Mounts

    daemon.stop(signal.SIGKILL)
    daemon.start()
    assert served_layers(daemon) == after, "live layer mounts are kept across a restart"
    _snapshot_names(containerd)  # waits until containerd has redialled
    assert _ctr_run(containerd, image, "after-restart-lazy", "echo ok") == "ok\n"

    daemon.stop()  # as after a reboot: the snapshotter starts with no layer mounted
    subprocess.run(["fusermount3", "-u", str(daemon.root / "layers")], check=True)
    daemon.start()
    remounted = served_layers(daemon)
    assert set(remounted) == set(after) and not set(remounted.values()) & set(after.values())
    _snapshot_names(containerd)
    assert _ctr_run(containerd, image, "after-reboot-lazy", "echo ok") == "ok\n"


@needs_containerd
def test_containerd_image_removal_unmounts_layers(stack: tuple[Containerd, Snapshotter],
                                                  lazy_image: tuple[str, list]) -> None:
    """Removing the image lets containerd's GC remove the remote snapshots: their mounts go away."""
    containerd, daemon = stack
    image, _ = lazy_image
    containerd.ctr_remote("images", "rpull", "--plain-http", "--snapshotter", "lazymount", image)
    assert len(served_layers(daemon)) == 2
    containerd.ctr("images", "rm", "--sync", image)
    assert served_layers(daemon) == {}
    assert _remote_snapshots(containerd) == []


# ------------------------------------------------------------- the remote path, called directly over gRPC


def _layer_labels(reference: str, digest: str, target: str) -> dict[str, str]:
    """What the CRI plugin (and nerdctl) put on a layer's Prepare."""
    return {snapshot_grpc.TARGET_LABEL: target, "containerd.io/snapshot/cri.image-ref": reference,
            "containerd.io/snapshot/cri.layer-digest": digest, **OPT}


def _with_bad_toc_digest(layout: Path, out: Path) -> Path:
    """A copy of an eStargz layout whose bottom layer announces a TOC digest the TOC does not have."""
    shutil.copytree(layout, out)
    index = json.loads((out / "index.json").read_text())
    blobs = out / "blobs" / "sha256"
    manifest = json.loads((blobs / index["manifests"][0]["digest"][7:]).read_bytes())
    manifest["layers"][0]["annotations"][TOC_DIGEST_ANNOTATION] = "sha256:" + "0" * 64
    data = json.dumps(manifest).encode()
    digest = hashlib.sha256(data).hexdigest()
    (blobs / digest).write_bytes(data)
    index["manifests"][0].update(digest=f"sha256:{digest}", size=len(data))
    (out / "index.json").write_text(json.dumps(index))
    return out


@needs_containerd
def test_remote_layer_from_cri_labels(sn: Snapshotter, lazy_image: tuple[str, list]) -> None:
    """CRI labels: the layer is mounted, committed under the target with the remote label, ALREADY_EXISTS
    answered; a second Prepare of the target finds it; Remove unmounts it."""
    image, layers = lazy_image
    target = "sha256:" + "1" * 64
    labels = _layer_labels(image, layers[0], target)
    assert grpc_code(lambda: sn.prepare("ns/1/extract-1 " + target, "", labels)) == \
        grpc.StatusCode.ALREADY_EXISTS
    info = sn.stat(target)
    assert (info.kind, info.parent, info.labels[snapshot_grpc.REMOTE_LABEL]) == \
        (pb.COMMITTED, "", "remote snapshot")
    assert sn.walk(f'labels."containerd.io/snapshot.ref"=={target},parent==""') == [info]
    assert grpc_code(lambda: sn.stat("ns/1/extract-1 " + target)) == grpc.StatusCode.NOT_FOUND
    assert grpc_code(lambda: sn.prepare("ns2/7/extract-2 " + target, "", labels)) == \
        grpc.StatusCode.ALREADY_EXISTS
    assert 'remote-snapshot-prepared: true reason="mounted lazily"' in sn.log()
    mounts = served_layers(sn)
    assert len(mounts) == 1
    with mounted(sn.view("v", target), sn.root.parent / "view") as view:
        assert (view / "hello.txt").exists() is False  # the bottom layer only
        assert (view / "bin" / "sh").is_file() or (view / "usr" / "bin" / "sh").is_file()
    sn.remove("v")
    sn.remove(target)
    assert served_layers(sn) == {}
    assert not any((sn.root / "snapshots").iterdir())


@needs_containerd
def test_remote_layers_share_one_daemon(sn: Snapshotter, lazy_image: tuple[str, list]) -> None:
    """Every lazily prepared layer is served by one daemon process from one FUSE mount; that daemon
    killed, it is started again (at the latest by the next Mounts call) and serves every layer (never a
    hung mount)."""
    image, layers = lazy_image
    parent = ""
    for i, digest in enumerate(layers):
        target = f"sha256:{i + 10:064x}"
        labels = _layer_labels(image, digest, target)
        key = f"ns/1/extract-{i} {target}"
        with pytest.raises(grpc.RpcError) as raised:
            sn.prepare(key, parent, labels)
        assert raised.value.code() == grpc.StatusCode.ALREADY_EXISTS
        parent = target
    served = served_layers(sn)
    assert len(served) == len(layers) == 2
    assert layer_daemons(sn) == sorted(set(served.values())), "one daemon serves every layer"
    assert _fuse_mounts(sn) == [str(sn.root / "layers")]
    sn.prepare("container", parent)

    (pid,) = set(served.values())
    os.kill(pid, signal.SIGKILL)
    mounts = sn.stub.Mounts(pb.MountsRequest(key="container")).mounts
    restored = served_layers(sn)
    assert set(restored) == set(served) and len(set(restored.values())) == 1 and pid not in restored.values()
    assert _fuse_mounts(sn) == [str(sn.root / "layers")]
    with mounted(list(mounts), sn.root.parent / "container") as rootfs:
        assert (rootfs / "hello.txt").read_text() == "hello from a lazymount snapshot\n"


@needs_containerd
def test_remote_declines_fall_back_to_overlay(sn: Snapshotter, estargz_layout: Path, lazy_image: tuple,
                                              registry: Registry, tmp_path: Path) -> None:
    """TOC digest mismatch, registry unreachable or ignoring Range: ordinary mounts, reason logged."""
    image, layers = lazy_image
    bad = _with_bad_toc_digest(estargz_layout, tmp_path / "bad-toc")
    push_layout(bad, "v1", registry, "bad/toc")
    proxy = FaultProxy(registry.host).add(Fault("ignore_range", times=-1))
    closed_port = free_port()
    cases = [
        (f"{registry.host}/bad/toc:v1", "mount failed: TOC digest"),
        (f"127.0.0.1:{closed_port}/lazy/shell:v1", "registry unreachable"),
        (f"{proxy.host}/lazy/shell:v1", "registry ignores Range requests"),
    ]
    try:
        for i, (reference, reason) in enumerate(cases):
            target = f"sha256:{i:064x}"
            mounts = sn.prepare(f"ns/{i}/extract-{i}", "", _layer_labels(reference, layers[0], target))
            assert [m.type for m in mounts] == ["bind"]
            assert sn.stat(f"ns/{i}/extract-{i}").kind == pb.ACTIVE
            assert f'remote-snapshot-prepared: false reason="{reason}' in sn.log(), reason
    finally:
        proxy.stop()
    assert served_layers(sn) == {}


@needs_containerd
def test_remote_declined_without_fuse(tmp_path: Path, lazy_image: tuple[str, list]) -> None:
    """No usable libfuse in the snapshotter: eStargz layers are declined, the snapshotter still works."""
    env = dict(os.environ, FUSE_LIBRARY_PATH=str(tmp_path / "no-libfuse.so"))
    daemon = Snapshotter(tmp_path / "root", tmp_path / "sn.sock", env=env).start()
    try:
        image, layers = lazy_image
        mounts = daemon.prepare("ns/1/extract-1", "", _layer_labels(image, layers[0], "sha256:" + "2" * 64))
        assert [m.type for m in mounts] == ["bind"]
        assert 'remote-snapshot-prepared: false reason="lazy mount unavailable: OSError' in daemon.log()
    finally:
        daemon.stop()
