import json
import multiprocessing
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from smim_dist.data import demo, demo_layouts
from smim_dist.data.demo import CLASS_NAMES, ensure_demo_dataset, load_manifest, render_sample
from smim_dist.data.demo_layouts import LAYOUT_NAMES

SMALL = dict(num_train=24, num_val=12, size=64, seed=3)


def _tree(root: Path) -> dict[str, bytes]:
    """Every file's bytes, except the conversion reports, which carry their timing."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not p.name.endswith(".report.json")}


def _build_after(barrier, root):
    barrier.wait()
    ensure_demo_dataset(root, **SMALL)


def test_render_is_deterministic_and_varies_with_index():
    a = render_sample(7, "train", 5, 64)
    b = render_sample(7, "train", 5, 64)
    assert a[0].tobytes() == b[0].tobytes() and a[1].tobytes() == b[1].tobytes() and a[2] == b[2]
    assert a[0].shape == (64, 64, 3) and a[0].dtype == np.uint8
    assert a[1].shape == (64, 64) and a[1].dtype == np.uint8
    for other in (render_sample(7, "train", 6, 64), render_sample(7, "val", 5, 64), render_sample(8, "train", 5, 64)):
        assert not np.array_equal(a[0], other[0])


def test_labels_match_masks_and_classes_are_balanced():
    samples = [render_sample(0, "train", i, 64) for i in range(24)]
    for _, mask, label in samples:
        assert mask.max() <= len(CLASS_NAMES)
        counts = np.bincount(mask.ravel(), minlength=len(CLASS_NAMES) + 1)[1:]
        assert label == int(np.argmax(counts))
    assert np.bincount([label for *_, label in samples], minlength=6).tolist() == [4] * 6
    means = np.array([image.reshape(-1, 3).mean(0) for image, *_ in samples])
    assert means.std(0).min() > 10, "images should differ in colour"


def test_each_layout_is_its_class_whatever_the_colours_and_survives_the_flip():
    """The layouts scenes: the label decides where the two colours meet (the mask is the second colour's region), the
    colours are random, and a horizontal flip (pre-training's augmentation) leaves a layout of the same class."""
    samples = [render_sample(0, "train", i, 64, "layouts") for i in range(48)]
    assert np.bincount([label for *_, label in samples], minlength=6).tolist() == [8] * 6
    for image, mask, label in samples:
        assert set(np.unique(mask)) == {0, label + 1}
        inside, outside = image[mask > 0], image[mask == 0]
        assert (inside == inside[0]).all() and (outside == outside[0]).all(), "two flat colours, no grain"
        assert np.abs(inside[0].astype(int) - outside[0]).sum() > 0
    colours = np.array([image.reshape(-1, 3).mean(0) for image, *_ in samples])
    assert colours.std(0).min() > 20, "colour says nothing about the class"
    centres = (np.arange(64) + 0.5) / 32 - 1
    v, u = np.meshgrid(centres, centres, indexing="ij")
    for name in LAYOUT_NAMES:
        flipped = demo_layouts._region(name, u, v, 0.15, -0.1)[:, ::-1]
        mirrored = demo_layouts._region(name, u, v, -0.15, -0.1)
        assert np.array_equal(flipped, mirrored) or np.array_equal(flipped, ~mirrored), name


def test_the_layouts_scenes_build_their_own_classes_and_are_refused_over_shapes(tmp_path):
    root = ensure_demo_dataset(tmp_path / "layouts", **SMALL, scenes="layouts")
    manifest = load_manifest(root)
    assert manifest["scenes"] == "layouts" and manifest["class_names"] == list(LAYOUT_NAMES)
    assert sorted(p.name for p in (root / "train").iterdir()) == sorted(LAYOUT_NAMES)
    shapes = ensure_demo_dataset(tmp_path / "shapes", **SMALL)
    with pytest.raises(ValueError, match=r"'scenes': 'shapes'.*'scenes': 'layouts'.*data\.path"):
        ensure_demo_dataset(shapes, **SMALL, scenes="layouts")
    with pytest.raises(ValueError, match="scenes must be one of"):
        ensure_demo_dataset(tmp_path / "other", **SMALL, scenes="stripes")


def test_a_demo_set_built_before_the_layouts_existed_still_counts_as_shapes(tmp_path):
    root = ensure_demo_dataset(tmp_path / "demo", **SMALL)
    manifest = load_manifest(root)
    del manifest["scenes"]
    (root / "manifest.json").write_text(json.dumps(manifest))
    assert ensure_demo_dataset(root, **SMALL) == root


@pytest.mark.parametrize("bad", [dict(split="test"), dict(size=8), dict(index=-1), dict(seed=True)])
def test_render_rejects_bad_arguments(bad):
    args = dict(seed=0, split="train", index=0, size=64) | bad
    with pytest.raises(ValueError, match=repr(next(iter(bad.values())))):
        render_sample(**args)


def test_dataset_layout_manifest_and_imagefolder(tmp_path):
    from torchvision.datasets import ImageFolder

    root = ensure_demo_dataset(tmp_path / "demo", **SMALL)
    manifest = load_manifest(root)
    assert {k: manifest[k] for k in SMALL} == SMALL
    assert len(manifest["train"]) == 24 and len(manifest["val"]) == 12
    for index in (0, 23):
        entry = manifest["train"][index]
        image, mask, label = render_sample(SMALL["seed"], "train", index, SMALL["size"])
        assert entry["label"] == label
        assert np.array_equal(np.asarray(Image.open(root / entry["image"])), image)
        assert np.array_equal(np.asarray(Image.open(root / entry["mask"])), mask)
    folder = ImageFolder(str(root / "train"))
    assert folder.class_to_idx == {name: i for i, name in enumerate(CLASS_NAMES)}
    by_path = {str(root / e["image"]): e["label"] for e in manifest["train"]}
    assert {path: target for path, target in folder.samples} == by_path
    assert sorted(p.name for p in (root / "masks" / "val").iterdir()) == [f"{i:06d}.png" for i in range(12)]


def test_second_call_is_a_noop(tmp_path):
    root = ensure_demo_dataset(tmp_path / "demo", **SMALL)
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    assert ensure_demo_dataset(root, **SMALL) == root
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"], "no temporary directory left behind"


def test_other_parameters_are_refused_and_nothing_is_deleted(tmp_path):
    root = ensure_demo_dataset(tmp_path / "demo", **SMALL)
    before = _tree(root)
    with pytest.raises(ValueError, match=r"'size': 64.*'size': 32.*data\.path"):
        ensure_demo_dataset(root, **(SMALL | dict(size=32)))
    assert _tree(root) == before


def test_directory_without_manifest_is_refused(tmp_path):
    root = tmp_path / "demo"
    root.mkdir()
    (root / "mine.txt").write_text("user data")
    with pytest.raises(ValueError, match=str(root)):
        ensure_demo_dataset(root, **SMALL)
    assert (root / "mine.txt").read_text() == "user data"


def test_empty_directory_counts_as_absent(tmp_path):
    root = tmp_path / "demo"
    root.mkdir()
    ensure_demo_dataset(root, **SMALL)
    assert load_manifest(root)["size"] == SMALL["size"]


def test_workers_give_the_same_tree(tmp_path):
    serial = ensure_demo_dataset(tmp_path / "serial", **SMALL)
    pooled = ensure_demo_dataset(tmp_path / "pooled", workers=2, **SMALL)
    assert _tree(serial) == _tree(pooled)


@pytest.mark.e2e
def test_concurrent_builds_agree(tmp_path):
    root = tmp_path / "demo"
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_build_after, args=(barrier, root)) for _ in range(2)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=120)
    assert [proc.exitcode for proc in procs] == [0, 0]
    reference = ensure_demo_dataset(tmp_path / "reference", **SMALL)
    assert _tree(root) == _tree(reference)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo", "reference"]


