"""Tests of fetch.py and regclient.py against Debian's real docker-registry on 127.0.0.1 (anonymous,
htpasswd, token auth), with faults injected by a proxy between client and registry (tests/registry.py).
No mocks.

Every test also checks that no credential (password, basic header, issued token) reached the log.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import json
import logging
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import toc
from config import Config, InvalidInputError, RegistryConfig, parse_reference
from fetch import RegistryBlobReader, open_image
from regclient import AuthError, NotFoundError, RegistryClient, RegistryError
from tests import registry as reg
from tests.registry import PASSWORD, USERNAME, Fault, FaultProxy, ObjectStore, Registry

REPO = "test/img"
FAST = RegistryConfig(connect_timeout=2.0, read_timeout=2.0, retries=4, retry_backoff=0.02,
                      operation_timeout=20.0)
BOUND = 60.0  # a timeout for calls that must end on their own, never a pass criterion

_issued_tokens: list[str] = []


def bounded(fn: Callable[[], Any], timeout: float = BOUND) -> Any:
    """Run fn in a thread; fail if it has not returned within `timeout`; return or re-raise its result."""
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            result["value"] = fn()
        except BaseException as e:  # noqa: BLE001 -- handed to the test thread
            result["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"call did not end within {timeout}s"
    if "error" in result:
        raise result["error"]
    return result["value"]


@pytest.fixture(autouse=True)
def no_secrets_logged(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Capture everything at DEBUG; afterwards no credential may appear in any log record."""
    caplog.set_level(logging.DEBUG)
    yield
    basic = base64.b64encode(f"{USERNAME}:{PASSWORD}".encode()).decode()
    text = caplog.text + "".join(str(r.args) for r in caplog.records)
    for secret in [PASSWORD, basic, *_issued_tokens]:
        assert secret not in text, "a credential reached the log"


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> reg.TestImage:
    return reg.make_test_image(tmp_path_factory.mktemp("image"))


def _start(tmp_path_factory: pytest.TempPathFactory, auth: str, image: reg.TestImage) -> Registry:
    registry = Registry(tmp_path_factory.mktemp(f"registry-{auth}"), auth)
    try:
        registry.start()
        reg.push_layout(image.layout, image.tag, registry, REPO)
    except BaseException:
        registry.close()
        raise
    return registry


@pytest.fixture(scope="module", params=["anonymous", "basic", "token"])
def registry(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
             image: reg.TestImage) -> Iterator[Registry]:
    r = _start(tmp_path_factory, request.param, image)
    try:
        if r.token_issuer is not None:
            r.token_issuer.issued = _issued_tokens  # shared: every issued token is checked against logs
        yield r
    finally:
        r.close()


@pytest.fixture(scope="module")
def basic_registry(tmp_path_factory: pytest.TempPathFactory, image: reg.TestImage) -> Iterator[Registry]:
    r = _start(tmp_path_factory, "basic", image)
    try:
        yield r
    finally:
        r.close()


@pytest.fixture
def proxy(basic_registry: Registry) -> Iterator[FaultProxy]:
    p = FaultProxy(basic_registry.host)
    try:
        yield p
    finally:
        p.stop()


def client_for(registry: Registry, config: Config | None = None, host: str | None = None) -> RegistryClient:
    creds = {} if registry.auth == "anonymous" else {host or registry.host: (USERNAME, PASSWORD)}
    return RegistryClient(config or Config(defaults=FAST), credentials=creds, auth_files=[])


def blob_gets(service: reg.HTTPService, digest: str) -> list[dict[str, str]]:
    return [headers for method, path, headers in service.seen if method == "GET" and digest in path]


# ------------------------------------------------------------------------- each auth mode, end to end


