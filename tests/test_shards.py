"""The webdataset shard loader: same batches as the file loader, disjoint rank/worker splits, determinism, exact resume,
corrupt samples counted not fatal, and the shard-spec errors a LAION-scale launch would otherwise hit hours in."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from conftest import REPO
from smim_dist.config import ConfigError, load_config
from smim_dist.data.pretrain_loader import build_pretrain_loader, prepare_demo_data
from smim_dist.data.shards import build_shard_loader, expand_shards, raw_samples

NUM_SHARDS, PER_SHARD, NUM_CORRUPT = 4, 8, 3
SMALL = ["model.img_size=32", "model.patch_size=8", "optim.global_batch=4", "optim.micro_batch=4"]


def config(*extra: str, workers: int = 2):
    return load_config(REPO / "configs/demo_cpu.yaml", [*SMALL, f"data.num_workers={workers}", *extra])


def encoded(rng: np.random.Generator, fmt: str) -> bytes:
    side = rng.integers(48, 81, size=2)
    pixels = rng.integers(0, 256, size=(side[0], side[1], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    """Shards 0.tar..3.tar of 8 samples each; shard 0 holds a non-image .jpg, an empty .jpg and a text-only sample."""
    root = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(0)
    for shard in range(NUM_SHARDS):
        with wds.TarWriter(str(root / f"{shard}.tar")) as sink:
            for i in range(PER_SHARD):
                key = f"{shard:05d}{i:04d}"
                if shard == 0 and i == 2:
                    sink.write({"__key__": key, "jpg": b"definitely not a jpeg", "cls": b"1"})
                elif shard == 0 and i == 4:
                    sink.write({"__key__": key, "jpg": b"", "cls": b"2"})
                elif shard == 0 and i == 6:
                    sink.write({"__key__": key, "txt": b"a caption without its image"})
                elif i % 2:
                    sink.write({"__key__": key, "png": encoded(rng, "PNG"), "cls": str(i).encode()})
                else:
                    sink.write({"__key__": key, "jpg": encoded(rng, "JPEG"), "cls": str(i).encode()})
    return root


def spec(root) -> str:
    return f"{root}/{{0..{NUM_SHARDS - 1}}}.tar"


def batches(loader) -> list[dict]:
    return list(loader)


def assert_same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for name in x:
            assert torch.equal(x[name], y[name]), name


def test_batches_match_file_loader(shard_dir, tmp_path):
    file_cfg = config(f"data.path={tmp_path / 'demo'}", "data.demo_images=16", workers=0)
    prepare_demo_data(file_cfg)
    reference = next(iter(build_pretrain_loader(file_cfg, 0, 1)[0]))
    batch = next(iter(build_shard_loader(config(), spec(shard_dir), 0, 1, epoch=0)))
    assert batch.keys() == reference.keys()
    for name in batch:
        assert batch[name].dtype == reference[name].dtype, name
        assert batch[name].shape == reference[name].shape, name


def test_ranks_read_disjoint_shards_and_keys(shard_dir):
    cfg = config("optim.global_batch=8")
    streams = [build_shard_loader(cfg, spec(shard_dir), rank, 2, epoch=0).dataset for rank in (0, 1)]
    assert set(streams[0].shards).isdisjoint(streams[1].shards)
    assert sorted(streams[0].shards + streams[1].shards) == sorted(expand_shards(spec(shard_dir)))
    keys = [{key for key, _ in raw_samples(stream.shards)} for stream in streams]
    assert keys[0].isdisjoint(keys[1]) and len(keys[0] | keys[1]) == NUM_SHARDS * PER_SHARD
    per_rank = [batches(build_shard_loader(cfg, spec(shard_dir), rank, 2, epoch=0)) for rank in (0, 1)]
    assert len(per_rank[0]) == len(per_rank[1]) == 2 * PER_SHARD // cfg.optim.micro_batch
    assert not torch.equal(per_rank[0][0]["images"], per_rank[1][0]["images"])


def test_deterministic_and_epochs_reshuffle(shard_dir):
    cfg = config()
    first = batches(build_shard_loader(cfg, spec(shard_dir), 0, 1, epoch=0))
    assert len(first) == NUM_SHARDS * PER_SHARD // cfg.optim.micro_batch
    assert_same(first, batches(build_shard_loader(cfg, spec(shard_dir), 0, 1, epoch=0)))
    orders = []
    for epoch in (0, 1):
        stream = build_shard_loader(cfg, spec(shard_dir), 0, 1, epoch=epoch).dataset
        orders.append([key for key, _ in stream.items(stream.shards[0::2], part=0)])
    assert sorted(orders[0]) != orders[0] and orders[0] != orders[1]


def test_corrupt_samples_are_counted_not_fatal(shard_dir):
    epoch = batches(build_shard_loader(config(), spec(shard_dir), 0, 1, epoch=0))
    assert sum(int(batch["corrupt_skipped"]) for batch in epoch) == NUM_CORRUPT


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_equals_tail_of_full_epoch(shard_dir, workers):
    """12 batches need more than the 4 a worker's two shards hold, so the second read is covered too; odd starts
    shift which worker the DataLoader asks first."""
    cfg = config(workers=workers)

    def build(start: int):
        return build_shard_loader(cfg, spec(shard_dir), 0, 1, epoch=3, start_batch=start, batches_per_epoch=12,
                                  shuffle_buffer=5)

    full = batches(build(0))
    assert len(full) == len(build(0)) == 12
    for start in (3, 8, 12):
        assert_same(batches(build(start)), full[start:])


def test_shard_specs(shard_dir):
    urls = expand_shards(spec(shard_dir))
    assert urls == [f"{shard_dir}/{i}.tar" for i in range(NUM_SHARDS)]
    assert expand_shards(f"{urls[0]}, {urls[1]} {shard_dir}/{{2,3}}.tar") == urls
    assert expand_shards("pipe:aws s3 cp s3://b/{000..002}.tar -") == [
        f"pipe:aws s3 cp s3://b/{i:03d}.tar -" for i in range(3)]
    cfg = config()
    piped = batches(build_shard_loader(cfg, f"pipe:cat {spec(shard_dir)}", 0, 1, epoch=0))
    assert_same(piped, batches(build_shard_loader(cfg, spec(shard_dir), 0, 1, epoch=0)))


def test_bad_specs_fail_before_any_work(shard_dir):
    cfg = config()
    with pytest.raises(ValueError, match="no shards"):
        build_shard_loader(cfg, " , ", 0, 1, epoch=0)
    with pytest.raises(ValueError, match=r"1 of 5 shards do not exist.*9\.tar"):
        build_shard_loader(cfg, f"{shard_dir}/{{0..3}}.tar,{shard_dir}/9.tar", 0, 1, epoch=0)
    with pytest.raises(ValueError, match="at least 4 are needed"):
        build_shard_loader(cfg, f"{shard_dir}/{{0..2}}.tar", 0, 2, epoch=0)


@pytest.mark.parametrize("counts", [[], ["--counts"]])
def test_the_stream_resume_benchmark_counts_the_bytes_read_before_the_first_batch(capsys, monkeypatch, counts):
    import runpy

    monkeypatch.setattr("sys.argv", ["stream_resume.py", "--shards", "4", "--per-shard", "64", "--micro-batch", "8",
                                     *counts])
    runpy.run_path(str(REPO / "bench/stream_resume.py"), run_name="__main__")
    rows = {row.split(" | ")[0]: row.split(" | ")[1:] for row in capsys.readouterr().out.splitlines()
            if row.startswith("| ") and "%" in row}
    assert list(rows) == ["| 0%", "| 10%", "| 90%"]
    assert all(float(values[0].split()[0]) > 0 for values in rows.values()), "every start reads its first batch"


@pytest.fixture(scope="module")
def photo_shards(tmp_path_factory):
    """8 shards of 32 noise JPEGs of ~30 kB, as on LAION."""
    root = tmp_path_factory.mktemp("photo_shards")
    rng = np.random.default_rng(1)
    for shard in range(8):
        with wds.TarWriter(str(root / f"{shard}.tar")) as sink:
            for i in range(32):
                image = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (160, 160, 3), dtype=np.uint8)).save(image, format="JPEG")
                sink.write({"__key__": f"{shard:03d}{i:03d}", "jpg": image.getvalue()})
    return root


def resumed_cost(spec: str, start: int, counts=None) -> tuple[list[dict], list[dict], int]:
    """The whole epoch, and the first batch resumed at ``start`` with the bytes it read (the kernel's ``rchar``)."""
    cfg = config("optim.global_batch=8", "optim.micro_batch=8", workers=0)

    def build(begin: int):
        return build_shard_loader(cfg, spec, 0, 1, epoch=2, start_batch=begin, batches_per_epoch=32,
                                  shuffle_buffer=16, counts=counts)

    full = batches(build(0))
    resumed = build(start)
    before = read_bytes()
    first = next(iter(resumed))
    return full, [first], read_bytes() - before


def test_a_late_resume_reads_the_headers_and_its_window_not_the_epoch_so_far(photo_shards):
    """Local .tar shards before the resume point's window are passed over by their headers; only that window's samples
    are read."""
    total = sum(path.stat().st_size for path in photo_shards.glob("*.tar"))
    full, resumed, cost = resumed_cost(f"{photo_shards}/{{0..7}}.tar", 31)
    assert_same(resumed, full[31:])
    assert cost < 0.3 * total, f"{cost} of {total} bytes read to resume at the last batch"


@pytest.mark.parametrize("source", ["local", "pipe"])
def test_with_counted_shards_a_resume_opens_no_shard_before_its_window(photo_shards, tmp_path, capsys, source):
    from smim_dist.data.convert_cli import main as convert
    from smim_dist.data.shard_counts import load_counts

    spec = f"{photo_shards}/{{0..7}}.tar" if source == "local" else f"pipe:cat {photo_shards}/{{0..7}}.tar"
    assert convert(["count", spec, str(tmp_path / "counts.json"), "--workers", "2"]) == 0
    assert f"Counted 256 samples in 8 shards: {tmp_path / 'counts.json'}" in capsys.readouterr().out
    counts = load_counts(tmp_path / "counts.json", expand_shards(spec))
    assert set(counts.values()) == {32}
    readers = 2 if source == "pipe" else 1  # a reaped child's reads count as its parent's: cat's, then ours
    shard = (photo_shards / "0.tar").stat().st_size
    full, resumed, cost = resumed_cost(spec, 31, counts)
    assert_same(resumed, full[31:])
    assert cost < 1.5 * readers * shard, f"{cost} bytes read to resume at the last batch: more than its one shard"


def test_stale_or_wrong_counts_are_refused_with_the_shard_named(photo_shards, tmp_path):
    import json

    from smim_dist.data.shard_counts import load_counts, write_counts

    spec = f"{photo_shards}/{{0..7}}.tar"
    record = write_counts(spec, tmp_path / "counts.json", workers=1)
    first = f"{photo_shards}/0.tar"
    with pytest.raises(ValueError, match="has no count for 1 of the 9 shards"):
        load_counts(tmp_path / "counts.json", [*expand_shards(spec), f"{photo_shards}/8.tar"])
    record["shards"][first]["bytes"] += 512
    (tmp_path / "stale.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match=r"0\.tar is \d+ bytes, not the \d+ it had when counted"):
        load_counts(tmp_path / "stale.json", expand_shards(spec))
    record["shards"][first] = {"samples": 31, "bytes": None}
    (tmp_path / "wrong.json").write_text(json.dumps(record))
    wrong = load_counts(tmp_path / "wrong.json", expand_shards(spec))
    with pytest.raises(ValueError, match=r"0\.tar holds 32 samples, not the 31 data.shard_counts says"):
        resumed_cost(spec, 0, wrong)
    with pytest.raises(ValueError, match="not a counts file"):
        load_counts(photo_shards / "0.tar", expand_shards(spec))
    with pytest.raises(ConfigError, match="data.shard_counts='c.json' counts tar shards, but data.source=ffcv"):
        config("data.shard_counts=c.json", "data.source=ffcv")


def read_bytes() -> int:
    with open("/proc/self/io") as stats:
        return next(int(line.split()[1]) for line in stats if line.startswith("rchar:"))


def test_training_reads_the_counts_file_named_by_the_config_and_refuses_a_bad_one(photo_shards, tmp_path):
    from smim_dist.data.shard_counts import write_counts

    spec = f"{photo_shards}/{{0..7}}.tar"
    write_counts(spec, tmp_path / "counts.json", workers=1)
    common = ["data.demo=false", "data.source=webdataset", f"data.path={spec}", "data.samples_per_epoch=64"]
    loader, _ = build_pretrain_loader(config(*common, f"data.shard_counts={tmp_path / 'counts.json'}"), 0, 1)
    assert loader.counts == dict.fromkeys(expand_shards(spec), 32)
    missing = tmp_path / "missing.json"
    with pytest.raises(ConfigError, match=f"data.shard_counts='{missing}' is not a counts file"):
        build_pretrain_loader(config(*common, f"data.shard_counts={missing}"), 0, 1)


@pytest.fixture(scope="module")
def served_shards(photo_shards):
    """The photo shards over HTTP from 127.0.0.1 (webdataset reads http:// through curl), counting the bytes served."""
    import functools
    import http.server
    import threading

    served = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def copyfile(self, source, outputfile):
            before = source.tell()
            super().copyfile(source, outputfile)
            served.append(source.tell() - before)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             functools.partial(Handler, directory=str(photo_shards)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/{{0..7}}.tar", served
    server.shutdown()


def test_shards_over_http_stream_as_local_ones_and_a_counted_resume_fetches_one_shard(served_shards, photo_shards,
                                                                                       tmp_path, capsys):
    from smim_dist.data.convert_cli import main as convert
    from smim_dist.data.shard_counts import load_counts

    spec, served = served_shards
    local, _, _ = resumed_cost(f"{photo_shards}/{{0..7}}.tar", 31)
    assert convert(["count", spec, str(tmp_path / "counts.json"), "--workers", "2"]) == 0
    counts = load_counts(tmp_path / "counts.json", expand_shards(spec))
    full, resumed, _ = resumed_cost(spec, 0)
    assert_same(full, local)
    served.clear()
    _, resumed, _ = resumed_cost(spec, 31, counts)
    assert_same(resumed, full[31:])
    # resumed_cost reads its whole epoch first: the resume's own fetches are the last ones
    shard = (photo_shards / "0.tar").stat().st_size
    assert served[-1] == shard and sum(served) == 9 * shard, "the epoch (8 shards), then the resume's one shard"
