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
is not evaluated again. --config YAML sets a protocol's options (keys: the option names, `overrides`: a list of data.*
overrides); options on the command line win. One process by default; under torchrun each rank takes a share.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

import yaml

from smim_dist.config import SHIPPED_CONFIGS, ConfigError, find_config
from smim_dist.engine.distributed import init_distributed
from smim_dist.eval.attention import run_attention
from smim_dist.eval.features import FEATURES
from smim_dist.eval.finetune import POOLS, FinetuneRecipe, run_finetune
from smim_dist.eval.knn import run_knn
from smim_dist.eval.linear_probe import ProbeRecipe, run_linear_probe
from smim_dist.eval.linear_seg import SegRecipe, run_linear_seg
from smim_dist.eval.upernet import UperNetRecipe, run_upernet

CONFIG_OVERRIDES = "overrides"
"""the --config key holding data.* overrides of the run's config"""


def _common_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--checkpoint", type=Path, required=True,
                        help="a run directory (its latest checkpoint) or a run's checkpoints/<tag> directory")
    common.add_argument("--config", type=Path, help="a YAML file of this protocol's options (configs/eval/)")
    common.add_argument("--out", type=Path, help="output directory (default <run_dir>/eval/<tag>)")
    common.add_argument("overrides", nargs="*", help="data.* overrides of the run's config, e.g. data.path=...")
    return common


