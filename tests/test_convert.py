"""smim-convert on a small ImageFolder tree of real photos plus the awkward files a web-scale crawl contains.

Every conversion pays FFCV's import (numba compiles at import time, several seconds), so the three real conversions
start together in one fixture and the checks share their results.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import data

from conftest import REPO
from smim_dist.data.convert import _compressed

MAX_SIDE = 256
CLASSES = ["animals", "objects", "people"]
BROKEN = {"animals/truncated.jpg": "truncated", "objects/empty.jpg": "empty file", "people/notes.jpg": "identify"}
CONVERTED = {"CMYK": 1, "L": 1, "P": 1, "RGBA": 1, "I;16": 1}
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}

FAIL_SCRIPT = """
import sys
import smim_dist.data.convert as convert

read = convert._Samples.__getitem__

def changed_on_disk(self, index):  # as if a file were replaced by garbage between the two passes
    if index == 2:
        self.paths[index] = __file__
    return read(self, index)

convert._Samples.__getitem__ = changed_on_disk
sys.exit(convert.main())
"""


def _save(image: np.ndarray | Image.Image, path: Path, **kw) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    (image if isinstance(image, Image.Image) else Image.fromarray(image)).save(path, **kw)


def _make_tree(src: Path) -> None:
    """Photos of several sizes (three larger than MAX_SIDE), one file per awkward mode, three broken files."""
    cat, coffee, astronaut = data.chelsea(), data.coffee(), data.astronaut()
    _save(cat, src / "animals/cat.jpg", quality=95)  # 451x300: shrunk
    _save(cat[50:170, 100:300], src / "animals/cat_crop.png")
    _save(Image.fromarray(cat[:200, :240]).quantize(64), src / "animals/cat_palette.png")  # P
    _save(coffee, src / "objects/coffee.jpg", quality=90)  # 600x400: shrunk
    _save(coffee[100:180, 200:300], src / "objects/coffee_crop.png")
    _save(Image.fromarray(data.rocket()).resize((200, 300)), src / "objects/rocket.jpg")
    _save(Image.fromarray(coffee[:150, :220]).convert("CMYK"), src / "objects/coffee_cmyk.jpg")
    _save(astronaut, src / "people/astronaut.jpg")  # 512x512: shrunk
    _save(data.camera()[100:220, 50:230], src / "people/camera_grey.png")  # L
    _save(data.camera()[:150, :200].astype(np.uint16) * 257, src / "people/camera_16bit.png")  # I;16
    alpha = np.zeros((96, 64), np.uint8)
    alpha[:, 32:] = 255
    _save(np.dstack([astronaut[:96, 100:164], alpha]), src / "people/astronaut_alpha.png")  # RGBA
    _save(astronaut[200:264, 200:300], src / "people/more/astronaut_crop.jpg")  # nested, as ImageFolder allows
    (src / "people/readme.txt").write_text("not an image candidate")
    jpeg = (src / "animals/cat.jpg").read_bytes()
    (src / "animals/truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (src / "objects/empty.jpg").write_bytes(b"")
    (src / "people/notes.jpg").write_text("a text file with an image name\n")


def _good_files(src: Path) -> list[str]:
    """Usable files in the converter's (torchvision's) order: class, then directory, then name."""
    found = [str(p.relative_to(src)) for p in src.rglob("*") if p.is_file() and p.suffix != ".txt"]
    good = [rel for rel in found if rel not in BROKEN]
    return sorted(good, key=lambda rel: (rel.split("/")[0], os.path.dirname(rel), os.path.basename(rel)))


def _reference(path: Path) -> np.ndarray:
    """The expected stored pixels, written independently of the converter's code path."""
    with Image.open(path) as image:
        image.load()
        if image.mode == "RGBA":
            rgb = np.asarray(image, np.float64)
            a = rgb[..., 3:] / 255
            image = Image.fromarray(np.round(rgb[..., :3] * a + 255 * (1 - a)).astype(np.uint8))
        elif image.mode == "I;16":
            grey = (np.asarray(image) >> 8).astype(np.uint8)
            image = Image.fromarray(np.dstack([grey] * 3))
        else:
            image = image.convert("RGB")
    scale = MAX_SIDE / max(image.size)
    if scale < 1:
        size = (round(image.width * scale), round(image.height * scale))
        image = image.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    return np.asarray(image)


