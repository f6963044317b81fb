"""`lazymount record` and `lazymount optimize` end to end, and the landmark prefetch at mount time.

A two-layer Debian + Python image made from the host's files (images.debian_python_rootfs, then a layer
of time zone data the workload never reads) is built with umoci, converted to plain eStargz and pushed
to docker-registry on loopback.  A real Python workload runs in it under bubblewrap while the mount
records what it opens; the optimized image's TOC order, its content (against `umoci unpack` of the
source) and what its mount fetches (`lazymount stats`) are checked.  Mounts are undone in finalizers.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

import convert
import fetch
import mountctl
import profiles
import regclient
import sandbox
import toc
import tocread
from imagebuild import append_layers, debian_python_rootfs, describe_tree, make_layer_tar, make_oci_image
from tests.registry import Registry, push_layout
from tests.test_mount import MISSING, _assert_same_tree, lazymount, mounted, stats, umoci_unpack

pytestmark = pytest.mark.skipif(bool(MISSING) or shutil.which("bwrap") is None,
                                reason=f"needs bwrap and {', '.join(MISSING) or 'the test tools'}")

# Prints the file of every module it imported from the image (not frozen or built in), relative to /,
# one a line: all of them must be in the profile.
WORKLOAD = ["python3", "-c", "import json, email.message, http.client, decimal, sys\n"
            "specs = [m.__spec__ for m in list(sys.modules.values()) if getattr(m, '__spec__', None)]\n"
            "print('\\n'.join(sorted(s.origin.lstrip('/') for s in specs if s.has_location)))"]
OTHER_WORKLOAD = ["python3", "-c", "import csv, zipfile; print('ok')"]


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory, registry: Registry) -> dict:
    """The gzip source layout, its `umoci unpack` description, and the plain eStargz image's reference."""
    work = tmp_path_factory.mktemp("optimize")
    src = make_oci_image(work / "src", "v1", [debian_python_rootfs(work / "base")])
    data = work / "data"
    shutil.copytree("/usr/share/zoneinfo/Europe", data / "usr/share/zoneinfo/Europe", symlinks=True)
    append_layers(src, "v1", [make_layer_tar(data, work / "data.tar.gz", gzip=True)])
    lazymount("convert", "-q", f"oci:{src}:v1", f"oci:{work}/plain:v1")
    push_layout(work / "plain", "v1", registry, "debian")
    expected = describe_tree(umoci_unpack(src, "v1", work / "unpack"))
    return {"src": src, "expected": expected, "plain": f"{registry.host}/debian:v1", "work": work}


def _layers(ref: str) -> list[tuple[str, bytes, toc.Index]]:
    """(digest, TOC JSON, index) of every layer of an image."""
    image = fetch.open_image(ref, client=regclient.RegistryClient())
    out = []
    for descriptor in image.layers:
        with image.blob(descriptor.digest) as reader:
            footer, toc_json = tocread.read_toc_json(reader.read_at, reader.size)
            out.append((descriptor.digest, toc_json, tocread.index_from_json(toc_json, footer)))
    return out


def _record(ref: str, profile: Path, cache_dir: Path, command: list[str], *extra: str) -> str:
    """`lazymount record IMAGE OPTIONS -- CMD`, options after the image as in the README."""
    result = lazymount("record", ref, "--cache-dir", str(cache_dir), "-o", str(profile), *extra, "--",
                       *command)
    return result.stdout


def test_record_optimize_and_prefetch(images: dict, tmp_path: Path) -> None:
    """The profile lists the files the workload opened, in order; the optimized image puts them before
    the landmark and equals the source; its mount fetches exactly the landmark range, and the workload
    then fetches nothing more."""
    profile_path = tmp_path / "profile"
    out = _record(images["plain"], profile_path, tmp_path / "c1", WORKLOAD)
    profile = profiles.read_profile(profile_path)
    plain_layers = _layers(images["plain"])
    base_digest, data_digest = (digest for digest, _, _ in plain_layers)
    assert list(profile) == [base_digest]  # the time zone layer was never opened
    paths = profile[base_digest]
    assert len(paths) == len(set(paths))
    assert set(out.split()) <= set(paths)  # every imported module's file
    order = [paths.index(p) for p in ("usr/bin/python3.11", "usr/lib/python3.11/json/__init__.py",
                                      "usr/lib/python3.11/json/decoder.py")]
    assert order == sorted(order)

    # --append merges in order of first appearance.
    shutil.copy(profile_path, tmp_path / "merged")
    _record(images["plain"], tmp_path / "merged", tmp_path / "c1", OTHER_WORKLOAD, "--append")
    merged = profiles.read_profile(tmp_path / "merged")[base_digest]
    assert merged[:len(paths)] == paths and "usr/lib/python3.11/csv.py" in merged[len(paths):]

    # registry eStargz -> registry, the profile keyed by the source's (eStargz) layer digests
    optimized = images["plain"].replace(":v1", ":opt")
    lazymount("optimize", "-q", "--profile", str(profile_path), images["plain"], optimized)
    opt_layers = _layers(optimized)
    assert convert.prefetch_order(opt_layers[0][1]) == paths
    assert opt_layers[1][0] == data_digest  # untouched, already `.no.prefetch.landmark`: kept
    prefetch_end = opt_layers[0][2].prefetch_end

    # Mounting fetches exactly [0, prefetch_end) before it is ready; the workload then fetches nothing.
    mnt = tmp_path / "mnt"
    with mounted(optimized, mnt, "--cache-dir", str(tmp_path / "c2"), "--no-background-fetch"):
        at_start = stats(mnt)
        assert at_start["fetch_state"] == "prefetched"
        assert [layer["bytes_fetched"] for layer in at_start["layers"]] == [prefetch_end, 0]
        assert at_start["layers"][0]["prefetched_bytes"] == prefetch_end
        info = json.loads(os.getxattr(mnt, mountctl.IMAGE_XATTR))
        argv = sandbox.bwrap_command(mnt, info["config"], WORKLOAD, sandbox.IMAGE_ONLY)
        result = subprocess.run(argv, check=True, capture_output=True, text=True)
        assert result.stdout == out
        after = stats(mnt)
        assert [layer["bytes_fetched"] for layer in after["layers"]] == [prefetch_end, 0]
        assert after["totals"]["chunks_fetched"] == 0 and after["totals"]["chunk_hits"] > 0
        _assert_same_tree(describe_tree(mnt), images["expected"])

    # Where nothing can be staged (here a cache dir whose `layers` is a file) the mount skips the
    # prefetch and the workload still runs, fetching on demand.
    (tmp_path / "c3").mkdir()
    (tmp_path / "c3" / "layers").write_text("not a directory")
    with mounted(optimized, mnt, "--cache-dir", str(tmp_path / "c3"), "--no-background-fetch"):
        assert [layer["bytes_fetched"] for layer in stats(mnt)["layers"]] == [0, 0]
        argv = sandbox.bwrap_command(mnt, info["config"], WORKLOAD, sandbox.IMAGE_ONLY)
        result = subprocess.run(argv, check=True, capture_output=True, text=True)
        assert result.stdout == out
        assert stats(mnt)["totals"]["chunks_fetched"] > 0

    # Optimizing an image already laid out for the profile keeps every layer.
    renamed = {opt_layers[0][0]: paths}
    profiles.write_profile(tmp_path / "renamed", renamed)
    again = images["plain"].replace(":v1", ":again")
    lazymount("optimize", "-q", "--profile", str(tmp_path / "renamed"), optimized, again)
    assert [layer[0] for layer in _layers(again)] == [layer[0] for layer in opt_layers]


