"""Image sets -> one FFCV .beton file plus a JSON report: an ImageFolder tree (ImageNet's train/ or val/) or local
webdataset tar shards (``smim-convert``, ``smim_dist.data.convert_cli``, is the command line).

Two passes, because FFCV's writer fixes the sample count before it encodes anything and cannot skip a sample: a
parallel pass fully decodes every candidate image to find the broken ones, then FFCV's writer encodes only the good
ones (decoding them again). ImageFolder labels number the sorted class folders, as torchvision's ImageFolder does;
webdataset labels are the integer in a sample's ``.cls`` member, -1 without one. The ``index`` field is the sample's
position in the file, so augmentation can be seeded from (seed, epoch, index). EXIF orientation is not applied, also as
in torchvision. The .beton appears under its name only when complete; ``OUT.report.json`` beside it lists every skipped
file, sample or shard with the reason and counts the images converted to RGB.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import math
import multiprocessing
import os
import signal
import sys
import threading
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from smim_dist.data.tar_index import Member, index_tar, read_member
from smim_dist.data.beton_check import record_checksum
from smim_dist.files import private_name, remove_abandoned

__all__ = ["EXTENSIONS", "UsageError", "convert_imagefolder", "convert_webdataset"]

EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".ppm", ".pgm"})
MAX_SIDE_LIMIT = 16384
"""FFCV keeps one page per writer worker in memory and a sample must fit one page (< 4 GiB): this bounds both."""

_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_WIDE_GREY = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I"})
_PAGE = 1 << 23
"""FFCV's default page size; larger only when the largest image needs it."""
_GOLDEN = (math.sqrt(5) - 1) / 2


class UsageError(ValueError):
    """Bad arguments or input layout, found before any work; the CLI exits 2 on it."""


def scan_imagefolder(src: Path) -> tuple[list[str], list[tuple[str, int]]]:
    """Class names and (path relative to src, label) in torchvision ImageFolder's order: sorted, recursive; refuses
    a tree that is not an ImageFolder."""
    if not src.is_dir():
        raise UsageError(f"source {src} is not a directory; expected an ImageFolder tree SRC/<class>/<image>")
    classes = sorted(entry.name for entry in os.scandir(src) if entry.is_dir())
    files = []
    for label, name in enumerate(classes):
        for root, _, names in sorted(os.walk(src / name, followlinks=True)):
            files += [(os.path.relpath(os.path.join(root, f), src), label)
                      for f in sorted(names) if os.path.splitext(f)[1].lower() in EXTENSIONS]
    if not classes:
        raise UsageError(f"{src} has no class folders; expected an ImageFolder tree SRC/<class>/<image>")
    if not files:
        raise UsageError(f"{src} has class folders but no image files in them (extensions "
                         f"{', '.join(sorted(EXTENSIONS))}); expected SRC/<class>/<image>")
    return classes, files


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB for any PIL mode. Alpha is composited on white, because the colour under transparent pixels is arbitrary
    (often black) while viewers show it on white; 16-bit grey keeps its top 8 bits instead of PIL's clipping at 255."""
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    if image.mode in _WIDE_GREY:
        grey = (np.clip(np.asarray(image), 0, 65535) >> 8).astype(np.uint8)
        return Image.fromarray(np.repeat(grey[..., None], 3, axis=2))
    return image.convert("RGB")


def read_source(source: str | Member) -> bytes:
    return Path(source).read_bytes() if isinstance(source, str) else read_member(source)


def decode_rgb(data: bytes) -> tuple[Image.Image, str]:
    """The fully decoded RGB image and its original mode; raises on anything unreadable."""
    with warnings.catch_warnings():  # EXIF and palette warnings would garble the progress bar
        warnings.simplefilter("ignore")
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return _to_rgb(image), image.mode


