"""`lazymount run`, `mount` and `umount` as a real unprivileged user: only setuid fusermount3 and
bubblewrap, an image pulled lazily from docker-registry on loopback.

The image is a small Debian-based root filesystem made from the host's own files
(images.debian_python_rootfs), so the test needs no network.  A root fixture
creates the user `lazytest` if absent (and removes it only then) and opens /dev/fuse to it for the
duration of the module (it is 0600 on these machines), restoring its mode afterwards.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from imagebuild import debian_python_rootfs, make_oci_image
from tests.reference import mounts_under
from tests.registry import Registry, push_layout
from tests.test_mount import MISSING, REPO, convert, force_unmount, lazymount, mounted
from tests.users import fuse_user

USER = "lazytest"

pytestmark = [
    pytest.mark.skipif(bool(MISSING) or shutil.which("bwrap") is None or os.geteuid() != 0,
                       reason=f"needs root to set up, bwrap and {', '.join(MISSING) or 'the test tools'}"),
]


@pytest.fixture(scope="module")
def user_home() -> Iterator[Path]:
    """A home directory owned by the unprivileged test user, who may use /dev/fuse meanwhile."""
    with fuse_user(USER, Path("/tmp")) as (_, home):
        yield home


def _debian_rootfs(rootfs: Path) -> Path:
    """images.debian_python_rootfs plus /work/hello.py, which prints its cwd, uid and $GREETING."""
    debian_python_rootfs(rootfs)
    (rootfs / "work/hello.py").write_text(
        "import os, sys\nprint('py', os.getcwd(), os.getuid(), os.environ['GREETING'])\n"
        "sys.exit(int(sys.argv[1]))\n")
    return rootfs


@pytest.fixture(scope="module")
def debian_image(tmp_path_factory: pytest.TempPathFactory, registry: Registry) -> str:
    work = tmp_path_factory.mktemp("debian")
    layout = make_oci_image(work / "src", "v1", [_debian_rootfs(work / "rootfs")])
    subprocess.run(["umoci", "config", "--image", f"{layout}:v1", "--config.user", "tester",
                    "--config.workingdir", "/work", "--config.env", "PATH=/usr/bin:/bin",
                    "--config.env", "GREETING=hello from the image", "--config.cmd", "/bin/sh",
                    "--config.cmd", "-c", "--config.cmd", "echo default command"], check=True)
    convert(layout, work / "conv", "v1")
    push_layout(work / "conv", "v1", registry, "debian")
    return f"{registry.host}/debian:v1"


def _user_env(home: Path) -> dict[str, str]:
    """The test user's environment, with its temp dir (where `run` mounts) at `home`/tmp."""
    tmp = home / "tmp"
    if not tmp.exists():
        tmp.mkdir()
        os.chown(tmp, pwd.getpwnam(USER).pw_uid, -1)
    return {"HOME": str(home), "PATH": os.environ["PATH"], "LANG": "C.UTF-8", "TMPDIR": str(tmp)}


def _as_user(home: Path, *args: str) -> subprocess.CompletedProcess:
    """Run lazymount as the test user (see _user_env)."""
    return lazymount(*args, check=False, env=_user_env(home), user=USER)


def test_run_shell_and_python_as_user(debian_image: str, user_home: Path) -> None:
    """Output and exit codes pass through; the image's Env, WorkingDir and User apply; nothing stays
    mounted afterwards."""
    cache = ("--cache-dir", str(user_home / "cache"))
    result = _as_user(user_home, "run", *cache, debian_image, "--", "/bin/sh", "-c", "echo ok; exit 7")
    assert (result.returncode, result.stdout, result.stderr) == (7, "ok\n", "")
    result = _as_user(user_home, "run", *cache, debian_image, "--", "python3", "hello.py", "3")
    assert (result.returncode, result.stdout) == (3, "py /work 1000 hello from the image\n"), result.stderr
    result = _as_user(user_home, "run", *cache, debian_image)
    assert (result.returncode, result.stdout) == (0, "default command\n"), result.stderr
    shared = user_home / "shared"
    shared.mkdir()
    (shared / "in.txt").write_text("from the host\n")
    os.chown(shared, pwd.getpwnam(USER).pw_uid, -1)
    result = _as_user(user_home, "run", *cache, "--bind", f"{shared}:/home/tester", debian_image, "--",
                      "/bin/sh", "-c", 'read -r l </home/tester/in.txt && echo "$l" && test -w /tmp '
                      "&& test -e /proc/self/status")
    assert (result.returncode, result.stdout) == (0, "from the host\n"), result.stderr
    assert mounts_under(user_home) == []
    assert list((user_home / "tmp").iterdir()) == []  # every run's mount point removed


def test_mount_read_umount_as_user(debian_image: str, user_home: Path) -> None:
    mnt = user_home / "mnt"
    mnt.mkdir()
    os.chown(mnt, pwd.getpwnam(USER).pw_uid, -1)
    env = {"HOME": str(user_home), "PATH": os.environ["PATH"]}
    with mounted(debian_image, mnt, "--cache-dir", str(user_home / "cache"), env=env, user=USER):
        mountinfo = Path("/proc/self/mountinfo").read_text().splitlines()
        line = next(x for x in mountinfo if f" {mnt} " in x and "fuse.lazymount" in x)
        assert {"nosuid", "nodev", "ro"} <= set(line.split()[5].split(","))
        cat = subprocess.run(["runuser", "-u", USER, "--", "cat", str(mnt / "etc/passwd")],
                             capture_output=True, text=True, check=True)
        assert "tester:x:1000" in cat.stdout
        result = _as_user(user_home, "umount", str(mnt))
        assert result.returncode == 0, result.stderr
        assert not os.path.ismount(mnt)


def test_cli_reports_missing_image_in_one_line(registry: Registry, user_home: Path) -> None:
    result = _as_user(user_home, "run", "--cache-dir", str(user_home / "cache"), f"{registry.host}/nope:v1",
                      "--", "true")
    assert result.returncode == 1
    assert result.stderr.startswith("lazymount: error:") and len(result.stderr.splitlines()) == 1


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_run_stopped_by_signal_cleans_up(debian_image: str, user_home: Path, sig: signal.Signals) -> None:
    """SIGTERM or SIGHUP to `lazymount run` ends it like Ctrl-C: the command is killed, the mount and its
    temp dir are gone, the exit status is 128 + the signal."""
    env, tmp = _user_env(user_home), user_home / "tmp"
    run = subprocess.Popen(["runuser", "-u", USER, "--", sys.executable, str(REPO / "lazymount.py"), "run",
                            "--cache-dir", str(user_home / "cache"), debian_image, "--", "/bin/sh", "-c",
                            "echo started; exec sleep 600"], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert run.stdout.readline() == "started\n"  # mounted, and the command runs
        assert len(mounts_under(tmp)) == 1
        lazymount_pid = int(subprocess.run(["pgrep", "-P", str(run.pid)], capture_output=True, text=True,
                                           check=True).stdout.split()[0])
        os.kill(lazymount_pid, sig)
        assert run.wait(timeout=60) == 128 + sig
    finally:
        run.kill()
        for point in mounts_under(tmp):
            force_unmount(Path(point), None)
    assert mounts_under(tmp) == []
    assert list(tmp.iterdir()) == []
