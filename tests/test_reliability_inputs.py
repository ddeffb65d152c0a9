"""Bad-input matrix of ``var_core`` (issue 9): LoRA and VAE mismatches, T5 folders, images, prompts, options.

Every case either works (RGBA keeps its alpha, a 1x1 image restores, a 10 000-character prompt is
truncated) or fails with a ``VARError`` whose message names the problem and the fix, never a
torch traceback. Run the whole matrix with ``pytest -m reliability``; the ComfyUI side of it is
``test_reliability_server.py``.
"""

from __future__ import annotations

import dataclasses
import random
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from comfy_harness import rss_bytes
from hypothesis import HealthCheck, given, settings, strategies as st
from PIL import Image

import var_core
from var_core import cli, image, restore, sampler, text as text_lib, tiling
from var_core import family_restore as fr
from var_core.checkpoint import load_state_dict
from var_core.pyramid import encode_image
from var_core.restore import RestoreOptions
from var_core.schedules import fit_schedule

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"
STUDENT = FIXTURES / "B_varestorer_student" / "varestorer_tiny_lora.safetensors"
VAE = FIXTURES / "A_bsq_vae" / "vae_tiny.safetensors"
pytestmark = [pytest.mark.reliability,
              pytest.mark.skipif(not FIXTURES.is_dir(), reason="../shared/fixtures not present")]
ARGMAX = dict(sampling="argmax")
FAST = settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


@pytest.fixture(scope="module")
def student_sd():
    return load_state_dict(STUDENT)


@pytest.fixture(scope="module")
def models():
    return var_core.load(STUDENT).model, var_core.load(VAE).model


def vae_with_bits(bits: int) -> dict:
    """The fixture VAE cut down to ``bits``-bit tokens (encoder output / decoder input channels, bit order)."""
    sd = dict(load_state_dict(VAE))
    sd["encoder.conv_out.conv.weight"] = sd["encoder.conv_out.conv.weight"][:bits]
    sd["encoder.conv_out.conv.bias"] = sd["encoder.conv_out.conv.bias"][:bits]
    sd["decoder.conv_in.conv.weight"] = sd["decoder.conv_in.conv.weight"][:, :bits]
    for key in ("quantize.lfq.mask", "quantizer.lfq.mask"):
        sd[key] = 2 ** torch.arange(bits - 1, -1, -1)
    return sd


