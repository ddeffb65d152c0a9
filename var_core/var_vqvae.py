"""VAR's multi-scale VQVAE, key-compatible with ``vae_ch160v4096z32.pth`` (and the VARSR / RestoreVAR VQVAEs).

Paper: Tian et al., "Visual Autoregressive Modeling: Scalable Image Generation via Next-Scale
Prediction" (NeurIPS 2024). The format follows ``models/vqvae.py``, ``models/basic_vae.py`` and
``models/quant.py`` of FoundationVision/VAR: a VQGAN-style convolutional encoder/decoder (the
``vq-f16`` layout of latent-diffusion, with spatial self-attention at the lowest resolution and in
the middle), ``quant_conv``/``post_quant_conv``, and a residual multi-scale vector quantiser.

Residual quantisation over ``patch_nums`` ``(p_1 < ... < p_K = h)`` of an ``h x w`` latent ``f``:
for scale ``k`` the residual ``f - f_hat`` is ``area``-resized to ``p_k x p_k`` (the last scale is
not resized), each cell takes its nearest codebook entry, the codes are ``bicubic``-upsampled back
to ``h x w``, passed through one of the ``quant_resi`` convolutions ``phi`` and added to ``f_hat``.
The transformer's input for scale ``k+1`` is ``f_hat`` (after scale ``k``) ``area``-resized to
``p_{k+1}``. ``patch_nums`` are runtime parameters; nothing here fixes the number of scales.

Every size is read from the state dict (:meth:`VQVAEConfig.from_state_dict`). Shapes: ``B``
batch, ``Cv`` codebook (latent) channels, ``V`` vocabulary, ``h x w`` latent grid, ``l`` tokens of
one scale (``p*p``), ``L`` tokens of several scales.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .attention import attention
from .checkpoint import StateDict
from .detect import count_indexed
from .errors import CheckpointError, ImageInputError, ParameterError

# The 256x256 schedule of the released VAR models (10 scales, 16x16 latent).
DEFAULT_PATCH_NUMS = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
# ``phi(h) = (1 - r) * h + r * conv(h)``: the official ``quant_resi`` default (VQVAE and every
# released model use 0.5); it is a constructor constant, not stored in the weights.
QUANT_RESI = 0.5
# Official ``Normalize``: GroupNorm with 32 groups and eps 1e-6 everywhere.
_GROUPS = 32
_GN_EPS = 1e-6
# Training statistics (per-scale codebook hit counts), not weights: dropped on load.
_NON_WEIGHT_KEYS = ("quantize.ema_vocab_hit_SV",)

PatchNums = Sequence[int | tuple[int, int]]


def patch_hws(patch_nums: PatchNums) -> list[tuple[int, int]]:
    """``patch_nums`` (ints for square scales, or ``(h, w)`` pairs) as ``(h, w)`` pairs."""
    out = []
    for pn in patch_nums:
        h, w = (pn, pn) if isinstance(pn, int) else (int(pn[0]), int(pn[1]))
        if h < 1 or w < 1:
            raise ParameterError(f"patch_nums must be positive, got {list(patch_nums)}")
        out.append((h, w))
    if len(out) < 2:
        # The official scale ratio si / (K - 1) that selects phi is undefined for one scale.
        raise ParameterError(f"patch_nums needs at least 2 scales, got {list(patch_nums)}")
    return out


@dataclass(frozen=True, kw_only=True)
class VQVAEConfig:
    """Architecture of a VAR VQVAE, derived from its weights."""

    vocab_size: int  # V, codebook rows
    z_channels: int  # Cvae, codebook / latent channels
    in_channels: int
    base_ch: int  # ``ch``
    ch_mult: tuple[int, ...]
    num_res_blocks: int  # encoder blocks per level (the decoder has one more)
    encoder_attn: tuple[bool, ...]  # per encoder level: an AttnBlock after each ResnetBlock
    decoder_attn: tuple[bool, ...]  # per decoder level (index = ``decoder.up.{i}``)
    mid_attn: bool
    quant_conv_ks: int
    # quant_resi layout: "partial" (``qresi_ls.{k}``, ``share_quant_resi`` = K > 1, the released
    # models use 4), "shared" (one ``qresi``), "non_shared" (``quant_resi.{k}``, one per training
    # scale) or "identity" (quant_resi = 0: no phi convolutions at all).
    phi_layout: str
    num_phi: int

    @property
    def downsample(self) -> int:
        """Pixels per latent cell (16 for every released VQVAE)."""
        return 2 ** (len(self.ch_mult) - 1)

    @classmethod
    def from_state_dict(cls, sd: StateDict) -> "VQVAEConfig":
        try:
            base_ch, in_ch = sd["encoder.conv_in.weight"].shape[:2]
            vocab, cv = sd["quantize.embedding.weight"].shape
            n_levels = count_indexed(sd, "encoder.down.")
            n_res = count_indexed(sd, "encoder.down.0.block.")
            ch_mult = tuple(int(sd[f"encoder.down.{i}.block.0.conv1.weight"].shape[0]) // int(base_ch)
                            for i in range(n_levels))
            quant_ks = sd["quant_conv.weight"].shape[-1]
            z_enc = sd["encoder.conv_out.weight"].shape[0]
            z_dec = sd["decoder.conv_in.weight"].shape[1]
        except KeyError as e:
            raise CheckpointError(f"VAR VQVAE weights are missing {e.args[0]!r}; the file is incomplete") from None
        if n_levels == 0 or n_res == 0:
            raise CheckpointError("VAR VQVAE weights hold no encoder levels (encoder.down.{i}.block.{j})")
        if not (z_enc == z_dec == cv):
            raise CheckpointError(
                f"encoder outputs {z_enc} channels, the decoder takes {z_dec} and the codebook has {cv}: "
                "not a VAR VQVAE (a KL VAE with double_z?)")
        n_dec = count_indexed(sd, "decoder.up.")
        if n_dec != n_levels or count_indexed(sd, "decoder.up.0.block.") != n_res + 1:
            raise CheckpointError(
                f"decoder has {n_dec} levels of {count_indexed(sd, 'decoder.up.0.block.')} blocks; the encoder's "
                f"{n_levels} levels of {n_res} blocks need {n_levels} of {n_res + 1}")
        q = "quantize.quant_resi."
        if f"{q}qresi_ls.0.weight" in sd:
            layout, n_phi = "partial", count_indexed(sd, f"{q}qresi_ls.")
        elif f"{q}qresi.weight" in sd:
            layout, n_phi = "shared", 1
        elif f"{q}0.weight" in sd:
            layout, n_phi = "non_shared", count_indexed(sd, q)
        else:
            layout, n_phi = "identity", 0
        return cls(
            vocab_size=int(vocab), z_channels=int(cv), in_channels=int(in_ch), base_ch=int(base_ch),
            ch_mult=ch_mult, num_res_blocks=n_res,
            encoder_attn=tuple(f"encoder.down.{i}.attn.0.qkv.weight" in sd for i in range(n_levels)),
            decoder_attn=tuple(f"decoder.up.{i}.attn.0.qkv.weight" in sd for i in range(n_levels)),
            mid_attn="encoder.mid.attn_1.qkv.weight" in sd, quant_conv_ks=int(quant_ks),
            phi_layout=layout, num_phi=n_phi,
        )


def embedding(rows: int, channels: int, ops) -> nn.Module:
    """``ops.Embedding`` without its random init (on the meta device, torch's ``normal_`` imports
    torch._dynamo, ~3 s; the weights are loaded anyway)."""
    emb = ops.Embedding(rows, channels, _weight=torch.empty(rows, channels))
    if not hasattr(emb, "bias"):  # casting layers (comfy.ops) read ``bias``; their reset_parameters sets it,
        emb.bias = None  # but torch skips reset_parameters when given _weight
    return emb


def _norm(channels: int, ops) -> nn.Module:
    if channels % _GROUPS:
        raise CheckpointError(f"a VQVAE layer has {channels} channels, not a multiple of the {_GROUPS} GroupNorm groups")
    return ops.GroupNorm(_GROUPS, channels, eps=_GN_EPS, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int, *, ops=nn):
        super().__init__()
        self.norm1 = _norm(cin, ops)
        self.conv1 = ops.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = _norm(cout, ops)
        self.conv2 = ops.Conv2d(cout, cout, 3, padding=1)
        if cin != cout:
            self.nin_shortcut = ops.Conv2d(cin, cout, 1)

    def forward(self, x_BChw):
        h = self.conv1(F.silu(self.norm1(x_BChw)))
        h = self.conv2(F.silu(self.norm2(h)))
        if hasattr(self, "nin_shortcut"):
            x_BChw = self.nin_shortcut(x_BChw)
        return x_BChw + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with a fused ``qkv`` 1x1 convolution."""

    def __init__(self, channels: int, *, ops=nn):
        super().__init__()
        self.norm = _norm(channels, ops)
        self.qkv = ops.Conv2d(channels, 3 * channels, 1)
        self.proj_out = ops.Conv2d(channels, channels, 1)

    def forward(self, x_BChw):
        _, _, hh, ww = x_BChw.shape
        q, k, v = rearrange(self.qkv(self.norm(x_BChw)), "B (three C) h w -> three B 1 (h w) C", three=3).unbind(0)
        out_B1lC = attention(q.contiguous(), k.contiguous(), v.contiguous())  # scale C^-1/2, as official
        return x_BChw + self.proj_out(rearrange(out_B1lC, "B 1 (h w) C -> B C h w", h=hh, w=ww))


