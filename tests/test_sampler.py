"""Next-scale sampler (iterative Infinity) against the official fixture ``C_infinity_iterative`` (CPU, fast)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from einops import rearrange
from safetensors.torch import load_file

import var_core
from var_core import lora, sampler
from var_core.conformance import compare
from var_core.conformance_cases import infinity_iterative
from var_core.infinity_model import TextCondition
from var_core.kv_cache import KVCache
from var_core.sampler import SamplerOptions

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"
C = FIXTURES / "C_infinity_iterative"
TRANSFORMER = FIXTURES / "B_varestorer_student" / "varestorer_tiny_lora.safetensors"
VAE = FIXTURES / "A_bsq_vae" / "vae_tiny.safetensors"

pytestmark = pytest.mark.skipif(not (C / "manifest.json").is_file(), reason=f"fixture folder {C} is absent")

GREEDY = SamplerOptions(cfg=1.0, tau=1.0, top_k=1, top_p=0.0)
FREE = SamplerOptions(cfg=1.0, tau=1.0, top_k=0, top_p=0.0)  # plain multinomial, most randomness


@pytest.fixture(scope="module")
def manifest():
    return json.loads((C / "manifest.json").read_text())


@pytest.fixture(scope="module")
def io():
    return load_file(str(C / "infinity_io.safetensors"))


@pytest.fixture(scope="module")
def model():
    return lora.strip_lora(var_core.load(TRANSFORMER, expect=var_core.Family.INFINITY).model)


@pytest.fixture(scope="module")
def vae():
    return var_core.load(VAE, expect=var_core.Family.INFINITY_BSQ_VAE).model


@pytest.fixture(scope="module")
def text(io):
    return TextCondition.from_cu_seqlens(io["text_kv_compact"], io["text_cu_seqlens_k"])


@pytest.fixture(scope="module")
def schedule(manifest):
    return [tuple(s) for s in manifest["cases"][0]["params"]["scale_schedule"]]


def _gt_bits(io, schedule):
    return [rearrange(io[f"gt_bits_s{i}"], "B (h w) d -> B h w d", h=h, w=w).to(torch.uint8)
            for i, (_, h, w) in enumerate(schedule)]


def test_fixture_cases(manifest):
    weights = {role: str((C / rel).resolve()) for role, rel in manifest["weights"].items()}
    failures = []
    for case in manifest["cases"]:
        tensors = load_file(str(C / case["tensors"]))
        with torch.no_grad():
            got = infinity_iterative.run_case(case, tensors, weights, C)
        for name, tol in case["expected"].items():
            ok, detail = compare(got[name], tensors[name], tol)
            if not ok:
                failures.append(f"{case['name']} {name}: {detail}")
    assert not failures, failures


@torch.no_grad()
def test_greedy_matches_teacher_forced_argmax(model, text, schedule, io):
    """KV-cached sampling with CFG 1 gives the logits of the unguided, uncached teacher-forced pass
    fed the same bits (CFG 1 equals the unguided path)."""
    res = sampler.sample(model, text, schedule, GREEDY)
    forced = sampler.teacher_forced_logits(model, res.bits, text, schedule, next_scale="area")
    for i, (_, h, w) in enumerate(schedule):
        torch.testing.assert_close(res.logits[i], forced[i], atol=1e-4, rtol=1e-4)
        argmax = rearrange(forced[i], "B l (d two) -> B l d two", two=2).argmax(-1)
        assert torch.equal(rearrange(res.bits[i], "B h w d -> B (h w) d").long(), argmax)
        assert torch.equal(res.bits[i].long(), rearrange(io[f"greedy_bits_s{i}"], "B (h w) d -> B h w d", h=h, w=w))


@torch.no_grad()
def test_forced_bits_with_guidance_match_teacher_forcing(model, text, schedule, io):
    gt = _gt_bits(io, schedule)
    for opts in (SamplerOptions(cfg=3.0, tau=0.5), SamplerOptions(cfg=(1.0, 2.0, 3.0, 4.0, 4.0, 4.0, 4.0))):
        res = sampler.sample(model, text, schedule, opts, forced_bits=gt)
        assert all(torch.equal(a, b) for a, b in zip(res.bits, gt))
        want = sampler.teacher_forced_logits(model, gt, text, schedule, cfg=opts.cfg)
        for got, w in zip(res.logits, want):
            torch.testing.assert_close(got, w, atol=2e-4, rtol=2e-4)
    # guidance on a block output instead of the logits gives other logits
    a = sampler.sample(model, text, schedule, SamplerOptions(cfg=3.0), forced_bits=gt).logits[-1]
    b = sampler.sample(model, text, schedule, SamplerOptions(cfg=3.0, cfg_insertion_layer=(-1,)), forced_bits=gt)
    assert (a - b.logits[-1]).abs().max() > 1e-3


@torch.no_grad()
def test_trilinear_next_scale_matches_training_inputs(model, text, schedule, io):
    res = sampler.sample(model, text, schedule, SamplerOptions(cfg=1.0, next_scale="trilinear"),
                         forced_bits=_gt_bits(io, schedule))
    torch.testing.assert_close(torch.cat(res.logits, dim=1), io["logits_teacher_forced"], atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_seeds(model, text, schedule):
    first = sampler.sample(model, text, schedule, FREE)
    again = sampler.sample(model, text, schedule, FREE)
    other = sampler.sample(model, text, schedule, SamplerOptions(cfg=1.0, top_k=0, top_p=0.0, seed=1))
    assert all(torch.equal(a, b) for a, b in zip(first.bits, again.bits))
    assert any(not torch.equal(a, b) for a, b in zip(first.bits, other.bits))
    gen = torch.Generator().manual_seed(0)  # an explicit generator is the seed's generator
    assert all(torch.equal(a, b) for a, b in zip(first.bits, sampler.sample(model, text, schedule, FREE,
                                                                              generator=gen).bits))


@torch.no_grad()
def test_kv_cache_is_cleared(model, text, schedule):
    cache = KVCache(model.config.depth)
    seen = []
    result = sampler.sample(model, text, schedule, GREEDY, cache=cache, callback=lambda p: seen.append(len(cache)))
    assert seen == list(torch.tensor([h * w for _, h, w in schedule]).cumsum(0).tolist())
    assert cache.is_empty and len(result.bits) == len(schedule)
    assert result.codes.shape == (1, model.config.codebook_dim, 1, 16, 16)

    def stop_at_third():
        if len(cache) >= 1 + 4:
            raise KeyboardInterrupt  # what an interrupted UI run raises through the sampler
    with pytest.raises(KeyboardInterrupt):
        sampler.sample(model, text, schedule, GREEDY, cache=cache, check_interrupt=stop_at_third)
    assert cache.is_empty

    calls = iter([False, False, True])
    with pytest.raises(sampler.SamplingInterrupted):
        sampler.sample(model, text, schedule, GREEDY, cache=cache, check_interrupt=lambda: next(calls))
    assert cache.is_empty

    def bad_callback(progress):
        raise RuntimeError("preview failed")
    with pytest.raises(RuntimeError):
        sampler.sample(model, text, schedule, GREEDY, cache=cache, callback=bad_callback)
    assert cache.is_empty
    # a cache left filled by someone else is refused rather than silently extended
    cache[0].extend(torch.zeros(1, 2, 1, 32), torch.zeros(1, 2, 1, 32))
    with pytest.raises(var_core.ParameterError):
        sampler.sample(model, text, schedule, GREEDY, cache=cache)


@pytest.mark.parametrize("kwargs", [
    dict(cfg=-1.0), dict(cfg=float("nan")), dict(cfg=()), dict(cfg="3"), dict(tau=0.0), dict(tau=(1.0, -0.5)),
    dict(top_p=1.5), dict(top_p=-0.1), dict(top_k=-1), dict(top_k=2.5), dict(top_k=True),
    dict(cfg_insertion_layer=(1,)), dict(cfg_insertion_layer=()), dict(next_scale="bicubic"),
    dict(seed=-1), dict(seed=1.5),
])
def test_options_validation(kwargs):
    with pytest.raises(var_core.ParameterError):
        SamplerOptions(**kwargs)


def test_options_per_scale():
    opts = SamplerOptions(cfg=[1, 2, 3], tau=0.5, cfg_insertion_layer=-2)
    assert opts.per_scale(3) == ((1.0, 2.0, 3.0), (0.5, 0.5, 0.5))
    assert opts.cfg_insertion_layer == (-2,)
    with pytest.raises(var_core.ParameterError):
        opts.per_scale(4)


@torch.no_grad()
def test_bad_runtime_arguments(model, text, schedule, io):
    with pytest.raises(var_core.ParameterError):  # beyond the 4 blocks of the tiny model
        sampler.sample(model, text, schedule, SamplerOptions(cfg=2.0, cfg_insertion_layer=(-4,)))
    with pytest.raises(var_core.ParameterError):  # bits of the wrong scale
        sampler.sample(model, text, schedule, GREEDY, forced_bits=_gt_bits(io, schedule)[1:])
    with pytest.raises(var_core.ParameterError):
        sampler.sample(model, text, [(2, 1, 1)], GREEDY)


def test_sample_bits_filters():
    logits = torch.tensor([[[0.0, 5.0, 0.0, 0.1]]])  # bit 0: p(1) ~ 0.993; bit 1: ~ 0.52
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):  # top-p 0.9 drops the 0.7% outcome, never the near-even pair
        assert sampler.sample_bits(logits, top_p=0.9, generator=gen)[0, 0, 0] == 1
    assert torch.equal(sampler.sample_bits(logits, top_k=1), torch.tensor([[[1, 1]]]))
    state = gen.get_state()
    sampler.sample_bits(logits, top_k=1, generator=gen)  # greedy draws nothing
    assert torch.equal(gen.get_state(), state)


@torch.no_grad()
def test_iterative_restore(model, vae, text):
    lq = load_file(str(FIXTURES / "A_bsq_vae" / "sq64.safetensors"))["input"]
    schedule = [(1, 1, 1), (1, 2, 2), (1, 4, 4)]
    steps = []
    res = sampler.iterative_restore(model, vae, lq, text, schedule, SamplerOptions(cfg=2.0), callback=steps.append)
    assert res.image.shape == lq.shape and res.image.abs().max() <= 1
    assert [s.index for s in steps] == [0, 1, 2] and [tuple(b.shape) for b in res.bits] == [
        (1, 1, 1, 16), (1, 2, 2, 16), (1, 4, 4, 16)]
    # with every scale conditioned on the LQ pyramid it is teacher forcing on the LQ bits
    lq_bits = vae.encode(lq, schedule).bits
    want = sampler.teacher_forced_logits(model, lq_bits, text, schedule, next_scale="trilinear", cfg=2.0)
    for got, w in zip(res.logits, want):
        torch.testing.assert_close(got, w, atol=2e-4, rtol=2e-4)
    # from bits, without the LQ inputs after scale 0: plain sampling
    plain = sampler.iterative_restore(model, vae, lq_bits, text, schedule, GREEDY, lq_scales=0, decode=False)
    assert plain.image is None
    ref = sampler.sample(model, text, schedule, GREEDY)
    assert all(torch.equal(a, b) for a, b in zip(plain.bits, ref.bits))
