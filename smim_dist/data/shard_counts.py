"""Per-shard sample counts of a tar-shard spec (``smim-convert count``, read through ``data.shard_counts``): with them
a resumed stream passes over the shards before its shuffle window without opening them, local or remote, and reads
only the shard the window starts in. Local shards' sizes are recorded too, so a shard rewritten since it was counted
is refused instead of silently shifting every batch after it; a shard whose count is found wrong while it is read
stops training with its name."""

from __future__ import annotations

import json
import os
import tarfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from smim_dist.data.shards import expand_shards, indexed, raw_samples, tar_samples

VERSION = 1


def count_shard(url: str) -> dict:
    """A local .tar: its headers only; other sources are read through."""
    try:
        if indexed(url):
            return {"samples": len(tar_samples(url)), "bytes": Path(url).stat().st_size}
        return {"samples": sum(1 for _ in raw_samples([url])), "bytes": None}
    except (tarfile.TarError, OSError) as err:
        raise ValueError(f"{url}: {err}") from err


def write_counts(spec: str, out: Path, workers: int | None = None) -> dict:
    """Counts every shard of ``spec`` in ``workers`` processes and writes them to ``out`` (replaced atomically)."""
    urls = expand_shards(spec)
    with ProcessPoolExecutor(workers or os.cpu_count()) as pool:
        shards = dict(zip(urls, pool.map(count_shard, urls, chunksize=16)))
    record = {"version": VERSION, "spec": spec, "shards": shards}
    partial = out.with_name(out.name + ".partial")
    partial.write_text(json.dumps(record, indent=1))
    partial.replace(out)
    return record


def load_counts(path: str | Path, urls: list[str]) -> dict[str, int]:
    """The sample count of each of ``urls``; errors name the file, the shard and what to do. A missing shard is left
    to the loader's own check, which names it."""
    redo = f"count them again: smim-convert count SHARDS {path}"
    try:
        record = json.loads(Path(path).read_text())
        shards = record["shards"]
        if record.get("version") != VERSION or not isinstance(shards, dict):
            raise ValueError(f"version {record.get('version')!r}, this smim_dist reads {VERSION}")
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"data.shard_counts={str(path)!r} is not a counts file ({err}); {redo}") from err
    missing = [url for url in urls if url not in shards]
    if missing:
        raise ValueError(f"data.shard_counts={str(path)!r} has no count for {len(missing)} of the {len(urls)} shards, "
                         f"e.g. {missing[0]!r}; {redo}")
    for url in urls:
        size = shards[url].get("bytes")
        if size is not None and indexed(url) and Path(url).is_file() and Path(url).stat().st_size != size:
            raise ValueError(f"{url} is {Path(url).stat().st_size} bytes, not the {size} it had when counted in "
                             f"{path}; {redo}")
    return {url: int(shards[url]["samples"]) for url in urls}
