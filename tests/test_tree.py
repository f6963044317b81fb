"""tree.py (the merged overlay tree) and engine.py (the read engine) without FUSE or HTTP.

Layers are written in memory as eStargz blobs from small tar archives; the tree is built from their
indexes alone, and the engine reads them through an in-memory blob source that logs its reads and can
fail or forge its answers: whiteouts and opaque directories over several layers, implied directories,
hardlinks across layers, stable inode numbers, reads across chunk boundaries, read-ahead, and errors
that surface as EIO and never as wrong bytes.
"""

from __future__ import annotations

import errno
import gzip
import io
import logging
import random
import stat
import tarfile
import threading
import time
from pathlib import Path

import pytest

import cache
import engine
import layerwriter
import profiles
import toc
import tocread
import tree

CHUNK = 1024  # small chunks: a file of a few KiB spans several


# -- building layers ----------------------------------------------------------------------------------

Member = tuple[tarfile.TarInfo, bytes]


def file(name: str, data: bytes = b"", mode: int = 0o644, uid: int = 0) -> Member:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.uid, info.mtime = len(data), mode, uid, 1_700_000_000
    return info, data


def directory(name: str, mode: int = 0o755, uid: int = 0) -> Member:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.uid, info.mtime = tarfile.DIRTYPE, mode, uid, 1_600_000_000
    return info, b""


def hardlink(name: str, target: str) -> Member:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = tarfile.LNKTYPE, target
    return info, b""


def symlink(name: str, target: str) -> Member:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = tarfile.SYMTYPE, target
    return info, b""


class Blob:
    """An eStargz blob in memory, read by range: logs every read, can fail or answer forged bytes."""

    def __init__(self, data: bytes, digest: str, toc_digest: str) -> None:
        self.data, self.digest, self.toc_digest = data, digest, toc_digest
        self.size = len(data)
        self.reads: list[tuple[int, int]] = []
        self.error: Exception | None = None  # raised by every read while set
        self.forge: bytes | None = None  # if set: the answer to every read, padded to the length asked
        self._lock = threading.Lock()

    def read_at(self, offset: int, length: int, urgent: bool = False) -> bytes:
        with self._lock:
            self.reads.append((offset, length))
        if self.error is not None:
            raise self.error
        if self.forge is not None:
            return self.forge.ljust(length, b"\0")
        return self.data[offset:offset + length]

    def download(self, path: str | Path) -> None:
        Path(path).write_bytes(self.data)

    def index(self) -> toc.Index:
        return tocread.read_index(self.read_at, self.size, self.toc_digest)


