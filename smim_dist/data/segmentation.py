"""``smim-convert segmentation IMAGES MASKS OUT.beton``: images and their label maps -> one FFCV .beton for the
semantic-segmentation evaluations (linear segmentation, UperNet).

    smim-convert segmentation VOC2012/JPEGImages VOC2012/SegmentationClass voc.beton
    smim-convert segmentation ADEChallengeData2016/images/validation ADEChallengeData2016/annotations/validation \\
        ade_val.beton --max-side 512

Every image under IMAGES (recursive) is paired with the file under MASKS (recursive) of the same stem
(``2007_000032.jpg`` with ``2007_000032.png``). Images without a label map are left out and counted in the report (VOC's
JPEGImages holds many more images than SegmentationClass); masks without an image are counted too. A label map holds
class ids: a mode "P" (palette) or "L" PNG read with ``np.asarray``, so palette indices are the ids and are never turned
into colours (VOC's 255 border stays 255, ADE20K's 0 "other" stays 0). A mask in another mode or of another size than
its image is skipped with the reason in the report.

Fields: ``image`` (RGB, JPEG or raw per --compress-share as in the other layouts), ``mask`` and ``index`` (the position
in the file). ``mask`` is an ``RGBImageField`` written raw, holding the id map in all three channels: FFCV 1.0.2 has no
variable-size single-channel field (``NDArrayField`` fixes one shape for all samples, ``BytesField`` would need a PNG
decoder inside the compiled pipeline), and raw keeps every id exact where JPEG would blend and shift them, at the cost
of 3 bytes a pixel. Image and mask shrink together to --max-side, the image with Lanczos, the mask nearest-neighbour.
The loader is ``smim_dist.data.ffcv_loader.FFCVSegmentationLoader``.
"""

from __future__ import annotations

import io
import os
import time
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from smim_dist.data.convert import (EXTENSIONS, SampleReader, UsageError, checked_settings, decode_rgb, probe_image,
                                    read_source, shrunk, write_samples)

__all__ = ["MASK_MODES", "convert_segmentation", "pair_files", "read_mask"]

MASK_MODES = frozenset({"P", "L"})
_LISTED = 20
"""unpaired names listed in the report; the rest are only counted"""


def _files(root: Path, skip: Path | None = None) -> list[str]:
    """Image files under ``root`` (recursive, sorted, relative to ``root``), leaving out the tree ``skip``."""
    found = []
    for folder, dirs, names in os.walk(root, followlinks=True):
        if skip is not None:
            dirs[:] = [d for d in dirs if Path(folder, d).resolve() != skip]
        found += [os.path.relpath(os.path.join(folder, name), root)
                  for name in names if os.path.splitext(name)[1].lower() in EXTENSIONS]
    return sorted(found)


def _by_stem(files: list[str], what: str, root: Path) -> dict[str, str]:
    stems: dict[str, list[str]] = {}
    for rel in files:
        stems.setdefault(Path(rel).stem, []).append(rel)
    duplicates = {stem: rels for stem, rels in stems.items() if len(rels) > 1}
    if duplicates:
        shown = "; ".join(f"{stem}: {', '.join(rels)}" for stem, rels in sorted(duplicates.items())[:_LISTED])
        raise UsageError(f"{len(duplicates)} file stems occur more than once among the {what} under {root}, so "
                         f"pairing by stem is ambiguous: {shown}")
    return {stem: rels[0] for stem, rels in stems.items()}


