"""``train export``: a trained student in the official ``varestorer.pth`` layout, as .pth and .safetensors.

VARestorer (ICLR 2026) ships its student as one flat state dict of Infinity's keys in which every
adapted linear layer ``X`` is stored the way cloneofsimo/lora's ``LoraInjectedLinear`` saves it:
``X.linear.weight`` (+ ``X.linear.bias``), ``X.lora_down.weight`` ``(r, in)`` and
``X.lora_up.weight`` ``(out, r)`` (:mod:`var_core.lora` reads it into peft layers). The peft
layers of a trained student are written back into that layout by :func:`official_state_dict`.

``--merge-lora`` folds the adapters into the base weights instead (a plain Infinity state dict,
smaller and faster to load). The official LoRA path leaves out the cross-attention ``v_bias``
where ``ca.mat_kv`` carries an adapter; the merged file stores that ``v_bias`` as zeros, so both
files compute the same. Each written file is loaded back through ``var_core.load`` and its logits
compared with the source model's.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch
from safetensors.torch import save_file

from .. import lora as lora_lib, text as text_lib
from ..checkpoint import StateDict
from ..detect import Family
from ..errors import CheckpointError
from ..infinity_model import Infinity
from ..loading import load
from ..schedules import scale_schedule
from ..student import student_inputs

log = logging.getLogger(__name__)

# peft LoRA layer keys -> the official (cloneofsimo/lora) keys.
_PEFT_TO_OFFICIAL = ((".base_layer.", ".linear."), (f".lora_A.{lora_lib.ADAPTER}.weight", ".lora_down.weight"),
                     (f".lora_B.{lora_lib.ADAPTER}.weight", ".lora_up.weight"))
CHECK_ATOL = 1e-4


def official_state_dict(model: Infinity, *, merge: bool = False) -> StateDict:
    """The flat state dict of ``model`` in the ``varestorer.pth`` layout (module docstring), float32 on
    the CPU; ``merge`` folds the LoRA adapters into the base weights."""
    if merge and lora_lib.lora_layers(model):
        model = lora_lib.merge_lora(copy.deepcopy(model))
    sd = model.state_dict()
    if model.lora_state == "merged":
        for name, m in model.named_modules():
            if getattr(m, "kv_has_lora", False):  # the LoRA path drops this bias: store what it computes
                sd[f"{name}.v_bias"] = torch.zeros_like(sd[f"{name}.v_bias"])
    out = {}
    for key, value in sd.items():
        for peft, official in _PEFT_TO_OFFICIAL:
            key = key.replace(peft, official)
        out[key] = value.detach().float().cpu().clone().contiguous()
    return out


def _check_logits(source: Infinity, path: Path) -> float:
    """Max abs difference of the logits of ``path`` (loaded through ``var_core.load``) and ``source``
    on a random pyramid input (full attention, the student's pass)."""
    loaded = load(path, expect=Family.INFINITY).model.float()
    d = source.config.codebook_dim
    schedule = scale_schedule(1.0, "0.06M")
    gen = torch.Generator().manual_seed(0)
    bits = [torch.randint(0, 2, (1, h, w, d), generator=gen, dtype=torch.uint8) for _, h, w in schedule]
    x = student_inputs(bits, schedule)
    with torch.no_grad():
        ref = source.forward_logits(x, text_lib.unconditional(source.cfg_uncond), schedule)
        got = loaded.forward_logits(x, text_lib.unconditional(loaded.cfg_uncond), schedule)
    return float((ref - got).abs().max())


def export(source: str | Path, output: str | Path, *, merge: bool = False) -> list[Path]:
    """Write the student of ``source`` (any file ``var_core.load`` reads as the Infinity transformer)
    to ``output`` with the suffixes ``.pth`` (``torch.save`` of a plain dict of tensors) and
    ``.safetensors``; checks that both load and compute as ``source``. Returns the paths."""
    model = load(source, expect=Family.INFINITY).model.float()
    sd = official_state_dict(model, merge=merge)
    stem = Path(output)
    if stem.suffix in (".pth", ".safetensors"):
        stem = stem.with_suffix("")
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.with_name(stem.name + ".pth"), stem.with_name(stem.name + ".safetensors")]
    torch.save(sd, paths[0])
    save_file(sd, paths[1])
    for path in paths:
        err = _check_logits(model, path)
        if err > CHECK_ATOL:
            raise CheckpointError(f"{path}: the exported model's logits differ from {source} by {err:.2e}")
        log.info("%s: %d tensors, %.1f MB, logits match the source (max diff %.1e)", path, len(sd),
                 path.stat().st_size / 2**20, err)
    return paths


def run(args) -> int:
    """``train export`` (arguments: :mod:`.cli`)."""
    for path in export(args.student, args.output, merge=args.merge_lora):
        print(path)
    return 0
