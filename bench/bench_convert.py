"""Benchmarks "convert" and "convert-small-files": image to eStargz, lazymount against ctr-remote.

"convert" takes the standard image (deflate-bound), "convert-small-files" a layer of 100k small files
(per-entry costs).  Ours is timed as the whole `lazymount convert -q -j N oci:SRC:TAG oci:DST:TAG`
command (start-up, reading the gzip layers, writing the layout).  The reference is `ctr-remote images
convert --oci --estargz` against a private containerd, timed on that command alone: importing the layout
into containerd before it and exporting the result after it are not part of its time.  Throughput is MB
(10^6 bytes) of *uncompressed* input per second, summed over all layers.

What belongs here: these benchmarks' cases and tables.  What never does: driving containerd (reused from
tests/reference.py) or building images (inputs.py).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from bench.common import LAZYMOUNT, Report, Table, Timing, log, mb, ratio, repeat_timed, runs_label, timed
from bench.inputs import MANY_FILES_TAG, STANDARD_TAG, many_files_image, standard_image, uncompressed_size
from tests.reference import Containerd, read_layout, ref_convert

CONVERTED_PREFIX = "localhost/lazymount/converted:"  # the image names ref_convert gives its results
JOBS = (1, 2)
SMALL_FILES = 100_000
QUICK_SMALL_FILES = 20_000


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


def _layer_sizes(layout: Path, tag: str) -> list[int]:
    return [descriptor["size"] for _, descriptor in read_layout(layout, tag)[2]]


def _ours(image: Path, tag: str, out: Path, jobs: int) -> Timing:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [str(LAZYMOUNT), "convert", "-q", "-j", str(jobs), f"oci:{image}:{tag}", f"oci:{out}:{tag}"]
    log(" ".join(cmd))
    timing, _ = timed(lambda: subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL))
    log(f"  {timing.wall:.1f} s")
    return timing


def _reference(image: Path, tag: str, workdir: Path, out: Path, quick: bool) -> tuple[Timing, int]:
    base = workdir / "containerd"
    shutil.rmtree(base, ignore_errors=True)
    containerd = _TimedContainerd(base).start()

    def once() -> Timing:
        containerd.remove_converted()
        shutil.rmtree(out, ignore_errors=True)
        log("ctr-remote images convert --oci --estargz (import and export around it untimed)")
        timed_before = len(containerd.convert_timings)
        ref_convert(containerd, image, tag, out)
        if len(containerd.convert_timings) != timed_before + 1:
            raise RuntimeError("ref_convert did not run `ctr-remote images convert` through "
                               "Containerd.ctr_remote once: this benchmark cannot time it")
        log(f"  {containerd.convert_timings[-1].wall:.1f} s")
        return containerd.convert_timings[-1]

    try:
        return repeat_timed(once, quick)
    finally:
        containerd.stop()
        shutil.rmtree(base, ignore_errors=True)


def _compare(name: str, title: str, image: Path, tag: str, description: str, workdir: Path,
             quick: bool) -> Report:
    """Convert `image` with lazymount (-j 1, -j 2) and ctr-remote; report speed and blob sizes."""
    source_layers = read_layout(image, tag)[2]
    uncompressed = [uncompressed_size(path, workdir) for path, _ in source_layers]
    total_in = sum(uncompressed)
    ours_out, ref_out = workdir / "convert-ours", workdir / "convert-ref"

    ours: dict[int, tuple[Timing, int]] = {}
    for jobs in JOBS:
        ours[jobs] = repeat_timed(lambda jobs=jobs: _ours(image, tag, ours_out, jobs), quick)
    ours_sizes = _layer_sizes(ours_out, tag)  # the last run's output; every run writes the same bytes
    ref_timing, ref_runs = _reference(image, tag, workdir, ref_out, quick)
    ref_sizes = _layer_sizes(ref_out, tag)

    def row(label: str, timing: Timing, runs: int, sizes: list[int]) -> list[str]:
        return [label, runs_label(runs), f"{timing.wall:.1f}", f"{total_in / timing.wall / 1e6:.1f}",
                f"{timing.cpu:.1f}", mb(sum(sizes)), f"{sum(sizes) / total_in:.3f}",
                ratio(ref_timing.wall, timing.wall), ratio(ref_timing.cpu, timing.cpu)]

    speed = Table(
        ["converter", "runs", "seconds", "MB/s in", "CPU s", "output MB", "output/input",
         "speed vs ctr-remote", "CPU ctr-remote/ours"],
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
    best = min(timing.wall for timing, _ in ours.values())
    notes = [
        f"Input: {description}, {len(source_layers)} layer(s), {mb(total_in)} MB uncompressed "
        f"({mb(sum(d['size'] for _, d in source_layers))} MB gzip); page cache warm for both tools "
        "(ours reads the layout's blobs, the reference containerd's content store, just imported).",
        "Runs: a case under 60 s is run 3 times and its median (by wall time) shown; a longer one runs once."
        + (" --quick: every case once." if quick else ""),
        "CPU s: user+system seconds of the timed process and its children (for the reference, `ctr-remote` "
        "only: the containerd daemon serving it content is not counted).  The CPU ratio is less "
        "sensitive than wall time to other load on the machine.",
        f"Goal: at least 1.5x ctr-remote's throughput on 2 cores; best here {ratio(ref_timing.wall, best)}.",
        "Sizes: the blobs of the converted layers; ratio = blob / uncompressed layer (smaller is better). "
        "The two differ mainly by compression level (isa-l 3 against Go's compress/gzip 9).",
    ]
    return Report(name, title, [speed, sizes], notes)


def run(workdir: Path, quick: bool) -> Report:
    """The standard image (DESIGN.md): Debian + Python, then torch."""
    return _compare("convert", "the standard image to eStargz, lazymount vs ctr-remote",
                    standard_image(workdir), STANDARD_TAG, "the standard image", workdir, quick)


def run_small_files(workdir: Path, quick: bool) -> Report:
    """A layer of many small files, where per-entry costs rather than deflate speed decide."""
    files = QUICK_SMALL_FILES if quick else SMALL_FILES
    title = f"a {files // 1000}k-file layer to eStargz, lazymount vs ctr-remote"
    return _compare("convert-small-files", title, many_files_image(workdir, files), MANY_FILES_TAG,
                    f"one layer of {files:,} small files (bench/inputs.py many_files_tar)", workdir, quick)
