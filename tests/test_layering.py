"""The module layering, checked over the source with `ast` (run by `make lint` and by `make test`).

Layers, from the bottom: the format (toc, then tocread, layerwriter and seekindex), the machinery (config,
regclient, fetch, cache, tree, engine, convert), the adapters (mountctl, fusefs, layerfs, sandbox on the
FUSE side; snapshot_store, snapshot_layers, snapshot_grpc on the gRPC side) and the command line
(lazymount), which alone may import everything and which nothing imports.
"""

from __future__ import annotations

import ast
import configparser
from collections.abc import Iterable, Mapping
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
GENERATED = frozenset({"snapshots_pb2", "snapshots_pb2_grpc", "mount_pb2"})
FUSE_SIDE = frozenset({"mfusepy", "mountctl", "fusefs", "layerfs", "sandbox", "tree", "engine", "localcopy"})
GRPC_SIDE = frozenset({"grpc", "grpc_health", "snapshot_grpc", "snapshot_store", "snapshot_layers",
                       *GENERATED})
REGISTRY_CLIENT = ("config", "transport", "regclient", "fetch", "referrers", "download", "profiles")
# (importer, what it must not import, why)
RULES: list[tuple[str, frozenset[str], str]] = [
    ("cache", frozenset({"fetch", "regclient"}), "the cache is handed a loader, never the registry client"),
    *((m, FUSE_SIDE | GRPC_SIDE, "the registry client knows no FUSE and no gRPC") for m in REGISTRY_CLIENT),
    *((m, GRPC_SIDE, "the FUSE side never imports the gRPC side") for m in FUSE_SIDE),
    ("tree", frozenset({"engine", "cache", "fetch", "regclient"}), "the merged tree knows no reads"),
    ("localcopy", frozenset({"engine", "cache", "fetch", "regclient", "download", "mfusepy"}),
     "the local copy is handed verified chunks: it never reads a layer"),
    ("seekindex", FUSE_SIDE | GRPC_SIDE | frozenset({"cache", "fetch", "regclient"}),
     "a seek index is a format: it is handed reads, never a registry, the cache, FUSE or gRPC"),
]
FORBIDDEN_CALLS = ("importlib", "sys.modules", "sys.path")


def project_modules() -> list[str]:
    """The hand-written top-level modules setup.cfg installs."""
    parser = configparser.ConfigParser()
    parser.read(REPO / "setup.cfg")
    names = parser["options"]["py_modules"].split()
    return [name for name in names if name not in GENERATED]


def imports_of(source: str) -> set[str]:
    """Top-level names of every module `source` imports, at any depth (function-level imports count)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


def import_graph(modules: Iterable[str]) -> dict[str, set[str]]:
    """{module: the modules (project or not) it imports}, read from REPO/<module>.py."""
    return {name: imports_of((REPO / f"{name}.py").read_text()) for name in modules}


def violations(graph: Mapping[str, set[str]]) -> list[str]:
    """Every broken layering rule in `graph`, one line each; empty when the layering holds."""
    project = set(graph)
    found = []
    if graph.get("toc", set()) & project:
        found.append(f"toc imports {sorted(graph['toc'] & project)}: the format imports no project module")
    for name, imported in graph.items():
        if "lazymount" in imported and name != "lazymount":
            found.append(f"{name} imports lazymount: nothing imports the command line")
        if "imagebuild" in imported:
            found.append(f"{name} imports imagebuild: test and benchmark images stay out of the product")
    for importer, forbidden, why in RULES:
        bad = graph.get(importer, set()) & forbidden
        if bad:
            found.append(f"{importer} imports {sorted(bad)}: {why}")
    found += [f"import cycle: {' -> '.join(cycle)}" for cycle in _cycles(graph)]
    return found


def _cycles(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """One cycle through each module that can reach itself over project imports."""
    project = set(graph)
    cycles = []
    for start in sorted(project):
        stack, seen = [(start, [start])], set()
        while stack:
            name, path = stack.pop()
            for nxt in sorted(graph[name] & project):
                if nxt == start:
                    cycles.append([*path, start])
                    stack.clear()
                    break
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, [*path, nxt]))
    return cycles


def test_the_layering_holds() -> None:
    assert violations(import_graph(project_modules())) == []


def test_no_import_machinery_tricks() -> None:
    """Modules import each other plainly: no importlib, no edits of sys.modules or sys.path."""
    offenders = []
    for name in project_modules():
        text = (REPO / f"{name}.py").read_text()
        offenders += [f"{name}: {trick}" for trick in FORBIDDEN_CALLS if trick in text]
    assert offenders == []


def test_the_check_catches_a_forbidden_import() -> None:
    """The checker is not vacuous: each kind of forbidden import added to the real graph is reported."""
    graph = import_graph(project_modules())
    for importer, imported, expected in [("toc", "cache", "toc imports ['cache']"),
                                         ("cache", "fetch", "cache imports ['fetch']"),
                                         ("fetch", "mfusepy", "fetch imports ['mfusepy']"),
                                         ("fusefs", "snapshot_grpc", "fusefs imports ['snapshot_grpc']"),
                                         ("convert", "lazymount", "convert imports lazymount"),
                                         ("engine", "imagebuild", "engine imports imagebuild"),
                                         ("toc", "toc", "import cycle: toc -> toc")]:
        broken = {name: set(imports) for name, imports in graph.items()}
        broken[importer].add(imported)
        assert any(line.startswith(expected) for line in violations(broken)), (importer, imported)
