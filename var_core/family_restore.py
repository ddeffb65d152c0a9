"""Any-size restoration with VARSR and RestoreVAR, one dispatcher for every restoration family,
and class-conditional VAR generation.

VARSR and RestoreVAR are trained on one square input size ``S`` (512 px for the released models:
``VARSRConfig.lr_size``, ``RestoreVAR.input_size``). They run through the same tiled path as
VARestorer (:func:`.restore.restore_tiled`): the low-quality image is resized by ``options.scale``
(bicubic, antialiased, aspect ratio kept), cut into overlapping tiles of ``options.tile`` output
pixels, each tile resized to ``S x S``, restored by the core (:func:`.varsr_restore.varsr_restore`,
:func:`.restorevar_restore.restorevar_restore`), resized back and blended; the upstream tiling is
not used. A tile of exactly ``S x S`` (``tile = S``) is restored as the official scripts do it.

* **VARSR** is a x4 super-resolver whose input is the LR image already upsampled to the output
  size (``test_varsr.py`` bicubic-resizes the LR image x4 to 512 x 512 before the model): so each
  tile is restored at 1x after our bicubic resize by ``scale`` (4 reproduces the official setting;
  other factors give the model a blurrier or sharper input than it was trained on). Image ``i`` of
  tile ``k`` draws its tokens and refiner noise from :func:`.restore.tile_seeds` (``seed + i``).
  The official colour fix is an AdaIN towards the LR input, per model-sized image: with
  ``tile_adain`` (the ``"auto"`` colour fix) it is applied per tile, before blending.
* **RestoreVAR** is all-in-one restoration at the input size (``scale`` 1 is its native use; a
  different scale resizes the input first). Its decoding is greedy: seeds have no effect.

:func:`restore_any` dispatches on the model's class (VARestorer/Infinity one-step student, VARSR,
RestoreVAR); the class-conditional VAR is generation only (:func:`generate_class_images`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .bsq_vae import BSQVAE
from .colorfix import MODES as COLOR_FIX_MODES
from .detect import DESCRIPTIONS, Family
from .errors import ParameterError
from .infinity_model import Infinity, TextCondition
from .restore import RestoreOptions, _interrupt_check, _resize, restore_image, restore_tiled
from .restorevar import RestoreVAR
from .restorevar_restore import restorevar_restore
from .var_model import VAR
from .var_vqvae import VQVAE
from .varsr import VARSR
from .varsr_restore import varsr_restore

RESTORE_FAMILIES = (Family.INFINITY, Family.VARSR, Family.RESTOREVAR)
COLOR_FIX_CHOICES = ("auto", *COLOR_FIX_MODES)


@dataclass(frozen=True, kw_only=True)
class VARSROptions:
    """VARSR sampling settings (defaults: ``test_varsr.py``)."""

    cfg: float = 6.0  # image classifier-free guidance (linear ramp over the scales, also the refiner's)
    steps: int = 10  # diffusion refiner steps
    top_k: int = 1  # 1: greedy tokens
    top_p: float = 0.75
    label: int = 0  # 0 = restore; num_classes - 1 is the unconditional label
    tile_adain: bool = True  # the official AdaIN colour fix on each model-sized tile
    official_refiner_reshape: bool = True  # see varsr.refiner_output_to_fhat

    def __post_init__(self):
        if not 0 <= self.cfg <= 100:
            raise ParameterError(f"VARSR cfg must be in [0, 100], got {self.cfg}")
        if not 1 <= self.steps <= 1000:
            raise ParameterError(f"VARSR refiner steps must be in 1..1000, got {self.steps}")
        if self.top_k < 0:
            raise ParameterError(f"top_k must be 0 (off) or positive, got {self.top_k}")
        if not 0 <= self.top_p <= 1:
            raise ParameterError(f"top_p must be in [0, 1], got {self.top_p}")


def family_of(model: torch.nn.Module) -> str:
    """The :class:`.detect.Family` of a built transformer."""
    for cls, family in ((Infinity, Family.INFINITY), (VARSR, Family.VARSR), (RestoreVAR, Family.RESTOREVAR),
                        (VAR, Family.VAR)):
        if isinstance(model, cls):
            return family
    raise ParameterError(f"{type(model).__name__} is not a VAR transformer this pack runs")


def resolve_color_fix(family: str, choice: str) -> tuple[str, bool]:
    """``(whole-image colour fix, VARSR per-tile AdaIN)`` for a colour-fix choice. ``"auto"`` is the
    family's official one (VARSR: AdaIN per tile; the others: none); ``none``/``wavelet``/``adain``
    are applied to the whole blended image (VARSR's own AdaIN then off)."""
    if choice not in COLOR_FIX_CHOICES:
        raise ParameterError(f"color_fix must be one of {COLOR_FIX_CHOICES}, got {choice!r}")
    if choice == "auto":
        return "none", family == Family.VARSR
    return choice, False


def check_restorer(family: str, vae: torch.nn.Module | None = None) -> None:
    """Refuse a family that does not restore, and a VAE of the wrong kind for ``family``."""
    if family == Family.VAR:
        raise ParameterError(
            f"the {DESCRIPTIONS[Family.VAR]} generates images from a class index; it does not restore images. "
            "Restore with VARestorer, VARSR or RestoreVAR, or generate with the class-to-image path"
        )
    if family not in RESTORE_FAMILIES:
        raise ParameterError(f"the {DESCRIPTIONS.get(family, family)} is not a restoration model")
    if vae is None:
        return
    if family == Family.INFINITY and not isinstance(vae, BSQVAE):
        raise ParameterError(
            "VARestorer / Infinity restores with the Infinity BSQ VAE (infinity_vae_d32reg.pth), but got "
            f"a {type(vae).__name__}; use the VAE that belongs to the model"
        )
    if family in (Family.VARSR, Family.RESTOREVAR) and not isinstance(vae, VQVAE):
        name = "VARSR" if family == Family.VARSR else "RestoreVAR"
        official = "VQVAE.pth" if family == Family.VARSR else "vae_restorevar.ckpt"
        raise ParameterError(
            f"{name} restores with a VAR VQVAE ({official}), but got a {type(vae).__name__} (the Infinity BSQ VAE "
            "of VARestorer?); use the VQVAE that belongs to the model"
        )


def varsr_restore_image(
    model: VARSR,
    vqvae: VQVAE,
    lq_B3HW: torch.Tensor,
    *,
    options: RestoreOptions = RestoreOptions(),
    varsr: VARSROptions = VARSROptions(),
    progress: Callable[[int, int], None] | None = None,
    check_interrupt: Callable[[], object] | None = None,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Restore ``lq`` ``(B, 3, h, w)`` in [-1, 1] to ``(B, 3, H, W)`` (``H = h * scale``) with VARSR.

    Tiles of ``options.tile`` output pixels are resized to the model's LR size and restored at 1x
    (see the module docstring); ``options.sampling``/``tau`` are not used. One progress step per
    image and tile; ``check_interrupt()`` runs before each tile.
    """
    check_restorer(Family.VARSR, vqvae)
    device = device or model.device
    S = model.config.lr_size

    def tile(t_B3hw: torch.Tensor, seeds: list[int], step: Callable[[], None]) -> torch.Tensor:
        x = _resize(t_B3hw, (S, S))
        out = []
        for i, seed in enumerate(seeds):
            out.append(varsr_restore(model, vqvae, x[i:i + 1], cfg=varsr.cfg, steps=varsr.steps, seed=seed,
                                     top_k=varsr.top_k, top_p=varsr.top_p, label=varsr.label,
                                     color_fix="adain" if varsr.tile_adain else "none",
                                     official_refiner_reshape=varsr.official_refiner_reshape))
            step()
        return _resize(torch.cat(out).to(t_B3hw.device), tuple(t_B3hw.shape[-2:]))

    return restore_tiled(lq_B3HW, tile, options=options, steps_per_tile=lambda th, tw: lq_B3HW.shape[0],
                         progress=progress, check_interrupt=check_interrupt, device=device)


def restorevar_restore_image(
    model: RestoreVAR,
    vqvae: VQVAE,
    lq_B3HW: torch.Tensor,
    *,
    options: RestoreOptions = RestoreOptions(scale=1.0),
    refine: bool | None = None,
    progress: Callable[[int, int], None] | None = None,
    check_interrupt: Callable[[], object] | None = None,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Restore ``lq`` ``(B, 3, h, w)`` in [-1, 1] to ``(B, 3, H, W)`` (``H = h * scale``; 1 by
    default) with RestoreVAR: tiles resized to ``model.input_size(vqvae)``, restored (greedy, the
    seed is unused), resized back and blended. ``refine``: the latent refiner (default: when the
    checkpoint has one). One progress step per tile."""
    check_restorer(Family.RESTOREVAR, vqvae)
    model.check_vqvae(vqvae)
    device = device or model.device
    S = model.input_size(vqvae)

    def tile(t_B3hw: torch.Tensor, seeds: list[int], step: Callable[[], None]) -> torch.Tensor:
        out = restorevar_restore(model, vqvae, _resize(t_B3hw, (S, S)), refine=refine)
        step()
        return _resize(out.to(t_B3hw.device), tuple(t_B3hw.shape[-2:]))

    return restore_tiled(lq_B3HW, tile, options=options, steps_per_tile=lambda th, tw: 1,
                         progress=progress, check_interrupt=check_interrupt, device=device)


def restore_any(
    model: torch.nn.Module,
    vae: torch.nn.Module,
    lq_B3HW: torch.Tensor,
    *,
    options: RestoreOptions,
    varsr: VARSROptions = VARSROptions(),
    restorevar_refine: bool | None = None,
    text: TextCondition | None = None,
    swinir: torch.nn.Module | None = None,
    progress: Callable[[int, int], None] | None = None,
    check_interrupt: Callable[[], object] | None = None,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Restore with any restoration family, picked from the model's class: the VARestorer one-step
    student (:func:`.restore.restore_image`, with ``text``/``swinir``), VARSR
    (:func:`varsr_restore_image`) or RestoreVAR (:func:`restorevar_restore_image`). ``vae`` is the
    model's own (BSQ VAE for VARestorer, VQVAE otherwise); a wrong pairing raises :class:`ParameterError`."""
    family = family_of(model)
    check_restorer(family, vae)
    common = dict(options=options, progress=progress, check_interrupt=check_interrupt, device=device)
    if family == Family.INFINITY:
        return restore_image(model, vae, lq_B3HW, text=text, swinir=swinir, **common)
    if family == Family.VARSR:
        return varsr_restore_image(model, vae, lq_B3HW, varsr=varsr, **common)
    return restorevar_restore_image(model, vae, lq_B3HW, refine=restorevar_refine, **common)


@torch.no_grad()
def generate_class_images(
    model: VAR,
    vqvae: VQVAE,
    class_index: int,
    *,
    batch: int = 1,
    seed: int = 0,
    cfg: float = 4.0,
    top_k: int = 900,
    top_p: float = 0.95,
    more_smooth: bool = False,
    progress: Callable[[int, int], None] | None = None,
    check_interrupt: Callable[[], object] | None = None,
) -> torch.Tensor:
    """``batch`` images ``(B, 3, H, W)`` in [-1, 1] of class ``class_index`` (negative: unconditional)
    with the class-conditional VAR (:meth:`.var_model.VAR.autoregressive_infer_cfg`: the official
    linear guidance ramp ``t = cfg * k / (K-1)``, top-k/top-p sampling; defaults = the official demo).

    Image ``i`` is sampled alone from a generator seeded with ``seed + i``, so a batch gives the
    images of single runs. ``progress(done, batch)`` after each image, ``check_interrupt()`` before.
    """
    if batch < 1:
        raise ParameterError(f"batch must be at least 1, got {batch}")
    n = model.config.num_classes
    if class_index >= n:
        raise ParameterError(f"class index {class_index} is out of range: this VAR model has classes 0..{n - 1} "
                             "(negative = unconditional)")
    if not 0 <= top_p <= 1 or top_k < 0 or cfg < 0:
        raise ParameterError(f"need cfg >= 0, top_k >= 0 and top_p in [0, 1]; got {cfg}, {top_k}, {top_p}")
    check = _interrupt_check(check_interrupt)
    images = []
    for i in range(batch):
        if check:
            check()
        sample = model.autoregressive_infer_cfg(vqvae, 1, int(class_index), g_seed=(int(seed) + i) % 2**64, cfg=float(cfg),
                                                top_k=int(top_k), top_p=float(top_p), more_smooth=more_smooth)
        images.append(sample.image01.mul(2).sub(1).clamp(-1, 1))
        if progress:
            progress(i + 1, batch)
    return torch.cat(images)
