"""Converting layers and whole images to eStargz (or zstd:chunked), and describing what a layer holds.

What belongs here: the image-level work around layerwriter.write_layer — which layers to convert and
which to keep, manifests, configs and annotations, writing OCI layouts or pushing to a registry (through
fetch.py and regclient.py), parallel transfers and progress; workload profiles (their text format, merging,
and attaching them to an image as referrer artifacts through referrers.py).  What never does: the byte
format (toc.py, layerwriter.py), HTTP details (regclient.py), the referrers protocol (referrers.py), FUSE.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import config
import fetch
import layerwriter
import regclient
import toc
import tocread

if TYPE_CHECKING:
    from tqdm import tqdm

log = logging.getLogger(__name__)


class ImageError(toc.LazymountError):
    """An image layout, manifest or config is missing or malformed."""


@dataclass
class ConvertOptions:
    """How layers are written: see layerwriter.write_layer."""

    chunk_size: int = toc.DEFAULT_CHUNK_SIZE
    fmt: str = toc.GZIP
    level: int = 3
    workers: int | None = None
    prioritized: dict[str, list[str]] = field(default_factory=dict)  # source layer digest -> paths
    prioritize_all: list[str] | None = None  # paths to place first in every layer without its own list
    # Optimize: every layer's landmark must match its `prioritized` list (layers without one get
    # `.no.prefetch.landmark`); eStargz layers already laid out that way are kept, the others converted.
    optimize: bool = False
    progress: bool = True
    limits: toc.Limits = toc.DEFAULT_LIMITS  # what readers accept: a layer beyond them is not written


class OCILayout:
    """The writing side of an OCI image layout directory (reading goes through fetch.open_image)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def blob_path(self, digest: str) -> Path:
        return self.root / "blobs" / "sha256" / toc.check_digest(digest)[7:]

    def has_blob(self, digest: str) -> bool:
        return self.blob_path(digest).exists()

    def add_blob_file(self, digest: str, path: Path) -> None:
        """Move a finished blob file (already verified by the caller) into place."""
        target = self.blob_path(digest)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, target)

    def add_blob_bytes(self, data: bytes) -> str:
        digest = toc.sha256_digest(data)
        path = self.blob_path(digest)
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            _atomic_write(path, lambda f: f.write(data))
        return digest

    def tag(self, tag: str | None, descriptor: dict) -> None:
        """Point `tag` at a manifest in index.json (creating the layout if needed)."""
        self.root.mkdir(parents=True, exist_ok=True)
        layout = self.root / "oci-layout"
        if not layout.exists():
            layout.write_text('{"imageLayoutVersion":"1.0.0"}')
        index_path = self.root / "index.json"
        index = {"schemaVersion": 2, "mediaType": toc.MEDIA_OCI_INDEX, "manifests": []}
        if index_path.exists():
            limit = toc.DEFAULT_LIMITS.manifest_size
            with fetch.open_regular(index_path, f"oci:{self.root}", "index.json") as f:
                data = f.read(limit + 1)
            try:
                index = json.loads(data) if len(data) <= limit else None
            except ValueError:
                raise ImageError(f"{index_path} is not valid JSON") from None
            if not isinstance(index, dict) or not isinstance(index.get("manifests", []), list):
                raise ImageError(f"{index_path} is not an OCI index of at most {limit} bytes")
        descriptor = dict(descriptor)
        if tag:
            descriptor["annotations"] = {toc.REF_NAME_ANNOTATION: tag}
        index["manifests"] = [d for d in index.get("manifests", []) if tag and _ref_name(d) != tag]
        index["manifests"].append(descriptor)
        _atomic_write(index_path, lambda f: f.write(json.dumps(index).encode()))


def _ref_name(descriptor: dict) -> str | None:
    return (descriptor.get("annotations") or {}).get(toc.REF_NAME_ANNOTATION)


def _atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=".tmp-", delete=False) as f:
        try:
            write(f)
        except BaseException:
            os.unlink(f.name)
            raise
    os.replace(f.name, path)