def test_resolve_read_and_push(registry: Registry, image: reg.TestImage,
                               caplog: pytest.LogCaptureFixture) -> None:
    client = client_for(registry)
    img = open_image(f"{registry.host}/{REPO}:{image.tag}", client=client)
    assert img.digest == image.manifest_digest
    assert img.media_type == toc.MEDIA_OCI_MANIFEST
    assert [d.digest for d in img.layers] == [image.layer_digest]
    assert img.config["rootfs"]["type"] == "layers"
    layer = image.layer
    with img.blob(image.layer_digest) as blob:
        assert blob.size == len(layer)
        assert blob.read_at(0, 10) == layer[:10]
        assert blob.read_at(len(layer) - 5, 100) == layer[-5:]  # clipped at the end
        assert blob.read_at(len(layer) + 10, 5) == b""
        ranges = [(300_000, 4096), (7, 100), (100, 50), (590_000, 20_000), (0, 0)]
        assert blob.read_ranges(ranges) == [layer[o:o + n] for o, n in ranges]
        assert blob.ranges_supported is True
        assert blob.read_all() == layer
    assert "multi-range" not in caplog.text and "ignores Range" not in caplog.text

    # Push: the same layer by cross-repository mount, a new layer in PATCH chunks, the config whole.
    target = parse_reference(f"{registry.host}/pushed/app")
    assert client.push_blob(target, image.layer_digest, layer, mount_from=REPO) == "mounted"
    extra = os.urandom(300_000)
    extra_digest = "sha256:" + hashlib.sha256(extra).hexdigest()
    assert client.push_blob(target, extra_digest, extra, chunk_size=64 << 10) == "uploaded"
    assert client.push_blob(target, extra_digest, extra) == "exists"
    config = json.dumps({"architecture": "amd64", "os": "linux",
                         "rootfs": {"type": "layers", "diff_ids": []}}).encode()
    config_digest = "sha256:" + hashlib.sha256(config).hexdigest()
    assert client.push_blob(target, config_digest, config) == "uploaded"
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": toc.MEDIA_OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest,
                   "size": len(config)},
        "layers": [img.layers[0].to_json(),
                   {"mediaType": "application/octet-stream", "digest": extra_digest, "size": len(extra)}],
    }).encode()
    digest = client.push_manifest(target, "v2", manifest, toc.MEDIA_OCI_MANIFEST)
    assert digest == "sha256:" + hashlib.sha256(manifest).hexdigest()

    back = open_image(target.with_ref(tag="v2"), client=client)
    assert (back.digest, back.manifest_bytes) == (digest, manifest)
    assert back.blob(extra_digest).read_at(1000, 5000) == extra[1000:6000]
    # An independent client sees the same bytes.
    raw = reg.skopeo("inspect", "--raw", "--tls-verify=false", f"docker://{registry.host}/pushed/app:v2",
                     registry=registry, creds_flag="--creds")
    assert raw.stdout.encode() == manifest


def test_layout_reads_like_registry(image: reg.TestImage, tmp_path: Path) -> None:
    img = open_image(f"oci:{image.layout}:{image.tag}")
    assert (img.digest, [d.digest for d in img.layers]) == (image.manifest_digest, [image.layer_digest])
    with img.blob(image.layer_digest) as blob:
        ranges = [(10, 20), (500_000, 1000)]
        assert blob.read_ranges(ranges) == [image.layer[o:o + n] for o, n in ranges]
        blob.download(tmp_path / "copy")
    assert (tmp_path / "copy").read_bytes() == image.layer
    with pytest.raises(NotFoundError):
        open_image(f"oci:{image.layout}:nosuchtag")


def test_platform_selection(basic_registry: Registry, image: reg.TestImage) -> None:
    index_digest = reg.add_platform_index(image.layout, "multi", ["linux/amd64", "linux/arm64/v8",
                                                                  "linux/arm/v7"])
    reg.push_layout(image.layout, "multi", basic_registry, "test/multi", all_images=True)
    client = client_for(basic_registry)
    for ref in (f"{basic_registry.host}/test/multi:multi", f"oci:{image.layout}:multi"):
        arm = open_image(ref, client=client, platform="linux/arm/v7")
        assert arm.config["architecture"] == "arm" and arm.config["variant"] == "v7"
        arm64 = open_image(ref, client=client, platform="linux/arm64")
        assert arm64.config["architecture"] == "arm64"
        assert open_image(ref, client=client, platform="linux/amd64").config["architecture"] == "amd64"
        with pytest.raises(NotFoundError, match="linux/amd64, linux/arm64/v8, linux/arm/v7"):
            open_image(ref, client=client, platform="linux/s390x")
    by_digest = open_image(f"{basic_registry.host}/test/multi@{index_digest}", client=client,
                           platform="linux/arm64/v8")
    assert by_digest.config["architecture"] == "arm64"
    with pytest.raises(InvalidInputError):
        open_image(f"{basic_registry.host}/test/multi:multi", client=client, platform="linux")


