"""`make demo`: the whole story on one machine — full pull vs lazy eStargz vs workload-optimized eStargz.

Everything it uses is local: a Debian + Python image is built from this machine's own files
(imagebuild.py `debian_python_rootfs`, plus a data layer the workload never reads), pushed to Debian's
`docker-registry` started on a free loopback port (or, if that is not installed, served from an OCI
layout), converted to plain eStargz with `lazymount convert` and optimized for a Python workload with
`lazymount optimize --workload`.  The workload then runs three ways, each with a cold cache: pulled
whole (skopeo copy + umoci unpack, run with bubblewrap), `lazymount run` on the plain eStargz image and
on the optimized one (background fetch off, so "fetched" is what the workload needed).  The table's
numbers are measured in this run.  The registry is stopped and the work dir removed even on failure.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import convert
import fetch
import regclient
import sandbox
import toc
from imagebuild import debian_python_rootfs, sha256_file
from tests.registry import free_port

REPO = Path(__file__).resolve().parent

TAG = "demo"
WORKLOAD = ("import json, email.mime.multipart, http.client, sqlite3, decimal, asyncio, logging, "
            "argparse, xml.dom.minidom, csv, sys; "
            "print('first result:', len(sys.modules), 'modules imported')")
DATA_DIRS = (Path("/usr/share/zoneinfo"), Path("/usr/share/doc"))  # a layer the workload never reads
FAST_DATA_DIRS = (Path("/usr/share/zoneinfo"),)


def step(text: str) -> None:
    """A progress line."""
    print(f"== {text}", flush=True)


def _layer(root: Path, members: list[Path], out: Path) -> Path:
    """A gzip layer tarball of `members` (paths under `root`), named relative to root."""
    with gzip.open(out, "wb", compresslevel=6) as raw, \
            tarfile.open(fileobj=raw, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for member in members:
            tar.add(member, arcname=str(member.relative_to(root)))
    return out


def build_image(work: Path, data_dirs: tuple[Path, ...]) -> Path:
    """A two-layer OCI layout at work/src (tag `demo`): Debian + Python, then host data files."""
    rootfs = debian_python_rootfs(work / "rootfs")
    tarballs = [_layer(rootfs, sorted(rootfs.iterdir()), work / "layer0.tar.gz"),
                _layer(Path("/"), [d for d in data_dirs if d.is_dir()], work / "layer1.tar.gz")]
    shutil.rmtree(rootfs)
    store = convert.OCILayout(work / "src")
    layers, diff_ids = [], []
    for tarball in tarballs:
        diff_ids.append("sha256:" + sha256_file(tarball, gzip.open))
        digest = "sha256:" + sha256_file(tarball)
        layers.append({"mediaType": toc.MEDIA_LAYER_GZIP, "digest": digest, "size": tarball.stat().st_size})
        store.add_blob_file(digest, tarball)
    arch = fetch.default_platform().split("/")[1]
    config = {"architecture": arch, "os": "linux", "rootfs": {"type": "layers", "diff_ids": diff_ids},
              "config": {"Cmd": ["/bin/sh"], "Env": ["PATH=/usr/bin:/bin"], "WorkingDir": "/"}}
    config_bytes = json.dumps(config).encode()
    manifest = json.dumps({"schemaVersion": 2, "mediaType": toc.MEDIA_OCI_MANIFEST, "layers": layers,
                           "config": {"mediaType": toc.MEDIA_OCI_CONFIG, "size": len(config_bytes),
                                      "digest": store.add_blob_bytes(config_bytes)}}).encode()
    store.tag(TAG, {"mediaType": toc.MEDIA_OCI_MANIFEST, "digest": store.add_blob_bytes(manifest),
                    "size": len(manifest)})
    return work / "src"


@contextlib.contextmanager
def docker_registry(work: Path) -> Iterator[str | None]:
    """Debian's docker-registry on 127.0.0.1:<free port>; yields its host:port, or None if the package
    is not installed (the demo then serves images from OCI layouts).  Stopped on exit."""
    if shutil.which("docker-registry") is None:
        yield None
        return
    host = f"127.0.0.1:{free_port()}"
    config = work / "registry.yml"
    config.write_text(json.dumps({"version": 0.1, "log": {"level": "error", "accesslog": {"disabled": True}},
                                  "storage": {"filesystem": {"rootdirectory": str(work / "registry")}},
                                  "http": {"addr": host}}))
    with open(work / "registry.log", "wb") as log_file:
        process = subprocess.Popen(["docker-registry", "serve", str(config)], stdout=log_file,
                                   stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://{host}/v2/", timeout=2):
                    break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"docker-registry did not start: see {work}/registry.log") from None
                time.sleep(0.1)
        yield host
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def push(layout: Path, ref: str) -> None:
    """Copy oci:LAYOUT:demo to a registry reference, blob by blob."""
    client = regclient.RegistryClient()
    image = fetch.open_image(f"oci:{layout}:{TAG}", client=client)
    for descriptor in [image.config_descriptor, *image.layers]:
        client.push_blob(ref, descriptor.digest, layout / "blobs" / "sha256" / descriptor.digest[7:])
    client.push_manifest(ref, TAG, image.manifest_bytes, image.media_type)


def image_size(ref: str) -> int:
    """The compressed size of an image's layers."""
    return sum(d.size for d in fetch.open_image(ref, client=regclient.RegistryClient()).layers)


def cli(*args: str) -> list[str]:
    return [sys.executable, str(REPO / "lazymount.py"), *args]


