"""The sandbox of `run`, `shell` and `record`: a command in a mounted image, under bubblewrap, as an
unprivileged user, with the habits of `apptainer exec`.

What belongs here: mounting the image for the command's lifetime, the image's user, environment and
working directory read from its config and files (symlinks resolved inside the image, never on the host),
the bubblewrap command line (the root built on a tmpfs from the image's entries, so that images without
`/proc`, `/dev`, `/etc`... run while the mount stays read-only and unchanged), bind mounts (home, current
directory, `--bind`, NVIDIA driver files), the command's environment, clean-up on signals, recording
the files a workload opens, and the namespace in which an overlay of the mount's local copy of its
prefetched files hides the mount.  What never does: FUSE operations (fusefs.py), the tree (tree.py),
writing the local copy (engine.py), argument parsing (lazymount.py).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import errno
import json
import logging
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

import fusefs
import profiles
from mountctl import IMAGE_XATTR, STATS_XATTR, MountError, describe_os_error, mount_at, start_daemon, unmount

log = logging.getLogger("lazymount")

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
PROVIDED = ("proc", "dev", "sys", "tmp")  # top-level directories the sandbox mounts itself
HOST_FILES = ("/etc/resolv.conf", "/etc/hosts")  # the host network's names, over the image's
# Host variables passed to the command unless --cleanenv (the image's Env wins over them)
PASSED_ENV = re.compile(r"TERM|LANG|LANGUAGE|LC_[A-Z_]+|(?i:(http|https|ftp|all|no)_proxy)")
SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)
STDERR_TAIL = 8192  # bytes of a recorded workload's stderr kept to say why it failed

# --nv: the host's NVIDIA driver files, found as Apptainer finds them (its nvliblist.conf)
NV_LIB_DIR = "/.lazymount/nvlibs"  # on the command's LD_LIBRARY_PATH
NV_BIN_DIR = "/.lazymount/nvbin"  # on the command's PATH
NV_LIBS = ("libcuda.so", "libcudadebugger.so", "libnvcuvid.so", "libnvidia-allocator.so",
           "libnvidia-cfg.so", "libnvidia-compiler.so", "libnvidia-eglcore.so", "libnvidia-encode.so",
           "libnvidia-fatbinaryloader.so", "libnvidia-fbc.so", "libnvidia-glcore.so", "libnvidia-glsi.so",
           "libnvidia-glvkspirv.so", "libnvidia-gpucomp.so", "libnvidia-ifr.so", "libnvidia-ml.so",
           "libnvidia-nvvm.so", "libnvidia-opencl.so", "libnvidia-opticalflow.so",
           "libnvidia-ptxjitcompiler.so", "libnvidia-rtcore.so", "libnvidia-tls.so", "libnvoptix.so",
           "libEGL_nvidia.so", "libGLX_nvidia.so", "libGLESv1_CM_nvidia.so", "libGLESv2_nvidia.so",
           "libvdpau_nvidia.so")
NV_BINARIES = ("nvidia-smi", "nvidia-debugdump", "nvidia-persistenced", "nvidia-cuda-mps-control",
               "nvidia-cuda-mps-server")
NV_ROOT_ENV = "LAZYMOUNT_NV_ROOT"  # where --nv finds the host's files (default /; tests: a fake driver tree)
_LDCONFIG_LINE = re.compile(r"^\s*(\S+) \([^)]*\) => (.+)$")  # `ldconfig -p`: NAME (FLAGS) => PATH
# unshare(2) and mount(2) flags (linux/sched.h, linux/mount.h)
CLONE_NEWNS, CLONE_NEWUSER = 0x00020000, 0x10000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REC, MS_PRIVATE = 0x1, 0x2, 0x4, 0x4000, 0x40000
OVERLAY_UNSAFE = re.compile(r"[:,\\\s]")  # would need escaping in overlayfs' lowerdir= option


@dataclasses.dataclass(frozen=True)
class Options:
    """How the command meets the host.  The defaults are Apptainer's: home and current directory bound,
    the command started in the current directory, TERM, LANG, LC_* and proxy variables passed."""

    binds: tuple[str, ...] = ()  # SRC[:DST[:ro|rw]], each possibly a comma-separated list
    contain: bool = False  # bind neither home nor the current directory
    cleanenv: bool = False  # no host variable
    env: tuple[str, ...] = ()  # K=V, over --env-file's
    env_files: tuple[str, ...] = ()  # K=V lines, over the image's Env
    pwd: str | None = None  # start here
    workdir_from_image: bool = False  # start in the image's WorkingDir
    nv: bool = False  # the host's NVIDIA driver libraries, tools and devices
    shell: bool = False  # no command: the image's shell ($SHELL if the image has it, else /bin/sh)
    overlay: bool = True  # the prefetched files copied locally, under an overlay over the mount


DEFAULTS = Options()
IMAGE_ONLY = Options(contain=True, cleanenv=True, workdir_from_image=True)  # what `optimize` records in


@dataclasses.dataclass(frozen=True)
class Bind:
    """One bind mount: host `src` at `dst` in the sandbox."""

    src: str
    dst: str
    flag: str = "--bind"  # or --ro-bind, --dev-bind
    role: str = ""  # "home", "cwd", "host" (a file of HOST_FILES: left out quietly if it cannot be mounted)
    spec: str = ""  # a user's --bind: it must be mounted


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
        try:
            return f.read(1 << 20)
        except OSError:  # e.g. a directory
            return ""


def _passwd(root: Path) -> list[list[str]]:
    passwd = [line.split(":") for line in read_image_file(root, "etc/passwd").splitlines()]
    return [p for p in passwd if len(p) >= 6]


def image_ids(root: Path, user_spec: str) -> tuple[int, int]:
    """The uid and gid of the image's `User` (`name`, `uid`, `name:group`, `uid:gid`), from its files."""
    user, _, group = (user_spec or "0").partition(":")
    match = [p for p in _passwd(root) if p[0] == user or p[2] == user]
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


