"""Bytes a resumed webdataset stream reads before its first batch, resumed at 0%, 10% and 90% of an epoch: what a
requeued job pays per loader worker.

    python bench/stream_resume.py                       # 16 shards x 256 samples of ~30 kB
    python bench/stream_resume.py --shards 32 --per-shard 512
    python bench/stream_resume.py --shards 32 --per-shard 512 --counts   # with data.shard_counts (smim-convert count)
    python bench/stream_resume.py --shards 32 --per-shard 512 --sharded-beton   # the same tars as .beton shards

Writes img2dataset-like shards (a noise JPEG of 160 px, ~30 kB, a .txt and a .json per sample) to a temporary
folder, then for each start takes the first batch of one rank's stream with one loader worker (``ShardStream``
iterated in this process, as ``data.num_workers=0`` runs it; with W workers each reads its own part of the shards,
about 1/W of these bytes) and counts the bytes this process read (``rchar`` of /proc/self/io: every read syscall,
page cache hits included). ``--sharded-beton`` converts the tars to a sharded .beton (4 tars a shard) and takes the
first batch of the FFCV loader positioned at each start instead (the loader reads a few batches ahead).
"""

from __future__ import annotations

import argparse
import functools
import io
import itertools
import tempfile
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

from smim_dist.config import load_config
from smim_dist.data.pretrain_loader import build_pretrain_loader
from smim_dist.data.shard_counts import load_counts, write_counts
from smim_dist.data.shards import ShardStream, expand_shards

REPO = Path(__file__).resolve().parents[1]


def bytes_read() -> int:
    with open("/proc/self/io") as stats:
        return next(int(line.split()[1]) for line in stats if line.startswith("rchar:"))


def write_shards(root: Path, shards: int, per_shard: int) -> int:
    rng = np.random.default_rng(0)
    for shard in range(shards):
        with wds.TarWriter(str(root / f"{shard:05d}.tar")) as sink:
            for i in range(per_shard):
                buffer = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (160, 160, 3), dtype=np.uint8)).save(buffer, format="JPEG")
                sink.write({"__key__": f"{shard:05d}{i:05d}", "jpg": buffer.getvalue(), "txt": b"a caption",
                            "json": b'{"width": 160, "height": 160}'})
    return sum(path.stat().st_size for path in root.glob("*.tar"))


def first_batch_cost(cfg, urls: list[str], batches: int, start_batch: int, counts=None) -> int:
    stream = ShardStream(cfg, urls, 0, cfg.optim.micro_batch, 0, start_batch, batches, shuffle_buffer=1000,
                         counts=counts)
    before = bytes_read()
    list(itertools.islice(iter(stream), stream.batch_size))
    return bytes_read() - before


def first_beton_batch_cost(loader, start_batch: int) -> int:
    """Bytes read from positioning the FFCV loader to its first batch; its start (opening the set, and checking its
    checksums where the set is at most 2 GiB) is the same at any position and is printed apart."""
    before = bytes_read()
    loader.set_epoch(0, start_batch)
    next(iter(loader))
    return bytes_read() - before


def sharded_beton_config(cfg, folder: Path, tars: str):
    """The tars as a sharded .beton in ``folder``, and ``cfg`` reading it with one FFCV thread."""
    from smim_dist.data.convert import checked_options
    from smim_dist.data.convert_shards import plan_webdataset, run_task, start

    settings = checked_options(160, 90, 1.0, False, 100, 2)
    run_task(start(folder / "beton", plan_webdataset(tars, 4, settings), False), settings)
    return load_config(REPO / "configs/demo_cpu.yaml", [f"optim.micro_batch={cfg.optim.micro_batch}",
                                                      f"optim.global_batch={cfg.optim.global_batch}",
                                                      "model.img_size=32", "data.demo=false", "data.num_workers=1",
                                                      f"data.path={folder / 'beton'}"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=16)
    parser.add_argument("--per-shard", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=32)
    parser.add_argument("--counts", action="store_true", help="count the shards first and resume with the counts")
    parser.add_argument("--sharded-beton", action="store_true", help="resume FFCV on the tars as a sharded .beton")
    args = parser.parse_args()
    cfg = load_config(REPO / "configs/demo_cpu.yaml", [f"optim.micro_batch={args.micro_batch}",
                                                      f"optim.global_batch={args.micro_batch}", "model.img_size=32"])
    with tempfile.TemporaryDirectory() as folder:
        size = write_shards(Path(folder), args.shards, args.per_shard)
        urls = expand_shards(f"{folder}/{{00000..{args.shards - 1:05d}}}.tar")
        batches = args.shards * args.per_shard // args.micro_batch
        counts = None
        if args.counts:
            write_counts(f"{folder}/{{00000..{args.shards - 1:05d}}}.tar", Path(folder) / "counts.json")
            counts = load_counts(Path(folder) / "counts.json", urls)
        print(f"{args.shards} shards x {args.per_shard} samples, {size / 2**20:.1f} MiB; 1 rank, 1 loader worker, "
              f"{batches} batches of {args.micro_batch} an epoch, shuffle window 1000"
              + (", with the shards' counts" if counts else ""))
        print("| resumed at | bytes read before the first batch | of the epoch's bytes |")
        print("|---|---|---|")
        if args.sharded_beton:
            beton = sharded_beton_config(cfg, Path(folder), f"{folder}/{{00000..{args.shards - 1:05d}}}.tar")
            before = bytes_read()
            loader, _ = build_pretrain_loader(beton, 0, 1)
            print(f"(a sharded .beton of those images, the FFCV loader with one thread: its start read "
                  f"{(bytes_read() - before) / 2**20:.1f} MiB, checksums included)")
            measure = functools.partial(first_beton_batch_cost, loader)
        else:
            measure = functools.partial(first_batch_cost, cfg, urls, batches, counts=counts)
        measure(start_batch=0)  # imports and opens what a first decode needs, uncounted
        for fraction in (0.0, 0.1, 0.9):
            cost = measure(start_batch=int(fraction * batches))
            print(f"| {fraction:.0%} | {cost / 2**20:.1f} MiB | {cost / size:.0%} |")


if __name__ == "__main__":
    main()
