"""BEiT's visual-token target: OpenAI's DALL-E dVAE encoder as a frozen image tokenizer.

``DalleEncoder`` re-implements the encoder of OpenAI's ``dall_e`` package (``dall_e.encoder.Encoder``) with plain
torch modules. Its parameters carry the same names and shapes as the original (``blocks.input.w``,
``blocks.group_2.block_1.id_path.w``, ``blocks.group_1.block_1.res_path.conv_1.w``, ..., ``blocks.output.conv.b``), so
OpenAI's public ``encoder.pkl`` loads into it with ``strict=True``. It computes as the original does on a GPU: every
convolution but the output layer in float16, the output layer in float32. Those are the codes BEiT trained on, and
float16 convolutions run on the tensor cores at twice TF32's rate. ``DalleTokenizer(..., fp16_on_gpu=False)`` computes
everything in float32 instead (TF32 convolutions); CPUs always compute in float32, as the original does there.
Autocast never reaches the encoder.

``DalleTokenizer`` turns images in [0, 1] into one code in [0, 8192) per 8x8 pixel cell: a 112-px image (BEiT's
second view of a 224 crop) gives 14x14 = 196 codes, one per 16-px patch of the 224 view.

Weights are never downloaded and never invented: ``load_dalle_encoder`` needs a file, and refuses to unpickle one
unless told to trust it.
"""

from __future__ import annotations

import math
import os
import pickle
import types
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn
from torch.serialization import SourceChangeWarning

from smim_dist.targets.tokenizer_file import TokenizerWeightsError, check_tokenizer_file

LOGIT_LAPLACE_EPS = 0.1

__all__ = [
    "LOGIT_LAPLACE_EPS",
    "DalleEncoder",
    "DalleTokenizer",
    "TokenizerWeightsError",
    "check_tokenizer_file",
    "load_dalle_encoder",
    "map_pixels",
]

# --------------------------------------------------------------------------------------------------------------------
# Architecture


class _Conv(nn.Module):
    """A 'same'-padded convolution whose parameters are called ``w`` and ``b``, as in ``dall_e``."""

    def __init__(self, n_in: int, n_out: int, kernel: int):
        super().__init__()
        if kernel < 1 or kernel % 2 == 0:
            raise ValueError(f"kernel size must be odd and positive, got {kernel}")
        self.padding = (kernel - 1) // 2
        self.w = nn.Parameter(torch.empty(n_out, n_in, kernel, kernel))
        self.b = nn.Parameter(torch.zeros(n_out))
        nn.init.normal_(self.w, std=1.0 / math.sqrt(n_in * kernel * kernel))

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.w.to(x.dtype), self.b.to(x.dtype), padding=self.padding)


