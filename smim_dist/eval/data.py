"""Labelled train (memory bank) and val splits for the frozen-feature protocols, read from a run's data config.

Pre-training only needs unlabelled train images; a protocol needs labels and a held-out split in the storage the run
used: ``train.beton`` / ``val.beton`` for ffcv, ``train/`` and ``val/`` trees for imagefolder (and for webdataset,
whose streams have no fixed order to index features by). Everything that can be wrong with the data is found here,
from file names and metadata alone, before a model is loaded.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from ffcv.fields import IntField
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset
from torchvision.io import ImageReadMode, decode_image
from PIL import Image
from torchvision.transforms.functional import resize, resized_crop

from smim_dist.config import Config, ConfigError
from smim_dist.data.ffcv_loader import EVAL_CROP_RATIO, FFCVEvalLoader, check_beton
from smim_dist.data.demo import MANIFEST, load_manifest
from smim_dist.data.pretrain_loader import prepare_demo_data
from smim_dist.data.segmentation import read_mask
from smim_dist.data.shards import expand_shards

SPLITS = ("train", "val")
VOC_LAYOUT = ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation")
VOC_CLASSES = 21
"""background + 20 object classes"""
IGNORE_INDEX = 255
"""VOC's object borders and "void": no loss, not scored"""
ADE_LAYOUT = {"train": "training", "val": "validation"}
"""ADEChallengeData2016's split folders under images/ and annotations/"""
ADE_CLASSES = 150
"""ADE20K's SceneParsing classes; its label 0 ("other") is none of them"""


@dataclass(frozen=True)
class LabelledSplit:
    name: str
    path: Path
    """a .beton file or an ImageFolder tree"""
    labels: np.ndarray
    """int64 [N], in sample order: features are put back in this order whatever the ranks read"""
    files: tuple[str, ...] = ()
    """the tree's images in ImageFolder order; empty for a .beton"""
    classes: tuple[str, ...] = ()
    """the tree's class folders, sorted (ImageFolder's label order); empty for a .beton"""

    @property
    def num_samples(self) -> int:
        return len(self.labels)


def _beton(name: str, path: Path, img_size: int) -> LabelledSplit:
    if not path.is_file():
        raise ConfigError(f"no {name} split at {path}; the evaluation reads labelled train and val .beton files "
                          f"(write it with `smim-convert imagefolder <{name} tree> {path}`)")
    reader = check_beton(path, img_size, min_samples=1)
    fields = list(reader.handlers)
    if not isinstance(reader.handlers.get("label"), IntField):
        raise ConfigError(f"{path} has fields {fields} but no 'label' IntField; the evaluation needs labels, as "
                          "`smim-convert imagefolder` writes them")
    labels = reader.metadata[f"f{fields.index('label')}"].astype(np.int64)
    return _checked(LabelledSplit(name, path, labels))


def _tree(name: str, path: Path) -> LabelledSplit:
    try:
        classes, class_to_idx = find_classes(str(path))
    except FileNotFoundError:
        raise ConfigError(f"no labelled {name} split at {path}: the evaluation needs <root>/{name}/<class>/<image> "
                          "(the ImageNet layout)") from None
    samples = make_dataset(str(path), class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=True)
    labels = np.array([label for _, label in samples], dtype=np.int64)
    return _checked(LabelledSplit(name, path, labels, tuple(file for file, _ in samples), tuple(classes)))


def _checked(split: LabelledSplit) -> LabelledSplit:
    if split.num_samples == 0:
        raise ConfigError(f"the {split.name} split {split.path} holds no images")
    if split.labels.min() < 0:
        raise ConfigError(f"{split.path}: {int((split.labels < 0).sum())} of {split.num_samples} images have no label "
                          "(label -1, e.g. shards without .cls); the evaluation needs a labelled data set")
    return split


def _trees(root: Path) -> tuple[LabelledSplit, LabelledSplit]:
    train, val = (_tree(name, root / name) for name in SPLITS)
    if train.classes != val.classes:
        raise ConfigError(f"{train.path} and {val.path} have different class folders ({len(train.classes)} vs "
                          f"{len(val.classes)}, e.g. {sorted(set(train.classes) ^ set(val.classes))[:3]}); ImageFolder "
                          "numbers classes by sorted name, so both splits need the same class folders")
    return train, val