def lq(h: int, w: int, b: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# -- LoRA with mismatched rank / targets ------------------------------------------------------------

FIRST = "block_chunks.0.module.0.ca.mat_kv"


def test_lora_down_and_up_of_different_rank(student_sd):
    sd = dict(student_sd)
    sd[FIRST + ".lora_down.weight"] = sd[FIRST + ".lora_down.weight"][:4]  # rank 4 ...
    up = sd[FIRST + ".lora_up.weight"]
    sd[FIRST + ".lora_up.weight"] = torch.cat([up, up], dim=1)[:, :8]  # ... with an up of rank 8
    with pytest.raises(var_core.CheckpointError, match=rf"{FIRST}: lora_down \(4, 64\) and lora_up \(128, 8\) do not "
                                                        r"chain.*download the official varestorer.pth again"):
        var_core.load(sd)


def test_lora_adapter_on_a_module_that_does_not_exist(student_sd):
    sd = dict(student_sd)
    for part in ("lora_down", "lora_up"):
        sd[f"block_chunks.0.module.0.sa.no_such_layer.{part}.weight"] = sd[f"{FIRST}.{part}.weight"]
    with pytest.raises(var_core.CheckpointError, match=r"adapter for block_chunks.0.module.0.sa.no_such_layer, which "
                                                        r"is not a linear layer.*download the official"):
        var_core.load(sd)


def test_lora_adapter_that_does_not_fit_its_layer(student_sd):
    sd = dict(student_sd)
    sd[FIRST + ".lora_down.weight"] = sd[FIRST + ".lora_down.weight"][:, :8]  # in 8, the layer takes 64
    with pytest.raises(var_core.CheckpointError, match=r"shapes \(32, 8\)/\(128, 32\) do not fit the layer "
                                                        r"\(\(32, 64\)/\(128, 32\)\).*download the official"):
        var_core.load(sd)


def test_lora_down_without_up(student_sd):
    sd = dict(student_sd)
    del sd[FIRST + ".lora_up.weight"]
    with pytest.raises(var_core.CheckpointError, match=r"lora_down but no lora_up.*download the official"):
        var_core.load(sd)


def test_lora_adapters_of_different_ranks(student_sd):
    sd = dict(student_sd)
    sd[FIRST + ".lora_down.weight"] = sd[FIRST + ".lora_down.weight"][:4]
    sd[FIRST + ".lora_up.weight"] = sd[FIRST + ".lora_up.weight"][:, :4]
    with pytest.raises(var_core.CheckpointError, match=r"LoRA adapters of different ranks \[4, 32\]"):
        var_core.load(sd)


# -- VAE and transformer of different bit widths -------------------------------------------------------

MISMATCH = r"the VAE has 8-bit tokens but the transformer reads 16-bit tokens; use the VAE that belongs to the model"


@pytest.fixture(scope="module")
def vae8():
    vae = var_core.load(vae_with_bits(8)).model
    assert vae.codebook_dim == 8
    return vae


@torch.no_grad()
def test_one_step_restore_refuses_a_vae_of_another_bit_width(models, vae8):
    with pytest.raises(var_core.ParameterError, match=MISMATCH):
        restore.restore_image(models[0], vae8, lq(64, 64), options=RestoreOptions(scale=1, **ARGMAX))
    with pytest.raises(var_core.ParameterError, match=MISMATCH):
        restore.restore_pyramid(models[0], vae8, encode_image(vae8, lq(64, 64)), options=RestoreOptions(**ARGMAX))


@torch.no_grad()
def test_iterative_and_text_to_image_refuse_a_vae_of_another_bit_width(models, vae8):
    with pytest.raises(var_core.ParameterError, match=MISMATCH):
        restore.iterative_restore_image(models[0], vae8, lq(64, 64), options=RestoreOptions(scale=1))
    with pytest.raises(var_core.ParameterError, match=MISMATCH):
        sampler.generate(models[0], vae8, None, fit_schedule(64, 64), sampler.SamplerOptions(top_k=1))


@torch.no_grad()
@pytest.mark.parametrize("model_dir,vqvae_dir", [("E_varsr/varsr", "F_restorevar"), ("F_restorevar/restorevar", "E_varsr"),
                                                 ("E_varsr/varsr", "D_var")])
def test_var_family_refuses_the_vqvae_of_another_model(model_dir, vqvae_dir):
    model = var_core.load(FIXTURES / f"{model_dir}_tiny.safetensors").model
    vqvae = var_core.load(FIXTURES / vqvae_dir / "vqvae_tiny.safetensors").model
    with pytest.raises(var_core.ParameterError, match=r"does not match the .* transformer.*load the VQVAE it was "
                                                      r"trained with"):
        fr.restore_any(model, vqvae, lq(64, 64), options=RestoreOptions(scale=1))


# -- T5 folder -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def t5_folder(tmp_path_factory):
    from test_comfy_restore import make_tiny_t5  # 128 channels, the fixture student's text width

    return make_tiny_t5(tmp_path_factory.mktemp("t5") / "tiny-t5")


@pytest.fixture(scope="module")
def t5(t5_folder):
    return text_lib.T5TextEncoder.from_folder(t5_folder)


def broken_copy(t5_folder: Path, tmp_path: Path, name: str, content: bytes | None) -> Path:
    folder = tmp_path / "flan-t5-xl"
    shutil.copytree(t5_folder, folder)
    if content is None:
        (folder / name).unlink()
    else:
        (folder / name).write_bytes(content)
    return folder


@pytest.mark.parametrize("name,content,match", [
    ("tokenizer.json", None, r"no tokenizer files \(spiece.model or tokenizer.json\); copy the whole flan-t5-xl"),
    ("tokenizer.json", b"{}", r"cannot load the T5 tokenizer.*copy the whole flan-t5-xl folder again"),
    ("model.safetensors", None, r"cannot load the T5 encoder weights.*copy the whole flan-t5-xl folder"),
    ("model.safetensors", b"\x08\x00\x00\x00\x00\x00\x00\x00{}", r"cannot load the T5 encoder weights.*copy the whole"),
    ("config.json", None, r"no config.json; this is not a transformers T5 folder"),
], ids=["no-tokenizer", "damaged-tokenizer", "no-weights", "damaged-weights", "no-config"])
def test_t5_folder_with_missing_or_damaged_files(t5_folder, tmp_path, name, content, match):
    with pytest.raises(var_core.CheckpointError, match=match):
        text_lib.T5TextEncoder.from_folder(broken_copy(t5_folder, tmp_path, name, content))


def test_missing_t5_folder_names_where_it_goes(tmp_path):
    with pytest.raises(var_core.CheckpointError, match=r"not found. Put the flan-t5-xl folder.*models/text_encoders/"
                                                       r", or leave the prompt empty"):
        text_lib.T5TextEncoder.from_folder(tmp_path / "flan-t5-xl")


# -- prompts -----------------------------------------------------------------------------------------

rng = random.Random(0)
LONG_NON_ASCII = "".join(chr(rng.choice([rng.randint(0x20, 0x7E), rng.randint(0x4E00, 0x9FFF),
                                         rng.randint(0x1F600, 0x1F64F), 0x0301, 0x05D0])) for _ in range(10_000))


@pytest.mark.parametrize("prompt", ["a " * 5_000, "日本語の写真 🎉 é ﬁ", "\x00\x01 tab\t\r\n",
                                    "\ud800 a lone surrogate, as JSON can send it"],
                         ids=["10000-ascii", "non-ascii", "control", "lone-surrogate"])
def test_long_and_non_ascii_prompts_encode(t5, prompt):
    cond = t5.encode([prompt])
    assert 1 <= cond.lens[0] <= text_lib.MAX_LENGTH and torch.isfinite(cond.kv_compact).all()


@torch.no_grad()
def test_10000_non_ascii_characters_are_truncated_and_restore(models, t5):
    cond = t5.encode([LONG_NON_ASCII])
    assert cond.lens == (text_lib.MAX_LENGTH,)  # truncated to the official 512 tokens
    y = restore.restore_image(*models, lq(32, 32), text=cond, options=RestoreOptions(scale=1, **ARGMAX))
    assert y.shape == (1, 3, 32, 32) and torch.isfinite(y).all()


def test_empty_prompt_means_unconditional_and_needs_no_t5(models):
    with pytest.raises(ValueError, match=r"empty prompts have no T5 features; use var_core.text.unconditional\(\)"):
        text_lib.T5TextEncoder(tokenizer=None, encoder=torch.nn.Linear(1, 1)).encode(["   "])
    # The front ends (node, CLI) pass None for an empty prompt: the model's own no-text embedding.
    with torch.no_grad():
        a = restore.restore_image(*models, lq(32, 32), text=None, options=RestoreOptions(scale=1, **ARGMAX))
        b = restore.restore_image(*models, lq(32, 32), text=text_lib.unconditional(models[0].cfg_uncond),
                                  options=RestoreOptions(scale=1, **ARGMAX))
    assert torch.equal(a, b)


# -- images --------------------------------------------------------------------------------------------


def png_16bit_rgb(path: Path, arr_HW3: np.ndarray) -> None:
    """Write a 16-bit RGB PNG by hand (Pillow writes 16 bits only for gray)."""
    h, w, _ = arr_HW3.shape
    raw = b"".join(b"\x00" + arr_HW3[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def test_rgba_keeps_its_alpha_through_a_restore(models, tmp_path):
    rgba = np.random.default_rng(0).integers(0, 256, (24, 40, 4), dtype=np.uint8)
    rgba[:, :20, 3], rgba[:, 20:, 3] = 0, 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    rgb, alpha = image.split_alpha(image.load_image_file(tmp_path / "a.png"))
    with torch.no_grad():
        y = restore.restore_image(*models, image.to_model(rgb), options=RestoreOptions(scale=2, **ARGMAX))
    out = image.merge_alpha(image.from_model(y), alpha)
    assert out.shape == (1, 48, 80, 4)
    assert out[0, :, :38, 3].max() < 0.02 and out[0, :, 42:, 3].min() > 0.98


@pytest.mark.parametrize("mode", ["L", "LA", "P", "I;16", "RGB16"])
def test_gray_palette_and_16bit_pngs_load_as_rgb(tmp_path, mode):
    g = np.random.default_rng(1)
    path = tmp_path / f"{mode.replace(';', '')}.png"
    if mode == "RGB16":
        arr = g.integers(0, 65536, (9, 13, 3)).astype(np.uint16)
        png_16bit_rgb(path, arr)
    elif mode == "I;16":
        Image.fromarray(g.integers(0, 65536, (9, 13)).astype(np.uint16)).save(path)
    else:
        Image.fromarray(g.integers(0, 256, (9, 13, 2) if mode == "LA" else (9, 13), dtype=np.uint8),
                        "LA" if mode == "LA" else "L").convert(mode).save(path)
    x = image.load_image_file(path)
    assert x.shape == (1, 9, 13, 4 if mode == "LA" else 3) and 0 <= x.min() and x.max() <= 1
    rgb, alpha = image.split_alpha(x)
    assert rgb.shape == (1, 9, 13, 3) and (alpha is not None) == (mode == "LA")
    if mode in ("L", "I;16"):
        assert torch.equal(rgb[..., 0], rgb[..., 2])


@torch.no_grad()
def test_one_pixel_image(models):
    y = restore.restore_image(*models, lq(1, 1), options=RestoreOptions(scale=4.0, **ARGMAX))
    assert y.shape == (1, 3, 4, 4) and torch.isfinite(y).all()


def test_8000_px_at_scale_4_is_refused_before_any_big_allocation(models):
    big = torch.zeros(1, 3, 1, 1).expand(1, 3, 8000, 8000)  # no memory behind it
    before = rss_bytes()
    with pytest.raises(var_core.ParameterError, match=r"32000x32000 pixels, more than the 16384 px per side.*lower the "
                                                      r"scale or crop the image"):
        restore.restore_image(*models, big, options=RestoreOptions(scale=4.0))
    assert rss_bytes() - before < 64 * 2**20  # the 32000^2 buffers (12 GB each) were never made
    # The nodes read the size from the IMAGE's shape before split_alpha copies it.
    assert image.image_size(torch.zeros(1, 1, 1, 3).expand(1, 8000, 8000, 3)) == (8000, 8000)
    with pytest.raises(var_core.ParameterError, match="16384"):
        restore.output_size(*image.image_size(torch.zeros(1, 1, 1, 3).expand(1, 8000, 8000, 3)), 4.0)


def test_8000_px_at_scale_1_is_planned_in_model_sized_tiles():
    assert restore.output_size(8000, 8000, 1.0) == (8000, 8000)  # under the limit: restored, tile by tile
    starts = tiling.tile_starts(8000, 512, 64)
    assert len(starts) == 18 and starts[0] == 0 and starts[-1] + 512 == 8000
    assert all(b - a <= 512 - 64 for a, b in zip(starts, starts[1:]))  # every overlap >= 64
    assert tiling.count_tiles(8000, 8000, 512, 64) == 324
    assert restore.count_steps(8000, 8000, RestoreOptions(scale=1.0)) == 324  # one model-sized pass per tile


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_one_nan_or_inf_pixel_is_refused(dtype, value):
    x = torch.rand(2, 64, 48, 3).to(dtype)
    x[1, 63, 47, 2] = value
    with pytest.raises(var_core.ImageInputError, match="NaN or Inf values; check the node that produced it"):
        image.split_alpha(x)


@pytest.mark.parametrize("bad,match", [
    (torch.zeros(0, 3, 32, 32), r"non-empty \(B, 3, H, W\) image batch, got \(0, 3, 32, 32\)"),
    ([torch.zeros(1, 3, 32, 32), torch.zeros(1, 3, 48, 64)], r"image batch, got list"),
    (torch.zeros(1, 1, 32, 32), r"image batch, got \(1, 1, 32, 32\)"),
    (torch.zeros(1, 3, 32, 32).index_fill_(2, torch.tensor([5]), float("nan")), "NaN or Inf values"),
], ids=["empty", "list-of-sizes", "gray-model-tensor", "nan-model-tensor"])
def test_restore_refuses_an_empty_or_ragged_batch(models, bad, match):
    with pytest.raises(var_core.ImageInputError, match=match):
        restore.restore_image(*models, bad, options=RestoreOptions(scale=1))


def test_image_batch_checks():
    with pytest.raises(var_core.ImageInputError, match="the image batch is empty; connect a node that outputs"):
        image.split_alpha(torch.zeros(0, 8, 8, 3))
    with pytest.raises(var_core.ImageInputError, match="expected an image tensor, got list"):
        image.split_alpha([torch.zeros(8, 8, 3), torch.zeros(9, 9, 3)])
    with pytest.raises(var_core.ImageInputError, match="complex"):
        image.split_alpha(torch.zeros(1, 8, 8, 3, dtype=torch.complex64))
    with pytest.raises(var_core.ImageInputError, match="2 alpha channels for 1 images"):
        image.merge_alpha(torch.zeros(1, 8, 8, 3), torch.zeros(2, 8, 8, 1))
    mask, _ = image.split_alpha(torch.ones(1, 2, 2, 3, dtype=torch.bool))
    assert torch.equal(mask, torch.ones(1, 2, 2, 3))  # a boolean image is 0 / 1, not 16-bit


def test_cli_restores_a_folder_of_images_of_different_sizes_and_kinds(tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    g = np.random.default_rng(2)
    # Sizes whose x2 output is on an Infinity template: each restores in one small pass.
    Image.fromarray(g.integers(0, 256, (16, 24, 3), dtype=np.uint8)).save(src / "rgb.png")
    Image.fromarray(g.integers(0, 256, (24, 24), dtype=np.uint8), "L").save(src / "gray.png")
    Image.fromarray(g.integers(0, 256, (16, 16, 4), dtype=np.uint8), "RGBA").save(src / "rgba.png")
    Image.fromarray(g.integers(0, 65536, (32, 32)).astype(np.uint16)).save(src / "gray16.png")
    png_16bit_rgb(src / "rgb16.png", g.integers(0, 65536, (24, 16, 3)).astype(np.uint16))
    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / "varestorer.safetensors").symlink_to(STUDENT)
    (weights / "infinity_vae_d32reg.pth").symlink_to(FIXTURES / "A_bsq_vae" / "vae_tiny.pth")
    out = tmp_path / "out"
    rc = cli.main(["restore", str(src), "-o", str(out), "--weights", str(weights), "--scale", "2", "--sampling",
                   "argmax", "--prompt", "   ", "-q"])
    assert rc == 0, capsys.readouterr().err
    want = {"rgb": ((48, 32), "RGB"), "gray": ((48, 48), "RGB"), "rgba": ((32, 32), "RGBA"),
            "gray16": ((64, 64), "RGB"), "rgb16": ((32, 48), "RGB")}
    for stem, (size, mode) in want.items():
        with Image.open(out / f"{stem}.png") as im:
            assert (im.size, im.mode) == (size, mode), stem


# -- scale, tiles ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,match", [
    (dict(scale=float("nan")), r"scale must be in \(0, 8\]"), (dict(scale=float("inf")), r"scale must be in \(0, 8\]"),
    (dict(scale=-0.0), r"scale must be in \(0, 8\]"), (dict(scale=8.0001), r"scale must be in \(0, 8\]"),
    (dict(tile=512, overlap=600), r"tile overlap \(600\) must be at least 0 and smaller than the tile \(512\)"),
    (dict(tile=64, overlap=-8), r"tile overlap \(-8\) must be at least 0"),
    (dict(tile=32), "tile size must be at least 64 pixels"),
])
def test_bad_scale_and_tile_options(kwargs, match):
    with pytest.raises(var_core.ParameterError, match=match):
        RestoreOptions(**kwargs)


def test_tiny_scale_of_a_small_image_gives_at_least_one_pixel():
    assert restore.output_size(3, 5, 0.01) == (1, 1)
    with pytest.raises(var_core.ParameterError, match="lower the scale or crop the image"):
        restore.output_size(3000, 3000, 8.0)


# -- hypothesis: images of any shape / dtype, options of any value ------------------------------------------

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.uint8, torch.int8, torch.int16,
          torch.int32, torch.int64, torch.bool, torch.complex64]


