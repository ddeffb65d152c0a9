"""Performance features: the benchmark runs (tiny config, no timing asserted), batched tiles give
the same images as one tile at a time, out-of-memory retries, and the torch.compile switch."""

import json
import logging
from pathlib import Path

import pytest
import torch

import var_core
from var_core import bench, restore, student, text, tiling
from var_core.restore import RestoreOptions
from var_core.schedules import fit_schedule

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"
STUDENT = FIXTURES / "B_varestorer_student" / "varestorer_tiny_lora.safetensors"
VAE = FIXTURES / "A_bsq_vae" / "vae_tiny.safetensors"
needs_fixtures = pytest.mark.skipif(not STUDENT.is_file() or not VAE.is_file(), reason="../shared/fixtures not present")


@pytest.fixture(scope="module")
def models():
    return var_core.load(STUDENT).model, var_core.load(VAE).model


def lq(b, h, w, seed=0):
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_bench_runs_on_tiny(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench.main(["--size", "tiny", "--runs", "1", "--tile", "64", "--megapixels", "0.004,0.01",
                       "--tile-batch", "2", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    for key in ("student_s", "teacher_s", "teacher_over_student", "forward_s", "vae_encode_s", "vae_decode_s",
                "swinir_s", "t5_encode_s", "end_to_end_s", "end_to_end_peak_mem_mb"):
        assert res[key] > 0, key
    assert res["device"] == "cpu" and res["tile_batch"] == 2
    for key in ("per_mp_s", "peak_mem_mb", "tiles", "per_tile_s"):
        assert set(res[key]) == {"0.004", "0.01"}, key
    assert res["tiles"]["0.01"] == 4
    assert "teacher_over_student" in capsys.readouterr().out


@needs_fixtures
@torch.no_grad()
@pytest.mark.parametrize("sampling", ["gumbel", "argmax"])
def test_batched_tiles_equal_one_at_a_time(models, sampling):
    x = torch.cat([lq(1, 48, 64, seed=5), lq(1, 48, 64, seed=6)])  # 2 images, 2 x 3 tiles each
    opts = dict(scale=2.0, tile=64, overlap=16, sampling=sampling, seed=3)
    seen = {}
    for tile_batch in (1, 4):  # batches of 4 and 2 tiles
        bits = []
        seen[tile_batch] = restore.restore_image(*models, x, options=RestoreOptions(tile_batch=tile_batch, **opts),
                                                 on_bits=lambda b, s: bits.append(b))
        assert len(bits) == 6 and all(b[0].shape[0] == 2 for b in bits)  # one call per tile, both images
    torch.testing.assert_close(seen[4], seen[1], atol=1e-5, rtol=0)


def test_tile_batch_default_and_bad_value():
    assert RestoreOptions().tiles_per_batch(torch.device("cpu")) == 1
    assert RestoreOptions().tiles_per_batch(torch.device("cuda")) == restore.CUDA_TILE_BATCH
    assert RestoreOptions(tile_batch=3).tiles_per_batch(torch.device("cuda")) == 3
    with pytest.raises(var_core.ParameterError, match="tile_batch"):
        RestoreOptions(tile_batch=-1)


def test_out_of_memory_halves_the_batch_then_the_tile():
    calls = []

    def fn(t):
        calls.append((t.shape[0], t.shape[-1]))
        if t.shape[0] > 1 or t.shape[-1] > 128:
            raise torch.OutOfMemoryError("fake")
        return t

    retries = []
    x = torch.rand(1, 3, 300, 300)
    y = tiling.run_tiled_with_retry(fn, x, tile=256, overlap=32, tile_batch=4,
                                    on_retry=lambda *a: retries.append(a))
    torch.testing.assert_close(y, x)
    assert retries == [(256, 32, 2), (256, 32, 1), (128, 16, 1)]
    assert calls[:3] == [(4, 256), (2, 256), (1, 256)] and calls[-1] == (1, 128)


@needs_fixtures
@torch.no_grad()
def test_compiler_failure_falls_back_to_eager(models, monkeypatch, caplog):
    from torch._dynamo.exc import TorchDynamoException

    model, vae = var_core.load(STUDENT).model, models[1]  # a model of its own: it stays eager afterwards
    compiled = []

    def broken_compile(fn, **kwargs):
        compiled.append(fn)

        def run(*args):
            raise TorchDynamoException("no C compiler (test)")

        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    schedule = fit_schedule(64, 64)
    cond = text.unconditional(model.cfg_uncond)
    x_BLd = student.student_inputs(vae.encode(lq(1, 64, 64), schedule).bits, schedule)
    eager = model.forward_logits(x_BLd, cond, schedule)
    with caplog.at_level(logging.WARNING, logger="var_core.infinity_model"):
        first = model.forward_logits(x_BLd, cond, schedule, compile=True)
        second = model.forward_logits(x_BLd, cond, schedule, compile=True)
    assert torch.equal(first, eager) and torch.equal(second, eager)
    assert len(compiled) == 1 and "torch.compile failed" in caplog.text


@needs_fixtures
@pytest.mark.slow
@torch.no_grad()
def test_compiled_student_matches_eager(models):
    model, vae = models
    x = lq(1, 64, 64)
    opts = dict(scale=1.0, sampling="argmax")
    eager = restore.restore_image(model, vae, x, options=RestoreOptions(**opts))
    compiled = restore.restore_image(model, vae, x, options=RestoreOptions(compile=True, **opts))
    torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=0)


@needs_fixtures
def test_cli_tile_batch_gives_the_same_image(tmp_path):
    """`restore --tile-batch 3` writes the image `--tile-batch 1` writes (6 tiles of 64 px)."""
    import numpy as np
    from PIL import Image

    from var_core import cli

    src = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(src)
    outputs = []
    for tile_batch in ("1", "3"):
        out = tmp_path / f"out{tile_batch}"
        assert cli.main(["restore", str(src), "-o", str(out), "--model", str(STUDENT), "--vae", str(VAE), "--scale",
                         "2", "--tile", "64", "--overlap", "16", "--tile-batch", tile_batch, "-q"]) == 0
        outputs.append(np.asarray(Image.open(out / "in.png"), dtype=np.int16))
    assert np.abs(outputs[0] - outputs[1]).max() <= 1