def _read_beton(path: Path) -> dict:
    """Every sample of a .beton, read with FFCV's Reader. FFCV's Loader cannot return the images as stored: its
    SimpleRGBImageDecoder refuses files whose images differ in size, and the other decoders crop and resize."""
    from ffcv.reader import Reader

    reader = Reader(str(path))
    fields = {name: reader.metadata[f"f{i}"] for i, name in enumerate(reader.field_names)}
    sizes = dict(zip(reader.alloc_table["ptr"].tolist(), reader.alloc_table["size"].tolist()))
    blob = path.read_bytes()
    images = []
    for meta in fields["image"]:
        ptr = int(meta["data_ptr"])
        buf = blob[ptr: ptr + sizes[ptr]]
        if meta["mode"] == 1:  # raw
            images.append(np.frombuffer(buf, np.uint8).reshape(meta["height"], meta["width"], 3))
        else:
            images.append(np.asarray(Image.open(io.BytesIO(buf)).convert("RGB")))
    return {"field_names": reader.field_names, "images": images, "modes": fields["image"]["mode"].tolist(),
            "labels": fields["label"].tolist(), "index": fields["index"].tolist()}


def _convert(*args: str, script: Path | None = None) -> subprocess.Popen:
    command = [str(script)] if script else ["-m", "smim_dist.data.convert"]
    return subprocess.Popen([sys.executable, *command, "imagefolder", *map(str, args)], cwd=REPO, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen) -> subprocess.CompletedProcess:
    stdout, stderr = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def _no_temp_files(directory: Path) -> None:
    assert [p.name for p in directory.iterdir() if ".tmp-" in p.name] == []


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """One JPEG/raw mixed conversion, one raw conversion replacing an existing file, one conversion that fails."""
    root = tmp_path_factory.mktemp("convert")
    src, out = root / "src", root / "out"
    _make_tree(src)
    out.mkdir()
    (out / "raw.beton").write_bytes(b"an older file that --overwrite replaces")
    (root / "fail.py").write_text(FAIL_SCRIPT)
    common = ["--max-side", MAX_SIDE, "--workers", 2, "--chunk-size", 4]
    procs = {
        "mixed": _convert(src, out / "mixed.beton", *common, "--compress-share", 0.5, "--jpeg-quality", 90),
        "raw": _convert(src, out / "raw.beton", *common, "--raw", "--overwrite"),
        "fail": _convert(src, out / "fail.beton", *common, script=root / "fail.py"),
    }
    from ffcv.reader import Reader  # noqa: F401  (FFCV's slow import overlaps the conversions)

    return {"src": src, "out": out, **{name: _finish(proc) for name, proc in procs.items()}}


def _report(runs: dict, name: str) -> dict:
    assert runs[name].returncode == 0, runs[name].stderr[-4000:]
    return json.loads((runs["out"] / f"{name}.beton.report.json").read_text())


@pytest.mark.parametrize("name", ["mixed", "raw"])
def test_report_lists_skips_and_conversions(runs, name):
    report = _report(runs, name)
    good = _good_files(runs["src"])
    assert report["written"] == len(good) == 12
    assert report["classes"] == CLASSES
    assert {s["path"]: s["reason"] for s in report["skipped"]}.keys() == BROKEN.keys()
    for skip in report["skipped"]:
        assert BROKEN[skip["path"]] in skip["reason"], skip
    assert report["converted"] == CONVERTED
    assert report["settings"]["max_side"] == MAX_SIDE and report["settings"]["raw"] == (name == "raw")
    assert report["output"] == str(runs["out"] / f"{name}.beton")
    assert f"Wrote {len(good)} images" in runs[name].stdout and "Report:" in runs[name].stdout
    _no_temp_files(runs["out"])


