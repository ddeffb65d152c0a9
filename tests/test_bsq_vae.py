"""Infinity BSQ VAE: architecture from weights, official parity (fixture A), pyramid round trips."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import var_core
from var_core import bsq_quant, conformance, pyramid, schedules
from var_core.bsq_vae import BSQVAE

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"
A = FIXTURES / "A_bsq_vae"
pytestmark = pytest.mark.skipif(not A.is_dir(), reason="../shared/fixtures not present")


@pytest.fixture(scope="module")
def vae() -> BSQVAE:
    return var_core.load(A / "vae_tiny.safetensors").model


def test_config_read_from_weights_matches_official_constructor_args():
    args = json.loads((A / "config.json").read_text())["autoencoder_args"]
    cfg_pth = var_core.load(A / "vae_tiny.pth").config
    cfg_sft = var_core.load(A / "vae_tiny.safetensors").config
    assert cfg_pth == cfg_sft
    assert cfg_pth.base_ch == args["base_ch"]
    assert list(cfg_pth.encoder_ch_mult) == args["encoder_ch_mult"]
    assert list(cfg_pth.decoder_ch_mult) == args["decoder_ch_mult"]
    assert cfg_pth.num_res_blocks == args["num_res_blocks"]
    assert cfg_pth.codebook_dim == args["codebook_dim"]
    assert cfg_pth.patch_size == args["patch_size"]
    assert cfg_pth.mid_attention == (args["cnn_attention"] == "yes")


def test_conformance_runner_passes_fixture_a(capsys):
    assert conformance.main([str(A)]) == 0
    out = capsys.readouterr().out
    assert out.strip().splitlines()[-1].startswith("87 passed, 0 failed")


def test_runner_reports_failures_and_skips(tmp_path, capsys):
    # A copy of fixture A whose expected z is perturbed must FAIL; an unknown kind must SKIP.
    bad = tmp_path / "A_bad"
    bad.mkdir()
    manifest = json.loads((A / "manifest.json").read_text())
    manifest["weights"] = {"vae": str(A / "vae_tiny.safetensors")}
    case = next(c for c in manifest["cases"] if c["name"] == "sq64")
    tensors = load_file(str(A / case["tensors"]))
    tensors["z"] = tensors["z"] + 1e-2
    from safetensors.torch import save_file

    save_file(tensors, str(bad / "sq64.safetensors"))
    manifest["cases"] = [case]
    (bad / "manifest.json").write_text(json.dumps(manifest))
    other = tmp_path / "X_other"
    other.mkdir()
    (other / "manifest.json").write_text(json.dumps({"kind": "no_such_kind", "weights": {}, "cases": [
        {"name": "c", "tensors": "c.safetensors", "params": {}, "inputs": [], "expected": {"y": {"exact": True}}}]}))
    assert conformance.main([str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "FAIL  A_bad/sq64 z" in out
    assert "SKIP  X_other/c" in out
    assert out.strip().splitlines()[-1].endswith("1 failed, 1 skipped")


def test_next_scale_inputs_area_match_the_quantiser(vae):
    t = load_file(str(A / "sq256.safetensors"))
    schedule = json.loads((A / "manifest.json").read_text())["cases"][0]["params"]["scale_schedule"]
    bits = [t[f"bits_s{i}"][:, 0] for i in range(len(schedule))]
    xs = bsq_quant.next_scale_inputs(bits, [tuple(s) for s in schedule], mode="area")
    for i, x in enumerate(xs):
        want = t[f"var_input_s{i}"].flatten(2).transpose(1, 2)
        torch.testing.assert_close(x, want, atol=1e-5, rtol=1e-5)
    tri = bsq_quant.next_scale_inputs(bits, [tuple(s) for s in schedule], mode="trilinear")
    assert [a.shape for a in tri] == [a.shape for a in xs]


def test_bits_index_round_trip():
    g = torch.Generator().manual_seed(0)
    bits = torch.randint(0, 2, (2, 3, 5, 32), generator=g).to(torch.uint8)
    idx = bsq_quant.bits_to_index(bits)
    assert idx.max() < 2**32
    assert torch.equal(bsq_quant.index_to_bits(idx, 32), bits)
    assert bsq_quant.bits_to_index(torch.tensor([1, 0, 0, 0], dtype=torch.uint8)).item() == 8  # MSB first


@pytest.mark.parametrize("hw", [(64, 64), (96, 144), (100, 70), (17, 300)])
def test_pyramid_round_trip_any_size(vae, hw):
    x = torch.rand(2, 3, *hw, generator=torch.Generator().manual_seed(1)) * 2 - 1
    p = pyramid.encode_image(vae, x)
    assert p.batch_size == 2 and p.image_size == hw
    th, tw = p.fitted_size
    assert abs(th / tw - schedules.nearest_template(hw[0] / hw[1])) < 0.01
    y = pyramid.decode_pyramid(vae, p)
    assert y.shape == x.shape and y.min() >= -1 and y.max() <= 1


def test_pyramid_on_template_grid_is_not_resized(vae):
    t = load_file(str(A / "rect96x144.safetensors"))
    p = pyramid.encode_image(vae, t["input"])
    assert p.fitted_size == (96, 144)
    for i, b in enumerate(p.bits):
        assert torch.equal(b.int(), t[f"bits_s{i}"][:, 0])
    torch.testing.assert_close(pyramid.decode_pyramid(vae, p), t["recon"], atol=5e-4, rtol=5e-4)


@pytest.mark.reliability
def test_image_smaller_than_one_patch(vae):
    with pytest.raises(var_core.ImageInputError, match="smaller than one 16x16 latent patch"):
        pyramid.encode_image(vae, torch.zeros(1, 3, 8, 40))
    with pytest.raises(var_core.ImageInputError, match="multiples of 16"):
        vae.encode(torch.zeros(1, 3, 40, 40), [(1, 1, 1)])


@pytest.mark.reliability
def test_schedule_not_ending_at_latent(vae):
    with pytest.raises(var_core.ParameterError, match="last scale must equal the latent size"):
        vae.encode(torch.zeros(1, 3, 64, 64), [(1, 1, 1), (1, 2, 2)])


def test_operations_namespace_is_used():
    calls = []

    class Ops:
        class Conv2d(torch.nn.Conv2d):
            def __init__(self, *a, **k):
                calls.append("conv")
                super().__init__(*a, **k)

        GroupNorm = torch.nn.GroupNorm

    model = var_core.load(A / "vae_tiny.safetensors", operations=Ops).model
    assert calls and all(isinstance(m, Ops.Conv2d) for m in model.modules() if isinstance(m, torch.nn.Conv2d))


def test_bf16_decode_close_to_fp32(vae):
    z = load_file(str(A / "sq64.safetensors"))["z"]
    ref = vae.decode(z)
    half = var_core.load(A / "vae_tiny.safetensors").model.to(torch.bfloat16)
    out = half.decode(z)
    assert out.dtype == torch.bfloat16 and (out.float() - ref).abs().mean() < 0.05


@torch.no_grad()
@pytest.mark.parametrize("stage", ["encode", "decode"])
def test_out_of_memory_falls_back_to_latent_tiles(vae, stage, monkeypatch, caplog):
    """A whole image (latent) that runs out of memory is encoded (decoded) in latent tiles, halved
    while memory still runs out: here anything above 16 latent cells fails, so 32-cell tiles fail
    too and 16-cell ones (overlap 4) do the work."""
    from var_core.tiling import run_tiled

    net = vae.encoder if stage == "encode" else vae.decoder
    p = vae.config.patch_size
    cells = (lambda t: max(t.shape[-2:]) // p) if stage == "encode" else (lambda t: max(t.shape[-2:]))
    real, seen = net.forward, []

    def forward_or_oom(t):
        seen.append(cells(t))
        if cells(t) > 16:
            raise torch.OutOfMemoryError("fake")
        return real(t)

    monkeypatch.setattr(net, "forward", forward_or_oom)
    g = torch.Generator().manual_seed(0)
    with caplog.at_level("WARNING", logger="var_core"):
        if stage == "encode":
            x = torch.rand(1, 3, 40 * p, 24 * p, generator=g) * 2 - 1
            got = vae.encode_latent(x)
            want = run_tiled(lambda t: real(t).float(), x, tile=16, overlap=4, in_scale=p)
        else:
            z = torch.randn(1, vae.codebook_dim, 40, 24, generator=g).sign()
            got = vae.decode(z)
            want = run_tiled(real, z, tile=16, overlap=4, out_scale=p).clamp(-1, 1)
    assert seen[0] == 40 and 32 in seen and max(seen[seen.index(16):]) == 16
    assert torch.equal(got, want)
    assert f"out of memory to {stage} a 40x24 latent whole" in caplog.text
    assert "retrying with tiles of 16" in caplog.text

