"""Sharded .beton data sets: ``smim-convert --shard-size`` writes them (here, split over tasks, killed and run again),
``smim-convert verify`` checks them, and FFCV trains on the union exactly as on the single .beton of the same images.
The SLURM job array that writes one is tests/slurm/test_convert_array.py."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import webdataset
from PIL import Image

from conftest import REPO, losses, tiny_overrides, train_cli, train_with_faults
from smim_dist.config import ConfigError, load_config
from smim_dist.data.convert_cli import main as convert
from smim_dist.data.demo import SHARD_PATTERN, ensure_demo_dataset
from smim_dist.data.ffcv_loader import FFCVEvalLoader
from smim_dist.data.pretrain_loader import build_pretrain_loader
from smim_dist.data.sharded_beton import ShardedReader

SIZE = 64
TINY_CONFIG = "configs/demo_cpu.yaml"
DEMO_SETTINGS = ["--max-side", str(SIZE), "--compress-share", "1.0", "--workers", "1"]
"""those the demo set's own train.beton is written with"""


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    return ensure_demo_dataset(tmp_path_factory.mktemp("sharded") / "demo", num_train=64, num_val=12, size=SIZE)


@pytest.fixture(scope="module")
def sharded(demo_root):
    """The demo's 64 training images as shards of 24, 24 and 16."""
    out = demo_root.parent / "sharded"
    assert convert(["imagefolder", str(demo_root / "train"), str(out), "--shard-size", "24", *DEMO_SETTINGS]) == 0
    return out


def config(path, *extra):
    return load_config(REPO / "configs/demo_cpu.yaml", [
        "data.demo=false", f"data.path={path}", "data.num_workers=2", "model.img_size=32", "model.patch_size=8",
        "optim.global_batch=16", "optim.micro_batch=8", *extra])


def epoch_batches(cfg, epoch, start_batch=0, rank=0, world_size=1):
    loader, positioner = build_pretrain_loader(cfg, rank, world_size)
    positioner.set_epoch(epoch, start_batch)
    return [{key: value.clone() for key, value in batch.items()} for batch in loader]  # FFCV reuses its buffers


def assert_same_batches(got, expected):
    assert len(got) == len(expected)
    for ours, theirs in zip(got, expected):
        assert ours.keys() == theirs.keys()
        for key in ours:
            assert torch.equal(ours[key], theirs[key]), key


def test_shards_index_and_manifest_describe_the_images(sharded):
    manifest = json.loads((sharded / "manifest.json").read_text())
    assert [(s["name"], s["samples"]) for s in manifest["shards"]] == [
        ("shard-00000.beton", 24), ("shard-00001.beton", 24), ("shard-00002.beton", 16)]
    assert manifest["samples"] == 64 and manifest["fields"] == ["image", "label", "index"]
    reader = ShardedReader(sharded)
    assert reader.metadata["f2"].tolist() == list(range(64)), "the index field is the position in the union"
    assert reader.metadata["f1"].tolist() == sorted(reader.metadata["f1"].tolist()), "ImageFolder order kept"
    assert convert(["verify", str(sharded)]) == 0


@pytest.mark.parametrize("rank, world_size, start", [(0, 1, 5), (1, 2, 1)])
def test_the_union_reads_exactly_what_the_single_file_does(demo_root, sharded, rank, world_size, start):
    """Same samples, crops, flips, jitter and masks, at any rank and from any micro-batch of an epoch."""
    micro = [f"optim.micro_batch={8 // world_size}"]
    expected = epoch_batches(config(demo_root / "train.beton", *micro), 3, start, rank, world_size)
    assert_same_batches(epoch_batches(config(sharded, *micro), 3, start, rank, world_size), expected)


