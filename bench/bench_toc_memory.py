"""Benchmark "toc-memory": what tocread.read_index keeps for a layer of 100k small files, against the
reference.

A synthetic layer (inputs.many_files_tar) is converted with `lazymount convert`; then fresh processes
index its TOC and report:
- tracemalloc: bytes still allocated once read_index has returned (index alive, after a GC), and the
  peak while it ran (compressed and decompressed TOC, JSON parsing);
- RSS: VmRSS growth and peak (VmHWM, reset before parsing) of a process without tracemalloc;
- the reference: Debian's estargz reader (Open + VerifyTOC, what stargz-snapshotter keeps per layer),
  measured by tocmem.go as Go heap bytes live after a GC.
Bytes per entry beyond names = (retained - the names' own size) / entries, where names are
sys.getsizeof of each distinct string in index.names (base names) for us and the bytes of
TOCEntry.Name (full paths) for the reference.  The probe process is probes.py.

What belongs here: this benchmark's cases and table.  What never does: the Python probe process
(probes.py), making the layer (inputs.py) or anything about converting speed beyond the one timing shown.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from bench.common import LAZYMOUNT, PROBES, PYTHON, REPO, Report, Table, log, ratio, timed
from bench.inputs import many_files_tar

FILES = 100_000
QUICK_FILES = 20_000
GOAL_BYTES_PER_ENTRY = 100
PROBE_MODES = ("tracemalloc", "rss")
GO_PROBE_SOURCE = Path(__file__).with_name("tocmem.go")
GOPATH = "/usr/share/gocode"


def _run_probe(mode: str, blob: Path, toc_digest: str) -> dict:
    cmd = [str(PYTHON), str(PROBES), "toc-memory", mode, str(blob), toc_digest]
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=REPO).stdout)


def _go_probe(workdir: Path, blob: Path, toc_digest: str) -> dict:
    binary = workdir / "tocmem"
    if not binary.exists() or binary.stat().st_mtime < GO_PROBE_SOURCE.stat().st_mtime:
        env = {**os.environ, "GOPATH": GOPATH, "GO111MODULE": "off", "GOFLAGS": "",
               "GOCACHE": str(workdir / "gocache"), "CGO_ENABLED": "0"}
        subprocess.run(["go", "build", "-o", str(binary), str(GO_PROBE_SOURCE)], check=True, env=env)
    return json.loads(subprocess.run([str(binary), str(blob), toc_digest], check=True, capture_output=True,
                                     text=True).stdout)


def _convert(tar: Path, blob: Path) -> tuple[float, dict]:
    cmd = [str(LAZYMOUNT), "convert", "-q", str(tar), str(blob)]
    log(" ".join(cmd))
    timing, proc = timed(lambda: subprocess.run(cmd, check=True, capture_output=True, text=True))
    return timing.wall, json.loads(proc.stdout)


def run(workdir: Path, quick: bool) -> Report:
    files = QUICK_FILES if quick else FILES
    tar = many_files_tar(workdir, files)
    blob = workdir / f"{tar.stem}.estargz"
    convert_seconds, info = _convert(tar, blob)
    toc_digest = info["tocDigest"]
    ours = {mode: _run_probe(mode, blob, toc_digest) for mode in PROBE_MODES}
    ref = _go_probe(workdir, blob, toc_digest)
    traced, rss = ours["tracemalloc"], ours["rss"]
    entries, names = traced["entries"], traced["name_bytes"]

    def per_entry(total: float, n: int, name_bytes: float = 0) -> str:
        return f"{(total - name_bytes) / n:,.0f}"

    ours_beyond = (traced["retained"] - names) / entries
    ref_beyond = (ref["retained"] - ref["nameBytes"]) / ref["entries"]
    table = Table(
        ["measure", "lazymount", "reference (estargz Go reader)", "lazymount/reference"],
        [
            ["tree entries (root and implied dirs included; the reference also lists the landmark file)",
             f"{entries:,}", f"{ref['entries']:,}", ""],
            ["retained bytes (tracemalloc / Go live heap)", f"{traced['retained']:,}", f"{ref['retained']:,}",
             ratio(traced["retained"], ref["retained"])],
            ["retained bytes per entry", per_entry(traced["retained"], entries),
             per_entry(ref["retained"], ref["entries"]), ratio(traced["retained"] / entries,
                                                              ref["retained"] / ref["entries"])],
            ["names' own bytes", f"{names:,}", f"{ref['nameBytes']:,}", ""],
            ["**bytes per entry beyond names**", f"**{ours_beyond:,.0f}**", f"{ref_beyond:,.0f}",
             ratio(ours_beyond, ref_beyond)],
            ["peak while parsing (tracemalloc) / bytes allocated while parsing (Go)", f"{traced['peak']:,}",
             f"{ref['allocated']:,}", ""],
            ["RSS growth, index alive (no tracemalloc)", f"{rss['retained']:,}", f"{ref['rssGrowth']:,}",
             ratio(rss["retained"], ref["rssGrowth"])],
            ["peak RSS growth while parsing", f"{rss['peak']:,}", f"{ref['peakGrowth']:,}",
             ratio(rss["peak"], ref["peakGrowth"])],
            ["parse seconds (no tracemalloc)", f"{rss['seconds']:.2f}", f"{ref['seconds']:.2f}",
             ratio(rss["seconds"], ref["seconds"])],
        ])
    by_size = sorted(traced["columns"].items(), key=lambda kv: -kv[1])
    columns = [(attr, size / entries) for attr, size in by_size if size / entries >= 0.5]
    notes = [
        f"Layer: {files:,} regular files in a package-like tree (directory entries, ~1% symlinks, sizes "
        f"log-normal around 1 KB), {info['entries']:,} TOC entries, blob {blob.stat().st_size:,} bytes; "
        f"`lazymount convert -q` took {convert_seconds:.1f} s for it.",
        f"Goal: at most {GOAL_BYTES_PER_ENTRY} bytes per entry beyond names: "
        + ("met." if ours_beyond <= GOAL_BYTES_PER_ENTRY else "NOT met."),
        f"Our names are base names ({names / entries:.0f} B each as str objects, counted once per distinct "
        "object); the reference keeps full paths (bytes only, its string headers are in the per-entry part).",
        "Where our bytes beyond names go (sys.getsizeof, dicts and sets with their contents; "
        f"{traced['chunks']:,} chunks): " + ", ".join(f"`{attr}` {per:.1f}" for attr, per in columns)
        + " B/entry; the rest under 0.5 each.",
        "The reference's retained figure is Go's live heap after runtime.GC() with the Reader and its "
        "verifier alive.  RSS rows: growth from just before parsing (peak: VmHWM reset by clear_refs); "
        "neither runtime hands freed parse garbage straight back to the OS, so RSS exceeds retained bytes.",
    ]
    title = f"TOC index of a {files // 1000}k-file layer, lazymount vs the estargz reader"
    return Report("toc-memory", title, [table], notes)

