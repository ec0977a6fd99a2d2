"""Does pre-training learn? A small reproduction of the paper's Table 1 on a laptop CPU (docs/experiments.md).

    python bench/reproduce_small.py                    # 3 seeds, vanilla and proxy, the layouts scenes, HOG target
    python bench/reproduce_small.py --seeds 0 --variants vanilla           # the can-fail test's setting

For each seed it pre-trains, from configs/demo_cpu.yaml through `python -m smim_dist.train`, a vanilla model (one
[CLS], 40% random mask) and a SemanticMIM model (8 [PROXY], 60% random mask), the paper's protocol, at 32 px on the
embedded two-colour layouts (data.demo_scenes=layouts: the class decides what a masked patch holds; docs/experiments.md
says why not the shapes, and why 32 px). Then it scores the pre-trained encoder, the same encoder at its
initialisation (the weights the run started from) and raw pixels with kNN and the linear probe (the [CLS] and
mean-patch features, the paper's Linear CLS / Patch) and with linear segmentation, blocks taken at the paper's depth
fraction (7/12 for the probe, 6/12 for segmentation). It prints mean and standard deviation over the seeds and writes
every score as JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from smim_dist.config import Config
from smim_dist.data.batch import IMAGENET_MEAN, IMAGENET_STD
from smim_dist.data.pretrain_loader import prepare_demo_data
from smim_dist.eval.data import centre_crop_loader, eval_splits, label_maps, segmentation_splits, whole_image_loader
from smim_dist.eval.features import default_device, extract_features, load_encoder
from smim_dist.eval.knn import knn_accuracy
from smim_dist.eval.linear_probe import ProbeRecipe, head_accuracy, train_heads
from smim_dist.eval.linear_seg import SegRecipe, encode_maps, evaluate_head, train_seg_head
from smim_dist.engine.checkpoint import resolve_checkpoint
from smim_dist.models.mim import MIMModel
from smim_dist.vit_sizes import vit_size
from smim_dist.models.timm_export import create_timm_encoder, encoder_state_dict
from smim_dist.targets.build import build_target

REPO = Path(__file__).resolve().parents[1]
VARIANTS = {"vanilla": ["model.mode=vanilla", "mask.kind=random", "mask.ratio=0.4"],
            "proxy": ["model.mode=proxy", "model.num_proxy=8", "mask.kind=random", "mask.ratio=0.6"]}
METRICS = ("knn_cls", "knn_patch", "linear_cls", "linear_patch", "seg_miou")
DEVICE = default_device()


def pretrain(variant: str, seed: int, args: argparse.Namespace) -> Path:
    run_name = f"{variant}_s{seed}"
    overrides = [f"output_dir={args.out}", f"run_name={run_name}", f"seed={seed}", f"target.kind={args.target}",
                 f"model.img_size={args.img_size}", f"optim.epochs={args.epochs}", f"data.demo_images={args.images}",
                 f"data.demo_scenes={args.scenes}", f"data.path={args.out / ('data_' + args.scenes)}",
                 "log.every_steps=32", "log.wandb_mode=disabled", "log.progress=false", *VARIANTS[variant],
                 *args.overrides]
    subprocess.run([sys.executable, "-m", "smim_dist.train", "--config", str(REPO / "configs/demo_cpu.yaml"),
                    *overrides], cwd=REPO, check=True)
    return args.out / run_name


def initial_encoder(cfg: Config) -> torch.nn.Module:
    """The weights the run started from: smim_dist.train seeds with cfg.seed right before building the model."""
    torch.manual_seed(cfg.seed)
    model = MIMModel(cfg.model, build_target(cfg).out_dim)
    encoder = create_timm_encoder(cfg.model, encoder_state_dict(model.state_dict()))
    return encoder.eval().requires_grad_(False).to(DEVICE)


def normalised(images: torch.Tensor) -> torch.Tensor:
    mean, std = (torch.tensor(values, device=DEVICE).view(1, 3, 1, 1) for values in (IMAGENET_MEAN, IMAGENET_STD))
    return (images.to(DEVICE).float() - mean) / std


def pixel_features(cfg: Config) -> list[dict[str, torch.Tensor]]:
    """Raw pixels of the centre crops as both 'features', so they go through the same kNN and probe."""
    out = []
    for split in eval_splits(cfg):
        images, order = [], []
        for batch, indices in centre_crop_loader(split, cfg.model.img_size, 256, cfg.data.num_workers):
            images.append(normalised(batch).flatten(1))
            order.append(indices.to(DEVICE, copy=True))  # FFCV refills its buffers with the next batch
        flat = torch.cat(images)
        flat = torch.empty_like(flat).index_copy_(0, torch.cat(order), flat)
        out.append({"cls": flat, "patch": flat})
    return out


def pixel_maps(split, cfg: Config) -> torch.Tensor:
    """Each patch's raw pixels as its feature vector, the segmentation twin of pixel_features."""
    images = torch.cat([images for images, _ in whole_image_loader(split, cfg.model.img_size, 64, 0)])
    return F.pixel_unshuffle(normalised(images), cfg.model.patch_size)


