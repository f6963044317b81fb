"""`lazymount run` on an overlay of the prefetched files, copied to local disk, over the mount (issue 16).

An image of two layers, optimized with a profile so that its lower layer's landmark range holds some of
its files and its upper layer's one file: the upper layer shadows a profiled file of the lower layer and
whites out another, and some files are not profiled at all (served by the mount under the overlay).  The
command lists /app inside the sandbox (types, modes, sizes, mtimes, symlink targets, SHA-256 of each
regular file; owners when run as root) with and without the overlay; the listings must be equal, and
the mount table inside says whether the overlay was there.  Runs as root and as the unprivileged user of
tests/test_run.py, with docker-registry on loopback, fuse3 and bubblewrap.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from imagebuild import make_oci_image
from tests.reference import mounts_under, read_layout
from tests.registry import Registry, push_layout
from tests.test_mount import REPO
from tests.test_run import (
    USER,
    _as_user,
    _as_user_argv,
    _assert_cleaned_up,
    _busybox_tree,
    _child,
    _user_env,
    pytestmark,  # noqa: F401 -- the same requirements
)
from tests.users import fuse_user

PROFILED_LOWER = ("app/keep.py", "app/exec.sh", "app/sub/data.bin", "app/ro/inro.txt", "app/empty",
                  "app/shadowed.txt", "app/gone.txt")  # the last two: shadowed and whited out above
PROFILED_UPPER = ("app/upper.txt",)
# the profiled files that the merged view shows from the layer that profiled them, but app/empty: a
# file without data has none in the landmark range
COPIED = 5
# every entry under /app, sorted: name, type, mode, size (not a directory's: its file system's), mtime
# (owner with {owner}), then a symlink's
# target or a regular file's SHA-256; and how many overlay mounts the sandbox has
LISTING = ("cd /app && busybox find . | busybox sort | while read -r p; do size=' %s'; "
           "if [ -d \"$p\" ]; then size=; fi; busybox stat -c \"%n %F %a$size %Y{owner}\" \"$p\"; "
           "if [ -L \"$p\" ]; then busybox readlink \"$p\"; "
           "elif [ -f \"$p\" ]; then busybox sha256sum \"$p\"; fi; done; "
           "echo overlays $(busybox grep -c ' - overlay ' /proc/self/mountinfo)")


@pytest.fixture(scope="module")
def user_home() -> Iterator[Path]:
    """A home directory owned by the unprivileged test user, who may use /dev/fuse meanwhile."""
    with fuse_user(USER, Path("/tmp")) as (_, home):
        yield home


def _trees(work: Path) -> tuple[Path, Path]:
    """The lower and the upper layer's trees (each a whole root file system, as make_oci_image wants)."""
    lower = _busybox_tree(work / "lower")
    app = lower / "app"
    (app / "sub").mkdir(parents=True)
    (app / "ro").mkdir()
    (app / "keep.py").write_text("print('kept')\n")
    (app / "exec.sh").write_text("#!/bin/sh\necho run\n")
    (app / "exec.sh").chmod(0o755)
    (app / "sub/data.bin").write_bytes(os.urandom(300_000))  # several 64 KiB chunks
    (app / "ro/inro.txt").write_text("in a read-only directory\n")
    (app / "empty").touch()
    (app / "shadowed.txt").write_text("lower version\n")
    (app / "gone.txt").write_text("whited out above\n")
    (app / "notcopied.txt").write_text("never profiled: read through the mount\n")
    os.symlink("keep.py", app / "link")
    for i, path in enumerate(sorted(app.rglob("*"), reverse=True)):  # files before their directories
        os.utime(path, (1_600_000_000 + i, 1_600_000_000 + i), follow_symlinks=False)
    (app / "sub").chmod(0o750)
    (app / "ro").chmod(0o555)
    os.utime(app, (1_500_000_000, 1_500_000_000))
    upper = work / "upper"
    subprocess.run(["cp", "-a", str(lower), str(upper)], check=True)
    (upper / "app/gone.txt").unlink()
    (upper / "app/shadowed.txt").write_text("upper version\n")
    (upper / "app/upper.txt").write_text("only in the upper layer\n")
    os.utime(upper / "app", (1_550_000_000, 1_550_000_000))
    return lower, upper


@pytest.fixture(scope="module")
def profiled_image(tmp_path_factory: pytest.TempPathFactory, registry: Registry) -> str:
    """The two-layer image optimized with PROFILED_LOWER and PROFILED_UPPER, in the registry."""
    work = tmp_path_factory.mktemp("overlay-image")
    layout = make_oci_image(work / "src", "v1", list(_trees(work)))
    lower, upper = (descriptor["digest"] for _, descriptor in read_layout(layout, "v1")[2])
    profile = work / "profile"
    profile.write_text("".join(f"# layer {digest}\n" + "".join(f"{p}\n" for p in paths)
                               for digest, paths in ((lower, PROFILED_LOWER), (upper, PROFILED_UPPER))))
    subprocess.run([sys.executable, str(REPO / "lazymount.py"), "optimize", "-q", "--chunk-size", "64k",
                    "--profile", str(profile), f"oci:{layout}:v1", f"oci:{work}/opt:v1"], check=True)
    push_layout(work / "opt", "v1", registry, "profiled")
    return f"{registry.host}/profiled:v1"


def _listing(result: subprocess.CompletedProcess) -> tuple[list[str], int]:
    """The entries a LISTING printed and the number of overlays it counted."""
    assert result.returncode == 0, result.stderr
    *entries, overlays = result.stdout.splitlines()
    return entries, int(overlays.split()[1])


