"""smim-convert on a small ImageFolder tree of real photos plus the awkward files a web-scale crawl contains, and on
webdataset tar shards holding the same kinds of files.

Every conversion pays FFCV's import (numba compiles at import time, several seconds), so the three ImageFolder
conversions start together in one fixture and the checks share their results; the webdataset conversions run in this
process through ``main``, where the forked writer inherits FFCV already imported.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import data

from conftest import REPO
from smim_dist.data.convert import _compressed
from smim_dist.data.convert_cli import main
from smim_dist.data.tar_index import index_tar

MAX_SIDE = 256
CLASSES = ["animals", "objects", "people"]
BROKEN = {"animals/truncated.jpg": "truncated", "objects/empty.jpg": "empty file", "people/notes.jpg": "identify"}
CONVERTED = {"CMYK": 1, "L": 1, "P": 1, "RGBA": 1, "I;16": 1}
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}

FAIL_SCRIPT = """
import sys
import smim_dist.data.convert as convert
from smim_dist.data.convert_cli import main

read = convert.SampleReader.__getitem__

def changed_on_disk(self, index):  # as if a file were replaced by garbage between the two passes
    if index == 2:
        self.sources[index] = __file__
    return read(self, index)

convert.SampleReader.__getitem__ = changed_on_disk
sys.exit(main())
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


def _reference(path: Path | io.BytesIO) -> np.ndarray:
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
    command = [str(script)] if script else ["-m", "smim_dist.data.convert_cli"]
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


@pytest.mark.e2e
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


@pytest.mark.e2e
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


@pytest.mark.e2e
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


@pytest.mark.e2e
def test_existing_output_is_refused_without_overwrite(runs):
    target = runs["out"] / "mixed.beton"
    before = target.stat().st_mtime_ns, target.read_bytes()
    proc = _finish(_convert(runs["src"], target, "--max-side", MAX_SIDE))
    assert proc.returncode == 2
    assert str(target) in proc.stderr and "--overwrite" in proc.stderr
    assert (target.stat().st_mtime_ns, target.read_bytes()) == before


@pytest.mark.e2e
def test_failed_run_leaves_no_output_and_no_temp_file(runs):
    proc = runs["fail"]
    assert proc.returncode == 1, proc.stderr[-4000:]
    assert "decoded in the first pass but not now" in proc.stderr and "writing" in proc.stderr
    assert not (runs["out"] / "fail.beton").exists()
    assert not (runs["out"] / "fail.beton.report.json").exists()
    _no_temp_files(runs["out"])


@pytest.mark.e2e
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


