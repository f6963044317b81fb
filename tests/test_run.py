"""`lazymount run`, `shell`, `mount` and `umount` as a real unprivileged user: only setuid fusermount3
and bubblewrap, images pulled lazily from docker-registry on loopback.

The images are made from the host's own files, so the tests need no network: a small Debian root
filesystem (imagebuild.debian_python_rootfs), and images of Debian's static busybox with no mount point
at all: `FROM scratch` with the one binary, a busybox image converted by `ctr-remote` holding only /bin
and /data, one without /etc (merged /usr, a numeric user), one whose /bin/sh and /etc/passwd are
dangling symlinks.  A root fixture creates the user `lazytest` if absent (and removes it only then) and
opens /dev/fuse to it for the duration of the module (it is 0600 on these machines), restoring its mode
afterwards.  Commands run in the user's home unless a test says otherwise.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pwd
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from imagebuild import debian_python_rootfs, make_oci_image
from tests.reference import Containerd, mounts_under, ref_convert
from tests.registry import Registry, push_layout
from tests.test_mount import MISSING, REPO, convert, force_unmount, mounted
from tests.users import fuse_user

USER = "lazytest"
BUSYBOX = Path("/bin/busybox")  # Debian's busybox-static: one static binary
APPLETS = ("sh", "cat", "echo", "env", "id", "ls", "md5sum", "pwd", "test", "touch")

pytestmark = [
    pytest.mark.skipif(bool(MISSING) or shutil.which("bwrap") is None or os.geteuid() != 0
                       or not BUSYBOX.is_file(),
                       reason=f"needs root to set up, bwrap, busybox-static and "
                              f"{', '.join(MISSING) or 'the test tools'}"),
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


def _busybox_tree(root: Path, bin_dir: str = "bin") -> Path:
    """`bin_dir`/busybox and its applets APPLETS as hardlinks (as the busybox image has them)."""
    (root / bin_dir).mkdir(parents=True)
    shutil.copy2(BUSYBOX, root / bin_dir / "busybox")
    for applet in APPLETS:
        os.link(root / bin_dir / "busybox", root / bin_dir / applet)
    return root


def _push(work: Path, registry: Registry, name: str, tree: Path, *config: str) -> str:
    """The image of one layer `tree` with umoci `config` options, converted by lazymount and pushed."""
    layout = make_oci_image(work / "src", "v1", [tree])
    if config:
        subprocess.run(["umoci", "config", "--image", f"{layout}:v1", *config], check=True)
    convert(layout, work / "conv", "v1")
    push_layout(work / "conv", "v1", registry, name)
    return f"{registry.host}/{name}:v1"


@pytest.fixture(scope="module")
def scratch_image(tmp_path_factory: pytest.TempPathFactory, registry: Registry) -> str:
    """FROM scratch with one static binary, /busybox, as the Entrypoint."""
    work = tmp_path_factory.mktemp("scratch")
    (work / "tree").mkdir()
    shutil.copy2(BUSYBOX, work / "tree" / "busybox")
    return _push(work, registry, "scratch", work / "tree", "--config.entrypoint", "/busybox",
                 "--config.cmd", "echo", "--config.cmd", "hello from scratch")


@pytest.fixture(scope="module")
def ctr_remote_busybox(tmp_path_factory: pytest.TempPathFactory, registry: Registry,
                       containerd: Containerd) -> str:
    """A busybox image holding only /bin and /data (f1.txt ... f50.txt), converted by ctr-remote."""
    work = tmp_path_factory.mktemp("busybox")
    tree = _busybox_tree(work / "tree")
    (tree / "data").mkdir()
    for i in range(1, 51):
        (tree / "data" / f"f{i}.txt").write_text(f"file {i}\n")
    layout = make_oci_image(work / "src", "v1", [tree])
    ref_convert(containerd, layout, "v1", work / "conv")
    push_layout(work / "conv", "v1", registry, "busybox")
    return f"{registry.host}/busybox:v1"


@pytest.fixture(scope="module")
def no_etc_image(tmp_path_factory: pytest.TempPathFactory, registry: Registry) -> str:
    """No /etc, /proc, /dev, /tmp: /bin a symlink to usr/bin (merged /usr), User 1000:1000 that no file
    names, WorkingDir /usr, Env GREETING."""
    work = tmp_path_factory.mktemp("no-etc")
    tree = _busybox_tree(work / "tree", "usr/bin")
    os.symlink("usr/bin", tree / "bin")
    return _push(work, registry, "no-etc", tree, "--config.user", "1000:1000", "--config.workingdir", "/usr",
                 "--config.env", "GREETING=from the image")


@pytest.fixture(scope="module")
def broken_image(tmp_path_factory: pytest.TempPathFactory, registry: Registry) -> str:
    """/bin/busybox alone, /bin/sh and /etc/passwd dangling symlinks, Cmd /bin/sh -c ..."""
    work = tmp_path_factory.mktemp("broken")
    tree = work / "tree"
    (tree / "bin").mkdir(parents=True)
    (tree / "etc").mkdir()
    shutil.copy2(BUSYBOX, tree / "bin" / "busybox")
    os.symlink("/bin/no-such-shell", tree / "bin" / "sh")
    os.symlink("../nowhere/passwd", tree / "etc" / "passwd")
    return _push(work, registry, "broken", tree, "--config.cmd", "/bin/sh", "--config.cmd", "-c",
                 "--config.cmd", "echo never")


def _user_env(home: Path, **extra: str) -> dict[str, str]:
    """The test user's environment, with its temp dir (where `run` mounts) at `home`/tmp."""
    tmp = home / "tmp"
    if not tmp.exists():
        tmp.mkdir()
        os.chown(tmp, pwd.getpwnam(USER).pw_uid, -1)
    return {"HOME": str(home), "PATH": os.environ["PATH"], "LANG": "C.UTF-8", "TMPDIR": str(tmp), **extra}


