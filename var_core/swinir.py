"""SwinIR pre-cleaner of DiffBIR / VARestorer, key-compatible with ``general_swinir_v1.ckpt``.

Papers: Liang et al., "SwinIR: Image Restoration Using Swin Transformer" (ICCVW 2021); Lin et al.,
"DiffBIR: Towards Blind Image Restoration with Generative Diffusion Prior" (2023), whose stage-1
restorer VARestorer runs on the low-quality input before its VAE. The key layout follows
``infinity/models/swinir.py`` of EternalEvan/VARestorer (DiffBIR's copy of SwinIR): a
PixelUnshuffle + conv stem (``conv_first.1``), residual Swin groups (``layers.{i}.residual_group
.blocks.{j}``, ``layers.{i}.conv``) and a "nearest+conv" upsampler (``conv_up{k}``, ``conv_hr``,
``conv_last``). Checkpoints are ``{'state_dict': {'module.' + key: tensor}}``; the unwrapping is
done by :mod:`.checkpoint`.

Every size is read from the state dict (:meth:`SwinIRConfig.from_state_dict`). The saved
``relative_position_index`` / ``attn_mask`` buffers are checked and then recomputed for the
actual token grid, so any image size works (see :meth:`SwinIR.forward`).

Use :func:`clean` for images in ``[-1, 1]`` (VARestorer's ``run_swinir``), ``model(x)`` for
images in ``[0, 1]``. float16 is refused: SwinIR overflows to NaN in it (bf16 and fp32 are fine).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .checkpoint import StateDict
from .detect import count_indexed
from .errors import CheckpointError, ImageInputError, ParameterError

# Score added to attention logits between tokens from different regions of a shifted window.
# Not stored anywhere; the official mask uses -100 (not -inf), kept for identical numerics.
MASK_VALUE = -100.0

_BUFFER_SUFFIXES = (".attn.relative_position_index", ".attn_mask")


@dataclass(frozen=True, kw_only=True)
class SwinIRConfig:
    """Architecture of a SwinIR, derived from its weights (official kwarg names in brackets)."""

    in_chans: int
    embed_dim: int
    depths: tuple[int, ...]
    num_heads: tuple[int, ...]
    window_size: int
    mlp_ratio: float
    unshuffle_scale: int  # 1 = no PixelUnshuffle stem [unshuffle=False]
    upscale: int  # [sf]
    upsampler: str
    resi_connection: str
    num_feat: int
    qkv_bias: bool
    patch_norm: bool
    shifted: tuple[tuple[bool, ...], ...]  # per layer, per block: shifted-window attention
    # Official constants that the weights cannot tell:
    img_range: float = 1.0  # DiffBIR/VARestorer construct SwinIR with img_range=1.0
    rgb_mean: tuple[float, float, float] = (0.4488, 0.4371, 0.4040)  # hard-coded DIV2K mean (3-channel models)
    layernorm_eps: float = 1e-5  # nn.LayerNorm default

    @property
    def shift_size(self) -> int:
        # Not stored: shifted blocks roll by half a window (Swin's rule, hard-coded upstream).
        return self.window_size // 2

    @property
    def mean(self) -> tuple[float, ...]:
        # Upstream subtracts the RGB mean from 3-channel inputs only, zero otherwise.
        return self.rgb_mean if self.in_chans == 3 else (0.0,) * self.in_chans

    @property
    def pad_multiple(self) -> int:
        """Pixel multiple the input is padded to, so that the token grid tiles into windows."""
        return self.unshuffle_scale * self.window_size

    @property
    def out_scale(self) -> int:
        """Output size / input size (1 for DiffBIR's unshuffle-8 + upscale-8 cleaner)."""
        return self.upscale // self.unshuffle_scale

    @classmethod
    def from_state_dict(cls, sd: StateDict) -> "SwinIRConfig":
        try:
            stem = sd["conv_first.1.weight"] if "conv_first.1.weight" in sd else sd["conv_first.weight"]
            embed_dim, stem_in = (int(n) for n in stem.shape[:2])
            in_chans = int(sd["conv_last.weight"].shape[0])  # upstream: output channels = input channels
            n_layers = count_indexed(sd, "layers.")
            depths = tuple(count_indexed(sd, f"layers.{i}.residual_group.blocks.") for i in range(n_layers))
            blocks = [f"layers.{i}.residual_group.blocks.{j}." for i in range(n_layers) for j in range(depths[i])]
            table = sd[blocks[0] + "attn.relative_position_bias_table"] if blocks else None
            num_heads = tuple(
                int(sd[f"layers.{i}.residual_group.blocks.0.attn.relative_position_bias_table"].shape[1])
                for i in range(n_layers)
            )
            hidden = int(sd[blocks[0] + "mlp.fc1.weight"].shape[0]) if blocks else 0
            num_feat = int(sd["conv_before_upsample.0.weight"].shape[0]) if "conv_before_upsample.0.weight" in sd else 0
        except KeyError as e:
            raise CheckpointError(f"SwinIR weights are missing {e.args[0]!r}; the file is incomplete") from None
        if not blocks or min(depths) == 0:
            raise CheckpointError(f"SwinIR weights have no transformer blocks in some layer (depths {depths})")
        if "absolute_pos_embed" in sd:
            raise CheckpointError("this SwinIR uses an absolute position embedding (ape=True), which is not supported")

        # Window size: the bias table has (2w-1)^2 rows (and relative_position_index is w^2 x w^2).
        side = math.isqrt(table.shape[0])
        if side * side != table.shape[0] or side % 2 == 0:
            raise CheckpointError(f"relative_position_bias_table has {table.shape[0]} rows, not (2w-1)^2")
        window = (side + 1) // 2
        for b in blocks:
            t = sd[b + "attn.relative_position_bias_table"]
            if t.shape[0] != table.shape[0] or sd[b + "mlp.fc1.weight"].shape[0] != hidden:
                raise CheckpointError(f"{b}: window size or MLP width differs from the first block")

        # Pixel-unshuffle factor s: the stem sees in_chans * s^2 channels.
        scale = math.isqrt(stem_in // in_chans)
        if scale * scale * in_chans != stem_in:
            raise CheckpointError(f"conv_first takes {stem_in} channels, not {in_chans}*s^2")
        if scale > 1 and "conv_first.1.weight" not in sd:
            raise CheckpointError("conv_first takes unshuffled channels but is not a PixelUnshuffle+conv stem")

        n_up = 0
        while f"conv_up{n_up + 1}.weight" in sd:
            n_up += 1
        if not (n_up and "conv_hr.weight" in sd and num_feat):
            found = "pixelshuffle" if "upsample.0.weight" in sd else "none (denoising)"
            raise CheckpointError(
                f"SwinIR upsampler {found!r} is not supported; only DiffBIR's 'nearest+conv' "
                "(conv_up*/conv_hr keys, e.g. general_swinir_v1.ckpt) is"
            )
        upscale = 2**n_up  # each conv_up follows a nearest x2 upsampling
        if scale > 1 and scale != upscale:
            # Upstream applies PixelUnshuffle(sf) but sizes the stem for unshuffle_scale, so only
            # sf == unshuffle_scale can run at all.
            raise CheckpointError(
                f"pixel-unshuffle factor {scale} differs from the upscale {upscale}; not a runnable SwinIR"
            )

        resi = "3conv" if "conv_after_body.0.weight" in sd else "1conv"
        for h in num_heads:
            if embed_dim % h:
                raise CheckpointError(f"{h} attention heads do not divide the embedding width {embed_dim}")

        # Shifted blocks carry the saved attn_mask buffer. Without any saved buffer (a converted
        # file), fall back to upstream's rule: every second block is shifted.
        has_buffers = any(k.endswith(_BUFFER_SUFFIXES) for k in sd)
        shifted = tuple(
            tuple(
                (f"layers.{i}.residual_group.blocks.{j}.attn_mask" in sd) if has_buffers else (j % 2 == 1)
                for j in range(depths[i])
            )
            for i in range(n_layers)
        )
        return cls(
            in_chans=in_chans,
            embed_dim=embed_dim,
            depths=depths,
            num_heads=num_heads,
            window_size=window,
            mlp_ratio=hidden / embed_dim,
            unshuffle_scale=scale,
            upscale=upscale,
            upsampler="nearest+conv",
            resi_connection=resi,
            num_feat=num_feat,
            qkv_bias=blocks[0] + "attn.qkv.bias" in sd,
            patch_norm="patch_embed.norm.weight" in sd,
            shifted=shifted,
        )


def relative_position_index(window: int, device=None) -> torch.Tensor:
    """``(w^2, w^2)`` row of the bias table for each (query, key) token pair of a window."""
    yx_2N = torch.stack(
        torch.meshgrid(torch.arange(window, device=device), torch.arange(window, device=device), indexing="ij")
    ).flatten(1)
    d_2NN = yx_2N[:, :, None] - yx_2N[:, None, :] + (window - 1)
    return d_2NN[0] * (2 * window - 1) + d_2NN[1]


def shift_mask(grid_h: int, grid_w: int, window: int, shift: int, device=None) -> torch.Tensor:
    """``(nW, w^2, w^2)`` additive mask of shifted windows: tokens that the cyclic roll brought
    together from different image regions do not attend to each other."""

    def band(n: int) -> torch.Tensor:  # 0 = interior, 1 = last window, 2 = wrapped-around strip
        i = torch.arange(n, device=device)
        return (i >= n - window).long() + (i >= n - shift).long()

    region_HW = band(grid_h)[:, None] * 3 + band(grid_w)[None, :]
    region_wN = rearrange(region_HW, "(nh p) (nw q) -> (nh nw) (p q)", p=window, q=window)
    other_wNN = region_wN[:, None, :] != region_wN[:, :, None]
    return torch.zeros(other_wNN.shape, device=device).masked_fill(other_wNN, MASK_VALUE)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside each window, with a learned relative position bias."""

    def __init__(self, *, dim: int, num_heads: int, window: int, qkv_bias: bool, ops=nn):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = ops.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = ops.Linear(dim, dim)
        self.relative_position_bias_table = nn.Parameter(torch.empty((2 * window - 1) ** 2, num_heads))

    def forward(self, x_bNC: torch.Tensor, index_NN: torch.Tensor, mask_wNN: torch.Tensor | None) -> torch.Tensor:
        q, k, v = rearrange(self.qkv(x_bNC), "b n (three h d) -> three b h n d", three=3, h=self.num_heads)
        bias_hNN = rearrange(self.relative_position_bias_table[index_NN], "i j h -> h i j").to(q.dtype)
        if mask_wNN is None:
            attn_mask = bias_hNN
        else:  # windows of one image are consecutive in the batch: (b nW) order
            n_win = mask_wNN.shape[0]
            both_whNN = mask_wNN.to(q.dtype)[:, None] + bias_hNN
            attn_mask = both_whNN.expand(x_bNC.shape[0] // n_win, *both_whNN.shape).flatten(0, 1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.proj(rearrange(out, "b h n d -> b n (h d)"))


class Mlp(nn.Module):
    def __init__(self, *, dim: int, hidden: int, ops=nn):
        super().__init__()
        self.fc1 = ops.Linear(dim, hidden)
        self.fc2 = ops.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class SwinBlock(nn.Module):
    """Pre-norm (shifted-)window attention + MLP on a ``(B, H, W, C)`` token grid."""

    def __init__(self, *, config: SwinIRConfig, num_heads: int, shifted: bool, ops=nn):
        super().__init__()
        c = config
        self.window = c.window_size
        self.shift = c.shift_size if shifted else 0
        self.norm1 = ops.LayerNorm(c.embed_dim, eps=c.layernorm_eps)
        self.attn = WindowAttention(
            dim=c.embed_dim, num_heads=num_heads, window=c.window_size, qkv_bias=c.qkv_bias, ops=ops
        )
        self.norm2 = ops.LayerNorm(c.embed_dim, eps=c.layernorm_eps)
        self.mlp = Mlp(dim=c.embed_dim, hidden=round(c.embed_dim * c.mlp_ratio), ops=ops)

    def forward(self, x_BHWC: torch.Tensor, index_NN: torch.Tensor, mask_wNN: torch.Tensor | None) -> torch.Tensor:
        w, s = self.window, self.shift
        h_BHWC = self.norm1(x_BHWC)
        if s:
            h_BHWC = torch.roll(h_BHWC, shifts=(-s, -s), dims=(1, 2))
        nh, nw = h_BHWC.shape[1] // w, h_BHWC.shape[2] // w
        win_bNC = rearrange(h_BHWC, "b (nh p) (nw q) c -> (b nh nw) (p q) c", p=w, q=w)
        win_bNC = self.attn(win_bNC, index_NN, mask_wNN if s else None)
        h_BHWC = rearrange(win_bNC, "(b nh nw) (p q) c -> b (nh p) (nw q) c", nh=nh, nw=nw, p=w)
        if s:
            h_BHWC = torch.roll(h_BHWC, shifts=(s, s), dims=(1, 2))
        x_BHWC = x_BHWC + h_BHWC
        return x_BHWC + self.mlp(self.norm2(x_BHWC))


def _conv_block(dim: int, kind: str, ops) -> nn.Module:
    """The convolution closing a residual group: one 3x3 conv, or the '3conv' bottleneck."""
    if kind == "1conv":
        return ops.Conv2d(dim, dim, 3, padding=1)
    return nn.Sequential(
        ops.Conv2d(dim, dim // 4, 3, padding=1),
        nn.LeakyReLU(0.2),
        ops.Conv2d(dim // 4, dim // 4, 1),
        nn.LeakyReLU(0.2),
        ops.Conv2d(dim // 4, dim, 3, padding=1),
    )


class _BlockGroup(nn.Module):
    def __init__(self, blocks: list[SwinBlock]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)


class ResidualSwinGroup(nn.Module):
    """RSTB: Swin blocks, then a conv on the image layout, plus a skip connection."""

    def __init__(self, *, config: SwinIRConfig, layer: int, ops=nn):
        super().__init__()
        heads, shifted = config.num_heads[layer], config.shifted[layer]
        self.residual_group = _BlockGroup(
            [SwinBlock(config=config, num_heads=heads, shifted=s, ops=ops) for s in shifted]
        )
        self.conv = _conv_block(config.embed_dim, config.resi_connection, ops)

    def forward(self, x_BHWC: torch.Tensor, index_NN: torch.Tensor, mask_wNN: torch.Tensor | None) -> torch.Tensor:
        h_BHWC = x_BHWC
        for block in self.residual_group.blocks:
            h_BHWC = block(h_BHWC, index_NN, mask_wNN)
        h_BCHW = self.conv(rearrange(h_BHWC, "b h w c -> b c h w"))
        return x_BHWC + rearrange(h_BCHW, "b c h w -> b h w c")


class SwinIR(nn.Module):
    """SwinIR with DiffBIR's nearest+conv upsampler. ``model(x01_B3HW) -> x01_B3HW`` (same size for
    the unshuffle-8 / upscale-8 cleaner, ``out_scale`` times larger otherwise)."""

    def __init__(self, *, config: SwinIRConfig, operations=None):
        super().__init__()
        ops = operations if operations is not None else nn
        c = self.config = config
        stem = ops.Conv2d(c.in_chans * c.unshuffle_scale**2, c.embed_dim, 3, padding=1)
        self.conv_first = nn.Sequential(nn.PixelUnshuffle(c.unshuffle_scale), stem) if c.unshuffle_scale > 1 else stem
        if c.patch_norm:
            self.patch_embed = nn.ModuleDict({"norm": ops.LayerNorm(c.embed_dim, eps=c.layernorm_eps)})
        self.layers = nn.ModuleList(ResidualSwinGroup(config=c, layer=i, ops=ops) for i in range(len(c.depths)))
        self.norm = ops.LayerNorm(c.embed_dim, eps=c.layernorm_eps)
        self.conv_after_body = _conv_block(c.embed_dim, c.resi_connection, ops)
        # Upstream: LeakyReLU with torch's default slope 0.01 here, 0.2 in the upsampler.
        self.conv_before_upsample = nn.Sequential(ops.Conv2d(c.embed_dim, c.num_feat, 3, padding=1), nn.LeakyReLU(0.01))
        self.n_up = int(math.log2(c.upscale))
        for k in range(1, self.n_up + 1):
            setattr(self, f"conv_up{k}", ops.Conv2d(c.num_feat, c.num_feat, 3, padding=1))
        self.conv_hr = ops.Conv2d(c.num_feat, c.num_feat, 3, padding=1)
        self.conv_last = ops.Conv2d(c.num_feat, c.in_chans, 3, padding=1)

    def check_image(self, x_BCHW: torch.Tensor) -> None:
        c = self.config
        if x_BCHW.ndim != 4 or x_BCHW.shape[1] != c.in_chans:
            raise ImageInputError(
                f"SwinIR takes (B, {c.in_chans}, H, W) images, got shape {tuple(x_BCHW.shape)}; "
                "convert the image to RGB (drop alpha) and put channels first"
            )
        if not x_BCHW.is_floating_point():
            raise ImageInputError(
                f"SwinIR takes float images in [0, 1], got {x_BCHW.dtype}; divide uint8 images by 255"
            )
        m = c.pad_multiple
        least = m // 2 + 1 if m > 1 else 1
        h, w = x_BCHW.shape[-2:]
        if min(h, w) < least:
            raise ImageInputError(
                f"image is {h}x{w} pixels; SwinIR needs at least {least}x{least} (it reflect-pads each side "
                f"to a multiple of {m}). Upscale the image or use larger tiles."
            )

    def _features(self, f_BCHW: torch.Tensor) -> torch.Tensor:
        c = self.config
        gh, gw = f_BCHW.shape[-2:]
        index_NN = relative_position_index(c.window_size, device=f_BCHW.device)
        mask_wNN = None
        if any(any(s) for s in c.shifted):
            mask_wNN = shift_mask(gh, gw, c.window_size, c.shift_size, device=f_BCHW.device)
        x_BHWC = rearrange(f_BCHW, "b c h w -> b h w c")
        if c.patch_norm:
            x_BHWC = self.patch_embed["norm"](x_BHWC)
        for layer in self.layers:
            x_BHWC = layer(x_BHWC, index_NN, mask_wNN)
        return rearrange(self.norm(x_BHWC), "b h w c -> b c h w")

    def forward(self, x01_B3HW: torch.Tensor) -> torch.Tensor:
        """Restore images in ``[0, 1]``. Any size of at least ``pad_multiple/2 + 1`` pixels works:
        the input is reflect-padded to a multiple of ``unshuffle_scale * window_size`` (upstream pads
        to a multiple of ``window_size`` only, which runs exactly for the sizes where both agree) and
        the output is cropped back to ``out_scale`` times the input size."""
        c = self.config
        self.check_image(x01_B3HW)
        dtype = self.conv_last.weight.dtype
        if dtype == torch.float16:
            raise ParameterError(
                "SwinIR produces NaN in float16; load it in bfloat16 or float32 (e.g. model.float())"
            )
        in_dtype = x01_B3HW.dtype
        h, w = x01_B3HW.shape[-2:]
        m = c.pad_multiple
        x = F.pad(x01_B3HW.to(dtype), (0, (-w) % m, 0, (-h) % m), mode="reflect")
        mean = torch.tensor(c.mean, dtype=dtype, device=x.device).view(1, -1, 1, 1)
        x = (x - mean) * c.img_range

        f_BCHW = self.conv_first(x)
        f_BCHW = self.conv_after_body(self._features(f_BCHW)) + f_BCHW
        f_BCHW = self.conv_before_upsample(f_BCHW)
        for k in range(1, self.n_up + 1):
            up = F.interpolate(f_BCHW, scale_factor=2, mode="nearest")
            f_BCHW = F.leaky_relu(getattr(self, f"conv_up{k}")(up), 0.2)
        y = self.conv_last(F.leaky_relu(self.conv_hr(f_BCHW), 0.2))
        y = y / c.img_range + mean
        s = c.out_scale
        return y[:, :, : h * s, : w * s].to(in_dtype)


def clean(model: SwinIR, x_m11: torch.Tensor) -> torch.Tensor:
    """VARestorer's ``run_swinir``: restore an image in ``[-1, 1]`` and return it in ``[-1, 1]``."""
    return 2 * model((x_m11 + 1) / 2) - 1


def _check_buffers(sd: StateDict, config: SwinIRConfig) -> None:
    """The saved index/mask buffers are recomputed at run time; make sure they are the standard ones."""
    w = config.window_size
    index = relative_position_index(w)
    for key, t in sd.items():
        if key.endswith(".attn.relative_position_index") and not torch.equal(t.long().cpu(), index):
            raise CheckpointError(f"{key} is not the standard relative position index of a {w}x{w} window")
        if key.endswith(".attn_mask"):
            n_win = t.shape[0]
            side = math.isqrt(n_win)
            if t.ndim != 3 or t.shape[1:] != (w * w, w * w):
                raise CheckpointError(f"{key} has shape {tuple(t.shape)}, not (nW, {w * w}, {w * w})")
            if side * side == n_win:  # upstream's img_size is square: the mask of a (side*w)^2 grid
                want = shift_mask(side * w, side * w, w, config.shift_size)
                if not torch.equal(t.float().cpu(), want):
                    raise CheckpointError(f"{key} is not the standard shifted-window mask")


def build(sd: StateDict, *, operations=None) -> tuple[SwinIRConfig, SwinIR]:
    """Build and strictly load a :class:`SwinIR` from an (unwrapped) state dict."""
    from .loading import load_strict

    config = SwinIRConfig.from_state_dict(sd)
    _check_buffers(sd, config)
    with torch.device("meta"):
        model = SwinIR(config=config, operations=operations)
    weights = {k: v for k, v in sd.items() if not k.endswith(_BUFFER_SUFFIXES)}
    load_strict(model, weights, what="SwinIR")
    return config, model.eval().requires_grad_(False)
