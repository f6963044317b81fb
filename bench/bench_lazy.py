"""Benchmark "lazy": lazy mounts from the local registry against full pulls and local disk.

Images are pushed to Debian's docker-registry on loopback (inputs.py) and converted there by
`lazymount convert`.  Every cold case starts with an empty `--cache-dir` and `sync; echo 3 >
/proc/sys/vm/drop_caches` (the registry's storage is cold too), so this benchmark needs root.  Cases:
- time to first result of `python3 -c "import torch"` in the standard image: `lazymount run` of the
  eStargz image against `skopeo copy` + `umoci raw unpack` + the same command with bubblewrap in the
  unpacked rootfs, each timed from start to exit; bytes fetched (the mount's stats) against the sizes of
  the files the workload opened (`lazymount record`'s profile, sizes from the unpacked rootfs);
- a 256 MiB file: cold sequential read through the mount (`--no-background-fetch`, so only the reader
  fetches) against `curl | gunzip` of the plain layer blob; warm re-read against the same file on local
  disk, page cache warm for both;
- `find` + stat of the whole standard image through a fresh mount against the unpacked rootfs;
- the mount daemon's RSS for a 100k-file image after a `find` + stat of everything and a few reads.

What belongs here: these cases and their tables.  What never does: building or pushing images
(inputs.py), anything inside lazymount.
"""

from __future__ import annotations

import contextlib
import json
import shlex
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

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
from tests.reference import read_layout
from tests.registry import Registry, skopeo

WORKLOAD = ["python3", "-c", "import torch"]
BIG_FILE_SIZE = 256 * MiB
QUICK_BIG_FILE_SIZE = 64 * MiB
COLD_RUNS = 3
WARM_RUNS = 5
RSS_FILES = 100_000
QUICK_RSS_FILES = 20_000
FILES_READ = 200  # files read after the find, for the RSS case
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DEFAULTS = "(defaults)"
NO_BACKGROUND = "--no-background-fetch"
FIND_FORMAT = "%i %s %m %U %G %T@ %p\n"  # every field needs an lstat of the entry


def drop_caches() -> None:
    subprocess.run(["sync"], check=True)
    Path("/proc/sys/vm/drop_caches").write_text("3")


@contextlib.contextmanager
def _mounted(image: str, scratch: Path, *options: str) -> Iterator[tuple[Path, int]]:
    """`lazymount mount` of `image` with an empty cache: yield (mount point, daemon PID); unmount after."""
    mountpoint, cache_dir = scratch / "mnt", scratch / "cache"
    shutil.rmtree(cache_dir, ignore_errors=True)
    mountpoint.mkdir(parents=True, exist_ok=True)
    subprocess.run([str(LAZYMOUNT), "mount", "--cache-dir", str(cache_dir), *options, image, str(mountpoint)],
                   check=True)
    try:
        yield mountpoint, _stats(mountpoint)["pid"]
    finally:
        subprocess.run([str(LAZYMOUNT), "umount", str(mountpoint)], check=True)
        shutil.rmtree(cache_dir, ignore_errors=True)


def _stats(mountpoint: Path) -> dict:
    cmd = [str(LAZYMOUNT), "stats", "--json", str(mountpoint)]
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)


def _bwrap(rootfs: Path, command: list[str]) -> list[str]:
    return ["bwrap", "--unshare-user", "--unshare-pid", "--die-with-parent", "--bind", str(rootfs), "/",
            "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp", "--clearenv", "--setenv", "PATH", PATH,
            "--", *command]


def _steps(steps: dict[str, Callable[[], object]]) -> dict[str, Timing]:
    """Run each step in order, timed; the total is under 'total'."""
    timings = {label: timed(step)[0] for label, step in steps.items()}
    timings["total"] = Timing(sum(t.wall for t in timings.values()), sum(t.cpu for t in timings.values()))
    return timings


