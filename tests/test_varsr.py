"""VARSR (transformer + LR encoder + diffusion refiner) against the official fixture ``E_varsr`` (CPU, fast)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import var_core
from var_core import conformance
from var_core.kv_cache import KVCache
from var_core.varsr import VARSR, VARSRConfig, refiner_output_to_fhat
from var_core.varsr_restore import varsr_restore
from var_core.varsr_refiner import diffusion_schedule, space_timesteps

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"
E = FIXTURES / "E_varsr"

pytestmark = pytest.mark.skipif(not (E / "manifest.json").is_file(), reason=f"fixture folder {E} is absent")


@pytest.fixture(scope="module")
def documented() -> dict:
    return json.loads((E / "config.json").read_text())


@pytest.fixture(scope="module")
def io() -> dict:
    return load_file(str(E / "varsr_io.safetensors"))


@pytest.fixture(scope="module")
def vqvae():
    return var_core.load(E / "vqvae_tiny.safetensors", expect=var_core.Family.VAR_VQVAE).model


@pytest.fixture(scope="module")
def model() -> VARSR:
    return var_core.load(E / "varsr_tiny.safetensors", expect=var_core.Family.VARSR).model


def test_config_from_trainer_pth_and_safetensors_matches_config_json(documented):
    pth = var_core.load(E / "varsr_tiny_trainer.pth")  # {'trainer': {'var_wo_ddp': sd}}
    st = var_core.load(E / "varsr_tiny.safetensors")
    assert pth.family == st.family == var_core.Family.VARSR
    assert pth.config == st.config
    cfg, kw, wrap = st.config, documented["var_kwargs"], documented["wrappers"]
    assert (cfg.depth, cfg.embed_dim, cfg.num_heads) == (kw["depth"], kw["embed_dim"], kw["num_heads"])
    assert cfg.mlp_hidden == round(kw["embed_dim"] * kw["mlp_ratio"])
    assert cfg.num_classes == kw["num_classes"]
    assert list(cfg.patch_nums) == kw["patch_nums"] == documented["patch_nums"]
    assert (cfg.shared_aln, cfg.attn_l2_norm, cfg.norm_eps) == (kw["shared_aln"], kw["attn_l2_norm"], kw["norm_eps"])
    assert list(cfg.lr_channels) == wrap["ControlNetConditioningEmbedding_block_out_channels"]["here"]
    refiner = wrap["DiffLoss"]["here"]
    assert (cfg.refiner_width, cfg.refiner_depth) == (refiner["width"], refiner["depth"])
    assert cfg.codebook_dim == documented["vqvae_kwargs"]["z_channels"]
    assert cfg.vocab_size == documented["vqvae_kwargs"]["vocab_size"]
    assert cfg.lr_size == documented["lr_hw"] and cfg.context_tokens == cfg.patch_nums[-1] ** 2 + 1
    assert diffusion_schedule(documented["diffusion"]["timestep_respacing"]).timestep_map == tuple(
        documented["diffusion"]["timestep_map"])


def test_conformance_runner_passes_fixture_e(capsys):
    manifest = json.loads((E / "manifest.json").read_text())
    n = sum(len(c["expected"]) for c in manifest["cases"])
    assert conformance.main([str(E)]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"{n} passed, 0 failed, 0 skipped"


def test_teacher_forcing_equals_kv_cache_logits(model, vqvae, io):
    lr = io["lr"]
    with torch.no_grad():
        s = model.autoregressive_infer_cfg(vqvae, lr, 0, g_seed=0, top_k=1, keep_logits=True, refine=False)
        tf = model(lr, vqvae.idx_to_var_input(s.idx), 0)
    cached = torch.cat([s.logits_raw[0][:2, -1:]] + [lg[:2] for lg in s.logits_raw[1:]], dim=1)
    assert torch.allclose(tf, cached, atol=1e-5, rtol=1e-5)
    assert s.refiner_delta is None and torch.equal(s.f_hat, s.f_hat_discrete)


def test_seeded_restore_is_reproducible_and_batch_equals_single_runs(model, vqvae, io):
    lr = io["lr"]
    kw = dict(cfg=3.0, steps=4, top_k=50, top_p=0.9)
    with torch.no_grad():
        a = varsr_restore(model, vqvae, lr, seed=3, **kw)
        b = varsr_restore(model, vqvae, lr, seed=3, **kw)
        single = varsr_restore(model, vqvae, lr[1:], seed=4, **kw)
        c = varsr_restore(model, vqvae, lr, seed=5, **kw)
        g = varsr_restore(model, vqvae, lr, generator=torch.Generator().manual_seed(3), color_fix="none", **kw)
    assert torch.equal(a, b)
    assert torch.equal(a[1:], single)
    assert not torch.equal(a, c)
    assert a.shape == (2, 3, 64, 64) and a.min() >= -1 and a.max() <= 1
    assert torch.isfinite(g).all()


def test_kv_cache_empty_after_a_run_and_after_an_exception(model, vqvae, io, monkeypatch):
    cache = KVCache(len(model.blocks))
    with torch.no_grad():
        model.autoregressive_infer_cfg(vqvae, io["lr"], 0, g_seed=0, kv_cache=cache, refine=False)
    assert cache.is_empty
    calls, original = [], vqvae.next_ar_input

    def fail_at_scale_2(si, *args, **kwargs):
        calls.append(si)
        if si == 2:
            raise RuntimeError("interrupted")
        return original(si, *args, **kwargs)

    monkeypatch.setattr(vqvae, "next_ar_input", fail_at_scale_2)
    with pytest.raises(RuntimeError, match="interrupted"), torch.no_grad():
        model.autoregressive_infer_cfg(vqvae, io["lr"], 0, g_seed=0, kv_cache=cache)
    assert calls == [0, 1, 2]  # the cache held three scales' keys when the error came
    assert cache.is_empty
    assert not any(isinstance(v, torch.Tensor) for m in model.modules() for v in vars(m).values())


def test_official_refiner_reshape_is_the_plain_layout_only_at_1024_tokens(io):
    out = torch.randn(2 * 2, 32 * 32, 8)
    assert torch.equal(refiner_output_to_fhat(out, 2, 32), refiner_output_to_fhat(out, 2, 32, official_reshape=False))
    small = io["refiner_out"].reshape(4, 16, -1)  # the fixture: 16 tokens x 64 channels
    assert torch.allclose(refiner_output_to_fhat(small, 2, 4), io["refiner_delta_fhat"])
    plain = refiner_output_to_fhat(small, 2, 4, official_reshape=False)
    assert not torch.equal(refiner_output_to_fhat(small, 2, 4), plain)
    with pytest.raises(var_core.ParameterError, match="1024"):
        refiner_output_to_fhat(torch.randn(4, 9, 8), 2, 3)


def test_refiner_respacing():
    assert space_timesteps(1000, "10") == [0, 111, 222, 333, 444, 555, 666, 777, 888, 999]
    assert space_timesteps(1000, 10) == space_timesteps(1000, "10")
    assert space_timesteps(100, "ddim4") == [0, 25, 50, 75]
    assert len(space_timesteps(300, "10,15,20")) == 45
    with pytest.raises(var_core.ParameterError):
        diffusion_schedule(1)


def test_bad_inputs_are_refused(model, vqvae, io):
    with pytest.raises(var_core.ImageInputError, match="64x64"):
        model.autoregressive_infer_cfg(vqvae, io["lr"][:, :, :32, :32], 0, g_seed=0)
    with pytest.raises(var_core.ParameterError, match="labels"):
        model.autoregressive_infer_cfg(vqvae, io["lr"], torch.tensor([0, 2]), g_seed=0)
    other = var_core.load(FIXTURES / "D_var" / "vqvae_tiny.safetensors").model if (FIXTURES / "D_var").is_dir() else None
    if other is not None:
        with pytest.raises(var_core.ParameterError, match="VQVAE"):
            model.autoregressive_infer_cfg(other, io["lr"], 0, g_seed=0)


def test_official_sizes_derive_from_shapes_alone():
    # The released VARSR.pth sizes (depth 24, 512 px, default --pn), built on the meta device.
    pn = (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)
    for shared in (False, True):
        cfg = VARSRConfig(depth=24, embed_dim=1536, num_heads=24, mlp_hidden=6144, codebook_dim=32, vocab_size=4096,
                          num_classes=2, patch_nums=pn, shared_aln=shared, attn_l2_norm=True,
                          lr_channels=(32, 128, 256, 512, 1536), lr_in_channels=3, refiner_width=1024,
                          refiner_depth=6, refiner_freq_dim=256)
        with torch.device("meta"):
            sd = VARSR(config=cfg).state_dict()
        assert cfg.lr_size == 512 and cfg.context_tokens == 1025
        assert var_core.detect_family(sd) == var_core.Family.VARSR  # also with shared_ada_lin
        assert VARSRConfig.from_state_dict(sd) == cfg  # no lvl_1L: the known schedule
        counts = [cfg.context_tokens] + [p * p for p in pn[1:]]
        sd["lvl_1L"] = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))[None]
        assert VARSRConfig.from_state_dict(sd) == cfg
