"""Checkpoints of the DeepSpeed engine plus what the loop needs to continue exactly: train state and every rank's RNGs.

A checkpoint is written under a temporary tag, renamed to its final tag once every rank has finished, and only then
named by the ``latest`` pointer (itself replaced atomically), so a job killed mid-write leaves the previous checkpoint
as the one a restart uses. A manifest of every file's size and SHA-256, written last, lets a restart tell a complete
checkpoint from one a full disk or a dying node truncated: it takes the newest checkpoint that validates and reports
the ones it passed over. Readers outside training (``smim-export``, every evaluation) validate a checkpoint the same
way (``resolve_checkpoint``) and read its fp32 weights from any ZeRO stage (``consolidated_state_dict``).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

from smim_dist.config import Config, ConfigError, config_from_dict
from smim_dist.engine.distributed import DistInfo, barrier
from smim_dist.engine.run_dir import CONFIG_FILE, read_saved_config
from smim_dist.files import write_atomic

LATEST = "latest"
META = "meta.json"
MANIFEST = "manifest.json"


def checkpoint_root(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(engine, run_dir: Path, dist_info: DistInfo, client_state: dict, tag: str,
                    meta: dict) -> Path:
    """``meta`` (epoch, step, ...) is written beside the DeepSpeed files so retention can be decided without loading;
    the world size and accumulation are added, for a resume on another number of ranks."""
    meta = {**meta, "world_size": dist_info.world_size, "accumulation": engine.gradient_accumulation_steps()}
    root = checkpoint_root(run_dir)
    partial = f"{tag}.partial"
    if dist_info.is_main and (root / partial).exists():
        shutil.rmtree(root / partial)
    barrier()
    engine.save_checkpoint(str(root), tag=partial, client_state=client_state, save_latest=False)
    torch.save(_rng_state(), root / partial / f"rng_rank{dist_info.rank:05d}.pt")
    barrier()
    if dist_info.is_main:
        (root / partial / META).write_text(json.dumps(meta) + "\n")
        write_atomic(root / partial / MANIFEST, json.dumps(file_digests(root / partial, flush=True), indent=1) + "\n")
        if (root / tag).exists():
            shutil.rmtree(root / tag)
        os.replace(root / partial, root / tag)
        write_atomic(root / LATEST, tag + "\n")
    barrier()
    return root / tag


def file_digests(folder: Path, flush: bool = False, hashes: bool = True) -> dict[str, dict]:
    """Size and SHA-256 of every file under ``folder`` but the manifest; ``flush``: each flushed to disk on the way
    (the writer, before the manifest vouches for them); without ``hashes``, sizes alone, reading no file."""
    digests = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST):
        entry: dict = {"bytes": path.stat().st_size}
        if hashes or flush:
            digest = hashlib.sha256()
            with path.open("rb") as handle:
                for block in iter(lambda: handle.read(1 << 24), b""):
                    digest.update(block)
                if flush:
                    os.fsync(handle.fileno())
            entry["sha256"] = digest.hexdigest()
        digests[str(path.relative_to(folder))] = entry
    return digests


def checkpoint_problem(folder: Path, hashes: bool = True) -> str | None:
    """Why the checkpoint in ``folder`` cannot be trusted, or None when every file matches its manifest; without
    ``hashes`` the files' sizes and the manifest's completeness only, which a login node checks in no time (the
    training's rank 0 checks the hashes before it reads the checkpoint)."""
    try:
        expected = json.loads((folder / MANIFEST).read_text())
    except FileNotFoundError:
        return "no manifest (written before its files were complete?)"
    except json.JSONDecodeError as err:
        return f"unreadable manifest ({err})"
    if not isinstance(expected, dict):
        return f"its manifest is not a table of files ({type(expected).__name__})"
    found = file_digests(folder, hashes=hashes)
    for name, entry in expected.items():
        if name not in found:
            return f"{name} is missing"
        if found[name]["bytes"] != entry["bytes"]:
            return f"{name} has {found[name]['bytes']} bytes, the manifest says {entry['bytes']}"
        if hashes and found[name]["sha256"] != entry["sha256"]:
            return f"{name} does not match its checksum"
    return _unlisted_part(folder, set(expected))


def _unlisted_part(folder: Path, listed: set[str]) -> str | None:
    """A manifest that checks out must also list what a resume reads: the meta data, the model states and, for each
    rank of the world size that wrote it, its RNG states and (under ZeRO) its optimizer partition."""
    if META not in listed:
        return f"its manifest does not list {META}"
    try:
        meta = json.loads((folder / META).read_text())
        ranks, _ = int(meta["world_size"]), int(meta["accumulation"])
    except (ValueError, KeyError, TypeError) as err:
        return f"{META} lacks the world size or the gradient accumulation it was written with ({err})"
    needed = [f"rng_rank{rank:05d}.pt" for rank in range(ranks)]
    if not any(name.endswith("model_states.pt") for name in listed):
        return "its manifest lists no model states"
    if any(name.endswith("optim_states.pt") for name in listed):
        needed += [f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt" for rank in range(ranks)]
    missing = [name for name in needed if not any(entry.endswith(name) for entry in listed)]
    return f"its manifest does not list {', '.join(missing)}" if missing else None


def newest_valid_tag(run_dir: Path, hashes: bool = True) -> tuple[str | None, list[str]]:
    """The tag to resume from (``latest`` first, then older checkpoints, newest first) and a line for each
    checkpoint passed over; ``hashes`` as for ``checkpoint_problem``."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return None, []
    pointer = latest_tag(run_dir)
    tags = sorted((p.name for p in root.iterdir() if p.is_dir() and not p.name.endswith(".partial")), reverse=True)
    if pointer in tags:
        tags.remove(pointer)
        tags.insert(0, pointer)
    skipped = []
    for tag in tags:
        problem = checkpoint_problem(root / tag, hashes)
        if problem is None:
            return tag, skipped
        skipped.append(f"checkpoint {root / tag} skipped: {problem}")
    return None, skipped


def check_resumable(run_dir: Path, tag: str | None, skipped: list[str], allow_fresh_start: bool) -> None:
    """A run whose checkpoints are all damaged is not silently trained again from step 0."""
    if tag is None and skipped and not allow_fresh_start:
        raise ConfigError(f"no checkpoint of {run_dir} is usable: " + "; ".join(skipped) + ". Nothing was changed. "
                          "To train this run again from step 0, add checkpoint.allow_fresh_start=true")


def prune_checkpoints(run_dir: Path, keep_last: int, keep_every_epochs: int, keep: set[str] = frozenset()) -> list[str]:
    """Rank 0: delete all but the newest ``keep_last`` checkpoints, those that close an epoch that is a multiple of
    ``keep_every_epochs`` and those in ``keep``; returns the deleted tags. The one ``latest`` names is never deleted."""
    root = checkpoint_root(run_dir)
    latest = latest_tag(run_dir)
    tags = sorted(p.name for p in root.iterdir() if p.is_dir() and (p / META).exists())
    deleted = []
    for tag in tags[: max(len(tags) - keep_last, 0)]:
        meta = checkpoint_meta(run_dir, tag)
        milestone = keep_every_epochs > 0 and meta["batch_in_epoch"] == 0 and meta["epoch"] % keep_every_epochs == 0
        if tag != latest and not milestone and tag not in keep:
            shutil.rmtree(root / tag)
            deleted.append(tag)
    return deleted


def checkpoint_meta(run_dir: Path, tag: str) -> dict:
    """epoch, step, batch_in_epoch, world_size, ... of a checkpoint, read without loading it"""
    return json.loads((checkpoint_root(run_dir) / tag / META).read_text())


def latest_tag(run_dir: Path) -> str | None:
    """The tag the ``latest`` pointer names; None when there is none or it is not a readable pointer file (a restart
    then searches the checkpoints themselves)."""
    pointer = checkpoint_root(run_dir) / LATEST
    try:
        return pointer.read_text().strip() or None if pointer.is_file() else None
    except (OSError, UnicodeDecodeError):
        return None


def load_checkpoint(engine, run_dir: Path, dist_info: DistInfo, tag: str) -> dict:
    """Restore engine, optimizer and this rank's RNGs; returns the client state saved with the checkpoint."""
    root = checkpoint_root(run_dir)
    path, client_state = engine.load_checkpoint(str(root), tag=tag)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {root / tag}")
    rng_file = root / tag / f"rng_rank{dist_info.rank:05d}.pt"
    if rng_file.exists():
        _set_rng_state(torch.load(rng_file, weights_only=False))
    return client_state


MODEL_STATES = "mp_rank_00_model_states.pt"


def resolve_checkpoint(path: Path) -> tuple[Path, Config]:
    """The checkpoint directory and the run's config, from a checkpoint directory or a run directory (its newest
    checkpoint that validates, as a resume would take). Both are checked as training checks them: every file against
    the checkpoint's manifest, the config as a whole run's config."""
    if (path / "checkpoints").is_dir():
        tag, skipped = newest_valid_tag(path)
        for line in skipped:
            print(f"smim_dist: {line}", file=sys.stderr)
        if tag is None:
            raise ConfigError(f"{path} has no usable checkpoint" + (f": {'; '.join(skipped)}" if skipped else ""))
        path = path / "checkpoints" / tag
    elif not any(path.glob("*model_states.pt")):
        raise FileNotFoundError(f"{path} is not a smim_dist checkpoint (no DeepSpeed model states); pass a run "
                                "directory or one of its checkpoints/<tag> directories")
    problem = checkpoint_problem(path)
    if problem:
        raise ConfigError(f"checkpoint {path} is damaged: {problem}; nothing was read from it")
    config_file = path.parent.parent / CONFIG_FILE
    if not config_file.exists():
        raise FileNotFoundError(f"no {CONFIG_FILE} in the run directory {path.parent.parent}; the export needs the "
                                "run's model config")
    return path, config_from_dict(read_saved_config(config_file))


def consolidated_state_dict(checkpoint: Path) -> dict[str, torch.Tensor]:
    """fp32 weights of the whole model, gathered from ZeRO partitions where the optimizer holds the master copy."""
    if any(checkpoint.glob("*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint  # login nodes lack it

        state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint.parent), tag=checkpoint.name)
    else:
        state = torch.load(checkpoint / MODEL_STATES, map_location="cpu", weights_only=False)["module"]
    return {key: value.float() for key, value in state.items()}