def test_evaluation_reads_a_sharded_set_as_the_single_file(demo_root, sharded):
    """Centre crops with labels and indices, rank r of 2 reading samples r, r + 2, ..."""
    single, union = ([[tensor.clone() for tensor in batch]  # FFCV reuses its buffers
                      for batch in FFCVEvalLoader(path, 32, 8, rank=1, world_size=2, num_workers=1)]
                     for path in (demo_root / "train.beton", sharded))
    assert len(union) == len(single) == 4
    for ours, theirs in zip(union, single):
        assert all(torch.equal(a, b) for a, b in zip(ours, theirs))


def bytes_read() -> int:
    with open("/proc/self/io") as stats:
        return next(int(line.split()[1]) for line in stats if line.startswith("rchar:"))


def test_an_abandoned_epoch_stops_loading_instead_of_reading_the_rest(sharded):
    """Positioning the loader while an epoch is being loaded stops that epoch's thread (each sample is a pread, so
    /proc/self/io counts what it reads); taking batches off its queue to unblock it used to let it load more (the
    whole rest of the epoch, when loading outpaced the taking)."""
    loader, positioner = build_pretrain_loader(config(sharded, "optim.micro_batch=2"), 0, 1)
    positioner.set_epoch(0)
    before = bytes_read()
    assert len(list(loader)) == 32
    epoch_bytes = bytes_read() - before
    positioner.set_epoch(1)
    next(iter(loader))
    time.sleep(1)  # the batches ahead are loaded: the thread waits for room in its queue
    before = bytes_read()
    positioner.set_epoch(2)
    assert bytes_read() - before < 2 * epoch_bytes / 32, "at most two batches more"


def test_tasks_write_their_own_shards_and_the_last_the_manifest(demo_root, tmp_path, capsys):
    out = tmp_path / "split"
    common = ["imagefolder", str(demo_root / "train"), str(out), "--shard-size", "24", *DEMO_SETTINGS, "--tasks", "2"]
    assert convert([*common, "--task", "0"]) == 0
    assert sorted(p.name for p in out.glob("*.beton")) == ["shard-00000.beton", "shard-00002.beton"]
    assert not (out / "manifest.json").exists() and "2 of 3 shards" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="unfinished sharded conversion \\(2 of 3 shards"):
        build_pretrain_loader(config(out), 0, 1)
    assert convert([*common, "--task", "1"]) == 0
    assert json.loads((out / "manifest.json").read_text())["samples"] == 64
    assert "Wrote 64 images in 3 shards" in capsys.readouterr().out


