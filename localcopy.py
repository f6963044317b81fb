"""A local copy of some files of a merged tree: `run` puts it, on an overlay, above the mount.

What belongs here: writing files of a tree.MergedTree into a local directory without ever writing
outside it (every directory on the way made here and opened without following links, every file created
exclusively), chunk by chunk on every core, then the image's modes, mtimes (and, as root, owners) on the
files and the directories leading to them.  What never does: where a chunk's bytes come from, or their
verification (the caller hands verified chunks: engine.ImageView), mounting anything (sandbox.py).
"""

from __future__ import annotations

import collections
import concurrent.futures
import errno
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import toc
import tree

OPEN_FILES = 256  # files held open while their chunks are written

ChunkBytes = Callable[[tree.Node, toc.Chunk], bytes]  # one chunk's verified bytes


File = tuple[str, tree.Node, list[toc.Chunk]]  # relative path, node of the merged tree, the file's chunks


def write(merged: tree.MergedTree, root: Path, files: Sequence[File], chunk_bytes: ChunkBytes,
          workers: int) -> int:
    """Write `files` (each once, in the order given: the order their chunks are asked for) under the
    empty directory `root`, then their directories' metadata; the bytes
    written.  `workers` threads get and write chunks (more than the cores if `chunk_bytes` may wait for
    bytes on their way).  Raises OSError or toc.LazymountError (a chunk that cannot be had): the copy is
    then incomplete and must not be used."""
    return _Copy(merged, root, chunk_bytes, workers).write(files)


class _Copy:
    """One copy (see `write`): names come from the validated index; at most OPEN_FILES files are open at
    once."""

    def __init__(self, merged: tree.MergedTree, root: Path, chunk_bytes: ChunkBytes, workers: int) -> None:
        self.merged, self.root, self.chunk_bytes = merged, root, chunk_bytes
        self.workers = workers
        self.as_root = os.geteuid() == 0  # then owners are the image's too

    def write(self, files: Sequence[File]) -> int:
        """Write `files` in that order, then their directories' metadata; the bytes written."""
        root_fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        made: dict[str, tree.Node] = {"": self.merged.root}
        stack: list[tuple[str, int]] = [("", root_fd)]  # the open directories down to the current one
        pending: collections.deque[tuple[int, tree.Node, list[concurrent.futures.Future]]] = \
            collections.deque()
        size = 0
        with concurrent.futures.ThreadPoolExecutor(self.workers, "local-copy") as pool:
            try:
                for path, node, chunks in files:
                    parent, _, name = path.rpartition("/")
                    while not _under(parent, stack[-1][0]):
                        os.close(stack.pop()[1])
                    below = parent[len(stack[-1][0]):].strip("/")
                    for part in below.split("/") if below else []:
                        at = f"{stack[-1][0]}/{part}".lstrip("/")
                        if at not in made:
                            os.mkdir(part, 0o700, dir_fd=stack[-1][1])
                            made[at] = self.merged.lookup(at)
                        stack.append((at, os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW |
                                                  os.O_CLOEXEC, dir_fd=stack[-1][1])))
                    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                                 0o600, dir_fd=stack[-1][1])
                    entry = self.merged.entry(node)
                    os.ftruncate(fd, entry.size)
                    pending.append((fd, node, [pool.submit(self._chunk, node, c, fd) for c in chunks]))
                    size += entry.size
                    while len(pending) > OPEN_FILES:
                        self._finish(*pending.popleft())
                while pending:
                    self._finish(*pending.popleft())
            finally:
                for fd, _, futures in pending:
                    for future in futures:
                        future.cancel()
                    concurrent.futures.wait(futures)
                    os.close(fd)
                for _, fd in stack[1:]:
                    os.close(fd)
        try:  # deepest first: a directory's own mode may forbid what is done below it
            for path in sorted(made, key=lambda p: -p.count("/") - bool(p)):
                fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                             dir_fd=root_fd) if path else root_fd
                try:
                    self._set_metadata(fd, made[path])
                finally:
                    if fd != root_fd:
                        os.close(fd)
        finally:
            os.close(root_fd)
        return size

    def _chunk(self, node: tree.Node, c: toc.Chunk, fd: int) -> None:
        data = self.chunk_bytes(node, c)
        if os.pwrite(fd, data, c.file_offset) != len(data):
            raise OSError(errno.EIO, f"short write to the local copy of {node.path}")

    def _finish(self, fd: int, node: tree.Node, futures: list[concurrent.futures.Future]) -> None:
        """Once a file's chunks are written: its metadata, then close it (also on failure)."""
        try:
            for future in futures:
                future.result()
            self._set_metadata(fd, node)
        finally:
            os.close(fd)

    def _set_metadata(self, fd: int, node: tree.Node | None) -> None:
        if node is None:  # cannot be: every directory on a file's way is in the tree
            raise OSError(errno.ENOENT, "directory not in the tree")
        entry = self.merged.entry(node)
        if self.as_root:
            os.fchown(fd, entry.uid, entry.gid)  # before the mode: it clears set-id bits
        os.fchmod(fd, entry.mode & 0o7777)
        os.utime(fd, ns=(entry.mtime * 1_000_000_000,) * 2)


def _under(path: str, directory: str) -> bool:
    """Whether relative `path` is `directory` or below it ('' is the root)."""
    return not directory or path == directory or path.startswith(directory + "/")
