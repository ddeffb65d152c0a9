"""Conformance adapter for ``varestorer_student`` fixtures (VARestorer's one-step student).

Every ``params`` entry is either applied (schedule, interpolation, temperature, the official
quirks ``cross_attention_bf16_rounding``, ``lora_drops_ca_v_bias``, ``cond_drop``,
``ignore_lora``, ``lora_scale``) or checked against what this implementation does; any other
value skips the case with the reason instead of being ignored.
"""

from __future__ import annotations

from pathlib import Path

import torch
from einops import rearrange

from .. import bsq_quant, load, lora, student
from ..conformance import CaseSkipped
from ..detect import Family
from ..infinity_model import TextCondition
from ..schedules import scale_schedule

# Descriptive parameters: the value must contain each fragment (what this implementation does).
_DESCRIBED = {
    "attention": ("non-causal",),
    "rope_cache": ("1M", "rope2d_normalized_by_hw=2"),
    "text_maxlen_from": ("cfg_uncond.shape[0]",),
    "gumbel_noise": ("gumbel_U_s{i}", "-log(-log(U+1e-20)+1e-20)"),
    "lq_input": ("[-1,1]",),
}
_APPLIED = {"scale_schedule", "text_lens", "requant_mode", "next_scale_interp", "gumbel_tau",
            "cross_attention_bf16_rounding", "lora_drops_ca_v_bias", "lora_scale", "cond_drop", "ignore_lora"}


def _check(params: dict, schedule) -> None:
    for key, value in params.items():
        if key in _DESCRIBED:
            ok = all(f in str(value) for f in _DESCRIBED[key])
        elif key in ("h_div_w", "pn"):
            ok = scale_schedule(params["h_div_w"], params["pn"]) == schedule
        elif key == "noise_apply_layers":
            ok = value <= 0  # no training-time bit flips at inference
        elif key == "cfg":
            ok = value == 1.0  # the one-step student has no classifier-free guidance
        else:
            ok = key in _APPLIED
        if not ok:
            raise CaseSkipped(f"{key}={value!r} is not supported")


def _uint8_bgr(image_B3HW: torch.Tensor) -> torch.Tensor:
    """The return value of the official ``infer_single_sr_tile``: (H, W, 3) uint8 BGR, truncated."""
    return ((image_B3HW + 1) / 2).permute(0, 2, 3, 1).mul(255).to(torch.uint8).flip(dims=(3,))[0]


def run_case(case: dict, tensors: dict[str, torch.Tensor], weights: dict[str, str], folder: Path) -> dict:
    params = case["params"]
    schedule = [tuple(s) for s in params["scale_schedule"]]
    _check(params, schedule)
    model = load(weights["transformer"], expect=Family.INFINITY).model
    if params.get("ignore_lora"):
        lora.strip_lora(model)
    lora.set_lora_scale(model, params.get("lora_scale", 1.0))
    text = TextCondition.from_cu_seqlens(tensors["text_kv_compact"], tensors["text_cu_seqlens_k"])
    if "text_lens" in params and list(text.lens) != list(params["text_lens"]):
        raise CaseSkipped(f"text_lens {params['text_lens']} disagree with text_cu_seqlens_k {text.lens}")
    interp = params.get("next_scale_interp", "trilinear")
    out: dict[str, torch.Tensor] = {}

    if "lq" in case["inputs"]:
        vae = load(weights["vae"], expect=Family.INFINITY_BSQ_VAE).model
        out["lq_raw_features"] = vae.encode_latent(tensors["lq"])
        lq_bits = bsq_quant.encode_pyramid(out["lq_raw_features"], schedule).bits
        for i, b in enumerate(lq_bits):
            out[f"gt_bits_s{i}"] = rearrange(b, "B h w d -> B (h w) d").int()
        out["x_BLC_wo_prefix_flip"] = student.student_inputs(lq_bits, schedule, requant="flip", interp=interp)
        out["x_BLC_long"] = student.student_inputs(lq_bits, schedule, requant="long", interp=interp)
        x_BLd = out[{"long": "x_BLC_long", "flip": "x_BLC_wo_prefix_flip"}[params.get("requant_mode", "long")]]
    else:
        vae, x_BLd = None, tensors["x_BLC_long"]

    logits = model.forward_logits(x_BLd, text, schedule, cond_drop=bool(params.get("cond_drop", False)),
                                  bf16_rounding=params.get("cross_attention_bf16_rounding"),
                                  drop_v_bias=params.get("lora_drops_ca_v_bias"))  # None: the model's default
    out["logits_cond_dropped" if params.get("cond_drop") else "logits"] = logits
    if vae is None:
        return out

    pred, greedy = [], []
    for i, ((_, h, w), logits_s) in enumerate(zip(schedule, student.split_scales(logits, schedule))):
        name = f"gumbel_U_s{i}"
        if name not in tensors:
            raise CaseSkipped(f"the case has no {name}: the Gumbel noise of the official run is needed")
        bits = student.gumbel_bits(logits_s, params["gumbel_tau"], uniforms=tensors[name])
        out[f"pred_bits_s{i}"] = bits.float()
        out[f"argmax_bits_s{i}"] = student.argmax_bits(logits_s).int()
        pred.append(rearrange(bits, "B (h w) d -> B h w d", h=h, w=w))
        greedy.append(rearrange(out[f"argmax_bits_s{i}"], "B (h w) d -> B h w d", h=h, w=w))
    out["summed_codes"] = bsq_quant.summed_codes(pred, schedule)
    out["summed_codes_argmax"] = bsq_quant.summed_codes(greedy, schedule)
    out["image_float"] = vae.decode(out["summed_codes"])
    out["image_uint8_bgr"] = _uint8_bgr(out["image_float"])
    return out
