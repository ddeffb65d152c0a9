"""``train vae``: train Infinity's BSQ multi-scale VAE (the tokenizer) from scratch.

Paper: Han et al., "Infinity: Scaling Bitwise AutoRegressive Modeling for High-Resolution Image
Synthesis" (CVPR 2025), whose tokenizer is a Flux-style convolutional autoencoder with multi-scale
bitwise spherical quantisation (BSQ; Zhao et al., "Image and Video Tokenization with Binary
Spherical Quantization", 2024). The architecture is :class:`~var_core.bsq_vae.BSQVAE`, sized by
flags (:func:`vae_config`); the quantiser is the one of :mod:`var_core.bsq_quant`, made
trainable here by :func:`quantize_pyramid_ste`:

for each scale ``(1, h, w)`` of the crop's schedule, the residual latent is ``area``-resized to
``h x w`` and projected onto the unit sphere; its code is the sign of each channel over
``sqrt(d)``, passed to the encoder with the straight-through estimator; the codes are
``trilinear``-resized back to the latent grid and summed (the residual of the next scale
subtracts them without gradient). The decoder sees the sum, exactly what
:func:`var_core.bsq_quant.encode_pyramid` gives at inference.

Loss: ``l1_weight * |x - x_rec| + mse_weight * (x - x_rec)^2 + commit_weight * commit``, where
``commit`` is the squared distance between each unit-norm residual and its code (summed over the
``d`` channels, averaged over positions and scales), the BSQ commitment term.

Output ``vae.safetensors``: the state dict under the official key names plus the quantiser's
MSB-first ``lfq.mask`` buffers, so ``var_core.load`` detects it as the Infinity BSQ VAE.

Shapes: ``B`` batch, ``d`` codebook dim, ``H x W`` the latent grid (image / 16).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from .. import bsq_quant
from ..bsq_vae import BSQVAE, BSQVAEConfig
from ..checkpoint import StateDict
from ..errors import ParameterError
from ..schedules import VAE_STRIDE
from . import common

log = logging.getLogger(__name__)

MODEL_FILE = "vae.safetensors"
LEVELS = 5  # four 2x downsamplings: the 16-pixel latent cell every Infinity schedule assumes


def vae_config(*, base_ch: int = 48, ch_mult: tuple[int, ...] = (1, 1, 1, 1, 1), codebook_dim: int = 32,
               num_res_blocks: int = 1, mid_attention: bool = False) -> BSQVAEConfig:
    """A :class:`BSQVAEConfig` laid out as the official ones (downsampling after every level but the
    last, upsampling before every level but the first) with the given sizes."""
    if len(ch_mult) != LEVELS:
        raise ParameterError(f"--ch-mult needs {LEVELS} levels (four 2x downsamplings = {VAE_STRIDE}-pixel tokens), "
                             f"got {len(ch_mult)}: {ch_mult}")
    for c in {base_ch * m for m in ch_mult}:
        if c < 1 or (c % 32 and c % 24):
            raise ParameterError(f"a VAE level would have {c} channels: base_ch x ch_mult must be a multiple of 32 "
                                 "or 24 (the GroupNorm groups of the official VAE)")
    thin = sorted({c for c in (base_ch * m for m in ch_mult) if c in (24, 32)})
    if thin:
        log.warning("VAE levels of %s channels have one channel per GroupNorm group, which normalises away flat "
                    "colours; 48 or 64 channels keep two per group", thin)
    if not 1 <= codebook_dim <= 63:
        raise ParameterError(f"--codebook-dim must be in 1..63 bits, got {codebook_dim}")
    if num_res_blocks < 1:
        raise ParameterError(f"--num-res-blocks must be at least 1, got {num_res_blocks}")
    return BSQVAEConfig(in_channels=3, base_ch=base_ch, encoder_ch_mult=tuple(ch_mult), decoder_ch_mult=tuple(ch_mult),
                        num_res_blocks=num_res_blocks, codebook_dim=codebook_dim,
                        encoder_downsample=(True,) * (LEVELS - 1) + (False,),
                        decoder_upsample=(False,) + (True,) * (LEVELS - 1), mid_attention=mid_attention)


def quantize_pyramid_ste(f_BdHW: torch.Tensor, schedule) -> tuple[torch.Tensor, torch.Tensor]:
    """Multi-scale BSQ of the encoder output with straight-through gradients.

    Returns the summed codes ``(B, d, H, W)`` (the values of ``encode_pyramid(f).z``) and the
    commitment loss (scalar).
    """
    d = f_BdHW.shape[1]
    f_Bd1HW = f_BdHW.float().unsqueeze(2)
    full = tuple(f_Bd1HW.shape[-3:])
    residual, fhat, commit = f_Bd1HW, torch.zeros_like(f_Bd1HW), f_BdHW.new_zeros((), dtype=torch.float32)
    for size in schedule:
        unit = F.normalize(bsq_quant.resize(residual, size, bsq_quant.INTERP_DOWN), dim=1)
        code = torch.where(unit > 0, 1.0, -1.0) / math.sqrt(d)
        commit = commit + (unit - code).pow(2).sum(1).mean()
        up = bsq_quant.resize(unit + (code - unit).detach(), full, bsq_quant.INTERP_UP)
        residual = residual - up.detach()
        fhat = fhat + up
    return fhat.squeeze(2), commit / len(schedule)


def official_state_dict(vae: BSQVAE) -> StateDict:
    """The VAE's weights under the official keys, with both ``lfq.mask`` bit-order buffers."""
    sd = {k: v.detach().float().cpu().contiguous() for k, v in vae.state_dict().items()}
    d = vae.codebook_dim
    for key in ("quantizer.lfq.mask", "quantize.lfq.mask"):
        sd[key] = 2 ** torch.arange(d - 1, -1, -1, dtype=torch.int64)
    return sd


