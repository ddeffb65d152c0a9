"""ComfyUI socket types of the pack and the objects that travel on them.

* ``VAR_VAE``: a :class:`VARVAE` (the BSQ VAE ``nn.Module`` wrapped in a ComfyUI ``ModelPatcher``).
* ``VAR_PYRAMID``: a ``var_core.pyramid.Pyramid`` (per-scale bits, scale schedule, original size,
  optional alpha), kept on ComfyUI's intermediate device (the CPU unless ``--gpu-only``).
* ``VAR_MODEL``: a :class:`VARModel` (a transformer in a ``ModelPatcher``: Infinity / VARestorer from
  ``VARLoadStudent``, or any family, VARSR, RestoreVAR and class-conditional VAR included, from
  ``VARLoadModel``); ``family`` says which, and nodes refuse the families they cannot run.
* ``VAR_VQVAE``: a :class:`VARVQVAE` (the multi-scale VQVAE of VAR, VARSR and RestoreVAR in a ``ModelPatcher``).
* ``VAR_SWINIR``: a :class:`VARSwinIR` (the SwinIR pre-cleaner in a ``ModelPatcher``).
* ``VAR_T5``: a :class:`VART5` (a ``var_core.text.T5TextEncoder``, kept on the text encoder's offload device).
* ``VAR_TEXT``: a :class:`VARText` (the packed T5 features of one prompt, or "unconditional").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from comfy_api.latest import io

VarVAE = io.Custom("VAR_VAE")
VarPyramid = io.Custom("VAR_PYRAMID")
VarModel = io.Custom("VAR_MODEL")
VarVQVAE = io.Custom("VAR_VQVAE")
VarSwinIR = io.Custom("VAR_SWINIR")
VarT5 = io.Custom("VAR_T5")
VarText = io.Custom("VAR_TEXT")


@dataclass(frozen=True, eq=False)
class _Patched:
    """A ``var_core`` module wrapped in a ComfyUI ``ModelPatcher``; ``patcher.model`` is the module."""

    patcher: object  # comfy.model_patcher.ModelPatcher
    name: str
    dtype: torch.dtype

    SOCKET = ""

    @property
    def module(self) -> torch.nn.Module:
        return self.patcher.model

    @property
    def config(self):
        return self.patcher.model.config

    def _details(self) -> list[str]:
        return [self.name, str(self.dtype).removeprefix("torch.")]

    def __repr__(self) -> str:  # shown in ComfyUI's error reports ("current_inputs")
        return f"{self.SOCKET}({', '.join(self._details())})"


@dataclass(frozen=True, eq=False, repr=False)
class VARVAE(_Patched):
    """A loaded Infinity BSQ VAE (``var_core`` ``BSQVAE``)."""

    SOCKET = "VAR_VAE"


@dataclass(frozen=True, eq=False, repr=False)
class VARModel(_Patched):
    """A loaded transformer of ``family`` (a ``var_core.Family`` value: ``infinity`` for Infinity /
    VARestorer, ``varsr``, ``restorevar``, ``var``).

    ``lora`` is ``"merged"`` (adapters folded into the weights), ``"adapters"`` (peft layers) or
    ``"none"`` (a checkpoint without LoRA, and every family but Infinity)."""

    lora: str = "none"
    family: str = "infinity"

    SOCKET = "VAR_MODEL"

    def _details(self) -> list[str]:
        if self.family != "infinity":
            return [self.name, self.family, str(self.dtype).removeprefix("torch.")]
        return [*super()._details(), f"LoRA {self.lora}"]


@dataclass(frozen=True, eq=False, repr=False)
class VARVQVAE(_Patched):
    """A loaded VAR multi-scale VQVAE (VAR, VARSR, RestoreVAR; ``var_core`` ``VQVAE``)."""

    SOCKET = "VAR_VQVAE"


@dataclass(frozen=True, eq=False, repr=False)
class VARSwinIR(_Patched):
    """A loaded SwinIR pre-cleaner (``var_core`` ``SwinIR``)."""

    SOCKET = "VAR_SWINIR"


@dataclass(frozen=True, eq=False)
class VART5:
    """A T5 text encoder (``var_core.text.T5TextEncoder``), resting on the text encoder offload device."""

    encoder: object  # var_core.text.T5TextEncoder
    name: str
    dtype: torch.dtype

    @property
    def channels(self) -> int:
        return self.encoder.channels

    def __repr__(self) -> str:
        return f"VAR_T5({self.name}, {str(self.dtype).removeprefix('torch.')})"


@dataclass(frozen=True, eq=False)
class VARText:
    """The text of a restoration: ``condition`` is a ``var_core`` ``TextCondition`` (CPU) for one
    prompt, or None for an empty prompt (the model's unconditional embedding)."""

    prompt: str
    condition: object | None  # var_core.infinity_model.TextCondition

    @property
    def unconditional(self) -> bool:
        return self.condition is None

    def __repr__(self) -> str:
        if self.condition is None:
            return "VAR_TEXT(unconditional)"
        short = self.prompt if len(self.prompt) <= 40 else self.prompt[:37] + "..."
        return f"VAR_TEXT({short!r}, {self.condition.lens[0]} tokens)"
