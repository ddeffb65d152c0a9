"""Any-size, any-aspect restoration: VARestorer one-step, or the iterative teacher (tiles, SwinIR, colour fix, seeds).

The official pipeline (``gen_one_img_anyres`` of EternalEvan/VARestorer ``tools/run_varestorer.py``)
squashes the input to 512 x 512 or tiles a resized image. Here the low-quality image is resized
by the upscale factor (bicubic, antialiased), keeping its aspect ratio, and restored in overlapping
model-sized tiles (:mod:`.tiling`); each tile is fitted to an Infinity scale schedule with at
least a full tile's scales (:func:`tile_schedule`: an image smaller than a tile is squashed up to
it, as the official code squashes every image to 512 x 512, instead of restored coarser),
optionally pre-cleaned by SwinIR, encoded into its token pyramid, restored in one forward pass
(:func:`.student.restore`) and decoded. Image ``i`` of a batch draws its sampling noise from
``seed + i``, so a batch gives the same images as single runs, and a seed always gives the same result.
Tiles of an image all have the same size and schedule, so the student restores several of them in
one batch (``tile_batch``); each tile keeps its own noise, so batching does not change the result.

:func:`iterative_restore_image` runs the same path (sizes, tiles, SwinIR, seeds, colour fix) with
the iterative Infinity teacher in place of the student: each tile is restored by next-scale
sampling conditioned on its LQ pyramid (:func:`.sampler.iterative_restore`), the baseline that
VARestorer distils into one step.

:func:`restore_tiled` is the family-independent part (scale, tiles, seeds, blending, colour fix)
with a pluggable per-tile restorer; :mod:`.family_restore` runs VARSR and RestoreVAR through it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from . import sampler as sampler_lib
from . import student, swinir as swinir_lib, text as text_lib
from .bsq_vae import BSQVAE
from .colorfix import MODES as COLOR_FIX_MODES
from .colorfix import color_fix
from .errors import ImageInputError, ParameterError
from .infinity_model import Infinity, TextCondition
from .pyramid import Pyramid, decode_pyramid, model_device
from .sampler import SamplerOptions, SamplingInterrupted, check_text_channels
from .schedules import fit_schedule, schedule_pixels
from .tiling import count_tiles, run_tiled_with_retry

log = logging.getLogger(__name__)

SAMPLING_MODES = ("gumbel", "argmax")
MAX_SCALE = 8.0
MAX_SIDE = 16384  # output pixels per side; beyond this the blend buffers alone need >3 GB
CUDA_TILE_BATCH = 4  # tiles per student batch on CUDA (tile_batch=0); out-of-memory halves it


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
    tile_batch: int = 0  # tiles per one-step batch; 0: CUDA_TILE_BATCH on CUDA, 1 elsewhere (no gain on CPU)
    compile: bool = False  # run the one-step transformer through torch.compile (falls back if it fails)

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
        if self.tile_batch < 0:
            raise ParameterError(f"tile_batch must be 0 (automatic) or a positive number of tiles, "
                                 f"got {self.tile_batch}")

    def tiles_per_batch(self, device: torch.device) -> int:
        """``tile_batch``, with 0 resolved for ``device``."""
        return self.tile_batch or (CUDA_TILE_BATCH if torch.device(device).type == "cuda" else 1)


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
    check_text_channels(model, text)
    if text.batch_size != batch:
        if text.batch_size != 1:
            raise ParameterError(f"{text.batch_size} prompts for a batch of {batch} images; give one prompt or one per image")
        text = TextCondition(text.kv_compact.repeat(batch, 1), text.lens * batch)
    return TextCondition(text.kv_compact.to(device), text.lens)


TileRestore = Callable[[torch.Tensor, list, TextCondition, list[int], Callable[[], None]], torch.Tensor]


def _interrupt_check(check_interrupt: Callable[[], object] | None) -> Callable[[], None] | None:
    """``check_interrupt`` that raises: a callable that raises itself (ComfyUI's) is kept as is; a
    true return raises :class:`~.sampler.SamplingInterrupted`."""
    if check_interrupt is None:
        return None

    def check() -> None:
        if check_interrupt():
            raise SamplingInterrupted("restoration stopped")

    return check


def _text_rows(text: TextCondition) -> list[TextCondition]:
    """One single-prompt condition per prompt of ``text``."""
    return [TextCondition(kv_NC, (n,)) for kv_NC, n in zip(torch.split(text.kv_compact, text.lens), text.lens)]


def tile_schedule(tile_h: int, tile_w: int, tile: int) -> list[tuple[int, int, int]]:
    """The scale schedule a ``tile_h x tile_w`` piece cut by ``tile`` px tiles is restored on.

    At least as many scales as a full tile (:func:`.schedules.fit_schedule` with ``min_scales``):
    a piece smaller than the tile (an image with a side below it) is resized up to that schedule
    and the result back, as the official code squashes such images to 512 x 512, rather than being
    restored on a coarser schedule than the model was trained on and upsampled.
    """
    return fit_schedule(tile_h, tile_w, min_scales=len(fit_schedule(tile, tile)))


def tile_pixels(out_h: int, out_w: int, tile: int) -> tuple[int, int]:
    """``(height, width)`` the model works on per tile of an ``out_h x out_w`` output (the size of
    its :func:`tile_schedule`; for memory estimates)."""
    return schedule_pixels(tile_schedule(min(tile, out_h), min(tile, out_w), tile))


def steps_per_tile(tile_h: int, tile_w: int, batch: int, *, iterative: bool, tile: int) -> int:
    """Progress steps of one tile cut by ``tile`` px tiles: 1 for the one-step student (the batch
    in one pass), one per scale and image for the iterative teacher (each image is sampled alone)."""
    return batch * len(tile_schedule(tile_h, tile_w, tile)) if iterative else 1


def count_steps(h: int, w: int, options: RestoreOptions, *, batch: int = 1, iterative: bool = False) -> int:
    """Progress steps of restoring a batch of ``h x w`` images (tiles, times scales when iterative)."""
    H, W = output_size(h, w, options.scale)
    return count_tiles(H, W, options.tile, options.overlap) * steps_per_tile(
        min(options.tile, H), min(options.tile, W), batch, iterative=iterative, tile=options.tile)


SeededTile = Callable[[torch.Tensor, list[int], Callable[[], None]], torch.Tensor]


def _check_batch(lq_B3HW: torch.Tensor) -> None:
    if not isinstance(lq_B3HW, torch.Tensor) or lq_B3HW.ndim != 4 or lq_B3HW.shape[1] != 3 or lq_B3HW.shape[0] == 0:
        shape = tuple(lq_B3HW.shape) if isinstance(lq_B3HW, torch.Tensor) else type(lq_B3HW).__name__
        raise ImageInputError(f"expected a non-empty (B, 3, H, W) image batch, got {shape}")


def tile_seeds(seed: int, batch: int, tile_index: int) -> list[int]:
    """Seed of image ``i`` of a batch in tile ``tile_index`` (image ``i`` follows ``seed + i``)."""
    return [((seed + i) * 1_000_003 + tile_index) % 2**63 for i in range(batch)]


def restore_tiled(
    lq_B3HW: torch.Tensor,
    restore_tile: SeededTile,
    *,
    options: RestoreOptions,
    steps_per_tile: Callable[[int, int], int],
    progress: Callable[[int, int], None] | None,
    check_interrupt: Callable[[], object] | None,
    device: torch.device,
    tile_batch: int = 1,
    on_retry: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """The any-size path every restorer shares: resize ``lq`` by ``options.scale`` (bicubic,
    aspect kept), cut it into overlapping tiles of ``options.tile`` output pixels, restore each with
    ``restore_tile(tile, seeds, step)`` (a ``(B, 3, th, tw)`` tile at output resolution, one seed per
    image from :func:`tile_seeds`, ``step()`` after each progress step) which returns the restored
    tile at the same size, blend (Gaussian weights; after out-of-memory halving the tile batch, then
    the tile), colour fix. With ``tile_batch`` > 1, ``restore_tile`` gets up to that many tiles at
    once, ``(n * B, 3, th, tw)`` tile by tile, with their ``n * B`` seeds in the same order.

    ``steps_per_tile(th, tw)`` is the number of ``step()`` calls of one ``th x tw`` tile;
    ``progress(done, total)`` counts them; ``check_interrupt()`` runs before each tile (batch).
    ``on_retry(tile, overlap)`` is told the new tile size when out of memory halves it.
    """
    _check_batch(lq_B3HW)
    if not torch.isfinite(lq_B3HW).all():  # once, here: every restorer comes this way
        raise ImageInputError("the image contains NaN or Inf values; check what produced it")
    b, _, h, w = lq_B3HW.shape
    H, W = output_size(h, w, options.scale)
    x_B3HW = _resize(lq_B3HW.to(device), (H, W))
    check = _interrupt_check(check_interrupt)
    state = {"tile": options.tile, "overlap": options.overlap, "done": 0, "index": 0}

    def total() -> int:
        t = state["tile"]
        return count_tiles(H, W, t, state["overlap"]) * steps_per_tile(min(t, H), min(t, W))

    def step() -> None:
        state["done"] += 1
        if progress:
            progress(state["done"], total())

    def retry(tile: int, overlap: int, _tile_batch: int) -> None:  # the whole image starts again
        state.update(tile=tile, overlap=overlap, done=0, index=0)
        if on_retry:
            on_retry(tile, overlap)

    def tile_fn(t_B3hw: torch.Tensor) -> torch.Tensor:
        n = t_B3hw.shape[0] // b
        seeds = [s for k in range(n) for s in tile_seeds(options.seed, b, state["index"] + k)]
        state["index"] += n
        return restore_tile(t_B3hw, seeds, step)

    out = run_tiled_with_retry(tile_fn, x_B3HW, tile=options.tile, overlap=options.overlap, tile_batch=tile_batch,
                               check_interrupt=check, on_retry=retry)
    out = color_fix(out, x_B3HW, options.color_fix)
    return out.clamp(-1, 1) if out is x_B3HW else out.clamp_(-1, 1)  # in place: no second full-size buffer


def _restore_tiled(
    model: Infinity,
    vae: BSQVAE,
    lq_B3HW: torch.Tensor,
    restore_tile: TileRestore,
    *,
    text: TextCondition | None,
    swinir: torch.nn.Module | None,
    options: RestoreOptions,
    iterative: bool,
    progress: Callable[[int, int], None] | None,
    check_interrupt: Callable[[], object] | None,
    device: torch.device | None,
    tile_batch: int = 1,
) -> torch.Tensor:
    """:func:`restore_tiled` for Infinity: each tile is fitted to its scale schedule
    (:func:`tile_schedule`) and optionally cleaned by SwinIR. ``restore_tile(lq, schedule, text,
    seeds, step)`` restores ``(n * B, 3, 16h, 16w)`` (``n`` tiles of the ``B`` images, at most ``tile_batch``) sized to
    ``schedule``, with one prompt and seed per row, and calls ``step()`` after each progress step
    (:func:`steps_per_tile` per tile)."""
    _check_batch(lq_B3HW)
    device = device or model_device(model)
    b = lq_B3HW.shape[0]
    text = _text_for(model, text, b, device)
    current = {"tile": options.tile}  # halved by out-of-memory retries

    def infinity_tile(t_B3hw: torch.Tensor, seeds: list[int], step: Callable[[], None]) -> torch.Tensor:
        th, tw = t_B3hw.shape[-2:]
        schedule = tile_schedule(th, tw, current["tile"])
        lq = _resize(t_B3hw, schedule_pixels(schedule))
        if swinir is not None:
            lq = swinir_lib.clean(swinir, lq)
        n = t_B3hw.shape[0] // b
        text_n = text if n == 1 else TextCondition(text.kv_compact.repeat(n, 1), text.lens * n)
        return _resize(restore_tile(lq, schedule, text_n, seeds, step), (th, tw))

    return restore_tiled(lq_B3HW, infinity_tile, options=options,
                         steps_per_tile=lambda th, tw: steps_per_tile(th, tw, b, iterative=iterative,
                                                                      tile=current["tile"]),
                         progress=progress, check_interrupt=check_interrupt, device=device, tile_batch=tile_batch,
                         on_retry=lambda tile, _overlap: current.update(tile=tile))


def restore_image(
    model: Infinity,
    vae: BSQVAE,
    lq_B3HW: torch.Tensor,
    *,
    text: TextCondition | None = None,
    swinir: torch.nn.Module | None = None,
    options: RestoreOptions = RestoreOptions(),
    progress: Callable[[int, int], None] | None = None,
    check_interrupt: Callable[[], object] | None = None,
    device: torch.device | None = None,
    on_bits: Callable[[list[torch.Tensor], list], None] | None = None,
) -> torch.Tensor:
    """Restore ``lq`` ``(B, 3, h, w)`` in [-1, 1] to ``(B, 3, H, W)`` in [-1, 1] (``H = h * scale``)
    with the one-step student.

    ``text=None`` uses the model's unconditional text embedding (an empty prompt). ``device`` is
    where to compute (default: where the model's first parameter is). ``progress(done, total)``
    runs after each tile, ``check_interrupt()`` before each (it raises, or returns true to stop
    with :class:`~.sampler.SamplingInterrupted`). ``on_bits(bits, schedule)`` receives the predicted
    bits of each tile (``(B, h, w, d)`` per scale) and its scale schedule. Up to
    ``options.tiles_per_batch(device)`` tiles are restored in one batch (same result as one by one).
    """
    _check_batch(lq_B3HW)
    gumbel = options.sampling == "gumbel"
    b = lq_B3HW.shape[0]
    device = device or model_device(model)

    def one_step(lq_B3hw, schedule, text, seeds, step):
        gens = [torch.Generator(lq_B3hw.device).manual_seed(s) for s in seeds] if gumbel else None
        res = student.restore(model, vae, lq_B3hw, text, schedule, tau=options.tau, generator=gens, sample=gumbel,
                              compile=options.compile)
        for k in range(lq_B3hw.shape[0] // b):  # one progress step (and on_bits call) per tile
            if on_bits:
                on_bits([bits[k * b : (k + 1) * b] for bits in res.bits], schedule)
            step()
        return res.image

    return _restore_tiled(model, vae, lq_B3HW, one_step, text=text, swinir=swinir, options=options, iterative=False,
                          progress=progress, check_interrupt=check_interrupt, device=device,
                          tile_batch=options.tiles_per_batch(device))


def iterative_restore_image(
    model: Infinity,
    vae: BSQVAE,
    lq_B3HW: torch.Tensor,
    *,
    text: TextCondition | None = None,
    swinir: torch.nn.Module | None = None,
    options: RestoreOptions = RestoreOptions(),
    sampler_options: SamplerOptions = SamplerOptions(),
    lq_scales: int = sampler_lib.LQ_INPUT_SCALES,
    progress: Callable[[int, int], None] | None = None,
    check_interrupt: Callable[[], object] | None = None,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Restore ``lq`` as :func:`restore_image` does (same sizes, tiles, SwinIR, colour fix), but
    each tile with the iterative Infinity teacher (:func:`.sampler.iterative_restore`: next-scale
    sampling with the LQ pyramid as the input of the first ``lq_scales`` scales).

    ``options``: ``scale``, ``tile``, ``overlap``, ``color_fix`` and ``seed`` (``sampling``, ``tau``,
    ``tile_batch`` and ``compile`` are the student's and not used). ``sampler_options``: guidance, temperature, top-k/p,
    next-scale mode; its ``seed`` is not used: image ``i`` of tile ``k`` draws from a generator
    seeded with ``options.seed + i`` and ``k`` (as the one-step path), and each image is sampled
    alone, so a batch gives the same images as single runs. ``progress(done, total)`` counts
    scales (of every image of every tile); ``check_interrupt()`` runs before each scale.
    """
    check = _interrupt_check(check_interrupt)
    cfgs = sampler_options.cfg if isinstance(sampler_options.cfg, tuple) else (sampler_options.cfg,)
    if text is None and any(c != 1 for c in cfgs):
        # Without text the conditional rows are the unconditional ones: guidance would not change the
        # logits (cfg * u + (1 - cfg) * u = u) but would double the work.
        log.info("no text: classifier-free guidance skipped (the conditional and unconditional rows are the same)")
        sampler_options = replace(sampler_options, cfg=1.0)

    def iterative(lq_B3hw, schedule, text, seeds, step):
        images = []
        for i, (seed, text_i) in enumerate(zip(seeds, _text_rows(text))):
            gen = torch.Generator(lq_B3hw.device).manual_seed(seed)
            res = sampler_lib.iterative_restore(model, vae, lq_B3hw[i : i + 1], text_i, schedule, sampler_options,
                                                lq_scales=lq_scales, generator=gen, callback=lambda _p: step(),
                                                check_interrupt=check)
            images.append(res.image)
        return torch.cat(images)

    return _restore_tiled(model, vae, lq_B3HW, iterative, text=text, swinir=swinir, options=options, iterative=True,
                          progress=progress, check_interrupt=check_interrupt, device=device)


def restore_pyramid(model: Infinity, vae: BSQVAE, pyramid: Pyramid, *, text: TextCondition | None = None,
                    options: RestoreOptions = RestoreOptions(), device: torch.device | None = None,
                    on_bits: Callable[[list[torch.Tensor], list], None] | None = None) -> torch.Tensor:
    """Restore an already-encoded LQ :class:`~.pyramid.Pyramid` in one pass (no tiling, no SwinIR).

    The student works on the pyramid's own scale schedule; the result is resized to the pyramid's
    ``image_size`` times ``options.scale``. Returns ``(B, 3, H, W)`` in [-1, 1]. ``on_bits(bits,
    schedule)`` receives the predicted bits (``(B, h, w, d)`` per scale) and the schedule.
    """
    device = device or model_device(model)
    b = pyramid.batch_size
    H, W = output_size(*pyramid.image_size, options.scale)
    text = _text_for(model, text, b, device)
    gens = None
    if options.sampling == "gumbel":
        gens = [torch.Generator(device).manual_seed(s) for s in tile_seeds(options.seed, b, 0)]
    res = student.restore_bits(model, vae, pyramid.bits, text, pyramid.schedule, tau=options.tau,
                               generator=gens, sample=options.sampling == "gumbel", device=device,
                               compile=options.compile)
    if on_bits:
        on_bits(res.bits, pyramid.schedule)
    out = _resize(res.image, (H, W))
    if options.color_fix != "none":
        lq = _resize(decode_pyramid(vae, pyramid, device=device), (H, W))
        out = color_fix(out, lq, options.color_fix)
    return out.clamp(-1, 1)
