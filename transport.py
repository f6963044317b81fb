"""The HTTP transport under the registry client: requests that end by a deadline, however slowly a
server answers, and the parsing of the protocol's headers and bodies.

What belongs here: a requests adapter whose connections register their sockets, one watchdog thread that
shuts down the sockets of a block of requests once its deadline passes, and pure parsers (auth
challenges, Retry-After, Content-Range, multipart/byteranges).  What never does: registry operations,
auth flows and retries (regclient.py), or any project module.
"""

from __future__ import annotations

import contextlib
import email.utils
import os
import re
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import requests.adapters
import urllib3.connection
import urllib3.connectionpool


@dataclass(eq=False)
class _Watch:
    deadline: float
    sockets: list[socket.socket]
    expired: bool = False


class _Watchdog:
    """Ends requests that outlive their operation's deadline by shutting down their sockets.

    A socket's own timeout bounds each wait for bytes, so a server that trickles a byte now and then would
    hold a request forever; connections made here register their socket with the innermost `until` block
    of the thread that uses them, and one thread shuts those sockets down when the block's deadline passes
    (a read blocked on one then fails at once, and the connection is discarded).
    """

    def __init__(self) -> None:
        self._reset()
        os.register_at_fork(after_in_child=self._reset)  # the parent's thread and lock stay behind

    def _reset(self) -> None:
        self._cond = threading.Condition()
        self._watches: list[_Watch] = []
        self._local = threading.local()
        self._pid = 0

    @contextlib.contextmanager
    def until(self, deadline: float) -> Iterator[_Watch]:
        """Shut down, at `deadline`, the sockets this thread's requests use inside the block."""
        watch = _Watch(deadline, [])
        stack = self._local.__dict__.setdefault("stack", [])
        stack.append(watch)
        with self._cond:
            if self._pid != os.getpid():  # first use in this process: start the thread
                self._pid = os.getpid()
                threading.Thread(target=self._run, name="request-deadlines", daemon=True).start()
            self._watches.append(watch)
            self._cond.notify()
        try:
            yield watch
        finally:
            stack.pop()
            with self._cond:
                self._watches.remove(watch)

    def watch(self, sock: socket.socket | None) -> None:
        """Put `sock` under the calling thread's innermost deadline, if it has one."""
        stack = getattr(self._local, "stack", None)
        if sock is None or not stack:
            return
        with self._cond:
            stack[-1].sockets.append(sock)
            if stack[-1].expired:
                _shut(sock)

    def _run(self) -> None:
        with self._cond:
            while True:
                now = time.monotonic()
                for watch in self._watches:
                    if not watch.expired and watch.deadline <= now:
                        watch.expired = True
                        for sock in watch.sockets:
                            _shut(sock)
                pending = [w.deadline for w in self._watches if not w.expired]
                self._cond.wait(min(pending) - now if pending else None)


def _shut(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


_WATCHDOG = _Watchdog()


class _Watched:
    """Mixed into urllib3's connections: their socket goes under the using thread's deadline."""

    sock: socket.socket | None

    def connect(self) -> None:
        super().connect()  # type: ignore[misc]
        _WATCHDOG.watch(self.sock)

    def request(self, *args: Any, **kwargs: Any) -> None:
        _WATCHDOG.watch(self.sock)  # a pooled connection, used again
        super().request(*args, **kwargs)  # type: ignore[misc]


class _WatchedHTTPConnection(_Watched, urllib3.connection.HTTPConnection):
    pass


class _WatchedHTTPSConnection(_Watched, urllib3.connection.HTTPSConnection):
    pass


class _WatchedHTTPPool(urllib3.connectionpool.HTTPConnectionPool):
    ConnectionCls = _WatchedHTTPConnection


class _WatchedHTTPSPool(urllib3.connectionpool.HTTPSConnectionPool):
    ConnectionCls = _WatchedHTTPSConnection


_POOLS = {"http": _WatchedHTTPPool, "https": _WatchedHTTPSPool}


class Adapter(requests.adapters.HTTPAdapter):
    """requests' adapter with connections that `_WATCHDOG` can end (proxied ones too)."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = _POOLS

    def proxy_manager_for(self, proxy: str, **kwargs: Any) -> Any:
        manager = super().proxy_manager_for(proxy, **kwargs)
        manager.pool_classes_by_scheme = _POOLS
        return manager


def until(deadline: float) -> contextlib.AbstractContextManager[_Watch]:
    """A block whose requests (made through an `Adapter`, in this thread) end by `deadline` (monotonic
    time): their sockets are shut down then, and the block's watch is `expired`."""
    return _WATCHDOG.until(deadline)


_CHALLENGE_PARAM_RE = re.compile(r'([A-Za-z_][\w-]*)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]+))')
_CONTENT_RANGE_RE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")


def parse_challenge(header: str) -> tuple[str, dict[str, str]] | None:
    """`Bearer realm="...",service="...",scope="..."` -> ("bearer", {...}); None if unusable."""
    scheme, _, rest = header.strip().partition(" ")
    scheme = scheme.lower()
    if scheme not in ("bearer", "basic"):
        return None
    params = {m.group(1).lower(): m.group(2) if m.group(2) is not None else m.group(3)
              for m in _CHALLENGE_PARAM_RE.finditer(rest)}
    if scheme == "bearer" and not params.get("realm", "").startswith(("http://", "https://")):
        return None
    return scheme, params


def retry_after(value: str | None) -> float | None:
    if not value:
        return None
    if value.strip().isdigit():
        return float(value.strip())
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def parse_content_range(value: str | None) -> tuple[int, int, int | None] | None:
    """`bytes a-b/total` -> (a, b + 1, total or None)."""
    match = _CONTENT_RANGE_RE.fullmatch((value or "").strip())
    if match is None or int(match.group(2)) < int(match.group(1)):
        return None
    total = None if match.group(3) == "*" else int(match.group(3))
    return int(match.group(1)), int(match.group(2)) + 1, total


def parse_multipart(body: bytes, boundary: bytes) -> dict[int, bytes]:
    """The parts of a `multipart/byteranges` body as {start: bytes}; ValueError if malformed."""
    delimiter = b"--" + boundary
    parts: dict[int, bytes] = {}
    pos = body.find(delimiter)
    while pos >= 0:
        pos += len(delimiter)
        if body.startswith(b"--", pos):
            return parts
        head_end = body.find(b"\r\n\r\n", pos)
        if head_end < 0:
            raise ValueError("part without a header end")
        content_range = None
        for line in body[pos:head_end].decode("latin-1").split("\r\n"):
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-range":
                content_range = parse_content_range(value)
        if content_range is None:
            raise ValueError("part without a valid Content-Range")
        start, end, _ = content_range
        data = body[head_end + 4:head_end + 4 + end - start]
        if len(data) != end - start:
            raise ValueError("truncated part")
        parts[start] = data
        pos = body.find(delimiter, head_end + 4 + len(data))
    raise ValueError("no closing boundary")


def multipart_boundary(content_type: str) -> bytes | None:
    kind, _, params = content_type.partition(";")
    if kind.strip().lower() != "multipart/byteranges":
        return None
    for param in params.split(";"):
        key, _, value = param.strip().partition("=")
        if key.lower() == "boundary" and value:
            return value.strip('"').encode("latin-1")
    return None
