"""The class-conditional VAR transformer (next-scale prediction), key-compatible with ``var_d16.pth`` ... ``var_d30.pth``.

Paper: Tian et al., "Visual Autoregressive Modeling: Scalable Image Generation via Next-Scale
Prediction" (NeurIPS 2024). The format follows ``models/var.py``, ``models/basic_var.py`` and
``models/helpers.py`` of FoundationVision/VAR, so the official checkpoints load with their own key
names. The VQVAE that turns tokens into images is :mod:`.var_vqvae`.

The sequence is ``[class token x l_1] + next-scale inputs`` over ``patch_nums`` ``(p_1, ..., p_K)``
(``L = sum p_k^2`` tokens): position embeddings are absolute (``pos_1LC``, plus ``pos_start`` on
the class tokens) with a per-scale level embedding (``lvl_embed``). Each block is adaptive-LayerNorm
(per block ``ada_lin``, or shared ``shared_ada_lin`` + per-block ``ada_gss``) cosine self-attention
(``scale_mul_1H11``) and a GELU MLP; the head is preceded by an adaptive LayerNorm (``head_nm``).
All modulations come from the class embedding; ``class_emb`` has one extra row, the unconditional
class used by classifier-free guidance (CFG). Training uses a block-causal mask (a token sees its
own and earlier scales); inference is scale-by-scale with a KV cache.

Shapes: ``B`` batch, ``L`` tokens, ``l`` tokens of one scale, ``C`` width, ``H`` heads, ``c`` head
dim, ``Cv`` VQVAE codebook channels, ``V`` vocabulary. The residual stream is float32 as in the
official code; for half-precision matmuls keep float32 weights under ``torch.autocast``, or store
half weights with casting layers (``comfy.ops.manual_cast``) passed as ``operations``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .attention import attention, block_causal_mask
from .checkpoint import StateDict
from .detect import count_indexed
from .errors import CheckpointError, ParameterError
from .kv_cache import KVCache, LayerKVCache
from .rope import apply_rope
from .var_vqvae import DEFAULT_PATCH_NUMS, VQVAE, embedding

# Persistent buffers of the official module that are recomputed here (level ids and the training
# mask); ``lvl_1L`` is still read to find the checkpoint's patch_nums.
_NON_WEIGHT_KEYS = ("lvl_1L", "attn_bias_for_masking")
# Schedules of the released models, used only when a checkpoint lacks ``lvl_1L`` (pos_1LC alone
# gives the token count L, and lvl_embed the number of scales K, not the per-scale sizes).
KNOWN_PATCH_NUMS = (DEFAULT_PATCH_NUMS, (1, 2, 3, 4, 6, 9, 13, 18, 24, 32))  # 256 px, 512 px (var_d36)
# Without cosine attention the head count is not in the weights; build_vae_var uses 64-dim heads.
_DEFAULT_HEAD_DIM = 64


@dataclass(frozen=True, kw_only=True)
class VARConfig:
    """Architecture of a class-conditional VAR transformer, derived from its weights."""

    depth: int
    embed_dim: int  # C (= the conditioning width D)
    num_heads: int  # rows of scale_mul_1H11 (cosine attention), else embed_dim // 64
    mlp_hidden: int
    codebook_dim: int  # Cv, the VQVAE latent channels (word_embed input)
    vocab_size: int  # V, head outputs (the VQVAE codebook size)
    num_classes: int  # class_emb rows - 1 (the last row is the unconditional class)
    patch_nums: tuple[int, ...]  # from lvl_1L (per-level token counts p^2)
    shared_aln: bool  # shared_ada_lin + per-block ada_gss (vs per-block ada_lin)
    attn_l2_norm: bool  # cosine attention with a learnt per-head scale (scale_mul_1H11)
    # Not stored in the weights: the official constants.
    norm_eps: float = 1e-6
    max_scale_mul: float = math.log(100)  # clamp of the cosine-attention scale (before exp)

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def num_tokens(self) -> int:
        return sum(p * p for p in self.patch_nums)

    @property
    def first_l(self) -> int:
        return self.patch_nums[0] ** 2

    @classmethod
    def from_state_dict(cls, sd: StateDict) -> "VARConfig":
        depth = count_indexed(sd, "blocks.")
        try:
            C, cv = sd["word_embed.weight"].shape
            n_cls = sd["class_emb.weight"].shape[0] - 1
            L = sd["pos_1LC"].shape[1]
            first_l = sd["pos_start"].shape[1]
            K = sd["lvl_embed.weight"].shape[0]
            vocab = sd["head.weight"].shape[0]
            hidden = sd["blocks.0.ffn.fc1.weight"].shape[0]
        except KeyError as e:
            raise CheckpointError(f"VAR transformer weights are missing {e.args[0]!r}; the file is incomplete") from None
        if depth == 0:
            raise CheckpointError("VAR transformer weights hold no blocks (blocks.{i}.*)")
        l2 = "blocks.0.attn.scale_mul_1H11" in sd
        heads = sd["blocks.0.attn.scale_mul_1H11"].numel() if l2 else max(int(C) // _DEFAULT_HEAD_DIM, 1)
        if C % heads:
            raise CheckpointError(f"width {C} is not divisible by {heads} heads")
        if "lvl_1L" in sd:
            counts = torch.bincount(sd["lvl_1L"].reshape(-1).long(), minlength=K).tolist()
            patch_nums = tuple(round(n ** 0.5) for n in counts)
            if any(p * p != n for p, n in zip(patch_nums, counts)) or len(counts) != K:
                raise CheckpointError(f"lvl_1L has per-level token counts {counts}: not square scales of {K} levels")
        else:
            matches = [p for p in KNOWN_PATCH_NUMS if len(p) == K and sum(x * x for x in p) == L]
            if not matches:
                raise CheckpointError(
                    f"the checkpoint has no lvl_1L buffer and its {K} scales / {L} tokens match no known "
                    f"patch_nums {list(KNOWN_PATCH_NUMS)}; the scale sizes cannot be derived")
            patch_nums = matches[0]
        if sum(p * p for p in patch_nums) != L or patch_nums[0] ** 2 != first_l:
            raise CheckpointError(f"patch_nums {patch_nums} do not match pos_1LC ({L} tokens) / pos_start ({first_l})")
        return cls(depth=depth, embed_dim=int(C), num_heads=int(heads), mlp_hidden=int(hidden), codebook_dim=int(cv),
                   vocab_size=int(vocab), num_classes=int(n_cls), patch_nums=patch_nums,
                   shared_aln="shared_ada_lin.1.weight" in sd, attn_l2_norm=l2)


def level_ids(patch_nums: Sequence[int], device=None) -> torch.Tensor:
    """Scale index ``(L,)`` of each token of square scales ``patch_nums`` (the official ``lvl_1L[0]``)."""
    lens = torch.tensor([p * p for p in patch_nums], device=device)
    return torch.repeat_interleave(torch.arange(len(patch_nums), device=device), lens)


def ada_layer_norm(x_BLC: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, eps: float) -> torch.Tensor:
    """Affine-free LayerNorm, then ``* (1 + scale) + shift`` (scale/shift broadcast to ``(B, 1, C)``)."""
    return F.layer_norm(x_BLC, (x_BLC.shape[-1],), eps=eps).mul(scale.add(1)).add_(shift)


class SelfAttention(nn.Module):
    """Self-attention with q/v biases (no k bias) and, with ``l2_norm``, cosine attention.

    With a ``cache`` (:class:`.kv_cache.LayerKVCache`, owned by the caller) the keys and values of
    each call are appended to it, so one call per scale attends to all earlier scales without a mask.
    ``rope_2Lc`` (VARSR): a ``(2, L, c/2)`` (cos, sin) table of the ``L`` new tokens, applied to the
    (normalised) queries and keys before caching (:func:`.rope.apply_rope`).
    """

    def __init__(self, embed_dim: int, num_heads: int, *, l2_norm: bool, max_scale_mul: float, ops=nn):
        super().__init__()
        self.H, self.c = num_heads, embed_dim // num_heads
        self.l2_norm, self.max_scale_mul = l2_norm, max_scale_mul
        self.mat_qkv = ops.Linear(embed_dim, 3 * embed_dim, bias=False)
        self.q_bias, self.v_bias = nn.Parameter(torch.zeros(embed_dim)), nn.Parameter(torch.zeros(embed_dim))
        self.register_buffer("zero_k_bias", torch.zeros(embed_dim))
        if l2_norm:
            self.scale_mul_1H11 = nn.Parameter(torch.zeros(1, num_heads, 1, 1))
        self.proj = ops.Linear(embed_dim, embed_dim)

    def forward(self, x_BLC: torch.Tensor, mask: torch.Tensor | None = None,
                cache: LayerKVCache | None = None, rope_2Lc: torch.Tensor | None = None) -> torch.Tensor:
        bias = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
        qkv = self.mat_qkv(x_BLC) + bias.to(x_BLC)
        q, k, v = rearrange(qkv, "B L (three H c) -> three B H L c", three=3, H=self.H).unbind(0)
        if self.l2_norm:
            scale_mul_1H11 = self.scale_mul_1H11.clamp_max(self.max_scale_mul).exp()
            q = F.normalize(q, dim=-1).mul(scale_mul_1H11.to(q))
            k = F.normalize(k, dim=-1)
            scale = 1.0
        else:
            scale = 0.25 / math.sqrt(self.c)  # the official non-cosine scale
        if rope_2Lc is not None:
            q, k = apply_rope(q, rope_2Lc), apply_rope(k, rope_2Lc)
        if cache is not None:
            k, v = cache.extend(k, v)
        out_BHLc = attention(q.contiguous(), k.contiguous(), v.contiguous(), mask=mask, scale=scale)
        return self.proj(rearrange(out_BHLc, "B H L c -> B L (H c)"))


class FFN(nn.Module):
    def __init__(self, embed_dim: int, hidden: int, *, ops=nn):
        super().__init__()
        self.fc1 = ops.Linear(embed_dim, hidden)
        self.fc2 = ops.Linear(hidden, embed_dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class AdaLNSelfAttn(nn.Module):
    """``blocks.{i}``: adaptive-LayerNorm self-attention and MLP, each residual and gated.

    The modulation ``(gamma1, gamma2, scale1, scale2, shift1, shift2)`` is ``ada_lin(cond_BD)``, or
    ``ada_gss + shared`` where ``shared`` ``(B, 1, 6, C)`` is the model's ``shared_ada_lin(cond_BD)``.
    """

    def __init__(self, cfg: VARConfig, *, ops=nn):
        super().__init__()
        C = self.C = cfg.embed_dim
        self.eps = cfg.norm_eps
        self.attn = SelfAttention(C, cfg.num_heads, l2_norm=cfg.attn_l2_norm, max_scale_mul=cfg.max_scale_mul, ops=ops)
        self.ffn = FFN(C, cfg.mlp_hidden, ops=ops)
        if cfg.shared_aln:
            self.ada_gss = nn.Parameter(torch.zeros(1, 1, 6, C))
        else:
            self.ada_lin = nn.Sequential(nn.SiLU(), ops.Linear(C, 6 * C))

    def forward(self, x_BLC: torch.Tensor, cond: torch.Tensor, mask: torch.Tensor | None = None,
                cache: LayerKVCache | None = None, rope_2Lc: torch.Tensor | None = None) -> torch.Tensor:
        """``cond``: ``(B, C)`` class embedding, or the shared ``(B, 1, 6, C)`` modulation;
        ``rope_2Lc``: VARSR's RoPE table of the tokens (see :class:`SelfAttention`)."""
        if hasattr(self, "ada_gss"):
            gss = self.ada_gss + cond
        else:
            gss = self.ada_lin(cond).view(-1, 1, 6, self.C)
        gamma1, gamma2, scale1, scale2, shift1, shift2 = gss.unbind(2)
        x_BLC = x_BLC + self.attn(ada_layer_norm(x_BLC, scale1, shift1, self.eps), mask, cache, rope_2Lc).mul(gamma1)
        return x_BLC + self.ffn(ada_layer_norm(x_BLC, scale2, shift2, self.eps)).mul(gamma2)


