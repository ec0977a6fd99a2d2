"""A sharded .beton data set: a folder of .beton shards that trains as one file, for data sets no single process can
write and no single file system holds.

``smim-convert`` writes the shards (``smim_dist.data.convert_shards``), then, once every shard is whole, the union's
index and, last, ``manifest.json``: a folder without a manifest is an unfinished conversion and is never trained on.
The index (``index.bin``) is the shards' FFCV metadata laid end to end, with each stored field's pointer made a union
pointer (the shard's number in the high bits, its byte offset in the low ones) and the ``index`` field made the
sample's position in the union, followed by every allocation's union pointer and size in pointer order. Training maps
the index read-only (the ranks of a node share its pages) and reads each sample from its shard with one ``pread``, so
starting at any position reads nothing before it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from smim_dist.config_loading import ConfigError
from smim_dist.data.beton_check import CHEAP_BYTES, sha256_of, structure_problem
from smim_dist.files import replace_atomically, write_atomic

PLAN = "plan.json"
MANIFEST = "manifest.json"
INDEX = "index.bin"
FORMAT = "smim_dist sharded beton"
VERSION = 1
OFFSET_BITS = 40
"""a shard may hold up to 1 TiB; 2**24 shards fit in the pointer's high bits"""
MAX_SHARDS = 1 << (64 - OFFSET_BITS)


def is_sharded(path: str | Path) -> bool:
    """Whether ``data.path`` names a sharded data set (a folder) rather than one .beton file."""
    return Path(path).is_dir()


def shard_report(shard: Path) -> Path:
    return shard.with_name(shard.name + ".report.json")


def is_written(shard: Path) -> bool:
    """A shard is whole once its report is in place: ``write_samples`` renames it after the shard and its checksum."""
    return shard.is_file() and shard_report(shard).is_file()


def progress(folder: Path) -> tuple[int, int]:
    """(shards written, shards planned) of a conversion."""
    shards = json.loads((folder / PLAN).read_text())["shards"]
    return sum(is_written(folder / shard["name"]) for shard in shards), len(shards)


def describe(path: Path) -> tuple[np.void, np.ndarray]:
    """A .beton's header and field descriptors (two small reads)."""
    from ffcv.types import FieldDescType, HeaderType

    header = np.fromfile(path, dtype=HeaderType, count=1)[0]
    return header, np.fromfile(path, dtype=FieldDescType, count=int(header["num_fields"]), offset=HeaderType.itemsize)


def named_handlers(fields: np.ndarray) -> dict:
    """FFCV's field handlers by field name, in the file's order."""
    from ffcv.types import get_handlers
    from ffcv.utils import decode_null_terminated_string

    return dict(zip(map(decode_null_terminated_string, fields["name"]), get_handlers(fields)))


def metadata_type(handlers: dict) -> np.dtype:
    from ffcv.types import get_metadata_type

    return get_metadata_type(list(handlers.values()))


def _allocations(path: Path) -> int:
    from ffcv.types import ALLOC_TABLE_TYPE

    return (path.stat().st_size - int(describe(path)[0]["alloc_table_ptr"])) // ALLOC_TABLE_TYPE.itemsize


