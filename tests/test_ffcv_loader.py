"""The FFCV pre-training and evaluation loaders on the demo set's .beton files."""

import dataclasses
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

from smim_dist.config import ConfigError, load_config
from smim_dist.data.demo import ensure_demo_dataset
from smim_dist.data.ffcv_loader import FFCVEvalLoader
from smim_dist.data.pretrain_loader import build_pretrain_loader

from conftest import REPO


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    return ensure_demo_dataset(tmp_path_factory.mktemp("ffcv") / "demo", num_train=64, num_val=12, size=64)


def config(root, *extra):
    return load_config(REPO / "configs/demo_cpu.yaml", [
        "data.demo=true", f"data.path={root}", "data.demo_images=64", "data.num_workers=2", "model.img_size=32",
        "model.patch_size=8", "optim.global_batch=16", "optim.micro_batch=8", *extra])


@pytest.fixture(scope="module")
def epoch_batches():
    """One epoch's batches from one loader per config, rank and world size, positioned as training positions the
    loader it keeps for the whole run: each new FFCV loader compiles its pipeline, seconds on these cores."""
    loaders = {}

    def batches(cfg, epoch, start_batch=0, rank=0, world_size=1):
        which = (repr(cfg), rank, world_size)
        if which not in loaders:
            loaders[which] = build_pretrain_loader(cfg, rank, world_size)
        loader, positioner = loaders[which]
        positioner.set_epoch(epoch, start_batch)
        return [{key: value.clone() for key, value in batch.items()} for batch in loader]  # FFCV reuses its buffers

    return batches


def test_batches_have_the_model_shapes_masks_and_pixels(demo_root, epoch_batches):
    batches = epoch_batches(config(demo_root), epoch=0)
    assert len(batches) == 8, "64 images / micro-batch 8"
    for batch in batches:
        assert batch["images"].shape == (8, 3, 32, 32) and batch["images"].dtype == torch.uint8
        assert batch["images"].float().std() > 20, "real crops, not blank buffers"
        assert batch["masked"].shape == (8, 10) and batch["visible"].shape == (8, 6), "round(0.6 x 16) masked"
        patches = torch.cat([batch["visible"], batch["masked"]], dim=1).sort(dim=1).values
        assert torch.equal(patches, torch.arange(16).expand(8, 16)), "visible and masked split the grid"
        assert torch.equal(batch["masked"], batch["masked"].sort(dim=1).values)
    indices = torch.cat([b["index"] for b in batches])
    assert sorted(indices.tolist()) == list(range(64)), "every sample once per epoch"


def test_a_sample_is_the_same_for_the_same_seed_and_epoch_only(demo_root, epoch_batches):
    """A new loader too (a resumed run's) gives the same samples."""
    cfg = config(demo_root)
    first, later, again = epoch_batches(cfg, 1), epoch_batches(cfg, 2), epoch_batches(cfg, 1)
    fresh, positioner = build_pretrain_loader(cfg, 0, 1)
    positioner.set_epoch(1)
    for a, b, c in zip(first, again, fresh):
        assert all(torch.equal(a[key], b[key]) and torch.equal(a[key], c[key]) for key in a)
    assert not torch.equal(first[0]["index"], later[0]["index"])
    reseeded = epoch_batches(dataclasses.replace(cfg, seed=1), 1)
    assert not torch.equal(first[0]["index"], reseeded[0]["index"])


def test_ffcv_and_image_files_draw_the_same_crops_and_masks(demo_root, epoch_batches):
    """The .beton stores the ImageFolder samples in ImageFolder's order, so both loaders read the same image for an
    index and key its crop and mask identically; only the resize kernels and JPEG storage differ."""
    ffcv = epoch_batches(config(demo_root), 3)
    files = epoch_batches(config(demo_root, "data.source=imagefolder", "data.num_workers=0"), 3)
    for a, b in zip(ffcv, files):
        assert torch.equal(a["visible"], b["visible"]) and torch.equal(a["masked"], b["masked"])
    same = (ffcv[0]["images"].float() - files[0]["images"].float()).abs().mean()
    shifted = (ffcv[0]["images"].float() - files[1]["images"].float()).abs().mean()
    assert same < 6 < shifted, (same, shifted)


def test_ranks_read_disjoint_shares_that_make_the_same_global_steps(demo_root, epoch_batches):
    """Two ranks x accumulation 2 train on exactly the samples one rank x accumulation 2 sees in each step."""
    two = config(demo_root, "optim.micro_batch=4")
    rank0, rank1 = epoch_batches(two, 1, rank=0, world_size=2), epoch_batches(two, 1, rank=1, world_size=2)
    single = epoch_batches(config(demo_root), 1)
    seen0, seen1 = (set(torch.cat([b["index"] for b in r]).tolist()) for r in (rank0, rank1))
    assert not seen0 & seen1 and len(seen0 | seen1) == 64
    for step in range(4):
        both = torch.cat([b["index"] for b in rank0[2 * step:2 * step + 2] + rank1[2 * step:2 * step + 2]])
        one = torch.cat([b["index"] for b in single[2 * step:2 * step + 2]])
        assert sorted(both.tolist()) == sorted(one.tolist()), f"step {step}"


def test_starting_mid_epoch_yields_exactly_the_rest_of_the_epoch(demo_root, epoch_batches):
    cfg = config(demo_root)
    full, rest = epoch_batches(cfg, 2), epoch_batches(cfg, 2, start_batch=5)
    assert len(rest) == 3
    for a, b in zip(full[5:], rest):
        assert all(torch.equal(a[key], b[key]) for key in a)


