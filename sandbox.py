"""The sandbox of `run` and `record`: a command in a mounted image, under bubblewrap, as an unprivileged user.

What belongs here: mounting the image for the command's lifetime, the image's user, environment and
working directory read from its config and files (symlinks resolved inside the image, never on the host),
the bubblewrap command line, clean-up on signals, and recording the files a workload opens.  What never
does: FUSE operations (fusefs.py), the tree (tree.py), argument parsing (lazymount.py).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import signal
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import engine
import fusefs
from mountctl import IMAGE_XATTR, STATS_XATTR, TERMINATIONS, MountError, start_daemon, unmount

log = logging.getLogger("lazymount")

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def image_path(root: Path, relative: str) -> Path | None:
    """Where `relative` leads in the image mounted at `root`, its symlinks (absolute ones too) resolved
    inside the image as they will be in the container; None if it does not exist there."""
    parts, resolved, links = relative.strip("/").split("/"), root, 0
    while parts:
        name = parts.pop(0)
        if name in ("", "."):
            continue
        if name == "..":
            resolved = resolved.parent if resolved != root else root
            continue
        candidate = resolved / name
        try:
            if not stat.S_ISLNK(os.lstat(candidate).st_mode):
                resolved = candidate
                continue
            target = os.readlink(candidate)
        except OSError:
            return None
        links += 1
        if links > 40:
            return None
        parts = target.split("/") + parts
        if target.startswith("/"):
            resolved = root
    return resolved


def read_image_file(root: Path, relative: str) -> str:
    """A small text file of the mounted image (symlinks resolved inside the image), or ''."""
    path = image_path(root, relative)
    if path is None:
        return ""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return ""
    with os.fdopen(fd, encoding="utf-8", errors="replace") as f:
        return f.read(1 << 20)


def image_ids(root: Path, user_spec: str) -> tuple[int, int]:
    """The uid and gid of the image's `User` (`name`, `uid`, `name:group`, `uid:gid`), from its files."""
    user, _, group = (user_spec or "0").partition(":")
    passwd = [line.split(":") for line in read_image_file(root, "etc/passwd").splitlines()]
    passwd = [p for p in passwd if len(p) >= 4]
    match = [p for p in passwd if p[0] == user or p[2] == user]
    if user.isdigit():
        uid = int(user)
    elif match:
        uid = int(match[0][2])
    else:
        raise MountError(f"the image's user {user!r} is not in its /etc/passwd")
    gid = int(match[0][3]) if match and match[0][3].isdigit() else 0
    if group:
        groups = [line.split(":") for line in read_image_file(root, "etc/group").splitlines()]
        named = [g for g in groups if len(g) >= 3 and g[0] == group]
        if group.isdigit():
            gid = int(group)
        elif named and named[0][2].isdigit():
            gid = int(named[0][2])
        else:
            raise MountError(f"the image's group {group!r} is not in its /etc/group")
    return uid, gid


def bwrap_command(root: Path, config: dict, command: list[str], binds: list[str]) -> list[str]:
    """The bubblewrap command line running `command` in the image mounted at `root`."""
    uid, gid = image_ids(root, str(config.get("User") or ""))
    argv = ["bwrap", "--unshare-user", "--unshare-pid", "--die-with-parent", "--uid", str(uid),
            "--gid", str(gid), "--bind", str(root), "/", "--proc", "/proc", "--dev", "/dev",
            "--tmpfs", "/tmp"]
    for name in ("etc/resolv.conf", "etc/hosts"):  # the host's, over a plain file of the image's
        if os.path.isfile(f"/{name}") and image_path(root, name) == root / name and (root / name).is_file():
            argv += ["--ro-bind", f"/{name}", f"/{name}"]
    for bind in binds:
        src, sep, dst = bind.partition(":")
        if not sep or not src or not dst.startswith("/"):
            raise MountError(f"--bind {bind!r}: expected SRC:/DST")
        argv += ["--bind", os.path.abspath(src), dst]
    argv.append("--clearenv")
    env = dict(item.partition("=")[::2] for item in config.get("Env") or [] if "=" in item)
    env.setdefault("PATH", DEFAULT_PATH)
    for key, value in env.items():
        argv += ["--setenv", key, value]
    argv += ["--chdir", config.get("WorkingDir") or "/"]
    if not command:
        command = list(config.get("Entrypoint") or []) + list(config.get("Cmd") or [])
    if not command:
        raise MountError("no command given and the image has no Entrypoint or Cmd")
    return [*argv, "--", *command]


def run_in_image(args: argparse.Namespace, command: list[str]) -> int:
    """Mount args.image on a temp dir, run `command` (default: the image's) in it with bubblewrap, write
    the mount's stats to args.stats_file if set, unmount; return the command's exit status.  SIGTERM and
    SIGHUP end it like Ctrl-C does: the command is killed and the mount cleaned up."""
    if shutil.which("bwrap") is None:
        raise MountError("bubblewrap (bwrap) is not installed")
    args.mountpoint = Path(tempfile.mkdtemp(prefix="lazymount-run-"))
    args.layer, args.options = None, None
    try:
        with _exit_on_termination():
            start_daemon(args, fusefs.serve_image, own_session=False)
            try:
                try:  # waits for layers still downloading
                    info = json.loads(os.getxattr(args.mountpoint, IMAGE_XATTR))
                except OSError as e:
                    raise MountError(_unusable(args.mountpoint, e)) from None
                argv = bwrap_command(args.mountpoint, info["config"], command, args.bind)
                log.debug("running %s", argv)
                code = subprocess.run(argv, check=False).returncode
                if args.stats_file:
                    Path(args.stats_file).write_bytes(os.getxattr(args.mountpoint, STATS_XATTR))
            finally:
                unmount(args.mountpoint)
    finally:
        with contextlib.suppress(OSError):
            args.mountpoint.rmdir()
    return code if code >= 0 else 128 - code


@contextlib.contextmanager
def _exit_on_termination() -> Iterator[None]:
    """Within the block, SIGTERM and SIGHUP raise SystemExit(128 + signal number), so that cleanups run
    (subprocess.run kills its child on the way out)."""
    def leave(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = {sig: signal.signal(sig, leave) for sig in TERMINATIONS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _unusable(mountpoint: Path, error: OSError) -> str:
    """Why the image mounted at `mountpoint` cannot be used: its failed layers, from its stats."""
    failed = []
    with contextlib.suppress(OSError):
        failed = [f"layer {layer['digest']}: {layer.get('error')}"
                  for layer in json.loads(os.getxattr(mountpoint, STATS_XATTR))["layers"]
                  if layer["state"] == "failed"]
    return "; ".join(failed) or f"the mount at {mountpoint} does not answer ({error.strerror})"


def record_workload(args: argparse.Namespace, command: list[str]) -> tuple[int, dict[str, list[str]]]:
    """Run `command` in args.image while the mount logs the files it opens; return its exit status and
    the profile {layer digest: paths in the order first opened}."""
    with tempfile.TemporaryDirectory(prefix="lazymount-record-") as tmp:
        args.record_log = os.path.join(tmp, "access.log")
        Path(args.record_log).touch()
        code = run_in_image(args, command)
        return code, engine.read_access_log(args.record_log)
