"""Snapshot metadata for the snapshotter: keys, parents, kinds, labels, timestamps and usage in SQLite.

What belongs here: the schema (versioned with `PRAGMA user_version`) and every query, containerd's
snapshot storage semantics (a committed snapshot keeps its active snapshot's id; a parent is removed only
after its children; an empty label value deletes the label), containerd's filter syntax for List, and
the snapshot errors with the gRPC status each one maps to.  What never does: directories or mounts
(snapshot_grpc.Snapshotter), gRPC itself, FUSE or registries.
"""

from __future__ import annotations

import ast
import contextlib
import logging
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import toc

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
MAX_LABEL_BYTES = 4096  # containerd: a label's key and value together
REMOTE_LABEL = "containerd.io/snapshot/remote"  # marks a snapshot that is a lazily mounted layer

# The values of containerd.services.snapshots.v1.Kind (and of Go's snapshots.Kind).
VIEW, ACTIVE, COMMITTED = 1, 2, 3
_KIND_NAMES = {VIEW: "view", ACTIVE: "active", COMMITTED: "committed"}


# ---------------------------------------------------------------------------------------------- errors


class SnapshotError(toc.LazymountError):
    """A snapshot operation failed; `status` names the gRPC status code containerd maps back to its
    errdefs (the adapter, snapshot_grpc.py, turns it into a grpc.StatusCode)."""

    status = "UNKNOWN"


class NotFoundError(SnapshotError):
    status = "NOT_FOUND"


class AlreadyExistsError(SnapshotError):
    status = "ALREADY_EXISTS"


class InvalidArgumentError(SnapshotError):
    status = "INVALID_ARGUMENT"


class FailedPreconditionError(SnapshotError):
    status = "FAILED_PRECONDITION"


class UnavailableError(SnapshotError):
    status = "UNAVAILABLE"


# --------------------------------------------------------------------------------------------- filters
# containerd's filter syntax (containerd/filters): selectors joined by ',' must all match, the filters
# of one request are alternatives.  selector := fieldpath [("==" | "!=" | "~=") value];
# fieldpath := field ("." field)*; a field is [A-Za-z0-9_]+ or a quoted string; a value is quoted or runs
# to the next ',' or space.  Quotes are '"' (Go string syntax) and, for "~=" values only, '/' and '|'.

_QUOTES = '"/|'
_OPERATORS = ("==", "!=", "~=")
_FIELD_RE = re.compile(r"[A-Za-z0-9_]+")


@dataclass(frozen=True)
class _Selector:
    fieldpath: tuple[str, ...]
    operator: str  # "" tests presence
    value: str = ""

    def match(self, fields: Callable[[tuple[str, ...]], str | None]) -> bool:
        value = fields(self.fieldpath)
        if self.operator == "":
            return value is not None
        if self.operator == "==":
            return value is not None and value == self.value
        if self.operator == "!=":
            return (value or "") != self.value
        try:
            return re.search(self.value, value or "") is not None
        except re.error:
            log.warning("filter: invalid regular expression %r matches nothing", self.value)
            return False


class _FilterScanner:
    """Tokens of one filter string, as containerd's scanner cuts them."""

    def __init__(self, text: str) -> None:
        self.text, self.pos, self.after_operator = text, 0, False

    def error(self, message: str) -> InvalidArgumentError:
        return InvalidArgumentError(f"filters: parse error: [{self.text}] at {self.pos}: {message}")

    def peek(self) -> str:
        """The next raw character ('' at the end)."""
        return self.text[self.pos:self.pos + 1]

    def scan(self) -> tuple[str, str]:
        """(kind, text): kind is eof, quoted, separator, operator, value or field."""
        text = self.text
        while self.pos < len(text) and text[self.pos].isspace():
            self.pos += 1
        if self.pos >= len(text):
            return "eof", ""
        start, ch = self.pos, text[self.pos]
        if ch in _QUOTES:
            end = start + 1
            while end < len(text) and text[end] != ch:
                if text[end] == "\n":
                    break
                end += 2 if text[end] == "\\" else 1
            if end >= len(text) or text[end] != ch:
                raise self.error("quoted literal not terminated")
            self.pos = end + 1
            return "quoted", text[start:self.pos]
        if ch in ",.":
            self.pos += 1
            self.after_operator = False
            return "separator", ch
        if ch in "=!~":
            while self.pos < len(text) and text[self.pos] in "=!~":
                self.pos += 1
            self.after_operator = True
            return "operator", text[start:self.pos]
        if self.after_operator:
            while self.pos < len(text) and text[self.pos] != "," and not text[self.pos].isspace():
                self.pos += 1
            self.after_operator = False
            return "value", text[start:self.pos]
        match = _FIELD_RE.match(text, start)
        if match is None:
            raise self.error(f"unexpected input {ch!r}")
        self.pos = match.end()
        return "field", match.group()


