"""``smim-eval``: evaluation protocols on a pre-training checkpoint's frozen encoder.

    smim-eval knn --checkpoint runs/maskfeat_proxy                        # the run's latest checkpoint
    smim-eval knn --checkpoint runs/maskfeat_proxy/checkpoints/step_00150000 --feature cls --k 20
    smim-eval knn --checkpoint runs/demo_cpu data.path=/data/in1k_train.beton data.demo=false
    smim-eval attention --checkpoint runs/demo_cpu --layer 5 --query 3,4    # -> <run_dir>/eval/<tag>/attention/
    smim-eval linear --checkpoint runs/maskfeat_proxy --block 7             # linear probe on block 7's features
    smim-eval seg --checkpoint runs/maskfeat_proxy --data VOCdevkit/VOC2012 # linear segmentation, block 6, 448 px

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
from smim_dist.eval.attention import run_attention
from smim_dist.eval.features import FEATURES
from smim_dist.eval.knn import run_knn
from smim_dist.eval.linear_probe import ProbeRecipe, run_linear_probe
from smim_dist.eval.linear_seg import SegRecipe, run_linear_seg


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
    attention = protocols.add_parser("attention",
                                     help="attention maps and mean attention distance (paper Fig. 1, 7-9, 13)")
    attention.add_argument("--checkpoint", type=Path, required=True,
                           help="a run directory (its latest checkpoint) or a run's checkpoints/<tag> directory")
    attention.add_argument("--layer", type=int, help="0-based block of the attention maps (default: the last)")
    attention.add_argument("--images", type=int, default=64, help="val images averaged over (default 64)")
    attention.add_argument("--query", type=_patch, help="ROW,COL of the query patch, 0-based (default: the centre)")
    attention.add_argument("--out", type=Path, help="output directory (default <run_dir>/eval/<tag>/attention)")
    attention.add_argument("overrides", nargs="*", help="data.* overrides of the run's config, e.g. data.path=...")
    linear = protocols.add_parser("linear",
                                  help="linear probe on frozen features after a block (paper Table 1, CLS and Patch)")
    linear.add_argument("--checkpoint", type=Path, required=True,
                        help="a run directory (its latest checkpoint) or a run's checkpoints/<tag> directory")
    linear.add_argument("--block", type=int, default=7, help="1-based block whose output is probed (default 7)")
    linear.add_argument("--epochs", type=int, default=ProbeRecipe.epochs, help="default %(default)s")
    linear.add_argument("--warmup-epochs", type=int, default=ProbeRecipe.warmup_epochs, help="default %(default)s")
    linear.add_argument("--lr", type=float, help="peak learning rate (default 0.1 * batch size / 256)")
    linear.add_argument("--batch-size", type=int, default=ProbeRecipe.batch_size,
                        help="cached features per head step (default %(default)s)")
    linear.add_argument("--encode-batch-size", type=int, default=128, help="images per forward pass (default 128)")
    linear.add_argument("--out", type=Path, help="directory for results.json (default <run_dir>/eval/<tag>)")
    linear.add_argument("--force", action="store_true", help="start over, re-encoding, even if results are stored")
    linear.add_argument("overrides", nargs="*", help="data.* overrides of the run's config, e.g. data.path=...")
    seg = protocols.add_parser("seg", help="linear segmentation on a frozen block's feature map (paper Table 6)")
    seg.add_argument("--checkpoint", type=Path, required=True,
                     help="a run directory (its latest checkpoint) or a run's checkpoints/<tag> directory")
    seg.add_argument("--data", type=Path, help="a PascalVOC tree (VOCdevkit/VOC2012) or a demo set (default: the "
                                               "run's demo set)")
    seg.add_argument("--num-classes", type=int, help="classes, ignore index 255 aside (default: VOC 21, demo 7)")
    seg.add_argument("--block", type=int, default=6, help="1-based block whose feature map is read (default 6)")
    seg.add_argument("--epochs", type=int, default=SegRecipe.epochs, help="default %(default)s")
    seg.add_argument("--img-size", type=int, default=SegRecipe.img_size, help="input side (default %(default)s)")
    seg.add_argument("--batch-size", type=int, default=SegRecipe.batch_size, help="default %(default)s")
    seg.add_argument("--lr", type=float, default=SegRecipe.lr, help="SGD lr, x0.1 after 2/3 (default %(default)s)")
    seg.add_argument("--encode-batch-size", type=int, default=16, help="images per forward pass (default 16)")
    seg.add_argument("--out", type=Path, help="directory for results.json (default <run_dir>/eval/<tag>)")
    seg.add_argument("--force", action="store_true", help="start over, re-encoding, even if results are stored")
    seg.add_argument("overrides", nargs="*", help="data.* overrides of the run's config, e.g. data.path=...")
    return parser.parse_args(argv)


def _patch(text: str) -> tuple[int, int]:
    try:
        row, col = (int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not ROW,COL (two integers, e.g. 7,7)") from None
    return row, col


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            init_distributed()
        if args.protocol == "attention":
            run_attention(args.checkpoint, args.out, args.layer, args.images, args.query, args.overrides)
            return 0
        if args.protocol == "linear":
            recipe = ProbeRecipe(args.epochs, args.warmup_epochs, args.batch_size, args.lr)
            run_linear_probe(args.checkpoint, args.out, args.block, recipe, args.overrides, args.force,
                             args.encode_batch_size)
            return 0
        if args.protocol == "seg":
            recipe = SegRecipe(args.epochs, args.batch_size, args.lr, args.img_size)
            run_linear_seg(args.checkpoint, args.out, args.block, recipe, args.data, args.num_classes, args.overrides,
                           args.force, args.encode_batch_size)
            return 0
        run_knn(args.checkpoint, args.out, args.k, args.temperature, args.feature, args.overrides, args.force,
                args.batch_size)
    except (FileNotFoundError, ConfigError, ValueError) as err:
        print(f"smim-eval: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
