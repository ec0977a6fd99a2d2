"""The embedded demo dataset: synthetic shape scenes (or two-colour layouts, ``demo_layouts``) generated in-project
from a seed.

The CPU demo and the evaluation tests need labelled, segmented images that ship with the code, need no download and are
learnable in minutes. Each image holds one to three shapes of six classes over a textured background (a gradient plus
low-frequency noise, stripes or a checker in random colours), so flat colour is no cue and a model has to learn shape.

Every image is a pure function of (seed, split, index): generation parallelises and a partial rebuild is byte-identical.
The label is the class covering the most pixels of the segmentation mask, recomputed from the mask so the two never
disagree; the first shape is drawn large and scenes where it is not clearly dominant are redrawn, so labels are
learnable.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import numbers
import os
import secrets
import shutil
from pathlib import Path
from typing import NamedTuple

import numpy as np
import webdataset
from PIL import Image, ImageDraw

from smim_dist.data.convert import convert_imagefolder
from smim_dist.data.demo_layouts import LAYOUT_NAMES, render_layout
from smim_dist.files import private_name, remove_abandoned

__all__ = ["CLASS_NAMES", "SCENES", "class_names", "ensure_demo_dataset", "load_manifest", "render_sample"]

CLASS_NAMES: tuple[str, ...] = ("circle", "cross", "ring", "square", "star", "triangle")
"""Alphabetical, because ImageFolder numbers classes by sorted folder name: index here == ImageFolder's target."""

SCENES = ("shapes", "layouts")
SPLITS = {"train": 0, "val": 1}
VERSION = 2
"""Bump whenever rendering changes, so an old cache is refused instead of silently mixed with new images."""
MANIFEST = "manifest.json"
NUM_SHARDS = 8
SHARD_PATTERN = "shards/train-{000000..000007}.tar"
"""the training split as webdataset shards, relative to the root"""

_SUPERSAMPLE = 4
_TRIES = 8
_DOMINANCE = 2.0
"""The label's class must cover this many times the pixels of any other class, or the scene is redrawn."""


class _Shape(NamedTuple):
    cls: int
    cx: float
    cy: float
    r: float
    angle: float
    colour: np.ndarray
    shade_angle: float


def class_names(scenes: str) -> tuple[str, ...]:
    if scenes not in SCENES:
        raise ValueError(f"scenes must be one of {list(SCENES)}, got {scenes!r}")
    return CLASS_NAMES if scenes == "shapes" else LAYOUT_NAMES


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_int(name: str, value, low: int) -> None:
    if not _is_int(value) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def _target_class(seed: int, split_id: int, index: int) -> int:
    """Each block of 6 consecutive indices holds every class once, in a per-block random order.

    A fixed order would give a strided subset (a DistributedSampler without shuffling, rank r of 2) only some classes.
    The spawn key keeps this stream apart from the per-image stream ``[seed, split_id, index]``.
    """
    block, slot = divmod(index, len(CLASS_NAMES))
    rng = np.random.default_rng(np.random.SeedSequence([seed, split_id, block], spawn_key=(1,)))
    return int(rng.permutation(len(CLASS_NAMES))[slot])


def _polygon(cls: int, r: float, angle: float) -> np.ndarray:
    """Vertices around the origin for the polygon classes, rotated by ``angle``."""
    name = CLASS_NAMES[cls]
    if name == "square":
        pts = [(r * math.cos(a), r * math.sin(a)) for a in np.arange(4) * math.pi / 2 + math.pi / 4]
    elif name == "triangle":
        pts = [(r * math.cos(a), r * math.sin(a)) for a in np.arange(3) * 2 * math.pi / 3 - math.pi / 2]
    elif name == "star":
        radii = np.where(np.arange(10) % 2 == 0, r, 0.42 * r)
        pts = [(q * math.cos(a), q * math.sin(a)) for q, a in zip(radii, np.arange(10) * math.pi / 5 - math.pi / 2)]
    else:  # cross
        w = 0.3 * r
        pts = [(w, r), (w, w), (r, w), (r, -w), (w, -w), (w, -r),
               (-w, -r), (-w, -w), (-r, -w), (-r, w), (-w, w), (-w, r)]
    c, s = math.cos(angle), math.sin(angle)
    return np.array(pts) @ np.array([[c, s], [-s, c]])


