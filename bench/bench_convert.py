"""Benchmark "convert": converting the standard image to eStargz, lazymount against ctr-remote.

Ours is timed as the whole `lazymount convert -q -j N oci:SRC:torch oci:DST:torch` command (start-up,
reading the gzip layers, writing the layout).  The reference is `ctr-remote images convert --oci
--estargz` against a private containerd, timed on that command alone: importing the layout into
containerd before it and exporting the result after it are not part of its time.  Throughput is MB
(10^6 bytes) of *uncompressed* input per second, summed over all layers.

What belongs here: this benchmark's cases and table.  What never does: driving containerd (reused from
tests/reference.py) or building the image (inputs.py).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from common import LAZYMOUNT, Report, Table, Timing, log, mb, ratio, repeat_timed, timed
from inputs import STANDARD_TAG, standard_image, uncompressed_size
from reference import Containerd, read_layout, ref_convert

CONVERTED_PREFIX = "localhost/lazymount/converted:"  # the image names ref_convert gives its results
JOBS = (1, 2)


class _TimedContainerd(Containerd):
    """A private containerd that times each `ctr-remote images convert` run (and nothing else)."""

    def __init__(self, base_dir: Path) -> None:
        super().__init__(base_dir)
        self.convert_timings: list[Timing] = []

    def ctr_remote(self, *args: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
        run = super().ctr_remote
        if args[:2] != ("images", "convert"):
            return run(*args, check=check, **kwargs)
        timing, proc = timed(lambda: run(*args, check=check, **kwargs))
        self.convert_timings.append(timing)
        return proc

    def remove_converted(self) -> None:
        """Delete earlier conversion results and collect their blobs, so the next run starts from scratch."""
        names = [n for n in self.ctr("images", "ls", "-q", text=True).stdout.split()
                 if n.startswith(CONVERTED_PREFIX)]
        if names:
            self.ctr("images", "rm", "--sync", *names)


def _layer_sizes(layout: Path) -> list[int]:
    return [descriptor["size"] for _, descriptor in read_layout(layout, STANDARD_TAG)[2]]


def _ours(image: Path, out: Path, jobs: int) -> Timing:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [str(LAZYMOUNT), "convert", "-q", "-j", str(jobs), f"oci:{image}:{STANDARD_TAG}",
           f"oci:{out}:{STANDARD_TAG}"]
    log(" ".join(cmd))
    timing, _ = timed(lambda: subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL))
    log(f"  {timing.wall:.1f} s")
    return timing


def _reference(image: Path, workdir: Path, out: Path, quick: bool) -> tuple[Timing, int]:
    base = workdir / "containerd"
    shutil.rmtree(base, ignore_errors=True)
    containerd = _TimedContainerd(base).start()

    def once() -> Timing:
        containerd.remove_converted()
        shutil.rmtree(out, ignore_errors=True)
        log("ctr-remote images convert --oci --estargz (import and export around it untimed)")
        ref_convert(containerd, image, STANDARD_TAG, out)
        log(f"  {containerd.convert_timings[-1].wall:.1f} s")
        return containerd.convert_timings[-1]

    try:
        return repeat_timed(once, quick)
    finally:
        containerd.stop()
        shutil.rmtree(base, ignore_errors=True)


def _runs(count: int) -> str:
    return f"median of {count}" if count > 1 else "1"


def run(workdir: Path, quick: bool) -> Report:
    image = standard_image(workdir)
    source_layers = read_layout(image, STANDARD_TAG)[2]
    uncompressed = [uncompressed_size(path, workdir) for path, _ in source_layers]
    total_in = sum(uncompressed)
    ours_out = workdir / "convert-ours"
    ref_out = workdir / "convert-ref"

    ours: dict[int, tuple[Timing, int]] = {}
    for jobs in JOBS:
        ours[jobs] = repeat_timed(lambda jobs=jobs: _ours(image, ours_out, jobs), quick)
    ours_sizes = _layer_sizes(ours_out)  # the last run's output; every run writes the same bytes
    ref_timing, ref_runs = _reference(image, workdir, ref_out, quick)
    ref_sizes = _layer_sizes(ref_out)

    def row(label: str, timing: Timing, runs: int, sizes: list[int]) -> list[str]:
        return [label, _runs(runs), f"{timing.wall:.1f}", f"{total_in / timing.wall / 1e6:.1f}",
                f"{timing.cpu:.1f}", mb(sum(sizes)), f"{sum(sizes) / total_in:.3f}",
                ratio(ref_timing.wall, timing.wall)]

    speed = Table(
        ["converter", "runs", "seconds", "MB/s in", "CPU s", "output MB", "output/input",
         "speed vs ctr-remote"],
        [*(row(f"lazymount -j {jobs} (isa-l level 3)", timing, runs, ours_sizes)
           for jobs, (timing, runs) in ours.items()),
         row("ctr-remote convert --oci --estargz (gzip level 9)", ref_timing, ref_runs, ref_sizes)])
    layers = zip(uncompressed, source_layers, ours_sizes, ref_sizes, strict=True)
    sizes = Table(
        ["layer", "uncompressed MB", "source gzip MB", "lazymount MB (ratio)", "ctr-remote MB (ratio)",
         "lazymount/ctr-remote"],
        [[str(i + 1), mb(n), mb(descriptor["size"]), f"{mb(o)} ({o / n:.3f})", f"{mb(r)} ({r / n:.3f})",
          ratio(o, r)]
         for i, (n, (_, descriptor), o, r) in enumerate(layers)])
    best = max(ours.values(), key=lambda tr: total_in / tr[0].wall)[0]
    notes = [
        f"Input: the standard image, {len(source_layers)} layers, {mb(total_in)} MB uncompressed "
        f"({mb(sum(d['size'] for _, d in source_layers))} MB gzip); page cache warm for both tools "
        "(ours reads the layout's blobs, the reference containerd's content store, just imported).",
        "Runs: a case under 60 s is run 3 times and its median (by wall time) shown; a longer one runs once."
        + (" --quick: every case once." if quick else ""),
        "CPU s: user+system seconds of the timed process and its children (for the reference, `ctr-remote` "
        "only: the containerd daemon serving it content is not counted).",
        "Goal: at least 1.5x ctr-remote's throughput on 2 cores; best here "
        f"{ratio(ref_timing.wall, best.wall)}.",
        "Sizes: the blobs of the converted layers; ratio = blob / uncompressed layer (smaller is better). "
        "The two differ mainly by compression level (isa-l 3 against Go's compress/gzip 9).",
    ]
    return Report("convert", "the standard image to eStargz, lazymount vs ctr-remote", [speed, sizes], notes)
