"""A small-scale reproduction of the paper's Table 1 on the embedded demo data (CPU, under 30 minutes on 2 cores).

    python bench/reproduce_small.py                       # vanilla vs proxy, pixel target, seed 0
    python bench/reproduce_small.py --epochs 30 --seed 1 --target maskfeat

Pre-trains a vanilla model (one [CLS], 40% block-wise mask) and a SemanticMIM model (8 [PROXY], 60% random mask),
as in the paper's Table 2, from configs/demo_cpu.yaml with the same target, images, epochs, batch and seed; then
evaluates each with kNN, the linear probe on the [CLS] and mean-patch features (the paper's Linear CLS / Patch) and
linear segmentation on the demo masks. Blocks are taken at the paper's depth fraction (7/12 for the probe, 6/12 for
segmentation). It measures and asserts nothing: it prints a table in the shape of Table 1 and writes it as JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

from smim_dist.config import load_config
from smim_dist.eval.knn import run_knn
from smim_dist.eval.linear_probe import ProbeRecipe, run_linear_probe
from smim_dist.eval.linear_seg import SegRecipe, run_linear_seg
from smim_dist.models.sizes import VIT_SIZES

REPO = Path(__file__).resolve().parents[1]
VARIANTS = {"vanilla": ["model.mode=vanilla", "mask.kind=block", "mask.ratio=0.4"],
            "proxy": ["model.mode=proxy", "mask.kind=random", "mask.ratio=0.6"]}


def pretrain(name: str, args: argparse.Namespace) -> tuple[Path, float]:
    run_name = f"{name}_{args.target}_s{args.seed}"
    overrides = [f"output_dir={args.out}", f"run_name={run_name}", f"seed={args.seed}", f"target.kind={args.target}",
                 f"optim.epochs={args.epochs}", f"data.demo_images={args.images}", f"data.path={args.out / 'demo'}",
                 "log.wandb_mode=disabled", "log.progress=false", *VARIANTS[name], *args.overrides]
    began = time.perf_counter()
    subprocess.run([sys.executable, "-m", "smim_dist.train", "--config", str(REPO / "configs/demo_cpu.yaml"),
                    *overrides], cwd=REPO, check=True)
    return args.out / run_name, time.perf_counter() - began


def evaluate(run_dir: Path, args: argparse.Namespace) -> dict:
    model = load_config(run_dir / "config.yaml").model
    depth = VIT_SIZES[model.size].depth
    linear_block, seg_block = max(1, round(depth * 7 / 12)), max(1, round(depth * 6 / 12))
    knn = run_knn(run_dir)["protocols"]["knn"]
    probe = ProbeRecipe(epochs=args.probe_epochs, warmup_epochs=max(1, args.probe_epochs // 10), batch_size=256)
    linear = run_linear_probe(run_dir, block=linear_block, recipe=probe)["protocols"]["linear"]
    seg_recipe = SegRecipe(epochs=args.seg_epochs, batch_size=16, img_size=model.img_size)
    seg = run_linear_seg(run_dir, block=seg_block, recipe=seg_recipe)["protocols"]["seg"]
    return {"knn_cls": knn["cls"]["top1"], "knn_patch": knn["patch"]["top1"], "linear_cls": linear["cls"]["top1"],
            "linear_patch": linear["patch"]["top1"], "seg_miou": seg["miou"], "seg_pixel_acc": seg["pixel_acc"],
            "linear_block": linear_block,
            "seg_block": seg_block, "depth": depth}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "reproduce_small")
    parser.add_argument("--target", choices=("pixels", "maskfeat", "beit"), default="pixels")
    parser.add_argument("--epochs", type=int, default=16, help="pre-training epochs (default 16)")
    parser.add_argument("--images", type=int, default=2048, help="demo training images (default 2048)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--probe-epochs", type=int, default=50, help="linear probe epochs (default 50)")
    parser.add_argument("--seg-epochs", type=int, default=25, help="linear segmentation epochs (default 25)")
    parser.add_argument("overrides", nargs="*", help="more pre-training overrides for both variants, e.g. model.size=tiny")
    args = parser.parse_args()
    args.out = args.out.resolve()
    rows = {}
    for name in VARIANTS:
        run_dir, seconds = pretrain(name, args)
        rows[name] = {**evaluate(run_dir, args), "pretrain_seconds": round(seconds, 1)}
    chance = 1 / 6
    report = {"machine": f"{platform.node()} ({platform.processor() or platform.machine()}, CPU)",
              "settings": {key: str(value) for key, value in vars(args).items()}, "chance_top1": chance, "rows": rows}
    (args.out / "table1_small.json").write_text(json.dumps(report, indent=2))
    print(f"\nTable 1, small: micro ViT, demo data ({args.images} train images, 6 classes, chance {chance:.3f}), "
          f"target {args.target}, {args.epochs} epochs, seed {args.seed}")
    print("| method | kNN CLS | kNN Patch | Linear CLS | Linear Patch | Seg mIoU | Seg pixel acc | pre-train s |")
    print("|---|---|---|---|---|---|---|---|")
    for name, row in rows.items():
        label = "SemanticMIM (proxy)" if name == "proxy" else "vanilla"
        print(f"| {label} | {row['knn_cls']:.3f} | {row['knn_patch']:.3f} | {row['linear_cls']:.3f} | "
              f"{row['linear_patch']:.3f} | {row['seg_miou']:.3f} | {row['seg_pixel_acc']:.3f} | {row['pretrain_seconds']:.0f} |")
    print(f"(linear probe on block {rows['proxy']['linear_block']}, segmentation on block {rows['proxy']['seg_block']}"
          f" of {rows['proxy']['depth']}; results in {args.out / 'table1_small.json'})")


if __name__ == "__main__":
    main()
