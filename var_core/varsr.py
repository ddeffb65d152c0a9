"""VARSR: visual autoregressive super-resolution, key-compatible with ``VARSR.pth``.

Paper: Qu et al., "Visual Autoregressive Modeling for Image Super-Resolution" (ICML 2025). The
format follows ``models/var.py`` (``VAR_RoPE``), ``models/basic_var.py`` and ``test_varsr.py`` of
qyp2000/VARSR, so the official trainer dumps (``{'trainer': {'var_wo_ddp': sd}}``) load with their
own key names. The VQVAE is VAR's (:mod:`.var_vqvae`), run with VARSR's quantiser variant (the last
scale is added without ``phi``); the refiner is :mod:`.varsr_refiner`; restoring one model-sized
image with the official test settings and colour fix is :func:`.varsr_restore.varsr_restore`.

The transformer is VAR's (adaptive-LayerNorm cosine-attention blocks, :mod:`.var_model`) with:

* a prefix of ``p_K^2`` LR-image tokens from a convolutional condition encoder (``con_embedding``,
  ControlNet-style: 3x3 convolutions, four of them with stride 2, SiLU), then the class token;
  these ``p_K^2 + 1`` context tokens form scale 0 of the block-causal mask, and only the last
  one's logits predict the first scale;
* scale-aligned 2-D RoPE (:func:`.rope.scale_aligned_rope_table`) over the sequence
  ``(LR grid p_K, p_1, p_2, ..., p_K)`` instead of absolute position embeddings (no ``pos_1LC``);
* two labels, 0 = restore and ``num_classes - 1`` = the "unconditional" label of image-based
  classifier-free guidance: both branches see the LR tokens, only the label differs;
* a diffusion refiner after the last scale: conditioned on ``decoder_norm(h_last + word_embed(e))``
  (last-block output and the drawn token's embedding), it samples the continuous residual that
  the last scale's codes leave, which is added to ``f_hat`` before decoding.

Official quirks reproduced (see :meth:`VARSR.autoregressive_infer_cfg`): the last scale draws
once from the un-guided ``2B`` rows before the guided draw (it consumes the sampling RNG); the
refiner uses guidance ``cfg`` (the last scale's ramp value); and its output is laid out by
``reshape(B, 1024, -1).transpose(1, 2)``, which is the correct token-to-channel transpose only
when ``p_K^2 = 1024`` (the released 512-px model) and scrambles tokens and channels otherwise.

Shapes: ``B`` batch, ``L`` tokens, ``l`` tokens of one scale, ``C`` width, ``Cv`` VQVAE channels,
``V`` vocabulary, ``p_K`` the last scale's side.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .attention import block_causal_mask
from .checkpoint import StateDict
from .detect import count_indexed
from .errors import CheckpointError, ImageInputError, ParameterError
from .kv_cache import KVCache
from .rope import ROPE_THETA, scale_aligned_rope_table
from .var_model import AdaLNBeforeHead, AdaLNSelfAttn, block_weights, gumbel_softmax, sample_top_k_top_p_
from .var_vqvae import VQVAE, embedding
from .varsr_refiner import DiffusionRefiner

# Schedules of the official configs (``--pn``), used only when a checkpoint lacks ``lvl_1L``.
KNOWN_PATCH_NUMS = (
    (1, 2, 3, 4, 6, 9, 13, 18, 24, 32),  # the default, 512 px (the released VARSR.pth)
    (1, 2, 3, 4, 6, 9, 12, 16, 20, 24, 28, 32),  # --pn 512
    (1, 2, 3, 4, 5, 6, 8, 10, 13, 16),  # --pn 256
    (1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64),  # --pn 1024
)
_DEFAULT_HEAD_DIM = 64  # build_var: heads = depth, width = 64 * depth
# The hard-coded token count of the official refiner-output reshape (see the module docstring).
OFFICIAL_REFINER_RESHAPE_TOKENS = 1024


@dataclass(frozen=True, kw_only=True)
class VARSRConfig:
    """Architecture of a VARSR transformer (with its LR encoder and refiner), derived from its weights."""

    depth: int
    embed_dim: int  # C
    num_heads: int  # rows of scale_mul_1H11 (cosine attention), else embed_dim // 64
    mlp_hidden: int
    codebook_dim: int  # Cv (word_embed input)
    vocab_size: int  # V (head outputs)
    num_classes: int  # class_emb rows; label num_classes - 1 is the CFG "unconditional" label
    patch_nums: tuple[int, ...]  # from lvl_1L (p_1 is 1: the class token is scale 0)
    shared_aln: bool
    attn_l2_norm: bool
    lr_channels: tuple[int, ...]  # con_embedding block_out_channels (official (32, 128, 256, 512, 1536))
    lr_in_channels: int
    refiner_width: int  # diffloss width (official 1024)
    refiner_depth: int  # diffloss residual blocks (official 6)
    refiner_freq_dim: int  # timestep-embedding frequencies (256)
    # Not stored in the weights: the official constants. ``controlnet_depth`` is a constructor
    # argument without weights (unused by VAR_RoPE), so it is not part of the architecture here.
    # The refiner's diffusion schedule is in :mod:`.varsr_refiner` (cosine, 1000 steps, learnt
    # sigma, respaced to the runtime number of steps).
    norm_eps: float = 1e-6
    max_scale_mul: float = math.log(100)
    rope_theta: float = ROPE_THETA
    rope_grid: float = 32.0  # precompute_freqs_cis's fixed grid

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def context_tokens(self) -> int:
        """LR tokens plus the class token: ``p_K^2 + 1`` (the official ``first_l``)."""
        return self.patch_nums[-1] ** 2 + 1

    @property
    def num_tokens(self) -> int:
        """Sequence length: context tokens then scales 2..K."""
        return self.context_tokens + sum(p * p for p in self.patch_nums[1:])

    @property
    def lr_downsample(self) -> int:
        return 2 ** (len(self.lr_channels) - 1)

    @property
    def lr_size(self) -> int:
        """Side of the LR input the condition encoder maps onto the ``p_K`` grid."""
        return self.patch_nums[-1] * self.lr_downsample

    @classmethod
    def from_state_dict(cls, sd: StateDict) -> "VARSRConfig":
        depth = count_indexed(sd, "blocks.")
        try:
            C, cv = sd["word_embed.weight"].shape
            n_cls = sd["class_emb.weight"].shape[0]
            first_l = sd["pos_start"].shape[1]
            K = sd["lvl_embed.weight"].shape[0]
            vocab = sd["head.weight"].shape[0]
            hidden = sd["blocks.0.ffn.fc1.weight"].shape[0]
            lr_in = sd["con_embedding.conv_in.weight"].shape[1]
            lr_ch = [int(sd["con_embedding.conv_in.weight"].shape[0])]
            n_lr = count_indexed(sd, "con_embedding.blocks.")
            lr_ch += [int(sd[f"con_embedding.blocks.{2 * i + 1}.weight"].shape[0]) for i in range(n_lr // 2)]
            lr_out = sd["con_embedding.conv_out.weight"].shape[0]
            width, cin = sd["diffloss.net.input_proj.weight"].shape
            freq = sd["diffloss.net.time_embed.mlp.0.weight"].shape[1]
            ref_out = sd["diffloss.net.final_layer.linear.weight"].shape[0]
            ref_cond = sd["diffloss.net.cond_embed.weight"].shape[1]
        except KeyError as e:
            raise CheckpointError(f"VARSR weights are missing {e.args[0]!r}; the file is incomplete") from None
        if depth == 0:
            raise CheckpointError("VARSR weights hold no blocks (blocks.{i}.*)")
        if n_lr % 2 or lr_out != C:
            raise CheckpointError(f"con_embedding has {n_lr} block convolutions and {lr_out} output channels; "
                                  f"expected pairs and the width {C}")
        if cin != cv or ref_out != 2 * cv or ref_cond != C:
            raise CheckpointError(f"the refiner (diffloss) maps {cin} -> {ref_out} channels conditioned on {ref_cond}; "
                                  f"this transformer needs {cv} -> {2 * cv} conditioned on {C}")
        l2 = "blocks.0.attn.scale_mul_1H11" in sd
        heads = sd["blocks.0.attn.scale_mul_1H11"].numel() if l2 else max(int(C) // _DEFAULT_HEAD_DIM, 1)
        if C % heads:
            raise CheckpointError(f"width {C} is not divisible by {heads} heads")
        p_last = round((first_l - 1) ** 0.5)
        if p_last * p_last != first_l - 1:
            raise CheckpointError(f"pos_start has {first_l} rows, not p^2 LR tokens + 1 class token")
        if "lvl_1L" in sd:
            counts = torch.bincount(sd["lvl_1L"].reshape(-1).long(), minlength=K).tolist()
            rest = [round(n ** 0.5) for n in counts[1:]]
            # Level 0 holds the context tokens; the official buffer only exists for p_1 = 1.
            patch_nums = (1, *rest)
            if len(counts) != K or counts[0] != first_l or any(p * p != n for p, n in zip(rest, counts[1:])):
                raise CheckpointError(f"lvl_1L has per-level token counts {counts}: not {first_l} context tokens "
                                      f"followed by square scales of {K} levels")
        else:
            matches = [p for p in KNOWN_PATCH_NUMS if len(p) == K and p[-1] == p_last]
            if not matches:
                raise CheckpointError(f"the checkpoint has no lvl_1L buffer and its {K} scales ending at {p_last} match "
                                      f"no known patch_nums {list(KNOWN_PATCH_NUMS)}")
            patch_nums = matches[0]
        if patch_nums[-1] != p_last:
            raise CheckpointError(f"patch_nums {patch_nums} end at {patch_nums[-1]}, "
                                  f"but pos_start has {p_last}^2 LR tokens")
        return cls(depth=depth, embed_dim=int(C), num_heads=int(heads), mlp_hidden=int(hidden), codebook_dim=int(cv),
                   vocab_size=int(vocab), num_classes=int(n_cls), patch_nums=tuple(int(p) for p in patch_nums),
                   shared_aln="shared_ada_lin.1.weight" in sd, attn_l2_norm=l2, lr_channels=tuple(lr_ch),
                   lr_in_channels=int(lr_in), refiner_width=int(width),
                   refiner_depth=count_indexed(sd, "diffloss.net.res_blocks."), refiner_freq_dim=int(freq))


class ConditionEmbedding(nn.Module):
    """``con_embedding``: LR image ``(B, 3, H, W)`` -> ``(B, C, H/2^n, W/2^n)`` (n stride-2 convolutions).

    ``conv_in``, then per channel step a 3x3 convolution and a strided 3x3 convolution, each
    followed by SiLU, then ``conv_out`` (no activation).
    """

    def __init__(self, in_channels: int, channels: Sequence[int], out_channels: int, *, ops=nn):
        super().__init__()
        self.conv_in = ops.Conv2d(in_channels, channels[0], 3, padding=1)
        self.blocks = nn.ModuleList()
        for cin, cout in zip(channels[:-1], channels[1:]):
            self.blocks.append(ops.Conv2d(cin, cin, 3, padding=1))
            self.blocks.append(ops.Conv2d(cin, cout, 3, padding=1, stride=2))
        self.conv_out = ops.Conv2d(channels[-1], out_channels, 3, padding=1)

    def forward(self, x_B3HW: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.conv_in(x_B3HW))
        for conv in self.blocks:
            h = F.silu(conv(h))
        return self.conv_out(h)


@dataclass
class VARSRSample:
    """Output of :meth:`VARSR.autoregressive_infer_cfg`.

    ``image01`` ``(B, 3, H, W)`` in ``[0, 1]``; ``f_hat`` ``(B, Cv, p_K, p_K)`` the final latent and
    ``f_hat_discrete`` the latent before the refiner; ``idx[k]`` ``(B, p_k^2)`` the drawn tokens;
    ``logits_raw[k]`` ``(2B, l, V)`` conditional then unconditional logits before the CFG mix (scale 0:
    all context positions; only with ``keep_logits``); ``refiner_z`` ``(2B p_K^2, C)``,
    ``refiner_out`` ``(2B p_K^2, Cv)`` and ``refiner_delta`` ``(B, Cv, p_K, p_K)`` (None without refiner).
    """

    image01: torch.Tensor
    f_hat: torch.Tensor
    f_hat_discrete: torch.Tensor
    idx: list[torch.Tensor]
    logits_raw: list[torch.Tensor] = field(default_factory=list)
    refiner_z: torch.Tensor | None = None
    refiner_out: torch.Tensor | None = None
    refiner_delta: torch.Tensor | None = None


def refiner_output_to_fhat(out_2BlC: torch.Tensor, B: int, p: int, *, official_reshape: bool = True) -> torch.Tensor:
    """The conditional half of the refiner output ``(2B, p*p, Cv)`` as a latent ``(B, Cv, p, p)``.

    ``official_reshape`` (default) reproduces ``reshape(B, 1024, -1).transpose(1, 2)`` of the
    official code: the correct layout when ``p*p == 1024``, a token/channel scramble otherwise
    (it needs ``p*p*Cv`` divisible by 1024). False uses the correct layout for every ``p``.
    """
    cond_BlC = out_2BlC.chunk(2, dim=0)[0]
    if not official_reshape:
        return rearrange(cond_BlC, "B (h w) C -> B C h w", h=p, w=p)
    n = OFFICIAL_REFINER_RESHAPE_TOKENS
    if cond_BlC[0].numel() % n:
        raise ParameterError(f"the official refiner reshape needs p_K^2 * Cv ({cond_BlC[0].numel()}) divisible by {n}; "
                             "use official_reshape=False")
    return cond_BlC.reshape(B, n, -1).transpose(1, 2).reshape(B, -1, p, p)


class VARSR(nn.Module):
    """VARSR transformer (``VAR_RoPE``) with its LR encoder and diffusion refiner; see the module docstring."""

    def __init__(self, *, config: VARSRConfig, operations=None):
        super().__init__()
        ops = operations if operations is not None else nn
        cfg = self.config = config
        C = cfg.embed_dim
        self.con_embedding = ConditionEmbedding(cfg.lr_in_channels, cfg.lr_channels, C, ops=ops)
        self.word_embed = ops.Linear(cfg.codebook_dim, C)
        self.class_emb = embedding(cfg.num_classes, C, ops)
        self.pos_start = nn.Parameter(torch.zeros(1, cfg.context_tokens, C))
        self.lvl_embed = embedding(len(cfg.patch_nums), C, ops)
        if cfg.shared_aln:
            self.shared_ada_lin = nn.Sequential(nn.SiLU(), ops.Linear(C, 6 * C))
        self.blocks = nn.ModuleList(AdaLNSelfAttn(cfg, ops=ops) for _ in range(cfg.depth))
        self.head_nm = AdaLNBeforeHead(C, cfg.norm_eps, ops=ops)
        self.head = ops.Linear(C, cfg.vocab_size)
        self.decoder_norm = ops.LayerNorm(C, eps=cfg.norm_eps)
        self.diffloss = DiffusionRefiner(channels=cfg.codebook_dim, cond_dim=C, width=cfg.refiner_width,
                                         depth=cfg.refiner_depth, freq_dim=cfg.refiner_freq_dim, operations=ops)

    # ----------------------------------------------------------------- pieces
    @property
    def device(self) -> torch.device:
        return self.pos_start.device

    @property
    def uncond_label(self) -> int:
        return self.config.num_classes - 1

    def level_lens(self) -> list[int]:
        """Tokens per level of the sequence: the context tokens, then scales 2..K."""
        return [self.config.context_tokens] + [p * p for p in self.config.patch_nums[1:]]

    def rope_table(self) -> torch.Tensor:
        """``(2, L, c/2)`` RoPE table of the whole sequence (LR grid, then ``p_1 .. p_K``)."""
        pn = self.config.patch_nums
        return scale_aligned_rope_table(self.config.head_dim, (pn[-1], *pn), theta=self.config.rope_theta,
                                        grid=self.config.rope_grid).to(self.device)

    def lvl_pos(self) -> torch.Tensor:
        """Level embedding ``(1, L, C)`` float32 of every position."""
        lens = torch.tensor(self.level_lens())
        ids = torch.repeat_interleave(torch.arange(len(lens)), lens).to(self.device)
        return self.lvl_embed(ids).float()[None]

    def modulation(self, cond_BD: torch.Tensor) -> torch.Tensor:
        if self.config.shared_aln:
            return self.shared_ada_lin(cond_BD).view(-1, 1, 6, self.config.embed_dim)
        return cond_BD

    def get_logits(self, h_BLC: torch.Tensor, cond_BD: torch.Tensor) -> torch.Tensor:
        return self.head(self.head_nm(h_BLC.float(), cond_BD).float()).float()

    def lr_tokens(self, lr_B3HW: torch.Tensor) -> torch.Tensor:
        """LR image in ``[-1, 1]`` -> the ``p_K^2`` prefix tokens ``(B, p_K^2, C)`` float32."""
        c = self.config
        if lr_B3HW.ndim != 4 or lr_B3HW.shape[1] != c.lr_in_channels:
            raise ImageInputError(f"VARSR takes (B, {c.lr_in_channels}, H, W) LR images, got {tuple(lr_B3HW.shape)}")
        if tuple(lr_B3HW.shape[-2:]) != (c.lr_size, c.lr_size):
            raise ImageInputError(f"this VARSR model takes {c.lr_size}x{c.lr_size} LR inputs (resized to the output "
                                  f"size), got {lr_B3HW.shape[-1]}x{lr_B3HW.shape[-2]}")
        dtype = self.con_embedding.conv_in.weight.dtype
        emb = self.con_embedding(lr_B3HW.to(self.device, dtype)).float()
        return rearrange(emb, "B C h w -> B (h w) C")

    def _labels(self, label_B, B: int) -> torch.Tensor:
        if isinstance(label_B, int):
            label_B = torch.full((B,), label_B, dtype=torch.long)
        label_B = torch.as_tensor(label_B, dtype=torch.long).reshape(-1).to(self.device)
        if label_B.shape[0] != B:
            raise ParameterError(f"got {label_B.shape[0]} labels for a batch of {B}")
        if bool(((label_B < 0) | (label_B >= self.config.num_classes)).any()):
            raise ParameterError(f"VARSR labels must be in 0..{self.config.num_classes - 1}; got {label_B.tolist()}")
        return label_B

    # ----------------------------------------------------------------- teacher forcing
    def forward(self, lr_B3HW: torch.Tensor, x_BLCv_wo_first_l: torch.Tensor,
                label_B: torch.Tensor | int = 0) -> torch.Tensor:
        """Teacher-forced logits ``(B, 1 + L', V)`` from the class token on (block-causal mask).

        ``lr_B3HW`` the LR image in ``[-1, 1]``; ``x_BLCv_wo_first_l`` ``(B, L', Cv)`` the next-scale
        inputs of scales 2.. (:meth:`.VQVAE.idx_to_var_input`); ``label_B`` ``(B,)`` or one label.
        """
        c = self.config
        B = x_BLCv_wo_first_l.shape[0]
        label_B = self._labels(label_B, B)
        ed = c.context_tokens + x_BLCv_wo_first_l.shape[1]
        if ed > c.num_tokens:
            raise ParameterError(f"{x_BLCv_wo_first_l.shape[1]} input tokens exceed the "
                                 f"{c.num_tokens - c.context_tokens} of patch_nums {c.patch_nums}")
        cond_BD = self.class_emb(label_B).float()
        sos = torch.cat([self.lr_tokens(lr_B3HW), cond_BD[:, None]], dim=1) + self.pos_start.float()
        x = self.word_embed(x_BLCv_wo_first_l.to(self.device, torch.float32)).float()
        x_BLC = torch.cat([sos, x], dim=1) + self.lvl_pos()[:, :ed]
        mask = block_causal_mask(self.level_lens(), self.device)[:ed, :ed]
        rope = self.rope_table()[:, :ed]
        cond = self.modulation(cond_BD)
        for block in self.blocks:
            x_BLC = block(x_BLC, cond, mask, rope_2Lc=rope)
        return self.get_logits(x_BLC, cond_BD)[:, c.context_tokens - 1:]

    # ----------------------------------------------------------------- sampling
    @torch.no_grad()
    def autoregressive_infer_cfg(
        self, vqvae: VQVAE, lr_B3HW: torch.Tensor, label_B: torch.Tensor | int = 0, *,
        g_seed: int | None = None, generator: torch.Generator | None = None, cfg: float = 6.0,
        top_k: int = 1, top_p: float = 0.75, more_smooth: bool = False, keep_logits: bool = False,
        kv_cache: KVCache | None = None, refine: bool = True, refiner_steps: int | str = 10,
        refiner_temperature: float = 1.0, refiner_generator: torch.Generator | None = None,
        refiner_noise_init: torch.Tensor | None = None, refiner_step_noise: Sequence[torch.Tensor] | None = None,
        official_refiner_reshape: bool = True,
    ) -> VARSRSample:
        """Scale-by-scale super-resolution (the official ``autoregressive_infer_cfg``; defaults = ``test_varsr.py``).

        ``lr_B3HW``: LR images in ``[-1, 1]`` at :attr:`VARSRConfig.lr_size`. Scale ``k`` of ``K`` mixes
        the label-``label_B`` and label-``num_classes - 1`` logits with ``t = cfg * k / (K-1)``:
        ``(1 + t) cond - t uncond``; tokens are drawn as in :func:`.var_model.sample_top_k_top_p_`
        from ``generator`` (else a generator seeded with ``g_seed``, else torch's global RNG). At the
        last scale the official code first draws (and discards) tokens from the un-guided ``2B`` rows;
        this draw is kept so that sampled runs match. The KV cache is emptied on every exit.

        The refiner (``refine``) runs ``refiner_steps`` respaced DDPM steps with guidance ``cfg``;
        its noise comes from ``refiner_noise_init``/``refiner_step_noise`` if given, else from
        ``refiner_generator`` (else torch's global RNG, as the official code). See
        :func:`refiner_output_to_fhat` for ``official_refiner_reshape``.
        """
        c = self.config
        if vqvae.config.z_channels != c.codebook_dim or vqvae.config.vocab_size != c.vocab_size:
            raise ParameterError(
                f"this VQVAE ({vqvae.config.vocab_size} codes x {vqvae.config.z_channels} channels) does not match the "
                f"VARSR transformer ({c.vocab_size} x {c.codebook_dim}); load the VQVAE it was trained with")
        B = lr_B3HW.shape[0]
        if generator is None and g_seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(int(g_seed))
        label_B = self._labels(label_B, B)
        pn, K = c.patch_nums, len(c.patch_nums)

        cond_BD = self.class_emb(torch.cat([label_B, torch.full_like(label_B, self.uncond_label)])).float()  # (2B, C)
        cond = self.modulation(cond_BD)
        lvl_pos_1LC = self.lvl_pos()
        rope = self.rope_table()
        lr_BlC = self.lr_tokens(lr_B3HW)
        x_BlC = (torch.cat([lr_BlC.repeat(2, 1, 1), cond_BD[:, None]], dim=1) + self.pos_start.float()
                 + lvl_pos_1LC[:, :c.context_tokens])
        f_hat = cond_BD.new_zeros(B, c.codebook_dim, pn[-1], pn[-1])
        idx: list[torch.Tensor] = []
        logits_raw: list[torch.Tensor] = []
        cache = KVCache(len(self.blocks)) if kv_cache is None else kv_cache
        if len(cache.layers) != len(self.blocks) or not cache.is_empty:
            raise ParameterError(f"kv_cache must be an empty KVCache of {len(self.blocks)} layers")
        cur_L, t = 0, 0.0
        try:
            for si, p in enumerate(pn):
                ratio = si / (K - 1)
                n = c.context_tokens if si == 0 else p * p
                h = x_BlC
                for block, layer_cache in zip(self.blocks, cache.layers):
                    h = block(h, cond, cache=layer_cache, rope_2Lc=rope[:, cur_L:cur_L + n])
                cur_L += n
                logits_2BlV = self.get_logits(h, cond_BD)
                if keep_logits:
                    logits_raw.append(logits_2BlV.clone())
                if si == K - 1:
                    last_h_2BlC = h
                    # The official code draws from the un-guided rows here and discards the result.
                    sample_top_k_top_p_(logits_2BlV.clone(), top_k=top_k, top_p=top_p, generator=generator)
                t = cfg * ratio
                logits_BlV = (1 + t) * logits_2BlV[:B] - t * logits_2BlV[B:]
                if si == 0:  # the first scale is predicted by the class token (the last context position)
                    logits_BlV = logits_BlV[:, -1:]
                idx_Bl = sample_top_k_top_p_(logits_BlV, top_k=top_k, top_p=top_p, generator=generator)
                idx.append(idx_Bl)
                if more_smooth:
                    tau = max(0.27 * (1 - ratio * 0.95), 0.005)
                    h_BlC = gumbel_softmax(logits_BlV.mul(1 + ratio), tau, generator) @ vqvae.codebook_VC.float()[None]
                else:
                    h_BlC = vqvae.embed(idx_Bl)
                h_BChw = rearrange(h_BlC, "B (h w) C -> B C h w", h=p, w=p)
                f_hat, nxt_BChw = vqvae.next_ar_input(si, pn, f_hat, h_BChw, last_scale_phi=False)
                if si != K - 1:
                    nxt = self.word_embed(rearrange(nxt_BChw, "B C h w -> B (h w) C")).float()
                    x_BlC = (nxt + lvl_pos_1LC[:, cur_L:cur_L + pn[si + 1] ** 2]).repeat(2, 1, 1)
        finally:
            cache.clear()
        f_hat_discrete = f_hat.clone()
        z = out = delta = None
        if refine:
            e_BlC = self.word_embed(vqvae.embed(idx[-1])).float()
            z_2BlC = self.decoder_norm(last_h_2BlC + e_BlC.repeat(2, 1, 1)).float()
            z = rearrange(z_2BlC, "B l C -> (B l) C")
            out = self.diffloss.sample(z, cfg=t, steps=refiner_steps, temperature=refiner_temperature,
                                       generator=refiner_generator, noise_init=refiner_noise_init,
                                       step_noise=refiner_step_noise)
            delta = refiner_output_to_fhat(rearrange(out, "(B l) C -> B l C", B=2 * B), B, pn[-1],
                                           official_reshape=official_refiner_reshape)
            f_hat = f_hat + delta
        image01 = vqvae.fhat_to_img(f_hat).add(1).mul(0.5)
        return VARSRSample(image01=image01, f_hat=f_hat, f_hat_discrete=f_hat_discrete, idx=idx, logits_raw=logits_raw,
                           refiner_z=z, refiner_out=out, refiner_delta=delta)


def build(sd: StateDict, *, operations=None) -> tuple[VARSRConfig, VARSR]:
    """Build and strictly load a :class:`VARSR` from an (unwrapped) state dict."""
    from .loading import load_strict

    config = VARSRConfig.from_state_dict(sd)
    weights = block_weights(sd, depth=config.depth, embed_dim=config.embed_dim, num_heads=config.num_heads)
    with torch.device("meta"):
        model = VARSR(config=config, operations=operations)
    load_strict(model, weights, what="VARSR transformer")
    return config, model.eval().requires_grad_(False)