@FAST
@given(shape=st.lists(st.integers(0, 5), min_size=0, max_size=5), dtype=st.sampled_from(DTYPES),
       fill=st.sampled_from([None, float("nan"), float("inf"), -1.0, 2.0]))
def test_any_image_shape_and_dtype_works_or_raises_image_input_error(shape, dtype, fill):
    x = torch.empty(shape, dtype=torch.float64).uniform_(-0.5, 1.5)
    if fill is not None and x.numel():
        x.view(-1)[0] = fill
    if dtype.is_complex or dtype.is_floating_point:
        x = x.to(dtype)
    else:
        x = (x.nan_to_num(0, 1, 0) * 100).to(dtype)
    try:
        rgb, alpha = image.split_alpha(x)
    except var_core.ImageInputError:
        return
    b, h, w = rgb.shape[:3]
    assert rgb.shape[-1] == 3 and rgb.dtype == torch.float32 and 0 <= rgb.min() and rgb.max() <= 1
    assert (b, h, w) == tuple(([1] + shape if len(shape) == 3 else shape)[:3])
    x_B3HW = image.to_model(rgb)
    assert x_B3HW.shape == (b, 3, h, w)
    out = image.merge_alpha(image.from_model(x_B3HW), alpha)
    assert out.shape[:3] == (b, h, w) and out.shape[-1] == (3 if alpha is None else 4)
    assert image.image_size(x) == (h, w)


