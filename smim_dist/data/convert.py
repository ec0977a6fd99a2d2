"""``smim-convert``: an ImageFolder tree (ImageNet's train/ or val/) -> one FFCV .beton file plus a JSON report.

    smim-convert imagefolder /data/imagenet/train /data/ffcv/in1k_train.beton --max-side 512 --compress-share 0.5

Two passes, because FFCV's writer fixes the sample count before it encodes anything and cannot skip a sample: a
parallel pass fully decodes every candidate file to find the broken ones, then FFCV's writer encodes only the good ones
(decoding them again). Labels number the sorted class folders, as torchvision's ImageFolder does; the ``index`` field is
the sample's position in the file, so augmentation can be seeded from (seed, epoch, index). EXIF orientation is not
applied, also as in torchvision. The .beton appears under its name only when complete; ``OUT.report.json`` beside it
lists every skipped file with the reason and counts the images converted to RGB.
"""

from __future__ import annotations

import argparse
import contextlib
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
from PIL import Image
from tqdm import tqdm

__all__ = ["EXTENSIONS", "UsageError", "convert_imagefolder", "main"]

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


def _scan(src: Path) -> tuple[list[str], list[tuple[str, int]]]:
    """Class names and (path relative to src, label) in torchvision ImageFolder's order: sorted, recursive."""
    classes = sorted(entry.name for entry in os.scandir(src) if entry.is_dir())
    files = []
    for label, name in enumerate(classes):
        for root, _, names in sorted(os.walk(src / name, followlinks=True)):
            files += [(os.path.relpath(os.path.join(root, f), src), label)
                      for f in sorted(names) if os.path.splitext(f)[1].lower() in EXTENSIONS]
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


def _decode(path: str) -> tuple[Image.Image, str]:
    """The fully decoded RGB image and its original mode; raises on anything unreadable."""
    with warnings.catch_warnings():  # EXIF and palette warnings would garble the progress bar
        warnings.simplefilter("ignore")
        with Image.open(path) as image:
            image.load()
            return _to_rgb(image), image.mode


def _probe(path: str) -> tuple[str | None, str, int, int]:
    """(None, mode, width, height) for a usable file, (reason, "", 0, 0) for one to skip; never raises."""
    try:
        if os.path.getsize(path) == 0:
            return "empty file", "", 0, 0
        image, mode = _decode(path)
        return None, mode, *image.size
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


class _Samples:
    """The dataset FFCV's writer indexes. ``field`` is the writer's own image field (the same object in each forked
    worker), switched between raw and JPEG per sample just before FFCV encodes it."""

    def __init__(self, src: Path, files: list[tuple[str, int]], max_side: int, share: float):
        self.paths = [str(src / rel) for rel, _ in files]
        self.labels = [label for _, label in files]
        self.max_side, self.share = max_side, share
        self.field = self.failed = None  # set in the writing process, which alone imports FFCV

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int, int]:
        try:
            image, _ = _decode(self.paths[index])
        except Exception as err:
            print(f"smim-convert: {self.paths[index]} decoded in the first pass but not now ({err!r}); did it change?",
                  file=sys.stderr, flush=True)
            self.failed.value = 1
            raise
        size = _fitted(*image.size, self.max_side)
        if size != image.size:
            image = image.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
        self.field.write_mode = "jpg" if _compressed(index, self.share) else "raw"
        return np.asarray(image), self.labels[index], index


def _watch(writer, samples: _Samples) -> None:
    """End the writing process group when a worker fails. FFCV 1.0.2's writer waits for a sample count that a dead
    worker never delivers, so it would hang forever; the parent sees the killed process and cleans up."""
    workers = {}
    while True:
        time.sleep(0.2)
        workers.update((proc.pid, proc) for proc in multiprocessing.active_children())
        dead = [f"{pid} exited with {proc.exitcode}" for pid, proc in workers.items() if proc.exitcode not in (None, 0)]
        if samples.failed.value or dead:
            print(f"smim-convert: stopping the writer: {', '.join(dead) or 'a sample failed'}", file=sys.stderr,
                  flush=True)
            with contextlib.suppress(FileNotFoundError):  # FFCV unlinks it once every sample is in
                writer.metadata_sm.unlink()
            os.killpg(0, signal.SIGKILL)


