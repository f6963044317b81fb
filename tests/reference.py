"""The reference implementation (stargz-snapshotter 0.12 as packaged in Debian), driven for comparisons.

What belongs here: a private containerd 1.6 instance and its own unpack of an image, `ctr-remote`
conversion and TOC-digest lookup, reading OCI image layouts, and our Go verifier
(tests/interop/verify.go, built against Debian's `estargz` library). What never does: lazymount's own
code paths, or building test inputs (imagebuild.py). Nothing here uses /run/containerd or the system
containerd.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from toc import REF_NAME_ANNOTATION

log = logging.getLogger(__name__)

NAMESPACE = "lazymount-test"
GOPATH = Path("/usr/share/gocode")
ESTARGZ_GO_PACKAGE = GOPATH / "src/github.com/containerd/stargz-snapshotter/estargz"
VERIFIER_SOURCE = Path(__file__).parent / "interop" / "verify.go"
STARTUP_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0

# Plugins a conversion/container test never needs; CRI alone costs most of containerd's start-up.
DISABLED_PLUGINS = (
    "io.containerd.grpc.v1.cri",
    "io.containerd.snapshotter.v1.aufs",
    "io.containerd.snapshotter.v1.btrfs",
    "io.containerd.snapshotter.v1.devmapper",
    "io.containerd.snapshotter.v1.zfs",
    "io.containerd.tracing.processor.v1.otlp",
    "io.containerd.internal.v1.tracing",
)


class ToolError(subprocess.CalledProcessError):
    """A reference tool failed; unlike its base class, str() includes the tool's stderr."""

    def __str__(self) -> str:
        stderr = self.stderr.decode(errors="replace") if isinstance(self.stderr, bytes) else self.stderr
        return f"{super().__str__()}\n{(stderr or '').strip()}"


class Containerd:
    """A private containerd: own config, root, state, sockets and opt dir under base_dir.

    extra_config is appended to the generated TOML (e.g. a `[proxy_plugins.NAME]` table for a
    snapshotter under test). Use start() then stop(); stop() kills by PID and unmounts leftovers.
    """

    def __init__(self, base_dir: Path, extra_config: str = "", namespace: str = NAMESPACE) -> None:
        self.base_dir = base_dir
        self.address = str(base_dir / "containerd.sock")
        self.namespace = namespace
        self.config_path = base_dir / "config.toml"
        self.log_path = base_dir / "containerd.log"
        self.extra_config = extra_config
        self.proc: subprocess.Popen | None = None

    def _config(self) -> str:
        b = self.base_dir
        disabled = ", ".join(json.dumps(p) for p in DISABLED_PLUGINS)
        return (
            f'version = 2\nroot = "{b}/root"\nstate = "{b}/state"\ndisabled_plugins = [{disabled}]\n'
            f'[grpc]\n  address = "{self.address}"\n[ttrpc]\n  address = "{self.address}.ttrpc"\n'
            f'[debug]\n  address = ""\n[metrics]\n  address = ""\n'
            f'[plugins."io.containerd.internal.v1.opt"]\n  path = "{b}/opt"\n'
            f"{self.extra_config}\n"
        )

    def start(self) -> Containerd:
        """Start containerd and wait until `ctr version` answers on its socket."""
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self._config())
        with open(self.log_path, "ab") as logf:
            self.proc = subprocess.Popen(["containerd", "--config", str(self.config_path)],
                                         stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"containerd exited with {self.proc.returncode}; "
                                   f"log: {self.log_path.read_text()[-3000:]}")
            if self.ctr("version", check=False).returncode == 0:
                log.info("containerd pid %d serving on %s", self.proc.pid, self.address)
                return self
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"containerd did not answer within {STARTUP_TIMEOUT} s")
            time.sleep(0.05)

    def stop(self) -> None:
        """Stop containerd by PID (TERM, then KILL) and unmount anything left under base_dir."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None
        for mount_point in sorted(mounts_under(self.base_dir), key=len, reverse=True):
            subprocess.run(["umount", "--lazy", mount_point], check=False)

    def _run(self, tool: str, args: tuple[str, ...], check: bool, **kwargs) -> subprocess.CompletedProcess:
        cmd = [tool, "--address", self.address, "--namespace", self.namespace, *args]
        kwargs.setdefault("stdout", subprocess.PIPE)
        kwargs.setdefault("stderr", subprocess.PIPE)
        proc = subprocess.run(cmd, check=False, **kwargs)
        if check and proc.returncode != 0:
            raise ToolError(proc.returncode, cmd, proc.stdout, proc.stderr)
        return proc

    def ctr(self, *args: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
        """Run `ctr` against this containerd and namespace (output captured unless told otherwise)."""
        return self._run("ctr", args, check, **kwargs)

    def ctr_remote(self, *args: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
        """Run `ctr-remote` (the reference's ctr with convert/optimize/get-toc-digest) likewise."""
        return self._run("ctr-remote", args, check, **kwargs)


def mounts_under(base: Path) -> list[str]:
    """The mount points at or below `base` in this process's mount namespace."""
    base = str(base.resolve())
    points = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            # mountinfo escapes space, tab, newline and backslash as octal (\040 ...)
            point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), line.split()[4])
            if point == base or point.startswith(base + "/"):
                points.append(point)
    return points


