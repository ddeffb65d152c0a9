"""Original VAR (VQVAE + class-conditional transformer) against the official fixture ``D_var`` (CPU, fast).

Also loads the VQVAEs of the VARSR (E) and RestoreVAR (F) fixtures, which share this format.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import var_core
from var_core import conformance
from var_core.kv_cache import KVCache
from var_core.var_model import VAR, VARConfig, level_ids
from var_core.var_vqvae import DEFAULT_PATCH_NUMS, PhiSet, VQVAE, VQVAEConfig

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"
D, E, F_ = FIXTURES / "D_var", FIXTURES / "E_varsr", FIXTURES / "F_restorevar"

pytestmark = pytest.mark.skipif(not (D / "manifest.json").is_file(), reason=f"fixture folder {D} is absent")


@pytest.fixture(scope="module")
def documented() -> dict:
    return json.loads((D / "config.json").read_text())


@pytest.fixture(scope="module")
def io() -> dict:
    return load_file(str(D / "var_io.safetensors"))


@pytest.fixture(scope="module")
def vqvae() -> VQVAE:
    return var_core.load(D / "vqvae_tiny.safetensors", expect=var_core.Family.VAR_VQVAE).model


@pytest.fixture(scope="module")
def var() -> VAR:
    return var_core.load(D / "var_tiny.safetensors", expect=var_core.Family.VAR).model


def test_vqvae_config_from_pth_and_safetensors_matches_constructor(documented):
    cfg_pth = var_core.load(D / "vqvae_tiny.pth").config
    cfg_st = var_core.load(D / "vqvae_tiny.safetensors").config
    assert cfg_pth == cfg_st
    kw, dd = documented["vqvae_kwargs"], {**documented["vqvae_ddconfig_official"], **documented["vqvae_ddconfig_override"]}
    assert cfg_st.vocab_size == kw["vocab_size"]
    assert cfg_st.z_channels == kw["z_channels"] == dd["z_channels"]
    assert cfg_st.base_ch == kw["ch"]
    assert cfg_st.num_phi == kw["share_quant_resi"] and cfg_st.phi_layout == "partial"
    assert list(cfg_st.ch_mult) == dd["ch_mult"]
    assert cfg_st.num_res_blocks == dd["num_res_blocks"]
    assert cfg_st.in_channels == dd["in_channels"]
    # using_sa: attention at the lowest resolution only; using_mid_sa: in the middle block.
    last = len(dd["ch_mult"]) - 1
    assert cfg_st.encoder_attn == tuple(dd["using_sa"] and i == last for i in range(last + 1))
    assert cfg_st.decoder_attn == cfg_st.encoder_attn
    assert cfg_st.mid_attn == dd["using_mid_sa"]
    assert 2 ** (len(dd["ch_mult"]) - 1) == cfg_st.downsample


def test_var_config_from_pth_and_safetensors_matches_constructor(documented):
    cfg_pth = var_core.load(D / "var_tiny.pth").config
    cfg_st = var_core.load(D / "var_tiny.safetensors").config
    assert cfg_pth == cfg_st
    kw = documented["var_kwargs"]
    assert (cfg_st.depth, cfg_st.embed_dim, cfg_st.num_heads) == (kw["depth"], kw["embed_dim"], kw["num_heads"])
    assert cfg_st.mlp_hidden == round(kw["embed_dim"] * kw["mlp_ratio"])
    assert cfg_st.num_classes == kw["num_classes"]
    assert list(cfg_st.patch_nums) == kw["patch_nums"] == documented["patch_nums"]
    assert cfg_st.shared_aln == kw["shared_aln"]
    assert cfg_st.attn_l2_norm == kw["attn_l2_norm"]
    assert cfg_st.norm_eps == kw["norm_eps"]
    assert cfg_st.codebook_dim == documented["vqvae_kwargs"]["z_channels"]
    assert cfg_st.vocab_size == documented["vqvae_kwargs"]["vocab_size"]


def test_conformance_runner_passes_fixture_d(capsys):
    manifest = json.loads((D / "manifest.json").read_text())
    n = sum(len(c["expected"]) for c in manifest["cases"])
    assert conformance.main([str(D)]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"{n} passed, 0 failed, 0 skipped"


def test_teacher_forcing_equals_kv_cache_logits(vqvae, var, io):
    # The greedy run's conditional logits, recomputed in one teacher-forced pass over its own tokens.
    labels = io["labels"]
    with torch.no_grad():
        s = var.autoregressive_infer_cfg(vqvae, 2, labels, g_seed=0, cfg=4.0, top_k=1, keep_logits=True)
        tf = var(labels, vqvae.idx_to_var_input(s.idx))
    cached = torch.cat([lg[:2] for lg in s.logits_raw], dim=1)
    assert torch.allclose(tf, cached, atol=1e-5, rtol=1e-5)


def test_sampling_is_reproducible_and_leaves_no_kv_cache(vqvae, var, io):
    labels = io["labels"]
    kw = dict(cfg=1.5, top_k=100, top_p=0.95)
    cache = KVCache(len(var.blocks))
    with torch.no_grad():
        a = var.autoregressive_infer_cfg(vqvae, 2, labels, g_seed=3, kv_cache=cache, **kw)
        assert cache.is_empty
        b = var.autoregressive_infer_cfg(vqvae, 2, labels, generator=torch.Generator().manual_seed(3), **kw)
        c = var.autoregressive_infer_cfg(vqvae, 2, labels, g_seed=4, **kw)
        r = var.autoregressive_infer_cfg(vqvae, 2, None, g_seed=3, more_smooth=True, **kw)  # random classes
    assert all(torch.equal(x, y) for x, y in zip(a.idx, b.idx))
    assert torch.equal(a.image01, b.image01)
    assert any(not torch.equal(x, y) for x, y in zip(a.idx, c.idx))
    assert a.image01.shape == (2, 3, 64, 64) and 0 <= a.image01.min() and a.image01.max() <= 1
    assert torch.isfinite(r.image01).all()
    # The model keeps no sampling state: no tensor attributes besides its parameters and buffers.
    assert not any(isinstance(v, torch.Tensor) for m in var.modules() for v in vars(m).values())


def test_kv_cache_cleared_when_sampling_fails(vqvae, var, io, monkeypatch):
    calls = []
    original = vqvae.next_ar_input

    def fail_at_scale_2(si, *args, **kwargs):
        calls.append(si)
        if si == 2:
            raise RuntimeError("interrupted")
        return original(si, *args, **kwargs)

    monkeypatch.setattr(vqvae, "next_ar_input", fail_at_scale_2)
    cache = KVCache(len(var.blocks))
    with pytest.raises(RuntimeError, match="interrupted"), torch.no_grad():
        var.autoregressive_infer_cfg(vqvae, 2, io["labels"], g_seed=0, top_k=1, kv_cache=cache)
    assert calls == [0, 1, 2]  # the cache held two scales' keys when the error came
    assert cache.is_empty


def test_wrong_labels_and_vqvae_are_refused(vqvae, var, io):
    with pytest.raises(var_core.ParameterError, match="labels"):
        var.autoregressive_infer_cfg(vqvae, 2, torch.tensor([0, 99]), g_seed=0)
    other = var_core.load(E / "vqvae_tiny.safetensors").model  # 64 latent channels, not 16
    with pytest.raises(var_core.ParameterError, match="VQVAE"):
        var.autoregressive_infer_cfg(other, 2, io["labels"], g_seed=0)


@pytest.mark.skipif(not (E / "varsr_io.safetensors").is_file(), reason="fixture E absent")
def test_varsr_vqvae_loads_nested_trainer_file_and_round_trips():
    loaded = var_core.load(E / "vqvae_tiny_trainer.pth", expect=var_core.Family.VAR_VQVAE)
    assert loaded.config == var_core.load(E / "vqvae_tiny.safetensors").config
    doc = json.loads((E / "config.json").read_text())
    assert loaded.config.z_channels == doc["vqvae_kwargs"]["z_channels"]
    vq, io = loaded.model, load_file(str(E / "varsr_io.safetensors"))
    pn = doc["patch_nums"]
    with torch.no_grad():
        pyr = vq.quantize_latent(vq.encode(io["hr"]), pn, last_scale_phi=False)  # VARSR's quantiser
        for i, idx in enumerate(pyr.idx):
            assert torch.equal(idx, io[f"gt_idx_s{i}"])
        assert torch.allclose(pyr.rest_last_BlC, io["last_layer_gt"], atol=1e-5)
        assert torch.allclose(vq.idx_to_var_input(pyr.idx), io["x_BLCv_wo_first_l"], atol=1e-5)
        img = vq.idx_to_img(pyr.idx, last_scale_phi=False)
        assert torch.allclose(img, vq.fhat_to_img(pyr.f_hat), atol=1e-4)
    assert img.shape == io["hr"].shape and img.abs().max() <= 1


@pytest.mark.skipif(not (F_ / "restorevar_io.safetensors").is_file(), reason="fixture F absent")
def test_restorevar_vqvae_loads_and_round_trips_with_continuous_features():
    loaded = var_core.load(F_ / "vqvae_tiny.pth", expect=var_core.Family.VAR_VQVAE)
    assert loaded.config == var_core.load(F_ / "vqvae_tiny.safetensors").config
    doc = json.loads((F_ / "config.json").read_text())
    vq, io = loaded.model, load_file(str(F_ / "restorevar_io.safetensors"))
    with torch.no_grad():
        idx = vq.img_to_idx(io["gt"], doc["patch_nums"])
        for i, t in enumerate(idx):
            assert torch.equal(t, io[f"gt_idx_s{i}"])
        assert torch.allclose(vq.idx_to_var_input(idx), io["x_BLCv_wo_first_l"], atol=1e-5)
        for i, fs in enumerate(vq.img_to_fs(io["cond_img"])):
            assert torch.allclose(fs, io[f"cond_fs_{i}"], atol=1e-5)
        rec = vq.reconstruct(io["gt"], doc["patch_nums"])
    assert torch.allclose(rec, vq.idx_to_img(idx), atol=1e-4)
    assert rec.shape == io["gt"].shape


def test_phi_selection_matches_numpy_ticks():
    # The official PhiPartiallyShared / PhiNonShared: np.argmin(|np.linspace(...) - si/(K-1)|).
    for n in (2, 3, 4, 6, 10):
        phis = PhiSet("non_shared", n, 4)
        lo = 1 / 3 / n if n == 4 else 1 / 2 / n
        ticks = np.linspace(lo, 1 - lo, n)
        for K in (2, 3, 4, 5, 7, 10, 13):
            for si in range(K):
                assert phis.index(si / (K - 1)) == int(np.argmin(np.abs(ticks - si / (K - 1))))


def test_official_sizes_derive_from_shapes_alone():
    # vae_ch160v4096z32.pth and var_d16.pth sizes, built on the meta device (no weights needed).
    vq_cfg = VQVAEConfig(vocab_size=4096, z_channels=32, in_channels=3, base_ch=160, ch_mult=(1, 1, 2, 2, 4),
                         num_res_blocks=2, encoder_attn=(False,) * 4 + (True,), decoder_attn=(False,) * 4 + (True,),
                         mid_attn=True, quant_conv_ks=3, phi_layout="partial", num_phi=4)
    with torch.device("meta"):
        sd = VQVAE(config=vq_cfg).state_dict()
    assert VQVAEConfig.from_state_dict(sd) == vq_cfg and vq_cfg.downsample == 16
    var_cfg = VARConfig(depth=16, embed_dim=1024, num_heads=16, mlp_hidden=4096, codebook_dim=32, vocab_size=4096,
                        num_classes=1000, patch_nums=DEFAULT_PATCH_NUMS, shared_aln=False, attn_l2_norm=True)
    with torch.device("meta"):
        sd = VAR(config=var_cfg).state_dict()
    assert "lvl_1L" not in sd  # patch_nums then come from the known released schedules
    assert VARConfig.from_state_dict(sd) == var_cfg
    sd["lvl_1L"] = level_ids(DEFAULT_PATCH_NUMS)[None]
    assert VARConfig.from_state_dict(sd) == var_cfg
