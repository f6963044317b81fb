"""Benchmark "registry": regclient.py's registry client against curl, and registry-to-registry convert.

Against Debian's docker-registry on loopback, holding the standard image (`torch:plain`):
- 4 MiB range reads, sequential over the image's biggest layer blob: `RegistryBlobReader.read_at` in a
  probe process (probes.py, lazymount imported from PYTHONPATH) against one `curl`
  process fetching the same ranges of the same URL (a config file of `url`/`range`/`next` entries, so it
  keeps its connection alive as our client does);
- 4 KiB ranges at random 4 KiB-aligned offsets, 8 concurrent readers: 8 threads sharing one
  `RegistryClient` against 8 curl processes, each with its share of the same ranges;
- `lazymount convert --plain-http REG/torch:plain REG/NEW:esgz` against the reference's way: `ctr content
  fetch`, `ctr-remote images convert --oci --estargz`, `ctr images push --plain-http` through a private
  containerd (tests/reference.py), each step timed.  Every run pushes to a repository of its own, so no
  run finds its blobs already there.
The blob is read once (curl, untimed) before the read cases, so the registry serves both from the page
cache.

What belongs here: these cases and the tables.  What never does: the probe process (probes.py),
starting the registry or pushing images (inputs.py), driving containerd (tests/reference.py).
"""

from __future__ import annotations

import json
import random
import secrets
import shutil
import subprocess
import tempfile
from pathlib import Path

from bench.common import (
    LAZYMOUNT,
    MB,
    PROBES,
    PYTHON,
    REPO,
    MiB,
    Report,
    Table,
    Timing,
    log,
    mb,
    ratio,
    repeat_timed,
    runs_label,
    timed,
)
from bench.inputs import STANDARD_TAG, local_registry, pushed, standard_image
from tests.reference import Containerd, read_layout

SEQ_READ = 4 * MiB
SMALL_READ = 4096
READERS = 8
SMALL_REQUESTS = 4000
QUICK_SMALL_REQUESTS = 800
REPOSITORY = "torch"
PLAIN_TAG = "plain"


def _ours(mode: str, image: str, digest: str, size: int, ranges: list[tuple[int, int]]) -> Timing:
    with tempfile.NamedTemporaryFile("w", suffix=".json") as spec:
        json.dump(ranges, spec)
        spec.flush()
        cmd = [str(PYTHON), str(PROBES), "registry", mode, image, digest, str(size), spec.name, str(READERS)]
        timing, proc = timed(lambda: subprocess.run(cmd, check=True, capture_output=True, text=True,
                                                    cwd=REPO))
    result = json.loads(proc.stdout)
    expected = sum(n for _, n in ranges)
    if result["bytes"] != expected:
        raise RuntimeError(f"our client returned {result['bytes']} bytes, not {expected}")
    return Timing(result["seconds"], timing.cpu)


def _curl_config(path: Path, url: str, ranges: list[tuple[int, int]]) -> Path:
    entries = [f'url = "{url}"\nrange = "{o}-{o + n - 1}"\noutput = "/dev/null"' for o, n in ranges]
    path.write_text("\nnext\n".join(entries) + "\n")
    return path


def _curl(url: str, ranges: list[tuple[int, int]], processes: int, scratch: Path) -> Timing:
    """`processes` curl processes at once, each fetching its share of `ranges` over one connection."""
    configs = [_curl_config(scratch / f"curl-{i}.conf", url, ranges[i::processes]) for i in range(processes)]

    def run() -> None:
        procs = [subprocess.Popen(["curl", "-sS", "--fail", "-K", str(c)]) for c in configs]
        if any(p.wait() != 0 for p in procs):
            raise RuntimeError("curl failed")

    timing, _ = timed(run)
    return timing


