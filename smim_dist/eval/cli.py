"""``smim-eval``: evaluation protocols on a pre-training checkpoint's frozen encoder.

    smim-eval knn --checkpoint runs/maskfeat_proxy                        # the run's latest checkpoint
    smim-eval knn --checkpoint runs/maskfeat_proxy/checkpoints/step_00150000 --feature cls --k 20
    smim-eval knn --checkpoint runs/demo_cpu data.path=/data/in1k_train.beton data.demo=false

Results go to <run_dir>/eval/<tag>/results.json (or --out DIR); a checkpoint already evaluated with the same settings
is not evaluated again. One process by default; under torchrun each rank encodes a share of the images.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from smim_dist.config import ConfigError
from smim_dist.engine.distributed import init_distributed
from smim_dist.eval.features import FEATURES
from smim_dist.eval.knn import run_knn


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="smim-eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    protocols = parser.add_subparsers(dest="protocol", required=True)
    knn = protocols.add_parser("knn", help="weighted k-nearest-neighbour classification (DINO protocol)")
    knn.add_argument("--checkpoint", type=Path, required=True,
                     help="a run directory (its latest checkpoint) or a run's checkpoints/<tag> directory")
    knn.add_argument("--feature", choices=(*FEATURES, "both"), default="both",
                     help="cls: the [CLS] token; patch: the mean patch token; both (default) reports each")
    knn.add_argument("--k", type=int, default=20, help="neighbours that vote (default 20)")
    knn.add_argument("--temperature", type=float, default=0.07, help="vote weight exp(similarity / T) (default 0.07)")
    knn.add_argument("--out", type=Path, help="directory for results.json (default <run_dir>/eval/<tag>)")
    knn.add_argument("--batch-size", type=int, default=128, help="images per forward pass (default 128)")
    knn.add_argument("--force", action="store_true", help="recompute even if results.json holds these results")
    knn.add_argument("overrides", nargs="*", help="data.* overrides of the run's config, e.g. data.path=...")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            init_distributed()
        run_knn(args.checkpoint, args.out, args.k, args.temperature, args.feature, args.overrides, args.force,
                args.batch_size)
    except (FileNotFoundError, ConfigError, ValueError) as err:
        print(f"smim-eval: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
