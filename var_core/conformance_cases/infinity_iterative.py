"""Conformance adapter for ``infinity_iterative`` fixtures (Infinity's next-scale sampler, no LoRA).

Cases: teacher forcing with the block-causal mask (next-scale inputs ``trilinear`` or ``area``),
and the kv-cache sampler of :mod:`var_core.sampler` greedy (``top_k=1``), fed with the GT bits
(``gt_leak``), and sampled with a seeded torch CPU generator. Every ``params`` entry is applied
or checked against what this implementation does; any other value skips the case with the reason.
"""

from __future__ import annotations

from pathlib import Path

import torch
from einops import rearrange

from .. import bsq_quant, load, lora, sampler
from ..conformance import CaseSkipped
from ..detect import Family
from ..infinity_model import TextCondition
from ..schedules import scale_schedule

# Descriptive parameters: the value must contain each fragment (what this implementation does).
_DESCRIBED = {
    "attention": ("block_causal",),
    "rope_cache": ("1M", "rope2d_normalized_by_hw=2"),
    "text_maxlen_from": ("cfg_uncond.shape[0]",),
    "rng": ("torch.Generator", "torch.multinomial"),
}
_APPLIED = {"scale_schedule", "text_lens", "strip_lora", "cross_attention_bf16_rounding", "cond_drop",
            "next_scale_interp", "cfg_list", "tau_list", "cfg_insertion_layer", "top_k", "top_p", "g_seed", "gt_leak"}
_FIXED = {
    "code_interp_up": bsq_quant.INTERP_UP,  # codes summed on the last grid with trilinear
    "kv_cache": True,
    "batch": 1,
    "cfg_sc": 3,  # passed by the official demo, never read by autoregressive_infer_cfg
}
_PREFIX = {"greedy", "gtleak", "sampled"}


def _check(params: dict, schedule) -> None:
    for key, value in params.items():
        if key in _DESCRIBED:
            ok = all(f in str(value) for f in _DESCRIBED[key])
        elif key in ("h_div_w", "pn"):
            ok = scale_schedule(params["h_div_w"], params["pn"]) == schedule
        elif key == "noise_apply_layers":
            ok = value <= 0  # no training-time bit flips
        elif key in _FIXED:
            ok = value == _FIXED[key]
        else:
            ok = key in _APPLIED
        if not ok:
            raise CaseSkipped(f"{key}={value!r} is not supported")


def _uint8_bgr(image_B3HW: torch.Tensor) -> torch.Tensor:
    """The image the official ``autoregressive_infer_cfg`` returns: (H, W, 3) uint8 BGR, truncated."""
    return ((image_B3HW + 1) / 2).permute(0, 2, 3, 1).mul(255).to(torch.uint8).flip(dims=(3,))[0]


def _bits(tensors, schedule) -> list[torch.Tensor]:
    return [rearrange(tensors[f"gt_bits_s{i}"], "B (h w) d -> B h w d", h=h, w=w).to(torch.uint8)
            for i, (_, h, w) in enumerate(schedule)]


def run_case(case: dict, tensors: dict[str, torch.Tensor], weights: dict[str, str], folder: Path) -> dict:
    params = case["params"]
    schedule = [tuple(s) for s in params["scale_schedule"]]
    _check(params, schedule)
    if params.get("cond_drop"):
        raise CaseSkipped("cond_drop=True: the sampler takes the prompts as given")
    model = load(weights["transformer"], expect=Family.INFINITY).model
    if params.get("strip_lora"):
        lora.strip_lora(model)
    if "cross_attention_bf16_rounding" in params:
        model.cross_attention_bf16_rounding = bool(params["cross_attention_bf16_rounding"])
    vae = load(weights["vae"], expect=Family.INFINITY_BSQ_VAE).model
    text = TextCondition.from_cu_seqlens(tensors["text_kv_compact"], tensors["text_cu_seqlens_k"])
    if "text_lens" in params and list(text.lens) != list(params["text_lens"]):
        raise CaseSkipped(f"text_lens {params['text_lens']} disagree with text_cu_seqlens_k {text.lens}")
    interp = params.get("next_scale_interp", "area")
    out: dict[str, torch.Tensor] = {}
    prefix = case["name"] if case["name"] in _PREFIX else None

    if prefix is None:  # teacher forcing from the image's own bits
        bits = vae.encode(tensors["image"], schedule).bits
        for i, b in enumerate(bits):
            out[f"gt_bits_s{i}"] = rearrange(b, "B h w d -> B (h w) d").int()
        x_name = "x_BLC_wo_prefix" if interp == "trilinear" else f"x_BLC_wo_prefix_{interp}"
        out[x_name] = torch.cat(bsq_quant.next_scale_inputs(bits, schedule, mode=interp), dim=1)
        logits = sampler.teacher_forced_logits(model, bits, text, schedule, next_scale=interp)
        out["logits_teacher_forced" + ("" if interp == "trilinear" else f"_{interp}")] = torch.cat(logits, dim=1)
        return out

    options = sampler.SamplerOptions(cfg=tuple(params["cfg_list"]), tau=tuple(params["tau_list"]),
                                     cfg_insertion_layer=tuple(params["cfg_insertion_layer"]),
                                     top_k=int(params["top_k"]), top_p=float(params["top_p"]),
                                     next_scale=interp, seed=int(params["g_seed"]))
    gt_leak = int(params.get("gt_leak", 0))
    forced = _bits(tensors, schedule)[:gt_leak] if gt_leak > 0 else None
    result = sampler.sample(model, text, schedule, options, forced_bits=forced)
    for i, (b, logits) in enumerate(zip(result.bits, result.logits)):
        out[f"{prefix}_logits_s{i}"] = logits
        out[f"{prefix}_bits_s{i}"] = rearrange(b, "B h w d -> B (h w) d").long()
    out[f"{prefix}_summed_codes"] = result.codes.squeeze(2)
    out[f"{prefix}_image_uint8_bgr"] = _uint8_bgr(vae.decode(result.codes))
    return out