def scores(cfg: Config, encoder: torch.nn.Module | None, seed: int, args: argparse.Namespace) -> dict[str, float]:
    """kNN on the final features, the linear probe and linear segmentation on intermediate blocks; raw pixels where
    ``encoder`` is None."""
    depth = vit_size(cfg.model.size).depth
    probe_block, seg_block = max(1, round(depth * 7 / 12)), max(1, round(depth * 6 / 12))
    splits = eval_splits(cfg)
    labels = [torch.from_numpy(split.labels).to(DEVICE) for split in splits]
    seg_train, seg_val, num_classes = segmentation_splits(prepare_demo_data(cfg))  # the background is class 0

    def features(block: int | None) -> list[dict[str, torch.Tensor]]:
        if encoder is None:
            return pixel_features(cfg)
        return [extract_features(encoder, centre_crop_loader(split, cfg.model.img_size, 256, cfg.data.num_workers),
                                 split.num_samples, DEVICE, block=block) for split in splits]

    final = features(None)
    probed = final if encoder is None else features(probe_block)  # raw pixels have no blocks
    result = {f"knn_{kind}": knn_accuracy(final[0][kind], labels[0], final[1][kind], labels[1])["top1"]
              for kind in final[0]}
    recipe = ProbeRecipe(epochs=args.probe_epochs, warmup_epochs=max(1, args.probe_epochs // 10), batch_size=256)
    heads = train_heads(probed[0], labels[0], num_classes - 1, recipe, seed=seed, say=lambda _: None)
    result |= {f"linear_{kind}": value["top1"] for kind, value in head_accuracy(heads, probed[1], labels[1]).items()}

    seg = SegRecipe(epochs=args.seg_epochs, batch_size=16, img_size=cfg.model.img_size, label_size=cfg.model.img_size)
    maps = [pixel_maps(split, cfg) if encoder is None else
            encode_maps(encoder, split, seg_block, seg.img_size, 64, 0, DEVICE) for split in (seg_train, seg_val)]
    targets = [label_maps(split, seg.label_size, num_classes) for split in (seg_train, seg_val)]
    head = train_seg_head(maps[0], targets[0], num_classes, seg, seed=seed, say=lambda _: None, device=DEVICE)
    result["seg_miou"] = evaluate_head(head, maps[1], targets[1], num_classes, 64, DEVICE)["miou"]
    return result


def summary(rows: list[dict[str, float]]) -> dict[str, tuple[float, float]]:
    return {key: (statistics.mean(row[key] for row in rows),
                  statistics.stdev(row[key] for row in rows) if len(rows) > 1 else 0.0) for key in METRICS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs") / "reproduce_small",
                        help="where the runs, the demo data and table1_small.json go (default runs/reproduce_small)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", choices=tuple(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--scenes", choices=("layouts", "shapes"), default="layouts")
    parser.add_argument("--target", choices=("pixels", "maskfeat", "beit"), default="maskfeat")
    parser.add_argument("--img-size", type=int, default=32, help="pixels a side, in patches of 8 (default 32)")
    parser.add_argument("--epochs", type=int, default=40, help="pre-training epochs (default 40)")
    parser.add_argument("--images", type=int, default=2048, help="demo training images (default 2048)")
    parser.add_argument("--probe-epochs", type=int, default=50, help="linear probe epochs (default 50)")
    parser.add_argument("--seg-epochs", type=int, default=10, help="linear segmentation epochs (default 10)")
    parser.add_argument("overrides", nargs="*", help="more pre-training overrides for every run, e.g. optim.lr=1e-3")
    args = parser.parse_args()
    args.out = args.out.resolve()
    began = time.perf_counter()
    runs: dict[str, list[dict[str, float]]] = {}
    for seed in args.seeds:
        for variant in args.variants:
            run_dir = pretrain(variant, seed, args)
            checkpoint, cfg = resolve_checkpoint(run_dir)
            for label, encoder in ((f"{variant} pre-trained", load_encoder(checkpoint, cfg, DEVICE)),
                                   (f"{variant} at init", initial_encoder(cfg))):
                runs.setdefault(label, []).append({"seed": seed, **scores(cfg, encoder, seed, args)})
        runs.setdefault("raw pixels", []).append({"seed": seed, **scores(cfg, None, seed, args)})
    table = {label: summary(rows) for label, rows in runs.items()}
    device = torch.cuda.get_device_name() if DEVICE.type == "cuda" else "CPU"
    report = {"machine": f"{platform.node()} ({platform.processor() or platform.machine()}, {device})",
              "settings": {key: str(value) for key, value in vars(args).items()},
              "seconds": time.perf_counter() - began, "chance_top1": 1 / 6, "runs": runs, "mean_std": table}
    (args.out / "table1_small.json").write_text(json.dumps(report, indent=2))
    print(f"\nTable 1, small: micro ViT at {args.img_size} px, demo {args.scenes} ({args.images} train images, "
          f"6 classes, chance 0.167), {args.target} target, {args.epochs} epochs, seeds {args.seeds}: mean ± std")
    print("| encoder | " + " | ".join(METRICS) + " |\n|---|" + "---|" * len(METRICS))
    for label, values in table.items():
        print(f"| {label} | " + " | ".join(f"{mean:.3f} ± {std:.3f}" for mean, std in values.values()) + " |")
    print(f"({report['seconds'] / 60:.1f} min; every score in {args.out / 'table1_small.json'})")


if __name__ == "__main__":
    main()
