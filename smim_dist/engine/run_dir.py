"""The run directory: created once, its saved config compared on every start so that a re-launch resumes only the
same run."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path

import yaml

from smim_dist.config import Config, ConfigError, save_config

CONFIG_FILE = "config.yaml"
CONFIG_HISTORY = "config_changes.jsonl"
"""one line per start that changed a harmless setting: when, and each key's old and new value"""
HARMLESS = ("log.", "checkpoint.", "eval.", "data.num_workers", "data.path", "engine.max_bad_steps", "engine.tf32",
            "engine.overlap_comm", "output_dir")
"""Keys a resumed run may change: they do not alter what is trained (TF32 and the all-reduce's bucketing change only
roundings). A key missing from a run saved by an older version counts as changed unless it is listed here."""


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_changes(saved: dict, current: dict, harmless: bool = False) -> list[str]:
    """Keys whose values differ between the saved and the current config: those that change what is trained, or
    with ``harmless`` the others."""
    old, new = _flatten(saved), _flatten(current)
    return [f"{key}: {old.get(key)!r} -> {new.get(key)!r}" for key in sorted(old.keys() | new.keys())
            if old.get(key) != new.get(key) and key.startswith(HARMLESS) == harmless]


def read_saved_config(path: Path) -> dict:
    """A run's saved config, refused whole when it is not the complete mapping ``save_config`` writes."""
    try:
        saved = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise ConfigError(f"{path} is damaged ({err}); nothing was changed. Restore the run's config.yaml, or move "
                          "the run directory aside to start a new run") from None
    missing = {f.name for f in dataclasses.fields(Config)} - set(saved if isinstance(saved, dict) else {})
    if missing:
        raise ConfigError(f"{path} is damaged (it lacks {', '.join(sorted(missing))}); nothing was changed. Restore "
                          "the run's config.yaml, or move the run directory aside to start a new run")
    return saved


def check_run_dir(cfg: Config) -> bool:
    """Refuse a run directory that belongs to a run with another config; True if it already holds this run."""
    path = cfg.run_dir / CONFIG_FILE
    if not path.exists():
        return False
    saved = read_saved_config(path)
    changes = config_changes(saved, cfg.to_dict())
    if changes:
        raise ConfigError(
            f"{cfg.run_dir} holds another run whose config differs in: " + "; ".join(changes)
            + ". Pick a new run_name (or output_dir) for a new run; nothing in that directory was changed")
    return True


def create_run_dir(cfg: Config) -> None:
    """Rank 0 only: make the directory and save the resolved config. A resume that changed harmless settings
    (evaluation, logging, retention, where the data is) saves them too, so the saved config stays what runs (the
    evaluation jobs read it), and records the change in config_changes.jsonl."""
    path = cfg.run_dir / CONFIG_FILE
    try:
        cfg.run_dir.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            save_config(cfg, path)
            return
        changes = config_changes(read_saved_config(path), cfg.to_dict(), harmless=True)
        if changes:
            record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "changes": changes}
            with (cfg.run_dir / CONFIG_HISTORY).open("a") as history:
                history.write(json.dumps(record) + "\n")
            save_config(cfg, path)
    except OSError as err:
        raise ConfigError(f"cannot write the run directory {cfg.run_dir} ({err.strerror}); give output_dir a "
                          "writable place") from None


CHECKPOINT_BYTES_PER_PARAMETER = 16
"""weights (fp32, or bf16 with an fp32 master copy) and AdamW's two fp32 moments, over all ranks"""


def check_writable(cfg: Config, num_parameters: int) -> None:
    """Rank 0, before the first step: the checkpoint folder takes a file and has room for one checkpoint, so a
    read-only or full disk stops the run now rather than at its first save, an epoch later."""
    root = cfg.run_dir / "checkpoints"
    probe = root / f".write-test-{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"0")
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"cannot write checkpoints into {root} ({err.strerror}); give output_dir a writable place"
                          ) from None
    need, free = CHECKPOINT_BYTES_PER_PARAMETER * num_parameters, shutil.disk_usage(root).free
    if free < need:
        raise ConfigError(f"{root} has {free / 2**20:.1f} MiB free, less than one checkpoint needs (about "
                          f"{need / 2**20:.1f} MiB for {num_parameters / 1e6:.2f}M parameters); free some space or "
                          "point output_dir elsewhere")