def _encode(image: np.ndarray | Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    (image if isinstance(image, Image.Image) else Image.fromarray(image)).save(buf, format=fmt, **kw)
    return buf.getvalue()


def _write_tar(path: Path, members: list[tuple[str, bytes]]) -> bytes:
    with tarfile.open(path, "w") as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return path.read_bytes()


def _make_shards(root: Path) -> dict:
    """Two shards in img2dataset's layout with one sample per awkward case; returns the expected good samples (name,
    label, image bytes) in shard order and the expected skips (name -> part of the reason)."""
    cat, coffee, astronaut = data.chelsea(), data.coffee(), data.astronaut()
    alpha = np.zeros((96, 64), np.uint8)
    alpha[:, 32:] = 255
    images = {
        "000000.jpg": _encode(cat, "JPEG", quality=95),  # 451x300: shrunk
        "000001.png": _encode(np.dstack([astronaut[:96, 100:164], alpha]), "PNG"),  # RGBA
        "000002.webp": _encode(data.camera()[:60, :90], "WEBP", lossless=True),  # grey in, RGB out of libwebp
        "part/000004.JPEG": _encode(Image.fromarray(coffee[:150, :220]).convert("CMYK"), "JPEG"),
        "000007.jpg": _encode(astronaut[200:264, 200:300], "JPEG"),
    }
    shards = root / "shards"
    shards.mkdir()
    _write_tar(shards / "00000.tar", [
        ("000000.jpg", images["000000.jpg"]), ("000000.cls", b"3"), ("000000.txt", b"a cat"),
        ("000001.png", images["000001.png"]), ("000001.cls", b"1\n"), ("000001.json", b"{}"),
        ("000002.webp", images["000002.webp"]),
        ("000003.txt", b"a caption whose image failed to download"), ("000003.json", b"{}"),
    ])
    _write_tar(shards / "00001.tar", [
        ("part/000004.JPEG", images["part/000004.JPEG"]), ("part/000004.cls", b"7"),
        ("000005.jpg", b""), ("000005.cls", b"0"),
        ("000006.jpg", b"an HTML error page saved as an image"), ("000006.cls", b"0"),
        ("000007.png", _encode(coffee[:40, :50], "PNG")), ("000007.jpg", images["000007.jpg"]), ("000007.cls", b"2"),
    ])
    first, second = shards / "00000.tar", shards / "00001.tar"
    good = [(f"{first}:000000.jpg", 3), (f"{first}:000001.png", 1), (f"{first}:000002.webp", -1),
            (f"{second}:part/000004.JPEG", 7), (f"{second}:000007.jpg", 2)]
    return {
        "spec": f"{shards}/{{00000..00001}}.tar",
        "good": [(name, label, images[name.split(":")[1]]) for name, label in good],
        "skipped": {f"{first}:000003": "no image member", f"{second}:000005.jpg": "empty file",
                    f"{second}:000006.jpg": "UnidentifiedImageError"},
    }


def _make_cut_shard(root: Path) -> dict:
    """A shard of eight labelled noise images cut in half inside an image, and the samples before that one."""
    rng = np.random.default_rng(0)
    members = []
    for i in range(8):
        members += [(f"{i:06d}.png", _encode(rng.integers(0, 256, (24, 24, 3), np.uint8), "PNG")),
                    (f"{i:06d}.cls", str(i).encode())]
    full = _write_tar(root / "full.tar", members)
    cut = len(full) // 2
    with tarfile.open(root / "full.tar") as tar:
        hit = [m.name for m in tar.getmembers() if m.offset_data <= cut < m.offset_data + m.size]
    assert hit and hit[0].endswith(".png"), f"the cut at byte {cut} should fall inside an image, not {hit}"
    (root / "cut.tar").write_bytes(full[:cut])
    kept = int(hit[0].split(".")[0])
    return {"path": root / "cut.tar", "kept": kept, "lost": f"{root / 'cut.tar'}:{kept:06d}",
            "images": [members[2 * i][1] for i in range(kept)]}


def _main(*args) -> tuple[int, str, str]:
    """smim-convert's main() in this process, its output captured and pytest's SIGTERM handler restored."""
    stdout, stderr, handler = io.StringIO(), io.StringIO(), signal.getsignal(signal.SIGTERM)
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            code = main([str(arg) for arg in args])
    finally:
        signal.signal(signal.SIGTERM, handler)
    return code, stdout.getvalue(), stderr.getvalue()


@pytest.fixture(scope="module")
def shard_runs(tmp_path_factory) -> dict:
    """A raw conversion of the two shards, and a mixed one of a cut shard listed with the first of them."""
    from ffcv.reader import Reader  # noqa: F401  (imported once here, inherited by each forked writer)

    root = tmp_path_factory.mktemp("convert_shards")
    shards, cut = _make_shards(root), _make_cut_shard(root)
    common = ["--max-side", MAX_SIDE, "--workers", 2, "--chunk-size", 2]
    runs = {"shards": shards, "cut": cut, "root": root}
    runs["raw"] = _main("webdataset", shards["spec"], root / "raw.beton", *common, "--raw")
    runs["mixed"] = _main("webdataset", f"{cut['path']},{root}/shards/00000.tar", root / "mixed.beton", *common)
    for name in ("raw", "mixed"):
        code, _, stderr = runs[name]
        assert code == 0, stderr[-4000:]
        runs[name + "_report"] = json.loads((root / f"{name}.beton.report.json").read_text())
    return runs


@pytest.mark.e2e
def test_webdataset_report_lists_skips_and_conversions(shard_runs):
    report, shards = shard_runs["raw_report"], shard_runs["shards"]
    assert {skip["path"] for skip in report["skipped"]} == shards["skipped"].keys()
    for skip in report["skipped"]:
        assert shards["skipped"][skip["path"]] in skip["reason"], skip
    assert report["written"] == len(shards["good"]) == 5
    assert report["converted"] == {"CMYK": 1, "RGBA": 1}
    assert report["source"] == shards["spec"] and report["shards"] == 2 and "classes" not in report
    assert report["compressed"] == 0 and report["settings"]["raw"]
    assert "Wrote 5 images (0 as JPEG) from 2 shards" in shard_runs["raw"][1]
    _no_temp_files(shard_runs["root"])


@pytest.mark.e2e
def test_webdataset_beton_holds_the_images_labels_and_positions(shard_runs):
    beton, good = _read_beton(shard_runs["root"] / "raw.beton"), shard_runs["shards"]["good"]
    assert beton["field_names"] == ["image", "label", "index"]
    assert beton["index"] == list(range(len(good)))
    assert beton["labels"] == [label for _, label, _ in good] == [3, 1, -1, 7, 2]
    assert [image.shape for image in beton["images"]] == [(170, 256, 3), (96, 64, 3), (60, 90, 3), (150, 220, 3),
                                                          (64, 100, 3)]
    for (name, _, payload), image in zip(good, beton["images"]):
        np.testing.assert_array_equal(image, _reference(io.BytesIO(payload)), err_msg=name)


@pytest.mark.e2e
def test_cut_shard_is_reported_and_its_intact_samples_kept(shard_runs):
    report, cut = shard_runs["mixed_report"], shard_runs["cut"]
    first = f"{shard_runs['root']}/shards/00000.tar"
    reasons = {skip["path"]: skip["reason"] for skip in report["skipped"]}
    assert reasons.keys() == {str(cut["path"]), cut["lost"], f"{first}:000003"}
    assert reasons[str(cut["path"])] == f"ReadError: unexpected end of data; kept the {cut['kept']} samples before it"
    assert report["written"] == cut["kept"] + 3 and report["shards"] == 2
    beton = _read_beton(shard_runs["root"] / "mixed.beton")
    assert beton["labels"] == [*range(cut["kept"]), 3, 1, -1]
    assert [image.shape for image in beton["images"][:cut["kept"]]] == [(24, 24, 3)] * cut["kept"]
    raw = [(payload, image) for payload, image, mode in zip(cut["images"], beton["images"], beton["modes"]) if mode]
    assert raw, "the mixed file should store some of the cut shard's images raw"
    for payload, image in raw:  # noise is what JPEG keeps worst, so only the raw ones are compared
        np.testing.assert_array_equal(image, _reference(io.BytesIO(payload)))


@pytest.mark.parametrize("case, spec, message", [
    ("pipe", "pipe:curl -s https://host/{{0..3}}.tar", ["'pipe:curl -s https://host/0.tar'", "data.source=webdataset",
                                                         "download them first"]),
    ("url", "https://host/{{0..3}}.tar", ["'https://host/0.tar' is not a local file"]),
    ("no match", "{root}/none/{{00000..00003}}.tar", ["4 of the 4 shards", "{root}/none/00000.tar"]),
    ("one missing", "{root}/a.tar,{root}/b.tar", ["1 of the 2 shards", "{root}/b.tar"]),
])
def test_webdataset_bad_shards_exit_2_before_any_work(tmp_path, case, spec, message):
    _write_tar(tmp_path / "a.tar", [("0.txt", b"x")])
    code, stdout, stderr = _main("webdataset", spec.format(root=tmp_path), tmp_path / "o.beton")
    assert code == 2 and stdout == "", (case, stderr)
    for part in message:
        assert part.format(root=tmp_path) in stderr, (case, stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tar"]


def test_webdataset_existing_output_is_refused_without_overwrite(tmp_path):
    _write_tar(tmp_path / "a.tar", [("0.jpg", _encode(data.chelsea()[:32, :32], "JPEG"))])
    target = tmp_path / "o.beton"
    target.write_bytes(b"an older conversion")
    before = target.stat().st_mtime_ns
    code, _, stderr = _main("webdataset", tmp_path / "a.tar", target)
    assert code == 2 and str(target) in stderr and "--overwrite" in stderr
    assert (target.stat().st_mtime_ns, target.read_bytes()) == (before, b"an older conversion")


def test_shard_cut_between_members_is_reported(tmp_path):
    """tarfile ends quietly where a header is missing or garbled; the index must not."""
    members = [(f"{i}.{ext}", payload) for i in range(3) for ext, payload in (("jpg", b"x" * 600), ("cls", b"5"))]
    full = _write_tar(tmp_path / "full.tar", members)
    with tarfile.open(tmp_path / "full.tar") as tar:
        boundary = tar.getmember("2.jpg").offset
    garbled = full[:boundary] + b"?" * 512 + full[boundary + 512:]
    for name, damaged in [("cut.tar", full[:boundary]), ("garbled.tar", garbled)]:
        path = tmp_path / name
        path.write_bytes(damaged)
        samples, skipped = index_tar(str(path))
        assert samples == [(f"{path}:0.jpg", (str(path), 512, 600), 5)]
        assert skipped == [
            {"path": str(path), "reason": f"ReadError: no valid header or end-of-archive block at byte {boundary}; "
                                          "kept the 1 samples before it"},
            {"path": f"{path}:1", "reason": "cut off by the shard's error"},
        ]


@pytest.mark.e2e
def test_a_killed_conversion_leaves_no_writer_and_its_temporary_is_removed_by_the_next(tmp_path):
    """SIGKILL to smim-convert while FFCV writes: the writer (its own process group) ends too instead of finishing a
    hidden file nobody removes, and the next conversion into that folder removes what the dead one left."""
    import psutil

    src = tmp_path / "src" / "noise"
    src.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for index in range(300):
        Image.fromarray(rng.integers(0, 256, (320, 320, 3), dtype=np.uint8)).save(src / f"{index}.png")
    out = tmp_path / "out" / "noise.beton"
    out.parent.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "smim_dist.data.convert_cli", "imagefolder", str(src.parent),
                             str(out), "--raw", "--max-side", "320", "--workers", "1"], cwd=REPO, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while not [p for p in out.parent.glob(".noise.beton.tmp-*") if p.stat().st_size > (1 << 20)]:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
    writers = psutil.Process(proc.pid).children(recursive=True)
    proc.kill()
    proc.communicate()
    _, alive = psutil.wait_procs(writers, timeout=60)
    assert not alive, "the writer outlived smim-convert"
    assert list(out.parent.glob(".noise.beton.tmp-*")), "what the killed conversion left"
    assert _main("imagefolder", src.parent, out, "--raw", "--max-side", "320")[0] == 0
    assert sorted(p.name for p in out.parent.iterdir()) == ["noise.beton", "noise.beton.report.json",
                                                           "noise.beton.sha256"]