def _unquote(scanner: _FilterScanner, quoted: str, alternative_quotes: bool) -> str:
    quote = quoted[0]
    if quote != '"':
        if not alternative_quotes:
            raise scanner.error("invalid quote encountered")
        return quoted[1:-1].replace("\\" + quote, quote)
    try:
        value = ast.literal_eval(quoted)
    except (ValueError, SyntaxError):
        raise scanner.error(f"unquoting {quoted!r} failed") from None
    if not isinstance(value, str):
        raise scanner.error(f"unquoting {quoted!r} failed")
    return value


def _parse_filter(text: str) -> list[_Selector]:
    scanner = _FilterScanner(text)
    selectors = []
    while True:
        path = []
        while True:
            kind, token = scanner.scan()
            if kind == "field":
                path.append(token)
            elif kind == "quoted":
                path.append(_unquote(scanner, token, False))
            else:
                raise scanner.error("expected field or quoted")
            if scanner.peek() != ".":
                break
            scanner.scan()
        if scanner.peek() in (",", ""):
            selectors.append(_Selector(tuple(path), ""))
        else:
            kind, operator = scanner.scan()
            if kind != "operator" or operator not in _OPERATORS:
                raise scanner.error(f'expected an operator ("=="|"!="|"~="), not {operator!r}')
            kind, token = scanner.scan()
            if kind in ("value", "field"):
                value = token
            elif kind == "quoted":
                value = _unquote(scanner, token, operator == "~=")
            else:
                raise scanner.error("expected value or quoted")
            selectors.append(_Selector(tuple(path), operator, value))
        following = scanner.peek()
        if following == "":
            return selectors
        if following != ",":
            raise scanner.error(f"unexpected input {following!r}")
        scanner.scan()


def parse_filters(filters: Sequence[str]) -> Callable[[Info], bool]:
    """A predicate true for an Info matching any of `filters` (all Infos when there are none or '')."""
    alternatives = [_parse_filter(f) for f in filters if f]
    if len(alternatives) < len(filters) or not alternatives:
        return lambda info: True
    return lambda info: any(all(s.match(info.field) for s in selectors) for selectors in alternatives)


# -------------------------------------------------------------------------------------------- metadata


@dataclass
class Info:
    """What Stat answers of a snapshot (times in nanoseconds since the epoch)."""

    name: str
    parent: str
    kind: int
    created: int
    updated: int
    labels: dict[str, str] = field(default_factory=dict)

    def field(self, path: tuple[str, ...]) -> str | None:
        """The filter adaptor of containerd's snapshot storage: kind, name, parent and labels.KEY."""
        head = path[0] if path else ""
        if head == "kind":
            return _KIND_NAMES.get(self.kind)
        if head == "name":
            return self.name
        if head == "parent":
            return self.parent
        if head == "labels" and self.labels:
            return self.labels.get(".".join(path[1:]))
        return None


@dataclass(frozen=True)
class Snapshot:
    """A snapshot's directory id, kind, and the ids of its parents, nearest first."""

    id: int
    kind: int
    parent_ids: tuple[int, ...]


_SCHEMA = """
CREATE TABLE IF NOT EXISTS snapshots (
    id INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused: it names the directory snapshots/ID
    name TEXT NOT NULL UNIQUE,             -- the key of an active or view snapshot, or a committed name
    parent_id INTEGER REFERENCES snapshots(id) ON DELETE RESTRICT,  -- a committed snapshot
    kind INTEGER NOT NULL,                 -- snapshots_pb2.Kind
    created INTEGER NOT NULL,              -- nanoseconds since the epoch, UTC
    updated INTEGER NOT NULL,
    size INTEGER NOT NULL DEFAULT 0,       -- usage, recorded on commit
    inodes INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS snapshots_parent ON snapshots(parent_id);
CREATE TABLE IF NOT EXISTS labels (
    snapshot_id INTEGER NOT NULL REFERENCES snapshots(id) ON DELETE CASCADE,
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (snapshot_id, key)
);
"""


