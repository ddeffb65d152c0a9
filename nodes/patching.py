"""ModelPatcher glue for the pack's models (no maths): placement of the weights comfy.ops does not stream.

ComfyUI's ``ModelPatcher`` loads a model partially when VRAM is short (``--lowvram``, ``--novram``,
or big models): the layers built from ``comfy.ops`` (Linear, Conv2d, LayerNorm, Embedding, ...)
stay on the offload device and are cast to the compute device at each call. Everything else is
only moved by a full load: plain ``nn.Parameter``s of modules that also have children (Infinity's
``cfg_uncond``, ``pos_start``, attention ``q_bias`` / ``v_bias`` / ``scale_mul``, ``ada_gss``;
SwinIR's ``relative_position_bias_table``), buffers, and leaf modules that are not ``comfy.ops``
layers (``RMSNorm``, peft's LoRA ``lora_A`` / ``lora_B``). These are small; after every load
:func:`place_unstreamed` moves them to the load device, so that a partially loaded model computes
on the GPU (``var_core`` takes its compute device from its parameters). The VAR-family modules,
whose ``device`` is a read-only property, are made to accept ComfyUI's ``model.device`` record
(:func:`settable_device`).
"""

from __future__ import annotations

import inspect
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


_SETTABLE_DEVICE: dict[type, type] = {}


def settable_device(module: torch.nn.Module) -> torch.nn.Module:
    """``ModelPatcher`` records the device it loaded a model to in ``model.device`` (and reads it back
    as the model's current device). The VAR, VARSR and RestoreVAR modules have a read-only ``device``
    property (where their weights are) that their code computes on. Such a module gets a subclass of
    its own class (``isinstance`` unchanged) whose ``device`` returns what ComfyUI recorded, else the
    weights' device: after a partial load (weights streamed from the CPU) that is the load device,
    where the computation must happen."""
    cls = type(module)
    prop = inspect.getattr_static(cls, "device", None)
    if isinstance(prop, property) and prop.fset is None:
        sub = _SETTABLE_DEVICE.get(cls)
        if sub is None:
            def get(self, _weights=prop.fget):
                recorded = self.__dict__.get("_comfy_device")
                return recorded if recorded is not None else _weights(self)

            def set_(self, value):
                self.__dict__["_comfy_device"] = None if value is None else torch.device(value)

            sub = type(cls.__name__, (cls,), {"device": property(get, set_), "__module__": cls.__module__,
                                              "__qualname__": cls.__qualname__, "__doc__": cls.__doc__})
            _SETTABLE_DEVICE[cls] = sub
        module.__class__ = sub
    return module


def make_patcher(module: torch.nn.Module, *, load_device, offload_device) -> comfy.model_patcher.ModelPatcher:
    """A ``ModelPatcher`` for a ``var_core`` model built with ``comfy.ops`` layers, safe to load partially."""
    patcher = comfy.model_patcher.ModelPatcher(settable_device(module), load_device=load_device,
                                               offload_device=offload_device)
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