def full_pull(registry: Registry, image: str, scratch: Path,
              command: list[str] = WORKLOAD) -> dict[str, Timing]:
    """`skopeo copy` + `umoci raw unpack` of `image` + `command` in the rootfs, cold: each step timed."""
    layout, rootfs = scratch / "pulled", scratch / "rootfs"
    shutil.rmtree(layout, ignore_errors=True)
    shutil.rmtree(rootfs, ignore_errors=True)
    drop_caches()
    log(f"full pull of {image}")
    return _steps({
        "skopeo copy": lambda: skopeo("copy", "--src-tls-verify=false", f"docker://{image}",
                                      f"oci:{layout}:{STANDARD_TAG}", registry=registry),
        "umoci raw unpack": lambda: subprocess.run(["umoci", "raw", "unpack", "--image",
                                                    f"{layout}:{STANDARD_TAG}", str(rootfs)], check=True,
                                                   capture_output=True),
        "run (bwrap)": lambda: subprocess.run(_bwrap(rootfs, command), check=True, stdout=subprocess.DEVNULL),
    })


def lazy_run(image: str, scratch: Path, options: tuple[str, ...] = (),
             command: list[str] = WORKLOAD) -> tuple[Timing, dict]:
    """`lazymount run` of `command` in `image`, cold (empty cache, caches dropped): timing and the stats."""
    cache_dir, stats_file = scratch / "cache", scratch / "stats.json"
    shutil.rmtree(cache_dir, ignore_errors=True)
    drop_caches()
    cmd = [str(LAZYMOUNT), "run", "--cache-dir", str(cache_dir), "--stats-file", str(stats_file), *options,
           image, "--", *command]
    log(shlex.join(cmd))
    timing, _ = timed(lambda: subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL))
    shutil.rmtree(cache_dir, ignore_errors=True)
    return timing, json.loads(stats_file.read_text())


def _workload_bytes(image: str, rootfs: Path, scratch: Path) -> tuple[int, int, int]:
    """What the workload reads: (files it opened, from `lazymount record`'s profile; their total size;
    their bytes in the page cache after a run in the unpacked rootfs that started with caches dropped,
    by fincore: the pages it touched, read() or mmap, plus the kernel's read-ahead)."""
    profile, cache_dir = scratch / "workload.profile", scratch / "cache"
    shutil.rmtree(cache_dir, ignore_errors=True)
    subprocess.run([str(LAZYMOUNT), "record", "--cache-dir", str(cache_dir), "-o", str(profile), image, "--",
                    *WORKLOAD], check=True)
    shutil.rmtree(cache_dir, ignore_errors=True)
    paths = sorted({str(rootfs / line) for line in profile.read_text().splitlines()
                    if line and not line.startswith("#")})
    drop_caches()
    subprocess.run(_bwrap(rootfs, WORKLOAD), check=True)
    resident = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", *paths], check=True,
                              capture_output=True, text=True).stdout.split()
    return len(paths), sum(Path(path).stat().st_size for path in paths), sum(map(int, resident))


