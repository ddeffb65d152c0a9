"""Infinity's dynamic-resolution scale schedules.

Infinity (Han et al., "Infinity: Scaling Bitwise AutoRegressive Modeling for High-Resolution
Image Synthesis", CVPR 2025) and VARestorer generate images over a fixed list of per-scale token
grids ``(h, w)`` for each aspect-ratio template (height / width) and pixel budget. The grids are
the published ones (``infinity/utils/dynamic_resolution.py`` of FoundationVision/Infinity and of
EternalEvan/VARestorer). The VAE downsamples by 16, so the last grid times 16 is the image size.

A schedule is a list of ``(t, h, w)`` triples; for images ``t`` is always 1.
"""

from __future__ import annotations

from .errors import ParameterError

VAE_STRIDE = 16

# Grids of the templates with height >= width, finest last; the width > height templates are the
# transposes. Keys are height / width.
_TALL_GRIDS: dict[float, tuple[tuple[int, int], ...]] = {
    1.000: ((1, 1), (2, 2), (4, 4), (6, 6), (8, 8), (12, 12), (16, 16), (20, 20), (24, 24),
            (32, 32), (40, 40), (48, 48), (64, 64)),
    1.250: ((1, 1), (2, 2), (3, 3), (5, 4), (10, 8), (15, 12), (20, 16), (25, 20), (30, 24),
            (35, 28), (45, 36), (55, 44), (70, 56)),
    1.333: ((1, 1), (2, 2), (4, 3), (8, 6), (12, 9), (16, 12), (20, 15), (24, 18), (28, 21),
            (36, 27), (48, 36), (60, 45), (72, 54)),
    1.500: ((1, 1), (2, 2), (3, 2), (6, 4), (9, 6), (15, 10), (21, 14), (27, 18), (33, 22),
            (39, 26), (48, 32), (63, 42), (78, 52)),
    1.750: ((1, 1), (2, 2), (3, 3), (7, 4), (11, 6), (14, 8), (21, 12), (28, 16), (35, 20),
            (42, 24), (56, 32), (70, 40), (84, 48)),
    2.000: ((1, 1), (2, 2), (4, 2), (6, 3), (10, 5), (16, 8), (22, 11), (30, 15), (38, 19),
            (46, 23), (60, 30), (74, 37), (90, 45)),
    2.500: ((1, 1), (2, 2), (5, 2), (10, 4), (15, 6), (20, 8), (25, 10), (30, 12), (40, 16),
            (50, 20), (65, 26), (80, 32), (100, 40)),
    3.000: ((1, 1), (2, 2), (6, 2), (9, 3), (15, 5), (21, 7), (27, 9), (36, 12), (45, 15),
            (54, 18), (72, 24), (90, 30), (111, 37)),
}

# Number of scales for each pixel budget.
PIXEL_BUDGETS: dict[str, int] = {"0.06M": 7, "0.25M": 10, "0.60M": 12, "1M": 13}


def _all_templates() -> dict[float, tuple[tuple[int, int], ...]]:
    out = dict(_TALL_GRIDS)
    for ratio, grids in _TALL_GRIDS.items():
        if ratio != 1.0:
            # The official key of a wide template is int(1000 / ratio) / 1000 (e.g. 0.666).
            out[int(1 / ratio * 1000) / 1000] = tuple((w, h) for h, w in grids)
    return dict(sorted(out.items()))


H_DIV_W_TEMPLATES: dict[float, tuple[tuple[int, int], ...]] = _all_templates()


def nearest_template(h_div_w: float) -> float:
    """The aspect-ratio template (height / width) closest to ``h_div_w``."""
    if not h_div_w > 0:
        raise ParameterError(f"aspect ratio must be positive, got {h_div_w}")
    return min(H_DIV_W_TEMPLATES, key=lambda t: abs(t - h_div_w))


