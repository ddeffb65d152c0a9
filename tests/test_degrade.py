"""The training degradation pipeline, the paired dataset and the ``train preview`` command."""

from __future__ import annotations

import argparse
import dataclasses
import math

import numpy as np
import pytest
import torch
from PIL import Image

from var_core.errors import ImageInputError, ParameterError
from var_core.training import preview
from var_core.training.data import PairDataset
from var_core.training.degrade import (DegradationConfig, add_noise, blur, degrade, gaussian_kernel, jpeg,
                                       random_kernel)

IDENTITY = DegradationConfig(blur_sigma=(0.1, 0.1), downsample=(1, 1), noise_sigma=(0, 0), jpeg_quality=(100, 100))


def _textured(h: int = 64, w: int = 64, seed: int = 0) -> torch.Tensor:
    """Smooth colours with fine grey detail (which JPEG's chroma subsampling keeps), (3, h, w) in [0, 1]."""
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    base = torch.stack([xx, yy, 0.5 + 0.3 * torch.sin(6 * xx + 4 * yy)])
    fine = torch.rand(1, h, w, generator=torch.Generator().manual_seed(seed))
    return (0.8 * base + 0.2 * fine).clamp(0, 1)


def _high_freq_energy(x_3HW: torch.Tensor) -> float:
    return float((x_3HW[..., 1:] - x_3HW[..., :-1]).pow(2).mean() + (x_3HW[:, 1:] - x_3HW[:, :-1]).pow(2).mean())


def test_degrade_is_deterministic_and_in_range():
    hq = _textured()
    config = DegradationConfig()
    a = degrade(hq, config, torch.Generator().manual_seed(3))
    b = degrade(hq, config, torch.Generator().manual_seed(3))
    c = degrade(hq, config, torch.Generator().manual_seed(4))
    assert a.shape == hq.shape and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert a.min() >= 0 and a.max() <= 1


def test_degrade_accepts_uint8_hwc_and_rejects_bad_shapes():
    hq = _textured(40, 56)
    hq_u8 = (hq * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    out = degrade(hq_u8, DegradationConfig(), torch.Generator().manual_seed(0))
    assert out.shape == (3, 40, 56)
    with pytest.raises(ImageInputError, match="float"):
        degrade(torch.rand(40, 56, 3), DegradationConfig(), torch.Generator())
    with pytest.raises(ImageInputError, match="uint8"):
        degrade(torch.zeros(3, 40, 56, dtype=torch.uint8), DegradationConfig(), torch.Generator())


def test_near_identity_config():
    hq = _textured()
    out = degrade(hq, IDENTITY, torch.Generator().manual_seed(0))
    assert (out - hq).abs().mean() < 0.02


def test_kernels_sum_to_one_and_have_the_configured_size():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        k = random_kernel(DegradationConfig(), g)
        assert k.shape == (41, 41)
        assert math.isclose(float(k.sum()), 1.0, abs_tol=1e-5)
        assert (k >= 0).all()
    assert random_kernel(DegradationConfig(kernel_size=21), g).shape == (21, 21)


def test_anisotropic_kernel_is_elongated_and_rotated():
    k = gaussian_kernel(41, 6.0, 1.0)  # wide along x
    assert k[20, :].sum() > 3 * k[:, 20].sum()
    k90 = gaussian_kernel(41, 6.0, 1.0, math.pi / 2)  # rotated: wide along y
    assert torch.allclose(k90, k.T, atol=1e-6)
    iso = random_kernel(DegradationConfig(kernel_kinds=("iso",), kernel_probs=(1.0,)), torch.Generator().manual_seed(1))
    assert torch.allclose(iso, iso.T, atol=1e-7)


def test_blur_reduces_high_frequency_energy():
    hq = _textured()
    blurred = blur(hq, gaussian_kernel(41, 3.0, 3.0))
    assert blurred.shape == hq.shape
    assert _high_freq_energy(blurred) < 0.2 * _high_freq_energy(hq)
    flat = torch.full((3, 32, 32), 0.4)
    assert torch.allclose(blur(flat, gaussian_kernel(41, 5.0, 2.0, 0.7)), flat, atol=1e-5)


def test_noise_increases_variance_of_a_flat_image():
    flat = torch.full((3, 64, 64), 0.5)
    noisy = add_noise(flat, 15.0, torch.Generator().manual_seed(0))
    assert math.isclose(float(noisy.std()), 15 / 255, rel_tol=0.1)
    assert torch.equal(add_noise(flat, 0.0, torch.Generator()), flat)


def test_jpeg_low_quality_changes_the_image_more():
    hq = _textured()
    err30 = (jpeg(hq, 30) - hq).abs().mean()
    err100 = (jpeg(hq, 100) - hq).abs().mean()
    assert err30 > 2 * err100
    assert err100 < 0.02


def test_downsampling_removes_detail():
    hq = _textured()
    config = DegradationConfig(blur_sigma=(0.1, 0.1), downsample=(8, 8), noise_sigma=(0, 0), jpeg_quality=(100, 100))
    for mode in ("area", "bilinear", "bicubic"):
        out = degrade(hq, dataclasses.replace(config, interpolations=(mode,)), torch.Generator())
        assert out.shape == hq.shape
        assert _high_freq_energy(out) < 0.2 * _high_freq_energy(hq)


def test_config_rejects_bad_ranges():
    with pytest.raises(ParameterError, match="kernel_size"):
        DegradationConfig(kernel_size=40)
    with pytest.raises(ParameterError, match="downsample"):
        DegradationConfig(downsample=(4, 2))
    with pytest.raises(ParameterError, match="jpeg_quality"):
        DegradationConfig(jpeg_quality=(0, 100))
    with pytest.raises(ParameterError, match="interpolations"):
        DegradationConfig(interpolations=("nearest",))
    with pytest.raises(ParameterError, match="kernel_probs"):
        DegradationConfig(kernel_probs=(1.0,))


@pytest.fixture
def image_folder(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    Image.fromarray(rng.integers(0, 256, (80, 96, 3), dtype=np.uint8)).save(root / "rgb.png")
    Image.fromarray(rng.integers(0, 256, (72, 70), dtype=np.uint8)).save(root / "sub" / "gray.jpg")
    Image.fromarray(rng.integers(0, 256, (64, 90, 4), dtype=np.uint8), "RGBA").save(root / "sub" / "rgba.png")
    Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(root / "small.bmp")
    (root / "notes.txt").write_text("not an image")
    return root


def test_pair_dataset_items(image_folder):
    ds = PairDataset(image_folder, size=48, seed=1)
    assert len(ds) == 4
    assert [p.relative_to(image_folder).as_posix() for p in ds.paths] == [
        "rgb.png", "small.bmp", "sub/gray.jpg", "sub/rgba.png"]
    for i in range(len(ds)):
        item = ds[i]
        assert set(item) == {"hq", "lq", "path"}
        for key in ("hq", "lq"):
            assert item[key].shape == (3, 48, 48) and item[key].dtype == torch.float32
            assert item[key].min() >= -1 and item[key].max() <= 1
        assert item["path"] == str(ds.paths[i])
    gray = ds[2]["hq"]
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])