def probe_image(source: str | Member) -> tuple[str | None, str, int, int]:
    """(None, mode, width, height) for a usable image, (reason, "", 0, 0) for one to skip; never raises."""
    try:
        data = read_source(source)
        if not data:
            return "empty file", "", 0, 0
        image, mode = decode_rgb(data)
        return None, mode, *image.size
    except UnidentifiedImageError:  # PIL's message names the BytesIO object, the report already names the file
        return "UnidentifiedImageError: cannot identify image file", "", 0, 0
    except Exception as err:
        return f"{type(err).__name__}: {err}", "", 0, 0


def _fitted(width: int, height: int, max_side: int) -> tuple[int, int]:
    """Size after shrinking to max_side; at least one pixel a side, where FFCV's own resize would give zero."""
    scale = max_side / max(width, height)
    if scale >= 1:
        return width, height
    return max(1, round(width * scale)), max(1, round(height * scale))


def _compressed(index, share: float):
    """Whether sample ``index`` is stored as JPEG: a Weyl sequence, so the share holds within any run of indices and a
    reconversion compresses the same samples. FFCV's 'proportion' mode draws from numpy's global RNG instead, whose
    state every forked writer worker inherits identically."""
    return (np.asarray(index) * _GOLDEN) % 1.0 < share


class SampleReader:
    """The dataset FFCV's writer indexes. ``field`` is the writer's own image field (the same object in each forked
    worker), switched between raw and JPEG per sample just before FFCV encodes it. ``PAGE_BYTES_PER_PIXEL`` bounds a
    sample's bytes per (shrunk) image pixel, as FFCV needs a whole sample on one page."""

    PAGE_BYTES_PER_PIXEL = 6  # raw needs 3; the margin is for JPEG beating it
    IMAGES_PER_SAMPLE = 1

    def __init__(self, samples: list[tuple[str, str | Member, int]], max_side: int, share: float, index_base: int = 0):
        self.names, self.sources, self.labels = (list(column) for column in zip(*samples))
        self.max_side, self.share, self.index_base = max_side, share, index_base
        self.field = self.failed = None  # set in the writing process, which alone imports FFCV

    def __len__(self) -> int:
        return len(self.sources)

    def fields(self, jpeg_quality: int) -> dict:
        """The writer's fields, in the order ``__getitem__`` returns their values; sets ``field``."""
        from ffcv.fields import IntField, RGBImageField

        self.field = RGBImageField(write_mode="raw", max_resolution=self.max_side, jpeg_quality=jpeg_quality)
        return {"image": self.field, "label": IntField(), "index": IntField()}

    def load(self, index: int) -> tuple:
        image, _ = decode_rgb(read_source(self.sources[index]))
        return shrunk(image, self.max_side, Image.Resampling.LANCZOS), self.labels[index], index

    def __getitem__(self, index: int) -> tuple:
        try:
            values = self.load(index)
        except Exception as err:
            print(f"smim-convert: {self.names[index]} decoded in the first pass but not now ({err!r}); did it change?",
                  file=sys.stderr, flush=True)
            self.failed.value = 1
            raise
        self.field.write_mode = "jpg" if _compressed(self.index_base + index, self.share) else "raw"
        return values


def shrunk(image: Image.Image, max_side: int, resample) -> np.ndarray:
    size = _fitted(*image.size, max_side)
    if size != image.size:
        image = image.resize(size, resample, reducing_gap=3.0 if resample == Image.Resampling.LANCZOS else None)
    return np.asarray(image)


