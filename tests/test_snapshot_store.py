"""snapshot_store.py: containerd's filter syntax and the SQLite metadata, without a daemon.

The snapshotter semantics seen through gRPC (containerd's test suite) are in test_snapshotter.py; here are
the corners that suite does not reach: quoting and parse errors of filters, transactions that roll back,
ids never reused, the schema version guard.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from snapshot_store import (
    ACTIVE,
    COMMITTED,
    VIEW,
    AlreadyExistsError,
    Info,
    InvalidArgumentError,
    MetaStore,
    NotFoundError,
    SnapshotError,
    check_labels,
    parse_filters,
)

INFOS = [
    Info("a", "p", ACTIVE, 0, 0, {"containerd.io/gc.root": "x", "l": "2"}),
    Info("p", "", COMMITTED, 0, 0, {}),
    Info("v.1", "p", VIEW, 0, 0, {"with space": "a b", "dotted.key": "v"}),
]


def matching(*filters: str) -> list[str]:
    match = parse_filters(list(filters))
    return [i.name for i in INFOS if match(i)]


@pytest.mark.parametrize(("filters", "names"), [
    ((), ["a", "p", "v.1"]),
    (("",), ["a", "p", "v.1"]),  # containerd: an empty filter matches everything
    (("kind==committed",), ["p"]),
    (("kind==view", "name==a"), ["a", "v.1"]),  # filters of one request are alternatives
    (("kind==active,labels.l==2",), ["a"]),  # selectors of one filter must all match
    (("labels.l!=2",), ["p", "v.1"]),  # an absent label is "" for !=
    (('parent!=""',), ["a", "v.1"]),
    (("labels",), []),  # `labels` alone looks up the label "": nothing matches, as in containerd
    (('labels."with space"=="a b"',), ["v.1"]),
    (('labels."dotted.key"==v',), ["v.1"]),
    (("labels.dotted.key==v",), ["v.1"]),  # the adaptor joins the rest of the path with dots
    (("name==v.1",), ["v.1"]),  # an unquoted value runs to the next ',' or space
    ((r'name~=/^[ap]$/',), ["a", "p"]),
    (("name~=|v\\.|",), ["v.1"]),
    (('name~="^p"',), ["p"]),
    (("name~=/(/",), []),  # an invalid regular expression matches nothing, as in containerd
    ((" kind == active",), ["a"]),  # space before tokens is skipped (after the last one it is an error)
])
def test_filters(filters: tuple[str, ...], names: list[str]) -> None:
    assert matching(*filters) == names


@pytest.mark.parametrize("text", ["name==/p/", "name==", "==p", "name=p", "name==a b", 'name=="open',
                                  "labels.", "name==a,", "name==a "])
def test_filter_parse_errors(text: str) -> None:
    with pytest.raises(InvalidArgumentError, match="filters: parse error"):
        parse_filters([text])


def test_labels_limit() -> None:
    assert check_labels({"k": "v" * 4095}) == {"k": "v" * 4095}
    with pytest.raises(InvalidArgumentError):
        check_labels({"k": "v" * 4096})


def test_store_commit_keeps_id_and_ids_are_not_reused(tmp_path: Path) -> None:
    store = MetaStore(tmp_path / "metadata.db")
    with store.transaction() as db:
        first = store.create(db, ACTIVE, "a", "", {"l": "1"})
        store.commit(db, "a", "c", (4096, 1), {"m": "2", "empty": ""})
        sid, info, usage = store.get(db, "c")
        assert (sid, info.kind, info.labels, usage) == (first.id, COMMITTED, {"m": "2"}, (4096, 1))
        child = store.create(db, VIEW, "v", "c", {})
        assert child.parent_ids == (first.id,)
        store.remove(db, "v")
        again = store.create(db, VIEW, "v", "c", {})
        assert again.id > child.id
        with pytest.raises(AlreadyExistsError):
            store.create(db, ACTIVE, "v", "", {})
    store.close()


def test_store_transaction_rolls_back(tmp_path: Path) -> None:
    store = MetaStore(tmp_path / "metadata.db")
    with pytest.raises(RuntimeError), store.transaction() as db:
        store.create(db, ACTIVE, "a", "", {"l": "1"})
        raise RuntimeError("crash between the row and the directory")
    with store.transaction() as db, pytest.raises(NotFoundError):
        store.get(db, "a")
    store.close()


def test_store_refuses_a_newer_schema(tmp_path: Path) -> None:
    path = tmp_path / "metadata.db"
    MetaStore(path).close()
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA user_version = 99")
    with pytest.raises(SnapshotError, match="schema 99"):
        MetaStore(path)
