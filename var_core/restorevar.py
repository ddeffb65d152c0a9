"""RestoreVAR: all-in-one image restoration by next-scale prediction, key-compatible with ``restorevar.pth``.

Paper: Rajagopalan et al., "RestoreVAR: Visual Autoregressive Generation for All-in-One Image
Restoration" (2025). The format follows ``models/var.py``, ``models/basic_var.py`` and
``infer.py`` of sudraj2002/RestoreVAR, so the official checkpoint (a plain state dict) loads with
its own key names. The VQVAE is VAR's (:mod:`.var_vqvae`; the released ``vae_restorevar.ckpt`` is
a VQVAE whose decoder was fine-tuned on continuous latents); the latent refiner is
:mod:`.restorevar_refiner`; restoring one model-sized image is :func:`.restorevar_restore.restorevar_restore`.

The transformer is VAR-d16's self-attention blocks (:mod:`.var_model`, cosine attention) **without**
adaptive LayerNorm (plain affine-free LayerNorms, no gates, nor before the head), with:

* the degraded image as condition: the VQVAE encoder's output (before ``quant_conv``),
  ``bicubic``-resized to the last scale ``p_K x p_K`` (``img_to_fs(...)[3]``), goes through
  ``cond_proj4``; ``word_embed_cond`` of it plus ``lvl_embed_cond`` are the ``p_K^2`` keys/values of
  a cross-attention after each block's MLP (LayerNorms on both sides, cosine attention, a learnt
  scalar ``gain`` on its output);
* a global embedding: ``global_embed_gain * global_embed(mean over tokens of cond_proj4(...))`` is
  added to the start token (the class embedding of the fixed label ``num_classes``);
* 2-D RoPE instead of absolute positions (:func:`.rope.scale_aligned_rope_table` with the grid
  ``p_K``): self-attention queries/keys and the cross-attention queries at their scale-aligned
  positions, cross-attention keys on the ``p_K x p_K`` grid; only ``lvl_embed`` is added;
* greedy decoding (argmax per token, no classifier-free guidance, no sampling), then the latent
  refiner on ``f_hat`` with the last block's outputs of all scales as context.

Shapes: ``B`` batch, ``L`` tokens, ``l`` tokens of one scale, ``n = p_K^2`` condition tokens,
``C`` width, ``H`` heads, ``c`` head dim, ``Cv`` VQVAE channels, ``V`` vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .attention import attention, block_causal_mask
from .checkpoint import StateDict
from .detect import count_indexed
from .errors import CheckpointError, ImageInputError, ParameterError
from .kv_cache import KVCache, LayerKVCache
from .restorevar_refiner import PREFIX as REFINER_PREFIX
from .restorevar_refiner import LatentRefiner, RefinerConfig
from .rope import ROPE_THETA, apply_rope, scale_aligned_rope_table
from .var_model import FFN, SelfAttention, level_ids
from .var_vqvae import VQVAE, embedding

# Buffers of the official module: level ids and the training mask are recomputed; the RoPE tables
# (complex ``freqs_cis`` (L, c/2), ``freqs_cis_cross`` (n, c/2)) give L, n and c, are checked
# against the recomputed tables at load, and are not kept (a half-precision cast would drop their
# imaginary part).
_NON_WEIGHT_KEYS = ("lvl_1L", "lvl_1L_cond", "attn_bias_for_masking", "freqs_cis", "freqs_cis_cross")
# Schedules of the official scripts (``--patch_nums``), used only when a checkpoint lacks ``lvl_1L``.
KNOWN_PATCH_NUMS = (
    (1, 2, 3, 4, 6, 9, 13, 18, 24, 32),  # test_regular.sh: the released 512-px model
    (1, 2, 3, 4, 5, 6, 8, 10, 13, 16),  # infer.py's default, 256 px
)
_DEFAULT_HEAD_DIM = 64  # build_vae_var: heads = depth, width = 64 * depth


@dataclass(frozen=True, kw_only=True)
class RestoreVARConfig:
    """Architecture of a RestoreVAR transformer and its refiner, derived from the weights."""

    depth: int
    embed_dim: int  # C
    num_heads: int  # head dim from freqs_cis (2 x its columns); rows of scale_mul_1H11 agree
    mlp_hidden: int
    codebook_dim: int  # Cv (word_embed / cond_proj4 / word_embed_cond input)
    vocab_size: int  # V (head outputs)
    num_classes: int  # class_emb rows - 1; the start token always uses label num_classes
    patch_nums: tuple[int, ...]  # from lvl_1L; sum p^2 = freqs_cis rows, p_K^2 = freqs_cis_cross rows
    attn_l2_norm: bool  # cosine self- and cross-attention (scale_mul_1H11)
    global_dim: int  # global_embed input (the official code hard-codes 32, which must be Cv)
    refiner: RefinerConfig | None  # vae_refiner (None: a checkpoint trained without it)
    # Not stored in the weights: the official constants.
    norm_eps: float = 1e-6  # the blocks' and head's affine-free LayerNorms
    cross_norm_eps: float = 1e-5  # the cross-attention's nn.LayerNorm default
    max_scale_mul: float = math.log(100)
    rope_theta: float = ROPE_THETA

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def num_tokens(self) -> int:
        return sum(p * p for p in self.patch_nums)

    @property
    def first_l(self) -> int:
        return self.patch_nums[0] ** 2

    @property
    def cond_tokens(self) -> int:
        """Condition tokens ``n = p_K^2`` (the degraded image's latent on the last scale's grid)."""
        return self.patch_nums[-1] ** 2

    @classmethod
    def from_state_dict(cls, sd: StateDict) -> "RestoreVARConfig":
        depth = count_indexed(sd, "blocks.")
        try:
            C, cv = sd["word_embed.weight"].shape
            n_cls = sd["class_emb.weight"].shape[0] - 1
            K = sd["lvl_embed.weight"].shape[0]
            vocab = sd["head.weight"].shape[0]
            hidden = sd["blocks.0.ffn.fc1.weight"].shape[0]
            proj_out, proj_in = sd["cond_proj4.weight"].shape
            cond_C, cond_in = sd["word_embed_cond.weight"].shape
            glob_C, glob_in = sd["global_embed.weight"].shape
            cond_levels = sd["lvl_embed_cond.weight"].shape[0]
        except KeyError as e:
            raise CheckpointError(f"RestoreVAR weights are missing {e.args[0]!r}; the file is incomplete") from None
        if depth == 0:
            raise CheckpointError("RestoreVAR weights hold no blocks (blocks.{i}.*)")
        if not (proj_in == proj_out == cond_in == glob_in == cv) or cond_C != C or glob_C != C:
            raise CheckpointError(
                f"RestoreVAR condition layers do not fit a {cv}-channel latent and width {C}: cond_proj4 {proj_in}->"
                f"{proj_out}, word_embed_cond {cond_in}->{cond_C}, global_embed {glob_in}->{glob_C}")
        if cond_levels != 1:  # the official code conditions on one level only (cond_layers = 1)
            raise CheckpointError(f"lvl_embed_cond has {cond_levels} rows; only the one-level condition is supported")
        l2 = "blocks.0.attn.scale_mul_1H11" in sd
        rope, rope_x = sd.get("freqs_cis"), sd.get("freqs_cis_cross")
        if rope is not None:
            heads = int(C) // (2 * rope.shape[-1])
        else:
            heads = sd["blocks.0.attn.scale_mul_1H11"].numel() if l2 else max(int(C) // _DEFAULT_HEAD_DIM, 1)
        if heads < 1 or C % heads or (l2 and sd["blocks.0.attn.scale_mul_1H11"].numel() != heads):
            raise CheckpointError(f"width {C}: the RoPE tables and scale_mul_1H11 do not agree on a head count")
        patch_nums = _patch_nums(sd, K, rope, rope_x)
        refiner = RefinerConfig.from_state_dict(sd) if any(k.startswith(REFINER_PREFIX) for k in sd) else None
        L = sum(p * p for p in patch_nums)
        if refiner is not None and (refiner.seq_len != patch_nums[-1] ** 2 or refiner.in_dim != cv
                                    or refiner.cond_dim != C or refiner.seq_len_cond < L):
            raise CheckpointError(
                f"the refiner (pos_embedding {refiner.seq_len} x {refiner.in_dim}, context {refiner.seq_len_cond} x "
                f"{refiner.cond_dim}) does not fit patch_nums {patch_nums} ({L} tokens), Cv {cv} and width {C}")
        return cls(depth=depth, embed_dim=int(C), num_heads=int(heads), mlp_hidden=int(hidden), codebook_dim=int(cv),
                   vocab_size=int(vocab), num_classes=int(n_cls), patch_nums=patch_nums, attn_l2_norm=l2,
                   global_dim=int(glob_in), refiner=refiner)


def _patch_nums(sd: StateDict, K: int, rope, rope_x) -> tuple[int, ...]:
    """Scale sides from ``lvl_1L`` (else the known schedule with freqs_cis's L and freqs_cis_cross's p_K^2)."""
    L = None if rope is None else int(rope.shape[0])
    n = None if rope_x is None else int(rope_x.shape[0])
    if "lvl_1L" in sd:
        counts = torch.bincount(sd["lvl_1L"].reshape(-1).long(), minlength=K).tolist()
        patch_nums = tuple(round(c ** 0.5) for c in counts)
        if len(counts) != K or any(p * p != c for p, c in zip(patch_nums, counts)):
            raise CheckpointError(f"lvl_1L has per-level token counts {counts}: not square scales of {K} levels")
    else:
        matches = [p for p in KNOWN_PATCH_NUMS if len(p) == K and L in (None, sum(x * x for x in p))
                   and n in (None, p[-1] ** 2)]
        if not matches:
            raise CheckpointError(f"the checkpoint has no lvl_1L buffer and its {K} scales ({L} tokens) match no "
                                  f"known patch_nums {list(KNOWN_PATCH_NUMS)}")
        patch_nums = matches[0]
    if (L is not None and L != sum(p * p for p in patch_nums)) or (n is not None and n != patch_nums[-1] ** 2):
        raise CheckpointError(f"patch_nums {patch_nums} do not match the RoPE tables ({L} tokens, "
                              f"{n} condition tokens)")
    return tuple(int(p) for p in patch_nums)


def rope_tables(config: RestoreVARConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE (cos, sin) tables: ``(2, L, c/2)`` of the token sequence (cell ``(i, j)`` of scale ``p`` at
    ``(i p_K / p, j p_K / p)``: the official ``precompute_freqs_cis`` with grid ``p_K``) and
    ``(2, n, c/2)`` of the ``p_K x p_K`` condition grid (``precompute_freqs_cis_cross``)."""
    pn = config.patch_nums
    seq = scale_aligned_rope_table(config.head_dim, pn, theta=config.rope_theta, grid=pn[-1])
    cross = scale_aligned_rope_table(config.head_dim, pn[-1:], theta=config.rope_theta, grid=pn[-1])
    return seq, cross


