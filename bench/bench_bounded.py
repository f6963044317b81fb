"""Peak memory of the mount daemon on hostile layers (issue 15): `python -m bench.bench_bounded [--quick]`.

Each case builds a hostile layer in memory (tests/hostile.py), writes a one-layer OCI layout, and runs
`lazymount mount --foreground` on it: the daemon is that process.  A mount that is refused ends it, and
its peak RSS comes from wait4; a mount that answers is read (4 KB of `big` for the huge chunk, `hello`
otherwise), its VmHWM read from /proc, then it is unmounted.  Prints a Markdown table for BENCHMARKS.md.

What belongs here: these cases and their table.  What never does: building the layers (tests/hostile.py).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests import hostile

REPO = Path(__file__).resolve().parent.parent
MIB = 1 << 20


def _measure(layout: Path, work: Path, read: str) -> tuple[str, float, float]:
    """(outcome, daemon peak RSS in MB, seconds until mounted or refused) of mounting `layout`."""
    mnt = work / "mnt"
    mnt.mkdir(exist_ok=True)
    start = time.monotonic()
    command = [sys.executable, str(REPO / "lazymount.py"), "mount", "--foreground", "--no-prefetch",
               "--no-background-fetch", "--cache-dir", str(work / "cache"), f"oci:{layout}:hostile", str(mnt)]
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    while not os.path.ismount(mnt):
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)  # not proc.poll(): it would drop the usage
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            error = proc.stderr.read().strip().splitlines() if proc.stderr else []
            outcome = f"refused: {error[-1][:90] if error else '?'}"
            return outcome, usage.ru_maxrss / 1024, time.monotonic() - start
        time.sleep(0.05)
    seconds = time.monotonic() - start
    try:
        fd = os.open(mnt / read, os.O_RDONLY)
        try:
            outcome = f"{read}: {len(os.pread(fd, 4096, 1 << 20 if read == 'big' else 0))} bytes read"
        except OSError as e:
            outcome = f"{read}: {os.strerror(e.errno)}"
        finally:
            os.close(fd)
        peak = hostile.peak_rss_mb(proc.pid)
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], check=False)
        proc.wait(60)
    return outcome, peak, seconds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tenth of each size")
    args = parser.parse_args(argv)
    scale = 10 if args.quick else 1
    cases = [
        ("TOC bomb: member inflating to 1.2 GB", lambda: hostile.toc_bomb(1200 * MIB // scale), "hello"),
        ("TOC padded with 1,000 MB of whitespace", lambda: hostile.padded_toc(1000 * MIB // scale), "hello"),
        ("TOC of 2,000,000 entries", lambda: hostile.many_entries(2_000_000 // scale)[:2], "hello"),
        ("a file declared as one 3 GiB chunk, 4 KB read", lambda: hostile.huge_chunk((3 << 30) // scale),
         "big"),
    ]
    print("| case | blob | outcome | daemon peak RSS (VmHWM) | mounted or refused after |")
    print("|---|---|---|---|---|")
    for name, make, read in cases:
        blob, digest = make()
        with tempfile.TemporaryDirectory(prefix="bench-bounded-") as tmp:
            layout = hostile.write_layout(Path(tmp) / "layout", blob, digest)
            outcome, peak, seconds = _measure(layout, Path(tmp), read)
        print(f"| {name} | {len(blob) / MIB:.1f} MB | {outcome} | {peak:.0f} MB | {seconds:.1f} s |",
              flush=True)


if __name__ == "__main__":
    main()
