"""Mount points and the daemons behind them, seen from outside: what a command or the snapshotter needs
to start a FUSE daemon, talk to it and stop it, without loading a FUSE library.

What belongs here: forking a daemon and waiting until its mount answers (with prefetch progress on a pipe),
unmounting (lazily when busy or dead) and waiting for the daemon to exit, reading /proc/self/mountinfo,
the virtual xattrs through which a mount answers (stats, image config, layer loading), and the spec files
through which the snapshotter hands layers to its layers daemon.  What never does: FUSE operations
(fusefs.py, layerfs.py), reading images (fetch.py, engine.py), gRPC (snapshot_grpc.py).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

import config
import convert
import toc

log = logging.getLogger("lazymount")

STATS_XATTR = "user.lazymount.stats"  # virtual, on the root directory, never listed
IMAGE_XATTR = "user.lazymount.image"  # the image's reference, digest and runtime config (Env, User...)
LAYER_XATTR = "user.lazymount.layer."  # + NAME, on a layers daemon's root: load (or forget) layer NAME
SPEC_SUFFIX = ".json"
UMOUNT_WAIT = 10.0  # seconds `umount` waits for the daemon to exit after the kernel let go
PROGRESS = "progress"  # the daemon's prefetch progress lines on its pipe: `progress DONE TOTAL`
TERMINATIONS = (signal.SIGTERM, signal.SIGHUP)
LAYER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,99}")

Server = Callable[[argparse.Namespace, Callable[[], None], Callable[[int, int], None] | None], None]


class MountError(toc.LazymountError):
    """A mount, unmount or run could not be done."""


def describe_os_error(e: OSError) -> str:
    """An OSError as one line: its message and the file it names."""
    return f"{e.strerror or e}{': ' + str(e.filename) if e.filename else ''}"


def _mountinfo() -> Iterator[tuple[bytes, str, str]]:
    """(mount point, `major:minor`, file system type) of every mount in /proc/self/mountinfo, in order."""
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            fields = line.split()
            # mountinfo escapes space, tab, newline and backslash as octal (\040 ...)
            point = re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m[1], 8)]), fields[4])
            yield point, fields[2].decode(), fields[fields.index(b"-") + 1].decode()


def mount_at(mountpoint: Path) -> tuple[str, str] | None:
    """(`major:minor`, file system type) of the mount on top at `mountpoint`, from /proc/self/mountinfo:
    a stat of the mount point would be a call to the file system, and our own waits for layers still
    being downloaded (a daemon asking itself would be left unkillable if killed meanwhile)."""
    target = os.fsencode(os.path.join(os.path.realpath(mountpoint.parent), mountpoint.name))
    found = None
    for point, device, fstype in _mountinfo():
        if point == target:
            found = device, fstype
    return found


def mounts_below(directory: Path) -> list[tuple[Path, str]]:
    """(mount point, file system type) of every mount strictly below `directory`."""
    prefix = os.fsencode(os.path.realpath(directory)) + b"/"
    return [(Path(os.fsdecode(point)), fstype) for point, _, fstype in _mountinfo()
            if point.startswith(prefix)]


def start_daemon(args: argparse.Namespace, serve: Server, own_session: bool = True) -> None:
    """Fork the daemon (before any thread exists) that runs `serve`, wait until its
    mount answers and the landmark ranges are prefetched (a progress bar on a terminal), or it fails.

    The daemon gets a session of its own, or with `own_session=False` (a mount that lives only as long
    as the command using it) just a process group of its own: the terminal's signals still miss it, and
    it stays in the caller's scheduler autogroup, where its nice-19 threads yield to the command
    instead of taking half a core from it as a separate group would."""
    for name in ("cache_dir", "config"):  # the daemon works from /
        if getattr(args, name, None):
            setattr(args, name, os.path.abspath(getattr(args, name)))
    if getattr(args, "image", None):
        args.image = config.absolute_reference(args.image)
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        code = 1
        # Until the mount answers, stderr (libfuse's and fusermount3's complaints) goes to a temp file
        # whose fuse lines explain a failure; afterwards to /dev/null.
        captured = tempfile.TemporaryFile()  # noqa: SIM115 -- lives as long as the daemon
        for sig in TERMINATIONS:  # not the caller's handlers (see _exit_on_termination)
            signal.signal(sig, signal.SIG_DFL)
        try:
            if own_session:
                os.setsid()
            else:
                os.setpgid(0, 0)
            if os.fork():
                os._exit(0)
            os.chdir("/")  # pin no directory of the caller's
            _redirect_to_null(0, 1)
            os.dup2(captured.fileno(), 2)

            def ready() -> None:
                try:
                    os.write(write_fd, b"ok\n")
                except BrokenPipeError:  # the caller was stopped: no one will use or unmount this mount
                    log.warning("the mount command is gone: unmounting %s", args.mountpoint)
                    subprocess.run(["fusermount3", "-u", "-z", str(args.mountpoint)], check=False)
                os.close(write_fd)
                _redirect_to_null(2)

            def progress(done: int, total: int) -> None:
                with contextlib.suppress(OSError):
                    os.write(write_fd, f"{PROGRESS} {done} {total}\n".encode())

            serve(args, ready, progress)
            code = 0
        except toc.LazymountError as e:
            with contextlib.suppress(OSError):
                os.write(write_fd, f"{e}{_fuse_complaints(captured)}\n".encode())
        except OSError as e:  # e.g. a --cache-dir that is a file or not writable
            with contextlib.suppress(OSError):
                os.write(write_fd, f"{describe_os_error(e)}\n".encode())
        except BaseException as e:  # noqa: BLE001 -- the daemon must report and exit, never return
            log.debug("daemon failed", exc_info=True)
            with contextlib.suppress(OSError):
                os.write(write_fd, f"internal error: {type(e).__name__}: {e}\n".encode())
        finally:
            logging.shutdown()
            os._exit(code)
    os.close(write_fd)
    os.waitpid(pid, 0)
    lines = []
    with os.fdopen(read_fd, "rb") as pipe, convert.progress_bar("prefetch") as bar:
        for raw in pipe:
            line = raw.decode(errors="replace").strip()
            if line.startswith(PROGRESS + " "):
                done, total = (int(n) for n in line.split()[1:3])
                bar.total = total
                bar.update(done - bar.n)
            else:
                lines.append(line)
    message = "; ".join(filter(None, lines))
    if message != "ok":
        raise MountError(message or "the mount daemon exited before mounting (try --foreground -v)")


def _fuse_complaints(captured: BinaryIO) -> str:
    """The lines libfuse or fusermount3 wrote to stderr, as a suffix for an error message."""
    captured.seek(0)
    lines = captured.read(1 << 16).decode(errors="replace").splitlines()
    lines = [line.strip() for line in lines if line.startswith(("fuse", "fusermount"))]
    return f" ({'; '.join(lines)})" if lines else ""


def _redirect_to_null(*fds: int) -> None:
    null = os.open(os.devnull, os.O_RDWR)
    for fd in fds:
        os.dup2(null, fd)
    os.close(null)


def daemon_pid(mountpoint: Path) -> int | None:
    try:
        return int(json.loads(os.getxattr(mountpoint, STATS_XATTR))["pid"])
    except (OSError, ValueError, KeyError):
        return None


def unmount(mountpoint: Path, wait: bool = True) -> None:
    """Unmount (lazily if busy or if the daemon died) and, with `wait`, wait a little for the daemon to
    exit (after a lazy unmount of a busy mount it serves its users until the last one goes)."""
    pid = daemon_pid(mountpoint)
    result = None
    for command in (["fusermount3", "-u", str(mountpoint)], ["fusermount3", "-u", "-z", str(mountpoint)]):
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode == 0:
            break
    else:
        raise MountError(f"cannot unmount {mountpoint}: {result.stderr.strip() if result else ''}")
    if wait and pid is not None and not _wait_exit(pid, UMOUNT_WAIT):
        # Unmounted, yet still there (a thread stuck in a call that never returns): a daemon whose mount
        # is gone has nothing left to do, so it is ended, politely first.
        log.warning("the daemon of %s (pid %d) did not exit after unmounting: stopping it", mountpoint, pid)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(OSError):
                os.kill(pid, sig)
            if _wait_exit(pid, 2.0):
                break


def _wait_exit(pid: int, seconds: float) -> bool:
    """Wait up to `seconds` for process `pid` to exit; whether it did."""
    deadline = time.monotonic() + seconds
    while _running(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def _running(pid: int) -> bool:
    """Whether process `pid` still runs; an exited daemon stays a zombie until init reaps it, which
    may take seconds."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rpartition(b")")[2].split()[0]
    except (OSError, IndexError):
        return False
    return state not in (b"Z", b"X")


def spec_path(spec_dir: Path, name: str) -> Path:
    """The spec file of layer `name` (letters, digits, `_` and `-`: never a path)."""
    if not LAYER_NAME.fullmatch(name):
        raise MountError(f"invalid layer name {name[:100]!r}")
    return spec_dir / f"{name}{SPEC_SUFFIX}"


def write_spec(spec_dir: Path, name: str, reference: str, digest: str, size: int,
               toc_digest: str | None) -> None:
    """Hand layer `digest` of image `reference` (blob `size` bytes, TOC digest `toc_digest`, None for a
    layer read through its seek index) to the daemon under `name` (written whole: temp file, then rename)."""
    path = spec_path(spec_dir, name)
    spec_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"reference": reference, "digest": toc.check_digest(digest), "size": size,
                               "toc_digest": toc_digest and toc.check_digest(toc_digest)}))
    os.replace(tmp, path)
