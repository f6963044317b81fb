"""The merged overlay tree of an image's layers: names, inode numbers and attributes, never file data.

What belongs here: applying OCI overlay rules to the layers' TOC indexes (upper wins, `.wh.NAME`
whiteouts, `.wh..wh..opq` opaque directories, implied directories keeping a lower layer's metadata),
hardlink groups (st_nlink, one inode), the inode table (root = ROOT_INO, stable numbers: the same path
gets the same inode in every tree built from the same layers), `stat`-like attributes, modes, xattrs and
symlink targets; a raw view of one layer as an overlayfs lower directory.
What never does: file data, blobs, the chunk cache or any fetching (engine.py reads files; the tree is
built from `toc.Index` objects alone), FUSE or any kernel interface (lazymount.py), TOC parsing (toc.py).
"""

from __future__ import annotations

import os
import stat
import threading
from collections.abc import Iterator, Sequence

import toc

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
ROOT_INO = 1
BLOCK_SIZE = 4096  # st_blksize and statfs block size
_KIND_MODE = {toc.KIND_DIR: stat.S_IFDIR, toc.KIND_REG: stat.S_IFREG, toc.KIND_SYMLINK: stat.S_IFLNK,
              toc.KIND_CHAR: stat.S_IFCHR, toc.KIND_BLOCK: stat.S_IFBLK, toc.KIND_FIFO: stat.S_IFIFO}


class Node:
    """One name in the merged tree.  A directory has `sources`, the (layer, entry) pairs it merges from
    top to bottom; any other node has exactly one source.

    Directories are kept in the tree once merged.  Other names are kept in their directory's `children`
    as one int, `layer << 32 | entry`, and get a Node, made afresh, whenever they are looked up: a find
    over 100k files kept ~310 bytes per name as Nodes, ~60 as ints (the dict slot included).
    """

    __slots__ = ("ino", "parent", "name", "layer", "entry", "sources", "children", "closed")

    def __init__(self, ino: int, parent: Node | None, name: str, layer: int, entry: int) -> None:
        self.ino, self.parent, self.name = ino, parent, name
        self.layer, self.entry = layer, entry
        self.sources: list[tuple[int, int]] | None = [(layer, entry)]  # None once merged if only one
        self.children: dict[str, Node | int] | None = None  # a directory's, once merged
        self.closed = False  # no lower layer merges into this directory (opaque, or a non-dir below)

    @property
    def path(self) -> str:
        parts = []
        node: Node | None = self
        while node is not None and node.parent is not None:
            parts.append(node.name)
            node = node.parent
        return "/" + "/".join(reversed(parts))