@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(x=st.one_of(st.none(), st.integers(), st.text(max_size=3), st.lists(st.integers(0, 2), max_size=5)))
def test_image_conversions_refuse_what_is_not_an_image(x):
    t = torch.zeros(x) if isinstance(x, list) else x
    for fn in (image.split_alpha, image.to_model, image.from_model, image.image_size):
        try:
            fn(t)
        except var_core.ImageInputError:
            continue


NUMBER = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-(2**70), 2**70))


@FAST
@given(cls=st.sampled_from([sampler.SamplerOptions, RestoreOptions, fr.VARSROptions]), data=st.data())
def test_any_option_value_is_accepted_or_raises_parameter_error(cls, data):
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = data.draw(st.dictionaries(st.sampled_from(names), NUMBER, max_size=3))
    try:
        cls(**kwargs)
    except var_core.ParameterError:
        pass


@FAST
@given(cfg=st.floats(0, 30), tau=st.floats(0.01, 5), top_k=st.integers(0, 10_000), top_p=st.floats(0, 1),
       next_scale=st.sampled_from(["area", "trilinear"]), seed=st.integers(0, 2**64 - 1),
       layers=st.lists(st.integers(-4, 0), min_size=1, max_size=3))
def test_valid_sampler_options_are_accepted(cfg, tau, top_k, top_p, next_scale, seed, layers):
    opts = sampler.SamplerOptions(cfg=cfg, tau=tau, top_k=top_k, top_p=top_p, next_scale=next_scale, seed=seed,
                                  cfg_insertion_layer=tuple(layers))
    assert opts.per_scale(3) == ((cfg,) * 3, (tau,) * 3)


