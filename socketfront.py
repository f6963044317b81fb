"""The snapshotter's front: the socket systemd passes, held across snapshotter restarts by a small
process of its own that keeps containerd's connections waiting while no snapshotter serves.

Why a process: with socket activation alone the kernel queues a client's connection while nobody
accepts, but containerd 1.6's gRPC client (grpc-go 1.33, proxy plugins dialled with a 1 s base backoff
and no minimum connect timeout) gives up on a connection whose server has not sent its HTTP/2 preface
within about a second, and then fails every call at once until a later attempt succeeds.  The front
accepts every connection; when a snapshotter serves its private socket it relays bytes both ways; when
none does, it answers the HTTP/2 server preface itself (an empty SETTINGS frame: every setting at its
default), keeps what the client sends, and once a snapshotter serves again replays it there, dropping
the one SETTINGS acknowledgement that answered its own preface.  From then on the connection is plain
bytes, and the snapshotter's own SETTINGS reach the client as an ordinary settings update.  A connection
ends when its snapshotter goes away (the client reconnects and waits again).  With no snapshotter for
IDLE_EXIT seconds the front exits.

What belongs here: `sd_listen_fds(3)` (descriptors from 3 on, LISTEN_PID must be this process, the
variables unset once read), starting or adopting the front, and the front itself (`python -m
socketfront`).  What never does: gRPC or snapshots (the front knows only HTTP/2 frame headers), FUSE.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)

SD_LISTEN_FDS_START = 3
ENVIRONMENT = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")
CHUNK = 1 << 16
IDLE_EXIT = 120.0  # seconds without a snapshotter after which the front gives up and exits
RETRY = 0.1  # seconds between attempts to reach the snapshotter while a client waits
CHECK = 10.0  # seconds between checks that a snapshotter serves, while no client connects
START_TIMEOUT = 30.0  # seconds a new front may take to write its PID file
HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
FRAME_HEADER = 9
SETTINGS, ACK = 4, 0x1
EMPTY_SETTINGS = bytes([0, 0, 0, SETTINGS, 0, 0, 0, 0, 0])  # length 0, type SETTINGS, no flags, stream 0


def listen_fds() -> list[int]:
    """The descriptors systemd passed to this process (empty if none, or if they were meant for another
    process); the LISTEN_* variables are removed so that children do not take them as theirs."""
    pid, count = os.environ.get("LISTEN_PID", ""), os.environ.get("LISTEN_FDS", "")
    for name in ENVIRONMENT:
        os.environ.pop(name, None)
    if not (pid.isdigit() and count.isdigit()) or int(pid) != os.getpid():
        return []
    fds = list(range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + int(count)))
    for fd in fds:
        os.set_inheritable(fd, False)
    return fds


def check_listening(fd: int) -> None:
    """OSError unless `fd` is a socket listening for streams."""
    sock = socket.socket(fileno=fd)
    try:
        if sock.type != socket.SOCK_STREAM or not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            raise OSError(f"descriptor {fd} is not a listening stream socket")
    finally:
        sock.detach()


# ------------------------------------------------------------------------------- starting or adopting


def front_pid(pid_file: Path, backend: str, fd: int | None = None) -> int | None:
    """The PID of the live front relaying to `backend` that wrote `pid_file` (`PID SOCKET-INODE`), if any
    (with `fd`, only if it holds that very socket)."""
    try:
        pid, inode = (int(field) for field in pid_file.read_text().split())
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return None
    if b"socketfront" not in argv or os.fsencode(backend) not in argv:
        return None
    return pid if fd is None or os.fstat(fd).st_ino == inode else None


def ensure_front(fd: int, backend: str, pid_file: Path, log_file: Path) -> int:
    """The PID of the front that holds the listening socket `fd` and relays to the unix socket `backend`:
    the one already running (it outlived the previous snapshotter), or a new one, detached.  A front that
    holds another socket (systemd made a new one) is stopped."""
    check_listening(fd)
    pid = front_pid(pid_file, backend, fd)
    if pid is not None:
        log.info("the front (PID %d) holds the socket: adopted", pid)
        return pid
    stale = front_pid(pid_file, backend)
    if stale is not None:
        log.info("the front (PID %d) holds an older socket: stopping it", stale)
        os.kill(stale, signal.SIGTERM)
    with contextlib.suppress(FileNotFoundError):
        pid_file.unlink()
    with open(log_file, "ab") as out:
        subprocess.run(["setsid", "-f", sys.executable, "-m", "socketfront", "--fd", str(fd), "--backend",
                        backend, "--pid-file", str(pid_file)], stdin=subprocess.DEVNULL, stdout=out,
                       stderr=out, pass_fds=(fd,), check=True)
    deadline = time.monotonic() + START_TIMEOUT
    while (pid := front_pid(pid_file, backend)) is None:
        if time.monotonic() > deadline:
            raise OSError(f"the front did not start within {START_TIMEOUT:.0f} s (see {log_file})")
        time.sleep(0.05)
    log.info("the front (PID %d) holds the socket", pid)
    return pid


# ------------------------------------------------------------------------------------------- the front


class AckFilter:
    """Passes a client's HTTP/2 bytes (after its preface) through, minus its first SETTINGS ACK frame."""

    def __init__(self) -> None:
        self.done = False
        self._header = b""  # an incomplete frame header
        self._payload = 0  # payload bytes of the current frame still to pass

    def feed(self, data: bytes) -> bytes:
        out = bytearray()
        while data and not self.done:
            if self._payload:
                n = min(self._payload, len(data))
                out += data[:n]
                data, self._payload = data[n:], self._payload - n
                continue
            need = FRAME_HEADER - len(self._header)
            self._header, data = self._header + data[:need], data[need:]
            if len(self._header) < FRAME_HEADER:
                break
            header, self._header = self._header, b""
            length = int.from_bytes(header[:3], "big")
            if header[3] == SETTINGS and header[4] & ACK and length == 0:
                self.done = True  # the answer to our own preface: the snapshotter never sent it
                continue
            out += header
            self._payload = length
        return bytes(out + data)


