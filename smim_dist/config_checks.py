"""The combinations of config values no single type check catches (``validate``, which ``load_config`` runs), and
the choices and counts they are checked against."""

from __future__ import annotations

import math
from pathlib import Path

from smim_dist.config_loading import ConfigError, not_one_of
from smim_dist.vit_sizes import VIT_SIZES

MIN_BLOCK_PATCHES = 16
"""the smallest block of block-wise masking (BEiT's)"""


def masked_patch_count(ratio: float, num_patches: int) -> int:
    """The authors' count of masked patches; the guard keeps 0.3 x 10 at 3 despite float rounding."""
    return math.ceil(ratio * num_patches - 1e-9)


JOB_PROTOCOLS = ("knn", "linear", "seg", "attention")
"""the protocols an evaluation job beside training may run: those that leave the encoder frozen"""

CHOICES = {
    "model.size": tuple(VIT_SIZES),
    "model.mode": ("proxy", "vanilla"),
    "target.kind": ("beit", "maskfeat", "pixels"),
    "mask.kind": ("random", "block"),
    "model.mlp_init": ("trunc_normal", "xavier"),
    "data.source": ("ffcv", "imagefolder", "webdataset"),
    "data.demo_scenes": ("shapes", "layouts"),
    "engine.precision": ("fp32", "bf16", "fp16"),
    "log.wandb_mode": ("offline", "online", "disabled"),
}



