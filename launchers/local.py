"""Training processes on this machine, or on each of several machines, through torchrun's elastic agent (gloo on CPU,
NCCL on GPUs).

    python launchers/local.py --nproc 8 --config configs/beit_proxy.yaml optim.lr=1e-3
    python launchers/local.py --nnodes 2 --node-rank 0 --master-addr 10.0.0.1 --nproc 8 --config ...  # on every node,
    python launchers/local.py --nnodes 2 --rdzv-endpoint 10.0.0.1:29400 --nproc 8 --config ...        # or no ranks

Each option may come from the environment instead (flags win): NPROC_PER_NODE, NNODES, NODE_RANK, MASTER_ADDR,
MASTER_PORT, RDZV_ENDPOINT, RDZV_ID, or torchrun's own PET_NNODES, PET_NODE_RANK, ... as Kubernetes PyTorchJobs set
them. The config and the options are validated here first, so a typo fails before any process starts. A SIGTERM (a pod's
preemption, on any node) is forwarded to the workers, which all stop after the current step, write a checkpoint and
exit; every node's launcher then exits with 143, and the same commands resume the run.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

from torch.distributed.elastic.multiprocessing import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import parse_args as torchrun_args
from torch.distributed.run import run as torchrun

from smim_dist.config import ConfigError, load_config
from smim_dist.preflight import refuse_missing_files
from smim_dist.engine.run_lock import check_free

ENVIRONMENT = {"nproc": "NPROC_PER_NODE", "nnodes": "NNODES", "node_rank": "NODE_RANK", "master_addr": "MASTER_ADDR",
               "master_port": "MASTER_PORT", "rdzv_endpoint": "RDZV_ENDPOINT", "rdzv_id": "RDZV_ID"}
"""option -> environment variable, read as PET_<name> (torchrun's) or <name> when the flag is not given"""


def from_environment(parser: argparse.ArgumentParser, args: argparse.Namespace, given: dict[str, str],
                     dests: tuple[str, ...]) -> None:
    for dest in dests:
        var = next((var for var in (f"PET_{ENVIRONMENT[dest]}", ENVIRONMENT[dest]) if os.environ.get(var)), None)
        if dest in given or var is None:
            continue
        value = os.environ[var]
        if dest in ("nproc", "nnodes", "node_rank", "master_port"):
            if not re.fullmatch(r"\d+", value):
                parser.error(f"{var}={value!r} in the environment: expected a whole number")
            value = int(value)
        setattr(args, dest, value)
        given[dest] = f"{var}={value}"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="launchers/local.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nproc", type=int, help="processes on this node, one per GPU on a GPU machine (default 1)")
    parser.add_argument("--nnodes", type=int, help="machines taking part, each running this command (default 1)")
    parser.add_argument("--node-rank", type=int, help="this machine's rank, 0 to nnodes-1 (0 hosts the rendezvous)")
    parser.add_argument("--master-addr", help="address of node 0, which every node can reach")
    parser.add_argument("--master-port", type=int, help="free TCP port on node 0 (default 29500)")
    parser.add_argument("--rdzv-endpoint", metavar="HOST:PORT",
                        help="c10d rendezvous instead of ranks: nodes get their ranks in order of arrival")
    parser.add_argument("--rdzv-id", help="the rendezvous' name, the same on every node (default: the run_name)")
    parser.add_argument("--shutdown-timeout", type=int, default=120, metavar="SECONDS",
                        help="after a SIGTERM, how long the workers have to finish their step and checkpoint before "
                             "they are killed (default 120)")
    parser.add_argument("--config", required=True)
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. optim.lr=1e-3")
    args = parser.parse_intermixed_args(argv)
    given = {dest: f"--{dest.replace('_', '-')} {getattr(args, dest)}" for dest in ENVIRONMENT
             if getattr(args, dest) is not None}
    from_environment(parser, args, given, ("nproc", "nnodes"))
    args.nproc = 1 if args.nproc is None else args.nproc
    args.nnodes = 1 if args.nnodes is None else args.nnodes
    if args.nproc < 1:
        parser.error(f"{given['nproc']}: need at least one process")
    if args.nnodes < 1:
        parser.error(f"{given['nnodes']}: need at least one node")
    if args.shutdown_timeout < 0:
        parser.error(f"--shutdown-timeout {args.shutdown_timeout}: must be 0 or more seconds")
    if args.nnodes == 1:
        return args
    from_environment(parser, args, given, ("node_rank", "master_addr", "master_port", "rdzv_endpoint", "rdzv_id"))
    if args.rdzv_endpoint is not None:
        for dest in ("node_rank", "master_addr", "master_port"):
            if given.get(dest, "").startswith("--"):
                parser.error(f"{given[dest]}: ranks come from the rendezvous at {given['rdzv_endpoint']}; give one "
                             "or the other")
        match = re.fullmatch(r"(.+):(\d+)", args.rdzv_endpoint)
        if not match or not 1 <= int(match.group(2)) <= 65535:
            parser.error(f"{given['rdzv_endpoint']}: expected HOST:PORT with a port from 1 to 65535")
        return args
    if args.master_addr is None:
        parser.error(f"{given['nnodes']} needs --master-addr HOST (node 0's address; or MASTER_ADDR in the "
                     "environment), or --rdzv-endpoint HOST:PORT")
    if args.node_rank is None:
        parser.error(f"{given['nnodes']} needs --node-rank (or NODE_RANK in the environment): 0 on the master, "
                     f"1 to {args.nnodes - 1} on the others")
    if not 0 <= args.node_rank < args.nnodes:
        parser.error(f"{given['node_rank']}: must be 0 to {args.nnodes - 1} with {given['nnodes']}")
    if args.master_port is not None and not 1 <= args.master_port <= 65535:
        parser.error(f"{given['master_port']}: a TCP port is 1 to 65535")
    return args


def rendezvous(args: argparse.Namespace, run_name: str) -> list[str]:
    if args.nnodes == 1:
        return ["--standalone"]
    if args.rdzv_endpoint is not None:
        return ["--nnodes", str(args.nnodes), "--rdzv-backend", "c10d", "--rdzv-endpoint", args.rdzv_endpoint,
                "--rdzv-id", args.rdzv_id or run_name]
    return ["--nnodes", str(args.nnodes), "--node-rank", str(args.node_rank), "--master-addr", args.master_addr,
            "--master-port", str(args.master_port or 29500)]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        refuse_missing_files(cfg)
        cfg.optim.accumulation_steps(args.nnodes * args.nproc)
        check_free(cfg.run_dir)
    except ConfigError as err:
        print(f"launchers/local.py: config error: {err}", file=sys.stderr)
        return 2
    try:
        torchrun(torchrun_args([*rendezvous(args, cfg.run_name), "--nproc-per-node", str(args.nproc),
                                "--shutdown-timeout", str(args.shutdown_timeout), "-m", "smim_dist.train",
                                "--config", args.config, *args.overrides]))
    except SignalException as err:
        print(f"launchers/local.py: {err.sigval.name}: the workers were given {args.shutdown_timeout} s to checkpoint "
              "and stop; the same command resumes the run", file=sys.stderr)
        return 128 + err.sigval
    except ChildFailedError as err:
        codes = sorted({failure.exitcode for failure in err.failures.values()})
        print(f"launchers/local.py: workers exited with {codes}", file=sys.stderr)
        return codes[0] if len(codes) == 1 and codes[0] > 0 else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
