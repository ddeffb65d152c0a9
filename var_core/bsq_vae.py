"""Infinity's BSQ multi-scale VAE, key-compatible with ``infinity_vae_d32reg.pth`` (d16/d24/d64 too).

Paper: Han et al., "Infinity: Scaling Bitwise AutoRegressive Modeling for High-Resolution Image
Synthesis" (CVPR 2025), as used by VARestorer (ICLR 2026). The format follows
``infinity/models/bsq_vae/flux_vqgan.py`` of EternalEvan/VARestorer: a Flux-style convolutional
encoder/decoder whose convolutions and norms sit one level down (``*.conv.weight``,
``*.norm.weight``), and a parameter-free multi-scale BSQ quantiser (:mod:`.bsq_quant`).

Every size is read from the state dict (:meth:`BSQVAEConfig.from_state_dict`). An image (or
latent) that runs out of memory as a whole is encoded (decoded) in overlapping tiles of its latent
grid, blended, and the tiles halved while memory still runs out, as ComfyUI's own VAE nodes do; the
GroupNorm statistics then come from each tile, so the tiled result is close to, not equal to, the
whole-image one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from . import bsq_quant
from .checkpoint import StateDict
from .detect import count_indexed
from .errors import CheckpointError, ImageInputError
from .schedules import validate_schedule
from .tiling import run_tiled_with_retry

log = logging.getLogger(__name__)

# Tiles (latent cells) after the whole image ran out of memory: 32 cells = 512 px, ComfyUI's VAE
# tile; a quarter overlaps. Halved on further out-of-memory errors down to 8 cells (128 px).
OOM_TILE, OOM_OVERLAP, OOM_MIN_TILE = 32, 8, 8

# Keys of the official file that hold no weights: the quantiser's bit-order buffer, saved under
# both attribute names the official class has. Checked (MSB-first) and not loaded.
_BIT_ORDER_KEYS = ("quantizer.lfq.mask", "quantize.lfq.mask")


@dataclass(frozen=True, kw_only=True)
class BSQVAEConfig:
    """Architecture of an Infinity BSQ VAE, derived from its weights."""

    in_channels: int
    base_ch: int
    encoder_ch_mult: tuple[int, ...]
    decoder_ch_mult: tuple[int, ...]
    num_res_blocks: int
    codebook_dim: int
    encoder_downsample: tuple[bool, ...]
    decoder_upsample: tuple[bool, ...]
    mid_attention: bool

    @property
    def patch_size(self) -> int:
        """Pixels per latent cell (16 for every official VAE)."""
        return 2 ** sum(self.encoder_downsample)

    @classmethod
    def from_state_dict(cls, sd: StateDict) -> "BSQVAEConfig":
        try:
            base_ch, in_ch = sd["encoder.conv_in.conv.weight"].shape[:2]
            n_enc = count_indexed(sd, "encoder.down.")
            n_dec = count_indexed(sd, "decoder.up.")
            n_res = count_indexed(sd, "encoder.down.0.block.")
            enc_mult = tuple(sd[f"encoder.down.{i}.block.0.conv1.conv.weight"].shape[0] // base_ch for i in range(n_enc))
            dec_mult = tuple(sd[f"decoder.up.{i}.block.0.conv1.conv.weight"].shape[0] // base_ch for i in range(n_dec))
            z_out = sd["encoder.conv_out.conv.weight"].shape[0]
            z_in = sd["decoder.conv_in.conv.weight"].shape[1]
        except KeyError as e:
            raise CheckpointError(f"Infinity BSQ VAE weights are missing {e.args[0]!r}; the file is incomplete") from None
        if z_out != z_in:
            raise CheckpointError(
                f"encoder outputs {z_out} channels but the decoder takes {z_in}: this is a KL VAE "
                "(use_vae=True), which VARestorer does not use; give the BSQ VAE (infinity_vae_d*.pth)"
            )
        for key in _BIT_ORDER_KEYS:
            if key in sd and sd[key].numel() != z_out:
                raise CheckpointError(f"{key} has {sd[key].numel()} bits but the latent has {z_out} channels")
        return cls(
            in_channels=int(in_ch),
            base_ch=int(base_ch),
            encoder_ch_mult=enc_mult,
            decoder_ch_mult=dec_mult,
            num_res_blocks=n_res,
            codebook_dim=int(z_out),
            encoder_downsample=tuple(f"encoder.down.{i}.downsample.conv.conv.weight" in sd for i in range(n_enc)),
            decoder_upsample=tuple(f"decoder.up.{i}.upsample.conv.conv.weight" in sd for i in range(n_dec)),
            mid_attention="encoder.mid.attn_1.q.conv.weight" in sd,
        )


def _groups(channels: int) -> int:
    # Not stored in the weights: the official Normalize uses 32 groups when the channel count
    # allows it, else 24 (base_ch 128 models only ever hit the first case).
    if channels % 32 == 0:
        return 32
    if channels % 24 == 0:
        return 24
    raise CheckpointError(f"a VAE layer has {channels} channels, which is not a multiple of 32 or 24")


class _Conv(nn.Module):
    """A 2-D convolution one module level down, as the official ``Conv`` wrapper stores it."""

    def __init__(self, cin: int, cout: int, k: int, *, stride: int = 1, padding: int = 0, ops=nn):
        super().__init__()
        self.conv = ops.Conv2d(cin, cout, k, stride=stride, padding=padding)

    def forward(self, x):
        return self.conv(x)


class _Norm(nn.Module):
    def __init__(self, channels: int, *, ops=nn):
        super().__init__()
        self.norm = ops.GroupNorm(_groups(channels), channels, eps=1e-6, affine=True)

    def forward(self, x):
        return self.norm(x)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int, *, ops=nn):
        super().__init__()
        self.norm1 = _Norm(cin, ops=ops)
        self.conv1 = _Conv(cin, cout, 3, padding=1, ops=ops)
        self.norm2 = _Norm(cout, ops=ops)
        self.conv2 = _Conv(cout, cout, 3, padding=1, ops=ops)
        if cin != cout:
            self.nin_shortcut = _Conv(cin, cout, 1, ops=ops)

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention (only in VAEs trained with ``cnn_attention``)."""

    def __init__(self, channels: int, *, ops=nn):
        super().__init__()
        self.norm = _Norm(channels, ops=ops)
        self.q = _Conv(channels, channels, 1, ops=ops)
        self.k = _Conv(channels, channels, 1, ops=ops)
        self.v = _Conv(channels, channels, 1, ops=ops)
        self.proj_out = _Conv(channels, channels, 1, ops=ops)

    def forward(self, x):
        h = self.norm(x)
        _, _, hh, ww = x.shape
        q, k, v = (rearrange(m(h), "b c h w -> b 1 (h w) c") for m in (self.q, self.k, self.v))
        a = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj_out(rearrange(a, "b 1 (h w) c -> b c h w", h=hh, w=ww))


