"""Any-size VARSR and RestoreVAR restoration through the shared tiles, the family dispatcher,
class-conditional VAR generation, and their command lines (fixtures D, E, F; CPU, fast)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import var_core
from var_core import cli, family_restore as fr
from var_core import image as image_io
from var_core import restore
from var_core.restore import RestoreOptions, tile_seeds
from var_core.restorevar_restore import restorevar_restore
from var_core.varsr_restore import varsr_restore

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"
D, E, F = FIXTURES / "D_var", FIXTURES / "E_varsr", FIXTURES / "F_restorevar"
A_VAE = FIXTURES / "A_bsq_vae" / "vae_tiny.safetensors"
STUDENT = FIXTURES / "B_varestorer_student" / "varestorer_tiny_lora.safetensors"

pytestmark = pytest.mark.skipif(not all((p / "manifest.json").is_file() for p in (D, E, F)),
                                reason="fixture folders D_var, E_varsr, F_restorevar are absent")


@pytest.fixture(scope="module")
def varsr():
    return (var_core.load(E / "varsr_tiny.safetensors", expect=var_core.Family.VARSR).model,
            var_core.load(E / "vqvae_tiny.safetensors", expect=var_core.Family.VAR_VQVAE).model)


@pytest.fixture(scope="module")
def restorevar():
    return (var_core.load(F / "restorevar_tiny.safetensors", expect=var_core.Family.RESTOREVAR).model,
            var_core.load(F / "vqvae_tiny.safetensors", expect=var_core.Family.VAR_VQVAE).model)


@pytest.fixture(scope="module")
def var():
    return (var_core.load(D / "var_tiny.safetensors", expect=var_core.Family.VAR).model,
            var_core.load(D / "vqvae_tiny.safetensors", expect=var_core.Family.VAR_VQVAE).model)


def lq(b, h, w, seed=0):
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_model_sizes_of_the_fixtures(varsr, restorevar):
    assert varsr[0].config.lr_size == 64
    assert restorevar[0].input_size(restorevar[1]) == 64


# -- sizes and aspect ------------------------------------------------------------------------------


@torch.no_grad()
@pytest.mark.parametrize("hw,scale", [((40, 60), 2.0), ((32, 96), 1.5), ((24, 8), 4.0)], ids=["3:2", "1:3", "3:1"])
def test_varsr_any_size_keeps_aspect(varsr, hw, scale):
    y = fr.varsr_restore_image(*varsr, lq(1, *hw), options=RestoreOptions(scale=scale, tile=64, overlap=16))
    assert y.shape == (1, 3, round(hw[0] * scale), round(hw[1] * scale))
    assert y.min() >= -1 and y.max() <= 1 and y.std() > 0.01


@torch.no_grad()
@pytest.mark.parametrize("hw", [(80, 120), (40, 120)], ids=["3:2", "1:3"])
def test_restorevar_any_size_keeps_size(restorevar, hw):
    y = fr.restorevar_restore_image(*restorevar, lq(1, *hw), options=RestoreOptions(scale=1.0, tile=64, overlap=16))
    assert y.shape == (1, 3, *hw)
    assert y.min() >= -1 and y.max() <= 1 and y.std() > 0.01


# -- one tile = the core's model-sized call --------------------------------------------------------


@torch.no_grad()
@pytest.mark.parametrize("seed", [0, 5])
def test_varsr_single_tile_equals_direct_call(varsr, seed):
    x = lq(1, 64, 64, seed=1)
    y = fr.varsr_restore_image(*varsr, x, options=RestoreOptions(scale=1.0, tile=64, overlap=16, seed=seed))
    direct = varsr_restore(*varsr, x, seed=tile_seeds(seed, 1, 0)[0])
    assert torch.equal(y, direct)
    # x4 from 16x16: the bicubic upsample, then the same model-sized call (what test_varsr.py feeds VARSR)
    small = lq(1, 16, 16, seed=2)
    y4 = fr.varsr_restore_image(*varsr, small, options=RestoreOptions(scale=4.0, tile=64, overlap=16, seed=seed))
    assert torch.equal(y4, varsr_restore(*varsr, restore._resize(small, (64, 64)), seed=tile_seeds(seed, 1, 0)[0]))


@torch.no_grad()
def test_restorevar_single_tile_equals_direct_call(restorevar):
    x = lq(2, 64, 64, seed=3)
    y = fr.restorevar_restore_image(*restorevar, x, options=RestoreOptions(scale=1.0, tile=64, overlap=16))
    assert torch.equal(y, restorevar_restore(*restorevar, x))
    plain = fr.restorevar_restore_image(*restorevar, x, options=RestoreOptions(scale=1.0, tile=64, overlap=16), refine=False)
    assert torch.equal(plain, restorevar_restore(*restorevar, x, refine=False))
    assert not torch.equal(plain, y)


# -- seeds, batches, colour fix --------------------------------------------------------------------


@torch.no_grad()
def test_varsr_seeds_and_batch(varsr):
    x = lq(1, 40, 60, seed=4)
    opts = dict(scale=2.0, tile=64, overlap=16)
    a = fr.varsr_restore_image(*varsr, x, options=RestoreOptions(seed=1, **opts))
    b = fr.varsr_restore_image(*varsr, x, options=RestoreOptions(seed=1, **opts))
    c = fr.varsr_restore_image(*varsr, x, options=RestoreOptions(seed=2, **opts))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)  # the refiner noise follows the seed
    pair = torch.cat([x, lq(1, 40, 60, seed=5)])
    batch = fr.varsr_restore_image(*varsr, pair, options=RestoreOptions(seed=1, **opts))
    second = fr.varsr_restore_image(*varsr, pair[1:], options=RestoreOptions(seed=2, **opts))
    torch.testing.assert_close(batch, torch.cat([a, second]), atol=1e-5, rtol=0)


@torch.no_grad()
def test_restorevar_ignores_the_seed(restorevar):
    x = lq(1, 64, 96, seed=6)
    opts = dict(scale=1.0, tile=64, overlap=16)
    assert torch.equal(fr.restorevar_restore_image(*restorevar, x, options=RestoreOptions(seed=1, **opts)),
                       fr.restorevar_restore_image(*restorevar, x, options=RestoreOptions(seed=9, **opts)))


def test_color_fix_choices():
    F_ = var_core.Family
    assert fr.resolve_color_fix(F_.VARSR, "auto") == ("none", True)
    assert fr.resolve_color_fix(F_.RESTOREVAR, "auto") == ("none", False)
    assert fr.resolve_color_fix(F_.INFINITY, "auto") == ("none", False)
    assert fr.resolve_color_fix(F_.VARSR, "wavelet") == ("wavelet", False)
    with pytest.raises(var_core.ParameterError, match="color_fix"):
        fr.resolve_color_fix(F_.VARSR, "magic")


@torch.no_grad()
def test_varsr_whole_image_adain_replaces_the_tile_adain(varsr):
    x = lq(1, 64, 64, seed=7)
    y = fr.varsr_restore_image(*varsr, x, options=RestoreOptions(scale=1.0, tile=64, overlap=16, color_fix="adain"),
                               varsr=fr.VARSROptions(tile_adain=False))
    raw = varsr_restore(*varsr, x, seed=0, color_fix="none")
    torch.testing.assert_close(y, var_core.colorfix.adain(raw, x).clamp(-1, 1))


# -- interruption between tiles ----------------------------------------------------------------------


class Interrupted(Exception):
    pass


@torch.no_grad()
@pytest.mark.parametrize("which", ["varsr", "restorevar"])
def test_interruption_stops_between_tiles(request, which):
    models = request.getfixturevalue(which)
    done = []

    def check():
        if len(done) == 2:
            raise Interrupted

    fn = fr.varsr_restore_image if which == "varsr" else fr.restorevar_restore_image
    with pytest.raises(Interrupted):
        fn(*models, lq(1, 96, 96), options=RestoreOptions(scale=1.0, tile=64, overlap=16),
           progress=lambda d, n: done.append((d, n)), check_interrupt=check)
    assert done == [(1, 4), (2, 4)]
    assert restore.count_steps(96, 96, RestoreOptions(scale=1.0, tile=64, overlap=16)) == 4


# -- dispatcher and pairings ---------------------------------------------------------------------------


@torch.no_grad()
def test_restore_any_dispatches_on_the_model(varsr, restorevar):
    student = var_core.load(STUDENT).model
    bsq = var_core.load(A_VAE).model
    x = lq(1, 32, 48, seed=8)
    opts = RestoreOptions(scale=2.0, tile=64, overlap=16, sampling="argmax")
    assert torch.equal(fr.restore_any(student, bsq, x, options=opts), restore.restore_image(student, bsq, x, options=opts))
    assert torch.equal(fr.restore_any(*varsr, x, options=opts), fr.varsr_restore_image(*varsr, x, options=opts))
    assert torch.equal(fr.restore_any(*restorevar, x, options=opts),
                       fr.restorevar_restore_image(*restorevar, x, options=opts))
    with pytest.raises(var_core.ParameterError, match="VARSR restores with a VAR VQVAE"):
        fr.restore_any(varsr[0], bsq, x, options=opts)
    with pytest.raises(var_core.ParameterError, match="RestoreVAR restores with a VAR VQVAE"):
        fr.restore_any(restorevar[0], bsq, x, options=opts)
    with pytest.raises(var_core.ParameterError, match="Infinity BSQ VAE"):
        fr.restore_any(student, varsr[1], x, options=opts)
    with pytest.raises(var_core.ParameterError, match="does not match the RestoreVAR"):
        fr.restore_any(restorevar[0], varsr[1], x, options=opts)  # VQVAE of another model


def test_var_does_not_restore(var):
    with pytest.raises(var_core.ParameterError, match="does not restore"):
        fr.restore_any(*var, lq(1, 32, 32), options=RestoreOptions())


@pytest.mark.reliability
@pytest.mark.parametrize("kwargs,match", [(dict(cfg=-1), "cfg"), (dict(steps=0), "steps"), (dict(top_k=-1), "top_k"),
                                          (dict(top_p=1.5), "top_p")])
def test_bad_varsr_options(kwargs, match):
    with pytest.raises(var_core.ParameterError, match=match):
        fr.VARSROptions(**kwargs)


# -- class-conditional VAR -------------------------------------------------------------------------------


@torch.no_grad()
def test_class_images_are_seeded_per_image(var):
    model, vqvae = var
    y = fr.generate_class_images(model, vqvae, 3, batch=2, seed=10, cfg=4.0, top_k=100, top_p=0.95)
    assert y.shape == (2, 3, 64, 64) and y.min() >= -1 and y.max() <= 1
    for i in range(2):
        s = model.autoregressive_infer_cfg(vqvae, 1, 3, g_seed=10 + i, cfg=4.0, top_k=100, top_p=0.95)
        torch.testing.assert_close(y[i:i + 1], s.image01 * 2 - 1, atol=1e-6, rtol=0)
    assert not torch.equal(y[0], y[1])
    other = fr.generate_class_images(model, vqvae, 7, batch=1, seed=10, cfg=4.0, top_k=100, top_p=0.95)
    assert not torch.equal(other[0], y[0])
    with pytest.raises(var_core.ParameterError, match="classes 0..9"):
        fr.generate_class_images(model, vqvae, 10)


def test_class_images_interrupt(var):
    calls = []

    def check():
        if calls:
            raise Interrupted

    with pytest.raises(Interrupted):
        fr.generate_class_images(*var, 1, batch=3, progress=lambda d, n: calls.append((d, n)), check_interrupt=check)
    assert calls == [(1, 3)]


# -- command line ----------------------------------------------------------------------------------


def _png(path: Path, h: int, w: int, seed: int = 0) -> Path:
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)
    return path


def _read(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im)


def _uint8(y: torch.Tensor) -> np.ndarray:  # cli.save_image's conversion
    return (image_io.from_model(y)[0].clamp(0, 1).numpy() * 255).round().astype(np.uint8)


def test_cli_restore_varsr(tmp_path, varsr):
    src = _png(tmp_path / "a.png", 20, 30)
    out = tmp_path / "out"
    assert cli.main(["restore", str(src), "-o", str(out), "--model", str(E / "varsr_tiny.safetensors"),
                     "--vae", str(E / "vqvae_tiny_trainer.pth"), "--tile", "64", "--overlap", "16", "--seed", "3",
                     "-q"]) == 0
    got = _read(out / "a.png")
    assert got.shape == (80, 120, 3)  # x4 by default
    x = image_io.to_model(image_io.load_image_file(src))
    with torch.inference_mode():
        y = fr.varsr_restore_image(*varsr, x, options=RestoreOptions(scale=4.0, tile=64, overlap=16, seed=3))
    assert np.abs(got.astype(int) - _uint8(y)).max() <= 1


def test_cli_restore_restorevar(tmp_path, restorevar):
    src = _png(tmp_path / "b.png", 64, 96)
    out = tmp_path / "out"
    assert cli.main(["restore", str(src), "-o", str(out), "--model", str(F / "restorevar_tiny.pth"),
                     "--vae", str(F / "vqvae_tiny.pth"), "--tile", "64", "--overlap", "16", "--no-refine", "-q"]) == 0
    got = _read(out / "b.png")
    assert got.shape == (64, 96, 3)  # 1x by default
    x = image_io.to_model(image_io.load_image_file(src))
    with torch.inference_mode():
        y = fr.restorevar_restore_image(*restorevar, x, options=RestoreOptions(scale=1.0, tile=64, overlap=16),
                                        refine=False)
    assert np.abs(got.astype(int) - _uint8(y)).max() <= 1


def test_cli_sample_class(tmp_path, var):
    out = tmp_path / "out"
    assert cli.main(["sample", "--model", str(D / "var_tiny.pth"), "--vae", str(D / "vqvae_tiny.safetensors"),
                     "--class", "3", "--batch", "2", "--seed", "5", "-o", str(out), "-q"]) == 0
    with torch.inference_mode():
        y = fr.generate_class_images(*var, 3, batch=2, seed=5)  # the official demo's cfg 4, top-k 900, top-p 0.95
    for i in range(2):
        got = _read(out / f"sample_{5 + i}.png")
        assert got.shape == (64, 64, 3)
        assert np.abs(got.astype(int) - _uint8(y[i:i + 1])).max() <= 1


@pytest.mark.reliability
def test_cli_family_errors(tmp_path, capsys):
    img = _png(tmp_path / "x.png", 32, 32)
    out = str(tmp_path / "o")
    # a generation-only family given to restore
    assert cli.main(["restore", str(img), "-o", out, "--model", str(D / "var_tiny.safetensors"),
                     "--vae", str(D / "vqvae_tiny.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "class-conditional VAR" in err and "does not restore" in err and "sample --model" in err
    # VARSR without its VQVAE
    assert cli.main(["restore", str(img), "-o", out, "--model", str(E / "varsr_tiny.safetensors")]) == 2
    assert "VARSR VQVAE not found" in capsys.readouterr().err
    # VARSR with the Infinity BSQ VAE
    assert cli.main(["restore", str(img), "-o", out, "--model", str(E / "varsr_tiny.safetensors"),
                     "--vae", str(A_VAE)]) == 2
    assert "is the wrong model here" in capsys.readouterr().err
    # a VAE as the model
    assert cli.main(["restore", str(img), "-o", out, "--model", str(A_VAE), "--vae", str(A_VAE)]) == 2
    assert "not a restoration transformer" in capsys.readouterr().err
    # VAR without a class, a class for Infinity, a class out of range
    assert cli.main(["sample", "-o", out, "--model", str(D / "var_tiny.pth"), "--vae", str(D / "vqvae_tiny.pth")]) == 2
    assert "--class N" in capsys.readouterr().err
    assert cli.main(["sample", "-o", out, "--model", str(STUDENT), "--vae", str(A_VAE), "--class", "1"]) == 2
    assert "--class is for the class-conditional VAR" in capsys.readouterr().err
    assert cli.main(["sample", "-o", out, "--model", str(D / "var_tiny.pth"), "--vae", str(D / "vqvae_tiny.pth"),
                     "--class", "10"]) == 2
    assert "classes 0..9" in capsys.readouterr().err
