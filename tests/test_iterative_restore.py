"""Iterative teacher at any size (tiles, seeds, interruption), text to image, and their CLI commands."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import var_core
from var_core import cli, lora, restore, sampler
from var_core.infinity_model import TextCondition
from var_core.restore import RestoreOptions
from var_core.sampler import SamplerOptions
from var_core.schedules import fit_schedule, scale_schedule, schedule_pixels

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"
STUDENT = FIXTURES / "B_varestorer_student" / "varestorer_tiny_lora.safetensors"
VAE = FIXTURES / "A_bsq_vae" / "vae_tiny.safetensors"
pytestmark = pytest.mark.skipif(not STUDENT.is_file() or not VAE.is_file(), reason="../shared/fixtures not present")

GREEDY = SamplerOptions(cfg=3.0, top_k=1, top_p=0.0)
FREE = SamplerOptions(cfg=3.0, top_k=0, top_p=0.0)  # plain multinomial: most randomness


@pytest.fixture(scope="module")
def models():
    teacher = lora.strip_lora(var_core.load(STUDENT, expect=var_core.Family.INFINITY).model)
    vae = var_core.load(VAE, expect=var_core.Family.INFINITY_BSQ_VAE).model
    return teacher, vae


def lq(b, h, w, seed=0):
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def run(models, x, sampler_options=GREEDY, **options):
    return restore.iterative_restore_image(*models, x, options=RestoreOptions(**options),
                                           sampler_options=sampler_options)


@torch.no_grad()
@pytest.mark.parametrize("hw,scale", [((60, 90), 2.0), ((40, 120), 1.5), ((48, 16), 3.0)])
def test_output_keeps_aspect_ratio(models, hw, scale):
    y = run(models, lq(1, *hw), scale=scale, tile=128, overlap=16)
    assert y.shape == (1, 3, round(hw[0] * scale), round(hw[1] * scale))
    assert y.min() >= -1 and y.max() <= 1


@torch.no_grad()
def test_single_tile_equals_the_sampler(models):
    model, vae = models
    x = lq(1, 128, 128)
    schedule = fit_schedule(128, 128)
    assert schedule_pixels(schedule) == (128, 128)
    y = run(models, x, scale=1.0, tile=128)
    text = var_core.text.unconditional(model.cfg_uncond)
    direct = sampler.iterative_restore(model, vae, x, text, schedule, GREEDY).image
    assert torch.equal(y, direct.clamp(-1, 1))
    one_step = restore.restore_image(model, vae, x, options=RestoreOptions(scale=1.0, sampling="argmax"))
    assert not torch.equal(y, one_step)  # really the iterative path


@torch.no_grad()
def test_guidance_without_text_is_skipped(models, caplog):
    """No text: the guided rows would equal the unguided ones, so cfg 3 runs as cfg 1 (half the work)
    and gives the same draw; with a text the guidance stays."""
    x = lq(1, 64, 64)
    with caplog.at_level("INFO", logger="var_core.restore"):
        guided = run(models, x, FREE, scale=1.0, seed=3)
    assert "guidance skipped" in caplog.text
    plain = run(models, x, SamplerOptions(cfg=1.0, top_k=0, top_p=0.0), scale=1.0, seed=3)
    assert torch.equal(guided, plain)
    caplog.clear()
    with caplog.at_level("INFO", logger="var_core.restore"):
        restore.iterative_restore_image(*models, x, text=var_core.text.unconditional(models[0].cfg_uncond),
                                        options=RestoreOptions(scale=1.0), sampler_options=GREEDY)
    assert "guidance skipped" not in caplog.text


@torch.no_grad()
def test_greedy_ignores_the_seed(models):
    x = lq(1, 64, 96, seed=2)
    a = run(models, x, scale=2.0, tile=96, overlap=16, seed=1)
    b = run(models, x, scale=2.0, tile=96, overlap=16, seed=2)
    assert torch.equal(a, b)


@torch.no_grad()
def test_seeds(models):
    x = lq(1, 64, 64)
    a = run(models, x, FREE, scale=1.0, seed=1)
    b = run(models, x, FREE, scale=1.0, seed=1)
    c = run(models, x, FREE, scale=1.0, seed=2)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # the sampler options' own seed is not the one used: the restore options' is
    d = run(models, x, SamplerOptions(cfg=3.0, top_k=0, top_p=0.0, seed=99), scale=1.0, seed=1)
    assert torch.equal(a, d)


@torch.no_grad()
def test_batch_of_two_equals_two_singles(models):
    x = torch.cat([lq(1, 64, 96, seed=5), lq(1, 64, 96, seed=6)])
    opts = dict(scale=2.0, tile=96, overlap=16)
    batch = run(models, x, FREE, seed=10, **opts)
    first = run(models, x[:1], FREE, seed=10, **opts)
    second = run(models, x[1:], FREE, seed=11, **opts)
    torch.testing.assert_close(batch, torch.cat([first, second]), atol=1e-4, rtol=0)


@torch.no_grad()
def test_progress_counts_scales_of_every_tile(models):
    options = RestoreOptions(scale=2.0, tile=96, overlap=16)
    steps = []
    restore.iterative_restore_image(*models, lq(1, 64, 64), options=options, sampler_options=GREEDY,
                                    progress=lambda d, n: steps.append((d, n)))
    total = restore.count_steps(64, 64, options, iterative=True)
    assert total == 4 * len(fit_schedule(96, 96))  # 2 x 2 tiles of 96 px in 128 px
    assert steps == [(i, total) for i in range(1, total + 1)]
    assert restore.count_steps(64, 64, options) == 4  # one-step: one per tile


@torch.no_grad()
def test_interrupt_between_scales_and_tiles(models):
    options = RestoreOptions(scale=2.0, tile=96, overlap=16)
    n = len(fit_schedule(96, 96))
    steps, calls = [], []

    def stop_in_second_tile():  # a true return stops (the core's own SamplingInterrupted)
        calls.append(len(steps))
        return len(steps) == n + 1

    with pytest.raises(sampler.SamplingInterrupted):
        restore.iterative_restore_image(*models, lq(1, 64, 64), options=options, sampler_options=GREEDY,
                                        progress=lambda d, t: steps.append(d), check_interrupt=stop_in_second_tile)
    assert len(steps) == n + 1  # stopped after the first scale of the second tile

    class Interrupted(Exception):
        pass

    def raise_at_second_tile():  # ComfyUI's check raises its own exception instead
        if len(steps) == n:
            raise Interrupted

    steps.clear()
    with pytest.raises(Interrupted):
        restore.iterative_restore_image(*models, lq(1, 64, 64), options=options, sampler_options=GREEDY,
                                        progress=lambda d, t: steps.append(d), check_interrupt=raise_at_second_tile)
    assert len(steps) == n


@torch.no_grad()
def test_text_of_another_t5_is_refused(models):
    model, vae = models
    wrong = TextCondition(torch.zeros(3, 64), (3,))
    with pytest.raises(var_core.ParameterError, match="128 channels"):
        restore.iterative_restore_image(model, vae, lq(1, 32, 32), text=wrong, options=RestoreOptions(scale=1.0))
    with pytest.raises(var_core.ParameterError, match="channel T5 features"):
        sampler.generate(model, vae, wrong, scale_schedule(1.0, "0.06M"))


# -- text to image ---------------------------------------------------------------------------------


@torch.no_grad()
@pytest.mark.parametrize("aspect,pn", [(1.0, "0.06M"), (0.666, "0.06M"), (2.0, "0.25M")])
def test_generate_sizes(models, aspect, pn):
    model, vae = models
    schedule = scale_schedule(aspect, pn)
    seen = []
    res = sampler.generate(model, vae, None, schedule, GREEDY, callback=lambda i, p: seen.append((i, p.index)))
    H, W = schedule_pixels(schedule)
    assert res.image.shape == (1, 3, H, W) and res.image.abs().max() <= 1
    assert [tuple(b.shape) for b in res.bits] == [(1, h, w, model.config.codebook_dim) for _, h, w in schedule]
    assert seen == [(0, i) for i in range(len(schedule))]


@torch.no_grad()
def test_generate_seeds_and_batch(models):
    model, vae = models
    schedule = scale_schedule(1.0, "0.06M")
    options = SamplerOptions(cfg=3.0, tau=1.0, seed=4)
    batch = sampler.generate(model, vae, None, schedule, options, batch=2)
    again = sampler.generate(model, vae, None, schedule, options, batch=2)
    second = sampler.generate(model, vae, None, schedule, SamplerOptions(cfg=3.0, tau=1.0, seed=5))
    assert torch.equal(batch.image, again.image)
    assert not torch.equal(batch.image[0], batch.image[1])
    torch.testing.assert_close(batch.image[1:], second.image, atol=1e-5, rtol=0)
    assert all(torch.equal(a[1:], b) for a, b in zip(batch.bits, second.bits))
    # the negative prompt is the unconditional side of guidance
    text = TextCondition(torch.randn(5, 128, generator=torch.Generator().manual_seed(0)), (5,))
    plain = sampler.generate(model, None, text, schedule, GREEDY)
    negative = sampler.generate(model, None, text, schedule, GREEDY, negative_text=TextCondition(text.kv_compact[:2] * 3,
                                                                                                  (2,)))
    assert plain.image is None
    assert any(not torch.equal(a, b) for a, b in zip(plain.bits, negative.bits))


@torch.no_grad()
def test_generate_interrupt(models):
    model, vae = models
    calls = iter([False, False, True])
    with pytest.raises(sampler.SamplingInterrupted):
        sampler.generate(model, vae, None, scale_schedule(1.0, "0.06M"), GREEDY, check_interrupt=lambda: next(calls))


def test_codes_preview():
    codes = torch.randn(2, 16, 1, 8, 12, generator=torch.Generator().manual_seed(0))
    rgb = sampler.codes_preview(codes)
    assert rgb.shape == (8, 12, 3) and rgb.min() >= 0 and rgb.max() <= 1 and rgb.std() > 0.05
    flat = sampler.codes_preview(torch.ones(1, 16, 1, 4, 4))  # scale 0: one token everywhere
    assert torch.allclose(flat, torch.full((4, 4, 3), 0.5))


# -- command line ----------------------------------------------------------------------------------


def _png(path: Path, h: int, w: int) -> Path:
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)
    return path


def test_cli_sample(tmp_path):
    out = tmp_path / "out"
    args = ["sample", "-o", str(out), "--model", str(STUDENT), "--vae", str(VAE), "--pn", "0.06M", "--aspect", "0.66",
            "--batch", "2", "--seed", "3", "--top-k", "1", "-q"]
    assert cli.main(args) == 0
    H, W = schedule_pixels(scale_schedule(0.66, "0.06M"))
    for seed in (3, 4):
        with Image.open(out / f"sample_{seed}.png") as im:
            assert im.size == (W, H) and im.mode == "RGB"
    # the same images as the core with the teacher (the student file's LoRA stripped)
    model = lora.strip_lora(var_core.load(STUDENT).model)
    vae = var_core.load(VAE).model
    with torch.inference_mode():
        res = sampler.generate(model, vae, None, scale_schedule(0.66, "0.06M"), SamplerOptions(top_k=1, seed=3),
                               batch=2)
    want = np.clip(np.round(var_core.image.from_model(res.image).numpy() * 255), 0, 255).astype(np.uint8)
    with Image.open(out / "sample_4.png") as im:
        assert np.abs(np.asarray(im).astype(int) - want[1]).max() <= 1


def test_cli_restore_iterative(tmp_path):
    src = _png(tmp_path / "a.png", 40, 60)
    out = tmp_path / "out"
    assert cli.main(["restore", str(src), "-o", str(out), "--iterative", "--model", str(STUDENT), "--vae", str(VAE),
                     "--scale", "2", "--tile", "64", "--overlap", "16", "--cfg", "2", "--top-k", "1",
                     "--next-scale", "trilinear", "-q"]) == 0
    with Image.open(out / "a.png") as im:
        assert im.size == (120, 80)
        got = np.asarray(im)
    model = lora.strip_lora(var_core.load(STUDENT).model)
    vae = var_core.load(VAE).model
    x = var_core.image.to_model(var_core.image.load_image_file(src)[..., :3])
    with torch.inference_mode():
        y = restore.iterative_restore_image(model, vae, x, options=RestoreOptions(scale=2, tile=64, overlap=16),
                                            sampler_options=SamplerOptions(cfg=2, top_k=1, next_scale="trilinear"))
    want = np.clip(np.round(var_core.image.from_model(y)[0].numpy() * 255), 0, 255).astype(np.uint8)
    assert np.abs(got.astype(int) - want).max() <= 1


@pytest.mark.reliability
def test_cli_missing_files_are_named(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = str(tmp_path / "o")
    assert cli.main(["sample", "-o", out, "--weights", str(empty)]) == 2
    assert f"Infinity model not found in {empty}" in capsys.readouterr().err
    assert cli.main(["sample", "-o", out, "--weights", str(empty), "--model", str(STUDENT)]) == 2
    assert "Infinity VAE not found" in capsys.readouterr().err
    assert cli.main(["sample", "-o", out, "--vae", str(VAE)]) == 2
    assert "Infinity model not found (no --weights folder given)" in capsys.readouterr().err
    assert cli.main(["sample", "-o", out, "--vae", str(VAE), "--model", str(tmp_path / "nope.pth")]) == 2
    assert "nope.pth not found" in capsys.readouterr().err
    assert cli.main(["sample", "-o", out, "--vae", str(VAE), "--model", str(STUDENT), "--prompt", "a dog"]) == 2
    assert "T5 text encoder folder not found" in capsys.readouterr().err
    assert cli.main(["sample", "-o", out, "--weights", str(tmp_path / "nowhere")]) == 2
    assert "not a folder" in capsys.readouterr().err
    assert cli.main(["sample", "-o", out, "--vae", str(VAE), "--model", str(STUDENT), "--top-p", "2"]) == 2
    assert "top_p" in capsys.readouterr().err
    img = _png(tmp_path / "x.png", 32, 32)
    w = tmp_path / "w"
    w.mkdir()
    (w / "varestorer.safetensors").symlink_to(STUDENT)
    (w / "infinity_vae_d32reg.safetensors").symlink_to(VAE)
    assert cli.main(["restore", str(img), "-o", out, "--weights", str(w)]) == 0  # the one-step student is there
    assert cli.main(["restore", str(img), "-o", out, "--weights", str(w), "--iterative"]) == 2
    assert "infinity_2b_reg.pth" in capsys.readouterr().err
    (w / "infinity_2b_reg.safetensors").symlink_to(STUDENT)  # found in --weights; its LoRA is stripped
    assert cli.main(["restore", str(img), "-o", out, "--weights", str(w), "--iterative", "--scale", "1", "-q"]) == 0