def test_concurrent_reads_share_one_client(basic_registry: Registry, image: reg.TestImage) -> None:
    client = client_for(basic_registry)
    blob = RegistryBlobReader(client, f"{basic_registry.host}/{REPO}", image.layer_digest)
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        try:
            for i in range(10):
                offset = (seed * 7919 + i * 104729) % (blob.size - 5000)
                assert blob.read_at(offset, 5000) == image.layer[offset:offset + 5000]
        except BaseException as e:  # noqa: BLE001 -- reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(BOUND)
    assert not errors and not any(t.is_alive() for t in threads)


def test_token_refreshed_on_401(tmp_path: Path, image: reg.TestImage) -> None:
    registry = Registry(tmp_path / "registry", "token")
    try:
        registry.start()
        registry.token_issuer.issued = _issued_tokens
        reg.push_layout(image.layout, image.tag, registry, REPO)
        client = client_for(registry)
        img = open_image(f"{registry.host}/{REPO}:v1", client=client)
        blob = img.blob(image.layer_digest)
        assert blob.read_at(0, 10) == image.layer[:10]
        issued = len(_issued_tokens)
        assert blob.read_at(10, 10) == image.layer[10:20]
        assert len(_issued_tokens) == issued  # the cached token is reused
        registry.token_issuer.rotate_key()
        registry.restart()  # the cached token's key is no longer trusted: 401, new token, retry
        assert blob.read_at(20, 10) == image.layer[20:30]
        assert len(_issued_tokens) == issued + 1
    finally:
        registry.close()


def test_credentials_from_docker_config(basic_registry: Registry, image: reg.TestImage, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"auths": {f"http://{basic_registry.host}": {
        "auth": base64.b64encode(f"{USERNAME}:{PASSWORD}".encode()).decode()}}}))
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path))
    monkeypatch.delenv("REGISTRY_AUTH_FILE", raising=False)
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    img = open_image(f"{basic_registry.host}/{REPO}:v1", Config(defaults=FAST))
    assert img.digest == image.manifest_digest


@pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")
def test_tls_registry(tmp_path: Path, image: reg.TestImage) -> None:
    registry = Registry(tmp_path / "registry", "basic", tls=True)
    try:
        registry.start()
        reg.push_layout(image.layout, image.tag, registry, REPO)
        ref = f"{registry.host}/{REPO}:v1"

        def client(**tls: Any) -> RegistryClient:
            return client_for(registry, Config({registry.host: _with(plain_http=False, **tls)}, FAST))

        assert open_image(ref, client=client(ca_file=str(registry.ca_file))).digest == image.manifest_digest
        with pytest.raises(RegistryError, match="TLS handshake or certificate verification failed"):
            bounded(lambda: open_image(ref, client=client()))
        assert open_image(ref, client=client(insecure=True)).digest == image.manifest_digest
        with pytest.raises(RegistryError):  # a TLS registry is not spoken to in plain HTTP by default
            bounded(lambda: open_image(ref, client=client_for(registry)))
    finally:
        registry.close()


# ------------------------------------------------------------------------------------------- failures


