"""T5 text nodes of VARestorer / Infinity: load a flan-t5-xl folder, encode a prompt."""

from __future__ import annotations

import logging

import comfy.model_management as mm
import torch
from comfy_api.latest import io

from .. import var_core
from ..var_core import text as var_text
from . import categories, folders
from .dependencies import optional_dependencies
from .types import VART5, VARText, VarT5, VarText

logger = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def resolve_t5_dtype(choice: str, device: torch.device) -> torch.dtype:
    """``auto``: bfloat16 where the text encoder's device runs it well (flan-t5 was trained in bf16),
    else float32 (the CPU). fp16 is not offered (T5 activations overflow it without special care)."""
    if choice in DTYPES:
        return DTYPES[choice]
    if choice != "auto":  # ComfyUI 0.3.75 does not check V3 combo values itself
        raise var_core.ParameterError(f"weight_dtype {choice!r} is not one of auto, {', '.join(DTYPES)}")
    return torch.bfloat16 if mm.should_use_bf16(device) else torch.float32


def _size_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


class VARLoadT5(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        names = folders.text_encoder_folders()
        return io.Schema(
            node_id="VARLoadT5",
            display_name="Load T5 Text Encoder (VAR)",
            category=categories.LOADERS,
            description=(
                "Loads a T5 text encoder folder in the transformers format (flan-t5-xl for VARestorer and "
                "Infinity: config.json, tokenizer files, weights) from models/text_encoders/. Nothing is "
                "downloaded. It rests in CPU memory and visits the GPU only while encoding a prompt."
            ),
            inputs=[
                io.Combo.Input(
                    "t5_name",
                    options=names,
                    default=folders.pick_default(names, folders.OFFICIAL_T5),
                    tooltip=f"A sub-folder of models/{folders.TEXT_ENCODERS}/ with a config.json (the official "
                            f"one is {folders.OFFICIAL_T5}).",
                ),
                io.Combo.Input(
                    "weight_dtype",
                    options=["auto", "fp32", "bf16"],
                    default="auto",
                    tooltip="Precision of the T5 weights. auto: bf16 where the text encoder runs on a GPU that "
                            "supports it, fp32 on the CPU.",
                ),
            ],
            outputs=[VarT5.Output(display_name="VAR_T5", tooltip="The T5 text encoder and its tokenizer.")],
        )

    @classmethod
    def execute(cls, t5_name: str, weight_dtype: str = "auto") -> io.NodeOutput:
        device = mm.text_encoder_device()
        dtype = resolve_t5_dtype(weight_dtype, device)
        folder = folders.text_encoder_path(t5_name)
        with optional_dependencies("Load T5 Text Encoder (VAR)"):
            encoder = var_text.T5TextEncoder.from_folder(folder, dtype=dtype)
        encoder.encoder.to(mm.text_encoder_offload_device())
        logger.info("VAR T5 %s: %d channels, %.0fM parameters, encodes on %s, dtype %s", t5_name, encoder.channels,
                    sum(p.numel() for p in encoder.encoder.parameters()) / 1e6, device, dtype)
        return io.NodeOutput(VART5(encoder=encoder, name=t5_name, dtype=dtype))


class VARTextEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="VARTextEncode",
            display_name="VAR Text Encode (T5)",
            category=categories.TEXT,
            description=(
                "Encodes a prompt with the T5 text encoder for VAR One-Step Restore (at most 512 tokens). An "
                "empty prompt means unconditional restoration, as in the official demo."
            ),
            inputs=[
                VarT5.Input("t5", tooltip="The T5 text encoder from Load T5 Text Encoder (VAR)."),
                io.String.Input(
                    "prompt", multiline=True, default="",
                    tooltip="Description of the image content; empty = unconditional (the model's own "
                            "no-text embedding).",
                ),
            ],
            outputs=[VarText.Output(display_name="VAR_TEXT", tooltip="The encoded prompt (or 'unconditional').")],
        )

    @classmethod
    def execute(cls, t5: VART5, prompt: str = "") -> io.NodeOutput:
        if not prompt.strip():
            return io.NodeOutput(VARText(prompt="", condition=None))
        device = mm.text_encoder_device()
        if not mm.is_device_cpu(device):
            # Make room: the encoder visits the GPU for this call only (encode() moves it back).
            mm.free_memory(int(_size_bytes(t5.encoder.encoder) * 1.2) + mm.minimum_inference_memory(), device)
        mm.throw_exception_if_processing_interrupted()
        with torch.inference_mode():
            condition = t5.encoder.encode([prompt], device=device)
        logger.info("VAR text: %d T5 tokens on %s", condition.lens[0], device)
        return io.NodeOutput(VARText(prompt=prompt, condition=condition))


NODES = [VARLoadT5, VARTextEncode]
