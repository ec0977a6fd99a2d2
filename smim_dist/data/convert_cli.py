"""``smim-convert``: an ImageFolder tree (ImageNet's train/ or val/), local webdataset tar shards, or images with
label maps -> one FFCV .beton file plus a JSON report (``smim_dist.data.convert`` and ``smim_dist.data.segmentation``
do the work).

    smim-convert imagefolder /data/imagenet/train /data/ffcv/in1k_train.beton --max-side 512 --compress-share 0.5
    smim-convert webdataset '/data/laion/{00000..00099}.tar' /data/ffcv/laion.beton --max-side 512
    smim-convert segmentation /data/ade/images/validation /data/ade/annotations/validation /data/ffcv/ade_val.beton
    smim-convert verify /data/ffcv/in1k_train.beton
    smim-convert imagefolder /data/imagenet/train /data/ffcv/in1k_train --shard-size 10000   # a sharded data set
    smim-convert webdataset '/data/laion/{00000..41407}.tar' /data/ffcv/laion --shard-size 10 --slurm --tasks 512
    smim-convert count '/data/laion/{00000..12345}.tar' /data/laion/counts.json     # for data.shard_counts

``segmentation`` pairs images with label maps of the same file stem and stores image, mask and index. Every output
gets its checksum beside it (OUT.beton.sha256), which ``verify`` and training check. With ``--shard-size``, OUT is a
folder of .beton shards that trains as one data set (``data.path=OUT``): written here, by ``--task I --tasks N`` on
several machines, or by a SLURM job array (``--slurm``); running the same command again finishes an interrupted
conversion, rewriting only the shards that were not whole.
"""

from __future__ import annotations

import argparse
import functools
import signal
import sys
from pathlib import Path

from smim_dist.data.beton_check import checksum_file, checksum_problem, structure_problem
from smim_dist.cli_types import minutes, non_negative, positive
from smim_dist.config_loading import ConfigError
from smim_dist.data.convert import UsageError, checked_options, convert_imagefolder, convert_webdataset
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
    parser.add_argument("out", type=Path, help="the .beton to write (with --shard-size: the folder); its directory "
                                               "must exist")
    parser.add_argument("--max-side", type=int, default=512, help="shrink images to this longest side (default 512)")
    parser.add_argument("--jpeg-quality", type=int, default=90, help="JPEG quality 1..100 (default 90)")
    store = parser.add_mutually_exclusive_group()
    store.add_argument("--compress-share", type=float, default=0.5,
                       help="fraction of images stored as JPEG, the rest raw (default 0.5)")
    store.add_argument("--raw", action="store_true", help="store every image as raw pixels")
    parser.add_argument("--chunk-size", type=int, default=100, help="images per work unit (default 100)")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: the usable CPUs)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")


def _add_shard_options(parser: argparse.ArgumentParser, unit: str) -> None:
    group = parser.add_argument_group("a sharded data set (OUT is a folder)")
    group.add_argument("--shard-size", type=positive, help=f"{unit} per .beton shard; makes OUT a folder of shards "
                                                           "with a manifest, trained on as one data set")
    group.add_argument("--tasks", type=positive, help="split the shards over this many tasks (default: 1 here, "
                                                       "min(shards, 64) with --slurm)")
    group.add_argument("--task", type=int, default=0, help="the task this process runs, 0 .. tasks - 1 (default 0)")
    group.add_argument("--slurm", action="store_true", help="run the tasks as a SLURM job array (submitit) and wait")
    group.add_argument("--partition", help="--slurm: the partition (default: the cluster's default)")
    group.add_argument("--time", type=minutes, default=240, help="--slurm: time limit per task (minutes or "
                                                                  "D-HH:MM:SS; requeued at the limit; default 240)")
    group.add_argument("--cpus-per-task", type=positive, default=8, help="--slurm: CPUs per task (default 8)")
    group.add_argument("--array-parallelism", type=positive, help="--slurm: tasks running at once (default all)")
    group.add_argument("--setup", action="append", default=[], metavar="LINE",
                       help="--slurm: a shell line each task runs first, e.g. 'module load python' (repeatable)")