class AdaLNBeforeHead(nn.Module):
    """``head_nm``: adaptive LayerNorm before the head, modulated by the class embedding."""

    def __init__(self, embed_dim: int, eps: float, *, ops=nn):
        super().__init__()
        self.C, self.eps = embed_dim, eps
        self.ada_lin = nn.Sequential(nn.SiLU(), ops.Linear(embed_dim, 2 * embed_dim))

    def forward(self, x_BLC: torch.Tensor, cond_BD: torch.Tensor) -> torch.Tensor:
        scale, shift = self.ada_lin(cond_BD).view(-1, 1, 2, self.C).unbind(2)
        return ada_layer_norm(x_BLC, scale, shift, self.eps)


def sample_top_k_top_p_(logits_BlV: torch.Tensor, *, top_k: int = 0, top_p: float = 0.0,
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw one token per position ``(B, l)``; masks ``logits_BlV`` in place (as the official helper).

    ``top_k > 0`` keeps the ``top_k`` largest logits (``top_k = 1`` is greedy); ``top_p > 0`` then keeps
    the smallest set whose probability exceeds ``top_p``. The draw is one ``torch.multinomial`` over
    all ``B*l`` rows with ``generator``, in the official order, so a torch generator seeded like the
    official ``g_seed`` reproduces the official tokens.
    """
    B, l, V = logits_BlV.shape
    if top_k > 0:
        kth = logits_BlV.topk(min(top_k, V), largest=True, sorted=False, dim=-1)[0].amin(dim=-1, keepdim=True)
        logits_BlV.masked_fill_(logits_BlV < kth, -torch.inf)
    if top_p > 0:
        sorted_logits, sorted_idx = logits_BlV.sort(dim=-1, descending=False)
        remove_sorted = sorted_logits.softmax(dim=-1).cumsum_(dim=-1) <= (1 - top_p)
        remove_sorted[..., -1:] = False  # always keep the most likely token
        logits_BlV.masked_fill_(remove_sorted.scatter(-1, sorted_idx, remove_sorted), -torch.inf)
    probs_NV = logits_BlV.softmax(dim=-1).view(-1, V)
    return torch.multinomial(probs_NV, num_samples=1, replacement=True, generator=generator).view(B, l)


def gumbel_softmax(logits: torch.Tensor, tau: float, generator: torch.Generator | None) -> torch.Tensor:
    """Soft Gumbel-softmax over the last dim; with a generator, the official ``gumbel_softmax_with_rng``."""
    if generator is None:
        return F.gumbel_softmax(logits, tau=tau, hard=False, dim=-1)
    gumbels = -torch.empty_like(logits).exponential_(generator=generator).log()
    return ((logits + gumbels) / tau).softmax(dim=-1)


@dataclass
class VARSample:
    """Output of :meth:`VAR.autoregressive_infer_cfg`.

    ``image01`` ``(B, 3, H, W)`` in ``[0, 1]``; ``f_hat`` ``(B, Cv, p_K, p_K)`` the final latent;
    ``idx[k]`` ``(B, p_k^2)`` the drawn tokens; ``logits_raw[k]`` ``(2B, p_k^2, V)`` the conditional
    then unconditional logits before the CFG mix (only with ``keep_logits``).
    """

    image01: torch.Tensor
    f_hat: torch.Tensor
    idx: list[torch.Tensor]
    logits_raw: list[torch.Tensor] = field(default_factory=list)


class VAR(nn.Module):
    """Class-conditional VAR transformer; see the module docstring."""

    def __init__(self, *, config: VARConfig, operations=None):
        super().__init__()
        ops = operations if operations is not None else nn
        cfg = self.config = config
        C = cfg.embed_dim
        self.word_embed = ops.Linear(cfg.codebook_dim, C)
        self.class_emb = embedding(cfg.num_classes + 1, C, ops)
        self.pos_start = nn.Parameter(torch.zeros(1, cfg.first_l, C))
        self.pos_1LC = nn.Parameter(torch.zeros(1, cfg.num_tokens, C))
        self.lvl_embed = embedding(len(cfg.patch_nums), C, ops)
        if cfg.shared_aln:
            self.shared_ada_lin = nn.Sequential(nn.SiLU(), ops.Linear(C, 6 * C))
        self.blocks = nn.ModuleList(AdaLNSelfAttn(cfg, ops=ops) for _ in range(cfg.depth))
        self.head_nm = AdaLNBeforeHead(C, cfg.norm_eps, ops=ops)
        self.head = ops.Linear(C, cfg.vocab_size)

    # ----------------------------------------------------------------- pieces
    @property
    def device(self) -> torch.device:
        return self.pos_1LC.device

    def level_ids(self, device=None) -> torch.Tensor:
        """Scale index of each of the ``L`` tokens (the official ``lvl_1L``)."""
        return level_ids(self.config.patch_nums, device)

    def lvl_pos(self) -> torch.Tensor:
        """Level plus absolute position embedding ``(1, L, C)`` float32."""
        return self.lvl_embed(self.level_ids(self.device)).float()[None] + self.pos_1LC.float()

    def modulation(self, cond_BD: torch.Tensor) -> torch.Tensor:
        """What the blocks take: the class embedding, or the shared ``(B, 1, 6, C)`` modulation."""
        if self.config.shared_aln:
            return self.shared_ada_lin(cond_BD).view(-1, 1, 6, self.config.embed_dim)
        return cond_BD

    def get_logits(self, h_BLC: torch.Tensor, cond_BD: torch.Tensor) -> torch.Tensor:
        """Token logits ``(B, L, V)`` float32."""
        return self.head(self.head_nm(h_BLC.float(), cond_BD).float()).float()

    def _labels(self, label_B, B: int, generator) -> torch.Tensor:
        n = self.config.num_classes
        if label_B is None:  # random classes, drawn from the sampling generator first (as official)
            uniform_1N = torch.full((1, n), 1.0 / n, device=generator.device if generator is not None else self.device)
            label_B = torch.multinomial(uniform_1N, num_samples=B, replacement=True, generator=generator).reshape(B)
        elif isinstance(label_B, int):
            label_B = torch.full((B,), n if label_B < 0 else label_B, dtype=torch.long)
        label_B = torch.as_tensor(label_B, dtype=torch.long).reshape(-1).to(self.device)
        if label_B.shape[0] != B:
            raise ParameterError(f"got {label_B.shape[0]} labels for a batch of {B}")
        if bool(((label_B < 0) | (label_B > n)).any()):
            raise ParameterError(f"class labels must be in 0..{n - 1} (or {n}, unconditional); got {label_B.tolist()}")
        return label_B

    # ----------------------------------------------------------------- teacher forcing
    def forward(self, label_B: torch.Tensor, x_BLCv_wo_first_l: torch.Tensor, *,
                cond_drop: Sequence[bool] | None = None) -> torch.Tensor:
        """Teacher-forced logits ``(B, l_1 + L', V)`` with the block-causal mask.

        ``label_B`` ``(B,)`` class ids (``num_classes`` = unconditional); ``x_BLCv_wo_first_l``
        ``(B, L', Cv)`` the next-scale inputs of scales 2.. (``VQVAE.idx_to_var_input``), usually
        ``L' = L - l_1``. ``cond_drop[i]`` replaces label ``i`` by the unconditional class (the
        official forward draws this at random with ``cond_drop_rate``, even in eval; here it is explicit).
        """
        cfg = self.config
        B = x_BLCv_wo_first_l.shape[0]
        if label_B is None:
            raise ParameterError("teacher forcing needs the class labels (num_classes = unconditional)")
        label_B = self._labels(label_B, B, None)
        if cond_drop is not None:
            label_B = torch.where(torch.as_tensor(list(cond_drop), device=label_B.device), cfg.num_classes, label_B)
        ed = cfg.first_l + x_BLCv_wo_first_l.shape[1]
        if ed > cfg.num_tokens:
            raise ParameterError(f"{x_BLCv_wo_first_l.shape[1]} input tokens exceed the {cfg.num_tokens - cfg.first_l} "
                                 f"of patch_nums {cfg.patch_nums}")
        cond_BD = self.class_emb(label_B).float()
        sos_BlC = cond_BD[:, None].expand(B, cfg.first_l, -1) + self.pos_start.float().expand(B, -1, -1)
        x = self.word_embed(x_BLCv_wo_first_l.to(self.device, torch.float32)).float()
        x_BLC = torch.cat((sos_BlC, x), dim=1)
        x_BLC = x_BLC + self.lvl_pos()[:, :ed]
        scale_lens = self.level_ids("cpu")[:ed].bincount().tolist()
        mask = block_causal_mask(scale_lens, self.device)
        cond = self.modulation(cond_BD)
        for block in self.blocks:
            x_BLC = block(x_BLC, cond, mask)
        return self.get_logits(x_BLC, cond_BD)

    # ----------------------------------------------------------------- sampling
    @torch.no_grad()
    def autoregressive_infer_cfg(
        self, vqvae: VQVAE, B: int, label_B: torch.Tensor | int | None = None, *,
        g_seed: int | None = None, generator: torch.Generator | None = None, cfg: float = 1.5,
        top_k: int = 0, top_p: float = 0.0, more_smooth: bool = False, keep_logits: bool = False,
        kv_cache: KVCache | None = None,
    ) -> VARSample:
        """Scale-by-scale sampling with CFG (``VAR.autoregressive_infer_cfg``).

        ``label_B``: ``(B,)`` class ids, one id for all (negative = unconditional), or None for random
        classes. Randomness comes from ``generator``, else a fresh ``torch.Generator`` on the model's
        device seeded with ``g_seed``, else torch's global RNG. Scale ``k`` of ``K`` mixes the
        conditional and unconditional logits with the official linear ramp
        ``t = cfg * k / (K-1)``: ``(1 + t) cond - t uncond``. ``top_k``/``top_p`` as in
        :func:`sample_top_k_top_p_` (``top_k=1``: greedy). ``more_smooth`` adds Gumbel-softmax soft
        codes (the official visualisation option). The KV cache (``kv_cache``, or a fresh one; the
        model itself keeps no state) is emptied on every exit, normal or not.
        """
        c = self.config
        if vqvae.config.z_channels != c.codebook_dim or vqvae.config.vocab_size != c.vocab_size:
            raise ParameterError(
                f"this VQVAE ({vqvae.config.vocab_size} codes x {vqvae.config.z_channels} channels) does not match the "
                f"transformer ({c.vocab_size} x {c.codebook_dim}); load the VQVAE it was trained with")
        if generator is None and g_seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(int(g_seed))
        label_B = self._labels(label_B, B, generator)
        pn, K = c.patch_nums, len(c.patch_nums)

        cond_BD = self.class_emb(torch.cat((label_B, torch.full_like(label_B, c.num_classes)))).float()  # (2B, C)
        cond = self.modulation(cond_BD)
        lvl_pos_1LC = self.lvl_pos()
        x_BlC = (cond_BD[:, None].expand(2 * B, c.first_l, -1) + self.pos_start.float().expand(2 * B, -1, -1)
                 + lvl_pos_1LC[:, :c.first_l])
        f_hat = cond_BD.new_zeros(B, c.codebook_dim, pn[-1], pn[-1])
        idx: list[torch.Tensor] = []
        logits_raw: list[torch.Tensor] = []
        cur_L = 0
        cache = KVCache(len(self.blocks)) if kv_cache is None else kv_cache
        if len(cache.layers) != len(self.blocks) or not cache.is_empty:
            raise ParameterError(f"kv_cache must be an empty KVCache of {len(self.blocks)} layers")
        try:
            for si, p in enumerate(pn):
                ratio = si / (K - 1)
                cur_L += p * p
                h = x_BlC
                for block, layer_cache in zip(self.blocks, cache.layers):
                    h = block(h, cond, cache=layer_cache)
                logits_2BlV = self.get_logits(h, cond_BD)
                if keep_logits:
                    logits_raw.append(logits_2BlV.clone())
                t = cfg * ratio
                logits_BlV = (1 + t) * logits_2BlV[:B] - t * logits_2BlV[B:]
                idx_Bl = sample_top_k_top_p_(logits_BlV, top_k=top_k, top_p=top_p, generator=generator)
                idx.append(idx_Bl)
                if more_smooth:  # soft codes from the (masked) logits; the official MaskGIT-like temperature
                    tau = max(0.27 * (1 - ratio * 0.95), 0.005)  # decays over scales, floored at 0.005
                    h_BlC = gumbel_softmax(logits_BlV.mul(1 + ratio), tau, generator) @ vqvae.codebook_VC.float()[None]
                else:
                    h_BlC = vqvae.embed(idx_Bl)
                h_BChw = rearrange(h_BlC, "B (h w) C -> B C h w", h=p, w=p)
                f_hat, nxt_BChw = vqvae.next_ar_input(si, pn, f_hat, h_BChw)
                if si != K - 1:
                    nxt = self.word_embed(rearrange(nxt_BChw, "B C h w -> B (h w) C")).float()
                    x_BlC = (nxt + lvl_pos_1LC[:, cur_L:cur_L + pn[si + 1] ** 2]).repeat(2, 1, 1)
        finally:
            cache.clear()
        image01 = vqvae.fhat_to_img(f_hat).add(1).mul(0.5)  # [-1, 1] -> [0, 1]
        return VARSample(image01=image01, f_hat=f_hat, idx=idx, logits_raw=logits_raw)


def block_weights(sd: StateDict, *, depth: int, embed_dim: int, num_heads: int) -> StateDict:
    """The loadable tensors of a VAR-style checkpoint: recomputed buffers dropped, ``zero_k_bias``
    filled in where an export omitted it, ``scale_mul_1H11`` in ``(1, H, 1, 1)`` layout."""
    weights = {k: v for k, v in sd.items() if k not in _NON_WEIGHT_KEYS}
    for i in range(depth):
        weights.setdefault(f"blocks.{i}.attn.zero_k_bias", torch.zeros(embed_dim))
        key = f"blocks.{i}.attn.scale_mul_1H11"
        if key in weights:
            weights[key] = weights[key].reshape(1, num_heads, 1, 1)
    return weights


def build(sd: StateDict, *, operations=None) -> tuple[VARConfig, VAR]:
    """Build and strictly load a :class:`VAR` from an (unwrapped) state dict."""
    from .loading import load_strict

    config = VARConfig.from_state_dict(sd)
    weights = block_weights(sd, depth=config.depth, embed_dim=config.embed_dim, num_heads=config.num_heads)
    with torch.device("meta"):
        model = VAR(config=config, operations=operations)
    load_strict(model, weights, what="VAR transformer")
    return config, model.eval().requires_grad_(False)
