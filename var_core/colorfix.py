"""Colour correction of a restored image towards the low-quality input's colours.

* ``adain``: per-channel mean and standard deviation matched to the reference (Huang & Belongie,
  "Arbitrary Style Transfer ... Adaptive Instance Normalization", ICCV 2017).
* ``wavelet``: the restored image's high frequencies over the reference's low frequencies, from a
  5-level a-trous (dilated binomial) wavelet decomposition, as popularised by StableSR.

Images are ``(B, C, H, W)``; the reference is resized to the image size first.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .errors import ParameterError

MODES = ("none", "wavelet", "adain")


def _match_size(ref: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    if ref.shape[-2:] != x.shape[-2:]:
        ref = F.interpolate(ref.float(), size=x.shape[-2:], mode="bicubic", align_corners=False)
    return ref.to(x)


def adain(x: torch.Tensor, ref: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    ref = _match_size(ref, x)
    mx, sx = x.mean((2, 3), keepdim=True), x.std((2, 3), keepdim=True)
    mr, sr = ref.mean((2, 3), keepdim=True), ref.std((2, 3), keepdim=True)
    return (x - mx) / (sx + eps) * sr + mr


def _low_pass(x: torch.Tensor, levels: int = 5) -> torch.Tensor:
    k1 = torch.tensor([0.25, 0.5, 0.25], device=x.device, dtype=x.dtype)
    kernel = (k1[:, None] * k1[None, :]).expand(x.shape[1], 1, 3, 3)
    for i in range(levels):
        d = 2**i
        pad = min(d, x.shape[-2] - 1, x.shape[-1] - 1)
        if pad < d:  # image smaller than the dilation: stop refining
            break
        x = F.conv2d(F.pad(x, (d, d, d, d), mode="replicate"), kernel, dilation=d, groups=x.shape[1])
    return x


def wavelet(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    ref = _match_size(ref, x)
    return x - _low_pass(x) + _low_pass(ref)


def color_fix(x: torch.Tensor, ref: torch.Tensor, mode: str) -> torch.Tensor:
    """Apply colour fix ``mode`` (one of :data:`MODES`) to ``x`` towards ``ref``."""
    if mode == "none":
        return x
    if mode == "wavelet":
        return wavelet(x, ref)
    if mode == "adain":
        return adain(x, ref)
    raise ParameterError(f"unknown colour fix {mode!r}; use one of {MODES}")