def _first_line(argv: list[str]) -> tuple[str, float]:
    """Run argv; the first line it prints and the seconds until it appeared.  Raise if it fails."""
    start = time.monotonic()
    with subprocess.Popen(argv, stdout=subprocess.PIPE, text=True) as process:
        assert process.stdout is not None
        line = process.stdout.readline().strip()
        elapsed = time.monotonic() - start
        process.stdout.read()
        if process.wait():
            raise RuntimeError(f"{shlex.join(argv[:4])}... exited with status {process.returncode}")
    return line, elapsed


def full_pull(ref: str, work: Path, command: list[str]) -> tuple[int, str, float]:
    """skopeo copy + umoci unpack + bubblewrap: bytes pulled, requests ("-": skopeo's own) and seconds
    to the first result."""
    source = f"docker://{ref}" if not ref.startswith("oci:") else ref
    pulled, bundle = work / "pulled", work / "bundle"
    start = time.monotonic()
    subprocess.run(["skopeo", "--insecure-policy", "copy", "--quiet", "--src-tls-verify=false", source,
                    f"oci:{pulled}:{TAG}"], check=True)
    rootless = [] if os.geteuid() == 0 else ["--rootless"]
    subprocess.run(["umoci", "unpack", *rootless, "--image", f"{pulled}:{TAG}", str(bundle)], check=True,
                   stdout=subprocess.DEVNULL)
    setup = time.monotonic() - start
    image = fetch.open_image(f"oci:{pulled}:{TAG}", client=regclient.RegistryClient())
    config = image.config.get("config", {})
    line, elapsed = _first_line(sandbox.bwrap_command(bundle / "rootfs", config, command))
    print(f"   {line}")
    fetched = sum(p.stat().st_size for p in (pulled / "blobs" / "sha256").iterdir())
    shutil.rmtree(bundle, ignore_errors=True)
    return fetched, "-", setup + elapsed


def lazy_run(ref: str, work: Path, name: str, command: list[str]) -> tuple[int, str, float]:
    """`lazymount run` with a cold cache, no background fetch: bytes fetched (TOCs included), data
    requests (after the TOCs) and seconds to the first result."""
    stats_file = work / f"{name}.stats.json"
    line, elapsed = _first_line(cli("run", "--cache-dir", str(work / f"cache-{name}"),
                                    "--no-background-fetch", "--stats-file", str(stats_file), ref, "--",
                                    *command))
    print(f"   {line}")
    totals = json.loads(stats_file.read_text())["totals"]
    return totals["bytes_fetched"] + totals["index_bytes"], str(totals["requests"]), elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="a smaller data layer (for the test suite)")
    parser.add_argument("--workdir", type=Path, help="where to work (default: a temp dir, removed after)")
    parser.add_argument("--keep", action="store_true", help="keep the work dir")
    args = parser.parse_args(argv)
    missing = [tool for tool in ("bwrap", "fusermount3", "skopeo", "umoci") if shutil.which(tool) is None]
    if missing:
        print(f"demo: not installed: {', '.join(missing)} (run `make setup` as root)", file=sys.stderr)
        return 1
    work = args.workdir or Path(tempfile.mkdtemp(prefix="lazymount-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    command = ["python3", "-c", WORKLOAD]
    try:
        step("building a Debian + Python image from this machine's files")
        start = time.monotonic()
        src = build_image(work, FAST_DATA_DIRS if args.fast else DATA_DIRS)
        print(f"   built in {time.monotonic() - start:.1f} s")
        with docker_registry(work) as host:
            if host is None:
                step("docker-registry is not installed: serving the images from OCI layouts")
                refs = {name: f"oci:{work}/{name}:{TAG}" for name in ("src", "plain", "optimized")}
            else:
                refs = {name: f"{host}/{name}:{TAG}" for name in ("src", "plain", "optimized")}
                step(f"docker-registry on {host}: pushing the image as {refs['src']}")
                push(src, refs["src"])
            step(f"lazymount convert {refs['src']} {refs['plain']}")
            subprocess.run(cli("convert", "-q", refs["src"], refs["plain"]), check=True,
                           stdout=subprocess.DEVNULL)
            step(f"lazymount optimize --workload 'python3 -c ...' {refs['plain']} {refs['optimized']}")
            subprocess.run(cli("optimize", "-q", "--cache-dir", str(work / "cache-record"), "--workload",
                               shlex.join(command), refs["plain"], refs["optimized"]), check=True,
                           stdout=subprocess.DEVNULL)
            rows = []
            step("full pull: skopeo copy + umoci unpack, then the workload with bubblewrap")
            rows.append(("full pull (skopeo + umoci)", image_size(refs["src"]),
                         *full_pull(refs["src"], work, command)))
            for name in ("plain", "optimized"):
                step(f"lazymount run on the {name} eStargz image (cold cache)")
                rows.append((f"lazy, {name} eStargz", image_size(refs[name]),
                             *lazy_run(refs[name], work, name, command)))
        print()
        print(f"{'path':<28} {'image size (B)':>15} {'fetched (B)':>13} {'requests':>9} "
              f"{'first result (s)':>17}")
        for name, size, fetched, requests, seconds in rows:
            print(f"{name:<28} {size:>15,} {fetched:>13,} {requests:>9} {seconds:>17.2f}")
        print("(fetched: compressed bytes read from the registry or layout, TOCs included; requests: data "
              "range requests after the TOCs; background fetch off)")
        return 0
    finally:
        if args.keep:
            print(f"(kept {work})")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