def test_optimize_workload_from_gzip_layout(images: dict, tmp_path: Path) -> None:
    """`--workload` records in the gzip source (layers converted locally while mounted) and writes an
    OCI layout whose first layer starts with what the workload opened; the content is unchanged."""
    dst = tmp_path / "opt"
    lazymount("optimize", "-q", "--cache-dir", str(tmp_path / "cache"), "--workload",
              shlex.join(OTHER_WORKLOAD), f"oci:{images['src']}:v1", f"oci:{dst}:v1")
    first, second = _layers(f"oci:{dst}:v1")
    order = convert.prefetch_order(first[1])
    assert order.index("usr/bin/python3.11") < order.index("usr/lib/python3.11/csv.py")
    assert convert.prefetch_order(second[1]) is None
    mnt = tmp_path / "mnt"
    with mounted(f"oci:{dst}:v1", mnt, "--cache-dir", str(tmp_path / "c2"), "--no-background-fetch"):
        _assert_same_tree(describe_tree(mnt), images["expected"])


def _profiled_bytes(ref: str, profile: dict[str, list[str]]) -> int:
    """Compressed bytes of the chunks of the profiled files (each chunk once)."""
    chunks = {}
    for digest, _, index in _layers(ref):
        for path in profile.get(digest, []):
            entry = index.lookup(path)
            target = index.hardlink_target(entry)
            chunks.update((c.digest, c.comp_end - c.comp_offset)
                          for c in index.chunks(entry if target is None else target))
    return sum(chunks.values())


def test_record_push_prefetches_the_plain_image(images: dict, registry: Registry, tmp_path: Path) -> None:
    """`record --push` attaches the profile to the plain eStargz image (no `optimize`, nothing pushed
    again); a later mount of that image fetches the profiled files' chunks before it answers (multi-range
    requests), and `run` of the workload then fetches no chunk; `--no-prefetch` does not prefetch."""
    push_layout(images["work"] / "plain", "v1", registry, "profiled")
    ref = images["plain"].replace("/debian:", "/profiled:")
    result = lazymount("record", ref, "--cache-dir", str(tmp_path / "c1"), "-o", str(tmp_path / "profile"),
                       "--push", "--", *WORKLOAD)
    assert "attached the profile" in result.stderr
    out = result.stdout
    profile = profiles.read_profile(tmp_path / "profile")
    assert profiles.attached_profile(fetch.open_image(ref, client=regclient.RegistryClient())) == profile
    profiled = _profiled_bytes(ref, profile)

    mnt = tmp_path / "mnt"
    with mounted(ref, mnt, "--cache-dir", str(tmp_path / "c2"), "--no-background-fetch"):
        before = stats(mnt)  # nothing read yet
        assert before["fetch_state"] == "prefetched"
        assert profiled <= before["totals"]["prefetched_bytes"] == before["totals"]["bytes_fetched"]
        assert before["totals"]["requests"] < len(profile[next(iter(profile))]) // 4  # many ranges a request

    stats_file = tmp_path / "stats.json"
    result = lazymount("run", ref, "--cache-dir", str(tmp_path / "c3"), "--no-background-fetch",
                       "--stats-file", str(stats_file), "--", *WORKLOAD)
    after = json.loads(stats_file.read_text())
    assert result.stdout == out
    assert after["totals"]["prefetched_bytes"] >= profiled
    assert after["totals"]["chunks_fetched"] == 0 and after["totals"]["chunk_hits"] > 0

    lazymount("run", ref, "--cache-dir", str(tmp_path / "c4"), "--no-background-fetch", "--no-prefetch",
              "--stats-file", str(stats_file), "--", *WORKLOAD)
    unprefetched = json.loads(stats_file.read_text())
    assert unprefetched["totals"]["prefetched_bytes"] == 0 and unprefetched["totals"]["chunks_fetched"] > 0
