"""Benchmark "lazy": reads and walks through a lazy mount from the local registry against local disk and
a plain download, each through a mount made as root and one made by the unprivileged user; the mount
daemon's memory.

Images are pushed to Debian's docker-registry on loopback (inputs.py) and converted there by
`lazymount convert`.  Every cold case starts with an empty `--cache-dir` and `sync; echo 3 >
/proc/sys/vm/drop_caches` (the registry's storage is cold too), so this benchmark needs root.  A mount
made by the unprivileged user (regimes.py) is read by that user (FUSE refuses other users, root too),
and so is its local-disk baseline.  Cases:
- a 256 MiB file: cold sequential read through the mount (`--no-background-fetch`, so only the reader
  fetches) against `curl | gunzip` of the plain layer blob; warm re-read against the same file on local
  disk, page cache warm for both;
- `find` + stat of the whole standard image through a fresh mount, twice, against the rootfs unpacked
  by `umoci raw unpack`, cold and warm;
- the mount daemon's RSS for a 100k-file image after a `find` + stat of everything and a few reads.
Time to first result is benchmark "first-result" (bench_first_result.py).

What belongs here: these cases and their tables.  What never does: building or pushing images
(inputs.py), users and namespaces (regimes.py), anything inside lazymount.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from bench.cold import drop_caches
from bench.common import LAZYMOUNT, MB, MiB, Report, Table, Timing, log, mb, median, ratio, runs_label, timed
from bench.inputs import (
    BIG_FILE_PATH,
    BIG_FILE_TAG,
    MANY_FILES_TAG,
    STANDARD_TAG,
    big_file,
    big_file_image,
    converted,
    local_registry,
    many_files_image,
    pushed,
    standard_image,
)
from bench.regimes import ROOT, RunAs, unprivileged_user
from tests.reference import read_layout
from tests.registry import Registry

BIG_FILE_SIZE = 256 * MiB
QUICK_BIG_FILE_SIZE = 64 * MiB
COLD_RUNS = 3
WARM_RUNS = 5
RSS_FILES = 100_000
QUICK_RSS_FILES = 20_000
FILES_READ = 200  # files read after the find, for the RSS case
DEFAULTS = "(defaults)"
NO_BACKGROUND = "--no-background-fetch"
FIND_FORMAT = "%i %s %m %U %G %T@ %p\n"  # every field needs an lstat of the entry


@contextlib.contextmanager
def _mounted(image: str, scratch: Path, *options: str, as_: RunAs = ROOT) -> Iterator[tuple[Path, int]]:
    """`lazymount mount` of `image` with an empty cache: yield (mount point, daemon PID); unmount after."""
    workspace = as_.workspace(scratch)
    mountpoint, cache_dir = workspace / "mnt", workspace / "cache"
    shutil.rmtree(cache_dir, ignore_errors=True)
    if as_.user:
        as_.user.own(mountpoint)
    mountpoint.mkdir(parents=True, exist_ok=True)
    lazymount = [str(LAZYMOUNT), "mount", "--cache-dir", str(cache_dir), *options, image, str(mountpoint)]
    subprocess.run(as_.command(lazymount), check=True)
    try:
        yield mountpoint, _stats(mountpoint, as_)["pid"]
    finally:
        subprocess.run(as_.command([str(LAZYMOUNT), "umount", str(mountpoint)]), check=True)
        shutil.rmtree(cache_dir, ignore_errors=True)


def _stats(mountpoint: Path, as_: RunAs) -> dict:
    cmd = as_.command([str(LAZYMOUNT), "stats", "--json", str(mountpoint)])
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)


def _dd(path: Path, as_: RunAs) -> Callable[[], object]:
    cmd = as_.command(["dd", f"if={path}", "of=/dev/null", "bs=1M", "status=none"])
    return lambda: subprocess.run(cmd, check=True)


def _big_file(registry: Registry, workdir: Path, scratch: Path, users: list[RunAs], quick: bool) -> Table:
    size = QUICK_BIG_FILE_SIZE if quick else BIG_FILE_SIZE
    layout = big_file_image(workdir, size)
    plain = pushed(registry, layout, BIG_FILE_TAG, "big", f"plain-{size >> 20}m")
    esgz = converted(registry, plain, "big", f"esgz-{size >> 20}m")
    _, descriptor = read_layout(layout, BIG_FILE_TAG)[2][0]
    url = f"{registry.url}/v2/big/blobs/{descriptor['digest']}"
    runs = 1 if quick else COLD_RUNS
    curl = []
    for _ in range(runs):
        drop_caches()
        log("curl | gunzip of the plain blob")
        curl.append(timed(lambda: subprocess.run(f"curl -sS --fail {url} | gunzip > /dev/null", shell=True,
                                                 check=True))[0])
    curl_m = median(curl)
    local = big_file(workdir, size)

    def row(label: str, timings: list[Timing], against: Timing, goal: str) -> list[str]:
        timing = median(timings)
        return [label, runs_label(len(timings)), f"{timing.wall:.2f}", f"{size / timing.wall / MB:,.0f}",
                f"{timing.cpu:.2f}", ratio(against.wall, timing.wall), goal]

    rows = [row("baseline: `curl | gunzip` of the plain layer blob (cold, root)", curl, curl_m, "")]
    for as_ in users:
        cold, warm = [], []
        for _ in range(runs):
            with _mounted(esgz, scratch, NO_BACKGROUND, as_=as_) as (mountpoint, _):
                drop_caches()
                log(f"cold read of {BIG_FILE_PATH} through the mount ({as_.label})")
                cold.append(timed(_dd(mountpoint / BIG_FILE_PATH, as_))[0])
                warm += [timed(_dd(mountpoint / BIG_FILE_PATH, as_))[0] for _ in range(WARM_RUNS)]
        _dd(local, as_)()  # page cache warm
        disk = [timed(_dd(local, as_))[0] for _ in range(WARM_RUNS)]
        rows += [row(f"{as_.label}: cold, through the mount (fresh cache, `{NO_BACKGROUND}`)", cold, curl_m,
                     "≥ 0.80x"),
                 row(f"{as_.label}: warm re-read through the mount", warm, median(disk), "≥ 0.90x"),
                 row(f"{as_.label}: baseline: the same file on local disk (warm)", disk, median(disk), "")]
    return Table([f"sequential read of a {size // MiB} MiB file (dd bs=1M), mount made and read by", "runs",
                  "seconds", "MB/s", "CPU s (reader only)", "speed vs baseline", "goal"], rows)


def _find(root: Path, as_: RunAs) -> tuple[Timing, int]:
    """`find -printf` of everything under `root`: timing and entries listed (a directory `as_` may not
    read is left out, on the mount as on disk)."""
    cmd = as_.command(["find", str(root), "-printf", FIND_FORMAT])
    timing, proc = timed(lambda: subprocess.run(cmd, capture_output=True))
    return timing, proc.stdout.count(b"\n")


def _tree_walk(esgz: str, layout: Path, scratch: Path, users: list[RunAs]) -> Table:
    rootfs = scratch / "rootfs"
    shutil.rmtree(rootfs, ignore_errors=True)
    subprocess.run(["umoci", "raw", "unpack", "--image", f"{layout}:{STANDARD_TAG}", str(rootfs)], check=True,
                   capture_output=True)

    def row(label: str, timing: Timing, count: int, against: Timing, goal: str = "") -> list[str]:
        return [label, f"{count:,}", f"{timing.wall:.2f}", f"{count / timing.wall:,.0f}",
                ratio(against.wall, timing.wall), goal]

    rows = []
    for as_ in users:
        with _mounted(esgz, scratch, NO_BACKGROUND, as_=as_) as (mountpoint, _):
            drop_caches()
            log(f"find + stat through the mount ({as_.label})")
            first, entries = _find(mountpoint, as_)
            second, _ = _find(mountpoint, as_)
        drop_caches()
        disk_cold, disk_entries = _find(rootfs, as_)
        disk_warm, _ = _find(rootfs, as_)
        rows += [row(f"{as_.label}: through a fresh mount, first walk", first, entries, disk_cold),
                 row(f"{as_.label}: through the mount, second walk (kernel attribute cache)", second, entries,
                     disk_warm, "≥ 0.50x"),
                 row(f"{as_.label}: the rootfs on local disk, cold (dentry and inode caches dropped)",
                     disk_cold, disk_entries, disk_cold),
                 row(f"{as_.label}: the rootfs on local disk, warm", disk_warm, disk_entries, disk_warm)]
    return Table(["`find -printf` (lstat of every entry), the standard image", "entries", "seconds",
                  "entries/s", "speed vs local disk", "goal"], rows)


def _proc_status(pid: int) -> dict[str, int]:
    with open(f"/proc/{pid}/status") as f:
        return {k: int(v.split()[0]) * 1024 for k, v in (line.split(":", 1) for line in f)
                if k in ("VmRSS", "VmHWM")}


def _daemon_memory(registry: Registry, workdir: Path, scratch: Path, quick: bool) -> Table:
    files = QUICK_RSS_FILES if quick else RSS_FILES
    plain = pushed(registry, many_files_image(workdir, files), MANY_FILES_TAG, "files", f"plain-{files}")
    esgz = converted(registry, plain, "files", f"esgz-{files}")
    rows = []
    for variant, options in ((DEFAULTS, ()), (NO_BACKGROUND, (NO_BACKGROUND,))):
        with _mounted(esgz, scratch, *options) as (mountpoint, pid):
            mounted = _proc_status(pid)
            _, entries = _find(mountpoint, ROOT)
            walked = _proc_status(pid)
            listing = subprocess.run(["find", str(mountpoint), "-type", "f"], check=True, capture_output=True,
                                     text=True).stdout.split()
            for path in listing[::max(1, len(listing) // FILES_READ)][:FILES_READ]:
                Path(path).read_bytes()
            read = _proc_status(pid)
        points = {"after mounting": mounted, f"after find + stat of {entries:,} entries": walked,
                  f"after reading {FILES_READ} files": read}
        rows += [[variant, label, mb(status["VmRSS"]), mb(status["VmHWM"])]
                 for label, status in points.items()]
    return Table([f"mount daemon of a {files // 1000}k-file image: mount options", "when", "VmRSS MB",
                  "VmHWM MB"], rows)


def run(workdir: Path, quick: bool) -> Report:
    layout = standard_image(workdir)
    registry = local_registry(workdir)
    scratch = Path(tempfile.mkdtemp(prefix="lazy-", dir=workdir))
    started = time.time()
    try:
        plain = pushed(registry, layout, STANDARD_TAG, "torch", "plain")
        esgz = converted(registry, plain, "torch", "esgz")
        with unprivileged_user(workdir) as user:
            users = [RunAs(user), ROOT]
            tables = [_big_file(registry, workdir, scratch, users, quick),
                      _tree_walk(esgz, layout, scratch, users)]
        tables.append(_daemon_memory(registry, workdir, scratch, quick))
    finally:
        registry.stop()
        shutil.rmtree(scratch, ignore_errors=True)
    log(f"lazy: {time.time() - started:.0f} s")
    notes = [
        "Cold: `sync; echo 3 > /proc/sys/vm/drop_caches` before each run, and an empty `--cache-dir`.  "
        "Registry: Debian's docker-registry 2.8 on 127.0.0.1 (storage on local disk).",
        "unprivileged: the mount is made by `lazymount mount` run as the system user `lazybench` (through "
        "`setpriv`, /dev/fuse opened to it), and read by that user, as is its local-disk baseline; it cannot "
        "raise the mount's `read_ahead_kb`.  root: the same as root.  The walk's rootfs is unpacked by "
        "`umoci raw unpack` as root, so the user skips the same unreadable directories on disk as through "
        "the mount (`default_permissions`).",
        "Goals (issue 5, issue 16): cold sequential read ≥ 0.8x `curl | gunzip`; warm re-read ≥ 0.9x local "
        "disk; second walk ≥ 0.5x local disk (warm); daemon RSS ≤ 100 MB.",
        "Big file: the standard image's .so files concatenated and cut at the size shown, one file in one "
        "layer (gzip level 6 for the plain blob).  Mounts of the read and walk cases use "
        "`--no-background-fetch` so the timed reader is the only one fetching; the RSS case (root) is run "
        "with both.",
    ]
    return Report("lazy", "reads and walks through a lazy mount vs local disk; daemon memory", tables, notes)
