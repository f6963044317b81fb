"""socketfront.py without containerd: sd_listen_fds semantics, the SETTINGS-ACK filter over any cut of a
client's byte stream, and a gRPC call made while no server runs, answered once one starts behind the
front (grpcio as the client; test_snapshotter_restarts.py has containerd's grpc-go)."""

from __future__ import annotations

import os
import socket
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

import socketfront


def _frame(kind: int, flags: int, payload: bytes = b"", stream: int = 0) -> bytes:
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big") + payload


def test_listen_fds(monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[int] = []
    monkeypatch.setattr(socketfront.os, "set_inheritable", lambda fd, flag: made.append(fd))
    for pid, count, expected in [(os.getpid(), "2", [3, 4]), (os.getpid() + 1, "1", []), (None, None, [])]:
        for name, value in (("LISTEN_PID", pid), ("LISTEN_FDS", count), ("LISTEN_FDNAMES", "snapshotter")):
            if value is None:
                monkeypatch.delenv(name, raising=False)
            else:
                monkeypatch.setenv(name, str(value))
        assert socketfront.listen_fds() == expected
        assert not {"LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"} & set(os.environ), "unset once read"
    assert made == [3, 4], "passed descriptors are not inherited by children"


def test_ack_filter_drops_the_first_settings_ack_only() -> None:
    ack = _frame(socketfront.SETTINGS, socketfront.ACK)
    before = _frame(socketfront.SETTINGS, 0, b"\0\x04\0\x01\0\0") + _frame(8, 0, b"\0\x0f\0\x01")
    after = _frame(1, 4, ack * 3, stream=1) + ack + _frame(0, 1, b"data", stream=1)  # an ACK as payload
    stream = before + ack + after
    for size in (1, 2, 9, 10, len(stream)):
        acks = socketfront.AckFilter()
        out = b"".join(acks.feed(stream[i:i + size]) for i in range(0, len(stream), size))
        assert out == before + after and acks.done, size


def test_a_call_waits_at_the_front_until_a_server_serves(tmp_path: Path) -> None:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(tmp_path / "front.sock"))
    listener.listen(16)
    backend = tmp_path / "grpc.sock"
    front = socketfront.Front(os.dup(listener.fileno()), str(backend))  # its own descriptor, as it inherits
    threading.Thread(target=front.serve, daemon=True).start()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    server.add_insecure_port(f"unix:{backend}")
    channel = grpc.insecure_channel(f"unix:{tmp_path / 'front.sock'}")
    try:
        answer: list[object] = []
        call = threading.Thread(target=lambda: answer.append(health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=60)))
        call.start()
        time.sleep(2)  # longer than grpc-go waits for a server's handshake
        assert call.is_alive() and not answer, "the call waits"
        server.start()
        call.join(60)
        assert [a.status for a in answer] == [health_pb2.HealthCheckResponse.SERVING]
        server.stop(None)  # the connection ends with its server; the next call waits for the next one
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        server.add_insecure_port(f"unix:{backend}")
        threading.Timer(1.0, server.start).start()
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=60).status
        assert status == health_pb2.HealthCheckResponse.SERVING
    finally:
        channel.close()
        server.stop(None)
        front.listener.close()  # its accept loop ends within socketfront.CHECK seconds
        listener.close()
