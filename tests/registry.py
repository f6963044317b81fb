"""Real registries on loopback for tests: docker-registry, a JWT token issuer, a fault proxy, an object store.

What belongs here: starting Debian's docker-registry (Distribution 2.8) on a free 127.0.0.1 port with a
temp storage dir, anonymous or behind htpasswd basic auth or token auth; the token issuer those tokens
come from (RS256 JWTs signed with a key generated per run, its self-signed certificate given to the
registry as rootcertbundle); a fault-injecting HTTP proxy to put between a client and a registry; a tiny
"object storage" server for redirects; building small OCI layouts and pushing them with skopeo.
What never does: assertions (tests/test_*.py) or any code under test. Nothing here mocks the client:
every byte the client sees comes from the real registry, possibly bent by the proxy.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import gzip
import hashlib
import http.client
import http.server
import io
import ipaddress
import json
import logging
import os
import random
import secrets
import shutil
import socket
import ssl
import struct
import subprocess
import tarfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import bcrypt
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

from imagebuild import add_blob, write_oci_layout
from toc import MEDIA_OCI_CONFIG, MEDIA_OCI_INDEX, MEDIA_OCI_MANIFEST, REF_NAME_ANNOTATION

log = logging.getLogger(__name__)

USERNAME = "lazy-user"
PASSWORD = "s3cr3t-Pa55word-never-logged"  # distinctive: tests grep logs and errors for it
SERVICE = "lazymount-test-registry"
ISSUER = "lazymount-test-issuer"
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
               "proxy-authorization", "proxy-authenticate", "content-length"}


def stop_process(process: subprocess.Popen) -> None:
    """Terminate a child process by its PID and reap it (killed if it lingers for 10 s)."""
    process.terminate()
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------- small HTTP servers


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt: str, *args: object) -> None:
        log.debug("%s: " + fmt, type(self).__name__, *args)

    def reply(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))


class HTTPService:
    """A ThreadingHTTPServer on a free loopback port, serving `handler` from a thread until stop()."""

    def __init__(self, handler: type[_Handler]) -> None:
        self.stop_event = threading.Event()
        self.server = _Server(("127.0.0.1", 0), handler)
        self.server.service = self  # type: ignore[attr-defined]
        self.port = self.server.server_address[1]
        self.host = f"127.0.0.1:{self.port}"
        self.url = f"http://{self.host}"
        self.seen: list[tuple[str, str, dict[str, str]]] = []
        self.lock = threading.Lock()
        self._thread = threading.Thread(target=self.server.serve_forever, name=handler.__name__, daemon=True)
        self._thread.start()

    def record(self, handler: _Handler) -> None:
        with self.lock:
            self.seen.append((handler.command, handler.path, dict(handler.headers.items())))

    def stop(self) -> None:
        self.stop_event.set()  # releases stalled handlers
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(10)


# ---------------------------------------------------------------------------------------- token issuer


def _self_signed(key: rsa.RSAPrivateKey, common_name: str, ip: str | None = None) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(hours=1))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True))
    if ip is not None:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))]), critical=False)
    return builder.sign(key, hashes.SHA256())


def write_self_signed(cert_path: Path, key_path: Path, ip: str) -> None:
    """A new key and a self-signed CA certificate valid for `ip`, as PEM files."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    cert_path.write_bytes(_self_signed(key, ip, ip).public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def libtrust_key_id(public_key: rsa.RSAPublicKey) -> str:
    """docker/libtrust's key ID (what Distribution 2.x matches a JWT `kid` against).

    SHA-256 of the DER SubjectPublicKeyInfo, first 240 bits, base32 without padding, in 12 groups of 4
    joined by ':'.
    """
    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    text = base64.b32encode(hashlib.sha256(der).digest()[:30]).decode("ascii").rstrip("=")
    return ":".join(text[i:i + 4] for i in range(0, len(text), 4))


class _TokenHandler(_Handler):
    def do_GET(self) -> None:  # noqa: N802 -- http.server's naming
        issuer: TokenIssuer = self.server.service  # type: ignore[attr-defined]
        issuer.record(self)
        url = urlsplit(self.path)
        if url.path != "/token":
            self.reply(404)
            return
        query = parse_qs(url.query)
        user = issuer.authenticate(self.headers.get("Authorization"))
        if user is None:
            self.reply(401, b'{"errors":[{"code":"UNAUTHORIZED"}]}', {"Content-Type": "application/json"})
            return
        scopes = [s for value in query.get("scope", []) for s in value.split()]
        token = issuer.issue(user, query.get("service", [""])[0], scopes)
        body = json.dumps({"token": token, "access_token": token, "expires_in": 300}).encode()
        self.reply(200, body, {"Content-Type": "application/json"})


