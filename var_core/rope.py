"""2-D rotary position embedding of Infinity's self-attention.

Paper: Han et al., "Infinity: Scaling Bitwise AutoRegressive Modeling for High-Resolution Image
Synthesis" (CVPR 2025). The format follows ``precompute_rope2d_freqs_grid``/``apply_rotary_emb``
in ``infinity/models/basic.py`` of EternalEvan/VARestorer (= FoundationVision/Infinity) with
``rope2d_normalized_by_hw=2`` ("star" normalisation), the setting of every released model.

Each head's ``c`` channels form ``c/2`` adjacent pairs; the first ``c/4`` pairs rotate with the
token's row, the last ``c/4`` with its column. Positions come from one table per aspect-ratio
template, built over that template's **1M** schedule (13 scales) whatever schedule is run: a
token of scale ``(h, w)`` at ``(i, j)`` sits at grid row ``round(i * H / h)`` and column
``round(j * W / w)``, ``(H, W)`` being the last 1M scale. A sequence of length ``L`` takes the
first ``L`` entries of the table (tokens past the schedule's end, as in VARestorer's long input,
take the entries of the next 1M scales).
"""

from __future__ import annotations

import torch
from einops import rearrange

from .errors import ParameterError
from .schedules import H_DIV_W_TEMPLATES, PIXEL_BUDGETS

# Not stored in the weights: the official constants.
ROPE_THETA = 10000.0
ROPE_GRID = 2048 // 16  # side of the precomputed position grid (max_height = max_width = 128)


def template_grids(schedule) -> tuple[tuple[int, int], ...]:
    """The 1M grids of the aspect-ratio template ``schedule`` belongs to.

    The official cache is keyed by the exact schedules of every pixel budget (0.06M, 0.25M, 0.60M,
    1M) of every template, which never collide. Other prefixes of a template (an extension) use
    the template whose last scale has the nearest aspect ratio.
    """
    hw = tuple((int(h), int(w)) for _, h, w in schedule)
    budgets = set(PIXEL_BUDGETS.values())
    candidates = [g for g in H_DIV_W_TEMPLATES.values() if g[: len(hw)] == hw]
    if not candidates:
        raise ParameterError(f"the scale schedule {list(schedule)} is not a prefix of any Infinity template")
    exact = [g for g in candidates if len(hw) in budgets]
    h, w = hw[-1]
    return min(exact or candidates, key=lambda g: abs(g[-1][0] / g[-1][1] - h / w))[: PIXEL_BUDGETS["1M"]]


def rope_table(head_dim: int, grids, *, theta: float = ROPE_THETA, grid: int = ROPE_GRID) -> torch.Tensor:
    """``(2, L, head_dim/2)`` float32 table (cos, sin) for the token sequence of ``grids`` (h, w)."""
    if head_dim % 4:
        raise ParameterError(f"2-D RoPE needs a head dim divisible by 4, got {head_dim}")
    half = head_dim // 2
    inv_freq = 1.0 / (theta ** (torch.arange(0, half, 2, dtype=torch.int64).float() / half))
    freqs_GF = torch.outer(torch.arange(grid, dtype=torch.int64).float(), inv_freq)
    cos_sin_2GF = torch.stack([torch.cos(freqs_GF), torch.sin(freqs_GF)])
    last_h, last_w = grids[-1]
    rows, cols = [], []
    for h, w in grids:
        r = (torch.arange(h) * (last_h / h)).round().long()
        c = (torch.arange(w) * (last_w / w)).round().long()
        rows.append(r[:, None].expand(h, w).reshape(-1))
        cols.append(c[None, :].expand(h, w).reshape(-1))
    rows_L, cols_L = torch.cat(rows), torch.cat(cols)
    return torch.cat([cos_sin_2GF[:, rows_L], cos_sin_2GF[:, cols_L]], dim=-1)


def apply_rope(x_BHLc: torch.Tensor, table_2Lc: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs of ``x`` by the ``(2, L, c/2)`` (cos, sin) table (float32)."""
    cos, sin = table_2Lc.to(x_BHLc.device).unbind(0)
    pairs = rearrange(x_BHLc.float(), "B H L (c two) -> B H L c two", two=2)
    x0, x1 = pairs.unbind(-1)
    out = torch.stack([cos * x0 - sin * x1, sin * x0 + cos * x1], dim=-1)
    return rearrange(out, "B H L c two -> B H L (c two)").to(x_BHLc.dtype)


def scale_aligned_rope_table(head_dim: int, grid_sides, *, theta: float = ROPE_THETA, grid: float = 32.0) -> torch.Tensor:
    """VARSR's scale-aligned 2-D RoPE table ``(2, L, head_dim/2)`` (cos, sin), for :func:`apply_rope`.

    Qu et al., "Visual Autoregressive Modeling for Image Super-Resolution" (ICML 2025), following
    ``precompute_freqs_cis`` in ``models/basic_var.py`` of qyp2000/VARSR. The frequencies and the
    channel layout are those of :func:`rope_table` (rows on the first ``c/4`` pairs, columns on the
    last ``c/4``), but positions are not rounded onto a common grid: cell ``(i, j)`` of a ``p x p``
    scale sits at the fractional position ``(i * grid / p, j * grid / p)``, ``grid`` being the
    official constant 32 whatever the schedule. ``grid_sides`` lists the square scales of the
    sequence in order (VARSR: the LR prefix grid ``p_K``, then ``p_1, p_2, ...``).
    """
    if head_dim % 4:
        raise ParameterError(f"2-D RoPE needs a head dim divisible by 4, got {head_dim}")
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 4)[: head_dim // 4].float() / head_dim))
    rows, cols = [], []
    for p in grid_sides:
        i, j = torch.meshgrid(torch.arange(p), torch.arange(p), indexing="ij")
        rows.append(i.reshape(-1) / p * grid)
        cols.append(j.reshape(-1) / p * grid)
    angles_LF = torch.cat([torch.outer(torch.cat(rows), inv_freq), torch.outer(torch.cat(cols), inv_freq)], dim=1)
    return torch.stack([torch.cos(angles_LF), torch.sin(angles_LF)])
