"""Benchmark "first-result" (issue 16): time to first result of `python3 -c "import torch"` in the standard
image as a ratio of the full pull, every cell of the goal table side by side in one run:

    registry {on loopback, far: 1 Gbit/s and a 20 ms round trip (regimes.far_registry)}
  x image {plain eStargz (`lazymount convert`), optimized (`lazymount optimize --workload`), unconverted +
           seek index + pushed profile (`lazymount index --push`, `lazymount record --push`)}
  x `lazymount run` {as the unprivileged user, as root}.

The full pull (cold.full_pull) is run by the same user in the same regime.  Cases run round by round
(every case once, then again), so that load from elsewhere spreads over all of them.  The third image
needs `lazymount index` (issue 13): the code measured is asked (`lazymount --help`) and, without it, the
cells say so.  Also measured: the plain eStargz image with `--no-background-fetch` (the background
fetch, on by default, must not make the first result slower), and the bytes the plain eStargz run
fetched against what the workload read.

What belongs here: these cases and their tables.  What never does: the runs themselves (cold.py), users
and namespaces (regimes.py), building or pushing images (inputs.py).
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench.cold import WORKLOAD, bwrap, drop_caches, full_pull, lazy_run
from bench.common import (
    LAZYMOUNT,
    Report,
    Table,
    Timing,
    log,
    mb,
    measured_revision,
    median,
    ratio,
    runs_label,
)
from bench.inputs import (
    STANDARD_TAG,
    converted,
    has_image,
    local_registry,
    manifest_digest,
    pushed,
    standard_image,
)
from bench.regimes import ONE_WAY_MS, RATE_LABEL, ROOT, RunAs, far_registry, unprivileged_user
from tests.reference import read_layout
from tests.registry import Registry

COLD_RUNS = 3
NO_BACKGROUND = "--no-background-fetch"


@dataclass(frozen=True)
class Case:
    """A `lazymount run` measured: which image (a key of the images prepared) with which options."""

    key: str
    label: str
    image: str
    options: tuple[str, ...] = ()


CASES = [Case("esgz", "plain eStargz", "esgz"),
         Case("optimized", "optimized", "optimized"),
         Case("indexed", "unconverted + seek index + pushed profile", "indexed"),
         Case("esgz-nobg", f"plain eStargz, `{NO_BACKGROUND}`", "esgz", (NO_BACKGROUND,))]
GOAL_CASES = CASES[:3]
REGIMES = {"loopback": "loopback", "far": f"far: {RATE_LABEL}, {2 * ONE_WAY_MS} ms RTT"}
GOALS = {"loopback": {"esgz": 0.35, "optimized": 0.20, "indexed": 0.25},
         "far": {"esgz": 0.30, "optimized": 0.15, "indexed": 0.20}}

Runs = dict[str, list]  # "pull" -> full pulls' step timings; a case key -> (Timing, stats) of its runs
Results = dict[tuple[str, str], Runs]  # by (regime, who)


def has_seek_index() -> bool:
    """Whether the code measured has `lazymount index` (issue 13)."""
    usage = subprocess.run([str(LAZYMOUNT), "--help"], check=True, capture_output=True, text=True).stdout
    return re.search(r"\{[^}]*\bindex\b", usage) is not None


def indexed(registry: Registry, plain: str, workdir: Path) -> str:
    """`plain` (unconverted) once its seek index and a profile of WORKLOAD are pushed as its referrers by
    `lazymount index --push` and `lazymount record --push`; skipped when the registry already has the
    referrers tag of its manifest (they were pushed by an earlier run)."""
    repository, tag = plain.split("/", 1)[1].rsplit(":", 1)
    referrers_tag = manifest_digest(registry, repository, tag).replace(":", "-")
    if not has_image(registry, repository, referrers_tag):
        with tempfile.TemporaryDirectory(dir=workdir) as tmp:
            for args in (["index", "--push", "--cache-dir", f"{tmp}/cache", plain],
                         ["record", "--push", "--cache-dir", f"{tmp}/cache", "-o", f"{tmp}/profile", plain,
                          "--", *WORKLOAD]):
                log(f"lazymount {shlex.join(args)}")
                subprocess.run([str(LAZYMOUNT), *args], check=True, stdout=subprocess.DEVNULL)
    return plain


def _measure(images: dict[str, str], name: Callable[[str], str], users: list[RunAs], scratch: Path,
             runs: int) -> dict[str, Runs]:
    """For each of `users` (by label): the full pull of the plain image and every case whose image is
    prepared, `runs` rounds; `name` turns a registry name into this regime's."""
    results: dict[str, Runs] = {as_.label: {"pull": [], **{c.key: [] for c in CASES if c.image in images}}
                                for as_ in users}
    for _ in range(runs):
        for as_ in users:
            results[as_.label]["pull"].append(full_pull(name(images["plain"]), scratch, as_=as_))
            for case in CASES:
                if case.image in images:
                    results[as_.label][case.key].append(lazy_run(name(images[case.image]), scratch,
                                                                 case.options, as_=as_))
    return results


