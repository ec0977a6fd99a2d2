"""One ``results.json`` per evaluated checkpoint, shared by every protocol, and the accuracies they put in it.

    {"checkpoint": "/abs/.../step_00150000", "tag": "step_00150000", "step": 150000,
     "protocols": {"knn": {"k": 20, ..., "cls": {"top1": ..., "top5": ...}, "patch": {...}}, "linear": {...}}}

Protocols finish independently (a kNN job beside training, a linear probe by hand), possibly at the same moment, so
each one merges its own entry under an exclusive lock on the folder and replaces the file atomically: neither loses
the other's entry, and a reader sees the old file or the whole new one, never a half-written one.
"""

from __future__ import annotations

import fcntl
import json
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from smim_dist.config import ConfigError
from smim_dist.engine.checkpoint import META
from smim_dist.files import replace_atomically

RESULTS_FILE = "results.json"
LOCK_FILE = ".results.lock"
METRICS_FILE = "metrics.jsonl"


@contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """Exclusive across processes (and hosts, on file systems with working flock) for one read-merge-write."""
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / LOCK_FILE).open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def read_results(folder: Path) -> dict[str, Any]:
    """The folder's results, ``{"protocols": {}}`` when there are none; a file of another layout is refused rather
    than overwritten."""
    path = folder / RESULTS_FILE
    if not path.exists():
        return {"protocols": {}}
    stored = json.loads(path.read_text())
    if not isinstance(stored, dict) or not isinstance(stored.get("protocols"), dict):
        raise ConfigError(f"{path} is not a smim-eval results file (no `protocols` mapping); move it away, or pass "
                          "--out to write the results elsewhere")
    return stored


def previous_results(folder: Path, protocol: str, tag: str, settings: Mapping[str, Any],
                     required: tuple[str, ...] = ()) -> dict[str, Any] | None:
    """The stored results if ``protocol``'s entry answers this request (same checkpoint tag, same ``settings``, every
    ``required`` key present); None if there is no entry; an error naming the differences if it holds other results.
    The checkpoint's path is not compared: a run directory may move."""
    stored = read_results(folder)
    entry = stored["protocols"].get(protocol)
    if entry is None:
        return None
    differences = [f"tag: stored {stored.get('tag')!r}, asked {tag!r}"] if stored.get("tag") != tag else []
    differences += [f"{key}: stored {entry.get(key)!r}, asked {value!r}" for key, value in settings.items()
                    if entry.get(key) != value]
    differences += [f"no {key} results" for key in required if key not in entry]
    if differences:
        raise ConfigError(f"{folder / RESULTS_FILE} holds other {protocol} results ({'; '.join(differences)}); pass "
                          "--force to replace them or --out DIR to write elsewhere")
    return stored


def merge_results(folder: Path, header: Mapping[str, Any], protocol: str, entry: Mapping[str, Any]) -> dict[str, Any]:
    """Store ``entry`` as ``protocol``'s results beside the other protocols' and return the whole file. Entries of
    another checkpoint (a reused ``--out`` folder, replaced with ``--force``) are dropped rather than mixed in."""
    with _locked(folder):
        stored = read_results(folder)
        protocols = stored["protocols"] if stored.get("tag") == header["tag"] else {}
        merged = {**header, "protocols": {**protocols, protocol: dict(entry)}}
        replace_atomically(folder / RESULTS_FILE, lambda tmp: tmp.write_text(json.dumps(merged, indent=2) + "\n"))
    return merged


def results_folder(checkpoint: Path, out: Path | None) -> Path:
    """``out``, or the run's ``eval/<tag>/`` beside its ``checkpoints/<tag>/``."""
    return Path(out) if out else checkpoint.parent.parent / "eval" / checkpoint.name


def checkpoint_header(checkpoint: Path) -> dict[str, Any]:
    """Which checkpoint the results are of: its absolute path, tag and training step (from its meta file)."""
    meta = checkpoint / META
    return {"checkpoint": str(checkpoint.resolve()), "tag": checkpoint.name,
            "step": json.loads(meta.read_text())["step"] if meta.exists() else None}


def read_cache(file: Path, key: Mapping[str, Any], field: str = "features") -> Any | None:
    """``field`` of a cache file that ``torch.save`` wrote as ``{"key": key, field: ...}``; None when the file is
    missing or was written for another key (another checkpoint, block, data or size), which the caller recomputes."""
    if not file.exists():
        return None
    cache = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    return cache[field] if cache["key"] == key else None


def _resume_state(state_file: Path, settings: Mapping[str, Any], what: str) -> dict | None:
    """The saved per-epoch progress of this very training (``{"settings": settings, ...}``); an error if the folder
    holds the progress of another one, which continuing would silently mix into this one's results."""
    if not state_file.exists():
        return None
    state = torch.load(state_file, map_location="cpu", weights_only=True)
    if state["settings"] != settings:
        differences = [f"{key}: saved {state['settings'].get(key)!r}, asked {value!r}" for key, value in
                       settings.items() if state["settings"].get(key) != value]
        raise ConfigError(f"{state_file} holds the progress of another {what} ({'; '.join(differences)}); "
                          "pass --force to start over or --out DIR to write elsewhere")
    return state


def prior_work(folder: Path, protocol: str, what: str, subdir: str, tag: str, settings: Mapping[str, Any],
               required: tuple[str, ...], force: bool, say: Callable[[str], None]
               ) -> tuple[dict[str, Any] | None, Path, dict[str, Any], dict | None]:
    """What an earlier run of a trained protocol left in ``folder``: its stored results when they answer this request
    (then there is nothing to do), the file its per-epoch progress goes to (``<subdir>/state.pt``), that progress's
    key and the progress to continue from. ``force`` ignores both."""
    previous = None if force else previous_results(folder, protocol, tag, settings, required)
    if previous is not None:
        say(f"{what} results for {tag} are already in {folder / RESULTS_FILE}; nothing to do (--force recomputes)")
    state_file, state_key = folder / subdir / "state.pt", {"tag": tag, **settings}
    resume = None if force or previous is not None else _resume_state(state_file, state_key, what)
    return previous, state_file, state_key, resume


def save_progress(state_file: Path, state: dict) -> None:
    """A trained protocol's per-epoch progress: ``metrics.jsonl`` beside the state, rewritten from the state's
    ``history`` (one record per epoch), then the state a rerun continues from. A run stopped between the two redoes
    the epoch and rewrites both, so the metrics never hold an epoch twice."""
    lines = "".join(json.dumps(record) + "\n" for record in state["history"])
    replace_atomically(state_file.parent / METRICS_FILE, lambda tmp: tmp.write_text(lines))
    replace_atomically(state_file, lambda tmp: torch.save(state, tmp))


def top_k_accuracy(scores: Tensor, labels: Tensor) -> dict[str, float]:
    """Top-1 (and top-5 where there are at least 5 classes) accuracy of class scores ``[N, C]``."""
    num_classes = scores.shape[1]
    hits = scores.topk(min(5, num_classes), dim=1).indices == labels[:, None]
    result = {"top1": hits[:, 0].float().mean().item()}
    if num_classes >= 5:
        result["top5"] = hits.any(dim=1).float().mean().item()
    return result
