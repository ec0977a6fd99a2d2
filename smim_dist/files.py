"""Files that a crash, a full disk or a kill cannot leave half written: the new content replaces the old in one step."""

from __future__ import annotations

import os
import shutil
import socket
from collections.abc import Callable
from pathlib import Path


def replace_atomically(path: Path, write: Callable[[Path], object]) -> None:
    """``write`` fills a temporary sibling of ``path`` (named for its process, so concurrent writers never share one),
    which reaches the disk and then replaces ``path`` in one rename: readers see the old content or the new."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{socket.gethostname()}-{os.getpid()}")
    write(tmp)
    with tmp.open("rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def write_atomic(path: Path, text: str) -> None:
    replace_atomically(path, lambda tmp: tmp.write_text(text))


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
