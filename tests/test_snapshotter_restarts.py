"""The snapshotter and its layer daemon dying under load, with a private containerd 1.6 + runc.

Socket activation (the test holds the listening socket, as systemd does) carries containerd's calls
over a snapshotter restart; a snapshotter killed during a pull and while a container reads its files
leaves the container reading and every committed snapshot listed; a killed layer daemon is started
again at once, the health service says NOT_SERVING meanwhile, and /metrics counts it.  The harness
(Snapshotter, snapshotter_stack, the shell image) is tests/test_snapshotter.py's.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from imagebuild import make_oci_image
from tests.reference import Containerd
from tests.registry import Registry, push_layout
from tests.test_snapshotter import (
    MISSING,
    REPO,
    _shell_tree,
    build_shell_image,
    snapshotter_stack,
)

pytestmark = [pytest.mark.skipif(os.geteuid() != 0, reason="mounts overlayfs and FUSE: needs root"),
              pytest.mark.skipif(bool(MISSING), reason=f"not installed: {', '.join(MISSING)}")]

FILES = 150  # files per data layer
WAIT = 120.0  # seconds a command may take on a loaded machine


def _data_image(work: Path, name: str) -> Path:
    """A 3-layer eStargz OCI layout (tag v1): /bin/sh and its libraries, then /data/a/0..FILES-1, then
    /data/b/0..FILES-1, each file one line naming itself."""
    trees = [_shell_tree(work / "tree0")]
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
def data_images(tmp_path_factory: pytest.TempPathFactory, registry: Registry) -> dict[str, str]:
    """Two different 3-layer eStargz images pushed: {"first": reference, "second": reference}."""
    images = {}
    for name in ("first", "second"):
        layout = _data_image(tmp_path_factory.mktemp(name), name)
        push_layout(layout, "v1", registry, f"data/{name}")
        images[name] = f"{registry.host}/data/{name}:v1"
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


def _listener(path: Path) -> socket.socket:
    """A listening unix socket at `path`, as systemd's lazymount-snapshotter.socket makes it."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen(128)
    return sock


def test_socket_activation_carries_calls_over_a_restart(tmp_path: Path, shell_image: Path,
                                                        registry: Registry, data_images: dict) -> None:
    """LISTEN_FDS: the snapshotter killed, a pull and a container started, the snapshotter started again
    3 s later on the same socket: both commands succeed (containerd's calls waited on the socket)."""
    base = tmp_path / "ctd"
    base.mkdir()
    listener = _listener(base / "sn.sock")
    try:
        with snapshotter_stack(base, listener=listener) as (containerd, daemon):
            assert "the socket systemd passed" in daemon.log()
            push_layout(shell_image, "v1", registry, "activation/shell")
            plain = f"{registry.host}/activation/shell:v1"
            containerd.ctr_remote("images", "rpull", "--plain-http", "--snapshotter", "lazymount",
                                  data_images["first"])
            daemon.stop(signal.SIGKILL)
            pull = _popen(containerd, "ctr-remote", "images", "rpull", "--plain-http", "--snapshotter",
                          "lazymount", plain)
            run = _popen(containerd, "ctr", "run", "--snapshotter", "lazymount", "--rm", data_images["first"],
                       "during-outage", "/bin/sh", "-c", "read line < /data/b/7; echo $line")
            time.sleep(3)
            assert pull.poll() is None and run.poll() is None, (_finish(pull), _finish(run))
            daemon.start()
            status, out = _finish(pull)
            assert status == 0, out
            assert _finish(run) == (0, "first b/7\n")
    finally:
        listener.close()
