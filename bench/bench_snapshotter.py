"""Benchmark "snapshotter" (issue 6): lazymount as containerd's snapshotter against containerd's overlayfs.

A private containerd (tests/reference.py Containerd) with the proxy plugin of contrib/containerd-config.toml
pointing at a `python -m snapshot_grpc` process (tests/test_snapshotter.py Snapshotter), both under a
scratch directory.  Cases:
- pull + first run of the standard image, cold: `ctr-remote images rpull --plain-http --snapshotter
  lazymount REG/torch:esgz` + `ctr run --snapshotter lazymount` of a command, against `ctr images pull
  --plain-http REG/torch:plain` (overlayfs) + `ctr run` of the same command; for `python3 -c "import
  torch"` (reads ~300 MB of the image) and for `python3 -c "print('ok')"` (reads little: the issue's
  goal is for such a workload);
- the snapshotter's RSS, and that of the one `lazymount layers` daemon serving every lazy layer, after
  pulling N small eStargz images (tests' shell image: a shared /bin/sh layer and a distinct top layer each).

What belongs here: these cases and their tables.  What never does: building or pushing images
(inputs.py), anything inside lazymount.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

from bench.cold import WORKLOAD, drop_caches
from bench.common import Report, Table, Timing, log, mb, median, ratio, runs_label, timed
from bench.inputs import STANDARD_TAG, converted, local_registry, pushed, standard_image
from tests.reference import Containerd
from tests.registry import Registry
from tests.test_snapshotter import build_shell_image, layer_daemons, served_layers, snapshotter_stack

COLD_RUNS = 3
SMALL_IMAGES = 10
QUICK_SMALL_IMAGES = 3


LIGHT_WORKLOAD = ["python3", "-c", "print('ok')"]


def _pull_and_run(containerd: Containerd, pull: list[str], image: str, snapshotter: str, name: str,
                  workload: list[str]) -> dict[str, Timing]:
    """Drop caches, then time `pull` (a `ctr` or `ctr-remote` command line against `containerd`) and `ctr
    run --rm` of the workload: each step and the total."""
    drop_caches()
    log(f"{' '.join(pull[:3])} + ctr run --snapshotter {snapshotter} {image}")
    tool = containerd.ctr_remote if pull[0] == "ctr-remote" else containerd.ctr
    steps = {
        "pull": lambda: tool(*pull[1:]),
        "run": lambda: containerd.ctr("run", "--rm", "--snapshotter", snapshotter, image, name, *workload),
    }
    timings = {label: timed(step)[0] for label, step in steps.items()}
    timings["total"] = Timing(sum(t.wall for t in timings.values()), sum(t.cpu for t in timings.values()))
    return timings


def _first_run(registry: Registry, workdir: Path, scratch: Path, runs: int, workload: list[str],
               label: str) -> Table:
    plain = pushed(registry, standard_image(workdir), STANDARD_TAG, "torch", "plain")
    esgz = converted(registry, plain, "torch", "esgz")
    cases = {"lazy": (["ctr-remote", "images", "rpull", "--plain-http", "--snapshotter", "lazymount", esgz],
                      esgz, "lazymount"),
             "full": (["ctr", "images", "pull", "--plain-http", plain], plain, "overlayfs")}
    results: dict[str, list[dict[str, Timing]]] = {case: [] for case in cases}
    for _ in range(runs):
        for case, (pull, image, snapshotter) in cases.items():
            fresh = Path(tempfile.mkdtemp(prefix=f"ctd-{case}-", dir=scratch))  # its own containerd and cache
            with snapshotter_stack(fresh) as (containerd, _):
                results[case].append(_pull_and_run(containerd, pull, image, snapshotter, f"bench-{case}",
                                                   workload))
    lazy, full = (next(t for t in results[case] if t["total"] == median([r["total"] for r in results[case]]))
                  for case in cases)

    def row(label: str, t: dict[str, Timing]) -> list[str]:
        return [label, runs_label(runs), f"{t['total'].wall:.1f}", f"{t['pull'].wall:.1f}",
                f"{t['run'].wall:.1f}", f"{t['total'].cpu:.1f}", ratio(t["total"].wall, full["total"].wall)]

    return Table([f"{label} through containerd, cold", "runs", "seconds", "pull s",
                  "run s", "CPU s (ctr only)", "ratio to overlayfs (goal ≤ 0.25x)"],
                 [row("`ctr-remote images rpull --snapshotter lazymount` REG/torch:esgz + `ctr run`", lazy),
                  row("`ctr images pull` REG/torch:plain (overlayfs) + `ctr run`", full)])


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def _memory(registry: Registry, scratch: Path, count: int) -> Table:
    images = []
    for i in range(count):
        layout = build_shell_image(scratch / f"small-{i}", f"small image {i}\n")
        images.append(converted(registry, f"oci:{layout}:v1", f"small{i}", "esgz"))
    rows: list[list[str]] = []
    with snapshotter_stack(scratch / "ctd-rss") as (containerd, daemon):
        assert daemon.proc is not None

        def measure(label: str) -> None:
            layer_rss = [_rss(pid) for pid in layer_daemons(daemon)]
            total = _rss(daemon.proc.pid) + sum(layer_rss)  # type: ignore[union-attr]
            rows.append([label, mb(_rss(daemon.proc.pid)), str(len(layer_rss)),  # type: ignore[union-attr]
                         str(len(served_layers(daemon))), mb(sum(layer_rss)), mb(total)])

        measure("started, nothing pulled")
        for image in images:
            log(f"ctr-remote images rpull {image}")
            containerd.ctr_remote("images", "rpull", "--plain-http", "--snapshotter", "lazymount", image)
        measure(f"after `ctr-remote images rpull` of {count} small eStargz images")
        for i, image in enumerate(images):
            containerd.ctr("run", "--rm", "--snapshotter", "lazymount", image, f"rss-{i}", "/bin/sh", "-c",
                           "read line < /hello.txt")
        measure(f"after a `ctr run` of each ({count} containers, removed)")
    return Table(["snapshotter memory", "snapshotter VmRSS MB", "layer daemon processes", "layers served",
                  "layer daemon VmRSS MB", "total MB"], rows)


def run(workdir: Path, quick: bool) -> Report:
    registry = local_registry(workdir)
    scratch = Path(tempfile.mkdtemp(prefix="snapshotter-", dir=workdir))
    started = time.time()
    count = QUICK_SMALL_IMAGES if quick else SMALL_IMAGES
    try:
        tables = [_first_run(registry, workdir, scratch, 1 if quick else COLD_RUNS, command, label)
                  for command, label in ((WORKLOAD, '`python3 -c "import torch"`'),
                                         (LIGHT_WORKLOAD, '`python3 -c "print(\'ok\')"`'))]
        tables.append(_memory(registry, scratch, count))
    finally:
        registry.stop()
        shutil.rmtree(scratch, ignore_errors=True)
    log(f"snapshotter: {time.time() - started:.0f} s")
    notes = [
        "containerd: a private instance (tests/reference.py) with `[proxy_plugins.lazymount]` from "
        "contrib/containerd-config.toml; the snapshotter is `python -m snapshot_grpc --address SOCK --root "
        "DIR`, fresh (empty chunk cache) for each case.  Each case uses its own containerd, so neither "
        "shares content with the other; `sync; echo 3 > /proc/sys/vm/drop_caches` before each.",
        "Registry: Debian's docker-registry 2.8 on 127.0.0.1; REG/torch:esgz is the standard image after "
        "`lazymount convert`, REG/torch:plain the original gzip image.  Pull + run cases alternate, "
        "each in a fresh containerd and snapshotter; the median run (by total wall time) is shown.",
        "CPU s: the `ctr`/`ctr-remote` processes only (containerd, the snapshotter and its mounts are "
        "daemons, not counted).",
        "Memory: the small images are tests/test_snapshotter.py's shell image (a /bin/sh layer and a "
        "one-file top layer), each converted by `lazymount convert`; one `lazymount layers` daemon serves "
        "every lazily mounted layer (the base layers differ between images built in different seconds, so "
        "there are more layers than images); before issue 6 each layer had its own `lazymount mount "
        "--layer` process of ~31 MB (527 MB in all for 10 images).  VmRSS from /proc.",
        "Goal (issue 6): pull + first run ≤ 0.25x the overlayfs full pull + run, for a workload that reads "
        "little (the second table); the first shows a workload that reads ~300 MB of the image.",
    ]
    return Report("snapshotter", "containerd with the lazymount snapshotter vs overlayfs", tables, notes)