def read_layout(layout: Path, tag: str | None = None) -> tuple[dict, dict, list[tuple[Path, dict]]]:
    """Read an OCI image layout: (manifest, config, [(layer blob path, layer descriptor), ...]).

    The manifest is the index entry whose ref.name annotation is tag (the only entry if tag is None);
    a nested image index is followed to its first manifest.
    """
    index = json.loads((layout / "index.json").read_text())
    entries = index["manifests"]
    if tag is not None:
        entries = [m for m in entries if m.get("annotations", {}).get(REF_NAME_ANNOTATION) == tag]
    if len(entries) != 1:
        raise LookupError(f"{layout}: {len(entries)} index entries for tag {tag!r}")
    manifest = _read_blob_json(layout, entries[0]["digest"])
    while "manifests" in manifest:
        manifest = _read_blob_json(layout, manifest["manifests"][0]["digest"])
    config = _read_blob_json(layout, manifest["config"]["digest"])
    layers = [(blob_path(layout, d["digest"]), d) for d in manifest["layers"]]
    return manifest, config, layers


def blob_path(layout: Path, digest: str) -> Path:
    """Path of a blob in an OCI image layout."""
    algorithm, _, hex_digest = digest.partition(":")
    return layout / "blobs" / algorithm / hex_digest


def _read_blob_json(layout: Path, digest: str) -> dict:
    return json.loads(blob_path(layout, digest).read_bytes())


def ref_convert(containerd: Containerd, oci_layout: Path, tag: str, out_layout: Path, zstd: bool = False,
                chunk_size: int | None = None, compression_level: int | None = None) -> dict:
    """Convert an OCI layout's image to eStargz (or zstd:chunked) with `ctr-remote image convert`.

    The layout is imported into containerd (as a tar stream, without unpacking), converted (reference
    defaults: 4 MiB chunks, gzip level 9, unless chunk_size/compression_level say otherwise), exported
    and unpacked as an OCI image layout at out_layout whose index names it `tag`. Returns the converted
    manifest. Raises ToolError with the reference's message when it refuses the input.
    """
    manifest_digest = _index_entry_digest(oci_layout, tag)
    src = _import(containerd, oci_layout, tag, "--no-unpack")
    dst = f"localhost/lazymount/converted:{manifest_digest[7:23]}-{'zstd' if zstd else 'estargz'}"
    options = ["--oci", "--zstdchunked" if zstd else "--estargz"]
    if chunk_size is not None:
        options += ["--estargz-chunk-size", str(chunk_size)]
    if compression_level is not None:
        options += ["--estargz-compression-level", str(compression_level)]
    containerd.ctr_remote("images", "convert", *options, src, dst)
    out_layout.mkdir(parents=True, exist_ok=True)
    with subprocess.Popen(["tar", "-C", str(out_layout), "-x"], stdin=subprocess.PIPE) as untar:
        containerd.ctr("images", "export", "--skip-manifest-json", "-", dst, stdout=untar.stdin)
        untar.stdin.close()
    if untar.returncode != 0:
        raise subprocess.CalledProcessError(untar.returncode, untar.args)
    index_path = out_layout / "index.json"
    index = json.loads(index_path.read_text())
    index["manifests"][0].setdefault("annotations", {})[REF_NAME_ANNOTATION] = tag
    index_path.write_text(json.dumps(index))
    return read_layout(out_layout, tag)[0]