class _ProgressReader:
    """A file wrapper that reports the bytes read to a tqdm bar."""

    def __init__(self, f: BinaryIO, bar: tqdm | _NoBar) -> None:
        self.f, self.bar = f, bar

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.bar.update(len(data))
        return data


class _NoBar:
    """What progress_bar gives off a terminal: counts updates, shows nothing."""

    n = 0
    total: int | None = None

    def update(self, n: int = 1) -> None:
        self.n += n

    def __enter__(self) -> _NoBar:
        return self

    def __exit__(self, *exc_info: object) -> None:
        return None


def progress_bar(desc: str, total: int | None = None, enabled: bool = True) -> tqdm | _NoBar:
    """A progress bar of bytes on stderr when it is a terminal.  tqdm is imported only then: it adds
    ~60 ms to a command's start-up."""
    if not (enabled and sys.stderr.isatty()):
        return _NoBar()
    from tqdm import tqdm

    tqdm.monitor_interval = 0  # its thread only refreshes stalled bars, and joining it can delay the exit
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, leave=False)


def convert_layer_file(src: Path, dst: Path, options: ConvertOptions,
                       prioritized: list[str] | None = None) -> layerwriter.LayerInfo:
    """Convert one layer file (tar, tar.gz, tar.zst) into an eStargz blob at `dst` (written atomically)."""
    dst = Path(dst)
    with open(src, "rb") as raw, progress_bar(Path(src).name[:20], os.fstat(raw.fileno()).st_size,
                                                options.progress) as bar:
        info: list[layerwriter.LayerInfo] = []
        _atomic_write(dst, lambda out: info.append(layerwriter.write_layer(
            _ProgressReader(raw, bar), out, chunk_size=options.chunk_size, prioritized=prioritized,
            fmt=options.fmt, level=options.level, workers=options.workers, limits=options.limits)))
    return info[0]


def _uncompressed_size(path: Path) -> int:
    with open(path, "rb") as f:
        stream = layerwriter.open_layer_source(f)
        return sum(len(block) for block in iter(lambda: stream.read(1 << 20), b""))


class _LayoutSink:
    """Writes the converted image into an OCI layout."""

    def __init__(self, ref: config.Reference) -> None:
        self.layout = OCILayout(Path(ref.layout))
        self.tag = ref.tag
        self.staging = self.layout.root / "blobs" / "sha256"
        self.staging.mkdir(parents=True, exist_ok=True)

    def has_blob(self, digest: str) -> bool:
        return self.layout.has_blob(digest)

    def put_blob(self, digest: str, path: Path) -> None:
        self.layout.add_blob_file(digest, path)

    def copy_blob(self, image: fetch.Image, digest: str, tmp: Path) -> None:
        if not self.has_blob(digest):
            with image.blob(digest) as reader:
                reader.download(self.layout.blob_path(digest))

    def put_bytes(self, data: bytes) -> str:
        return self.layout.add_blob_bytes(data)

    def put_manifest(self, data: bytes) -> None:
        self.layout.tag(self.tag, {"mediaType": toc.MEDIA_OCI_MANIFEST, "digest": self.put_bytes(data),
                                   "size": len(data)})


class _RegistrySink:
    """Pushes the converted image to a registry: only blobs it lacks, mounted across repositories
    of the same registry where possible."""

    def __init__(self, ref: config.Reference, client: regclient.RegistryClient) -> None:
        self.ref, self.client = ref, client
        self.staging = None

    def has_blob(self, digest: str) -> bool:
        try:
            self.client.blob_size(self.ref, digest)
        except regclient.NotFoundError:
            return False
        return True

    def put_blob(self, digest: str, path: Path) -> None:
        self.client.push_blob(self.ref, digest, path)

    def copy_blob(self, image: fetch.Image, digest: str, tmp: Path) -> None:
        source = image.reference
        if source.layout is None and source.registry == self.ref.registry:
            if self.client.mount_blob(self.ref, digest, source.repository):
                return
        elif self.has_blob(digest):
            return
        path = tmp / f"copy-{digest[7:]}"
        with image.blob(digest) as reader:
            reader.download(path)
        self.client.push_blob(self.ref, digest, path)
        path.unlink()

    def put_bytes(self, data: bytes) -> str:
        digest = toc.sha256_digest(data)
        self.client.push_blob(self.ref, digest, data)
        return digest

    def put_manifest(self, data: bytes) -> None:
        self.client.push_manifest(self.ref, self.ref.tag or "latest", data, toc.MEDIA_OCI_MANIFEST)


