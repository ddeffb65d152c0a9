"""RestoreVAR's latent refiner transformer (``vae_refiner.*`` of ``restorevar.pth``).

Paper: Rajagopalan et al., "RestoreVAR: Visual Autoregressive Generation for All-in-One Image
Restoration" (2025). The format follows ``Refiner`` in ``models/vae_refiner_rope.py`` of
sudraj2002/RestoreVAR, so the official weights load with their own key names.

After the last scale, the discrete latent ``f_hat`` (``p_K^2`` tokens of ``Cv`` channels) is
refined towards the continuous latent: its tokens (LayerNorm, linear projection, learnt
positions) pass ``depth`` pre-norm layers of self-attention, GELU MLP and cross-attention to
``last_block``, the last transformer block's output of every scale concatenated ``(B, L, C)``
(LayerNorm, projection, learnt positions); a final LayerNorm and ``proj_out`` give a residual
that is added to ``f_hat``. Every LayerNorm has affine weights and torch's default eps 1e-5.

Shapes: ``B`` batch, ``n`` latent tokens (``p_K^2``), ``Cv`` latent channels, ``L`` context
tokens, ``C`` transformer width, ``D`` refiner width, ``H`` heads, ``c`` head dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from einops import rearrange
from torch import nn

from .attention import attention
from .checkpoint import StateDict
from .detect import count_indexed
from .errors import CheckpointError, ParameterError

PREFIX = "vae_refiner."
# torch's nn.LayerNorm default, used by every norm of the official refiner (not stored in the weights).
REFINER_NORM_EPS = 1e-5
# The head count is not in the weights (no per-head parameters). The released refiner is hard-coded
# to 384 wide with 6 heads, i.e. 64-dim heads; refiners at least 128 wide (multiples of 64) are
# taken to use 64-dim heads too, narrower (test-size) ones 2 heads (the conformance fixture's
# 32-wide refiner). Override with ``dataclasses.replace(config, heads=...)`` before building.
OFFICIAL_HEAD_DIM = 64
NARROW_HEADS = 2


@dataclass(frozen=True, kw_only=True)
class RefinerConfig:
    """Architecture of the latent refiner, derived from its weights (see :data:`OFFICIAL_HEAD_DIM`)."""

    dim: int  # D, transformer width (official 384)
    depth: int  # layers (official 12)
    heads: int  # not in the weights; see OFFICIAL_HEAD_DIM (official 6)
    mlp_dim: int  # MLP hidden width (official 768)
    in_dim: int  # latent channels Cv of the refined tokens (official 32)
    out_dim: int  # proj_out channels (= in_dim: the output is a residual)
    cond_dim: int  # C, width of the VAR transformer's last block (official 1024)
    seq_len: int  # n = p_K^2, rows of pos_embedding
    seq_len_cond: int  # rows of pos_embedding_cond (official 2240 = L of the 512-px schedule); >= L
    project_out: bool  # self-attention output projection present (absent only for 1 head of width D)
    norm_eps: float = REFINER_NORM_EPS

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    @classmethod
    def from_state_dict(cls, sd: StateDict, prefix: str = PREFIX) -> "RefinerConfig":
        p, t = prefix, f"{prefix}transformer.layers."
        try:
            dim, in_dim = sd[f"{p}proj_in.weight"].shape
            dim_c, cond_dim = sd[f"{p}proj_in_cond.weight"].shape
            out_dim = sd[f"{p}proj_out.weight"].shape[0]
            seq_len = sd[f"{p}pos_embedding"].shape[1]
            seq_len_cond = sd[f"{p}pos_embedding_cond"].shape[1]
            inner = sd[f"{t}0.0.to_qkv.weight"].shape[0] // 3
            mlp_dim = sd[f"{t}0.1.net.1.weight"].shape[0]
        except KeyError as e:
            raise CheckpointError(f"RestoreVAR refiner weights are missing {e.args[0]!r}; "
                                  "the file is incomplete") from None
        depth = count_indexed(sd, t)
        if dim_c != dim or inner != dim:
            raise CheckpointError(f"refiner widths disagree: proj_in {dim}, proj_in_cond {dim_c}, attention {inner}")
        if out_dim != in_dim:
            raise CheckpointError(f"the refiner maps {in_dim} latent channels to {out_dim}; its output is a residual "
                                  "of the same width")
        project_out = f"{t}0.0.to_out.0.weight" in sd
        if not project_out:
            heads = 1
        elif dim % OFFICIAL_HEAD_DIM == 0 and dim >= 2 * OFFICIAL_HEAD_DIM:
            heads = dim // OFFICIAL_HEAD_DIM
        else:
            heads = NARROW_HEADS
        if dim % heads:
            raise CheckpointError(f"refiner width {dim} is not divisible by {heads} heads")
        return cls(dim=int(dim), depth=depth, heads=heads, mlp_dim=int(mlp_dim), in_dim=int(in_dim),
                   out_dim=int(out_dim), cond_dim=int(cond_dim), seq_len=int(seq_len),
                   seq_len_cond=int(seq_len_cond), project_out=project_out)


class RefinerSelfAttention(nn.Module):
    """``layers.{i}.0``: pre-norm multi-head self-attention (``to_qkv`` without bias)."""

    def __init__(self, cfg: RefinerConfig, *, ops=nn):
        super().__init__()
        self.heads, self.scale = cfg.heads, cfg.head_dim ** -0.5
        self.norm = ops.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.to_qkv = ops.Linear(cfg.dim, 3 * cfg.dim, bias=False)
        self.to_out = nn.Sequential(ops.Linear(cfg.dim, cfg.dim)) if cfg.project_out else nn.Identity()

    def forward(self, x_BnD: torch.Tensor) -> torch.Tensor:
        qkv = self.to_qkv(self.norm(x_BnD))
        q, k, v = rearrange(qkv, "B n (three H c) -> three B H n c", three=3, H=self.heads).unbind(0)
        out_BHnc = attention(q.contiguous(), k.contiguous(), v.contiguous(), scale=self.scale)
        return self.to_out(rearrange(out_BHnc, "B H n c -> B n (H c)"))


class RefinerFeedForward(nn.Module):
    """``layers.{i}.1.net``: LayerNorm, Linear, exact GELU, Linear (indices 0, 1, 4; 2/3/5 hold no weights)."""

    def __init__(self, cfg: RefinerConfig, *, ops=nn):
        super().__init__()
        self.net = nn.Sequential(ops.LayerNorm(cfg.dim, eps=cfg.norm_eps), ops.Linear(cfg.dim, cfg.mlp_dim),
                                 nn.GELU(), nn.Identity(), ops.Linear(cfg.mlp_dim, cfg.dim))

    def forward(self, x_BnD: torch.Tensor) -> torch.Tensor:
        return self.net(x_BnD)


class RefinerCrossAttention(nn.Module):
    """``layers.{i}.2``: the latent tokens attend to the projected last-block context."""

    def __init__(self, cfg: RefinerConfig, *, ops=nn):
        super().__init__()
        self.heads, self.scale = cfg.heads, cfg.head_dim ** -0.5
        self.norm_q = ops.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.norm_kv = ops.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.to_q = ops.Linear(cfg.dim, cfg.dim, bias=False)
        self.to_kv = ops.Linear(cfg.dim, 2 * cfg.dim, bias=False)
        self.to_out = ops.Linear(cfg.dim, cfg.dim)

    def forward(self, x_BnD: torch.Tensor, ctx_BLD: torch.Tensor) -> torch.Tensor:
        q = rearrange(self.to_q(self.norm_q(x_BnD)), "B n (H c) -> B H n c", H=self.heads)
        kv = self.to_kv(self.norm_kv(ctx_BLD))
        k, v = rearrange(kv, "B L (two H c) -> two B H L c", two=2, H=self.heads).unbind(0)
        out_BHnc = attention(q.contiguous(), k.contiguous(), v.contiguous(), scale=self.scale)
        return self.to_out(rearrange(out_BHnc, "B H n c -> B n (H c)"))


class RefinerTransformer(nn.Module):
    """``transformer``: ``depth`` layers ``(self-attn, MLP, cross-attn)``, each residual, then ``norm``."""

    def __init__(self, cfg: RefinerConfig, *, ops=nn):
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleList([RefinerSelfAttention(cfg, ops=ops), RefinerFeedForward(cfg, ops=ops),
                           RefinerCrossAttention(cfg, ops=ops)])
            for _ in range(cfg.depth))
        self.norm = ops.LayerNorm(cfg.dim, eps=cfg.norm_eps)

    def forward(self, x_BnD: torch.Tensor, ctx_BLD: torch.Tensor) -> torch.Tensor:
        for attn, ff, cross in self.layers:
            x_BnD = attn(x_BnD) + x_BnD
            x_BnD = ff(x_BnD) + x_BnD
            x_BnD = cross(x_BnD, ctx_BLD) + x_BnD
        return self.norm(x_BnD)


class LatentRefiner(nn.Module):
    """``vae_refiner``: ``f_hat`` tokens ``(B, n, Cv)`` + ``last_block`` ``(B, L, C)`` -> refined ``(B, n, Cv)``."""

    def __init__(self, *, config: RefinerConfig, operations=None):
        super().__init__()
        ops = operations if operations is not None else nn
        cfg = self.config = config
        self.norm_in = ops.LayerNorm(cfg.in_dim, eps=cfg.norm_eps)
        self.norm_in_cond = ops.LayerNorm(cfg.cond_dim, eps=cfg.norm_eps)
        self.proj_in = ops.Linear(cfg.in_dim, cfg.dim, bias=False)
        self.proj_in_cond = ops.Linear(cfg.cond_dim, cfg.dim, bias=False)
        self.pos_embedding = nn.Parameter(torch.zeros(1, cfg.seq_len, cfg.dim))
        self.pos_embedding_cond = nn.Parameter(torch.zeros(1, cfg.seq_len_cond, cfg.dim))
        self.transformer = RefinerTransformer(cfg, ops=ops)
        self.proj_out = ops.Linear(cfg.dim, cfg.out_dim, bias=False)

    def forward(self, fhat_BnCv: torch.Tensor, last_block_BLC: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        n, L = fhat_BnCv.shape[1], last_block_BLC.shape[1]
        if n != cfg.seq_len or L > cfg.seq_len_cond or fhat_BnCv.shape[-1] != cfg.in_dim:
            raise ParameterError(f"the refiner takes {cfg.seq_len} latent tokens of {cfg.in_dim} channels and at most "
                                 f"{cfg.seq_len_cond} context tokens; got {tuple(fhat_BnCv.shape)} and {L}")
        x = self.proj_in(self.norm_in(fhat_BnCv.float())) + self.pos_embedding.float()
        ctx = self.proj_in_cond(self.norm_in_cond(last_block_BLC.float())) + self.pos_embedding_cond[:, :L].float()
        x = self.transformer(x.float(), ctx.float())
        return self.proj_out(x).float() + fhat_BnCv.float()