class TokenIssuer(HTTPService):
    """A Docker token service: anonymous callers get pull, the test user gets what it asks for."""

    def __init__(self, workdir: Path) -> None:
        super().__init__(_TokenHandler)
        self.cert_path = workdir / "token-issuer.pem"
        self.realm = f"{self.url}/token"
        self.issued: list[str] = []
        self.rotate_key()

    def rotate_key(self) -> None:
        """Sign with a new key from now on (a registry must be restarted to trust its certificate)."""
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        cert = _self_signed(self.key, ISSUER)
        self.cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        self.kid = libtrust_key_id(self.key.public_key())

    def authenticate(self, header: str | None) -> str | None:
        """'' for anonymous, the user name for good basic credentials, None for bad ones."""
        if not header:
            return ""
        scheme, _, value = header.partition(" ")
        try:
            user, _, password = base64.b64decode(value).decode().partition(":")
        except ValueError:
            return None
        ok = scheme.lower() == "basic" and user == USERNAME and password == PASSWORD
        return user if ok else None

    def issue(self, user: str, service: str, scopes: list[str]) -> str:
        access = []
        for scope in scopes:
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            granted = [a for a in actions.split(",") if a == "pull" or user]
            access.append({"type": kind, "name": name, "actions": granted})
        now = int(time.time())
        header = {"typ": "JWT", "alg": "RS256", "kid": self.kid}
        claims = {"iss": ISSUER, "sub": user, "aud": service, "exp": now + 300, "nbf": now - 60, "iat": now,
                  "jti": secrets.token_hex(8), "access": access}
        signing_input = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        signature = self.key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        token = f"{signing_input}.{_b64url(signature)}"
        with self.lock:
            self.issued.append(token)
        return token


# ------------------------------------------------------------------------------------- docker-registry