def _small_ranges(size: int, count: int) -> list[tuple[int, int]]:
    rng = random.Random(4)
    return [(rng.randrange(size // SMALL_READ) * SMALL_READ, SMALL_READ) for _ in range(count)]


def _read_cases(image: str, layout: Path, registry_url: str, workdir: Path, quick: bool) -> list[Table]:
    _, descriptor = max(read_layout(layout, STANDARD_TAG)[2], key=lambda pair: pair[1]["size"])
    digest, size = descriptor["digest"], descriptor["size"]
    url = f"{registry_url}/v2/{REPOSITORY}/blobs/{digest}"
    subprocess.run(["curl", "-sS", "--fail", "-o", "/dev/null", url], check=True)  # warm the page cache
    seq = [(offset, min(SEQ_READ, size - offset)) for offset in range(0, size, SEQ_READ)]
    small = _small_ranges(size, QUICK_SMALL_REQUESTS if quick else SMALL_REQUESTS)
    scratch = workdir / "curl-configs"
    scratch.mkdir(exist_ok=True)
    cases = {
        "seq": (seq, lambda: _ours("seq", image, digest, size, seq), lambda: _curl(url, seq, 1, scratch)),
        "parallel": (small, lambda: _ours("parallel", image, digest, size, small),
                     lambda: _curl(url, small, READERS, scratch)),
    }
    results = {}
    for mode, (ranges, ours, curl) in cases.items():
        log(f"{mode}: {len(ranges)} ranges, ours then curl")
        results[mode] = (repeat_timed(ours, quick), repeat_timed(curl, quick))
    shutil.rmtree(scratch)

    (seq_ours, runs), (seq_curl, _) = results["seq"]
    (par_ours, _), (par_curl, _) = results["parallel"]
    throughput = Table(
        [f"{SEQ_READ // MiB} MiB ranges in order over a {mb(size)} MB layer blob", "runs", "seconds", "MB/s",
         "CPU s", "speed ours/curl"],
        [["lazymount `RegistryBlobReader.read_at`", runs_label(runs), f"{seq_ours.wall:.2f}",
          f"{size / seq_ours.wall / MB:,.0f}", f"{seq_ours.cpu:.2f}", ratio(seq_curl.wall, seq_ours.wall)],
         ["curl (one process, keep-alive)", runs_label(runs), f"{seq_curl.wall:.2f}",
          f"{size / seq_curl.wall / MB:,.0f}", f"{seq_curl.cpu:.2f}", "1.00x"]])
    count = len(small)
    rate = Table(
        [f"{count:,} random {SMALL_READ // 1024} KiB ranges, {READERS} concurrent readers", "runs", "seconds",
         "requests/s", "CPU s", "rate ours/curl"],
        [[f"lazymount, {READERS} threads sharing one `RegistryClient`", runs_label(runs),
          f"{par_ours.wall:.2f}", f"{count / par_ours.wall:,.0f}", f"{par_ours.cpu:.2f}",
          ratio(par_curl.wall, par_ours.wall)],
         [f"curl, {READERS} processes (keep-alive each)", runs_label(runs), f"{par_curl.wall:.2f}",
          f"{count / par_curl.wall:,.0f}", f"{par_curl.cpu:.2f}", "1.00x"]])
    return [throughput, rate]


def _convert_ours(source: str, host: str) -> Timing:
    target = f"{host}/convert-ours-{secrets.token_hex(4)}:esgz"
    cmd = [str(LAZYMOUNT), "convert", "-q", "--plain-http", source, target]
    log(" ".join(cmd))
    timing, _ = timed(lambda: subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL))
    log(f"  {timing.wall:.1f} s")
    return timing


def _convert_reference(source: str, host: str, workdir: Path) -> dict[str, Timing]:
    """Fetch, convert and push with the reference's tools; the timing of each step."""
    base = workdir / "containerd"
    shutil.rmtree(base, ignore_errors=True)
    containerd = Containerd(base).start()
    target = f"{host}/convert-ref-{secrets.token_hex(4)}:esgz"
    steps = {
        "ctr content fetch --plain-http": ("ctr", "content", "fetch", "--plain-http", source),
        "ctr-remote images convert --oci --estargz": ("ctr-remote", "images", "convert", "--oci",
                                                      "--estargz", source, target),
        "ctr images push --plain-http": ("ctr", "images", "push", "--plain-http", target),
    }
    timings = {}
    try:
        for label, (tool, *args) in steps.items():
            log(label)
            run = containerd.ctr if tool == "ctr" else containerd.ctr_remote
            timings[label], _ = timed(lambda run=run, args=args: run(*args))
            log(f"  {timings[label].wall:.1f} s")
    finally:
        containerd.stop()
        shutil.rmtree(base, ignore_errors=True)
    return timings


def _convert_case(source: str, host: str, workdir: Path, quick: bool) -> Table:
    ours, runs = repeat_timed(lambda: _convert_ours(source, host), quick)
    ref = _convert_reference(source, host, workdir)
    ref_total = Timing(sum(t.wall for t in ref.values()), sum(t.cpu for t in ref.values()))
    rows = [["`lazymount convert --plain-http` (fetch, convert, push in one)", runs_label(runs),
             f"{ours.wall:.1f}", f"{ours.cpu:.1f}", ratio(ref_total.wall, ours.wall),
             ratio(ref_total.cpu, ours.cpu)]]
    rows += [[f"`{label}`", "1", f"{t.wall:.1f}", f"{t.cpu:.1f}", "", ""] for label, t in ref.items()]
    rows.append(["reference, all three steps", "1", f"{ref_total.wall:.1f}", f"{ref_total.cpu:.1f}", "1.00x",
                 "1.00x"])
    return Table(["registry to registry, the standard image", "runs", "seconds", "CPU s",
                  "speed vs reference", "CPU reference/ours"], rows)


def run(workdir: Path, quick: bool) -> Report:
    layout = standard_image(workdir)
    registry = local_registry(workdir)
    try:
        source = pushed(registry, layout, STANDARD_TAG, REPOSITORY, PLAIN_TAG)
        tables = _read_cases(source, layout, registry.url, workdir, quick)
        tables.append(_convert_case(source, registry.host, workdir, quick))
    finally:
        registry.stop()
    notes = [
        "Registry: Debian's docker-registry 2.8 on 127.0.0.1, filesystem storage on local disk, page cache "
        "warm (the blob is read once before the read cases).",
        "Read cases: seconds are those of the reads alone (ours: measured inside the probe process after "
        "one 1-byte read set up the connection; curl: the whole curl run, start-up included).  CPU s: the "
        "whole probe process (interpreter start-up and imports included) or all curl processes.",
        "Our reads return the bytes to Python (one copy into a bytes object per range); curl writes them "
        "to /dev/null.",
        "Convert: our time covers reading the source layers from the registry, converting and pushing "
        "(blobs and manifest) in one command; the reference's is the sum of its three commands (CPU s: "
        "the `ctr`/`ctr-remote` processes only, not the containerd daemon, which does the fetching, storing "
        "and pushing).  Each run pushes to a fresh repository, so no upload is skipped.",
        "Goal (issue 4): throughput and request rate comparable to curl's; convert faster than the "
        "reference (its gzip level 9 dominates).",
    ]
    return Report("registry", "registry client vs curl, and registry-to-registry convert vs ctr-remote",
                  tables, notes)

