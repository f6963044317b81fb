"""Issue 15: resources that hostile input cannot blow up, waits that end, file types that cannot block.

One test (or a few) per defect of the issue, each asserting the bounded outcome: the one-line error, EIO
within the stated time, or the peak memory (VmHWM of a subprocess or of the mount daemon).  Hostile
layers are built in memory by tests/hostile.py; the registry faults come from tests/registry.FaultProxy.
Then property-based tests: random valid layers convert to blobs that our reader and the reference Go
reader accept, and on random hostile tars `convert` and the reader agree.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import layerwriter
import toc
import tocread
from tests import hostile
from tests.reference import ToolError, verify_with_reference
from tests.registry import Fault, FaultProxy, Registry, push_layout
from tests.test_toc import tar_bytes

REPO = Path(__file__).resolve().parent.parent
MIB = 1 << 20
CAN_MOUNT = os.path.exists("/dev/fuse") and shutil.which("fusermount3") is not None
needs_fuse = pytest.mark.skipif(not CAN_MOUNT, reason="needs /dev/fuse and fusermount3 (Debian fuse3)")
needs_registry = pytest.mark.skipif(shutil.which("skopeo") is None or shutil.which("docker-registry") is None,
                                    reason="needs skopeo and docker-registry (Debian packages)")
# What the fast tests configure: every wait is seconds long, and one attempt (with one retry) is made.
FAST = {"registry_defaults": {"connect_timeout": 2, "read_timeout": 2, "operation_timeout": 4,
                              "range_timeout": 3, "retries": 1, "retry_backoff": 0.1}}
PARSE = """
import json, os, sys
import toc, tocread
from tests.hostile import peak_rss_mb
fd = os.open(sys.argv[1], os.O_RDONLY)
try:
    index = tocread.read_index(lambda o, n: os.pread(fd, n, o), os.fstat(fd).st_size, sys.argv[2])
    result = {"entries": len(index)}
except toc.LazymountError as e:
    result = {"error": f"{type(e).__name__}: {e}"}
result["peak_mb"] = peak_rss_mb()
print(json.dumps(result))
"""


def lazymount(*args: str, timeout: float = 120) -> tuple[subprocess.CompletedProcess, float]:
    """Run the CLI; (the finished process, its seconds)."""
    start = time.monotonic()
    proc = subprocess.run([sys.executable, str(REPO / "lazymount.py"), *args], capture_output=True, text=True,
                          timeout=timeout, check=False)
    return proc, time.monotonic() - start


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    """The CLI's stderr, asserted to be one `lazymount: error:` line with exit status 1."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1 and lines[0].startswith("lazymount: error: "), proc.stderr
    return lines[0]


def parse_in_subprocess(tmp_path: Path, blob: bytes, toc_digest: str) -> dict:
    """tocread.read_index of `blob` in a fresh process: its entry count or error, and its VmHWM."""
    path = tmp_path / "blob"
    path.write_bytes(blob)
    proc = subprocess.run([sys.executable, "-c", PARSE, str(path), toc_digest], capture_output=True,
                          text=True, cwd=REPO, timeout=300, check=True)
    return json.loads(proc.stdout)


def read_through(path: Path, offset: int = 0, size: int = 4096,
                 timeout: float = 120) -> tuple[bytes | int, float]:
    """Read through the mount in a subprocess: (the bytes, or the errno), and the seconds it took."""
    code = ("import os, sys\nfd = os.open(sys.argv[1], os.O_RDONLY)\n"
            "try:\n    sys.stdout.buffer.write(os.pread(fd, int(sys.argv[3]), int(sys.argv[2])))\n"
            "except OSError as e:\n    sys.exit(100 + e.errno)\n")
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code, str(path), str(offset), str(size)],
                          capture_output=True, timeout=timeout, check=False)
    seconds = time.monotonic() - start
    return (proc.stdout if proc.returncode == 0 else proc.returncode - 100), seconds