class _ResBlock(nn.Module):
    """Bottleneck residual block: identity (or 1x1 projection) plus a down-weighted 3-conv residual branch."""

    def __init__(self, n_in: int, n_out: int, n_layers: int):
        super().__init__()
        if n_out % 4:
            raise ValueError(f"block width must be divisible by 4, got {n_out}")
        hidden = n_out // 4
        self.post_gain = 1.0 / n_layers**2
        self.id_path = _Conv(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        self.res_path = nn.Sequential(
            OrderedDict(
                [
                    ("relu_1", nn.ReLU()),
                    ("conv_1", _Conv(n_in, hidden, 3)),
                    ("relu_2", nn.ReLU()),
                    ("conv_2", _Conv(hidden, hidden, 3)),
                    ("relu_3", nn.ReLU()),
                    ("conv_3", _Conv(hidden, hidden, 3)),
                    ("relu_4", nn.ReLU()),
                    ("conv_4", _Conv(hidden, n_out, 1)),
                ]
            )
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.id_path(x) + self.post_gain * self.res_path(x)


class DalleEncoder(nn.Module):
    """The DALL-E dVAE encoder: images (already pixel-mapped, see ``map_pixels``) -> per-cell code logits.

    Four groups of residual blocks with widths n_hid x (1, 2, 4, 8); the first three end in a 2x2 max-pool, so the
    output grid is the input's / 8. ``forward`` returns float32 logits of shape [B, vocab_size, H/8, W/8].
    """

    def __init__(
        self,
        group_count: int = 4,
        n_hid: int = 256,
        n_blk_per_group: int = 2,
        input_channels: int = 3,
        vocab_size: int = 8192,
    ):
        super().__init__()
        if group_count != 4:
            raise ValueError(f"the DALL-E encoder has 4 groups, got group_count={group_count}")
        if n_blk_per_group < 1:
            raise ValueError(f"n_blk_per_group must be >= 1, got {n_blk_per_group}")
        self.group_count = group_count
        self.n_hid = n_hid
        self.n_blk_per_group = n_blk_per_group
        self.input_channels = input_channels
        self.vocab_size = vocab_size
        self.downsample = 2 ** (group_count - 1)

        n_layers = group_count * n_blk_per_group
        widths = [n_hid * 2**g for g in range(group_count)]
        layers: list[tuple[str, nn.Module]] = [("input", _Conv(input_channels, n_hid, 7))]
        width_in = n_hid
        for g, width in enumerate(widths):
            group: list[tuple[str, nn.Module]] = []
            for i in range(n_blk_per_group):
                group.append((f"block_{i + 1}", _ResBlock(width_in, width, n_layers)))
                width_in = width
            if g < group_count - 1:
                group.append(("pool", nn.MaxPool2d(kernel_size=2)))
            layers.append((f"group_{g + 1}", nn.Sequential(OrderedDict(group))))
        output = OrderedDict([("relu", nn.ReLU()), ("conv", _Conv(width_in, vocab_size, 1))])
        layers.append(("output", nn.Sequential(output)))
        self.blocks = nn.Sequential(OrderedDict(layers))

    def forward(self, x: Tensor, conv_dtype: torch.dtype = torch.float32) -> Tensor:
        """``conv_dtype`` is the dtype of every layer but the output convolution, which always computes in float32
        (OpenAI's ``use_float16=False`` on that layer alone): float16 reproduces the original on a GPU."""
        if x.dim() != 4 or x.shape[1] != self.input_channels:
            raise ValueError(f"expected input of shape [B, {self.input_channels}, H, W], got {tuple(x.shape)}")
        with torch.autocast(device_type=x.device.type, enabled=False):
            features = self.blocks[:-1](x.to(conv_dtype))
            return self.blocks.output(features.float())


def map_pixels(x: Tensor, eps: float = LOGIT_LAPLACE_EPS) -> Tensor:
    """The logit-Laplace input mapping of the dVAE: [0, 1] -> [eps, 1 - eps]."""
    return (1 - 2 * eps) * x + eps


# --------------------------------------------------------------------------------------------------------------------
# Loading


class _PickledDalleModule(nn.Module):
    """Stands in for any class of the ``dall_e`` package while unpickling OpenAI's ``encoder.pkl``.

    Unpickling calls ``nn.Module.__setstate__``, which restores ``_parameters`` and ``_modules``; that is all
    ``state_dict()`` needs, so neither ``dall_e`` nor ``attr`` has to be installed.
    """

    def forward(self, *args: Any, **kwargs: Any) -> Any:  # pragma: no cover - never run
        raise RuntimeError("placeholder for a dall_e module; only its state_dict() is usable")


_placeholders: dict[tuple[str, str], type] = {}


def _placeholder_class(module: str, name: str) -> type:
    key = (module, name)
    if key not in _placeholders:
        _placeholders[key] = type(name, (_PickledDalleModule,), {"__module__": __name__, "__qualname__": name})
    return _placeholders[key]


class _DalleRemappingUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module == "dall_e" or module.startswith("dall_e."):
            return _placeholder_class(module, name)
        return super().find_class(module, name)


# What torch.load needs of a pickle module: an Unpickler class and load (legacy-format files read a header with it).
_remapping_pickle = types.ModuleType("smim_dist_dalle_pickle")
_remapping_pickle.Unpickler = _DalleRemappingUnpickler  # type: ignore[attr-defined]
_remapping_pickle.load = lambda f, **kw: _DalleRemappingUnpickler(f, **kw).load()  # type: ignore[attr-defined]
_remapping_pickle.loads = pickle.loads  # type: ignore[attr-defined]


def _load_trusted_pickle(path: Path) -> Any:
    with warnings.catch_warnings():
        # Legacy-format files compare each pickled class's source with the loaded one; the placeholders differ.
        warnings.filterwarnings("ignore", message=".*source code.*")
        warnings.filterwarnings("ignore", category=SourceChangeWarning)
        return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_remapping_pickle)


def _as_state_dict(obj: Any, path: Path) -> dict[str, Tensor]:
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    if isinstance(obj, Mapping):
        for wrapper in ("state_dict", "model"):
            inner = obj.get(wrapper)
            if isinstance(inner, Mapping) and not isinstance(inner, Tensor):
                obj = inner
                break
        if all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items()):
            return dict(obj)
    raise TokenizerWeightsError(
        f"{path} does not hold a state dict (a mapping of names to tensors) or a module, but a {type(obj).__name__}; "
        "it is not a DALL-E dVAE encoder."
    )


