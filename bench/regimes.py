"""Where and as whom a benchmark's commands run: as root or as an unprivileged user, against the registry
on the host's loopback or against a far one, inside a network namespace.

- The unprivileged user: a system user `lazybench` (created if absent, and then removed afterwards),
  with a home directory under the work directory; /dev/fuse is opened to 0666 meanwhile (it is 0600 on
  these machines; the mode is restored), as tests/test_run.py does.  Its commands run through `setpriv`
  (no PAM session, nothing added to the timing but an exec) with a clean environment: HOME, TMPDIR
  (where `lazymount run` mounts), PATH, LANG and the PYTHONPATH of the code measured.  The user can
  neither raise the mount's `read_ahead_kb` nor write /sys, and bubblewrap runs in a user namespace.
- The far registry: a network namespace whose loopback is limited to 1 Gbit/s by `tc qdisc ... tbf`; in
  it, docker-registry serves the loopback registry's storage on a unix socket and bench/delayproxy.py
  forwards 127.0.0.1:5000 to that socket, holding every chunk 10 ms in each direction (20 ms per
  request/response turn, one more round trip for each new connection).  Only the client <-> proxy hop
  crosses the limited loopback (the proxy reaches the registry through the socket), so each byte is
  counted once.  Commands run in it through `ip netns exec`; no traffic leaves the namespace.

What belongs here: setting up and tearing down these regimes, and the command prefix that runs a
command in one.  What never does: measuring (bench_*.py), images (inputs.py).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import yaml

from bench.common import log
from tests.registry import stop_process
from tests.users import fuse_user

USER = "lazybench"
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
RATE = "1gbit"  # as tc writes it
RATE_LABEL = "1 Gbit/s"
ONE_WAY_MS = 10
PROXY_PORT = 5000
DELAYPROXY = Path(__file__).with_name("delayproxy.py")  # run as a script: see its docstring


@dataclass(frozen=True)
class User:
    """An unprivileged user: name, ids and a home directory it owns."""

    name: str
    uid: int
    gid: int
    home: Path

    def env(self) -> dict[str, str]:
        """The environment its commands get (nothing else of the harness's)."""
        env = {"HOME": str(self.home), "TMPDIR": str(self.home / "tmp"), "PATH": PATH, "LANG": "C.UTF-8"}
        if "PYTHONPATH" in os.environ:  # the code measured (run.py)
            env["PYTHONPATH"] = os.environ["PYTHONPATH"]
        return env

    def own(self, path: Path) -> Path:
        """Make `path` (a directory, created if absent) the user's; return it."""
        path.mkdir(parents=True, exist_ok=True)
        os.chown(path, self.uid, self.gid)
        return path


@dataclass(frozen=True)
class RunAs:
    """Who runs a command (None: root) and in which network namespace (None: the host's)."""

    user: User | None = None
    netns: str | None = None

    @property
    def label(self) -> str:
        return "unprivileged" if self.user else "root"

    def workspace(self, scratch: Path) -> Path:
        """Where this user's files go under `scratch`: `scratch` itself for root, else a subdirectory the
        user owns (and `scratch` made traversable)."""
        if not self.user:
            return scratch
        scratch.chmod(scratch.stat().st_mode | 0o111)
        return self.user.own(scratch / self.user.name)

    def command(self, args: list[str]) -> list[str]:
        """`args` prefixed to run as this user, in this namespace."""
        prefix = ["ip", "netns", "exec", self.netns] if self.netns else []
        if self.user:
            prefix += ["setpriv", f"--reuid={self.user.uid}", f"--regid={self.user.gid}", "--clear-groups",
                       "--", "env", "-i", *(f"{k}={v}" for k, v in self.user.env().items())]
        return prefix + args


ROOT = RunAs()


@contextlib.contextmanager
def unprivileged_user(workdir: Path) -> Iterator[User]:
    """The user `lazybench` with a fresh home directory under `workdir`, allowed /dev/fuse meanwhile."""
    with fuse_user(USER, workdir) as (entry, home):
        user = User(USER, entry.pw_uid, entry.pw_gid, home)
        user.own(home / "tmp")
        yield user


@dataclass(frozen=True)
class FarRegistry:
    """The far registry as seen from inside its namespace: `netns`, and the proxy's `host`."""

    netns: str
    host: str

    def name(self, image: str) -> str:
        """`image` (REGISTRY/REPOSITORY:TAG of any registry on the same storage) named through the proxy."""
        return f"{self.host}/{image.split('/', 1)[1]}"

    def setup_commands(self) -> list[list[str]]:
        """The namespace and its rate limit, as commands (README shows the same)."""
        inside = ["ip", "netns", "exec", self.netns]
        return [["ip", "netns", "add", self.netns],
                [*inside, "ip", "link", "set", "lo", "up"],
                [*inside, "tc", "qdisc", "add", "dev", "lo", "root", "tbf", "rate", RATE, "burst", "256kb",
                 "latency", "50ms"]]


def _registry_config(storage: Path, sock: Path) -> dict:
    return {"version": 0.1, "log": {"level": "info", "accesslog": {"disabled": True}},
            "storage": {"filesystem": {"rootdirectory": str(storage)}},
            "http": {"addr": str(sock), "net": "unix", "secret": os.urandom(16).hex()}}


def _answers(sock: Path) -> bool:
    """Whether an HTTP server answers GET /v2/ with 200 on the unix socket `sock`."""
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as s:
        s.settimeout(2)
        s.connect(str(sock))
        s.sendall(b"GET /v2/ HTTP/1.0\r\nHost: registry\r\n\r\n")
        return s.recv(64).split(b" ")[1:2] == [b"200"]
    return False


@contextlib.contextmanager
def far_registry(storage: Path, workdir: Path) -> Iterator[FarRegistry]:
    """docker-registry serving `storage`, behind the delaying proxy in a rate-limited network namespace."""
    far = FarRegistry(f"lazymount-bench-{os.getpid()}", f"127.0.0.1:{PROXY_PORT}")
    scratch = Path(tempfile.mkdtemp(prefix="far-", dir=workdir))
    sock, config = scratch / "registry.sock", scratch / "config.yml"
    config.write_text(yaml.safe_dump(_registry_config(storage, sock)))
    inside = ["ip", "netns", "exec", far.netns]
    processes: list[subprocess.Popen] = []
    try:
        for command in far.setup_commands():
            subprocess.run(command, check=True)
        log(f"far registry: namespace {far.netns}, lo at {RATE_LABEL}, {2 * ONE_WAY_MS} ms round trip")
        with open(scratch / "registry.log", "ab") as out:
            processes.append(subprocess.Popen([*inside, "docker-registry", "serve", str(config)], stdout=out,
                                              stderr=subprocess.STDOUT))
        deadline = time.monotonic() + 30
        while not _answers(sock):
            if processes[0].poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"docker-registry did not start; see {scratch / 'registry.log'}")
            time.sleep(0.1)
        proxy = subprocess.Popen([*inside, sys.executable, str(DELAYPROXY), "--listen", far.host,
                                  "--upstream", f"unix:{sock}", "--one-way-ms", str(ONE_WAY_MS)],
                                 stdout=subprocess.PIPE, text=True)
        processes.append(proxy)
        if proxy.stdout is None or proxy.stdout.readline() != "ready\n":
            raise RuntimeError("the delaying proxy did not start")
        yield far
    finally:
        for process in reversed(processes):
            stop_process(process)
        subprocess.run(["ip", "netns", "del", far.netns], check=False, capture_output=True)
        shutil.rmtree(scratch, ignore_errors=True)
