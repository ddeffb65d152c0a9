"""Benchmark (not a test): ``python -m var_core.bench [--size tiny|medium|real] [--json FILE] [--compile]``.

Builds VARestorer-shaped models from random weights (``real`` = the Infinity-2B student, the d32
BSQ VAE, DiffBIR's ``general_swinir_v1`` SwinIR and the flan-t5-xl encoder; weights are created on
the target device, no CPU random init) and prints, from one process: the T5 encoding of one
prompt (padded to 512 tokens, as the official tokeniser does), SwinIR, VAE encode and decode and
the transformer forward on one tile, the one-step student on that tile (encode, forward, sample,
decode) and the same tile end to end with SwinIR, the iterative teacher (next-scale sampling with
a KV cache and the official sampler settings, on the same checkpoint and image) for the
one-step / iterative ratio, and the time and peak memory per megapixel (2^20 pixels, Infinity's
"1M") of tiled restores at 0.25, 1 and 4 MP (512, 1024 and 2048 px squares). ``--compile`` also
times the transformer and the student through ``torch.compile`` (and uses it for the tiled
restores). Medians of several runs after a warm-up (the tiled restores reuse the warm-up of the
single tile, same tile size, and run ``runs // 2`` times).

Peak memory is ``torch.cuda.max_memory_allocated`` on CUDA; on the CPU it is the process's peak
resident set (``VmHWM``, reset before each figure through ``/proc/self/clear_refs`` where Linux
allows it, otherwise the peak since the start), weights and runtime included; ``work_mem_mb`` is
that peak minus the memory in use just before the call (weights, input image; glibc's freed heap
is trimmed first).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import re
import resource
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext

import torch

from . import restore, sampler, student, swinir as swinir_lib, text
from .bsq_vae import BSQVAE, BSQVAEConfig
from .infinity_model import Infinity, InfinityConfig
from .schedules import fit_schedule
from .swinir import SwinIR, SwinIRConfig

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
_SWINIR = {  # embed dim, blocks per layer, layers, heads (general_swinir_v1: 180, 6 x 8 layers, 6 heads)
    "tiny": (24, 2, 1, 2),
    "medium": (90, 6, 4, 6),
    "real": (180, 6, 8, 6),
}
_T5 = {  # layers, heads, head dim, feed-forward width (d_model = the student's T5 channels)
    "tiny": (2, 4, 32, 256),
    "medium": (6, 8, 64, 1024),
    "real": (24, 32, 64, 5120),  # flan-t5-xl encoder
}
MEGAPIXEL = 2**20  # Infinity's "1M" budget: 0.25, 1 and 4 MP are 512^2, 1024^2 and 2048^2 (whole 512 tiles)
T5_TOKENS = 512  # the official tokeniser pads every prompt to 512 tokens
T5_PROMPT_TOKENS = 32  # valid tokens of the benchmark prompt


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


def build_swinir(size: str, device) -> SwinIR:
    """DiffBIR's SwinIR cleaner (unshuffle 8, nearest+conv upsampler x8, 64 features)."""
    dim, blocks, layers, heads = _SWINIR[size]
    cfg = SwinIRConfig(in_chans=3, embed_dim=dim, depths=(blocks,) * layers, num_heads=(heads,) * layers,
                       window_size=8, mlp_ratio=2.0, unshuffle_scale=8, upscale=8, upsampler="nearest+conv",
                       resi_connection="1conv", num_feat=64, qkv_bias=True, patch_norm=True,
                       shifted=tuple(tuple(j % 2 == 1 for j in range(blocks)) for _ in range(layers)))
    with torch.device("meta"):
        model = SwinIR(config=cfg)
    return _random_(model, device)


def build_t5(size: str, device, dtype: torch.dtype) -> torch.nn.Module:
    """A ``transformers`` T5 encoder (gated-GELU, flan-t5 layout) of this size, random weights."""
    from transformers import T5Config, T5EncoderModel

    layers, heads, d_kv, d_ff = _T5[size]
    cfg = T5Config(vocab_size=32128, d_model=_STUDENT[size][3], d_kv=d_kv, d_ff=d_ff, num_layers=layers,
                   num_heads=heads, feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    with torch.device("meta"):
        model = T5EncoderModel(cfg)
    return _random_(model, device).to(dtype)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, runs: int, *, warmup: bool = True) -> float:
    if warmup:
        fn()
        _sync(device)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _rss_mb(field: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            found = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.MULTILINE)
    except OSError:
        return None
    return int(found.group(1)) / 1024 if found else None


