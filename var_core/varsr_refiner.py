"""VARSR's diffusion refiner: a small DDPM that adds the continuous residual of the last scale.

Paper: Qu et al., "Visual Autoregressive Modeling for Image Super-Resolution" (ICML 2025). The
format follows ``models/diffusion/diffloss.py`` (``DiffLoss``/``SimpleMLPAdaLN``, from MAR),
``gaussian_diffusion.py`` and ``respace.py`` of qyp2000/VARSR, so the refiner's weights load from
the ``diffloss.net.*`` keys of ``VARSR.pth``.

After the transformer has drawn the last scale's tokens, each of its ``N`` token positions gets a
``Cv``-channel vector sampled by ancestral DDPM steps, conditioned on ``z`` (the transformer's
last-block output there plus the drawn token's embedding, layer-normed). The noise predictor is an
MLP: input and condition projections, ``depth`` residual blocks with adaptive LayerNorm (shift,
scale, gate from ``timestep embedding + condition``) and an adaptive-LayerNorm final layer that
outputs ``eps`` and the learnt-variance interpolation (``2 Cv`` channels).

The diffusion schedule is not in the weights. The official constants (:class:`DiffusionSchedule`):
1000 training steps of the improved-DDPM cosine schedule, epsilon prediction with learnt variance
(``LEARNED_RANGE``), ``x0`` clipped to ``[-1, 1]``, samples scaled by ``vae_scale = 0.6``; sampling
is respaced to the runtime number of steps (the official ``'10'``).

Shapes: ``N`` rows (token positions, conditional rows then unconditional rows under CFG), ``Cv``
target channels, ``C`` condition width, ``W`` MLP width.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ParameterError

# Official constants of DiffLoss / create_diffusion (not stored in the weights).
TRAIN_STEPS = 1000
VAE_SCALE = 0.6  # the refiner is trained on target / 0.6 and its samples are scaled back by 0.6
COSINE_S = 0.008
MAX_BETA = 0.999
LN_EPS = 1e-6
TIME_MAX_PERIOD = 10000


def space_timesteps(num_timesteps: int, section_counts: int | str | Sequence[int]) -> list[int]:
    """The kept steps of a respaced schedule (improved-DDPM ``space_timesteps``), sorted.

    ``section_counts``: ``N`` or ``"N"`` (N steps evenly strided over the whole range), a list /
    comma-separated string (N_i steps in each of equal sections) or ``"ddimN"`` (integer stride).
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            want = int(section_counts[4:])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == want:
                    return list(range(0, num_timesteps, stride))
            raise ParameterError(f"cannot make exactly {want} steps with an integer stride")
        counts = [int(x) for x in section_counts.split(",")]
    elif isinstance(section_counts, int):
        counts = [section_counts]
    else:
        counts = [int(x) for x in section_counts]
    size_per, extra = divmod(num_timesteps, len(counts))
    start, kept = 0, []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ParameterError(f"cannot divide a section of {size} steps into {count}")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        cur = 0.0
        for _ in range(count):
            kept.append(start + round(cur))
            cur += stride
        start += size
    return sorted(set(kept))


@dataclass(frozen=True)
class DiffusionSchedule:
    """Per-step float64 constants of a respaced cosine schedule (index ``i`` = sampling step ``i``)."""

    timestep_map: tuple[int, ...]  # the training timestep each sampling step feeds the MLP
    log_betas: torch.Tensor
    posterior_log_variance_clipped: torch.Tensor
    sqrt_recip_alphas_cumprod: torch.Tensor
    sqrt_recipm1_alphas_cumprod: torch.Tensor
    posterior_mean_coef1: torch.Tensor
    posterior_mean_coef2: torch.Tensor

    @property
    def num_steps(self) -> int:
        return len(self.timestep_map)