def pair_files(images, masks) -> tuple[list[tuple[str, str]], list[str], list[str]]:
    """(image, mask) paths relative to their roots, paired by file stem in image-path order; the images without a
    mask; the masks without an image."""
    images, masks = Path(images).resolve(), Path(masks).resolve()
    for root, what in ((images, "images"), (masks, "masks")):
        if not root.is_dir():
            raise UsageError(f"{what} folder {root} is not a directory")
    image_files = _files(images, skip=masks)
    if not image_files:
        raise UsageError(f"{images} holds no image files (extensions {', '.join(sorted(EXTENSIONS))})")
    by_image, by_mask = _by_stem(image_files, "images", images), _by_stem(_files(masks), "masks", masks)
    pairs = [(rel, by_mask[stem]) for stem, rel in sorted(by_image.items(), key=lambda item: item[1])
             if stem in by_mask]
    if not pairs:
        raise UsageError(f"none of the {len(image_files)} images under {images} has a label map under {masks} with the "
                         f"same file stem (e.g. {image_files[0]}); expected MASKS/<...>/<stem>.png for "
                         "IMAGES/<...>/<stem>.jpg")
    return (pairs, sorted(rel for stem, rel in by_image.items() if stem not in by_mask),
            sorted(rel for stem, rel in by_mask.items() if stem not in by_image))


def read_mask(data: bytes) -> np.ndarray:
    """The class-id map (HxW uint8) of an encoded label map in mode P or L; raises ValueError for another mode."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with Image.open(io.BytesIO(data)) as mask:
            mask.load()
            if mask.mode not in MASK_MODES:
                raise ValueError(f"mask mode {mask.mode}: a label map must hold one class id a pixel (mode P or L), "
                                 "not colours")
            return np.asarray(mask)


def _probe_pair(paths: tuple[str, str]) -> tuple[str | None, str, int, int]:
    """As ``probe_image`` for the image, and the mask must be a readable P or L map of the image's size."""
    reason, mode, width, height = probe_image(paths[0])
    if reason:
        return reason, mode, width, height
    try:
        ids = read_mask(read_source(paths[1]))
    except Exception as err:
        return f"mask {paths[1]}: {type(err).__name__}: {err}", "", 0, 0
    if ids.shape != (height, width):
        return (f"mask {paths[1]}: size {ids.shape[1]}x{ids.shape[0]} differs from the image's {width}x{height}", "",
                0, 0)
    return None, mode, width, height


class _SegmentationSamples(SampleReader):
    """Image, mask (ids in three channels, always raw) and index; the image's storage switches as in
    ``SampleReader``."""

    PAGE_BYTES_PER_PIXEL = 9  # the image as in SampleReader plus 3 bytes of raw mask
    IMAGES_PER_SAMPLE = 2

    def fields(self, jpeg_quality: int) -> dict:
        from ffcv.fields import IntField, RGBImageField

        self.field = RGBImageField(write_mode="raw", max_resolution=self.max_side, jpeg_quality=jpeg_quality)
        return {"image": self.field, "mask": RGBImageField(write_mode="raw"), "index": IntField()}

    def load(self, index: int) -> tuple:
        image_path, mask_path = self.sources[index]
        image, _ = decode_rgb(read_source(image_path))
        ids = shrunk(Image.fromarray(read_mask(read_source(mask_path))), self.max_side, Image.Resampling.NEAREST)
        return (shrunk(image, self.max_side, Image.Resampling.LANCZOS), np.repeat(ids[..., None], 3, axis=2),
                index)


def convert_segmentation(images, masks, out, max_side: int = 512, jpeg_quality: int = 90,
                         compress_share: float = 0.5, raw: bool = False, chunk_size: int = 100,
                         workers: int | None = None, overwrite: bool = False) -> dict:
    """Convert the images under ``images`` and their label maps under ``masks`` to the FFCV file ``out``; return the
    report, also written to ``out.report.json``. Options as for ``convert_imagefolder``."""
    start = time.perf_counter()
    out, settings = checked_settings(out, max_side, jpeg_quality, compress_share, raw, chunk_size, workers, overwrite)
    pairs, lonely_images, lonely_masks = pair_files(images, masks)
    images, masks = Path(images).resolve(), Path(masks).resolve()
    samples = [(rel, (str(images / rel), str(masks / mask)), 0) for rel, mask in pairs]
    layout = {"masks": str(masks), "paired": len(pairs), "without_mask": len(lonely_images),
              "without_mask_first": lonely_images[:_LISTED], "without_image": len(lonely_masks),
              "without_image_first": lonely_masks[:_LISTED]}
    return write_samples(str(images), samples, [], out, settings, layout, start, probe=_probe_pair,
                    dataset=_SegmentationSamples)