def layer_blob(*members: Member) -> Blob:
    """An eStargz blob (CHUNK-byte chunks) of a tar archive of `members`, in order."""
    tar = io.BytesIO()
    with tarfile.open(fileobj=tar, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for info, data in members:
            archive.addfile(info, io.BytesIO(data) if data else None)
    tar.seek(0)
    out = io.BytesIO()
    info = layerwriter.write_layer(tar, out, chunk_size=CHUNK, workers=1)
    return Blob(out.getvalue(), info.digest, info.toc_digest)


def merged(*blobs: Blob, raw: bool = False) -> tree.MergedTree:
    """The merged tree of `blobs` (bottom first), built from their indexes alone."""
    return tree.MergedTree([blob.index() for blob in blobs], raw=raw)


def listing(t: tree.MergedTree, path: str) -> list[str]:
    node = t.lookup(path)
    assert node is not None and t.is_dir(node), path
    return [name for name, _ in t.children(node)]


def all_paths(t: tree.MergedTree, node: tree.Node | None = None) -> dict[str, int]:
    """Every path of the tree and its inode number."""
    node = node or t.root
    found = {node.path: node.ino}
    if t.is_dir(node):
        for _, child in t.children(node):
            found |= all_paths(t, child)
    return found


def view(*blobs: Blob) -> engine.ImageView:
    """An ImageView over `blobs` (bottom first) with a memory-only cache and no background work."""
    layers = [engine.Layer(blob.digest, blob, blob.toc_digest) for blob in blobs]
    assert all(layer.open_index() for layer in layers)
    return engine.ImageView(layers, cache.ChunkCache(None), Path("/nonexistent"), prefetch=False,
                            background=False)


def read(v: engine.ImageView, path: str, offset: int = 0, size: int = 1 << 20,
         state: engine.ReadState | None = None) -> bytes:
    node = v.tree().lookup(path)
    assert node is not None, path
    return v.read(node, offset, size, state)


def chunked(v: engine.ImageView, path: str) -> tuple[tree.Node, list[toc.Chunk]]:
    """The node of a regular file and its chunks."""
    node = v.tree().lookup(path)
    assert node is not None, path
    index = v.layers[node.layer].index
    assert index is not None
    return node, index.chunks(node.entry)


def wait_for(condition) -> None:
    deadline = time.monotonic() + 30
    while not condition():
        assert time.monotonic() < deadline, "condition never became true"
        time.sleep(0.005)


# -- the merged tree ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def three_layers() -> tuple[Blob, Blob, Blob]:
    """etc/ changed by three layers; a directory whited out and re-created; an opaque directory."""
    bottom = layer_blob(directory("etc"), file("etc/x", b"x0"), file("etc/y", b"y0"), file("etc/z", b"z0"),
                        directory("gone"), file("gone/old", b"old"),
                        directory("opt"), file("opt/a", b"a"), directory("opt/sub"), file("opt/sub/b", b"b"),
                        directory("srv"), file("srv/kept", b"kept"))
    middle = layer_blob(directory("etc"), file("etc/.wh.x"), file("etc/w", b"w1"), file(".wh.gone"),
                        directory("opt"), file("opt/.wh..wh..opq"), file("opt/c", b"c1"))
    top = layer_blob(directory("etc"), file("etc/.wh.w"), file("etc/x", b"x2-new", mode=0o600),
                     directory("gone"), file("gone/new", b"new"), file("srv/.wh.nothing-here"),
                     directory("opt"), file("opt/d", b"d2"))
    return bottom, middle, top


def test_whiteouts_over_three_layers(three_layers: tuple[Blob, Blob, Blob]) -> None:
    t = merged(*three_layers)
    assert listing(t, "/") == ["etc", "gone", "opt", "srv"]
    assert listing(t, "/etc") == ["x", "y", "z"], "w whited out above; x whited out, then re-created"
    x = t.lookup("/etc/x")
    assert x is not None and x.layer == 2 and t.attrs(x)["st_size"] == len(b"x2-new")
    assert t.mode(x) == stat.S_IFREG | 0o600, "the re-created file's metadata, not the bottom one's"
    assert t.lookup("/etc/w") is None and t.lookup("/etc/.wh.w") is None, "whiteouts are never shown"
    assert listing(t, "/gone") == ["new"], "a whited-out directory re-created above starts empty"
    assert t.lookup("/gone/old") is None
    assert listing(t, "/srv") == ["kept"], "a whiteout of a name no layer has hides nothing else"
    # the same layers without the top one: x is gone, w is there
    assert listing(merged(*three_layers[:2]), "/etc") == ["w", "y", "z"]


def test_opaque_directory(three_layers: tuple[Blob, Blob, Blob]) -> None:
    t = merged(*three_layers)
    assert listing(t, "/opt") == ["c", "d"], "nothing below an opaque directory shows through"
    assert t.lookup("/opt/sub/b") is None and t.lookup("/opt/a") is None
    assert t.lookup("/opt/.wh..wh..opq") is None
    assert listing(merged(three_layers[0]), "/opt") == ["a", "sub"]
    assert listing(merged(three_layers[0], three_layers[2]), "/opt") == ["a", "d", "sub"]
    opt = t.lookup("/opt")
    assert opt is not None and t.attrs(opt)["st_nlink"] == 2, "no subdirectory left in it"


def test_raw_layer_view(three_layers: tuple[Blob, Blob, Blob]) -> None:
    """One layer as an overlayfs lower directory: whiteouts are 0:0 character devices, opaque
    directories carry the opaque xattr."""
    t = merged(three_layers[1], raw=True)
    whiteout = t.lookup("/etc/x")
    assert whiteout is not None and stat.S_ISCHR(t.mode(whiteout)) and t.attrs(whiteout)["st_rdev"] == 0
    assert not t.is_dir(t.lookup("/gone"))
    opt, etc = t.lookup("/opt"), t.lookup("/etc")
    assert opt is not None and etc is not None
    assert t.xattrs(opt) == {"trusted.overlay.opaque": b"y"} and t.xattrs(etc) == {}
    assert listing(t, "/opt") == ["c"]


def test_implied_directory_keeps_lower_metadata() -> None:
    lower = layer_blob(directory("usr", mode=0o750, uid=7), directory("usr/lib", mode=0o711, uid=8),
                       file("usr/lib/old", b"old"))
    upper = layer_blob(file("usr/lib/new", b"new"), file("fresh/only", b"f"))  # no directory entries
    t = merged(lower, upper)
    for path, mode, uid in (("/usr", 0o750, 7), ("/usr/lib", 0o711, 8)):
        node = t.lookup(path)
        assert node is not None
        attrs = t.attrs(node)
        assert (attrs["st_mode"], attrs["st_uid"]) == (stat.S_IFDIR | mode, uid), path
        assert attrs["st_mtime"] == 1_600_000_000 * 1_000_000_000, path
    assert listing(t, "/usr/lib") == ["new", "old"], "an implied directory still merges the lower one"
    fresh = t.lookup("/fresh")
    assert fresh is not None and stat.S_ISDIR(t.mode(fresh)), "implied with nothing below: a directory"
    # the upper layer lists a directory of its own: its metadata wins
    t = merged(lower, layer_blob(directory("usr", mode=0o755, uid=0), file("usr/lib/new", b"new")))
    usr = t.lookup("/usr")
    assert usr is not None and t.attrs(usr)["st_uid"] == 0


def test_implied_opaque_directory_keeps_lower_metadata() -> None:
    """A layer holding only whiteouts under a directory (its opaque marker, no entry of its own): the
    directory hides every lower child, yet keeps the metadata of the lower directory, as `umoci unpack`
    does, also through a layer that implies it as well; a lower non-directory lends none."""
    lower = layer_blob(directory("d", mode=0o750, uid=7), file("d/old", b"old"), file("d/keep", b"k"),
                       file("f", b"a file"))
    middle = layer_blob(file("d/mid", b"m"))  # implies d too
    upper = layer_blob(file("d/.wh..wh..opq"), file("d/.wh.keep"), file("f/.wh..wh..opq"))
    for t in (merged(lower, upper), merged(lower, middle, upper)):
        d = t.lookup("/d")
        assert d is not None and listing(t, "/d") == []
        attrs = t.attrs(d)
        assert (attrs["st_mode"], attrs["st_uid"]) == (stat.S_IFDIR | 0o750, 7)
        assert attrs["st_mtime"] == 1_600_000_000 * 1_000_000_000
        f = t.lookup("/f")
        assert f is not None and t.is_dir(f) and t.attrs(f)["st_mtime"] != 1_700_000_000 * 1_000_000_000
    assert listing(merged(lower, layer_blob(file("d/.wh..wh..opq"), file("d/new", b"n"))), "/d") == ["new"]


def test_hardlinks_across_layers() -> None:
    bottom = layer_blob(file("a", b"shared"), hardlink("b", "a"), hardlink("c", "a"), file("solo", b"s"))
    middle = layer_blob(file(".wh.c"))
    top = layer_blob(file("b", b"replaced"))

    def links(t: tree.MergedTree) -> dict[str, tuple[int, int]]:
        found = {}
        for name, node in t.children(t.root):
            attrs = t.attrs(node)
            found[name] = attrs["st_ino"], attrs["st_nlink"]
        return found

    one = links(merged(bottom))
    assert one["a"][0] == one["b"][0] == one["c"][0] != one["solo"][0]
    assert one["a"][1] == one["b"][1] == one["c"][1] == 3 and one["solo"][1] == 1
    two = links(merged(bottom, middle))
    assert "c" not in two and two["a"] == two["b"] == (one["a"][0], 2), "a whited-out name drops out"
    three = links(merged(bottom, middle, top))
    assert three["a"] == (one["a"][0], 1), "b is another file now: a is alone"
    assert three["b"][0] != three["a"][0] and three["b"][1] == 1


def test_hardlink_to_a_name_replaced_later_in_its_layer() -> None:
    """`hz` links to `z`, then a later `z` replaces it (extraction unlinks the first): both names are
    shown, each with its own content, inode and one link (it was an error on every lookup of their
    directory: the replaced entry has no path)."""
    v = view(layer_blob(file("z", b"z1"), hardlink("hz", "z"), file("z", b"z2-later")))
    t = v.tree()
    assert listing(t, "/") == ["hz", "z"]
    hz, z = t.lookup("/hz"), t.lookup("/z")
    assert hz is not None and z is not None
    assert t.attrs(hz)["st_nlink"] == t.attrs(z)["st_nlink"] == 1 and hz.ino != z.ino
    assert read(v, "/hz") == b"z1" and read(v, "/z") == b"z2-later"


def test_inode_numbers_are_stable(three_layers: tuple[Blob, Blob, Blob]) -> None:
    t = merged(*three_layers)
    assert t.root.ino == tree.ROOT_INO
    first, again = t.lookup("/etc/y"), t.lookup("/etc/y")
    assert first is not None and again is not None and first is not again  # leaves are made afresh
    assert first.ino == again.ino
    inodes = all_paths(t)
    assert len(set(inodes.values())) == len(inodes), "one inode per path without hardlinks"
    rebuilt = merged(*three_layers)
    for path in sorted(inodes, reverse=True):  # looked up in another order, deepest first
        node = rebuilt.lookup(path)
        assert node is not None and node.ino == inodes[path], path
    assert all_paths(rebuilt) == inodes


def test_symlink_and_attributes() -> None:
    t = merged(layer_blob(symlink("link", "../target/ä"), file("f", b"12345", mode=0o4755, uid=3)))
    link, f = t.lookup("/link"), t.lookup("/f")
    assert link is not None and f is not None
    assert t.readlink(link) == "../target/ä" and t.mode(link) == stat.S_IFLNK | 0o777, "0777, as on Linux"
    assert t.attrs(link)["st_mode"] == stat.S_IFLNK | 0o777  # the tar header says 0644 (tarfile's default)
    assert t.attrs(link)["st_size"] == len("../target/ä".encode())
    attrs = t.attrs(f)
    assert attrs["st_mode"] == stat.S_IFREG | 0o4755 and attrs["st_uid"] == 3 and attrs["st_size"] == 5
    assert attrs["st_blksize"] == tree.BLOCK_SIZE and attrs["st_blocks"] == 1
    assert t.lookup("/f/below") is None and t.lookup("/missing") is None


# -- the read engine ----------------------------------------------------------------------------------

BIG = random.Random(12).randbytes(20 * CHUNK + 300)  # 21 chunks, the last one short


@pytest.fixture()
def big() -> Blob:
    return layer_blob(directory("data"), file("data/big", BIG), file("data/small", b"small"),
                      file("other", b"o" * 3000))


def test_reads_cross_chunk_boundaries(big: Blob) -> None:
    v = view(big)
    node, chunks = chunked(v, "/data/big")
    assert len(chunks) == 21
    for offset, size in ((0, len(BIG)), (CHUNK - 10, 20), (1000, 3 * CHUNK + 7), (len(BIG) - 5, 100),
                         (5 * CHUNK, CHUNK), (len(BIG), 10)):
        assert v.read(node, offset, size) == BIG[offset:offset + size], (offset, size)
    assert read(v, "/other", 1020, 10) == b"o" * 10
    stats = v.layers[0].stats
    assert stats.chunk_hits > 0 and stats.errors == 0
    assert stats.requests < 21, "after a few misses, a miss's neighbours in the blob come in its request"
    v.close()


def test_upper_layer_data_is_read(three_layers: tuple[Blob, Blob, Blob]) -> None:
    v = view(*three_layers)
    assert read(v, "/etc/x") == b"x2-new" and read(v, "/etc/y") == b"y0" and read(v, "/opt/c") == b"c1"
    v.close()


def test_sequential_reader_gets_read_ahead(big: Blob) -> None:
    v = view(big)
    node, chunks = chunked(v, "/data/big")
    assert v.read(node, 0, CHUNK, engine.ReadState()) == BIG[:CHUNK]
    wait_for(lambda: all(v.cache.contains(c.digest) for c in chunks))
    for c in chunks[1:]:  # fetched ahead of the reader, which asked for the first chunk only
        assert any(o <= c.comp_offset and c.comp_end <= o + n for o, n in big.reads), c
    reads = len(big.reads)
    assert v.read(node, CHUNK, len(BIG)) == BIG[CHUNK:]
    assert len(big.reads) == reads, "the rest of the file is answered from the cache"
    v.close()


def test_random_reader_gets_no_read_ahead(big: Blob) -> None:
    v = view(big)
    node, chunks = chunked(v, "/data/big")
    assert v.read(node, 7 * CHUNK, 10, engine.ReadState()) == BIG[7 * CHUNK:7 * CHUNK + 10]
    assert v.read(node, 2 * CHUNK, 10) == BIG[2 * CHUNK:2 * CHUNK + 10]  # no state: never read ahead
    v.close()  # stops read-ahead threads: anything queued would have shown by now
    cached = [i for i, c in enumerate(chunks) if v.cache.contains(c.digest)]
    assert cached == [2, 7]


def test_background_work_waits_for_reads_to_pause() -> None:
    """ReadActivity.wait_idle (what the background fetch calls before each request) returns at once when
    nothing was read, waits while a read is in flight, and after a read until reads have paused for
    `quiet` seconds, or until stopped."""
    activity, stop = engine.ReadActivity(), threading.Event()
    activity.wait_idle(stop, 3600)  # nothing read yet
    with activity.reading():
        waiter = threading.Thread(target=activity.wait_idle, args=(stop,))
        waiter.start()
        waiter.join(0.2)
        assert waiter.is_alive(), "returned while a read was in flight"
    waiter.join(30)
    assert not waiter.is_alive(), "no pause asked for: returns once the read has finished"
    pausing = threading.Thread(target=activity.wait_idle, args=(stop, 3600))
    pausing.start()
    pausing.join(0.2)
    assert pausing.is_alive(), "returned although the last read finished less than an hour ago"
    stop.set()
    pausing.join(30)
    assert not pausing.is_alive(), "a stop ends the wait"


def test_background_fetch_waits_for_a_busy_reader(big: Blob, tmp_path: Path) -> None:
    """While a read is in flight the background fetch fetches (stages) the whole blob but decompresses and
    stores nothing; once reads pause it stores every chunk and drops the staged bytes."""
    layers = [engine.Layer(big.digest, big, big.toc_digest)]
    assert layers[0].open_index()
    v = engine.ImageView(layers, cache.ChunkCache(None), tmp_path, prefetch=False)
    _, chunks = chunked(v, "/data/big")
    big.reads.clear()  # the index's
    with v.activity.reading():
        v.start()
        wait_for(lambda: v.layers[0].stats.background_bytes >= chunks[-1].comp_end - chunks[0].comp_offset)
        assert not any(v.cache.contains(c.digest) for c in chunks)
    wait_for(lambda: v.fetch_state == "done")
    assert all(v.cache.contains(c.digest) for c in chunks) and v.layers[0].staged is None
    assert len(big.reads) == v.layers[0].stats.requests < len(chunks)  # a few large ranges
    v.close()


@pytest.mark.parametrize("error", [OSError(errno.ECONNRESET, "connection reset"),
                                   toc.LazymountError("registry answered 500")])
def test_failing_source_is_eio(big: Blob, error: Exception) -> None:
    v = view(big)
    big.error = error
    with pytest.raises(OSError) as raised:
        read(v, "/data/big", 0, 10)
    assert raised.value.errno == errno.EIO
    assert v.layers[0].stats.errors == 1
    big.error = None
    assert read(v, "/data/big", 0, 10) == BIG[:10], "a failure is not remembered as data"
    v.close()


def test_corrupt_chunk_is_eio_never_wrong_bytes(big: Blob, caplog: pytest.LogCaptureFixture) -> None:
    v = view(big)
    node, (chunk, *_) = chunked(v, "/other")
    # valid gzip of other bytes of the right length: it decompresses, only the digest check catches it
    big.forge = gzip.compress(b"x" * chunk.size)
    with caplog.at_level(logging.ERROR, logger="engine"), pytest.raises(OSError) as raised:
        v.read(node, 0, 10)
    assert raised.value.errno == errno.EIO
    assert "failed verification" in caplog.text
    assert not v.cache.contains(chunk.digest)
    big.forge = b"\x1f\x8b not gzip at all"
    with pytest.raises(OSError) as raised:
        v.read(node, 0, 10)
    assert raised.value.errno == errno.EIO
    big.forge = None
    assert v.read(node, 0, 10) == b"o" * 10
    assert v.layers[0].stats.errors == 2
    v.close()


def test_stats_and_access_log(big: Blob, tmp_path: Path) -> None:
    layers = [engine.Layer(big.digest, big, big.toc_digest)]
    assert layers[0].open_index()
    recorder = profiles.AccessRecorder(tmp_path / "access.log")
    v = engine.ImageView(layers, cache.ChunkCache(None), tmp_path, prefetch=False, background=False,
                         recorder=recorder)
    for path in ("/data/small", "/other", "/data/small"):
        node = v.tree().lookup(path)
        assert node is not None
        v.opened(node)
    assert read(v, "/data/small") == b"small"
    v.close()
    assert profiles.read_access_log(tmp_path / "access.log") == {big.digest: ["data/small", "other"]}
    stats = v.stats()
    assert stats["layers"][0]["state"] == "lazy" and stats["totals"]["bytes_served"] == 5
    assert stats["layers"][0]["index_bytes"] > 0 and stats["fetch_state"] == "off"
