"""Tiling (positions, blending, interruption, OOM retry) and colour fix."""

import pytest
import torch
import torch.nn.functional as F

import var_core
from var_core import colorfix, tiling


@pytest.mark.parametrize("length,tile,overlap", [(1200, 512, 64), (513, 512, 64), (4000, 256, 255), (300, 512, 0)])
def test_tiles_cover_with_full_size_and_overlap(length, tile, overlap):
    starts = tiling.tile_starts(length, tile, overlap)
    size = min(tile, length)
    assert starts[0] == 0 and starts[-1] + size == length
    for a, b in zip(starts, starts[1:]):
        assert size - (b - a) >= overlap


@pytest.mark.reliability
@pytest.mark.parametrize("tile,overlap", [(64, 64), (64, 100), (0, 0), (64, -1)])
def test_bad_tile_parameters(tile, overlap):
    with pytest.raises(var_core.ParameterError):
        tiling.tile_starts(1000, tile, overlap)


def test_single_tile_is_exactly_untiled():
    x = torch.rand(2, 3, 200, 300)
    fn = lambda t: t.flip(-1) * 0.5  # noqa: E731 - not translation invariant, so only an untiled call matches
    assert torch.equal(tiling.run_tiled(fn, x, tile=512, overlap=64), fn(x))


def test_pointwise_fn_blends_back_exactly():
    x = torch.rand(1, 3, 700, 900)
    y = tiling.run_tiled(lambda t: t * 2 - 1, x, tile=256, overlap=48)
    torch.testing.assert_close(y, x * 2 - 1, atol=1e-5, rtol=1e-5)


def test_tiles_on_a_coarser_grid_than_the_input_or_the_output():
    """The VAE's tiling: tiles counted in 16-pixel latent cells; a cell-local ``fn`` (16x16 average
    pooling, 16x nearest upsampling) blends back to its whole-image result."""
    x = torch.rand(1, 3, 40 * 16, 56 * 16)
    pool = lambda t: F.avg_pool2d(t, 16)  # noqa: E731
    torch.testing.assert_close(tiling.run_tiled(pool, x, tile=16, overlap=4, in_scale=16), pool(x))
    z = torch.rand(1, 4, 40, 56)
    up = lambda t: F.interpolate(t, scale_factor=16, mode="nearest")  # noqa: E731
    torch.testing.assert_close(tiling.run_tiled(up, z, tile=16, overlap=4, out_scale=16), up(z))
    with pytest.raises(var_core.ParameterError, match="16-pixel grid cells"):
        tiling.run_tiled(pool, x[..., :-8], tile=16, overlap=4, in_scale=16)


def test_progress_and_interrupt_between_tiles():
    seen, calls = [], []

    class Stop(Exception):
        pass

    def check():
        if len(calls) == 3:
            raise Stop

    def fn(t):
        calls.append(t.shape)
        return t

    with pytest.raises(Stop):
        tiling.run_tiled(fn, torch.rand(1, 3, 600, 600), tile=256, overlap=32,
                         progress=lambda d, n: seen.append((d, n)), check_interrupt=check)
    assert len(calls) == 3 and seen[-1] == (3, 9)


def test_out_of_memory_halves_the_tile():
    sizes = []

    def fn(t):
        sizes.append(t.shape[-1])
        if t.shape[-1] > 128:
            raise torch.OutOfMemoryError("fake")
        return t

    x = torch.rand(1, 3, 300, 300)
    y = tiling.run_tiled_with_retry(fn, x, tile=512, overlap=64)
    torch.testing.assert_close(y, x)
    assert sizes[0] == 300 and sizes[1] == 256 and sizes[-1] == 128
    with pytest.raises(torch.OutOfMemoryError):
        tiling.run_tiled_with_retry(fn, x, tile=512, overlap=64, min_tile=256)


@pytest.mark.parametrize("mode", ["wavelet", "adain"])
def test_color_fix_moves_colours_to_reference(mode):
    g = torch.Generator().manual_seed(0)
    ref = torch.rand(1, 3, 32, 32, generator=g) * 0.2 + torch.tensor([0.7, 0.1, 0.4]).view(1, 3, 1, 1)
    x = torch.rand(1, 3, 128, 128, generator=g)
    y = colorfix.color_fix(x, ref, mode)
    assert (y.mean((2, 3)) - ref.mean((2, 3))).abs().max() < 0.05
    assert colorfix.color_fix(x, ref, "none") is x
    with pytest.raises(var_core.ParameterError):
        colorfix.color_fix(x, ref, "bogus")
