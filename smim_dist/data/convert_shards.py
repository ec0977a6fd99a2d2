"""A data set converted as many .beton shards in one folder (``smim-convert ... OUT_DIR --shard-size N``): a plan,
tasks that each write some of the shards, and a finish that writes the index and the manifest
(``smim_dist.data.sharded_beton``).

The plan (``plan.json``) fixes which images go to which shard before any is written, so any number of tasks, on any
machines, started, killed and started again in any order, write the same shards. A task skips a shard whose report is
in place (``write_samples`` renames it after the shard and its checksum); a killed task leaves only temporaries, which
the next task on that host removes. Whichever task finds every shard written writes the index and then the manifest.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from smim_dist.data.beton_check import checksum_file, structure_problem
from smim_dist.data.convert import UsageError, index_tars, local_shards, scan_imagefolder, write_samples
from smim_dist.data.sharded_beton import (INDEX, MANIFEST, PLAN, is_written, read_manifest, shard_report,
                                          write_manifest)
from smim_dist.files import write_atomic

PLAN_VERSION = 1
FORMAT_SETTINGS = ("max_side", "jpeg_quality", "compress_share", "raw")
"""what a shard's bytes depend on, so every task must share it; workers and chunk size may differ per task"""


def shard_name(number: int) -> str:
    return f"shard-{number:05d}.beton"


def plan_imagefolder(src: str | Path, shard_size: int, settings: dict) -> dict:
    """Shards of ``shard_size`` consecutive images in torchvision ImageFolder's order, so their union is the single
    .beton the same command would write."""
    src = Path(src).resolve()
    classes, files = scan_imagefolder(src)
    shards = [{"name": shard_name(number), "index_base": start, "inputs": files[start:start + shard_size]}
              for number, start in enumerate(range(0, len(files), shard_size))]
    return _plan("imagefolder", str(src), settings, shards, classes=classes)


def plan_webdataset(spec: str, tars_per_shard: int, settings: dict, min_size: int = 0) -> dict:
    """One shard per ``tars_per_shard`` input tars, in the spec's order; samples are counted as their tars are read
    (``min_size``: see ``index_tar``)."""
    paths = local_shards(spec)
    shards = [{"name": shard_name(number), "inputs": paths[start:start + tars_per_shard]}
              for number, start in enumerate(range(0, len(paths), tars_per_shard))]
    return _plan("webdataset", spec, settings, shards, min_size=min_size)


def _plan(layout: str, source: str, settings: dict, shards: list[dict], **extra) -> dict:
    return {"version": PLAN_VERSION, "layout": layout, "source": source,
            "settings": {key: settings[key] for key in FORMAT_SETTINGS}, **extra, "shards": shards}


def start(folder: str | Path, plan: dict, overwrite: bool) -> Path:
    """Write ``plan`` into ``folder``, or find it there already (running the same command again continues the
    conversion). Another plan there is refused unless ``overwrite``, which removes that conversion's files."""
    folder = Path(folder).resolve()
    if not folder.parent.is_dir():
        raise UsageError(f"output directory {folder.parent} does not exist; create it first")
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"output {folder} is a file; a sharded data set is written to a folder")
    existing, plan_text = folder / PLAN, json.dumps(plan) + "\n"
    if existing.is_file() and overwrite:
        for path in [existing, folder / MANIFEST, folder / INDEX, *folder.glob("shard-*")]:
            path.unlink(missing_ok=True)
    elif existing.is_file():
        if existing.read_text() != plan_text:
            raise UsageError(f"{folder} holds a conversion of other images or with other settings; pass --overwrite "
                             "to replace it, or name another folder")
        return folder
    elif folder.is_dir() and any(folder.iterdir()):
        raise UsageError(f"{folder} is not empty and holds no smim-convert plan; name a new or empty folder")
    folder.mkdir(exist_ok=True)
    write_atomic(existing, plan_text)
    return folder


def load_plan(folder: Path) -> dict:
    path = folder / PLAN
    try:
        plan = json.loads(path.read_text())
        if plan["version"] != PLAN_VERSION or not plan["shards"]:
            raise ValueError(f"version {plan['version']} with {len(plan['shards'])} shards")
    except (OSError, ValueError, KeyError) as err:
        raise UsageError(f"{path} is not a conversion plan ({err}); start the conversion again with --overwrite") \
            from None
    return plan


def write_shard(folder: Path, plan: dict, number: int, settings: dict) -> None:
    """Shard ``number`` of the plan, unless it is already written."""
    shard = plan["shards"][number]
    out = folder / shard["name"]
    if is_written(out):
        return
    (folder / MANIFEST).unlink(missing_ok=True)  # the set is not whole until this shard is
    started = time.perf_counter()
    if plan["layout"] == "imagefolder":
        src = Path(plan["source"])
        samples = [(rel, str(src / rel), label) for rel, label in shard["inputs"]]
        skipped, layout = [], {"classes": plan["classes"]}
    else:
        samples, skipped = index_tars(shard["inputs"], plan["min_size"], settings["workers"])
        layout = {"shards": len(shard["inputs"]), "min_size": plan["min_size"]}
    print(f"smim-convert: writing {out.name} ({number + 1} of {len(plan['shards'])})", file=sys.stderr, flush=True)
    write_samples(plan["source"], samples, skipped, out, {**settings, **plan["settings"]}, layout, started,
                  index_base=shard.get("index_base", 0))


def run_task(folder: str | Path, settings: dict, task: int = 0, tasks: int = 1) -> dict | None:
    """Write shards ``task``, ``task + tasks``, ... of the plan in ``folder``; then the manifest if every shard is
    written. Returns the manifest, or None while shards are missing."""
    folder = Path(folder).resolve()
    plan = load_plan(folder)
    if not 0 <= task < tasks:
        raise UsageError(f"--task {task} outside the {tasks} tasks (0 .. {tasks - 1})")
    for number in range(task, len(plan["shards"]), tasks):
        write_shard(folder, plan, number, settings)
    return finish(folder, plan)


def finish(folder: Path, plan: dict) -> dict | None:
    """The manifest of ``folder`` once every planned shard is written and whole (written here unless the one there
    describes these shards)."""
    shards = []
    for shard in plan["shards"]:
        path = folder / shard["name"]
        if not is_written(path):
            return None
        problem = structure_problem(path)
        if problem:
            shard_report(path).unlink(missing_ok=True)
            raise RuntimeError(f"{path} is damaged ({problem}); removed its report: run the command again to "
                               "rewrite it")
        report = json.loads(shard_report(path).read_text())
        shards.append({"name": path.name, "samples": report["written"], "bytes": path.stat().st_size,
                       "sha256": checksum_file(path).read_text().split()[0], "skipped": len(report["skipped"])})
    if (folder / MANIFEST).is_file():
        manifest = read_manifest(folder)
        if manifest["shards"] == shards:
            return manifest
    return write_manifest(folder, shards, plan["source"], plan["settings"])
