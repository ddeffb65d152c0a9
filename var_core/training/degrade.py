"""Synthetic degradation of high-quality images into low-quality training inputs.

VARestorer's training data (``infinity/dataset/dataset_t2i_iterable.py`` of EternalEvan/VARestorer)
follows the single-order degradation of DiffBIR (Lin et al., "DiffBIR: Towards Blind Image
Restoration with Generative Diffusion Prior", 2023), itself built on the kernels of Real-ESRGAN /
BasicSR. One draw degrades an image in this order:

1. **blur** with a 41 x 41 Gaussian kernel, isotropic or anisotropic with equal probability;
   sigma in [0.1, 12] (both axes drawn independently for the anisotropic kernel, which is also
   rotated by an angle in [-pi, pi]);
2. **downsample** by a factor drawn uniformly in [1, 12], with an interpolation drawn from
   ``config.interpolations``;
3. **Gaussian noise** with sigma drawn in [0, 15] on the 0-255 scale (independent per channel);
4. **JPEG** compression with a quality drawn in [30, 100];
5. **resize back** to the high-quality size (bilinear).

The official code downsamples with bilinear interpolation only; the default here also draws area
and bicubic (``interpolations=("bilinear",)`` matches the official pipeline exactly). The blur
pads the image by replicating its border. Every random number comes from the ``torch.Generator``
passed in, in a fixed order (kernel kind, sigmas, angle, factor, interpolation, noise sigma,
noise, JPEG quality), so a seed always gives the same low-quality image.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from PIL import Image

from ..errors import ImageInputError, ParameterError

KERNEL_KINDS = ("iso", "aniso")
INTERPOLATIONS = ("area", "bilinear", "bicubic")


def _check_range(name: str, lo_hi: tuple[float, float], low: float, high: float) -> None:
    lo, hi = lo_hi
    if not low <= lo <= hi <= high:
        raise ParameterError(f"{name} = {lo_hi} must be a (min, max) pair with {low} <= min <= max <= {high}")


@dataclass(frozen=True, kw_only=True)
class DegradationConfig:
    """Ranges of the random degradation; the defaults are the official VARestorer / DiffBIR ones.

    A range ``(a, a)`` fixes the value: ``blur_sigma=(0.1, 0.1)`` is practically no blur,
    ``downsample=(1, 1)`` no resizing, ``noise_sigma=(0, 0)`` no noise, ``jpeg_quality=(100, 100)``
    the lightest JPEG.
    """

    kernel_size: int = 41  # odd, pixels
    kernel_kinds: tuple[str, ...] = KERNEL_KINDS  # "iso" and/or "aniso"
    kernel_probs: tuple[float, ...] = (0.5, 0.5)  # probability of each kind
    blur_sigma: tuple[float, float] = (0.1, 12.0)  # pixels; drawn per axis for "aniso"
    rotation: tuple[float, float] = (-math.pi, math.pi)  # radians, "aniso" kernels only
    downsample: tuple[float, float] = (1.0, 12.0)  # factor
    interpolations: tuple[str, ...] = INTERPOLATIONS  # drawn with equal probability
    noise_sigma: tuple[float, float] = (0.0, 15.0)  # on the 0-255 scale
    jpeg_quality: tuple[int, int] = (30, 100)  # inclusive

    def __post_init__(self):
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ParameterError(f"kernel_size = {self.kernel_size} must be an odd positive number of pixels")
        if not self.kernel_kinds or set(self.kernel_kinds) - set(KERNEL_KINDS):
            raise ParameterError(f"kernel_kinds = {self.kernel_kinds} must be a non-empty subset of {KERNEL_KINDS}")
        if len(self.kernel_probs) != len(self.kernel_kinds) or min(self.kernel_probs) < 0 or sum(self.kernel_probs) <= 0:
            raise ParameterError(
                f"kernel_probs = {self.kernel_probs} must give one non-negative weight per kernel kind "
                f"{self.kernel_kinds}, not all zero"
            )
        if not self.interpolations or set(self.interpolations) - set(INTERPOLATIONS):
            raise ParameterError(f"interpolations = {self.interpolations} must be a non-empty subset of {INTERPOLATIONS}")
        _check_range("blur_sigma", self.blur_sigma, 1e-3, math.inf)
        _check_range("rotation", self.rotation, -math.inf, math.inf)
        _check_range("downsample", self.downsample, 1.0, math.inf)
        _check_range("noise_sigma", self.noise_sigma, 0.0, 255.0)
        _check_range("jpeg_quality", self.jpeg_quality, 1, 100)


def _uniform(lo_hi: tuple[float, float], generator: torch.Generator) -> float:
    lo, hi = lo_hi
    return lo + (hi - lo) * torch.rand((), generator=generator, dtype=torch.float64).item()


def _choice(n: int, generator: torch.Generator) -> int:
    return int(torch.randint(n, (), generator=generator))


def gaussian_kernel(size: int, sigma_x: float, sigma_y: float, theta: float = 0.0) -> torch.Tensor:
    """A ``(size, size)`` float32 Gaussian kernel summing to 1.

    Its covariance has standard deviations ``sigma_x`` and ``sigma_y`` (pixels) along axes rotated
    by ``theta`` radians from the image's x and y axes; ``sigma_x == sigma_y`` is isotropic.
    """
    r = (size - 1) / 2
    ax = torch.linspace(-r, r, size, dtype=torch.float64)
    xy_KK2 = torch.stack(torch.meshgrid(ax, ax, indexing="xy"), dim=-1)
    rot_22 = torch.tensor([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]], dtype=torch.float64)
    cov_22 = rot_22 @ torch.diag(torch.tensor([sigma_x**2, sigma_y**2], dtype=torch.float64)) @ rot_22.T
    mahalanobis_KK = torch.einsum("hwi,ij,hwj->hw", xy_KK2, torch.linalg.inv(cov_22), xy_KK2)
    kernel_KK = torch.exp(-0.5 * mahalanobis_KK)
    return (kernel_KK / kernel_KK.sum()).float()


def random_kernel(config: DegradationConfig, generator: torch.Generator) -> torch.Tensor:
    """Draw a ``(config.kernel_size, config.kernel_size)`` blur kernel (float32, sums to 1)."""
    kind = config.kernel_kinds[int(torch.multinomial(torch.tensor(config.kernel_probs, dtype=torch.float64), 1,
                                                      generator=generator))]
    sigma_x = _uniform(config.blur_sigma, generator)
    if kind == "iso":
        return gaussian_kernel(config.kernel_size, sigma_x, sigma_x)
    sigma_y = _uniform(config.blur_sigma, generator)
    theta = _uniform(config.rotation, generator)
    return gaussian_kernel(config.kernel_size, sigma_x, sigma_y, theta)


def blur(x_3HW: torch.Tensor, kernel_KK: torch.Tensor) -> torch.Tensor:
    """Convolve each channel with ``kernel_KK`` (odd size), replicating the border; same size out."""
    pad = kernel_KK.shape[-1] // 2
    x_13HW = F.pad(x_3HW[None], (pad, pad, pad, pad), mode="replicate")
    weight_31KK = kernel_KK.to(x_3HW.dtype).expand(3, 1, *kernel_KK.shape)
    return F.conv2d(x_13HW, weight_31KK, groups=3)[0]


def resize(x_3HW: torch.Tensor, height: int, width: int, mode: str) -> torch.Tensor:
    """Resize to ``(3, height, width)`` with ``mode`` in :data:`INTERPOLATIONS`; clamped to [0, 1]."""
    align = None if mode == "area" else False
    return F.interpolate(x_3HW[None], size=(height, width), mode=mode, align_corners=align)[0].clamp(0, 1)


def add_noise(x_3HW: torch.Tensor, sigma: float, generator: torch.Generator) -> torch.Tensor:
    """Add Gaussian noise of standard deviation ``sigma`` (0-255 scale), per channel; clamped to [0, 1]."""
    noise_3HW = torch.randn(x_3HW.shape, generator=generator, dtype=x_3HW.dtype)
    return (x_3HW + noise_3HW * (sigma / 255)).clamp(0, 1)


def jpeg(x_3HW: torch.Tensor, quality: int) -> torch.Tensor:
    """Encode as 8-bit JPEG at ``quality`` (1-100) in memory with Pillow and decode again."""
    arr_HW3 = rearrange((x_3HW.clamp(0, 1) * 255).round().to(torch.uint8), "C H W -> H W C").numpy()
    buffer = io.BytesIO()
    Image.fromarray(arr_HW3).save(buffer, format="JPEG", quality=int(quality))
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        out_HW3 = np.asarray(decoded.convert("RGB"))
    return rearrange(torch.from_numpy(out_HW3.copy()), "H W C -> C H W").float() / 255


def _as_float_chw(hq) -> torch.Tensor:
    if isinstance(hq, np.ndarray):
        hq = torch.from_numpy(hq)
    if not isinstance(hq, torch.Tensor):
        raise ImageInputError(f"degrade() takes an image tensor or array, got {type(hq).__name__}")
    if hq.dtype == torch.uint8:
        if hq.ndim != 3 or hq.shape[-1] != 3:
            raise ImageInputError(f"a uint8 image must be (H, W, 3); got shape {tuple(hq.shape)}")
        return rearrange(hq, "H W C -> C H W").float() / 255
    if not hq.is_floating_point() or hq.ndim != 3 or hq.shape[0] != 3:
        raise ImageInputError(
            f"degrade() takes a float (3, H, W) image in [0, 1] or a uint8 (H, W, 3) one; "
            f"got {hq.dtype} of shape {tuple(hq.shape)}"
        )
    return hq.detach().to("cpu", torch.float32).clamp(0, 1)


def degrade(hq, config: DegradationConfig, generator: torch.Generator) -> torch.Tensor:
    """Degrade one high-quality image: blur, downsample, noise, JPEG, resize back (module docstring).

    ``hq`` is a float ``(3, H, W)`` tensor in [0, 1], or a uint8 ``(H, W, 3)`` tensor or numpy array.
    ``generator`` is a CPU ``torch.Generator``; it is advanced by the draw. Returns the low-quality
    image as a float32 CPU tensor ``(3, H, W)`` in [0, 1], the same size as ``hq``.
    """
    hq_3HW = _as_float_chw(hq)
    _, h, w = hq_3HW.shape
    x_3HW = blur(hq_3HW, random_kernel(config, generator))
    factor = _uniform(config.downsample, generator)
    mode = config.interpolations[_choice(len(config.interpolations), generator)]
    x_3hw = resize(x_3HW, max(1, int(h / factor)), max(1, int(w / factor)), mode)
    x_3hw = add_noise(x_3hw, _uniform(config.noise_sigma, generator), generator)
    quality = config.jpeg_quality[0] + _choice(config.jpeg_quality[1] - config.jpeg_quality[0] + 1, generator)
    x_3hw = jpeg(x_3hw, quality)
    return resize(x_3hw, h, w, "bilinear")
