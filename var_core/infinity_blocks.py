"""Layers of Infinity's transformer (``infinity/models/basic.py`` of EternalEvan/VARestorer).

Paper: Han et al., "Infinity: Scaling Bitwise AutoRegressive Modeling for High-Resolution Image
Synthesis" (CVPR 2025). Module and parameter names follow the official ones so that the state dict
keys match (``sa.mat_qkv``, ``sa.q_bias``, ``ca.mat_kv``, ``ca.v_bias``, ``ada_gss``, ...). Weight
layers come from the ``ops`` namespace (``torch.nn`` or ``comfy.ops``).

Shapes: ``B`` batch, ``L`` tokens, ``C`` width, ``H`` heads, ``c`` head dim, ``N`` packed text tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .attention import attention, key_padding_mask
from .rope import apply_rope

if TYPE_CHECKING:
    from .infinity_model import InfinityConfig
    from .kv_cache import LayerKVCache


@dataclass(frozen=True)
class TextState:
    """The text as the blocks use it: pooled vector, projected packed features, runtime switches."""

    cond_BD: torch.Tensor
    kv_NC: torch.Tensor
    lens: tuple[int, ...]
    bf16_rounding: bool
    drop_v_bias: bool
    gss: torch.Tensor | None  # shared (B, 1, 6, C) modulation, None without shared_aln


def pad_packed(x_NC: torch.Tensor, lens: Sequence[int]) -> torch.Tensor:
    """Packed rows ``(N, C)`` of ``B`` sequences -> zero-padded ``(B, max(lens), C)``."""
    if len(lens) == 1:
        return x_NC[None]
    return nn.utils.rnn.pad_sequence(list(torch.split(x_NC, list(lens))), batch_first=True)


def ada_norm(x_BLC: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, *, eps: float, rms: bool) -> torch.Tensor:
    """Affine-free Layer/RMS norm in float32, then ``* (1 + scale) + shift``."""
    x = x_BLC.float()
    if rms:
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True).add_(eps))
    else:
        x = F.layer_norm(x, (x.shape[-1],), eps=eps)
    return x.mul(scale.add(1)).add_(shift)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x = x.float()
        return (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True).add_(self.eps))) * self.weight.to(x)


class SelfAttention(nn.Module):
    """Cosine self-attention with 2-D RoPE; q/v biases are separate parameters, k has none."""

    def __init__(self, cfg: InfinityConfig, ops):
        super().__init__()
        C, self.H = cfg.embed_dim, cfg.num_heads
        self.max_scale_mul = cfg.max_scale_mul
        self.mat_qkv = ops.Linear(C, 3 * C, bias=False)
        self.q_bias, self.v_bias = nn.Parameter(torch.zeros(C)), nn.Parameter(torch.zeros(C))
        self.register_buffer("zero_k_bias", torch.zeros(C))
        self.scale_mul_1H11 = nn.Parameter(torch.zeros(1, self.H, 1, 1))
        self.proj = ops.Linear(C, C)

    def forward(self, x_BLC, rope_2Lc, mask=None, cache: LayerKVCache | None = None):
        """``x_BLC`` ``(B, L, C)``, RoPE table ``(2, L, c/2)`` of these tokens' positions -> ``(B, L, C)``.

        With ``cache`` the tokens' keys/values are appended to it and the tokens attend to every
        cached token (next-scale sampling; ``mask`` then applies to ``(L, cached + L)``).
        """
        qkv = self.mat_qkv(x_BLC) + torch.cat((self.q_bias, self.zero_k_bias, self.v_bias)).to(x_BLC)
        q, k, v = rearrange(qkv, "B L (three H c) -> three B H L c", three=3, H=self.H).unbind(0)
        scale_mul = self.scale_mul_1H11.clamp_max(self.max_scale_mul).exp()
        q = F.normalize(q, dim=-1, eps=1e-12).mul(scale_mul).contiguous()
        k = F.normalize(k, dim=-1, eps=1e-12).contiguous()
        q, k = apply_rope(q, rope_2Lc), apply_rope(k, rope_2Lc)
        v = v.contiguous()
        if cache is not None:
            k, v = cache.extend(k, v)
        out = attention(q, k, v, mask=mask, scale=1.0)
        return self.proj(rearrange(out, "B H L c -> B L (H c)"))


class CrossAttention(nn.Module):
    """Attention of queries to the packed text features; ``pool=True`` has one learnt query (``mat_q``)."""

    def __init__(self, embed_dim: int, kv_dim: int, num_heads: int, ops, *, pool: bool = False):
        super().__init__()
        self.H, self.c = num_heads, embed_dim // num_heads
        if pool:
            self.mat_q = nn.Parameter(torch.zeros(1, num_heads, self.c))
        else:
            self.mat_q = ops.Linear(embed_dim, embed_dim)
        self.mat_kv = ops.Linear(kv_dim, 2 * embed_dim, bias=False)
        self.v_bias = nn.Parameter(torch.zeros(embed_dim))
        self.register_buffer("zero_k_bias", torch.zeros(embed_dim))
        self.proj = ops.Linear(embed_dim, embed_dim)
        self.kv_has_lora = False  # set by var_core.lora: the official LoRA path drops v_bias

    def forward(self, q_BLC, kv_NC, lens, *, bf16_rounding: bool, drop_v_bias: bool):
        """``q_BLC`` ``(B, L, C)`` (None for the pool), packed ``kv_NC`` -> ``(B, L, C)``."""
        kv = self.mat_kv(kv_NC)
        if not (self.kv_has_lora and drop_v_bias):
            kv = kv + torch.cat((self.zero_k_bias, self.v_bias)).to(kv)
        k, v = rearrange(pad_packed(kv, lens), "B L (two H c) -> two B H L c", two=2, H=self.H).unbind(0)
        if isinstance(self.mat_q, nn.Parameter):
            q = self.mat_q.to(kv)[:, :, None].expand(len(lens), -1, -1, -1)
        else:
            q = rearrange(self.mat_q(q_BLC), "B L (H c) -> B H L c", H=self.H)
        out = attention(q.contiguous(), k.contiguous(), v.contiguous(), mask=key_padding_mask(lens, kv.device),
                        scale=self.c**-0.5, bf16_rounding=bf16_rounding)
        return self.proj(rearrange(out, "B H L c -> B L (H c)").float())


class FFN(nn.Module):
    def __init__(self, cfg: InfinityConfig, ops):
        super().__init__()
        C, hidden = cfg.embed_dim, cfg.mlp_hidden
        self.swiglu = cfg.swiglu
        if self.swiglu:
            self.fcg = ops.Linear(C, hidden, bias=False)
        self.fc1 = ops.Linear(C, hidden, bias=not self.swiglu)
        self.fc2 = ops.Linear(hidden, C, bias=not self.swiglu)

    def forward(self, x):
        if self.swiglu:
            return self.fc2(F.silu(self.fcg(x)) * self.fc1(x))
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class CrossAttnBlock(nn.Module):
    """Adaptive-norm self-attention, text cross-attention and MLP, each residual."""

    def __init__(self, cfg: InfinityConfig, ops):
        super().__init__()
        C = self.C = cfg.embed_dim
        self.eps, self.rms = cfg.norm_eps, cfg.rms_norm
        self.sa = SelfAttention(cfg, ops)
        self.ca = CrossAttention(C, C, cfg.num_heads, ops)
        self.ffn = FFN(cfg, ops)
        self.ca_norm = RMSNorm(C, cfg.norm_eps) if cfg.rms_norm else ops.LayerNorm(C, eps=cfg.norm_eps)
        if cfg.shared_aln:
            self.ada_gss = nn.Parameter(torch.zeros(1, 1, 6, C))
        else:
            self.ada_lin = nn.Sequential(nn.SiLU(), ops.Linear(C, 6 * C))
        if cfg.ca_layer_scale:
            self.ca_gamma = nn.Parameter(torch.ones(C))

    def forward(self, x_BLC, cond, text: TextState, rope_2Lc, mask=None, cache: LayerKVCache | None = None):
        """``cond`` is the shared ``(B, 1, 6, C)`` modulation, or the ``(B, C)`` pooled text;
        ``cache`` is this block's self-attention cache (see :class:`SelfAttention`)."""
        if hasattr(self, "ada_gss"):
            gss = self.ada_gss + cond
        else:
            gss = self.ada_lin(cond).view(-1, 1, 6, self.C)
        gamma1, gamma2, scale1, scale2, shift1, shift2 = gss.unbind(2)
        x_BLC = x_BLC + self.sa(ada_norm(x_BLC, scale1, shift1, eps=self.eps, rms=self.rms), rope_2Lc, mask,
                                cache).mul(gamma1)
        ca = self.ca(self.ca_norm(x_BLC), text.kv_NC, text.lens, bf16_rounding=text.bf16_rounding,
                     drop_v_bias=text.drop_v_bias).float()
        x_BLC = x_BLC + (ca * self.ca_gamma if hasattr(self, "ca_gamma") else ca)
        return x_BLC + self.ffn(ada_norm(x_BLC, scale2, shift2, eps=self.eps, rms=self.rms)).mul(gamma2)


class BlockChunk(nn.Module):
    """``block_chunks.{c}``: a group of blocks (the official ``MultipleLayers``)."""

    def __init__(self, blocks: list[nn.Module]):
        super().__init__()
        self.module = nn.ModuleList(blocks)


class TextAttentivePool(nn.Module):
    def __init__(self, cfg: InfinityConfig, ops):
        super().__init__()
        self.ca = CrossAttention(cfg.embed_dim, cfg.text_channels, cfg.pool_heads, ops, pool=True)


class HeadNorm(nn.Module):
    """``head_nm``: adaptive LayerNorm before the head, modulated by the pooled text."""

    def __init__(self, cfg: InfinityConfig, ops):
        super().__init__()
        self.C, self.eps, self.rms = cfg.embed_dim, cfg.norm_eps, cfg.rms_norm
        self.ada_lin = nn.Sequential(nn.SiLU(), ops.Linear(cfg.embed_dim, 2 * cfg.embed_dim))

    def forward(self, x_BLC, cond_BD):
        scale, shift = self.ada_lin(cond_BD).view(-1, 1, 2, self.C).unbind(2)
        return ada_norm(x_BLC, scale, shift, eps=self.eps, rms=self.rms)
