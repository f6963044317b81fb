"""`make demo` in its fast mode: it runs to the end, cleans up, and its table holds measured numbers.

The demo starts its own docker-registry, mounts and bubblewrap sandboxes; afterwards no registry process
and no lazymount mount may be left.  The table is parsed: every path fetched something, the lazy paths
fetched less than the full pull, and the optimized image needed fewer data requests than the plain one
(its landmark range comes in a few large requests instead of one per chunk).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.reference import mounts_under

REPO = Path(__file__).resolve().parent.parent
NEEDED = ("docker-registry", "skopeo", "umoci", "bwrap", "fusermount3")
ROW = re.compile(r"^(full pull \(skopeo \+ umoci\)|lazy, plain eStargz|lazy, optimized eStargz)\s+"
                 r"([\d,]+)\s+([\d,]+)\s+(-|\d+)\s+([\d.]+)$")

pytestmark = pytest.mark.skipif(any(shutil.which(t) is None for t in NEEDED),
                                reason=f"needs {', '.join(NEEDED)}")


def test_demo_fast(tmp_path: Path) -> None:
    work, tmp = tmp_path / "work", tmp_path / "tmp"  # `lazymount run` mounts in $TMPDIR
    tmp.mkdir()
    result = subprocess.run([sys.executable, str(REPO / "demo.py"), "--fast", "--workdir", str(work)],
                            capture_output=True, text=True, timeout=300, cwd=REPO,
                            env={**os.environ, "TMPDIR": str(tmp)})
    assert result.returncode == 0, result.stdout + result.stderr
    rows = {m.group(1): m.groups()[1:] for m in map(ROW.match, result.stdout.splitlines()) if m}
    assert len(rows) == 3, result.stdout
    full, plain, optimized = (rows[name] for name in ("full pull (skopeo + umoci)", "lazy, plain eStargz",
                                                      "lazy, optimized eStargz"))
    fetched = {name: int(row[1].replace(",", "")) for name, row in rows.items()}
    assert all(value > 0 for value in fetched.values())
    assert fetched["lazy, optimized eStargz"] < fetched["full pull (skopeo + umoci)"]
    assert fetched["lazy, plain eStargz"] < fetched["full pull (skopeo + umoci)"]
    assert int(optimized[2]) < int(plain[2])
    assert all(float(row[3]) > 0 for row in (full, plain, optimized))
    assert result.stdout.count("first result: ") == 3  # the workload's own output, once per path
    assert not work.exists()
    assert mounts_under(tmp_path) == []
    assert list(tmp.iterdir()) == []
    registries = subprocess.run(["pgrep", "-f", f"docker-registry serve {work}"], capture_output=True)
    assert registries.returncode == 1  # none left
