"""Infinity BSQ VAE nodes: load the VAE, encode an image into its token pyramid, decode it back, and
preview how the pyramid builds the image scale by scale."""

from __future__ import annotations

import dataclasses
import logging

import comfy.model_management as mm
import comfy.model_patcher
import comfy.ops
import comfy.utils
import torch
from comfy_api.latest import io

from .. import var_core
from ..var_core import image as var_image
from ..var_core import pyramid as var_pyramid
from . import categories, folders
from .types import VARVAE, VarPyramid, VarVAE

logger = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def resolve_vae_dtype(choice: str, device: torch.device) -> torch.dtype:
    """``auto`` is float32: the pyramid bits are the signs of encoder features, and bf16 flips
    1-2.5% of the finest-scale bits (measured on the fixture VAE); bf16 is offered to save memory.
    fp16 is not offered: these convolutional nets overflow to NaN in it."""
    if choice in DTYPES:
        return DTYPES[choice]
    if choice != "auto":  # ComfyUI 0.3.75 does not check V3 combo values itself
        raise var_core.ParameterError(
            f"weight_dtype {choice!r} is not one of auto, {', '.join(DTYPES)} (fp16 overflows in this VAE)"
        )
    return torch.float32


def memory_required(vae: VARVAE, height: int, width: int) -> int:
    """Rough working memory (bytes) to encode or decode one ``height`` x ``width`` image.

    The same per-pixel figure ComfyUI uses for the SD VAE (~2200 x pixels x dtype bytes at
    128 base channels), scaled by the VAE's base width.
    """
    base_ch = getattr(vae.config, "base_ch", 128)
    return int(height * width * base_ch * 17 * mm.dtype_size(vae.dtype))


def encode_each(vae: VARVAE, rgb_BHW3: torch.Tensor, alpha_BHW1: torch.Tensor | None, *, device,
                pbar=None) -> var_pyramid.Pyramid:
    """Encode a batch image by image (the VAE already loaded on ``device``) into one pyramid on
    ComfyUI's intermediate device, ``alpha`` kept aside; ``pbar`` advances once per image."""
    store = mm.intermediate_device()
    parts = []
    for i in range(rgb_BHW3.shape[0]):
        mm.throw_exception_if_processing_interrupted()
        part = var_pyramid.encode_image(vae.module, var_image.to_model(rgb_BHW3[i : i + 1]), device=device)
        parts.append(part.to(store))
        if pbar is not None:
            pbar.update(1)
    return dataclasses.replace(
        parts[0],
        bits=[torch.cat(scale, dim=0) for scale in zip(*(p.bits for p in parts))],
        alpha=None if alpha_BHW1 is None else alpha_BHW1.to(store),
    )


class VARLoadVAE(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        names = folders.filenames()
        default = folders.OFFICIAL_VAE if folders.OFFICIAL_VAE in names else None
        return io.Schema(
            node_id="VARLoadVAE",
            display_name="Load VAR VAE (Infinity BSQ)",
            category=categories.LOADERS,
            description=(
                "Loads an Infinity BSQ multi-scale VAE (infinity_vae_d32reg.pth, as used by VARestorer and "
                "Infinity) from models/var/, for VAR restore / super-resolution / upscale and the pyramid nodes. "
                "The architecture is read from the weights."
            ),
            inputs=[
                io.Combo.Input(
                    "vae_name",
                    options=names,
                    default=default,
                    tooltip=f"VAE weights in models/{folders.FOLDER}/ (the official file is {folders.OFFICIAL_VAE}).",
                ),
                io.Combo.Input(
                    "weight_dtype",
                    options=["auto", "fp32", "bf16"],
                    default="auto",
                    tooltip=(
                        "Precision of the VAE weights. auto follows ComfyUI's VAE precision for the device "
                        "(bf16 on recent GPUs, fp32 on CPU). fp16 is not offered: the VAE overflows in it."
                    ),
                ),
            ],
            outputs=[VarVAE.Output(display_name="VAR_VAE", tooltip="The loaded BSQ VAE.")],
        )

    @classmethod
    def execute(cls, vae_name: str, weight_dtype: str = "auto") -> io.NodeOutput:
        load_device = mm.vae_device()
        offload_device = mm.vae_offload_device()
        dtype = resolve_vae_dtype(weight_dtype, load_device)
        path = folders.full_path(vae_name, folders.OFFICIAL_VAE)
        loaded = var_core.load(
            path, expect=var_core.Family.INFINITY_BSQ_VAE, operations=comfy.ops.disable_weight_init
        )
        model = loaded.model.to(device=offload_device, dtype=dtype).eval()
        patcher = comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=offload_device)
        logger.info("VAR VAE %s: %s, load device %s, dtype %s", vae_name, loaded.description, load_device, dtype)
        return io.NodeOutput(VARVAE(patcher=patcher, name=vae_name, dtype=dtype))