def convert_image(src_ref: str, dst_ref: str, options: ConvertOptions,
                  client: regclient.RegistryClient | None = None, platform: str | None = None) -> dict:
    """Convert every layer of an image (registry or `oci:` layout) and write it to another image.

    Layers that already are eStargz are kept byte for byte, without download where the destination
    has them or can mount them.  Source blobs are downloaded in parallel while earlier layers convert;
    converted blobs are pushed while later ones convert.  Returns the new manifest.
    """
    image = fetch.open_image(src_ref, platform=platform, client=client)
    dst = config.parse_reference(dst_ref)
    if dst.layout is None and client is None:
        client = regclient.RegistryClient()
    sink = _LayoutSink(dst) if dst.layout is not None else _RegistrySink(dst, client)
    diff_ids = (image.config.get("rootfs") or {}).get("diff_ids")
    if not isinstance(diff_ids, list) or len(diff_ids) != len(image.layers):
        raise ImageError(f"{src_ref}: config rootfs.diff_ids does not match the manifest's layers")
    with tempfile.TemporaryDirectory(prefix=".lazymount-convert-", dir=sink.staging) as tmp, \
            concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="transfer") as pool:
        work = Path(tmp)
        plans = list(pool.map(lambda d: _plan_layer(image, d, options), image.layers))
        downloads = {d.digest: pool.submit(_download, image, d.digest, work)
                     for d, plan in zip(image.layers, plans, strict=True) if plan is None}
        uploads, new_layers = [], []
        for position, (descriptor, kept) in enumerate(zip(image.layers, plans, strict=True)):
            label = f"layer {position + 1}/{len(image.layers)}"
            if kept is not None:
                log.info("%s %s is already eStargz: kept as it is", label, descriptor.digest)
                uploads.append(pool.submit(sink.copy_blob, image, descriptor.digest, work))
                new_layers.append({**descriptor.to_json(), "annotations": {**descriptor.annotations, **kept}})
                continue
            source = downloads.pop(descriptor.digest).result()
            out = work / f"out-{position}"
            prioritized = options.prioritized.get(descriptor.digest, options.prioritize_all)
            info = convert_layer_file(source, out, options, prioritized)
            source.unlink()
            log.info("%s %s -> %s (%d entries)", label, descriptor.digest, info.digest, info.entries)
            uploads.append(pool.submit(sink.put_blob, info.digest, out))
            diff_ids[position] = info.diff_id
            media_type = toc.MEDIA_LAYER_ZSTD if options.fmt == toc.ZSTD else toc.MEDIA_LAYER_GZIP
            new_layers.append({"mediaType": media_type,
                               "digest": info.digest, "size": info.size,
                               "annotations": {**descriptor.annotations, **info.annotations}})
        for upload in uploads:
            upload.result()
    config_bytes = json.dumps(image.config, separators=(",", ":")).encode()
    manifest = {"schemaVersion": 2, "mediaType": toc.MEDIA_OCI_MANIFEST,
                "config": {"mediaType": toc.MEDIA_OCI_CONFIG, "digest": sink.put_bytes(config_bytes),
                           "size": len(config_bytes)},
                "layers": new_layers}
    if image.manifest.get("annotations"):
        manifest["annotations"] = image.manifest["annotations"]
    sink.put_manifest(json.dumps(manifest, separators=(",", ":")).encode())
    return manifest


def _download(image: fetch.Image, digest: str, work: Path) -> Path:
    path = work / f"src-{digest[7:]}"
    with image.blob(digest) as reader:
        reader.download(path)
    return path