def _first_result(registry: Registry, layout: Path, plain: str, esgz: str, scratch: Path,
                  quick: bool) -> list[Table]:
    runs = 1 if quick else COLD_RUNS
    image_bytes = sum(descriptor["size"] for _, descriptor in read_layout(layout, STANDARD_TAG)[2])
    optimized = converted(registry, esgz, "torch", "optimized", shlex.join(WORKLOAD))
    variants = {f"{DEFAULTS} (eStargz, no landmark)": (esgz, ()),
                f"{NO_BACKGROUND} (eStargz, no landmark)": (esgz, (NO_BACKGROUND,)),
                f"{DEFAULTS}, image from `lazymount optimize --workload` (landmark)": (optimized, ())}
    pulls = [full_pull(registry, plain, scratch) for _ in range(runs)]
    lazy_runs = {variant: [lazy_run(image, scratch, options) for _ in range(runs)]
                 for variant, (image, options) in variants.items()}
    files, opened, touched = _workload_bytes(esgz, scratch / "rootfs", scratch)
    pull = next(p for p in pulls if p["total"] == median([p["total"] for p in pulls]))
    lazies = {variant: next(pair for pair in pairs if pair[0] == median([t for t, _ in pairs]))
              for variant, pairs in lazy_runs.items()}
    totals = next(iter(lazies.values()))[1]["totals"]
    demand = totals["bytes_fetched"] - totals["background_bytes"] - totals["prefetched_bytes"]
    pull_steps = {k: t for k, t in pull.items() if k != "total"}
    rows = [[f"full pull: {' + '.join(pull_steps)}", runs_label(runs),
             f"{pull['total'].wall:.1f} ({', '.join(f'{t.wall:.1f}' for t in pull_steps.values())})",
             f"{pull['total'].cpu:.1f}", "1.00x", f"{mb(image_bytes)} (all layers)"]]
    for variant, (timing, run_stats) in lazies.items():
        fetched = run_stats["totals"]["bytes_fetched"] + run_stats["totals"]["index_bytes"]
        rows.append([f"`lazymount run` {variant}", runs_label(runs),
                     f"{timing.wall:.1f}", f"{timing.cpu:.1f}", ratio(timing.wall, pull["total"].wall),
                     mb(fetched)])
    time_table = Table(["`python3 -c \"import torch\"`, cold", "runs", "seconds", "CPU s",
                        "ratio to full pull (goal ≤ 0.25x)", "MB fetched"], rows)

    def row(label: str, n: int) -> list[str]:
        return [label, mb(n), f"{n / touched:.2f}", f"{n / opened:.2f}"]

    bytes_table = Table(
        [f"bytes (the median `lazymount run` {DEFAULTS} of the plain eStargz image)", "MB",
         "÷ bytes read (page cache)",
         "÷ size of files opened"],
        [row("workload: its files' pages in the page cache after a cold run on local disk", touched),
         row(f"workload: total size of the {files:,} files it opened (`lazymount record`)", opened),
         row("lazymount: fetched on demand (chunk reads and their read-ahead; compressed)", demand),
         row("lazymount: fetched by the background fetch while the command ran", totals["background_bytes"]),
         row("lazymount: TOCs and footers (mount time)", totals["index_bytes"]),
         row("lazymount: served to the kernel (FUSE reads, uncompressed)", totals["bytes_served"])])
    return [time_table, bytes_table]


def _dd(path: Path) -> Callable[[], object]:
    return lambda: subprocess.run(["dd", f"if={path}", "of=/dev/null", "bs=1M", "status=none"], check=True)


def _big_file(registry: Registry, workdir: Path, scratch: Path, quick: bool) -> Table:
    size = QUICK_BIG_FILE_SIZE if quick else BIG_FILE_SIZE
    layout = big_file_image(workdir, size)
    plain = pushed(registry, layout, BIG_FILE_TAG, "big", f"plain-{size >> 20}m")
    esgz = converted(registry, plain, "big", f"esgz-{size >> 20}m")
    _, descriptor = read_layout(layout, BIG_FILE_TAG)[2][0]
    url = f"{registry.url}/v2/big/blobs/{descriptor['digest']}"
    runs = 1 if quick else COLD_RUNS
    cold, warm = [], []
    for _ in range(runs):
        with _mounted(esgz, scratch, "--no-background-fetch") as (mountpoint, _):
            drop_caches()
            log(f"cold read of {BIG_FILE_PATH} through the mount")
            cold.append(timed(_dd(mountpoint / BIG_FILE_PATH))[0])
            warm += [timed(_dd(mountpoint / BIG_FILE_PATH))[0] for _ in range(WARM_RUNS)]
    curl = []
    for _ in range(runs):
        drop_caches()
        log("curl | gunzip of the plain blob")
        curl.append(timed(lambda: subprocess.run(f"curl -sS --fail {url} | gunzip > /dev/null", shell=True,
                                                 check=True))[0])
    local = big_file(workdir, size)
    _dd(local)()  # page cache warm
    disk = [timed(_dd(local))[0] for _ in range(WARM_RUNS)]
    cold_m, curl_m, warm_m, disk_m = median(cold), median(curl), median(warm), median(disk)

    def row(label: str, timing: Timing, count: int, against: Timing, goal: str) -> list[str]:
        return [label, runs_label(count), f"{timing.wall:.2f}", f"{size / timing.wall / MB:,.0f}",
                f"{timing.cpu:.2f}", ratio(against.wall, timing.wall), goal]

    return Table(
        [f"sequential read of a {size // MiB} MiB file (dd bs=1M)", "runs", "seconds", "MB/s",
         "CPU s (reader only)", "speed vs baseline", "goal"],
        [row("cold, through the mount (fresh cache, `--no-background-fetch`)", cold_m, runs, curl_m,
             "≥ 0.80x"),
         row("baseline: `curl | gunzip` of the plain layer blob (cold)", curl_m, runs, curl_m, ""),
         row("warm re-read through the mount", warm_m, len(warm), disk_m, "≥ 0.90x"),
         row("baseline: the same file on local disk (warm)", disk_m, len(disk), disk_m, "")])


