"""Typed run configuration: YAML files with a ``base:`` chain, dotted CLI overrides, strict validation.

Every key is declared in a dataclass below, so a typo or a wrong type fails at load time, naming the file, the key
and the nearest valid key, before any process group, data or GPU is touched. The resolved config is what a run saves
and hashes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from smim_dist.config_loading import ConfigError, build, merge, not_one_of, override_tree, read_chain
from smim_dist.files import write_atomic
from smim_dist.vit_sizes import VIT_SIZES, image_grid


@dataclass
class ModelConfig:
    size: str = "base"
    """micro | tiny | small | base | large"""
    mode: str = "proxy"
    """proxy (SemanticMIM, Eq. 3-4) | vanilla (BEiT / MaskFeat baseline, Eq. 2)"""
    img_size: int = 224
    patch_size: int = 16
    num_proxy: int = 8
    """[PROXY] tokens in proxy mode, the first doubles as [CLS]; vanilla always has one [CLS]"""
    drop_path: float = 0.1
    layer_scale_init: float | None = 0.1
    rescale_init: bool = True
    """divide each residual branch's output projection by sqrt(2 x layer) at initialisation (BEiT's init); the
    MaskFeat authors train a plain ViT without it"""
    mlp_init: str = "trunc_normal"
    """trunc_normal (std 0.02, like every other linear layer) | xavier (xavier-uniform weights, near-zero biases:
    the MLPs of mmpretrain's ViT layers, which the BEiT authors train)"""
    qkv_bias: bool = True
    grad_checkpointing: bool = False

    @property
    def num_prefix(self) -> int:
        return self.num_proxy if self.mode == "proxy" else 1

    @property
    def num_patches(self) -> int:
        grid = image_grid(self.img_size, self.patch_size)
        return grid[0] * grid[1]


@dataclass
class TargetConfig:
    kind: str = "maskfeat"
    """beit (DALL-E tokens, cross-entropy) | maskfeat (HOG, L2) | pixels (normalised pixels, L2)"""
    norm_pix: bool = True
    """kind=pixels: standardise each patch by its own mean and variance (MAE's norm_pix_loss); false: the pixels as
    the normalised image has them"""
    tokenizer_path: str | None = None
    """DALL-E dVAE encoder weights for kind=beit: state dict (.pt/.pth/.safetensors) or OpenAI's encoder.pkl"""
    trust_pickle: bool = False
    """allow loading encoder.pkl, which runs code while unpickling"""
    tokenizer_fp16: bool = True
    """on GPUs, run the DALL-E encoder's convolutions but the last in float16, as OpenAI's code computes BEiT's
    targets (twice TF32's rate); false: float32 throughout. CPUs always compute in float32"""


@dataclass
class MaskConfig:
    kind: str = "random"
    """random (exact count per image) | block (BEiT block-wise)"""
    ratio: float = 0.6


@dataclass
class DataConfig:
    source: str = "ffcv"
    """ffcv (a .beton written by ``smim-convert``) | imagefolder (``path/train/<class>/*``, the ImageNet layout) |
    webdataset (tar shards streamed from ``path``: brace patterns, lists, ``pipe:`` commands)"""
    path: str = "data_cache/demo"
    """the .beton, the ImageFolder root or the shard pattern; with ``demo``, the demo set's directory"""
    demo: bool = True
    """build the embedded synthetic shapes set at ``path`` on first use, in all three formats; ``source`` picks
    which one is read. Set it false to read your own data"""
    samples_per_epoch: int = 0
    """webdataset: samples that make one epoch (a stream has no length of its own)"""
    shuffle_buffer: int = 1000
    """webdataset: each loader worker shuffles its stream in windows of this many consecutive samples"""
    shard_counts: str = ""
    """webdataset: a file of per-shard sample counts (``smim-convert count``): a resume then opens no shard before the
    one its shuffle window starts in"""
    demo_images: int = 2048
    demo_scenes: str = "shapes"
    """shapes (the demo) | layouts (two-colour layouts whose class decides what a masked patch holds: the data of
    the learning experiment, docs/experiments.md)"""
    num_workers: int = 4
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (0.75, 1.3333333)
    hflip: float = 0.5
    color_jitter: float = 0.4
    """strength for brightness, contrast and saturation; 0 turns it off"""


@dataclass
class OptimConfig:
    epochs: int = 300
    global_batch: int = 2048
    """images per optimizer step over all ranks = micro_batch x accumulation x world size"""
    micro_batch: int = 64
    """at most this many images per rank per forward/backward (what fits in memory): a run uses the largest divisor of
    global_batch / world size not above it, so one config trains on any world size that divides the global batch"""
    lr: float = 1.5e-3
    min_lr: float = 1e-5
    warmup_epochs: float = 10.0
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    clip_grad: float = 3.0
    """global grad-norm clip; 0 turns it off"""
    decayed_tokens: tuple[str, ...] = ()
    """learned tokens that get weight decay all the same (cls_token, reg_token, pos_embed, mask_token): none by
    default; the authors decay mask_token for BEiT, the [CLS] / [PROXY] tokens and pos_embed for MaskFeat"""

    def micro_batch_size(self, world_size: int) -> int:
        """Images per rank per micro-step on ``world_size`` ranks (see ``micro_batch``)."""
        if self.global_batch % world_size:
            raise ConfigError(
                f"optim.global_batch={self.global_batch} is not divisible by {world_size} processes; global batch = "
                "micro batch x gradient accumulation x world size, so change the number of processes (or the global "
                "batch, which changes the recipe)")
        per_rank = self.global_batch // world_size
        return max(size for size in range(1, min(self.micro_batch, per_rank) + 1) if per_rank % size == 0)

    def accumulation_steps(self, world_size: int) -> int:
        """Micro-steps per optimizer step: micro_batch_size x accumulation x world_size == global_batch."""
        return self.global_batch // (self.micro_batch_size(world_size) * world_size)


@dataclass
class EngineConfig:
    zero_stage: int = 1
    """0-3; ZeRO 1/2 keep an fp32 master copy of the parameters (also in fp32 runs), so their optimizer state is 12
    bytes a parameter divided by the world size, against ZeRO 0's 8 undivided (bench/scaling.py)"""
    precision: str = "bf16"
    """fp32 | bf16 | fp16 (dynamic loss scale); bf16/fp16 need a GPU"""
    max_bad_steps: int = 20
    """stop (exit code 3) after this many steps in a row skipped for a non-finite loss"""
    check_every_steps: int = 10
    """steps between the loop's host reads, where all ranks agree on stopping for a signal and on max_bad_steps (log
    steps read too); the steps in between never wait for the GPU"""
    compile: bool = False
    """torch.compile the model inside the DeepSpeed engine"""
    overlap_comm: bool = False
    """ZeRO 1/2: all-reduce the gradients in buckets while the backward still runs, on a side stream, rather than all
    at once after it. It hides the all-reduce where that is slow (several nodes: a ViT-B/16 proxy step reduces 342 MB
    of bf16 gradients) but ends every backward with a device synchronisation (DeepSpeed's). Compare the logged step
    time both ways; may change on resume"""
    tf32: bool = True
    """on NVIDIA GPUs, compute float32 matrix products and convolutions on the TF32 tensor cores (float32 range and
    accumulation, 10-bit mantissa inputs; 7x plain float32's datasheet rate on an H100): what fp32 runs' models compute
    in (torch's default already runs convolutions, such as the targets', in TF32). false: IEEE float32 throughout,
    convolutions included. May change on resume"""

    @property
    def matmul_precision(self) -> str:
        """The precision the model's matrix products run at, which names the datasheet peak behind the logged MFU."""
        return "tf32" if self.precision == "fp32" and self.tf32 else self.precision


@dataclass
class LogConfig:
    every_steps: int = 20
    progress: bool = True
    wandb_mode: str = "offline"
    """offline | online | disabled"""
    wandb_project: str = "smim_dist"
    wandb_entity: str | None = None
    wandb_group: str | None = None
    profile_steps: int = 0
    """trace this many optimizer steps with torch.profiler on every rank, into <run>/profile/ (0: off)"""
    profile_from_step: int = 20
    """the first traced step, numbered from 1 as the log numbers steps: past compilation and the loader's warm-up"""


@dataclass
class CheckpointConfig:
    every_epochs: int = 1
    keep_last: int = 3
    """newest checkpoints kept; older ones are deleted after each save"""
    keep_every_epochs: int = 50
    """also keep the checkpoint closing every epoch that is a multiple of this (0: none)"""
    allow_fresh_start: bool = False
    """when every checkpoint of the run is damaged, train again from step 0 instead of stopping"""


@dataclass
class EvalConfig:
    every_epochs: int = 0
    """after the checkpoint closing every N-th epoch, start a separate evaluation job on it (0: never); it runs
    beside training (a SLURM job under SLURM, a background process otherwise) and never delays or stops it"""
    protocols: tuple[str, ...] = ("knn",)
    """the ``smim-eval`` protocols each job runs, in order (fine-tuning and UperNet are jobs of their own)"""
    config_dir: str | None = None
    """a folder of ``<protocol>.yaml`` option files (e.g. configs/eval) the jobs pass as ``--config``; a protocol
    without a file there runs with its defaults"""


@dataclass
class Config:
    run_name: str = "run"
    output_dir: str = "runs"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    target: TargetConfig = field(default_factory=TargetConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    log: LogConfig = field(default_factory=LogConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.run_name

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def hash(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


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


_PACKAGE = Path(__file__).resolve().parent
SHIPPED_CONFIGS = next((folder for folder in (_PACKAGE / "configs", _PACKAGE.parent / "configs") if folder.is_dir()),
                       _PACKAGE / "configs")
"""configs/ inside an installed wheel, else the source tree's top-level configs/ (a checkout, an editable install)"""


def find_config(path: str | Path, shipped_folder: Path = SHIPPED_CONFIGS) -> Path:
    """A config file by its path, or by its name in this checkout's configs/ (``shipped_folder``) from any directory:
    ``--config beit_proxy.yaml`` (or ``beit_proxy``) is configs/beit_proxy.yaml."""
    given = Path(path)
    names = [given] if given.suffix else [given, given.with_suffix(".yaml")]
    for candidate in [*names, *(SHIPPED_CONFIGS.parent / name for name in names),
                      *(shipped_folder / name for name in names)]:
        if candidate.is_file():
            return candidate
    shipped = ", ".join(sorted(p.name for p in shipped_folder.glob("*.yaml"))) or "none in this installation"
    raise ConfigError(f"config file not found: {given.resolve()} (nor {given} under {shipped_folder}); "
                      f"the shipped configs: {shipped}")


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """The resolved, validated config of a YAML file (with its base chain) plus ``a.b=value`` overrides. The schema
    alone: whether this machine has the files the run reads is ``preflight.refuse_missing_files``, run where they are
    read (a login node, an export or an evaluation elsewhere need not have them)."""
    values = read_chain(find_config(path), Config) if path else {}
    merged = merge(values, override_tree(list(overrides)))
    config = build(Config, merged, "", f"{path or 'defaults'} + overrides" if overrides else str(path or "defaults"))
    validate(config)
    return config


def config_from_dict(values: dict) -> Config:
    config = build(Config, values, "", "saved config")
    validate(config)
    return config


def validate(cfg: Config) -> None:
    """Combinations no single type check catches; each message names the value and what to do."""
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


def save_config(cfg: Config, path: Path) -> None:
    write_atomic(path, f"# config hash {cfg.hash()}\n" + yaml.safe_dump(cfg.to_dict(), sort_keys=False))
