"""LoRA adapters of VARestorer's student, loaded into ``peft`` LoRA layers.

VARestorer (ICLR 2026) trains LoRA (Hu et al., ICLR 2022) on every linear layer of the
self- and cross-attention modules of Infinity's blocks with cloneofsimo/lora's
``inject_trainable_lora`` (r=32, scale 1). Its ``LoraInjectedLinear`` stores
``X.linear.weight`` (+ ``X.linear.bias``), ``X.lora_down.weight`` ``(r, in)`` and
``X.lora_up.weight`` ``(out, r)`` and computes ``linear(x) + lora_up(lora_down(x)) * scale``.

Here the base weights are loaded under the plain keys (``X.weight``) and the adapters become
``peft`` LoRA layers (``lora_A`` = down, ``lora_B`` = up, ``lora_alpha = r`` so that the scale is
1, no dropout). They can be merged into the base weights for speed (:func:`merge_lora`) or
removed to get the plain base model (:func:`strip_lora`).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from .checkpoint import StateDict
from .errors import CheckpointError, ParameterError

log = logging.getLogger(__name__)

ADAPTER = "default"
_DOWN, _UP, _LINEAR = ".lora_down.weight", ".lora_up.weight", ".linear."
_FIX = "the file is damaged or its adapters were not made for this model; download the official varestorer.pth again"


def split_state_dict(sd: StateDict) -> tuple[StateDict, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Official LoRA checkpoint -> ``(base weights under plain keys, {module: (down, up)})``.

    A plain checkpoint comes back unchanged with no adapters.
    """
    targets = {k[: -len(_DOWN)] for k in sd if k.endswith(_DOWN)}
    if not targets:
        return dict(sd), {}
    base, adapters = {}, {}
    for name in sorted(targets):
        if name + _UP not in sd:
            raise CheckpointError(f"LoRA adapter {name} has lora_down but no lora_up weights; {_FIX}")
        down, up = sd[name + _DOWN], sd[name + _UP]
        if down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0]:
            raise CheckpointError(
                f"LoRA adapter {name}: lora_down {tuple(down.shape)} and lora_up {tuple(up.shape)} do not chain "
                f"(a rank-r adapter is lora_down (r, in) and lora_up (out, r)); {_FIX}")
        adapters[name] = (down, up)
    for key, value in sd.items():
        if key.endswith((_DOWN, _UP)):
            continue
        owner, _, leaf = key.rpartition(_LINEAR)
        base[f"{owner}.{leaf}" if owner in targets else key] = value
    return base, adapters


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The peft LoRA layers of ``model`` by module name."""
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def _mark_kv(model: nn.Module, names, value: bool) -> None:
    for name in names:
        parent, _, leaf = name.rpartition(".")
        if leaf == "mat_kv" and hasattr(model.get_submodule(parent), "kv_has_lora"):
            model.get_submodule(parent).kv_has_lora = value


@torch.no_grad()
def apply_lora(model: nn.Module, adapters: dict[str, tuple[torch.Tensor, torch.Tensor]], *,
               merge: bool = False) -> nn.Module:
    """Wrap each adapted linear of ``model`` in a peft LoRA layer holding ``(down, up)``; in place."""
    from peft import LoraConfig, inject_adapter_in_model

    ranks = {name: int(down.shape[0]) for name, (down, _) in adapters.items()}
    r = max(set(ranks.values()), key=list(ranks.values()).count)
    others = {name: rank for name, rank in ranks.items() if rank != r}
    config = LoraConfig(r=r, lora_alpha=r, lora_dropout=0.0, bias="none", target_modules=sorted(adapters),
                        rank_pattern=others, alpha_pattern=others, init_lora_weights=False)
    inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    layers = lora_layers(model)
    for name, (down, up) in adapters.items():
        layer = layers.get(name)
        if layer is None:
            raise CheckpointError(
                f"the checkpoint has a LoRA adapter for {name}, which is not a linear layer of the model; {_FIX}")
        a, b = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
        if a.shape != down.shape or b.shape != up.shape:
            raise CheckpointError(f"LoRA adapter {name}: shapes {tuple(down.shape)}/{tuple(up.shape)} do not fit "
                                  f"the layer ({tuple(a.shape)}/{tuple(b.shape)}); {_FIX}")
        a.copy_(down)
        b.copy_(up)
    _mark_kv(model, adapters, True)
    model.lora_state = "adapters"
    log.debug("LoRA: %d adapters of rank %d", len(adapters), r)
    if merge:
        merge_lora(model)
    return model


def _unload(model: nn.Module, *, merge: bool) -> None:
    for name, layer in lora_layers(model).items():
        if merge and not layer.merged:
            layer.merge(adapter_names=[ADAPTER])
        elif not merge and layer.merged:
            layer.unmerge()
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, layer.get_base_layer())


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (peft ``merge``) and drop the LoRA layers; in place.

    The ``ca.v_bias`` behaviour of the LoRA path is kept (``kv_has_lora`` stays set).
    """
    _unload(model, merge=True)
    if getattr(model, "lora_state", "none") == "adapters":
        model.lora_state = "merged"
    return model


def strip_lora(model: nn.Module) -> nn.Module:
    """Remove the adapters, leaving the plain base model (the checkpoint without LoRA); in place."""
    if getattr(model, "lora_state", "none") == "merged":
        raise ParameterError("the LoRA adapters were merged into the weights; load the checkpoint again to strip them")
    names = list(lora_layers(model))
    _unload(model, merge=False)
    _mark_kv(model, names, False)
    model.lora_state = "none"
    return model


def set_lora_scale(model: nn.Module, scale: float) -> None:
    """Scale of every adapter (1 = as trained): ``out = linear(x) + scale * up(down(x))``."""
    if getattr(model, "lora_state", "none") == "merged" and scale != 1:
        raise ParameterError("the LoRA adapters were merged into the weights; load again to change their scale")
    for layer in lora_layers(model).values():
        layer.set_scale(ADAPTER, float(scale))
