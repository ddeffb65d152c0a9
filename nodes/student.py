"""VARestorer one-step restoration nodes: load the student transformer and the SwinIR pre-cleaner,
restore images (or an encoded pyramid) in one forward pass per tile."""

from __future__ import annotations

import contextlib
import dataclasses
import logging

import comfy.model_management as mm
import comfy.ops
import comfy.utils
import torch
from comfy_api.latest import io

from .. import var_core
from ..var_core import image as var_image
from ..var_core import loading as var_loading
from ..var_core import lora as var_lora
from ..var_core import pyramid as var_pyramid
from ..var_core import restore as var_restore
from ..var_core.colorfix import MODES as COLOR_FIX_MODES
from ..var_core.detect import DESCRIPTIONS
from ..var_core.tiling import count_tiles
from . import categories, folders, patching
from .dependencies import optional_dependencies
from .types import VARVAE, VARModel, VARSwinIR, VARText, VarModel, VarPyramid, VarSwinIR, VarText, VarVAE
from .vae import encode_each, memory_required as vae_memory_required

logger = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _check_dtype_choice(choice: str, what: str) -> None:
    if choice != "auto" and choice not in DTYPES:  # ComfyUI 0.3.75 does not check V3 combo values itself
        raise var_core.ParameterError(
            f"weight_dtype {choice!r} is not one of auto, {', '.join(DTYPES)} ({what})"
        )


def resolve_student_dtype(choice: str, device: torch.device) -> torch.dtype:
    """``auto``: bfloat16 where ComfyUI says the device runs it well (``should_use_bf16``: recent
    CUDA GPUs), else float32 (the CPU, older GPUs).

    float16 is not offered: the transformer's residual stream is kept in float32 (as in the
    official code), but the attention and MLP outputs added to it are computed in the weights'
    precision under autocast, and Infinity was trained in bfloat16, whose range float16 lacks
    (activations past 65504 overflow to inf). bf16 weights are stored with ``comfy.ops.manual_cast``
    layers, which cast them to the input's precision; on CUDA the node runs under bf16 autocast.
    """
    _check_dtype_choice(choice, "fp16 can overflow in the transformer")
    if choice in DTYPES:
        return DTYPES[choice]
    return torch.bfloat16 if mm.should_use_bf16(device) else torch.float32


def resolve_swinir_dtype(choice: str) -> torch.dtype:
    """``auto`` is float32 (SwinIR is small); fp16 is not offered: SwinIR produces NaN in it."""
    _check_dtype_choice(choice, "SwinIR produces NaN in fp16")
    return DTYPES.get(choice, torch.float32)


def operations_for(dtype: torch.dtype):
    """``comfy.ops`` namespace for weights stored in ``dtype``: plain (streamable) layers for float32,
    casting layers for half weights (the models' float32 activations meet them)."""
    return comfy.ops.disable_weight_init if dtype == torch.float32 else comfy.ops.manual_cast


def autocast_for(model: VARModel):
    """bf16 autocast on CUDA for a bf16 transformer (the whole restore: SwinIR, VAE and transformer,
    as the CLI does); float32 and CPU runs need none."""
    device = torch.device(model.patcher.load_device)
    if device.type == "cuda" and model.dtype == torch.bfloat16:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


OVERLAP_TOOLTIP = ("Overlap between neighbouring tiles in output pixels (blended with Gaussian weights); must be "
                   "smaller than the tile size.")


def tile_inputs(*, scale_tooltip: str, tile_tooltip: str) -> list:
    """The ``scale``, ``tile_size`` and ``tile_overlap`` widgets of the restore nodes (one set of limits)."""
    return [
        io.Float.Input("scale", default=4.0, min=0.25, max=var_restore.MAX_SCALE, step=0.05, tooltip=scale_tooltip),
        io.Int.Input("tile_size", default=512, min=64, max=4096, step=16, tooltip=tile_tooltip),
        io.Int.Input("tile_overlap", default=64, min=0, max=4064, step=8, tooltip=OVERLAP_TOOLTIP),
    ]


