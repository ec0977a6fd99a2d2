"""Whether this machine has the files a run reads: the environment half of config checking, run where the files are
read (training, its launchers), never where a saved run is only exported or evaluated. No torch here, so the SLURM
launcher runs it on a login node."""

from __future__ import annotations

from pathlib import Path

from smim_dist.config import Config, ConfigError
from smim_dist.targets.tokenizer_file import TokenizerWeightsError, check_tokenizer_file


def missing_files(cfg: Config) -> list[str]:
    """Every file or folder the run reads that is not on this machine, each with what to do; the loaders check the
    contents before training starts."""
    problems = []
    if cfg.target.kind == "beit":
        try:
            check_tokenizer_file(cfg.target.tokenizer_path, cfg.target.trust_pickle)
        except TokenizerWeightsError as err:
            problems.append(str(err))
    if not cfg.data.demo and cfg.data.source == "imagefolder" and not (Path(cfg.data.path) / "train").is_dir():
        problems.append(f"data.path={cfg.data.path!r} has no train/ folder; data.source=imagefolder expects "
                        "<path>/train/<class>/<image> (the ImageNet layout)")
    if not cfg.data.demo and cfg.data.source == "ffcv" and not Path(cfg.data.path).exists():
        problems.append(f"data.path={cfg.data.path!r} does not exist; data.source=ffcv reads a .beton, or the folder "
                        "of a sharded one, written by `smim-convert imagefolder SRC OUT.beton` (or set data.demo=true "
                        "for the embedded demo set)")
    if cfg.data.shard_counts and not Path(cfg.data.shard_counts).is_file():
        problems.append(f"data.shard_counts={cfg.data.shard_counts!r} is not a file; write it with `smim-convert count "
                        "SHARDS FILE` (the same spec as data.path), or leave it unset")
    if cfg.eval.config_dir is not None and not Path(cfg.eval.config_dir).is_dir():
        problems.append(f"eval.config_dir={cfg.eval.config_dir}: no such folder; point it at a folder of "
                        "<protocol>.yaml files such as configs/eval, or leave it unset")
    return problems


def refuse_missing_files(cfg: Config) -> None:
    problems = missing_files(cfg)
    if problems:
        raise ConfigError(problems[0] if len(problems) == 1 else
                          f"{len(problems)} problems: " + "".join(f"\n  - {p}" for p in problems))
