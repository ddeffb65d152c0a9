"""One-step restoration pipeline: sizes, tiling, seams, seeds, batches, interruption, CLI."""

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import var_core
from var_core import cli, restore, student, tiling
from var_core.restore import RestoreOptions
from var_core.schedules import fit_schedule, schedule_pixels

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"
pytestmark = pytest.mark.skipif(not FIXTURES.is_dir(), reason="../shared/fixtures not present")


@pytest.fixture(scope="module")
def models():
    model = var_core.load(FIXTURES / "B_varestorer_student/varestorer_tiny_lora.safetensors").model
    vae = var_core.load(FIXTURES / "A_bsq_vae/vae_tiny.safetensors").model
    return model, vae


def lq(b, h, w, seed=0):
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@torch.no_grad()
@pytest.mark.parametrize("hw,scale", [((60, 90), 2.0), ((40, 120), 1.5), ((48, 16), 3.0)])
def test_output_keeps_aspect_ratio(models, hw, scale):
    y = restore.restore_image(*models, lq(1, *hw), options=RestoreOptions(scale=scale, tile=128, overlap=16,
                                                                          sampling="argmax"))
    assert y.shape == (1, 3, round(hw[0] * scale), round(hw[1] * scale))
    assert y.min() >= -1 and y.max() <= 1


@torch.no_grad()
def test_single_tile_equals_untiled(models):
    model, vae = models
    x = lq(1, 128, 128)
    y = restore.restore_image(model, vae, x, options=RestoreOptions(scale=1.0, tile=128, sampling="argmax"))
    schedule = fit_schedule(128, 128)
    assert schedule_pixels(schedule) == (128, 128)  # on a template: no resize
    text = var_core.text.unconditional(model.cfg_uncond)
    direct = student.restore(model, vae, x, text, schedule, sample=False).image
    assert torch.equal(y, direct.clamp(-1, 1))


def bicubic(x, size):
    return F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True).clamp(-1, 1)


@torch.no_grad()
def test_image_smaller_than_a_tile_is_restored_on_the_full_tile_schedule(models):
    """A 96 x 144 image with 512 px tiles: squashed up to the 10-scale 2:3 schedule (the official
    code squashes to 512 x 512), not restored on a coarser schedule and upsampled."""
    model, vae = models
    x = lq(1, 96, 144)
    y = restore.restore_image(model, vae, x, options=RestoreOptions(scale=1.0, tile=512, sampling="argmax"))
    schedule = restore.tile_schedule(96, 144, 512)
    assert len(schedule) == len(fit_schedule(512, 512)) == 10
    assert schedule_pixels(schedule) == (416, 624)
    text = var_core.text.unconditional(model.cfg_uncond)
    direct = student.restore(model, vae, bicubic(x, (416, 624)), text, schedule, sample=False).image
    assert torch.equal(y, bicubic(direct, (96, 144)))


@torch.no_grad()
def test_out_of_memory_restores_on_the_halved_tiles_schedule(models, monkeypatch):
    """After out of memory halves the tile, pieces are restored on the smaller tile's schedule (not
    squashed back up to the first tile's, which would run out of memory again)."""
    seen, real = [], student.restore

    def restore_or_oom(model, vae, lq_B3hw, *args, **kwargs):
        seen.append(tuple(lq_B3hw.shape[-2:]))
        if lq_B3hw.shape[-1] > 128:
            raise torch.OutOfMemoryError("fake")
        return real(model, vae, lq_B3hw, *args, **kwargs)

    monkeypatch.setattr(student, "restore", restore_or_oom)
    steps = []
    y = restore.restore_image(*models, lq(1, 200, 200), options=RestoreOptions(scale=1.0, tile=256, overlap=32,
                                                                               sampling="argmax"),
                              progress=lambda d, n: steps.append((d, n)))
    assert y.shape == (1, 3, 200, 200)
    assert seen[0] == (256, 256) and set(seen[1:]) == {(128, 128)} and len(seen) == 1 + 4
    assert steps == [(i, 4) for i in range(1, 5)]


