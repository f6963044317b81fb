"""Run lazymount's benchmarks side by side with the reference and record them in BENCHMARKS.md.

Usage, from the repository root: .venv/bin/python -m bench.run [--only NAME ...] [--quick] [--workdir DIR]
[--rev REV]

Each benchmark prints its table and rewrites its own section of BENCHMARKS.md (date, machine, the exact
command, the git revision measured, absolute numbers and ratios to the reference).  Inputs (the
standard image, the many-files layer) are built once into the work directory and reused.  --quick
measures every case once on smaller inputs and only prints: its numbers never replace a full run's.
lazymount runs from the working tree, or with --rev from a `git archive` of that revision, in both
cases through PYTHONPATH, so the measured code is the tree's and not whatever the venv installed (the
benchmarks themselves and tests/reference.py always come from the working tree).

What belongs here: choosing benchmarks, printing, and the BENCHMARKS.md sections.  What never does:
the measurements themselves (bench_*.py) or building inputs (inputs.py).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from bench import (
    bench_convert,
    bench_first_result,
    bench_lazy,
    bench_registry,
    bench_snapshotter,
    bench_toc_memory,
    bench_workloads,
)
from bench.common import REPO, Report, log, machine

BENCHMARKS: dict[str, Callable[[Path, bool], Report]] = {
    "convert": bench_convert.run,
    "convert-small-files": bench_convert.run_small_files,
    "toc-memory": bench_toc_memory.run,
    "registry": bench_registry.run,
    "first-result": bench_first_result.run,
    "lazy": bench_lazy.run,
    "workloads": bench_workloads.run,
    "snapshotter": bench_snapshotter.run,
}
BENCHMARKS_MD = REPO / "BENCHMARKS.md"
DEFAULT_WORKDIR = Path("/var/tmp/lazymount-bench")
MD_HEADER = """# Benchmarks

Written by `bench/run.py` (`make bench` runs every benchmark; `.venv/bin/python -m bench.run --only NAME`
runs one; `--quick` runs each case once on smaller inputs and only prints).  Each section below is
rewritten by the benchmark it names: do not edit inside the markers.  Inputs are cached in
`/var/tmp/lazymount-bench` (`--workdir` to change); the standard image is built there on first use by
`../shared/bench/mkbenchimage.sh` (root, debootstrap and the torch wheel, ~2-3 min).
"""


def _begin(name: str) -> str:
    return f"<!-- bench:{name} begin -->"


def _end(name: str) -> str:
    return f"<!-- bench:{name} end -->"


def _command() -> str:
    python = Path(sys.executable)
    shown = python.relative_to(REPO) if python.is_relative_to(REPO) else python
    return shlex.join([str(shown), "-m", "bench.run", *sys.argv[1:]])


def _git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(REPO), *args], check=True, capture_output=True,
                          text=True).stdout.strip()


def use_source(rev: str | None, workdir: Path) -> str:
    """Make lazymount's modules come from the working tree (rev None) or from `rev`, exported once into
    the work directory; return how to name what is measured."""
    if rev is None:
        source = REPO
        status = _git("status", "--porcelain", "--", ":(glob)*.py")
        changed = [line.split(maxsplit=1)[1] for line in status.splitlines()]
        described = f"working tree at {_git('rev-parse', '--short', 'HEAD')}"
        described += f" with uncommitted changes to {', '.join(changed)}" if changed else " (clean)"
    else:
        commit = _git("rev-parse", "--verify", rev + "^{commit}")
        source = workdir / f"src-{commit[:12]}"
        if not source.exists():
            partial = source.with_suffix(".partial")
            partial.mkdir(parents=True, exist_ok=True)
            archive = subprocess.run(["git", "-C", str(REPO), "archive", commit], check=True,
                                     capture_output=True).stdout
            subprocess.run(["tar", "-x", "-C", str(partial)], input=archive, check=True)
            partial.rename(source)
        described = f"revision {commit[:12]} (`--rev {rev}`)"
    os.environ["PYTHONPATH"] = str(source)
    return described


def section(report: Report, started: float, loads: tuple[float, float], measured: str) -> str:
    """The BENCHMARKS.md section of one report, markers included."""
    lines = [
        _begin(report.name),
        f"## {report.name}: {report.title}",
        "",
        f"- Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(started))}",
        f"- Machine: {machine()}; load average {loads[0]:.2f} when the benchmark started and {loads[1]:.2f} "
        "when it ended (1-minute averages; other work on the machine slows the numbers down)",
        f"- Command: `{_command()}` (from the repository root)",
        f"- Code measured: {measured}",
        "",
        report.markdown(),
        _end(report.name),
    ]
    return "\n".join(lines)


def write_section(path: Path, name: str, text: str) -> None:
    """Replace benchmark `name`'s section of the file at `path` (appending it the first time)."""
    doc = path.read_text() if path.exists() else MD_HEADER
    pattern = re.compile(re.escape(_begin(name)) + r".*?" + re.escape(_end(name)), re.DOTALL)
    if not pattern.search(doc):
        doc = doc.rstrip("\n") + "\n\n" + text + "\n"
    doc = pattern.sub(lambda _: text, doc)
    path.write_text(doc)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", choices=sorted(BENCHMARKS), metavar="NAME",
                        help=f"run only this benchmark (repeatable): {', '.join(BENCHMARKS)}")
    parser.add_argument("--quick", action="store_true",
                        help="one run per case, smaller inputs; print only, BENCHMARKS.md is left alone")
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR, help="cache of inputs and scratch")
    parser.add_argument("--rev", help="measure this git revision instead of the working tree")
    args = parser.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    measured = use_source(args.rev, args.workdir)
    for name in args.only or BENCHMARKS:
        started, load = time.time(), os.getloadavg()[0]
        log(f"running {name}")
        report = BENCHMARKS[name](args.workdir, args.quick)
        print(f"\n## {report.name}: {report.title}\n\n{report.markdown()}\n", flush=True)
        if not args.quick:
            write_section(BENCHMARKS_MD, name, section(report, started, (load, os.getloadavg()[0]), measured))
            log(f"{name}: section written to {BENCHMARKS_MD}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
