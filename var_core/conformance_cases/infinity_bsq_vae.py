"""Conformance adapter for ``infinity_bsq_vae`` fixtures (Infinity's BSQ multi-scale VAE)."""

from __future__ import annotations

from pathlib import Path

import torch

from .. import bsq_quant, load
from ..conformance import CaseSkipped
from ..detect import Family

# The quantiser behaviour this implementation has; other values in a manifest are not supported.
_SUPPORTED = {
    "next_scale_interp_down": "area",
    "code_interp_up": "trilinear",
    "last_scale_not_resized": True,
    "bit_order": "msb_first",
    "label_type": "bit_label",
}


def run_case(case: dict, tensors: dict[str, torch.Tensor], weights: dict[str, str], folder: Path) -> dict:
    params = case["params"]
    for key, value in _SUPPORTED.items():
        if key in params and params[key] != value:
            raise CaseSkipped(f"{key}={params[key]!r} is not supported (only {value!r})")
    vae = load(weights["vae"], expect=Family.INFINITY_BSQ_VAE).model
    schedule = [tuple(s) for s in params["scale_schedule"]]
    out: dict[str, torch.Tensor] = {}
    if case["inputs"] == ["input"]:
        x = tensors["input"]
        out["encoder_out"] = vae.encode_latent(x)
        enc = bsq_quant.encode_pyramid(out["encoder_out"], schedule, intermediates=True)
        for i in range(len(schedule)):
            out[f"quant_in_s{i}"] = enc.quant_in[i]
            out[f"quant_out_s{i}"] = enc.quant_out[i]
            out[f"bits_s{i}"] = enc.bits[i][:, None].int()  # official layout (B, t=1, h, w, d)
            out[f"fhat_s{i}"] = enc.fhat[i]
        for i, v in enumerate(enc.var_inputs):
            out[f"var_input_s{i}"] = v
        out["z"] = enc.z
        out["recon"] = vae.decode(enc.z)
    else:
        bits = [tensors[name].reshape(tensors[name].shape[0], *tensors[name].shape[-3:]) for name in case["inputs"]]
        out["summed_codes_from_bits"], out["recon_from_bits"] = vae.decode_bits(bits, schedule)
    return out
