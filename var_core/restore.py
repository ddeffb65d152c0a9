"""Any-size, any-aspect one-step restoration with VARestorer (tiles, SwinIR, colour fix, seeds).

The official pipeline (``gen_one_img_anyres`` of EternalEvan/VARestorer ``tools/run_varestorer.py``)
squashes the input to 512 x 512 or tiles a resized image. Here the low-quality image is resized
by the upscale factor (bicubic, antialiased), keeping its aspect ratio, and restored in overlapping
model-sized tiles (:mod:`.tiling`); each tile is fitted to the nearest Infinity scale schedule,
optionally pre-cleaned by SwinIR, encoded into its token pyramid, restored in one forward pass
(:func:`.student.restore`) and decoded. Image ``i`` of a batch draws its sampling noise from
``seed + i``, so a batch gives the same images as single runs, and a seed always gives the same result.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import student, swinir as swinir_lib, text as text_lib
from .bsq_vae import BSQVAE
from .colorfix import MODES as COLOR_FIX_MODES
from .colorfix import color_fix
from .errors import ImageInputError, ParameterError
from .infinity_model import Infinity, TextCondition
from .pyramid import Pyramid, decode_pyramid, model_device
from .schedules import fit_schedule, schedule_pixels
from .tiling import run_tiled_with_retry

log = logging.getLogger(__name__)

SAMPLING_MODES = ("gumbel", "argmax")
MAX_SCALE = 8.0
MAX_SIDE = 16384  # output pixels per side; beyond this the blend buffers alone need >3 GB


@dataclass(frozen=True, kw_only=True)
class RestoreOptions:
    """Runtime settings of :func:`restore_image` (the defaults follow the official demo)."""

    scale: float = 4.0  # output size / input size
    tile: int = 512  # tile side in output pixels (the student was trained on 512 x 512)
    overlap: int = 64
    sampling: str = "gumbel"  # "gumbel": the official temperature-tau draw; "argmax": deterministic
    tau: float = 0.5  # Gumbel temperature of the official GumbelArgmax
    seed: int = 0
    color_fix: str = "none"

    def __post_init__(self):
        if not 0 < self.scale <= MAX_SCALE:
            raise ParameterError(f"scale must be in (0, {MAX_SCALE:g}], got {self.scale}")
        if self.tile < 64:
            raise ParameterError(f"tile size must be at least 64 pixels, got {self.tile}")
        if not 0 <= self.overlap < self.tile:
            raise ParameterError(f"tile overlap ({self.overlap}) must be at least 0 and smaller than the tile ({self.tile})")
        if self.sampling not in SAMPLING_MODES:
            raise ParameterError(f"sampling must be one of {SAMPLING_MODES}, got {self.sampling!r}")
        if not self.tau > 0:
            raise ParameterError(f"tau must be positive, got {self.tau}")
        if self.color_fix not in COLOR_FIX_MODES:
            raise ParameterError(f"color_fix must be one of {COLOR_FIX_MODES}, got {self.color_fix!r}")


def output_size(h: int, w: int, scale: float) -> tuple[int, int]:
    """Output ``(H, W)`` for an ``h x w`` input; refuses sizes above :data:`MAX_SIDE`."""
    H, W = max(1, round(h * scale)), max(1, round(w * scale))
    if max(H, W) > MAX_SIDE:
        raise ParameterError(
            f"the output would be {W}x{H} pixels, more than the {MAX_SIDE} px per side this pack restores; "
            "lower the scale or crop the image"
        )
    return H, W


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x.float(), size=size, mode="bicubic", align_corners=False, antialias=True).clamp(-1, 1)


def _text_for(model: Infinity, text: TextCondition | None, batch: int, device) -> TextCondition:
    """One condition per image on ``device``; ``None`` is the unconditional text."""
    text = text if text is not None else text_lib.unconditional(model.cfg_uncond)
    if text.batch_size != batch:
        if text.batch_size != 1:
            raise ParameterError(f"{text.batch_size} prompts for a batch of {batch} images; give one prompt or one per image")
        text = TextCondition(text.kv_compact.repeat(batch, 1), text.lens * batch)
    return TextCondition(text.kv_compact.to(device), text.lens)


def restore_image(
    model: Infinity,
    vae: BSQVAE,
    lq_B3HW: torch.Tensor,
    *,
    text: TextCondition | None = None,
    swinir: torch.nn.Module | None = None,
    options: RestoreOptions = RestoreOptions(),
    progress: Callable[[int, int], None] | None = None,
    check_interrupt: Callable[[], None] | None = None,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Restore ``lq`` ``(B, 3, h, w)`` in [-1, 1] to ``(B, 3, H, W)`` in [-1, 1] (``H = h * scale``).

    ``text=None`` uses the model's unconditional text embedding (an empty prompt). ``device`` is
    where to compute (default: where the model's first parameter is).
    """
    if lq_B3HW.ndim != 4 or lq_B3HW.shape[1] != 3 or lq_B3HW.shape[0] == 0:
        raise ImageInputError(f"expected a non-empty (B, 3, H, W) image batch, got {tuple(lq_B3HW.shape)}")
    device = device or model_device(model)
    b, _, h, w = lq_B3HW.shape
    H, W = output_size(h, w, options.scale)
    x = _resize(lq_B3HW.to(device), (H, W))
    text = _text_for(model, text, b, device)
    tile_index = 0

    def restore_tile(t: torch.Tensor) -> torch.Tensor:
        nonlocal tile_index
        th, tw = t.shape[-2:]
        schedule = fit_schedule(th, tw)
        lq = _resize(t, schedule_pixels(schedule))
        if swinir is not None:
            lq = swinir_lib.clean(swinir, lq)
        gens = None
        if options.sampling == "gumbel":
            gens = [torch.Generator(device).manual_seed(((options.seed + i) * 1_000_003 + tile_index) % 2**63)
                    for i in range(b)]
        tile_index += 1
        res = student.restore(model, vae, lq, text, schedule, tau=options.tau, generator=gens,
                              sample=options.sampling == "gumbel")
        return _resize(res.image, (th, tw))

    out = run_tiled_with_retry(restore_tile, x, tile=options.tile, overlap=options.overlap,
                               progress=progress, check_interrupt=check_interrupt)
    return color_fix(out, x, options.color_fix).clamp(-1, 1)


def restore_pyramid(model: Infinity, vae: BSQVAE, pyramid: Pyramid, *, text: TextCondition | None = None,
                    options: RestoreOptions = RestoreOptions(), device: torch.device | None = None) -> torch.Tensor:
    """Restore an already-encoded LQ :class:`~.pyramid.Pyramid` in one pass (no tiling, no SwinIR).

    The student works on the pyramid's own scale schedule; the result is resized to the pyramid's
    ``image_size`` times ``options.scale``. Returns ``(B, 3, H, W)`` in [-1, 1].
    """
    device = device or model_device(model)
    b = pyramid.batch_size
    H, W = output_size(*pyramid.image_size, options.scale)
    text = _text_for(model, text, b, device)
    gens = None
    if options.sampling == "gumbel":
        gens = [torch.Generator(device).manual_seed(((options.seed + i) * 1_000_003) % 2**63) for i in range(b)]
    res = student.restore_bits(model, vae, pyramid.bits, text, pyramid.schedule, tau=options.tau,
                               generator=gens, sample=options.sampling == "gumbel", device=device)
    out = _resize(res.image, (H, W))
    if options.color_fix != "none":
        lq = _resize(decode_pyramid(vae, pyramid, device=device), (H, W))
        out = color_fix(out, lq, options.color_fix)
    return out.clamp(-1, 1)
