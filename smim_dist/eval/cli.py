"""``smim-eval``: evaluation protocols on a pre-training checkpoint's encoder.

    smim-eval knn --checkpoint runs/maskfeat_proxy                        # the run's latest checkpoint
    smim-eval knn --checkpoint runs/maskfeat_proxy/checkpoints/step_00150000 --feature cls --k 20
    smim-eval knn --checkpoint runs/demo_cpu data.path=/data/in1k_train.beton data.demo=false
    smim-eval linear --checkpoint runs/maskfeat_proxy --config configs/eval/linear.yaml --epochs 50
    smim-eval finetune --checkpoint runs/demo_cpu --epochs 10 --batch-size 64  # fine-tuning, BEiT / MAE recipe
    smim-eval seg --checkpoint runs/maskfeat_proxy --data VOCdevkit/VOC2012 # linear segmentation, block 6, 448 px
    torchrun --nproc_per_node 8 -m smim_dist.eval.cli upernet --checkpoint runs/maskfeat_proxy \
        --data ADEChallengeData2016                                       # UperNet fine-tuning, 160k iterations
    smim-eval attention --checkpoint runs/demo_cpu --layer 5 --query 3,4    # -> <run_dir>/eval/<tag>/attention/

Results go to <run_dir>/eval/<tag>/results.json (or --out DIR); a checkpoint already evaluated with the same settings
is not evaluated again. --config YAML sets a protocol's options (keys: the option names with underscores; `overrides`:
a list of data.* overrides); options on the command line win. One process by default; under torchrun each rank takes
a share.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from smim_dist.config import ConfigError
from smim_dist.engine.distributed import init_distributed
from smim_dist.eval.attention import AttentionOptions, run_attention
from smim_dist.eval.finetune import FinetuneOptions, run_finetune
from smim_dist.eval.knn import KnnOptions, run_knn
from smim_dist.eval.linear_probe import LinearOptions, run_linear_probe
from smim_dist.eval.linear_seg import SegOptions, run_linear_seg
from smim_dist.eval.options import add_options, load_options
from smim_dist.eval.upernet import UperNetOptions, run_upernet


class Protocol(NamedTuple):
    options: type
    """its options dataclass: the flags, the --config keys and the defaults"""
    run: Callable[..., Any]
    """called as run(checkpoint, out, options, overrides)"""
    help: str


PROTOCOLS = {
    "knn": Protocol(KnnOptions, run_knn, "weighted k-nearest-neighbour classification (DINO protocol)"),
    "attention": Protocol(AttentionOptions, run_attention,
                          "attention maps and mean attention distance (paper Fig. 1, 7-9, 13)"),
    "linear": Protocol(LinearOptions, run_linear_probe,
                       "linear probe on frozen features after a block (paper Table 1, CLS and Patch)"),
    "finetune": Protocol(FinetuneOptions, run_finetune,
                         "fine-tune the whole encoder with a classifier (paper Table 3)"),
    "seg": Protocol(SegOptions, run_linear_seg, "linear segmentation on a frozen block's feature map (paper Table 6)"),
    "upernet": Protocol(UperNetOptions, run_upernet,
                        "UperNet fine-tuning of the encoder for segmentation (paper Table 4, ADE20K)"),
}


def _common_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--checkpoint", type=Path, required=True,
                        help="a run directory (its latest checkpoint) or a run's checkpoints/<tag> directory")
    common.add_argument("--config", type=Path, help="a YAML file of this protocol's options (configs/eval/)")
    common.add_argument("--out", type=Path, help="output directory (default <run_dir>/eval/<tag>)")
    common.add_argument("overrides", nargs="*", help="data.* overrides of the run's config, e.g. data.path=...")
    return common


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="smim-eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    protocols = parser.add_subparsers(dest="protocol", required=True)
    common = _common_options()
    for name, protocol in PROTOCOLS.items():
        add_options(protocols.add_parser(name, parents=[common], help=protocol.help, description=protocol.help),
                    protocol.options)
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The protocol, the common options, and ``options``: the protocol's options dataclass, from the command line, the
    --config file and the defaults, in that order of precedence. The file's overrides come before the command line's,
    so those win too."""
    args = build_parser().parse_args(argv)
    options = PROTOCOLS[args.protocol].options
    given = {field.name: vars(args).pop(field.name) for field in dataclasses.fields(options)
             if field.name in vars(args)}
    args.options, overrides = load_options(options, args.config, given)
    args.overrides = [*overrides, *args.overrides]
    return args


def run_protocol(args: argparse.Namespace) -> None:
    PROTOCOLS[args.protocol].run(args.checkpoint, args.out, args.options, args.overrides)


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            init_distributed()
        run_protocol(args)
    except (FileNotFoundError, ConfigError) as err:
        print(f"smim-eval: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