def _trees_beside_shards(spec: str) -> tuple[LabelledSplit, LabelledSplit]:
    """Shards are a stream without a stable sample order or, often, labels; a labelled tree stored beside them (as
    the demo set does) is read instead."""
    first = expand_shards(spec)[0]
    candidates = [] if first.startswith("pipe:") else [Path(first).parent, Path(first).parent.parent]
    for root in candidates:
        if all((root / name).is_dir() for name in SPLITS):
            return _trees(root)
    where = f"in {', '.join(map(str, candidates))}" if candidates else "nowhere: a pipe has no directory"
    raise ConfigError(f"data.path={spec!r}: the evaluation cannot read webdataset shards and found no train/ and val/ "
                      f"image trees beside them (looked {where}); "
                      "point it at labelled data, e.g. data.source=imagefolder data.path=ROOT or data.source=ffcv "
                      "data.path=TRAIN.beton (with VAL.beton beside it)")


def eval_splits(cfg: Config) -> tuple[LabelledSplit, LabelledSplit]:
    """The labelled (train, val) splits for ``cfg.data``; ffcv's val file is the train file's name with 'train'
    replaced by 'val' (``in1k_train.beton`` -> ``in1k_val.beton``)."""
    data, size = cfg.data, cfg.model.img_size
    if data.demo:
        root = prepare_demo_data(cfg)
        if data.source == "ffcv":
            return _beton("train", root / "train.beton", size), _beton("val", root / "val.beton", size)
        return _trees(root)
    if data.source == "imagefolder":
        return _trees(Path(data.path))
    if data.source == "webdataset":
        return _trees_beside_shards(data.path)
    train = Path(data.path)
    val = train.with_name(train.name.replace("train", "val"))
    if val == train:
        raise ConfigError(f"data.path={data.path!r}: cannot name the val split, since the file name has no 'train' to "
                          "replace by 'val'; name the files like in1k_train.beton and in1k_val.beton")
    return _beton("train", train, size), _beton("val", val, size)


class _CentreCrops(Dataset):
    """The image-file twin of FFCV's centre-crop decoder: the central ``EVAL_CROP_RATIO`` square of the shorter side,
    resized to ``img_size``, as uint8."""

    def __init__(self, split: LabelledSplit, img_size: int, indices: range):
        self.split, self.img_size, self.indices = split, img_size, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item: int) -> tuple[Tensor, int]:
        index = self.indices[item]
        image = decode_image(str(self.split.path / self.split.files[index]), mode=ImageReadMode.RGB)
        height, width = image.shape[-2:]
        side = int(EVAL_CROP_RATIO * min(height, width))
        crop = resized_crop(image, (height - side) // 2, (width - side) // 2, side, side,
                            [self.img_size, self.img_size], antialias=True)
        return crop, index


class _FFCVCentreCrops:
    """``FFCVEvalLoader`` batches without the labels, which the split already holds."""

    def __init__(self, split: LabelledSplit, img_size: int, batch_size: int, num_workers: int, rank: int,
                 world_size: int):
        self.loader = FFCVEvalLoader(split.path, img_size, batch_size, rank, world_size, num_workers)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for images, _, indices in self.loader:
            yield images, indices.view(-1)


def centre_crop_loader(split: LabelledSplit, img_size: int, batch_size: int, num_workers: int, rank: int = 0,
                       world_size: int = 1) -> Iterable[tuple[Tensor, Tensor]]:
    """(uint8 images [B, 3, S, S], sample indices [B]) of rank ``rank``'s share: samples rank, rank + world_size, ...

    Keep an FFCV loader referenced until the process is done with FFCV: when one is collected while another is in
    use, numba's finalizer of its compiled pipeline prints a (harmless, ignored) KeyError traceback."""
    if split.files:
        dataset = _CentreCrops(split, img_size, range(rank, split.num_samples, world_size))
        return DataLoader(dataset, batch_size=batch_size, num_workers=num_workers,
                          pin_memory=torch.cuda.is_available())
    return _FFCVCentreCrops(split, img_size, batch_size, num_workers, rank, world_size)


@dataclass(frozen=True)
class SegmentationSplit:
    name: str
    root: Path
    pairs: tuple[tuple[Path, Path], ...]
    """(image, label map) files in sample order"""
    reduce_zero_label: bool = False
    """ADE20K: id 0 ("other") is ignored and ids 1..150 are classes 0..149 (mmsegmentation's reduce_zero_label)"""