def restore_each(model: VARModel, rgb_BHW3: torch.Tensor, alpha_BHW1: torch.Tensor | None, per_image: int,
                 restore_one) -> torch.Tensor:
    """Restore a batch image by image under one progress bar of ``per_image`` steps per image.

    ``restore_one(x_13HW, i, progress)`` restores image ``i`` (in [-1, 1]; it gives image ``i``
    its own seed) and reports ``progress(done, of)``; the results are gathered on ComfyUI's
    intermediate device and the alpha channel is merged back: the node's IMAGE.
    """
    store = mm.intermediate_device()
    total = per_image * rgb_BHW3.shape[0]
    pbar = comfy.utils.ProgressBar(total)
    images = []
    with torch.inference_mode(), autocast_for(model):
        for i in range(rgb_BHW3.shape[0]):
            mm.throw_exception_if_processing_interrupted()

            def progress(done: int, of: int, start: int = i * per_image) -> None:
                pbar.update_absolute(start + round(done * per_image / max(of, 1)), total)

            y = restore_one(var_image.to_model(rgb_BHW3[i : i + 1]), i, progress)
            images.append(var_image.from_model(y.float()).to(store))
    out = torch.cat(images, dim=0)
    return var_image.merge_alpha(out, None if alpha_BHW1 is None else alpha_BHW1.to(store))


def memory_required(model: VARModel, vae: VARVAE, swinir: VARSwinIR | None, tile_hw: tuple[int, int],
                    out_hw: tuple[int, int], *, tiles: int = 1) -> int:
    """Rough working memory (bytes) of restoring one image ``tiles`` tiles at a time.

    Per tile: the transformer's activations over the token pyramid (all scales plus the repeated
    last scale, ~3.5 x the latent tokens, float32 residual stream plus attention/MLP branches), and
    the larger of the VAE's and SwinIR's. Per image: the blending buffers of the whole output.
    """
    th, tw = tile_hw
    H, W = out_hw
    cfg = model.config
    tokens = 3.5 * th * tw / 256
    transformer = tokens * (8 * cfg.embed_dim + 2 * cfg.mlp_hidden) * 4
    cleaner = th * tw * 64 * 4 * 6 if swinir is not None else 0
    blend = H * W * 3 * 4 * 4
    return int(tiles * (transformer + max(vae_memory_required(vae, th, tw), cleaner)) + blend)


class TileBits:
    """The predicted bits of each tile of each image of a restore (collected through ``on_bits``),
    made into the node's ``VAR_PYRAMID`` output."""

    def __init__(self, batch: int):
        self.tiles: list[list[tuple[list[torch.Tensor], list]]] = [[] for _ in range(batch)]

    def collector(self, i: int):
        """The ``on_bits(bits, schedule)`` callback of image ``i``; bits go to the intermediate device."""
        store = mm.intermediate_device()
        return lambda bits, schedule: self.tiles[i].append(([b.to(store) for b in bits], list(schedule)))

    def pyramid(self, vae: VARVAE, restored_BHWC: torch.Tensor, alpha_BHW1, device) -> var_pyramid.Pyramid:
        """Every image restored as one tile: its predicted bits (exact), at the restored size. Tiled:
        no single prediction covers the image, so the restored images are encoded by the VAE (loaded
        on ``device``), which fits them to an Infinity schedule of at most ~1M pixels."""
        size = tuple(restored_BHWC.shape[1:3])
        if all(len(tiles) == 1 for tiles in self.tiles):
            bits = [torch.cat(scale, dim=0) for scale in zip(*(tiles[0][0] for tiles in self.tiles))]
            return var_pyramid.Pyramid(schedule=self.tiles[0][0][1], bits=bits, image_size=size, alpha=alpha_BHW1)
        logger.info("VAR One-Step Restore: the image was restored in tiles; its VAR_PYRAMID output is the VAE "
                    "encoding of the restored image")
        with torch.inference_mode():
            return encode_each(vae, restored_BHWC[..., :3], alpha_BHW1, device=device)


