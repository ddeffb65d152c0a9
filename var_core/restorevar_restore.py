"""One model-sized RestoreVAR restoration, as ``infer.py`` runs it.

Paper: Rajagopalan et al., "RestoreVAR: Visual Autoregressive Generation for All-in-One Image
Restoration" (2025); upstream sudraj2002/RestoreVAR. The degraded image is expected already at the
model's size (:meth:`.restorevar.RestoreVAR.input_size`: ``p_K`` x 16, 512 for the released model
with ``--patch_nums 1 2 3 4 6 9 13 18 24 32``); tiling is the caller's job. Decoding is greedy, so
the result does not depend on a seed. The official pipeline has no colour fix.
"""

from __future__ import annotations

import torch

from .errors import ImageInputError
from .restorevar import RestoreVAR
from .var_vqvae import VQVAE


@torch.no_grad()
def restorevar_restore(model: RestoreVAR, vqvae: VQVAE, degraded_B3HW: torch.Tensor, *,
                       refine: bool | None = None) -> torch.Tensor:
    """Restore one model-sized batch: ``degraded`` ``(B, 3, S, S)`` in ``[-1, 1]``, ``S`` =
    ``model.input_size(vqvae)`` -> ``(B, 3, S, S)`` in ``[-1, 1]``.

    ``vqvae``: the fine-tuned ``vae_restorevar.ckpt`` of the release (the original VAR VQVAE works
    too, with a decoder not trained on refined continuous latents). ``refine``: run the latent
    refiner (default: when the checkpoint has one). A wrong size raises :class:`ImageInputError`.
    The KV cache never outlives a call.
    """
    if not isinstance(degraded_B3HW, torch.Tensor) or degraded_B3HW.ndim != 4 or degraded_B3HW.shape[0] == 0:
        shape = tuple(degraded_B3HW.shape) if isinstance(degraded_B3HW, torch.Tensor) else type(degraded_B3HW).__name__
        raise ImageInputError(f"expected a non-empty (B, 3, H, W) image batch, got {shape}")
    if not torch.isfinite(degraded_B3HW).all():
        raise ImageInputError("the image contains NaN or Inf values")
    x = degraded_B3HW.float().clamp(-1, 1)
    sample = model.autoregressive_infer(vqvae, x, refine=refine)
    return sample.image01.mul(2).sub(1).clamp(-1, 1)