def _sharded(args: argparse.Namespace) -> int:
    """Plan, write (here, as one of several tasks, or as a SLURM job array) and finish a sharded data set."""
    from smim_dist.data.convert_shards import finish, plan_imagefolder, plan_webdataset, run_task, start
    from smim_dist.data.sharded_beton import progress

    settings = checked_options(args.max_side, args.jpeg_quality, args.compress_share, args.raw, args.chunk_size,
                               args.workers)
    plan = (plan_imagefolder(args.source, args.shard_size, settings) if args.layout == "imagefolder"
            else plan_webdataset(args.source, args.shard_size, settings, args.min_size))
    folder = start(args.out, plan, args.overwrite)
    shards = len(plan["shards"])
    if args.slurm:
        from smim_dist.data.convert_slurm import submit_array

        tasks = min(args.tasks or 64, shards)
        jobs = submit_array(folder, settings, tasks, args.partition, args.time, args.cpus_per_task,
                            args.array_parallelism or tasks, args.setup)
        print(f"Submitted job array {jobs[0].job_id.split('_')[0]}: {tasks} tasks writing {shards} shards into "
              f"{folder}; waiting (Ctrl-C stops the waiting, not the tasks: the last one writes the manifest)",
              flush=True)
        failed = []
        for job in jobs:
            try:
                job.result()
            except Exception as err:  # submitit raises the task's own error, or its failure to start
                failed.append(f"task {job.task_id}: {str(err).splitlines()[-1]} (log: {job.paths.stderr})")
        if failed:
            raise RuntimeError(f"{len(failed)} of {tasks} tasks failed; the first: {failed[0]}. Run the same command "
                               "again to write the missing shards")
        manifest = finish(folder, plan)
    else:
        manifest = run_task(folder, settings, args.task, args.tasks or 1)
    if manifest is None:
        done, total = progress(folder)
        print(f"{done} of {total} shards of {folder} written; the other tasks write the rest, and the last to finish "
              "the manifest")
        return 0
    size = sum(shard["bytes"] for shard in manifest["shards"]) / 2**20
    skipped = sum(shard["skipped"] for shard in manifest["shards"])
    print(f"Wrote {manifest['samples']} images in {shards} shards ({size:.1f} MiB) to {folder}; skipped {skipped} "
          f"unusable entries (each shard's report: SHARD.beton.report.json). Train on it with data.path={folder}")
    return 0


def _verify(path: Path) -> int:
    """0: whole; 1: damaged; 2: not there."""
    if path.is_dir():
        from smim_dist.data.sharded_beton import read_manifest, verify_problem

        try:
            problem = verify_problem(path, read_manifest(path))
        except ConfigError as err:
            problem = str(err)
        if problem:
            print(f"smim-convert: {path} is damaged: {problem}", file=sys.stderr)
            return 1
        print(f"{path}: every shard's structure and checksum, and the index's checksum, ok")
        return 0
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
    _add_shard_options(folder, "images")
    shards = sub.add_parser("webdataset", help="local img2dataset tar shards, labels from .cls members (else -1)")
    shards.add_argument("source", metavar="shards",
                        help="a brace pattern ('/data/laion/{00000..00099}.tar', quoted), a comma-separated list or "
                             "one path")
    _add_options(shards)
    shards.add_argument("--min-size", type=non_negative, default=0,
                        help="skip samples whose img2dataset .json gives a shorter side below this many pixels (the "
                             "original size where it was resized; default 0: keep all)")
    _add_shard_options(shards, "input tars")
    pairs = sub.add_parser("segmentation", help="images and label maps (class ids, mode P or L) paired by file stem")
    pairs.add_argument("source", metavar="images", type=Path, help="the image folder, searched recursively")
    pairs.add_argument("masks", type=Path, help="the label-map folder, searched recursively")
    _add_options(pairs)
    verify = sub.add_parser("verify", help="check a .beton's structure and its bytes against the checksum written "
                                           "beside it (OUT.beton.sha256), or every file of a sharded data set")
    verify.add_argument("beton", type=Path, help="a .beton, or a sharded data set's folder")
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
    elif args.layout == "webdataset":
        convert = functools.partial(convert_webdataset, min_size=args.min_size)
    else:
        convert = convert_imagefolder
    # SLURM preempts with SIGTERM: turn it into an exception so the temporary file is removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        if getattr(args, "shard_size", None):
            return _sharded(args)
        if getattr(args, "slurm", False) or getattr(args, "tasks", None):
            raise UsageError("--slurm and --tasks split a sharded conversion: add --shard-size N")
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
