"""An unprivileged user for tests and benchmarks that run lazymount as a normal user.

What belongs here: creating (and afterwards removing) a system user, a home directory it owns, and
/dev/fuse opened to it meanwhile (0600 on these machines; the mode is restored).  What never does:
running lazymount (tests/test_run.py, bench/), assertions.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def fuse_user(name: str, home_parent: Path) -> Iterator[tuple[pwd.struct_passwd, Path]]:
    """The system user `name` (created if absent, and then removed afterwards) and a fresh home directory
    it owns under `home_parent`, removed afterwards; the user may open /dev/fuse meanwhile.  Needs root."""
    created = subprocess.run(["id", name], capture_output=True).returncode != 0
    if created:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
                       check=True)
    entry = pwd.getpwnam(name)
    fuse_mode = stat.S_IMODE(os.stat("/dev/fuse").st_mode)
    home = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=home_parent))
    try:
        os.chown(home, entry.pw_uid, entry.pw_gid)
        os.chmod("/dev/fuse", 0o666)
        yield entry, home
    finally:
        os.chmod("/dev/fuse", fuse_mode)
        shutil.rmtree(home, ignore_errors=True)
        if created:
            subprocess.run(["userdel", name], check=False)