class Registry:
    """Debian's docker-registry on 127.0.0.1:<free port>; auth is 'anonymous', 'basic' or 'token'."""

    def __init__(self, workdir: Path, auth: str = "anonymous", tls: bool = False) -> None:
        self.workdir, self.auth = workdir, auth
        # With tls, the registry serves HTTPS with a self-signed certificate for 127.0.0.1 (`ca_file`).
        self.ca_file: Path | None = workdir / "registry-cert.pem" if tls else None
        self.username, self.password = USERNAME, PASSWORD
        self.token_issuer: TokenIssuer | None = None
        self.process: subprocess.Popen | None = None
        self.port = 0

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"{'https' if self.ca_file else 'http'}://{self.host}"

    def _config(self) -> dict:
        config = {"version": 0.1, "log": {"level": "info", "accesslog": {"disabled": True}},
                  "storage": {"filesystem": {"rootdirectory": str(self.workdir / "storage")},
                              "delete": {"enabled": True}},
                  "http": {"addr": self.host, "secret": secrets.token_hex(16)}}
        if self.ca_file is not None:
            key_path = self.workdir / "registry-key.pem"
            write_self_signed(self.ca_file, key_path, "127.0.0.1")
            config["http"]["tls"] = {"certificate": str(self.ca_file), "key": str(key_path)}
        if self.auth == "basic":
            htpasswd = self.workdir / "htpasswd"
            hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=5)).decode()
            htpasswd.write_text(f"{USERNAME}:{hashed}\n")
            config["auth"] = {"htpasswd": {"realm": "lazymount-test", "path": str(htpasswd)}}
        elif self.auth == "token":
            assert self.token_issuer is not None
            config["auth"] = {"token": {"realm": self.token_issuer.realm, "service": SERVICE,
                                        "issuer": ISSUER, "rootcertbundle": str(self.token_issuer.cert_path)}}
        return config

    def start(self) -> Registry:
        if shutil.which("docker-registry") is None:
            raise RuntimeError("docker-registry is not installed (Debian package docker-registry)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.auth == "token":
            self.token_issuer = TokenIssuer(self.workdir)
        for _ in range(5):  # the free port may be taken between probe and bind
            self.port = free_port()
            if self._launch():
                return self
        raise RuntimeError(f"docker-registry did not start; see {self.workdir / 'registry.log'}")

    def restart(self) -> None:
        """Stop and start again on the same port and storage (picking up a rotated token key)."""
        self.stop()
        if not self._launch():
            raise RuntimeError(f"docker-registry did not restart; see {self.workdir / 'registry.log'}")

    def _launch(self) -> bool:
        config_path = self.workdir / "config.yml"
        config_path.write_text(yaml.safe_dump(self._config()))
        with open(self.workdir / "registry.log", "ab") as logfile:
            self.process = subprocess.Popen(["docker-registry", "serve", str(config_path)],
                                            stdout=logfile, stderr=subprocess.STDOUT)
        if self._wait_ready():
            return True
        self.stop()
        return False

    def _wait_ready(self, timeout: float = 30.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                return False
            with contextlib.suppress(OSError):
                if self.ca_file is None:
                    conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                else:
                    context = ssl.create_default_context(cafile=self.ca_file)
                    conn = http.client.HTTPSConnection("127.0.0.1", self.port, timeout=2, context=context)
                conn.request("GET", "/v2/")
                status = conn.getresponse().status
                conn.close()
                if status in (200, 401):
                    return True
            time.sleep(0.05)
        return False

    def stop(self) -> None:
        """Stop the registry process (by its PID), leaving the token issuer running."""
        if self.process is not None:
            stop_process(self.process)
            self.process = None

    def close(self) -> None:
        """Stop the registry and its token issuer."""
        self.stop()
        if self.token_issuer is not None:
            self.token_issuer.stop()

    def credentials(self) -> dict[str, tuple[str, str]]:
        """Explicit credentials for RegistryClient (empty for an anonymous registry)."""
        return {} if self.auth == "anonymous" else {self.host: (USERNAME, PASSWORD)}


# ------------------------------------------------------------------------------------------ fault proxy


@dataclass
class Fault:
    """One misbehaviour of FaultProxy, for requests whose path contains `path` (and method, if set).

    kinds: 'status' (answer `status` with `headers`, no body), 'reset' (half the body, then close),
    'stall' (wait `seconds` before answering; with `partial`, after half the body), 'delay' (wait
    `seconds`, then answer in full), 'ignore_range'
    (forward without Range: the registry answers 200 whole), 'reject_multirange' (400 to multi-range),
    'whole_multirange' (multi-range answered 200 whole), 'bad_content_range' (206 with a shifted
    Content-Range), 'redirect' (307 to `target` + the same path, with a fake signature), 'corrupt'
    (flip the last byte of the body), 'trickle' (the whole answer, status line and headers too, one byte
    every `seconds`).
    `times` < 0 means forever.
    """

    kind: str
    path: str = "/blobs/"
    method: str | None = None
    times: int = 1
    status: int = 503
    headers: dict[str, str] = field(default_factory=dict)
    seconds: float = 30.0
    partial: bool = False
    target: str = ""


class _ProxyHandler(_Handler):
    def do_GET(self) -> None:  # noqa: N802 -- http.server's naming
        proxy: FaultProxy = self.server.service  # type: ignore[attr-defined]
        proxy.record(self)
        data = self.body()
        fault = proxy.take(self.command, self.path, self.headers.get("Range", ""))
        kind = fault.kind if fault else ""
        if kind == "status":
            self.reply(fault.status, b"", fault.headers)
            return
        if kind == "redirect":
            signed = f"{fault.target}{self.path}?X-Signature={secrets.token_hex(8)}"
            self.reply(307, b"", {"Location": signed})
            return
        if kind == "reject_multirange":
            self.reply(400, b"multi-range not supported")
            return
        if kind == "delay" or (kind == "stall" and not fault.partial):
            proxy.stop_event.wait(fault.seconds)
        headers = {k: v for k, v in self.headers.items()
                   if not (kind in ("ignore_range", "whole_multirange") and k.lower() == "range")}
        status, reply_headers, body = proxy.forward(self.command, self.path, headers, data)
        if kind == "corrupt" and body:
            body = body[:-1] + bytes([body[-1] ^ 0xFF])
        if kind == "trickle":
            self._trickle(status, reply_headers, body, fault.seconds)
            return
        if kind == "bad_content_range" and status == 206:
            start, end_total = reply_headers["Content-Range"].split("-", 1)
            end, total = end_total.split("/")
            reply_headers["Content-Range"] = f"{start[:6]}{int(start[6:]) + 1}-{int(end) + 1}/{total}"
        self.send_response(status)
        for key, value in reply_headers.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command == "HEAD":
            return
        if kind in ("reset", "stall"):
            self.wfile.write(body[:len(body) // 2])
            self.wfile.flush()
            if kind == "stall":
                proxy.stop_event.wait(fault.seconds)
            # SO_LINGER 0: closing sends RST, the client sees the body end early.
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True
            return
        self.wfile.write(body)

    do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_GET  # noqa: N815

    def _trickle(self, status: int, headers: dict[str, str], body: bytes, seconds: float) -> None:
        proxy: FaultProxy = self.server.service  # type: ignore[attr-defined]
        head = f"HTTP/1.1 {status} {self.responses.get(status, ('',))[0]}\r\n" + "".join(
            f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
        data = head.encode("latin-1") + (b"" if self.command == "HEAD" else body)
        self.close_connection = True
        for i in range(len(data)):
            try:
                self.wfile.write(data[i:i + 1])
                self.wfile.flush()
            except OSError:  # the client gave up
                return
            if proxy.stop_event.wait(seconds):
                return


class FaultProxy(HTTPService):
    """An HTTP proxy to `upstream` (host:port) that misbehaves as told by its `faults` list.

    The Host header is passed through, so the registry's upload Locations point back at the proxy.
    """

    def __init__(self, upstream: str) -> None:
        super().__init__(_ProxyHandler)
        self.upstream = upstream
        self.faults: list[Fault] = []
        self.applied: list[str] = []

    def add(self, *faults: Fault) -> FaultProxy:
        with self.lock:
            self.faults.extend(faults)
        return self

    def take(self, method: str, path: str, range_header: str) -> Fault | None:
        """The first fault that applies to this request (spending one of its `times`)."""
        with self.lock:
            for fault in self.faults:
                if fault.path not in path or fault.method not in (None, method) or fault.times == 0:
                    continue
                if fault.kind in ("reject_multirange", "whole_multirange") and "," not in range_header:
                    continue
                if fault.kind == "bad_content_range" and not range_header:
                    continue
                fault.times -= 1
                self.applied.append(fault.kind)
                return fault
        return None

    def forward(self, method: str, path: str, headers: dict[str, str],
                data: bytes) -> tuple[int, dict[str, str], bytes]:
        host, port = self.upstream.rsplit(":", 1)
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        try:
            sent = {k: v for k, v in headers.items() if k.lower() not in _HOP_BY_HOP}
            conn.request(method, path, body=data if data or method in ("PUT", "POST", "PATCH") else None,
                         headers=sent)
            resp = conn.getresponse()
            body = resp.read()
            reply = {k: v for k, v in resp.getheaders() if k.lower() not in _HOP_BY_HOP}
            reply["Content-Length"] = resp.getheader("Content-Length", "0") if method == "HEAD" \
                else str(len(body))
            return resp.status, reply, body
        finally:
            conn.close()


# ------------------------------------------------------------------------------------- object storage


class _StoreHandler(_Handler):
    def do_GET(self) -> None:  # noqa: N802 -- http.server's naming
        store: ObjectStore = self.server.service  # type: ignore[attr-defined]
        store.record(self)
        digest = urlsplit(self.path).path.rsplit("/", 1)[-1]
        with store.lock:
            deny = store.deny > 0
            store.deny -= deny
        if deny:
            self.reply(403, b"<Error><Code>AccessDenied</Code><Message>Request has expired</Message></Error>")
            return
        data = store.blobs.get(digest)
        if data is None:
            self.reply(404)
            return
        spec = self.headers.get("Range", "")
        if spec.startswith("bytes=") and "," not in spec:
            first, _, last = spec[6:].partition("-")
            start, end = int(first), min(int(last), len(data) - 1)
            self.reply(206, data[start:end + 1], {"Content-Range": f"bytes {start}-{end}/{len(data)}"})
            return
        self.reply(200, data)

    do_HEAD = do_GET  # noqa: N815


class ObjectStore(HTTPService):
    """Redirect target for blob GETs: serves `blobs` by digest (single ranges), 403 for the first `deny`."""

    def __init__(self, blobs: dict[str, bytes]) -> None:
        super().__init__(_StoreHandler)
        self.blobs = blobs
        self.deny = 0


# ------------------------------------------------------------------------------------------ test images


@dataclass
class TestImage:
    """A one-layer OCI layout built for the tests, and what is in it."""

    __test__ = False  # not a pytest test class
    layout: Path
    tag: str
    manifest_digest: str
    layer_digest: str
    layer: bytes
    config_digest: str


def make_test_image(workdir: Path, tag: str = "v1", seed: int = 1, payload_size: int = 600_000) -> TestImage:
    """An OCI layout at workdir/layout whose gzip layer holds incompressible `payload_size` bytes."""
    rng = random.Random(seed)
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        files = (("hello.txt", b"hello from lazymount\n"), ("data.bin", rng.randbytes(payload_size)))
        for name, data in files:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 1_700_000_000, 0o644
            tar.addfile(info, io.BytesIO(data))
    workdir.mkdir(parents=True, exist_ok=True)
    layer_path = workdir / "layer.tar.gz"
    layer_path.write_bytes(gzip.compress(raw.getvalue(), mtime=0))
    layout = write_oci_layout(workdir / "layout", tag, [layer_path])
    index = json.loads((layout / "index.json").read_text())
    manifest_digest = index["manifests"][0]["digest"]
    manifest = json.loads((layout / "blobs" / "sha256" / manifest_digest[7:]).read_text())
    return TestImage(layout, tag, manifest_digest, manifest["layers"][0]["digest"], layer_path.read_bytes(),
                     manifest["config"]["digest"])


def add_platform_index(layout: Path, tag: str, platforms: list[str]) -> str:
    """Tag `tag` in `layout` as an OCI index with one entry per platform, all pointing to the image's
    manifest but each with its own config (so each platform has a distinct manifest). Return its digest."""
    blobs = layout / "blobs" / "sha256"
    index = json.loads((layout / "index.json").read_text())
    base = json.loads((blobs / index["manifests"][0]["digest"][7:]).read_text())
    entries = []
    for plat in platforms:
        os_name, arch, *variant = plat.split("/")
        config = {"architecture": arch, "os": os_name, "rootfs": {"type": "layers", "diff_ids": []}}
        if variant:
            config["variant"] = variant[0]
        config_digest, config_size = add_blob(layout, json.dumps(config).encode())
        manifest = dict(base, config={"mediaType": MEDIA_OCI_CONFIG, "digest": config_digest,
                                      "size": config_size})
        manifest_digest, manifest_size = add_blob(layout, json.dumps(manifest).encode())
        entry_platform = {"os": os_name, "architecture": arch} | ({"variant": variant[0]} if variant else {})
        entries.append({"mediaType": MEDIA_OCI_MANIFEST, "digest": manifest_digest, "size": manifest_size,
                        "platform": entry_platform})
    index_digest, index_size = add_blob(layout, json.dumps({"schemaVersion": 2, "mediaType": MEDIA_OCI_INDEX,
                                                            "manifests": entries}).encode())
    index["manifests"].append({"mediaType": MEDIA_OCI_INDEX, "digest": index_digest, "size": index_size,
                               "annotations": {REF_NAME_ANNOTATION: tag}})
    (layout / "index.json").write_text(json.dumps(index))
    return index_digest


def skopeo(*args: str, registry: Registry | None = None,
           creds_flag: str = "--dest-creds") -> subprocess.CompletedProcess:
    """Run skopeo; for an auth registry, pass the test user's credentials with `creds_flag`."""
    creds: list[str] = []
    if registry is not None and registry.auth != "anonymous":
        creds = [creds_flag, f"{USERNAME}:{PASSWORD}"]
    env = dict(os.environ, HOME=str(registry.workdir if registry else Path.cwd()))
    return subprocess.run(["skopeo", "--insecure-policy", *args, *creds], check=True, capture_output=True,
                          text=True, timeout=120, env=env)


def push_layout(image_layout: Path, tag: str, registry: Registry, repository: str,
                all_images: bool = False) -> None:
    """Copy `oci:LAYOUT:TAG` to `docker://REGISTRY/REPOSITORY:TAG` with skopeo, digests preserved."""
    skopeo("copy", "--dest-tls-verify=false", "--preserve-digests", *(["--all"] if all_images else []),
           f"oci:{image_layout}:{tag}", f"docker://{registry.host}/{repository}:{tag}", registry=registry)