class _Downsample(nn.Module):
    def __init__(self, channels: int, *, ops=nn):
        super().__init__()
        self.conv = _Conv(channels, channels, 3, stride=2, ops=ops)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric padding, right and bottom


class _Upsample(nn.Module):
    def __init__(self, channels: int, *, ops=nn):
        super().__init__()
        self.conv = _Conv(channels, channels, 3, padding=1, ops=ops)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


def _mid(channels: int, attention: bool, ops) -> nn.Module:
    mid = nn.Module()
    mid.block_1 = ResnetBlock(channels, channels, ops=ops)
    if attention:
        mid.attn_1 = AttnBlock(channels, ops=ops)
    mid.block_2 = ResnetBlock(channels, channels, ops=ops)
    return mid


def _run_mid(mid: nn.Module, h):
    h = mid.block_1(h)
    if hasattr(mid, "attn_1"):
        h = mid.attn_1(h)
    return mid.block_2(h)


class Encoder(nn.Module):
    def __init__(self, cfg: BSQVAEConfig, *, ops=nn):
        super().__init__()
        ch = cfg.base_ch
        self.conv_in = _Conv(cfg.in_channels, ch, 3, padding=1, ops=ops)
        self.down = nn.ModuleList()
        cin = ch
        for mult, has_down in zip(cfg.encoder_ch_mult, cfg.encoder_downsample):
            level = nn.Module()
            level.block = nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                level.block.append(ResnetBlock(cin, ch * mult, ops=ops))
                cin = ch * mult
            if has_down:
                level.downsample = _Downsample(cin, ops=ops)
            self.down.append(level)
        self.mid = _mid(cin, cfg.mid_attention, ops)
        self.norm_out = _Norm(cin, ops=ops)
        self.conv_out = _Conv(cin, cfg.codebook_dim, 3, padding=1, ops=ops)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = block(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = _run_mid(self.mid, h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: BSQVAEConfig, *, ops=nn):
        super().__init__()
        ch = cfg.base_ch
        cin = ch * cfg.decoder_ch_mult[-1]
        self.conv_in = _Conv(cfg.codebook_dim, cin, 3, padding=1, ops=ops)
        self.mid = _mid(cin, cfg.mid_attention, ops)
        levels = []
        for i in reversed(range(len(cfg.decoder_ch_mult))):
            level = nn.Module()
            level.block = nn.ModuleList()
            for _ in range(cfg.num_res_blocks + 1):
                level.block.append(ResnetBlock(cin, ch * cfg.decoder_ch_mult[i], ops=ops))
                cin = ch * cfg.decoder_ch_mult[i]
            if cfg.decoder_upsample[i]:
                level.upsample = _Upsample(cin, ops=ops)
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)
        self.norm_out = _Norm(cin, ops=ops)
        self.conv_out = _Conv(cin, cfg.in_channels, 3, padding=1, ops=ops)

    def forward(self, z):
        h = _run_mid(self.mid, self.conv_in(z))
        for level in reversed(self.up):
            for block in level.block:
                h = block(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class BSQVAE(nn.Module):
    """Encoder + decoder + multi-scale BSQ. Images are ``(B, 3, H, W)`` in ``[-1, 1]``."""

    def __init__(self, *, config: BSQVAEConfig, operations=None):
        super().__init__()
        ops = operations if operations is not None else nn
        self.config = config
        self.encoder = Encoder(config, ops=ops)
        self.decoder = Decoder(config, ops=ops)

    @property
    def codebook_dim(self) -> int:
        return self.config.codebook_dim

    def check_image(self, x_B3HW: torch.Tensor) -> None:
        p = self.config.patch_size
        if x_B3HW.ndim != 4 or x_B3HW.shape[1] != self.config.in_channels:
            raise ImageInputError(
                f"the VAE takes (B, {self.config.in_channels}, H, W) images, got shape {tuple(x_B3HW.shape)}"
            )
        h, w = x_B3HW.shape[-2:]
        if h < p or w < p or h % p or w % p:
            raise ImageInputError(
                f"image is {h}x{w} pixels; the VAE needs both sides to be multiples of {p} "
                f"(at least one {p}x{p} latent patch). Resize or pad the image first."
            )

    def encode_latent(self, x_B3HW: torch.Tensor) -> torch.Tensor:
        """Raw encoder features ``(B, d, H/16, W/16)`` in float32 (``encode_for_raw_features``).

        The image is cast to the encoder's weight dtype, and any autocast around the call is
        switched off: the bits are the signs of these features, and lower precision than the
        VAE's own flips some of them (bf16 flips 1-2.5% of the finest scale's bits)."""
        self.check_image(x_B3HW)
        dtype = next(self.encoder.parameters()).dtype
        with torch.autocast(x_B3HW.device.type, enabled=False):
            return _whole_or_tiled(lambda x: self.encoder(x.to(dtype)).float(), x_B3HW, "encode",
                                   in_scale=self.config.patch_size, out_scale=1)

    def encode(self, x_B3HW: torch.Tensor, schedule, *, intermediates: bool = False) -> bsq_quant.PyramidEncoding:
        """Image -> per-scale bits over ``schedule`` (whose last scale must be the latent grid)."""
        f = self.encode_latent(x_B3HW)
        schedule = validate_schedule(schedule, latent_hw=f.shape[-2:])
        return bsq_quant.encode_pyramid(f, schedule, intermediates=intermediates)

    def decode(self, z_BdHW: torch.Tensor) -> torch.Tensor:
        """Latent ``(B, d, H, W)`` (or ``(B, d, 1, H, W)``) -> image in ``[-1, 1]``."""
        if z_BdHW.ndim == 5:
            z_BdHW = z_BdHW.squeeze(2)
        dtype = next(self.decoder.parameters()).dtype
        with torch.autocast(z_BdHW.device.type, enabled=False):  # the VAE's own precision, as in encode
            x = _whole_or_tiled(lambda z: self.decoder(z.to(dtype)), z_BdHW, "decode",
                                in_scale=1, out_scale=self.config.patch_size)
        return x.to(dtype).clamp(-1, 1)

    def decode_bits(self, bits: list[torch.Tensor], schedule) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-scale bits -> ``(summed_codes (B, d, 1, H, W), image (B, 3, 16H, 16W))``."""
        schedule = validate_schedule(schedule)
        if len(bits) != len(schedule):
            raise ImageInputError(f"got bits for {len(bits)} scales but the schedule has {len(schedule)}")
        codes = bsq_quant.summed_codes(bits, schedule)
        return codes, self.decode(codes)


def _whole_or_tiled(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, what: str, *,
                    in_scale: int, out_scale: int) -> torch.Tensor:
    """``fn(x)``; after an out-of-memory error, ``fn`` over latent-grid tiles (see the module docstring)."""
    try:
        return fn(x)
    except torch.OutOfMemoryError:
        pass  # leave the except block first, so the failed attempt's tensors are freed
    h, w = x.shape[-2] // in_scale, x.shape[-1] // in_scale
    log.warning("out of memory to %s a %dx%d latent whole; retrying in tiles of %d latent cells",
                what, h, w, OOM_TILE)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return run_tiled_with_retry(fn, x, tile=OOM_TILE, overlap=OOM_OVERLAP, min_tile=OOM_MIN_TILE,
                                in_scale=in_scale, out_scale=out_scale)


def build(sd: StateDict, *, operations=None) -> tuple[BSQVAEConfig, BSQVAE]:
    """Build and strictly load a :class:`BSQVAE` from an (unwrapped) state dict."""
    from .loading import load_strict

    config = BSQVAEConfig.from_state_dict(sd)
    with torch.device("meta"):
        model = BSQVAE(config=config, operations=operations)
    weights = {k: v for k, v in sd.items() if k not in _BIT_ORDER_KEYS}
    for key in _BIT_ORDER_KEYS:
        if key in sd:
            expected = 2 ** torch.arange(config.codebook_dim - 1, -1, -1)
            if not torch.equal(sd[key].long().cpu(), expected):
                raise CheckpointError(f"{key} is not the MSB-first bit order this VAE format uses")
    load_strict(model, weights, what="Infinity BSQ VAE")
    return config, model.eval().requires_grad_(False)

