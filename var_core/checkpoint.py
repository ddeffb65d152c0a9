"""Safe reading of weights files and unwrapping of the official checkpoint nestings.

Formats read: ``.safetensors``, and PyTorch ``.pth``/``.ckpt``/``.bin`` files through
``torch.load(weights_only=True)`` only, so a checkpoint can never run code. Nestings unwrapped
(as the official loaders of each family read them):

* ``{'vae': sd}`` (Infinity ``infinity_vae_d32reg.pth``), ``{'state_dict': sd}`` (DiffBIR SwinIR,
  Lightning), ``{'model': sd}``, ``{'module': sd}``, ``{'ema': sd}`` when it is the only choice;
* ``{'trainer': {'var_wo_ddp': sd}}`` / ``{'trainer': {'vae_local': sd}}`` (VAR/VARSR trainers);
* ``module.`` prefixes left by DataParallel/DDP.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
import zipfile
from collections.abc import Mapping

import torch

from .errors import CheckpointError

StateDict = dict[str, torch.Tensor]

SAFETENSORS_EXT = (".safetensors", ".sft")
TORCH_EXT = (".pth", ".pt", ".ckpt", ".bin")
WEIGHT_EXTENSIONS = SAFETENSORS_EXT + TORCH_EXT

# Keys under which official checkpoints nest their state dict, in order of preference.
_WRAPPER_KEYS = ("state_dict", "model", "module", "vae", "var_wo_ddp", "vae_local", "params", "ema")


def _is_safetensors(path: str, head: bytes) -> bool:
    if path.lower().endswith(SAFETENSORS_EXT):
        return True
    if len(head) >= 9:
        (n,) = struct.unpack("<Q", head[:8])
        return 0 < n < 100_000_000 and head[8:9] == b"{"
    return False


def _read_safetensors(path: str) -> StateDict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: file is truncated ({size} bytes); download it again")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise CheckpointError(
                f"{path}: safetensors header says {n} bytes but the file has {size}; it is truncated "
                "or not a safetensors file. Download it again."
            )
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise CheckpointError(f"{path}: not a safetensors file (its header is not JSON)") from None
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    if ends and max(ends) > size - 8 - n:
        raise CheckpointError(f"{path}: safetensors data is truncated ({size} bytes); download it again")
    try:
        return load_file(path, device="cpu")
    except SafetensorError as e:
        raise CheckpointError(f"{path}: cannot read safetensors file: {e}") from None


def _read_torch(path: str) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        msg = str(e)
        if "Weights only load failed" in msg or "weights_only" in msg:
            raise CheckpointError(
                f"{path}: refused to load: the file contains Python objects other than tensors "
                "(a pickle that could run code). Only plain weights are loaded; convert the file "
                "to safetensors with a trusted tool, or get the official weights."
            ) from None
        raise CheckpointError(f"{path}: not a PyTorch checkpoint ({msg.splitlines()[0]})") from None
    except (RuntimeError, EOFError, ValueError, zipfile.BadZipFile, OSError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(
            f"{path}: cannot read the checkpoint ({first}); the file is truncated or corrupt. "
            "Download it again."
        ) from None


def read_file(path: str | os.PathLike) -> object:
    """Read a weights file as plain tensors/containers; never unpickles code."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: file not found")
    if os.path.isdir(path):
        raise CheckpointError(f"{path}: is a folder; give the weights file inside it")
    size = os.path.getsize(path)
    if size == 0:
        raise CheckpointError(f"{path}: file is empty (0 bytes); the download failed, get it again")
    with open(path, "rb") as f:
        head = f.read(16)
    if _is_safetensors(path, head):
        return _read_safetensors(path)
    if not path.lower().endswith(TORCH_EXT) and not zipfile.is_zipfile(path):
        raise CheckpointError(
            f"{path}: unknown weights format; expected one of {', '.join(WEIGHT_EXTENSIONS)}"
        )
    return _read_torch(path)


def _tensor_dict(obj: Mapping) -> bool:
    return len(obj) > 0 and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def unwrap(obj: object, *, source: str = "checkpoint", component: str | None = None) -> StateDict:
    """Find the state dict inside an official checkpoint container.

    ``component`` picks one entry by name where a container holds several models
    (e.g. ``'vae_local'`` or ``'var_wo_ddp'`` of a VAR trainer checkpoint).
    """
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{source}: holds a {type(obj).__name__}, not a dictionary of weights")
    if component is not None:
        if component not in obj:
            raise CheckpointError(f"{source}: has no entry {component!r}; entries: {sorted(map(str, obj))}")
        return unwrap(obj[component], source=source)
    if _tensor_dict(obj):
        return strip_prefix(dict(obj), "module.")
    if "trainer" in obj and isinstance(obj["trainer"], Mapping):
        obj = obj["trainer"]
    nested = {k: v for k, v in obj.items() if isinstance(v, Mapping) and any(isinstance(x, torch.Tensor) for x in v.values())}
    for key in _WRAPPER_KEYS:
        if key in nested:
            if key == "ema" and len(nested) > 1:
                continue
            return unwrap(nested[key], source=source)
    if len(nested) == 1:
        return unwrap(next(iter(nested.values())), source=source)
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if tensors and not nested:
        return strip_prefix(tensors, "module.")
    raise CheckpointError(
        f"{source}: no state dict found; top-level entries are {sorted(map(str, obj))[:20]}. "
        "Expected a plain state dict or one nested under 'state_dict', 'vae', 'model' or 'trainer'."
    )


def strip_prefix(sd: StateDict, prefix: str) -> StateDict:
    """Remove ``prefix`` from every key when all keys have it (``module.`` from DDP)."""
    if sd and all(k.startswith(prefix) for k in sd):
        return {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def load_state_dict(path_or_sd: str | os.PathLike | Mapping, *, component: str | None = None) -> StateDict:
    """A flat ``{name: tensor}`` dict from a path or an (official, nested) checkpoint object."""
    if isinstance(path_or_sd, (str, os.PathLike)):
        source = os.fspath(path_or_sd)
        return unwrap(read_file(source), source=source, component=component)
    return unwrap(path_or_sd, source="state dict", component=component)
