"""Multi-scale bitwise spherical quantisation (BSQ) of Infinity's VAE latent.

Paper: Han et al., "Infinity: Scaling Bitwise AutoRegressive Modeling for High-Resolution Image
Synthesis" (CVPR 2025); the quantiser follows ``MultiScaleBSQ``/``BSQ`` in
``infinity/models/bsq_vae/multiscale_bsq.py`` of EternalEvan/VARestorer (= FoundationVision/Infinity).

For each scale ``(1, h, w)`` of a schedule, the residual latent is ``area``-resized to ``h x w``
(the last scale is not resized), L2-normalised over the ``d`` channels, and each channel becomes a
bit ``r > 0``; the code is ``+-1/sqrt(d)``. Codes are ``trilinear``-resized back to the full latent
grid and accumulated into ``f_hat``. Bits are stored MSB-first (``bits[..., 0]`` is channel 0),
which is the order of the official ``lfq.mask`` buffer.

Shapes: ``B`` batch, ``d`` codebook dim (= latent channels), ``H x W`` the latent grid, ``h x w``
one scale's grid. Latents are 5-D ``(B, d, 1, H, W)`` here as in the official code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from einops import rearrange

Schedule = list[tuple[int, int, int]]

INTERP_DOWN = "area"
INTERP_UP = "trilinear"
NEXT_SCALE_MODES = ("area", "trilinear")


def resize(x_Bd1hw: torch.Tensor, size: tuple[int, int, int], mode: str) -> torch.Tensor:
    """Resize a ``(B, d, 1, h, w)`` latent to ``size``; no-op when the size already matches."""
    if tuple(x_Bd1hw.shape[-3:]) == tuple(size):
        return x_Bd1hw
    return F.interpolate(x_Bd1hw, size=tuple(size), mode=mode).contiguous()


def quantize(r_Bd1hw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """BSQ of one scale: ``(codes_Bd1hw, bits_Bhwd)``; codes are ``+-1/sqrt(d)``, bits uint8."""
    d = r_Bd1hw.shape[1]
    bits_B1hwd = F.normalize(rearrange(r_Bd1hw.float(), "B d t h w -> B t h w d"), dim=-1) > 0
    bits_Bhwd = bits_B1hwd[:, 0].to(torch.uint8)
    return bits_to_codes(bits_Bhwd, d), bits_Bhwd


def bits_to_codes(bits_Bhwd: torch.Tensor, d: int | None = None) -> torch.Tensor:
    """Bits ``(B, h, w, d)`` (0/1, MSB-first) -> codes ``(B, d, 1, h, w)`` of value ``+-1/sqrt(d)``."""
    d = bits_Bhwd.shape[-1] if d is None else d
    scale = 1.0 / math.sqrt(d)
    codes_Bhwd = bits_Bhwd.float() * (2 * scale) - scale
    return rearrange(codes_Bhwd, "B h w d -> B d 1 h w").contiguous()


def bits_to_index(bits_Bhwd: torch.Tensor) -> torch.Tensor:
    """MSB-first bits ``(..., d)`` -> integer token index ``(...)`` (int64; d <= 63)."""
    d = bits_Bhwd.shape[-1]
    weights = 2 ** torch.arange(d - 1, -1, -1, device=bits_Bhwd.device, dtype=torch.int64)
    return (bits_Bhwd.long() * weights).sum(-1)


def index_to_bits(index: torch.Tensor, d: int) -> torch.Tensor:
    """Integer token index ``(...)`` -> MSB-first bits ``(..., d)`` (uint8)."""
    weights = 2 ** torch.arange(d - 1, -1, -1, device=index.device, dtype=torch.int64)
    return ((index.long()[..., None] & weights) != 0).to(torch.uint8)


@dataclass
class PyramidEncoding:
    """Result of :func:`encode_pyramid` for a batch.

    ``bits[i]`` is ``(B, h_i, w_i, d)`` uint8; ``z`` the final ``f_hat`` ``(B, d, H, W)``.
    The per-scale lists ``quant_in``, ``quant_out`` (both ``(B, d, 1, h_i, w_i)``), ``fhat``
    (``(B, d, 1, H, W)``) and ``var_inputs`` (``(B, d, 1, h_{i+1}, w_{i+1})``) are filled only
    when intermediates were asked for.
    """

    schedule: Schedule
    bits: list[torch.Tensor]
    z: torch.Tensor
    quant_in: list[torch.Tensor] = field(default_factory=list)
    quant_out: list[torch.Tensor] = field(default_factory=list)
    fhat: list[torch.Tensor] = field(default_factory=list)
    var_inputs: list[torch.Tensor] = field(default_factory=list)


def encode_pyramid(f_BdHW: torch.Tensor, schedule: Schedule, *, intermediates: bool = False) -> PyramidEncoding:
    """Residual-quantise a latent ``(B, d, H, W)`` over ``schedule`` (the quantiser's forward)."""
    f_Bd1HW = f_BdHW.float().unsqueeze(2)
    full = tuple(f_Bd1HW.shape[-3:])
    residual = f_Bd1HW
    fhat = torch.zeros_like(f_Bd1HW)
    out = PyramidEncoding(schedule=[tuple(s) for s in schedule], bits=[], z=fhat)
    for si, size in enumerate(schedule):
        r = resize(residual, size, INTERP_DOWN)
        codes, bits = quantize(r)
        up = resize(codes, full, INTERP_UP)
        residual = residual - up
        fhat = fhat + up
        out.bits.append(bits)
        if intermediates:
            out.quant_in.append(r)
            out.quant_out.append(codes)
            out.fhat.append(fhat)
            if si + 1 < len(schedule):
                out.var_inputs.append(resize(fhat, schedule[si + 1], INTERP_DOWN))
    out.z = fhat.squeeze(2)
    return out


def summed_codes(bits: list[torch.Tensor], schedule: Schedule) -> torch.Tensor:
    """Sum of every scale's codes, each ``trilinear``-resized to the last scale: ``(B, d, 1, H, W)``."""
    full = tuple(schedule[-1])
    total = 0
    for b in bits:
        total = total + F.interpolate(bits_to_codes(b), size=full, mode=INTERP_UP)
    return total


def next_scale_inputs(bits: list[torch.Tensor], schedule: Schedule, mode: str = "area") -> list[torch.Tensor]:
    """Transformer inputs for scales ``1..n-1`` from the bits of scales ``0..n-2``.

    The cumulative ``f_hat`` after scale ``i`` is resized to scale ``i+1`` with ``mode``:
    ``'area'`` as VARestorer's sampler does, ``'trilinear'`` as Infinity's sampler and training do.
    Returns ``(B, h_{i+1} * w_{i+1}, d)`` tensors.
    """
    if mode not in NEXT_SCALE_MODES:
        raise ValueError(f"next-scale mode must be one of {NEXT_SCALE_MODES}, got {mode!r}")
    full = tuple(schedule[-1])
    fhat = 0
    out = []
    for si in range(len(schedule) - 1):
        fhat = fhat + resize(bits_to_codes(bits[si]), full, INTERP_UP)
        x = F.interpolate(fhat, size=tuple(schedule[si + 1]), mode=mode)
        out.append(rearrange(x, "B d 1 h w -> B (h w) d"))
    return out