@lru_cache(maxsize=16)
def diffusion_schedule(steps: int | str = 10) -> DiffusionSchedule:
    """The official ``create_diffusion(timestep_respacing=steps, noise_schedule="cosine")`` constants."""
    alpha_bar = lambda t: math.cos((t + COSINE_S) / (1 + COSINE_S) * math.pi / 2) ** 2  # noqa: E731
    base = [min(1 - alpha_bar((i + 1) / TRAIN_STEPS) / alpha_bar(i / TRAIN_STEPS), MAX_BETA) for i in range(TRAIN_STEPS)]
    alphas_cumprod = torch.cumprod(1 - torch.tensor(base, dtype=torch.float64), 0)
    kept = space_timesteps(TRAIN_STEPS, str(steps) if isinstance(steps, int) else steps)
    if len(kept) < 2:
        raise ParameterError(f"the refiner needs at least 2 sampling steps, got {steps!r}")
    betas, last = [], 1.0
    for i in kept:  # betas of the respaced chain, from the kept cumulative products
        betas.append(1 - alphas_cumprod[i].item() / last)
        last = alphas_cumprod[i].item()
    betas = torch.tensor(betas, dtype=torch.float64)
    ac = torch.cumprod(1 - betas, 0)
    ac_prev = torch.cat([ac.new_ones(1), ac[:-1]])
    post_var = betas * (1 - ac_prev) / (1 - ac)
    return DiffusionSchedule(
        timestep_map=tuple(kept),
        log_betas=betas.log(),
        posterior_log_variance_clipped=torch.cat([post_var[1:2], post_var[1:]]).log(),
        sqrt_recip_alphas_cumprod=(1 / ac).sqrt(),
        sqrt_recipm1_alphas_cumprod=(1 / ac - 1).sqrt(),
        posterior_mean_coef1=betas * ac_prev.sqrt() / (1 - ac),
        posterior_mean_coef2=(1 - ac_prev) * (1 - betas).sqrt() / (1 - ac),
    )


