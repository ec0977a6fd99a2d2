"""One training at a time in a run directory: rank 0 holds an exclusive lock on ``<run>/train.lock`` for the run's
life, and a second training of the same directory is refused with the holder's host and pid.

The lock is a POSIX record lock (``fcntl.lockf``): the kernel, or the NFS lock manager, releases it when the holder
dies however it dies, and it works across the nodes of the shared file systems clusters use. Such a lock also goes
when its process closes any descriptor of the file, so the holder reads and writes it through its one descriptor.
Where a file system keeps such locks per node only (Lustre mounted with ``localflock``), the file's content is a
lease as well: the holder rewrites its host, pid and a timestamp every ``HEARTBEAT_SECONDS``, a new holder that
finds a live lease of another process waits for it to go stale, and refuses the run directory if it does not.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import threading
import time
from pathlib import Path

from smim_dist.config import ConfigError

LOCK_FILE = "train.lock"
HEARTBEAT_SECONDS = 20.0
STALE_AFTER = 3 * HEARTBEAT_SECONDS


class RunLock:
    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_FILE
        self.fd: int | None = None
        self.stop = threading.Event()

    def acquire(self, stale_after: float = STALE_AFTER) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise ConfigError(f"{self.path.parent} is being trained by {describe(read_holder(self.path))}; one "
                              "training writes a run directory at a time: wait for it or stop it (it checkpoints "
                              "on SIGTERM), then run this again") from None
        self.fd = fd
        self._wait_for_a_live_lease(stale_after)
        self._write()
        threading.Thread(target=self._beat, name="run-lock-heartbeat", daemon=True).start()
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        self.stop.set()
        os.ftruncate(self.fd, 0)
        os.close(self.fd)  # closing releases the lock
        self.fd = None

    def _holder(self) -> dict | None:
        return parse_holder(os.pread(self.fd, 4096, 0))

    def _wait_for_a_live_lease(self, stale_after: float) -> None:
        """A lease another process renews although this one holds the lock: the file system does not share locks
        between nodes. Wait while the lease may still go stale; refuse if it is renewed."""
        holder = self._holder()
        if not holder or not _is_other_process(holder):
            return
        deadline = time.time() + stale_after
        while time.time() < deadline:
            if time.time() - holder["heartbeat"] > stale_after:
                return
            time.sleep(min(1.0, HEARTBEAT_SECONDS / 4))
            renewed = self._holder()
            if renewed and renewed["heartbeat"] > holder["heartbeat"]:
                self.release()
                raise ConfigError(f"{self.path.parent} is being trained by {describe(renewed)} (its lease is "
                                  "renewed; this file system does not share locks between nodes)")
        return

    def _write(self) -> None:
        record = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(), "heartbeat": time.time()}
        previous = self._holder()
        if previous and not _is_other_process(previous):
            record["started"] = previous.get("started", record["started"])
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, (json.dumps(record) + "\n").encode(), 0)
        self.record = record

    def _beat(self) -> None:
        while not self.stop.wait(HEARTBEAT_SECONDS):
            if self.fd is None:
                return
            record = {**self.record, "heartbeat": time.time()}
            os.pwrite(self.fd, (json.dumps(record) + "\n").encode(), 0)


def check_free(run_dir: Path) -> None:
    """A launcher's pre-flight: refuse at once, before starting any process, a run directory a training holds."""
    path = Path(run_dir) / LOCK_FILE
    if not path.exists():
        return
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        raise ConfigError(f"{run_dir} is being trained by {describe(read_holder(path))}; one training writes a run "
                          "directory at a time: wait for it or stop it (it checkpoints on SIGTERM)") from None
    finally:
        os.close(fd)


def read_holder(path: Path) -> dict | None:
    """The holder a lock file names, read by another process (in the holder, a read would release its lock)."""
    try:
        return parse_holder(path.read_bytes())
    except OSError:
        return None


def parse_holder(content: bytes) -> dict | None:
    try:
        holder = json.loads(content)
    except ValueError:
        return None
    return holder if isinstance(holder, dict) and {"host", "pid", "heartbeat"} <= set(holder) else None


def _is_other_process(holder: dict) -> bool:
    """Another process that may be alive: on this host only a running pid that is not this one."""
    if holder["host"] != socket.gethostname():
        return True
    return holder["pid"] != os.getpid() and Path(f"/proc/{holder['pid']}").exists()


def describe(holder: dict | None) -> str:
    if not holder:
        return "another process (its lock file names none)"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", holder["heartbeat"])))
    return f"pid {holder['pid']} on {holder['host']} (since {since})"
