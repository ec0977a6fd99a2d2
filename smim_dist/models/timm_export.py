"""The pre-trained encoder as a plain timm ViT: the twins, the head and the [MASK] embedding are dropped.

The encoder's parameter names already follow timm, so the export is a prefix strip plus the kwargs that make
``timm.create_model`` build the same architecture: 1 class token + (P-1) register tokens, no position embedding on
them (``no_embed_class=True``), no classifier.
"""

from __future__ import annotations

import timm
from torch import Tensor, nn

from smim_dist.config import ModelConfig
from smim_dist.config_loading import ConfigError
from smim_dist.vit_sizes import vit_size

ENCODER_PREFIX = "encoder."


def timm_model_name(cfg: ModelConfig) -> str:
    """A timm architecture name to hang the kwargs on; every shape-defining kwarg is given explicitly anyway."""
    return f"vit_{'tiny' if cfg.size == 'micro' else cfg.size}_patch16_224"


def timm_kwargs(cfg: ModelConfig) -> dict:
    size = vit_size(cfg.size)
    return {
        "img_size": cfg.img_size,
        "patch_size": cfg.patch_size,
        "embed_dim": size.embed_dim,
        "depth": size.depth,
        "num_heads": size.num_heads,
        "mlp_ratio": size.mlp_ratio,
        "qkv_bias": cfg.qkv_bias,
        "init_values": cfg.layer_scale_init,
        "class_token": True,
        "reg_tokens": cfg.num_prefix - 1,
        "no_embed_class": True,
        "global_pool": "token",
        "num_classes": 0,
    }


def encoder_state_dict(model_state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The encoder's weights out of a full pre-training state dict, with timm's names."""
    state = {key[len(ENCODER_PREFIX):]: value for key, value in model_state.items() if key.startswith(ENCODER_PREFIX)}
    if not state:
        raise ConfigError("the state dict holds no 'encoder.*' weights; is this a smim_dist pre-training checkpoint?")
    return state


def create_timm_encoder(cfg: ModelConfig, state: dict[str, Tensor] | None = None) -> nn.Module:
    model = timm.create_model(timm_model_name(cfg), pretrained=False, **timm_kwargs(cfg))
    if state is not None:
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise ConfigError(f"the checkpoint's weights do not fit the run config's model (model.size={cfg.size}, "
                             f"img_size={cfg.img_size}, patch_size={cfg.patch_size}): "
                             f"{str(err).splitlines()[0]}") from None
    return model
