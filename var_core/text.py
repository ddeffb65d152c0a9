"""T5 text conditioning for Infinity / VARestorer (``flan-t5-xl`` encoder through ``transformers``).

As in the official pipeline (``encode_prompt`` of EternalEvan/VARestorer ``tools/run_varestorer.py``),
prompts are tokenised to at most 512 tokens, encoded, and the valid (unpadded) token features
of all prompts are packed into one ``(N, C)`` tensor with per-prompt lengths (:class:`TextCondition`).
Everything is read from a local folder: nothing is downloaded.

An empty prompt means "no text": callers use the model's unconditional embedding (``cfg_uncond``)
instead, see :func:`unconditional`.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Sequence

import torch

from .errors import CheckpointError
from .infinity_model import TextCondition

log = logging.getLogger(__name__)

MAX_LENGTH = 512  # the official tokeniser setting (model_max_length = 512)
_CACHE_SIZE = 64


def unconditional(cfg_uncond_LC: torch.Tensor, batch: int = 1, length: int = 1) -> TextCondition:
    """The unconditional text of ``batch`` prompts: the first ``length`` rows of ``cfg_uncond``."""
    return TextCondition(cfg_uncond_LC[:length].float().repeat(batch, 1), (length,) * batch)


class T5TextEncoder:
    """A T5 encoder + tokenizer with a per-prompt feature cache (features kept on the CPU)."""

    def __init__(self, *, tokenizer, encoder: torch.nn.Module, max_length: int = MAX_LENGTH):
        self.tokenizer = tokenizer
        self.encoder = encoder.eval().requires_grad_(False)
        self.max_length = max_length
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, *, dtype: torch.dtype = torch.float32) -> "T5TextEncoder":
        """Load tokenizer and encoder from a local ``flan-t5-xl``-style folder (on the CPU)."""
        from safetensors import SafetensorError
        from transformers import AutoTokenizer, T5EncoderModel

        folder = os.fspath(folder)
        if not os.path.isdir(folder):
            raise CheckpointError(
                f"T5 text encoder folder {folder!r} not found. Put the flan-t5-xl folder (config.json, "
                "tokenizer files, model weights) under ComfyUI/models/text_encoders/, or leave the prompt empty."
            )
        if not os.path.isfile(os.path.join(folder, "config.json")):
            raise CheckpointError(f"{folder}: no config.json; this is not a transformers T5 folder")
        if not any(os.path.isfile(os.path.join(folder, f)) for f in ("spiece.model", "tokenizer.json")):
            raise CheckpointError(f"{folder}: no tokenizer files (spiece.model or tokenizer.json); copy the whole "
                                  "flan-t5-xl folder")
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, legacy=True)
        except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:  # a missing or damaged file
            raise CheckpointError(
                f"{folder}: cannot load the T5 tokenizer ({e}). The folder needs spiece.model or tokenizer.json: copy "
                "the whole flan-t5-xl folder again."
            ) from None
        try:
            encoder = T5EncoderModel.from_pretrained(folder, local_files_only=True, torch_dtype=dtype,
                                                     use_safetensors=None)
        except (OSError, ValueError, RuntimeError, SafetensorError) as e:  # missing, truncated, not matching config.json
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(
                f"{folder}: cannot load the T5 encoder weights ({first}); the folder is incomplete or damaged: "
                "copy the whole flan-t5-xl folder (config.json, tokenizer files, weights) again"
            ) from None
        return cls(tokenizer=tokenizer, encoder=encoder)

    @property
    def channels(self) -> int:
        return int(self.encoder.config.d_model)

    @torch.no_grad()
    def _encode_one(self, prompt: str, device) -> torch.Tensor:
        # A lone surrogate (possible in a prompt sent as JSON) is not text the tokenizer takes: U+FFFD.
        prompt = prompt.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
        tokens = self.tokenizer([prompt], max_length=self.max_length, padding="max_length", truncation=True,
                                return_tensors="pt")
        ids, mask = tokens.input_ids.to(device), tokens.attention_mask.to(device)
        feats = self.encoder(input_ids=ids, attention_mask=mask)["last_hidden_state"].float()
        return feats[0, : int(mask.sum())].cpu()

    def encode(self, prompts: Sequence[str], *, device=None) -> TextCondition:
        """Packed features of non-empty ``prompts`` (cached). ``device`` runs the encoder there, then
        moves it back to where it was, so it does not stay in GPU memory."""
        if any(not p.strip() for p in prompts):
            raise ValueError("empty prompts have no T5 features; use var_core.text.unconditional()")
        home = next(self.encoder.parameters()).device
        device = torch.device(device) if device is not None else home
        missing = [p for p in dict.fromkeys(prompts) if p not in self._cache]
        if missing:
            self.encoder.to(device)
            try:
                for p in missing:
                    self._cache[p] = self._encode_one(p, device)
            finally:
                self.encoder.to(home)
        feats = []
        for p in prompts:
            self._cache.move_to_end(p)
            feats.append(self._cache[p])
        while len(self._cache) > _CACHE_SIZE:
            self._cache.popitem(last=False)
        return TextCondition(torch.cat(feats), tuple(f.shape[0] for f in feats))
