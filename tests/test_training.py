"""Training (``python -m var_core train ...``): each stage on tiny configs, resume, export, restore.

The stages run in order on a handful of small synthetic images: the VAE, the teacher on its
tokens, the distilled student; each must lower its loss. The student is exported in the official
layout and restored with through ``var_core.load`` and :func:`var_core.restore.restore_image`.
"""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import var_core
from var_core import cli, restore
from var_core.bsq_quant import encode_pyramid
from var_core.detect import Family
from var_core.errors import ParameterError
from var_core.training import common, vae as vae_train
from var_core.training.distill import lora_target_names

SIZE = 32  # crops: 2x2 latent, schedule (1,1), (2,2)
COMMON = ["--size", str(SIZE), "--batch-size", "4", "--warmup", "2", "-q"]
# 48 channels: GroupNorm with 2 channels per group (24 channels = 1 per group, which loses flat colours).
VAE_ARGS = ["--base-ch", "48", "--ch-mult", "1,1,1,1,1", "--codebook-dim", "8", "--lr", "1e-2"]
TEACHER_ARGS = ["--depth", "2", "--width", "32", "--heads", "2", "--text-channels", "16", "--lr", "3e-3"]
DISTILL_ARGS = ["--lora-rank", "8", "--lr", "1e-2", "--downsample", "4", "4", "--blur-sigma", "1", "2",
                "--noise", "10", "15", "--jpeg", "30", "50"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _losses(run_dir, key: str = "loss") -> list[float]:
    return [json.loads(line)[key] for line in (run_dir / common.LOSS_LOG).read_text().splitlines()]


def _decreased(losses: list[float], k: int = 5) -> tuple[float, float]:
    return float(np.mean(losses[:k])), float(np.mean(losses[-k:]))


def _train(stage: str, *args) -> None:
    assert cli.main(["train", stage, *[str(a) for a in args]]) == 0


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Six smooth 96x96 colour images (a colour gradient and a low-frequency wave each) in a folder."""
    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:96, 0:96] / 95.0
    for i in range(6):
        a, b, c, f, phase = (rng.uniform(-1, 1, (5, 3)) * [[0.4], [0.4], [0.3], [6], [3]])
        img = 0.5 + a * xx[..., None] + b * yy[..., None] + c * np.sin(f * (xx + yy)[..., None] + phase)
        Image.fromarray((img.clip(0, 1) * 255).astype(np.uint8)).save(folder / f"img{i}.png")
    return folder


@pytest.fixture(scope="module")
def runs(photos, tmp_path_factory):
    """The three stages trained in order: ``{"vae": dir, "teacher": dir, "student": dir}``."""
    root = tmp_path_factory.mktemp("runs")
    out = {name: root / name for name in ("vae", "teacher", "student")}
    _train("vae", "--data", photos, "-o", out["vae"], "--steps", 40, *COMMON, *VAE_ARGS)
    vae = out["vae"] / "vae.safetensors"
    _train("teacher", "--data", photos, "-o", out["teacher"], "--vae", vae, "--steps", 40, *COMMON, *TEACHER_ARGS)
    _train("distill", "--data", photos, "-o", out["student"], "--vae", vae, "--teacher",
           out["teacher"] / "teacher.safetensors", "--steps", 30, "--save-every", 15, *COMMON, *DISTILL_ARGS)
    return out


def test_vae_learns_and_loads(runs):
    first, last = _decreased(_losses(runs["vae"]))
    assert last < 0.8 * first, (first, last)
    assert _decreased(_losses(runs["vae"], "commit"))[1] < 0.5 * _decreased(_losses(runs["vae"], "commit"))[0]
    loaded = var_core.load(runs["vae"] / "vae.safetensors")
    assert loaded.family == Family.INFINITY_BSQ_VAE and loaded.config.codebook_dim == 8
    state = torch.load(runs["vae"] / common.STATE_FILE, weights_only=True)
    assert state["step"] == 40 and state["task"] == "vae"


def test_teacher_learns_and_loads(runs):
    first, last = _decreased(_losses(runs["teacher"]))
    assert last < 0.8 * first, (first, last)
    loaded = var_core.load(runs["teacher"] / "teacher.safetensors")
    assert loaded.family == Family.INFINITY and loaded.model.lora_state == "none"
    assert (loaded.config.depth, loaded.config.embed_dim, loaded.config.codebook_dim) == (2, 32, 8)


def test_distill_learns_lora_only(runs):
    # The KL term: the image MSE of these tiny models is dominated by the batch-to-batch spread.
    first, last = _decreased(_losses(runs["student"], "kl"))
    assert last < 0.8 * first, (first, last)
    sd = load_file(runs["student"] / "student.safetensors")
    teacher = load_file(runs["teacher"] / "teacher.safetensors")
    downs = [k for k in sd if k.endswith(".lora_down.weight")]
    assert len(downs) == 2 * 5 and all(sd[k].shape[0] == 8 for k in downs)
    for key, value in teacher.items():  # the base weights are the teacher's, untouched
        owner, _, leaf = key.rpartition(".")
        official = f"{owner}.linear.{leaf}" if f"{owner}.lora_down.weight" in sd else key
        torch.testing.assert_close(sd[official], value, rtol=0, atol=0)
    assert any(sd[k.replace("lora_down", "lora_up")].abs().max() > 0 for k in downs)


def test_quantiser_matches_inference_pyramid():
    """The straight-through pyramid sums the same codes as the inference quantiser."""
    f = torch.randn(2, 8, 4, 4, requires_grad=True)
    schedule = [(1, 1, 1), (1, 2, 2), (1, 4, 4)]
    z, commit = vae_train.quantize_pyramid_ste(f, schedule)
    torch.testing.assert_close(z, encode_pyramid(f.detach(), schedule).z)
    (z.sum() + commit).backward()
    assert f.grad is not None and f.grad.abs().sum() > 0


def test_resume_continues_exactly(runs, photos, tmp_path, monkeypatch):
    """A run stopped at step 2 and resumed ends with the same LoRA weights as an uninterrupted one."""
    saved = {}
    real_save = common.save_checkpoint

    def save_and_keep(task, optimizer, step, elapsed, env, out):
        real_save(task, optimizer, step, elapsed, env, out)
        saved.setdefault(step, tmp_path / f"state{step}.pth")
        shutil.copy(out / common.STATE_FILE, saved[step])

    monkeypatch.setattr(common, "save_checkpoint", save_and_keep)
    args = ["--data", photos, "--vae", runs["vae"] / "vae.safetensors", "--teacher",
            runs["teacher"] / "teacher.safetensors", "--steps", 4, "--save-every", 2, *COMMON, *DISTILL_ARGS]
    _train("distill", "-o", tmp_path / "full", *args)
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copy(saved[2], resumed / common.STATE_FILE)
    (resumed / common.LOSS_LOG).write_text("".join(
        line + "\n" for line in (tmp_path / "full" / common.LOSS_LOG).read_text().splitlines()[:2]))
    _train("distill", "-o", resumed, *args, "--resume")
    assert [json.loads(x)["step"] for x in (resumed / common.LOSS_LOG).read_text().splitlines()] == [1, 2, 3, 4]
    full = torch.load(tmp_path / "full" / common.STATE_FILE, weights_only=True)
    again = torch.load(resumed / common.STATE_FILE, weights_only=True)
    assert again["step"] == 4
    for key, value in full["model"].items():
        torch.testing.assert_close(again["model"][key], value, rtol=1e-6, atol=1e-7)


def test_resume_refuses_other_stage(runs, photos, tmp_path, capsys):
    shutil.copy(runs["vae"] / common.STATE_FILE, tmp_path / common.STATE_FILE)
    vae = str(runs["vae"] / "vae.safetensors")
    argv = ["train", "teacher", "--data", str(photos), "-o", str(tmp_path), "--vae", vae, "--steps", "2", "--resume",
            *COMMON, *TEACHER_ARGS]
    assert cli.main(argv) == 2
    assert "`train vae` state, not `train teacher`" in capsys.readouterr().err


def test_export_loads_and_restores(runs, tmp_path):
    """Both layouts (LoRA / merged) and both formats load through var_core.load and restore the same image."""
    student = str(runs["student"] / "student.safetensors")
    assert cli.main(["train", "export", student, "-o", str(tmp_path / "lora")]) == 0
    assert cli.main(["train", "export", student, "-o", str(tmp_path / "merged.pth"), "--merge-lora"]) == 0
    vae = var_core.load(runs["vae"] / "vae.safetensors").model
    lq = torch.rand(1, 3, 40, 48) * 2 - 1
    options = restore.RestoreOptions(scale=1.5, tile=64, overlap=16, sampling="argmax")
    outputs = {}
    for name in ("lora.pth", "lora.safetensors", "merged.pth", "merged.safetensors"):
        if name.endswith(".pth"):  # a plain dict of tensors, as the official varestorer.pth
            sd = torch.load(tmp_path / name, weights_only=True)
            assert type(sd) is dict and all(isinstance(v, torch.Tensor) for v in sd.values())
            assert any(k.endswith(".lora_down.weight") for k in sd) == name.startswith("lora")
        loaded = var_core.load(tmp_path / name, expect=Family.INFINITY)
        assert loaded.model.lora_state == ("adapters" if name.startswith("lora") else "none")
        with torch.inference_mode():
            outputs[name] = restore.restore_image(loaded.model, vae, lq, options=options)
        assert outputs[name].shape == (1, 3, 60, 72) and torch.isfinite(outputs[name]).all()
    torch.testing.assert_close(outputs["lora.pth"], outputs["lora.safetensors"], rtol=0, atol=0)
    torch.testing.assert_close(outputs["merged.pth"], outputs["merged.safetensors"], rtol=0, atol=0)
    assert (outputs["lora.pth"] - outputs["merged.pth"]).abs().max() < 1e-3  # merged keeps the v_bias quirk


def test_restore_command_with_exported_student(runs, tmp_path):
    assert cli.main(["train", "export", str(runs["student"] / "student.safetensors"), "-o", str(tmp_path / "s")]) == 0
    Image.fromarray(np.full((24, 32, 3), 120, np.uint8)).save(tmp_path / "lq.png")
    argv = ["restore", str(tmp_path / "lq.png"), "-o", str(tmp_path / "out"), "--model",
            str(tmp_path / "s.safetensors"), "--vae", str(runs["vae"] / "vae.safetensors"), "--scale", "2",
            "--tile", "64", "--overlap", "16", "--no-swinir", "-q"]
    assert cli.main(argv) == 0
    assert Image.open(tmp_path / "out" / "lq.png").size == (64, 48)


def test_evaluate_reports_every_method(runs, photos, tmp_path, capsys):
    """`train evaluate` scores bicubic, the VAE ceiling, teacher and student on held-out crops and
    times teacher and student in one run; the bicubic row equals scikit-image on the same arrays.
    The VAE ceiling row is the same for both degradations (computed once per image)."""
    pytest.importorskip("skimage")
    from skimage.metrics import peak_signal_noise_ratio

    from var_core.training.evaluate import centre_crop, low_quality

    held_out = tmp_path / "held_out"
    held_out.mkdir()
    for name in ("img0.png", "img1.png"):
        shutil.copy(photos / name, held_out / name)
    student = tmp_path / "s"
    assert cli.main(["train", "export", str(runs["student"] / "student.safetensors"), "-o", str(student)]) == 0
    report = tmp_path / "eval.json"
    assert cli.main(["train", "evaluate", "--images", str(held_out), "--vae", str(runs["vae"] / "vae.safetensors"),
                     "--student", f"{student}.safetensors", "--crop", "72", "--tile", "64", "--overlap", "16",
                     "--json", str(report)]) == 0
    result = json.loads(report.read_text())
    assert "time ratio" in capsys.readouterr().out
    methods = {r["method"] for r in result["rows"]}
    assert {"bicubic", "vae round trip (ceiling)", "teacher (iterative, greedy)", "student (one-step, argmax)"} <= methods
    assert {r["degradation"] for r in result["rows"]} == {"bicubic", "degraded"}
    assert result["teacher_over_student"] > 0 and result["images"] == 2
    assert all(math.isfinite(r["psnr"]) and 0 < r["ssim"] <= 1 for r in result["rows"])
    expected = []
    for name in ("img0.png", "img1.png"):
        hq = centre_crop(held_out / name, 72)  # not on a template grid: resized for the VAE
        lq = low_quality(hq, 4, "bicubic", blur_sigma=1, noise=5, jpeg_quality=75, seed=0)
        up = torch.nn.functional.interpolate(lq, scale_factor=4, mode="bicubic", align_corners=False).clamp(0, 1)
        expected.append(peak_signal_noise_ratio(hq[0].permute(1, 2, 0).numpy(), up[0].permute(1, 2, 0).numpy(),
                                                data_range=1.0))
    bicubic = next(r for r in result["rows"] if r["method"] == "bicubic" and r["degradation"] == "bicubic")
    assert bicubic["psnr"] == pytest.approx(float(np.mean(expected)), abs=0.01)
    ceilings = [r["psnr"] for r in result["rows"] if r["method"] == "vae round trip (ceiling)"]
    assert len(ceilings) == 2 and ceilings[0] == ceilings[1]


def _tiny_teacher_sd():
    """The state dict of a random tiny teacher (not trained)."""
    from var_core.infinity_model import Infinity
    from var_core.training.teacher import infinity_config, init_weights

    config = infinity_config(depth=2, width=32, heads=2, codebook_dim=8, text_channels=16)
    return init_weights(Infinity(config=config)).state_dict()


def test_lora_targets_and_bad_options():
    model = var_core.load(_tiny_teacher_sd()).model
    names = lora_target_names(model, ("sa.mat_qkv", "ca.proj"))
    assert names == ["blocks.0.sa.mat_qkv", "blocks.0.ca.proj", "blocks.1.sa.mat_qkv", "blocks.1.ca.proj"]
    with pytest.raises(ParameterError, match="LoRA targets"):
        lora_target_names(model, ("nothing",))
    with pytest.raises(ParameterError, match="ch-mult"):
        vae_train.vae_config(ch_mult=(1, 2, 4))
    with pytest.raises(ParameterError, match="multiple of 16"):
        common.crop_schedule(100)
    assert math.isclose(common.learning_rate(0, common.LoopOptions(out_dir=".", lr=1.0, warmup=4, steps=10)), 0.25)


@pytest.mark.parametrize("kl, context", [("forward", "lq"), ("reverse", "student")])
def test_other_kl_settings_train(runs, photos, kl, context):
    """The other KL direction and teacher contexts give a finite loss whose gradient reaches the adapters."""
    from var_core.training import distill
    from var_core.training.teacher import frozen_vae

    student, teacher = distill.build_student(str(runs["teacher"] / "teacher.safetensors"), rank=2,
                                             targets=("sa.proj",))
    options = distill.DistillOptions(kl=kl, context=context, kl_weighting="scales", grad_weight=0.5)
    task = distill.DistillTask(student, teacher, frozen_vae(str(runs["vae"] / "vae.safetensors")),
                               common.crop_schedule(SIZE), options)
    dataset = common.image_dataset(str(photos), size=SIZE, seed=0)
    terms = task({k: torch.stack([dataset[i][k] for i in range(2)]) for k in ("hq", "lq")})
    assert set(terms) == {"loss", "kl", "mse", "grad", "acc"} and torch.isfinite(terms["loss"])
    terms["loss"].backward()
    assert all(p.grad is not None for p in task.lora_parameters().values())


def test_image_loss_reaches_the_adapters(runs, photos):
    """The straight-through bits carry the gradient of the decoded-image MSE to the LoRA adapters."""
    from var_core.training import distill
    from var_core.training.teacher import frozen_vae

    student, teacher = distill.build_student(str(runs["teacher"] / "teacher.safetensors"), rank=2,
                                             targets=distill.DEFAULT_TARGETS)
    options = distill.DistillOptions(kl_weight=0.0, st_sampling="argmax")
    task = distill.DistillTask(student, teacher, frozen_vae(str(runs["vae"] / "vae.safetensors")),
                               common.crop_schedule(SIZE), options)
    dataset = common.image_dataset(str(photos), size=SIZE, seed=0)
    batch = {k: torch.stack([dataset[i][k] for i in range(2)]) for k in ("hq", "lq")}
    terms = task(batch)
    assert set(terms) == {"loss", "mse", "acc"}
    terms["loss"].backward()
    grads = [p.grad for name, p in task.lora_parameters().items() if "lora_B" in name]
    assert grads and all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0
    assert all(p.grad is None for p in teacher.parameters()) and all(p.grad is None for p in task.vae.parameters())


def test_photos_command_writes_the_skimage_photographs(tmp_path, capsys):
    """`train photos` writes scikit-image's bundled colour photographs (the demo model's data) as RGB PNGs."""
    pytest.importorskip("skimage")
    from var_core.training.data import SKIMAGE_PHOTOS

    assert cli.main(["train", "photos", "-o", str(tmp_path / "photos")]) == 0
    written = sorted(p.name for p in (tmp_path / "photos").glob("*.png"))
    assert written == sorted(name.rsplit(".", 1)[0] + ".png" for name in SKIMAGE_PHOTOS)
    assert f"{len(written)} photographs" in capsys.readouterr().out
    with Image.open(tmp_path / "photos" / "astronaut.png") as im:
        assert im.mode == "RGB" and min(im.size) >= 256


def test_bf16_mixed_precision_path_trains(runs, photos, tmp_path):
    """`--precision bf16` (the GPU default; autocast on the CPU here) trains with finite losses and
    keeps fp32 master weights in the saved student."""
    out = tmp_path / "bf16"
    _train("distill", "--data", photos, "-o", out, "--vae", runs["vae"] / "vae.safetensors", "--teacher",
           runs["teacher"] / "teacher.safetensors", "--steps", 3, "--precision", "bf16", *COMMON, *DISTILL_ARGS)
    assert all(math.isfinite(v) for v in _losses(out))
    assert {t.dtype for t in load_file(out / "student.safetensors").values()} == {torch.float32}