def psnr(mse: torch.Tensor) -> torch.Tensor:
    """PSNR in dB of images in [-1, 1] (peak-to-peak 2) from their mean squared error."""
    return 10 * torch.log10(4 / mse.clamp_min(1e-10))


class VAETask(common.TrainTask):
    """Reconstruction of ``batch["hq"]`` ``(B, 3, S, S)`` through the quantised pyramid."""

    name = "vae"

    def __init__(self, vae: BSQVAE, schedule, *, l1_weight: float = 1.0, mse_weight: float = 1.0,
                 commit_weight: float = 0.25):
        super().__init__()
        self.vae = vae
        self.schedule = [tuple(s) for s in schedule]
        self.weights = (l1_weight, mse_weight, commit_weight)

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        x = batch["hq"]
        z, commit = quantize_pyramid_ste(self.vae.encoder(x), self.schedule)
        rec = self.vae.decoder(z).float()
        l1, mse = (rec - x).abs().mean(), (rec - x).pow(2).mean()
        w_l1, w_mse, w_commit = self.weights
        return {"loss": w_l1 * l1 + w_mse * mse + w_commit * commit, "l1": l1, "mse": mse, "commit": commit,
                "psnr": psnr(mse.detach())}

    def trainable_state(self) -> StateDict:
        return {k: v.detach().cpu() for k, v in self.vae.state_dict().items()}

    def load_trainable_state(self, sd: StateDict) -> None:
        self.vae.load_state_dict(sd)

    def save_model(self, out_dir: Path) -> list[Path]:
        path = out_dir / MODEL_FILE
        save_file(official_state_dict(self.vae), path)
        return [path]


def run(args) -> int:
    """``train vae`` (arguments: :mod:`.cli`)."""

    def build() -> VAETask:
        config = vae_config(base_ch=args.base_ch, ch_mult=tuple(args.ch_mult), codebook_dim=args.codebook_dim,
                            num_res_blocks=args.num_res_blocks, mid_attention=args.mid_attention)
        schedule = common.crop_schedule(args.size)
        torch.manual_seed(args.seed)
        vae = BSQVAE(config=config)
        n = sum(p.numel() for p in vae.parameters())
        log.info("VAE: %.2fM parameters (%.1f MB in float32), %d-bit tokens, %d scales up to %dx%d",
                 n / 1e6, n * 4 / 2**20, config.codebook_dim, len(schedule), *schedule[-1][1:])
        return VAETask(vae, schedule, l1_weight=args.l1_weight, mse_weight=args.mse_weight,
                       commit_weight=args.commit_weight)

    return common.run_stage(args, build, what="VAE", model_file=MODEL_FILE)
