"""Benchmark "workloads" (issue 7): time to first result of three workloads, full pull against lazymount
on the plain eStargz image and on an image made by `lazymount optimize --workload`.

Workloads: `python3 -c "import torch"` in the standard image; compiling and running hello-world with gcc
in a Debian image with gcc (inputs.gcc_image); a shell loop reading 2,000 files of the standard image's
/usr/share.  Each is measured cold (caches dropped, empty `--cache-dir`) three ways: `skopeo copy` +
`umoci raw unpack` + the command in bubblewrap; `lazymount run` of the eStargz image (`lazymount
convert`); `lazymount run` of the image `lazymount optimize --workload COMMAND` made from it.

What belongs here: the workloads and their table.  What never does: building or pushing images
(inputs.py), the measured runs themselves (cold.full_pull and lazy_run, shared with "first-result").
"""

from __future__ import annotations

import shlex
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench.cold import WORKLOAD, full_pull, lazy_run
from bench.common import Report, Table, Timing, log, median, ratio, runs_label
from bench.inputs import GCC_TAG, STANDARD_TAG, converted, gcc_image, local_registry, pushed, standard_image
from tests.registry import Registry

COLD_RUNS = 3
HELLO_C = r'#include <stdio.h>\nint main(void) { puts(\"hello\"); return 0; }\n'
GCC_WORKLOAD = ["sh", "-c", f'printf "{HELLO_C}" > /tmp/hello.c && gcc -O2 -o /tmp/hello /tmp/hello.c '
                "&& /tmp/hello"]
DATA_WORKLOAD = ["sh", "-c", "find /usr/share -type f | head -2000 | "
                 'while read -r f; do cat "$f" >/dev/null; done']
GOAL_FULL, GOAL_PLAIN = 0.2, 0.75


@dataclass(frozen=True)
class Workload:
    """A command, the image it runs in (an OCI layout built by inputs.py) and the registry names used."""

    name: str
    layout: Callable[[Path], Path]
    tag: str  # the layout's tag
    repository: str
    optimized_tag: str
    command: list[str]


WORKLOADS = [
    Workload("`python3 -c \"import torch\"` (standard image)", standard_image, STANDARD_TAG, "torch",
             "optimized", WORKLOAD),
    Workload("gcc: compile and run hello.c (debootstrap minbase + gcc, libc6-dev)", gcc_image, GCC_TAG, "gcc",
             "optimized", GCC_WORKLOAD),
    Workload("shell loop: `cat` 2,000 files of /usr/share (standard image)", standard_image, STANDARD_TAG,
             "torch", "optimized-data", DATA_WORKLOAD),
]


def _measure(registry: Registry, workdir: Path, scratch: Path, workload: Workload,
             runs: int) -> tuple[Timing, Timing, Timing, Timing]:
    """Median cold runs: (full pull, its run step alone, lazymount on eStargz, lazymount on optimized)."""
    plain = pushed(registry, workload.layout(workdir), workload.tag, workload.repository, "plain")
    esgz = converted(registry, plain, workload.repository, "esgz")
    optimized = converted(registry, esgz, workload.repository, workload.optimized_tag,
                          shlex.join(workload.command))
    pulls = [full_pull(plain, scratch, workload.command) for _ in range(runs)]
    pull = next(p for p in pulls if p["total"] == median([p["total"] for p in pulls]))
    lazy = median([lazy_run(esgz, scratch, command=workload.command)[0] for _ in range(runs)])
    best = median([lazy_run(optimized, scratch, command=workload.command)[0] for _ in range(runs)])
    return pull["total"], pull["run (bwrap)"], lazy, best


def run(workdir: Path, quick: bool) -> Report:
    registry = local_registry(workdir)
    scratch = Path(tempfile.mkdtemp(prefix="workloads-", dir=workdir))
    runs = 1 if quick else COLD_RUNS
    started = time.time()
    rows = []
    try:
        for workload in WORKLOADS:
            log(f"workload: {workload.name}")
            pull, local, lazy, best = _measure(registry, workdir, scratch, workload, runs)
            met = best.wall <= GOAL_FULL * pull.wall and best.wall <= GOAL_PLAIN * lazy.wall
            rows.append([workload.name, runs_label(runs), f"{pull.wall:.1f}", f"{local.wall:.1f}",
                         f"{lazy.wall:.1f}", ratio(lazy.wall, pull.wall), f"{best.wall:.1f}",
                         ratio(best.wall, pull.wall), ratio(best.wall, lazy.wall), "yes" if met else "no"])
    finally:
        registry.stop()
        shutil.rmtree(scratch, ignore_errors=True)
    log(f"workloads: {time.time() - started:.0f} s")
    table = Table(["workload, cold", "runs", "full pull s", "(its run step alone)", "lazymount, eStargz s",
                   "eStargz / full pull", "lazymount, optimized s", "optimized / full pull (goal ≤ 0.20x)",
                   "optimized / eStargz (goal ≤ 0.75x)", "goals met"], rows)
    notes = [
        "Cold: `sync; echo 3 > /proc/sys/vm/drop_caches` before each run, and an empty `--cache-dir`.  "
        "Registry: Debian's docker-registry 2.8 on 127.0.0.1.",
        "Full pull: `skopeo copy docker://REG/NAME:plain oci:DIR:TAG` + `umoci raw unpack` + the command in "
        "`bwrap --bind ROOTFS /`.  eStargz: `lazymount run --cache-dir EMPTY REG/NAME:esgz -- COMMAND` (the "
        "image from `lazymount convert`, background fetch on).  Optimized: the same with the image from "
        "`lazymount optimize --workload COMMAND REG/NAME:esgz REG/NAME:TAG` (landmark prefetch).",
        "Commands: " + "; ".join(f"`{shlex.join(w.command)}`" for w in WORKLOADS) + ".",
        "Goals (issue 7): optimized ≤ 0.2x the full pull and ≤ 0.75x the plain eStargz image.",
    ]
    return Report("workloads", "time to first result of three workloads: full pull, eStargz, optimized",
                  [table], notes)
