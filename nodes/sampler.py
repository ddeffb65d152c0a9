"""Iterative Infinity teacher nodes: LQ-conditioned next-scale restoration, and text to image."""

from __future__ import annotations

import dataclasses
import logging

import comfy.model_management as mm
import comfy.utils
import numpy as np
import torch
from comfy.cli_args import LatentPreviewMethod, args
from comfy_api.latest import io
from PIL import Image

from .. import var_core
from ..var_core import image as var_image
from ..var_core import restore as var_restore
from ..var_core import sampler as var_sampler
from ..var_core.bsq_quant import NEXT_SCALE_MODES
from ..var_core.colorfix import MODES as COLOR_FIX_MODES
from ..var_core.pyramid import Pyramid
from ..var_core.schedules import H_DIV_W_TEMPLATES, PIXEL_BUDGETS, scale_schedule, schedule_pixels
from . import categories, patching
from .student import autocast_for, require_family, restore_each, tile_inputs
from .types import VARVAE, VARModel, VARSwinIR, VARText, VarModel, VarPyramid, VarSwinIR, VarText, VarVAE
from .vae import memory_required as vae_memory_required

logger = logging.getLogger(__name__)

ASPECTS = {f"{ratio:.3f}": ratio for ratio in H_DIV_W_TEMPLATES}  # height / width, as Infinity names them
DEFAULTS = var_sampler.SamplerOptions()


def sampler_memory_required(model: VARModel, vae: VARVAE, schedule, *, guided: bool, swinir: VARSwinIR | None = None,
                            out_hw: tuple[int, int] | None = None) -> int:
    """Rough working memory (bytes) of sampling one image over ``schedule`` (one tile).

    The kv cache (keys and values of every scale, in every block, for the conditional and, with
    guidance, the unconditional row), the activations of the last scale (float32 residual stream
    plus attention/MLP branches), the larger of the VAE's and SwinIR's, and the blending buffers
    of a tiled output of ``out_hw``.
    """
    cfg = model.config
    rows = 2 if guided else 1
    tokens = sum(h * w for _, h, w in schedule)
    _, h, w = schedule[-1]
    kv_bytes = 2 if model.dtype == torch.bfloat16 else 4  # bf16 under the node's autocast
    kv_cache = cfg.depth * 2 * tokens * cfg.embed_dim * rows * kv_bytes
    activations = rows * h * w * (8 * cfg.embed_dim + 2 * cfg.mlp_hidden) * 4
    th, tw = schedule_pixels(schedule)
    cleaner = th * tw * 64 * 4 * 6 if swinir is not None else 0
    blend = out_hw[0] * out_hw[1] * 3 * 4 * 4 if out_hw is not None else 0
    return int(kv_cache + activations + max(vae_memory_required(vae, th, tw), cleaner) + blend)


def _sampler_options(seed: int, cfg: float, tau: float, top_k: int, top_p: float,
                     next_scale: str) -> var_sampler.SamplerOptions:
    return var_sampler.SamplerOptions(cfg=float(cfg), tau=float(tau), top_k=int(top_k), top_p=float(top_p),
                                      next_scale=next_scale, seed=int(seed))  # validates the combo too


def _check_vae(model: VARModel, vae: VARVAE, node: str) -> None:
    require_family(model, (var_core.Family.INFINITY,), node,
                   "It samples with the Infinity transformer only (VAR Restore runs VARSR and RestoreVAR, "
                   "VAR Class to Image the class-conditional VAR).")
    if vae.config.codebook_dim != model.config.codebook_dim:
        raise var_core.ParameterError(
            f"the VAE {vae.name} has {vae.config.codebook_dim}-bit tokens but the model {model.name} reads "
            f"{model.config.codebook_dim}-bit tokens; use the VAE that belongs to the model (infinity_vae_d32reg.pth "
            "for infinity_2b_reg.pth and varestorer.pth)"
        )


def _condition(model: VARModel, text: VARText | None, what: str):
    """The ``TextCondition`` of a VAR_TEXT (None: unconditional), checked against the model."""
    condition = None if text is None else text.condition
    if condition is not None and condition.kv_compact.shape[-1] != model.config.text_channels:
        raise var_core.ParameterError(
            f"the {what} has {condition.kv_compact.shape[-1]}-channel T5 features but {model.name} takes "
            f"{model.config.text_channels} channels; encode it with the T5 that belongs to the model "
            "(flan-t5-xl for infinity_2b_reg.pth)"
        )
    return condition