@pytest.mark.e2e
def test_a_killed_conversion_rewrites_only_what_it_had_not_finished(demo_root, tmp_path):
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "smim_dist.data.convert_cli", "imagefolder", str(demo_root / "train"), str(out),
               "--shard-size", "24", *DEMO_SETTINGS]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 600
    while not (out / "shard-00000.beton.report.json").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "the conversion ended before its first shard"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists()
    first = (out / "shard-00000.beton").stat().st_mtime_ns
    assert convert(command[3:]) == 0
    assert (out / "shard-00000.beton").stat().st_mtime_ns == first, "a whole shard is kept"
    assert not list(out.glob(".*tmp-*")), "the killed task's temporaries are gone"
    assert subprocess.run([*command[:3], "verify", str(out)], capture_output=True).returncode == 0
    again = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert convert(command[3:]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == again, "a finished conversion writes nothing"


def test_damaged_and_mismatched_sets_are_refused(demo_root, sharded, tmp_path, capsys):
    copy = tmp_path / "copy"
    copy.mkdir()
    for path in sharded.iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    shard = copy / "shard-00001.beton"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(data)
    with pytest.raises(ConfigError, match="shard-00001.beton: its bytes do not match the manifest"):
        build_pretrain_loader(config(copy), 0, 1)
    assert convert(["verify", str(copy)]) == 1
    assert "shard-00001.beton" in capsys.readouterr().err
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(ConfigError, match="shard-00001.beton is .* bytes, its manifest says"):
        build_pretrain_loader(config(copy), 0, 1)
    assert convert(["imagefolder", str(demo_root / "train"), str(sharded), "--shard-size", "32"]) == 2, \
        "another plan for the same folder"


def test_webdataset_tars_convert_to_shards_of_whole_tars(demo_root, tmp_path):
    out = tmp_path / "from_tars"
    assert convert(["webdataset", str(demo_root / SHARD_PATTERN), str(out), "--shard-size", "3",
                    *DEMO_SETTINGS]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert [shard["samples"] for shard in manifest["shards"]] == [24, 24, 16], "8 tars of 8 samples, 3 per shard"
    batches = epoch_batches(config(out), 0)
    assert len(batches) == 8 and sorted(torch.cat([b["index"] for b in batches]).tolist()) == list(range(64))


def write_img2dataset_tars(folder, sizes):
    """img2dataset's layout: a resized .jpg, a .txt caption and a .json with the original and the stored size."""
    folder.mkdir()
    for shard, originals in enumerate(sizes):
        with webdataset.TarWriter(str(folder / f"{shard:05d}.tar")) as sink:
            for i, (width, height) in enumerate(originals):
                image = io.BytesIO()
                Image.new("RGB", (48, 32), (40 * i, 80, 120)).save(image, format="JPEG")
                meta = {"width": 48, "height": 32, "original_width": width, "original_height": height}
                sink.write({"__key__": f"{shard:05d}{i:04d}", "jpg": image.getvalue(), "txt": b"a caption",
                            "json": json.dumps(meta).encode()})
    return f"{folder}/{{00000..{len(sizes) - 1:05d}}}.tar"


def test_img2dataset_samples_below_min_size_are_skipped_and_reported(tmp_path):
    spec = write_img2dataset_tars(tmp_path / "tars", [[(640, 480), (90, 400), (300, 300)], [(1024, 99), (100, 100)]])
    out = tmp_path / "laion"
    assert convert(["webdataset", spec, str(out), "--shard-size", "1", "--min-size", "100", "--max-side", "48",
                    "--workers", "1"]) == 0
    reports = [json.loads((out / f"shard-0000{n}.beton.report.json").read_text()) for n in (0, 1)]
    assert [report["written"] for report in reports] == [2, 1]
    assert [skip["reason"] for report in reports for skip in report["skipped"]] == [
        "90x400 in its .json, smaller than --min-size 100", "1024x99 in its .json, smaller than --min-size 100"]
    assert convert(["webdataset", spec, str(tmp_path / "one.beton"), "--min-size", "100", "--max-side", "48",
                    "--workers", "1"]) == 0
    assert json.loads((tmp_path / "one.beton.report.json").read_text())["written"] == 3
    with pytest.raises(SystemExit, match="2"):
        convert(["webdataset", spec, str(tmp_path / "x.beton"), "--min-size", "-1"])


@pytest.mark.e2e
def test_a_run_stopped_on_two_processes_resumes_on_one_as_the_single_file_run(tmp_path, tiny_run, demo_data):
    """The tiny run trains 4 steps on the demo's train.beton; the same images as shards, stopped after 2 steps on 2
    processes and resumed on 1, give its losses (to the reduction order of 2 ranks)."""
    out = tmp_path / "demo_shards"
    assert convert(["imagefolder", str(demo_data / "train"), str(out), "--shard-size", "24", "--max-side", "128",
                    "--compress-share", "1.0", "--workers", "1"]) == 0
    overrides = tiny_overrides(tmp_path, demo_data, "run_name=sharded", "optim.epochs=1", "optim.micro_batch=4",
                               "data.demo=false", f"data.path={out}")
    train_with_faults(2, ["--stop-after", "2"], overrides)
    assert losses(tmp_path / "sharded").keys() == {1, 2}
    train_cli(1, TINY_CONFIG, overrides)
    assert losses(tmp_path / "sharded") == pytest.approx(losses(tiny_run), rel=1e-4)
