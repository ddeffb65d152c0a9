"""Image conversions between ComfyUI's ``IMAGE`` convention and the models' tensors.

ComfyUI images are ``(B, H, W, C)`` float in ``[0, 1]``; the VAR models take ``(B, 3, H, W)`` in
``[-1, 1]``. Grayscale inputs are expanded to RGB; an alpha channel is split off, kept aside and
merged back (resized) after restoration.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange

from .errors import ImageInputError


def split_alpha(image_BHWC: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Validate an IMAGE and return ``(rgb_BHW3 float32 in [0,1], alpha_BHW1 or None)``."""
    if not isinstance(image_BHWC, torch.Tensor):
        raise ImageInputError(f"expected an image tensor, got {type(image_BHWC).__name__}")
    if image_BHWC.ndim == 3:
        image_BHWC = image_BHWC[None]
    if image_BHWC.ndim != 4:
        raise ImageInputError(f"an IMAGE is (batch, height, width, channels); got shape {tuple(image_BHWC.shape)}")
    b, h, w, c = image_BHWC.shape
    if b == 0:
        raise ImageInputError("the image batch is empty; connect a node that outputs at least one image")
    if h == 0 or w == 0:
        raise ImageInputError(f"the image has no pixels ({h}x{w})")
    if c not in (1, 2, 3, 4):
        raise ImageInputError(
            f"the image has {c} channels; expected 1 (gray), 2 (gray+alpha), 3 (RGB) or 4 (RGBA). "
            "Is a mask or a latent connected instead of an image?"
        )
    if image_BHWC.is_complex():
        raise ImageInputError(f"the image tensor is complex ({image_BHWC.dtype}); an IMAGE holds real values in [0, 1]")
    if image_BHWC.dtype == torch.bool:  # a mask-like image: True is white
        image_BHWC = image_BHWC.float()
    elif not image_BHWC.is_floating_point():
        # Integer images: 8-bit, else 16-bit full range.
        image_BHWC = image_BHWC.float() / (255 if image_BHWC.dtype == torch.uint8 else 65535)
    image_BHWC = image_BHWC.float()
    if not torch.isfinite(image_BHWC).all():
        raise ImageInputError("the image contains NaN or Inf values; check the node that produced it")
    image_BHWC = image_BHWC.clamp(0, 1)
    alpha = image_BHWC[..., -1:] if c in (2, 4) else None
    rgb = image_BHWC[..., : 3 if c >= 3 else 1]
    if rgb.shape[-1] == 1:
        rgb = rgb.expand(b, h, w, 3)
    return rgb.contiguous(), alpha


def image_size(image_BHWC: torch.Tensor) -> tuple[int, int]:
    """``(height, width)`` of an IMAGE (``(B, H, W, C)`` or ``(H, W, C)``), read from its shape only:
    a caller can refuse a size before :func:`split_alpha` copies the pixels."""
    if not isinstance(image_BHWC, torch.Tensor):
        raise ImageInputError(f"expected an image tensor, got {type(image_BHWC).__name__}")
    if image_BHWC.ndim not in (3, 4):
        raise ImageInputError(f"an IMAGE is (batch, height, width, channels); got shape {tuple(image_BHWC.shape)}")
    return int(image_BHWC.shape[-3]), int(image_BHWC.shape[-2])


def _check_ndim(x: torch.Tensor, layout: str) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim != 4:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ImageInputError(f"expected a ({layout}) image batch, got {shape}")


def to_model(rgb_BHW3: torch.Tensor) -> torch.Tensor:
    """``(B, H, W, 3)`` in [0, 1] -> ``(B, 3, H, W)`` in [-1, 1]."""
    _check_ndim(rgb_BHW3, "batch, height, width, channels")
    return rearrange(rgb_BHW3, "B H W C -> B C H W") * 2 - 1


def from_model(x_B3HW: torch.Tensor) -> torch.Tensor:
    """``(B, 3, H, W)`` in [-1, 1] -> ``(B, H, W, 3)`` float32 in [0, 1]."""
    _check_ndim(x_B3HW, "batch, channels, height, width")
    return rearrange((x_B3HW.float().clamp(-1, 1) + 1) / 2, "B C H W -> B H W C").contiguous()


def merge_alpha(rgb_BHW3: torch.Tensor, alpha_BHW1: torch.Tensor | None) -> torch.Tensor:
    """Append ``alpha`` (resized bilinearly to the RGB size when needed) as a fourth channel."""
    if alpha_BHW1 is None:
        return rgb_BHW3
    _check_ndim(rgb_BHW3, "batch, height, width, channels")
    _check_ndim(alpha_BHW1, "batch, height, width, 1")
    if alpha_BHW1.shape[0] != rgb_BHW3.shape[0]:
        raise ImageInputError(f"{alpha_BHW1.shape[0]} alpha channels for {rgb_BHW3.shape[0]} images; "
                              "give one alpha per image")
    h, w = rgb_BHW3.shape[1:3]
    if alpha_BHW1.shape[1:3] != (h, w):
        a = F.interpolate(rearrange(alpha_BHW1, "B H W C -> B C H W").float(), size=(h, w), mode="bilinear",
                          align_corners=False, antialias=True)
        alpha_BHW1 = rearrange(a, "B C H W -> B H W C").clamp(0, 1)
    return torch.cat([rgb_BHW3, alpha_BHW1.to(rgb_BHW3)], dim=-1)


def load_image_file(path: str | os.PathLike) -> torch.Tensor:
    """Read an image file as ``(1, H, W, C)`` float in [0, 1] (C = 3, or 4 with alpha); 16-bit aware."""
    from PIL import Image, UnidentifiedImageError

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ImageInputError(f"{path}: image file not found")
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(im, dtype=np.float32) / (65535.0 if im.mode.startswith("I;16") or np.asarray(im).max() > 255 else 255.0)
                arr = np.repeat(arr[..., None], 3, axis=-1)
            else:
                has_alpha = im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info)
                arr = np.asarray(im.convert("RGBA" if has_alpha else "RGB"), dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError) as e:
        raise ImageInputError(f"{path}: cannot read the image ({e})") from None
    return torch.from_numpy(np.ascontiguousarray(arr)).clamp(0, 1)[None]
