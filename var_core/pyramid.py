"""Pyramid tokens: an image encoded by the BSQ VAE into per-scale bits over a scale schedule.

This is what VARestorer conditions its one-step student on (the LQ image's token pyramid) and
what the iterative samplers produce. A :class:`Pyramid` is what the ComfyUI ``VAR_PYRAMID``
type carries between nodes.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from .bsq_vae import BSQVAE
from .errors import ImageInputError
from .schedules import VAE_STRIDE, fit_schedule, schedule_pixels, validate_schedule

Schedule = list[tuple[int, int, int]]


@dataclass(frozen=True)
class Pyramid:
    """Per-scale bits of a batch: ``bits[i]`` is ``(B, h_i, w_i, d)`` uint8 for ``schedule[i]``.

    ``image_size`` is the ``(H, W)`` of the encoded image before it was fitted to the schedule;
    decoding resizes back to it. ``alpha`` is an optional ``(B, H, W, 1)`` channel passed through.
    """

    schedule: Schedule
    bits: list[torch.Tensor]
    image_size: tuple[int, int]
    alpha: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return self.bits[0].shape[0]

    @property
    def codebook_dim(self) -> int:
        return self.bits[0].shape[-1]

    @property
    def fitted_size(self) -> tuple[int, int]:
        return schedule_pixels(self.schedule)

    def to(self, device) -> "Pyramid":
        return replace(self, bits=[b.to(device) for b in self.bits])


def model_device(module: torch.nn.Module) -> torch.device:
    """Where ``module`` computes by default: the device of its first parameter."""
    return next(module.parameters()).device


def encode_image(vae: BSQVAE, x_B3HW: torch.Tensor, *, schedule: Schedule | None = None,
                 alpha: torch.Tensor | None = None, device: torch.device | None = None) -> Pyramid:
    """Encode images in [-1, 1] into a :class:`Pyramid`.

    Without a ``schedule`` the image's own latent grid is used when it lies on an Infinity
    template, else the image is resized (bicubic, antialiased) to the nearest template size.
    """
    if x_B3HW.ndim != 4 or x_B3HW.shape[1] != 3:
        raise ImageInputError(f"expected (B, 3, H, W) images, got {tuple(x_B3HW.shape)}")
    h, w = x_B3HW.shape[-2:]
    if h < VAE_STRIDE or w < VAE_STRIDE:
        raise ImageInputError(
            f"image is {h}x{w} pixels, smaller than one {VAE_STRIDE}x{VAE_STRIDE} latent patch; "
            "upscale it first (e.g. with an Upscale Image node)"
        )
    schedule = fit_schedule(h, w) if schedule is None else validate_schedule(schedule)
    th, tw = schedule_pixels(schedule)
    x = x_B3HW.to(device=device or model_device(vae), dtype=torch.float32)
    if (th, tw) != (h, w):
        x = F.interpolate(x, size=(th, tw), mode="bicubic", align_corners=False, antialias=True).clamp(-1, 1)
    enc = vae.encode(x, schedule)
    return Pyramid(schedule=enc.schedule, bits=enc.bits, image_size=(int(h), int(w)), alpha=alpha)


def decode_pyramid(vae: BSQVAE, pyramid: Pyramid, *, restore_size: bool = True,
                   device: torch.device | None = None) -> torch.Tensor:
    """Decode a :class:`Pyramid` to images in [-1, 1], resized back to ``image_size``."""
    device = device or model_device(vae)
    if pyramid.codebook_dim != vae.codebook_dim:
        raise ImageInputError(
            f"the pyramid has {pyramid.codebook_dim}-bit tokens but this VAE uses {vae.codebook_dim} bits; "
            "decode with the VAE that encoded it"
        )
    _, x = vae.decode_bits([b.to(device) for b in pyramid.bits], pyramid.schedule)
    if restore_size and tuple(x.shape[-2:]) != tuple(pyramid.image_size):
        x = F.interpolate(x.float(), size=pyramid.image_size, mode="bicubic", align_corners=False, antialias=True)
    return x.float().clamp(-1, 1)
