"""Conformance adapter for ``restorevar`` fixtures (sudraj2002/RestoreVAR: VQVAE + VAR with cross-attention + refiner).

Cases: ``vqvae_and_cond`` (GT image -> token pyramid and teacher-forcing input; degraded image ->
encoder features ``img_to_fs``), ``teacher_forced`` (next-scale inputs + degraded image) and
``greedy_refined`` (degraded image -> argmax decoding, refiner, image). The weights go through
``var_core.load``; the ``refiner`` role is the same file as ``var`` (its ``vae_refiner.*`` keys).
"""

from __future__ import annotations

from pathlib import Path

import torch
from einops import rearrange

from .. import load
from ..conformance import CaseSkipped
from ..detect import Family

# Parameters whose value selects behaviour this implementation has fixed (anything else is skipped).
_FIXED = {
    "input_transform": "ToTensor()/255*2-1",
    "label": "num_classes (always; class_emb has num_classes+1 rows)",
    "cond_resize": "bicubic to pn_last",
    "decoding": "argmax per token (no cfg, no sampling)",
    "next_scale_interp": "bicubic up + quant_resi (Phi) except the last scale; area down",
}


def _check(params: dict, var) -> None:
    for key, value in _FIXED.items():
        if key in params and params[key] != value:
            raise CaseSkipped(f"{key}={params[key]!r} is not supported (only {value!r})")
    if params.get("cond_drop"):
        raise CaseSkipped("cond_drop=true is not emulated")
    if var is not None:
        if tuple(params["patch_nums"]) != var.config.patch_nums:
            raise CaseSkipped(f"patch_nums {params['patch_nums']} differ from the model's {var.config.patch_nums}")
        if params.get("norm_eps", var.config.norm_eps) != var.config.norm_eps:
            raise CaseSkipped(f"norm_eps={params['norm_eps']} (this implementation uses {var.config.norm_eps})")


def run_case(case: dict, tensors: dict[str, torch.Tensor], weights: dict[str, str], folder: Path) -> dict:
    params = case["params"]
    vqvae = load(weights["vqvae"], expect=Family.VAR_VQVAE).model
    vqvae.quant_resi = float(params.get("quant_resi", vqvae.quant_resi))
    vqvae.using_znorm = bool(params.get("using_znorm", False))
    inputs = case["inputs"]
    var = None
    if inputs != ["gt", "cond_img"]:
        if Path(weights.get("refiner", weights["var"])) != Path(weights["var"]):
            raise CaseSkipped("a refiner in a separate file is not supported (the official file holds vae_refiner.*)")
        var = load(weights["var"], expect=Family.RESTOREVAR).model
    _check(params, var)
    patch_nums = [int(p) for p in params["patch_nums"]]
    out: dict[str, torch.Tensor] = {}
    if inputs == ["gt", "cond_img"]:
        idx = vqvae.img_to_idx(tensors["gt"], patch_nums)
        for i, t in enumerate(idx):
            out[f"gt_idx_s{i}"] = t
        out["x_BLCv_wo_first_l"] = vqvae.idx_to_var_input(idx, patch_nums)
        levels = [int(i) for i in params.get("encoder_levels_used", (1, 3, 5, -1))]
        for i, fs in enumerate(vqvae.img_to_fs(tensors["cond_img"], size=patch_nums[-1], levels=levels)):
            out[f"cond_fs_{i}"] = fs
    elif inputs == ["x_BLCv_wo_first_l", "cond_img"]:
        cond = var.degraded_tokens(vqvae, tensors["cond_img"])
        out["logits_teacher_forced"] = var(tensors["x_BLCv_wo_first_l"], cond)
    elif inputs == ["cond_img"]:
        s = var.autoregressive_infer(vqvae, tensors["cond_img"], keep_logits=True, refine=True)
        for i, (idx, logits) in enumerate(zip(s.idx, s.logits)):
            out[f"greedy_idx_s{i}"] = idx
            out[f"greedy_logits_s{i}"] = logits
        out["refiner_fhat_in"] = rearrange(s.f_hat_discrete, "B C h w -> B (h w) C")
        out["refiner_last_block"] = s.last_block
        out["refiner_fhat_out"] = rearrange(s.f_hat, "B C h w -> B (h w) C")
        out["f_hat_final"] = s.f_hat
        out["greedy_image01"] = s.image01
    else:
        raise CaseSkipped(f"inputs {inputs} are not a case this adapter knows")
    return out