def _watch(writer, samples: SampleReader, parent: int) -> None:
    """End the writing process group when a worker fails, or when the converting process is gone (killed: nobody
    would rename or remove the file). FFCV 1.0.2's writer waits for a sample count that a dead worker never
    delivers, so it would hang forever; the parent sees the killed process and cleans up."""
    workers = {}
    while True:
        time.sleep(0.2)
        workers.update((proc.pid, proc) for proc in multiprocessing.active_children())
        dead = [f"{pid} exited with {proc.exitcode}" for pid, proc in workers.items() if proc.exitcode not in (None, 0)]
        orphaned = os.getppid() != parent
        if samples.failed.value or dead or orphaned:
            reason = "smim-convert is gone" if orphaned else ", ".join(dead) or "a sample failed"
            print(f"smim-convert: stopping the writer: {reason}", file=sys.stderr, flush=True)
            with contextlib.suppress(FileNotFoundError):  # FFCV unlinks it once every sample is in
                writer.metadata_sm.unlink()
            os.killpg(0, signal.SIGKILL)


def _write(tmp: str, samples: SampleReader, jpeg_quality: int, page_size: int, workers: int, chunk_size: int) -> None:
    """Body of the writing process: its own process group, so one signal stops it and FFCV's workers together."""
    parent = os.getppid()
    os.setpgid(0, 0)
    from ffcv.reader import Reader
    from ffcv.writer import DatasetWriter

    samples.failed = multiprocessing.RawValue("b", 0)
    writer = DatasetWriter(tmp, samples.fields(jpeg_quality), page_size=page_size, num_workers=workers)
    threading.Thread(target=_watch, args=(writer, samples, parent), daemon=True).start()
    writer.from_indexed_dataset(samples, chunksize=chunk_size)
    reader = Reader(tmp)
    written, images = np.sort(reader.alloc_table["sample_id"]), samples.IMAGES_PER_SAMPLE
    if reader.num_samples != len(samples) or not np.array_equal(written, np.repeat(np.arange(len(samples)), images)):
        raise RuntimeError(f"FFCV wrote {reader.num_samples} samples with {len(written)} images to {tmp}, expected "
                           f"{len(samples)} samples with {images} images each")


def _write_in_group(tmp: Path, samples: SampleReader, jpeg_quality: int, page_size: int, workers: int,
                    chunk_size: int) -> None:
    host = multiprocessing.get_context("fork").Process(
        target=_write, args=(str(tmp), samples, jpeg_quality, page_size, workers, chunk_size))
    host.start()
    try:
        host.join()
    finally:
        if host.exitcode != 0:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(host.pid, signal.SIGKILL)
            host.kill()
            host.join()
    if host.exitcode != 0:
        raise RuntimeError(f"writing {tmp} failed (writer exit code {host.exitcode}); see the messages above")


def checked_settings(out, max_side, jpeg_quality, compress_share, raw, chunk_size, workers,
                     overwrite) -> tuple[Path, dict]:
    """The resolved output path and the report's settings, refusing bad ones before any work."""
    out = Path(out).resolve()
    settings = checked_options(max_side, jpeg_quality, compress_share, raw, chunk_size, workers)
    if out.suffix != ".beton":
        raise UsageError(f"output {out} must end in .beton, or name a folder for a sharded data set (--shard-size)")
    if not out.parent.is_dir():
        raise UsageError(f"output directory {out.parent} does not exist; create it first")
    if out.is_dir():
        raise UsageError(f"output {out} is a directory; name a .beton file")
    if out.exists() and not overwrite:
        raise UsageError(f"output {out} exists; pass --overwrite (overwrite=True) to replace it")
    return out, settings


def checked_options(max_side, jpeg_quality, compress_share, raw, chunk_size, workers) -> dict:
    """The conversion's settings, refusing bad ones before any work. ``workers`` defaults to the CPUs this process
    may use, which respects cluster CPU limits where ``os.cpu_count`` would not."""
    workers = len(os.sched_getaffinity(0)) if workers is None else workers
    share = 0.0 if raw else compress_share
    if not isinstance(max_side, int) or not 16 <= max_side <= MAX_SIDE_LIMIT:
        raise UsageError(f"max_side must be an integer in 16..{MAX_SIDE_LIMIT}, got {max_side!r}")
    if not isinstance(jpeg_quality, int) or not 1 <= jpeg_quality <= 100:
        raise UsageError(f"jpeg_quality must be an integer in 1..100, got {jpeg_quality!r}")
    if not isinstance(share, (int, float)) or not 0 <= share <= 1:
        raise UsageError(f"compress_share must be in [0, 1] (the fraction of images stored as JPEG), got {share!r}")
    for name, value in (("chunk_size", chunk_size), ("workers", workers)):
        if not isinstance(value, int) or value < 1:
            raise UsageError(f"{name} must be a positive integer, got {value!r}")
    return {"max_side": max_side, "jpeg_quality": jpeg_quality, "compress_share": share, "raw": raw,
            "chunk_size": chunk_size, "workers": workers}