def _as_root(home: Path, *args: str) -> subprocess.CompletedProcess:
    """lazymount ARGS as root, its temp dir `home`/tmp."""
    (home / "tmp").mkdir(exist_ok=True)
    return subprocess.run([sys.executable, str(REPO / "lazymount.py"), *args], capture_output=True, text=True,
                          timeout=300, cwd=home, env={**_user_env(home), "HOME": str(home)})


@pytest.fixture
def root_home(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path
    assert mounts_under(tmp_path) == []


@pytest.mark.parametrize("who", ["user", "root"])
def test_overlay_shows_the_mounts_tree(profiled_image: str, user_home: Path, root_home: Path,
                                       who: str) -> None:
    """With the overlay (the default) the sandbox sees /app as the plain mount shows it: the upper
    layer's version of a shadowed file, no whited-out file, files not copied, modes and mtimes of files
    and directories (owners too as root); the overlay is there, holding the COPIED files, and nothing is
    left behind; with --no-overlay there is none."""
    home = user_home if who == "user" else root_home
    run = _as_user if who == "user" else _as_root
    listing = LISTING.format(owner=" %u:%g" if who == "root" else "")
    stats = home / "stats.json"
    cache = ("--cache-dir", str(home / "cache"), "--stats-file", str(stats), "--contain")
    plain, none = _listing(run(home, "run", *cache, "--no-overlay", profiled_image, "--", "sh", "-c",
                               listing))
    assert none == 0 and "local_copy" not in json.loads(stats.read_text())
    names = [line.split()[0] for line in plain if line.startswith("./")]
    assert "./upper.txt" in names and "./notcopied.txt" in names and "./gone.txt" not in names
    shutil.rmtree(home / "cache")
    for _ in ("cold", "warm"):  # the chunk cache empty, then filled by the first run
        entries, overlays = _listing(run(home, "run", *cache, profiled_image, "--", "sh", "-c", listing))
        assert overlays > 0 and entries == plain
        assert json.loads(stats.read_text())["local_copy"]["files"] == COPIED
    shadowed = run(home, "run", "--cache-dir", str(home / "cache"), profiled_image, "--", "busybox", "cat",
                   "/app/shadowed.txt", "/app/ro/inro.txt")
    assert shadowed.stdout == "upper version\nin a read-only directory\n", shadowed.stderr
    assert mounts_under(home) == [] and list((home / "tmp").iterdir()) == []


def test_failing_command_and_sigterm_clean_up(profiled_image: str, user_home: Path) -> None:
    """A command that fails, and SIGTERM while the command runs on the overlay: the exit status passes,
    the mount, the local copy (with its read-only directory) and the temp dir are gone."""
    tmp = user_home / "tmp"
    cache = ("--cache-dir", str(user_home / "cache"))
    result = _as_user(user_home, "run", *cache, profiled_image, "--", "sh", "-c",
                      "busybox grep -q ' - overlay ' /proc/self/mountinfo && exit 7")
    assert result.returncode == 7, result.stderr
    _assert_cleaned_up(tmp)
    argv = _as_user_argv("run", *cache, profiled_image, "--", "sh", "-c",
                         "busybox grep -c ' - overlay ' /proc/self/mountinfo; read -r line; echo never")
    run = subprocess.Popen(argv, env=_user_env(user_home), cwd=user_home, text=True, stdin=subprocess.PIPE,
                           stdout=subprocess.PIPE)
    try:
        assert int(run.stdout.readline()) > 0  # on the overlay, and the command runs
        assert list(tmp.glob("lazymount-run-*/local/app/ro/inro.txt"))
        os.kill(_child(run.pid), signal.SIGTERM)
        assert run.wait(timeout=60) == 128 + signal.SIGTERM
    finally:
        run.kill()
        run.stdin.close()
        run.stdout.close()
    _assert_cleaned_up(tmp)


@pytest.fixture
def stacked_tmp(user_home: Path) -> Iterator[Path]:
    """A temp dir for the test user on overlayfs stacked twice (an overlay whose lower directory is an
    overlay): the kernel refuses to stack a third (FILESYSTEM_MAX_STACK_DEPTH is 2)."""
    base = user_home / "stacked"
    for name in ("l1", "u1", "w1", "m1", "u2", "w2", "m2"):
        (base / name).mkdir(parents=True)
    mounted = []
    try:
        for lower, upper, work, point in (("l1", "u1", "w1", "m1"), ("m1", "u2", "w2", "m2")):
            subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                            f"lowerdir={base / lower},upperdir={base / upper},workdir={base / work}",
                            str(base / point)], check=True)
            mounted.append(base / point)
        tmp = base / "m2/tmp"
        tmp.mkdir()
        shutil.chown(tmp, USER)
        yield tmp
    finally:
        for point in reversed(mounted):
            subprocess.run(["umount", str(point)], check=False)
        shutil.rmtree(base)


def test_falls_back_where_overlayfs_cannot_be_mounted(profiled_image: str, user_home: Path,
                                                      stacked_tmp: Path) -> None:
    """With its temp dir on overlayfs stacked twice, `run` cannot mount its overlay (the kernel refuses):
    it says so at -v and shows the same tree through the mount alone."""
    listing = LISTING.format(owner="")
    cache = ("--cache-dir", str(user_home / "cache"), "--contain")
    plain, _ = _listing(_as_user(user_home, "run", *cache, "--no-overlay", profiled_image, "--", "sh", "-c",
                                 listing))
    result = _as_user(user_home, "-v", "run", *cache, profiled_image, "--", "sh", "-c", listing,
                      TMPDIR=str(stacked_tmp))
    assert _listing(result) == (plain, 0)
    assert "no overlay (the command reads the mount alone): mounting overlayfs: " in result.stderr
    _assert_cleaned_up(stacked_tmp)
