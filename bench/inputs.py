"""Benchmark inputs, built once into the work directory and reused: the standard image, a many-files
layer, and a local registry holding images.

What belongs here: making inputs (the standard image through ../shared/bench/mkbenchimage.sh, a
synthetic layer of many small files, and a one-layer image of it), facts about them that cost a pass
over the data (uncompressed sizes), cached beside them, and a docker-registry whose storage lives in
the work directory, with images pushed (or converted by lazymount) into it once.  What never does:
measuring anything.
"""

from __future__ import annotations

import gzip
import http.client
import io
import json
import random
import shlex
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path

from isal import igzip

from bench.common import LAZYMOUNT, REPO, log
from imagebuild import write_oci_layout
from tests.reference import read_layout
from tests.registry import Registry, skopeo
from toc import INDEX_TYPES, MANIFEST_TYPES

MKBENCHIMAGE = REPO.parent / "shared" / "bench" / "mkbenchimage.sh"
STANDARD_TAG = "torch"
MANY_FILES_TAG = "files"
MANY_FILES_VERSION = 2  # bump when the generator changes, so cached tars are rebuilt
MTIME = 1_700_000_000


def standard_image(workdir: Path) -> Path:
    """The standard benchmark image (OCI layout, tag `torch`), built on first use (~2-3 min, root)."""
    layout = workdir / "standard-image"
    if (layout / "index.json").exists():
        return layout
    partial, scratch = workdir / "standard-image.partial", workdir / "standard-work"
    log(f"building the standard image with {MKBENCHIMAGE} (once; ~2-3 min)")
    with open(workdir / "mkbenchimage.log", "wb") as out:
        subprocess.run(["bash", str(MKBENCHIMAGE), str(partial), str(scratch)], check=True, stdout=out,
                       stderr=subprocess.STDOUT)
    partial.rename(layout)
    shutil.rmtree(scratch, ignore_errors=True)
    return layout


def uncompressed_size(blob: Path, workdir: Path) -> int:
    """Bytes of a gzip layer blob once decompressed; cached by blob name (its digest) in sizes.json."""
    cache_path = workdir / "sizes.json"
    cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    if blob.name not in cache:
        total = 0
        with igzip.open(blob, "rb") as f:
            while block := f.read(1 << 20):
                total += len(block)
        cache[blob.name] = total
        cache_path.write_text(json.dumps(cache, indent=1))
    return cache[blob.name]


# Name parts for the synthetic tree: short syllables make identifiers of realistic length and shape.
_SYLLABLES = ("ab", "ac", "al", "an", "ar", "base", "co", "con", "core", "da", "de", "di", "el", "en", "ex",
              "fi", "for", "ge", "im", "in", "io", "la", "le", "li", "lo", "ma", "me", "mo", "na", "net",
              "no", "op", "or", "pa", "pe", "po", "pro", "ra", "re", "ri", "ro", "sa", "se", "si", "so",
              "ta", "te", "ti", "to", "tra", "un", "ut", "va", "ve", "xa", "zo")
# Files always have an extension or an upper-case name, directories never: a name is never both.
_EXTENSIONS = (".py", ".py", ".py", ".pyi", ".so", ".json", ".txt", ".h", ".js", ".js", ".md", ".html",
               ".css", ".yaml", ".c", "")
_BARE_NAMES = ("LICENSE", "README", "METADATA", "RECORD", "COPYING", "NOTICE", "AUTHORS", "Makefile")
_ROOTS = ("usr/lib/python3/dist-packages", "usr/local/lib/python3.11/site-packages", "opt/app/node_modules",
          "usr/share/doc", "usr/include", "usr/share/locale")


def _word(rng: random.Random, parts: tuple[int, int] = (1, 4)) -> str:
    return "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(*parts)))


def _package_paths(rng: random.Random, root: str, budget: int) -> list[str]:
    """File paths of one package: a few nested subdirectories, Python files paired with __pycache__."""
    package = f"{root}/{_word(rng)}{rng.choice(('', '_', '-'))}{_word(rng, (0, 2))}"
    dirs = [package]
    for _ in range(rng.randint(0, 12)):
        dirs.append(f"{rng.choice(dirs)}/{_word(rng, (1, 3))}")
    paths: list[str] = []
    for _ in range(min(budget, max(1, int(rng.lognormvariate(3.2, 1.2))))):
        directory = rng.choice(dirs)
        ext = rng.choice(_EXTENSIONS)
        stem = "_".join(_word(rng) for _ in range(rng.randint(1, 3))) if ext else rng.choice(_BARE_NAMES)
        paths.append(f"{directory}/{stem}{ext}")
        if ext == ".py" and len(paths) < budget:
            paths.append(f"{directory}/__pycache__/{stem}.cpython-311.pyc")
    return paths