def _reset_peak(device) -> float:
    """Start a peak-memory figure; returns the memory in use now (MB)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device) / 2**20
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back, so that the RSS is what is in use
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets this process's peak RSS (Linux >= 4.0)
    except OSError:
        pass
    return _rss_mb("VmRSS") or 0.0


def _peak_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return _rss_mb("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _student_tokens(schedule) -> int:
    """Sequence length of the one-step student: sos, next-scale inputs, the repeated last scale."""
    return 1 + sum(h * w for _, h, w in schedule[1:]) + schedule[-1][1] * schedule[-1][2]


def _t5_figure(size: str, device, dtype, runs: int) -> float:
    """Seconds to encode one prompt with a T5 encoder of this size (built here, freed on return)."""
    t5 = build_t5(size, device, dtype)
    ids = torch.zeros(1, T5_TOKENS, dtype=torch.long, device=device)  # padding id 0
    ids[0, :T5_PROMPT_TOKENS] = torch.randint(1, 32128, (T5_PROMPT_TOKENS,), generator=torch.Generator().manual_seed(0))
    mask = (ids > 0).long()
    return timed(lambda: t5(input_ids=ids, attention_mask=mask), device, runs)


def run(size: str, device: torch.device, runs: int, megapixels: list[float], *, tile: int = 512,
        compile: bool = False, tile_batch: int = 0, report: Callable[[str, object], None] | None = None) -> dict:
    """Every figure, in a dict (the ``--json`` keys); ``report(key, value)`` is called as each is measured."""
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else nullcontext()
    dtype = torch.bfloat16 if bf16 else torch.float32
    out: dict = {}

    def put(key: str, value) -> None:
        out[key] = value
        if report:
            report(key, value)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    for key, value in (("size", size), ("device", name), ("dtype", "bf16" if bf16 else "fp32"),
                       ("threads", torch.get_num_threads()), ("tile_px", tile),
                       ("tokens_512", _student_tokens(fit_schedule(512, 512))), ("compile", compile)):
        put(key, value)
    schedule = fit_schedule(tile, tile)
    x = torch.rand(1, 3, tile, tile, device=device) * 2 - 1
    with torch.inference_mode(), amp:
        put("t5_encode_s", _t5_figure(size, device, dtype, runs))
        gc.collect()  # T5 is off the device before the restorer's models come (as with offloading)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        model, vae = build_models(size, device, dtype)
        swinir = build_swinir(size, device)
        cond = text.unconditional(model.cfg_uncond.float())
        tdev = text.TextCondition(cond.kv_compact.to(device), cond.lens)
        bits = vae.encode(x, schedule).bits
        x_BLd = student.student_inputs(bits, schedule)
        put("swinir_s", timed(lambda: swinir_lib.clean(swinir, x), device, runs))
        put("vae_encode_s", timed(lambda: vae.encode(x, schedule), device, runs))
        put("vae_decode_s", timed(lambda: vae.decode_bits(bits, schedule), device, runs))
        put("forward_s", timed(lambda: model.forward_logits(x_BLd, tdev, schedule), device, runs))
        put("student_s", timed(lambda: student.restore(model, vae, x, tdev, schedule, sample=False), device, runs))
        if compile:
            t0 = time.perf_counter()
            model.forward_logits(x_BLd, tdev, schedule, compile=True)
            _sync(device)
            put("compile_first_call_s", time.perf_counter() - t0)
            put("forward_compiled_s", timed(lambda: model.forward_logits(x_BLd, tdev, schedule, compile=True),
                                            device, runs))
            put("student_compiled_s", timed(
                lambda: student.restore(model, vae, x, tdev, schedule, sample=False, compile=True), device, runs))
            put("compile_speedup", out["student_s"] / out["student_compiled_s"])
        e2e = restore.RestoreOptions(scale=1.0, tile=tile, overlap=tile // 8, compile=compile)  # Gumbel, as official
        _reset_peak(device)
        put("end_to_end_s", timed(lambda: restore.restore_image(model, vae, x, text=tdev, swinir=swinir, options=e2e),
                                  device, runs))
        put("end_to_end_peak_mem_mb", _peak_mb(device))
        official = sampler.SamplerOptions()  # the official settings: cfg 3 (two passes per scale), top-k 900
        put("teacher_s", timed(lambda: sampler.iterative_restore(model, vae, x, tdev, schedule, official),
                               device, runs))
        put("teacher_over_student", out["teacher_s"] / out["student_s"])
        opts = restore.RestoreOptions(scale=1.0, tile=tile, overlap=tile // 8, sampling="argmax", compile=compile,
                                      tile_batch=tile_batch)
        put("tile_batch", opts.tiles_per_batch(device))
        figures = {k: {} for k in ("per_mp_s", "peak_mem_mb", "work_mem_mb", "tiles", "per_tile_s")}
        for mp in megapixels:
            side = round(math.sqrt(mp * MEGAPIXEL))
            img = torch.rand(1, 3, side, side, device=device) * 2 - 1
            before = _reset_peak(device)
            seconds = timed(lambda: restore.restore_image(model, vae, img, text=tdev, options=opts), device,
                            max(1, runs // 2), warmup=False)
            peak, tiles = _peak_mb(device), restore.count_steps(side, side, opts)
            row = {"per_mp_s": seconds / (side * side / MEGAPIXEL), "peak_mem_mb": peak, "work_mem_mb": peak - before,
                   "tiles": tiles, "per_tile_s": seconds / tiles}
            for k, v in row.items():
                figures[k][f"{mp:g}"] = v
            if report:
                report(f"{mp:g} MP ({side}x{side})", row)
        out.update(figures)
    return out


def _print_row(key: str, value) -> None:
    if isinstance(value, dict):
        value = ", ".join(f"{k} {v:.4g}" for k, v in value.items())
    elif isinstance(value, float):
        value = f"{value:.4g}"
    print(f"{key:<24}  {value}", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m var_core.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=tuple(_STUDENT), default="tiny")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--runs", type=int, default=5, help="timed runs per figure (median)")
    p.add_argument("--megapixels", default="0.25,1,4", help="image sizes of the tiled restores")
    p.add_argument("--tile", type=int, default=512, help="tile side in pixels (the student's 512 by default)")
    p.add_argument("--tile-batch", type=int, default=0, help="tiles per batch in the tiled restores (0: automatic)")
    p.add_argument("--compile", action="store_true", help="also time the transformer through torch.compile")
    p.add_argument("--json", help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    res = run(args.size, torch.device(args.device), args.runs, [float(v) for v in args.megapixels.split(",")],
              tile=args.tile, compile=args.compile, tile_batch=args.tile_batch, report=_print_row)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
