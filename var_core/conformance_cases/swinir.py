"""Conformance adapter for ``swinir`` fixtures (DiffBIR's SwinIR pre-cleaner as VARestorer runs it).

Every ``params`` entry is checked against what the loaded model does; a value this implementation
does not follow skips the case with the reason instead of being ignored.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from .. import load, swinir
from ..conformance import CaseSkipped
from ..detect import Family

# Fixture tensor name -> module whose forward output it is (captured with a hook).
_INTERMEDIATES = {
    "conv_first_out": "conv_first",
    "conv_after_body_out": "conv_after_body",  # before the long skip connection is added
    "conv_before_upsample_out": "conv_before_upsample",
}


def _check_params(params: dict, model: swinir.SwinIR) -> str:
    """Verify every runtime parameter; return the input range ('[0,1]' or '[-1,1]')."""
    c = model.config
    for key, value in params.items():
        if key == "img_range":
            ok = math.isclose(value, c.img_range)
        elif key == "rgb_mean":
            ok = len(value) == len(c.mean) and all(math.isclose(a, b, abs_tol=1e-7) for a, b in zip(value, c.mean))
        elif key == "layernorm_eps":
            ok = all(m.eps == value for m in model.modules() if hasattr(m, "normalized_shape"))
        elif key == "input_range":
            ok = value in ("[0,1]", "[-1,1]")
        elif key == "pad_mode":
            # Reflect padding before PixelUnshuffle; padding to unshuffle*window (ours) equals padding to
            # window (upstream) on every size upstream can run.
            ok = value.startswith("reflect") and "before PixelUnshuffle" in value
        elif key == "attn_mask":
            # The stored masks were checked equal to the recomputed ones at load; recomputing is the same.
            ok = "calculate_mask" in value
        elif key == "pixel_unshuffle_uses":
            ok = value.startswith("sf") and c.unshuffle_scale == c.upscale
            if "num_feat 64" in value:
                ok = ok and c.num_feat == 64
        elif key == "wrapper":
            ok = value.replace(" ", "") == "out=2*swinir((lq+1)/2)-1"
        else:
            raise CaseSkipped(f"unknown parameter {key}={value!r}")
        if not ok:
            raise CaseSkipped(f"{key}={value!r} is not what this implementation does")
    return params.get("input_range", "[0,1]")


def run_case(case: dict, tensors: dict[str, torch.Tensor], weights: dict[str, str], folder: Path) -> dict:
    model = load(weights["swinir"], expect=Family.SWINIR).model
    input_range = _check_params(case["params"], model)
    if input_range == "[-1,1]" and "wrapper" not in case["params"]:
        raise CaseSkipped("a [-1,1] case must name its wrapper")
    (name,) = case["inputs"]
    x = tensors[name]

    out: dict[str, torch.Tensor] = {}
    hooks = [
        getattr(model, module).register_forward_hook(lambda _m, _i, y, key=key: out.__setitem__(key, y.clone()))
        for key, module in _INTERMEDIATES.items()
    ]
    try:
        y = model(x) if input_range == "[0,1]" else swinir.clean(model, x)
    finally:
        for h in hooks:
            h.remove()
    finals = [n for n in case["expected"] if n not in _INTERMEDIATES]
    if len(finals) != 1:
        raise CaseSkipped(f"expected exactly one final output among {list(case['expected'])}")
    out[finals[0]] = y
    return {k: v for k, v in out.items() if k in case["expected"]}