def write_index(folder: Path, shards: list[dict]) -> dict:
    """``index.bin`` of the whole shards ``shards`` (name, samples) in ``folder``, written atomically; its entry of the
    manifest. Memory holds one shard's metadata at a time."""
    from ffcv.reader import Reader

    paths = [folder / shard["name"] for shard in shards]
    first = paths[0]
    descriptors = describe(first)[1]
    handlers = named_handlers(descriptors)
    dtype, names = metadata_type(handlers), list(handlers)
    for path in paths[1:]:
        other = describe(path)[1]
        if not np.array_equal(other, descriptors):
            raise ValueError(f"{path} stores fields {list(named_handlers(other))} with other settings than {first}'s "
                             f"{names}; every shard of a data set must be written with the same smim-convert options")
    samples = sum(shard["samples"] for shard in shards)
    allocations = sum(_allocations(path) for path in paths)
    pointer_fields = [f"f{i}" for i in range(len(names)) if "data_ptr" in (dtype[f"f{i}"].names or ())]
    index_field, image_field = f"f{names.index('index')}", f"f{names.index('image')}"
    layout = {"samples": samples, "allocations": allocations, "metadata_itemsize": dtype.itemsize}
    largest = {"width": 0, "height": 0}

    def write(tmp: Path) -> None:
        size = samples * dtype.itemsize + allocations * 16
        with tmp.open("wb") as handle:
            handle.truncate(size)
        metadata, ptrs, sizes = _sections(tmp, dtype, layout, "r+")
        sample_at = allocation_at = 0
        for number, path in enumerate(paths):
            reader = Reader(str(path))
            base = np.uint64(number << OFFSET_BITS)
            if reader.metadata.dtype != dtype or reader.num_samples != shards[number]["samples"]:
                raise ValueError(f"{path} holds {reader.num_samples} samples of {reader.metadata.dtype}, its report "
                                 f"says {shards[number]['samples']}; rewrite it")
            part = reader.metadata.copy()
            for field in pointer_fields:
                part[field]["data_ptr"] += base
            part[index_field] = np.arange(sample_at, sample_at + len(part))
            for side in largest:
                largest[side] = max(largest[side], int(part[image_field][side].max()))
            metadata[sample_at:sample_at + len(part)] = part
            table = np.sort(reader.alloc_table, order="ptr")
            ptrs[allocation_at:allocation_at + len(table)] = table["ptr"] + base
            sizes[allocation_at:allocation_at + len(table)] = table["size"]
            sample_at, allocation_at = sample_at + len(part), allocation_at + len(table)
        for section in (metadata, ptrs, sizes):
            section.flush()

    index = folder / INDEX
    replace_atomically(index, write)
    return {"name": INDEX, **layout, "max_width": largest["width"], "max_height": largest["height"],
            "bytes": index.stat().st_size, "sha256": sha256_of(index)}