def test_auth_and_not_found_errors(registry: Registry, image: reg.TestImage) -> None:
    ref = f"{registry.host}/{REPO}"
    if registry.auth != "anonymous":
        wrong = RegistryClient(Config(defaults=FAST), credentials={registry.host: (USERNAME, "wrong-pw")},
                               auth_files=[])
        with pytest.raises(AuthError) as info:
            open_image(ref + ":v1", client=wrong)
        assert info.value.errno == errno.EACCES
        assert registry.host in str(info.value) and REPO in str(info.value)
        assert PASSWORD not in str(info.value) and "wrong-pw" not in str(info.value)
        nobody = RegistryClient(Config(defaults=FAST), auth_files=[])
        if registry.auth == "basic":
            with pytest.raises(AuthError, match="requires credentials"):
                open_image(ref + ":v1", client=nobody)
        else:  # anonymous tokens pull but do not push
            assert open_image(ref + ":v1", client=nobody).digest == image.manifest_digest
            with pytest.raises(AuthError):
                nobody.push_blob(ref, "sha256:" + hashlib.sha256(b"x").hexdigest(), b"x")
    client = client_for(registry)
    with pytest.raises(NotFoundError) as info:
        open_image(ref + ":nosuchtag", client=client)
    assert info.value.errno == errno.ENOENT and "manifest nosuchtag" in str(info.value)
    with pytest.raises(NotFoundError):
        RegistryBlobReader(client, ref, "sha256:" + "0" * 64)
    with pytest.raises(InvalidInputError):
        RegistryBlobReader(client, ref, "sha256:../../etc/passwd")
    with pytest.raises(InvalidInputError):
        client.push_blob(ref, "sha256:" + "0" * 64, b"not that")


@pytest.mark.parametrize("status", [500, 503, 429])
def test_transient_status_then_success(proxy: FaultProxy, basic_registry: Registry, image: reg.TestImage,
                                       status: int) -> None:
    headers = {"Retry-After": "1"} if status == 429 else {}
    proxy.add(Fault("status", path="/manifests/", status=status, times=2, headers=headers),
              Fault("status", path="/blobs/", status=status, times=2, headers=headers))
    client = client_for(basic_registry, host=proxy.host)
    img = bounded(lambda: open_image(f"{proxy.host}/{REPO}:v1", client=client))
    assert bounded(lambda: img.blob(image.layer_digest).read_at(1234, 4321)) == image.layer[1234:5555]
    assert proxy.applied.count("status") == 4


def test_persistent_failure_is_a_clear_error(proxy: FaultProxy, basic_registry: Registry) -> None:
    proxy.add(Fault("status", path="/manifests/", status=503, times=-1))
    client = client_for(basic_registry, host=proxy.host)
    with pytest.raises(RegistryError) as info:
        bounded(lambda: open_image(f"{proxy.host}/{REPO}:v1", client=client))
    message = str(info.value)
    assert proxy.host in message and REPO in message and "manifest v1" in message and "HTTP 503" in message
    assert "5 attempt" in message


def test_reset_mid_body(proxy: FaultProxy, basic_registry: Registry, image: reg.TestImage) -> None:
    proxy.add(Fault("reset", path="/manifests/"), Fault("reset", times=2))
    client = client_for(basic_registry, host=proxy.host)
    img = bounded(lambda: open_image(f"{proxy.host}/{REPO}:v1", client=client))
    blob = img.blob(image.layer_digest)
    assert bounded(lambda: blob.read_at(100_000, 200_000)) == image.layer[100_000:300_000]
    assert bounded(blob.read_all) == image.layer
    assert proxy.applied.count("reset") == 3


def test_server_ignoring_range_downloads_once(proxy: FaultProxy, basic_registry: Registry,
                                              image: reg.TestImage, tmp_path: Path,
                                              caplog: pytest.LogCaptureFixture) -> None:
    proxy.add(Fault("ignore_range", times=-1))
    client = client_for(basic_registry, host=proxy.host)
    img = open_image(f"{proxy.host}/{REPO}:v1", client=client)
    spill = tmp_path / "layer.blob"
    with img.blob(image.layer_digest, spill_path=spill) as blob:
        for offset, length in [(0, 10), (500_000, 777), (77, 100_000)]:
            assert blob.read_at(offset, length) == image.layer[offset:offset + length]
        assert blob.read_ranges([(1, 2), (3, 4)]) == [image.layer[1:3], image.layer[3:7]]
        assert blob.ranges_supported is False
    assert spill.read_bytes() == image.layer  # kept for the caller to reuse
    assert len(blob_gets(proxy, image.layer_digest)) == 1
    assert caplog.text.count("ignores Range") == 1
    with img.blob(image.layer_digest, spill_path=spill) as again:  # reuses the verified copy
        assert again.read_ranges([(5, 5), (9, 9)]) == [image.layer[5:10], image.layer[9:18]]
    assert len(blob_gets(proxy, image.layer_digest)) == 2  # one probe; the 200 body was not needed
    with img.blob(image.layer_digest) as temp_spill:  # anonymous temp file
        assert temp_spill.read_at(42, 42) == image.layer[42:84]