def map_in_workers(function, items: list, workers: int, chunk_size: int, desc: str, unit: str) -> list:
    """``function`` over ``items`` in forked workers, in order, with a progress bar. An executor, not a Pool: a Pool
    waits forever for the results of a worker that was killed (for memory, say)."""
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"))
    try:
        return list(tqdm(pool.map(function, items, chunksize=chunk_size), total=len(items), desc=desc,
                         unit=unit, file=sys.stderr))
    except BrokenProcessPool:
        raise RuntimeError(f"a worker died while {desc} (killed for memory? a crashing decoder?); nothing was "
                           "written; try fewer --workers") from None
    finally:
        pool.shutdown(cancel_futures=True)  # on Ctrl-C or SIGTERM, do not finish the queued items first


def write_samples(source: str, samples: list[tuple[str, str | Member, int]], skipped: list[dict], out: Path,
                  settings: dict, layout: dict, start: float, probe=probe_image, dataset=SampleReader,
                  index_base: int = 0) -> dict:
    """Probe ``samples`` (name, source, label), write the usable ones to ``out`` and the report beside it.
    ``skipped`` holds what the layout refused before decoding, ``layout`` the report's fields of that layout;
    ``probe`` checks one source as ``probe_image`` does, ``dataset`` is ``SampleReader`` or a subclass;
    ``index_base``: the first sample's position in the data set, when ``out`` is one of its shards (which samples
    are stored as JPEG follows the position in the data set)."""
    max_side, share = settings["max_side"], settings["compress_share"]
    probes = map_in_workers(probe, [sample[1] for sample in samples], settings["workers"], settings["chunk_size"],
                            "checking", "img")
    good, converted, largest = [], {}, 0
    for sample, (reason, mode, width, height) in zip(samples, probes):
        if reason:
            skipped.append({"path": sample[0], "reason": reason})
            continue
        good.append(sample)
        if mode != "RGB":
            converted[mode] = converted.get(mode, 0) + 1
        largest = max(largest, math.prod(_fitted(width, height, max_side)))
    if not good:
        first = f"; the first: {skipped[0]['path']}: {skipped[0]['reason']}" if skipped else ""
        raise RuntimeError(f"no image in {source} could be decoded ({len(skipped)} skipped){first}")

    page_size = _PAGE
    while page_size < dataset.PAGE_BYTES_PER_PIXEL * largest + (1 << 20):
        page_size *= 2
    for prefix in (f".{out.name}.tmp-", f".{out.name}.report.json.tmp-"):
        remove_abandoned(out.parent, prefix)
    tmp = out.parent / private_name(f".{out.name}.tmp-")
    tmp_report = out.parent / private_name(f".{out.name}.report.json.tmp-")
    report_path = out.parent / f"{out.name}.report.json"
    try:
        _write_in_group(tmp, dataset(good, max_side, share, index_base), settings["jpeg_quality"], page_size,
                        settings["workers"], settings["chunk_size"])
        report = {
            "source": source, "output": str(out), "written": len(good),
            "compressed": int(np.count_nonzero(_compressed(index_base + np.arange(len(good)), share))),
            "skipped": skipped, "converted": dict(sorted(converted.items())), **layout,
            "settings": {**settings, "page_size": page_size},
            "bytes": tmp.stat().st_size, "seconds": round(time.perf_counter() - start, 2),
        }
        tmp_report.write_text(json.dumps(report, indent=1) + "\n")
        record_checksum(tmp, out.name)
        os.replace(tmp, out)
        os.replace(tmp_report, report_path)
    finally:
        tmp.unlink(missing_ok=True)
        tmp_report.unlink(missing_ok=True)
    return report


