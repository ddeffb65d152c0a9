"""SwinIR pre-cleaner: loading from both official formats, the G_swinir fixture, odd sizes, dtypes."""

from __future__ import annotations

import json
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

import var_core
from var_core import CheckpointError, Family, ImageInputError, ParameterError, swinir
from var_core.conformance import compare
from var_core.conformance_cases import swinir as adapter

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"
FOLDER = FIXTURES / "G_swinir"
pytestmark = pytest.mark.skipif(not (FOLDER / "manifest.json").is_file(), reason="G_swinir fixture absent")


@pytest.fixture(scope="module")
def manifest():
    return json.loads((FOLDER / "manifest.json").read_text())


@pytest.fixture(scope="module")
def model():
    return var_core.load(FOLDER / "swinir_tiny.safetensors", expect=Family.SWINIR).model


@pytest.fixture(scope="module")
def image01():
    return load_file(str(FOLDER / "swinir_io.safetensors"))["input01"]


def test_both_formats_give_the_fixture_config():
    ckpt = var_core.load(FOLDER / "swinir_tiny.ckpt")
    sft = var_core.load(FOLDER / "swinir_tiny.safetensors")
    assert ckpt.family == sft.family == Family.SWINIR
    assert ckpt.config == sft.config
    kw = json.loads((FOLDER / "config.json").read_text())["swinir_kwargs"]
    c = ckpt.config
    assert c.in_chans == kw["in_chans"]
    assert c.embed_dim == kw["embed_dim"]
    assert list(c.depths) == kw["depths"]
    assert list(c.num_heads) == kw["num_heads"]
    assert c.window_size == kw["window_size"]
    assert c.mlp_ratio == kw["mlp_ratio"]
    assert c.upscale == kw["sf"]
    assert c.unshuffle_scale == (kw["unshuffle_scale"] if kw["unshuffle"] else 1)
    assert c.upsampler == kw["upsampler"]
    assert c.resi_connection == kw["resi_connection"]
    assert c.img_range == kw["img_range"]
    assert c.out_scale == 1
    # Same weights from both files.
    for (ka, a), (kb, b) in zip(ckpt.model.state_dict().items(), sft.model.state_dict().items()):
        assert ka == kb and torch.equal(a, b)


@pytest.mark.parametrize("index", [0, 1])
def test_fixture_cases(manifest, index):
    case = manifest["cases"][index]
    tensors = load_file(str(FOLDER / case["tensors"]))
    weights = {role: str((FOLDER / rel).resolve()) for role, rel in manifest["weights"].items()}
    with torch.no_grad():
        got = adapter.run_case(case, tensors, weights, FOLDER)
    assert set(got) == set(case["expected"])
    for name, tol in case["expected"].items():
        ok, detail = compare(got[name], tensors[name], tol)
        assert ok, f"{case['name']} {name}: {detail}"


def test_clean_is_the_m11_wrapper(model, image01):
    with torch.no_grad():
        # The x*2-1 round trip moves inputs by 1e-8, which the network turns into ~5e-6.
        assert torch.allclose(swinir.clean(model, image01 * 2 - 1), 2 * model(image01) - 1, atol=1e-5)


@pytest.mark.parametrize("hw", [(100, 72), (64, 64), (33, 150)])
def test_sizes_that_are_not_multiples_of_the_window(model, image01, hw):
    h, w = hw
    x = image01[:, :, :h, :w] if h <= 128 and w <= 128 else F.interpolate(image01, size=hw, mode="bilinear")
    with torch.no_grad():
        y = model(x)
        # The result is the padded image's result cropped back (reflect pad to a multiple of 64).
        m = model.config.pad_multiple
        padded = F.pad(x, (0, (-w) % m, 0, (-h) % m), mode="reflect")
        ref = model(padded)[:, :, :h, :w]
    assert y.shape == x.shape and torch.isfinite(y).all()
    assert torch.allclose(y, ref, atol=1e-6)


def test_bad_inputs_name_the_fix(model, image01):
    with pytest.raises(ImageInputError, match="at least 33x33"):
        model(image01[:, :, :32, :64])
    with pytest.raises(ImageInputError, match="RGB"):
        model(torch.rand(1, 4, 64, 64))
    with pytest.raises(ImageInputError, match="255"):
        model((image01 * 255).to(torch.uint8))


def test_fp16_is_refused_and_fp16_input_upcast(image01):
    x = image01[:, :, :64, :64]
    m = var_core.load(FOLDER / "swinir_tiny.safetensors").model
    with torch.no_grad():
        ref = m(x)
        y16 = m(x.half())  # fp16 input on fp32 weights: computed in fp32, returned as fp16
        assert y16.dtype == torch.float16 and torch.allclose(y16.float(), ref, atol=2e-3)
        ybf = m.to(torch.bfloat16)(x.bfloat16())
        assert torch.isfinite(ybf).all() and (ybf.float() - ref).abs().max() < 0.1
        with pytest.raises(ParameterError, match="float16"):
            m.half()(x)


def test_operations_namespace_is_used():
    calls = []

    class Linear(nn.Linear):
        def forward(self, x):
            calls.append("Linear")
            return super().forward(x)

    ops = types.SimpleNamespace(Linear=Linear, Conv2d=nn.Conv2d, LayerNorm=nn.LayerNorm)
    m = var_core.load(FOLDER / "swinir_tiny.safetensors", operations=ops).model
    with torch.no_grad():
        m(torch.rand(1, 3, 64, 64))
    assert len(calls) == 4 * sum(m.config.depths)  # qkv, proj, fc1, fc2 per block


def test_nonstandard_relative_position_index_is_rejected():
    sd = load_file(str(FOLDER / "swinir_tiny.safetensors"))
    key = "layers.0.residual_group.blocks.0.attn.relative_position_index"
    sd[key] = sd[key].flip(0)
    with pytest.raises(CheckpointError, match="relative position index"):
        var_core.load(sd)