@contextlib.contextmanager
def mounted(ref: str, mountpoint: Path, *options: str) -> Iterator[int]:
    """`lazymount mount` (no prefetch, no background fetch); yield the daemon's PID; always clean up."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    proc, _ = lazymount("mount", ref, str(mountpoint), "--no-prefetch", "--no-background-fetch", *options)
    assert proc.returncode == 0, proc.stderr
    pid = json.loads(os.getxattr(mountpoint, "user.lazymount.stats"))["pid"]
    try:
        yield pid
    finally:
        subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], capture_output=True, check=False)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def write_config(path: Path, extra: dict | None = None) -> Path:
    path.write_text(json.dumps({**FAST, **(extra or {})}))  # JSON is YAML
    return path


def member(name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", link: str = "") -> tuple:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.mtime, info.linkname = kind, 0o755, 1_700_000_000, link
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    return info, data if kind == tarfile.REGTYPE else None


@pytest.fixture(scope="module")
def small_layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An OCI layout (tag v1) of one eStargz layer: `data` (4 MB in 64 KiB chunks: far apart reads stay
    out of each other's kernel read-ahead and neighbour fetch) and `hello.txt`."""
    work = tmp_path_factory.mktemp("small")
    data = os.urandom(4_000_000)
    (work / "data").write_bytes(data)  # beside the layout, for the tests to compare with
    tar = tar_bytes([member("data", data=data), member("hello.txt", data=hostile.HELLO)])
    out = io.BytesIO()
    info = layerwriter.write_layer(io.BytesIO(tar), out, chunk_size=64 << 10, workers=1)
    return hostile.write_layout(work / "layout", out.getvalue(), info.toc_digest, tag="v1")


# ------------------------------------------------------------------------------- memory follows the TOC


def test_toc_bomb_is_refused_within_200_mb(tmp_path: Path) -> None:
    blob, digest = hostile.toc_bomb(1200 * MIB)
    assert len(blob) < 2 * MIB
    got = parse_in_subprocess(tmp_path, blob, digest)
    assert "inflates past" in got.get("error", ""), got
    assert got["peak_mb"] < 200, got


def test_padded_toc_parses_within_200_mb(tmp_path: Path) -> None:
    """Peak memory grows with entries, not with bytes of padding: 256 MB of whitespace (the benchmark
    measures 1,000 MB) parse like the small TOC they pad."""
    blob, digest = hostile.padded_toc(256 * MIB)
    got = parse_in_subprocess(tmp_path, blob, digest)
    assert got.get("entries") == 2 and got["peak_mb"] < 200, got


def test_many_entries_peak_grows_with_entries_only(tmp_path: Path) -> None:
    """200k entries (each with its own chunk digest) peak under 120 MB; the benchmark's 2 million, under
    500 MB."""
    blob, digest, _ = hostile.many_entries(200_000)
    got = parse_in_subprocess(tmp_path, blob, digest)
    assert got.get("entries", 0) > 200_000 and got["peak_mb"] < 120, got


def test_toc_entry_count_limit(tmp_path: Path) -> None:
    blob, digest, _ = hostile.many_entries(5_000)
    with pytest.raises(toc.TOCError, match="more than 1000 entries"):
        tocread.read_index(lambda o, n: blob[o:o + n], len(blob), digest, toc.Limits(toc_entries=1000))


@needs_fuse
def test_huge_chunk_read_is_eio_within_200_mb(tmp_path: Path) -> None:
    """A file declared as one 3 GiB chunk: a 4 KB read of it is EIO at once; the daemon stays small and
    the rest of the mount is served."""
    blob, digest = hostile.huge_chunk(3 << 30)
    layout = hostile.write_layout(tmp_path / "layout", blob, digest)
    with mounted(f"oci:{layout}:hostile", tmp_path / "mnt", "--cache-dir", str(tmp_path / "cache")) as pid:
        got, seconds = read_through(tmp_path / "mnt" / "big", 1 << 20)
        assert got == errno.EIO and seconds < 20
        assert read_through(tmp_path / "mnt" / "hello")[0] == hostile.HELLO
        assert hostile.peak_rss_mb(pid) < 200


