"""HTTP requests that end by a deadline, however slowly a server answers.

What belongs here: a requests adapter whose connections register their sockets, and one watchdog thread
that shuts down the sockets of a block of requests once its deadline passes.  What never does: anything
about registries (regclient.py), retries, or any project module.
"""

from __future__ import annotations

import contextlib
import os
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