class VAREncodePyramid(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="VAREncodePyramid",
            display_name="VAR Encode Pyramid",
            category=categories.PYRAMID,
            description=(
                "Encodes images into the BSQ VAE's multi-scale token pyramid (per-scale bits). The image is "
                "fitted to the nearest Infinity scale schedule; its original size (and alpha, if any) is kept "
                "so that decoding restores it."
            ),
            inputs=[
                VarVAE.Input("vae", tooltip="The BSQ VAE from Load VAR VAE."),
                io.Image.Input(
                    "image",
                    tooltip="Images to encode (at least 16x16 pixels). An alpha channel is kept aside, not encoded.",
                ),
            ],
            outputs=[VarPyramid.Output(display_name="VAR_PYRAMID", tooltip="Per-scale bits, schedule and original size.")],
        )

    @classmethod
    def execute(cls, vae: VARVAE, image: torch.Tensor) -> io.NodeOutput:
        rgb, alpha = var_image.split_alpha(image)
        batch, height, width, _ = rgb.shape
        mm.load_models_gpu([vae.patcher], memory_required=memory_required(vae, height, width))
        return io.NodeOutput(encode_each(vae, rgb, alpha, device=vae.patcher.load_device,
                                         pbar=comfy.utils.ProgressBar(batch)))


class VARDecodePyramid(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="VARDecodePyramid",
            display_name="VAR Decode Pyramid",
            category=categories.PYRAMID,
            description=(
                "Decodes a token pyramid back into images with the BSQ VAE, at the size the images had "
                "before encoding; a kept alpha channel is passed through."
            ),
            inputs=[
                VarVAE.Input("vae", tooltip="The BSQ VAE that encoded (or whose tokens made) the pyramid."),
                VarPyramid.Input("pyramid", tooltip="Token pyramid from VAR Encode Pyramid, VAR One-Step Restore or "
                                                    "VAR Text to Image."),
            ],
            outputs=[io.Image.Output(display_name="IMAGE", tooltip="Decoded images, RGB (RGBA with a kept alpha).")],
        )

    @classmethod
    def execute(cls, vae: VARVAE, pyramid) -> io.NodeOutput:
        height, width = pyramid.fitted_size
        mm.load_models_gpu([vae.patcher], memory_required=memory_required(vae, height, width))
        store = mm.intermediate_device()
        batch = pyramid.batch_size
        pbar = comfy.utils.ProgressBar(batch)
        images = []
        for i in range(batch):
            mm.throw_exception_if_processing_interrupted()
            one = dataclasses.replace(pyramid, bits=[b[i : i + 1] for b in pyramid.bits], alpha=None)
            x = var_pyramid.decode_pyramid(vae.module, one, device=vae.patcher.load_device)
            images.append(var_image.from_model(x).to(store))
            pbar.update(1)
        rgb = torch.cat(images, dim=0)
        alpha = None if pyramid.alpha is None else pyramid.alpha.to(store)
        return io.NodeOutput(var_image.merge_alpha(rgb, alpha))


class VARPreviewPyramid(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="VARPreviewPyramid",
            display_name="VAR Pyramid Preview (scale by scale)",
            category=categories.PYRAMID,
            description=(
                "Shows next-scale prediction at work: decodes a token pyramid after each of its scales (the codes "
                "of scales 1..k summed), from a blur of colour to the full image. Works on the encoding of a "
                "low-quality image (VAR Encode Pyramid), a restoration (VAR One-Step Restore) or a generation "
                "(VAR Text to Image). Outputs one frame per scale and a grid of all frames; connect Preview Image."
            ),
            inputs=[
                VarVAE.Input("vae", tooltip="The BSQ VAE that encoded (or whose tokens made) the pyramid."),
                VarPyramid.Input("pyramid", tooltip="Token pyramid from VAR Encode Pyramid, VAR One-Step Restore or "
                                                    "VAR Text to Image."),
                io.Int.Input(
                    "columns", default=0, min=0, max=64,
                    tooltip="Frames per row of the grid; 0 = auto (a near-square grid for one image, one row per "
                            "image for a batch).",
                ),
            ],
            outputs=[
                io.Image.Output(display_name="frames",
                                tooltip="One frame per scale at the pyramid's image size; for a batch, the frames of "
                                        "image 1, then those of image 2, ..."),
                io.Image.Output(display_name="grid", tooltip="All frames tiled in one image, left to right, top to "
                                                             "bottom."),
            ],
        )

    @classmethod
    def execute(cls, vae: VARVAE, pyramid, columns: int = 0) -> io.NodeOutput:
        height, width = pyramid.fitted_size
        mm.load_models_gpu([vae.patcher], memory_required=memory_required(vae, height, width))
        store = mm.intermediate_device()
        batch, scales = pyramid.batch_size, len(pyramid.schedule)
        total = batch * scales
        pbar = comfy.utils.ProgressBar(total)
        frames = []
        for i in range(batch):
            mm.throw_exception_if_processing_interrupted()
            one = dataclasses.replace(pyramid, bits=[b[i : i + 1] for b in pyramid.bits], alpha=None)
            x_1S3HW = var_pyramid.progressive_decode(
                vae.module, one, device=vae.patcher.load_device,
                progress=lambda done, _of, start=i * scales: pbar.update_absolute(start + done, total))
            frames.append(var_image.from_model(x_1S3HW[0]).to(store))
        frames_NHW3 = torch.cat(frames, dim=0)
        grid = var_pyramid.frame_grid(frames_NHW3, int(columns) or var_pyramid.auto_columns(batch, scales))
        return io.NodeOutput(frames_NHW3, grid)


NODES = [VARLoadVAE, VAREncodePyramid, VARDecodePyramid, VARPreviewPyramid]