@needs_fuse
def test_toc_bomb_mount_fails_in_one_line(tmp_path: Path) -> None:
    blob, digest = hostile.toc_bomb(1200 * MIB)
    layout = hostile.write_layout(tmp_path / "layout", blob, digest)
    (tmp_path / "mnt").mkdir()
    proc, seconds = lazymount("mount", f"oci:{layout}:hostile", str(tmp_path / "mnt"), "--no-prefetch",
                              "--cache-dir", str(tmp_path / "cache"))
    assert "inflates past" in one_line_error(proc) and seconds < 60


# --------------------------------------------------------------------- layouts: bounded, one-line errors


@pytest.mark.parametrize("content", [b"[]", b"{", b'{"manifests": [{"annotations": "x"}]}', b"\xff\xfe{}",
                                     b'{"manifests": "x"}', b'{"manifests": [{"digest": "sha256:1"}]}'])
def test_malformed_index_json_is_a_user_error(small_layout: Path, tmp_path: Path, content: bytes) -> None:
    layout = tmp_path / "layout"
    shutil.copytree(small_layout, layout)
    (layout / "index.json").write_bytes(content)
    proc, _ = lazymount("inspect", f"oci:{layout}")  # `latest`: the only manifest, if there is one
    assert "index.json" in one_line_error(proc)


