"""Scale schedules (Infinity templates) and IMAGE conversions (gray, RGBA, 16-bit, NaN, empty)."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

import var_core
from var_core import image, schedules


def test_templates_cover_both_orientations():
    assert len(schedules.H_DIV_W_TEMPLATES) == 15
    for ratio, grids in schedules.H_DIV_W_TEMPLATES.items():
        h, w = grids[-1]
        assert abs(h / w - ratio) < 0.02
        assert len(grids) == max(schedules.PIXEL_BUDGETS.values())


def test_schedule_budgets():
    assert schedules.scale_schedule(1.0, "0.06M")[-1] == (1, 16, 16)
    assert schedules.scale_schedule(1.0, "1M")[-1] == (1, 64, 64)
    assert len(schedules.scale_schedule(0.666, "0.25M")) == 10
    with pytest.raises(var_core.ParameterError, match="pixel budget"):
        schedules.scale_schedule(1.0, "2M")


def test_schedule_for_latent_prefix():
    assert schedules.schedule_for_latent(6, 9) == [(1, 1, 1), (1, 2, 2), (1, 2, 3), (1, 4, 6), (1, 6, 9)]
    with pytest.raises(var_core.ParameterError, match="no Infinity schedule"):
        schedules.schedule_for_latent(7, 5)


@given(h=st.integers(16, 4000), w=st.integers(16, 4000))
@settings(max_examples=200, deadline=None)
def test_fit_schedule_is_valid_and_follows_the_nearest_template(h, w):
    """The image's own grid, or a prefix of the template nearest its aspect ratio (whose first
    grids are square: a 16 x 18 image gets 1x1, 2x2 of the 4:5 template)."""
    sched = schedules.fit_schedule(h, w)
    schedules.validate_schedule(sched)
    grids = tuple((gh, gw) for _, gh, gw in sched)
    template = schedules.H_DIV_W_TEMPLATES[schedules.nearest_template(h / w)]
    assert schedules.schedule_pixels(sched) == (h, w) or grids == template[: len(grids)]


@given(h=st.integers(16, 1200), w=st.integers(16, 1200), min_scales=st.integers(1, 13))
@settings(max_examples=200, deadline=None)
def test_fit_schedule_covers_the_image_with_enough_scales(h, w, min_scales):
    """Never restored below the image's resolution (unless even the 1M template is smaller), never
    on fewer scales than asked, and an image on its own template grid is not resized."""
    sched = schedules.fit_schedule(h, w, min_scales=min_scales)
    th, tw = schedules.schedule_pixels(sched)
    assert len(sched) >= min_scales
    whole = len(sched) == max(schedules.PIXEL_BUDGETS.values())
    assert (th >= h and tw >= w) or whole
    shorter = sched[:-1]
    if shorter and len(shorter) >= min_scales and (th, tw) != (h, w):  # the shortest prefix that covers
        sh, sw = schedules.schedule_pixels(shorter)
        assert sh < h or sw < w


@pytest.mark.parametrize("hw,min_scales,expected", [
    ((480, 512), 10, (512, 512)),  # a 480 px side in 512 px tiles: squashed up, not down to 256
    ((400, 400), 10, (512, 512)),
    ((512, 448), 10, (560, 448)),  # nearest template 5:4
    ((96, 144), 1, (96, 144)),  # on a template: its own grid
    ((96, 144), 10, (416, 624)),
    ((256, 256), 7, (256, 256)),
    ((100, 100), 5, (128, 128)),
    ((3000, 3000), 1, (1024, 1024)),  # beyond the 1M template: the whole template
])
def test_fit_schedule_examples(hw, min_scales, expected):
    assert schedules.schedule_pixels(schedules.fit_schedule(*hw, min_scales=min_scales)) == expected


def test_tile_schedule_uses_a_full_tiles_scale_count():
    from var_core import restore

    assert len(restore.tile_schedule(512, 512, 512)) == 10
    assert schedules.schedule_pixels(restore.tile_schedule(480, 512, 512)) == (512, 512)
    assert schedules.schedule_pixels(restore.tile_schedule(256, 256, 256)) == (256, 256)  # a halved tile
    assert restore.tile_pixels(480, 2000, 512) == (512, 512)
    assert restore.tile_pixels(1000, 2000, 512) == (512, 512)


@pytest.mark.reliability
@pytest.mark.parametrize("bad", [[], [(1, 2)], [(1, 4, 4), (1, 2, 2)], [(0, 1, 1)], "abc"])
def test_bad_schedules(bad):
    with pytest.raises(var_core.ParameterError):
        schedules.validate_schedule(bad)


def test_split_alpha_gray_rgb_rgba():
    g = torch.Generator().manual_seed(0)
    gray = torch.rand(2, 8, 9, 1, generator=g)
    rgb, a = image.split_alpha(gray)
    assert rgb.shape == (2, 8, 9, 3) and a is None and torch.equal(rgb[..., 0], rgb[..., 2])
    rgba = torch.rand(1, 8, 9, 4, generator=g)
    rgb, a = image.split_alpha(rgba)
    assert torch.equal(a, rgba[..., 3:]) and torch.equal(rgb, rgba[..., :3])
    merged = image.merge_alpha(torch.zeros(1, 16, 18, 3), a)
    assert merged.shape == (1, 16, 18, 4)


@pytest.mark.reliability
@pytest.mark.parametrize(
    "tensor,match",
    [
        (torch.zeros(0, 8, 8, 3), "empty"),
        (torch.zeros(1, 8, 8, 5), "5 channels"),
        (torch.full((1, 8, 8, 3), float("nan")), "NaN or Inf"),
        (torch.full((1, 8, 8, 3), float("inf")), "NaN or Inf"),
        (torch.zeros(8, 8), "batch, height, width, channels"),
    ],
)
def test_bad_images(tensor, match):
    with pytest.raises(var_core.ImageInputError, match=match):
        image.split_alpha(tensor)


def test_model_range_round_trip():
    x = torch.rand(1, 5, 7, 3)
    torch.testing.assert_close(image.from_model(image.to_model(x)), x)


@pytest.mark.reliability
def test_load_16bit_gray_and_rgba_png(tmp_path):
    arr16 = (np.arange(64 * 48, dtype=np.uint16).reshape(48, 64) * 21).astype(np.uint16)
    p16 = tmp_path / "g16.png"
    Image.fromarray(arr16).save(p16)
    img = image.load_image_file(p16)
    assert img.shape == (1, 48, 64, 3)
    assert abs(img[0, -1, -1, 0].item() - arr16[-1, -1] / 65535) < 1e-4
    rgba = np.zeros((10, 12, 4), dtype=np.uint8)
    rgba[..., 3] = 128
    prgba = tmp_path / "a.png"
    Image.fromarray(rgba, "RGBA").save(prgba)
    img = image.load_image_file(prgba)
    assert img.shape == (1, 10, 12, 4) and abs(img[0, 0, 0, 3].item() - 128 / 255) < 1e-6


@pytest.mark.reliability
def test_load_image_errors(tmp_path):
    with pytest.raises(var_core.ImageInputError, match="not found"):
        image.load_image_file(tmp_path / "none.png")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(var_core.ImageInputError, match="cannot read"):
        image.load_image_file(bad)