def _median_pull(pulls: list[dict[str, Timing]]) -> dict[str, Timing]:
    return next(p for p in pulls if p["total"] == median([p["total"] for p in pulls]))


def _median_run(pairs: list[tuple[Timing, dict]]) -> tuple[Timing, dict]:
    return next(pair for pair in pairs if pair[0] == median([t for t, _ in pairs]))


def _goal_table(results: Results, revision: str) -> Table:
    """`revision`: the code measured, named where it lacks `lazymount index`."""
    unavailable = f"not available at {revision} (no `lazymount index`)"
    rows = []
    for (regime, who), runs in results.items():
        pull = _median_pull(runs["pull"])["total"]
        row = [REGIMES[regime], who, f"{pull.wall:.1f}"]
        for case in GOAL_CASES:
            if case.key in runs:
                timing = _median_run(runs[case.key])[0]
                row.append(f"{ratio(timing.wall, pull.wall)} ({timing.wall:.1f} s)")
            else:
                row.append(unavailable)
        rows.append(row)
    headers = [f"{case.label} (goal, unprivileged: ≤ {GOALS['loopback'][case.key]:.2f}x loopback, "
               f"≤ {GOALS['far'][case.key]:.2f}x far)" for case in GOAL_CASES]
    return Table(["`python3 -c \"import torch\"`, cold: registry", "`lazymount run` as", "full pull s",
                  *headers], rows)


def _background_table(results: Results) -> Table:
    rows = []
    for (regime, who), runs in results.items():
        on, off = _median_run(runs["esgz"])[0], _median_run(runs["esgz-nobg"])[0]
        rows.append([REGIMES[regime], who, f"{on.wall:.1f}", f"{off.wall:.1f}", ratio(on.wall, off.wall)])
    return Table(["plain eStargz, cold: registry", "`lazymount run` as", "background fetch on (default) s",
                  f"`{NO_BACKGROUND}` s", "on ÷ off (goal ≤ 1.00x)"], rows)


def _detail_table(results: Results, image_bytes: int) -> Table:
    rows = []
    for (regime, who), runs in results.items():
        pull = _median_pull(runs["pull"])
        steps = {k: t for k, t in pull.items() if k != "total"}
        rows.append([REGIMES[regime], who, f"full pull: {' + '.join(steps)}", runs_label(len(runs["pull"])),
                     f"{pull['total'].wall:.1f} ({', '.join(f'{t.wall:.1f}' for t in steps.values())})",
                     f"{pull['total'].cpu:.1f}", "1.00x", f"{mb(image_bytes)} (all layers)", ""])
        for case in CASES:
            if case.key in runs:
                timing, stats = _median_run(runs[case.key])
                fetched = stats["totals"]["bytes_fetched"] + stats["totals"]["index_bytes"]
                rows.append([REGIMES[regime], who, f"`lazymount run`, {case.label}",
                             runs_label(len(runs[case.key])), f"{timing.wall:.1f}", f"{timing.cpu:.1f}",
                             ratio(timing.wall, pull["total"].wall), mb(fetched),
                             f"{stats['totals']['requests']:,}"])
    return Table(["registry", "as", "`python3 -c \"import torch\"`, cold", "runs", "seconds", "CPU s",
                  "ratio to full pull", "MB fetched", "range requests"], rows)


def _workload_bytes(image: str, rootfs: Path, scratch: Path) -> tuple[int, int, int]:
    """What the workload reads: (files it opened, from `lazymount record`'s profile; their total size;
    their bytes in the page cache after a run in the unpacked rootfs that started with caches dropped,
    by fincore: the pages it touched, read() or mmap, plus the kernel's read-ahead)."""
    profile, cache_dir = scratch / "workload.profile", scratch / "record-cache"
    shutil.rmtree(cache_dir, ignore_errors=True)
    subprocess.run([str(LAZYMOUNT), "record", "--cache-dir", str(cache_dir), "-o", str(profile), image, "--",
                    *WORKLOAD], check=True, stdout=subprocess.DEVNULL)
    shutil.rmtree(cache_dir, ignore_errors=True)
    paths = sorted({str(rootfs / line) for line in profile.read_text().splitlines()
                    if line and not line.startswith("#")})
    drop_caches()
    subprocess.run(bwrap(rootfs, WORKLOAD), check=True)
    resident = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", *paths], check=True,
                              capture_output=True, text=True).stdout.split()
    return len(paths), sum(Path(path).stat().st_size for path in paths), sum(map(int, resident))