def parse_binds(specs: tuple[str, ...] | list[str]) -> list[Bind]:
    """`--bind` values: SRC[:DST[:ro|rw]], several per value separated by commas (as Apptainer's)."""
    binds = []
    for spec in (s for value in specs for s in value.split(",") if s):
        src, _, rest = spec.partition(":")
        dst, _, mode = rest.partition(":")
        dst = dst or os.path.abspath(src)
        if not src or not dst.startswith("/") or os.path.normpath(dst) == "/" or mode not in ("", "ro", "rw"):
            raise MountError(f"--bind {spec!r}: expected SRC[:DST[:ro]] with an absolute DST other than /")
        if not os.path.exists(src):
            raise MountError(f"--bind {spec!r}: {src} does not exist")
        flag = "--ro-bind" if mode == "ro" else "--bind"
        binds.append(Bind(os.path.abspath(src), os.path.normpath(dst), flag, spec=f"--bind {spec}"))
    return binds


def read_env_file(path: str) -> dict[str, str]:
    """An --env-file: K=V a line (`export ` before it allowed), blank lines and `#` comments ignored, no
    quoting: the value is the rest of the line."""
    env = {}
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.removeprefix("export ").partition("=")
        if not sep or not key.strip():
            raise MountError(f"{path}:{number}: expected K=V")
        env[key.strip()] = value
    return env


def _env_pairs(items: tuple[str, ...]) -> dict[str, str]:
    env = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise MountError(f"--env {item!r}: expected K=V")
        env[key] = value
    return env


