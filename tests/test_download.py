"""Whole-blob downloads by concurrent range requests (download.py) from docker-registry, and the plain
layers of engine.Layer.localize that use them.

Every byte comes from the real registry through fetch.RegistryBlobReader; a thin wrapper around it counts
the range reads in flight, holds one back, breaks or corrupts one, to show concurrency, streaming and
failure handling.
"""

from __future__ import annotations

import errno
import hashlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import download
import engine
import fetch
import regclient
import seekindex
import toc
from tests.registry import Registry, TestImage, make_test_image, push_layout

SIZE = 6_000_000  # incompressible: a 6 MB gzip layer, six 1 MiB parts


Pushed = tuple[TestImage, fetch.Image]


@pytest.fixture(scope="module")
def pushed(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pushed]:
    image = make_test_image(tmp_path_factory.mktemp("download"), seed=21, payload_size=SIZE)
    push_layout(image.layout, image.tag, registry, "download")
    client = regclient.RegistryClient()
    yield image, fetch.open_image(f"{registry.host}/download:{image.tag}", client=client)
    client.close()


class Source:
    """A layer's RegistryBlobReader, counting reads in flight; `hook(offset, data)` may delay, fail or
    change a part."""

    def __init__(self, reader: fetch.BlobReader, hook: Callable[[int, bytes], bytes] | None = None) -> None:
        self.reader, self.size, self.hook = reader, reader.size, hook
        self.lock = threading.Lock()
        self.in_flight = self.most_in_flight = self.calls = 0

    def read_at(self, offset: int, length: int) -> bytes:
        with self.lock:
            self.in_flight += 1
            self.calls += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            time.sleep(0.05)  # a far registry: every request takes a while
            data = self.reader.read_at(offset, length)
            return self.hook(offset, data) if self.hook else data
        finally:
            with self.lock:
                self.in_flight -= 1


def _digest_of_stream(blob: download.RangedDownload) -> str:
    with blob.stream() as stream:
        return toc.sha256_digest(stream.read())


