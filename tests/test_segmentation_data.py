"""``smim-convert segmentation`` and ``FFCVSegmentationLoader``: images paired with label maps by file stem, ids kept
exactly through conversion and the nearest-neighbour resize, ranks covering every sample once.

The FFCV loader module is imported here first, so the converter's forked writer inherits FFCV already imported."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from smim_dist.config import ConfigError
from smim_dist.data.convert import UsageError
from smim_dist.data.convert_cli import main
from smim_dist.data.demo import CLASS_NAMES, ensure_demo_dataset
from smim_dist.data.ffcv_loader import FFCVSegmentationLoader
from smim_dist.data.segmentation import convert_segmentation, pair_files

SIZE = 32


def nearest(ids: np.ndarray, size: int) -> np.ndarray:
    """The map under each output pixel's centre: ResizeDecoder's rule, in numpy."""
    rows = (2 * np.arange(size) + 1) * ids.shape[0] // (2 * size)
    cols = (2 * np.arange(size) + 1) * ids.shape[1] // (2 * size)
    return ids[rows][:, cols]


def load(path, img_size=SIZE, batch_size=5, rank=0, world_size=1):
    batches = FFCVSegmentationLoader(path, img_size, batch_size, rank, world_size, num_workers=2)
    images, masks, indices = zip(*[(i.clone(), m, x.clone()) for i, m, x in batches])  # FFCV reuses its buffers
    return torch.cat(images), torch.cat(masks), torch.cat(indices)[:, 0]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = ensure_demo_dataset(tmp_path_factory.mktemp("seg") / "demo", num_train=12, num_val=12, size=64)
    out = root.parent / "val_seg.beton"
    report = convert_segmentation(root / "val", root / "masks/val", out, max_side=64, workers=2)
    return root, out, report


@pytest.fixture(scope="module")
def whole(demo):
    """The demo split read by one rank; each loader costs a few seconds of numba compilation."""
    return load(demo[1])


def test_the_demo_split_converts_with_every_image_paired(demo):
    root, out, report = demo
    assert report["written"] == report["paired"] == 12
    assert report["skipped"] == [] and report["without_mask"] == report["without_image"] == 0
    assert report["without_mask_first"] == []
    assert json.loads((root.parent / "val_seg.beton.report.json").read_text())["written"] == 12
    assert 0 < report["compressed"] < 12, "the images follow --compress-share (default 0.5)"


def test_label_maps_are_exact_nearest_resizes_of_the_mask_files(demo, whole):
    root, _, _ = demo
    images, masks, indices = whole
    assert images.shape == (12, 3, SIZE, SIZE) and images.dtype == torch.uint8
    assert masks.shape == (12, SIZE, SIZE) and masks.dtype == torch.int64
    assert indices.tolist() == list(range(12))
    assert set(masks.unique().tolist()) <= set(range(len(CLASS_NAMES) + 1)), "0 background, 1 + class index"
    pairs, _, _ = pair_files(root / "val", root / "masks/val")
    for index, (image_file, mask_file) in enumerate(pairs):
        ids = np.asarray(Image.open(root / "masks/val" / mask_file))
        expected = nearest(ids, SIZE)
        assert np.array_equal(expected, np.asarray(Image.fromarray(ids).resize((SIZE, SIZE), Image.NEAREST)))
        assert np.array_equal(masks[index].numpy(), expected), image_file
        area = np.asarray(Image.open(root / "val" / image_file).convert("RGB").resize((SIZE, SIZE), Image.BOX))
        difference = np.abs(images[index].permute(1, 2, 0).numpy().astype(float) - area).mean()
        assert difference < 8, (image_file, difference)  # the image is the mask's, up to JPEG and resize kernels


def test_ranks_cover_every_sample_once(demo, whole):
    _, out, _ = demo
    seen = []
    for rank in range(2):
        images, masks, indices = load(out, batch_size=4, rank=rank, world_size=2)
        assert indices.tolist() == list(range(rank, 12, 2))
        assert torch.equal(masks, whole[1][rank::2]) and torch.equal(images, whole[0][rank::2])
        seen += indices.tolist()
    assert sorted(seen) == list(range(12))


def test_palette_ids_are_kept_and_bad_masks_are_skipped_with_reasons(tmp_path, capsys):
    images, masks = tmp_path / "JPEGImages", tmp_path / "SegmentationClass"
    images.mkdir(), masks.mkdir()
    rng = np.random.default_rng(0)
    ids = np.zeros((36, 48), np.uint8)
    ids[5:30, 10:40] = 1
    ids[5:30, 6:10] = ids[5:30, 40:44] = 255  # VOC's ignored border
    palette = Image.fromarray(ids, "P")
    palette.putpalette([0, 0, 0, 128, 0, 0] + [0, 0, 0] * 253 + [224, 224, 192])
    for stem in ("a", "b", "c", "d"):
        Image.fromarray(rng.integers(0, 256, (36, 48, 3), dtype=np.uint8)).save(images / f"{stem}.jpg")
    palette.save(masks / "a.png")
    palette.convert("RGB").save(masks / "b.png")  # colours, not ids
    palette.resize((24, 18), Image.NEAREST).save(masks / "c.png")  # another size than its image
    palette.save(masks / "e.png")  # no image
    out = tmp_path / "voc.beton"
    assert main(["segmentation", str(images), str(masks), str(out), "--max-side", "32", "--workers", "2"]) == 0
    assert "Wrote 1 images" in capsys.readouterr().out
    report = json.loads((tmp_path / "voc.beton.report.json").read_text())
    assert report["written"] == 1 and report["paired"] == 3
    assert report["without_mask"] == 1 and report["without_mask_first"] == ["d.jpg"]
    assert report["without_image"] == 1 and report["without_image_first"] == ["e.png"]
    reasons = {entry["path"]: entry["reason"] for entry in report["skipped"]}
    assert set(reasons) == {"b.jpg", "c.jpg"}
    assert "mode RGB" in reasons["b.jpg"] and "24x18 differs from the image's 48x36" in reasons["c.jpg"]

    _, loaded, _ = load(out, img_size=16)
    shrunk = np.asarray(palette.resize((32, 24), Image.NEAREST))  # --max-side 32 shrinks the map with NEAREST
    assert set(np.unique(shrunk)) == {0, 1, 255}
    assert np.array_equal(loaded[0].numpy(), nearest(shrunk, 16))
    assert set(loaded.unique().tolist()) == {0, 1, 255}, "palette indices are the ids, not colours"


def test_a_beton_without_masks_is_refused(demo):
    root, _, _ = demo
    with pytest.raises(ConfigError, match="segmentation needs 'image' and 'mask' RGBImageFields"):
        FFCVSegmentationLoader(root / "val.beton", SIZE, 4)
    with pytest.raises(ConfigError, match="does not exist"):
        FFCVSegmentationLoader(root / "missing.beton", SIZE, 4)


def test_unpairable_folders_are_usage_errors(tmp_path, capsys):
    images, masks = tmp_path / "images", tmp_path / "masks"
    (images / "sub").mkdir(parents=True), masks.mkdir()
    Image.new("RGB", (8, 8)).save(images / "x.jpg")
    Image.new("L", (8, 8)).save(masks / "y.png")
    with pytest.raises(UsageError, match="none of the 1 images .* has a label map"):
        convert_segmentation(images, masks, tmp_path / "out.beton")
    assert main(["segmentation", str(images), str(masks), str(tmp_path / "out.beton")]) == 2
    assert "has a label map" in capsys.readouterr().err
    Image.new("RGB", (8, 8)).save(images / "sub/x.png")
    with pytest.raises(UsageError, match=r"x: sub/x.png, x.jpg"):
        convert_segmentation(images, masks, tmp_path / "out.beton")
    assert not list(tmp_path.glob("out.beton*"))