def nv_files(host_root: str = "/") -> list[Bind]:
    """--nv: the host's NVIDIA driver libraries in its ld.so cache (`ldconfig -p`) whose name starts with
    one of NV_LIBS and whose ELF class and machine are this host's, its NVIDIA tools on PATH and the
    /dev/nvidia* devices that exist; `host_root` is where the host's files are (a fake tree in tests)."""
    ldconfig = shutil.which("ldconfig") or "/sbin/ldconfig"
    try:
        listing = subprocess.run([ldconfig, "-p", "-C", os.path.join(host_root, "etc/ld.so.cache")],
                                 capture_output=True, text=True, check=False).stdout
    except OSError:  # no ldconfig
        listing = ""
    binds, seen = [], set()
    host = _elf_kind(sys.executable)
    for line in listing.splitlines():
        match = _LDCONFIG_LINE.match(line)
        if not match or match[1] in seen or not any(_within(match[1], n, ".") for n in NV_LIBS):
            continue
        path = os.path.join(host_root, match[2].lstrip("/"))
        if _elf_kind(path) == host:
            seen.add(match[1])
            binds.append(Bind(os.path.realpath(path), f"{NV_LIB_DIR}/{match[1]}", "--ro-bind"))
    search = os.pathsep.join(os.path.join(host_root, d.lstrip("/"))
                             for d in os.environ.get("PATH", DEFAULT_PATH).split(os.pathsep))
    for name in NV_BINARIES:
        found = shutil.which(name, path=search)
        if found:
            binds.append(Bind(os.path.realpath(found), f"{NV_BIN_DIR}/{name}", "--ro-bind"))
    for node in sorted(Path(host_root, "dev").glob("nvidia*")):
        binds.append(Bind(str(node), f"/dev/{node.name}", "--dev-bind"))
    if not binds:
        log.warning("--nv: no NVIDIA driver library, tool or device found on this host")
    return binds


def _elf_kind(path: str) -> bytes | None:
    """The ELF class, byte order and machine of a file, or None if it is no ELF file."""
    try:
        with open(path, "rb") as f:
            header = f.read(20)
    except OSError:
        return None
    return header[4:6] + header[18:20] if header[:4] == b"\x7fELF" and len(header) == 20 else None


def _binds(options: Options) -> list[Bind]:
    """Every bind of the sandbox, in mount order: the host's network files; unless --contain, $HOME (the
    real path at $HOME) and the current directory when outside it; --bind; --nv's files."""
    binds = [Bind(path, path, "--ro-bind", role="host") for path in HOST_FILES if os.path.isfile(path)]
    home, cwd = os.path.normpath(os.path.expanduser("~")), _cwd()
    defaults = []
    if not options.contain and os.path.isabs(home) and home != "/" and os.path.isdir(home):
        defaults.append(Bind(os.path.realpath(home), home, role="home"))
        if cwd and _within(cwd, defaults[0].src):
            cwd = None
    if not options.contain and cwd and cwd != "/":
        defaults.append(Bind(cwd, cwd, role="cwd"))
    binds += sorted(defaults, key=lambda b: len(b.dst))  # a directory before one inside it
    binds += parse_binds(options.binds)
    if options.nv:
        binds += nv_files(os.environ.get(NV_ROOT_ENV) or "/")
    return binds


def _cwd() -> str | None:
    try:
        return os.getcwd()
    except OSError:  # removed meanwhile
        return None


def _within(path: str, top: str, sep: str = "/") -> bool:
    """Whether `path` is `top` or below it (`sep`: the separator of their parts)."""
    return path == top or path.startswith(top.rstrip(sep) + sep)


def _mount_point(root: Path, dst: str, opened: set[str], replaced: set[str]) -> str | None:
    """Make `dst` a place a bind can be mounted: directories of the image on its way that lack the next
    name become tmpfs directories holding their entries (`opened`), a symlink at `dst` is left out
    (`replaced`).  Return why it cannot be done (a symlink or file on the way), else None."""
    parts = dst.strip("/").split("/")
    if parts[0] in PROVIDED:
        return None
    path = ""
    for i, name in enumerate(parts):
        parent, path = path, f"{path}/{name}".lstrip("/")
        try:
            mode = os.lstat(root / path).st_mode
        except FileNotFoundError:
            mode = None
        if mode is None or (i == len(parts) - 1 and stat.S_ISLNK(mode)):
            opened.update(p for p in _prefixes(parent))
            if mode is not None:
                replaced.add(path)
            return None
        if i < len(parts) - 1 and not stat.S_ISDIR(mode):
            return f"/{path} is {'a symlink' if stat.S_ISLNK(mode) else 'not a directory'} in the image"
    return None


def _prefixes(path: str) -> Iterator[str]:
    """'', 'a', 'a/b' for 'a/b'."""
    yield ""
    parts = path.split("/") if path else []
    for i in range(len(parts)):
        yield "/".join(parts[: i + 1])