@pytest.mark.parametrize("kind", ["reject_multirange", "whole_multirange"])
def test_multirange_fallback(proxy: FaultProxy, basic_registry: Registry, image: reg.TestImage,
                             caplog: pytest.LogCaptureFixture, kind: str) -> None:
    proxy.add(Fault(kind, times=-1))
    client = client_for(basic_registry, host=proxy.host)
    blob = RegistryBlobReader(client, f"{proxy.host}/{REPO}", image.layer_digest)
    ranges = [(10, 10), (1000, 10), (50_000, 60_000)]
    for _ in range(3):
        assert blob.read_ranges(ranges) == [image.layer[o:o + n] for o, n in ranges]
    assert blob.ranges_supported is True
    assert caplog.text.count("does not answer multi-range") == 1
    multi = [h for h in blob_gets(proxy, image.layer_digest) if "," in h.get("Range", "")]
    assert len(multi) == 1  # asked once, then single ranges only
    assert proxy.applied == [kind]


def test_multirange_is_used_when_supported(proxy: FaultProxy, basic_registry: Registry,
                                           image: reg.TestImage) -> None:
    client = client_for(basic_registry, host=proxy.host)
    blob = RegistryBlobReader(client, f"{proxy.host}/{REPO}", image.layer_digest)
    ranges = [(i * 9000, 100) for i in range(60)] + [(5, 5)]
    assert blob.read_ranges(ranges) == [image.layer[o:o + n] for o, n in ranges]
    gets = blob_gets(proxy, image.layer_digest)
    assert len(gets) == 1 and gets[0]["Range"].count(",") == 59  # (0,100) and (5,5) merged


class ListSink:
    """A `regclient.BlobSink` that keeps what it is given; `finish` checks it against `digest`."""

    def __init__(self, digest: str) -> None:
        self.digest, self.parts, self.resets = digest, [], 0

    def reset(self) -> None:
        self.parts.clear()
        self.resets += 1

    def write(self, data: bytes) -> None:
        self.parts.append(data)

    def finish(self) -> None:
        if "sha256:" + hashlib.sha256(b"".join(self.parts)).hexdigest() != self.digest:
            raise ValueError("digest mismatch (test sink)")


def test_client_read_spans_and_download(basic_registry: Registry, image: reg.TestImage) -> None:
    client = client_for(basic_registry)
    ref, digest, size = f"{basic_registry.host}/{REPO}", image.layer_digest, len(image.layer)
    whole: list[Any] = []
    spans = [(0, 10), (1000, 6000), (size - 7, size)]
    assert client.read_spans(ref, digest, size, spans, whole.append) == [image.layer[s:e] for s, e in spans]
    assert client.read_spans(ref, digest, size, [(5, 9)], whole.append) == [image.layer[5:9]]
    assert whole == []  # Range is answered: the whole-blob callback is never called
    sink = ListSink(digest)
    client.download(ref, digest, size, sink)
    assert b"".join(sink.parts) == image.layer and sink.resets == 1
    with pytest.raises(RegistryError, match="digest mismatch"):  # the sink's ValueError, with context
        client.download(ref, digest, size, ListSink("sha256:" + "0" * 64))
    with pytest.raises(InvalidInputError):
        client.read_spans(ref, "sha256:../x", size, [(0, 1)], whole.append)