def _coverage(shape: _Shape, size: int) -> np.ndarray:
    """Fraction of each pixel the shape covers, in [0, 1]: drawn supersampled and box-filtered for anti-aliasing.

    Drawing only the shape's bounding box keeps the many small shapes cheap.
    """
    k = _SUPERSAMPLE
    x0, y0 = max(0, int(shape.cx - shape.r) - 1), max(0, int(shape.cy - shape.r) - 1)
    x1, y1 = min(size, int(shape.cx + shape.r) + 2), min(size, int(shape.cy + shape.r) + 2)
    canvas = Image.new("L", ((x1 - x0) * k, (y1 - y0) * k), 0)
    draw = ImageDraw.Draw(canvas)
    cx, cy, r = (shape.cx - x0) * k, (shape.cy - y0) * k, shape.r * k
    name = CLASS_NAMES[shape.cls]
    if name in ("circle", "ring"):
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        if name == "ring":
            inner = 0.55 * r
            draw.ellipse([cx - inner, cy - inner, cx + inner, cy + inner], fill=0)
    else:
        pts = _polygon(shape.cls, r, shape.angle) + (cx, cy)
        draw.polygon([tuple(p) for p in pts], fill=255)
    cov = np.zeros((size, size), np.float32)
    cov[y0:y1, x0:x1] = np.asarray(canvas.reduce(k), dtype=np.float32) / 255.0
    return cov