def _as_user_argv(*args: str) -> list[str]:
    """lazymount ARGS as the test user (runuser -m: with the environment given, HOME included)."""
    return ["runuser", "-m", "-u", USER, "--", sys.executable, str(REPO / "lazymount.py"), *args]


def _as_user(home: Path, *args: str, cwd: Path | None = None, stdin: str | None = None,
             **env: str) -> subprocess.CompletedProcess:
    """Run lazymount as the test user (see _user_env, `env` added) in `cwd` (default: `home`)."""
    return subprocess.run(_as_user_argv(*args), capture_output=True, text=True, timeout=300,
                          env=_user_env(home, **env), cwd=cwd or home, input=stdin)


def _user_dir(prefix: str) -> Path:
    """A new directory in /tmp owned by the test user (removed by the caller)."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    os.chown(path, pwd.getpwnam(USER).pw_uid, -1)
    return path


def test_run_shell_and_python_as_user(debian_image: str, user_home: Path) -> None:
    """Output and exit codes pass through; the image's Env, WorkingDir (asked for) and User apply;
    nothing stays mounted afterwards."""
    cache = ("--cache-dir", str(user_home / "cache"))
    result = _as_user(user_home, "run", *cache, debian_image, "--", "/bin/sh", "-c", "echo ok; exit 7")
    assert (result.returncode, result.stdout, result.stderr) == (7, "ok\n", "")
    result = _as_user(user_home, "run", *cache, "--workdir-from-image", debian_image, "--", "python3",
                      "hello.py", "3")
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


def test_images_without_mount_points_run(scratch_image: str, ctr_remote_busybox: str, no_etc_image: str,
                                         user_home: Path) -> None:
    """FROM scratch with one static binary, ctr-remote's busybox (only /bin and /data) and an image
    without /etc run with /proc, /dev, /sys (read-only), /tmp and the host's resolv.conf; exit codes pass
    through; the mount of such an image stays as it is, read-only."""
    cache = ("--cache-dir", str(user_home / "cache"))
    result = _as_user(user_home, "run", *cache, scratch_image)  # Entrypoint + Cmd
    assert (result.returncode, result.stdout, result.stderr) == (0, "hello from scratch\n", "")
    result = _as_user(user_home, "run", *cache, scratch_image, "--", "/busybox", "sh", "-c", "exit 9")
    assert (result.returncode, result.stderr) == (9, "")
    result = _as_user(user_home, "run", *cache, ctr_remote_busybox, "--", "/bin/cat", "/data/f42.txt")
    assert (result.returncode, result.stdout, result.stderr) == (0, "file 42\n", "")
    checks = ("id -u; id -g; echo $GREETING; pwd; test -e /proc/self/status && test -c /dev/null "
              "&& touch /tmp/x && ! touch /sys/x 2>/dev/null && test -s /etc/resolv.conf && echo ok; exit 6")
    result = _as_user(user_home, "run", *cache, "--contain", no_etc_image, "--", "sh", "-c", checks)
    expected = "1000\n1000\nfrom the image\n/usr\nok\n"
    assert (result.returncode, result.stdout, result.stderr) == (6, expected, "")
    mnt = _user_dir("lazymount-mnt-")
    try:
        with mounted(ctr_remote_busybox, mnt, *cache, env=_user_env(user_home), user=USER):
            listing = subprocess.run(["runuser", "-u", USER, "--", "ls", "-A", str(mnt)], capture_output=True,
                                     text=True, check=True)
            assert listing.stdout.split() == ["bin", "data"]
            line = next(x for x in Path("/proc/self/mountinfo").read_text().splitlines() if f" {mnt} " in x)
            assert "ro" in line.split()[5].split(",")
    finally:
        mnt.rmdir()


def test_optimize_workload_in_busybox_says_why(ctr_remote_busybox: str, user_home: Path) -> None:
    """`optimize --workload` runs in an image without mount points; when the workload fails, the error
    says why (the last line of its stderr), in one line after the workload's own stderr."""
    cache = ("--cache-dir", str(user_home / "cache"))
    dst = f"oci:{user_home}/optimized:v1"
    result = _as_user(user_home, "optimize", "-q", *cache, "--workload", "/bin/cat /data/f42.txt",
                      ctr_remote_busybox, dst)
    assert result.returncode == 0, result.stderr
    result = _as_user(user_home, "optimize", "-q", *cache, "--workload", "/bin/cat /data/none",
                      ctr_remote_busybox, dst)
    reason = "cat: can't open '/data/none': No such file or directory"
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1] == (f"lazymount: error: the workload exited with status 1 "
                                              f"({reason}); {ctr_remote_busybox} was not optimized")


