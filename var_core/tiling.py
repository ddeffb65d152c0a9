"""Seamless tiled processing of large images, with out-of-memory retries.

The VAR restorers work on model-sized tiles (VARestorer: 512 x 512 pixels). Tiles overlap and
are blended with Gaussian weights (peak in the tile centre, sigma = 0.1 tile), so no seam shows.
Tile positions are spread evenly, so every tile has the full size and every overlap is at least
the requested one. An image that fits in one tile is processed whole (bit-identical to no tiling).
Several tiles can go through the model as one batch (``tile_batch``); an out-of-memory error
first halves that batch, then the tile. Tiles are laid out on a grid that may be coarser than the
input or the output (``in_scale``/``out_scale``): the VAE is tiled on its latent grid, 16 image
pixels per latent cell, so its encoder maps 16x-larger input tiles and its decoder makes 16x-larger
output tiles.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch

from .errors import ParameterError

log = logging.getLogger(__name__)

TileFn = Callable[[torch.Tensor], torch.Tensor]


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of size ``tile`` covering ``length`` with at least ``overlap`` shared."""
    if tile < 1:
        raise ParameterError(f"tile size must be positive, got {tile}")
    if not 0 <= overlap < tile:
        raise ParameterError(f"tile overlap ({overlap}) must be at least 0 and smaller than the tile size ({tile})")
    if length <= tile:
        return [0]
    n = math.ceil((length - overlap) / (tile - overlap))
    return [round(i * (length - tile) / (n - 1)) for i in range(n)]


def blend_weights(h: int, w: int, *, device=None) -> torch.Tensor:
    """Gaussian blending window ``(1, 1, h, w)``, 1 at the centre."""
    def axis(n: int) -> torch.Tensor:
        t = (torch.arange(n, device=device, dtype=torch.float32) - (n - 1) / 2) / n
        return torch.exp(-(t**2) / (2 * 0.01))

    return (axis(h)[:, None] * axis(w)[None, :])[None, None]


def count_tiles(h: int, w: int, tile: int, overlap: int) -> int:
    return len(tile_starts(h, tile, overlap)) * len(tile_starts(w, tile, overlap))


def run_tiled(
    fn: TileFn,
    x_BCHW: torch.Tensor,
    *,
    tile: int,
    overlap: int,
    tile_batch: int = 1,
    progress: Callable[[int, int], None] | None = None,
    check_interrupt: Callable[[], None] | None = None,
    in_scale: int = 1,
    out_scale: int = 1,
) -> torch.Tensor:
    """Apply ``fn`` (image -> image) tile by tile and blend the results.

    ``tile`` and ``overlap`` count cells of a grid of ``x``'s size divided by ``in_scale``; ``fn``
    maps a ``t x t`` cell tile, ``t * in_scale`` pixels of ``x``, to ``t * out_scale`` pixels,
    and the result is the grid times ``out_scale`` (the defaults: same-size tiles).

    ``tile_batch`` tiles go to ``fn`` in one call, stacked along the batch dimension tile by tile:
    ``(n * B, C, th, tw)``, rows ``k*B .. k*B+B-1`` are tile ``k`` of the group (every tile has the
    same size). ``progress(done, total)`` is called after each call of ``fn`` with the tiles done;
    ``check_interrupt()`` before each call (it raises to stop, e.g. ComfyUI's interrupt). The result
    has ``x``'s batch size and device.
    """
    if tile_batch < 1:
        raise ParameterError(f"tile batch must be at least 1, got {tile_batch}")
    b, _, h, w = x_BCHW.shape
    if h % in_scale or w % in_scale:
        raise ParameterError(f"a {h}x{w} input is not a whole number of {in_scale}-pixel grid cells")
    h, w, i, o = h // in_scale, w // in_scale, in_scale, out_scale
    corners = [(y, x) for y in tile_starts(h, tile, overlap) for x in tile_starts(w, tile, overlap)]
    total = len(corners)
    if total == 1:
        if check_interrupt:
            check_interrupt()
        out = fn(x_BCHW)
        if progress:
            progress(1, 1)
        return out
    th, tw = min(tile, h), min(tile, w)
    weight = blend_weights(th * o, tw * o, device=x_BCHW.device)
    acc = None
    norm = torch.zeros(1, 1, h * o, w * o, device=x_BCHW.device)
    for start in range(0, total, tile_batch):
        group = corners[start : start + tile_batch]
        if check_interrupt:
            check_interrupt()
        out = fn(torch.cat([x_BCHW[:, :, y * i : (y + th) * i, x * i : (x + tw) * i] for y, x in group]))
        out = out.to(x_BCHW.device, torch.float32)
        if acc is None:
            acc = torch.zeros(b, out.shape[1], h * o, w * o, device=x_BCHW.device)
        for k, (y, x) in enumerate(group):
            acc[:, :, y * o : (y + th) * o, x * o : (x + tw) * o] += out[k * b : (k + 1) * b] * weight
            norm[:, :, y * o : (y + th) * o, x * o : (x + tw) * o] += weight
        if progress:
            progress(start + len(group), total)
    return acc.div_(norm)


def run_tiled_with_retry(fn: TileFn, x_BCHW: torch.Tensor, *, tile: int, overlap: int, tile_batch: int = 1,
                         min_tile: int = 128, on_retry: Callable[[int, int, int], None] | None = None,
                         **kwargs) -> torch.Tensor:
    """:func:`run_tiled`, retrying the whole image after an out-of-memory error: first with half the
    tiles per batch, then (one tile per batch) with half the tile and overlap. ``on_retry(tile,
    overlap, tile_batch)`` is told the new settings before each retry."""
    while True:
        try:
            return run_tiled(fn, x_BCHW, tile=tile, overlap=overlap, tile_batch=tile_batch, **kwargs)
        except torch.OutOfMemoryError:
            if tile_batch > 1:
                tile_batch //= 2
                log.warning("out of memory; retrying with %d tiles per batch", tile_batch)
            elif tile // 2 >= min_tile:
                tile, overlap = tile // 2, overlap // 2
                log.warning("out of memory; retrying with tiles of %d", tile)
            else:
                raise
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if on_retry:
                on_retry(tile, overlap, tile_batch)