class MetaStore:
    """Snapshot metadata in one SQLite file; every change happens inside `transaction()`."""

    def __init__(self, path: Path) -> None:
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._lock = threading.RLock()
        with self._lock:
            self._db.execute("PRAGMA foreign_keys = ON")
            self._db.execute("PRAGMA journal_mode = WAL")
            self._db.execute("PRAGMA synchronous = FULL")
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, SCHEMA_VERSION):
                raise SnapshotError(f"{path}: metadata schema {version}, this version reads {SCHEMA_VERSION}")
            self._db.executescript(_SCHEMA)
            self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """Serialized; commits when the block ends normally, rolls back when it raises."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- reads (inside a transaction) --------------------------------------------------------------

    def _row(self, db: sqlite3.Connection, name: str) -> tuple:
        row = db.execute("SELECT s.id, s.name, p.name, s.kind, s.created, s.updated, s.size, s.inodes "
                         "FROM snapshots s LEFT JOIN snapshots p ON p.id = s.parent_id WHERE s.name = ?",
                         (name,)).fetchone()
        if row is None:
            raise NotFoundError(f"snapshot {name}: not found")
        return row

    def _labels(self, db: sqlite3.Connection, snapshot_id: int) -> dict[str, str]:
        return dict(db.execute("SELECT key, value FROM labels WHERE snapshot_id = ?", (snapshot_id,)))

    def get(self, db: sqlite3.Connection, name: str) -> tuple[int, Info, tuple[int, int]]:
        """(id, info, (size, inodes)) of the snapshot called `name`."""
        sid, name, parent, kind, created, updated, size, inodes = self._row(db, name)
        return sid, Info(name, parent or "", kind, created, updated, self._labels(db, sid)), (size, inodes)

    def walk(self, db: sqlite3.Connection) -> Iterator[Info]:
        labels: dict[int, dict[str, str]] = {}
        for sid, key, value in db.execute("SELECT snapshot_id, key, value FROM labels"):
            labels.setdefault(sid, {})[key] = value
        rows = db.execute("SELECT s.id, s.name, p.name, s.kind, s.created, s.updated FROM snapshots s "
                          "LEFT JOIN snapshots p ON p.id = s.parent_id ORDER BY s.name").fetchall()
        for sid, name, parent, kind, created, updated in rows:
            yield Info(name, parent or "", kind, created, updated, labels.get(sid, {}))

    def parent_ids(self, db: sqlite3.Connection, snapshot_id: int) -> tuple[int, ...]:
        """The ids of a snapshot's parents, nearest first."""
        rows = db.execute("WITH RECURSIVE chain(id, depth) AS ("
                          " SELECT parent_id, 1 FROM snapshots WHERE id = ? AND parent_id IS NOT NULL"
                          " UNION ALL SELECT s.parent_id, chain.depth + 1 FROM snapshots s JOIN chain"
                          " ON s.id = chain.id WHERE s.parent_id IS NOT NULL)"
                          " SELECT id FROM chain ORDER BY depth", (snapshot_id,))
        return tuple(r[0] for r in rows)

    def snapshot(self, db: sqlite3.Connection, name: str) -> Snapshot:
        """An active or view snapshot with its parent chain (what Mounts needs)."""
        sid, _, _, kind, *_ = self._row(db, name)
        if kind not in (ACTIVE, VIEW):
            raise FailedPreconditionError(f"requested snapshot {name} not active or view")
        return Snapshot(sid, kind, self.parent_ids(db, sid))

    def remote_layers(self, db: sqlite3.Connection,
                      ids: Sequence[int] | None = None) -> list[tuple[int, Info]]:
        """(id, info) of the remote snapshots among `ids` (all of them when None)."""
        rows = db.execute("SELECT s.id, s.name FROM snapshots s JOIN labels l ON l.snapshot_id = s.id "
                          "WHERE l.key = ? ORDER BY s.id", (REMOTE_LABEL,)).fetchall()
        wanted = None if ids is None else set(ids)
        return [(sid, self.get(db, name)[1]) for sid, name in rows if wanted is None or sid in wanted]

    def kinds(self, db: sqlite3.Connection) -> dict[int, tuple[str, int]]:
        """{id: (name, kind)} of every snapshot."""
        return {sid: (name, kind) for sid, name, kind in db.execute("SELECT id, name, kind FROM snapshots")}

    # -- writes ------------------------------------------------------------------------------------

    def _put_labels(self, db: sqlite3.Connection, snapshot_id: int, labels: Mapping[str, str]) -> None:
        """Replace the labels; an empty value removes its key (containerd's boltutil.WriteLabels)."""
        db.execute("DELETE FROM labels WHERE snapshot_id = ?", (snapshot_id,))
        db.executemany("INSERT INTO labels (snapshot_id, key, value) VALUES (?, ?, ?)",
                       [(snapshot_id, k, v) for k, v in labels.items() if v])

    def create(self, db: sqlite3.Connection, kind: int, key: str, parent: str,
               labels: Mapping[str, str]) -> Snapshot:
        parent_id = None
        if parent:
            row = db.execute("SELECT id, kind FROM snapshots WHERE name = ?", (parent,)).fetchone()
            if row is None:
                raise NotFoundError(f"missing parent {parent!r} bucket: not found")
            if row[1] != COMMITTED:
                raise InvalidArgumentError(f"parent {parent!r} is not committed snapshot")
            parent_id = row[0]
        if db.execute("SELECT 1 FROM snapshots WHERE name = ?", (key,)).fetchone():
            raise AlreadyExistsError(f"snapshot {key}: already exists")
        now = time.time_ns()
        sid = db.execute("INSERT INTO snapshots (name, parent_id, kind, created, updated) "
                         "VALUES (?, ?, ?, ?, ?)", (key, parent_id, kind, now, now)).lastrowid
        assert sid is not None
        self._put_labels(db, sid, labels)
        return Snapshot(sid, kind, self.parent_ids(db, sid))

    def commit(self, db: sqlite3.Connection, key: str, name: str, usage: tuple[int, int],
               labels: Mapping[str, str]) -> None:
        """Turn the active snapshot `key` into the committed `name` (same id; labels replaced)."""
        if db.execute("SELECT 1 FROM snapshots WHERE name = ?", (name,)).fetchone():
            raise AlreadyExistsError(f"committed snapshot {name}: already exists")
        sid, _, _, kind, *_ = self._row(db, key)
        if kind != ACTIVE:
            raise FailedPreconditionError(f"snapshot {key!r} is not active")
        now = time.time_ns()
        db.execute("UPDATE snapshots SET name = ?, kind = ?, created = ?, updated = ?, size = ?, inodes = ? "
                   "WHERE id = ?", (name, COMMITTED, now, now, *usage, sid))
        self._put_labels(db, sid, labels)

    def remove(self, db: sqlite3.Connection, key: str) -> tuple[int, Info]:
        sid, info, _ = self.get(db, key)
        if db.execute("SELECT 1 FROM snapshots WHERE parent_id = ? LIMIT 1", (sid,)).fetchone():
            raise FailedPreconditionError("cannot remove snapshot with child")
        db.execute("DELETE FROM snapshots WHERE id = ?", (sid,))
        return sid, info

    def update(self, db: sqlite3.Connection, info: Info, paths: Sequence[str]) -> Info:
        """Set the labels (all, or those named `labels.KEY` / `labels`) as containerd's storage does."""
        sid, current, _ = self.get(db, info.name)
        labels = dict(current.labels)
        for path in paths:
            if path.startswith("labels."):
                key = path[len("labels."):]
                labels[key] = info.labels.get(key, "")
            elif path == "labels":
                labels = dict(info.labels)
            else:
                raise InvalidArgumentError(f"cannot update {path!r} field on snapshot {info.name!r}")
        if not paths:
            labels = dict(info.labels)
        current.labels, current.updated = {k: v for k, v in labels.items() if v}, time.time_ns()
        db.execute("UPDATE snapshots SET updated = ? WHERE id = ?", (current.updated, sid))
        self._put_labels(db, sid, current.labels)
        return current


def check_labels(labels: Mapping[str, str]) -> dict[str, str]:
    """A copy of labels, refused (InvalidArgumentError) if a key and its value exceed MAX_LABEL_BYTES."""
    for key, value in labels.items():
        if len(key.encode()) + len(value.encode()) > MAX_LABEL_BYTES:
            raise InvalidArgumentError(f"label key and value length (\"{key[:64]}\"...) > {MAX_LABEL_BYTES}")
    return dict(labels)
