"""ComfyUI socket types of the pack and the objects that travel on them.

* ``VAR_VAE``: a :class:`VARVAE` (the BSQ VAE ``nn.Module`` wrapped in a ComfyUI ``ModelPatcher``).
* ``VAR_PYRAMID``: a ``var_core.pyramid.Pyramid`` (per-scale bits, scale schedule, original size,
  optional alpha), kept on ComfyUI's intermediate device (the CPU unless ``--gpu-only``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from comfy_api.latest import io

VarVAE = io.Custom("VAR_VAE")
VarPyramid = io.Custom("VAR_PYRAMID")


@dataclass(frozen=True, eq=False)
class VARVAE:
    """A loaded Infinity BSQ VAE: ``patcher.model`` is the ``var_core`` ``BSQVAE`` module."""

    patcher: object  # comfy.model_patcher.ModelPatcher
    name: str
    dtype: torch.dtype

    @property
    def module(self) -> torch.nn.Module:
        return self.patcher.model

    @property
    def config(self):
        return self.patcher.model.config

    def __repr__(self) -> str:  # shown in ComfyUI's error reports ("current_inputs")
        return f"VAR_VAE({self.name}, {str(self.dtype).removeprefix('torch.')})"