def _force(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--force", action="store_true", help="start over, recomputing, even if results are stored")


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    parser = argparse.ArgumentParser(prog="smim-eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    protocols = parser.add_subparsers(dest="protocol", required=True)
    common = _common_options()

    knn = protocols.add_parser("knn", parents=[common],
                               help="weighted k-nearest-neighbour classification (DINO protocol)")
    knn.add_argument("--feature", choices=(*FEATURES, "both"), default="both",
                     help="cls: the [CLS] token; patch: the mean patch token; both (default) reports each")
    knn.add_argument("--k", type=int, default=20, help="neighbours that vote (default 20)")
    knn.add_argument("--temperature", type=float, default=0.07, help="vote weight exp(similarity / T) (default 0.07)")
    knn.add_argument("--batch-size", type=int, default=128, help="images per forward pass (default 128)")
    _force(knn)

    attention = protocols.add_parser("attention", parents=[common],
                                     help="attention maps and mean attention distance (paper Fig. 1, 7-9, 13)")
    attention.add_argument("--layer", type=int, help="0-based block of the attention maps (default: the last)")
    attention.add_argument("--images", type=int, default=64, help="val images averaged over (default 64)")
    attention.add_argument("--query", type=_patch, help="ROW,COL of the query patch, 0-based (default: the centre)")

    linear = protocols.add_parser("linear", parents=[common],
                                  help="linear probe on frozen features after a block (paper Table 1, CLS and Patch)")
    linear.add_argument("--block", type=int, default=7, help="1-based block whose output is probed (default 7)")
    linear.add_argument("--epochs", type=int, default=ProbeRecipe.epochs, help="default %(default)s")
    linear.add_argument("--warmup-epochs", type=int, default=ProbeRecipe.warmup_epochs, help="default %(default)s")
    linear.add_argument("--lr", type=float, help="peak learning rate (default 0.1 * batch size / 256)")
    linear.add_argument("--batch-size", type=int, default=ProbeRecipe.batch_size,
                        help="cached features per head step (default %(default)s)")
    linear.add_argument("--encode-batch-size", type=int, default=128, help="images per forward pass (default 128)")
    _force(linear)

    finetune = protocols.add_parser("finetune", parents=[common],
                                    help="fine-tune the whole encoder with a classifier (paper Table 3)")
    finetune.add_argument("--num-classes", type=int, help="checked against the class folders (default: their count)")
    finetune.add_argument("--epochs", type=int, default=FinetuneRecipe.epochs, help="default %(default)s")
    finetune.add_argument("--warmup-epochs", type=int, default=FinetuneRecipe.warmup_epochs,
                          help="default %(default)s")
    finetune.add_argument("--batch-size", type=int, default=FinetuneRecipe.batch_size,
                          help="global, over all ranks and accumulation steps (default %(default)s)")
    finetune.add_argument("--accum-steps", type=int, default=FinetuneRecipe.accum_steps,
                          help="micro-batches per optimizer step (default %(default)s)")
    finetune.add_argument("--blr", type=float, default=FinetuneRecipe.blr,
                          help="peak lr per 256 images (default %(default)s)")
    finetune.add_argument("--lr", type=float, help="absolute peak lr (default blr * batch size / 256)")
    finetune.add_argument("--min-lr", type=float, default=FinetuneRecipe.min_lr, help="default %(default)s")
    finetune.add_argument("--weight-decay", type=float, default=FinetuneRecipe.weight_decay,
                          help="default %(default)s")
    finetune.add_argument("--layer-decay", type=float, default=FinetuneRecipe.layer_decay,
                          help="lr factor per block towards the input (default %(default)s)")
    finetune.add_argument("--drop-path", type=float, default=FinetuneRecipe.drop_path, help="default %(default)s")
    finetune.add_argument("--mixup", type=float, default=FinetuneRecipe.mixup,
                          help="mixup alpha, 0: off (default %(default)s)")
    finetune.add_argument("--cutmix", type=float, default=FinetuneRecipe.cutmix,
                          help="cutmix alpha, 0: off (default %(default)s)")
    finetune.add_argument("--smoothing", type=float, default=FinetuneRecipe.smoothing,
                          help="label smoothing (default %(default)s)")
    finetune.add_argument("--auto-augment", default=FinetuneRecipe.auto_augment,
                          help="timm RandAugment policy (default %(default)s)")
    finetune.add_argument("--reprob", dest="re_prob", type=float, default=FinetuneRecipe.re_prob,
                          help="random-erasing probability (default %(default)s)")
    finetune.add_argument("--global-pool", choices=POOLS, default=FinetuneRecipe.global_pool,
                          help="avg: mean patch token and a new LayerNorm (MAE); token: [CLS] (default %(default)s)")
    finetune.add_argument("--log-every", type=int, default=50, help="steps between loss lines (default 50)")
    _force(finetune)

    seg = protocols.add_parser("seg", parents=[common],
                               help="linear segmentation on a frozen block's feature map (paper Table 6)")
    seg.add_argument("--data", type=Path, help="a PascalVOC tree (VOCdevkit/VOC2012) or a demo set (default: the "
                                               "run's demo set)")
    seg.add_argument("--num-classes", type=int, help="classes, ignore index 255 aside (default: VOC 21, demo 7)")
    seg.add_argument("--block", type=int, default=6, help="1-based block whose feature map is read (default 6)")
    seg.add_argument("--epochs", type=int, default=SegRecipe.epochs, help="default %(default)s")
    seg.add_argument("--img-size", type=int, default=SegRecipe.img_size, help="input side (default %(default)s)")
    seg.add_argument("--batch-size", type=int, default=SegRecipe.batch_size, help="default %(default)s")
    seg.add_argument("--lr", type=float, default=SegRecipe.lr, help="SGD lr, x0.1 after 2/3 (default %(default)s)")
    seg.add_argument("--encode-batch-size", type=int, default=16, help="images per forward pass (default 16)")
    _force(seg)

    upernet = protocols.add_parser("upernet", parents=[common],
                                   help="UperNet fine-tuning of the encoder for segmentation (paper Table 4, ADE20K)")
    upernet.add_argument("--data", type=Path, help="an ADE20K tree (ADEChallengeData2016), a PascalVOC tree or a demo "
                                                   "set (default: the run's demo set)")
    upernet.add_argument("--num-classes", type=int,
                         help="classes, ignore index 255 aside (default: ADE20K 150, VOC 21, demo 7)")
    upernet.add_argument("--iters", type=int, default=UperNetRecipe.iters, help="default %(default)s")
    upernet.add_argument("--batch-size", type=int, default=UperNetRecipe.batch_size,
                         help="crops per iteration over all processes (default %(default)s)")
    upernet.add_argument("--crop-size", type=int, default=UperNetRecipe.crop_size, help="default %(default)s")
    upernet.add_argument("--lr", type=float, default=UperNetRecipe.lr,
                         help="peak AdamW lr, the decoder's (default %(default)s)")
    upernet.add_argument("--layer-decay", type=float, default=UperNetRecipe.layer_decay,
                         help="lr factor per encoder block towards the input (default %(default)s)")
    upernet.add_argument("--weight-decay", type=float, default=UperNetRecipe.weight_decay, help="default %(default)s")
    upernet.add_argument("--warmup-iters", type=int, default=UperNetRecipe.warmup_iters, help="default %(default)s")
    upernet.add_argument("--drop-path", type=float, default=UperNetRecipe.drop_path, help="default %(default)s")
    upernet.add_argument("--aux-weight", type=float, default=UperNetRecipe.aux_weight,
                         help="weight of the auxiliary FCN head's loss (default %(default)s)")
    upernet.add_argument("--eval-every", type=int, default=0,
                         help="also score val every N iterations (default 0: at the end only)")
    upernet.add_argument("--save-every", type=int, default=1000, help="iterations between saved states (default 1000)")
    upernet.add_argument("--log-every", type=int, default=50, help="iterations between loss records (default 50)")
    _force(upernet)
    return parser, {"knn": knn, "attention": attention, "linear": linear, "seg": seg, "upernet": upernet,
                    "finetune": finetune}


def _patch(text: str) -> tuple[int, int]:
    try:
        row, col = (int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not ROW,COL (two integers, e.g. 7,7)") from None
    return row, col


def config_arguments(path: Path, protocol: argparse.ArgumentParser) -> tuple[list[str], list[str]]:
    """The command-line tokens a --config file stands for, and its data overrides. Turning the file into tokens
    gives its values argparse's own type and choice checks, and lets the options typed after it win."""
    path = find_config(path, SHIPPED_CONFIGS / "eval")
    try:
        values = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"--config {path}: cannot read it as YAML ({err})") from None
    values = {} if values is None else values
    if not isinstance(values, dict):
        raise ConfigError(f"--config {path}: expected a mapping of option names to values, got {type(values).__name__}")
    options = {action.dest: action for action in protocol._actions
               if action.option_strings and action.dest not in ("help", "config", "checkpoint")}
    unknown = sorted(set(values) - set(options) - {CONFIG_OVERRIDES})
    if unknown:
        command = protocol.prog.split()[-1]
        raise ConfigError(f"--config {path}: unknown key(s) {', '.join(unknown)} for `smim-eval {command}`;"
                          f" valid keys: {', '.join(sorted(options))}, {CONFIG_OVERRIDES}")
    overrides = values.pop(CONFIG_OVERRIDES, None) or []
    if not isinstance(overrides, list) or not all(isinstance(item, str) for item in overrides):
        raise ConfigError(f"--config {path}: `{CONFIG_OVERRIDES}` must be a list of key=value strings, "
                          f"got {overrides!r}")
    tokens: list[str] = []
    for key, value in values.items():
        flag = options[key].option_strings[-1]
        if isinstance(options[key], argparse._StoreTrueAction):
            if not isinstance(value, bool):
                raise ConfigError(f"--config {path}: `{key}` is a switch; give true or false, not {value!r}")
            tokens += [flag] if value else []
        elif value is not None:
            tokens += [flag, ",".join(map(str, value)) if isinstance(value, list) else str(value)]
    return tokens, overrides


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser, protocols = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if args.config is None:
        return args
    tokens, overrides = config_arguments(args.config, protocols[args.protocol])
    at = argv.index(args.protocol) + 1
    args = parser.parse_args([*argv[:at], *tokens, *argv[at:]])
    args.overrides = [*overrides, *args.overrides]
    return args


def run_protocol(args: argparse.Namespace) -> None:
    if args.protocol == "attention":
        run_attention(args.checkpoint, args.out, args.layer, args.images, args.query, args.overrides)
    elif args.protocol == "linear":
        recipe = ProbeRecipe(args.epochs, args.warmup_epochs, args.batch_size, args.lr)
        run_linear_probe(args.checkpoint, args.out, args.block, recipe, args.overrides, args.force,
                         args.encode_batch_size)
    elif args.protocol == "finetune":
        options = {field.name: getattr(args, field.name) for field in dataclasses.fields(FinetuneRecipe)}
        run_finetune(args.checkpoint, args.out, FinetuneRecipe(**options), args.num_classes, args.overrides,
                     args.force, log_every=args.log_every)
    elif args.protocol == "seg":
        recipe = SegRecipe(args.epochs, args.batch_size, args.lr, args.img_size)
        run_linear_seg(args.checkpoint, args.out, args.block, recipe, args.data, args.num_classes, args.overrides,
                       args.force, args.encode_batch_size)
    elif args.protocol == "upernet":
        recipe = UperNetRecipe(args.iters, args.batch_size, args.crop_size, args.lr, args.layer_decay,
                               args.weight_decay, args.warmup_iters, args.drop_path, args.aux_weight)
        run_upernet(args.checkpoint, args.out, recipe, args.data, args.num_classes, args.overrides, args.force,
                    args.eval_every, args.save_every, args.log_every)
    else:
        run_knn(args.checkpoint, args.out, args.k, args.temperature, args.feature, args.overrides, args.force,
                args.batch_size)


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
