"""A tests' training-rank server: ranks forked from this process, which has imported torch, DeepSpeed, timm, FFCV
and wandb once, so a multi-rank run of the tests does not pay those imports again in each rank (about 10 s of CPU
per rank on the 2-core CI machine). Each rank joins its gloo group from the variables torchrun would give it and runs
``smim-train``'s main, with the faults of tests/faults.py. The launchers themselves (torchrun's agent,
``launchers/local.py``, SLURM) start their ranks as users do in the tests that are about them.

One JSON request per line on stdin, ``{"nproc", "argv", "stdout", "stderr"}`` (``argv``: fault flags, then
smim-train's), answered by one line, ``{"codes": [exit status of each rank]}``. tests/conftest.py starts one per
pytest process; it ends when its stdin closes.
"""

import json
import os
import signal
import socket
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import wandb  # noqa: E402
from wandb.sdk.launch.inputs import internal  # noqa: E402,F401  (every wandb.init imports it)

from faults import injected  # noqa: E402
from smim_dist import train  # noqa: E402
from smim_dist.data import ffcv_loader  # noqa: E402,F401  (FFCV's own import compiles numba code)

FAILED_PEERS_GRACE_S = 60
"""how long the other ranks get to notice a failed one and end, before they are killed (torchrun's behaviour)"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_rank(rank: int, nproc: int, port: int, request: dict) -> None:
    """In the forked child: never returns."""
    code = 1
    try:
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
            os.dup2(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT), fd)
        torch.set_num_threads(1)
        with injected(request["argv"]) as train_args:
            code = train.main(train_args)
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        wandb.teardown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def serve() -> None:
    for line in sys.stdin:
        request = json.loads(line)
        nproc, port = request["nproc"], free_port()
        pids = []
        for rank in range(nproc):
            pid = os.fork()
            if pid == 0:
                run_rank(rank, nproc, port, request)
            pids.append(pid)
        print(json.dumps({"codes": exit_codes(pids)}), flush=True)


def exit_codes(pids: list[int]) -> list[int]:
    """Each rank's exit status (128 + the signal for a killed one); once one has failed, the rest are killed after
    ``FAILED_PEERS_GRACE_S``."""
    codes: dict[int, int] = {}
    deadline = None
    while len(codes) < len(pids):
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid in pids:
            code = os.waitstatus_to_exitcode(status)
            codes[pid] = code if code >= 0 else 128 - code
            if codes[pid] != 0 and deadline is None:
                deadline = time.monotonic() + FAILED_PEERS_GRACE_S
            continue
        if deadline is not None and time.monotonic() > deadline:
            for other in set(pids) - set(codes):
                os.kill(other, signal.SIGKILL)
            deadline = float("inf")
        time.sleep(0.05)
    return [codes[pid] for pid in pids]


if __name__ == "__main__":
    serve()