def test_concurrent_ranges_streamed_in_order_and_verified(pushed: Pushed,
                                                          tmp_path: Path) -> None:
    """Six 1 MiB parts, four in flight; the consumer reads the first bytes while the last part is held
    back (so it got them before the download ended); file and stream are the blob, verified."""
    image, opened = pushed
    first_read = threading.Event()
    held_back = []

    def hold_last(offset: int, data: bytes) -> bytes:
        if offset + len(data) == len(image.layer):
            held_back.append(first_read.wait(30))
        return data

    def consume(blob: download.RangedDownload) -> str:
        with blob.stream() as stream:
            head = stream.read(1000)
            first_read.set()
            return toc.sha256_digest(head + stream.read())

    source = Source(opened.blob(image.layer_digest), hold_last)
    counted: list[int] = []
    path = tmp_path / "blob"
    got = download.whole_blob(source, image.layer_digest, path, consume, on_bytes=counted.append)
    assert got == image.layer_digest and path.read_bytes() == image.layer
    assert held_back == [True]  # the consumer had its bytes while the download was still running
    assert source.calls == len(counted) == -(-len(image.layer) // download.MIN_PART)
    assert sum(counted) == len(image.layer)
    assert source.most_in_flight == download.DOWNLOAD_CONNECTIONS
    assert [p.name for p in tmp_path.iterdir()] == ["blob"]


@pytest.mark.parametrize("fault", ["corrupt", "fail"])
def test_a_bad_part_fails_the_download_and_its_stream(pushed: Pushed, tmp_path: Path,
                                                      fault: str) -> None:
    """A flipped byte in one part fails the digest check; a part that cannot be fetched fails the
    download with its error.  Either way the consumer's stream ends in EIO (or the consumer's result is
    never returned), no file is left behind, and nothing lands at the path."""
    image, opened = pushed

    def hook(offset: int, data: bytes) -> bytes:
        if offset == 2 * download.MIN_PART:
            if fault == "fail":
                raise regclient.RegistryError("r", "p", "blob", "HTTP 500 (after 4 attempts)")
            return data[:100] + bytes([data[100] ^ 1]) + data[101:]
        return data

    seen: list[BaseException] = []

    def consume(blob: download.RangedDownload) -> str:
        try:
            return _digest_of_stream(blob)
        except OSError as e:
            seen.append(e)
            raise

    expected = toc.DigestError if fault == "corrupt" else regclient.RegistryError
    with pytest.raises(expected):
        download.whole_blob(Source(opened.blob(image.layer_digest), hook), image.layer_digest,
                            tmp_path / "blob", consume)
    assert list(tmp_path.iterdir()) == []
    if fault == "fail":  # the stream stopped before the missing part
        assert [e.errno for e in seen] == [errno.EIO]


def test_read_at_waits_for_its_bytes(pushed: Pushed, tmp_path: Path) -> None:
    """A consumer reading the blob as a file (`read_at`, as an index builder would) gets each range as
    soon as it has arrived, in any order."""
    image, opened = pushed
    ranges = [(5_500_000, 400_000), (0, 10), (1_000_000, 2_500_000), (len(image.layer) - 5, 100)]
    got = download.whole_blob(Source(opened.blob(image.layer_digest)), image.layer_digest, tmp_path / "blob",
                              lambda blob: [blob.read_at(offset, length) for offset, length in ranges])
    assert got == [image.layer[offset:offset + length] for offset, length in ranges]


def test_a_plain_layer_is_downloaded_by_concurrent_ranges(pushed: Pushed, tmp_path: Path) -> None:
    """engine.Layer.localize of a gzip layer: the blob comes in parallel range requests, then the layer is
    served from the downloaded blob through the seek index built from it (kept in the cache directory), not
    converted."""
    image, opened = pushed
    source = Source(opened.blob(image.layer_digest))
    layer = engine.Layer(image.layer_digest, source)
    layer.localize(tmp_path, cache_dir=tmp_path / "cache")
    assert layer.state == "local" and layer.index is not None and layer.spans is not None
    assert source.calls == -(-len(image.layer) // download.MIN_PART)
    assert source.most_in_flight == download.DOWNLOAD_CONNECTIONS
    assert layer.stats.bytes_fetched == len(image.layer)
    assert list((tmp_path / "converted").iterdir()) == []
    assert [p.name for p in (tmp_path / "blobs").iterdir()] == [image.layer_digest[7:]]
    assert seekindex.index_path(tmp_path / "cache", image.layer_digest).is_file()
    assert isinstance(layer.blob, download.FileBlob)
    hello = layer.index.chunks(layer.index.lookup("hello.txt"))[0]
    data = layer.spans.chunk(hello)[0]
    assert data == b"hello from lazymount\n" and hashlib.sha256(data).hexdigest() == hello.digest[7:]


def test_a_plain_layer_is_indexed_while_it_downloads(pushed: Pushed, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The seek index of a plain layer is built from the bytes as they arrive: the last part of the blob is
    held back until the index builder has read the first ones, so a localize that indexed only after the
    download would fail here."""
    image, opened = pushed
    read_early = threading.Event()
    build_and_keep = seekindex.build_and_keep

    def spying(read_at: Callable[[int, int], bytes], *args: object) -> seekindex.SeekIndex | None:
        def reading(offset: int, length: int) -> bytes:
            data = read_at(offset, length)
            read_early.set()
            return data
        return build_and_keep(reading, *args)  # type: ignore[arg-type]

    def hold_last(offset: int, data: bytes) -> bytes:
        if offset + len(data) == len(image.layer) and not read_early.wait(60):
            raise OSError(errno.EIO, "the index builder read nothing while the blob was downloading")
        return data

    monkeypatch.setattr(seekindex, "build_and_keep", spying)
    layer = engine.Layer(image.layer_digest, Source(opened.blob(image.layer_digest), hold_last))
    layer.localize(tmp_path, cache_dir=tmp_path / "cache")
    assert layer.state == "local" and layer.spans is not None
    assert seekindex.index_path(tmp_path / "cache", image.layer_digest).is_file()


def test_staged_ranges_wait_for_bytes_on_their_way_and_free_them(tmp_path: Path) -> None:
    """A read of bytes in a range being fetched waits for them (or for the fetch to be abandoned); a
    dropped range frees its disk blocks and reads as absent; a closed one releases its waiters."""
    staged = download.StagedRanges(tmp_path)
    data = bytes(range(256)) * 4096  # 1 MiB
    staged.fetching(0, len(data))
    got: list[bytes | None] = []
    reader = threading.Thread(target=lambda: got.append(staged.read(1000, 10, wait=600)))
    reader.start()
    reader.join(0.2)
    assert reader.is_alive(), "returned before the range arrived"
    staged.put(0, data, [])
    reader.join(30)
    assert got == [data[1000:1010]]
    assert staged.read(len(data) - 5, 10) is None  # partly outside what is staged
    staged.fetching(1 << 30, (1 << 30) + 100)
    reader = threading.Thread(target=lambda: got.append(staged.read((1 << 30) + 1, 10, wait=600)))
    reader.start()
    staged.abandon(1 << 30)
    reader.join(30)
    assert got[-1] is None and not reader.is_alive()
    assert staged.drop(0) == len(data) and staged.read(1000, 10) is None
    assert os.fstat(staged._file.fileno()).st_blocks * 512 < len(data)  # the hole is punched
    staged.fetching(0, 10)
    reader = threading.Thread(target=lambda: got.append(staged.read(0, 10, wait=600)))
    reader.start()
    staged.close()
    reader.join(30)
    assert got[-1] is None and not reader.is_alive()
