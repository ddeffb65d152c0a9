"""Nodes for every model family: load a VAR VQVAE or any transformer, restore with any restoration
family (VARestorer, VARSR, RestoreVAR) in one node, and class-conditional VAR generation."""

from __future__ import annotations

import dataclasses
import logging

import comfy.model_management as mm
import comfy.ops
import comfy.utils
import torch
from comfy_api.latest import io

from .. import var_core
from ..var_core import family_restore as var_family
from ..var_core import image as var_image
from ..var_core import restore as var_restore
from . import categories, folders, patching
from .student import (
    DTYPES,
    _check_dtype_choice,
    autocast_for,
    load_transformer,
    memory_required as student_memory_required,
    require_family,
    restore_each,
    tile_inputs,
)
from .types import VARVAE, VARVQVAE, VARModel, VARSwinIR, VARText, VarModel, VarSwinIR, VarText, VarVAE, VarVQVAE
from .vae import memory_required as vae_memory_required

logger = logging.getLogger(__name__)

Family = var_core.Family
MODEL_FAMILIES = (Family.INFINITY, Family.VARSR, Family.RESTOREVAR, Family.VAR)
VARSR_DEFAULTS = var_family.VARSROptions()
NAMES = {Family.INFINITY: "VARestorer", Family.VARSR: "VARSR", Family.RESTOREVAR: "RestoreVAR", Family.VAR: "VAR"}


def transformer_memory_required(model: VARModel, vqvae: VARVQVAE, out_hw: tuple[int, int] | None = None,
                                *, rows: int) -> int:
    """Rough working memory (bytes) of one model-sized VAR-family run (VARSR, RestoreVAR, VAR).

    The kv cache of every block over the whole token sequence (``rows`` = 2 with classifier-free
    guidance), the last scale's activations and attention scores, the VQVAE at the model's image
    size, and the blending buffers of a tiled ``out_hw`` output.
    """
    cfg = model.config
    p = cfg.patch_nums[-1]
    side = p * vqvae.config.downsample
    tokens = cfg.num_tokens
    kv_cache = cfg.depth * 2 * tokens * cfg.embed_dim * rows * 4
    activations = rows * p * p * (8 * cfg.embed_dim + 2 * cfg.mlp_hidden) * 4
    scores = rows * cfg.num_heads * p * p * tokens * 4
    blend = out_hw[0] * out_hw[1] * 3 * 4 * 4 if out_hw is not None else 0
    return int(kv_cache + activations + scores + vae_memory_required(vqvae, side, side) + blend)


