"""Shared pytest wiring: the CI no-skip rule and session fixtures for the reference tools.

What belongs here: hooks and fixtures every test module may use (a private containerd, the Go eStargz
verifier, the edge-case tree). Helpers with logic live in tests/reference.py and imagebuild.py;
tests live in test_*.py.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from imagebuild import make_edge_tree
from tests.reference import ESTARGZ_GO_PACKAGE, Containerd, build_verifier
from tests.registry import Registry


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Under CI=true a skipped test fails the run: every component is installed there."""
    if os.environ.get("CI") != "true":
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter is not None else []
    if not skipped:
        return
    session.exitstatus = pytest.ExitCode.TESTS_FAILED
    if reporter is not None:
        reporter.write("\n")
        reporter.write_sep("!", f"CI=true: {len(skipped)} test(s) skipped; a skip under CI hides a failure",
                           red=True)
        for report in skipped:
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
            reporter.write_line(f"  {report.nodeid}: {reason}", red=True)


@pytest.fixture(scope="session")
def containerd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Containerd]:
    """A private containerd 1.6 (own config, root, state and socket; namespace lazymount-test).

    Yields a reference.Containerd: `.address`, `.namespace`, `.ctr(*args)`, `.ctr_remote(*args)`.
    """
    missing = [tool for tool in ("containerd", "ctr", "ctr-remote") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)} (Debian packages containerd, stargz-snapshotter)")
    # A short base path: the socket path must fit in sun_path (108 bytes).
    daemon = Containerd(tmp_path_factory.mktemp("ctd"))
    daemon.start()
    try:
        yield daemon
    finally:
        daemon.stop()


@pytest.fixture(scope="session")
def estargz_verifier(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Path of tests/interop/verify.go built once against Debian's estargz Go package."""
    if shutil.which("go") is None or not ESTARGZ_GO_PACKAGE.is_dir():
        pytest.skip("needs the Debian packages golang-go and golang-github-containerd-stargz-snapshotter-dev")
    return build_verifier(tmp_path_factory.mktemp("estargz-verify"))


@pytest.fixture(scope="session")
def edge_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tree of imagebuild.make_edge_tree, shared by the session: copy it before changing it."""
    return make_edge_tree(tmp_path_factory.mktemp("edge") / "tree")


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """Debian's docker-registry (anonymous, plain HTTP) on a free 127.0.0.1 port, for one test module."""
    reg = Registry(tmp_path_factory.mktemp("registry")).start()
    try:
        yield reg
    finally:
        reg.close()
