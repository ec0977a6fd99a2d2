"""Transformer blocks of the encoder and of its reconstruction twins.

Parameter names follow timm's VisionTransformer (``norm1``, ``attn.qkv``, ``attn.proj``, ``ls1.gamma``, ``mlp.fc1`` ...)
so that the encoder exports to a plain timm model without renaming. Attention runs through
``F.scaled_dot_product_attention`` (flash / memory-efficient kernels on GPU); only when the caller asks for attention
probabilities (analyses) is the softmax computed explicitly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from timm.layers import LayerScale, Mlp


def _split_heads(x: Tensor, num_heads: int) -> Tensor:
    batch, tokens, dim = x.shape
    return x.view(batch, tokens, num_heads, dim // num_heads).transpose(1, 2)


def _merge_heads(x: Tensor) -> Tensor:
    batch, heads, tokens, head_dim = x.shape
    return x.transpose(1, 2).reshape(batch, tokens, heads * head_dim)


def _attend(q: Tensor, k: Tensor, v: Tensor, return_attention: bool) -> tuple[Tensor, Tensor | None]:
    if not return_attention:
        return F.scaled_dot_product_attention(q, k, v), None
    probs = torch.softmax((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1), dim=-1)
    return probs @ v, probs


class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, return_attention: bool = False) -> tuple[Tensor, Tensor | None]:
        q, k, v = (_split_heads(t, self.num_heads) for t in self.qkv(x).chunk(3, dim=-1))
        out, probs = _attend(q, k, v, return_attention)
        return self.proj(_merge_heads(out)), probs


class CrossAttention(nn.Module):
    """Queries from one token set, keys/values from another (Eq. 4: [MASK] queries, [PROXY, MASK] keys/values)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, queries: Tensor, context: Tensor, return_attention: bool = False) -> tuple[Tensor, Tensor | None]:
        q = _split_heads(self.q(queries), self.num_heads)
        k, v = (_split_heads(t, self.num_heads) for t in self.kv(context).chunk(2, dim=-1))
        out, probs = _attend(q, k, v, return_attention)
        return self.proj(_merge_heads(out)), probs


class _ResidualMlp(nn.Module):
    """The second half shared by both block kinds: pre-norm MLP with layer scale and stochastic depth."""

    def __init__(self, dim: int, mlp_ratio: float, layer_scale_init: float | None, drop_path: float):
        super().__init__()
        self.ls1 = LayerScale(dim, layer_scale_init) if layer_scale_init else None
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)
        self.ls2 = LayerScale(dim, layer_scale_init) if layer_scale_init else None
        self.drop_path = drop_path

    def _residual(self, x: Tensor, branch: Tensor, layer_scale: LayerScale | None) -> Tensor:
        """``x + DropPath(LayerScale(branch))`` with one multiply over the activations instead of two: the per-sample
        keep factor (drawn as timm's DropPath draws it) and the per-channel gamma first make a ``[B, 1, D]`` scale.
        Eager on a GPU these memory-bound passes over ``[B, T, D]`` are a visible share of the step (bench/README.md);
        ``addcmul`` would save the add too, but its backward makes another full-size pass."""
        scale = None if layer_scale is None else layer_scale.gamma
        if self.training and self.drop_path > 0:
            keep = x.new_empty(x.shape[0], 1, 1).bernoulli_(1 - self.drop_path).div_(1 - self.drop_path)
            scale = keep if scale is None else keep * scale
        return x + (branch if scale is None else branch * scale)

    def _finish(self, x: Tensor, attn_out: Tensor) -> Tensor:
        x = self._residual(x, attn_out, self.ls1)
        return self._residual(x, self.mlp(self.norm2(x)), self.ls2)


class Block(_ResidualMlp):
    """Pre-norm ViT block (Eq. 2 and Eq. 3)."""

    def __init__(self, dim, num_heads, mlp_ratio, qkv_bias, layer_scale_init, drop_path):
        super().__init__(dim, mlp_ratio, layer_scale_init, drop_path)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = SelfAttention(dim, num_heads, qkv_bias)

    def forward(self, x: Tensor, return_attention: bool = False) -> tuple[Tensor, Tensor | None]:
        attn_out, probs = self.attn(self.norm1(x), return_attention)
        return self._finish(x, attn_out), probs


class ReconBlock(_ResidualMlp):
    """Reconstruction twin of a main block (Eq. 4): [MASK] tokens read the image only through [PROXY] tokens.

    One LayerNorm serves queries and context, so a [MASK] token is normalised identically whether it is read as a query
    or as a key/value.
    """

    def __init__(self, dim, num_heads, mlp_ratio, qkv_bias, layer_scale_init, drop_path):
        super().__init__(dim, mlp_ratio, layer_scale_init, drop_path)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = CrossAttention(dim, num_heads, qkv_bias)

    def forward(self, mask_tokens: Tensor, proxy_tokens: Tensor, return_attention: bool = False):
        context = self.norm1(torch.cat([proxy_tokens, mask_tokens], dim=1))
        queries = context[:, proxy_tokens.shape[1]:]
        attn_out, probs = self.attn(queries, context, return_attention)
        return self._finish(mask_tokens, attn_out), probs