def test_shell_and_errors_name_the_cause(broken_image: str, debian_image: str, no_etc_image: str,
                                         user_home: Path) -> None:
    """`shell` starts $SHELL if the image has it, else /bin/sh; a missing shell or command, and a refusal
    of bubblewrap's, is one line naming it; a dangling /etc/passwd is no /etc/passwd."""
    cache = ("--cache-dir", str(user_home / "cache"))
    script = 'echo "$0 $PS1"; exit 3\n'
    result = _as_user(user_home, "shell", *cache, debian_image, stdin=script, SHELL="/bin/dash")
    assert (result.returncode, result.stdout, result.stderr) == (3, "/bin/dash lazymount> \n", "")
    result = _as_user(user_home, "shell", *cache, no_etc_image, stdin=script, SHELL="/bin/bash")
    assert (result.returncode, result.stdout, result.stderr) == (3, "/bin/sh lazymount> \n", "")
    for args, error in (
            (["shell", broken_image], "image has no /bin/sh"),
            (["run", broken_image], "command not found in the image: /bin/sh"),
            (["run", broken_image, "--", "ls"], "command not found in the image: ls"),
            (["run", "--bind", "/nonexistent/x:/x", broken_image, "--", "/bin/busybox", "true"],
             "--bind '/nonexistent/x:/x': /nonexistent/x does not exist")):
        result = _as_user(user_home, *args[:1], *cache, *args[1:])
        assert (result.returncode, result.stdout, result.stderr) == (1, "", f"lazymount: error: {error}\n")
    result = _as_user(user_home, "run", *cache, broken_image, "--", "/bin/busybox", "id", "-u")
    assert (result.returncode, result.stdout, result.stderr) == (0, "0\n", "")
    result = _as_user(user_home, "run", *cache, "--pwd", "/nonexistent", broken_image, "--", "/bin/busybox")
    assert result.returncode == 1 and result.stderr.startswith("bwrap: ") and result.stderr.count("\n") == 1