def test_index_json_linked_to_dev_zero(small_layout: Path, tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    shutil.copytree(small_layout, layout)
    (layout / "index.json").unlink()
    (layout / "index.json").symlink_to("/dev/zero")
    proc, seconds = lazymount("inspect", f"oci:{layout}:v1", timeout=60)
    assert "not a regular file" in one_line_error(proc) and seconds < 30


def test_index_json_fifo_and_blob_linked_to_dev_zero(small_layout: Path, tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    shutil.copytree(small_layout, layout)
    (layout / "index.json").unlink()
    os.mkfifo(layout / "index.json")
    proc, seconds = lazymount("inspect", f"oci:{layout}:v1", timeout=60)
    assert "not a regular file" in one_line_error(proc) and seconds < 30
    shutil.rmtree(layout)
    shutil.copytree(small_layout, layout)
    manifest = json.loads((layout / "index.json").read_text())["manifests"][0]["digest"]
    blob = layout / "blobs" / "sha256" / manifest[7:]
    blob.unlink()
    blob.symlink_to("/dev/zero")
    proc, seconds = lazymount("inspect", f"oci:{layout}:v1", timeout=60)
    assert "not a regular file" in one_line_error(proc) and seconds < 30


def test_convert_into_a_malformed_layout(small_layout: Path, tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "index.json").write_bytes(b"[]")
    proc, _ = lazymount("convert", "-q", f"oci:{small_layout}:v1", f"oci:{tmp_path / 'out'}:v2")
    assert "index.json" in one_line_error(proc)


# ------------------------------------------------------------------------------------ waits that end


@pytest.fixture(scope="module")
def pushed(registry: Registry, small_layout: Path) -> str:
    push_layout(small_layout, "v1", registry, "bounded/small")
    return "bounded/small:v1"


@pytest.fixture
def trickler(registry: Registry) -> Iterator[FaultProxy]:
    proxy = FaultProxy(registry.host)
    yield proxy
    proxy.stop()


@needs_registry
@pytest.mark.parametrize("command", ["inspect", "mount"])
def test_trickling_registry_ends_in_one_line(pushed: str, trickler: FaultProxy, tmp_path: Path,
                                             command: str) -> None:
    """One byte every second, status line and headers included: the operation's deadline (4 s, one
    retry within it) ends it, whatever the per-read timeout."""
    trickler.add(Fault("trickle", path="/manifests/", times=-1, seconds=1.0))
    config = write_config(tmp_path / "config.yaml")
    extra = [str(tmp_path / "mnt"), "--cache-dir", str(tmp_path / "cache")] if command == "mount" else []
    (tmp_path / "mnt").mkdir()
    proc, seconds = lazymount(command, f"{trickler.host}/{pushed}", *extra, "--config", str(config))
    assert "timed out" in one_line_error(proc) and seconds < 30


@needs_registry
@needs_fuse
def test_reads_end_in_eio_and_the_mount_recovers(registry: Registry, pushed: str, trickler: FaultProxy,
                                                 small_layout: Path, tmp_path: Path) -> None:
    """With range_timeout 3 s a read through the mount that the registry trickles, or does not answer
    at all (stopped), is EIO in bounded time: twice that (the kernel asks twice) on a quiet machine, and
    the bound asserted is 45 s, far under the 306 s of before, so that a loaded machine passes too; once
    the registry answers again, the same read is served."""
    config = write_config(tmp_path / "config.yaml")
    data = (small_layout.parent / "data").read_bytes()
    mnt = tmp_path / "mnt"
    log = tmp_path / "daemon.log"
    # no prefetch and no background fetch: the chunks read below must still be in the registry
    with mounted(f"{trickler.host}/{pushed}", mnt, "--config", str(config), "--cache-dir",
                 str(tmp_path / "cache"), "--log-file", str(log), "--no-prefetch", "--no-background-fetch"):
        trickler.add(Fault("trickle", path="/blobs/", times=-1, seconds=1.0))
        got, seconds = read_through(mnt / "data", 100_000)
        assert got == errno.EIO and seconds < 45, (str(got)[:40], seconds, log.read_text()[-2000:],
                                                   trickler.seen)
        trickler.faults.clear()
        assert read_through(mnt / "data", 100_000)[0] == data[100_000:104_096]
        assert registry.process is not None
        os.kill(registry.process.pid, signal.SIGSTOP)
        try:
            got, seconds = read_through(mnt / "data", 3_000_000)  # no chunk fetched along with the first
            assert got == errno.EIO and seconds < 45, (got, seconds)
        finally:
            os.kill(registry.process.pid, signal.SIGCONT)
        assert read_through(mnt / "data", 3_000_000)[0] == data[3_000_000:3_004_096]


# --------------------------------------------------------------------------- the cache's file types


@needs_fuse
def test_cache_fifo_is_replaced_and_umount_ends_the_daemon(small_layout: Path, tmp_path: Path) -> None:
    ref, mnt, cache_dir = f"oci:{small_layout}:v1", tmp_path / "mnt", tmp_path / "cache"
    data = (small_layout.parent / "data").read_bytes()
    with mounted(ref, mnt, "--cache-dir", str(cache_dir)):
        assert read_through(mnt / "data", 0)[0] == data[:4096]
    chunk_files = [p for p in (cache_dir / "chunks").rglob("*") if p.is_file()]
    assert chunk_files
    for path in chunk_files:
        path.unlink()
        os.mkfifo(path)
    with mounted(ref, mnt, "--cache-dir", str(cache_dir)) as pid:
        got, seconds = read_through(mnt / "data", 0)
        assert got == data[:4096] and seconds < 45  # was 150+ s
        proc, seconds = lazymount("umount", str(mnt))
        assert proc.returncode == 0 and seconds < 45, proc.stderr
        time.sleep(0.5)
        status = Path(f"/proc/{pid}/status")
        assert not status.exists() or "zombie" in status.read_text()
    assert any(p.is_file() for p in chunk_files)  # the chunk read came from the layout again, and was kept


# ------------------------------------------------------------------ the converter writes what is read


def _convert(tar: bytes, limits: toc.Limits = toc.DEFAULT_LIMITS) -> tuple[bytes | None, str | None]:
    """(blob, TOC digest) if `convert` accepts `tar`, else (None, its one-line reason)."""
    out = io.BytesIO()
    try:
        info = layerwriter.write_layer(io.BytesIO(tar), out, workers=1, limits=limits)
    except toc.LazymountError as e:
        return None, str(e)
    return out.getvalue(), info.toc_digest


def _reader_verdict(tar: bytes, monkeypatch: pytest.MonkeyPatch,
                    limits: toc.Limits = toc.DEFAULT_LIMITS) -> str | None:
    """What the reader says of the layer `convert` writes from `tar` with its own check of the entries
    taken out: None if it accepts it, else its reason (a name the writer refuses before any TOC exists
    is refused by the reader's own normalize_name, with that reason)."""
    with monkeypatch.context() as m:
        m.setattr(layerwriter.Index, "from_entries", classmethod(lambda cls, *a, **k: None))
        blob, digest = _convert(tar, limits)
    if blob is None:
        return digest
    try:
        tocread.read_index(lambda o, n: blob[o:o + n], len(blob), digest, limits)
    except toc.LazymountError as e:
        return str(e)
    return None


@pytest.mark.parametrize("link", ["a -> /etc", "s -> /tmp"])
def test_convert_refuses_what_the_reader_refuses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 link: str) -> None:
    name, target = link.split(" -> ")
    tar = tar_bytes([member(name, tarfile.SYMTYPE, link=target),
                     member(f"{name}/passwd", data=b"root:x:0:0\n")])
    reason = _reader_verdict(tar, monkeypatch)
    assert reason == f"{name!r} is used as a directory but is not one"
    (tmp_path / "layer.tar").write_bytes(tar)
    proc, _ = lazymount("convert", "-q", str(tmp_path / "layer.tar"), str(tmp_path / "out.esgz"))
    assert one_line_error(proc) == f"lazymount: error: {reason}"
    assert not (tmp_path / "out.esgz").exists()


def test_deep_path_converts_and_reads_back(tmp_path: Path) -> None:
    name = "/".join(["d"] * 1500) + "/leaf"
    (tmp_path / "layer.tar").write_bytes(tar_bytes([member(name, data=b"deep\n")]))
    proc, _ = lazymount("convert", "-q", str(tmp_path / "layer.tar"), str(tmp_path / "out.esgz"))
    assert proc.returncode == 0, proc.stderr
    proc, _ = lazymount("inspect", "--json", str(tmp_path / "out.esgz"))
    counts = json.loads(proc.stdout)[0]["entries"]
    assert counts["reg"] == 1 and counts["dir"] == 1 + 1500, counts  # the root, then d, d/d, ...
    config = tmp_path / "config.yaml"
    config.write_text("limits:\n  path_depth: 1000\n")
    proc, _ = lazymount("convert", "-q", "--config", str(config), str(tmp_path / "layer.tar"),
                        str(tmp_path / "deeper.esgz"))
    assert "1501 levels deep, over 1000 (limits.path_depth)" in one_line_error(proc)
    proc, _ = lazymount("inspect", "--config", str(config), str(tmp_path / "out.esgz"))
    assert "1501 levels deep, over 1000 (limits.path_depth)" in one_line_error(proc)


# ------------------------------------------------------------------------------------- property tests

PROPERTY = settings(max_examples=int(os.environ.get("BOUNDED_EXAMPLES", "25")), deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
NAMES = st.sampled_from(["a", "b", "c", "lib", "x.py", "ü", "sp ace"])


@st.composite
def valid_trees(draw: st.DrawFn) -> list[tuple]:
    """Tar members of a valid layer: unique paths under directories, hardlinks to earlier files of one
    chunk (the reference reader, estargz 0.12, finds no chunk past the first under a hardlink's name)."""
    members: list[tuple] = []
    dirs, files, linkable = [""], [], []
    for _ in range(draw(st.integers(1, 25))):
        parent = draw(st.sampled_from(dirs))
        path = f"{parent}/{draw(NAMES)}".lstrip("/")
        if path in dirs or path in files:
            continue
        kind = draw(st.sampled_from(["dir", "reg", "reg", "symlink", "hardlink"]))
        if kind == "dir":
            members.append(member(path, tarfile.DIRTYPE))
            dirs.append(path)
        elif kind == "reg":
            size = draw(st.sampled_from([0, 1, 100, 5000, 70_000]))
            members.append(member(path, data=draw(st.binary(min_size=size, max_size=size))))
            files.append(path)
            if size <= 4096:
                linkable.append(path)
        elif kind == "symlink":
            members.append(member(path, tarfile.SYMTYPE, link=draw(st.sampled_from(["../x", "/etc", "a/b"]))))
            files.append(path)
            linkable.append(path)
        elif linkable:
            members.append(member(path, tarfile.LNKTYPE, link=draw(st.sampled_from(linkable))))
            files.append(path)
    return members


@PROPERTY
@given(tree=valid_trees(), chunk_size=st.sampled_from([4096, 65536]))
def test_random_valid_layers_are_read_by_both_readers(tmp_path: Path, estargz_verifier: Path,
                                                      tree: list[tuple], chunk_size: int) -> None:
    out = io.BytesIO()
    info = layerwriter.write_layer(io.BytesIO(tar_bytes(tree)), out, chunk_size=chunk_size, workers=1)
    blob = out.getvalue()
    index = tocread.read_index(lambda o, n: blob[o:o + n], len(blob), info.toc_digest)
    path = tmp_path / "blob"
    path.write_bytes(blob)
    seen = verify_with_reference(estargz_verifier, path, info.toc_digest)
    theirs = {p.strip("/") for p in seen} - {"", toc.PREFETCH_LANDMARK, toc.NO_PREFETCH_LANDMARK}
    assert {p for p, _ in index.walk()} == theirs


HOSTILE_NAMES = st.sampled_from(["a", "a/b", "./a/b", "a/../b", "/abs", "a//b", "s", "s/x", "d", "d/e/f",
                                 ".prefetch.landmark", "l" * 300, "/".join(["n"] * 60)])


@st.composite
def hostile_tars(draw: st.DrawFn) -> bytes:
    members = []
    for _ in range(draw(st.integers(1, 8))):
        name = draw(HOSTILE_NAMES)
        kind = draw(st.sampled_from([tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE]))
        link = draw(HOSTILE_NAMES) if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE) else ""
        members.append(member(name, kind, data=b"x" * draw(st.integers(0, 3)), link=link))
    return tar_bytes(members)


@PROPERTY
@given(tar=hostile_tars())
def test_convert_and_reader_agree_on_hostile_tars(tar: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    limits = toc.Limits(path_length=200, path_depth=50)
    blob, reason = _convert(tar, limits)
    assert (None if blob is not None else reason) == _reader_verdict(tar, monkeypatch, limits)


def test_reference_verifier_refuses_garbage(tmp_path: Path, estargz_verifier: Path) -> None:
    """The Go reader is a real judge: it refuses a blob whose TOC digest is wrong."""
    blob, _ = _convert(tar_bytes([member("f", data=b"x")]))
    assert blob is not None
    (tmp_path / "blob").write_bytes(blob)
    with pytest.raises(ToolError):
        verify_with_reference(estargz_verifier, tmp_path / "blob", toc.sha256_digest(b"other"))


def _index_summary(blob: bytes) -> object:
    try:
        index = tocread.read_index(lambda o, n: blob[o:o + n], len(blob))
    except toc.LazymountError as e:
        return str(e)
    return [(path, index.entry(i)) for path, i in index.walk()]


@PROPERTY
@given(tar=hostile_tars())
def test_compact_path_table_means_what_the_dict_means(tar: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    """Past _Files.SMALL paths the builder keeps them in typed arrays: the index (or the error) is the
    same as with a dict alone, duplicates, hardlinks and files used as directories included."""
    with monkeypatch.context() as m:
        m.setattr(layerwriter.Index, "from_entries", classmethod(lambda cls, *a, **k: None))
        blob, _ = _convert(tar)
    if blob is None:
        return
    expected = _index_summary(blob)
    monkeypatch.setattr(toc._Files, "SMALL", 1)
    assert _index_summary(blob) == expected