def _import(containerd: Containerd, oci_layout: Path, tag: str, *options: str) -> str:
    """Import an OCI layout's image into containerd (as a tar stream); return its name there."""
    with subprocess.Popen(["tar", "-C", str(oci_layout), "-c", "."], stdout=subprocess.PIPE) as tar:
        containerd.ctr("images", "import", *options, "--base-name", "localhost/lazymount/import", "-",
                       stdin=tar.stdout)
    if tar.returncode != 0:
        raise subprocess.CalledProcessError(tar.returncode, tar.args)
    return f"localhost/lazymount/import:{tag}"


@contextlib.contextmanager
def ref_unpacked(containerd: Containerd, oci_layout: Path, tag: str, target: Path) -> Iterator[Path]:
    """containerd's own unpack of an OCI layout's image (its overlayfs snapshotter applies the layers),
    mounted read-only at `target` for the block (`ctr images mount`); yields `target`."""
    name = _import(containerd, oci_layout, tag)
    target.mkdir(parents=True, exist_ok=True)
    containerd.ctr("images", "mount", name, str(target))
    try:
        yield target
    finally:
        containerd.ctr("images", "unmount", "--rm", str(target), check=False)


def _index_entry_digest(layout: Path, tag: str) -> str:
    index = json.loads((layout / "index.json").read_text())
    for entry in index["manifests"]:
        if entry.get("annotations", {}).get(REF_NAME_ANNOTATION) == tag:
            return entry["digest"]
    raise LookupError(f"{layout}: no image tagged {tag!r}")


def _ensure_in_content_store(containerd: Containerd, blob: Path) -> str:
    """Put a blob into containerd's content store (labelled as a GC root); return its digest."""
    with open(blob, "rb") as f:
        digest = "sha256:" + hashlib.file_digest(f, "sha256").hexdigest()
    label = ("content", "label", digest, "containerd.io/gc.root=lazymount-test")
    if containerd.ctr(*label, check=False).returncode != 0:  # fails only when the blob is absent
        with open(blob, "rb") as f:
            containerd.ctr("content", "ingest", "--expected-digest", digest,
                           "--expected-size", str(blob.stat().st_size), f"lazymount-{digest[7:]}", stdin=f)
        containerd.ctr(*label)
    return digest


def ref_get_toc_digest(containerd: Containerd, blob: Path, zstd: bool = False) -> str:
    """The TOC digest of a layer blob according to `ctr-remote images get-toc-digest`.

    The command only reads from the content store, so the blob is ingested first if it is not there.
    """
    digest = _ensure_in_content_store(containerd, blob)
    args = ("--zstdchunked",) if zstd else ()
    out = containerd.ctr_remote("images", "get-toc-digest", *args, digest, text=True).stdout
    return out.strip()


def ref_dump_toc(containerd: Containerd, blob: Path, zstd: bool = False) -> dict:
    """The TOC JSON of a layer blob as parsed by the reference (`get-toc-digest --dump-toc`)."""
    digest = _ensure_in_content_store(containerd, blob)
    args = ("--zstdchunked",) if zstd else ()
    return json.loads(containerd.ctr_remote("images", "get-toc-digest", "--dump-toc", *args, digest).stdout)


def build_verifier(out_dir: Path) -> Path:
    """Build tests/interop/verify.go against Debian's estargz package; return the binary's path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    binary = out_dir / "estargz-verify"
    env = {**os.environ, "GOPATH": str(GOPATH), "GO111MODULE": "off", "GOFLAGS": "",
           "GOCACHE": str(out_dir / "gocache"), "CGO_ENABLED": "0"}
    subprocess.run(["go", "build", "-o", str(binary), str(VERIFIER_SOURCE)], check=True, env=env,
                   cwd=VERIFIER_SOURCE.parent)
    return binary


def verify_with_reference(verifier: Path, blob: Path, toc_digest: str, zstd: bool = False) -> dict[str, dict]:
    """Verify a blob with the reference's estargz reader; return path -> record as the reader sees it.

    Records (see verify.go) carry type, size, mode, uid, gid, mtime, linkName, devMajor/devMinor,
    numLink, xattrs (base64), digest, chunks, sha256 and, for hardlinks, source (the entry they
    resolve to). Raises ToolError (stderr holds the reason) when verification fails.
    """
    args = [str(verifier), *(["--zstd"] if zstd else []), str(blob), toc_digest]
    proc = subprocess.run(args, check=False, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ToolError(proc.returncode, args, proc.stdout, proc.stderr)
    out = proc.stdout
    records = (json.loads(line) for line in out.splitlines())
    return {r["name"]: r for r in records}
