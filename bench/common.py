"""Shared pieces of the benchmarks: paths, the report a benchmark returns, timing and formatting.

What belongs here: what more than one benchmark module needs (where the repository and its tools are,
timing a command with its CPU time, medians, number formatting, the machine's description).  What never
does: a benchmark's own inputs or measurements (bench_*.py, inputs.py), the runner (run.py).
"""

from __future__ import annotations

import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PYTHON = REPO / ".venv" / "bin" / "python"
LAZYMOUNT = REPO / ".venv" / "bin" / "lazymount"
PROBES = Path(__file__).with_name("probes.py")  # run as a script: see its docstring
MB = 1_000_000
MiB = 1 << 20
# A run shorter than this is repeated (median of REPEATS); a longer one is measured once.
REPEAT_BELOW_SECONDS = 60.0
REPEATS = 3


@dataclass
class Table:
    """A table: column headers and rows of already formatted cells."""

    headers: list[str]
    rows: list[list[str]]

    def markdown(self) -> str:
        lines = ["| " + " | ".join(self.headers) + " |", "|" + "---|" * len(self.headers)]
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        return "\n".join(lines)


@dataclass
class Report:
    """What one benchmark produced: a title, its tables, and notes on how to read them."""

    name: str
    title: str
    tables: list[Table]
    notes: list[str] = field(default_factory=list)

    def markdown(self) -> str:
        """The tables, then the notes as a list."""
        return "\n\n".join([*(t.markdown() for t in self.tables), "\n".join(f"- {n}" for n in self.notes)])


@dataclass(frozen=True)
class Timing:
    """Wall-clock and CPU seconds (user + system of the child processes) of one measured run."""

    wall: float
    cpu: float


def timed(action: Callable[[], object]) -> tuple[Timing, object]:
    """Run `action` (which runs and waits for child processes); return its timing and result.

    CPU time is the growth of RUSAGE_CHILDREN, so it counts only children reaped during `action`: a
    long-running daemon started earlier (containerd) is not in it.
    """
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    result = action()
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return Timing(wall, cpu), result


def repeat_timed(action: Callable[[], Timing], quick: bool) -> tuple[Timing, int]:
    """Run a measurement once, and REPEATS times in all when it is short; return the median and the count.

    The median is taken by wall time (the CPU time shown is that of the same run).
    """
    runs = [action()]
    while not quick and runs[0].wall < REPEAT_BELOW_SECONDS and len(runs) < REPEATS:
        runs.append(action())
    return median(runs), len(runs)


def runs_label(count: int) -> str:
    """How a table names the number of runs behind a figure: `median of 3`, or `1`."""
    return f"median of {count}" if count > 1 else "1"


def median(runs: list[Timing]) -> Timing:
    """The run with the median wall time (the lower middle one of an even count)."""
    median_wall = statistics.median_low(r.wall for r in runs)
    return next(r for r in runs if r.wall == median_wall)


def machine() -> str:
    """One line describing this machine: cores, CPU model, memory, OS, Python."""
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            models = (line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
            model = next(models, model)
    except OSError:
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 30)
    return (f"{os.cpu_count()} cores (nproc {len(os.sched_getaffinity(0))}), {model}, {memory:.0f} GiB RAM, "
            f"{platform.system()} {platform.release()}, Python {platform.python_version()}")


def measured_revision() -> str:
    """The short git revision of the code measured: the `git archive` PYTHONPATH points to (run.py --rev
    exports it to src-COMMIT), else the repository's HEAD (`+` when .py files have uncommitted changes)."""
    source = Path(os.environ.get("PYTHONPATH", REPO))
    if source.name.startswith("src-"):
        return source.name.removeprefix("src-")
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], check=True,
                          capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", ":(glob)*.py"], check=True,
                           capture_output=True, text=True).stdout.strip()
    return head + ("+" if dirty else "")


def mb(n: float) -> str:
    """Bytes as decimal megabytes with one decimal."""
    return f"{n / MB:,.1f}"


def ratio(a: float, b: float) -> str:
    """a/b as `1.23x` (or `-` when b is zero)."""
    return f"{a / b:.2f}x" if b else "-"


def log(message: str) -> None:
    """Progress on stderr (the table goes to stdout)."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)