def _find(root: Path) -> tuple[Timing, int]:
    timing, proc = timed(lambda: subprocess.run(["find", str(root), "-printf", FIND_FORMAT], check=True,
                                                capture_output=True))
    return timing, proc.stdout.count(b"\n")


def _tree_walk(esgz: str, rootfs: Path, scratch: Path) -> Table:
    with _mounted(esgz, scratch, "--no-background-fetch") as (mountpoint, _):
        drop_caches()
        log("find + stat through the mount")
        first, entries = _find(mountpoint)
        second, _ = _find(mountpoint)
    drop_caches()
    disk_cold, disk_entries = _find(rootfs)
    disk_warm, _ = _find(rootfs)

    def row(label: str, timing: Timing, count: int, against: Timing) -> list[str]:
        return [label, f"{count:,}", f"{timing.wall:.2f}", f"{count / timing.wall:,.0f}", ratio(against.wall,
                                                                                               timing.wall)]

    return Table(
        ["`find -printf` (lstat of every entry), the standard image", "entries", "seconds", "entries/s",
         "speed vs local disk"],
        [row("through a fresh mount, first walk", first, entries, disk_cold),
         row("through the mount, second walk (kernel attribute cache)", second, entries, disk_warm),
         row("unpacked rootfs on local disk, cold (dentry and inode caches dropped)", disk_cold, disk_entries,
             disk_cold),
         row("unpacked rootfs on local disk, warm", disk_warm, disk_entries, disk_warm)])


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
            _, entries = _find(mountpoint)
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
        tables = _first_result(registry, layout, plain, esgz, scratch, quick)
        tables.append(_big_file(registry, workdir, scratch, quick))
        tables.append(_tree_walk(esgz, scratch / "rootfs", scratch))
        tables.append(_daemon_memory(registry, workdir, scratch, quick))
    finally:
        registry.stop()
        shutil.rmtree(scratch, ignore_errors=True)
    log(f"lazy: {time.time() - started:.0f} s")
    notes = [
        "Cold: `sync; echo 3 > /proc/sys/vm/drop_caches` before each run, and an empty `--cache-dir`.  "
        "Registry: Debian's docker-registry 2.8 on 127.0.0.1 (storage on local disk).",
        "Full pull: `skopeo copy docker://REG/torch:plain oci:DIR:torch`, `umoci raw unpack --image "
        "DIR:torch ROOTFS`, then `bwrap --bind ROOTFS / --proc /proc --dev /dev --tmpfs /tmp -- python3 -c "
        "\"import torch\"`; seconds in brackets are the three steps.  Lazy: `lazymount run --cache-dir EMPTY "
        "--stats-file F REG/torch:esgz -- python3 -c \"import torch\"` (mount, run in bubblewrap, unmount), "
        "the image converted by `lazymount convert` without a workload profile.  CPU s: the processes "
        "waited for (skopeo, umoci, bwrap and what runs in it, `lazymount run`), never the mount daemon, "
        "which detaches.",
        "Goals (issue 5): time to first result ≤ 0.25x the full pull; bytes fetched ÷ bytes the workload "
        "read ≤ 1.5, where 'read' is the bytes of the files it opened that are in the page cache after a "
        "run on local disk that started with caches dropped (`fincore`: read() and mmap page faults, plus "
        "the kernel's read-ahead); the files' total size is shown too (an upper bound: shared libraries "
        "are mmapped and only partly touched).  Fetched bytes are compressed, read bytes not; cold "
        "sequential read ≥ 0.8x `curl | gunzip`; warm re-read ≥ 0.9x local disk; daemon RSS ≤ 100 MB.",
        "Big file: the standard image's .so files concatenated and cut at the size shown, one file in one "
        "layer (gzip level 6 for the plain blob).  Mounts of the read and walk cases use "
        "`--no-background-fetch` so the timed reader is the only one fetching; the RSS case is run with "
        "both.",
    ]
    return Report("lazy", "lazy mounts from a local registry vs full pull and local disk", tables, notes)
