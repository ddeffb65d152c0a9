"""One model-sized VARSR restoration: the official test settings and colour fix (``test_varsr.py``).

Paper: Qu et al., "Visual Autoregressive Modeling for Image Super-Resolution" (ICML 2025);
upstream qyp2000/VARSR. The LR image is expected already resized to the model's input size
(:attr:`.varsr.VARSRConfig.lr_size`, 512 for the released model); tiling is the caller's job.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .errors import ImageInputError, ParameterError
from .var_vqvae import VQVAE
from .varsr import VARSR


def adain_color_fix(x01_B3HW: torch.Tensor, ref01_B3HW: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """``test_varsr.py``'s AdaIN colour fix on ``[0, 1]`` images: per-channel mean and
    ``sqrt(unbiased variance + eps)`` of ``x`` matched to the reference's, clamped to ``[0, 1]``.
    The reference is resized (bicubic) to ``x``'s size, as the official script resizes the LR image."""
    if ref01_B3HW.shape[-2:] != x01_B3HW.shape[-2:]:
        ref01_B3HW = F.interpolate(ref01_B3HW.float(), size=x01_B3HW.shape[-2:], mode="bicubic", align_corners=False)
    ref = ref01_B3HW.to(x01_B3HW)

    def stats(t):
        flat = t.flatten(2)
        return flat.mean(-1)[..., None, None], (flat.var(-1) + eps).sqrt()[..., None, None]

    mx, sx = stats(x01_B3HW)
    mr, sr = stats(ref)
    return ((x01_B3HW - mx) / sx * sr + mr).clamp(0, 1)


COLOR_FIXES = ("adain", "none")


@torch.no_grad()
def varsr_restore(
    model: VARSR, vqvae: VQVAE, lr_B3HW: torch.Tensor, *, cfg: float = 6.0, steps: int = 10,
    seed: int | None = 0, generator: torch.Generator | None = None, top_k: int = 1, top_p: float = 0.75,
    label: int = 0, color_fix: str = "adain", official_refiner_reshape: bool = True,
) -> torch.Tensor:
    """Restore one model-sized batch: ``lr`` ``(B, 3, S, S)`` in ``[-1, 1]``, ``S`` =
    :attr:`VARSRConfig.lr_size` -> ``(B, 3, H, W)`` in ``[-1, 1]`` (``H = p_K * 16``).

    Defaults follow ``test_varsr.py``: label 0, ``cfg`` 6, ``top_k`` 1 (greedy), ``top_p`` 0.75,
    ``steps`` = 10 refiner steps, AdaIN colour fix towards the LR input. ``generator`` drives all of
    the batch's randomness (token draws, then refiner noise); otherwise image ``i`` uses its own
    generator seeded with ``seed + i`` (so a batch gives the images of single runs), and
    ``seed=None`` uses torch's global RNG. The KV cache never outlives a call.
    """
    if color_fix not in COLOR_FIXES:
        raise ParameterError(f"color_fix must be one of {COLOR_FIXES}, got {color_fix!r}")
    if lr_B3HW.ndim != 4 or lr_B3HW.shape[0] == 0:
        raise ImageInputError(f"expected a non-empty (B, 3, H, W) LR batch, got {tuple(lr_B3HW.shape)}")
    lr = lr_B3HW.to(model.device, torch.float32)

    def run(x, gen):
        return model.autoregressive_infer_cfg(vqvae, x, label, generator=gen, cfg=cfg, top_k=top_k, top_p=top_p,
                                              refiner_steps=steps, refiner_generator=gen,
                                              official_refiner_reshape=official_refiner_reshape).image01

    if generator is not None or seed is None:
        out01 = run(lr, generator)
    else:
        out01 = torch.cat([run(lr[i:i + 1], torch.Generator(model.device).manual_seed(int(seed) + i))
                           for i in range(lr.shape[0])])
    if color_fix == "adain":
        out01 = adain_color_fix(out01, lr.add(1).mul(0.5))
    return out01.mul(2).sub(1).clamp(-1, 1)