def _bytes_table(stats: dict, workload: tuple[int, int, int]) -> Table:
    files, opened, touched = workload
    totals = stats["totals"]
    demand = totals["bytes_fetched"] - totals["background_bytes"] - totals["prefetched_bytes"]

    def row(label: str, n: int) -> list[str]:
        return [label, mb(n), f"{n / touched:.2f}", f"{n / opened:.2f}"]

    return Table(
        ["bytes (the median unprivileged `lazymount run` of the plain eStargz image, loopback)", "MB",
         "÷ bytes read (page cache)", "÷ size of files opened"],
        [row("workload: its files' pages in the page cache after a cold run on local disk", touched),
         row(f"workload: total size of the {files:,} files it opened (`lazymount record`)", opened),
         row("lazymount: fetched on demand (chunk reads and their read-ahead; compressed)", demand),
         row("lazymount: fetched by the background fetch while the command ran", totals["background_bytes"]),
         row("lazymount: TOCs and footers (mount time)", totals["index_bytes"]),
         row("lazymount: served to the kernel (FUSE reads, uncompressed)", totals["bytes_served"])])


def run(workdir: Path, quick: bool) -> Report:
    layout = standard_image(workdir)
    registry = local_registry(workdir)
    scratch = Path(tempfile.mkdtemp(prefix="first-result-", dir=workdir))
    runs = 1 if quick else COLD_RUNS
    started, revision = time.time(), measured_revision()
    results: Results = {}
    try:
        plain = pushed(registry, layout, STANDARD_TAG, "torch", "plain")
        esgz = converted(registry, plain, "torch", "esgz")
        images = {"plain": plain, "esgz": esgz,
                  "optimized": converted(registry, esgz, "torch", "optimized", shlex.join(WORKLOAD))}
        if has_seek_index():
            images["indexed"] = indexed(registry, plain, workdir)
        with unprivileged_user(workdir) as user:
            log("first result, registry on loopback")
            measured = _measure(images, lambda image: image, [RunAs(user), ROOT], scratch, runs)
            results.update({("loopback", who): by_case for who, by_case in measured.items()})
            with far_registry(registry.workdir / "storage", workdir) as far:
                log("first result, far registry")
                measured = _measure(images, far.name, [RunAs(user, far.netns), RunAs(None, far.netns)],
                                    scratch, runs)
            results.update({("far", who): by_case for who, by_case in measured.items()})
        workload = _workload_bytes(esgz, scratch / "rootfs", scratch)
    finally:
        registry.stop()
        shutil.rmtree(scratch, ignore_errors=True)
    log(f"first-result: {time.time() - started:.0f} s")
    image_bytes = sum(descriptor["size"] for _, descriptor in read_layout(layout, STANDARD_TAG)[2])
    tables = [_goal_table(results, revision), _background_table(results), _detail_table(results, image_bytes),
              _bytes_table(_median_run(results["loopback", "unprivileged"]["esgz"])[1], workload)]
    notes = [
        "Cold: `sync; echo 3 > /proc/sys/vm/drop_caches` before each run, and an empty `--cache-dir`.  "
        "Ratios are to the full pull of the same user in the same regime (the seconds in brackets are the "
        "`lazymount run`'s).  The goals (issue 16) are about the unprivileged rows.",
        "Registry on loopback: Debian's docker-registry 2.8 on 127.0.0.1 of the host.  Far: the same "
        f"registry storage served inside a network namespace whose loopback is limited to {RATE_LABEL} by "
        f"`tc qdisc ... tbf`, behind bench/delayproxy.py (each chunk held {ONE_WAY_MS} ms each way: "
        f"{2 * ONE_WAY_MS} ms per request/response turn, one more round trip per new connection); the full "
        "pull and `lazymount run` run inside it (`ip netns exec`).  README, Benchmarks, shows how to set it "
        "up by hand.",
        "Full pull: `skopeo copy docker://REG/torch:plain oci:DIR:image`, `umoci raw unpack`, then `bwrap "
        "--unshare-user --bind ROOTFS / --proc /proc --dev /dev --tmpfs /tmp -- python3 -c \"import "
        "torch\"`; seconds in brackets are the three steps.  Unprivileged: all three run as the system user "
        "`lazybench` (through `setpriv`), umoci with `--rootless`, bubblewrap in a user namespace; the same "
        "user runs `lazymount run` (setuid fusermount3, /dev/fuse opened to it; it cannot raise the "
        "mount's `read_ahead_kb`).  Root: all as root.",
        "Lazy: `lazymount run --cache-dir EMPTY --stats-file F IMAGE -- python3 -c \"import torch\"` (mount, "
        "run in bubblewrap, unmount).  Images: plain eStargz from `lazymount convert` (no profile); "
        "optimized from `lazymount optimize --workload 'python3 -c \"import torch\"'` (landmark prefetch); "
        "unconverted: the plain gzip image itself, after `lazymount index --push` and `lazymount record "
        "--push` of the workload.  CPU s: the processes waited for, never the mount daemon, which detaches.",
        "Bytes: fetched bytes are compressed, read bytes not; 'read' is the bytes of the files the workload "
        "opened that are in the page cache after a run on local disk that started with caches dropped "
        "(`fincore`: read() and mmap page faults, plus the kernel's read-ahead); the files' total size is "
        "an upper bound (shared libraries are mmapped and only partly touched).  Goal (issue 5): fetched ÷ "
        "read ≤ 1.5.",
    ]
    return Report("first-result", "time to first result, unprivileged and root, loopback and far registry",
                  tables, notes)