def _root_args(root: Path, opened: set[str], replaced: set[str], rel: str = "") -> list[str]:
    """bubblewrap arguments rebuilding directory `rel` of the image on the sandbox's tmpfs root: each
    entry bound read-only (symlinks recreated), each `opened` directory made anew and filled likewise."""
    args = []
    with os.scandir(root / rel) as entries:
        for entry in sorted(entries, key=lambda e: e.name):
            path = f"{rel}/{entry.name}" if rel else entry.name
            if (not rel and entry.name in PROVIDED) or path in replaced:
                continue
            if entry.is_symlink():
                args += ["--symlink", os.readlink(entry.path), f"/{path}"]
            elif path in opened and entry.is_dir(follow_symlinks=False):
                mode = stat.S_IMODE(entry.stat(follow_symlinks=False).st_mode)
                args += ["--perms", f"{mode:04o}", "--dir", f"/{path}"]
                args += _root_args(root, opened, replaced, path)
            else:
                args += ["--ro-bind", entry.path, f"/{path}"]
    return args


def _mountable(root: Path, binds: list[Bind]) -> tuple[list[str], list[Bind]]:
    """The arguments building the root around the image, and the binds that can be mounted in it."""
    opened, replaced, usable = {""}, set(), []
    for bind in binds:
        why = _mount_point(root, bind.dst, opened, replaced)
        if why is None:
            usable.append(bind)
        elif bind.spec:
            raise MountError(f"{bind.spec}: cannot mount on {bind.dst}: {why}")
        elif bind.role != "host":
            log.warning("not binding %s: %s", bind.dst, why)
    return ["--tmpfs", "/", *_root_args(root, opened, replaced)], usable


def _environment(root: Path, config: dict, options: Options, uid: int, home: str | None) -> dict[str, str]:
    """The command's variables: host TERM, LANG... (unless --cleanenv), the image's Env over them, HOME,
    then --env-file and --env; --nv's directories appended to LD_LIBRARY_PATH and PATH."""
    env = {} if options.cleanenv else {k: v for k, v in os.environ.items() if PASSED_ENV.fullmatch(k)}
    env.update(item.partition("=")[::2] for item in config.get("Env") or [] if "=" in item)
    env.setdefault("PATH", DEFAULT_PATH)
    if home:
        env["HOME"] = home
    else:
        env.setdefault("HOME", next((p[5] for p in _passwd(root) if p[2] == str(uid) and p[5]), "/"))
    for path in options.env_files:
        env.update(read_env_file(path))
    env.update(_env_pairs(options.env))
    if options.nv:
        env["LD_LIBRARY_PATH"] = ":".join(filter(None, (env.get("LD_LIBRARY_PATH"), NV_LIB_DIR)))
        env["PATH"] = f"{env['PATH']}:{NV_BIN_DIR}"
    if options.shell:
        env.setdefault("PS1", "lazymount> ")
    return env


def _exists_inside(root: Path, path: str, binds: list[Bind]) -> bool:
    """Whether `path` will be a file in the sandbox (True where it cannot be told, e.g. in /dev)."""
    path = os.path.normpath(path)
    for bind in sorted(binds, key=lambda b: len(b.dst), reverse=True):
        if _within(path, bind.dst):
            return os.path.exists(bind.src + path[len(bind.dst):])
    if path.strip("/").split("/")[0] in PROVIDED:
        return True
    found = image_path(root, path)
    return found is not None and not found.is_dir()


def _check_command(root: Path, name: str, env: dict[str, str], workdir: str, binds: list[Bind]) -> None:
    """Raise "command not found in the image" unless `name` (a path, or looked up in PATH) is there."""
    if "/" in name:
        candidates = [os.path.join(workdir, name)]
    else:
        candidates = [os.path.join(workdir, d, name) for d in env.get("PATH", "").split(":")]
    if not any(_exists_inside(root, c, binds) for c in candidates):
        raise MountError(f"command not found in the image: {name}")


def _shell(root: Path, binds: list[Bind]) -> str:
    """The image's shell: $SHELL if the image has it, else /bin/sh."""
    for shell in (os.environ.get("SHELL"), "/bin/sh"):
        if shell and shell.startswith("/") and _exists_inside(root, shell, binds):
            return shell
    raise MountError("image has no /bin/sh")