def test_pair_dataset_random_state_depends_on_seed_epoch_index(image_folder):
    ds = PairDataset(image_folder, size=32, seed=5)
    first = ds[3]
    ds[0], ds[2]  # other items in between do not change item 3
    again = PairDataset(image_folder, size=32, seed=5)[3]
    assert torch.equal(first["hq"], again["hq"]) and torch.equal(first["lq"], again["lq"])
    assert torch.equal(ds[3]["lq"], first["lq"])
    ds.set_epoch(1)
    assert not torch.equal(ds[3]["lq"], first["lq"])
    other_seed = PairDataset(image_folder, size=32, seed=6)[3]
    assert not torch.equal(other_seed["lq"], first["lq"])


def test_channel_shuffle_permutes_the_crop_channels(image_folder):
    """Same crop and flip as without the option, channels in a drawn order (not always the same)."""
    plain = PairDataset(image_folder, size=32, seed=2)
    shuffled = PairDataset(image_folder, size=32, seed=2, channel_shuffle=True)
    orders = set()
    for i in range(len(plain)):
        a, b = plain[i]["hq"], shuffled[i]["hq"]
        order = next(p for p in ((0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0))
                     if torch.equal(a[list(p)], b))
        orders.add(order)
    assert len(orders) > 1


def test_pair_dataset_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("x")
    with pytest.raises(ImageInputError, match="no images"):
        PairDataset(tmp_path / "empty")
    with pytest.raises(ImageInputError, match="does not exist"):
        PairDataset(tmp_path / "missing")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ImageInputError, match="broken.png"):
        PairDataset(tmp_path / "bad")[0]


def test_preview_writes_side_by_side_pairs(image_folder, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    preview.add_parser(parser.add_subparsers(dest="command"))
    out = tmp_path / "preview"
    args = parser.parse_args(["preview", "--data", str(image_folder), "-o", str(out), "--count", "5", "--size", "32"])
    assert args.func(args) == 0
    files = sorted(out.glob("pair_*.png"))
    assert [f.name for f in files] == [f"pair_{i:03d}.png" for i in range(5)]
    with Image.open(files[0]) as im:
        assert im.size == (64, 32) and im.mode == "RGB"
    assert "pair_004.png" in capsys.readouterr().out
