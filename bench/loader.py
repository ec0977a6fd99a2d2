"""Pre-training loader throughput, side by side: FFCV at several storage settings and as a sharded data set, the
classic PIL + torchvision ImageFolder DataLoader, this project's image-file loader, and webdataset shards.

    python bench/loader.py --images 512 --workers 2
    python bench/loader.py --op-times     # microseconds per sample of each FFCV decoder step, one thread

Every row runs the same augmentation (random resized crop to 224, flip, colour jitter 0.4) and masking on the same
ImageNet-like JPEGs (375-500 px crops of scikit-image's photographs) with the same number of workers (DataLoader
processes or FFCV threads), and delivers uint8 batches with masks, ready for the device. The report gives images/s,
images/s per worker and the ratio to the PIL pipeline.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as TF
import webdataset
from ffcv.libffcv import resize_crop
from PIL import Image
from skimage import data as photos
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder

from smim_dist.config import Config, load_config
from smim_dist.data.convert import checked_options, convert_imagefolder
from smim_dist.data.convert_shards import plan_imagefolder, run_task, start
from smim_dist.data.ffcv_ops import flip_in_place, jitter_in_place
from smim_dist.data.pretrain_loader import build_pretrain_loader
from smim_dist.data.masking import build_mask_generator
from smim_dist.vit_sizes import image_grid

REPO = Path(__file__).resolve().parents[1]
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina")


def make_jpegs(root: Path, count: int, seed: int = 0) -> list[Path]:
    """ImageNet-like files: random 375-500 px crops of real photographs, JPEG quality 90, in 4 class folders."""
    rng = np.random.default_rng(seed)
    sources = [np.asarray(Image.fromarray(getattr(photos, name)()).convert("RGB")) for name in PHOTOS]
    paths = []
    for index in range(count):
        photo = sources[index % len(sources)]
        side = int(rng.integers(375, 501))
        scale = 1.2 * side / min(photo.shape[:2]) * rng.uniform(1.0, 1.3)
        image = Image.fromarray(photo).resize((int(photo.shape[1] * scale) + 1, int(photo.shape[0] * scale) + 1))
        top = int(rng.integers(0, image.height - side + 1))
        left = int(rng.integers(0, image.width - int(side * 1.2) + 1))
        path = root / "train" / f"class{index % 4}" / f"{index:06d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        image.crop((left, top, left + int(side * 1.2), top + side)).save(path, quality=90)
        paths.append(path)
    return paths


def write_shards(paths: list[Path], folder: Path, count: int) -> str:
    folder.mkdir(parents=True)
    for shard in range(count):
        with webdataset.TarWriter(str(folder / f"{shard}.tar")) as sink:
            for path in paths[shard::count]:
                sink.write({"__key__": path.stem, "jpg": path.read_bytes(), "cls": path.parent.name.encode()})
    return f"{folder}/{{0..{count - 1}}}.tar"


class PILPipeline:
    """The usual baseline: PIL decoding and torchvision's transforms in DataLoader workers, masks from numpy."""

    def __init__(self, cfg: Config):
        self.transform = T.Compose([
            T.RandomResizedCrop(cfg.model.img_size, scale=cfg.data.crop_scale, ratio=cfg.data.crop_ratio),
            T.RandomHorizontalFlip(cfg.data.hflip), T.ColorJitter(*(3 * [cfg.data.color_jitter])), T.PILToTensor()])
        self.masks = build_mask_generator(cfg.mask.kind, image_grid(cfg.model.img_size, cfg.model.patch_size),
                                          cfg.mask.ratio)
        self.rng = np.random.default_rng()

    def __call__(self, image: Image.Image):
        return self.transform(image), torch.from_numpy(self.masks(self.rng.integers(2**63)))


def pil_loader(cfg: Config):
    dataset = ImageFolder(str(Path(cfg.data.path) / "train"), transform=PILPipeline(cfg))
    return DataLoader(dataset, batch_size=cfg.optim.micro_batch, shuffle=True, num_workers=cfg.data.num_workers,
                      drop_last=True, persistent_workers=True, prefetch_factor=4)


def images_per_second(overrides: list[str], batches: int, pil: bool = False) -> float:
    cfg = load_config(REPO / "configs/demo_cpu.yaml", ["data.demo=false", *overrides])
    if pil:
        loader = pil_loader(cfg)
    else:
        loader, positioner = build_pretrain_loader(cfg, rank=0, world_size=1)
        positioner.set_epoch(0)
    iterator = iter(loader)
    next(iterator)  # worker start-up, FFCV's compilation
    start, seen = time.perf_counter(), 0
    for _, batch in zip(range(batches), iterator):
        seen += len(batch["images"] if isinstance(batch, dict) else batch[1])  # ImageFolder: ((images, masks), labels)
    return seen / (time.perf_counter() - start)


