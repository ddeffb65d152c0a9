"""Infinity / VARestorer transformer against the official fixture ``B_varestorer_student`` (CPU, fast)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import var_core
from var_core import lora, student
from var_core.conformance import compare
from var_core.conformance_cases import varestorer_student
from var_core.infinity_model import TextCondition

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"
B = FIXTURES / "B_varestorer_student"

pytestmark = pytest.mark.skipif(not (B / "manifest.json").is_file(), reason=f"fixture folder {B} is absent")


@pytest.fixture(scope="module")
def manifest():
    return json.loads((B / "manifest.json").read_text())


@pytest.fixture(scope="module")
def io():
    return load_file(str(B / "student_lora_io.safetensors"))


def _load():
    return var_core.load(B / "varestorer_tiny_lora.safetensors", expect=var_core.Family.INFINITY)


def _logits(model, io, **kw):
    text = TextCondition.from_cu_seqlens(io["text_kv_compact"], io["text_cu_seqlens_k"])
    schedule = [tuple(s) for s in json.loads((B / "config.json").read_text())["scale_schedule"]]
    with torch.no_grad():
        return model.forward_logits(io["x_BLC_long"], text, schedule, **kw)


def test_config_from_weights_pth_and_safetensors():
    documented = json.loads((B / "config.json").read_text())
    cfg_st = _load().config
    cfg_pth = var_core.load(B / "varestorer_tiny_lora.pth").config
    assert cfg_st == cfg_pth
    kw = documented["model_kwargs"]
    assert (cfg_st.depth, cfg_st.embed_dim, cfg_st.num_heads, cfg_st.block_chunks) == (
        kw["depth"], kw["embed_dim"], kw["num_heads"], kw["block_chunks"])
    assert cfg_st.mlp_hidden == round(kw["embed_dim"] * kw["mlp_ratio"] / 256) * 256
    assert cfg_st.lora_rank == int(re.search(r"\br=(\d+)", documented["lora"]["call"]).group(1))
    assert cfg_st.text_channels == documented["text_channels"]
    assert cfg_st.text_maxlen == documented["constructor_kwargs"]["text_maxlen"]
    assert len(cfg_st.lora_targets) == 5 * kw["depth"]  # sa.mat_qkv, sa.proj, ca.mat_q, ca.mat_kv, ca.proj


def test_adapters_are_peft_layers():
    from peft.tuners.lora import LoraLayer

    loaded = _load()
    layers = lora.lora_layers(loaded.model)
    assert sorted(layers) == sorted(loaded.config.lora_targets)
    assert all(isinstance(m, LoraLayer) for m in layers.values())
    assert all(b.ca.kv_has_lora for b in loaded.model.iter_blocks())


def test_merged_lora_matches_unmerged(io):
    model = _load().model
    ref, ref_bf16 = _logits(model, io, bf16_rounding=False), _logits(model, io)
    lora.merge_lora(model)
    assert not lora.lora_layers(model)
    torch.testing.assert_close(_logits(model, io, bf16_rounding=False), ref, atol=1e-4, rtol=0)
    # The official bf16 rounding of the cross-attention turns float32 ulps into bf16 steps (hence the
    # fixture's 1e-3 logits tolerance).
    torch.testing.assert_close(_logits(model, io), ref_bf16, atol=1e-3, rtol=1e-3)
    with pytest.raises(var_core.ParameterError):
        lora.strip_lora(model)


def test_official_quirks_matter(io):
    model = _load().model
    assert (_logits(model, io, drop_v_bias=False) - io["logits"]).abs().max() > 1e-3
    assert (_logits(model, io, bf16_rounding=False) - io["logits"]).abs().max() > 1e-4


def test_gumbel_generator_reproduces_recorded_noise(io):
    schedule = [tuple(s) for s in json.loads((B / "config.json").read_text())["scale_schedule"]]
    gen = torch.Generator().manual_seed(1)  # the fixture drew with the global RNG after torch.manual_seed(1)
    for i, logits_s in enumerate(student.split_scales(io["logits"], schedule)):
        drawn = student.gumbel_bits(logits_s, 0.5, generator=gen)
        given = student.gumbel_bits(logits_s, 0.5, uniforms=io[f"gumbel_U_s{i}"])
        assert torch.equal(drawn, given)
        assert torch.equal(given.float(), io[f"pred_bits_s{i}"])


def test_restore_reproduces_official_image(io):
    schedule = [tuple(s) for s in json.loads((B / "config.json").read_text())["scale_schedule"]]
    vae = var_core.load(FIXTURES / "A_bsq_vae" / "vae_tiny.safetensors").model
    text = TextCondition.from_cu_seqlens(io["text_kv_compact"], io["text_cu_seqlens_k"])
    with torch.no_grad():
        res = student.restore(_load().model, vae, io["lq"], text, schedule, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(res.image, io["image_float"], atol=5e-4, rtol=5e-4)


def test_block_causal_mask_hides_later_scales(io):
    model = _load().model
    x = io["x_BLC_long"][:, :520]
    y = x.clone()
    y[:, -256:] = torch.randn_like(y[:, -256:])  # the last scale's inputs
    a = _logits(model, {**io, "x_BLC_long": x}, attn_mask="block_causal")
    b = _logits(model, {**io, "x_BLC_long": y}, attn_mask="block_causal")
    torch.testing.assert_close(a[:, :265], b[:, :265], atol=0, rtol=0)
    assert (a[:, 265:] - b[:, 265:]).abs().max() > 1e-3


def test_fixture_cases(manifest):
    weights = {role: str((B / rel).resolve()) for role, rel in manifest["weights"].items()}
    failures = []
    for case in manifest["cases"]:
        tensors = load_file(str(B / case["tensors"]))
        with torch.no_grad():
            got = varestorer_student.run_case(case, tensors, weights, B)
        for name, tol in case["expected"].items():
            ok, detail = compare(got[name], tensors[name], tol)
            if not ok:
                failures.append(f"{case['name']} {name}: {detail}")
    assert not failures, failures