def _plan_layer(image: fetch.Image, descriptor: fetch.Descriptor, options: ConvertOptions) -> dict | None:
    """The eStargz annotations of a layer to keep as it is, or None if it must be converted.

    Reads only the footer and TOC (two ranges) unless the layer is eStargz without annotations, which
    needs one download to learn its uncompressed size.
    """
    wanted = options.prioritized.get(descriptor.digest, options.prioritize_all)
    if wanted is not None and not options.optimize:
        return None
    with image.blob(descriptor.digest) as reader:
        annotated = descriptor.annotations.get(toc.TOC_DIGEST_ANNOTATION)
        try:
            _, toc_json = tocread.read_toc_json(reader.read_at, reader.size, annotated, options.limits)
        except toc.FooterError:
            if annotated:
                raise ImageError(f"layer {descriptor.digest} is annotated as eStargz but is not") from None
            return None
        if options.optimize and not _laid_out_for(toc_json, wanted):
            return None
        if annotated and toc.UNCOMPRESSED_SIZE_ANNOTATION in descriptor.annotations:
            return {}
        with tempfile.TemporaryDirectory() as tmp:
            reader.download(Path(tmp) / "blob")
            size = _uncompressed_size(Path(tmp) / "blob")
    return {toc.TOC_DIGEST_ANNOTATION: toc.sha256_digest(toc_json),
            toc.UNCOMPRESSED_SIZE_ANNOTATION: str(size)}


def _toc_entries(toc_json: bytes) -> list[dict]:
    try:
        entries = json.loads(toc_json).get("entries")
    except (ValueError, AttributeError):
        raise toc.TOCError("TOC is not a JSON object") from None
    if not isinstance(entries, list):
        raise toc.TOCError("TOC has no list of entries")
    return [e for e in entries if isinstance(e, dict)]


def prefetch_order(toc_json: bytes) -> list[str] | None:
    """The regular files a layer places before `.prefetch.landmark`, in blob order; None if it has none."""
    files = []
    for entry in _toc_entries(toc_json):
        name = toc.normalize_name(entry.get("name"))
        if name == toc.PREFETCH_LANDMARK:
            return files
        if entry.get("type") == "reg":
            files.append(name)
    return None


def _laid_out_for(toc_json: bytes, wanted: list[str] | None) -> bool:
    """Whether a layer is what converting it with `wanted` would make of it: `.no.prefetch.landmark`
    for None, else exactly the wanted regular files (hardlinks as their targets) before the landmark."""
    entries = _toc_entries(toc_json)
    by_name = {toc.normalize_name(e.get("name")): e for e in entries if e.get("type") != "chunk"}
    if wanted is None:
        return toc.NO_PREFETCH_LANDMARK in by_name
    expected: dict[str, None] = {}  # an ordered set
    for path in wanted:
        name = toc.normalize_name(path.lstrip("/"))
        entry = by_name.get(name, {})
        if entry.get("type") == "hardlink":
            name = toc.normalize_name(entry.get("linkName"))
            entry = by_name.get(name, {})
        if entry.get("type") == "reg":
            expected.setdefault(name)
    return prefetch_order(toc_json) == list(expected)


def describe_layer(read_at: tocread.ReadAt, size: int, expected_toc_digest: str | None = None,
                   limits: toc.Limits = toc.DEFAULT_LIMITS) -> dict:
    """What `lazymount inspect` shows of one layer: format, entry counts, chunking, landmark."""
    try:
        index = tocread.read_index(read_at, size, expected_toc_digest, limits)
    except toc.FooterError:
        return {"format": "not eStargz", "size": size}
    chunk_sizes = [c.size for _, i in index.walk() if index.kind(i) == toc.KIND_REG
                   for c in index.chunks(i)]
    if index.prefetch_end is not None:
        landmark = f"prefetch [0, {index.prefetch_end})"
    else:
        landmark = "no prefetch" if index.no_prefetch else "none"
    return {"format": index.format, "size": size, "toc_digest": index.toc_digest,
            "toc_bytes": index.toc_size, "entries": index.stats(),
            "largest_chunk": max(chunk_sizes, default=0), "landmark": landmark}