def _ln(x_BLC: torch.Tensor, eps: float) -> torch.Tensor:
    return F.layer_norm(x_BLC, (x_BLC.shape[-1],), eps=eps)


class ConditionCrossAttention(nn.Module):
    """``blocks.{i}.cross_attn``: tokens attend to the degraded-image tokens.

    LayerNorm (affine) on queries and keys/values, ``q_proj``/``kv_proj`` without bias, cosine
    attention with ``scale_mul_1H11`` (else scale ``0.25/sqrt(c)``), RoPE after the normalisation
    (queries at their own positions, keys on the ``p_K`` grid), ``gain * out_proj(...)``.
    """

    def __init__(self, embed_dim: int, num_heads: int, *, l2_norm: bool, max_scale_mul: float, eps: float, ops=nn):
        super().__init__()
        self.H, self.max_scale_mul, self.l2_norm = num_heads, max_scale_mul, l2_norm
        self.scale = 1.0 if l2_norm else 0.25 / math.sqrt(embed_dim // num_heads)
        self.norm_q = ops.LayerNorm(embed_dim, eps=eps)
        self.norm_kv = ops.LayerNorm(embed_dim, eps=eps)
        self.q_proj = ops.Linear(embed_dim, embed_dim, bias=False)
        self.kv_proj = ops.Linear(embed_dim, 2 * embed_dim, bias=False)
        self.out_proj = ops.Linear(embed_dim, embed_dim)
        if l2_norm:
            self.scale_mul_1H11 = nn.Parameter(torch.zeros(1, num_heads, 1, 1))
        self.gain = nn.Parameter(torch.zeros(()))

    def keys_values(self, cond_BnC: torch.Tensor, rope_2nc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys (normalised, rotated) and values ``(B, H, n, c)`` of the condition tokens (once per image)."""
        kv = self.kv_proj(self.norm_kv(cond_BnC))
        k, v = rearrange(kv, "B n (two H c) -> two B H n c", two=2, H=self.H).unbind(0)
        if self.l2_norm:
            k = F.normalize(k, dim=-1)
        return apply_rope(k, rope_2nc).contiguous(), v.contiguous()

    def forward(self, x_BLC: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor],
                rope_2Lc: torch.Tensor) -> torch.Tensor:
        q = rearrange(self.q_proj(self.norm_q(x_BLC)), "B L (H c) -> B H L c", H=self.H)
        if self.l2_norm:
            q = F.normalize(q, dim=-1).mul(self.scale_mul_1H11.clamp_max(self.max_scale_mul).exp().to(q))
        out_BHLc = attention(apply_rope(q, rope_2Lc).contiguous(), *kv, scale=self.scale)
        return self.out_proj(rearrange(out_BHLc, "B H L c -> B L (H c)")) * self.gain.to(x_BLC.dtype)


class RestoreVARBlock(nn.Module):
    """``blocks.{i}``: ``x += attn(LN x)``; ``x += ffn(LN x)``; ``x += cross_attn(x, cond)`` (LN: affine-free)."""

    def __init__(self, cfg: RestoreVARConfig, *, ops=nn):
        super().__init__()
        C, H = cfg.embed_dim, cfg.num_heads
        self.eps = cfg.norm_eps
        self.attn = SelfAttention(C, H, l2_norm=cfg.attn_l2_norm, max_scale_mul=cfg.max_scale_mul, ops=ops)
        self.ffn = FFN(C, cfg.mlp_hidden, ops=ops)
        self.cross_attn = ConditionCrossAttention(C, H, l2_norm=cfg.attn_l2_norm, max_scale_mul=cfg.max_scale_mul,
                                                  eps=cfg.cross_norm_eps, ops=ops)

    def forward(self, x_BLC: torch.Tensor, cond_kv: tuple[torch.Tensor, torch.Tensor], rope_2Lc: torch.Tensor,
                mask: torch.Tensor | None = None, cache: LayerKVCache | None = None) -> torch.Tensor:
        x_BLC = x_BLC + self.attn(_ln(x_BLC, self.eps), mask, cache, rope_2Lc)
        x_BLC = x_BLC + self.ffn(_ln(x_BLC, self.eps))
        return x_BLC + self.cross_attn(x_BLC, cond_kv, rope_2Lc)


@dataclass
class RestoreVARSample:
    """Output of :meth:`RestoreVAR.autoregressive_infer`.

    ``image01`` ``(B, 3, H, W)`` in ``[0, 1]``; ``f_hat`` ``(B, Cv, p_K, p_K)`` the final (refined)
    latent, ``f_hat_discrete`` the latent of the drawn tokens; ``idx[k]`` ``(B, p_k^2)``;
    ``logits[k]`` ``(B, p_k^2, V)`` (only with ``keep_logits``); ``last_block`` ``(B, L, C)`` the
    refiner's context (the last block's output at every scale).
    """

    image01: torch.Tensor
    f_hat: torch.Tensor
    f_hat_discrete: torch.Tensor
    idx: list[torch.Tensor]
    last_block: torch.Tensor
    logits: list[torch.Tensor] = field(default_factory=list)


class RestoreVAR(nn.Module):
    """RestoreVAR transformer with its latent refiner; see the module docstring."""

    def __init__(self, *, config: RestoreVARConfig, operations=None):
        super().__init__()
        ops = operations if operations is not None else nn
        cfg = self.config = config
        C, cv = cfg.embed_dim, cfg.codebook_dim
        self.word_embed = ops.Linear(cv, C)
        self.class_emb = embedding(cfg.num_classes + 1, C, ops)
        self.lvl_embed = embedding(len(cfg.patch_nums), C, ops)
        self.blocks = nn.ModuleList(RestoreVARBlock(cfg, ops=ops) for _ in range(cfg.depth))
        self.head = ops.Linear(C, cfg.vocab_size)
        self.global_embed = ops.Linear(cfg.global_dim, C)
        self.global_embed_gain = nn.Parameter(torch.zeros(()))
        self.cond_proj4 = ops.Linear(cv, cv)
        self.word_embed_cond = ops.Linear(cv, C)
        self.lvl_embed_cond = embedding(1, C, ops)
        if cfg.refiner is not None:
            self.vae_refiner = LatentRefiner(config=cfg.refiner, operations=ops)

    # ----------------------------------------------------------------- pieces
    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    def input_size(self, vqvae: VQVAE) -> int:
        """Side of the (square) degraded input and of the output: ``p_K`` times the VQVAE's downsampling."""
        return self.config.patch_nums[-1] * vqvae.config.downsample

    def rope_tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        """:func:`rope_tables` on the model's device."""
        seq, cross = rope_tables(self.config)
        return seq.to(self.device), cross.to(self.device)

    def check_vqvae(self, vqvae: VQVAE) -> None:
        c = self.config
        if vqvae.config.z_channels != c.codebook_dim or vqvae.config.vocab_size != c.vocab_size:
            raise ParameterError(
                f"this VQVAE ({vqvae.config.vocab_size} codes x {vqvae.config.z_channels} channels) does not match the "
                f"RestoreVAR transformer ({c.vocab_size} x {c.codebook_dim}); load the VQVAE it was trained with")

    def degraded_tokens(self, vqvae: VQVAE, degraded_B3HW: torch.Tensor) -> torch.Tensor:
        """Degraded image in ``[-1, 1]`` ``(B, 3, S, S)`` -> condition ``(B, p_K^2, Cv)`` (``img_to_fs(...)[3]``)."""
        self.check_vqvae(vqvae)
        S = self.input_size(vqvae)
        if degraded_B3HW.ndim != 4 or degraded_B3HW.shape[1] != 3 or tuple(degraded_B3HW.shape[-2:]) != (S, S):
            raise ImageInputError(f"this RestoreVAR model takes (B, 3, {S}, {S}) images ({S}x{S} pixels; resize or "
                                  f"tile the input), got shape {tuple(degraded_B3HW.shape)}")
        x = degraded_B3HW.to(vqvae.quant_conv.weight.device)
        return vqvae.img_to_fs(x, size=self.config.patch_nums[-1], levels=(-1,))[0].to(self.device)

    def condition(self, cond_BnCv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Start tokens ``(B, l_1, C)`` (class ``num_classes`` + global embedding) and the
        condition tokens ``(B, n, C)`` of ``cond_BnCv`` (:meth:`degraded_tokens`)."""
        c = self.config
        if cond_BnCv.ndim != 3 or cond_BnCv.shape[1:] != (c.cond_tokens, c.codebook_dim):
            raise ParameterError(f"condition tokens must be (B, {c.cond_tokens}, {c.codebook_dim}), "
                                 f"got {tuple(cond_BnCv.shape)}")
        B = cond_BnCv.shape[0]
        proj_BnCv = self.cond_proj4(cond_BnCv.to(self.device, torch.float32))
        global_B1C = self.global_embed_gain.float() * self.global_embed(proj_BnCv.mean(dim=1, keepdim=True)).float()
        label = torch.full((B,), c.num_classes, dtype=torch.long, device=self.device)
        sos_BlC = self.class_emb(label).float()[:, None].expand(B, c.first_l, -1) + global_B1C
        zero = torch.zeros(1, dtype=torch.long, device=self.device)
        cond_BnC = self.word_embed_cond(proj_BnCv).float() + self.lvl_embed_cond(zero).float()
        return sos_BlC, cond_BnC

    def cond_keys_values(self, cond_BnC: torch.Tensor, rope_cross: torch.Tensor) -> list:
        return [block.cross_attn.keys_values(cond_BnC, rope_cross) for block in self.blocks]

    def get_logits(self, h_BLC: torch.Tensor) -> torch.Tensor:
        """Token logits ``(B, L, V)`` float32 (affine-free LayerNorm, then ``head``)."""
        return self.head(_ln(h_BLC.float(), self.config.norm_eps)).float()

    # ----------------------------------------------------------------- teacher forcing
    def forward(self, x_BLCv_wo_first_l: torch.Tensor, cond_BnCv: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits ``(B, l_1 + L', V)`` with the block-causal mask.

        ``x_BLCv_wo_first_l`` ``(B, L', Cv)``: next-scale inputs of scales 2.. (``VQVAE.idx_to_var_input``);
        ``cond_BnCv`` ``(B, p_K^2, Cv)``: :meth:`degraded_tokens` of the degraded image.
        """
        c = self.config
        ed = c.first_l + x_BLCv_wo_first_l.shape[1]
        if ed > c.num_tokens:
            raise ParameterError(f"{x_BLCv_wo_first_l.shape[1]} input tokens exceed the {c.num_tokens - c.first_l} "
                                 f"of patch_nums {c.patch_nums}")
        sos_BlC, cond_BnC = self.condition(cond_BnCv)
        x = self.word_embed(x_BLCv_wo_first_l.to(self.device, torch.float32)).float()
        lvl = level_ids(c.patch_nums, self.device)[:ed]
        x_BLC = torch.cat([sos_BlC, x], dim=1) + self.lvl_embed(lvl).float()[None]
        mask = block_causal_mask([p * p for p in c.patch_nums], self.device)[:ed, :ed]
        rope, rope_cross = self.rope_tables()
        rope = rope[:, :ed]
        for block, kv in zip(self.blocks, self.cond_keys_values(cond_BnC, rope_cross)):
            x_BLC = block(x_BLC, kv, rope, mask=mask)
        return self.get_logits(x_BLC)

    # ----------------------------------------------------------------- inference
    @torch.no_grad()
    def autoregressive_infer(
        self, vqvae: VQVAE, degraded_B3HW: torch.Tensor | None = None, *, cond_BnCv: torch.Tensor | None = None,
        refine: bool | None = None, keep_logits: bool = False, kv_cache: KVCache | None = None,
    ) -> RestoreVARSample:
        """Greedy scale-by-scale restoration (the official ``autoregressive_infer_cfg``, which has no CFG).

        ``degraded_B3HW``: ``(B, 3, S, S)`` in ``[-1, 1]``, ``S`` = :meth:`input_size` (or give its
        :meth:`degraded_tokens` as ``cond_BnCv``). Every token is the argmax of its logits; there
        is no randomness. ``refine`` (default: when the checkpoint has it) runs the latent refiner on
        ``f_hat``. The KV cache (``kv_cache``, or a fresh one) is emptied on every exit.
        """
        c = self.config
        self.check_vqvae(vqvae)
        if cond_BnCv is None:
            if degraded_B3HW is None:
                raise ParameterError("give the degraded image or its condition tokens")
            cond_BnCv = self.degraded_tokens(vqvae, degraded_B3HW)
        refine = (c.refiner is not None) if refine is None else refine
        if refine and c.refiner is None:
            raise ParameterError("this RestoreVAR checkpoint has no latent refiner (vae_refiner.*); use refine=False")
        pn, K = c.patch_nums, len(c.patch_nums)
        B = cond_BnCv.shape[0]
        sos_BlC, cond_BnC = self.condition(cond_BnCv)
        rope, rope_cross = self.rope_tables()
        cond_kv = self.cond_keys_values(cond_BnC, rope_cross)
        lvl_1LC = self.lvl_embed(level_ids(pn, self.device)).float()[None]
        x_BlC = sos_BlC + lvl_1LC[:, :c.first_l]
        f_hat = sos_BlC.new_zeros(B, c.codebook_dim, pn[-1], pn[-1])
        idx, logits, last = [], [], []
        cache = KVCache(len(self.blocks)) if kv_cache is None else kv_cache
        if len(cache.layers) != len(self.blocks) or not cache.is_empty:
            raise ParameterError(f"kv_cache must be an empty KVCache of {len(self.blocks)} layers")
        cur_L = 0
        try:
            for si, p in enumerate(pn):
                h = x_BlC
                for block, kv, layer_cache in zip(self.blocks, cond_kv, cache.layers):
                    h = block(h, kv, rope[:, cur_L:cur_L + p * p], cache=layer_cache)
                cur_L += p * p
                last.append(h.float())
                logits_BlV = self.get_logits(h)
                if keep_logits:
                    logits.append(logits_BlV)
                idx_Bl = logits_BlV.argmax(dim=-1)
                idx.append(idx_Bl)
                h_BChw = rearrange(vqvae.embed(idx_Bl), "B (h w) C -> B C h w", h=p, w=p)
                f_hat, nxt_BChw = vqvae.next_ar_input(si, pn, f_hat, h_BChw.to(f_hat.device))
                if si != K - 1:
                    nxt = self.word_embed(rearrange(nxt_BChw, "B C h w -> B (h w) C").to(self.device)).float()
                    x_BlC = nxt + lvl_1LC[:, cur_L:cur_L + pn[si + 1] ** 2]
        finally:
            cache.clear()
        f_hat_discrete = f_hat.clone()
        last_block = torch.cat(last, dim=1)
        if refine:
            tokens = self.vae_refiner(rearrange(f_hat, "B C h w -> B (h w) C").to(self.device), last_block)
            f_hat = rearrange(tokens, "B (h w) C -> B C h w", h=pn[-1], w=pn[-1]).to(f_hat_discrete.device)
        image01 = vqvae.fhat_to_img(f_hat).add(1).mul(0.5)  # [-1, 1] -> [0, 1]
        return RestoreVARSample(image01=image01, f_hat=f_hat, f_hat_discrete=f_hat_discrete, idx=idx,
                                last_block=last_block, logits=logits)


def _check_rope_buffers(sd: StateDict, config: RestoreVARConfig) -> None:
    """The stored ``freqs_cis``/``freqs_cis_cross`` must be the tables this implementation computes."""
    for key, table in zip(("freqs_cis", "freqs_cis_cross"), rope_tables(config)):
        if key not in sd:
            continue
        stored = torch.view_as_real(sd[key].to(torch.complex64)) if sd[key].is_complex() else sd[key].float()
        want = rearrange(table, "two L c -> L c two")
        if stored.shape != want.shape or not torch.allclose(stored, want, atol=1e-5, rtol=0):
            raise CheckpointError(f"the checkpoint's {key} RoPE table is not the official one for patch_nums "
                                  f"{list(config.patch_nums)} and base {config.rope_theta:g}")


def build(sd: StateDict, *, operations=None) -> tuple[RestoreVARConfig, RestoreVAR]:
    """Build and strictly load a :class:`RestoreVAR` from an (unwrapped) state dict."""
    from .loading import load_strict

    config = RestoreVARConfig.from_state_dict(sd)
    weights = {k: v for k, v in sd.items() if k not in _NON_WEIGHT_KEYS}
    for i in range(config.depth):
        weights.setdefault(f"blocks.{i}.attn.zero_k_bias", torch.zeros(config.embed_dim))  # a buffer
        for key in (f"blocks.{i}.attn.scale_mul_1H11", f"blocks.{i}.cross_attn.scale_mul_1H11"):
            if key in weights:
                weights[key] = weights[key].reshape(1, config.num_heads, 1, 1)
    _check_rope_buffers(sd, config)
    with torch.device("meta"):
        model = RestoreVAR(config=config, operations=operations)
    load_strict(model, weights, what="RestoreVAR transformer")
    return config, model.eval().requires_grad_(False)
