"""VARestorer's one-step student: LQ token pyramid in, restored bits of every scale out in one pass.

VARestorer (ICLR 2026) distils Infinity (CVPR 2025) into a single forward pass: the LQ image (after
the SwinIR pre-cleaner) is encoded by the BSQ VAE; its next-scale inputs are built as in training
(``BitwiseSelfCorrection.long_flip_requant`` of ``infinity/models/bitwise_self_correction.py`` in
EternalEvan/VARestorer, without bit flips) and the transformer attends over all of them at once
(no causal mask). The bits of every scale are then drawn from the logits with Gumbel-argmax at
temperature 0.5 (``GumbelArgmax`` of ``infinity/models/infinity.py``) and decoded by the VAE.

Shapes: ``B`` batch, ``L`` tokens, ``d`` bits per token; bits are ``(B, h, w, d)`` MSB-first.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange

from . import bsq_quant
from .bsq_vae import BSQVAE
from .errors import ParameterError
from .infinity_model import Infinity, TextCondition

REQUANT_MODES = ("long", "flip")
GUMBEL_EPS = 1e-20  # official constant of GumbelArgmax


def student_inputs(bits: list[torch.Tensor], schedule, *, requant: str = "long",
                   interp: str = "trilinear") -> torch.Tensor:
    """Transformer input ``(B, L, d)`` from the LQ bits of every scale.

    ``'flip'``: the next-scale inputs of scales 1..n-1 (``interp``-resized cumulative codes, as in
    training); ``'long'`` (VARestorer's student): the same followed by the full last-scale latent.
    """
    if requant not in REQUANT_MODES:
        raise ParameterError(f"requant mode must be one of {REQUANT_MODES}, got {requant!r}")
    parts = bsq_quant.next_scale_inputs(bits, schedule, mode=interp)
    if requant == "long":
        parts.append(rearrange(bsq_quant.summed_codes(bits, schedule), "B d 1 h w -> B (h w) d"))
    return torch.cat(parts, dim=1)


def split_scales(x_BL_: torch.Tensor, schedule) -> list[torch.Tensor]:
    """Split the first ``sum(h*w)`` tokens of ``(B, L, ...)`` per scale."""
    lens = [t * h * w for t, h, w in schedule]
    return list(torch.split(x_BL_[:, : sum(lens)], lens, dim=1))


def argmax_bits(logits_BLV: torch.Tensor) -> torch.Tensor:
    """Noise-free bits ``(B, L, d)`` uint8: bit k is 1 iff its logit for 1 beats its logit for 0."""
    pair = rearrange(logits_BLV, "B L (d two) -> B L d two", two=2)
    return (pair[..., 1] > pair[..., 0]).to(torch.uint8)


def gumbel_bits(logits_BLV: torch.Tensor, tau: float, *, generator: torch.Generator | None = None,
                uniforms: torch.Tensor | None = None) -> torch.Tensor:
    """Gumbel-argmax bits ``(B, L, d)`` uint8 at temperature ``tau``.

    The noise is ``-log(-log(U + eps) + eps)`` from uniforms ``U`` shaped ``(B, L*d, 2)`` (the
    official draw order), either given or drawn with ``generator``. Each bit is the argmax of
    ``softmax((logit + noise) / tau)`` over its two classes.
    """
    B, L, V = logits_BLV.shape
    pair = logits_BLV.float().reshape(B, L * V // 2, 2)
    if uniforms is None:
        uniforms = torch.rand(pair.shape, generator=generator, device=generator.device if generator else pair.device)
    if uniforms.shape != pair.shape:
        raise ParameterError(f"Gumbel uniforms must be {tuple(pair.shape)}, got {tuple(uniforms.shape)}")
    noise = -torch.log(-torch.log(uniforms.to(pair) + GUMBEL_EPS) + GUMBEL_EPS)
    bits = F.softmax((pair + noise) / tau, dim=-1).argmax(-1)
    return bits.reshape(B, L, V // 2).to(torch.uint8)


def check_vae(model: Infinity, vae: BSQVAE) -> None:
    """Refuse a VAE whose tokens have another bit width than the transformer reads."""
    if vae.codebook_dim != model.config.codebook_dim:
        raise ParameterError(
            f"the VAE has {vae.codebook_dim}-bit tokens but the transformer reads {model.config.codebook_dim}-bit "
            "tokens; use the VAE that belongs to the model (infinity_vae_d32reg.pth for varestorer.pth and "
            "infinity_2b_reg.pth)"
        )


@dataclass
class StudentResult:
    """``logits`` ``(B, sum(h*w), 2d)``; ``bits[i]`` ``(B, h_i, w_i, d)``; ``codes`` ``(B, d, 1, H, W)``;
    ``image`` ``(B, 3, 16H, 16W)`` in [-1, 1] (None unless decoded)."""

    logits: torch.Tensor
    bits: list[torch.Tensor]
    codes: torch.Tensor
    image: torch.Tensor | None = None


def restore(model: Infinity, vae: BSQVAE, lq_B3HW: torch.Tensor, text: TextCondition, schedule, **kwargs) -> StudentResult:
    """One-step restoration of ``lq`` (in [-1, 1], sized to ``schedule``) as ``tools/run_varestorer.py``;
    keyword arguments as :func:`restore_bits`."""
    return restore_bits(model, vae, vae.encode(lq_B3HW, schedule).bits, text, schedule, device=lq_B3HW.device,
                        **kwargs)


def restore_bits(model: Infinity, vae: BSQVAE, lq_bits: list[torch.Tensor], text: TextCondition, schedule, *,
                 tau: float = 0.5, generator: torch.Generator | list[torch.Generator] | None = None,
                 sample: bool = True, cond_drop: bool = False, decode: bool = True,
                 device: torch.device | None = None, compile: bool = False) -> StudentResult:
    """One-step restoration from the LQ token pyramid ``lq_bits`` (``(B, h, w, d)`` per scale), computed
    on ``device`` (default: the device of the model's first parameter).

    ``sample=False`` takes the noise-free argmax bits instead of the Gumbel draw. ``generator``
    may be a list with one generator per image, so that an image's noise does not depend on
    the batch it is in. ``compile`` runs the transformer through ``torch.compile``
    (:meth:`.Infinity.forward_logits`).
    """
    check_vae(model, vae)
    device = device or next(model.parameters()).device
    x_BLd = student_inputs([b.to(device) for b in lq_bits], schedule)
    logits = model.forward_logits(x_BLd, text, schedule, cond_drop=cond_drop, compile=compile)
    bits = []
    for (_, h, w), logits_s in zip(schedule, split_scales(logits, schedule)):
        if not sample:
            b = argmax_bits(logits_s)
        elif isinstance(generator, (list, tuple)):
            b = torch.cat([gumbel_bits(logits_s[i : i + 1], tau, generator=g) for i, g in enumerate(generator)])
        else:
            b = gumbel_bits(logits_s, tau, generator=generator)
        bits.append(rearrange(b, "B (h w) d -> B h w d", h=h, w=w))
    codes = bsq_quant.summed_codes(bits, schedule)
    return StudentResult(logits=logits, bits=bits, codes=codes, image=vae.decode(codes) if decode else None)