class Front:
    """Accepts on the listening socket `fd` and relays each connection to the unix socket `backend`."""

    def __init__(self, fd: int, backend: str) -> None:
        self.listener = socket.socket(fileno=fd)
        self.backend = backend
        self.last_backend = time.monotonic()  # when a snapshotter last answered
        self._lock = threading.Lock()

    def _dial(self) -> socket.socket | None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(self.backend)
        except OSError:
            sock.close()
            return None
        with self._lock:
            self.last_backend = time.monotonic()
        return sock

    def idle(self) -> bool:
        with self._lock:
            return time.monotonic() - self.last_backend > IDLE_EXIT

    def serve(self) -> None:
        """Accept until IDLE_EXIT seconds pass without a snapshotter (or the listener is closed)."""
        self.listener.settimeout(CHECK)
        while True:
            try:
                client, _ = self.listener.accept()
            except TimeoutError:
                backend = self._dial()
                if backend is not None:
                    backend.close()
                elif self.idle():
                    log.info("no snapshotter for %.0f s: exiting", IDLE_EXIT)
                    return
                continue
            except OSError as e:  # e.g. EMFILE: wait for a descriptor to be freed, not spin
                if self.listener.fileno() < 0:
                    return  # closed
                log.warning("accepting a connection: %s", e)
                time.sleep(1.0)
                continue
            threading.Thread(target=self._connection, args=(client,), daemon=True).start()

    def _connection(self, client: socket.socket) -> None:
        backend, pending, acks = self._dial(), b"", None
        client.settimeout(IDLE_EXIT)  # for the preface, while no snapshotter serves
        try:
            if backend is None:
                backend, pending, acks = self._hold(client)
                if backend is None:
                    return
            client.settimeout(None)
            backend.sendall(pending)
            back = threading.Thread(target=self._pump, args=(backend, client, None), daemon=True)
            back.start()
            self._pump(client, backend, acks)
            back.join()
        except OSError:
            pass
        finally:
            client.close()
            if backend is not None:
                backend.close()

    def _hold(self, client: socket.socket) -> tuple[socket.socket | None, bytes, AckFilter | None]:
        """While no snapshotter serves: answer the HTTP/2 preface, keep what the client sends until one
        does.  (the snapshotter's connection or None, what to send it first, the filter still needed)."""
        received = b""
        while len(received) < len(HTTP2_PREFACE):
            data = client.recv(len(HTTP2_PREFACE) - len(received))
            if not data:
                return None, b"", None
            received += data
        if received != HTTP2_PREFACE:
            return None, b"", None  # not HTTP/2: nothing to answer for it
        client.sendall(EMPTY_SETTINGS)
        acks, pending = AckFilter(), bytearray(received)
        while True:
            backend = self._dial()
            if backend is not None:
                return backend, bytes(pending), None if acks.done else acks
            if self.idle():
                return None, b"", None
            readable, _, _ = select.select([client], [], [], RETRY)
            if readable:
                data = client.recv(CHUNK)
                if not data:
                    return None, b"", None
                pending += acks.feed(data)

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket, acks: AckFilter | None) -> None:
        """Copy source to sink (through `acks` until it is done) until either side ends, then end both."""
        try:
            while data := source.recv(CHUNK):
                if acks is not None and not acks.done:
                    data = acks.feed(data)
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


def main(argv: list[str] | None = None) -> int:
    """`python -m socketfront --fd N --backend SOCKET --pid-file FILE`: serve until idle or SIGTERM."""
    parser = argparse.ArgumentParser(prog="socketfront", description=__doc__.splitlines()[0])
    parser.add_argument("--fd", type=int, required=True, help="the listening socket, inherited")
    parser.add_argument("--backend", required=True, help="the snapshotter's private unix socket")
    parser.add_argument("--pid-file", required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s lazymount-front %(levelname)s: %(message)s")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    front = Front(args.fd, args.backend)
    pid_file = Path(args.pid_file)
    stamp = f"{os.getpid()} {os.fstat(args.fd).st_ino}"
    pid_file.write_text(stamp)
    log.info("holding the snapshotter's socket, relaying to %s", args.backend)
    try:
        front.serve()
    finally:
        with contextlib.suppress(OSError):
            if pid_file.read_text() == stamp:
                pid_file.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
