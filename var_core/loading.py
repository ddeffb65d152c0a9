"""``var_core.load``: one entry point from a weights file (or state dict) to a built model.

The family is detected from the keys (:mod:`.detect`), the architecture from the shapes (each
family's ``Config.from_state_dict``); nothing is read from a side config.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .checkpoint import StateDict, load_state_dict
from .detect import DESCRIPTIONS, Family, detect_family, summarize
from .errors import CheckpointError, UnsupportedFamilyError


@dataclass(frozen=True)
class LoadedModel:
    """What :func:`load` returns: the detected ``family``, its frozen ``config`` and the ``model``."""

    family: str
    config: Any
    model: nn.Module
    source: str

    @property
    def description(self) -> str:
        return DESCRIPTIONS[self.family]


def load_strict(model: nn.Module, sd: StateDict, *, what: str) -> None:
    """Load ``sd`` into ``model`` (built on the meta device), naming every missing/unexpected key."""
    result = model.load_state_dict(sd, strict=False, assign=True)
    if result.missing_keys or result.unexpected_keys:
        parts = []
        if result.missing_keys:
            parts.append(f"missing keys {result.missing_keys[:10]}" + (" ..." if len(result.missing_keys) > 10 else ""))
        if result.unexpected_keys:
            parts.append(
                f"unexpected keys {result.unexpected_keys[:10]}" + (" ..." if len(result.unexpected_keys) > 10 else "")
            )
        raise CheckpointError(f"{what}: weights do not match the architecture read from them: " + "; ".join(parts)
                              + ". The file is damaged or was changed after training; download the official file again")
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise CheckpointError(f"{what}: tensors not initialised by the checkpoint: {left[:10]}")


_BUILDERS = {}


def _builder(family: str):
    if not _BUILDERS:
        from . import bsq_vae, infinity_model, swinir
        from . import var_model, var_vqvae

        _BUILDERS[Family.INFINITY_BSQ_VAE] = bsq_vae.build
        _BUILDERS[Family.INFINITY] = infinity_model.build
        _BUILDERS[Family.SWINIR] = swinir.build
        _BUILDERS[Family.VAR_VQVAE] = var_vqvae.build
        _BUILDERS[Family.VAR] = var_model.build
        from . import varsr
        _BUILDERS[Family.VARSR] = varsr.build
        from . import restorevar
        _BUILDERS[Family.RESTOREVAR] = restorevar.build
    return _BUILDERS.get(family)


def inspect(path_or_sd: str | os.PathLike | Mapping, *, component: str | None = None) -> tuple[str, StateDict]:
    """Read a checkpoint and detect its family without building the model."""
    source = os.fspath(path_or_sd) if isinstance(path_or_sd, (str, os.PathLike)) else "state dict"
    sd = load_state_dict(path_or_sd, component=component)
    return detect_family(sd, source=source), sd


def check_family(family: str, expect: str | tuple[str, ...], source: str | os.PathLike) -> None:
    """Raise a :class:`CheckpointError` naming the file and what it is when ``family`` is not ``expect``
    (a family or families)."""
    wanted = (expect,) if isinstance(expect, str) else tuple(expect)
    if family not in wanted:
        raise CheckpointError(
            f"{os.path.basename(os.fspath(source))} is the wrong model here: it is the {DESCRIPTIONS[family]}, but "
            "this needs the " + " or the ".join(DESCRIPTIONS[w] for w in wanted) + ". Pick the right file."
        )


def load(
    path_or_sd: str | os.PathLike | Mapping,
    *,
    expect: str | tuple[str, ...] | None = None,
    operations=None,
    component: str | None = None,
) -> LoadedModel:
    """Load any supported checkpoint: ``var_core.load("infinity_vae_d32reg.pth").model``.

    ``expect`` names the family (or families) the caller can use; another family raises a
    :class:`CheckpointError` saying what the file is. ``operations`` is the layer namespace
    (``torch.nn`` by default; ComfyUI passes ``comfy.ops``).
    """
    source = os.fspath(path_or_sd) if isinstance(path_or_sd, (str, os.PathLike)) else "state dict"
    family, sd = inspect(path_or_sd, component=component)
    if expect is not None:
        check_family(family, expect, source)
    build = _builder(family)
    if build is None:
        sizes = ", ".join(f"{k} {v}" for k, v in summarize(family, sd).items())
        raise UnsupportedFamilyError(
            f"{os.path.basename(source)}: {DESCRIPTIONS[family]}" + (f" ({sizes})" if sizes else "")
            + ": this version of the pack cannot run this family yet."
        )
    with torch.no_grad():
        config, model = build(sd, operations=operations)
    return LoadedModel(family=family, config=config, model=model, source=source)
