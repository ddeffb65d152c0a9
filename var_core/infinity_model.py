"""Infinity's bitwise text-to-image transformer, and VARestorer's one-step student built on it.

Papers: Han et al., "Infinity: Scaling Bitwise AutoRegressive Modeling for High-Resolution Image
Synthesis" (CVPR 2025); VARestorer (ICLR 2026), which fine-tunes Infinity-2B with LoRA into a
one-step restorer. The format follows ``infinity/models/infinity.py`` (``Infinity``,
``BInfinity``) and ``infinity/models/basic.py`` of EternalEvan/VARestorer (= FoundationVision/
Infinity), so ``infinity_2b_reg.pth`` and ``varestorer.pth`` load with their own key names; the
LoRA adapters of ``varestorer.pth`` are handled by :mod:`.lora`.

The model predicts, for every token of a multi-scale sequence, two logits per bit of the VAE's
``d``-bit code (``V = 2d``). The sequence is ``[sos] + next-scale inputs``: ``sos`` is the text's
attentive-pool vector, the other tokens are VAE latents ``(B, L-1, d)`` projected by ``word_embed``.
Every block is self-attention (cosine attention with 2-D RoPE), cross-attention to the T5
features, and an MLP, each modulated by adaptive LayerNorm from the pooled text.

Shapes: ``B`` batch, ``L`` tokens, ``C`` width, ``H`` heads, ``c`` head dim, ``d`` bits per token,
``N`` packed text tokens of the batch, ``Ct5`` T5 channels. The residual stream is float32 as in
the official code; for half-precision matmuls keep float32 weights under ``torch.autocast``, or
store half weights with casting layers (``comfy.ops.manual_cast``) passed as ``operations``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import lora as lora_lib
from .attention import block_causal_mask
from .checkpoint import StateDict
from .detect import count_indexed
from .errors import CheckpointError, ParameterError
from .infinity_blocks import BlockChunk, CrossAttnBlock, HeadNorm, RMSNorm, TextAttentivePool, TextState
from .rope import ROPE_GRID, ROPE_THETA, rope_table, template_grids

log = logging.getLogger(__name__)

# Keys of official checkpoints that hold no weights (recomputed buffers the official loader drops).
_NON_WEIGHT_KEYS = ("lvl_1L", "attn_bias_for_masking", "Infinity_visible_kvlen", "Infinity_invisible_qlen")


@dataclass(frozen=True, kw_only=True)
class InfinityConfig:
    """Architecture of an Infinity / VARestorer transformer, derived from its weights."""

    depth: int
    embed_dim: int
    num_heads: int  # self- and cross-attention heads (scale_mul_1H11: cosine attention, always)
    mlp_hidden: int
    swiglu: bool  # gated MLP (ffn.fcg) instead of fc1-GELU-fc2
    codebook_dim: int  # d, the VAE bits per token (word_embed input)
    vocab_size: int  # head outputs, 2*d for bit labels
    text_channels: int  # Ct5
    text_maxlen: int  # rows of cfg_uncond
    pool_heads: int  # heads of the text attentive pool (text_proj_for_sos.ca.mat_q)
    block_chunks: int  # 0: flat ``blocks.{i}``; else ``block_chunks.{c}.module.{j}``
    shared_aln: bool  # one shared_ada_lin + per-block ada_gss (vs per-block ada_lin)
    rms_norm: bool  # RMSNorm instead of LayerNorm (ca_norm has no bias)
    input_norm: bool  # norm0_ve before word_embed
    ca_layer_scale: bool  # learnt ca_gamma on the cross-attention branch
    num_levels: int  # rows of lvl_embed (scale-index embedding); 0 = none
    lora_rank: int = 0  # rank of the LoRA adapters (lora_down rows); 0 = plain checkpoint
    lora_targets: tuple[str, ...] = ()  # modules carrying LoRA (full names)
    # Not stored in the weights: the official constants.
    norm_eps: float = 1e-6
    rope_theta: float = ROPE_THETA
    rope_grid: int = ROPE_GRID  # RoPE tables are built on the template's 1M schedule ("star", by_hw=2)
    max_scale_mul: float = math.log(100)  # clamp of the cosine-attention scale (before exp)

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def block_names(self) -> list[str]:
        if not self.block_chunks:
            return [f"blocks.{i}" for i in range(self.depth)]
        per = self.depth // self.block_chunks
        return [f"block_chunks.{i // per}.module.{i % per}" for i in range(self.depth)]

    @classmethod
    def from_state_dict(cls, sd: StateDict) -> "InfinityConfig":
        base, adapters = lora_lib.split_state_dict(sd)
        chunks = count_indexed(base, "block_chunks.")
        if chunks:
            depth = sum(count_indexed(base, f"block_chunks.{c}.module.") for c in range(chunks))
        else:
            depth = count_indexed(base, "blocks.")
        b0 = "block_chunks.0.module.0." if chunks else "blocks.0."
        try:
            embed_dim, d = base["word_embed.weight"].shape
            num_heads = base[b0 + "sa.scale_mul_1H11"].numel() if b0 + "sa.scale_mul_1H11" in base else None
            ffn = base[b0 + "ffn.fc2.weight"].shape[1]
            ct5 = base["text_norm.weight"].shape[0]
            pool_heads = base["text_proj_for_sos.ca.mat_q"].shape[1]
            vocab = base["head.weight"].shape[0]
            maxlen = base["cfg_uncond"].shape[0]
        except KeyError as e:
            raise CheckpointError(
                f"Infinity transformer weights are missing {e.args[0]!r}; the file is incomplete") from None
        if depth == 0:
            raise CheckpointError("Infinity transformer weights hold no blocks (block_chunks.* or blocks.*)")
        if num_heads is None:
            raise CheckpointError("the checkpoint has no sa.scale_mul_1H11: non-cosine attention, whose head count "
                                  "cannot be read from the weights, is not supported")
        if chunks and depth % chunks:
            raise CheckpointError(f"{depth} blocks cannot be split into {chunks} equal block_chunks")
        ranks = {down.shape[0] for down, _ in adapters.values()}
        if len(ranks) > 1:
            raise CheckpointError(f"LoRA adapters of different ranks {sorted(ranks)} are not supported (VARestorer "
                                  "uses one rank for every adapted layer); re-export the student with one rank, e.g. "
                                  "`python -m var_core train distill --lora-rank R` then `train export`, or merge "
                                  "the adapters into the base weights (`train export --merge-lora`)")
        return cls(
            depth=depth, embed_dim=int(embed_dim), num_heads=int(num_heads), mlp_hidden=int(ffn),
            swiglu=b0 + "ffn.fcg.weight" in base, codebook_dim=int(d), vocab_size=int(vocab),
            text_channels=int(ct5), text_maxlen=int(maxlen), pool_heads=int(pool_heads),
            block_chunks=chunks, shared_aln="shared_ada_lin.1.weight" in base,
            rms_norm=b0 + "ca_norm.bias" not in base, input_norm="norm0_ve.weight" in base,
            ca_layer_scale=b0 + "ca_gamma" in base,
            num_levels=int(base["lvl_embed.weight"].shape[0]) if "lvl_embed.weight" in base else 0,
            lora_rank=ranks.pop() if ranks else 0, lora_targets=tuple(sorted(adapters)),
        )


@dataclass(frozen=True)
class TextCondition:
    """Packed T5 features of ``B`` prompts: ``kv_compact`` ``(N, Ct5)``, prompt ``i`` has ``lens[i]`` rows."""

    kv_compact: torch.Tensor
    lens: tuple[int, ...]

    def __post_init__(self):
        object.__setattr__(self, "lens", tuple(int(n) for n in self.lens))
        if self.kv_compact.ndim != 2 or sum(self.lens) != self.kv_compact.shape[0] or min(self.lens, default=0) < 1:
            raise ParameterError(
                f"text features {tuple(self.kv_compact.shape)} do not match prompt lengths {self.lens}")

    @classmethod
    def from_cu_seqlens(cls, kv_compact: torch.Tensor, cu_seqlens: torch.Tensor) -> "TextCondition":
        return cls(kv_compact, tuple(torch.diff(cu_seqlens.long()).tolist()))

    @property
    def batch_size(self) -> int:
        return len(self.lens)

    @property
    def cu_seqlens(self) -> torch.Tensor:
        return F.pad(torch.tensor(self.lens, dtype=torch.int32).cumsum(0, dtype=torch.int32), (1, 0))

    def replaced(self, uncond_LC: torch.Tensor, drop: Sequence[bool]) -> "TextCondition":
        """Prompts with ``drop[i]`` replaced by ``uncond_LC[:lens[i]]`` (classifier-free / cond drop)."""
        parts = list(torch.split(self.kv_compact, self.lens))
        for i, n in enumerate(self.lens):
            if drop[i]:
                parts[i] = uncond_LC[:n].to(self.kv_compact)
        return TextCondition(torch.cat(parts), self.lens)


class Infinity(nn.Module):
    """Infinity / VARestorer transformer, key-compatible with the official checkpoints.

    Runtime switches (attributes, not weights): ``cross_attention_bf16_rounding`` (official
    float32 numerics, see :mod:`.attention`) and ``lora_drops_ca_v_bias`` (the official LoRA path
    leaves ``ca.v_bias`` out where ``ca.mat_kv`` carries LoRA; no effect without LoRA).
    ``forward_logits(..., compile=True)`` runs the block stack through ``torch.compile``, built on
    first use and kept by this instance.
    """

    def __init__(self, *, config: InfinityConfig, operations=None):
        super().__init__()
        ops = operations if operations is not None else nn
        cfg = self.config = config
        C, ct5 = cfg.embed_dim, cfg.text_channels
        self.cross_attention_bf16_rounding = True
        self.lora_drops_ca_v_bias = True
        self.lora_state = "none"  # "adapters" / "merged", kept by var_core.lora
        self._rope_tables: dict = {}
        self._compiled_blocks = None  # torch.compile(Infinity.run_blocks), made on first use

        self.cfg_uncond = nn.Parameter(torch.zeros(cfg.text_maxlen, ct5))
        self.text_norm = RMSNorm(ct5, cfg.norm_eps)
        self.text_proj_for_sos = TextAttentivePool(cfg, ops)
        self.text_proj_for_ca = nn.Sequential(ops.Linear(ct5, C), nn.GELU(approximate="tanh"), ops.Linear(C, C))
        self.pos_start = nn.Parameter(torch.zeros(1, 1, C))
        if cfg.num_levels:
            self.lvl_embed = ops.Embedding(cfg.num_levels, C)
        if cfg.input_norm:
            self.norm0_ve = ops.LayerNorm(cfg.codebook_dim, eps=cfg.norm_eps)
        self.word_embed = ops.Linear(cfg.codebook_dim, C)
        if cfg.shared_aln:
            self.shared_ada_lin = nn.Sequential(nn.SiLU(), ops.Linear(C, 6 * C))
        blocks = [CrossAttnBlock(cfg, ops) for _ in range(cfg.depth)]
        if cfg.block_chunks:
            per = cfg.depth // cfg.block_chunks
            self.block_chunks = nn.ModuleList(BlockChunk(blocks[i:i + per]) for i in range(0, cfg.depth, per))
        else:
            self.blocks = nn.ModuleList(blocks)
        self.head_nm = HeadNorm(cfg, ops)
        self.head = ops.Linear(C, cfg.vocab_size)

    def iter_blocks(self):
        if self.config.block_chunks:
            return (b for chunk in self.block_chunks for b in chunk.module)
        return iter(self.blocks)

    def rope(self, schedule, length: int, device) -> torch.Tensor:
        """``(2, length, c/2)`` RoPE table for the first ``length`` positions of ``schedule``'s template."""
        grids = template_grids(schedule)
        key = (grids, str(device))
        if key not in self._rope_tables:
            self._rope_tables[key] = rope_table(self.config.head_dim, grids, theta=self.config.rope_theta,
                                                grid=self.config.rope_grid).to(device)
        table = self._rope_tables[key]
        if length > table.shape[1]:
            raise ParameterError(f"{length} tokens exceed the {table.shape[1]} RoPE positions of the 1M schedule")
        return table[:, :length]

    def prepare_text(self, text: TextCondition, *, cond_drop: bool | Sequence[bool] = False,
                     bf16_rounding: bool | None = None, drop_v_bias: bool | None = None) -> TextState:
        """Pooled text ``cond_BD`` ``(B, C)``, shared modulation, and projected packed features."""
        if isinstance(cond_drop, bool):
            cond_drop = [cond_drop] * text.batch_size
        if any(cond_drop):
            if max(text.lens) > self.config.text_maxlen:
                raise ParameterError(f"a prompt of {max(text.lens)} tokens is longer than the "
                                     f"{self.config.text_maxlen} rows of cfg_uncond")
            text = text.replaced(self.cfg_uncond, cond_drop)
        bf16 = self.cross_attention_bf16_rounding if bf16_rounding is None else bf16_rounding
        kv_NC = self.text_norm(text.kv_compact.to(self.pos_start.device, torch.float32))
        # The pool's mat_kv never carries LoRA (VARestorer adapts the blocks only): v_bias always applies.
        cond_BD = self.text_proj_for_sos.ca(None, kv_NC, text.lens, bf16_rounding=bf16, drop_v_bias=False)
        cond_BD = cond_BD.squeeze(1).float()
        gss = self.shared_ada_lin(cond_BD).view(-1, 1, 6, self.config.embed_dim) if self.config.shared_aln else None
        return TextState(cond_BD=cond_BD, kv_NC=self.text_proj_for_ca(kv_NC), lens=text.lens, bf16_rounding=bf16,
                         drop_v_bias=self.lora_drops_ca_v_bias if drop_v_bias is None else drop_v_bias, gss=gss)

    def level_ids(self, schedule, length: int, device) -> torch.Tensor:
        """Scale index of each of ``length`` tokens; a repeated last scale (long input) gets index ``n``."""
        lens = [t * h * w for t, h, w in schedule]
        total = sum(lens)
        if length == total + lens[-1]:
            lens = lens + [lens[-1]]
        elif length > total:
            raise ParameterError(f"{length} tokens do not fit the schedule ({total} tokens, or {total + lens[-1]} "
                                 "with the repeated last scale)")
        ids = torch.repeat_interleave(torch.arange(len(lens), device=device), torch.tensor(lens, device=device))
        return ids[:length]

    def embed(self, x_BLd: torch.Tensor, text: TextState, schedule) -> torch.Tensor:
        """``[sos] + word_embed(x)`` with the level embedding: ``(B, 1 + L, C)`` float32."""
        B = x_BLd.shape[0]
        if B != len(text.lens):
            raise ParameterError(f"{B} inputs but {len(text.lens)} prompts")
        x = x_BLd.to(self.pos_start.device, torch.float32)
        if hasattr(self, "norm0_ve"):
            x = self.norm0_ve(x)
        sos = text.cond_BD[:, None].expand(B, 1, -1) + self.pos_start.expand(B, 1, -1)
        x_BLC = torch.cat((sos, self.word_embed(x).float()), dim=1)
        if hasattr(self, "lvl_embed"):  # once, before the first block (add_lvl_embeding_only_first_block=1)
            x_BLC = x_BLC + self.lvl_embed(self.level_ids(schedule, x_BLC.shape[1], x_BLC.device)).float()
        return x_BLC

    def embed_scale(self, x_Bld: torch.Tensor | None, text: TextState, scale_index: int) -> torch.Tensor:
        """The tokens of one scale as the first block takes them: ``(B, l, C)`` float32.

        Scale 0 (``x_Bld`` None) is ``sos``; a later scale is ``word_embed`` of its next-scale
        latent ``(B, l, d)``. Both get the level embedding of ``scale_index``. The same values
        as the matching slice of :meth:`embed` (next-scale sampling runs one scale at a time).
        """
        B = len(text.lens)
        if x_Bld is None:
            x_BlC = text.cond_BD[:, None].expand(B, 1, -1) + self.pos_start.expand(B, 1, -1)
        else:
            if x_Bld.shape[0] != B:
                raise ParameterError(f"{x_Bld.shape[0]} inputs but {B} prompts")
            x = x_Bld.to(self.pos_start.device, torch.float32)
            if hasattr(self, "norm0_ve"):
                x = self.norm0_ve(x)
            x_BlC = self.word_embed(x).float()
        if hasattr(self, "lvl_embed"):
            ids = torch.full(x_BlC.shape[1:2], scale_index, dtype=torch.long, device=x_BlC.device)
            x_BlC = x_BlC + self.lvl_embed(ids).float()
        return x_BlC

    def run_blocks(self, x_BLC: torch.Tensor, cond: torch.Tensor, text: TextState, rope_2Lc: torch.Tensor,
                   attn_mask: torch.Tensor | None) -> torch.Tensor:
        """The block stack, ``(B, L, C)`` -> ``(B, L, C)`` float32 (``cond`` as :class:`CrossAttnBlock` takes it)."""
        for block in self.iter_blocks():
            x_BLC = block(x_BLC, cond, text, rope_2Lc, attn_mask)
        return x_BLC

    def _run_blocks_compiled(self, *args) -> torch.Tensor:
        """:meth:`run_blocks` through ``torch.compile``; if the compiler fails (no C compiler, an
        unsupported operation), a warning is logged and this model runs eagerly from then on."""
        from torch._dynamo.exc import TorchDynamoException  # compiler errors (inductor's included)

        if self._compiled_blocks is None:
            # The unbound function, so that a copy of the model never runs this one's blocks; the
            # emulated casts keep the official bf16 rounding of the cross-attention (attention.py).
            self._compiled_blocks = torch.compile(Infinity.run_blocks, options={"emulate_precision_casts": True})
        try:
            return self._compiled_blocks(self, *args)
        except TorchDynamoException as e:
            log.warning("torch.compile failed, running the transformer without it: %s", str(e).strip().splitlines()[0])
            self._compiled_blocks = Infinity.run_blocks
            return self.run_blocks(*args)

    def get_logits(self, h_BLC: torch.Tensor, cond_BD: torch.Tensor) -> torch.Tensor:
        """Bit logits ``(B, L, V)``, ``V = 2d``: ``[..., 2k + b]`` is the logit of bit ``k`` being ``b``."""
        return self.head(self.head_nm(h_BLC.float(), cond_BD.float())).float()

    def forward_logits(self, x_BLd: torch.Tensor, text: TextCondition | TextState, schedule, *,
                       attn_mask: torch.Tensor | str | None = None, num_logits: int | None = None,
                       cond_drop: bool | Sequence[bool] = False, bf16_rounding: bool | None = None,
                       drop_v_bias: bool | None = None, compile: bool = False) -> torch.Tensor:
        """Logits ``(B, num_logits, V)`` for the sequence ``[sos] + x_BLd`` over ``schedule``.

        ``x_BLd`` ``(B, L-1, d)``: next-scale inputs of scales 1.. (teacher forcing), optionally
        followed by the full last-scale latent (VARestorer's long student input). ``attn_mask``:
        None (full attention, the one-step student), ``"block_causal"`` (teacher forcing), or a
        boolean mask broadcastable to ``(B, H, L, L)``. ``num_logits`` defaults to the schedule's
        token count (the positions that predict a scale). ``compile`` runs the blocks through
        ``torch.compile`` (see :meth:`_run_blocks_compiled`; results equal within float rounding).
        """
        if not isinstance(text, TextState):
            text = self.prepare_text(text, cond_drop=cond_drop, bf16_rounding=bf16_rounding, drop_v_bias=drop_v_bias)
        x_BLC = self.embed(x_BLd, text, schedule)
        L = x_BLC.shape[1]
        if isinstance(attn_mask, str):
            if attn_mask != "block_causal":
                raise ParameterError(f"attn_mask must be None, 'block_causal' or a tensor, got {attn_mask!r}")
            scale_lens = self.level_ids(schedule, L, "cpu").bincount().tolist()
            attn_mask = block_causal_mask(scale_lens, x_BLC.device)
        rope_2Lc = self.rope(schedule, L, x_BLC.device)
        cond = text.gss if text.gss is not None else text.cond_BD
        run = self._run_blocks_compiled if compile else self.run_blocks
        x_BLC = run(x_BLC, cond, text, rope_2Lc, attn_mask)
        n = min(L, sum(t * h * w for t, h, w in schedule)) if num_logits is None else num_logits
        return self.get_logits(x_BLC[:, :n], text.cond_BD)

    def forward(self, x_BLd, text, schedule, **kwargs):
        return self.forward_logits(x_BLd, text, schedule, **kwargs)


def build(sd: StateDict, *, operations=None) -> tuple[InfinityConfig, Infinity]:
    """Build and strictly load an :class:`Infinity` (LoRA adapters as peft layers, unmerged)."""
    from .loading import load_strict

    config = InfinityConfig.from_state_dict(sd)
    base, adapters = lora_lib.split_state_dict(sd)
    base = {k: v for k, v in base.items() if k not in _NON_WEIGHT_KEYS}
    for name in config.block_names:
        key = f"{name}.sa.scale_mul_1H11"
        if key in base:  # customized-flash checkpoints store it as (1, 1, H, 1)
            base[key] = base[key].reshape(1, config.num_heads, 1, 1)
    for name in ["text_proj_for_sos.ca"] + [f"{b}.{m}" for b in config.block_names for m in ("sa", "ca")]:
        base.setdefault(f"{name}.zero_k_bias", torch.zeros(config.embed_dim))  # a buffer some exports omit
    with torch.device("meta"):
        model = Infinity(config=config, operations=operations)
    load_strict(model, base, what="Infinity transformer")
    if adapters:
        lora_lib.apply_lora(model, adapters)
    return config, model.eval().requires_grad_(False)
