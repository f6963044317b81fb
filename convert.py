"""Converting layers and whole images to eStargz (or zstd:chunked), and describing what a layer holds.

What belongs here: the image-level work around toc.write_layer — OCI image layouts on disk (read and
write), which layers to convert and which to keep, manifests, configs and annotations, progress.  What
never does: the byte format (toc.py), HTTP (fetch.py), FUSE.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from tqdm import tqdm

import toc

log = logging.getLogger(__name__)

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
TOC_DIGEST_ANNOTATION = "containerd.io/snapshot/stargz/toc.digest"
UNCOMPRESSED_SIZE_ANNOTATION = "io.containers.estargz.uncompressed-size"
REF_NAME_ANNOTATION = "org.opencontainers.image.ref.name"
MAX_MANIFEST_BYTES = 4 << 20
MAX_CONFIG_BYTES = 8 << 20


class ImageError(toc.LazymountError):
    """An image layout, manifest or config is missing or malformed."""


@dataclass
class ConvertOptions:
    """How layers are written: see toc.write_layer."""

    chunk_size: int = toc.DEFAULT_CHUNK_SIZE
    fmt: str = toc.GZIP
    level: int = 3
    workers: int | None = None
    prioritized: dict[str, list[str]] = field(default_factory=dict)  # source layer digest -> paths
    prioritize_all: list[str] | None = None  # paths to place first in every layer without its own list
    progress: bool = True


def _read_json(path: Path, limit: int, what: str) -> dict:
    try:
        size = path.stat().st_size
        if size > limit:
            raise ImageError(f"{what} {path} is {size} bytes, over the {limit}-byte limit")
        doc = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise ImageError(f"{what} {path} does not exist") from None
    except ValueError as e:
        raise ImageError(f"{what} {path} is not valid JSON ({e})") from None
    if not isinstance(doc, dict):
        raise ImageError(f"{what} {path} is not a JSON object")
    return doc


def parse_oci_ref(ref: str) -> tuple[Path, str | None]:
    """Split `oci:DIR[:TAG]` into the layout directory and the tag (None: the only image)."""
    if not ref.startswith("oci:"):
        raise ImageError(f"{ref!r} is not an oci:DIR[:TAG] reference")
    body = ref[4:]
    directory, sep, tag = body.rpartition(":")
    if not sep or "/" in tag or not directory:
        return Path(body), None
    return Path(directory), tag


class OCILayout:
    """An OCI image layout directory, as skopeo and umoci write it."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def blob_path(self, digest: str) -> Path:
        return self.root / "blobs" / "sha256" / toc.check_digest(digest)[7:]

    def read_blob_json(self, descriptor: dict, limit: int, what: str) -> dict:
        """Read a small JSON blob and verify it against its descriptor's digest."""
        path = self.blob_path(descriptor.get("digest", ""))
        doc = _read_json(path, limit, what)
        if toc.sha256_digest(path.read_bytes()) != descriptor["digest"]:
            raise toc.DigestError(f"{what} {path} does not match its digest")
        return doc

    def manifest(self, tag: str | None) -> tuple[dict, dict]:
        """The (manifest descriptor, manifest) for `tag`, or of the only image when tag is None."""
        index = _read_json(self.root / "index.json", MAX_MANIFEST_BYTES, "image index")
        descriptors = index.get("manifests") or []
        if tag is not None:
            descriptors = [d for d in descriptors if _ref_name(d) == tag]
        if len(descriptors) != 1:
            what = f"tag {tag!r}" if tag else "a single image (give a :TAG)"
            raise ImageError(f"{self.root}: index.json has {len(descriptors)} manifests for {what}")
        desc = descriptors[0]
        manifest = self.read_blob_json(desc, MAX_MANIFEST_BYTES, "manifest")
        if manifest.get("mediaType", desc.get("mediaType")) in (OCI_INDEX, DOCKER_LIST):
            raise ImageError(f"{self.root}: tag {tag!r} is a multi-platform index; convert one platform")
        if not isinstance(manifest.get("layers"), list) or not isinstance(manifest.get("config"), dict):
            raise ImageError(f"{self.root}: manifest has no layers or config")
        return desc, manifest

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
        index = _read_json(index_path, MAX_MANIFEST_BYTES, "image index") if index_path.exists() else {
            "schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}
        descriptor = dict(descriptor)
        if tag:
            descriptor["annotations"] = {REF_NAME_ANNOTATION: tag}
        index["manifests"] = [d for d in index.get("manifests", []) if tag and _ref_name(d) != tag]
        index["manifests"].append(descriptor)
        _atomic_write(index_path, lambda f: f.write(json.dumps(index).encode()))


def _ref_name(descriptor: dict) -> str | None:
    return (descriptor.get("annotations") or {}).get(REF_NAME_ANNOTATION)


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

    def __init__(self, f: BinaryIO, bar: tqdm) -> None:
        self.f, self.bar = f, bar

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.bar.update(len(data))
        return data

    def readable(self) -> bool:
        return True


def _progress_bar(total: int, desc: str, enabled: bool) -> tqdm:
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, leave=False,
                disable=not (enabled and sys.stderr.isatty()))


def convert_layer_file(src: Path, dst: Path, options: ConvertOptions,
                       prioritized: list[str] | None = None) -> toc.LayerInfo:
    """Convert one layer file (tar, tar.gz, tar.zst) into an eStargz blob at `dst` (written atomically)."""
    dst = Path(dst)
    with open(src, "rb") as raw, _progress_bar(os.fstat(raw.fileno()).st_size, Path(src).name[:20],
                                                options.progress) as bar:
        info: list[toc.LayerInfo] = []
        _atomic_write(dst, lambda out: info.append(toc.write_layer(
            _ProgressReader(raw, bar), out, chunk_size=options.chunk_size, prioritized=prioritized,
            fmt=options.fmt, level=options.level, workers=options.workers)))
    return info[0]


