"""The one attention entry point of ``var_core``.

Every attention of the package (self-attention, text cross-attention, attentive pooling) calls
:func:`attention`, which runs PyTorch's ``F.scaled_dot_product_attention`` (SDPA). On CUDA, with
half-precision inputs and no mask, it uses ``flash_attn`` when that package happens to be
installed; it is never required.

Variable-length keys (the packed T5 features of a batch of prompts, which the official code feeds to
``flash_attn_varlen_kvpacked_func`` with ``cu_seqlens``) are padded to the longest prompt and
masked with :func:`key_padding_mask`.

``bf16_rounding`` reproduces the numerics of the official cross-attention in float32 runs: it
casts q, k and v to bfloat16 before flash-attn, which returns bfloat16. q, k, v and the output are
rounded through bfloat16 here while the attention itself is computed in the input precision.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:  # optional fast kernel; SDPA is the reference path
    from flash_attn import flash_attn_func as _flash_attn_func
except ImportError:  # pragma: no cover - depends on the environment
    _flash_attn_func = None


def attention(
    q_BHLc: torch.Tensor,
    k_BHLc: torch.Tensor,
    v_BHLc: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
    bf16_rounding: bool = False,
    fast_kernel: bool = True,
) -> torch.Tensor:
    """Multi-head attention ``softmax(q k^T * scale) v`` -> ``(B, H, Lq, c)``.

    q is ``(B, H, Lq, c)``, k and v ``(B, H, Lk, c)``. ``mask`` broadcasts to ``(B, H, Lq, Lk)``:
    boolean (True = may attend) or additive float. ``scale`` defaults to ``1/sqrt(c)``.
    ``bf16_rounding`` rounds q, k, v and the result through bfloat16 (official cross-attention).
    """
    dtype = q_BHLc.dtype
    if bf16_rounding and dtype == torch.float32:
        q_BHLc, k_BHLc, v_BHLc = (t.to(torch.bfloat16).to(dtype) for t in (q_BHLc, k_BHLc, v_BHLc))
    use_flash = (
        fast_kernel and _flash_attn_func is not None and mask is None and q_BHLc.is_cuda
        and dtype in (torch.float16, torch.bfloat16) and q_BHLc.shape[-1] <= 256
    )
    if use_flash:
        out_BLHc = _flash_attn_func(*(t.transpose(1, 2) for t in (q_BHLc, k_BHLc, v_BHLc)), softmax_scale=scale)
        out_BHLc = out_BLHc.transpose(1, 2)
    else:
        out_BHLc = F.scaled_dot_product_attention(q_BHLc, k_BHLc, v_BHLc, attn_mask=mask, scale=scale)
    if bf16_rounding and dtype == torch.float32:
        out_BHLc = out_BHLc.to(torch.bfloat16).to(dtype)
    return out_BHLc


def key_padding_mask(lens: list[int] | tuple[int, ...], device=None) -> torch.Tensor | None:
    """Boolean ``(B, 1, 1, Lmax)`` mask of the valid keys of padded sequences; None if none is padded."""
    if len(set(lens)) <= 1:
        return None
    lens_B = torch.as_tensor(list(lens), device=device)
    valid_BL = torch.arange(int(lens_B.max()), device=device)[None] < lens_B[:, None]
    return valid_BL[:, None, None, :]


def block_causal_mask(scale_lens: list[int] | tuple[int, ...], device=None) -> torch.Tensor:
    """Boolean ``(L, L)`` mask of next-scale prediction: token i sees token j iff scale(i) >= scale(j)."""
    scale_L = torch.repeat_interleave(torch.arange(len(scale_lens), device=device),
                                      torch.as_tensor(list(scale_lens), device=device))
    return scale_L[:, None] >= scale_L[None, :]
