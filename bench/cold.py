"""The cold runs that time-to-first-result benchmarks share: a full pull (`skopeo copy` + `umoci raw
unpack` + the command in bubblewrap) and a `lazymount run`, each after `sync; echo 3 >
/proc/sys/vm/drop_caches` (so the harness runs as root) and with an empty cache, as root or as the
unprivileged user, on the host or inside the far registry's namespace (regimes.RunAs).

As the unprivileged user the full pull is what that user can do: skopeo, `umoci raw unpack --rootless`
(files owned by the user, no device nodes) and bubblewrap in a user namespace, all as the user.

What belongs here: these two measured runs and dropping caches.  What never does: tables (bench_*.py),
setting up users and namespaces (regimes.py), images (inputs.py).
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

from bench.common import LAZYMOUNT, Timing, log, timed
from bench.regimes import PATH, ROOT, RunAs

WORKLOAD = ["python3", "-c", "import torch"]
LAYOUT_TAG = "image"


def drop_caches() -> None:
    subprocess.run(["sync"], check=True)
    Path("/proc/sys/vm/drop_caches").write_text("3")


def bwrap(rootfs: Path, command: list[str]) -> list[str]:
    """The bubblewrap command line that runs `command` in an unpacked `rootfs` (as the full pull does)."""
    return ["bwrap", "--unshare-user", "--unshare-pid", "--die-with-parent", "--bind", str(rootfs), "/",
            "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp", "--clearenv", "--setenv", "PATH", PATH,
            "--", *command]


def _steps(steps: dict[str, Callable[[], object]]) -> dict[str, Timing]:
    """Run each step in order, timed; the total is under 'total'."""
    timings = {label: timed(step)[0] for label, step in steps.items()}
    timings["total"] = Timing(sum(t.wall for t in timings.values()), sum(t.cpu for t in timings.values()))
    return timings


def full_pull(image: str, scratch: Path, command: list[str] = WORKLOAD,
              as_: RunAs = ROOT) -> dict[str, Timing]:
    """`skopeo copy` + `umoci raw unpack` of `image` + `command` in the rootfs, cold: each step timed.

    The rootfs stays in `as_.workspace(scratch)`/rootfs until the next full pull there."""
    workspace = as_.workspace(scratch)
    layout, rootfs = workspace / "pulled", workspace / "rootfs"
    shutil.rmtree(layout, ignore_errors=True)
    shutil.rmtree(rootfs, ignore_errors=True)
    rootless = ["--rootless"] if as_.user else []
    drop_caches()
    log(f"full pull of {image} ({as_.label})")

    def run(args: list[str]) -> Callable[[], object]:
        def step() -> None:
            done = subprocess.run(as_.command(args), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                  text=True)
            if done.returncode:
                raise RuntimeError(f"{shlex.join(args)} failed ({as_.label}): {done.stderr.strip()}")
        return step

    return _steps({
        "skopeo copy": run(["skopeo", "--insecure-policy", "copy", "-q", "--src-tls-verify=false",
                            f"docker://{image}", f"oci:{layout}:{LAYOUT_TAG}"]),
        "umoci raw unpack": run(["umoci", "raw", "unpack", *rootless, "--image", f"{layout}:{LAYOUT_TAG}",
                                 str(rootfs)]),
        "run (bwrap)": run(bwrap(rootfs, command)),
    })


def lazy_run(image: str, scratch: Path, options: tuple[str, ...] = (), command: list[str] = WORKLOAD,
             as_: RunAs = ROOT) -> tuple[Timing, dict]:
    """`lazymount run` of `command` in `image`, cold (empty cache, caches dropped): timing and the stats."""
    workspace = as_.workspace(scratch)
    cache_dir, stats_file = workspace / "cache", workspace / "stats.json"
    shutil.rmtree(cache_dir, ignore_errors=True)
    stats_file.unlink(missing_ok=True)
    drop_caches()
    cmd = [str(LAZYMOUNT), "run", "--cache-dir", str(cache_dir), "--stats-file", str(stats_file), *options,
           image, "--", *command]
    log(f"{shlex.join(cmd)} ({as_.label})")
    timing, _ = timed(lambda: subprocess.run(as_.command(cmd), check=True, stdout=subprocess.DEVNULL))
    shutil.rmtree(cache_dir, ignore_errors=True)
    return timing, json.loads(stats_file.read_text())