def timestep_embedding(t_N: torch.Tensor, dim: int, max_period: int = TIME_MAX_PERIOD) -> torch.Tensor:
    """Sinusoidal embedding ``(N, dim)`` float32 of timesteps ``(N,)``: cosines, then sines."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t_N.device) / half)
    args = t_N[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class TimestepEmbedder(nn.Module):
    def __init__(self, width: int, freq_dim: int, *, ops=nn):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(ops.Linear(freq_dim, width), nn.SiLU(), ops.Linear(width, width))

    def forward(self, t_N: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_embedding(t_N, self.freq_dim))


class ResBlock(nn.Module):
    """``x + gate * MLP(LN(x) * (1 + scale) + shift)``; ``(shift, scale, gate)`` from ``y``."""

    def __init__(self, width: int, *, ops=nn):
        super().__init__()
        self.in_ln = ops.LayerNorm(width, eps=LN_EPS)
        self.mlp = nn.Sequential(ops.Linear(width, width), nn.SiLU(), ops.Linear(width, width))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), ops.Linear(width, 3 * width))

    def forward(self, x_NW: torch.Tensor, y_NW: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.adaLN_modulation(y_NW).chunk(3, dim=-1)
        return x_NW + gate * self.mlp(self.in_ln(x_NW) * (1 + scale) + shift)


class FinalLayer(nn.Module):
    def __init__(self, width: int, out_channels: int, *, ops=nn):
        super().__init__()
        self.width = width
        self.linear = ops.Linear(width, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), ops.Linear(width, 2 * width))

    def forward(self, x_NW: torch.Tensor, y_NW: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(y_NW).chunk(2, dim=-1)
        x_NW = F.layer_norm(x_NW, (self.width,), eps=LN_EPS) * (1 + scale) + shift  # no affine
        return self.linear(x_NW)


class RefinerMLP(nn.Module):
    """``diffloss.net``: noise predictor ``(x (N, Cv), t (N,), z (N, C)) -> (N, 2 Cv)`` (eps, variance)."""

    def __init__(self, *, channels: int, cond_dim: int, width: int, depth: int, freq_dim: int, ops=nn):
        super().__init__()
        self.channels = channels
        self.time_embed = TimestepEmbedder(width, freq_dim, ops=ops)
        self.cond_embed = ops.Linear(cond_dim, width)
        self.input_proj = ops.Linear(channels, width)
        self.res_blocks = nn.ModuleList(ResBlock(width, ops=ops) for _ in range(depth))
        self.final_layer = FinalLayer(width, 2 * channels, ops=ops)

    def forward(self, x_NC: torch.Tensor, t_N: torch.Tensor, z_NC: torch.Tensor) -> torch.Tensor:
        x = self.input_proj(x_NC)
        y = self.time_embed(t_N) + self.cond_embed(z_NC)
        for block in self.res_blocks:
            x = block(x, y)
        return self.final_layer(x, y).float()

    def forward_with_cfg(self, x_NC: torch.Tensor, t_N: torch.Tensor, z_NC: torch.Tensor, cfg: float) -> torch.Tensor:
        """Guided output: both halves see the first half of ``x``; ``eps = (1 + cfg) eps_c - cfg eps_u``
        is shared by both halves, the variance outputs are each half's own."""
        half = x_NC[: len(x_NC) // 2]
        out = self.forward(torch.cat([half, half]), t_N, z_NC)
        eps, rest = out[:, : self.channels], out[:, self.channels:]
        cond_eps, uncond_eps = eps.chunk(2)
        guided = cond_eps * (1 + cfg) - cfg * uncond_eps
        return torch.cat([torch.cat([guided, guided]), rest], dim=1)


class DiffusionRefiner(nn.Module):
    """``diffloss``: the refiner MLP (``net``) and its respaced DDPM sampler."""

    def __init__(self, *, channels: int, cond_dim: int, width: int, depth: int, freq_dim: int = 256, operations=None):
        super().__init__()
        ops = operations if operations is not None else nn
        self.net = RefinerMLP(channels=channels, cond_dim=cond_dim, width=width, depth=depth, freq_dim=freq_dim, ops=ops)

    @torch.no_grad()
    def sample(
        self, z_NC: torch.Tensor, *, cfg: float, steps: int | str = 10, temperature: float = 1.0,
        generator: torch.Generator | None = None, noise_init: torch.Tensor | None = None,
        step_noise: Sequence[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Sample ``(N, Cv)`` float32 (already times ``vae_scale``) for conditions ``z`` ``(N, C)``.

        With ``cfg != 1`` the rows are conditional then unconditional halves (the official
        ``forward_with_cfg``) and the initial noise is drawn for one half and repeated. Noise:
        ``noise_init`` (``(N/2, Cv)`` with CFG, else ``(N, Cv)``) and ``step_noise`` (one ``(N, Cv)``
        per step, also drawn at the last step where it is unused) if given, else drawn from
        ``generator`` (or torch's global RNG) in the official order.
        """
        sched = diffusion_schedule(steps)
        N, dev = z_NC.shape[0], z_NC.device
        C = self.net.channels
        guided = cfg != 1.0
        if guided and N % 2:
            raise ParameterError(f"classifier-free guidance needs conditional and unconditional rows, got {N}")

        def randn(shape):
            return torch.randn(shape, generator=generator, device=generator.device if generator is not None else dev,
                               dtype=torch.float32).to(dev)

        init_shape = (N // 2, C) if guided else (N, C)
        x = noise_init.to(dev, torch.float32) if noise_init is not None else randn(init_shape)
        if tuple(x.shape) != init_shape:
            raise ParameterError(f"refiner noise_init must be {init_shape}, got {tuple(x.shape)}")
        if guided:
            x = torch.cat([x, x])
        if step_noise is not None and len(step_noise) != sched.num_steps:
            raise ParameterError(f"{len(step_noise)} step noises for {sched.num_steps} refiner steps")
        z = z_NC.float()
        for k, i in enumerate(reversed(range(sched.num_steps))):
            t_N = torch.full((N,), sched.timestep_map[i], dtype=torch.long, device=dev)
            out = self.net.forward_with_cfg(x, t_N, z, cfg) if guided else self.net(x, t_N, z)
            eps, var_values = out[:, :C], out[:, C:]
            at = lambda a: a[i].float().item()  # noqa: E731 - float32 constants, as the official extraction
            frac = (var_values + 1) / 2
            log_var = frac * at(sched.log_betas) + (1 - frac) * at(sched.posterior_log_variance_clipped)
            x0 = (at(sched.sqrt_recip_alphas_cumprod) * x - at(sched.sqrt_recipm1_alphas_cumprod) * eps).clamp(-1, 1)
            mean = at(sched.posterior_mean_coef1) * x0 + at(sched.posterior_mean_coef2) * x
            noise = step_noise[k].to(dev, torch.float32) if step_noise is not None else randn((N, C))
            x = mean + torch.exp(0.5 * log_var) * noise * temperature if i != 0 else mean
        return x * VAE_SCALE
