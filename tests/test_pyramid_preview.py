"""var_core's pyramid preview: per-scale progressive decode and the frame grid."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import FIXTURE_VAE, FIXTURES

import var_core
from var_core import image as var_image
from var_core import pyramid as var_pyramid


@pytest.fixture(scope="module")
def vae():
    return var_core.load(FIXTURE_VAE, expect=var_core.Family.INFINITY_BSQ_VAE).model


@pytest.fixture(scope="module")
def pyramid(vae):
    """Two different 96x144 images (a 5-scale 2:3 schedule), to be decoded at 90x140."""
    x = var_image.load_image_file(FIXTURES / "A_bsq_vae" / "rect96x144_input.png")[..., :3]
    with torch.inference_mode():
        pyr = var_pyramid.encode_image(vae, var_image.to_model(torch.cat([x, x.flip(2)])))
    return dataclasses.replace(pyr, image_size=(90, 140))


def test_progressive_decode_frames(vae, pyramid):
    steps = []
    with torch.inference_mode():
        frames = var_pyramid.progressive_decode(vae, pyramid, progress=lambda done, of: steps.append((done, of)))
        whole = var_pyramid.decode_pyramid(vae, pyramid)
        fitted = var_pyramid.progressive_decode(vae, pyramid, restore_size=False)
    n = len(pyramid.schedule)
    assert frames.shape == (2, n, 3, 90, 140)
    assert fitted.shape == (2, n, 3, *pyramid.fitted_size)
    assert steps == [(k + 1, n) for k in range(n)]
    assert torch.equal(frames[:, -1], whole)  # the last frame is the decoded pyramid
    assert frames.min() >= -1 and frames.max() <= 1
    # Scale after scale the frames approach the full image; the first is nearly flat colour.
    errors = [(frames[:, k] - whole).abs().mean().item() for k in range(n)]
    assert errors[0] > errors[-2] > errors[-1] == 0
    # Frame k only depends on the first k + 1 scales.
    changed = dataclasses.replace(pyramid, bits=[*pyramid.bits[:3], *(1 - b for b in pyramid.bits[3:])])
    with torch.inference_mode():
        again = var_pyramid.progressive_decode(vae, changed, restore_size=False)
    assert torch.equal(again[:, :3], fitted[:, :3]) and not torch.equal(again[:, 3], fitted[:, 3])


def test_progressive_decode_refuses_a_foreign_pyramid(vae, pyramid):
    wrong = var_pyramid.Pyramid(schedule=pyramid.schedule, bits=[b[..., :8] for b in pyramid.bits],
                                image_size=pyramid.image_size)
    with pytest.raises(var_core.ImageInputError, match="preview it with the VAE that encoded it"):
        var_pyramid.progressive_decode(vae, wrong)


def test_frame_grid_layout():
    frames = torch.arange(5, dtype=torch.float32).view(5, 1, 1, 1).expand(5, 2, 3, 3)
    grid = var_pyramid.frame_grid(frames, 2)
    assert grid.shape == (1, 6, 6, 3)
    cells = grid[0, ::2, ::3, 0]  # one value per cell, row by row
    assert cells.tolist() == [[0, 1], [2, 3], [4, 0]]  # the empty cell is black
    assert var_pyramid.frame_grid(frames, 9).shape == (1, 2, 15, 3)  # at most N columns
    with pytest.raises(var_core.ParameterError):
        var_pyramid.frame_grid(frames, 0)
    assert var_pyramid.auto_columns(1, 13) == 4 and var_pyramid.auto_columns(1, 5) == 3
    assert var_pyramid.auto_columns(3, 5) == 5  # one row per image
