"""ModelPatcher glue for the pack's models (no maths): placement of the weights comfy.ops does not stream.

ComfyUI's ``ModelPatcher`` loads a model partially when VRAM is short (``--lowvram``, ``--novram``,
or big models): the layers built from ``comfy.ops`` (Linear, Conv2d, LayerNorm, Embedding, ...)
stay on the offload device and are cast to the compute device at each call. Everything else is
only moved by a full load: plain ``nn.Parameter``s of modules that also have children (Infinity's
``cfg_uncond``, ``pos_start``, attention ``q_bias`` / ``v_bias`` / ``scale_mul``, ``ada_gss``;
SwinIR's ``relative_position_bias_table``), buffers, and leaf modules that are not ``comfy.ops``
layers (``RMSNorm``, peft's LoRA ``lora_A`` / ``lora_B``). These are small; after every load
:func:`place_unstreamed` moves them to the load device, so that a partially loaded model computes
on the GPU (``var_core`` takes its compute device from its parameters).
"""

from __future__ import annotations

import logging

import comfy.model_patcher
import torch
from comfy.patcher_extension import CallbacksMP

logger = logging.getLogger(__name__)


def place_unstreamed(patcher, device_to, lowvram_model_memory=0, force_patch_weights=False, full_load=False) -> int:
    """``ON_LOAD`` callback: move every parameter and buffer not owned by a ``comfy.ops`` layer to
    ``device_to``; returns the bytes moved (added to the patcher's loaded-weight count)."""
    if device_to is None:
        return 0
    moved = 0
    for module in patcher.model.modules():
        if hasattr(module, "comfy_cast_weights"):  # comfy.ops layers: ModelPatcher streams them
            continue
        for name, param in list(module.named_parameters(recurse=False)):
            placed = param.to(device_to)  # the parameter itself when it is already there
            if placed is not param:
                setattr(module, name, torch.nn.Parameter(placed, requires_grad=False))
                moved += placed.numel() * placed.element_size()
        for name, buf in list(module.named_buffers(recurse=False)):
            placed = buf.to(device_to)
            if placed is not buf:
                module._buffers[name] = placed
                moved += placed.numel() * placed.element_size()
    if moved:
        patcher.model.model_loaded_weight_memory = getattr(patcher.model, "model_loaded_weight_memory", 0) + moved
        logger.debug("VAR: %.2f MB of unstreamed weights placed on %s", moved / 2**20, device_to)
    return moved


def make_patcher(module: torch.nn.Module, *, load_device, offload_device) -> comfy.model_patcher.ModelPatcher:
    """A ``ModelPatcher`` for a ``var_core`` model built with ``comfy.ops`` layers, safe to load partially."""
    patcher = comfy.model_patcher.ModelPatcher(module, load_device=load_device, offload_device=offload_device)
    patcher.add_callback(CallbacksMP.ON_LOAD, place_unstreamed)
    return patcher


def on_device(patcher, device, what: str):
    """``patcher`` itself if it loads on ``device``, else a clone that does (the one-step restore runs
    the VAE and SwinIR inside the transformer's tile loop, so they must share its device)."""
    if torch.device(patcher.load_device) == torch.device(device):
        return patcher
    clone = patcher.clone()
    clone.load_device = device
    logger.info("VAR: running the %s on %s with the transformer (it loads on %s otherwise)", what, device,
                patcher.load_device)
    return clone
