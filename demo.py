"""`make demo`: build a sample image from this machine's own files, convert it to eStargz, inspect it.

Everything it uses is local: the sample image's layers are tarred from the Python standard library and
/usr/share/doc, written as an OCI image layout, converted with `lazymount convert` and described with
`lazymount inspect`.  It cleans up after itself unless --keep is given.
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import sys
import sysconfig
import tarfile
import tempfile
import time
from pathlib import Path

import convert
import lazymount
import toc


def _layer_from_dirs(dirs: list[Path], out: Path) -> None:
    """A gzip layer tarball of `dirs`, stored under their absolute paths without the leading '/'."""
    with gzip.open(out, "wb", compresslevel=1) as raw, tarfile.open(fileobj=raw, mode="w|",
                                                                    format=tarfile.PAX_FORMAT) as tar:
        for directory in dirs:
            tar.add(directory, arcname=str(directory).lstrip("/"),
                    filter=lambda info: None if "__pycache__" in info.name else info)


def build_sample_image(layout: Path, tag: str) -> list[Path]:
    """Write a two-layer OCI image (Python stdlib, then /usr/share/doc) into `layout`."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    sources = [[stdlib], [Path("/usr/share/doc")]]
    store = convert.OCILayout(layout)
    layers, diff_ids = [], []
    for position, dirs in enumerate(sources):
        tarball = layout.parent / f"layer{position}.tar.gz"
        _layer_from_dirs([d for d in dirs if d.is_dir()], tarball)
        data = tarball.read_bytes()
        diff_ids.append(toc.sha256_digest(gzip.decompress(data)))
        layers.append({"mediaType": convert.LAYER_GZIP, "digest": store.add_blob_bytes(data),
                       "size": len(data)})
        tarball.unlink()
    config = {"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": diff_ids},
              "config": {"Cmd": ["/bin/sh"], "Env": ["PATH=/usr/local/bin:/usr/bin:/bin"]}}
    config_bytes = json.dumps(config).encode()
    manifest = {"schemaVersion": 2, "mediaType": convert.OCI_MANIFEST, "layers": layers,
                "config": {"mediaType": convert.OCI_CONFIG, "digest": store.add_blob_bytes(config_bytes),
                           "size": len(config_bytes)}}
    manifest_bytes = json.dumps(manifest).encode()
    store.tag(tag, {"mediaType": convert.OCI_MANIFEST, "digest": store.add_blob_bytes(manifest_bytes),
                    "size": len(manifest_bytes)})
    return [store.blob_path(layer["digest"]) for layer in layers]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, help="where to build (default: a temp dir, removed after)")
    parser.add_argument("--keep", action="store_true", help="keep the work dir")
    args = parser.parse_args(argv)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="lazymount-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        print(f"== building a sample image from local files in {work}/src")
        start = time.monotonic()
        blobs = build_sample_image(work / "src", "demo")
        source_bytes = sum(b.stat().st_size for b in blobs)
        print(f"   {len(blobs)} layers, {source_bytes / 1e6:.1f} MB gzip ({time.monotonic() - start:.1f} s)")
        print("== lazymount convert oci:src:demo oci:estargz:demo")
        start = time.monotonic()
        status = lazymount.main(["convert", f"oci:{work}/src:demo", f"oci:{work}/estargz:demo"])
        if status:
            return status
        print(f"   converted in {time.monotonic() - start:.1f} s")
        print("== lazymount inspect oci:estargz:demo")
        return lazymount.main(["inspect", f"oci:{work}/estargz:demo"])
    finally:
        if args.keep:
            print(f"(kept {work})")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
