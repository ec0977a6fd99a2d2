"""Typed run configuration: YAML files with a ``base:`` chain, dotted CLI overrides, strict validation.

Every key is declared in a dataclass below, so a typo or a wrong type fails at load time, naming the file, the key
and the nearest valid key, before any process group, data or GPU is touched. The resolved config is what a run saves
and hashes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from smim_dist.config_checks import validate
from smim_dist.config_loading import ConfigError, build, merge, override_tree, read_chain
from smim_dist.files import write_atomic
from smim_dist.vit_sizes import image_grid


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


def save_config(cfg: Config, path: Path) -> None:
    write_atomic(path, f"# config hash {cfg.hash()}\n" + yaml.safe_dump(cfg.to_dict(), sort_keys=False))
