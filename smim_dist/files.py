"""Files that a crash, a full disk or a kill cannot leave half written: the new content replaces the old in one step."""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path


def write_atomic(path: Path, text: str) -> None:
    """Readers see the old content or the new, never a part; the new is on disk before it replaces the old."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def private_name(prefix: str) -> str:
    """A temporary's name that says which process on which host writes it, so a later run can tell an abandoned one
    (its writer was killed) from one still being written."""
    return f"{prefix}{socket.gethostname()}-{os.getpid()}"


def remove_abandoned(folder: Path, prefix: str) -> None:
    """Temporaries named by ``private_name(prefix)`` in ``folder`` whose writer, on this host, is gone."""
    mine = f"{prefix}{socket.gethostname()}-"
    for path in Path(folder).glob(f"{mine}*"):
        pid = path.name.removeprefix(mine).split("-")[0]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