def scale_schedule(h_div_w: float, pn: str = "1M") -> list[tuple[int, int, int]]:
    """The ``(1, h, w)`` schedule of the template nearest ``h_div_w`` at pixel budget ``pn``."""
    if pn not in PIXEL_BUDGETS:
        raise ParameterError(f"unknown pixel budget {pn!r}; use one of {sorted(PIXEL_BUDGETS)}")
    grids = H_DIV_W_TEMPLATES[nearest_template(h_div_w)][: PIXEL_BUDGETS[pn]]
    return [(1, h, w) for h, w in grids]


def schedule_pixels(schedule: list[tuple[int, int, int]]) -> tuple[int, int]:
    """Image ``(height, width)`` in pixels that a schedule decodes to."""
    _, h, w = schedule[-1]
    return h * VAE_STRIDE, w * VAE_STRIDE


def schedule_for_latent(h: int, w: int) -> list[tuple[int, int, int]]:
    """A template schedule that ends exactly at latent grid ``h`` x ``w``.

    Any prefix of a template is a valid schedule (the fixtures' 96x144 image uses the first five
    scales of the 2:3 template). Raises :class:`ParameterError` when no template passes ``h x w``.
    """
    for grids in sorted(H_DIV_W_TEMPLATES.values(), key=lambda g: abs(g[-1][0] / g[-1][1] - h / w)):
        if (h, w) in grids:
            return [(1, gh, gw) for gh, gw in grids[: grids.index((h, w)) + 1]]
    raise ParameterError(
        f"no Infinity schedule ends at a {h}x{w} latent grid ({h * VAE_STRIDE}x{w * VAE_STRIDE} pixels); "
        "resize the image to a template size or pass an explicit scale schedule"
    )


def fit_schedule(height: int, width: int, *, min_scales: int = 1) -> list[tuple[int, int, int]]:
    """Schedule to restore a ``height`` x ``width`` image on, with at least ``min_scales`` scales.

    The image's own latent grid when that is on a template (a prefix of at least ``min_scales``
    scales); else the shortest such prefix of the template nearest the image's aspect ratio whose
    image covers ``height`` x ``width``, so the model never works below the output resolution (the
    image is resized to the schedule and the result back); the whole template (1M) when even that
    is smaller. :func:`.restore.tile_schedule` sets ``min_scales`` to a full tile's count, so an
    image smaller than a tile is restored as the official code restores it: squashed to the tile.
    """
    if height < 1 or width < 1:
        raise ParameterError(f"image size must be positive, got {height}x{width}")
    if height % VAE_STRIDE == 0 and width % VAE_STRIDE == 0:
        try:
            own = schedule_for_latent(height // VAE_STRIDE, width // VAE_STRIDE)
        except ParameterError:
            own = []
        if len(own) >= min_scales:
            return own
    grids = H_DIV_W_TEMPLATES[nearest_template(height / width)]
    first = min(max(min_scales, 1), len(grids))
    n = next((n for n in range(first, len(grids) + 1)
              if grids[n - 1][0] * VAE_STRIDE >= height and grids[n - 1][1] * VAE_STRIDE >= width), len(grids))
    return [(1, h, w) for h, w in grids[:n]]


def validate_schedule(schedule, latent_hw: tuple[int, int] | None = None) -> list[tuple[int, int, int]]:
    """Check a user schedule: ``(t, h, w)`` triples, growing, ending at ``latent_hw`` if given."""
    try:
        sched = [tuple(int(v) for v in s) for s in schedule]
    except (TypeError, ValueError) as e:
        raise ParameterError(f"a scale schedule is a list of (t, h, w) integer triples: {e}") from None
    if not sched or any(len(s) != 3 or min(s) < 1 for s in sched):
        raise ParameterError(f"a scale schedule is a non-empty list of positive (t, h, w) triples, got {schedule}")
    for a, b in zip(sched, sched[1:]):
        if b[1] < a[1] or b[2] < a[2]:
            raise ParameterError(f"scale schedule must not shrink: {a} is followed by {b}")
    if latent_hw is not None and tuple(sched[-1][1:]) != tuple(latent_hw):
        raise ParameterError(
            f"the schedule ends at {sched[-1][1:]} but the latent is {tuple(latent_hw)}; "
            f"the last scale must equal the latent size (image size / {VAE_STRIDE})"
        )
    return sched
