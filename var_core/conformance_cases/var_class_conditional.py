"""Conformance adapter for ``var_class_conditional`` fixtures (FoundationVision/VAR: VQVAE + class-conditional VAR).

Cases: ``vqvae_roundtrip`` (input image), ``teacher_forced`` (labels + next-scale inputs) and the
sampling cases (labels only; every expected tensor is prefixed by the case name, e.g.
``greedy_idx_s0``). Sampling uses a torch generator seeded with ``g_seed`` on the model's device
and ``torch.multinomial`` in the official draw order, so the torch-specific ``sampled`` case is
reproduced as well.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .. import load
from ..conformance import CaseSkipped
from ..detect import Family

# Parameters whose value this implementation has fixed (anything else is skipped, not guessed).
_FIXED = {
    "next_scale_interp": "bicubic (VAR get_next_autoregressive_input / Phi)",
    "uncond_label": "num_classes (rows B..2B-1)",
    "cfg_schedule": "t = cfg * si / (len(patch_nums)-1); logits = (1+t)*cond - t*uncond",
}


def _models(weights: dict[str, str], params: dict):
    vqvae = load(weights["vqvae"], expect=Family.VAR_VQVAE).model
    vqvae.quant_resi = float(params.get("quant_resi", vqvae.quant_resi))
    vqvae.using_znorm = bool(params.get("using_znorm", False))
    var = load(weights["var"], expect=Family.VAR).model if "var" in weights else None
    if var is not None and "norm_eps" in params and params["norm_eps"] != var.config.norm_eps:
        raise CaseSkipped(f"norm_eps={params['norm_eps']} (this implementation uses {var.config.norm_eps})")
    return vqvae, var


def run_case(case: dict, tensors: dict[str, torch.Tensor], weights: dict[str, str], folder: Path) -> dict:
    params = case["params"]
    for key, value in _FIXED.items():
        if key in params and params[key] != value:
            raise CaseSkipped(f"{key}={params[key]!r} is not supported (only {value!r})")
    if params.get("cond_drop"):
        raise CaseSkipped("cond_drop=true: the fixture's random label drop is not emulated")
    vqvae, var = _models(weights, params)
    patch_nums = [int(p) for p in params["patch_nums"]]
    if var is not None and tuple(patch_nums) != var.config.patch_nums:
        raise CaseSkipped(f"patch_nums {patch_nums} differ from the transformer's {list(var.config.patch_nums)}")
    out: dict[str, torch.Tensor] = {}
    inputs = case["inputs"]
    if inputs == ["input"]:
        x = tensors["input"]
        f = vqvae.encode(x)
        pyr = vqvae.quantize_latent(f, patch_nums, keep_fhat=True)
        out["f"] = f
        for i, (idx, fhat) in enumerate(zip(pyr.idx, pyr.fhat)):
            out[f"idx_s{i}"] = idx
            out[f"fhat_s{i}"] = fhat
        out["recon"] = vqvae.idx_to_img(pyr.idx)
        out["recon_img_to_reconstructed_img"] = vqvae.fhat_to_img(pyr.f_hat)
        out["x_BLCv_wo_first_l"] = vqvae.idx_to_var_input(pyr.idx)
    elif inputs == ["labels", "x_BLCv_wo_first_l"]:
        out["logits_teacher_forced"] = var(tensors["labels"], tensors["x_BLCv_wo_first_l"])
    elif inputs == ["labels"]:
        prefix = case["name"]
        labels = tensors["labels"]
        sample = var.autoregressive_infer_cfg(
            vqvae, int(params.get("B", labels.shape[0])), labels, g_seed=params.get("g_seed"),
            cfg=float(params["cfg"]), top_k=int(params.get("top_k", 0)), top_p=float(params.get("top_p", 0.0)),
            more_smooth=bool(params.get("more_smooth", False)), keep_logits=True)
        for i, (idx, logits) in enumerate(zip(sample.idx, sample.logits_raw)):
            out[f"{prefix}_idx_s{i}"] = idx
            out[f"{prefix}_logits_raw_s{i}"] = logits
        out[f"{prefix}_image01"] = sample.image01
    else:
        raise CaseSkipped(f"inputs {inputs} are not a case this adapter knows")
    return out