def convert_imagefolder(src, out, max_side: int = 512, jpeg_quality: int = 90, compress_share: float = 0.5,
                        raw: bool = False, chunk_size: int = 100, workers: int | None = None,
                        overwrite: bool = False) -> dict:
    """Convert the ImageFolder tree ``src`` to the FFCV file ``out``; return the report, also written to
    ``out.report.json``. ``raw`` stores every image uncompressed (``compress_share`` 0)."""
    start = time.perf_counter()
    out, settings = checked_settings(out, max_side, jpeg_quality, compress_share, raw, chunk_size, workers, overwrite)
    src = Path(src).resolve()
    classes, files = scan_imagefolder(src)
    samples = [(rel, str(src / rel), label) for rel, label in files]
    return write_samples(str(src), samples, [], out, settings, {"classes": classes}, start)


def local_shards(spec: str) -> list[str]:
    """The shard paths of ``spec``, refusing what cannot be read at an offset: pipe: commands, URLs, missing files."""
    from smim_dist.data.shards import expand_shards  # imports torch, which imagefolder conversions need not wait for

    try:
        shards = expand_shards(spec)
    except ValueError as err:
        raise UsageError(str(err)) from None
    for shard in shards:
        if shard.startswith("pipe:") or "://" in shard:
            raise UsageError(f"shard {shard!r} is not a local file; converting seeks into each tar, so only local "
                             "uncompressed tars work: stream pipe: sources directly with data.source=webdataset, or "
                             "download them first")
    missing = [shard for shard in shards if not Path(shard).is_file()]
    if missing:
        raise UsageError(f"{len(missing)} of the {len(shards)} shards of {spec!r} are not files, e.g. {missing[0]!r}")
    return shards


def convert_webdataset(shards: str, out, max_side: int = 512, jpeg_quality: int = 90, compress_share: float = 0.5,
                       raw: bool = False, chunk_size: int = 100, workers: int | None = None,
                       overwrite: bool = False, min_size: int = 0) -> dict:
    """Convert local, uncompressed webdataset tar shards in img2dataset's layout (``shards``: a brace pattern, a
    comma-separated list or one path) to the FFCV file ``out``, as ``convert_imagefolder`` does. A sample's image is
    its first .jpg, .jpeg, .png or .webp member (extensions in any case), its label the integer in its .cls member or
    -1 without one; .txt members are ignored, and .json ones read only for ``min_size`` (``index_tar``). A damaged
    shard is reported, and its samples before the damage converted."""
    start = time.perf_counter()
    out, settings = checked_settings(out, max_side, jpeg_quality, compress_share, raw, chunk_size, workers, overwrite)
    paths = local_shards(shards)
    samples, skipped = index_tars(paths, min_size, settings["workers"])
    return write_samples(shards, samples, skipped, out, settings, {"shards": len(paths), "min_size": min_size}, start)


def index_tars(paths: list[str], min_size: int, workers: int) -> tuple[list, list[dict]]:
    """``index_tar`` of each shard in worker processes: all their samples and all their skips."""
    if not isinstance(min_size, int) or min_size < 0:
        raise UsageError(f"min_size must be a non-negative integer (pixels), got {min_size!r}")
    indexed = map_in_workers(functools.partial(index_tar, min_size=min_size), paths, workers, 1, "indexing", "shard")
    return [sample for found, _ in indexed for sample in found], [skip for _, skips in indexed for skip in skips]