def bwrap_command(root: Path, config: dict, command: list[str], options: Options = DEFAULTS) -> list[str]:
    """The bubblewrap command line running `command` (default: the image's Entrypoint + Cmd, or its shell
    with options.shell) in the image whose root directory is `root`."""
    uid, gid = image_ids(root, str(config.get("User") or ""))
    root_args, binds = _mountable(root, _binds(options))
    home = next((b for b in binds if b.role == "home"), None)
    env = _environment(root, config, options, uid, home.dst if home else None)
    workdir = options.pwd or config.get("WorkingDir") or "/"
    cwd = _cwd()
    if not options.pwd and not options.workdir_from_image and cwd:
        if home and _within(cwd, home.src):
            workdir = home.dst + cwd[len(home.src):]
        elif any(b.role == "cwd" for b in binds):
            workdir = cwd
    if not command:
        command = [_shell(root, binds)] if options.shell else \
            list(config.get("Entrypoint") or []) + list(config.get("Cmd") or [])
    if not command:
        raise MountError("no command given and the image has no Entrypoint or Cmd")
    _check_command(root, command[0], env, workdir, binds)
    argv = ["bwrap", "--unshare-user", "--unshare-pid", "--die-with-parent", "--uid", str(uid),
            "--gid", str(gid), *root_args, "--proc", "/proc", "--dev", "/dev", "--ro-bind", "/sys", "/sys",
            "--tmpfs", "/tmp"]
    for bind in binds:
        argv += [bind.flag, bind.src, bind.dst]
    argv += ["--remount-ro", "/", "--clearenv"]
    for key, value in env.items():
        argv += ["--setenv", key, value]
    return [*argv, "--chdir", workdir, "--", *command]


@dataclasses.dataclass(frozen=True)
class Outcome:
    """How a command in the sandbox ended."""

    status: int  # its exit status (128 + N when killed by signal N)
    reason: str = ""  # with `record`: the last line of its stderr
    profile: dict[str, list[str]] | None = None  # with `record`: {layer digest: paths in first-open order}


def run_in_image(args: argparse.Namespace, command: list[str], options: Options,
                 record: bool = False) -> Outcome:
    """Mount args.image in a temp dir, run `command` in it with bubblewrap (see bwrap_command), write the
    mount's stats to args.stats_file if set, unmount.  With `record`, the mount logs the files the command
    opens, and its stderr is copied through while its last line is kept.  SIGTERM, SIGHUP and SIGINT stop
    the command; the mount and the temp dir are removed even when a signal comes while they are made or
    removed.

    With options.overlay (not while recording: the mount must see every open) and where overlayfs can be
    mounted, the mount copies the files it prefetched into the temp dir, and bubblewrap runs in a mount
    namespace where an overlay of that copy over the mount hides the mount (see _OverlayNamespace); if
    anything of this fails, the command runs on the mount alone."""
    if shutil.which("bwrap") is None:
        raise MountError("bubblewrap (bwrap) is not installed")
    args.layer, args.options = None, None
    work = None
    with _stopped_once():
        try:
            with _signals_blocked():  # one between its mkdir and `work =` would leave it behind
                work = Path(tempfile.mkdtemp(prefix="lazymount-run-"))
            args.mountpoint = work / "mnt"
            args.mountpoint.mkdir()
            args.record_log = str(work / "access.log") if record else None
            if record:
                Path(args.record_log).touch()
            args.local_copy = _local_copy_dir(work) if options.overlay and not record else None
            start_daemon(args, fusefs.serve_image, own_session=False)
            try:  # waits for layers still downloading
                info = json.loads(os.getxattr(args.mountpoint, IMAGE_XATTR))
            except OSError as e:
                raise MountError(_unusable(args.mountpoint, e)) from None
            argv = bwrap_command(args.mountpoint, info["config"], command, options)
            setup = _overlay_over(args.mountpoint, args.local_copy) if args.local_copy else None
            log.debug("running %s", argv)
            code, reason = _run(argv, keep_stderr=record, setup=setup)
            if getattr(args, "stats_file", None):
                Path(args.stats_file).write_bytes(os.getxattr(args.mountpoint, STATS_XATTR))
            outcome = Outcome(code if code >= 0 else 128 - code, reason,
                              profiles.read_access_log(args.record_log) if record else None)
        finally:
            if work is not None:
                try:
                    _remove_work_dir(work)
                finally:  # again if a signal cut the first attempt short (only one signal ever raises)
                    _remove_work_dir(work)
    return outcome