def _warn_if_student(model: VARModel, node: str) -> None:
    if model.lora != "none":
        logger.warning(
            "%s: %s still has VARestorer's LoRA adapters (%s), the one-step student; the iterative sampler expects "
            "the Infinity teacher: load infinity_2b_reg.pth, or turn on strip_lora in Load VARestorer Model",
            node, model.name, model.lora,
        )


def _sampler_inputs(cfg_default: float) -> list:
    """seed, cfg, tau, top_k, top_p, next_scale: the sampling inputs both nodes share."""
    return [
        io.Int.Input(
            "seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
            tooltip="Seed of the sampling; image i of a batch uses seed + i. Unused with top_k = 1 (greedy).",
        ),
        io.Float.Input(
            "cfg", default=cfg_default, min=0.0, max=30.0, step=0.1,
            tooltip="Classifier-free guidance: cfg * conditional + (1 - cfg) * unconditional logits. 1 turns it "
                    "off (and halves the work); higher follows the text (or the LQ image's prompt) more closely.",
        ),
        io.Float.Input(
            "tau", default=DEFAULTS.tau, min=0.01, max=5.0, step=0.01,
            tooltip="Sampling temperature of every scale: 1 draws from the model's distribution, lower is "
                    "sharper and less varied, higher more varied.",
        ),
        io.Int.Input(
            "top_k", default=DEFAULTS.top_k, min=0, max=10000,
            tooltip="Each bit has two outcomes: 1 = greedy (argmax, deterministic, the seed is unused); 0 or >= 2 "
                    "= no top-k filtering (the official 900 keeps both).",
        ),
        io.Float.Input(
            "top_p", default=DEFAULTS.top_p, min=0.0, max=1.0, step=0.01,
            tooltip="Nucleus filtering of each bit's two outcomes: an outcome less likely than 1 - top_p is "
                    "dropped (0 = off; official 0.97).",
        ),
        io.Combo.Input(
            "next_scale", options=list(NEXT_SCALE_MODES), default=DEFAULTS.next_scale,
            tooltip="How the codes summed so far are resized into the next scale's input: area (VARestorer's "
                    "sampler) or trilinear (FoundationVision's Infinity and training).",
        ),
    ]