def estargz_annotations(path: Path) -> dict[str, str] | None:
    """The eStargz annotations of a blob that already is eStargz/zstd:chunked, or None if it is not."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        def read_at(offset: int, length: int) -> bytes:
            f.seek(offset)
            return f.read(length)
        try:
            _, toc_json = toc.read_toc_json(read_at, size)
        except toc.FooterError:
            return None
        f.seek(0)
        uncompressed = sum(len(b) for b in _iter_decompressed(toc.open_layer_source(f)))
    return {TOC_DIGEST_ANNOTATION: toc.sha256_digest(toc_json),
            UNCOMPRESSED_SIZE_ANNOTATION: str(uncompressed)}


def _iter_decompressed(stream: BinaryIO):
    while block := stream.read(1 << 20):
        yield block


def convert_image(src_ref: str, dst_ref: str, options: ConvertOptions) -> dict:
    """Convert every layer of the image at `oci:DIR[:TAG]` and write the result to another layout.

    Layers that already are eStargz are kept byte for byte.  Returns the new manifest.
    """
    src_dir, src_tag = parse_oci_ref(src_ref)
    dst_dir, dst_tag = parse_oci_ref(dst_ref)
    src, dst = OCILayout(src_dir), OCILayout(dst_dir)
    _, manifest = src.manifest(src_tag)
    config = src.read_blob_json(manifest["config"], MAX_CONFIG_BYTES, "config")
    diff_ids = (config.get("rootfs") or {}).get("diff_ids")
    if not isinstance(diff_ids, list) or len(diff_ids) != len(manifest["layers"]):
        raise ImageError(f"{src_ref}: config rootfs.diff_ids does not match the manifest's layers")
    new_layers = []
    for position, layer in enumerate(manifest["layers"]):
        descriptor, diff_id = convert_layer(src, dst, layer, options, f"layer {position + 1}")
        new_layers.append(descriptor)
        if diff_id:
            diff_ids[position] = diff_id
    config_bytes = json.dumps(config, separators=(",", ":")).encode()
    new_manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": dst.add_blob_bytes(config_bytes),
                   "size": len(config_bytes)},
        "layers": new_layers,
    }
    if manifest.get("annotations"):
        new_manifest["annotations"] = manifest["annotations"]
    manifest_bytes = json.dumps(new_manifest, separators=(",", ":")).encode()
    dst.tag(dst_tag, {"mediaType": OCI_MANIFEST, "digest": dst.add_blob_bytes(manifest_bytes),
                      "size": len(manifest_bytes)})
    return new_manifest


def convert_layer(src: OCILayout, dst: OCILayout, layer: dict, options: ConvertOptions,
                  label: str) -> tuple[dict, str | None]:
    """Convert (or keep) one layer; return its new descriptor and new DiffID (None when kept)."""
    src_path = src.blob_path(layer.get("digest", ""))
    if not src_path.exists():
        raise ImageError(f"{label}: blob {layer['digest']} is missing from {src.root}")
    annotations = dict(layer.get("annotations") or {})
    prioritized = options.prioritized.get(layer["digest"], options.prioritize_all)
    if prioritized is None:
        existing = estargz_annotations(src_path)
        if existing is not None:
            log.info("%s %s is already eStargz: kept as it is", label, layer["digest"])
            _link_or_copy(src_path, dst.blob_path(layer["digest"]))
            return {**layer, "annotations": {**annotations, **existing}}, None
    tmp = dst.root / "blobs" / "sha256" / f".convert-{os.getpid()}-{layer['digest'][7:23]}"
    tmp.parent.mkdir(parents=True, exist_ok=True)
    info = convert_layer_file(src_path, tmp, options, prioritized)
    os.replace(tmp, dst.blob_path(info.digest))
    log.info("%s %s -> %s (%d entries)", label, layer["digest"], info.digest, info.entries)
    annotations.update(info.annotations)
    media_type = LAYER_ZSTD if options.fmt == toc.ZSTD else LAYER_GZIP
    return {"mediaType": media_type, "digest": info.digest, "size": info.size,
            "annotations": annotations}, info.diff_id


def _link_or_copy(src: Path, dst: Path) -> None:
    if dst.exists():
        return
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        with open(src, "rb") as f:
            _atomic_write(dst, lambda out: shutil.copyfileobj(f, out, 1 << 20))


def describe_layer(read_at: toc.ReadAt, size: int, expected_toc_digest: str | None = None) -> dict:
    """What `lazymount inspect` shows of one layer: format, entry counts, chunking, landmark."""
    try:
        footer, toc_json = toc.read_toc_json(read_at, size, expected_toc_digest)
    except toc.FooterError:
        return {"format": "not eStargz", "size": size}
    index = toc.Index.from_json(toc_json, footer)
    chunk_sizes = [c.size for _, i in index.walk() if index.kind(i) == toc.KIND_REG
                   for c in index.chunks(i)]
    if index.prefetch_end is not None:
        landmark = f"prefetch [0, {index.prefetch_end})"
    else:
        landmark = "no prefetch" if index.no_prefetch else "none"
    return {"format": footer.format, "size": size, "toc_digest": toc.sha256_digest(toc_json),
            "toc_bytes": len(toc_json), "entries": index.stats(),
            "largest_chunk": max(chunk_sizes, default=0), "landmark": landmark}
