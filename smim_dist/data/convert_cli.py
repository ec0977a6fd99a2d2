"""``smim-convert``: an ImageFolder tree (ImageNet's train/ or val/), local webdataset tar shards, or images with
label maps -> one FFCV .beton file plus a JSON report (``smim_dist.data.convert`` and ``smim_dist.data.segmentation``
do the work).

    smim-convert imagefolder /data/imagenet/train /data/ffcv/in1k_train.beton --max-side 512 --compress-share 0.5
    smim-convert webdataset '/data/laion/{00000..00099}.tar' /data/ffcv/laion.beton --max-side 512
    smim-convert segmentation /data/ade/images/validation /data/ade/annotations/validation /data/ffcv/ade_val.beton
    smim-convert verify /data/ffcv/in1k_train.beton
    smim-convert count '/data/laion/{00000..12345}.tar' /data/laion/counts.json     # for data.shard_counts

``segmentation`` pairs images with label maps of the same file stem and stores image, mask and index. Every output
gets its checksum beside it (OUT.beton.sha256), which ``verify`` and training check.
"""

from __future__ import annotations

import argparse
import functools
import signal
import sys
from pathlib import Path

from smim_dist.data.beton_check import checksum_file, checksum_problem, structure_problem
from smim_dist.data.convert import UsageError, convert_imagefolder, convert_webdataset
from smim_dist.data.segmentation import convert_segmentation


def _summary(report: dict) -> str:
    converted = ", ".join(f"{n} {mode}" for mode, n in report["converted"].items()) or "none"
    seconds = report["seconds"]
    origin = (f"of {len(report['classes'])} classes from {report['source']}" if "classes" in report
              else f"with label maps from {report['source']} and {report['masks']}" if "masks" in report
              else f"from {report['shards']} shards {report['source']}")
    return (f"Wrote {report['written']} images ({report['compressed']} as JPEG) {origin} to {report['output']} "
            f"({report['bytes'] / 2**20:.1f} MiB) in {seconds:.1f} s ({report['written'] / max(seconds, 1e-9):.1f} "
            f"images/s); skipped {len(report['skipped'])} unusable {'entries' if 'shards' in report else 'files'}; "
            f"converted to RGB: {converted}. Report: {report['output']}.report.json")


def _segmentation(source: Path, *options, masks: Path) -> dict:
    return convert_segmentation(source, masks, *options)


def _add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", type=Path, help="the .beton to write; its directory must exist")
    parser.add_argument("--max-side", type=int, default=512, help="shrink images to this longest side (default 512)")
    parser.add_argument("--jpeg-quality", type=int, default=90, help="JPEG quality 1..100 (default 90)")
    store = parser.add_mutually_exclusive_group()
    store.add_argument("--compress-share", type=float, default=0.5,
                       help="fraction of images stored as JPEG, the rest raw (default 0.5)")
    store.add_argument("--raw", action="store_true", help="store every image as raw pixels")
    parser.add_argument("--chunk-size", type=int, default=100, help="images per work unit (default 100)")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: the usable CPUs)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")


def _verify(path: Path) -> int:
    """0: whole; 1: damaged; 2: not there."""
    if not path.is_file():
        print(f"smim-convert: error: {path} is not a file", file=sys.stderr)
        return 2
    problem = structure_problem(path) or checksum_problem(path)
    if problem:
        print(f"smim-convert: {path} is damaged: {problem}; rewrite it", file=sys.stderr)
        return 1
    checked = "structure and checksum" if checksum_file(path).exists() else "structure (no checksum was written)"
    print(f"{path}: {checked} ok")
    return 0


def _count(spec: str, out: Path, workers: int | None) -> int:
    from smim_dist.data.shard_counts import write_counts  # reads shards through webdataset and torch: only here

    try:
        shards = write_counts(spec, out, workers)["shards"]
    except (ValueError, OSError) as err:
        print(f"smim-convert: error: {err}", file=sys.stderr)
        return 1
    print(f"Counted {sum(entry['samples'] for entry in shards.values())} samples in {len(shards)} shards: {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="smim-convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="layout", required=True)
    folder = sub.add_parser("imagefolder", help="SRC/<class>/<image>, labels by sorted class name")
    folder.add_argument("source", metavar="src", type=Path, help="the ImageFolder root, e.g. imagenet/train")
    _add_options(folder)
    shards = sub.add_parser("webdataset", help="local img2dataset tar shards, labels from .cls members (else -1)")
    shards.add_argument("source", metavar="shards",
                        help="a brace pattern ('/data/laion/{00000..00099}.tar', quoted), a comma-separated list or "
                             "one path")
    _add_options(shards)
    pairs = sub.add_parser("segmentation", help="images and label maps (class ids, mode P or L) paired by file stem")
    pairs.add_argument("source", metavar="images", type=Path, help="the image folder, searched recursively")
    pairs.add_argument("masks", type=Path, help="the label-map folder, searched recursively")
    _add_options(pairs)
    verify = sub.add_parser("verify", help="check a .beton's structure and its bytes against the checksum written "
                                           "beside it (OUT.beton.sha256)")
    verify.add_argument("beton", type=Path)
    count = sub.add_parser("count", help="samples per tar shard, for data.shard_counts: local .tar shards by their "
                                         "headers, other sources (pipe:, URLs) read through")
    count.add_argument("source", metavar="shards", help="the shard spec as data.path gives it")
    count.add_argument("out", type=Path, help="the JSON file to write")
    count.add_argument("--workers", type=int, default=None, help="processes (default: the usable CPUs)")
    args = parser.parse_args(argv)
    if args.layout == "verify":
        return _verify(args.beton)
    if args.layout == "count":
        return _count(args.source, args.out, args.workers)
    if args.layout == "segmentation":
        convert = functools.partial(_segmentation, masks=args.masks)
    else:
        convert = convert_imagefolder if args.layout == "imagefolder" else convert_webdataset
    # SLURM preempts with SIGTERM: turn it into an exception so the temporary file is removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        report = convert(args.source, args.out, args.max_side, args.jpeg_quality, args.compress_share, args.raw,
                         args.chunk_size, args.workers, args.overwrite)
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