class VARLoadStudent(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        names = folders.filenames()
        return io.Schema(
            node_id="VARLoadStudent",
            display_name="Load VARestorer Model",
            category=categories.LOADERS,
            description=(
                "Loads the VARestorer one-step restoration / super-resolution transformer (varestorer.pth: "
                "Infinity-2B with LoRA adapters) from models/var/. The architecture is read from the weights. Use "
                "it with VAR One-Step Restore and the Infinity VAE (infinity_vae_d32reg.pth). It also loads the "
                "Infinity teacher (infinity_2b_reg.pth) for VAR Iterative Restore and VAR Text to Image; "
                "strip_lora turns varestorer.pth into that teacher."
            ),
            inputs=[
                io.Combo.Input(
                    "model_name",
                    options=names,
                    default=folders.pick_default(names, folders.OFFICIAL_STUDENT),
                    tooltip=f"Transformer weights in models/{folders.FOLDER}/ (the official file is varestorer.pth).",
                ),
                io.Boolean.Input(
                    "merge_lora",
                    default=True,
                    tooltip=(
                        "Fold the LoRA adapters into the weights once at load time (faster, same result up to "
                        "rounding). Off keeps them as separate layers."
                    ),
                ),
                io.Combo.Input(
                    "weight_dtype",
                    options=["auto", "fp32", "bf16"],
                    default="auto",
                    tooltip=(
                        "Precision of the transformer weights. auto: bf16 on GPUs that run it well (computed "
                        "under bf16 autocast), fp32 elsewhere (CPU). fp16 is not offered: it can overflow."
                    ),
                ),
                io.Boolean.Input(
                    "strip_lora",
                    default=False,
                    optional=True,
                    tooltip=(
                        "Drop the LoRA adapters, leaving the Infinity-2B base weights: the iterative teacher of "
                        "VAR Iterative Restore / VAR Text to Image, from the VARestorer file itself. Off for "
                        "VAR One-Step Restore."
                    ),
                ),
            ],
            outputs=[VarModel.Output(display_name="VAR_MODEL", tooltip="The loaded VARestorer transformer.")],
        )

    @classmethod
    def execute(cls, model_name: str, merge_lora: bool = True, weight_dtype: str = "auto",
                strip_lora: bool = False) -> io.NodeOutput:
        return io.NodeOutput(load_transformer(model_name, families=(var_core.Family.INFINITY,), merge_lora=merge_lora,
                                              weight_dtype=weight_dtype, strip_lora=strip_lora))


def resolve_model_dtype(choice: str, family: str, device: torch.device) -> torch.dtype:
    """The weights' precision for a transformer of ``family``: Infinity as :func:`resolve_student_dtype`;
    VAR, VARSR and RestoreVAR default to float32 (they are small, and their reference numerics are
    float32; bf16 weights are offered and computed under bf16 autocast on CUDA)."""
    if family == var_core.Family.INFINITY:
        return resolve_student_dtype(choice, device)
    _check_dtype_choice(choice, "fp16 can overflow in the transformer")
    return DTYPES.get(choice, torch.float32)


def load_transformer(model_name: str, *, families: tuple[str, ...], weight_dtype: str = "auto",
                     merge_lora: bool = True, strip_lora: bool = False) -> VARModel:
    """Load a transformer of one of ``families`` from ``models/var`` into a :class:`VARModel` (shared by
    Load VARestorer Model and Load VAR Model). The family is detected from the keys; another family
    fails with a message naming both. Infinity: LoRA stripped / merged as asked."""
    _check_dtype_choice(weight_dtype, "fp16 can overflow in the transformer")
    load_device = mm.get_torch_device()
    offload_device = mm.unet_offload_device()
    official = folders.OFFICIAL_MODELS if var_core.Family.VAR in families else folders.OFFICIAL_STUDENT
    path = folders.full_path(model_name, official)
    family, sd = var_core.inspect(path)
    var_loading.check_family(family, families, path)
    dtype = resolve_model_dtype(weight_dtype, family, load_device)
    with optional_dependencies(f"Loading {model_name}"):
        loaded = var_core.load(sd, operations=operations_for(dtype))
    del sd
    module = loaded.model
    lora_state = "none"
    if family == var_core.Family.INFINITY:
        if strip_lora:
            if module.lora_state == "adapters":
                logger.info("VAR model %s: LoRA adapters stripped, the Infinity base model (iterative teacher)",
                            model_name)
            var_lora.strip_lora(module)  # before merging: nothing is left to merge
        if merge_lora and module.lora_state == "adapters":
            var_lora.merge_lora(module)  # in the file's precision, before any rounding to bf16
        if module.lora_state == "none" and not strip_lora:
            logger.warning(
                "VAR model %s has no LoRA adapters: fine for a merged VARestorer export or for the iterative "
                "nodes, but the Infinity base model (infinity_2b_reg.pth) does not restore in one step", model_name,
            )
        lora_state = module.lora_state
    module = module.to(device=offload_device, dtype=dtype).eval()
    patcher = patching.make_patcher(module, load_device=load_device, offload_device=offload_device)
    cfg = loaded.config
    logger.info(
        "VAR model %s: %s, depth %d, width %d, LoRA %s, load device %s, dtype %s", model_name,
        loaded.description, cfg.depth, cfg.embed_dim, lora_state, load_device, dtype,
    )
    return VARModel(patcher=patcher, name=model_name, dtype=dtype, lora=lora_state, family=family)


def require_family(model: VARModel, families: tuple[str, ...], node: str, hint: str) -> None:
    """Refuse a ``VAR_MODEL`` of a family ``node`` cannot run, saying what it is and what to use."""
    if model.family not in families:
        raise var_core.ParameterError(
            f"{node} cannot run {model.name}: it is the {DESCRIPTIONS[model.family]}. {hint}"
        )


class VARLoadSwinIR(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        names = folders.swinir_filenames()
        return io.Schema(
            node_id="VARLoadSwinIR",
            display_name="Load SwinIR Pre-cleaner (VAR)",
            category=categories.LOADERS,
            description=(
                "Loads the SwinIR restorer (denoise / deblur pre-cleaner) that VARestorer runs on each "
                "low-quality tile before encoding it (DiffBIR's general_swinir_v1.ckpt) from ComfyUI's "
                "models/upscale_models/ or models/var/. Connect it to VAR One-Step Restore or VAR Restore."
            ),
            inputs=[
                io.Combo.Input(
                    "swinir_name",
                    options=names,
                    default=folders.pick_default(names, folders.OFFICIAL_SWINIR),
                    tooltip=f"SwinIR weights in models/{folders.UPSCALE_MODELS}/ or models/{folders.FOLDER}/ (both "
                            "listed; the official file is general_swinir_v1.ckpt).",
                ),
                io.Combo.Input(
                    "weight_dtype",
                    options=["auto", "fp32", "bf16"],
                    default="auto",
                    tooltip="Precision of the SwinIR weights. auto is fp32 (the model is small). fp16 is not "
                            "offered: SwinIR produces NaN in it.",
                ),
            ],
            outputs=[VarSwinIR.Output(display_name="VAR_SWINIR", tooltip="The loaded SwinIR pre-cleaner.")],
        )

    @classmethod
    def execute(cls, swinir_name: str, weight_dtype: str = "auto") -> io.NodeOutput:
        load_device = mm.get_torch_device()
        offload_device = mm.unet_offload_device()
        dtype = resolve_swinir_dtype(weight_dtype)
        path = folders.swinir_path(swinir_name)
        loaded = var_core.load(path, expect=var_core.Family.SWINIR, operations=operations_for(dtype))
        module = loaded.model.to(device=offload_device, dtype=dtype).eval()
        patcher = patching.make_patcher(module, load_device=load_device, offload_device=offload_device)
        logger.info("VAR SwinIR %s: %s, load device %s, dtype %s", swinir_name, loaded.description, load_device,
                    dtype)
        return io.NodeOutput(VARSwinIR(patcher=patcher, name=swinir_name, dtype=dtype))


class VAROneStepRestore(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="VAROneStepRestore",
            display_name="VAR One-Step Restore / Upscale (VARestorer)",
            category=categories.RESTORE,
            description=(
                "Super-resolution (upscale x4) and restoration of real-world photos with VARestorer in one "
                "transformer pass per tile: the image is resized by the scale factor, split into overlapping "
                "tiles, each optionally cleaned by SwinIR, encoded into the VAE's token pyramid, restored and "
                "decoded; tiles are blended without seams. Alternatively restores an already encoded pyramid (no "
                "tiles, no SwinIR). Alpha is kept."
            ),
            inputs=[
                VarModel.Input("model", tooltip="The VARestorer transformer from Load VARestorer Model."),
                VarVAE.Input("vae", tooltip="The Infinity BSQ VAE (infinity_vae_d32reg.pth) from Load VAR VAE."),
                io.Image.Input(
                    "image", optional=True,
                    tooltip="Low-quality images to restore (any size, RGB or RGBA). May be left out when a "
                            "pyramid is connected.",
                ),
                io.Int.Input(
                    "seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                    tooltip="Seed of the Gumbel sampling noise; image i of a batch uses seed + i. Unused by argmax.",
                ),
                io.Combo.Input(
                    "sampling", options=list(var_restore.SAMPLING_MODES), default="gumbel",
                    tooltip="gumbel: the official temperature-0.5 Gumbel draw of the bits (seeded); argmax: "
                            "deterministic, noise-free bits (slightly smoother).",
                ),
                *tile_inputs(
                    scale_tooltip="Output size / input size (the official demo restores x4).",
                    tile_tooltip=("Tile side in output pixels; 512 is what the model was trained on. Images"
                                  " that fit in one tile are restored whole. Out of memory: the tile is "
                                  "halved and retried."),
                ),
                io.Combo.Input(
                    "color_fix", options=list(COLOR_FIX_MODES), default="none",
                    tooltip="Match the colours of the result to the (resized) input: wavelet keeps the input's "
                            "low frequencies, adain its per-channel mean and spread.",
                ),
                VarText.Input(
                    "text", optional=True,
                    tooltip="Prompt from VAR Text Encode (T5). Not connected or empty: unconditional, as the "
                            "official demo.",
                ),
                VarSwinIR.Input(
                    "swinir", optional=True,
                    tooltip="SwinIR pre-cleaner from Load SwinIR Pre-cleaner, run on each tile before encoding "
                            "(the official pipeline). Not used for a pyramid input.",
                ),
                VarPyramid.Input(
                    "pyramid", optional=True,
                    tooltip="Token pyramid from VAR Encode Pyramid: restored instead of the image, in one pass "
                            "on its own scale schedule, and resized to its original size times the scale.",
                ),
                io.Int.Input(
                    "tile_batch", default=0, min=0, max=64, optional=True,
                    tooltip="Tiles restored together in one transformer pass. 0: automatic (4 on a GPU, 1 on the "
                            "CPU, where batching gains nothing). More is faster on a GPU and needs more VRAM; "
                            "the result is the same.",
                ),
                io.Boolean.Input(
                    "compile", default=False, optional=True,
                    tooltip="Run the transformer through torch.compile: the first run compiles (slow), later runs "
                            "at the same tile size are faster. Falls back to normal execution if compiling fails.",
                ),
            ],
            outputs=[
                io.Image.Output(display_name="IMAGE", tooltip="Restored images (RGBA when the input had alpha)."),
                VarPyramid.Output(
                    display_name="VAR_PYRAMID",
                    tooltip="Token pyramid of the restored images, for VAR Pyramid Preview or VAR Decode Pyramid: "
                            "the bits the model predicted when each image was restored as one tile (or from a "
                            "pyramid input); for a tiled restoration, the VAE encoding of the restored images "
                            "(fitted to an Infinity size of at most about 1M pixels). Colour fix is not in the bits.",
                ),
            ],
        )

    @classmethod
    def execute(cls, model: VARModel, vae: VARVAE, seed: int = 0, sampling: str = "gumbel", scale: float = 4.0,
                tile_size: int = 512, tile_overlap: int = 64, color_fix: str = "none", image=None,
                text: VARText | None = None, swinir: VARSwinIR | None = None, pyramid=None, tile_batch: int = 0,
                compile: bool = False) -> io.NodeOutput:
        require_family(model, (var_core.Family.INFINITY,), "VAR One-Step Restore",
                       "It restores with VARestorer only; use VAR Restore, which runs every restoration family.")
        options = var_restore.RestoreOptions(scale=float(scale), tile=int(tile_size), overlap=int(tile_overlap),
                                             sampling=sampling, seed=int(seed), color_fix=color_fix,
                                             tile_batch=int(tile_batch), compile=bool(compile))
        if image is None and pyramid is None:
            raise var_core.ImageInputError(
                "VAR One-Step Restore needs an image or a pyramid: connect the image to restore "
                "(or a VAR_PYRAMID from VAR Encode Pyramid)"
            )
        cfg = model.config
        if vae.config.codebook_dim != cfg.codebook_dim:
            raise var_core.ParameterError(
                f"the VAE {vae.name} has {vae.config.codebook_dim}-bit tokens but the model {model.name} reads "
                f"{cfg.codebook_dim}-bit tokens; use the VAE that belongs to the model (infinity_vae_d32reg.pth "
                "for varestorer.pth)"
            )
        condition = None if text is None else text.condition
        if condition is not None and condition.kv_compact.shape[-1] != cfg.text_channels:
            raise var_core.ParameterError(
                f"the text has {condition.kv_compact.shape[-1]}-channel T5 features but {model.name} takes "
                f"{cfg.text_channels} channels; encode the prompt with the T5 that belongs to the model "
                "(flan-t5-xl for varestorer.pth)"
            )
        device = model.patcher.load_device
        vae_patcher = patching.on_device(vae.patcher, device, "VAE")
        if pyramid is not None:
            return io.NodeOutput(*cls._restore_pyramid(model, vae, vae_patcher, pyramid, condition, options,
                                                       image is not None, swinir is not None))

        # The size is refused (above MAX_SIDE) before split_alpha copies the pixels.
        out_h, out_w = var_restore.output_size(*var_image.image_size(image), options.scale)
        rgb, alpha = var_image.split_alpha(image)
        batch, h, w, _ = rgb.shape
        per_image = count_tiles(out_h, out_w, options.tile, options.overlap)
        patchers = [model.patcher, vae_patcher]
        if swinir is not None:
            patchers.append(patching.on_device(swinir.patcher, device, "SwinIR"))
        work_hw = var_restore.tile_pixels(out_h, out_w, options.tile)
        mm.load_models_gpu(patchers, memory_required=memory_required(
            model, vae, swinir, work_hw, (out_h, out_w), tiles=min(options.tiles_per_batch(device), per_image)))
        tiles = TileBits(batch)
        restored = restore_each(model, rgb, alpha, per_image, lambda x, i, progress: var_restore.restore_image(
            model.module, vae.module, x, text=condition, swinir=None if swinir is None else swinir.module,
            options=dataclasses.replace(options, seed=options.seed + i), progress=progress,
            check_interrupt=mm.throw_exception_if_processing_interrupted, device=device, on_bits=tiles.collector(i)))
        return io.NodeOutput(restored, tiles.pyramid(vae, restored, alpha, device))

    @staticmethod
    def _restore_pyramid(model: VARModel, vae: VARVAE, vae_patcher, pyramid, condition, options,
                         has_image: bool, has_swinir: bool) -> tuple[torch.Tensor, var_pyramid.Pyramid]:
        if has_image:
            logger.info("VAR One-Step Restore: a pyramid is connected, restoring it; the image input is not used")
        if has_swinir:
            logger.warning("VAR One-Step Restore: SwinIR cleans images before they are encoded, so it is not used "
                           "for a pyramid input")
        if pyramid.codebook_dim != model.config.codebook_dim:
            raise var_core.ParameterError(
                f"the pyramid has {pyramid.codebook_dim}-bit tokens but {model.name} reads "
                f"{model.config.codebook_dim}-bit tokens; encode the image with the model's VAE"
            )
        out_h, out_w = var_restore.output_size(*pyramid.image_size, options.scale)
        fit_h, fit_w = pyramid.fitted_size
        mm.load_models_gpu([model.patcher, vae_patcher],
                           memory_required=memory_required(model, vae, None, (fit_h, fit_w), (out_h, out_w)))
        store = mm.intermediate_device()
        batch = pyramid.batch_size
        pbar = comfy.utils.ProgressBar(batch)
        tiles = TileBits(batch)
        images = []
        with torch.inference_mode(), autocast_for(model):
            for i in range(batch):
                mm.throw_exception_if_processing_interrupted()
                one = dataclasses.replace(pyramid, bits=[b[i : i + 1] for b in pyramid.bits], alpha=None)
                y = var_restore.restore_pyramid(model.module, vae.module, one, text=condition,
                                                options=dataclasses.replace(options, seed=options.seed + i),
                                                device=model.patcher.load_device, on_bits=tiles.collector(i))
                images.append(var_image.from_model(y).to(store))
                pbar.update(1)
        alpha = None if pyramid.alpha is None else pyramid.alpha.to(store)
        out = var_image.merge_alpha(torch.cat(images, dim=0), alpha)
        return out, tiles.pyramid(vae, out, alpha, model.patcher.load_device)


NODES = [VARLoadStudent, VARLoadSwinIR, VAROneStepRestore]