@contextlib.contextmanager
def _stopped_once() -> Iterator[None]:
    """Within the block the first of SIGTERM, SIGHUP and SIGINT raises SystemExit(128 + its number)
    (KeyboardInterrupt for SIGINT), so that the command is stopped (subprocess kills its child on the way
    out) and clean-ups run; any later one is ignored, so that it cannot cut a clean-up short."""
    raised = False

    def stop(signum: int, frame: object) -> None:
        nonlocal raised
        if raised:
            return
        raised = True
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(128 + signum)

    previous = {sig: signal.signal(sig, stop) for sig in SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def _signals_blocked() -> Iterator[None]:
    """SIGNALS wait until the end of the block."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _local_copy_dir(work: Path) -> Path | None:
    """`work`/local, made, for the mount's copy of its prefetched files; None where no overlay could be
    mounted over it.  (Whether overlayfs can be mounted is found out when the command starts: a probe
    beforehand would cost every run ~20 ms, a namespace made and torn down.)"""
    if OVERLAY_UNSAFE.search(str(work)):
        log.info("no overlay: the temp dir %s holds a character overlayfs options cannot take", work)
        return None
    local = work / "local"
    local.mkdir(mode=0o700)
    return local


def _overlay_over(mountpoint: Path, local: Path) -> _OverlayNamespace | None:
    """The namespace set-up that hides the mount under an overlay of its local copy, if the mount made
    one."""
    try:
        copied = json.loads(os.getxattr(mountpoint, STATS_XATTR)).get("local_copy", {})
    except (OSError, ValueError):
        copied = {}
    if not copied.get("files"):
        log.info("no overlay: the mount copied no file (%s)", copied.get("error", "none prefetched"))
        return None
    log.info("overlay of %d local files (%d bytes) over the mount", copied["files"], copied["bytes"])
    return _OverlayNamespace(local, mountpoint)


class _OverlayNamespace:
    """What a child runs before it executes bubblewrap (subprocess's preexec_fn; this process has no
    thread): a mount namespace of its own (in a user namespace of its own, mapping only our uid and gid,
    unless we are root; Linux >= 5.11 lets it mount overlayfs) in which a read-only overlay of `upper` over
    `lower` is mounted on `lower`.  The overlay goes with the namespace when the last process in it exits.
    bubblewrap nests its own user namespace inside.  If it fails, the subprocess call raises
    SubprocessError, and `failure()` says why (the child writes it to a pipe)."""

    def __init__(self, upper: Path, lower: Path) -> None:
        self.uid, self.gid = os.geteuid(), os.getegid()
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._target = os.fsencode(lower)
        lowerdir = f"lowerdir={upper}:{lower}".encode()
        # userxattr: overlayfs reads user.overlay.* (an unprivileged mount cannot read trusted.*)
        self._attempts = [lowerdir + b",userxattr", lowerdir] if self.uid else [lowerdir]
        self._why, self._why_write = os.pipe()

    def __call__(self) -> None:
        try:
            self._enter()
        except OSError as e:
            os.write(self._why_write, describe_os_error(e).encode())
            raise

    def _enter(self) -> None:
        libc, uid, gid = self._libc, self.uid, self.gid
        self._check(libc.unshare(CLONE_NEWNS | (CLONE_NEWUSER if uid else 0)), "unshare")
        if uid:
            for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"),
                               ("gid_map", f"{gid} {gid} 1")):
                with open(f"/proc/self/{name}", "w") as f:
                    f.write(text)
        self._check(libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None), "making mounts private")
        for data in self._attempts:
            if libc.mount(b"overlay", self._target, b"overlay", MS_RDONLY | MS_NOSUID | MS_NODEV, data) == 0:
                return
        self._check(-1, "mounting overlayfs")

    @staticmethod
    def _check(result: int, what: str) -> None:
        if result != 0:
            number = ctypes.get_errno()
            raise OSError(number, f"{what}: {os.strerror(number)}")

    def failure(self) -> str:
        """Why the child failed (once the call that ran it has failed)."""
        os.close(self._why_write)
        self._why_write = -1
        return os.read(self._why, 4096).decode(errors="replace") or "unknown"

    def close(self) -> None:
        for fd in (self._why, self._why_write):
            if fd >= 0:
                os.close(fd)
        self._why = self._why_write = -1


def _remove_tree(path: Path) -> None:
    """Remove `path` and everything below it, its directories made writable first (a local copy has the
    image's modes); nothing if it is gone."""
    stack = [path]
    while stack:
        directory = stack.pop()
        try:
            if not stat.S_ISDIR(os.lstat(directory).st_mode):
                continue
            os.chmod(directory, 0o700)
            with os.scandir(directory) as entries:
                stack += [Path(e.path) for e in entries if e.is_dir(follow_symlinks=False)]
        except FileNotFoundError:
            continue
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(path)


def _remove_work_dir(work: Path) -> None:
    """Unmount `work`/mnt if mounted, remove it, the access log, the local copy and `work`; nothing if
    they are gone."""
    mountpoint = work / "mnt"
    if mount_at(mountpoint) is not None:
        try:
            unmount(mountpoint)
        except MountError:
            if mount_at(mountpoint) is not None:  # not a daemon that unmounted itself meanwhile
                raise
    with contextlib.suppress(FileNotFoundError):
        (work / "access.log").unlink()
    try:
        mountpoint.rmdir()
    except FileNotFoundError:
        pass
    except OSError as e:
        if e.errno != errno.EBUSY:
            raise
        unmount(mountpoint)  # a daemon still starting when the command was stopped mounted it since
        mountpoint.rmdir()
    _remove_tree(work / "local")  # written by the daemon, which has exited once unmounted
    with contextlib.suppress(FileNotFoundError):
        work.rmdir()


def _run(argv: list[str], keep_stderr: bool, setup: _OverlayNamespace | None = None) -> tuple[int, str]:
    """Run `argv`, in the namespace `setup` makes if it can (else without it); with `keep_stderr` copy its
    stderr to ours and also return its last line."""
    if setup is not None:
        try:
            return _started(argv, keep_stderr, setup)
        except subprocess.SubprocessError:
            log.info("no overlay (the command reads the mount alone): %s", setup.failure())
        finally:
            setup.close()
    return _started(argv, keep_stderr, None)


def _started(argv: list[str], keep_stderr: bool, setup: Callable[[], None] | None) -> tuple[int, str]:
    if not keep_stderr:
        return subprocess.run(argv, check=False, preexec_fn=setup).returncode, ""
    tail = bytearray()

    def copy(pipe: IO[bytes]) -> None:
        for chunk in iter(lambda: os.read(pipe.fileno(), 65536), b""):
            with contextlib.suppress(OSError):
                os.write(2, chunk)
            tail.extend(chunk)
            del tail[:-STDERR_TAIL]

    with subprocess.Popen(argv, stderr=subprocess.PIPE, preexec_fn=setup) as process:
        copier = threading.Thread(target=copy, args=(process.stderr,), daemon=True)
        copier.start()
        try:
            process.wait()
        except BaseException:
            process.kill()
            raise
        copier.join()
    lines = tail.decode(errors="replace").strip().splitlines()
    return process.returncode, lines[-1].strip() if lines else ""


def _unusable(mountpoint: Path, error: OSError) -> str:
    """Why the image mounted at `mountpoint` cannot be used: its failed layers, from its stats."""
    failed = []
    with contextlib.suppress(OSError):
        failed = [f"layer {layer['digest']}: {layer.get('error')}"
                  for layer in json.loads(os.getxattr(mountpoint, STATS_XATTR))["layers"]
                  if layer["state"] == "failed"]
    return "; ".join(failed) or f"the mount at {mountpoint} does not answer ({error.strerror})"