class VARIterativeRestore(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="VARIterativeRestore",
            display_name="VAR Iterative Restore (Infinity teacher)",
            category=categories.RESTORE,
            description=(
                "Restores and upscales (super-resolution) images with the iterative Infinity teacher, the "
                "baseline VARestorer distils into one step: each tile is encoded into its token pyramid, and the "
                "transformer samples the scales one after another with the LQ pyramid as the input of the first "
                "10 scales. Same sizes, tiles, SwinIR and colour fix as VAR One-Step Restore, but one transformer "
                "pass per scale (slower). Use infinity_2b_reg.pth, or varestorer.pth loaded with strip_lora. "
                "Alpha is kept."
            ),
            inputs=[
                VarModel.Input("model", tooltip="The Infinity teacher (infinity_2b_reg.pth, or the VARestorer file "
                                                "loaded with strip_lora on) from Load VARestorer Model."),
                VarVAE.Input("vae", tooltip="The Infinity BSQ VAE (infinity_vae_d32reg.pth) from Load VAR VAE."),
                io.Image.Input("image", tooltip="Low-quality images to restore (any size, RGB or RGBA)."),
                *_sampler_inputs(DEFAULTS.cfg),
                *tile_inputs(
                    scale_tooltip="Output size / input size.",
                    tile_tooltip=("Tile side in output pixels; images that fit in one tile are restored "
                                  "whole. Out of memory: the tile is halved and retried."),
                ),
                io.Combo.Input(
                    "color_fix", options=list(COLOR_FIX_MODES), default="none",
                    tooltip="Match the colours of the result to the (resized) input: wavelet keeps the input's low "
                            "frequencies, adain its per-channel mean and spread.",
                ),
                VarText.Input(
                    "text", optional=True,
                    tooltip="Prompt from VAR Text Encode (T5). Not connected or empty: unconditional.",
                ),
                VarSwinIR.Input(
                    "swinir", optional=True,
                    tooltip="SwinIR pre-cleaner from Load SwinIR Pre-cleaner, run on each tile before encoding.",
                ),
            ],
            outputs=[io.Image.Output(display_name="IMAGE", tooltip="Restored images (RGBA when the input had alpha).")],
        )

    @classmethod
    def execute(cls, model: VARModel, vae: VARVAE, image: torch.Tensor, seed: int = 0, cfg: float = DEFAULTS.cfg,
                tau: float = DEFAULTS.tau, top_k: int = DEFAULTS.top_k, top_p: float = DEFAULTS.top_p,
                next_scale: str = DEFAULTS.next_scale, scale: float = 4.0, tile_size: int = 512,
                tile_overlap: int = 64, color_fix: str = "none", text: VARText | None = None,
                swinir: VARSwinIR | None = None) -> io.NodeOutput:
        options = var_restore.RestoreOptions(scale=float(scale), tile=int(tile_size), overlap=int(tile_overlap),
                                             seed=int(seed), color_fix=color_fix)
        sampler_options = _sampler_options(seed, cfg, tau, top_k, top_p, next_scale)
        _check_vae(model, vae, "VAR Iterative Restore")
        condition = _condition(model, text, "text")
        _warn_if_student(model, "VAR Iterative Restore")
        device = model.patcher.load_device
        vae_patcher = patching.on_device(vae.patcher, device, "VAE")
        # The size is refused (above MAX_SIDE) before split_alpha copies the pixels.
        out_h, out_w = var_restore.output_size(*var_image.image_size(image), options.scale)
        rgb, alpha = var_image.split_alpha(image)
        batch, h, w, _ = rgb.shape
        per_image = var_restore.count_steps(h, w, options, iterative=True)
        schedule = var_restore.tile_schedule(min(options.tile, out_h), min(options.tile, out_w), options.tile)
        patchers = [model.patcher, vae_patcher]
        if swinir is not None:
            patchers.append(patching.on_device(swinir.patcher, device, "SwinIR"))
        guided = any(c != 1 for c in sampler_options.per_scale(len(schedule))[0])
        mm.load_models_gpu(patchers, memory_required=sampler_memory_required(
            model, vae, schedule, guided=guided, swinir=swinir, out_hw=(out_h, out_w)))
        logger.info("VAR iterative restore: %d image(s) %dx%d -> %dx%d, %d tile(s) of %d scales per image", batch, w,
                    h, out_w, out_h, per_image // len(schedule), len(schedule))
        # ComfyUI's check raises its InterruptProcessingException (and clears the flag), so an
        # interrupt between two scales ends the prompt as interrupted, not as an error.
        return io.NodeOutput(restore_each(
            model, rgb, alpha, per_image, lambda x, i, progress: var_restore.iterative_restore_image(
                model.module, vae.module, x, text=condition, swinir=None if swinir is None else swinir.module,
                options=dataclasses.replace(options, seed=options.seed + i), sampler_options=sampler_options,
                progress=progress, check_interrupt=mm.throw_exception_if_processing_interrupted, device=device)))


def _preview(codes_Bd1HW: torch.Tensor):
    """ComfyUI's preview tuple for the codes summed so far (a PCA false-colour map, no decode)."""
    rgb_HW3 = var_sampler.codes_preview(codes_Bd1HW)
    pixels = (rgb_HW3.numpy() * 255).round().astype(np.uint8)
    return ("JPEG", Image.fromarray(pixels), args.preview_size)


class VARTextToImage(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="VARTextToImage",
            display_name="VAR Text to Image (Infinity)",
            category=categories.SAMPLING,
            description=(
                "Generates images from a prompt with Infinity's next-scale bitwise sampling (the iterative "
                "teacher, infinity_2b_reg.pth): scale after scale, each bit drawn with guidance, temperature and "
                "top-k/top-p, then decoded by the BSQ VAE. The size is an Infinity aspect template at a pixel "
                "budget (1M: about 1024x1024). With --preview-method set, a false-colour preview of the tokens "
                "is shown after each scale."
            ),
            inputs=[
                VarModel.Input("model", tooltip="The Infinity transformer (infinity_2b_reg.pth) from Load VARestorer "
                                                "Model (a VARestorer file needs strip_lora on)."),
                VarVAE.Input("vae", tooltip="The Infinity BSQ VAE (infinity_vae_d32reg.pth) from Load VAR VAE."),
                VarText.Input("text", tooltip="The prompt from VAR Text Encode (T5); empty = unconditional."),
                *_sampler_inputs(DEFAULTS.cfg),
                io.Combo.Input(
                    "aspect_ratio", options=list(ASPECTS), default="1.000",
                    tooltip="Height / width of Infinity's size templates: 1.000 square, below 1 landscape "
                            "(0.666 = 2:3, 0.500 = 1:2), above 1 portrait (1.500 = 3:2).",
                ),
                io.Combo.Input(
                    "pixel_budget", options=list(PIXEL_BUDGETS), default="1M",
                    tooltip="Image size in pixels (1M = 1024x1024 for the square template) and so the number of "
                            "scales (7 at 0.06M, 13 at 1M).",
                ),
                io.Int.Input("batch_size", default=1, min=1, max=64,
                             tooltip="Number of images; image i uses seed + i, sampled one after another."),
                VarText.Input(
                    "negative_text", optional=True,
                    tooltip="Negative prompt from VAR Text Encode: the unconditional side of guidance. Not "
                            "connected or empty: the model's own no-text embedding.",
                ),
            ],
            outputs=[
                io.Image.Output(display_name="IMAGE", tooltip="The generated images."),
                VarPyramid.Output(display_name="VAR_PYRAMID",
                                  tooltip="The generated bits of every scale (decode them with VAR Decode Pyramid)."),
            ],
        )

    @classmethod
    def execute(cls, model: VARModel, vae: VARVAE, text: VARText, seed: int = 0, cfg: float = DEFAULTS.cfg,
                tau: float = DEFAULTS.tau, top_k: int = DEFAULTS.top_k, top_p: float = DEFAULTS.top_p,
                next_scale: str = DEFAULTS.next_scale, aspect_ratio: str = "1.000", pixel_budget: str = "1M",
                batch_size: int = 1, negative_text: VARText | None = None) -> io.NodeOutput:
        if aspect_ratio not in ASPECTS:  # ComfyUI 0.3.75 does not check V3 combo values itself
            raise var_core.ParameterError(f"aspect_ratio {aspect_ratio!r} is not one of {', '.join(ASPECTS)}")
        schedule = scale_schedule(ASPECTS[aspect_ratio], pixel_budget)
        options = _sampler_options(seed, cfg, tau, top_k, top_p, next_scale)
        _check_vae(model, vae, "VAR Text to Image")
        condition = _condition(model, text, "text")
        negative = _condition(model, negative_text, "negative text")
        _warn_if_student(model, "VAR Text to Image")
        batch = int(batch_size)
        device = model.patcher.load_device
        vae_patcher = patching.on_device(vae.patcher, device, "VAE")
        guided = any(c != 1 for c in options.per_scale(len(schedule))[0])
        mm.load_models_gpu([model.patcher, vae_patcher],
                           memory_required=sampler_memory_required(model, vae, schedule, guided=guided))
        height, width = schedule_pixels(schedule)
        n = len(schedule)
        logger.info("VAR text to image: %d image(s) of %dx%d, %d scales", batch, width, height, n)
        total = n * batch
        pbar = comfy.utils.ProgressBar(total)
        previews = args.preview_method != LatentPreviewMethod.NoPreviews

        def callback(i: int, step: var_sampler.ScaleProgress) -> None:
            preview = _preview(step.codes) if previews else None
            pbar.update_absolute(i * n + step.index + 1, total, preview)

        with torch.inference_mode(), autocast_for(model):
            result = var_sampler.generate(
                model.module, vae.module, condition, schedule, options, batch=batch, negative_text=negative,
                callback=callback, check_interrupt=mm.throw_exception_if_processing_interrupted, device=device,
            )
        store = mm.intermediate_device()
        images = var_image.from_model(result.image.float().clamp(-1, 1)).to(store)
        pyramid = Pyramid(schedule=list(schedule), bits=[b.to(store) for b in result.bits],
                          image_size=(height, width))
        return io.NodeOutput(images, pyramid)


NODES = [VARIterativeRestore, VARTextToImage]