FFCV_SETTINGS = {
    "FFCV, JPEG q90, max side 512": {"max_side": 512, "compress_share": 1.0},
    "FFCV, half JPEG / half raw, 512": {"max_side": 512, "compress_share": 0.5},
    "FFCV, raw pixels, max side 320": {"max_side": 320, "raw": True},
    "FFCV, raw pixels, max side 256": {"max_side": 256, "raw": True},
}


SHARDS = 8
SHARDED_ROW = f"FFCV, half JPEG / half raw, 512, {SHARDS} shards"
"""the row above it, written as a sharded data set"""


def write_sharded_beton(source: Path, folder: Path, shard_size: int, workers: int) -> Path:
    settings = checked_options(512, 90, 0.5, False, 100, workers)
    folder = start(folder, plan_imagefolder(source, shard_size, settings), overwrite=False)
    run_task(folder, settings)
    return folder


def time_decoder_ops(calls: int = 2000) -> None:
    """Microseconds per 224 px sample of each step of FFCV's pre-training decoder on one photograph, with the
    image-file loader's colour jitter (torchvision's uint8 functions, which the decoder's reproduces) beside it; one
    thread, median of 5 rounds."""
    torch.set_num_threads(1)
    source = np.ascontiguousarray(photos.astronaut()[:320, :320])
    crop = np.empty((224, 224, 3), dtype=np.uint8)
    resize_crop(source, 20, 300, 30, 310, crop)
    tensor = torch.from_numpy(crop.copy()).permute(2, 0, 1).contiguous()
    brightness, contrast, saturation = 1.2, 0.8, 1.3
    ops = {
        "crop 280x280 -> 224 (FFCV's resize_crop, OpenCV area)": lambda: resize_crop(source, 20, 300, 30, 310, crop),
        "horizontal flip": lambda: flip_in_place(crop),
        "colour jitter, FFCV decoder (on a copy)": lambda: jitter_in_place(crop.copy(), brightness, contrast,
                                                                         saturation),
        "colour jitter, torchvision uint8 (image-file loader)": lambda: TF.adjust_saturation(
            TF.adjust_contrast(TF.adjust_brightness(tensor, brightness), contrast), saturation),
    }
    print(f"FFCV decoder steps, one 224 px sample, 1 thread, on {platform.machine()}:")
    for name, op in ops.items():
        op()
        rounds = []
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(calls // 5):
                op()
            rounds.append((time.perf_counter() - start) / (calls // 5))
        print(f"  {name:56s} {1e6 * sorted(rounds)[2]:7.1f} us")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--op-times", action="store_true", help="time the FFCV decoder's steps instead")
    args = parser.parse_args()
    if args.op_times:
        time_decoder_ops()
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        paths = make_jpegs(root / "folder", args.images)
        spec = write_shards(paths, root / "shards", max(4, args.workers))
        common = ["model.size=base", "model.img_size=224", "model.patch_size=16", "optim.epochs=1",
                  f"optim.global_batch={args.batch}", f"optim.micro_batch={args.batch}",
                  f"data.num_workers={args.workers}", "data.crop_scale=[0.08,1.0]", "data.color_jitter=0.4"]
        batches = args.images // args.batch - 2
        rows = {"PIL + torchvision ImageFolder": images_per_second(
            [*common, "data.source=imagefolder", f"data.path={root / 'folder'}"], batches, pil=True)}
        for name, settings in FFCV_SETTINGS.items():
            beton = root / f"{len(rows)}.beton"
            convert_imagefolder(root / "folder" / "train", beton, workers=args.workers, **settings)
            rows[name] = images_per_second([*common, "data.source=ffcv", f"data.path={beton}"], batches)
        sharded = write_sharded_beton(root / "folder" / "train", root / "sharded", args.images // SHARDS, args.workers)
        rows[SHARDED_ROW] = images_per_second([*common, "data.source=ffcv", f"data.path={sharded}"], batches)
        rows["image files (this project, torch DataLoader)"] = images_per_second(
            [*common, "data.source=imagefolder", f"data.path={root / 'folder'}"], batches)
        rows["webdataset shards"] = images_per_second(
            [*common, "data.source=webdataset", f"data.path={spec}", f"data.samples_per_epoch={args.images}",
             "data.shuffle_buffer=64"], batches)
    print(f"{args.images} JPEGs of 375-500 px, crop 224 + flip + jitter + mask, batch {args.batch}, "
          f"{args.workers} loader workers on {platform.machine()} ({len(os.sched_getaffinity(0))} cores)")
    baseline = rows["PIL + torchvision ImageFolder"]
    for name, rate in rows.items():
        print(f"  {name:46s} {rate:8.1f} images/s  {rate / args.workers:7.1f} per worker  "
              f"{rate / baseline:5.2f}x PIL")
    print(f"sharded / single .beton: {rows[SHARDED_ROW] / rows['FFCV, half JPEG / half raw, 512']:.2f}")


if __name__ == "__main__":
    main()
