"""`lazymount convert` between registries: the reference pulls and runs the result, and layers that
already are eStargz are reused without being downloaded.

Real components: Debian's docker-registry on loopback, a recording proxy in front of it (tests/registry.py),
a private containerd with runc, and `ctr-remote images rpull`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from imagebuild import append_layers, debian_python_rootfs, make_layer_tar, make_oci_image
from tests.registry import FaultProxy, Registry, push_layout, skopeo
from toc import TOC_DIGEST_ANNOTATION

LAZYMOUNT = [sys.executable, "-m", "lazymount"]


@pytest.fixture(scope="module")
def plain_image(tmp_path_factory: pytest.TempPathFactory, registry: Registry) -> str:
    """A runnable two-layer gzip image (dash + python, then a data layer) pushed as plain/app:v1."""
    work = tmp_path_factory.mktemp("plain")
    base = debian_python_rootfs(work / "rootfs")
    upper = work / "upper"
    subprocess.run(["cp", "-a", f"{base}/.", str(upper)], check=True)
    (upper / "etc" / "message").write_text("hello from layer 2\n")
    layout = make_oci_image(work / "oci", "v1", [base, upper])
    subprocess.run(["umoci", "config", "--image", f"{layout}:v1", "--config.env", "PATH=/usr/bin:/bin"],
                   check=True)
    push_layout(layout, "v1", registry, "plain/app")
    return f"{registry.host}/plain/app:v1"


def _convert(src: str, dst: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([*LAZYMOUNT, "convert", "-q", "--plain-http", *extra, src, dst], check=True,
                          capture_output=True, text=True)


def _manifest(registry_host: str, repository: str, tag: str) -> dict:
    out = skopeo("inspect", "--raw", "--tls-verify=false", f"docker://{registry_host}/{repository}:{tag}")
    return json.loads(out.stdout)


def test_reference_pulls_and_runs_our_conversion(plain_image: str, registry: Registry, containerd) -> None:
    _convert(plain_image, f"{registry.host}/esgz/app:v1")
    manifest = _manifest(registry.host, "esgz/app", "v1")
    assert all(TOC_DIGEST_ANNOTATION in layer["annotations"] for layer in manifest["layers"])
    ref = f"{registry.host}/esgz/app:v1"
    containerd.ctr_remote("images", "rpull", "--plain-http", "--snapshotter", "overlayfs", ref)
    # get-toc-digest reads the layer from containerd's content store: the reference parses our TOC
    for layer in manifest["layers"]:
        out = containerd.ctr_remote("images", "get-toc-digest", layer["digest"], text=True).stdout
        assert out.strip() == layer["annotations"][TOC_DIGEST_ANNOTATION]
    # ctr run unpacks every layer (checking its DiffID against the config) and runs from the result
    result = containerd.ctr("run", "--rm", "--snapshotter", "overlayfs", ref, "lazymount-convert-test",
                            "/bin/sh", "-c", "read line < /etc/message; echo $line ok", text=True)
    assert result.stdout.split() == ["hello", "from", "layer", "2", "ok"]


def test_estargz_base_layers_are_reused_without_download(plain_image: str, registry: Registry,
                                                         tmp_path: Path) -> None:
    """An image built on an eStargz base: only its new layer is downloaded and converted."""
    _convert(plain_image, f"{registry.host}/base/app:esgz")
    layout = tmp_path / "app"
    skopeo("copy", "--src-tls-verify=false", f"docker://{registry.host}/base/app:esgz", f"oci:{layout}:v1")
    (tmp_path / "extra").mkdir()
    (tmp_path / "extra" / "added.txt").write_text("a layer on top of an eStargz base\n")
    append_layers(layout, "v1", [make_layer_tar(tmp_path / "extra", tmp_path / "extra.tar.gz", gzip=True)])
    push_layout(layout, "v1", registry, "derived/app")
    base_layers = [layer["digest"] for layer in _manifest(registry.host, "base/app", "esgz")["layers"]]

    proxy = FaultProxy(registry.host)
    try:
        _convert(f"{proxy.host}/derived/app:v1", f"{proxy.host}/derived/app:esgz")
    finally:
        proxy.stop()
    result = _manifest(registry.host, "derived/app", "esgz")["layers"]
    assert [layer["digest"] for layer in result[:-1]] == base_layers
    assert result[-1]["digest"] not in base_layers and TOC_DIGEST_ANNOTATION in result[-1]["annotations"]
    ranged = {d for d in base_layers for method, path, headers in proxy.seen
              if d in path and method == "GET" and "Range" in headers}
    assert ranged == set(base_layers)  # each base layer was recognised by its footer and TOC
    for method, path, headers in proxy.seen:
        if any(digest in path for digest in base_layers):
            # only the footer and the TOC are read, by range; the blob is never downloaded or uploaded
            assert method in ("GET", "HEAD") and (method == "HEAD" or "Range" in headers), (method, path)
            assert "/blobs/uploads/" not in path