def test_client_read_spans_when_range_is_ignored(proxy: FaultProxy, basic_registry: Registry,
                                                 image: reg.TestImage) -> None:
    proxy.add(Fault("ignore_range", times=-1))
    client = client_for(basic_registry, host=proxy.host)
    ref, digest = f"{proxy.host}/{REPO}", image.layer_digest
    size = client.blob_size(ref, digest)  # (a HEAD, which also settles auth before the GETs counted)
    assert size == len(image.layer)
    sinks: list[ListSink] = []

    def take_whole(fill: Callable[[ListSink], None]) -> None:
        sinks.append(ListSink(digest))
        fill(sinks[-1])

    assert client.read_spans(ref, digest, size, [(3, 9)], take_whole) is None
    assert [b"".join(s.parts) for s in sinks] == [image.layer]
    assert len(blob_gets(proxy, digest)) == 1  # the 200 answer's body was the download
    assert client.read_spans(ref, digest, size, [(3, 9)], lambda fill: None) is None
    assert len(blob_gets(proxy, digest)) == 2  # a caller with the blob need not take it


def test_redirect_never_forwards_authorization(proxy: FaultProxy, basic_registry: Registry,
                                               image: reg.TestImage) -> None:
    store = ObjectStore({image.layer_digest: image.layer})
    try:
        proxy.add(Fault("redirect", path=f"/blobs/{image.layer_digest}", target=store.url, times=-1))
        client = client_for(basic_registry, host=proxy.host)
        img = open_image(f"{proxy.host}/{REPO}:v1", client=client)
        blob = img.blob(image.layer_digest)
        assert blob.read_at(300, 3000) == image.layer[300:3300]
        store.deny = 1  # the signed URL "expired": the client must ask the registry again, once
        assert blob.read_at(9, 9) == image.layer[9:18]
        assert blob.read_all() == image.layer
        assert len(store.seen) == 4
        assert all("Authorization" not in headers for _, _, headers in store.seen)
        to_registry = blob_gets(proxy, image.layer_digest)
        assert all(h.get("Authorization", "").startswith("Basic ") for h in to_registry)
        store.deny = 2
        with pytest.raises(AuthError, match="HTTP 403"):
            blob.read_at(0, 1)
    finally:
        store.stop()


def test_dead_mirror_then_live_origin(proxy: FaultProxy, basic_registry: Registry, image: reg.TestImage,
                                      caplog: pytest.LogCaptureFixture) -> None:
    dead = f"http://127.0.0.1:{reg.free_port()}"
    config = Config({proxy.host: RegistryConfig(mirrors=(dead,), **_fast())}, FAST)
    client = client_for(basic_registry, config, host=proxy.host)
    img = bounded(lambda: open_image(f"{proxy.host}/{REPO}:v1", client=client))
    assert img.blob(image.layer_digest).read_at(0, 100) == image.layer[:100]
    assert f"mirror 127.0.0.1:{dead.rsplit(':', 1)[1]} failed" in caplog.text


def test_live_mirror_is_used_first(proxy: FaultProxy, basic_registry: Registry, image: reg.TestImage) -> None:
    # A Harbor-style proxy cache: the mirror holds the image under a project prefix.
    reg.push_layout(image.layout, image.tag, basic_registry, f"hub-cache/{REPO}")
    origin = f"127.0.0.1:{reg.free_port()}"  # nothing listens: only the mirror can answer
    config = Config({origin: RegistryConfig(mirrors=(f"{proxy.url}/hub-cache",), **_fast())}, FAST)
    client = client_for(basic_registry, config, host=proxy.host)
    img = bounded(lambda: open_image(f"{origin}/{REPO}:v1", client=client))
    assert img.digest == image.manifest_digest
    assert img.blob(image.layer_digest).read_at(10, 10) == image.layer[10:20]
    assert all(path.startswith(f"/v2/hub-cache/{REPO}/") for _, path, _ in proxy.seen)


