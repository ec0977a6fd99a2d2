"""A .beton is checked before anything trains on it: its structure whenever it is opened, its bytes against the
checksum ``smim-convert`` writes beside it (``OUT.beton.sha256``, ``sha256sum -c`` format).

FFCV's reader trusts the file: one cut short reports the header's sample count but holds fewer index entries, and
one partly overwritten decodes garbage. The structural check costs a read of the header and index; the checksum a
read of the whole file, so training checks it at start only where that is cheap (``CHEAP_BYTES``) and otherwise
says how to run ``smim-convert verify``.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from smim_dist.config_loading import ConfigError
from smim_dist.files import write_atomic

CHEAP_BYTES = 2 << 30
"""files up to this size are checked against their checksum whenever training opens them (seconds)"""


def checksum_file(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def record_checksum(path: Path, name: str) -> None:
    """Written by smim-convert for ``path`` as it will be named (``name``) once renamed into place."""
    write_atomic(checksum_file(path.with_name(name)), f"{sha256_of(path)}  {name}\n")


def structure_problem(path: Path) -> str | None:
    """Why the file is not a whole FFCV file: header, index and data must fit the file and each other, and the index
    must hold one entry per sample for each field stored out of line (images, bytes, arrays)."""
    from ffcv.fields import FloatField, IntField  # FFCV loads numba: not at import, for runs that never read one
    from ffcv.types import ALLOC_TABLE_TYPE, CURRENT_VERSION, FieldDescType, HeaderType, get_handlers

    size = path.stat().st_size
    if size < HeaderType.itemsize:
        return f"{size} bytes, shorter than a header"
    header = np.fromfile(path, dtype=HeaderType, count=1)[0]
    if header["version"] != CURRENT_VERSION:
        return f"format version {header['version']}, not FFCV's {CURRENT_VERSION}"
    table_at, samples = int(header["alloc_table_ptr"]), int(header["num_samples"])
    if not HeaderType.itemsize < table_at <= size or (size - table_at) % ALLOC_TABLE_TYPE.itemsize:
        return f"its index at byte {table_at} does not fit its {size} bytes (cut short?)"
    try:
        fields = np.fromfile(path, dtype=FieldDescType, count=int(header["num_fields"]), offset=HeaderType.itemsize)
        out_of_line = sum(not isinstance(handler, (IntField, FloatField)) for handler in get_handlers(fields))
    except (KeyError, ValueError) as err:
        return f"its field descriptions are unreadable ({err})"
    table = np.fromfile(path, dtype=ALLOC_TABLE_TYPE, offset=table_at)
    found = len(np.unique(table["sample_id"]))
    if len(table) != out_of_line * samples or (out_of_line and found != samples):
        return f"its header counts {samples} samples, its index holds {found if out_of_line else len(table)}"
    if len(table) and int((table["ptr"] + table["size"]).max()) > table_at:
        return "its index points past the data"
    return None


def open_beton(path: str | Path, verify: bool = False):
    """FFCV's reader of ``path`` once the structure holds, and, with ``verify``, the checksum where it is cheap."""
    from ffcv.reader import Reader

    path = Path(path)
    problem = structure_problem(path)
    if problem:
        raise ConfigError(f"{path} is damaged: {problem}; rewrite it with smim-convert")
    if verify:
        if path.stat().st_size <= CHEAP_BYTES:
            problem = checksum_problem(path)
            if problem:
                raise ConfigError(f"{path} is damaged: {problem}; rewrite it with smim-convert")
        elif checksum_file(path).exists():
            print(f"smim_dist: {path} is too large to check against its checksum at every start; "
                  f"`smim-convert verify {path}` reads it whole and does", flush=True)
    try:
        return Reader(str(path))
    except Exception as err:
        raise ConfigError(f"{path} is not a readable FFCV file ({type(err).__name__}: {err}); rewrite it with "
                          "smim-convert") from None


def checksum_problem(path: Path) -> str | None:
    """None when the bytes match the recorded checksum, or when none was recorded (files of other writers)."""
    recorded = checksum_file(path)
    if not recorded.exists():
        return None
    expected = recorded.read_text().split()[:1]
    if not expected or len(expected[0]) != 64:
        return f"its checksum file {recorded} is unreadable"
    return None if sha256_of(path) == expected[0] else f"its bytes do not match its checksum ({recorded})"