class Downsample(nn.Module):
    def __init__(self, channels: int, *, ops=nn):
        super().__init__()
        self.conv = ops.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric padding, right and bottom


class Upsample(nn.Module):
    def __init__(self, channels: int, *, ops=nn):
        super().__init__()
        self.conv = ops.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


def _mid(channels: int, attn: bool, ops) -> nn.Module:
    mid = nn.Module()
    mid.block_1 = ResnetBlock(channels, channels, ops=ops)
    if attn:
        mid.attn_1 = AttnBlock(channels, ops=ops)
    mid.block_2 = ResnetBlock(channels, channels, ops=ops)
    return mid


def _run_mid(mid: nn.Module, h):
    h = mid.block_1(h)
    if hasattr(mid, "attn_1"):
        h = mid.attn_1(h)
    return mid.block_2(h)


def _run_level(level: nn.Module, h):
    attn = getattr(level, "attn", None)
    for i, block in enumerate(level.block):
        h = block(h)
        if attn is not None:
            h = attn[i](h)
    return h


class Encoder(nn.Module):
    def __init__(self, cfg: VQVAEConfig, *, ops=nn):
        super().__init__()
        ch, n = cfg.base_ch, len(cfg.ch_mult)
        self.conv_in = ops.Conv2d(cfg.in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        cin = ch
        for i, mult in enumerate(cfg.ch_mult):
            level = nn.Module()
            level.block = nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                level.block.append(ResnetBlock(cin, ch * mult, ops=ops))
                cin = ch * mult
            if cfg.encoder_attn[i]:
                level.attn = nn.ModuleList(AttnBlock(cin, ops=ops) for _ in range(cfg.num_res_blocks))
            if i != n - 1:
                level.downsample = Downsample(cin, ops=ops)
            self.down.append(level)
        self.mid = _mid(cin, cfg.mid_attn, ops)
        self.norm_out = _norm(cin, ops)
        self.conv_out = ops.Conv2d(cin, cfg.z_channels, 3, padding=1)

    def forward(self, x_B3HW, *, features: list | None = None):
        """``(B, 3, H, W)`` -> ``(B, Cv, H/16, W/16)``; ``features`` collects each level's output
        (before its downsampling), then the middle block's."""
        h = self.conv_in(x_B3HW)
        for level in self.down:
            h = _run_level(level, h)
            if features is not None:
                features.append(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = _run_mid(self.mid, h)
        if features is not None:
            features.append(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: VQVAEConfig, *, ops=nn):
        super().__init__()
        ch = cfg.base_ch
        cin = ch * cfg.ch_mult[-1]
        self.conv_in = ops.Conv2d(cfg.z_channels, cin, 3, padding=1)
        self.mid = _mid(cin, cfg.mid_attn, ops)
        levels = []
        for i in reversed(range(len(cfg.ch_mult))):
            level = nn.Module()
            level.block = nn.ModuleList()
            for _ in range(cfg.num_res_blocks + 1):
                level.block.append(ResnetBlock(cin, ch * cfg.ch_mult[i], ops=ops))
                cin = ch * cfg.ch_mult[i]
            if cfg.decoder_attn[i]:
                level.attn = nn.ModuleList(AttnBlock(cin, ops=ops) for _ in range(cfg.num_res_blocks + 1))
            if i != 0:
                level.upsample = Upsample(cin, ops=ops)
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(cin, ops)
        self.conv_out = ops.Conv2d(cin, cfg.in_channels, 3, padding=1)

    def forward(self, z_BChw):
        h = _run_mid(self.mid, self.conv_in(z_BChw))
        for level in reversed(self.up):
            h = _run_level(level, h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


def _linspace(start: float, stop: float, num: int) -> list[float]:
    # numpy.linspace's float64 arithmetic (i * step + start, last = stop) so that ties between two
    # ticks resolve exactly as in the official PhiPartiallyShared (np.argmin: first minimum).
    if num == 1:
        return [start]
    step = (stop - start) / (num - 1)
    return [i * step + start for i in range(num - 1)] + [stop]


class PhiSet(nn.Module):
    """The ``quant_resi`` convolutions and the official selection of one per scale.

    ``phi(h) = (1 - r) h + r conv3x3(h)`` with ``r = quant_resi`` (0.5). Scale ``k`` of ``K`` uses the
    convolution whose tick is nearest to ``k / (K - 1)``; the ``n`` ticks are evenly spaced in
    ``[1/(3n), 1 - 1/(3n)]`` when ``n == 4`` and ``[1/(2n), 1 - 1/(2n)]`` otherwise.
    """

    def __init__(self, layout: str, count: int, channels: int, *, ops=nn):
        super().__init__()
        self.layout = layout
        conv = lambda: ops.Conv2d(channels, channels, 3, padding=1)  # noqa: E731
        if layout == "partial":
            self.qresi_ls = nn.ModuleList(conv() for _ in range(count))
        elif layout == "shared":
            self.qresi = conv()
        elif layout == "non_shared":
            for k in range(count):
                self.add_module(str(k), conv())
        elif layout != "identity":
            raise ValueError(f"unknown quant_resi layout {layout!r}")
        self.count = count
        third = count == 4
        lo = 1 / 3 / count if third else 1 / 2 / count if count else 0.0
        self.ticks = _linspace(lo, 1 - lo, count) if count else []

    def convs(self) -> list[nn.Module]:
        if self.layout == "partial":
            return list(self.qresi_ls)
        if self.layout == "shared":
            return [self.qresi]
        if self.layout == "non_shared":
            return [getattr(self, str(k)) for k in range(self.count)]
        return []

    def index(self, ratio: float) -> int | None:
        """Which convolution scale ratio ``k / (K - 1)`` uses (None: identity)."""
        if self.layout == "identity":
            return None
        if self.layout == "shared":
            return 0
        dist = [abs(t - ratio) for t in self.ticks]
        return dist.index(min(dist))

    def apply(self, h_BChw: torch.Tensor, ratio: float, resi: float) -> torch.Tensor:
        k = self.index(ratio)
        if k is None or abs(resi) <= 1e-6:  # the official quant_resi ~ 0 means nn.Identity
            return h_BChw
        conv = self.convs()[k]
        r = abs(resi)
        return h_BChw.mul(1 - r) + conv(h_BChw.to(conv.weight.dtype)).float().mul_(r)


@dataclass
class QuantPyramid:
    """Result of :meth:`VQVAE.quantize`: per-scale indices ``idx[k]`` ``(B, l_k)`` int64,
    ``fhat[k]`` ``(B, Cv, h, w)`` the accumulated latent after scale ``k`` (empty unless asked for),
    and ``rest_last_BlC`` ``(B, h*w, Cv)``: the residual that the last scale quantises (VARSR's
    continuous ``last_layer_gt``)."""

    idx: list[torch.Tensor]
    fhat: list[torch.Tensor]
    rest_last_BlC: torch.Tensor

    @property
    def f_hat(self) -> torch.Tensor:
        return self.fhat[-1]


class VQVAE(nn.Module):
    """Encoder + decoder + residual multi-scale VQ. Images are ``(B, 3, H, W)`` in ``[-1, 1]``.

    Runtime switches (attributes, not weights): ``quant_resi`` (the phi mixing ratio, 0.5) and
    ``using_znorm`` (cosine instead of Euclidean nearest neighbour; False in every released model).
    The quantiser's ``last_scale_phi`` argument is VARSR's variant: its quantiser adds the last
    scale's codes without phi.
    """

    def __init__(self, *, config: VQVAEConfig, operations=None):
        super().__init__()
        ops = operations if operations is not None else nn
        self.config = config
        self.quant_resi = QUANT_RESI
        self.using_znorm = False
        self.encoder = Encoder(config, ops=ops)
        self.decoder = Decoder(config, ops=ops)
        ks = config.quant_conv_ks
        self.quant_conv = ops.Conv2d(config.z_channels, config.z_channels, ks, padding=ks // 2)
        self.post_quant_conv = ops.Conv2d(config.z_channels, config.z_channels, ks, padding=ks // 2)
        self.quantize = nn.Module()
        self.quantize.embedding = embedding(config.vocab_size, config.z_channels, ops)
        self.quantize.quant_resi = PhiSet(config.phi_layout, config.num_phi, config.z_channels, ops=ops)

    # ----------------------------------------------------------------- helpers
    @property
    def codebook_VC(self) -> torch.Tensor:
        return self.quantize.embedding.weight

    def embed(self, idx_Bl: torch.Tensor) -> torch.Tensor:
        """Codebook vectors ``(B, l, Cv)`` float32 of indices ``(B, l)``."""
        return F.embedding(idx_Bl.to(self.codebook_VC.device), self.codebook_VC).float()

    def phi(self, h_BChw: torch.Tensor, si: int, num_scales: int) -> torch.Tensor:
        """``quant_resi`` of scale ``si`` of ``num_scales`` (selected by the ratio ``si / (K-1)``)."""
        return self.quantize.quant_resi.apply(h_BChw, si / (num_scales - 1), self.quant_resi)

    def check_image(self, x_B3HW: torch.Tensor) -> None:
        p = self.config.downsample
        if x_B3HW.ndim != 4 or x_B3HW.shape[1] != self.config.in_channels:
            raise ImageInputError(
                f"the VQVAE takes (B, {self.config.in_channels}, H, W) images, got shape {tuple(x_B3HW.shape)}")
        h, w = x_B3HW.shape[-2:]
        if h < p or w < p or h % p or w % p:
            raise ImageInputError(f"image is {h}x{w} pixels; the VQVAE needs both sides to be multiples of {p}. "
                                  "Resize or pad the image first.")

    def _nearest(self, z_NC: torch.Tensor) -> torch.Tensor:
        E_VC = self.codebook_VC.float()
        if self.using_znorm:
            return torch.argmax(F.normalize(z_NC, dim=-1) @ F.normalize(E_VC.T, dim=0), dim=1)
        # ||z||^2 + ||e||^2 - 2 z.e, with the official operation order (addmm) so near-ties resolve alike
        d_NV = torch.sum(z_NC.square(), dim=1, keepdim=True) + torch.sum(E_VC.square(), dim=1, keepdim=False)
        d_NV.addmm_(z_NC, E_VC.T, alpha=-2, beta=1)
        return torch.argmin(d_NV, dim=1)

    # ----------------------------------------------------------------- image <-> latent
    def encode(self, x_B3HW: torch.Tensor) -> torch.Tensor:
        """Continuous latent ``f = quant_conv(encoder(x))`` ``(B, Cv, H/16, W/16)`` float32."""
        self.check_image(x_B3HW)
        dtype = self.quant_conv.weight.dtype
        return self.quant_conv(self.encoder(x_B3HW.to(dtype))).float()

    def encoder_features(self, x_B3HW: torch.Tensor) -> list[torch.Tensor]:
        """Hidden states of the encoder: each level's output before its downsampling, the middle
        block's output, then the encoder output (before ``quant_conv``): ``len(ch_mult) + 2`` maps."""
        self.check_image(x_B3HW)
        feats: list[torch.Tensor] = []
        z = self.encoder(x_B3HW.to(self.quant_conv.weight.dtype), features=feats)
        return feats + [z]

    def img_to_fs(self, x_B3HW: torch.Tensor, size: int | tuple[int, int] | None = None,
                  levels: Sequence[int] = (1, 3, 5, -1)) -> list[torch.Tensor]:
        """RestoreVAR's continuous image features: :meth:`encoder_features` ``levels`` (level 1,
        level 3, the middle block, the encoder output for the 5-level VQVAE), each ``bicubic``-resized
        to ``size`` (default: the latent grid; RestoreVAR uses its last scale ``p_K``) and flattened
        to tokens ``(B, h*w, C_level)``. Checked against the RestoreVAR fixture (``cond_fs_{0..3}``).

        A level's feature is its output after **all** of its ResnetBlocks (and attention), before
        its downsampling, whatever ``num_res_blocks`` is: the official ``Encoder.forward(return_lvls=True)``
        of RestoreVAR's ``models/basic_vae.py`` appends once per level, after the block loop. RestoreVAR
        uses only the last entry (``levels=(-1,)``), for which the encoder runs without keeping the others."""
        if all(i == -1 for i in levels):
            self.check_image(x_B3HW)
            feats = [self.encoder(x_B3HW.to(self.quant_conv.weight.dtype))]
        else:
            feats = self.encoder_features(x_B3HW)
        hw = tuple(feats[-1].shape[-2:]) if size is None else ((size, size) if isinstance(size, int) else tuple(size))
        out = []
        for i in levels:
            t = feats[i].float()
            if tuple(t.shape[-2:]) != hw:
                t = F.interpolate(t, size=hw, mode="bicubic")
            out.append(rearrange(t, "B C h w -> B (h w) C"))
        return out

    def fhat_to_img(self, f_hat_BChw: torch.Tensor) -> torch.Tensor:
        """Latent ``f_hat`` -> image in ``[-1, 1]`` (``decoder(post_quant_conv(f_hat))``, clamped)."""
        dtype = self.post_quant_conv.weight.dtype
        return self.decoder(self.post_quant_conv(f_hat_BChw.to(dtype))).float().clamp(-1, 1)

    # ----------------------------------------------------------------- quantiser
    def quantize_latent(self, f_BChw: torch.Tensor, patch_nums: PatchNums, *, keep_fhat: bool = False,
                        last_scale_phi: bool = True) -> QuantPyramid:
        """Residual multi-scale quantisation of ``f`` (``f_to_idxBl_or_fhat``); see :class:`QuantPyramid`."""
        hws = patch_hws(patch_nums)
        B, C, H, W = f_BChw.shape
        if hws[-1] != (H, W):
            raise ParameterError(f"the last scale {hws[-1]} must be the latent grid ({H}, {W})")
        f_rest = f_BChw.float().clone()
        f_hat = torch.zeros_like(f_rest)
        K = len(hws)
        idx, fhat = [], []
        rest_last = None
        for si, (ph, pw) in enumerate(hws):
            last = si == K - 1
            r_BChw = f_rest if last else F.interpolate(f_rest, size=(ph, pw), mode="area")
            z_NC = rearrange(r_BChw, "B C h w -> (B h w) C")
            if last:
                rest_last = rearrange(r_BChw, "B C h w -> B (h w) C").clone()
            idx_N = self._nearest(z_NC)
            h_BChw = rearrange(self.codebook_VC[idx_N].float(), "(B h w) C -> B C h w", B=B, h=ph, w=pw)
            if not last:
                h_BChw = F.interpolate(h_BChw, size=(H, W), mode="bicubic").contiguous()
            if not last or last_scale_phi:
                h_BChw = self.phi(h_BChw, si, K)
            f_hat.add_(h_BChw)
            f_rest.sub_(h_BChw)
            idx.append(idx_N.reshape(B, ph * pw))
            if keep_fhat:
                fhat.append(f_hat.clone())
        if not keep_fhat:
            fhat = [f_hat]
        return QuantPyramid(idx=idx, fhat=fhat, rest_last_BlC=rest_last)

    def img_to_idx(self, x_B3HW: torch.Tensor, patch_nums: PatchNums, *, last_scale_phi: bool = True) -> list[torch.Tensor]:
        """Image -> per-scale token indices ``[(B, p_k^2)]`` (``img_to_idxBl``)."""
        return self.quantize_latent(self.encode(x_B3HW), patch_nums, last_scale_phi=last_scale_phi).idx

    def _idx_hws(self, idx_Bl: Sequence[torch.Tensor], patch_nums: PatchNums | None) -> list[tuple[int, int]]:
        if patch_nums is None:  # square scales, as the official idxBl_to_img infers them
            hws = []
            for t in idx_Bl:
                p = round(t.shape[1] ** 0.5)
                if p * p != t.shape[1]:
                    raise ParameterError(f"a scale of {t.shape[1]} tokens is not square; pass patch_nums")
                hws.append((p, p))
            patch_hws(hws)
            return hws
        hws = patch_hws(patch_nums)
        if len(hws) < len(idx_Bl) or any(t.shape[1] != h * w for t, (h, w) in zip(idx_Bl, hws)):
            raise ParameterError(f"indices of {[t.shape[1] for t in idx_Bl]} tokens do not fit patch_nums {hws}")
        return hws

    def idx_to_fhat(self, idx_Bl: Sequence[torch.Tensor], patch_nums: PatchNums | None = None, *,
                    all_scales: bool = False, last_scale_phi: bool = True) -> torch.Tensor | list[torch.Tensor]:
        """Indices of all scales -> ``f_hat`` ``(B, Cv, h, w)`` (``embed_to_fhat``, all to the max scale);
        ``all_scales`` returns the accumulated ``f_hat`` after every scale."""
        hws = self._idx_hws(idx_Bl, patch_nums)
        K, (H, W) = len(hws), hws[-1]
        B = idx_Bl[0].shape[0]
        f_hat = self.codebook_VC.new_zeros(B, self.config.z_channels, H, W, dtype=torch.float32)
        out = []
        for si, (t, (ph, pw)) in enumerate(zip(idx_Bl, hws)):
            h_BChw = rearrange(self.embed(t), "B (h w) C -> B C h w", h=ph, w=pw)
            last = si == K - 1
            if not last:
                h_BChw = F.interpolate(h_BChw, size=(H, W), mode="bicubic")
            if not last or last_scale_phi:
                h_BChw = self.phi(h_BChw, si, K)
            f_hat.add_(h_BChw)
            if all_scales:
                out.append(f_hat.clone())
        return out if all_scales else f_hat

    def idx_to_img(self, idx_Bl: Sequence[torch.Tensor], patch_nums: PatchNums | None = None, *,
                   last_scale_phi: bool = True) -> torch.Tensor:
        """Indices of all scales -> image in ``[-1, 1]`` (``idxBl_to_img(same_shape=True, last_one=True)``)."""
        return self.fhat_to_img(self.idx_to_fhat(idx_Bl, patch_nums, last_scale_phi=last_scale_phi))

    def idx_to_var_input(self, idx_Bl: Sequence[torch.Tensor], patch_nums: PatchNums | None = None) -> torch.Tensor:
        """Teacher-forcing input ``(B, L - l_1, Cv)`` (``idxBl_to_var_input``): ``f_hat`` after each
        scale ``k < K`` ``area``-resized to scale ``k+1``, flattened and concatenated."""
        hws = self._idx_hws(idx_Bl, patch_nums)
        K, (H, W) = len(hws), hws[-1]
        B = idx_Bl[0].shape[0]
        f_hat = self.codebook_VC.new_zeros(B, self.config.z_channels, H, W, dtype=torch.float32)
        tokens = []
        for si in range(K - 1):
            ph, pw = hws[si]
            h_BChw = rearrange(self.embed(idx_Bl[si]), "B (h w) C -> B C h w", h=ph, w=pw)
            f_hat.add_(self.phi(F.interpolate(h_BChw, size=(H, W), mode="bicubic"), si, K))
            nxt = F.interpolate(f_hat, size=hws[si + 1], mode="area")
            tokens.append(rearrange(nxt, "B C h w -> B (h w) C"))
        return torch.cat(tokens, dim=1)

    def next_ar_input(self, si: int, patch_nums: PatchNums, f_hat_BChw: torch.Tensor, h_BChw: torch.Tensor, *,
                      last_scale_phi: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Add scale ``si``'s codes ``h`` ``(B, Cv, p, p)`` to ``f_hat`` (in place) and return
        ``(f_hat, next)``: ``next`` is ``f_hat`` ``area``-resized to scale ``si+1`` (``f_hat`` itself
        after the last scale). The official ``get_next_autoregressive_input``."""
        hws = patch_hws(patch_nums)
        K, (H, W) = len(hws), hws[-1]
        if si != K - 1:
            f_hat_BChw.add_(self.phi(F.interpolate(h_BChw.float(), size=(H, W), mode="bicubic"), si, K))
            return f_hat_BChw, F.interpolate(f_hat_BChw, size=hws[si + 1], mode="area")
        f_hat_BChw.add_(self.phi(h_BChw.float(), si, K) if last_scale_phi else h_BChw.float())
        return f_hat_BChw, f_hat_BChw

    def reconstruct(self, x_B3HW: torch.Tensor, patch_nums: PatchNums) -> torch.Tensor:
        """Image -> quantised -> image (``img_to_reconstructed_img(last_one=True)``)."""
        return self.fhat_to_img(self.quantize_latent(self.encode(x_B3HW), patch_nums).f_hat)


def build(sd: StateDict, *, operations=None) -> tuple[VQVAEConfig, VQVAE]:
    """Build and strictly load a :class:`VQVAE` from an (unwrapped) state dict."""
    from .loading import load_strict

    config = VQVAEConfig.from_state_dict(sd)
    weights = {k: v for k, v in sd.items() if k not in _NON_WEIGHT_KEYS}
    with torch.device("meta"):
        model = VQVAE(config=config, operations=operations)
    load_strict(model, weights, what="VAR VQVAE")
    return config, model.eval().requires_grad_(False)
