"""Tests for cache.py: singleflight, verification, both byte bounds, corruption, processes sharing a dir."""

import fcntl
import hashlib
import logging
import multiprocessing
import os
import random
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import cache
from cache import ChunkCache
from toc import DigestError, FormatError


def chunk(seed: int, size: int) -> tuple[str, bytes]:
    """Deterministic pseudo-random bytes and their digest."""
    data = random.Random(seed).randbytes(size)
    return "sha256:" + hashlib.sha256(data).hexdigest(), data


def disk_files(root) -> dict[str, int]:
    """Every file under the chunk tree (temp files included) and its size, as os.walk sees it."""
    found = {}
    for dirpath, _dirs, files in os.walk(os.path.join(root, "chunks")):
        for name in files:
            path = os.path.join(dirpath, name)
            found[path] = os.path.getsize(path)
    return found


class Loader:
    """Returns fixed bytes and counts its calls (thread-safe)."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.calls = 0
        self._lock = threading.Lock()

    def __call__(self) -> bytes:
        with self._lock:
            self.calls += 1
        return self.data


def never() -> bytes:
    raise AssertionError("loader must not be called")


def wait_for(condition) -> None:
    """Wait until condition() holds; the deadline only turns a hang into a failure."""
    deadline = time.monotonic() + 60
    while not condition():
        assert time.monotonic() < deadline, "condition never became true"
        time.sleep(0.001)


def run_threads(n: int, target) -> list:
    results: list = [None] * n

    def run(i: int) -> None:
        try:
            results[i] = target()
        except BaseException as exc:  # collected and checked by the caller
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    return threads, results


def test_singleflight_calls_loader_once(tmp_path):
    digest, data = chunk(1, 50_000)
    release = threading.Event()
    calls = []

    def loader() -> bytes:
        calls.append(1)
        release.wait()
        return data

    c = ChunkCache(tmp_path, memory_bytes=1 << 20, disk_bytes=1 << 20)
    threads, results = run_threads(16, lambda: c.get(digest, loader))
    wait_for(lambda: c.stats()["waits"] == 15)  # all others joined the one load in progress
    release.set()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert all(r == data for r in results)
    s = c.stats()
    assert (s["misses"], s["waits"], s["bytes_loaded"]) == (1, 15, len(data))


def test_singleflight_shares_the_error_and_stores_nothing(tmp_path):
    digest, data = chunk(2, 1000)
    release = threading.Event()
    calls = []

    def loader() -> bytes:
        calls.append(1)
        release.wait()
        raise OSError("registry unreachable")

    c = ChunkCache(tmp_path, memory_bytes=1 << 20, disk_bytes=1 << 20)
    threads, results = run_threads(8, lambda: c.get(digest, loader))
    wait_for(lambda: c.stats()["waits"] == 7)
    release.set()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert all(isinstance(r, OSError) for r in results)
    assert not c.contains(digest)
    assert c.get(digest, Loader(data)) == data  # a later get loads again


def test_digest_mismatch_raises_and_stores_nothing(tmp_path):
    digest, _ = chunk(3, 4096)
    _, other = chunk(4, 4096)
    c = ChunkCache(tmp_path, memory_bytes=1 << 20, disk_bytes=1 << 20)
    with pytest.raises(DigestError, match="does not match"):
        c.get(digest, Loader(other))
    with pytest.raises(DigestError, match="does not match"):
        c.put(digest, other)
    assert not c.contains(digest)
    assert disk_files(tmp_path) == {}
    s = c.stats()
    assert (s["bytes_in_memory"], s["bytes_on_disk"], s["bytes_loaded"]) == (0, 0, 0)


@pytest.mark.parametrize("bad", [
    "sha256:../../x",
    "sha256:" + "../" * 21 + "x",  # 64 characters
    "sha256:" + "A" * 64,
    "sha256:" + "0" * 63,
    "sha256:" + "0" * 65,
    "sha256:" + "0" * 64 + "\n",
    "sha256:" + "0" * 64 + "/../../x",
    "sha512:" + "0" * 64,
    "0" * 64,
    "",
])
def test_bad_digest_strings_are_rejected(tmp_path, bad):
    root = tmp_path / "cache"
    c = ChunkCache(root, memory_bytes=1 << 20, disk_bytes=1 << 20)
    with pytest.raises(FormatError, match="invalid digest"):
        c.get(bad, never)
    with pytest.raises(FormatError, match="invalid digest"):
        c.put(bad, b"x")
    with pytest.raises(FormatError, match="invalid digest"):
        c.contains(bad)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]
    assert disk_files(root) == {}


@settings(max_examples=30, deadline=None)
@given(sizes=st.lists(st.integers(0, 3000), max_size=60), bound=st.integers(0, 8000))
def test_memory_bound_never_exceeded(sizes, bound):
    c = ChunkCache(None, memory_bytes=bound)
    for i, size in enumerate(sizes):
        digest, data = chunk(i, size)
        assert c.get(digest, Loader(data)) == data
        assert c.stats()["bytes_in_memory"] <= bound
        assert c.contains(digest) == (size <= bound)  # too large for memory: not kept


def test_memory_is_lru(tmp_path):
    a, b, d = (chunk(i, 1000) for i in range(3))
    c = ChunkCache(None, memory_bytes=2000)
    c.put(*a)
    c.put(*b)
    c.get(a[0], never)  # a is now the most recently used
    c.put(*d)
    assert c.contains(a[0]) and c.contains(d[0]) and not c.contains(b[0])
    assert c.stats()["evictions_memory"] == 1


def test_disk_bound_never_exceeded(tmp_path):
    bound = 50_000
    c = ChunkCache(tmp_path, memory_bytes=0, disk_bytes=bound)
    rng = random.Random(0)
    for i in range(200):
        digest, data = chunk(i, rng.randrange(0, 9000))
        assert c.get(digest, Loader(data)) == data
        files = disk_files(tmp_path)
        assert sum(files.values()) <= bound
        assert c.stats()["bytes_on_disk"] == sum(files.values())
    assert c.stats()["evictions_disk"] > 0
    big, data = chunk(999, bound + 1)
    assert c.get(big, Loader(data)) == data
    assert not c.contains(big)  # larger than the disk bound: never written
    assert sum(disk_files(tmp_path).values()) <= bound


def test_eviction_scans_again_when_its_candidates_run_out(tmp_path, monkeypatch):
    monkeypatch.setattr(cache._DiskTier, "EVICTION_CANDIDATES", 2)  # a scan remembers 2 of the 10 files
    c = ChunkCache(tmp_path, memory_bytes=0, disk_bytes=10_000)
    for i in range(10):
        c.put(*chunk(i, 1000))
    big = chunk(99, 7000)
    c.put(*big)  # 7 files must go: more than one scan's candidates
    assert c.contains(big[0])
    assert sum(disk_files(tmp_path).values()) == c.stats()["bytes_on_disk"] == 10_000


def test_disk_eviction_is_lru(tmp_path):
    a, b, d, e = (chunk(i, 1000) for i in range(4))
    c = ChunkCache(tmp_path, memory_bytes=0, disk_bytes=3000)
    for digest, data in (a, b, d):
        c.put(digest, data)
    assert c.get(a[0], never) == a[1]  # a disk hit makes a the most recently used
    c.put(*e)
    assert [c.contains(x[0]) for x in (a, b, d, e)] == [True, False, True, True]


def test_disk_hit_after_restart_and_stats(tmp_path):
    digest, data = chunk(5, 3000)
    c1 = ChunkCache(tmp_path, memory_bytes=1 << 20, disk_bytes=1 << 20)
    assert c1.get(digest, Loader(data)) == data  # miss
    assert c1.get(digest, never) == data  # memory hit
    s = c1.stats()
    assert (s["misses"], s["hits_memory"], s["hits_disk"], s["bytes_loaded"]) == (1, 1, 0, 3000)
    assert (s["bytes_in_memory"], s["bytes_on_disk"]) == (3000, 3000)
    c1.close()
    with ChunkCache(tmp_path, memory_bytes=1 << 20, disk_bytes=1 << 20) as c2:
        assert c2.get(digest, never) == data  # disk hit
        assert c2.get(digest, never) == data  # then memory
        s = c2.stats()
        assert (s["misses"], s["hits_disk"], s["hits_memory"], s["bytes_loaded"]) == (0, 1, 1, 0)
        assert (s["evictions"], s["corrupt"]) == (0, 0)


@pytest.mark.parametrize("damage", ["truncate", "flip", "empty"])
def test_corrupt_disk_file_is_removed_and_reloaded(tmp_path, caplog, damage):
    digest, data = chunk(6, 10_000)
    c = ChunkCache(tmp_path, memory_bytes=0, disk_bytes=1 << 20)
    c.put(digest, data)
    [path] = disk_files(tmp_path)
    if damage == "truncate":
        os.truncate(path, 4000)  # a torn write
    elif damage == "flip":
        with open(path, "r+b") as f:
            f.seek(5000)
            f.write(bytes([data[5000] ^ 1]))
    else:
        os.truncate(path, 0)
    loader = Loader(data)
    with caplog.at_level(logging.WARNING, logger="cache"):
        assert c.get(digest, loader) == data
    assert loader.calls == 1
    assert len([r for r in caplog.records if "corrupt" in r.getMessage()]) == 1
    with open(path, "rb") as f:
        assert f.read() == data  # rewritten whole
    s = c.stats()
    assert (s["corrupt"], s["misses"], s["hits_disk"], s["bytes_on_disk"]) == (1, 1, 0, len(data))


def test_disk_tier_disabled(tmp_path):
    digest, data = chunk(7, 2000)
    for c in (ChunkCache(None, memory_bytes=0), ChunkCache(tmp_path / "unused", 0, disk_bytes=0)):
        loader = Loader(data)
        assert c.get(digest, loader) == data
        assert c.get(digest, loader) == data
        assert loader.calls == 2  # nothing kept anywhere
        assert not c.contains(digest)
        assert c.stats()["bytes_on_disk"] == 0
    assert not (tmp_path / "unused").exists()


def test_stale_temp_files_are_cleaned_by_a_scan(tmp_path):
    c = ChunkCache(tmp_path, memory_bytes=0, disk_bytes=1 << 20)
    fan = tmp_path / "chunks" / "sha256" / "ab"
    fan.mkdir(parents=True)
    (fan / (".tmp-" + "ab" * 32 + "-1")).write_bytes(b"x" * 100)  # left by a crashed writer
    c.put(*chunk(8, 100))
    assert sum(disk_files(tmp_path).values()) == 100


def test_counter_repairs_itself_after_files_vanish(tmp_path, monkeypatch):
    monkeypatch.setattr(cache._DiskTier, "RESCAN_EVERY", 4)
    c = ChunkCache(tmp_path, memory_bytes=0, disk_bytes=1 << 20)
    for i in range(3):
        c.put(*chunk(i, 1000))
    for path in disk_files(tmp_path):
        os.unlink(path)  # removed by hand, behind the cache's back
    for i in range(3, 6):
        c.put(*chunk(i, 1000))
    assert c.stats()["bytes_on_disk"] == sum(disk_files(tmp_path).values()) == 3000


POOL = [chunk(1000 + i, 500 + (i * 997) % 5000) for i in range(60)]
SHARED_BOUND = 64_000


def _worker(root: str, seed: int, out) -> None:
    """Many threads getting random chunks of POOL from a cache dir another process also uses."""
    cache._DiskTier.RESCAN_EVERY = 10**9  # the shared counter alone must stay exact
    c = ChunkCache(root, memory_bytes=8_000, disk_bytes=SHARED_BOUND)
    bad = []

    def run(tseed: int) -> None:
        rng = random.Random(tseed)
        for _ in range(400):
            digest, data = rng.choice(POOL)
            got = c.get(digest, lambda data=data: data)
            if "sha256:" + hashlib.sha256(got).hexdigest() != digest:
                bad.append(digest)

    threads = [threading.Thread(target=run, args=(seed * 100 + t,)) for t in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    s = c.stats()
    out.put((seed, bad, s["misses"], s["hits_disk"], s["evictions_disk"]))


def test_two_processes_share_one_dir(tmp_path, monkeypatch):
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(str(tmp_path), seed, out)) for seed in (1, 2)]
    for p in procs:
        p.start()
    # While they run, take their lock now and then and check the bound on a consistent view.
    wait_for(lambda: (tmp_path / "lock").exists())
    worst = 0
    with open(tmp_path / "lock", "rb") as lock:
        while any(p.is_alive() for p in procs):
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                worst = max(worst, sum(disk_files(tmp_path).values()))
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
            time.sleep(0.002)
    results = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join()
        assert p.exitcode == 0
    for _seed, bad, misses, hits_disk, evictions in results:
        assert bad == []
        assert misses > 0 and hits_disk > 0 and evictions > 0
    assert worst <= SHARED_BOUND
    files = disk_files(tmp_path)
    assert sum(files.values()) <= SHARED_BOUND
    for path in files:  # every file is whole and named by its content
        with open(path, "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == os.path.basename(path)
    monkeypatch.setattr(cache._DiskTier, "RESCAN_EVERY", 10**9)
    assert ChunkCache(tmp_path, 0, SHARED_BOUND).stats()["bytes_on_disk"] == sum(files.values())


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache.default_cache_dir() == tmp_path / "lazymount"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/dir")  # ignored, as the XDG spec says
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache.default_cache_dir() == tmp_path / ".cache" / "lazymount"


def test_read_serves_ranges_of_verified_files_without_hashing_again(tmp_path, monkeypatch):
    digest, data = chunk(11, 100_000)
    c = ChunkCache(tmp_path, memory_bytes=0, disk_bytes=1 << 20)
    c.put(digest, data)  # written from verified bytes by this process
    hashed = []
    real_sha256 = hashlib.sha256
    # the cache hashes through toc.sha256_digest / toc.verify_digest, which call hashlib.sha256
    monkeypatch.setattr(hashlib, "sha256", lambda b=b"": hashed.append(len(b)) or real_sha256(b))
    assert c.read(digest, 1000, 5000, never) == data[1000:5000]
    assert c.read(digest, 99_000, 100_000, never) == data[99_000:]
    assert hashed == []
    assert c.stats()["hits_disk"] == 2
    # a fresh process (cache object) hashes the file whole once, then reads ranges
    c2 = ChunkCache(tmp_path, memory_bytes=0, disk_bytes=1 << 20)
    assert c2.read(digest, 0, 10, never) == data[:10]
    assert c2.read(digest, 10, 20, never) == data[10:20]
    assert hashed == [len(data)]


@pytest.mark.parametrize("damage", ["flip", "replace"])
def test_read_detects_a_file_changed_after_it_was_verified(tmp_path, damage):
    digest, data = chunk(12, 50_000)
    c = ChunkCache(tmp_path, memory_bytes=0, disk_bytes=1 << 20)
    c.put(digest, data)
    [path] = disk_files(tmp_path)
    assert c.read(digest, 0, 100, never) == data[:100]
    time.sleep(0.01)  # past the coarse ctime tick of filesystems without fine-grained timestamps
    bad = bytes([data[10] ^ 1])
    if damage == "flip":
        with open(path, "r+b") as f:
            f.seek(10)
            f.write(bad)
    else:
        with open(path + ".new", "wb") as f:
            f.write(data[:10] + bad + data[11:])
        os.replace(path + ".new", path)
    loader = Loader(data)
    assert c.read(digest, 0, 100, loader) == data[:100]  # verified again: corrupt, removed, reloaded
    assert loader.calls == 1
    assert c.stats()["corrupt"] == 1


def test_store_fills_disk_not_memory(tmp_path):
    digest, data = chunk(13, 4000)
    c = ChunkCache(tmp_path, memory_bytes=1 << 20, disk_bytes=1 << 20)
    loader = Loader(data)
    c.store(digest, loader)
    c.store(digest, loader)  # cached: not loaded again
    assert loader.calls == 1
    s = c.stats()
    assert (s["bytes_in_memory"], s["bytes_on_disk"], s["misses"]) == (0, len(data), 1)
    assert c.get(digest, never) == data
    with pytest.raises(DigestError):
        c.store(chunk(14, 10)[0], Loader(b"wrong"))


def test_write_behind_answers_before_the_disk_write_and_close_writes_the_rest(tmp_path, monkeypatch):
    """With write-behind a reader's chunk is returned (and served again, and `contains`) while its disk
    write is held back; `close` writes it; beyond WRITE_BEHIND_BYTES waiting a chunk is not written."""
    release = threading.Event()
    real_write = cache._DiskTier.write

    def held_write(tier, hexdigest, data):
        if threading.current_thread().name == "cache-writer":
            release.wait()
        real_write(tier, hexdigest, data)

    monkeypatch.setattr(cache._DiskTier, "write", held_write)
    monkeypatch.setattr(cache, "WRITE_BEHIND_BYTES", 3000)
    (d1, b1), (d2, b2), (d3, b3) = chunk(1, 2000), chunk(2, 500), chunk(3, 1000)
    c = ChunkCache(tmp_path, memory_bytes=0, write_behind=True)
    assert c.get(d1, Loader(b1)) == b1
    assert c.read(d2, 100, 200, Loader(b2)) == b2[100:200]
    assert disk_files(tmp_path) == {}  # both wait for the held writer
    assert c.contains(d1) and c.get(d1, never) == b1 and c.read(d2, 0, 10, never) == b2[:10]
    assert c.get(d3, Loader(b3)) == b3  # 3500 bytes would wait: not written
    assert c.stats()["disk_writes_dropped"] == 1 and not c.contains(d3)
    release.set()
    c.close()
    assert sorted(disk_files(tmp_path).values()) == [500, 2000]
    assert ChunkCache(tmp_path, memory_bytes=0).get(d1, never) == b1


def test_present_lists_memory_and_disk_in_one_pass(tmp_path):
    """`present` names the chunks in memory and on disk (also those another process wrote), not temp
    files nor what was evicted."""
    (d1, b1), (d2, b2), (d3, b3) = chunk(21, 1000), chunk(22, 1000), chunk(23, 1000)
    c = ChunkCache(tmp_path, memory_bytes=1500, disk_bytes=2500)
    assert c.present() == set()
    c.get(d1, Loader(b1))  # memory and disk
    ChunkCache(tmp_path, memory_bytes=0).get(d2, Loader(b2))  # another process's, on disk only
    fan = tmp_path / "chunks" / "sha256" / "ab"
    fan.mkdir(parents=True, exist_ok=True)
    (fan / f"{cache._TMP_PREFIX}{'ab' * 32}-1").write_bytes(b"partial")
    assert c.present() == {d1, d2}
    c.get(d3, Loader(b3))  # the disk bound evicts the oldest file (d1), memory keeps d3 only
    assert c.present() == {d2, d3} == {d for d in (d1, d2, d3) if c.contains(d)}