def _read_weights(path: Path, trust_pickle: bool) -> dict[str, Tensor]:
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return load_file(str(path), device="cpu")
    if suffix in (".pt", ".pth", ".bin"):
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            if not trust_pickle:
                raise TokenizerWeightsError(
                    f"{path} holds pickled Python objects, not a plain state dict, and unpickling runs code from the "
                    "file. Convert it to a state dict, or set `target.trust_pickle: true` if you trust the file."
                ) from exc
            obj = _load_trusted_pickle(path)
        return _as_state_dict(obj, path)
    return _as_state_dict(_load_trusted_pickle(path), path)


def _check_matches(encoder: DalleEncoder, state: Mapping[str, Tensor], path: Path) -> None:
    expected = encoder.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k}: {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if not (missing or unexpected or mismatched):
        return
    parts = []
    for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched)):
        if items:
            shown = ", ".join(items[:5]) + (f", ... ({len(items)} in all)" if len(items) > 5 else "")
            parts.append(f"{label}: {shown}")
    raise TokenizerWeightsError(
        f"{path} is not a DALL-E dVAE encoder (expected OpenAI's encoder.pkl or a state dict converted from it); "
        + "; ".join(parts)
    )


def load_dalle_encoder(path: str | os.PathLike | None, trust_pickle: bool = False) -> DalleEncoder:
    """Build a ``DalleEncoder`` and load its weights from ``path``; frozen (eval mode, no gradients).

    ``.safetensors``/``.pt``/``.pth`` files hold a state dict (possibly under 'state_dict' or 'model'); ``.pkl`` is
    OpenAI's pickled module, loaded (without needing the ``dall_e`` package) only if ``trust_pickle``.
    """
    path = check_tokenizer_file(path, trust_pickle)
    state = _read_weights(path, trust_pickle)
    with torch.device("meta"):  # no point drawing 54M random numbers that are overwritten at once
        encoder = DalleEncoder()
    _check_matches(encoder, state, path)
    state = {k: v.detach().to(device="cpu", dtype=torch.float32).contiguous() for k, v in state.items()}
    try:
        encoder.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:  # pragma: no cover - _check_matches catches what strict loading would
        raise TokenizerWeightsError(f"{path} is not a DALL-E dVAE encoder: {exc}") from exc
    encoder.eval()
    encoder.requires_grad_(False)
    return encoder


# --------------------------------------------------------------------------------------------------------------------
# Tokenizer


class DalleTokenizer(nn.Module):
    """Frozen image -> visual-token map: [B, 3, H, W] in [0, 1] -> LongTensor [B, (H/8)*(W/8)], row-major."""

    def __init__(self, encoder: DalleEncoder, fp16_on_gpu: bool = True):
        super().__init__()
        self.encoder = encoder
        self.fp16_on_gpu = fp16_on_gpu
        self.num_codes = encoder.vocab_size
        self.downsample = encoder.downsample
        self.requires_grad_(False)
        super().train(False)

    @classmethod
    def from_file(cls, path: str | os.PathLike | None, trust_pickle: bool = False,
                  fp16_on_gpu: bool = True) -> "DalleTokenizer":
        return cls(load_dalle_encoder(path, trust_pickle=trust_pickle), fp16_on_gpu)

    def conv_dtype(self, device: torch.device) -> torch.dtype:
        return torch.float16 if self.fp16_on_gpu and device.type == "cuda" else torch.float32

    def train(self, mode: bool = True) -> "DalleTokenizer":
        # Always frozen: the encoder stays in eval mode whatever the surrounding model does.
        return super().train(False)

    @torch.no_grad()
    def logits(self, images: Tensor) -> Tensor:
        """Code logits [B, num_codes, H/8, W/8] (float32)."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [batch, 3, H, W], got {tuple(images.shape)}")
        height, width = images.shape[-2:]
        if height % self.downsample or width % self.downsample:
            raise ValueError(
                f"image size {height}x{width} is not divisible by {self.downsample} (the DALL-E encoder's downsampling)"
            )
        return self.encoder(map_pixels(images.float()), self.conv_dtype(images.device))

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        return self.logits(images).argmax(dim=1).flatten(1)
