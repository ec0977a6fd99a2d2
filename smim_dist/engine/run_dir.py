"""The run directory: created once, its saved config compared on every start so a re-launch resumes only the same run."""

from __future__ import annotations

import yaml

from smim_dist.config import Config, ConfigError, save_config

CONFIG_FILE = "config.yaml"
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


def config_changes(saved: dict, current: dict) -> list[str]:
    """Keys whose values differ between the saved and the current config, harmless ones left out."""
    old, new = _flatten(saved), _flatten(current)
    return [f"{key}: {old.get(key)!r} -> {new.get(key)!r}" for key in sorted(old.keys() | new.keys())
            if old.get(key) != new.get(key) and not key.startswith(HARMLESS)]


def check_run_dir(cfg: Config) -> bool:
    """Refuse a run directory that belongs to a run with another config; True if it already holds this run."""
    path = cfg.run_dir / CONFIG_FILE
    if not path.exists():
        return False
    saved = yaml.safe_load(path.read_text())
    changes = config_changes(saved, cfg.to_dict())
    if changes:
        raise ConfigError(
            f"{cfg.run_dir} holds another run whose config differs in: " + "; ".join(changes)
            + ". Pick a new run_name (or output_dir) for a new run; nothing in that directory was changed")
    return True


def create_run_dir(cfg: Config) -> None:
    """Rank 0 only: make the directory and save the resolved config, unless this run saved it already."""
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    if not (cfg.run_dir / CONFIG_FILE).exists():
        save_config(cfg, cfg.run_dir / CONFIG_FILE)