@torch.no_grad()
def test_tiled_restore_has_no_seams(models):
    tile, overlap = 128, 32
    x = lq(1, 96, 112, seed=3)
    y = restore.restore_image(*models, x, options=RestoreOptions(scale=4.0, tile=tile, overlap=overlap,
                                                                 sampling="argmax"))[0]
    H, W = y.shape[-2:]
    starts = tiling.tile_starts(W, tile, overlap)
    assert len(starts) >= 3
    # Where a tile starts and where the previous one ends (the edges of each overlap band).
    border_cols = sorted({c for a, b in zip(starts, starts[1:]) for c in (b, a + tile - 1)})
    inner_cols = [c + tile // 4 for c in border_cols if c + tile // 4 < W]
    diff = (y[:, :, 1:] - y[:, :, :-1]).abs().mean(dim=(0, 1))  # neighbour difference at column c -> c+1

    def mean_at(cols):
        return diff[[c - 1 for c in cols]].mean().item()

    across, inside = mean_at(border_cols), mean_at(inner_cols)
    assert across <= inside * 1.1 + 1e-3, f"seam: {across:.4f} across tile borders vs {inside:.4f} inside"


@torch.no_grad()
def test_seeds(models):
    x = lq(1, 64, 64)
    opts = dict(scale=1.0, tile=512, sampling="gumbel")
    a = restore.restore_image(*models, x, options=RestoreOptions(seed=1, **opts))
    b = restore.restore_image(*models, x, options=RestoreOptions(seed=1, **opts))
    c = restore.restore_image(*models, x, options=RestoreOptions(seed=2, **opts))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@torch.no_grad()
@pytest.mark.parametrize("sampling", ["gumbel", "argmax"])
def test_batch_of_two_equals_two_singles(models, sampling):
    x = torch.cat([lq(1, 64, 96, seed=5), lq(1, 64, 96, seed=6)])
    opts = dict(scale=2.0, tile=96, overlap=16, sampling=sampling)
    batch = restore.restore_image(*models, x, options=RestoreOptions(seed=10, **opts))
    first = restore.restore_image(*models, x[:1], options=RestoreOptions(seed=10, **opts))
    second = restore.restore_image(*models, x[1:], options=RestoreOptions(seed=11, **opts))
    torch.testing.assert_close(batch, torch.cat([first, second]), atol=1e-4, rtol=0)


@torch.no_grad()
def test_interruption_stops_between_tiles(models):
    done = []

    class Interrupted(Exception):
        pass

    def check():
        if len(done) == 2:
            raise Interrupted

    with pytest.raises(Interrupted):
        restore.restore_image(*models, lq(1, 64, 64), options=RestoreOptions(scale=4.0, tile=96, overlap=16),
                              progress=lambda d, n: done.append((d, n)), check_interrupt=check)
    assert done == [(1, 9), (2, 9)]


@torch.no_grad()
def test_restore_from_pyramid(models):
    model, vae = models
    p = var_core.pyramid.encode_image(vae, lq(2, 48, 80))
    y = restore.restore_pyramid(model, vae, p, options=RestoreOptions(scale=2.0, sampling="argmax", color_fix="adain"))
    assert y.shape == (2, 3, 96, 160)


@pytest.mark.reliability
@pytest.mark.parametrize("kwargs,match", [
    (dict(scale=0), "scale"), (dict(scale=-2), "scale"), (dict(scale=100), "scale"),
    (dict(tile=128, overlap=128), "overlap"), (dict(sampling="greedy"), "sampling"),
    (dict(color_fix="magic"), "color_fix"), (dict(tau=0), "tau"),
])
def test_bad_options(kwargs, match):
    with pytest.raises(var_core.ParameterError, match=match):
        RestoreOptions(**kwargs)


@pytest.mark.reliability
def test_output_too_large_is_refused(models):
    with pytest.raises(var_core.ParameterError, match="lower the scale"):
        restore.restore_image(*models, torch.zeros(1, 3, 4000, 3000), options=RestoreOptions(scale=8.0))


def _weights_folder(tmp_path) -> Path:
    w = tmp_path / "weights"
    w.mkdir()
    (w / "varestorer.safetensors").symlink_to(FIXTURES / "B_varestorer_student/varestorer_tiny_lora.safetensors")
    (w / "infinity_vae_d32reg.pth").symlink_to(FIXTURES / "A_bsq_vae/vae_tiny.pth")
    (w / "general_swinir_v1.ckpt").symlink_to(FIXTURES / "G_swinir/swinir_tiny.ckpt")
    return w


def test_cli_restore(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 60, 4), dtype=np.uint8), "RGBA").save(src / "a.png")
    out = tmp_path / "out"
    rc = cli.main(["restore", str(src), "-o", str(out), "--weights", str(_weights_folder(tmp_path)), "--scale", "2",
                   "--tile", "64", "--overlap", "16", "-q"])
    assert rc == 0
    with Image.open(out / "a.png") as im:
        assert im.size == (120, 80) and im.mode == "RGBA"


@pytest.mark.reliability
def test_cli_missing_files_are_named(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    img = tmp_path / "x.png"
    Image.new("RGB", (32, 32)).save(img)
    assert cli.main(["restore", str(img), "-o", str(tmp_path / "o"), "--weights", str(empty)]) == 2
    assert "VARestorer model not found" in capsys.readouterr().err
    assert cli.main(["restore", str(tmp_path / "nope.png"), "-o", str(tmp_path / "o"), "--weights", str(empty)]) == 2
    assert "no such file" in capsys.readouterr().err
    w = _weights_folder(tmp_path)
    assert cli.main(["restore", str(img), "-o", str(tmp_path / "o"), "--weights", str(w), "--prompt", "a dog"]) == 2
    assert "T5 text encoder folder not found" in capsys.readouterr().err