def _tar_info(name: str, kind: bytes, size: int = 0, mode: int = 0o644, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.size, info.mode, info.linkname, info.mtime = kind, size, mode, link, MTIME
    info.uname = info.gname = "root"
    return info


def many_files_tar(workdir: Path, files: int, seed: int = 2024) -> Path:
    """A plain tar layer of `files` small regular files in a package-like tree (with directory entries
    and ~1% symlinks), deterministic for a given size and seed; built once and cached."""
    out = workdir / f"many-files-{files}-v{MANY_FILES_VERSION}.tar"
    if out.exists():
        return out
    log(f"generating {out.name}")
    rng = random.Random(seed)
    text = "".join(f"{_word(rng)} = {rng.randint(0, 10**6)}  # {_word(rng)} {_word(rng)}\n"
                   for _ in range(40_000)).encode()
    paths: dict[str, None] = {}  # ordered and free of duplicates
    while len(paths) < files:
        paths.update(dict.fromkeys(_package_paths(rng, rng.choice(_ROOTS), files - len(paths))))
    partial = out.with_suffix(".partial")
    written_dirs: set[str] = set()
    with tarfile.open(partial, "w", format=tarfile.PAX_FORMAT) as tar:
        for path in list(paths)[:files]:
            parts = path.split("/")
            for depth in range(1, len(parts)):
                directory = "/".join(parts[:depth])
                if directory not in written_dirs:
                    written_dirs.add(directory)
                    tar.addfile(_tar_info(directory + "/", tarfile.DIRTYPE, mode=0o755))
            if rng.random() < 0.01:
                tar.addfile(_tar_info(path + ".link", tarfile.SYMTYPE, mode=0o777, link=parts[-1]))
            size = min(int(rng.lognormvariate(6.5, 1.3)), 64 << 10)
            start = rng.randrange(len(text) - size)
            tar.addfile(_tar_info(path, tarfile.REGTYPE, size), io.BytesIO(text[start:start + size]))
    partial.rename(out)
    return out


def _one_layer_layout(layout: Path, tag: str, write_layer: Callable[[Path], None]) -> Path:
    """Build once (cached) an OCI layout at `layout` whose one layer `write_layer(path)` writes as tar.gz."""
    if (layout / "index.json").exists():
        return layout
    log(f"building {layout.name}")
    partial = layout.with_suffix(".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    gzipped = partial / "layer.tar.gz"
    write_layer(gzipped)
    write_oci_layout(partial, tag, [gzipped])
    gzipped.unlink()
    partial.rename(layout)
    return layout


def many_files_image(workdir: Path, files: int) -> Path:
    """A one-layer OCI layout (tag `files`) whose layer is many_files_tar gzipped at level 6 (as docker)."""
    tar = many_files_tar(workdir, files)

    def write_layer(gzipped: Path) -> None:
        with open(tar, "rb") as src, gzip.open(gzipped, "wb", compresslevel=6) as dst:
            shutil.copyfileobj(src, dst, 1 << 20)

    return _one_layer_layout(workdir / f"{tar.stem}-image", MANY_FILES_TAG, write_layer)


def local_registry(workdir: Path) -> Registry:
    """Debian's docker-registry on a free loopback port, its storage kept in the work directory (so images
    pushed by an earlier run are still there); the caller stops it."""
    return Registry(workdir / "registry").start()


def _head_manifest(registry: Registry, repository: str, tag: str) -> http.client.HTTPResponse:
    conn = http.client.HTTPConnection(registry.host, timeout=30)
    try:
        conn.request("HEAD", f"/v2/{repository}/manifests/{tag}",
                     headers={"Accept": ", ".join(INDEX_TYPES + MANIFEST_TYPES)})
        return conn.getresponse()
    finally:
        conn.close()


def has_image(registry: Registry, repository: str, tag: str) -> bool:
    """Whether the registry has a manifest for repository:tag."""
    return _head_manifest(registry, repository, tag).status == 200


def manifest_digest(registry: Registry, repository: str, tag: str) -> str:
    """The digest of repository:tag's manifest in the registry."""
    response = _head_manifest(registry, repository, tag)
    if response.status != 200:
        raise RuntimeError(f"{registry.host}/{repository}:{tag}: HTTP {response.status}")
    return response.headers["Docker-Content-Digest"]


def pushed(registry: Registry, layout: Path, tag: str, repository: str, remote_tag: str) -> str:
    """`REGISTRY/REPOSITORY:REMOTE_TAG`, pushed from `oci:LAYOUT:TAG` with skopeo (digests preserved) unless
    the registry already has it."""
    name = f"{registry.host}/{repository}:{remote_tag}"
    if not has_image(registry, repository, remote_tag):
        log(f"pushing oci:{layout}:{tag} to {name}")
        skopeo("copy", "--dest-tls-verify=false", "--preserve-digests", f"oci:{layout}:{tag}",
               f"docker://{name}", registry=registry)
    return name


def converted(registry: Registry, source: str, repository: str, remote_tag: str,
              workload: str | None = None) -> str:
    """`REGISTRY/REPOSITORY:REMOTE_TAG`, made from the image `source` by `lazymount convert` (or, given a
    `workload` command line, `lazymount optimize --workload`) unless the registry already has it."""
    name = f"{registry.host}/{repository}:{remote_tag}"
    if not has_image(registry, repository, remote_tag):
        with tempfile.TemporaryDirectory(dir=registry.workdir) as cache_dir:
            how = ["convert"] if workload is None else ["optimize", "--cache-dir", cache_dir, "--workload",
                                                        workload]
            log(f"lazymount {shlex.join(how)} {source} {name}")
            subprocess.run([str(LAZYMOUNT), *how, "-q", "--plain-http", source, name], check=True,
                           stdout=subprocess.DEVNULL)
    return name


BIG_FILE_TAG = "big"
BIG_FILE_PATH = "data/big.bin"  # inside the layer


def big_file(workdir: Path, size: int) -> Path:
    """A file of `size` bytes of realistic content: the standard image's shared libraries (torch's among
    them) concatenated in layer order and cut at `size`; built once and cached."""
    out = workdir / f"big-{size >> 20}MiB.bin"
    if out.exists():
        return out
    log(f"building {out.name} from the standard image's .so files")
    partial = out.with_suffix(".partial")
    remaining = size
    with open(partial, "wb") as dst:
        for blob, _ in reversed(read_layout(standard_image(workdir), STANDARD_TAG)[2]):  # torch's layer first
            with igzip.open(blob, "rb") as src, tarfile.open(fileobj=src, mode="r|") as tar:
                for member in tar:
                    if remaining and member.isfile() and ".so" in member.name.rsplit("/", 1)[-1]:
                        data = tar.extractfile(member).read(remaining)  # type: ignore[union-attr]
                        dst.write(data)
                        remaining -= len(data)
    if remaining:
        raise RuntimeError(f"the standard image holds {size - remaining} bytes of .so files, not {size}")
    partial.rename(out)
    return out


def big_file_image(workdir: Path, size: int) -> Path:
    """A one-layer OCI layout (tag `big`) holding big_file at BIG_FILE_PATH, gzipped at level 6."""
    source = big_file(workdir, size)

    def write_layer(gzipped: Path) -> None:
        with gzip.open(gzipped, "wb", compresslevel=6) as gz, \
                tarfile.open(fileobj=gz, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            tar.addfile(_tar_info(BIG_FILE_PATH.split("/")[0] + "/", tarfile.DIRTYPE, mode=0o755))
            with open(source, "rb") as f:
                tar.addfile(_tar_info(BIG_FILE_PATH, tarfile.REGTYPE, size), f)

    return _one_layer_layout(workdir / f"{source.stem}-image", BIG_FILE_TAG, write_layer)


GCC_TAG = "gcc"
GCC_PACKAGES = "gcc,libc6-dev"
DEBIAN_SUITE = "bookworm"


def _debian_mirror() -> str:
    """The first Debian mirror this machine's apt sources name (as mkbenchimage.sh picks it)."""
    for sources in sorted(Path("/etc/apt/sources.list.d").glob("*.sources")):
        for line in sources.read_text().splitlines():
            if line.startswith("URIs:"):
                return line.split()[1]
    raise RuntimeError("no Debian mirror in /etc/apt/sources.list.d/*.sources")


def gcc_image(workdir: Path) -> Path:
    """A one-layer OCI layout (tag `gcc`): debootstrap minbase of the standard image's suite with gcc and
    libc6-dev (umoci's gzip); built once on first use (~1-2 min, root, the Debian mirror)."""
    layout = workdir / "gcc-image"
    if (layout / "index.json").exists():
        return layout
    partial, bundle = workdir / "gcc-image.partial", workdir / "gcc-work"
    shutil.rmtree(partial, ignore_errors=True)
    shutil.rmtree(bundle, ignore_errors=True)
    rootfs = bundle / "rootfs"
    log(f"building {layout.name}: debootstrap --include={GCC_PACKAGES} (once)")
    script = f"""set -euo pipefail
umoci init --layout {partial}
umoci new --image {partial}:{GCC_TAG}
umoci unpack --image {partial}:{GCC_TAG} {bundle}
debootstrap --variant=minbase --include={GCC_PACKAGES} {DEBIAN_SUITE} {rootfs} {_debian_mirror()}
chroot {rootfs} apt-get clean
rm -rf {rootfs}/var/lib/apt/lists/* {rootfs}/var/cache/apt/*.bin {rootfs}/var/log/* {rootfs}/tmp/*
umoci repack --image {partial}:{GCC_TAG} {bundle}
"""
    with open(workdir / "gcc-image.log", "wb") as out:
        subprocess.run(["bash", "-c", script], check=True, stdout=out, stderr=subprocess.STDOUT,
                       env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C",
                            "SOURCE_DATE_EPOCH": str(MTIME)})
    partial.rename(layout)
    shutil.rmtree(bundle, ignore_errors=True)
    return layout
