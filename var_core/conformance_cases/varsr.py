"""Conformance adapter for ``varsr`` fixtures (qyp2000/VARSR: VQVAE + VAR_RoPE + diffusion refiner).

Cases: ``vqvae_roundtrip`` (HR image -> token pyramid with VARSR's last-scale quantiser),
``teacher_forced_label{0,1}`` (LR image + next-scale inputs) and ``greedy_cfg_refined`` (LR image;
the refiner's noise is the fixture's recorded draws). The weights go through ``var_core.load``
(the ``diffusion_refiner`` role is the same file as ``var``: its ``diffloss.*`` keys).
"""

from __future__ import annotations

from pathlib import Path

import torch

from .. import load
from ..conformance import CaseSkipped
from ..detect import Family
from ..varsr_refiner import TRAIN_STEPS, VAE_SCALE, diffusion_schedule

# Parameters whose value this implementation has fixed (anything else is skipped, not guessed).
_FIXED = {
    "lr_input_transform": "ToTensor()/255*2-1",
    "uncond_label": "num_classes-1 = 1",
    "next_scale_interp": "bicubic up + quant_resi (Phi) except the last scale; area down",
}
_DIFFUSION = {"noise_schedule": "cosine", "diffusion_steps": TRAIN_STEPS, "learn_sigma": True,
              "model_mean_type": "EPSILON", "model_var_type": "LEARNED_RANGE", "clip_denoised": True,
              "vae_scale": VAE_SCALE}


def _check(params: dict, var) -> None:
    for key, value in _FIXED.items():
        if key in params and params[key] != value:
            raise CaseSkipped(f"{key}={params[key]!r} is not supported (only {value!r})")
    if not params.get("last_scale_no_quant_resi", True):
        raise CaseSkipped("last_scale_no_quant_resi=false: VARSR's quantiser skips phi at the last scale")
    if params.get("cond_drop"):
        raise CaseSkipped("cond_drop=true is not emulated")
    if var is not None:
        if tuple(params["patch_nums"]) != var.config.patch_nums:
            raise CaseSkipped(f"patch_nums {params['patch_nums']} differ from the model's {var.config.patch_nums}")
        if params.get("norm_eps", var.config.norm_eps) != var.config.norm_eps:
            raise CaseSkipped(f"norm_eps={params['norm_eps']} (this implementation uses {var.config.norm_eps})")
    diff = params.get("diffusion")
    if diff:
        for key, value in _DIFFUSION.items():
            if diff.get(key, value) != value:
                raise CaseSkipped(f"refiner diffusion {key}={diff[key]!r} is not supported (only {value!r})")
        kept = diffusion_schedule(diff.get("timestep_respacing", 10)).timestep_map
        if "timestep_map" in diff and list(kept) != diff["timestep_map"]:
            raise CaseSkipped("the respaced timesteps differ from the fixture's timestep_map")


def run_case(case: dict, tensors: dict[str, torch.Tensor], weights: dict[str, str], folder: Path) -> dict:
    params = case["params"]
    vqvae = load(weights["vqvae"], expect=Family.VAR_VQVAE).model
    vqvae.quant_resi = float(params.get("quant_resi", vqvae.quant_resi))
    vqvae.using_znorm = bool(params.get("using_znorm", False))
    inputs = case["inputs"]
    var = None if inputs == ["hr"] else load(weights["var"], expect=Family.VARSR).model
    _check(params, var)
    patch_nums = [int(p) for p in params["patch_nums"]]
    out: dict[str, torch.Tensor] = {}
    if inputs == ["hr"]:
        pyr = vqvae.quantize_latent(vqvae.encode(tensors["hr"]), patch_nums, last_scale_phi=False)
        for i, idx in enumerate(pyr.idx):
            out[f"gt_idx_s{i}"] = idx
        out["last_layer_gt"] = pyr.rest_last_BlC
        out["x_BLCv_wo_first_l"] = vqvae.idx_to_var_input(pyr.idx, patch_nums)
    elif inputs == ["lr", "x_BLCv_wo_first_l"]:
        label = int(params["label"])
        out[f"logits_teacher_forced_label{label}"] = var(tensors["lr"], tensors["x_BLCv_wo_first_l"], label)
    elif inputs[:2] == ["lr", "greedy_labels"]:
        if params.get("more_smooth"):
            raise CaseSkipped("more_smooth=true is not part of this adapter")
        if "refiner_output_reshape_quirk" not in params:
            raise CaseSkipped("the fixture does not say how the refiner output is laid out")
        steps = params["diffusion"]["timestep_respacing"]
        n_steps = diffusion_schedule(steps).num_steps
        s = var.autoregressive_infer_cfg(
            vqvae, tensors["lr"], tensors["greedy_labels"], g_seed=params.get("g_seed"), cfg=float(params["cfg"]),
            top_k=int(params.get("top_k", 0)), top_p=float(params.get("top_p", 0.0)), keep_logits=True,
            refiner_steps=steps, refiner_temperature=float(params["diffusion"].get("temperature", 1.0)),
            refiner_noise_init=tensors["refiner_noise_init"],
            refiner_step_noise=[tensors[f"refiner_step_noise_{k}"] for k in range(n_steps)],
            official_refiner_reshape=True)
        for i, (idx, logits) in enumerate(zip(s.idx, s.logits_raw)):
            out[f"greedy_idx_s{i}"] = idx
            out[f"greedy_logits_raw_s{i}"] = logits
        out.update(f_hat_discrete=s.f_hat_discrete, refiner_z=s.refiner_z, refiner_out=s.refiner_out,
                   refiner_delta_fhat=s.refiner_delta, f_hat_final=s.f_hat, greedy_image01=s.image01)
    else:
        raise CaseSkipped(f"inputs {inputs} are not a case this adapter knows")
    return out