def test_raw_beton_holds_the_exact_pixels_labels_and_positions(runs):
    beton = _read_beton(runs["out"] / "raw.beton")
    good = _good_files(runs["src"])
    assert beton["field_names"] == ["image", "label", "index"]
    assert beton["index"] == list(range(len(good)))
    assert beton["labels"] == [CLASSES.index(rel.split("/")[0]) for rel in good]
    assert set(beton["modes"]) == {1}
    for rel, image in zip(good, beton["images"]):
        assert max(image.shape[:2]) <= MAX_SIDE
        np.testing.assert_array_equal(image, _reference(runs["src"] / rel), err_msg=rel)


def test_mixed_beton_compresses_the_chosen_share_faithfully(runs):
    beton = _read_beton(runs["out"] / "mixed.beton")
    good = _good_files(runs["src"])
    jpeg = [mode == 0 for mode in beton["modes"]]
    assert jpeg == _compressed(np.arange(len(good)), 0.5).tolist()
    assert sum(jpeg) == _report(runs, "mixed")["compressed"]
    assert abs(sum(jpeg) - len(good) / 2) <= 1
    assert beton["labels"] == [CLASSES.index(rel.split("/")[0]) for rel in good]
    for rel, image, compressed in zip(good, beton["images"], jpeg):
        reference = _reference(runs["src"] / rel)
        assert image.shape == reference.shape, rel
        mse = np.mean((image.astype(np.float64) - reference) ** 2)
        assert (10 * np.log10(255**2 / max(mse, 1e-12)) > 30) if compressed else mse == 0, rel


def test_existing_output_is_refused_without_overwrite(runs):
    target = runs["out"] / "mixed.beton"
    before = target.stat().st_mtime_ns, target.read_bytes()
    proc = _finish(_convert(runs["src"], target, "--max-side", MAX_SIDE))
    assert proc.returncode == 2
    assert str(target) in proc.stderr and "--overwrite" in proc.stderr
    assert (target.stat().st_mtime_ns, target.read_bytes()) == before


def test_failed_run_leaves_no_output_and_no_temp_file(runs):
    proc = runs["fail"]
    assert proc.returncode == 1, proc.stderr[-4000:]
    assert "decoded in the first pass but not now" in proc.stderr and "writing" in proc.stderr
    assert not (runs["out"] / "fail.beton").exists()
    assert not (runs["out"] / "fail.beton.report.json").exists()
    _no_temp_files(runs["out"])


@pytest.mark.parametrize("case, args, message", [
    ("missing src", ["{root}/nope", "{root}/o.beton"], "is not a directory"),
    ("no classes", ["{root}/flat", "{root}/o.beton"], "has no class folders"),
    ("no images", ["{root}/empty", "{root}/o.beton"], "no image files"),
    ("no out dir", ["{root}/good", "{root}/missing/o.beton"], "does not exist"),
    ("not beton", ["{root}/good", "{root}/o.ffcv"], "must end in .beton"),
    ("max side", ["{root}/good", "{root}/o.beton", "--max-side", "8"], "max_side must be"),
    ("quality low", ["{root}/good", "{root}/o.beton", "--jpeg-quality", "0"], "jpeg_quality must be"),
    ("quality high", ["{root}/good", "{root}/o.beton", "--jpeg-quality", "101"], "jpeg_quality must be"),
    ("share", ["{root}/good", "{root}/o.beton", "--compress-share", "1.5"], "compress_share must be"),
])
def test_bad_input_exits_2_before_any_work(tmp_path, case, args, message):
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat/photo.jpg").write_bytes(b"")
    (tmp_path / "empty/cls").mkdir(parents=True)
    (tmp_path / "empty/cls/notes.txt").write_text("no image")
    _save(data.chelsea()[:64, :64], tmp_path / "good/cat/a.png")
    before = sorted(p.name for p in tmp_path.iterdir())
    proc = _finish(_convert(*(a.format(root=tmp_path) for a in args)))
    assert proc.returncode == 2, (case, proc.stderr)
    assert message in proc.stderr, (case, proc.stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == before
