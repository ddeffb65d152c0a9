"""Pyramid tokens: an image encoded by the BSQ VAE into per-scale bits over a scale schedule.

This is what VARestorer conditions its one-step student on (the LQ image's token pyramid) and
what the iterative samplers produce. A :class:`Pyramid` is what the ComfyUI ``VAR_PYRAMID``
type carries between nodes.

:func:`progressive_decode` shows next-scale prediction at work (as the VAR and Infinity papers
picture it): the image decoded from the codes of the first 1, 2, ... scales summed at the finest
grid, from a blur of colour to the full image; :func:`frame_grid` lays such frames out in one image.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from einops import rearrange

from .bsq_quant import INTERP_UP, bits_to_codes
from .bsq_vae import BSQVAE
from .errors import ImageInputError, ParameterError
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
    template, else the image is resized (bicubic, antialiased) to the smallest size of the template
    nearest its aspect ratio that covers it (:func:`.schedules.fit_schedule`).
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


def progressive_decode(vae: BSQVAE, pyramid: Pyramid, *, restore_size: bool = True,
                       device: torch.device | None = None,
                       progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """Decode the image as it stands after each scale: ``(B, S, 3, H, W)`` in [-1, 1], S = scales.

    Frame ``k`` (0-based) decodes the codes of scales ``0..k``, each upsampled (trilinear) to the
    last scale's grid and summed, as the VAE decodes a whole pyramid; so the last frame is
    :func:`decode_pyramid`'s image. With ``restore_size`` every frame is resized to the pyramid's
    ``image_size`` as :func:`decode_pyramid` does, else it stays at ``fitted_size``.
    ``progress(done, S)`` runs after each frame. The alpha channel is not part of the frames.
    """
    device = device or model_device(vae)
    if pyramid.codebook_dim != vae.codebook_dim:
        raise ImageInputError(
            f"the pyramid has {pyramid.codebook_dim}-bit tokens but this VAE uses {vae.codebook_dim} bits; "
            "preview it with the VAE that encoded it"
        )
    schedule = validate_schedule(pyramid.schedule)
    if len(pyramid.bits) != len(schedule):
        raise ImageInputError(f"got bits for {len(pyramid.bits)} scales but the schedule has {len(schedule)}")
    full = tuple(schedule[-1])
    codes_Bd1HW = 0
    frames = []
    for k, bits_Bhwd in enumerate(pyramid.bits):
        # Summed in the order of bsq_quant.summed_codes: the last frame equals decode_pyramid's image.
        codes_Bd1HW = codes_Bd1HW + F.interpolate(bits_to_codes(bits_Bhwd.to(device)), size=full, mode=INTERP_UP)
        x_B3HW = vae.decode(codes_Bd1HW)
        if restore_size and tuple(x_B3HW.shape[-2:]) != tuple(pyramid.image_size):
            x_B3HW = F.interpolate(x_B3HW.float(), size=pyramid.image_size, mode="bicubic", align_corners=False,
                                   antialias=True)
        frames.append(x_B3HW.float().clamp(-1, 1))
        if progress:
            progress(k + 1, len(schedule))
    return torch.stack(frames, dim=1)


def auto_columns(images: int, scales: int) -> int:
    """Grid columns for the frames of ``images`` pyramids of ``scales`` scales (image-major): one
    row per image for a batch, a near-square grid for a single image."""
    return scales if images > 1 else math.ceil(math.sqrt(scales))


def frame_grid(frames_NHWC: torch.Tensor, columns: int) -> torch.Tensor:
    """Tile ``N`` equally sized frames ``(N, H, W, C)`` row by row into one ``(1, rows*H, cols*W, C)``
    image, ``columns`` wide (at most ``N``); cells past the last frame are black."""
    n = frames_NHWC.shape[0]
    if n == 0:
        raise ImageInputError("a grid needs at least one frame")
    if columns < 1:
        raise ParameterError(f"a grid needs at least one column, got {columns}")
    cols = min(columns, n)
    rows = math.ceil(n / cols)
    pad = frames_NHWC.new_zeros((rows * cols - n, *frames_NHWC.shape[1:]))
    cells = torch.cat([frames_NHWC, pad], dim=0)
    return rearrange(cells, "(r c) H W C -> 1 (r H) (c W) C", r=rows, c=cols)
