"""N training processes on this machine (gloo on CPU, NCCL on GPUs), through torchrun's elastic agent.

    python launchers/local.py --nproc 8 --config configs/beit_proxy.yaml optim.lr=1e-3

The config is validated here first, so a typo fails before any process starts.
"""

from __future__ import annotations

import argparse
import sys

from torch.distributed.run import main as torchrun

from smim_dist.config import ConfigError, load_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nproc", type=int, default=1, help="processes (one per GPU on a GPU machine)")
    parser.add_argument("--config", required=True)
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. optim.lr=1e-3")
    args = parser.parse_args(argv)
    if args.nproc < 1:
        parser.error(f"--nproc {args.nproc}: need at least one process")
    try:
        cfg = load_config(args.config, args.overrides)
        cfg.optim.accumulation_steps(args.nproc)
    except ConfigError as err:
        print(f"launchers/local.py: config error: {err}", file=sys.stderr)
        return 2
    torchrun(["--standalone", "--nproc_per_node", str(args.nproc), "-m", "smim_dist.train",
              "--config", args.config, *args.overrides])
    return 0


if __name__ == "__main__":
    sys.exit(main())