def test_stalled_server_recovers(proxy: FaultProxy, basic_registry: Registry, image: reg.TestImage) -> None:
    proxy.add(Fault("stall", path="/manifests/"), Fault("stall", partial=True))
    client = client_for(basic_registry, Config(defaults=_with(read_timeout=0.5)), host=proxy.host)
    img = bounded(lambda: open_image(f"{proxy.host}/{REPO}:v1", client=client))
    assert bounded(lambda: img.blob(image.layer_digest).read_at(0, 500_000)) == image.layer[:500_000]
    assert proxy.applied == ["stall", "stall"]


def test_stalled_server_fails_within_bound(proxy: FaultProxy, basic_registry: Registry) -> None:
    proxy.add(Fault("stall", path="/manifests/", times=-1))
    client = client_for(basic_registry, Config(defaults=_with(read_timeout=0.5, retries=100,
                                                              operation_timeout=3)), host=proxy.host)
    with pytest.raises(RegistryError) as info:
        bounded(lambda: open_image(f"{proxy.host}/{REPO}:v1", client=client))
    assert "time bound" in str(info.value) and proxy.host in str(info.value)


def test_wrong_content_range_is_rejected(proxy: FaultProxy, basic_registry: Registry,
                                         image: reg.TestImage) -> None:
    proxy.add(Fault("bad_content_range", times=-1))
    client = client_for(basic_registry, host=proxy.host)
    blob = RegistryBlobReader(client, f"{proxy.host}/{REPO}", image.layer_digest)
    with pytest.raises(RegistryError, match="Content-Range"):
        blob.read_at(10, 10)


def test_corrupted_downloads_are_refused(proxy: FaultProxy, basic_registry: Registry,
                                         image: reg.TestImage) -> None:
    client = client_for(basic_registry, host=proxy.host)
    img = open_image(f"{proxy.host}/{REPO}:v1", client=client)
    proxy.add(Fault("corrupt", path="/manifests/v1"), Fault("corrupt", path=f"/manifests/{img.digest}"),
              Fault("corrupt", path=f"/blobs/{img.config_descriptor.digest}"),
              Fault("corrupt", path=f"/blobs/{image.layer_digest}"))
    with pytest.raises(RegistryError, match="not the digest asked or announced"):
        open_image(f"{proxy.host}/{REPO}:v1", client=client)  # Docker-Content-Digest disagrees
    with pytest.raises(RegistryError, match="not the digest asked or announced"):
        open_image(f"{proxy.host}/{REPO}@{img.digest}", client=client)
    with pytest.raises(RegistryError, match="digest mismatch"):
        open_image(f"{proxy.host}/{REPO}:v1", client=client)  # the config
    with pytest.raises(RegistryError, match="digest mismatch"):
        img.blob(image.layer_digest).read_all()
    assert proxy.applied == ["corrupt"] * 4


def test_push_restarts_after_failed_upload(proxy: FaultProxy, basic_registry: Registry) -> None:
    proxy.add(Fault("status", path="/blobs/uploads/", method="PATCH", status=500),
              Fault("reset", path="/blobs/uploads/", method="PUT"))
    client = client_for(basic_registry, host=proxy.host)
    data = os.urandom(200_000)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    ref = f"{proxy.host}/pushed/restart"
    assert bounded(lambda: client.push_blob(ref, digest, data, chunk_size=50_000)) == "uploaded"
    assert RegistryBlobReader(client, ref, digest).read_all() == data
    assert proxy.applied == ["status", "reset"]


def test_push_manifest_checks_its_input(basic_registry: Registry) -> None:
    client = client_for(basic_registry)
    ref = f"{basic_registry.host}/{REPO}"
    with pytest.raises(InvalidInputError):
        client.push_manifest(ref, "sha256:" + "1" * 64, b"{}", toc.MEDIA_OCI_MANIFEST)
    with pytest.raises(InvalidInputError):
        client.push_manifest(ref, "v1", b"{}", "text/plain\r\nX-Injected: 1")


def _fast() -> dict[str, Any]:
    return {f: getattr(FAST, f) for f in ("connect_timeout", "read_timeout", "retries", "retry_backoff",
                                          "operation_timeout")}


def _with(**changes: Any) -> RegistryConfig:
    return RegistryConfig(**(_fast() | changes))
