"""Hostile eStargz layers, built by hand and fast: TOC bombs, whitespace-padded TOCs, TOCs of millions of
entries, files declared as one huge chunk; and an OCI layout to mount them from.

What belongs here: building those blobs in memory (a few MB each, whatever they inflate to) with the
digests that make them self-consistent, and measuring a process's peak memory; tests/test_bounded.py and
bench/bench_bounded.py share them.  What never does: reading a layer (that is what is being tested).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import tarfile
import zlib
from pathlib import Path

import toc
import tocread

MIB = 1 << 20
BLOCK = 16 * MIB  # what one repeated gzip member inflates to
HELLO = b"hello, bounded world\n"


def peak_rss_mb(pid: int | str = "self") -> float:
    """VmHWM (the peak resident set) of process `pid`, in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM for {pid}")


def _member(data: bytes) -> bytes:
    return gzip.compress(data, 9, mtime=0)


def _repeated(block: bytes, count: int) -> bytes:
    """`count` gzip members of `block` each: a few KB that inflate to count * len(block)."""
    return _member(block) * count


def _tar_head(size: int) -> bytes:
    info = tarfile.TarInfo(toc.TOC_TAR_NAME)
    info.size, info.mode = size, 0o644
    return info.tobuf(tarfile.USTAR_FORMAT)


def _tar_tail(size: int) -> bytes:
    return b"\0" * (-size % 512) + b"\0" * 1024


def _hello_payload() -> tuple[bytes, dict]:
    """A chunk holding HELLO and the TOC entry of the file `hello` that it is."""
    digest = toc.sha256_digest(HELLO)
    return _member(HELLO), {"name": "hello", "type": "reg", "size": len(HELLO), "offset": 0,
                            "digest": digest, "chunkDigest": digest, "mode": 0o644}


def _blob(payload: bytes, toc_members: bytes) -> bytes:
    return payload + toc_members + tocread.footer_bytes(len(payload))


def _doc(entries: list[dict]) -> bytes:
    return json.dumps({"version": 1, "entries": entries}, separators=(",", ":")).encode()


def toc_bomb(inflated: int) -> tuple[bytes, str]:
    """(blob, TOC digest): a valid small TOC whose member goes on inflating to `inflated` bytes of zeros."""
    payload, hello = _hello_payload()
    doc = _doc([hello])
    head = _member(_tar_head(len(doc)) + doc + _tar_tail(len(doc)))
    return _blob(payload, head + _repeated(b"\0" * BLOCK, inflated // BLOCK)), toc.sha256_digest(doc)


def padded_toc(padding: int) -> tuple[bytes, str]:
    """(blob, TOC digest): a TOC of one file, valid JSON with `padding` bytes of whitespace before its
    closing brace (its digest covers them all)."""
    payload, hello = _hello_payload()
    prefix = _doc([hello])[:-1]
    blocks = padding // BLOCK
    size = len(prefix) + blocks * BLOCK + 1
    digest = hashlib.sha256(prefix)
    space = b" " * BLOCK
    for _ in range(blocks):
        digest.update(space)
    digest.update(b"}")
    members = (_member(_tar_head(size) + prefix) + _repeated(space, blocks)
               + _member(b"}" + _tar_tail(size)))
    return _blob(payload, members), "sha256:" + digest.hexdigest()


def many_entries(count: int) -> tuple[bytes, str, int]:
    """(blob, TOC digest, JSON bytes): a TOC of `count` entries, small files of 1,000 to a directory, each
    with its own chunk digest (what makes an index large), all sharing one chunk of the blob."""
    payload, hello = _hello_payload()
    chunk = hello["chunkDigest"]
    parts = [b'{"version":1,"entries":[', json.dumps(hello).encode()]
    line = (',{"name":"d%d/f%07d.py","type":"reg","size":%d,"modtime":"2024-01-01T00:00:00Z","mode":420,'
            '"offset":0,"digest":"%s","chunkDigest":"sha256:%064x"}')
    for i in range(count - 1):
        if i % 1000 == 0:
            parts.append(b',{"name":"d%d","type":"dir","mode":493}' % (i // 1000))
        parts.append((line % (i // 1000, i, len(HELLO), chunk, i)).encode())
    parts.append(b"]}")
    doc = b"".join(parts)
    del parts
    compressor = zlib.compressobj(1, zlib.DEFLATED, 31)
    member = compressor.compress(_tar_head(len(doc)) + doc + _tar_tail(len(doc))) + compressor.flush()
    return _blob(payload, member), toc.sha256_digest(doc), len(doc)


def huge_chunk(size: int) -> tuple[bytes, str]:
    """(blob, TOC digest): the file `big`, `size` bytes of zeros declared as one chunk (its digests
    consistent: the chunk and the file are zeros), and the small file `hello` after it."""
    zeros = hashlib.sha256()
    block = b"\0" * BLOCK
    for _ in range(size // BLOCK):
        zeros.update(block)
    zeros.update(b"\0" * (size % BLOCK))
    big = _repeated(block, size // BLOCK) + (_member(b"\0" * (size % BLOCK)) if size % BLOCK else b"")
    payload, hello = _hello_payload()
    digest = "sha256:" + zeros.hexdigest()
    entries = [{"name": "big", "type": "reg", "size": size, "offset": 0, "digest": digest,
                "chunkDigest": digest, "mode": 0o644}, dict(hello, offset=len(big))]
    doc = _doc(entries)
    return _blob(big + payload, _member(_tar_head(len(doc)) + doc + _tar_tail(len(doc)))), \
        toc.sha256_digest(doc)


def write_layout(layout: Path, blob: bytes, toc_digest: str, tag: str = "hostile") -> Path:
    """An OCI layout whose image has the one eStargz layer `blob`, annotated with `toc_digest`."""
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)

    def add(data: bytes) -> tuple[str, int]:
        digest = toc.sha256_digest(data)
        (blobs / digest[7:]).write_bytes(data)
        return digest, len(data)

    layer_digest, layer_size = add(blob)
    config = {"architecture": "amd64", "os": "linux", "config": {},
              "rootfs": {"type": "layers", "diff_ids": [layer_digest]}}
    config_digest, config_size = add(json.dumps(config).encode())
    manifest = {"schemaVersion": 2, "mediaType": toc.MEDIA_OCI_MANIFEST,
                "config": {"mediaType": toc.MEDIA_OCI_CONFIG, "digest": config_digest, "size": config_size},
                "layers": [{"mediaType": toc.MEDIA_LAYER_GZIP, "digest": layer_digest, "size": layer_size,
                            "annotations": {toc.TOC_DIGEST_ANNOTATION: toc_digest}}]}
    manifest_digest, manifest_size = add(json.dumps(manifest).encode())
    index = {"schemaVersion": 2, "manifests": [{
        "mediaType": toc.MEDIA_OCI_MANIFEST, "digest": manifest_digest, "size": manifest_size,
        "annotations": {toc.REF_NAME_ANNOTATION: tag}}]}
    (layout / "index.json").write_text(json.dumps(index))
    (layout / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    return layout
