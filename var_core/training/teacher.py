"""``train teacher``: train the iterative Infinity transformer (VARestorer's teacher) from scratch.

Paper: Han et al., "Infinity: Scaling Bitwise AutoRegressive Modeling for High-Resolution Image
Synthesis" (CVPR 2025). The architecture is :class:`~var_core.infinity_model.Infinity` in the
layout of Infinity-2B (shared adaptive LayerNorm, LayerNorm, GELU MLP, 15 level embeddings, an
attentive text pool with one head per 128 text channels), sized by flags (:func:`infinity_config`).

Training is next-scale prediction with teacher forcing, as Infinity trains: the frozen VAE turns a
high-quality crop into its bits on the crop's fixed scale schedule; the transformer input is
``[sos] +`` the ``trilinear`` next-scale latents of scales 1.. (:func:`var_core.bsq_quant.next_scale_inputs`),
attended under the block-causal mask; the loss is the cross-entropy of every bit of every scale
(two logits per bit). ``--scale-weighting tokens`` averages over all tokens (fine scales dominate,
as Infinity's default); ``scales`` gives each scale the same weight. The text is the model's own
unconditional embedding (the first row of ``cfg_uncond``, learnt here): no captions, no T5.

Output ``teacher.safetensors``: the state dict under the official key names (flat ``blocks.{i}``),
which ``var_core.load`` detects as the Infinity transformer.

Shapes: ``B`` batch, ``L`` tokens of the schedule, ``d`` bits per token, ``V = 2d``.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from safetensors.torch import save_file
from torch import nn

from .. import bsq_quant, text as text_lib
from ..bsq_vae import BSQVAE
from ..checkpoint import StateDict
from ..detect import Family
from ..errors import ParameterError
from ..infinity_model import Infinity, InfinityConfig
from ..loading import load
from . import common

log = logging.getLogger(__name__)

MODEL_FILE = "teacher.safetensors"
SCALE_WEIGHTINGS = ("tokens", "scales")
NUM_LEVELS = 15  # rows of the official lvl_embed
POOL_HEAD_DIM = 128  # the official text pool has one head per 128 text channels


def infinity_config(*, depth: int, width: int, heads: int, codebook_dim: int, mlp_ratio: float = 4.0,
                    text_channels: int = 64, text_maxlen: int = 8) -> InfinityConfig:
    """An Infinity-2B-style :class:`InfinityConfig` of the given size."""
    if depth < 1 or heads < 1 or width % heads:
        raise ParameterError(f"--width {width} must be divisible by --heads {heads} (both positive), --depth >= 1")
    if (width // heads) % 4:
        raise ParameterError(f"the head dim --width/--heads = {width // heads} must be a multiple of 4 (2-D RoPE)")
    pool_heads = max(1, text_channels // POOL_HEAD_DIM)
    if text_channels < 1 or text_maxlen < 1 or width % pool_heads:
        raise ParameterError(f"--text-channels {text_channels} / --text-maxlen {text_maxlen} must be positive and "
                             f"the width divisible by the {pool_heads} text-pool heads")
    return InfinityConfig(depth=depth, embed_dim=width, num_heads=heads, mlp_hidden=round(width * mlp_ratio),
                          swiglu=False, codebook_dim=codebook_dim, vocab_size=2 * codebook_dim,
                          text_channels=text_channels, text_maxlen=text_maxlen, pool_heads=pool_heads, block_chunks=0,
                          shared_aln=True, rms_norm=False, input_norm=False, ca_layer_scale=False,
                          num_levels=NUM_LEVELS)


@torch.no_grad()
def init_weights(model: Infinity) -> Infinity:
    """Initialise a freshly built model (after Infinity's ``init_weights``, simplified): linears and
    embeddings N(0, 0.02) (residual projections scaled by ``1/sqrt(2 depth)``), zero biases,
    cosine-attention scale 4, the adaptive-norm gates open (gamma 1) with zero modulation, and
    unit-variance unconditional text rows; in place."""
    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            std = 0.02 / math.sqrt(2 * model.config.depth) if name.endswith(("sa.proj", "ca.proj", "ffn.fc2")) else 0.02
            nn.init.trunc_normal_(m.weight, std=std, a=-2 * std, b=2 * std)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
    for modulation in (model.shared_ada_lin[-1], model.head_nm.ada_lin[-1]):
        nn.init.zeros_(modulation.weight)
    nn.init.normal_(model.pos_start, std=0.02)
    nn.init.normal_(model.cfg_uncond, std=model.config.text_channels ** -0.5)
    for block in model.iter_blocks():
        block.sa.scale_mul_1H11.fill_(math.log(4.0))
        block.sa.q_bias.zero_()
        block.sa.v_bias.zero_()
        block.ca.v_bias.zero_()
        block.ada_gss.zero_()
        block.ada_gss[:, :, :2] = 1.0  # gamma1, gamma2
    return model


def scale_weights(schedule, mode: str, device=None) -> torch.Tensor:
    """Per-token weights ``(L,)`` summing to 1: uniform over tokens, or each scale 1/n in all."""
    if mode not in SCALE_WEIGHTINGS:
        raise ParameterError(f"scale weighting must be one of {SCALE_WEIGHTINGS}, got {mode!r}")
    lens = torch.tensor([t * h * w for t, h, w in schedule], dtype=torch.float32)
    per_scale = lens / lens.sum() if mode == "tokens" else torch.full_like(lens, 1 / len(lens))
    return torch.repeat_interleave(per_scale / lens, lens.long()).to(device)


def flat_bits(bits: list[torch.Tensor]) -> torch.Tensor:
    """Per-scale bits ``(B, h, w, d)`` -> ``(B, L, d)`` in sequence order."""
    return torch.cat([rearrange(b, "B h w d -> B (h w) d") for b in bits], dim=1)


def bit_pairs(logits_BLV: torch.Tensor) -> torch.Tensor:
    """Logits ``(B, L, 2d)`` -> ``(B, L, d, 2)`` float32 (``[..., b]``: the logit of the bit being ``b``)."""
    return rearrange(logits_BLV.float(), "B L (d two) -> B L d two", two=2)


def unconditional_text(model: Infinity, batch: int) -> text_lib.TextCondition:
    """The model's unconditional text (first row of ``cfg_uncond``) for ``batch`` images (differentiable)."""
    return text_lib.unconditional(model.cfg_uncond, batch=batch)


def teacher_forced_logits(model: Infinity, bits: list[torch.Tensor], schedule) -> torch.Tensor:
    """Logits ``(B, L, 2d)`` of every scale given the bits of the earlier ones: the ``trilinear``
    next-scale inputs under the block-causal mask, with the unconditional text."""
    x_BLd = torch.cat(bsq_quant.next_scale_inputs(bits, schedule, mode="trilinear"), dim=1)
    text = unconditional_text(model, x_BLd.shape[0])
    return model.forward_logits(x_BLd, text, schedule, attn_mask="block_causal")


def frozen_vae(path: str) -> BSQVAE:
    """The Infinity BSQ VAE of ``path`` (any file ``var_core.load`` reads), frozen."""
    return load(path, expect=Family.INFINITY_BSQ_VAE).model.float().eval().requires_grad_(False)


class TeacherTask(common.TrainTask):
    """Bitwise cross-entropy of the teacher-forced transformer on the bits of ``batch["hq"]``."""

    name = "teacher"

    def __init__(self, model: Infinity, vae: BSQVAE, schedule, *, scale_weighting: str = "tokens"):
        super().__init__()
        if model.config.codebook_dim != vae.codebook_dim:
            raise ParameterError(f"the transformer takes {model.config.codebook_dim}-bit tokens but the VAE makes "
                                 f"{vae.codebook_dim}-bit ones")
        self.model, self.vae = model, vae
        self.schedule = [tuple(s) for s in schedule]
        self.register_buffer("weights_L", scale_weights(self.schedule, scale_weighting), persistent=False)

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            bits = self.vae.encode(batch["hq"], self.schedule).bits
        pairs = bit_pairs(teacher_forced_logits(self.model, bits, self.schedule))
        target = flat_bits(bits).long()
        ce_BLd = F.cross_entropy(rearrange(pairs, "B L d two -> B two L d"), target, reduction="none")
        loss = (ce_BLd.mean(-1) * self.weights_L).sum(-1).mean()
        acc = (pairs.argmax(-1) == target).float().mean()
        return {"loss": loss, "acc": acc}

    def trainable_state(self) -> StateDict:
        return {k: v.detach().cpu() for k, v in self.model.state_dict().items()}

    def load_trainable_state(self, sd: StateDict) -> None:
        self.model.load_state_dict(sd)

    def save_model(self, out_dir: Path) -> list[Path]:
        path = out_dir / MODEL_FILE
        save_file({k: v.detach().float().cpu().contiguous() for k, v in self.model.state_dict().items()}, path)
        return [path]


def run(args) -> int:
    """``train teacher`` (arguments: :mod:`.cli`)."""

    def build() -> TeacherTask:
        vae = frozen_vae(args.vae)
        config = infinity_config(depth=args.depth, width=args.width, heads=args.heads, codebook_dim=vae.codebook_dim,
                                 mlp_ratio=args.mlp_ratio, text_channels=args.text_channels,
                                 text_maxlen=args.text_maxlen)
        schedule = common.crop_schedule(args.size)
        torch.manual_seed(args.seed)
        model = init_weights(Infinity(config=config))
        n = sum(p.numel() for p in model.parameters())
        log.info("teacher: %.2fM parameters (%.1f MB in float32), %d scales up to %dx%d (%d tokens)", n / 1e6,
                 n * 4 / 2**20, len(schedule), *schedule[-1][1:], sum(h * w for _, h, w in schedule))
        return TeacherTask(model, vae, schedule, scale_weighting=args.scale_weighting)

    return common.run_stage(args, build, what="teacher", model_file=MODEL_FILE)
