"""RestoreVAR (cross-attention VAR + latent refiner) against the official fixture ``F_restorevar`` (CPU, fast)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from einops import rearrange
from safetensors.torch import load_file

import var_core
from var_core import conformance
from var_core.kv_cache import KVCache
from var_core.restorevar import RestoreVAR, RestoreVARConfig, rope_tables
from var_core.restorevar_refiner import RefinerConfig
from var_core.restorevar_restore import restorevar_restore
from var_core.var_model import level_ids

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"
F_ = FIXTURES / "F_restorevar"

pytestmark = pytest.mark.skipif(not (F_ / "manifest.json").is_file(), reason=f"fixture folder {F_} is absent")


@pytest.fixture(scope="module")
def documented() -> dict:
    return json.loads((F_ / "config.json").read_text())


@pytest.fixture(scope="module")
def io() -> dict:
    return load_file(str(F_ / "restorevar_io.safetensors"))


@pytest.fixture(scope="module")
def vqvae():
    return var_core.load(F_ / "vqvae_tiny.safetensors", expect=var_core.Family.VAR_VQVAE).model


@pytest.fixture(scope="module")
def model() -> RestoreVAR:
    return var_core.load(F_ / "restorevar_tiny.safetensors", expect=var_core.Family.RESTOREVAR).model


def test_config_from_pth_and_safetensors_matches_config_json(documented):
    pth, st = var_core.load(F_ / "restorevar_tiny.pth"), var_core.load(F_ / "restorevar_tiny.safetensors")
    assert pth.family == st.family == var_core.Family.RESTOREVAR
    assert pth.config == st.config
    cfg, kw, vq = st.config, documented["var_kwargs"], documented["vqvae_kwargs"]
    assert (cfg.depth, cfg.embed_dim, cfg.num_heads) == (kw["depth"], kw["embed_dim"], kw["num_heads"])
    assert cfg.mlp_hidden == round(kw["embed_dim"] * kw["mlp_ratio"])
    assert cfg.num_classes == kw["num_classes"]
    assert list(cfg.patch_nums) == kw["patch_nums"] == documented["patch_nums"]
    assert (cfg.attn_l2_norm, cfg.norm_eps) == (kw["attn_l2_norm"], kw["norm_eps"])
    assert not kw["shared_aln"]  # RestoreVAR blocks have no adaptive LayerNorm at all
    assert (cfg.codebook_dim, cfg.vocab_size, cfg.global_dim) == (vq["z_channels"], vq["vocab_size"], vq["z_channels"])
    ref, here = cfg.refiner, documented["refiner_wrapper"]["here"]
    assert (ref.dim, ref.depth, ref.heads, ref.mlp_dim) == (here["dim"], here["depth"], here["heads"], here["mlp_dim"])
    assert (ref.in_dim, ref.cond_dim, ref.seq_len_cond) == (here["in_dim"], here["in_dim_cond"], here["seq_len_cond"])
    assert ref.seq_len == cfg.cond_tokens == documented["patch_nums"][-1] ** 2
    vq_pth, vq_st = var_core.load(F_ / "vqvae_tiny.pth"), var_core.load(F_ / "vqvae_tiny.safetensors")
    assert vq_pth.config == vq_st.config
    assert (vq_st.config.vocab_size, vq_st.config.z_channels, vq_st.config.base_ch) == (
        vq["vocab_size"], vq["z_channels"], vq["ch"])
    assert list(vq_st.config.ch_mult) == documented["vqvae_ddconfig_override"]["ch_mult"]


def test_conformance_runner_passes_fixture_f(capsys):
    manifest = json.loads((F_ / "manifest.json").read_text())
    n = sum(len(c["expected"]) for c in manifest["cases"])
    assert conformance.main([str(F_)]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"{n} passed, 0 failed, 0 skipped"


def test_teacher_forcing_equals_kv_cache_logits(model, vqvae, io):
    with torch.no_grad():
        s = model.autoregressive_infer(vqvae, io["cond_img"], keep_logits=True, refine=False)
        tf = model(vqvae.idx_to_var_input(s.idx), model.degraded_tokens(vqvae, io["cond_img"]))
    assert torch.allclose(tf, torch.cat(s.logits, dim=1), atol=1e-5, rtol=1e-5)
    assert torch.equal(s.f_hat, s.f_hat_discrete)
    assert torch.allclose(s.f_hat_discrete, rearrange(io["refiner_fhat_in"], "B (h w) C -> B C h w", h=4), atol=1e-5)


def test_restore_is_deterministic_and_batch_equals_single_runs(model, vqvae, io):
    x = io["cond_img"]
    out = restorevar_restore(model, vqvae, x)
    assert out.shape == x.shape and out.min() >= -1 and out.max() <= 1
    assert torch.allclose(out, io["greedy_image01"] * 2 - 1, atol=1e-4)
    single = torch.cat([restorevar_restore(model, vqvae, x[i:i + 1]) for i in range(2)])
    assert torch.allclose(out, single, atol=1e-5)
    plain = restorevar_restore(model, vqvae, x, refine=False)
    assert not torch.allclose(plain, out, atol=1e-4)  # the refiner changes the latent


def test_kv_cache_empty_after_a_run_and_after_an_exception(model, vqvae, io, monkeypatch):
    cache = KVCache(len(model.blocks))
    with torch.no_grad():
        model.autoregressive_infer(vqvae, io["cond_img"], kv_cache=cache)
    assert cache.is_empty
    calls, original = [], vqvae.next_ar_input

    def fail_at_scale_2(si, *args, **kwargs):
        calls.append(si)
        if si == 2:
            raise RuntimeError("interrupted")
        return original(si, *args, **kwargs)

    monkeypatch.setattr(vqvae, "next_ar_input", fail_at_scale_2)
    with pytest.raises(RuntimeError, match="interrupted"), torch.no_grad():
        model.autoregressive_infer(vqvae, io["cond_img"], kv_cache=cache)
    assert calls == [0, 1, 2]  # the cache held three scales' keys when the error came
    assert cache.is_empty
    assert not any(isinstance(v, torch.Tensor) for m in model.modules() for v in vars(m).values())


def test_bad_inputs_are_refused(model, vqvae, io):
    with pytest.raises(var_core.ImageInputError, match="64x64"):
        restorevar_restore(model, vqvae, io["cond_img"][:, :, :32, :48])
    with pytest.raises(var_core.ImageInputError, match="64x64"):
        model.autoregressive_infer(vqvae, torch.zeros(1, 3, 128, 128))
    with pytest.raises(var_core.ImageInputError):
        restorevar_restore(model, vqvae, io["cond_img"][0])
    other = FIXTURES / "D_var" / "vqvae_tiny.safetensors"
    if other.is_file():
        with pytest.raises(var_core.ParameterError, match="VQVAE"):
            model.autoregressive_infer(var_core.load(other).model, io["cond_img"])
    with pytest.raises(var_core.CheckpointError, match="wrong model"):
        var_core.load(F_ / "restorevar_tiny.safetensors", expect=var_core.Family.VAR)


def test_lightning_nested_decoder_checkpoint_loads(tmp_path, vqvae):
    # vae_restorevar.ckpt is a VQVAE-format file; accept a Lightning-style {'state_dict': ...} nesting
    # and a stale per-scale EMA buffer of another schedule, as the official VQVAE.load_state_dict does.
    sd = load_file(str(F_ / "vqvae_tiny.safetensors"))
    sd["quantize.ema_vocab_hit_SV"] = torch.zeros(10, sd["quantize.embedding.weight"].shape[0])
    path = tmp_path / "vae_restorevar.ckpt"
    torch.save({"state_dict": sd, "epoch": 3, "global_step": 100}, path)
    loaded = var_core.load(path, expect=var_core.Family.VAR_VQVAE)
    assert loaded.config == vqvae.config
    assert torch.equal(loaded.model.decoder.conv_out.weight, vqvae.decoder.conv_out.weight)


def test_checkpoint_without_refiner_and_with_foreign_rope_tables(vqvae, model, io):
    sd = load_file(str(F_ / "restorevar_tiny.safetensors"))
    bare = var_core.load({k: v for k, v in sd.items() if not k.startswith("vae_refiner.")})
    assert bare.family == var_core.Family.RESTOREVAR and bare.config.refiner is None
    cond = model.degraded_tokens(vqvae, io["cond_img"])
    with pytest.raises(var_core.ParameterError, match="refiner"):
        bare.model.autoregressive_infer(vqvae, cond_BnCv=cond, refine=True)
    with torch.no_grad():
        s = bare.model.autoregressive_infer(vqvae, cond_BnCv=cond)
    assert all(torch.equal(a, io[f"greedy_idx_s{i}"]) for i, a in enumerate(s.idx))
    bad = dict(sd, freqs_cis=sd["freqs_cis"] * torch.polar(torch.ones(()), torch.tensor(0.1)))
    with pytest.raises(var_core.CheckpointError, match="freqs_cis"):
        var_core.load(bad)


def test_official_sizes_derive_from_shapes_alone():
    # restorevar.pth sizes (VAR-d16, 512 px, refiner 384/12/6/768), built on the meta device.
    pn = (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)
    L = sum(p * p for p in pn)
    ref = RefinerConfig(dim=384, depth=12, heads=6, mlp_dim=768, in_dim=32, out_dim=32, cond_dim=1024, seq_len=1024,
                        seq_len_cond=2240, project_out=True)
    cfg = RestoreVARConfig(depth=16, embed_dim=1024, num_heads=16, mlp_hidden=4096, codebook_dim=32, vocab_size=4096,
                           num_classes=1000, patch_nums=pn, attn_l2_norm=True, global_dim=32, refiner=ref)
    with torch.device("meta"):
        sd = RestoreVAR(config=cfg).state_dict()
    assert L == 2240 and var_core.detect_family(sd) == var_core.Family.RESTOREVAR
    assert RestoreVARConfig.from_state_dict(sd) == cfg  # no buffers: the known 512-px schedule
    seq, cross = rope_tables(cfg)
    sd["freqs_cis"] = torch.view_as_complex(rearrange(seq, "two L c -> L c two").contiguous())
    sd["freqs_cis_cross"] = torch.view_as_complex(rearrange(cross, "two L c -> L c two").contiguous())
    assert sd["freqs_cis"].shape == (2240, 32) and sd["freqs_cis_cross"].shape == (1024, 32)
    assert RestoreVARConfig.from_state_dict(sd) == cfg
    sd["lvl_1L"] = level_ids(pn)[None]
    assert RestoreVARConfig.from_state_dict(sd) == cfg
    small = dataclasses.replace(cfg, patch_nums=(1, 2, 3, 4, 5, 6, 8, 10, 13, 16),
                                refiner=dataclasses.replace(ref, seq_len=256))
    with torch.device("meta"):
        sd = RestoreVAR(config=small).state_dict()
    sd["freqs_cis"] = torch.zeros(sum(p * p for p in small.patch_nums), 32, dtype=torch.complex64)
    assert RestoreVARConfig.from_state_dict(sd) == small  # L picks the 256-px schedule