class VARLoadVQVAE(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        names = folders.filenames()
        return io.Schema(
            node_id="VARLoadVQVAE",
            display_name="Load VAR VQVAE (VAR / VARSR / RestoreVAR)",
            category=categories.LOADERS,
            description=(
                "Loads the multi-scale VQVAE of the original VAR (vae_ch160v4096z32.pth), VARSR (VQVAE.pth) or "
                "RestoreVAR (vae_restorevar.ckpt) from models/var/. The architecture is read from the weights. "
                "Connect it to VAR Restore (VARSR, RestoreVAR) or VAR Class to Image, with the model it belongs to."
            ),
            inputs=[
                io.Combo.Input(
                    "vqvae_name", options=names, default=folders.pick_default(names, folders.OFFICIAL_VQVAE),
                    tooltip=f"VQVAE weights in models/{folders.FOLDER}/: vae_ch160v4096z32.pth (VAR), VQVAE.pth "
                            "(VARSR) or vae_restorevar.ckpt (RestoreVAR).",
                ),
                io.Combo.Input(
                    "weight_dtype", options=["auto", "fp32", "bf16"], default="auto",
                    tooltip="Precision of the VQVAE. auto is fp32 (the codes are nearest-neighbour decisions); bf16 "
                            "halves the memory and computes in bf16 (some codes change). fp16 is not offered: these "
                            "VAEs overflow in it.",
                ),
            ],
            outputs=[VarVQVAE.Output(display_name="VAR_VQVAE", tooltip="The loaded VQVAE.")],
        )

    @classmethod
    def execute(cls, vqvae_name: str, weight_dtype: str = "auto") -> io.NodeOutput:
        _check_dtype_choice(weight_dtype, "fp16 overflows in this VAE")
        dtype = DTYPES.get(weight_dtype, torch.float32)
        load_device = mm.vae_device()
        offload_device = mm.vae_offload_device()
        # Plain layers in either precision: the VQVAE casts its inputs to its weights' dtype (as the BSQ VAE).
        loaded = var_core.load(folders.full_path(vqvae_name, folders.OFFICIAL_VQVAE), expect=Family.VAR_VQVAE,
                               operations=comfy.ops.disable_weight_init)
        module = loaded.model.to(device=offload_device, dtype=dtype).eval()
        patcher = patching.make_patcher(module, load_device=load_device, offload_device=offload_device)
        cfg = loaded.config
        logger.info("VAR VQVAE %s: %d codes x %d channels, /%d, load device %s, dtype %s", vqvae_name, cfg.vocab_size,
                    cfg.z_channels, cfg.downsample, load_device, dtype)
        return io.NodeOutput(VARVQVAE(patcher=patcher, name=vqvae_name, dtype=dtype))


class VARLoadModel(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        names = folders.filenames()
        return io.Schema(
            node_id="VARLoadModel",
            display_name="Load VAR Model (any family)",
            category=categories.LOADERS,
            description=(
                "Loads any transformer of the pack from models/var/ and detects its family from the weights: "
                "VARestorer / Infinity (varestorer.pth, infinity_2b_reg.pth), VARSR (VARSR.pth), RestoreVAR "
                "(restorevar.pth) or the class-conditional VAR (var_d16.pth ...). Restore with VAR Restore (with "
                "the model's VAE: Load VAR VAE for VARestorer, Load VAR VQVAE for VARSR / RestoreVAR); generate "
                "with VAR Class to Image (VAR) or the Infinity nodes."
            ),
            inputs=[
                io.Combo.Input(
                    "model_name", options=names, default=folders.pick_default(names, folders.OFFICIAL_MODELS),
                    tooltip=f"Transformer weights in models/{folders.FOLDER}/ (varestorer.pth, VARSR.pth, "
                            "restorevar.pth, var_d16.pth, ...); the family is read from the file.",
                ),
                io.Boolean.Input(
                    "merge_lora", default=True,
                    tooltip="VARestorer only: fold the LoRA adapters into the weights at load time (faster, same "
                            "result up to rounding). Other families have no adapters.",
                ),
                io.Combo.Input(
                    "weight_dtype", options=["auto", "fp32", "bf16"], default="auto",
                    tooltip="Precision of the weights. auto: VARestorer / Infinity bf16 on GPUs that run it well, "
                            "fp32 elsewhere; VARSR, RestoreVAR and VAR fp32 (bf16 on request, computed under bf16 "
                            "autocast on CUDA). fp16 is not offered: it can overflow.",
                ),
            ],
            outputs=[VarModel.Output(display_name="VAR_MODEL", tooltip="The loaded transformer (its family included).")],
        )

    @classmethod
    def execute(cls, model_name: str, merge_lora: bool = True, weight_dtype: str = "auto") -> io.NodeOutput:
        return io.NodeOutput(load_transformer(model_name, families=MODEL_FAMILIES, weight_dtype=weight_dtype,
                                              merge_lora=merge_lora))


def _check_pairing(model: VARModel, vae, node: str) -> None:
    """A clear error for a VAE of the wrong kind (or codebook) for the model's family."""
    name = NAMES.get(model.family, model.family)
    if model.family == Family.INFINITY:
        if not isinstance(vae, VARVAE):
            raise var_core.ParameterError(
                f"{node}: {model.name} is VARestorer / Infinity, which restores with the Infinity BSQ VAE "
                f"(infinity_vae_d32reg.pth from Load VAR VAE), but the connected VAE {vae.name} is a VAR VQVAE; "
                "connect the Load VAR VAE output"
            )
        if vae.config.codebook_dim != model.config.codebook_dim:
            raise var_core.ParameterError(
                f"{node}: the VAE {vae.name} has {vae.config.codebook_dim}-bit tokens but {model.name} reads "
                f"{model.config.codebook_dim}-bit tokens; use the VAE that belongs to the model"
            )
        return
    if not isinstance(vae, VARVQVAE):
        official = {Family.VARSR: "VQVAE.pth", Family.RESTOREVAR: "vae_restorevar.ckpt"}.get(
            model.family, "vae_ch160v4096z32.pth")
        raise var_core.ParameterError(
            f"{node}: {model.name} is {name}, which works with its VAR VQVAE ({official} from Load VAR VQVAE), but "
            f"the connected VAE {vae.name} is the Infinity BSQ VAE of VARestorer; connect the Load VAR VQVAE output"
        )
    cfg, vq = model.config, vae.config
    if (vq.z_channels, vq.vocab_size) != (cfg.codebook_dim, cfg.vocab_size):
        raise var_core.ParameterError(
            f"{node}: the VQVAE {vae.name} ({vq.vocab_size} codes x {vq.z_channels} channels) does not belong to "
            f"{model.name} ({name}: {cfg.vocab_size} codes x {cfg.codebook_dim} channels); load the VQVAE the "
            "model was trained with"
        )


class VARRestore(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="VARRestore",
            display_name="VAR Restore / Super-Resolution (VARestorer / VARSR / RestoreVAR)",
            category=categories.RESTORE,
            description=(
                "Restores and upscales images (real-world super-resolution, denoise, deblur, all-in-one "
                "restoration) with any restoration family, picked from the connected model: VARestorer (one "
                "step per tile, with the Infinity VAE, optional SwinIR and text), VARSR (x4 super-resolution by "
                "next-scale prediction with image guidance and a diffusion refiner) or RestoreVAR (all-in-one "
                "restoration at the input size). The image is resized by the scale factor and restored in "
                "overlapping tiles (each resized to the model's input size for VARSR / RestoreVAR), blended "
                "without seams. Options of the other families are ignored. Alpha is kept."
            ),
            inputs=[
                VarModel.Input("model", tooltip="A restoration transformer from Load VAR Model (or Load VARestorer "
                                                "Model): VARestorer, VARSR or RestoreVAR."),
                io.MultiType.Input(
                    "vae", types=[VarVAE, VarVQVAE],
                    tooltip="The model's own VAE: the Infinity BSQ VAE (Load VAR VAE) for VARestorer, the VQVAE (Load "
                            "VAR VQVAE: VQVAE.pth / vae_restorevar.ckpt) for VARSR / RestoreVAR.",
                ),
                io.Image.Input("image", tooltip="Low-quality images to restore (any size, RGB or RGBA)."),
                io.Int.Input(
                    "seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                    tooltip="Seed of the sampling; image i of a batch uses seed + i. VARestorer: the Gumbel noise "
                            "(unused by argmax); VARSR: token draws and refiner noise; RestoreVAR: unused (greedy).",
                ),
                *tile_inputs(
                    scale_tooltip=("Output size / input size; the image is resized (bicubic) by it, then "
                                   "each tile is restored at that size. VARestorer and VARSR are x4 models; "
                                   "RestoreVAR restores at 1x (use 1)."),
                    tile_tooltip=("Tile side in output pixels; 512 is what the released models were trained"
                                  " on (VARSR / RestoreVAR tiles are resized to the model's input size). "
                                  "Images that fit in one tile are restored whole. Out of memory: the tile "
                                  "is halved and retried."),
                ),
                io.Combo.Input(
                    "color_fix", options=list(var_family.COLOR_FIX_CHOICES), default="auto",
                    tooltip="auto: each family's official colour handling (VARSR: AdaIN on each tile towards its "
                            "input; VARestorer and RestoreVAR: none). none / wavelet / adain: applied to the whole "
                            "restored image towards the resized input (VARSR's own AdaIN then off).",
                ),
                io.Combo.Input(
                    "sampling", options=list(var_restore.SAMPLING_MODES), default="gumbel",
                    tooltip="VARestorer: gumbel = the official temperature-0.5 Gumbel draw of the bits (seeded); "
                            "argmax = deterministic.",
                ),
                io.Float.Input(
                    "varsr_cfg", default=VARSR_DEFAULTS.cfg, min=0.0, max=30.0, step=0.1,
                    tooltip="VARSR: image classifier-free guidance, ramped linearly over the scales (official 6); "
                            "also the refiner's guidance.",
                ),
                io.Int.Input(
                    "varsr_refiner_steps", default=VARSR_DEFAULTS.steps, min=1, max=1000,
                    tooltip="VARSR: diffusion refiner steps after the last scale (official 10).",
                ),
                io.Int.Input(
                    "varsr_top_k", default=VARSR_DEFAULTS.top_k, min=0, max=10000,
                    tooltip="VARSR: top-k of the token draw; 1 = greedy (official), 0 = off.",
                ),
                io.Float.Input(
                    "varsr_top_p", default=VARSR_DEFAULTS.top_p, min=0.0, max=1.0, step=0.01,
                    tooltip="VARSR: nucleus filtering of the token draw (official 0.75; 0 = off).",
                ),
                io.Boolean.Input(
                    "restorevar_refine", default=True,
                    tooltip="RestoreVAR: run the latent refiner when the checkpoint has it (official).",
                ),
                VarText.Input(
                    "text", optional=True,
                    tooltip="VARestorer: prompt from VAR Text Encode (T5). Not connected: unconditional. Not used "
                            "by VARSR / RestoreVAR.",
                ),
                VarSwinIR.Input(
                    "swinir", optional=True,
                    tooltip="VARestorer: SwinIR pre-cleaner from Load SwinIR Pre-cleaner, run on each tile. Not used "
                            "by VARSR / RestoreVAR.",
                ),
            ],
            outputs=[io.Image.Output(display_name="IMAGE", tooltip="Restored images (RGBA when the input had alpha).")],
        )

    @classmethod
    def execute(cls, model: VARModel, vae, image: torch.Tensor, seed: int = 0, scale: float = 4.0,
                tile_size: int = 512, tile_overlap: int = 64, color_fix: str = "auto", sampling: str = "gumbel",
                varsr_cfg: float = VARSR_DEFAULTS.cfg, varsr_refiner_steps: int = VARSR_DEFAULTS.steps,
                varsr_top_k: int = VARSR_DEFAULTS.top_k, varsr_top_p: float = VARSR_DEFAULTS.top_p,
                restorevar_refine: bool = True, text: VARText | None = None,
                swinir: VARSwinIR | None = None) -> io.NodeOutput:
        node = "VAR Restore"
        require_family(model, var_family.RESTORE_FAMILIES, node,
                       "It generates images, it does not restore them: use VAR Class to Image for the class-"
                       "conditional VAR; VAR Restore takes VARestorer, VARSR or RestoreVAR.")
        _check_pairing(model, vae, node)
        family = model.family
        whole_fix, tile_adain = var_family.resolve_color_fix(family, color_fix)
        options = var_restore.RestoreOptions(scale=float(scale), tile=int(tile_size), overlap=int(tile_overlap),
                                             sampling=sampling, seed=int(seed), color_fix=whole_fix)
        varsr = var_family.VARSROptions(cfg=float(varsr_cfg), steps=int(varsr_refiner_steps), top_k=int(varsr_top_k),
                                        top_p=float(varsr_top_p), tile_adain=tile_adain)
        condition = None
        if family == Family.INFINITY:
            condition = None if text is None else text.condition
            if condition is not None and condition.kv_compact.shape[-1] != model.config.text_channels:
                raise var_core.ParameterError(
                    f"{node}: the text has {condition.kv_compact.shape[-1]}-channel T5 features but {model.name} takes "
                    f"{model.config.text_channels} channels; encode the prompt with the T5 that belongs to the model"
                )
        else:
            for what, given in (("text", text), ("SwinIR", swinir)):
                if given is not None:
                    logger.warning("%s: the %s input is for VARestorer; %s is %s, so it is not used", node, what,
                                   model.name, NAMES[family])
            swinir = None
        if family == Family.RESTOREVAR and options.scale != 1:
            logger.info("%s: RestoreVAR restores at the input size; the image is resized x%g first", node,
                        options.scale)
        device = model.patcher.load_device
        vae_patcher = patching.on_device(vae.patcher, device, "VAE")
        # The size is refused (above MAX_SIDE) before split_alpha copies the pixels.
        out_h, out_w = var_restore.output_size(*var_image.image_size(image), options.scale)
        rgb, alpha = var_image.split_alpha(image)
        batch, h, w, _ = rgb.shape
        per_image = var_restore.count_steps(h, w, options)
        patchers = [model.patcher, vae_patcher]
        if swinir is not None:
            patchers.append(patching.on_device(swinir.patcher, device, "SwinIR"))
        if family == Family.INFINITY:
            work_hw = var_restore.tile_pixels(out_h, out_w, options.tile)
            memory = student_memory_required(model, vae, swinir, work_hw, (out_h, out_w),
                                             tiles=min(options.tiles_per_batch(device), per_image))
        else:
            memory = transformer_memory_required(model, vae, (out_h, out_w), rows=2 if family == Family.VARSR else 1)
        mm.load_models_gpu(patchers, memory_required=memory)
        logger.info("VAR restore (%s, %s): %d image(s) %dx%d -> %dx%d, %d tile(s) per image", NAMES[family],
                    model.name, batch, w, h, out_w, out_h, per_image)
        return io.NodeOutput(restore_each(
            model, rgb, alpha, per_image, lambda x, i, progress: var_family.restore_any(
                model.module, vae.module, x, options=dataclasses.replace(options, seed=options.seed + i), varsr=varsr,
                restorevar_refine=None if restorevar_refine else False, text=condition,
                swinir=None if swinir is None else swinir.module, progress=progress,
                check_interrupt=mm.throw_exception_if_processing_interrupted, device=device)))


class VARClassToImage(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="VARClassToImage",
            display_name="VAR Class to Image",
            category=categories.SAMPLING,
            description=(
                "Generates images of an ImageNet class with the original class-conditional VAR (var_d16.pth ... "
                "var_d30.pth, with vae_ch160v4096z32.pth): next-scale prediction with classifier-free guidance on "
                "the official linear ramp over the scales and top-k / top-p sampling (defaults: the official demo). "
                "Image i of the batch uses seed + i."
            ),
            inputs=[
                VarModel.Input("model", tooltip="The class-conditional VAR transformer from Load VAR Model "
                                                "(var_d16.pth ...)."),
                VarVQVAE.Input("vqvae", tooltip="The VAR VQVAE (vae_ch160v4096z32.pth) from Load VAR VQVAE."),
                io.Int.Input(
                    "class_index", default=207, min=-1, max=9999,
                    tooltip="Class to draw: an ImageNet index 0..999 for the released models (207 = golden "
                            "retriever); -1 = unconditional.",
                ),
                io.Int.Input(
                    "seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                    tooltip="Seed of the sampling; image i of the batch uses seed + i.",
                ),
                io.Float.Input(
                    "cfg", default=4.0, min=0.0, max=30.0, step=0.1,
                    tooltip="Classifier-free guidance, ramped linearly from 0 at the first scale to cfg at the last "
                            "(official demo 4); 0 = unguided.",
                ),
                io.Int.Input(
                    "top_k", default=900, min=0, max=100000,
                    tooltip="Keep the top_k most likely tokens per position (official 900; 1 = greedy; 0 = off).",
                ),
                io.Float.Input(
                    "top_p", default=0.95, min=0.0, max=1.0, step=0.01,
                    tooltip="Nucleus filtering of the token draw (official 0.95; 0 = off).",
                ),
                io.Boolean.Input(
                    "more_smooth", default=False,
                    tooltip="The official Gumbel-softmax soft-code option (smoother, less detailed); off by default.",
                ),
                io.Int.Input("batch_size", default=1, min=1, max=64,
                             tooltip="Number of images, sampled one after another."),
            ],
            outputs=[io.Image.Output(display_name="IMAGE", tooltip="The generated images.")],
        )

    @classmethod
    def execute(cls, model: VARModel, vqvae: VARVQVAE, class_index: int = 207, seed: int = 0, cfg: float = 4.0,
                top_k: int = 900, top_p: float = 0.95, more_smooth: bool = False,
                batch_size: int = 1) -> io.NodeOutput:
        node = "VAR Class to Image"
        require_family(model, (Family.VAR,), node,
                       "It needs the class-conditional VAR (var_d16.pth ...); restore with VAR Restore.")
        _check_pairing(model, vqvae, node)
        device = model.patcher.load_device
        vq_patcher = patching.on_device(vqvae.patcher, device, "VQVAE")
        mm.load_models_gpu([model.patcher, vq_patcher], memory_required=transformer_memory_required(model, vqvae, rows=2))
        batch = int(batch_size)
        logger.info("VAR class to image (%s): %d image(s) of class %d, cfg %g", model.name, batch, class_index, cfg)
        pbar = comfy.utils.ProgressBar(batch)
        with torch.inference_mode(), autocast_for(model):
            y = var_family.generate_class_images(
                model.module, vqvae.module, int(class_index), batch=batch, seed=int(seed), cfg=float(cfg),
                top_k=int(top_k), top_p=float(top_p), more_smooth=bool(more_smooth),
                progress=lambda done, total: pbar.update_absolute(done, total),
                check_interrupt=mm.throw_exception_if_processing_interrupted,
            )
        return io.NodeOutput(var_image.from_model(y.float()).to(mm.intermediate_device()))


NODES = [VARLoadVQVAE, VARLoadModel, VARRestore, VARClassToImage]