def _sections(path: Path, dtype: np.dtype, layout: dict, mode: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The index's metadata, allocation pointers and allocation sizes, mapped."""
    metadata_bytes = layout["samples"] * dtype.itemsize
    return (np.memmap(path, dtype=dtype, mode=mode, offset=0, shape=(layout["samples"],)),
            np.memmap(path, dtype=np.uint64, mode=mode, offset=metadata_bytes, shape=(layout["allocations"],)),
            np.memmap(path, dtype=np.uint64, mode=mode, offset=metadata_bytes + 8 * layout["allocations"],
                      shape=(layout["allocations"],)))


def write_manifest(folder: Path, shards: list[dict], source: str, settings: dict) -> dict:
    """The index, then the manifest that makes ``folder`` a data set; ``shards``: name, samples, bytes, sha256."""
    if len(shards) > MAX_SHARDS or any(shard["bytes"] >= 1 << OFFSET_BITS for shard in shards):
        raise ValueError(f"at most {MAX_SHARDS} shards of under {1 << OFFSET_BITS} bytes each")
    index = write_index(folder, shards)
    manifest = {"format": FORMAT, "version": VERSION, "source": source, "samples": index["samples"],
                "fields": list(named_handlers(describe(folder / shards[0]["name"])[1])), "settings": settings,
                "index": index,
                "shards": shards}
    write_atomic(folder / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    return manifest


def read_manifest(folder: Path) -> dict:
    """The manifest of ``folder``, checked against the files beside it by size (a ``stat`` per shard)."""
    path = folder / MANIFEST
    if not path.is_file():
        if (folder / PLAN).is_file():
            done, total = progress(folder)
            raise ConfigError(f"{folder} is an unfinished sharded conversion ({done} of {total} shards written, no "
                              f"{MANIFEST} yet); run the same smim-convert command again to finish it")
        raise ConfigError(f"data.path={str(folder)!r} is a folder without {MANIFEST}; data.source=ffcv reads a .beton "
                          "file or a sharded data set written by `smim-convert imagefolder SRC OUT_DIR --shard-size N`")
    try:
        manifest = json.loads(path.read_text())
        if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
            raise ValueError(f"format {manifest.get('format')!r} version {manifest.get('version')!r}")
        entries = [*manifest["shards"], manifest["index"]]
        expected = {entry["name"]: int(entry["bytes"]) for entry in entries}
        index = manifest["index"]
        if min(int(index[key]) for key in ("samples", "allocations", "max_width", "max_height")) < 0:
            raise ValueError("negative sizes in its index entry")
        if manifest["samples"] != sum(int(shard["samples"]) for shard in manifest["shards"]):
            raise ValueError("its sample count is not the sum of its shards'")
    except (ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"{path} is not a sharded data set's manifest ({err}); rewrite it with smim-convert") \
            from None
    for name, size in expected.items():
        file = folder / name
        if not file.is_file() or file.stat().st_size != size:
            found = f"{file.stat().st_size} bytes" if file.is_file() else "missing"
            raise ConfigError(f"{file} is {found}, its manifest says {size} bytes; the data set is damaged: rerun "
                              "the smim-convert command that wrote it (whole shards are kept)")
    return manifest


def verify_problem(folder: Path, manifest: dict, full: bool = True) -> str | None:
    """Why the data set is not what its manifest says: each shard's structure and checksum and the index's checksum;
    ``full=False`` checks only when the whole set is small enough to read at every start (``CHEAP_BYTES``)."""
    entries = [*manifest["shards"], manifest["index"]]
    if not full and sum(entry["bytes"] for entry in entries) > CHEAP_BYTES:
        print(f"smim_dist: {folder} is too large to check against its checksums at every start; "
              f"`smim-convert verify {folder}` reads it whole and does", flush=True)
        return None
    for entry in entries:
        path = folder / entry["name"]
        problem = structure_problem(path) if path.suffix == ".beton" else None
        if problem is None and sha256_of(path) != entry["sha256"]:
            problem = "its bytes do not match the manifest's checksum"
        if problem:
            return f"{path}: {problem}"
    return None


class ShardedReader:
    """What FFCV's loader reads of a ``Reader``, for the union of a sharded data set: handlers, metadata (mapped
    from the index), sample count; plus the shard files and the allocation table that ``UnionMemory`` reads by."""

    def __init__(self, folder: str | Path, verify: bool = False):
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder)
        if verify:
            problem = verify_problem(self.folder, self.manifest, full=False)
            if problem:
                raise ConfigError(f"{self.folder} is damaged: {problem}; rerun the smim-convert command that wrote it")
        self.shards = [self.folder / shard["name"] for shard in self.manifest["shards"]]
        header, fields = describe(self.shards[0])
        self.handlers = named_handlers(fields)
        self.field_names = list(self.handlers)
        self.page_size = int(header["page_size"])
        self.num_samples = int(self.manifest["samples"])
        dtype, layout = metadata_type(self.handlers), self.manifest["index"]
        if dtype.itemsize != layout["metadata_itemsize"]:
            raise ConfigError(f"{self.folder / INDEX} was written for another FFCV version; rerun smim-convert")
        self.metadata, self.ptrs, self.sizes = (np.asarray(section) for section in
                                                _sections(self.folder / INDEX, dtype, layout, "r"))

    @property
    def largest_image(self) -> int:
        """Pixels of the largest image any sample may hold (the largest width x the largest height)."""
        return self.manifest["index"]["max_width"] * self.manifest["index"]["max_height"]

    @property
    def file_name(self) -> str:
        return str(self.folder)


def open_files(paths: list[Path]) -> np.ndarray:
    """Read-only descriptors of ``paths``, raising the soft limit on open files up to the hard one if they need it."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = len(paths) + 1024
    if soft != resource.RLIM_INFINITY and soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            raise ConfigError(f"reading {len(paths)} shards needs about {needed} open files; this process may open "
                              f"{hard} (ulimit -Hn). Re-convert with a larger --shard-size or raise the limit")
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
    return np.array([os.open(path, os.O_RDONLY) for path in paths], dtype=np.int32)
