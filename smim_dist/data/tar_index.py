"""Random access into local, uncompressed webdataset tar shards (img2dataset's layout) for ``smim-convert``: one
pass over a shard's headers records where each member's bytes lie, so any sample can later be read with one seek,
in any order and from any process, without unpacking the shard."""

from __future__ import annotations

import json
import tarfile

__all__ = ["IMAGE_EXTENSIONS", "Member", "index_tar", "read_member"]

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
"""image members of a sample, first match wins (the conversion and ``smim_dist.data.shards`` alike)"""

Member = tuple[str, int, int]
"""(tar path, offset of the member's data, its size)"""


def read_member(member: Member) -> bytes:
    path, offset, size = member
    with open(path, "rb") as file:
        file.seek(offset)
        data = file.read(size)
    if len(data) != size:
        raise EOFError(f"{path} ends {size - len(data)} bytes into this member; was it truncated?")
    return data


def index_tar(path: str, min_size: int = 0) -> tuple[list[tuple[str, Member, int]], list[dict]]:
    """A shard's samples as (name "shard:member", image member, label), and its skips as report entries.

    Members sharing a key (the name up to the first dot of the basename, as webdataset splits it) form a sample; its
    label is the integer in its .cls member, -1 without one; .txt captions are not read. With ``min_size``, a sample
    whose .json (img2dataset's) gives a shorter side below it is skipped: ``original_width`` / ``original_height``
    where img2dataset resized the image, else ``width`` / ``height``; a sample without those sizes is kept. A shard
    that breaks off keeps the samples before the break, less the one it cuts into, which may have lost members such
    as its .cls.
    """
    samples, skipped, groups = [], [], {}
    try:
        with open(path, "rb") as file, tarfile.open(fileobj=file, mode="r:") as tar:
            for info in tar:
                directory, slash, base = info.name.rpartition("/")
                stem, dot, ext = base.partition(".")
                if info.isreg() and dot:
                    groups.setdefault(directory + slash + stem, {}).setdefault(ext.lower(), info)
            file.seek(tar.offset)  # tarfile ends quietly at a cut or garbled header: demand the end-of-archive block
            if file.read(tarfile.BLOCKSIZE) != bytes(tarfile.BLOCKSIZE):
                raise tarfile.ReadError(f"no valid header or end-of-archive block at byte {tar.offset}")
    except (tarfile.TarError, OSError) as err:
        lost = [groups.popitem()[0]] if groups else []
        skipped.append({"path": path, "reason": f"{type(err).__name__}: {err}; kept the {len(groups)} samples "
                                                "before it"})
        skipped += [{"path": f"{path}:{key}", "reason": "cut off by the shard's error"} for key in lost]
    for key, infos in groups.items():
        image = next((infos[ext] for ext in IMAGE_EXTENSIONS if ext in infos), None)
        if image is None:
            skipped.append({"path": f"{path}:{key}", "reason": "no image member"})
            continue
        try:
            label = int(read_member((path, infos["cls"].offset_data, infos["cls"].size))) if "cls" in infos else -1
        except (ValueError, EOFError) as err:
            skipped.append({"path": f"{path}:{infos['cls'].name}", "reason": f"{type(err).__name__}: {err}"})
            continue
        too_small = min_size and "json" in infos and _too_small(path, infos["json"], min_size)
        if too_small:
            skipped.append({"path": f"{path}:{key}", "reason": too_small})
            continue
        samples.append((f"{path}:{image.name}", (path, image.offset_data, image.size), label))
    return samples, skipped


def _too_small(path: str, info: tarfile.TarInfo, min_size: int) -> str | None:
    """Why img2dataset's .json puts the sample below ``min_size``, or None (also when it gives no sizes)."""
    try:
        meta = json.loads(read_member((path, info.offset_data, info.size)))
    except (ValueError, EOFError) as err:
        return f"unreadable {info.name} ({type(err).__name__}: {err})"
    if not isinstance(meta, dict):
        return None
    for width_key, height_key in (("original_width", "original_height"), ("width", "height")):
        width, height = meta.get(width_key), meta.get(height_key)
        if isinstance(width, int) and isinstance(height, int):
            small = min(width, height) < min_size
            return f"{width}x{height} in its .json, smaller than --min-size {min_size}" if small else None
    return None
