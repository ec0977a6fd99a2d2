"""A real single-node SLURM cluster for the tests in this folder.

`slurm_cluster` (session scope) runs start_cluster.sh once (installing the Debian packages on first
use), yields a `SlurmCluster`, and runs stop_cluster.sh at the end of the session, which kills only
the daemons start_cluster.sh started. Set SMIM_SLURM_KEEP=1 to leave the cluster running after the
session (the next start is then ~1 s). SLURM_BASE picks the state folder (default /tmp/smim-slurm).
Needs root; skipped otherwise. Deselect with `-m "not slurm"`.
"""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
START = HERE / "start_cluster.sh"
STOP = HERE / "stop_cluster.sh"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slurm: needs the local SLURM cluster of tests/slurm (root only)")


@pytest.hookimpl(tryfirst=True)  # before `-m` deselection runs
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(item.path).resolve().parents:
            item.add_marker(pytest.mark.slurm)


@dataclass(frozen=True)
class SlurmCluster:
    partition: str   # the only partition ("debug", default)
    base: Path       # state, logs (log/), pid files (run/), generated configs (etc/)
    hostname: str    # the only node
    cred_expire: int  # seconds; also about how long a requeued job waits before it starts again

    @property
    def log_dir(self) -> Path:
        return self.base / "log"

    def sacct(self, job_id: str | int, *fields: str) -> list[list[str]]:
        """`sacct` rows (all steps, all requeued attempts) for a job, each a list of `fields`."""
        fields = fields or ("JobID", "State")
        out = subprocess.run(["sacct", "-n", "-P", "-D", "-j", str(job_id), "-o", ",".join(fields)],
                             capture_output=True, text=True, check=True).stdout
        return [line.split("|") for line in out.splitlines() if line]

    def logs_tail(self, lines: int = 30) -> str:
        """The end of the slurmctld and slurmd logs, for assertion messages."""
        parts = []
        for name in ("slurmctld.log", "slurmd.log"):
            path = self.log_dir / name
            text = path.read_text(errors="replace").splitlines()[-lines:] if path.exists() else ["(missing)"]
            parts.append(f"--- {path}\n" + "\n".join(text))
        return "\n".join(parts)


def _run_script(script: Path, env: dict[str, str], timeout: int) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(script)], env=env, stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    if os.geteuid() != 0:
        pytest.skip("the local SLURM cluster needs root (it installs packages and runs slurmctld/slurmd as root)")
    base = Path(os.environ.get("SLURM_BASE", "/tmp/smim-slurm"))
    cred_expire = int(os.environ.get("SLURM_CRED_EXPIRE", "10"))
    env = {**os.environ, "SLURM_BASE": str(base), "SLURM_CRED_EXPIRE": str(cred_expire)}
    keep = os.environ.get("SMIM_SLURM_KEEP", "") not in ("", "0")
    try:
        proc = _run_script(START, env, timeout=900)
    except subprocess.TimeoutExpired as e:
        _run_script(STOP, env, timeout=120)
        pytest.fail(f"{START} timed out after {e.timeout} s\n{e.stdout or ''}\n{e.stderr or ''}", pytrace=False)
    if proc.returncode != 0:
        stop = _run_script(STOP, env, timeout=120)  # kill whatever it did start
        pytest.fail(f"{START} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}\n"
                    f"--- {STOP}:\n{stop.stdout}{stop.stderr}", pytrace=False)
    try:
        yield SlurmCluster(partition="debug", base=base, hostname=socket.gethostname().split(".")[0],
                           cred_expire=cred_expire)
    finally:
        if not keep:
            stop = _run_script(STOP, env, timeout=120)
            if stop.returncode != 0:
                print(f"{STOP} exited {stop.returncode}:\n{stop.stdout}{stop.stderr}")


def queued_jobs() -> set[str]:
    """Job ids, an array's once (``%i`` would give a pending array as ``12_[0-1%2]``, which scancel refuses)."""
    return set(subprocess.run(["squeue", "-h", "-o", "%A"], capture_output=True, text=True).stdout.split())


@pytest.fixture(autouse=True)
def cancel_what_the_test_left_queued(slurm_cluster: SlurmCluster) -> Iterator[None]:
    """A test that fails while its job runs would leave the job to the next test's cluster (seen in CI: the next
    test found its queue not empty, and the node busy). The SLURM tests run one at a time (one xdist group)."""
    before = queued_jobs()
    yield
    left = queued_jobs() - before
    if left:
        subprocess.run(["scancel", *sorted(left)], check=False)


@pytest.fixture
def submitit_folder(slurm_cluster: SlurmCluster, tmp_path: Path) -> Path:
    """A fresh submitit folder for one test: job ids restart at 1 whenever the cluster state is wiped,
    so a shared folder could mix up the files of an old and a new job with the same id."""
    folder = tmp_path / "submitit"
    folder.mkdir()
    return folder
