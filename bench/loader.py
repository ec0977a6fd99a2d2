"""Pre-training loader throughput: image files through a torch DataLoader vs webdataset tar shards, side by side.

    python bench/loader.py --images 512 --workers 2

Both run the same augmentation (random resized crop to 224, flip, colour jitter) and masking on the same ImageNet-like
JPEGs (375-500 px crops of scikit-image's photographs), with the same number of workers; the report gives images/s of
each and their ratio. (The FFCV pipeline is not written yet; it joins this table when it is.)
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import webdataset
from PIL import Image
from skimage import data as photos

from smim_dist.config import load_config
from smim_dist.data.pretrain_loader import build_pretrain_loader

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


def images_per_second(overrides: list[str], batches: int) -> float:
    cfg = load_config(REPO / "configs/demo_cpu.yaml", overrides)
    loader, positioner = build_pretrain_loader(cfg, rank=0, world_size=1)
    positioner.set_epoch(0)
    iterator = iter(loader)
    next(iterator)
    start, seen = time.perf_counter(), 0
    for _, batch in zip(range(batches), iterator):
        seen += batch["images"].shape[0]
    return seen / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        paths = make_jpegs(root / "folder", args.images)
        spec = write_shards(paths, root / "shards", max(4, args.workers))
        common = ["model.size=base", "model.img_size=224", "model.patch_size=16", "optim.epochs=1",
                  f"optim.global_batch={args.batch}", f"optim.micro_batch={args.batch}",
                  f"data.num_workers={args.workers}", "data.crop_scale=[0.08,1.0]", "data.color_jitter=0.4"]
        batches = args.images // args.batch - 2
        folder = images_per_second([*common, "data.source=imagefolder", f"data.path={root / 'folder'}"], batches)
        shards = images_per_second([*common, "data.source=webdataset", f"data.path={spec}",
                                    f"data.samples_per_epoch={args.images}", "data.shuffle_buffer=64"], batches)
    print(f"{args.images} JPEGs of 375-500 px, crop 224 + flip + jitter + mask, batch {args.batch}, "
          f"{args.workers} loader workers on {platform.machine()} ({len(os.sched_getaffinity(0))} cores)")
    print(f"  image files (torch DataLoader)  {folder:8.1f} images/s")
    print(f"  webdataset shards               {shards:8.1f} images/s   ({shards / folder:.2f}x the files)")


if __name__ == "__main__":
    main()