def test_losing_the_race_keeps_the_winner(tmp_path, monkeypatch):
    """Another process renames its finished tree onto root while ours is being built: ours is discarded."""
    root = tmp_path / "demo"
    real_build = demo._build

    def build_and_lose(build, params, workers):
        monkeypatch.setattr(demo, "_build", real_build)
        ensure_demo_dataset(root, **SMALL)
        real_build(build, params, workers)

    monkeypatch.setattr(demo, "_build", build_and_lose)
    assert ensure_demo_dataset(root, **SMALL) == root
    assert _tree(root) == _tree(ensure_demo_dataset(tmp_path / "reference", **SMALL))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo", "reference"]


@pytest.mark.e2e
def test_a_build_killed_midway_leaves_nothing_once_the_next_one_runs(tmp_path):
    root = tmp_path / "demo"
    builder = multiprocessing.get_context("spawn").Process(
        target=ensure_demo_dataset, args=(root,), kwargs=SMALL | dict(num_train=6000))
    builder.start()
    while not list(tmp_path.glob(".demo.tmp-*/train")):
        assert builder.is_alive(), "the build ended before it could be killed"
    builder.kill()
    builder.join()
    assert list(tmp_path.glob(".demo.tmp-*")), "the killed build left its private tree"
    ensure_demo_dataset(root, **SMALL)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]


@pytest.mark.e2e
def test_training_on_a_folder_holding_other_demo_scenes_is_refused_before_any_work(tmp_path):
    from conftest import tiny_overrides, train_cli

    shapes = ensure_demo_dataset(tmp_path / "shapes", **SMALL)
    before = _tree(shapes)
    proc = train_cli(1, "configs/demo_cpu.yaml", tiny_overrides(tmp_path, shapes, "data.demo_scenes=layouts"),
                     check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"data.path={str(shapes)!r}" in proc.stderr and "'scenes': 'layouts'" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert _tree(shapes) == before and not any(tmp_path.glob("*/checkpoints"))
