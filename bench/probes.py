"""Probe processes of the benchmarks: run as a script (`python bench/probes.py PROBE ARGS...`), a probe
imports lazymount's modules from PYTHONPATH (the tree or revision measured, see run.py --rev), measures
one thing in this fresh process and prints it as JSON.

What belongs here: what must run in a process of its own with the code under test: registry reads
(bench_registry) and the memory an index takes (bench_toc_memory).  What never does: importing the
bench package or the tests (this file runs as a script: only its own directory and PYTHONPATH are on
sys.path), building inputs, tables.
"""

from __future__ import annotations

import concurrent.futures
import gc
import json
import sys
import time
import tracemalloc
from pathlib import Path


def registry_reads(mode: str, image: str, digest: str, size: int, ranges: list[tuple[int, int]],
                   readers: int) -> dict:
    """Read `ranges` of blob `digest` of `image` with one RegistryClient: in order ("seq") or spread
    over `readers` threads ("parallel"); return the seconds the reads took and the bytes they returned."""
    import fetch
    import regclient

    client = regclient.RegistryClient()
    reader = fetch.RegistryBlobReader(client, image, digest, size)
    reader.read_at(0, 1)  # connection set up, outside the timing (curl pays its start-up, ~10 ms)
    start = time.perf_counter()
    if mode == "seq":
        got = sum(len(reader.read_at(offset, length)) for offset, length in ranges)
    else:
        shares = [ranges[i::readers] for i in range(readers)]
        with concurrent.futures.ThreadPoolExecutor(readers) as pool:
            got = sum(pool.map(lambda share: sum(len(reader.read_at(o, n)) for o, n in share), shares))
    seconds = time.perf_counter() - start
    client.close()
    return {"seconds": seconds, "bytes": got}


def _proc_status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))


def _deep_size(value: object, seen: set[int]) -> int:
    """sys.getsizeof of value plus, for dicts, sets and tuples, of what they hold (each object once)."""
    if id(value) in seen:
        return 0
    seen.add(id(value))
    size = sys.getsizeof(value)
    if isinstance(value, dict):
        size += sum(_deep_size(k, seen) + _deep_size(v, seen) for k, v in value.items())
    elif isinstance(value, set | frozenset | tuple):
        size += sum(_deep_size(item, seen) for item in value)
    return size


def toc_memory(mode: str, blob: Path, toc_digest: str) -> dict:
    """Index `blob`'s TOC in this process and measure it (`mode`: tracemalloc or rss)."""
    import tocread  # imported (toc with it) before the baseline so that module code is not counted

    size = blob.stat().st_size
    with open(blob, "rb") as f:
        def read_at(offset: int, length: int) -> bytes:
            f.seek(offset)
            return f.read(length)

        gc.collect()
        if mode == "tracemalloc":
            tracemalloc.start()
            base = tracemalloc.get_traced_memory()[0]
        else:
            base = _proc_status_kib("VmRSS") * 1024
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        start = time.perf_counter()
        index = tocread.read_index(read_at, size, toc_digest)
        seconds = time.perf_counter() - start
        gc.collect()
        if mode == "tracemalloc":
            current, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
        else:
            current, peak = _proc_status_kib("VmRSS") * 1024, _proc_status_kib("VmHWM") * 1024
    names = {id(name): sys.getsizeof(name) for name in index.names}
    seen: set[int] = set()
    columns = {attr: _deep_size(value, seen) for attr, value in vars(index).items()}  # names: the list only
    return {"retained": current - base, "peak": peak - base, "seconds": seconds, "entries": len(index),
            "chunks": index.chunk_count, "name_bytes": sum(names.values()), "columns": columns}


def main(argv: list[str]) -> None:
    """`registry MODE IMAGE DIGEST SIZE RANGES_JSON READERS` or `toc-memory MODE BLOB TOC_DIGEST`."""
    probe, *args = argv
    if probe == "registry":
        mode, image, digest, size, spec, readers = args
        ranges = [tuple(pair) for pair in json.loads(Path(spec).read_text())]
        result = registry_reads(mode, image, digest, int(size), ranges, int(readers))
    elif probe == "toc-memory":
        mode, blob, digest = args
        result = toc_memory(mode, Path(blob), digest)
    else:
        raise SystemExit(f"unknown probe {probe!r}")
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main(sys.argv[1:])