def _write(tmp: str, samples: _Samples, jpeg_quality: int, page_size: int, workers: int, chunk_size: int) -> None:
    """Body of the writing process: its own process group, so one signal stops it and FFCV's workers together."""
    os.setpgid(0, 0)
    from ffcv.fields import IntField, RGBImageField
    from ffcv.reader import Reader
    from ffcv.writer import DatasetWriter

    samples.field = RGBImageField(write_mode="raw", max_resolution=samples.max_side, jpeg_quality=jpeg_quality)
    samples.failed = multiprocessing.RawValue("b", 0)
    writer = DatasetWriter(tmp, {"image": samples.field, "label": IntField(), "index": IntField()},
                           page_size=page_size, num_workers=workers)
    threading.Thread(target=_watch, args=(writer, samples), daemon=True).start()
    writer.from_indexed_dataset(samples, chunksize=chunk_size)
    reader = Reader(tmp)
    written = np.sort(reader.alloc_table["sample_id"])
    if reader.num_samples != len(samples) or not np.array_equal(written, np.arange(len(samples))):
        raise RuntimeError(f"FFCV wrote {reader.num_samples} samples with {len(written)} images to {tmp}, expected "
                           f"{len(samples)} of each")


def _write_in_group(tmp: Path, samples: _Samples, jpeg_quality: int, page_size: int, workers: int,
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


def _check(src: Path, out: Path, max_side, jpeg_quality, compress_share, chunk_size, workers, overwrite) -> None:
    if not isinstance(max_side, int) or not 16 <= max_side <= MAX_SIDE_LIMIT:
        raise UsageError(f"max_side must be an integer in 16..{MAX_SIDE_LIMIT}, got {max_side!r}")
    if not isinstance(jpeg_quality, int) or not 1 <= jpeg_quality <= 100:
        raise UsageError(f"jpeg_quality must be an integer in 1..100, got {jpeg_quality!r}")
    if not isinstance(compress_share, (int, float)) or not 0 <= compress_share <= 1:
        raise UsageError(f"compress_share must be in [0, 1] (the fraction of images stored as JPEG), "
                         f"got {compress_share!r}")
    for name, value in (("chunk_size", chunk_size), ("workers", workers)):
        if not isinstance(value, int) or value < 1:
            raise UsageError(f"{name} must be a positive integer, got {value!r}")
    if out.suffix != ".beton":
        raise UsageError(f"output {out} must end in .beton")
    if not out.parent.is_dir():
        raise UsageError(f"output directory {out.parent} does not exist; create it first")
    if out.is_dir():
        raise UsageError(f"output {out} is a directory; name a .beton file")
    if out.exists() and not overwrite:
        raise UsageError(f"output {out} exists; pass --overwrite (overwrite=True) to replace it")
    if not src.is_dir():
        raise UsageError(f"source {src} is not a directory; expected an ImageFolder tree SRC/<class>/<image>")


def convert_imagefolder(src, out, max_side: int = 512, jpeg_quality: int = 90, compress_share: float = 0.5,
                        raw: bool = False, chunk_size: int = 100, workers: int | None = None,
                        overwrite: bool = False) -> dict:
    """Convert the ImageFolder tree ``src`` to the FFCV file ``out``; return the report, also written to
    ``out.report.json``. ``raw`` stores every image uncompressed (``compress_share`` 0); ``workers`` defaults to the
    CPUs this process may use, which respects cluster CPU limits where ``os.cpu_count`` would not."""
    start = time.perf_counter()
    src, out = Path(src).resolve(), Path(out).resolve()
    workers = len(os.sched_getaffinity(0)) if workers is None else workers
    share = 0.0 if raw else compress_share
    _check(src, out, max_side, jpeg_quality, share, chunk_size, workers, overwrite)
    classes, files = _scan(src)
    if not classes:
        raise UsageError(f"{src} has no class folders; expected an ImageFolder tree SRC/<class>/<image>")
    if not files:
        raise UsageError(f"{src} has class folders but no image files in them (extensions "
                         f"{', '.join(sorted(EXTENSIONS))}); expected SRC/<class>/<image>")

    # An executor, not a Pool: a Pool waits forever for the files of a worker that was killed (for memory, say).
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"))
    try:
        probes = pool.map(_probe, [str(src / rel) for rel, _ in files], chunksize=chunk_size)
        probes = list(tqdm(probes, total=len(files), desc="checking", unit="img", file=sys.stderr))
    except BrokenProcessPool:
        raise RuntimeError(f"a worker checking the files of {src} died (killed for memory? a crashing decoder?); "
                           "nothing was written; try fewer --workers") from None
    finally:
        pool.shutdown(cancel_futures=True)  # on Ctrl-C or SIGTERM, do not finish the queued files first
    good, skipped, converted, largest = [], [], {}, 0
    for (rel, label), (reason, mode, width, height) in zip(files, probes):
        if reason:
            skipped.append({"path": rel, "reason": reason})
            continue
        good.append((rel, label))
        if mode != "RGB":
            converted[mode] = converted.get(mode, 0) + 1
        largest = max(largest, math.prod(_fitted(width, height, max_side)))
    if not good:
        raise RuntimeError(f"no image in {src} could be decoded ({len(skipped)} skipped); the first: "
                           f"{skipped[0]['path']}: {skipped[0]['reason']}")

    page_size = _PAGE
    while page_size < 6 * largest + (1 << 20):  # raw needs 3 bytes a pixel; the margin is for JPEG beating it
        page_size *= 2
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    tmp_report = out.parent / f".{out.name}.report.json.tmp-{os.getpid()}"
    report_path = out.parent / f"{out.name}.report.json"
    try:
        _write_in_group(tmp, _Samples(src, good, max_side, share), jpeg_quality, page_size, workers, chunk_size)
        report = {
            "source": str(src), "output": str(out), "written": len(good),
            "compressed": int(np.count_nonzero(_compressed(np.arange(len(good)), share))),
            "skipped": skipped, "converted": dict(sorted(converted.items())), "classes": classes,
            "settings": {"max_side": max_side, "jpeg_quality": jpeg_quality, "compress_share": share, "raw": raw,
                         "chunk_size": chunk_size, "workers": workers, "page_size": page_size},
            "bytes": tmp.stat().st_size, "seconds": round(time.perf_counter() - start, 2),
        }
        tmp_report.write_text(json.dumps(report, indent=1) + "\n")
        os.replace(tmp, out)
        os.replace(tmp_report, report_path)
    finally:
        tmp.unlink(missing_ok=True)
        tmp_report.unlink(missing_ok=True)
    return report


def _summary(report: dict) -> str:
    converted = ", ".join(f"{n} {mode}" for mode, n in report["converted"].items()) or "none"
    seconds = report["seconds"]
    return (f"Wrote {report['written']} images ({report['compressed']} as JPEG) of {len(report['classes'])} classes "
            f"from {report['source']} to {report['output']} ({report['bytes'] / 2**20:.1f} MiB) in {seconds:.1f} s "
            f"({report['written'] / max(seconds, 1e-9):.1f} images/s); skipped {len(report['skipped'])} unreadable "
            f"files; converted to RGB: {converted}. Report: {report['output']}.report.json")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="smim-convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="layout", required=True)
    folder = sub.add_parser("imagefolder", help="SRC/<class>/<image>, labels by sorted class name")
    folder.add_argument("src", type=Path, help="the ImageFolder root, e.g. imagenet/train")
    folder.add_argument("out", type=Path, help="the .beton to write; its directory must exist")
    folder.add_argument("--max-side", type=int, default=512, help="shrink images to this longest side (default 512)")
    folder.add_argument("--jpeg-quality", type=int, default=90, help="JPEG quality 1..100 (default 90)")
    store = folder.add_mutually_exclusive_group()
    store.add_argument("--compress-share", type=float, default=0.5,
                       help="fraction of images stored as JPEG, the rest raw (default 0.5)")
    store.add_argument("--raw", action="store_true", help="store every image as raw pixels")
    folder.add_argument("--chunk-size", type=int, default=100, help="images per work unit (default 100)")
    folder.add_argument("--workers", type=int, default=None, help="processes (default: the usable CPUs)")
    folder.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    args = parser.parse_args(argv)
    # SLURM preempts with SIGTERM: turn it into an exception so the temporary file is removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        report = convert_imagefolder(args.src, args.out, args.max_side, args.jpeg_quality, args.compress_share,
                                     args.raw, args.chunk_size, args.workers, args.overwrite)
    except UsageError as err:
        print(f"smim-convert: error: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:
        print(f"smim-convert: error: {err}", file=sys.stderr)
        return 1
    print(_summary(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