@FAST
@given(scale=st.floats(0.25, 8), tile=st.integers(64, 4096), data=st.data(),
       sampling=st.sampled_from(restore.SAMPLING_MODES), color_fix=st.sampled_from(["none", "wavelet", "adain"]),
       seed=st.integers(0, 2**64 - 1), h=st.integers(1, 2048), w=st.integers(1, 2048))
def test_valid_restore_options_are_accepted_and_plan_tiles(scale, tile, data, sampling, color_fix, seed, h, w):
    overlap = data.draw(st.integers(0, tile - 1))
    opts = RestoreOptions(scale=scale, tile=tile, overlap=overlap, sampling=sampling, color_fix=color_fix, seed=seed)
    H, W = restore.output_size(h, w, opts.scale)
    for length in (H, W):
        starts = tiling.tile_starts(length, tile, overlap)
        assert starts[0] == 0 and starts[-1] + min(tile, length) == length  # covered, every tile full-size
    assert restore.count_steps(h, w, opts) == tiling.count_tiles(H, W, tile, overlap) >= 1


@FAST
@given(kwargs=st.fixed_dictionaries({}, optional={
    "cfg": st.one_of(st.floats(max_value=-1e-9), st.just(float("nan"))),
    "tau": st.one_of(st.floats(max_value=0), st.just(float("nan"))),
    "top_k": st.integers(max_value=-1), "top_p": st.one_of(st.floats(min_value=1.0001), st.floats(max_value=-1e-9)),
    "next_scale": st.text(max_size=8).filter(lambda s: s not in ("area", "trilinear")),
    "seed": st.one_of(st.integers(max_value=-1), st.integers(min_value=2**64)),
    "cfg_insertion_layer": st.one_of(st.integers(min_value=1), st.floats()),
}).filter(bool))
def test_invalid_sampler_options_raise_parameter_error(kwargs):
    with pytest.raises(var_core.ParameterError):
        sampler.SamplerOptions(**kwargs)