def validate(cfg) -> None:
    """Combinations no single type check catches in ``cfg``, a ``smim_dist.config.Config`` (not imported: the config
    module imports this one); each message names the value and what to do."""
    for key, options in CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        problem = not_one_of(value, options)
        if problem:
            raise ConfigError(f"{key}={problem}")
    try:
        num_patches = cfg.model.num_patches
    except ValueError as err:
        raise ConfigError(f"model.img_size / model.patch_size: {err}") from err
    if cfg.model.mode == "proxy" and cfg.model.num_proxy < 1:
        raise ConfigError(f"model.num_proxy={cfg.model.num_proxy}: proxy mode needs at least one [PROXY] token")
    if not 0 <= cfg.model.drop_path < 1:
        raise ConfigError(f"model.drop_path={cfg.model.drop_path} must be in [0, 1)")
    num_masked = masked_patch_count(cfg.mask.ratio, num_patches)
    if not 0 < num_masked < num_patches:
        raise ConfigError(f"mask.ratio={cfg.mask.ratio} masks {num_masked} of {num_patches} patches; at least one "
                          "patch must stay visible and one be masked")
    if cfg.mask.kind == "block" and num_masked < MIN_BLOCK_PATCHES:
        raise ConfigError(f"mask.kind=block, mask.ratio={cfg.mask.ratio}: masks {num_masked} of {num_patches} patches, "
                          f"fewer than one block ({MIN_BLOCK_PATCHES} patches, BEiT's smallest); raise mask.ratio or "
                          "model.img_size, or use mask.kind=random")
    if cfg.target.kind == "beit" and cfg.model.patch_size != 16:
        raise ConfigError(f"model.patch_size={cfg.model.patch_size}: the DALL-E tokenizer gives one code per 8 px "
                          "of the half-size view, i.e. per 16 px patch; use patch_size 16 with target.kind=beit")
    if cfg.target.kind == "maskfeat" and cfg.model.patch_size % 8:
        raise ConfigError(f"model.patch_size={cfg.model.patch_size}: the HOG target needs a multiple of 8")
    optim = cfg.optim
    if optim.global_batch < 1 or optim.micro_batch < 1:
        raise ConfigError(f"optim.global_batch={optim.global_batch}, optim.micro_batch={optim.micro_batch}: both must "
                          "be at least 1 (global batch = micro batch x gradient accumulation x world size)")
    if optim.epochs < 1 or not 0 <= optim.warmup_epochs <= optim.epochs:
        raise ConfigError(f"optim.epochs={optim.epochs}, optim.warmup_epochs={optim.warmup_epochs}: need "
                          "epochs >= 1 and 0 <= warmup_epochs <= epochs")
    if not 0 <= optim.min_lr <= optim.lr:
        raise ConfigError(f"optim.min_lr={optim.min_lr} must be between 0 and optim.lr={optim.lr}")
    (low, high), data = cfg.data.crop_ratio, cfg.data
    for key, ok, rule in (
            ("optim.lr", optim.lr > 0, "above 0"),
            ("optim.weight_decay", optim.weight_decay >= 0, "0 or more"),
            ("optim.clip_grad", optim.clip_grad >= 0, "0 (no clipping) or more"),
            ("optim.eps", optim.eps > 0, "above 0: AdamW divides by sqrt(v) + eps"),
            ("optim.betas", all(0 <= beta < 1 for beta in optim.betas), "two values in [0, 1)"),
            ("seed", 0 <= cfg.seed < 2**31, "0 to 2**31 - 1"),
            ("model.layer_scale_init", cfg.model.layer_scale_init is None or cfg.model.layer_scale_init > 0,
             "above 0, or null for no layer scale"),
            ("data.hflip", 0 <= data.hflip <= 1, "a probability, 0 to 1"),
            ("data.color_jitter", data.color_jitter >= 0, "0 (off) or more"),
            ("data.crop_ratio", 0 < low <= high, "[min, max] with 0 < min <= max"),
            ("data.num_workers", data.num_workers >= 0, "0 (load in the training process) or more"),
            ("data.demo_images", not data.demo or data.demo_images >= max(6, optim.global_batch),
             f"at least one global batch ({optim.global_batch}) and 6 (one image of each demo class)"),
            ("engine.max_bad_steps", cfg.engine.max_bad_steps >= 1, "at least 1"),
            ("engine.check_every_steps", cfg.engine.check_every_steps >= 1, "at least 1"),
            ("log.every_steps", cfg.log.every_steps >= 1, "at least 1")):
        if not ok:
            section, _, name = key.rpartition(".")
            value = getattr(getattr(cfg, section) if section else cfg, name)
            raise ConfigError(f"{key}={list(value) if isinstance(value, tuple) else value!r} must be {rule}")
    if cfg.log.profile_steps < 0 or cfg.log.profile_from_step < 1:
        raise ConfigError(f"log.profile_steps={cfg.log.profile_steps}, log.profile_from_step="
                          f"{cfg.log.profile_from_step}: trace profile_steps >= 0 steps (0: none) from a step >= 1")
    if cfg.engine.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"engine.zero_stage={cfg.engine.zero_stage}; DeepSpeed ZeRO stages are 0, 1, 2, 3")
    if cfg.engine.overlap_comm and cfg.engine.zero_stage not in (1, 2):
        raise ConfigError(f"engine.overlap_comm=true with engine.zero_stage={cfg.engine.zero_stage}: it applies to "
                          "ZeRO 1 and 2 (ZeRO 3 always overlaps; ZeRO 0 reduces after the backward); set zero_stage "
                          "1 or 2, or drop overlap_comm")
    if not cfg.data.demo and cfg.data.source == "webdataset" and cfg.data.samples_per_epoch < cfg.optim.global_batch:
        raise ConfigError(f"data.samples_per_epoch={cfg.data.samples_per_epoch}: a webdataset stream needs the epoch "
                          f"size, at least one global batch ({cfg.optim.global_batch}); e.g. the number of samples in "
                          "the shards")
    looks_like_data = Path(cfg.data.path).suffix in (".beton", ".tar") or "{" in cfg.data.path
    if cfg.data.demo and (looks_like_data or Path(cfg.data.path).is_file()):
        raise ConfigError(f"data.path={cfg.data.path!r} looks like your own data, but data.demo=true would build the "
                          "demo set there; set data.demo=false to read it")
    if cfg.data.shuffle_buffer < 1:
        raise ConfigError(f"data.shuffle_buffer={cfg.data.shuffle_buffer} must be at least 1")
    if cfg.data.shard_counts and cfg.data.source != "webdataset":
        raise ConfigError(f"data.shard_counts={cfg.data.shard_counts!r} counts tar shards, but data.source="
                          f"{cfg.data.source}; drop it or set data.source=webdataset")
    low, high = cfg.data.crop_scale
    if not 0 < low <= high <= 1:
        raise ConfigError(f"data.crop_scale={cfg.data.crop_scale} must satisfy 0 < min <= max <= 1")
    if cfg.checkpoint.every_epochs < 1 or cfg.checkpoint.keep_last < 1 or cfg.checkpoint.keep_every_epochs < 0:
        raise ConfigError(f"checkpoint.every_epochs={cfg.checkpoint.every_epochs}, keep_last="
                          f"{cfg.checkpoint.keep_last} must be >= 1 and keep_every_epochs="
                          f"{cfg.checkpoint.keep_every_epochs} >= 0")
    tokens = ("cls_token", "reg_token", "pos_embed", "mask_token")
    if not set(optim.decayed_tokens) <= set(tokens):
        raise ConfigError(f"optim.decayed_tokens={list(optim.decayed_tokens)}: choose among {', '.join(tokens)}")
    unknown = [name for name in cfg.eval.protocols if name not in JOB_PROTOCOLS]
    if unknown or not cfg.eval.protocols or len(set(cfg.eval.protocols)) < len(cfg.eval.protocols):
        raise ConfigError(f"eval.protocols={list(cfg.eval.protocols)}: list each once, from {', '.join(JOB_PROTOCOLS)}")
    if cfg.eval.every_epochs < 0 or cfg.eval.every_epochs % cfg.checkpoint.every_epochs:
        raise ConfigError(f"eval.every_epochs={cfg.eval.every_epochs}: evaluations run on checkpoints, so it must be 0 "
                          f"(none) or a multiple of checkpoint.every_epochs={cfg.checkpoint.every_epochs}")
    if not cfg.run_name or "/" in cfg.run_name:
        raise ConfigError(f"run_name={cfg.run_name!r} must be a non-empty name without '/'")