def test_apptainer_defaults_and_options(no_etc_image: str, user_home: Path) -> None:
    """Home and the current directory are bound and the command starts in the latter, unless --contain;
    TERM, LANG and proxy variables pass unless --cleanenv; --env over --env-file over the image's Env;
    --pwd; --workdir-from-image; --bind SRC:DST:ro is read-only, SRC:DST writable."""
    cache = ("--cache-dir", str(user_home / "cache"))
    here = _user_dir("lazymount-cwd-")
    try:
        (user_home / "h.txt").write_text("in home\n")
        (here / "c.txt").write_text("in cwd\n")
        env_file = here / "env"
        env_file.write_text("# comment\nGREETING=from the file\nA=file\nB=file\n")
        host_env = {"TERM": "xterm-test", "http_proxy": "http://proxy:3128", "NO_PROXY": "localhost",
                    "LC_TIME": "C", "SECRET": "not passed"}
        show = ('pwd; cat "$HOME/h.txt" c.txt 2>&1; echo "$HOME|$TERM|$http_proxy|$NO_PROXY|$LC_TIME|'
                '${SECRET-unset}|$GREETING|${A-}|${B-}"')

        def run(*options: str) -> list[str]:
            result = _as_user(user_home, "run", *cache, *options, no_etc_image, "--", "sh", "-c", show,
                              cwd=here, **host_env)
            assert result.returncode == 0, result.stderr
            return result.stdout.splitlines()

        passed = "xterm-test|http://proxy:3128|localhost|C|unset"
        assert run() == [str(here), "in home", "in cwd", f"{user_home}|{passed}|from the image||"]
        contained = run("--contain")
        assert contained[0] == "/usr" and "in home" not in contained and "in cwd" not in contained
        assert contained[-1] == f"/|{passed}|from the image||"
        assert run("--cleanenv")[-1] == f"{user_home}|||||unset|from the image||"
        over = run("--env-file", str(env_file), "--env", "B=cli")
        assert over[-1] == f"{user_home}|{passed}|from the file|file|cli"
        assert run("--pwd", "/tmp")[0] == "/tmp"
        assert run("--workdir-from-image")[0] == "/usr"

        shared = _user_dir("lazymount-bind-")
        try:
            write = "echo new > /srv/ro/a; echo $?; echo new > /opt/rw/b && echo $?; cat /usr/share/data/c"
            (shared / "c").write_text("bound in an image directory\n")
            result = _as_user(user_home, "run", *cache, "--bind", f"{shared}:/srv/ro:ro", "--bind",
                              f"{shared}:/opt/rw", "--bind", f"{shared}:/usr/share/data", no_etc_image,
                              "--", "sh", "-c", write)
            assert result.stdout == "1\n0\nbound in an image directory\n", result.stderr
            assert "Read-only file system" in result.stderr
            assert (shared / "b").read_text() == "new\n" and not (shared / "a").exists()
        finally:
            shutil.rmtree(shared)
    finally:
        shutil.rmtree(here)


def test_nv_binds_the_fake_driver(no_etc_image: str, user_home: Path) -> None:
    """--nv with a fake driver tree (LAZYMOUNT_NV_ROOT): libraries named like the driver's in its ld.so
    cache (built with ldconfig) are in /.lazymount/nvlibs, on LD_LIBRARY_PATH, with their content; others
    are not; nvidia-smi is on PATH; the /dev/nvidia* device nodes exist."""
    root = Path(tempfile.mkdtemp(prefix="lazymount-nv-", dir="/tmp"))
    try:
        os.chmod(root, 0o755)
        libs = root / "usr/lib/x86_64-linux-gnu"
        libs.mkdir(parents=True)
        (root / "etc").mkdir()
        (root / "etc/ld.so.conf").write_text("/usr/lib/x86_64-linux-gnu\n")
        subprocess.run(["as", "-o", str(root / "empty.o"), "/dev/null"], check=True)
        for name in ("libcuda.so.1", "libnvidia-ml.so.1", "libnotnvidia.so.1"):
            subprocess.run(["ld", "-shared", "-soname", name, "-o", str(libs / name), str(root / "empty.o")],
                           check=True)
        subprocess.run(["ldconfig", "-r", str(root), "-X"], check=True)
        (root / "usr/bin").mkdir()
        (root / "usr/bin/nvidia-smi").write_text("#!/bin/sh\necho fake nvidia-smi\n")
        (root / "usr/bin/nvidia-smi").chmod(0o755)
        (root / "dev").mkdir()
        os.mknod(root / "dev/nvidia0", 0o666 | stat.S_IFCHR, os.makedev(195, 0))
        os.mknod(root / "dev/nvidiactl", 0o666 | stat.S_IFCHR, os.makedev(195, 255))
        script = ("ls /.lazymount/nvlibs; echo $LD_LIBRARY_PATH; md5sum /.lazymount/nvlibs/libcuda.so.1; "
                  "nvidia-smi; test -c /dev/nvidia0 && test -c /dev/nvidiactl && echo devices")
        result = _as_user(user_home, "run", "--cache-dir", str(user_home / "cache"), "--nv", no_etc_image,
                          "--", "sh", "-c", script, LAZYMOUNT_NV_ROOT=str(root))
        digest = hashlib.md5((libs / "libcuda.so.1").read_bytes()).hexdigest()
        assert result.stdout.splitlines() == [
            "libcuda.so.1", "libnvidia-ml.so.1", "/.lazymount/nvlibs",
            f"{digest}  /.lazymount/nvlibs/libcuda.so.1", "fake nvidia-smi", "devices"], result.stderr
    finally:
        shutil.rmtree(root)


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


