"""Benchmark (not a test): ``python -m var_core.bench [--size tiny|medium|real] [--json FILE]``.

Builds VARestorer-shaped models from random weights (``real`` = Infinity-2B student and the d32
BSQ VAE; weights are created on the target device, no CPU random init) and prints, from one
process: one 512 x 512 tile end to end, the transformer forward alone, VAE encode and decode, and
the time and peak memory per megapixel of tiled restores at 0.25, 1 and 4 MP, and the iterative
teacher (next-scale sampling with a KV cache and the official sampler settings, on the same
checkpoint and image) for the
one-step / iterative ratio. Medians of several runs after a warm-up.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import sys
import time
from contextlib import nullcontext

import torch

from . import restore, sampler, student, text
from .bsq_vae import BSQVAE, BSQVAEConfig
from .infinity_model import Infinity, InfinityConfig
from .schedules import fit_schedule

_STUDENT = {  # depth, width, heads, T5 channels, VAE bits
    "tiny": (4, 64, 2, 128, 16),
    "medium": (8, 512, 4, 512, 32),
    "real": (32, 2048, 16, 2048, 32),  # Infinity-2B: depth 32, width 2048, 16 heads; flan-t5-xl d_model 2048
}
_VAE = {  # base channels, channel multipliers
    "tiny": (24, (1, 1, 1, 1, 2)),
    "medium": (64, (1, 2, 2, 4, 4)),
    "real": (128, (1, 2, 4, 4, 4)),  # infinity_vae_d32reg
}


def _random_(module: torch.nn.Module, device) -> torch.nn.Module:
    module.to_empty(device=device)
    g = torch.Generator(device).manual_seed(0)
    with torch.no_grad():
        for name, p in list(module.named_parameters()) + list(module.named_buffers()):
            if not p.is_floating_point():
                continue
            if p.ndim >= 2:
                p.normal_(0, 0.02, generator=g)
            else:
                p.fill_(0.0 if name.endswith("bias") else 1.0)
    return module.eval().requires_grad_(False)


def build_models(size: str, device, dtype: torch.dtype) -> tuple[Infinity, BSQVAE]:
    depth, width, heads, ct5, d = _STUDENT[size]
    cfg = InfinityConfig(depth=depth, embed_dim=width, num_heads=heads, mlp_hidden=4 * width, swiglu=False,
                         codebook_dim=d, vocab_size=2 * d, text_channels=ct5, text_maxlen=512,
                         pool_heads=max(1, ct5 // 128), block_chunks=min(8, depth), shared_aln=True, rms_norm=False,
                         input_norm=False, ca_layer_scale=False, num_levels=15)
    base, mult = _VAE[size]
    vcfg = BSQVAEConfig(in_channels=3, base_ch=base, encoder_ch_mult=mult, decoder_ch_mult=mult, num_res_blocks=2,
                        codebook_dim=d, encoder_downsample=(True,) * 4 + (False,),
                        decoder_upsample=(False,) + (True,) * 4, mid_attention=False)
    with torch.device("meta"):
        model, vae = Infinity(config=cfg), BSQVAE(config=vcfg)
    return _random_(model, device).to(dtype), _random_(vae, device)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, runs: int) -> float:
    fn()
    _sync(device)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _peak_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run(size: str, device: torch.device, runs: int, megapixels: list[float]) -> dict:
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else nullcontext()
    model, vae = build_models(size, device, torch.bfloat16 if bf16 else torch.float32)
    cond = text.unconditional(model.cfg_uncond.float())
    schedule = fit_schedule(512, 512)
    x = torch.rand(1, 3, 512, 512, device=device) * 2 - 1
    out: dict = {"size": size, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                 "dtype": "bf16" if bf16 else "fp32", "tile_px": 512,
                 "tokens_512": 1 + sum(h * w for _, h, w in schedule[1:]) + schedule[-1][1] * schedule[-1][2]}
    with torch.inference_mode(), amp:
        bits = vae.encode(x, schedule).bits
        x_BLd = student.student_inputs(bits, schedule)
        tdev = text.TextCondition(cond.kv_compact.to(device), cond.lens)
        out["vae_encode_s"] = timed(lambda: vae.encode(x, schedule), device, runs)
        out["vae_decode_s"] = timed(lambda: vae.decode_bits(bits, schedule), device, runs)
        out["forward_s"] = timed(lambda: model.forward_logits(x_BLd, tdev, schedule), device, runs)
        out["student_s"] = timed(lambda: student.restore(model, vae, x, tdev, schedule, sample=False), device, runs)
        official = sampler.SamplerOptions()  # the official settings: cfg 3 (two passes per scale), top-k 900
        out["teacher_s"] = timed(lambda: sampler.iterative_restore(model, vae, x, tdev, schedule, official),
                                 device, runs)
        out["teacher_over_student"] = out["teacher_s"] / out["student_s"]
        out["per_mp_s"], out["peak_mem_mb"] = {}, {}
        for mp in megapixels:
            side = int(math.sqrt(mp * 1e6))
            img = torch.rand(1, 3, side, side, device=device) * 2 - 1
            opts = restore.RestoreOptions(scale=1.0, sampling="argmax")
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            t = timed(lambda: restore.restore_image(model, vae, img, text=tdev, options=opts), device, max(1, runs // 2))
            key = f"{mp:g}"
            out["per_mp_s"][key] = t / (side * side / 1e6)
            out["peak_mem_mb"][key] = _peak_mb(device)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m var_core.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=tuple(_STUDENT), default="tiny")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--runs", type=int, default=5, help="timed runs per figure (median)")
    p.add_argument("--megapixels", default="0.25,1,4", help="image sizes of the tiled restores")
    p.add_argument("--json", help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    res = run(args.size, torch.device(args.device), args.runs, [float(v) for v in args.megapixels.split(",")])
    width = max(map(len, res))
    for k, v in res.items():
        if isinstance(v, dict):
            v = ", ".join(f"{mp} MP: {x:.4g}" for mp, x in v.items())
        elif isinstance(v, float):
            v = f"{v:.4g}"
        print(f"{k:<{width}}  {v}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