def _background(rng: np.random.Generator, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Gradient between two random colours, overlaid with one random pattern in a third colour; channels first.

    ``u``, ``v`` are pixel-centre coordinates in [-1, 1]. Channels-first keeps numpy's inner loops long: broadcasting
    over a trailing axis of 3 made rendering several times slower.
    """
    size = u.shape[0]
    c0, c1, c2 = rng.uniform(0, 255, (3, 3, 1, 1)).astype(np.float32)
    a = rng.uniform(0, 2 * math.pi)
    image = c0 + (c1 - c0) * ((u * math.cos(a) + v * math.sin(a) + 1.5) / 3)

    kind = rng.integers(3)
    b = rng.uniform(0, 2 * math.pi)
    ru, rv = u * math.cos(b) + v * math.sin(b), v * math.cos(b) - u * math.sin(b)
    if kind == 0:  # low-frequency noise
        cells = int(rng.integers(3, 7))
        grid = rng.standard_normal((cells, cells)).astype(np.float32)
        pattern = np.asarray(Image.fromarray(grid).resize((size, size), Image.BICUBIC))
        pattern = pattern / (np.abs(pattern).max() + 1e-6)
    elif kind == 1:  # stripes
        pattern = np.sin(2 * math.pi * rng.uniform(2, 7) * ru + rng.uniform(0, 2 * math.pi))
    else:  # soft-edged checker
        f = rng.uniform(1.5, 4)
        pattern = np.tanh(4 * np.sin(2 * math.pi * f * ru) * np.sin(2 * math.pi * f * rv))
    weight = rng.uniform(0.25, 0.6) * (pattern + 1) / 2
    return image + weight * (c2 - image)


def _colour(rng: np.random.Generator, avoid: np.ndarray) -> np.ndarray:
    """A random colour that stands out from the background's mean colour, so shapes are visible."""
    for _ in range(16):
        colour = rng.uniform(0, 255, (3, 1, 1)).astype(np.float32)
        if np.linalg.norm(colour.ravel() - avoid) > 90:
            return colour
    return (255 - avoid).astype(np.float32).reshape(3, 1, 1)


def _shape(rng: np.random.Generator, cls: int, size: int, main: bool, avoid: np.ndarray) -> _Shape:
    """The main shape is large and mostly inside the frame; the others are small and anywhere."""
    if main:
        r = rng.uniform(0.24, 0.36) * size
        cx, cy = rng.uniform(0.8 * r, size - 0.8 * r), rng.uniform(0.8 * r, size - 0.8 * r)
    else:
        r = rng.uniform(0.09, 0.17) * size
        cx, cy = rng.uniform(0.1 * size, 0.9 * size), rng.uniform(0.1 * size, 0.9 * size)
    return _Shape(cls, cx, cy, r, rng.uniform(0, 2 * math.pi), _colour(rng, avoid), rng.uniform(0, 2 * math.pi))


def _mask(layers: list[tuple[_Shape, np.ndarray]], size: int) -> np.ndarray:
    mask = np.zeros((size, size), np.uint8)
    for shape, cov in layers:  # later shapes occlude earlier ones
        mask[cov >= 0.5] = shape.cls + 1
    return mask


def _dominant(mask: np.ndarray, cls: int) -> bool:
    counts = np.bincount(mask.ravel(), minlength=len(CLASS_NAMES) + 1)[1:]
    others = np.delete(counts, cls)
    return counts[cls] > 0 and counts[cls] >= _DOMINANCE * others.max()


def render_sample(seed: int, split: str, index: int, size: int, scenes: str = "shapes"
                  ) -> tuple[np.ndarray, np.ndarray, int]:
    """One image (HxWx3 uint8), its mask (HxW uint8, 0 = background, 1 + class index) and its label."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    class_names(scenes)
    _check_int("seed", seed, 0)
    _check_int("index", index, 0)
    _check_int("size", size, 16)
    rng = np.random.default_rng([seed, SPLITS[split], index])
    if scenes == "layouts":
        label = _target_class(seed, SPLITS[split], index)
        return (*render_layout(rng, label, size), label)
    centres = np.arange(size, dtype=np.float32) + 0.5
    py, px = np.meshgrid(centres, centres, indexing="ij")
    image = _background(rng, px / size * 2 - 1, py / size * 2 - 1)
    avoid = image.mean((1, 2))

    main = _shape(rng, _target_class(seed, SPLITS[split], index), size, True, avoid)
    layers = [(main, _coverage(main, size))]
    mask = _mask(layers, size)
    for _ in range(_TRIES):  # if no draw keeps the main shape dominant, it stays alone
        extras = [_shape(rng, int(rng.integers(len(CLASS_NAMES))), size, False, avoid) for _ in range(rng.integers(3))]
        candidate = layers + [(extra, _coverage(extra, size)) for extra in extras]
        candidate_mask = _mask(candidate, size)
        if _dominant(candidate_mask, main.cls):
            layers, mask = candidate, candidate_mask
            break

    for shape, cov in layers:  # each shape shaded by a soft linear gradient, blended by its coverage
        c, s = math.cos(shape.shade_angle), math.sin(shape.shade_angle)
        shade = 1 + 0.18 * np.clip(((px - shape.cx) * c + (py - shape.cy) * s) / shape.r, -1, 1)
        image += cov * (shade * shape.colour - image)
    image += rng.standard_normal((size, size), dtype=np.float32) * 3  # luminance grain, as in photos

    counts = np.bincount(mask.ravel(), minlength=len(CLASS_NAMES) + 1)[1:]
    image = np.clip(image, 0, 255).astype(np.uint8).transpose(1, 2, 0)
    return np.ascontiguousarray(image), mask, int(np.argmax(counts))


def _paths(split: str, index: int, label: int, scenes: str) -> tuple[str, str]:
    return f"{split}/{class_names(scenes)[label]}/{index:06d}.png", f"masks/{split}/{index:06d}.png"


def _write_sample(job: tuple[str, int, str, int, int, str]) -> int:
    """Render and save one sample under ``build``; module-level so a Pool can pickle it."""
    build, seed, split, index, size, scenes = job
    image, mask, label = render_sample(seed, split, index, size, scenes)
    image_path, mask_path = _paths(split, index, label, scenes)
    Image.fromarray(image).save(Path(build) / image_path, compress_level=1)
    Image.fromarray(mask).save(Path(build) / mask_path, compress_level=1)
    return label


def load_manifest(root: str | Path) -> dict:
    """The manifest of a complete demo dataset: its parameters, class names and per split the samples."""
    path = Path(root) / MANIFEST
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} not found: {root} is not a complete demo dataset") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); delete {root} to rebuild it") from None


def _check_existing(root: Path, params: dict) -> None:
    """Accept an existing complete dataset with our parameters; refuse anything else without touching it."""
    try:
        manifest = load_manifest(root)
    except FileNotFoundError:
        raise ValueError(
            f"{root} exists but has no {MANIFEST} (an interrupted build or other data); "
            f"set data.path to another directory or delete {root}"
        ) from None
    found = {key: manifest.get(key, "shapes" if key == "scenes" else None) for key in params}  # older: shapes only
    if found != params:
        raise ValueError(
            f"{root} holds a demo dataset built with {found}, but {params} was requested; "
            f"set data.path to another directory or delete {root}"
        )


def _build(build: Path, params: dict, workers: int) -> None:
    for split in SPLITS:
        for name in class_names(params["scenes"]):
            (build / split / name).mkdir(parents=True)
        (build / "masks" / split).mkdir(parents=True)
    jobs = [
        (str(build), params["seed"], split, index, params["size"], params["scenes"])
        for split in SPLITS
        for index in range(params[f"num_{split}"])
    ]
    if workers > 0:
        # spawn, not fork: the caller may already run torch threads, which fork would copy in a broken state.
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            labels = pool.map(_write_sample, jobs, chunksize=max(1, len(jobs) // (8 * workers)))
    else:
        labels = [_write_sample(job) for job in jobs]

    manifest = dict(params, class_names=list(class_names(params["scenes"])), train=[], val=[])
    for (_, _, split, index, _, _), label in zip(jobs, labels):
        image_path, mask_path = _paths(split, index, label, params["scenes"])
        manifest[split].append({"image": image_path, "mask": mask_path, "label": label})
    _write_formats(build, manifest)
    (build / MANIFEST).write_text(json.dumps(manifest, indent=1))


def _write_formats(build: Path, manifest: dict) -> None:
    """The same images as FFCV files and as webdataset shards, so every data.source can read the demo set. The
    .beton's sample i is ImageFolder's sample i, so FFCV and the image-file loader crop the same image for an index."""
    for split in SPLITS:
        convert_imagefolder(build / split, build / f"{split}.beton", max_side=manifest["size"], compress_share=1.0,
                            workers=1)
    (build / "shards").mkdir()
    train = manifest["train"]
    per_shard = math.ceil(len(train) / NUM_SHARDS)
    for shard in range(NUM_SHARDS):
        with webdataset.TarWriter(str(build / "shards" / f"train-{shard:06d}.tar"), mtime=0) as sink:
            for index in range(shard * per_shard, min(len(train), (shard + 1) * per_shard)):
                sink.write({"__key__": f"{index:06d}", "png": (build / train[index]["image"]).read_bytes(),
                            "cls": train[index]["label"]})


def ensure_demo_dataset(
    root: str | Path, num_train: int = 2048, num_val: int = 512, size: int = 96, seed: int = 0, workers: int = 0,
    scenes: str = "shapes",
) -> Path:
    """Build the demo dataset at ``root`` unless it is already there with these parameters; return ``root``.

    Layout: ``root/{train,val}/<class>/<index>.png`` (ImageFolder), ``root/{train,val}.beton`` (FFCV),
    ``root/shards/train-*.tar`` (webdataset), ``root/masks/<split>/<index>.png`` and ``root/manifest.json``. The
    tree is built in a private sibling directory and renamed onto ``root`` in one step, so
    concurrent callers (DDP ranks on one machine) never see a partial tree: the first rename wins, later ones discard
    their copy, which is identical. An empty ``root`` directory counts as absent; anything else is never deleted.
    Each split needs at least one image per class, because ImageFolder refuses an empty class folder.
    """
    _check_int("num_train", num_train, len(CLASS_NAMES))
    _check_int("num_val", num_val, len(CLASS_NAMES))
    _check_int("size", size, 16)
    _check_int("seed", seed, 0)
    _check_int("workers", workers, 0)
    class_names(scenes)
    root = Path(root)
    params = {"version": VERSION, "num_train": num_train, "num_val": num_val, "size": size, "seed": seed,
              "scenes": scenes}
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        _check_existing(root, params)
        return root

    root.parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned(root.parent, f".{root.name}.tmp-")
    build = root.parent / f"{private_name(f'.{root.name}.tmp-')}-{secrets.token_hex(4)}"
    build.mkdir()
    try:
        _build(build, params, workers)
        os.rename(build, root)
    except OSError:
        if not root.exists():
            raise
        _check_existing(root, params)  # another process finished first
    finally:
        if build.exists():
            shutil.rmtree(build)
    return root