def segmentation_splits(root: Path) -> tuple[SegmentationSplit, SegmentationSplit, int]:
    """(train, val, class count) of a demo set (its manifest lists each image's mask; background + its shapes), an
    ADE20K tree (``images/{training,validation}/<id>.jpg`` with ``annotations/.../<id>.png``) or a PascalVOC tree
    (``ImageSets/Segmentation/{train,val}.txt`` name the ids of ``JPEGImages/<id>.jpg`` and
    ``SegmentationClass/<id>.png``); every file is checked to exist before anything is computed."""
    if (root / MANIFEST).is_file():
        manifest = load_manifest(root)
        train, val = (SegmentationSplit(name, root, tuple((root / sample["image"], root / sample["mask"])
                                                          for sample in manifest[name])) for name in SPLITS)
        return train, val, len(manifest["class_names"]) + 1
    if (root / "images").is_dir() and (root / "annotations").is_dir():
        return _ade_split(root, "train"), _ade_split(root, "val"), ADE_CLASSES
    missing = [name for name in VOC_LAYOUT if not (root / name).is_dir()]
    if missing:
        raise ConfigError(f"segmentation data {root} is neither a demo set (no {MANIFEST}) nor a PascalVOC tree (no "
                          f"{', '.join(missing)}) nor an ADE20K tree (no images/ and annotations/); pass --data "
                          "VOCdevkit/VOC2012, ADEChallengeData2016 or a demo set's directory")
    splits = []
    for name in SPLITS:
        listing = root / VOC_LAYOUT[2] / f"{name}.txt"
        ids = listing.read_text().split() if listing.is_file() else []
        pairs = tuple((root / "JPEGImages" / f"{id_}.jpg", root / "SegmentationClass" / f"{id_}.png") for id_ in ids)
        absent = [str(path) for pair in pairs for path in pair if not path.is_file()]
        if not pairs or absent:
            raise ConfigError(f"{listing}: {'no image ids' if not pairs else f'{len(absent)} files missing, e.g. '}"
                              f"{absent[0] if absent else ''}; the {name} split needs listed ids with both files")
        splits.append(SegmentationSplit(name, root, pairs))
    return splits[0], splits[1], VOC_CLASSES


def _ade_split(root: Path, name: str) -> SegmentationSplit:
    images, masks = root / "images" / ADE_LAYOUT[name], root / "annotations" / ADE_LAYOUT[name]
    pairs = tuple((image, masks / f"{image.stem}.png") for image in sorted(images.glob("*.jpg")))
    absent = [str(mask) for _, mask in pairs if not mask.is_file()]
    if not pairs or absent:
        raise ConfigError(f"{images}: {'no .jpg images' if not pairs else f'{len(absent)} label maps missing, e.g. '}"
                          f"{absent[0] if absent else ''}; the ADE20K {name} split needs <id>.jpg under {images} and "
                          f"<id>.png under {masks}")
    return SegmentationSplit(name, root, pairs, reduce_zero_label=True)


def read_label_map(split: SegmentationSplit, mask: Path) -> np.ndarray:
    """uint8 class ids of one of the split's label maps, ADE20K's shifted to 0-based with "other" ignored; an error
    naming the file if it holds colours rather than ids."""
    try:
        ids = read_mask(mask.read_bytes())
    except ValueError as err:
        raise ConfigError(f"{mask}: {err}") from None
    if split.reduce_zero_label:
        return np.where((ids == 0) | (ids == IGNORE_INDEX), IGNORE_INDEX, ids - 1).astype(np.uint8)
    return ids


def label_maps(split: SegmentationSplit, size: int, num_classes: int) -> Tensor:
    """uint8 ``[N, size, size]`` class ids (nearest-neighbour resized, as the paper scores at a fixed 100x100); an
    error naming the file if a map holds an id that is neither a class below ``num_classes`` nor ``IGNORE_INDEX``."""
    maps = torch.empty(len(split.pairs), size, size, dtype=torch.uint8)
    for i, (_, mask) in enumerate(split.pairs):
        ids = read_label_map(split, mask)
        bad = np.setdiff1d(np.unique(ids), [*range(num_classes), IGNORE_INDEX])
        if bad.size:
            raise ConfigError(f"{mask} holds class ids {bad.tolist()[:5]}, outside 0..{num_classes - 1} (and "
                              f"{IGNORE_INDEX}, ignored); pass the data set's class count with --num-classes")
        maps[i] = torch.from_numpy(np.array(Image.fromarray(ids).resize((size, size), Image.Resampling.NEAREST)))
    return maps


class _WholeImages(Dataset):
    """Whole images squashed to ``img_size`` x ``img_size``, as ``FFCVSegmentationLoader`` gives them: the label
    maps are resized whole too, so every patch stays aligned with its pixels."""

    def __init__(self, split: SegmentationSplit, img_size: int):
        self.split, self.img_size = split, img_size

    def __len__(self) -> int:
        return len(self.split.pairs)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image = decode_image(str(self.split.pairs[index][0]), mode=ImageReadMode.RGB)
        return resize(image, [self.img_size, self.img_size], antialias=True), index


def whole_image_loader(split: SegmentationSplit, img_size: int, batch_size: int,
                       num_workers: int) -> DataLoader:
    """(uint8 images [B, 3, S, S], sample indices [B]) in sample order."""
    return DataLoader(_WholeImages(split, img_size), batch_size=batch_size, num_workers=num_workers,
                      pin_memory=torch.cuda.is_available())