class MergedTree:
    """The overlay of the layers' indexes (bottom first).  Directories are merged when first looked into;
    a node's `layer` is the position of its index in `indexes`.

    `raw=True` shows one layer as an overlayfs lower directory instead: whiteouts become 0:0 character
    devices and opaque directories carry the `opaque_xattr` xattr.
    """

    def __init__(self, indexes: Sequence[toc.Index], raw: bool = False,
                 opaque_xattr: str = "trusted.overlay.opaque") -> None:
        self.indexes = list(indexes)
        self.raw, self.opaque_xattr = raw, opaque_xattr
        self._lock = threading.RLock()
        self._group_nlink: dict[tuple[int, int], int] = {}
        self._members: dict[int, dict[int, list[int]]] = {}
        self._ino_base = []
        base = ROOT_INO + 1
        for layer in range(len(self.indexes)):
            self._ino_base.append(base)
            base += len(self.indexes[layer])
        top = len(self.indexes) - 1
        self.root = Node(ROOT_INO, None, "", top, toc.Index.ROOT)
        self.root.sources = []
        for layer in range(top, -1, -1):
            self.root.sources.append((layer, toc.Index.ROOT))
            if self.indexes[layer].lookup_child(toc.Index.ROOT, OPAQUE_MARKER) is not None:
                break
        self.root.layer, self.root.entry = self._metadata_source(self.root)
        self.nodes = 1

    # -- lookups ------------------------------------------------------------------------------------

    def lookup(self, path: str) -> Node | None:
        """The node at `path` ('/' or '' for the root), or None."""
        node = self.root
        for part in path.split("/"):
            if not part:
                continue
            if not self.is_dir(node):
                return None
            child = self._merged(node).get(part)
            if child is None:
                return None
            node = child if isinstance(child, Node) else self._leaf(node, part, child)
        return node

    def is_dir(self, node: Node) -> bool:
        """Whether the node is a directory (a raw whiteout never is)."""
        return self.indexes[node.layer].kind(node.entry) == toc.KIND_DIR and not self._is_raw_whiteout(node)

    def children(self, node: Node) -> Iterator[tuple[str, Node]]:
        """A directory's merged children, (name, node) sorted by name (merged on first call)."""
        for name, child in self._merged(node).items():
            yield name, child if isinstance(child, Node) else self._leaf(node, name, child)

    def _merged(self, node: Node) -> dict[str, Node | int]:
        """A directory's children by name: Nodes for directories, packed ints for the rest."""
        children = node.children
        if children is None:
            with self._lock:
                if node.children is None:
                    node.children = self._merge(node)
                children = node.children
        return children

    def _leaf(self, parent: Node, name: str, packed: int) -> Node:
        layer, entry = packed >> 32, packed & 0xFFFFFFFF
        return Node(self._ino(layer, entry), parent, name, layer, entry)

    def _new_node(self, parent: Node, name: str, layer: int, entry: int) -> Node:
        """A node; its inode number is set once its metadata source is known (end of `_merge`)."""
        node = Node(0, parent, name, layer, entry)
        self.nodes += 1
        index = self.indexes[layer]
        if index.kind(entry) == toc.KIND_DIR and index.lookup_child(entry, OPAQUE_MARKER) is not None:
            node.closed = True
        return node

    def _ino(self, layer: int, entry: int) -> int:
        """Inode number from the (layer, entry) a node takes its metadata from: the same in every mount
        of the image, unique (one path per entry), shared by a hardlink group (its target entry), and
        small (entries of the layers below, plus the entry), so 32-bit programs can stat it too."""
        target = self.indexes[layer].hardlink_target(entry)
        return self._ino_base[layer] + (target if target is not None else entry)

    def _merge(self, node: Node) -> dict[str, Node | int]:
        """Apply the overlay rules to the directory's sources, top layer first."""
        merged: dict[str, Node] = {}
        hidden: set[str] = set()
        # a closed directory with no entry of its own above: the lower directory entry it takes its
        # metadata from (not its children), None once a lower non-directory ends the search
        below: dict[str, tuple[int, int] | None] = {}
        for layer, entry in node.sources or [(node.layer, node.entry)]:
            index = self.indexes[layer]
            whiteouts = set()
            for name, child in index.children(entry):
                if name.startswith(WHITEOUT_PREFIX):
                    if self.raw and name != OPAQUE_MARKER:
                        shown = name[len(WHITEOUT_PREFIX):]
                        merged[shown] = self._new_node(node, shown, layer, child)
                    elif name != OPAQUE_MARKER:
                        whiteouts.add(name[len(WHITEOUT_PREFIX):])
                    continue
                if name in hidden or (self.raw and name in merged):
                    continue
                upper = merged.get(name)
                if upper is None:
                    merged[name] = self._new_node(node, name, layer, child)
                elif not upper.closed and self.is_dir(upper):
                    if index.kind(child) == toc.KIND_DIR:
                        upper.sources.append((layer, child))
                        upper.closed = index.lookup_child(child, OPAQUE_MARKER) is not None
                    else:
                        upper.closed = True  # a lower non-directory ends the merge below it
                        below[name] = None
                elif self.is_dir(upper) and name not in below and self._implied(upper):
                    if index.kind(child) != toc.KIND_DIR:
                        below[name] = None
                    elif not index.is_implicit(child):
                        below[name] = (layer, child)
            hidden |= whiteouts
        children: dict[str, Node | int] = {}
        for name, child in sorted(merged.items()):
            if self.is_dir(child):
                child.layer, child.entry = self._metadata_source(child)
                if below.get(name) and self._implied(child):
                    child.layer, child.entry = below[name]  # an opaque directory only implied above
                child.ino = self._ino(child.layer, child.entry)
                if len(child.sources) == 1 and child.sources[0] == (child.layer, child.entry):
                    child.sources = None  # its one source is (layer, entry)
                children[name] = child
            else:
                children[name] = child.layer << 32 | child.entry
        return children

    def _metadata_source(self, node: Node) -> tuple[int, int]:
        """The topmost source with an entry of its own: an implied directory keeps lower metadata."""
        sources = node.sources or [(node.layer, node.entry)]
        for layer, entry in sources:
            if not self.indexes[layer].is_implicit(entry):
                return layer, entry
        return sources[0]

    def _implied(self, node: Node) -> bool:
        """Whether no source of the directory has an entry of its own."""
        return all(self.indexes[layer].is_implicit(entry) for layer, entry in node.sources or ())

    def _is_raw_whiteout(self, node: Node) -> bool:
        return self.raw and self.indexes[node.layer].names[node.entry].startswith(WHITEOUT_PREFIX)

    # -- attributes ---------------------------------------------------------------------------------

    def entry(self, node: Node) -> toc.Entry:
        """The TOC entry the node takes its metadata from."""
        return self.indexes[node.layer].entry(node.entry)

    def mode(self, node: Node) -> int:
        """st_mode: type bits and permissions."""
        if self._is_raw_whiteout(node):
            return stat.S_IFCHR
        e = self.entry(node)
        return _KIND_MODE[e.kind] | _permissions(e)

    def attrs(self, node: Node) -> dict[str, int]:
        """The `stat` of a node (times in nanoseconds, st_blocks in the kernel's 512-byte units)."""
        e = self.entry(node)
        size = e.size if e.kind == toc.KIND_REG else 0
        if e.kind == toc.KIND_SYMLINK:
            size = len(os.fsencode(e.link_name))
        if self._is_raw_whiteout(node):
            mode, rdev = stat.S_IFCHR, 0
        else:  # as mode() tells, without decoding the entry again
            mode = _KIND_MODE[e.kind] | _permissions(e)
            rdev = os.makedev(e.dev_major, e.dev_minor) if e.kind in (toc.KIND_CHAR, toc.KIND_BLOCK) else 0
        mtime = e.mtime * 1_000_000_000
        return {"st_ino": node.ino, "st_mode": mode, "st_nlink": self.nlink(node),
                "st_uid": e.uid, "st_gid": e.gid, "st_size": size, "st_blocks": (size + 511) // 512,
                "st_blksize": BLOCK_SIZE, "st_rdev": rdev, "st_mtime": mtime, "st_atime": mtime,
                "st_ctime": mtime}

    def nlink(self, node: Node) -> int:
        """2 + subdirectories for a directory; the visible names of a hardlink group; else 1."""
        if self.is_dir(node):
            return 2 + sum(1 for child in self._merged(node).values() if isinstance(child, Node))
        index = self.indexes[node.layer]
        target = index.hardlink_target(node.entry)
        key = (node.layer, target if target is not None else node.entry)
        if target is None and not self._members_of(node.layer).get(node.entry):
            return 1
        if key not in self._group_nlink:
            names = [key[1], *self._members_of(node.layer)[key[1]]]
            visible = sum(1 for entry in names if (path := entry_path(index, entry)) is not None
                          and self._resolves_to(key, path))
            self._group_nlink[key] = max(visible, 1)
        return self._group_nlink[key]

    def _members_of(self, layer: int) -> dict[int, list[int]]:
        """Hardlink groups of a layer: target entry -> the entries linking to it (built once)."""
        members = self._members.get(layer)
        if members is None:
            index, members = self.indexes[layer], {}
            for entry in range(len(index)):
                target = index.hardlink_target(entry)
                if target is not None:
                    members.setdefault(target, []).append(entry)
            self._members[layer] = members
        return members

    def _resolves_to(self, key: tuple[int, int], path: str) -> bool:
        node = self.lookup(path)
        if node is None or node.layer != key[0]:
            return False
        target = self.indexes[node.layer].hardlink_target(node.entry)
        return (target if target is not None else node.entry) == key[1]

    def xattrs(self, node: Node) -> dict[str, bytes]:
        """The node's extended attributes (plus the opaque marker in a raw layer view)."""
        xattrs = self.entry(node).xattrs
        if self.raw and node.closed and self.is_dir(node):
            xattrs = {**xattrs, self.opaque_xattr: b"y"}
        return xattrs

    def readlink(self, node: Node) -> str:
        """A symlink's target, verbatim (never followed here)."""
        return self.entry(node).link_name


def _permissions(e: toc.Entry) -> int:
    """An entry's permission bits; a symlink's are 0777 whatever its tar header says, as on Linux."""
    return 0o777 if e.kind == toc.KIND_SYMLINK else e.mode


def entry_path(index: toc.Index, entry: int) -> str | None:
    """The path of `entry` in its layer, relative to the layer's root (no leading slash); None if a later
    entry of the same name (or of a directory above it) replaced it."""
    parts = []
    while entry != toc.Index.ROOT:
        if index.replaced(entry):
            return None
        parts.append(index.names[entry])
        entry = index.parent(entry)
    return "/".join(reversed(parts))
