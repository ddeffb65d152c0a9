"""The demo model shipped in ``var_core/demo``: the README main command runs with no weights at all."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import var_core
from var_core import cli, demo
from var_core.detect import Family

pytestmark = [pytest.mark.skipif(bool(demo.missing_files()), reason="demo model files not in this checkout"),
              pytest.mark.usefixtures("one_thread")]


@pytest.fixture
def small_png(tmp_path):
    """A 40x32 photo-like input (a crop of a gradient with a few edges)."""
    yy, xx = np.mgrid[0:32, 0:40]
    img = np.stack([xx * 6, yy * 7, ((xx // 8 + yy // 8) % 2) * 200], -1).clip(0, 255).astype(np.uint8)
    path = tmp_path / "small.png"
    Image.fromarray(img).save(path)
    return path


def test_files_are_small_safetensors_of_the_official_families():
    assert demo.STUDENT.suffix == demo.VAE.suffix == ".safetensors"
    assert demo.STUDENT.stat().st_size + demo.VAE.stat().st_size <= 25 * 2**20
    student = var_core.load(demo.STUDENT)
    assert student.family == Family.INFINITY and student.model.lora_state == "adapters"
    vae = var_core.load(demo.VAE)
    assert vae.family == Family.INFINITY_BSQ_VAE and vae.config.codebook_dim == student.config.codebook_dim
    card = demo.MODEL_CARD.read_text()
    for needed in ("PSNR", "SSIM", "scikit-image", "python -m var_core train", "licen"):
        assert needed in card, needed


@pytest.mark.parametrize("iterative", [False, True], ids=["one-step", "iterative"])
def test_restore_without_weights_uses_the_demo_and_says_so(small_png, tmp_path, caplog, iterative):
    argv = ["restore", str(small_png), "-o", str(tmp_path / "out"), "-q"] + (["--iterative"] if iterative else [])
    with caplog.at_level("WARNING", logger="var_core"):
        assert cli.main(argv) == 0
    assert "DEMO model" in caplog.text and "--weights" in caplog.text
    with Image.open(tmp_path / "out" / "small.png") as out:
        assert out.size == (160, 128)
        pixels = np.asarray(out, dtype=np.float32)
    assert pixels.std() > 5  # an image, not a flat colour


def test_given_weights_do_not_fall_back(tmp_path, small_png, capsys):
    argv = ["restore", str(small_png), "-o", str(tmp_path / "out"), "--weights", str(tmp_path), "-q"]
    assert cli.main(argv) == 2
    assert "VARestorer model not found" in capsys.readouterr().err


def test_missing_demo_files_are_named(tmp_path, small_png, monkeypatch, capsys):
    monkeypatch.setattr(demo, "STUDENT", tmp_path / "gone.safetensors")
    assert cli.main(["restore", str(small_png), "-o", str(tmp_path / "out"), "-q"]) == 2
    err = capsys.readouterr().err
    assert "demo model is missing" in err and "gone.safetensors" in err and "--weights" in err