def test_an_abandoned_epoch_does_not_disturb_the_next(demo_root, epoch_batches):
    cfg = config(demo_root)
    loader, positioner = build_pretrain_loader(cfg, 0, 1)
    positioner.set_epoch(0)
    next(iter(loader))
    positioner.set_epoch(1, 2)
    resumed = [b["index"].clone() for b in loader]
    assert all(torch.equal(a, b["index"]) for a, b in zip(resumed, epoch_batches(cfg, 1, start_batch=2)))


def test_bad_ffcv_input_is_refused_with_what_to_do(demo_root, tmp_path):
    from ffcv.fields import IntField
    from ffcv.writer import DatasetWriter

    with pytest.raises(ConfigError, match="does not exist.*smim-convert"):
        build_pretrain_loader(config(demo_root, "data.demo=false", f"data.path={tmp_path}/none.beton"), 0, 1)
    other = tmp_path / "labels_only.beton"
    DatasetWriter(str(other), {"label": IntField()}, num_workers=1).from_indexed_dataset([(i,) for i in range(20)])
    with pytest.raises(ConfigError, match=r"has fields \{'label': 'IntField'\}.*'image'"):
        build_pretrain_loader(config(demo_root, "data.demo=false", f"data.path={other}"), 0, 1)
    with pytest.raises(ConfigError, match="median longest side of 64 px, smaller than model.img_size=96"):
        build_pretrain_loader(config(demo_root, "model.img_size=96"), 0, 1)
    with pytest.raises(ConfigError, match="holds 64 images, fewer than one global batch of 128"):
        build_pretrain_loader(config(demo_root, "data.demo=false", f"data.path={demo_root / 'train.beton'}",
                                     "optim.global_batch=128"), 0, 1)


def test_eval_loader_gives_centre_crops_with_labels_split_over_ranks(demo_root):
    classes, class_to_idx = find_classes(str(demo_root / "val"))
    expected = [label for _, label in make_dataset(str(demo_root / "val"), class_to_idx, extensions=IMG_EXTENSIONS)]
    seen = {}
    for rank in range(2):
        for images, labels, indices in FFCVEvalLoader(demo_root / "val.beton", 32, 5, rank, 2, num_workers=1):
            assert images.shape[1:] == (3, 32, 32) and images.dtype == torch.uint8
            seen.update(zip(indices[:, 0].tolist(), labels[:, 0].tolist()))
    assert seen == dict(enumerate(expected)), "each sample once, with its ImageFolder label"
    assert len(np.unique(list(seen.values()))) == len(classes)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_dying_loading_thread_raises_instead_of_hanging(demo_root, monkeypatch):
    from ffcv.loader.epoch_iterator import EpochIterator

    def disk_gone(*args):
        raise OSError("disk gone")

    loader, positioner = build_pretrain_loader(config(demo_root), 0, 1)
    monkeypatch.setattr(EpochIterator, "run_pipeline", disk_gone)
    positioner.set_epoch(0)
    with pytest.raises(RuntimeError, match="FFCV's loading thread died"):
        next(iter(loader))


@pytest.mark.e2e
@pytest.mark.parametrize("source", ["imagefolder", "webdataset"])
def test_runs_that_read_other_sources_never_import_ffcv(demo_root, source):
    """Importing FFCV compiles numba code, about 5 s in every process; runs of the other sources skip it."""
    overrides = ["data.demo=true", f"data.path={demo_root}", "data.demo_images=64", "data.num_workers=0",
                 "model.img_size=32", "model.patch_size=8", "optim.global_batch=8", "optim.micro_batch=8",
                 f"data.source={source}"]
    code = textwrap.dedent(f"""
        import sys
        import smim_dist.train
        from smim_dist.config import load_config
        from smim_dist.data.pretrain_loader import build_pretrain_loader
        cfg = load_config("configs/demo_cpu.yaml", {overrides!r})
        loader, _ = build_pretrain_loader(cfg, 0, 1)
        assert next(iter(loader))["images"].shape == (8, 3, 32, 32)
        print(sorted(name for name in sys.modules if name.split(".")[0] == "ffcv"))
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_colour_jitter_is_the_image_file_loaders():
    """The FFCV decoder jitters colours as the image-file loader does (torchvision's uint8 functions), so both train
    on the same colours: photographs and noise, factors of strength 0.4 (the paper configs'). Equal where torch's CPU
    kernels are vectorised (with fused multiply-adds); within one level on a few values where they are not."""
    import torchvision.transforms.v2.functional as TF
    from skimage import data as photos

    from smim_dist.data.ffcv_ops import jitter_in_place

    rng = np.random.default_rng(0)
    images = [photos.astronaut()[:224, :224], photos.chelsea()[:224, :224], photos.coffee()[:224, :224],
              rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)]
    for image in images:
        for brightness, contrast, saturation in rng.uniform(0.6, 1.4, (5, 3)):
            ours = image.copy()
            jitter_in_place(ours, brightness, contrast, saturation)
            theirs = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
            for adjust, factor in ((TF.adjust_brightness, brightness), (TF.adjust_contrast, contrast),
                                   (TF.adjust_saturation, saturation)):
                theirs = adjust(theirs, factor)
            difference = np.abs(ours.astype(int) - theirs.permute(1, 2, 0).numpy().astype(int))
            if torch.backends.cpu.get_cpu_capability() != "DEFAULT":
                assert difference.max() == 0, ((difference > 0).mean(), brightness, contrast, saturation)
            assert difference.max() <= 1 and (difference > 0).mean() < 0.005, (difference.max(), difference.mean())