def _start_run(home: Path, image: str, script: str) -> subprocess.Popen:
    """`lazymount run IMAGE -- /bin/sh -c SCRIPT` as the test user, stdin and stdout pipes."""
    argv = _as_user_argv("run", "--cache-dir", str(home / "cache"), image, "--", "/bin/sh", "-c", script)
    return subprocess.Popen(argv, env=_user_env(home), cwd=home, text=True, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE)


def _child(pid: int) -> int:
    """The child of `pid` (runuser's: lazymount), waiting for it to be started."""
    deadline = time.monotonic() + 10
    while True:
        found = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
        if found or time.monotonic() > deadline:
            return int(found[0])
        time.sleep(0.001)


def _descendants(pid: int) -> set[int]:
    """The processes below `pid` (from /proc), that is lazymount's command (its daemon double-forked)."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rpartition(")")[2].split()[1])
            except (OSError, IndexError):
                continue
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] not in ("Z", "X")
    except OSError:
        return False


def _assert_cleaned_up(tmp: Path) -> None:
    """No mount and no `lazymount-run-*` dir left in `tmp` (a daemon stopped while starting may take a
    moment to find that out)."""
    deadline = time.monotonic() + 10
    while (mounts_under(tmp) or list(tmp.iterdir())) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert mounts_under(tmp) == []
    assert list(tmp.iterdir()) == []


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_run_stopped_by_signal_cleans_up(debian_image: str, user_home: Path, sig: signal.Signals) -> None:
    """SIGTERM or SIGHUP to `lazymount run` while its command runs (a shell waiting in `read` on a pipe
    the test holds open) ends it like Ctrl-C: the command is killed, the mount and its temp dir are gone,
    the exit status is 128 + the signal."""
    tmp = user_home / "tmp"
    run = _start_run(user_home, debian_image, "echo started; read -r line; echo never")
    try:
        assert run.stdout.readline() == "started\n"  # mounted, and the command runs
        assert len(mounts_under(tmp)) == 1
        lazymount_pid = _child(run.pid)
        command = _descendants(lazymount_pid)
        assert command and all(_alive(pid) for pid in command)
        os.kill(lazymount_pid, sig)
        assert run.wait(timeout=60) == 128 + sig
        assert run.stdout.read() == ""
        deadline = time.monotonic() + 10
        while any(_alive(pid) for pid in command) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(_alive(pid) for pid in command)
    finally:
        run.kill()
        run.stdin.close()
        for point in mounts_under(tmp):
            force_unmount(Path(point), None)
    _assert_cleaned_up(tmp)


@pytest.mark.parametrize("when", ["mounting", "cleaning-up"])
def test_signals_while_mounting_or_cleaning_up(debian_image: str, user_home: Path, when: str) -> None:
    """SIGTERM while the mount is still being set up, or a stream of them from the moment the command
    (which exits at once) has started until `run` is gone: the mount and its temp dir are removed all the
    same (only the first signal stops anything; later ones cannot cut the clean-up short)."""
    tmp = user_home / "tmp"
    run = _start_run(user_home, debian_image, "echo started; exit 3")
    try:
        lazymount_pid = _child(run.pid)
        if when == "mounting":
            while not list(tmp.glob("lazymount-run-*/mnt")) and run.poll() is None:
                time.sleep(0.001)
            os.kill(lazymount_pid, signal.SIGTERM)
            assert run.wait(timeout=60) in (3, 128 + signal.SIGTERM)
        else:
            assert run.stdout.readline() == "started\n"
            with contextlib.suppress(ProcessLookupError):  # until lazymount is gone
                while run.poll() is None:
                    os.kill(lazymount_pid, signal.SIGTERM)
                    time.sleep(0.002)
            assert run.wait(timeout=60) in (3, 128 + signal.SIGTERM)
    finally:
        run.kill()
        run.stdin.close()
    _assert_cleaned_up(tmp)
